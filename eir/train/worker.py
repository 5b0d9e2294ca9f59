"""The per-worker training loop of one step (runs inside a Ray Train worker).

Flat on purpose, in the shape of torchvision's segmentation reference: build the model, load
step t−1, resume from the last epoch checkpoint if Ray Train restarted us, then epochs of
stream → EIR's paste → normalise → forward → loss → SGD, one `ray.train.report` with a checkpoint per epoch,
and after the last epoch the step's confusion matrix on the test stream, summed over workers.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile
import time
from collections import deque

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.v2._internal.execution import context as train_context
from ray.train.v2._internal.execution import storage as train_storage

from eir import storage
from eir.data.transforms import normalize
from eir.methods import LossInputs, Method, build_method
from eir.model import build_model, check_head_sizes, load_torch
from eir.replay.paste import ScaledInstances, apply_paste
from eir.replay.store import InstanceStore
from eir.train.evaluate import confusion_on_batches
from eir.train.gradients import GradientWatch
from eir.train.plan import StepPlan, iterations_per_epoch

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"


def build_old_model(plan: StepPlan) -> torch.nn.Module:
    """Step t−1's model, loaded from its checkpoint (the heads must match: same task and order)."""
    model = build_model(plan.backbone, plan.head_sizes[:-1], output_stride=plan.output_stride, weights=None)
    previous = load_torch(plan.previous_model)
    check_head_sizes(previous, plan.head_sizes[:-1], plan.previous_model, f"step {plan.step - 1}")
    model.load_previous(previous["model"])
    return model


def build_step_model(plan: StepPlan, method: Method) -> torch.nn.Module:
    """Step 0: ImageNet backbone + heads of C_0. Step t: step t−1's weights, plus the method's new head for C_t."""
    if plan.step == 0:
        model = build_model(plan.backbone, plan.head_sizes, output_stride=plan.output_stride, weights=plan.weights)
    else:
        model = build_old_model(plan)
        method.init_new_head(model, plan.head_sizes[-1])
    model.detach_background = method.detach_background
    return model


def paste_instances_for(plan: StepPlan, device: torch.device) -> ScaledInstances | None:
    """Step t−1's instance store, read once per worker, when the stream ships paste plans for this trainer
    to carry out on its device; None when nothing is pasted."""
    if plan.paste_store is None:
        return None
    return ScaledInstances(InstanceStore.read(storage.resolve(plan.paste_store)).decoded(), device)


def pasted(batch: dict[str, torch.Tensor], instances: ScaledInstances | None) -> dict[str, torch.Tensor]:
    """The batch with its paste plans carried out: pasted images and the `paste_class` / `paste_weight` maps
    the loss reads (`eir.replay.paste.apply_paste`). A batch without plans is returned as it is."""
    if "paste_plan" not in batch:
        return batch
    if instances is None:
        raise RuntimeError(
            "the training stream ships paste plans but the step plan names no instance store (paste_store): "
            "the planner sets it from the previous step's memory"
        )
    images, paste_class, paste_weight = apply_paste(batch["image"], batch["paste_plan"], instances)
    rest = {name: value for name, value in batch.items() if name != "paste_plan"}
    return {**rest, "image": images, "paste_class": paste_class, "paste_weight": paste_weight}


def restore_state(checkpoint: ray.train.Checkpoint | None, step: int, rank: int) -> dict | None:
    """The last epoch checkpoint's state, or None to start the step afresh.

    A checkpoint whose file no longer matches the size and SHA-256 recorded beside it (a truncated
    upload, a full disk) is not loaded: the step restarts from its first epoch, and the log names
    the damaged folder.
    """
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        problems = storage.damaged_files(storage.resolve(folder))
        if problems:
            if rank == 0:
                log.warning(
                    "[step %d] the epoch checkpoint %s is damaged (%s): the step restarts from its first epoch",
                    step,
                    checkpoint.path,
                    "; ".join(problems),
                )
            return None
        return torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def quiet_ray_train_reports() -> None:
    """Drop Ray Train's per-report INFO lines on the worker: each repeats the reported metrics, the
    whole confusion matrix included (52 of a quick start's 212 console lines); the worker prints
    its own one-line epoch summary instead. Warnings and errors still show."""
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # Ray names this logger by file path
    logging.getLogger(train_storage.__name__).setLevel(logging.WARNING)  # "Checkpoint successfully created"


def train_step_worker(plan_dict: dict) -> None:
    plan = StepPlan(**plan_dict)
    quiet_ray_train_reports()
    torch.set_num_threads(plan.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(plan.seed * 1000 + plan.step * 10 + rank)
    amp = plan.amp and device.type == "cuda"
    method = build_method(plan.method, plan.method_options)

    core = build_step_model(plan, method)
    if world > 1 and device.type == "cuda":
        core = torch.nn.SyncBatchNorm.convert_sync_batchnorm(core)
    if plan.freeze_batchnorm:
        core.freeze_batchnorm()
    optimizer = torch.optim.SGD(
        core.param_groups(plan.lr, plan.weight_decay, plan.old_weight_decay),
        lr=plan.lr,
        momentum=plan.momentum,
        nesterov=True,
    )
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    start_epoch, iteration, resumed_at, history = 0, 0, [], []
    state = restore_state(ray.train.get_checkpoint(), plan.step, rank)
    if state is not None:
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, iteration = state["epoch"] + 1, state["iteration"]
        resumed_at = [*state.get("resumed_at", []), start_epoch]  # epochs a restarted worker group resumed at
        history = state.get("history", [])
        if rank == 0:
            log.info("[step %d] resumed from the epoch %d checkpoint", plan.step, state["epoch"] + 1)
    model = ray.train.torch.prepare_model(core)
    old_model = None
    if method.needs_old_model(plan.step):  # e.g. RSKD distils from it, on the same (pasted) batch
        old_model = build_old_model(plan).to(device).eval()
        old_model.requires_grad_(False)

    epoch_iterations = iterations_per_epoch(
        plan.rows_per_epoch // world, plan.per_worker_batch, plan.epochs, min_last_batch=plan.min_last_batch
    )
    total_iters = sum(epoch_iterations)
    # The stream holds every epoch in one execution (eir.data.pipeline.train_stream): one
    # iterator for the whole step, cut into epochs by count. After a restart from the epoch-k
    # checkpoint the stream starts over and the remaining epochs take its first batches.
    stream = iter(
        ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=plan.per_worker_batch, device=device, local_shuffle_buffer_size=4 * plan.per_worker_batch
        )
    )
    gradients = GradientWatch(device)
    recent_losses: deque[float] = deque(maxlen=GradientWatch.RECENT_STEPS)  # beside the norms, for a diverged run
    instances = paste_instances_for(plan, device)
    for epoch in range(start_epoch, plan.epochs):
        model.train()
        gradients.start_epoch()
        started, seen, loss_sum, batches = time.perf_counter(), 0, 0.0, 0
        term_sums: dict[str, float] = {}  # the unweighted terms: which one moved when the loss did
        # Time spent waiting for the next batch: the share of the epoch the input pipeline, not
        # the model, decided (the loss read below syncs the device every iteration).
        data_wait, ready = 0.0, time.perf_counter()
        for streamed in itertools.islice(stream, epoch_iterations[epoch]):
            data_wait += time.perf_counter() - ready
            batch = pasted(streamed, instances)
            if (
                plan.fail_at_iteration == iteration
                and rank == 0
                and plan.fault_marker
                and not os.path.exists(plan.fault_marker)
            ):
                open(plan.fault_marker, "w").close()
                os._exit(1)  # a lost worker, once: Ray Train restarts the group from the last checkpoint
            factor = plan.lr_factor(iteration, total_iters)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            images = normalize(batch["image"])
            with torch.autocast(device.type, enabled=amp):
                outputs = model(images, features=method.features)
                old_outputs = None
                if old_model is not None:
                    with torch.no_grad():
                        old_outputs = old_model(images, features=method.features)
            loss, terms = method.loss(loss_inputs(batch, plan, outputs, old_outputs))
            # One host read per iteration for the loss and its terms (the finiteness check needs it anyway).
            values = torch.stack([loss.detach(), *(t.detach() for t in terms.values())]).tolist()
            loss_value, term_values = values[0], dict(zip(terms, values[1:]))
            if not math.isfinite(loss_value):
                parts = ", ".join(f"{name} {value:.4g}" for name, value in term_values.items())
                norms = ", ".join(f"{norm:.4g}" for norm in gradients.recent_norms())
                losses = ", ".join(f"{value:.4g}" for value in recent_losses)
                raise FloatingPointError(
                    f"step {plan.step}, epoch {epoch + 1}, iteration {iteration}: the loss is {loss_value} "
                    f"({parts}); gradient norms of the steps before it: {norms or 'none yet'} (their losses: "
                    f"{losses or 'none'}); training diverged at learning rate {plan.lr} "
                    f"(train.lr{'_incremental' if plan.step else ''}): lower it"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the norm of the real gradients (a no-op without AMP)
            gradients.observe(core.parameters())
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss_value
            recent_losses.append(loss_value)
            for name, value in term_values.items():
                term_sums[name] = term_sums.get(name, 0.0) + value
            seen += images.shape[0]
            batches += 1
            iteration += 1
            ready = time.perf_counter()
        if batches == 0:
            raise RuntimeError(
                f"step {plan.step}: the training stream ran out before epoch {epoch + 1} of {plan.epochs}; it must "
                "hold every epoch (eir.data.pipeline.train_stream(..., epochs=plan.epochs))"
            )
        elapsed = time.perf_counter() - started
        metrics = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(1, batches),
            **{f"loss_{name}": total / max(1, batches) for name, total in term_sums.items()},
            "lr": base_lrs[0] * plan.lr_factor(iteration, total_iters),
            "images_per_s": seen * world / max(elapsed, 1e-9),
            "iteration": iteration,
            "epoch_s": elapsed,
            "data_wait_share": data_wait / max(elapsed, 1e-9),
            "eta_s": elapsed * (plan.epochs - epoch - 1),
            "restarts": len(resumed_at),
            **gradients.epoch_metrics(),
        }
        history.append(metrics)
        if rank == 0:
            parts = ", ".join(f"{name} {total / max(1, batches):.4f}" for name, total in term_sums.items())
            log.info(
                f"[step {plan.step}] epoch {epoch + 1}/{plan.epochs} loss {metrics['loss']:.4f} ({parts}) "
                f"lr {metrics['lr']:.2e} grad norm max {metrics['grad_norm_max']:.3g} "
                f"{metrics['images_per_s']:.1f} img/s, epoch {elapsed:.0f}s, "
                f"ETA {metrics['eta_s'] / 60:.1f} min"
            )
        final = (
            {"confusion": _evaluate(core, method, plan, device, rank, world, amp)} if epoch == plan.epochs - 1 else {}
        )
        _report({**metrics, **final}, core, optimizer, scaler, epoch, iteration, rank, plan, resumed_at, history)
    if start_epoch >= plan.epochs:  # restarted after the last checkpoint: only the scores are missing
        # Reported with a checkpoint: Train's result carries the metrics of the latest checkpoint only.
        scores = {
            "epoch": plan.epochs,
            "restarts": len(resumed_at),
            "confusion": _evaluate(core, method, plan, device, rank, world, amp),
        }
        _report(scores, core, optimizer, scaler, plan.epochs - 1, iteration, rank, plan, resumed_at, history)


def loss_inputs(batch: dict[str, torch.Tensor], plan: StepPlan, outputs, old_outputs) -> LossInputs:
    """A stream batch and the model outputs as the method's loss reads them (float32 logits)."""
    (logits, features), (old_logits, old_features) = _split(outputs), _split(old_outputs)
    return LossInputs(
        logits=logits.float(),
        label=batch["label"].long(),
        shape=plan.shape,
        paste_class=batch.get("paste_class"),
        paste_weight=batch.get("paste_weight"),
        old_logits=None if old_logits is None else old_logits.float(),
        features=features,
        old_features=old_features,
    )


def _split(outputs) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The model returns logits, or (logits, features) when a method asked for features."""
    if outputs is None:
        return None, {}
    return outputs if isinstance(outputs, tuple) else (outputs, {})


def _evaluate(
    core: torch.nn.Module, method: Method, plan: StepPlan, device: torch.device, rank: int, world: int, amp: bool
) -> list:
    """The step's confusion matrix under the method's prediction rule, summed over the workers.

    Each worker scores only its own share of the test rows (`eir.train.step.EvalShardingConfig`).
    """
    shard = ray.train.get_dataset_shard("test")
    batches = shard.iter_batches(batch_size=plan.eval_batch, batch_format="numpy")
    matrix = torch.from_numpy(
        confusion_on_batches(
            core,
            batches,
            plan.num_channels,
            device,
            amp=amp,
            progress=plan.progress and rank == 0,
            total=math.ceil(plan.num_eval_rows / world / plan.eval_batch),
            predict=method.predict,
        )
    )
    if world > 1:
        matrix = matrix.to(device)
        dist.all_reduce(matrix)
    return matrix.cpu().tolist()


def _report(
    metrics: dict,
    core: torch.nn.Module,
    optimizer,
    scaler,
    epoch: int,
    iteration: int,
    rank: int,
    plan: StepPlan,
    resumed_at: list[int],
    history: list[dict],
) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (model, optimiser, scaler, position, history).

    The per-epoch history rides in the checkpoint because Train's result keeps the metrics of the
    retained checkpoints only (`CheckpointConfig(num_to_keep)`), and a restart must not lose it.
    """
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            state = {
                "model": core.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "iteration": iteration,
                "head_sizes": list(plan.head_sizes),
                "resumed_at": resumed_at,
                "history": history,
            }
            torch.save(state, os.path.join(folder, CHECKPOINT_FILE))
            storage.mark_complete(storage.resolve(folder))  # size + SHA-256, checked on restore
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
