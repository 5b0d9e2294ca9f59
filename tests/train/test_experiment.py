"""End-to-end runs on a tiny synthetic dataset, on the shared local Ray session.

Each Ray Train step costs seconds of start-up, so the module trains one 2-step run and derives
every other check from it (resume, the step-0 cache, evaluate, MLflow tree) with the fewest
extra steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

import launch
from eir import storage
from eir.config import load_config
from eir.replay.image_store import ImageStore
from eir.train.evaluate_run import evaluate_run
from eir.train.experiment import run_experiment
from eir.train.plan import StepPlan, iterations_per_epoch
from eir.train.rundir import RunDirError
from eir.train.worker import CHECKPOINT_FILE

pytestmark = pytest.mark.slow

TINY = [
    "dataset.name=synthetic",
    "dataset.synthetic_num_images=40",
    "dataset.synthetic_image_size=48",
    "task.name=15-5",
    "model.weights=null",
    "train.epochs=2",
    "train.epochs_incremental=1",
    "train.batch_size=8",
    "train.crop_size=48",
    "train.checkpoints_to_keep=1",  # fewer kept checkpoints than epochs: MLflow still gets every epoch
    "train.warmup_fraction=0.5",  # the trainer's schedule is read back from its optimiser state
    "eval.batch_size=8",
    "scaling.cpus_per_worker=1",
]


def _mlflow_runs(output_dir: Path) -> list:
    """Every MLflow run the module's experiments logged (one tracking store per module)."""
    mlflow.set_tracking_uri(f"sqlite:///{output_dir / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["eir-synthetic-15-5"], output_format="list")


def _children(runs: list, parent: object) -> list:
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return tmp_path_factory.mktemp("runs")


def tiny_config(output_dir: Path, *extra: str):
    return load_config(overrides=[*TINY, f"run.output_dir={output_dir}", *extra])


@pytest.fixture(scope="module")
def finetune_run(ray_session, output_dir: Path) -> dict:
    return run_experiment(tiny_config(output_dir, "run.name=finetune"), progress=False)


def test_results_json_schema(finetune_run: dict, output_dir: Path) -> None:
    on_disk = json.loads((output_dir / "finetune" / "results.json").read_text())
    assert on_disk == finetune_run
    assert on_disk["status"] == "finished"
    for key in (
        "method",
        "dataset",
        "task",
        "task_setting",
        "seed",
        "eval_protocol",
        "git_sha",
        "mean_mIoU_all_over_steps",
    ):
        assert key in on_disk
    step0, step1 = on_disk["steps"]
    assert step0["seen_classes"] == list(range(1, 16))
    assert step1["seen_classes"] == list(range(1, 21))
    assert step0["mIoU_new"] is None and step0["hIoU"] is None
    assert step1["mIoU_new"] is not None and step1["hIoU"] is not None
    assert set(step1["per_class_IoU"]) >= {"background", "red_flat_disc", "purple_flat_triangle"}
    for key in ("mIoU_all", "mIoU_old", "mIoU_all_fg", "mIoU_old_fg"):
        assert 0.0 <= step1[key] <= 100.0
    assert on_disk["mean_mIoU_all_over_steps"] == pytest.approx((step0["mIoU_all"] + step1["mIoU_all"]) / 2, abs=1e-3)


def test_step_directories_are_complete(finetune_run: dict, output_dir: Path) -> None:
    for step in (0, 1):
        folder = output_dir / "finetune" / f"step_{step}"
        for name in (
            "_COMPLETE",
            "model.pt",
            "metrics.json",
            "confusion.json",
            "plan.json",
            "confusion.png",
            "predictions.png",
        ):
            assert (folder / name).is_file(), f"{folder / name} missing"
    plan = json.loads((output_dir / "finetune" / "step_1" / "plan.json").read_text())
    assert plan["head_sizes"] == [15, 5] and plan["per_worker_batch"] == 8 and plan["weights"] is None


def test_the_trainer_follows_the_plans_schedule_and_decay(finetune_run: dict, output_dir: Path) -> None:
    """Warm-up + poly and METHOD.md §2's weight decay, read from the optimiser state the workers checkpointed."""

    def groups(step: int) -> dict[str, dict]:
        (checkpoint,) = (output_dir / "finetune" / f"step_{step}").rglob(CHECKPOINT_FILE)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["optimizer"]["param_groups"]
        return {group["name"]: group for group in state}

    assert {g["weight_decay"] for g in groups(0).values()} == {1e-4}
    assert {name: g["weight_decay"] for name, g in groups(1).items()} == {
        "backbone": 0.0,
        "decoder": 0.0,
        "old_heads": 0.0,
        "new_head": 1e-4,
    }
    plan = StepPlan(
        **{
            k: tuple(v) if isinstance(v, list) else v
            for k, v in json.loads((output_dir / "finetune" / "step_0" / "plan.json").read_text()).items()
        }
    )
    total = sum(
        iterations_per_epoch(
            plan.rows_per_epoch, plan.per_worker_batch, plan.epochs, min_last_batch=plan.min_last_batch
        )
    )
    last = plan.lr_factor(total - 1, total)  # the factor of the last iteration: after the warm-up, on the poly decay
    assert last != pytest.approx(max(0.0, 1 - (total - 1) / total) ** 0.9), "warm-up shifts the decay"
    assert groups(0)["backbone"]["lr"] == pytest.approx(plan.lr * last)
    assert groups(0)["decoder"]["lr"] == pytest.approx(10 * plan.lr * last)


def test_mlflow_tree(finetune_run: dict, output_dir: Path) -> None:
    runs = _mlflow_runs(output_dir)
    parents = [r for r in runs if r.info.run_name == "finetune"]
    assert len(parents) == 1
    parent = parents[0]
    children = _children(runs, parent)
    assert sorted(r.info.run_name for r in children) == ["finetune/step_0", "finetune/step_1"]
    assert parent.data.params["method.name"] == "finetune"
    assert parent.data.params["eval.protocol"] == finetune_run["eval_protocol"]
    assert parent.data.tags["git_sha"] == finetune_run["git_sha"]
    for name in ("train_split_checksum", "test_split_checksum"):
        assert len(finetune_run[name]) >= 16 and parent.data.params[name] == finetune_run[name]
    assert float(parent.data.metrics["final_mIoU_all"]) == pytest.approx(
        finetune_run["steps"][-1]["mIoU_all"], abs=1e-3
    )
    step1 = next(r for r in children if r.info.run_name == "finetune/step_1")
    assert "loss" in step1.data.metrics and "hIoU" in step1.data.metrics
    client = mlflow.MlflowClient()
    step0 = next(r for r in children if r.info.run_name == "finetune/step_0")
    for name in ("loss", "lr", "images_per_s", "data_wait_share", "grad_norm_max", "grad_norm_mean", "skipped_steps"):
        assert [m.step for m in client.get_metric_history(step0.info.run_id, name)] == [1, 2], name
    norms = client.get_metric_history(step0.info.run_id, "grad_norm_max")
    means = client.get_metric_history(step0.info.run_id, "grad_norm_mean")
    assert all(0 < mean.value <= largest.value < math.inf for mean, largest in zip(means, norms))
    assert {m.value for m in client.get_metric_history(step0.info.run_id, "skipped_steps")} == {0.0}  # fp32, finite
    artifacts = {a.path for a in client.list_artifacts(step1.info.run_id)}
    assert {"per_class_iou.csv", "confusion.png", "predictions.png"} <= artifacts
    # What a researcher reads: status, commit, description, only the keys finetune reads, the IoU table.
    assert parent.info.status == "FINISHED" and {r.info.status for r in children} == {"FINISHED"}
    assert parent.data.tags["mlflow.source.git.commit"] == finetune_run["git_sha"]
    assert "finetune" in parent.data.tags["mlflow.note.content"]
    assert "paste.probability" not in parent.data.params and "loss.rskd_region" not in parent.data.params
    table = client.load_table(parent.info.experiment_id, "per_class_iou.json", run_ids=[parent.info.run_id])
    assert sorted(set(table["step"])) == [0, 1] and "background" in set(table["class"])


def test_existing_run_dir_needs_resume(finetune_run: dict, output_dir: Path) -> None:
    results = output_dir / "finetune" / "results.json"
    before = results.read_bytes()
    with pytest.raises(RunDirError, match="--resume"):
        run_experiment(tiny_config(output_dir, "run.name=finetune"), progress=False)
    assert results.read_bytes() == before, "a refused run leaves the finished run's results alone"


def test_resume_with_different_config_names_the_keys(finetune_run: dict, output_dir: Path) -> None:
    with pytest.raises(RunDirError, match=r"train\.lr_incremental"):
        run_experiment(
            tiny_config(output_dir, "run.name=finetune", "train.lr_incremental=0.5"), resume=True, progress=False
        )


def test_resume_of_finished_run_skips_every_step(finetune_run: dict, output_dir: Path) -> None:
    model = output_dir / "finetune" / "step_1" / "model.pt"
    before = model.stat().st_mtime_ns
    again = run_experiment(tiny_config(output_dir, "run.name=finetune"), resume=True, progress=False)
    assert model.stat().st_mtime_ns == before
    assert [s["mIoU_all"] for s in again["steps"]] == [s["mIoU_all"] for s in finetune_run["steps"]]
    runs = _mlflow_runs(output_dir)
    assert len([r for r in runs if r.info.run_name == "finetune"]) == 1, "resume must not duplicate the MLflow run"


def test_second_method_reuses_step0_from_cache(finetune_run: dict, output_dir: Path) -> None:
    other = run_experiment(tiny_config(output_dir, "run.name=finetune-b", "train.lr_incremental=0.002"), progress=False)
    assert other["steps"][0]["source"] == "cache"
    assert finetune_run["steps"][0]["source"] == "trained"
    assert other["steps"][0]["mIoU_all"] == finetune_run["steps"][0]["mIoU_all"]
    assert other["steps"][1]["source"] == "trained"


def test_skip_old_argmax_without_distillation_runs_the_old_model(finetune_run: dict, output_dir: Path) -> None:
    """`loss.bce_old_background=skip_old_argmax` reads the old model's argmax, so a method that does not distil
    (eir_no_rskd) must still run it in the step: the loss refuses a batch without old logits."""
    with pytest.warns(UserWarning, match="skip_old_argmax with no distillation"):
        config = tiny_config(
            output_dir, "run.name=no-rskd-skip", "method.name=eir_no_rskd", "loss.bce_old_background=skip_old_argmax"
        )
    run = run_experiment(config, progress=False)
    assert run["status"] == "finished"
    assert [step["source"] for step in run["steps"]] == ["cache", "trained"]
    assert math.isfinite(run["steps"][1]["mIoU_all"])


def test_ctrl_c_after_a_step_reaches_the_driver(finetune_run: dict, output_dir: Path) -> None:
    """Ray Train's `fit()` leaves its own SIGINT handler behind; the step runner must put the driver's back.

    Otherwise a Ctrl-C between steps goes to the finished step's controller and is swallowed.
    """
    interrupts: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(signum))
    try:
        document = run_experiment(
            tiny_config(output_dir, "run.name=sigint", "train.lr_incremental=0.003"), progress=False
        )
        assert document["steps"][1]["source"] == "trained", "step 1 must go through Ray Train's fit()"
        signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupts == [signal.SIGINT]


@pytest.mark.parametrize(("stop", "status"), [(SystemExit(0), "stopped"), (KeyboardInterrupt(), "interrupted")])
def test_a_run_stopped_between_steps_says_how(
    finetune_run: dict, output_dir: Path, stop: BaseException, status: str
) -> None:
    def stop_after(step: int, row: dict) -> None:
        raise stop

    name = f"stopped-{status}"
    with pytest.raises(type(stop)):
        run_experiment(tiny_config(output_dir, f"run.name={name}"), reporter=stop_after, progress=False)
    document = json.loads((output_dir / name / "results.json").read_text())
    assert document["status"] == status and [row["step"] for row in document["steps"]] == [0]


def test_a_failed_run_says_so_in_results_json(
    finetune_run: dict, output_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    # The worker exits at step 1's first iteration (step 0 comes from the cache) and no restart is allowed.
    monkeypatch.setenv("EIR_FAIL_AT_ITERATION", "0")
    monkeypatch.setenv("EIR_FAULT_MARKER", str(tmp_path / "worker-exited"))
    with pytest.raises(Exception) as raised:
        run_experiment(tiny_config(output_dir, "run.name=failing"), progress=False)
    document = json.loads((output_dir / "failing" / "results.json").read_text())
    assert document["status"] == "failed" and [row["step"] for row in document["steps"]] == [0]
    assert document["error"].startswith(type(raised.value).__name__)


def test_evaluate_matches_the_run(finetune_run: dict, output_dir: Path) -> None:
    """The driver-side evaluator and the Ray Train workers' evaluation agree on the same split."""
    raw = output_dir / "datasets" / "synthetic-raw-n40-s48-seed0"
    document = evaluate_run(str(output_dir / "finetune"), dataset="synthetic", root=str(raw), split="val")
    assert document["steps"][0]["step"] == 1
    assert document["steps"][0]["mIoU_all"] == pytest.approx(finetune_run["steps"][1]["mIoU_all"], abs=1e-6)
    step0 = evaluate_run(str(output_dir / "finetune"), dataset="synthetic", root=str(raw), split="val", step=0)
    assert step0["steps"][0]["mIoU_all"] == pytest.approx(finetune_run["steps"][0]["mIoU_all"], abs=1e-6)


def test_joint_scores_old_and_new_in_one_step(ray_session, output_dir: Path) -> None:
    reported = []

    def scheduler_stops_the_trial(step: int, row: dict) -> None:  # what ASHA does inside tune.report
        reported.append(step)
        raise SystemExit(0)

    with pytest.raises(SystemExit):
        run_experiment(
            tiny_config(output_dir, "run.name=joint", "method.name=joint", "train.epochs=1"),
            reporter=scheduler_stops_the_trial,
            progress=False,
        )
    joint = json.loads((output_dir / "joint" / "results.json").read_text())
    assert reported == [0] and joint["status"] == "finished", "the last report comes after the run is recorded"
    assert len(joint["steps"]) == 1
    step = joint["steps"][0]
    assert step["seen_classes"] == list(range(1, 21))
    # Scored like 15-5's last step: old = background + the 15 base classes, new = the 5 others.
    ious = list(step["per_class_IoU"].values())
    old, new = [v for v in ious[:16] if v is not None], [v for v in ious[16:] if v is not None]
    assert step["mIoU_old"] == pytest.approx(sum(old) / len(old), abs=0.01)
    assert step["mIoU_new"] == pytest.approx(sum(new) / len(new), abs=0.01)
    assert step["hIoU"] == pytest.approx(
        2 * step["mIoU_old"] * step["mIoU_new"] / (step["mIoU_old"] + step["mIoU_new"]), abs=0.01
    )


def test_cache_command_lists_and_clears_the_step0_cache(
    finetune_run: dict, output_dir: Path, tmp_path: Path, capsys
) -> None:
    shutil.copytree(output_dir / "cache", tmp_path / "cache")  # the module's other tests still use the original
    assert launch.main(["cache", "--list", "--output-dir", str(tmp_path)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 1 and " complete " in listed[0] and "train.epochs=2" in listed[0]
    assert launch.main(["cache", "--clear", "--output-dir", str(tmp_path)]) == 0
    assert "removed 1 step-0 cache entries" in capsys.readouterr().out
    assert launch.main(["cache", "--list", "--output-dir", str(tmp_path)]) == 0
    assert "no step-0 cache entries" in capsys.readouterr().out


def test_dry_run_trains_nothing(output_dir: Path, capsys) -> None:
    document = run_experiment(tiny_config(output_dir, "run.name=dry"), dry_run=True, progress=False)
    assert document["status"] == "dry_run" and document["steps"] == []
    assert not (output_dir / "dry").exists()
    out = capsys.readouterr().out
    assert out.startswith("dry run: nothing is trained") and f"{output_dir / 'datasets'}) is prepared there" in out, (
        "it says that it prepares the dataset, and where"
    )


@pytest.mark.parametrize("method", ["eir", "image_replay", "instance_replay"])
def test_replay_methods_run_on_the_cached_step0(finetune_run: dict, output_dir: Path, method: str) -> None:
    document = run_experiment(
        tiny_config(output_dir, f"run.name={method}", f"method.name={method}", "memory.size=30"), progress=False
    )
    assert document["status"] == "finished" and document["method"] == method
    assert document["steps"][0]["source"] == "cache", "every method shares the trained step 0"
    assert document["steps"][1]["mIoU_new"] is not None
    run = output_dir / method
    memory = run / "step_0" / ("images.parquet" if method == "image_replay" else "instances.parquet")
    assert memory.is_file()
    assert not (run / "step_1" / "instances.parquet").exists(), "the last step keeps no memory"
    assert (run / "step_1" / "pseudo" / "_COMPLETE").is_file() == (method == "eir")
    plan = json.loads((run / "step_1" / "plan.json").read_text())
    options = plan["method_options"]
    assert plan["method"] == method and options["loss.rskd_weight"] == (5.0 if method == "eir" else 0.0)
    assert plan["rows_per_epoch"] >= plan["num_train_rows"]
    # EIR's stream ships paste plans; its trainers read step 0's store to carry them out on their device.
    assert (plan["paste_store"] or "").endswith("step_0/instances.parquet") == (method == "eir")
    assert method == "eir" or plan["paste_store"] is None
    # The loss's parts are logged per epoch, so a diverging run shows which term moved.
    runs = _mlflow_runs(output_dir)
    parent = next(r for r in runs if r.info.run_name == method)
    step1 = next(r for r in _children(runs, parent) if r.info.run_name == f"{method}/step_1")
    terms = {k: v for k, v in step1.data.metrics.items() if k.startswith("loss_")}
    assert set(terms) == ({"loss_bce", "loss_rskd"} if method == "eir" else {"loss_bce"}), "only the terms it trains"
    weighted = options["loss.bce_weight"] * terms["loss_bce"] + options["loss.rskd_weight"] * terms.get(
        "loss_rskd", 0.0
    )
    assert terms["loss_bce"] > 0 and step1.data.metrics["loss"] == pytest.approx(weighted, rel=1e-6)
    assert method != "eir" or terms["loss_rskd"] > 0


def test_image_replay_beside_pseudo_labels(finetune_run: dict, output_dir: Path) -> None:
    """The step's images pseudo-labelled, the replayed ones not (METHOD.md §4.1), in one stream: with 30
    stored images and batches of 8, some batches hold replayed images alone."""
    overrides = ("run.name=image_replay_pseudo", "method.name=image_replay", "pseudo.enabled=true", "memory.size=30")
    document = run_experiment(tiny_config(output_dir, *overrides), progress=False)
    assert document["status"] == "finished" and document["steps"][1]["mIoU_new"] is not None
    run = output_dir / "image_replay_pseudo"
    assert (run / "step_1" / "pseudo" / "_COMPLETE").is_file()
    stored = ImageStore.read(storage.resolve(run / "step_0" / "images.parquet"))
    assert len(stored) > 8 and set(stored.stored_steps()) == {0}
    plan = json.loads((run / "step_1" / "plan.json").read_text())
    assert plan["rows_per_epoch"] == plan["num_train_rows"] + len(stored)


def _copy_run(output_dir: Path, source: str, name: str) -> Path:
    """A finished run under another name (its own MLflow runs): damage it without touching the module's run."""
    run = output_dir / name
    shutil.copytree(output_dir / source, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["run"]["name"] = name
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "mlflow_runs.json").unlink()
    return run


def test_resume_redoes_a_damaged_step_and_every_step_after_it(finetune_run: dict, output_dir: Path, caplog) -> None:
    run = _copy_run(output_dir, "finetune", "damaged")
    (run / "step_0" / "metrics.json").write_text('{"step": 0, "mIoU_al')  # truncated after its marker was written
    with caplog.at_level("WARNING"):
        resumed = run_experiment(tiny_config(output_dir, "run.name=damaged"), resume=True, progress=False)
    assert resumed["status"] == "finished"
    assert [s["source"] for s in resumed["steps"]] == ["cache", "trained"], "step 0 from the cache, step 1 retrained"
    assert "finished step 0" in caplog.text and "metrics.json has" in caplog.text
    assert "step 1 in" in caplog.text and "was built on the step trained again" in caplog.text
    aside = sorted(p.name.split(".damaged-")[0] for p in run.iterdir() if ".damaged-" in p.name)
    assert aside == [".step_0", ".step_1"], "the damaged step and the one built on it are kept aside, not deleted"
    assert json.loads((run / "step_0" / "metrics.json").read_text())["step"] == 0


def test_a_damaged_cache_entry_is_listed_and_never_reused(
    finetune_run: dict, output_dir: Path, tmp_path: Path, capsys
) -> None:
    from eir import storage
    from eir.train import cache

    shutil.copytree(output_dir / "cache", tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "step0").iterdir()
    model = entry / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    assert launch.main(["cache", "--list", "--output-dir", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert f"{entry.name}  DAMAGED: model.pt has 100 bytes" in listed
    assert not cache.lookup(storage.resolve(entry)), "never copied into a run"
    assert not entry.exists() and len(list((tmp_path / "cache" / "step0").glob(f".{entry.name}.damaged-*"))) == 1
    assert launch.main(["cache", "--list", "--output-dir", str(tmp_path)]) == 0
    assert "no step-0 cache entries" in capsys.readouterr().out, "a quarantined entry is not listed"


def test_resume_of_a_run_that_does_not_exist_is_an_error(finetune_run: dict, output_dir: Path) -> None:
    with pytest.raises(RunDirError, match=r"no run 'finetun' .*did you mean finetune"):
        run_experiment(tiny_config(output_dir, "run.name=finetun"), resume=True, progress=False)
    assert not (output_dir / "finetun").exists()


def test_a_damaged_run_config_is_named(finetune_run: dict, output_dir: Path) -> None:
    run = _copy_run(output_dir, "finetune", "bad-config")
    (run / "config.yaml").write_bytes(b"\xff\xfe not yaml")
    for damage, says in (
        (b"\xff\xfe not yaml", "not UTF-8"),
        (b"- a list\n- not sections\n", "mapping"),
        (b"train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n", "given twice"),
    ):
        (run / "config.yaml").write_bytes(damage)
        with pytest.raises(RunDirError, match=r"the run's config is damaged: .*bad-config/config.yaml") as caught:
            run_experiment(tiny_config(output_dir, "run.name=bad-config"), resume=True, progress=False)
        assert says in str(caught.value)


def test_a_run_in_use_is_refused_with_one_line(finetune_run: dict, output_dir: Path, capsys) -> None:
    from eir import storage
    from eir.runlock import hold

    argv = [
        "run",
        str(Path(launch.__file__).parent / "experiments" / "quickstart.yaml"),
        *TINY,
        f"run.output_dir={output_dir}",
        "run.name=finetune",
    ]
    with hold(storage.resolve(output_dir / "finetune")):
        for extra in ([], ["--resume"]):
            assert launch.main([*argv, *extra]) == 2
            err = capsys.readouterr().err
            assert f"is in use by pid {os.getpid()}" in err and "Traceback" not in err
