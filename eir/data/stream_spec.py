"""What one step's training stream does to each row, as a plain value (no Ray: the planner builds it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from eir.replay.paste import PasteConfig


@dataclass(frozen=True)
class StreamSpec:
    """What one step's per-epoch map does to each row; picklable, shipped with the map task.

    `store` is an ObjectRef to the instance store's Parquet bytes (put once per step, decoded
    once per worker process), so the store never travels with each batch; the planner leaves it
    None and the driver fills it in (`eir.train.step_data`).
    """

    lut: np.ndarray  # train LUT in channel space (background shift)
    crop_size: int
    scale: tuple[float, float] = (0.5, 2.0)
    pseudo: bool = False  # rows carry a `pseudo` column: crop it with the image, fill background with it
    paste: PasteConfig | None = None
    old_channels: tuple[int, ...] = ()
    class_to_channel: np.ndarray | None = None  # stored class ids → channels
    replay_per_row: float = 0.0  # expected instance-replay samples emitted per input row
    # image replay: stored_luts[s] relabels an image stored at step s (`row_lut`); () without image replay
    stored_luts: tuple[np.ndarray, ...] = ()
    store: Any = None  # ObjectRef[bytes] of the InstanceStore

    def row_lut(self, stored_step: int) -> np.ndarray:
        """The LUT of one row (`row_lut` below)."""
        return row_lut(self.lut, self.stored_luts, stored_step)


def row_lut(lut: np.ndarray, stored_luts: tuple[np.ndarray, ...], stored_step: int) -> np.ndarray:
    """The LUT of one row: `lut` (the train LUT) for the step's own rows (`stored_step` < 0), else the table of
    the step that stored it. One rule for the training stream and the old-model passes over replayed images."""
    if stored_step < 0:
        return lut
    if stored_step >= len(stored_luts):
        raise ValueError(
            f"a replayed image stored at step {stored_step}, but the stream has look-up tables for images "
            f"stored at {len(stored_luts)} earlier step(s) (expected a storing step before the current one)"
        )
    return stored_luts[stored_step]
