"""The step planner: one pure function from what a run knows to everything one step runs with.

`plan_step(config, facts, step, previous)` turns the experiment config, the facts resolved before
the first step (the task, the images per step) and what step t−1 left (its model's URI, how many
items its memory holds) into a `StepDesign`: the workers' `StepPlan`, the data workers'
`StreamSpec`, the test LUT, and what the driver does around training (pseudo-labelling, which
memory joins the stream, which memory this step keeps). Each value — LUTs, channel groups, replay
rate, rows per epoch — is computed here once. No Ray, no I/O: a plan is a function of its inputs,
and a test builds one from a config and a few numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from eir.channels import ChannelSpace
from eir.config import ExperimentConfig
from eir.data.stream_spec import StreamSpec
from eir.labels import IGNORE_LABEL
from eir.methods import Method, build_method, method_class
from eir.pseudo import PseudoRule
from eir.replay.paste import PasteConfig
from eir.tasks import Task, get_task
from eir.train.plan import StepPlan

MemoryKind = Literal["instances", "images"]
ImageLabels = Literal["stored", "current"]  # replay.image_labels


@dataclass(frozen=True)
class RunLayout:
    """The task as the run's method trains and scores it (joint: one step of every class, scored at the last)."""

    task: Task  # the task as evaluated
    joint: bool

    @classmethod
    def of(cls, config: ExperimentConfig, task: Task) -> RunLayout:
        return cls(task, method_class(config.method.name).joint)

    @classmethod
    def for_dataset(cls, config: ExperimentConfig, dataset: str, num_classes: int, future_label: int) -> RunLayout:
        """The config's task on a prepared dataset of `num_classes` (its manifest's label space)."""
        task = get_task(
            dataset,
            config.task.name,
            config.task.setting,
            num_classes=num_classes,
            class_order=config.task.class_order,
            future_label=future_label,
        )
        return cls.of(config, task)

    @functools.cached_property
    def schedule(self) -> Task:
        """The task as trained."""
        return self.task.joint() if self.joint else self.task

    @functools.cached_property
    def channels(self) -> ChannelSpace:
        return ChannelSpace.of(self.task)

    def eval_step(self, step: int) -> int:
        """The task step whose test protocol scores schedule step `step` (joint: the final step)."""
        return self.task.num_steps - 1 if self.joint else step

    def head_sizes(self, step: int) -> tuple[int, ...]:
        """|C_0|, …, |C_step| of the schedule: the heads of the model trained at `step`."""
        return tuple(len(classes) for classes in self.schedule.steps[: step + 1])

    def groups(self, step: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Old (C_0) and new (C_1..C_t) channels of the step that scores schedule step `step`."""
        return self.channels.groups(self.eval_step(step))

    def train_lut(self, step: int) -> np.ndarray:
        """Dataset label → step `step`'s training target, in channel space (the background shift)."""
        return self.channels.map_lut(self.schedule.train_lut(step))

    def stored_lut(self, stored_step: int) -> np.ndarray:
        """Dataset label → the label of an image stored at `stored_step` (`replay.image_labels=stored`).

        The classes learned by then (C_0 … C_s of the schedule) keep their channels; classes learned
        later and future ones are background, as the model did not know them when it stored the image.
        """
        seen = list(self.schedule.classes_seen(stored_step))
        lut = np.zeros(256, dtype=np.uint8)
        lut[seen] = seen
        lut[IGNORE_LABEL] = IGNORE_LABEL
        return self.channels.map_lut(lut)

    def replay_luts(self, step: int, image_labels: ImageLabels) -> tuple[np.ndarray, ...]:
        """The LUT at step `step` of an image stored at s, for s = 0 … step−1 (`StreamSpec.stored_luts`).

        `stored`: its storing step's classes (`stored_lut`); `current`: the step's train LUT, so the old
        objects in it are background (DKD-M's masking).
        """
        if image_labels == "current":
            return (self.train_lut(step),) * step
        return tuple(self.stored_lut(s) for s in range(step))

    def test_lut(self, step: int) -> np.ndarray:
        """Dataset label → the test label that scores schedule step `step`, in channel space."""
        return self.channels.map_lut(self.task.test_lut(self.eval_step(step)))


@dataclass(frozen=True)
class RunFacts:
    """What a run knows before its first step beyond the config: its layout and the images of each step."""

    layout: RunLayout
    train_rows: tuple[int, ...]  # training images per schedule step
    test_rows: tuple[int, ...]  # test images per task step
    progress: bool = True  # progress bars (off in sweeps and tests)


@dataclass(frozen=True)
class PreviousStep:
    """What step t reads from step t−1: the URIs of its model and memory, and how many items the memory holds."""

    model: str | None = None
    memory_items: int = 0
    memory: str | None = None  # the memory file's URI (the trainer reads an instance store to paste from)


@dataclass(frozen=True)
class FaultInjection:
    """A worker fault for the fault-tolerance tests: rank 0 exits once at `at_iteration`, leaving `marker`."""

    at_iteration: int | None = None
    marker: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultInjection:
        """`EIR_FAIL_AT_ITERATION` and `EIR_FAULT_MARKER`, as the tests set them (unset: no fault)."""
        at = environ.get("EIR_FAIL_AT_ITERATION")
        return cls(int(at) if at else None, environ.get("EIR_FAULT_MARKER"))


@dataclass(frozen=True)
class MemorySpec:
    """The memory step t builds for step t+1 from its own training rows (METHOD.md §3.1)."""

    kind: MemoryKind
    step: int
    size: int  # budget M over all old classes: instances, or images for image replay
    classes: tuple[int, ...]  # the classes step t learned
    instance_rule: str
    min_area: float
    seed: int


@dataclass(frozen=True)
class StepDesign:
    """Everything step t runs with. `stream.store` is None: the driver puts the instance store and fills it."""

    plan: StepPlan
    stream: StreamSpec
    eval_step: int  # the task step whose test split and LUT score this step
    eval_lut: np.ndarray
    replay: MemoryKind | None  # which of step t−1's memory joins the stream (None: none, or it is empty)
    memory: MemorySpec | None  # what this step keeps for the next (None: nothing, or the last step)
    pseudo_rule: PseudoRule | None = None  # how its pseudo-labels are chosen (None: it has none)
    pseudo_replayed: bool = False  # image replay's stored images are pseudo-labelled too (replay.pseudo_label)

    @property
    def pseudo(self) -> bool:
        """Whether the step's rows are pseudo-labelled by step t−1's model first."""
        return self.stream.pseudo


def method_options(config: ExperimentConfig) -> dict[str, Any]:
    """The values of the config keys the run's method reads on the workers."""
    return method_class(config.method.name).options_from(config.flat())


def run_method(config: ExperimentConfig) -> Method:
    """The run's method with its options: the prediction rule scores and draws its models."""
    return build_method(config.method.name, method_options(config))


def replay_per_row(ratio: float | None, stored: int, train_rows: int) -> float:
    """Expected instance-replay samples per training row: `ratio` of the stream (null: each stored one once)."""
    if ratio is None:
        return stored / max(1, train_rows)
    return ratio / (1.0 - ratio)


def plan_step(
    config: ExperimentConfig,
    facts: RunFacts,
    step: int,
    previous: PreviousStep | None = None,
    fault: FaultInjection | None = None,
) -> StepDesign:
    """Step `step`'s design; `previous` is what step t−1 left (None: nothing, as at step 0)."""
    layout, cfg = facts.layout, config
    previous, fault = previous or PreviousStep(), fault or FaultInjection()
    incremental = step > 0
    train_rows = facts.train_rows[step]
    kind = cfg.memory.kind
    replay = kind if incremental and kind != "none" and previous.memory_items > 0 else None
    per_row = replay_per_row(cfg.replay.ratio, previous.memory_items, train_rows) if replay == "instances" else 0.0
    replayed_rows = previous.memory_items if replay == "images" else round(train_rows * per_row)
    eval_step = layout.eval_step(step)
    old, new = layout.groups(step)
    heads = layout.head_sizes(step)
    stream = StreamSpec(
        lut=layout.train_lut(step),
        crop_size=cfg.train.crop_size,
        scale=(cfg.train.scale_min, cfg.train.scale_max),
        pseudo=incremental and cfg.pseudo.enabled,
        paste=_paste(cfg) if replay == "instances" else None,
        old_channels=tuple(range(1, 1 + sum(heads[:-1]))),  # the step t−1 model's classes
        class_to_channel=layout.channels.lut,
        replay_per_row=per_row,
        stored_luts=layout.replay_luts(step, cfg.replay.image_labels) if replay == "images" else (),
    )
    plan = StepPlan(
        step=step,
        head_sizes=heads,
        backbone=cfg.model.backbone,
        weights=cfg.model.weights if step == 0 else None,
        output_stride=cfg.model.output_stride,
        previous_model=previous.model,
        epochs=cfg.train.epochs_incremental if incremental else cfg.train.epochs,
        global_batch=cfg.train.batch_size,
        per_worker_batch=cfg.train.batch_size // cfg.scaling.num_workers,
        lr=cfg.train.lr_incremental if incremental else cfg.train.lr,
        momentum=cfg.train.momentum,
        weight_decay=cfg.train.weight_decay,
        num_train_rows=train_rows,
        rows_per_epoch=train_rows + replayed_rows,
        num_eval_rows=facts.test_rows[eval_step],
        eval_batch=cfg.eval.batch_size,
        old_channels=old,
        new_channels=new,
        amp=cfg.train.amp,
        seed=cfg.seed,
        method=cfg.method.name,
        method_options=method_options(cfg),
        torch_threads=max(1, int(cfg.scaling.cpus_per_worker)),
        warmup_fraction=cfg.train.warmup_fraction,
        progress=facts.progress,
        fail_at_iteration=fault.at_iteration,
        fault_marker=fault.marker,
        paste_store=previous.memory if stream.paste is not None else None,
    )
    keeps = kind != "none" and step < layout.schedule.num_steps - 1
    memory = (
        MemorySpec(
            kind,
            step,
            cfg.memory.size,
            layout.schedule.classes_learned(step),
            cfg.memory.instance_rule,
            cfg.memory.min_area,
            seed=cfg.seed * 1000 + step,
        )
        if keeps
        else None
    )
    pseudo_rule = (
        PseudoRule.for_step(
            cfg.pseudo.rule,
            threshold=cfg.pseudo.threshold,
            entropy_floor=cfg.pseudo.entropy_floor,
            quantile=cfg.pseudo.quantile,
            old_channels=1 + sum(heads[:-1]),
            num_channels=1 + sum(heads),
        )
        if stream.pseudo
        else None
    )
    pseudo_replayed = replay == "images" and stream.pseudo and cfg.replay.pseudo_label
    return StepDesign(plan, stream, eval_step, layout.test_lut(step), replay, memory, pseudo_rule, pseudo_replayed)


def _paste(cfg: ExperimentConfig) -> PasteConfig | None:
    """EIR's paste (§3.3) when the method pastes; it needs a non-empty instance store to paste from."""
    if not cfg.paste.enabled:
        return None
    return PasteConfig(max_instances=cfg.paste.max_instances, hard=cfg.paste.hard, probability=cfg.paste.probability)
