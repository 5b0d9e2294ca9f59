"""The step planner (eir.train.planner): a config, a task, a few image counts in; a step's design out.

No Ray and no files: every case builds its inputs in memory. The first test proves it in a fresh
interpreter where `import ray` fails and opening a file raises.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eir.config import ConfigError, load_config
from eir.tasks import get_task
from eir.train.planner import FaultInjection, PreviousStep, RunFacts, RunLayout, plan_step

REPO = Path(__file__).resolve().parents[2]
MODEL = "s3://bucket/run/step_0/model.pt"


def facts(method: str, *overrides: str, task_name: str = "15-5", train_rows=(100, 40), test_rows=(50, 60)):
    config = load_config(overrides=[f"method.name={method}", "model.weights=null", *overrides])
    layout = RunLayout.of(config, get_task("voc", task_name, class_order=config.task.class_order))
    return config, RunFacts(layout, tuple(train_rows), tuple(test_rows), progress=False)


def test_a_plan_needs_neither_ray_nor_files() -> None:
    code = f"""
import builtins, sys
sys.modules["ray"] = None  # `import ray` now fails
from eir.config import load_config
from eir.tasks import get_task
from eir.train.planner import PreviousStep, RunFacts, RunLayout, plan_step
config = load_config(overrides=["method.name=eir", "model.weights=null"])
facts = RunFacts(RunLayout.of(config, get_task("voc", "15-5")), (100, 40), (50, 60))

def no_files(*args, **kwargs):
    raise AssertionError(f"the planner opened {{args[:1]}}")

builtins.open = no_files
design = plan_step(config, facts, 1, PreviousStep({MODEL!r}, memory_items=30))
print(design.plan.rows_per_epoch, design.replay, design.pseudo, design.plan.previous_model)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["70", "instances", "True", MODEL]


def test_step0_trains_from_the_configured_weights_and_keeps_its_memory() -> None:
    config, run = facts("eir", "model.weights=imagenet")
    design = plan_step(config, run, 0)
    plan = design.plan
    assert (plan.step, plan.head_sizes, plan.weights, plan.previous_model) == (0, (15,), "imagenet", None)
    assert (plan.epochs, plan.lr) == (config.train.epochs, config.train.lr)
    assert (plan.num_train_rows, plan.rows_per_epoch, plan.num_eval_rows) == (100, 100, 50)
    assert (plan.old_channels, plan.new_channels) == (tuple(range(1, 16)), ())
    assert design.replay is None and not design.pseudo and design.stream.paste is None
    assert design.memory is not None
    assert (design.memory.kind, design.memory.step, design.memory.size) == ("instances", 0, config.memory.size)
    assert design.memory.classes == tuple(range(1, 16))
    assert design.memory.seed == config.seed * 1000


def test_eir_replays_every_stored_instance_once_per_epoch_and_pastes() -> None:
    config, run = facts("eir")
    design = plan_step(config, run, 1, PreviousStep(MODEL, memory_items=30, memory="step_0/instances.parquet"))
    plan, stream = design.plan, design.stream
    assert (plan.head_sizes, plan.weights, plan.previous_model) == ((15, 5), None, MODEL)
    assert (plan.epochs, plan.lr) == (config.train.epochs_incremental, config.train.lr_incremental)
    assert stream.replay_per_row == pytest.approx(30 / 40)
    assert plan.rows_per_epoch == 40 + 30
    assert plan.num_eval_rows == 60
    assert (plan.old_channels, plan.new_channels) == (tuple(range(1, 16)), tuple(range(16, 21)))
    assert design.replay == "instances" and design.pseudo and stream.pseudo
    assert stream.paste is not None and stream.paste.max_instances == config.paste.max_instances
    assert stream.old_channels == tuple(range(1, 16)) and stream.store is None
    assert plan.paste_store == "step_0/instances.parquet", "the trainers carry the paste plans out from this store"
    assert design.memory is None  # the last step keeps nothing
    assert plan.method == "eir" and plan.method_options["loss.rskd_weight"] == 5.0


def test_a_replay_ratio_sets_the_share_of_replayed_samples() -> None:
    config, run = facts("eir", "replay.ratio=0.2")
    design = plan_step(config, run, 1, PreviousStep(MODEL, memory_items=30))
    assert design.stream.replay_per_row == pytest.approx(0.25)
    assert design.plan.rows_per_epoch == 40 + 10


def test_an_empty_memory_replays_and_pastes_nothing() -> None:
    config, run = facts("eir")
    design = plan_step(config, run, 1, PreviousStep(MODEL, memory_items=0, memory="step_0/instances.parquet"))
    assert design.replay is None and design.stream.paste is None and design.stream.replay_per_row == 0.0
    assert design.plan.paste_store is None
    assert design.plan.rows_per_epoch == 40 and design.pseudo  # pseudo-labels do not need a memory


def test_image_replay_adds_the_stored_images_to_every_epoch() -> None:
    config, run = facts("image_replay")
    design = plan_step(config, run, 1, PreviousStep(MODEL, memory_items=12))
    assert design.replay == "images" and design.plan.rows_per_epoch == 52
    assert design.stream.replay_per_row == 0.0 and design.stream.paste is None and not design.pseudo


def test_replayed_images_are_pseudo_labelled_only_when_asked() -> None:
    asked = ("pseudo.enabled=true", "replay.pseudo_label=true")
    for overrides, expected in [((), False), (("pseudo.enabled=true",), False), (asked, True)]:
        config, run = facts("image_replay", *overrides)
        design = plan_step(config, run, 1, PreviousStep(MODEL, memory_items=12))
        assert design.pseudo_replayed is expected and design.pseudo is bool(overrides)
    config, run = facts("image_replay", *asked)
    empty = plan_step(config, run, 1, PreviousStep(MODEL, memory_items=0))
    assert empty.replay is None and not empty.pseudo_replayed  # nothing stored, nothing to label


def test_replayed_pseudo_labels_need_the_steps_pseudo_labelling() -> None:
    with pytest.raises(
        ConfigError, match=r"replay.pseudo_label=true .* pseudo.enabled=false \(method 'image_replay'\)"
    ):
        facts("image_replay", "replay.pseudo_label=true")


def test_image_replay_relabels_each_stored_image_by_the_step_that_stored_it() -> None:
    order = ",".join(str(c) for c in range(20, 0, -1))  # 10-5: step 0 learns 11..20, step 1 6..10, step 2 1..5
    rows = {"train_rows": (100, 40, 30), "test_rows": (50, 60, 70), "task_name": "10-5"}
    config, run = facts("image_replay", f"task.class_order=[{order}]", **rows)
    assert config.replay.image_labels == "stored", "image_replay's preset"
    luts = plan_step(config, run, 2, PreviousStep(MODEL, memory_items=8)).stream.stored_luts
    # channels in step order: 11..20 → 1..10, 6..10 → 11..15, 1..5 → 16..20
    step0 = {c: c - 10 for c in range(11, 21)}
    step1 = {**step0, **{c: c + 5 for c in range(6, 11)}}
    expected = [
        {**dict.fromkeys(range(256), 0), **step0, 255: 255},
        {**dict.fromkeys(range(256), 0), **step1, 255: 255},
    ]
    assert [dict(enumerate(lut.tolist())) for lut in luts] == expected
    assert len(plan_step(config, run, 1, PreviousStep(MODEL, memory_items=8)).stream.stored_luts) == 1

    config, run = facts("image_replay", f"task.class_order=[{order}]", "replay.image_labels=current", **rows)
    design = plan_step(config, run, 2, PreviousStep(MODEL, memory_items=8))
    current = {**dict.fromkeys(range(256), 0), **{c: c + 15 for c in range(1, 6)}, 255: 255}  # old classes → 0
    assert [dict(enumerate(lut.tolist())) for lut in design.stream.stored_luts] == [current, current]
    assert dict(enumerate(design.stream.lut.tolist())) == current

    for method in ("finetune", "eir"):  # no image replay: no stored LUTs, whatever the key says
        config, run = facts(method, **rows)
        assert plan_step(config, run, 2, PreviousStep(MODEL, memory_items=8)).stream.stored_luts == ()


def test_finetune_keeps_and_replays_nothing() -> None:
    config, run = facts("finetune")
    assert plan_step(config, run, 0).memory is None
    design = plan_step(config, run, 1, PreviousStep(MODEL))
    assert design.replay is None and not design.pseudo and design.plan.rows_per_epoch == 40


def test_joint_trains_every_class_in_one_step_scored_by_the_last_steps_test() -> None:
    config, run = facts("joint", train_rows=(130,), test_rows=(50, 60))
    design = plan_step(config, run, 0)
    assert design.plan.head_sizes == (20,) and design.eval_step == 1
    assert (design.plan.old_channels, design.plan.new_channels) == (tuple(range(1, 16)), tuple(range(16, 21)))
    assert design.plan.num_eval_rows == 60 and design.memory is None
    assert list(np.flatnonzero(design.stream.lut[:21])) == list(range(1, 21))  # every class is a target


def test_luts_map_a_class_order_to_channels_in_step_order() -> None:
    order = [*range(20, 0, -1)]  # step 0 learns classes 20..6, step 1 classes 5..1
    config, run = facts("finetune", f"task.class_order=[{','.join(map(str, order))}]")
    design = plan_step(config, run, 1, PreviousStep(MODEL))
    # Channels follow step order (each step's classes sorted): 6..20 → 1..15, then 1..5 → 16..20.
    lut = design.stream.lut
    assert [int(lut[c]) for c in (1, 2, 3, 4, 5)] == [16, 17, 18, 19, 20]
    assert int(lut[6]) == 0 and int(lut[20]) == 0 and int(lut[255]) == 255  # old classes are background
    assert [int(design.eval_lut[c]) for c in (6, 20, 1)] == [1, 15, 16]
    assert int(design.stream.class_to_channel[20]) == 15


def test_fault_injection_comes_from_the_callers_environment() -> None:
    config, run = facts("finetune")
    fault = FaultInjection.from_env({"EIR_FAIL_AT_ITERATION": "3", "EIR_FAULT_MARKER": "/tmp/marker"})
    plan = plan_step(config, run, 0, fault=fault).plan
    assert (plan.fail_at_iteration, plan.fault_marker) == (3, "/tmp/marker")
    assert FaultInjection.from_env({}) == FaultInjection()
    assert plan_step(config, run, 0).plan.fail_at_iteration is None
