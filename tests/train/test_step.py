"""One Ray Train step fed by the one-execution stream: a stream shorter than the plan is an error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import ray.train

from eir import storage
from eir.config import load_config
from eir.data.pipeline import eval_stream, train_stream
from eir.train.experiment import make_plan, resolve, stream_spec
from eir.train.step import run_train_step

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_a_stream_without_every_epoch_fails_the_step(ray_session, tmp_path: Path) -> None:
    config = load_config(REPO / "experiments" / "quickstart.yaml", [
        f"run.output_dir={tmp_path}", "dataset.synthetic_num_images=40", "dataset.synthetic_image_size=48",
        "task.name=15-5", "model.weights=null", "train.batch_size=8", "train.crop_size=48", "scaling.cpus_per_worker=1"])
    exp = resolve(config, progress=False)
    ids = list(exp.train_splits.step_ids(0))[:16]
    plan = dataclasses.replace(make_plan(exp, 0, None), epochs=2, num_train_rows=len(ids), rows_per_epoch=len(ids))
    one_epoch = train_stream(exp.train_manifest, ids, stream_spec(exp, 0, None, None), batch_size=8, epochs=1)
    test = eval_stream(exp.test_manifest, list(exp.test_splits.ids[0])[:4], exp.channels.map_lut(exp.task.test_lut(0)),
                       protocol="full", crop_size=48)
    with pytest.raises(ray.train.WorkerGroupError, match="ran out before epoch 2 of 2"):
        run_train_step(plan, one_epoch, test, storage.resolve(tmp_path).join("step_0"), num_workers=1, use_gpu=False,
                       cpus_per_worker=1, checkpoints_to_keep=1, max_failures=0)
