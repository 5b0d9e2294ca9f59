"""The per-worker loop's own helpers that need no Train run: checkpoint restore and console noise."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from ray.train import Checkpoint
from ray.train.v2._internal.execution import context
from ray.train.v2._internal.execution import storage as train_storage

from eir import storage
from eir.train.worker import CHECKPOINT_FILE, quiet_ray_train_reports, restore_state


def _checkpoint(folder: Path) -> Checkpoint:
    folder.mkdir()
    torch.save({"epoch": 3, "model": {"w": torch.ones(2)}}, folder / CHECKPOINT_FILE)
    storage.mark_complete(storage.resolve(folder))  # what _report does before handing it to Ray
    return Checkpoint.from_directory(str(folder))


def test_an_intact_checkpoint_is_restored(tmp_path: Path) -> None:
    state = restore_state(_checkpoint(tmp_path / "checkpoint_1"), step=1, rank=0)
    assert state is not None and state["epoch"] == 3
    assert restore_state(None, step=1, rank=0) is None


def test_a_truncated_checkpoint_restarts_the_step(tmp_path: Path, caplog) -> None:
    checkpoint = _checkpoint(tmp_path / "checkpoint_1")
    data = (tmp_path / "checkpoint_1" / CHECKPOINT_FILE).read_bytes()
    (tmp_path / "checkpoint_1" / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        assert restore_state(checkpoint, step=1, rank=0) is None
    assert "checkpoint_1 is damaged" in caplog.text and "restarts from its first epoch" in caplog.text
    assert f"{CHECKPOINT_FILE} has {len(data) // 2} bytes" in caplog.text


def test_ray_train_report_lines_are_quieted() -> None:
    """The loggers Ray Train really writes its per-report lines with (context's is named by file path)."""
    quiet_ray_train_reports()
    assert not context.logger.isEnabledFor(logging.INFO)
    assert not train_storage.logger.isEnabledFor(logging.INFO)
    assert context.logger.isEnabledFor(logging.WARNING)
