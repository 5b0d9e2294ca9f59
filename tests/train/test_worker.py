"""The per-worker loop's own helpers that need no Train run: checkpoint restore, console noise and the paste."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.train import Checkpoint
from ray.train.v2._internal.execution import context
from ray.train.v2._internal.execution import storage as train_storage

from eir import storage
from eir.labels import NO_PASTE
from eir.replay.instances import Instance
from eir.replay.paste import PasteConfig, empty_plan
from eir.replay.store import InstanceStore
from eir.train.plan import StepPlan
from eir.train.worker import CHECKPOINT_FILE, paste_instances_for, pasted, quiet_ray_train_reports, restore_state


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


def _step_plan(paste_store: str | None) -> StepPlan:
    return StepPlan(
        step=1, head_sizes=(2, 1), backbone="mobilenet_v2", weights=None, output_stride=16, previous_model="m.pt",
        epochs=1, global_batch=2, per_worker_batch=2, lr=0.01, momentum=0.9, weight_decay=0.0, num_train_rows=2,
        rows_per_epoch=2, num_eval_rows=2, eval_batch=2, old_channels=(1, 2), new_channels=(3,), amp=False, seed=0,
        paste_store=paste_store,
    )  # fmt: skip


def test_the_trainer_carries_out_the_streams_paste_plans(tmp_path: Path) -> None:
    """The worker reads step t−1's store from the plan's URI and turns a batch's plans into pasted images and
    the two maps the loss reads; a batch without plans (no paste configured) passes through untouched."""
    crop = np.full((4, 4, 3), 200, dtype=np.uint8)
    store = InstanceStore.from_instances([Instance(2, crop, np.ones((4, 4), bool), (0, 0, 4, 4), "img0", 0)])
    store.write(storage.resolve(tmp_path / "instances.parquet"))
    instances = paste_instances_for(_step_plan(str(tmp_path / "instances.parquet")), torch.device("cpu"))
    assert instances is not None and len(instances) == 1
    assert paste_instances_for(_step_plan(None), torch.device("cpu")) is None

    plans = np.stack([empty_plan(PasteConfig())] * 2)
    plans[1, 0] = (0, 2, 4, 0, 4, 1.0)  # store row 0, channel 2, at (4, 0), side 4, a hard paste
    batch = {"image": torch.zeros((2, 3, 8, 8), dtype=torch.uint8), "label": torch.zeros((2, 8, 8), dtype=torch.uint8)}
    out = pasted({**batch, "paste_plan": torch.from_numpy(plans)}, instances)
    assert set(out) == {"image", "label", "paste_class", "paste_weight"}
    assert bool((out["image"][1, :, 4:8, 0:4] == 200).all()) and int(out["image"].sum()) == 200 * 3 * 16
    assert bool((out["paste_class"][1, 4:8, 0:4] == 2).all()) and int((out["paste_class"] != NO_PASTE).sum()) == 16
    assert float(out["paste_weight"].sum()) == 16.0
    assert pasted(batch, instances) is batch and pasted(batch, None) is batch
    with pytest.raises(RuntimeError, match="names no instance store"):
        pasted({**batch, "paste_plan": torch.from_numpy(plans)}, None)
