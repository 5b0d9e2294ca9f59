"""Everything one Ray Train step needs, as one picklable value the driver hands to the workers.

Workers never read the experiment config: the driver resolves it into a `StepPlan` (channel
counts, sizes, learning rates, checkpoint paths, the method and its options), which keeps the
per-worker loop flat and records what the step ran with (`step_<t>/plan.json`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from eir.methods import StepShape


@dataclass(frozen=True)
class StepPlan:
    step: int
    head_sizes: tuple[int, ...]  # |C_0|, …, |C_t|: the heads of the model trained at this step
    backbone: str
    weights: str | None  # ImageNet weights for step 0 ("imagenet" or a local file); None later
    output_stride: int
    previous_model: str | None  # URI of step t−1's model.pt (None at step 0)
    epochs: int
    global_batch: int
    per_worker_batch: int
    lr: float
    momentum: float
    weight_decay: float
    num_train_rows: int
    rows_per_epoch: int  # training images + replayed samples: sets the poly schedule's length
    num_eval_rows: int
    eval_batch: int
    old_channels: tuple[int, ...]  # C_0 in channel space (without 0), for the step's scores
    new_channels: tuple[int, ...]
    amp: bool
    seed: int
    method: str = "finetune"  # eir.methods: the loss, head initialisation and prediction rule
    method_options: dict[str, Any] = field(default_factory=dict)  # values of the method's option_keys
    torch_threads: int = 1
    warmup_fraction: float = 0.0
    progress: bool = True  # rank 0 shows an evaluation progress bar
    # URI of step t−1's instance store when the stream ships EIR's paste plans: each trainer reads it once and
    # carries the plans out on its device (`eir.replay.paste.apply_paste`). None when nothing is pasted.
    paste_store: str | None = None
    # Fault injection (tests of worker fault tolerance): rank 0 exits once at this iteration,
    # leaving `fault_marker` behind so the restarted worker does not fail again.
    fail_at_iteration: int | None = None
    fault_marker: str | None = None

    @property
    def shape(self) -> StepShape:
        return StepShape(self.step, self.head_sizes)

    @property
    def num_channels(self) -> int:
        return self.shape.num_channels

    @property
    def freeze_batchnorm(self) -> bool:
        """METHOD.md §2: incremental steps train with all BatchNorm frozen."""
        return self.step > 0

    @property
    def min_last_batch(self) -> int:
        """A step whose BatchNorm trains cannot take a one-image batch (see `iterations_per_epoch`)."""
        return 1 if self.freeze_batchnorm else 2

    @property
    def old_weight_decay(self) -> float | None:
        """METHOD.md §2: no weight decay on old parameters at t > 0 (None: decay everything)."""
        return 0.0 if self.step > 0 else None

    def lr_factor(self, iteration: int, total: int) -> float:
        """The LR multiplier at `iteration` of `total`: a linear warm-up, then poly (power 0.9) to 0.

        The warm-up (METHOD.md §2: the first 20 % of ADE's iterations) ramps from 1/w to 1 over
        its w iterations; the poly decay then runs over the remaining ones, so the schedule
        still ends at 0 whatever the warm-up share.
        """
        warmup = round(self.warmup_fraction * total)
        if iteration < warmup:
            return (iteration + 1) / warmup
        return max(0.0, 1.0 - (iteration - warmup) / max(1, total - warmup)) ** 0.9

    def to_dict(self) -> dict:
        return asdict(self)


def iterations_per_epoch(rows_per_worker: int, batch: int, epochs: int, *, min_last_batch: int = 1) -> list[int]:
    """How many batches each epoch takes from a stream that chains every epoch (one execution).

    Epochs share batches at their seams, so only the step's last batch is partial: the counts
    sum to ceil(epochs x rows / batch), and every epoch gets at least one batch. A last batch
    smaller than `min_last_batch` is left unread: a step whose BatchNorm trains passes 2, since
    ASPP's image-pooling branch cannot normalise a single image (every worker drops it alike).
    """
    ends = [max(e + 1, math.ceil((e + 1) * rows_per_worker / batch)) for e in range(epochs)]
    if 0 < (epochs * rows_per_worker) % batch < min_last_batch:
        last_start = ends[-2] if epochs > 1 else 0
        if ends[-1] - last_start > 1:  # the last epoch keeps at least one batch
            ends[-1] -= 1
    return [end - start for start, end in zip([0, *ends[:-1]], ends)]
