"""Class ids ↔ model channels for one task.

The model's channels follow step order: channel 0 is background, then the classes of C_0, C_1, …
in that order. With the natural class order channel = class id; with an explicit class order
(`task.class_order`) the ids a step learns are not contiguous, so every label map is moved to
channel space by a look-up table before it reaches the model or the metric.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from eir.labels import IGNORE_LABEL
from eir.tasks import Task


@dataclass(frozen=True)
class ChannelSpace:
    """The channel layout of a task's model: `class_of_channel[channel]` and the heads' sizes."""

    class_of_channel: tuple[int, ...]  # index = channel; [0] = 0 (background)
    head_sizes: tuple[int, ...]  # |C_0|, …, |C_T|

    @classmethod
    def of(cls, task: Task) -> ChannelSpace:
        return cls((0, *[c for step in task.steps for c in step]), tuple(len(step) for step in task.steps))

    @functools.cached_property
    def lut(self) -> np.ndarray:
        """256-entry class id → channel table (ignore stays ignore)."""
        table = np.zeros(256, dtype=np.uint8)
        for channel, class_id in enumerate(self.class_of_channel):
            table[class_id] = channel
        table[IGNORE_LABEL] = IGNORE_LABEL
        return table

    def map_lut(self, class_lut: np.ndarray) -> np.ndarray:
        """A class-valued LUT (e.g. Task.train_lut) turned into a channel-valued one."""
        return self.lut[class_lut]

    def seen(self, step: int) -> int:
        """How many class channels steps 0..`step` own (background not counted)."""
        return sum(self.head_sizes[: step + 1])

    def groups(self, step: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Old (C_0) and new (C_1..C_step) channels, as METHOD.md §1's scores group them."""
        n_old = self.head_sizes[0]
        return tuple(range(1, n_old + 1)), tuple(range(n_old + 1, self.seen(step) + 1))
