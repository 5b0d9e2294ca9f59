"""The benchmark command's contract: its names, its options, and the accuracy table it prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import launch
from eir.bench import BENCHMARKS, accuracy
from eir.bench.accuracy import _plan, accuracy_goals, accuracy_table, goals_table, run_accuracy
from eir.methods import METHOD_NAMES
from eir.visualize import hbar_figure


def test_every_benchmark_of_the_issue_is_a_command() -> None:
    assert set(BENCHMARKS) == {
        "pipeline",
        "iteration",
        "memory_store",
        "sweep_cache",
        "scaling",
        "gpu",
        "accuracy_camvid",
        "accuracy_synthetic",
    }


def test_performance_benchmarks_refuse_accuracy_options() -> None:
    with pytest.raises(ValueError, match="accuracy benchmarks only"):
        BENCHMARKS["scaling"](quick=True, limit=1)
    with pytest.raises(ValueError, match="no --quick form"):
        BENCHMARKS["accuracy_camvid"](quick=True)


def test_unknown_method_is_refused_before_any_run() -> None:
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['eirr'\]"):
        run_accuracy("accuracy_camvid", methods=["eirr"])


def test_bench_help_lists_the_options(capsys) -> None:
    with pytest.raises(SystemExit):
        launch.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--quick" in out and "--limit" in out and "--methods" in out and "sweep_cache" in out


def _run(method: str, seed: int, final: float) -> dict:
    return {
        "dataset": "camvid",
        "task": "5-3",
        "method": method,
        "seed": seed,
        "final": {"mIoU_all": final, "mIoU_old": final, "mIoU_new": None, "hIoU": None},
    }


def test_accuracy_table_gives_mean_and_sample_std_over_seeds() -> None:
    table = accuracy_table([_run("eir", 0, 40.0), _run("eir", 1, 44.0), _run("finetune", 0, 2.5)])
    assert "| camvid 5-3 | eir | 2 | 42.00 ± 2.83 | 42.00 ± 2.83 | – | – |" in table
    assert "| camvid 5-3 | finetune | 1 | 2.50 | 2.50 | – | – |" in table


def test_hbar_figure_writes_a_png(tmp_path: Path) -> None:
    hbar_figure({"a": 1.0, "b": 2.5}, tmp_path / "f.png", xlabel="x", title="t")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def _scored(method: str, seed: int, all_: float, hiou: float) -> dict:
    return {
        "dataset": "camvid",
        "task": "5-3",
        "method": method,
        "seed": seed,
        "final": {"mIoU_all": all_, "mIoU_old": all_, "mIoU_new": all_, "hIoU": hiou},
    }


def test_goals_say_beyond_the_seed_spread_only_when_the_intervals_part() -> None:
    runs = [
        _scored("eir", 0, 30.0, 20.0),
        _scored("eir", 1, 34.0, 22.0),  # 32 ± 2.83, 21 ± 1.41
        _scored("image_replay", 0, 27.0, 1.0),
        _scored("image_replay", 1, 29.0, 3.0),  # 28 ± 1.41, 2 ± 1.41
        _scored("finetune", 0, 2.0, 0.5),  # one seed: its spread is unknown
        _scored("joint", 0, 40.0, 38.0),
    ]
    goals = accuracy_goals(runs)["camvid 5-3"]
    assert goals["eir_vs_joint"] == 0.8
    overlap = goals["eir_above_image_replay_mIoU_all"]  # 32 − 2.83 = 29.17 < 28 + 1.41 = 29.41
    assert overlap["above"] is True and overlap["beyond_seed_spread"] is False and overlap["met"] is False
    assert overlap["means"] == [32.0, 28.0] and overlap["stds"] == [2.83, 1.41] and overlap["seeds"] == [2, 2]
    assert goals["eir_above_image_replay_hIoU"]["met"] is True
    unknown = goals["image_replay_above_finetune_mIoU_all"]
    assert unknown["above"] is True and unknown["beyond_seed_spread"] is None and unknown["met"] is None
    assert "eir_above_finetune_mIoU_all" not in goals  # only the issue's chain is judged
    table = goals_table(accuracy_goals(runs))
    assert "camvid 5-3: eir / joint mIoU_all = 0.800" in table
    assert "eir_above_image_replay_mIoU_all: 32.00 vs 28.00 (above, within the seed spread)" in table
    assert "image_replay_above_finetune_mIoU_all: 28.00 vs 2.00 (above, seed spread unknown)" in table


def test_goals_report_a_method_below_the_next_and_skip_unscored_pairs() -> None:
    runs = [
        _scored("eir", 0, 1.0, 1.0),
        _scored("eir", 1, 1.2, 1.0),
        _scored("image_replay", 0, 5.0, 4.0),
        _scored("image_replay", 1, 5.4, 4.0),
    ]
    runs[0]["final"]["hIoU"] = runs[1]["final"]["hIoU"] = None  # e.g. a run stopped at step 0
    goals = accuracy_goals(runs)["camvid 5-3"]
    assert "eir_vs_joint" not in goals and "eir_above_image_replay_hIoU" not in goals
    below = goals["eir_above_image_replay_mIoU_all"]  # 1.1 ± 0.14 against 5.2 ± 0.28: clearly below
    assert below["above"] is False and below["beyond_seed_spread"] is True and below["met"] is False
    assert "NOT above, beyond the seed spread" in goals_table({"camvid 5-3": goals})


# ---------------------------------------------------------------- every registered method, resumable, rows kept


def test_the_camvid_plan_takes_every_registered_method_bounds_first() -> None:
    plan = _plan("accuracy_camvid")
    for config in ("experiments/camvid_5-3.yaml", "experiments/camvid_6-1.yaml"):
        methods = [p.method for p in plan if p.config == config and p.seed == 0]
        assert sorted(methods) == sorted(METHOD_NAMES) and methods[:2] == ["finetune", "joint"]
    seeded = sorted((p.method, p.seed) for p in plan if p.seed > 0)
    assert seeded == sorted((m, s) for m in ("finetune", "image_replay", "eir") for s in (1, 2))


@pytest.fixture
def fake_bench(tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    """The accuracy benchmark with its results file in tmp_path and a stand-in for training that returns a
    finished run's document (final mIoU = 10 × seed + 1) and records the run names it was asked to train."""
    trained: list[str] = []

    def train(config, resume: bool) -> dict:
        # run_experiment's contract: resume only a run whose folder exists (it refuses to "resume" a new run).
        started = (Path(config.run.output_dir) / config.run.name / "config.yaml").is_file()
        assert resume == started, f"{config.run.name}: resume={resume} but the run folder exists: {started}"
        trained.append(config.run.name)
        final = {"mIoU_all": 10.0 * config.seed + 1, "mIoU_old": 1.0, "mIoU_new": 1.0, "hIoU": 1.0}
        return {
            "dataset": config.dataset.name,
            "task": config.task.name,
            "task_setting": config.task.setting,
            "method": config.method.name,
            "seed": config.seed,
            "mean_mIoU_all_over_steps": 1.0,
            "steps": [{"step": 0, **final}],
            "run_name": config.run.name,
            "git_sha": "new",
        }

    monkeypatch.setattr(accuracy, "results_path", lambda name: tmp_path / f"{name}.json")
    monkeypatch.setattr(accuracy, "run_experiment", train)
    return tmp_path / "accuracy_camvid.json", trained


def _recorded(method: str, seed: int, task: str = "5-3") -> dict:
    row = _scored(method, seed, 2.5, 0.5)
    steps = [{"step": 0, **row["final"]}]
    return {**row, "task": task, "task_setting": "overlapped", "steps": steps, "git_sha": "old", "run_name": "old"}


def test_new_methods_land_beside_the_recorded_rows_and_a_rerun_skips_them(fake_bench, tmp_path: Path) -> None:
    path, trained = fake_bench
    old = [_recorded("finetune", 0), _recorded("image_replay", 0)]
    path.write_text(json.dumps({"benchmark": "accuracy_camvid", "runs": old}))
    outputs = [f"run.output_dir={tmp_path / 'outputs'}"]
    new = [m for m in accuracy.EVERY_METHOD if m not in ("finetune", "image_replay")]  # in the plan's order

    launch.main(["bench", "accuracy_camvid", *outputs, "--methods", ",".join(new), "--limit", "2"])
    assert trained == [f"camvid_5-3_{m}" for m in new[:2]], "the plan's order, --limit 2 runs"
    launch.main(["bench", "accuracy_camvid", *outputs, "--methods", ",".join(new)])
    expected = {("5-3", m, 0) for m in new} | {("6-1", m, 0) for m in new} | {("5-3", "eir", 1), ("5-3", "eir", 2)}
    document = json.loads(path.read_text())
    assert document["runs"][:2] == old, "the recorded rows stay as they were"
    assert {(r["task"], r["method"], r["seed"]) for r in document["runs"][2:]} == expected
    assert len(trained) == len(expected), "nothing trained twice across the two invocations"
    assert all(r["git_sha"] == "new" for r in document["runs"][2:])

    trained.clear()
    launch.main(["bench", "accuracy_camvid", *outputs, "--methods", ",".join(new)])
    assert trained == [] and len(json.loads(path.read_text())["runs"]) == 2 + len(expected)


def test_an_interrupted_run_is_resumed_and_a_new_one_started_afresh(fake_bench, tmp_path: Path) -> None:
    _, trained = fake_bench
    interrupted = tmp_path / "outputs" / "camvid_5-3_mib"
    interrupted.mkdir(parents=True)
    (interrupted / "config.yaml").write_text("{}\n")  # a run stopped before its results.json
    launch.main(["bench", "accuracy_camvid", f"run.output_dir={tmp_path / 'outputs'}", "--methods", "mib,plop"])
    assert trained[:2] == ["camvid_5-3_mib", "camvid_5-3_plop"]  # the fake asserts resume=True, then False


def test_rerun_supersedes_a_changed_methods_rows_and_continues_without_it(fake_bench, tmp_path: Path) -> None:
    path, trained = fake_bench
    old = [_recorded("finetune", 0), _recorded("image_replay", 0), _recorded("image_replay", 1)]
    path.write_text(json.dumps({"benchmark": "accuracy_camvid", "runs": old}))
    outputs = [f"run.output_dir={tmp_path / 'outputs'}"]
    with pytest.raises(ValueError, match="--rerun needs --methods"):
        run_accuracy("accuracy_camvid", outputs, rerun=True)

    launch.main(["bench", "accuracy_camvid", *outputs, "--methods", "image_replay", "--rerun", "--limit", "1"])
    document = json.loads(path.read_text())
    assert document["runs"] == [old[0]] + [r for r in document["runs"][1:] if r["git_sha"] == "new"]
    assert [(r["method"], r["seed"], r["git_sha"]) for r in document["superseded"]] == [
        ("image_replay", 0, "old"),
        ("image_replay", 1, "old"),
    ]
    assert trained == ["camvid_5-3_image_replay_v2"], "a run dir of its own, not the old run's"

    launch.main(["bench", "accuracy_camvid", *outputs, "--methods", "image_replay"])  # continue, no --rerun
    assert trained == [
        "camvid_5-3_image_replay_v2",
        "camvid_5-3_image_replay_seed1_v2",
        "camvid_5-3_image_replay_seed2",
        "camvid_6-1_image_replay",
    ]
    document = json.loads(path.read_text())
    assert len(document["superseded"]) == 2 and len(document["runs"]) == 5


def test_pipeline_ratios_are_the_median_of_the_rounds_and_the_verdict_names_each_goal() -> None:
    from eir.bench.pipeline import (
        RATIOS,
        REFERENCE_RATIOS,
        VERDICT_RUNS,
        goals_verdict,
        ratio_summaries,
        ratio_summary,
    )

    # The quick form times exactly the runs the ratios divide, each ratio's pair adjacent in a round.
    assert set(VERDICT_RUNS) == {name for pair in RATIOS.values() for name in pair}
    # The reference ratio is the paste ratio's pair run in the DataLoader instead of the stream.
    assert REFERENCE_RATIOS["dataloader_paste_slowdown"] == tuple(
        name.replace("ray_", "dataloader_") for name in RATIOS["paste_slowdown"]
    )
    assert all(abs(VERDICT_RUNS.index(top) - VERDICT_RUNS.index(bottom)) == 1 for top, bottom in RATIOS.values())

    summary = ratio_summary([11.0, 12.0, 30.0], [10.0, 10.0, 10.0])  # one disturbed round
    assert summary == {"value": 1.2, "rounds": [1.1, 1.2, 3.0]}
    # The full form times every run; the quick form only the verdict runs, so it has no reference ratio.
    full = {"dataloader_plain": [10.0, 10.0, 10.0], "dataloader_paste": [11.0, 12.0, 11.5], "ray_plain": [12.0] * 3}
    assert ratio_summaries(full, REFERENCE_RATIOS) == {
        "dataloader_paste_slowdown": {"value": 1.15, "rounds": [1.1, 1.2, 1.15]}
    }
    quick = {name: seconds for name, seconds in full.items() if name in VERDICT_RUNS}
    assert ratio_summaries(quick, REFERENCE_RATIOS) == {}
    verdict = goals_verdict({"paste_slowdown": 1.2, "ray_vs_dataloader": 0.9})
    assert verdict["paste_slowdown"] == {"max": 1.15, "measured": 1.2, "met": False}
    assert verdict["ray_vs_dataloader"] == {"min": 0.9, "measured": 0.9, "met": True}


def test_superseding_every_row_leaves_a_file_without_a_figure(fake_bench, tmp_path: Path) -> None:
    """`--rerun --limit 0` moves the rows aside before any training (re-measuring a whole table over sessions)."""
    path, trained = fake_bench
    path.write_text(json.dumps({"benchmark": "accuracy_camvid", "runs": [_recorded("finetune", 0)]}))
    path.with_suffix(".png").write_bytes(b"the old rows' figure")
    outputs = [f"run.output_dir={tmp_path / 'outputs'}"]
    launch.main(["bench", "accuracy_camvid", *outputs, "--methods", "finetune", "--rerun", "--limit", "0"])
    document = json.loads(path.read_text())
    assert trained == [] and document["runs"] == [] and len(document["superseded"]) == 1
    assert not path.with_suffix(".png").exists()
    launch.main(["bench", "accuracy_camvid", *outputs, "--methods", "finetune", "--limit", "1"])
    assert trained == ["camvid_5-3_finetune_v2"] and path.with_suffix(".png").is_file()
