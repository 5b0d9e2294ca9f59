"""`launch.py report` on hand-written run and sweep dirs: no training needed to check the tables."""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from eir import storage
from eir.report import write_report
from eir.tracking import Tracker


def _run(folder: Path, method: str, seed: int, final: float) -> None:
    folder.mkdir(parents=True)
    steps = [
        {"step": 0, "mIoU_all": 60.0, "mIoU_old": 60.0, "mIoU_new": None, "hIoU": None},
        {"step": 1, "mIoU_all": final, "mIoU_old": final + 5, "mIoU_new": final - 5, "hIoU": final - 1},
    ]
    (folder / "results.json").write_text(
        json.dumps(
            {
                "status": "finished",
                "dataset": "camvid",
                "task": "5-3",
                "task_setting": "overlapped",
                "method": method,
                "seed": seed,
                "run_name": folder.name,
                "steps": steps,
            }
        )
    )


def _sweep(folder: Path, ran_in: str, sizes: dict[str, int], missing: list[dict] | None = None) -> None:
    trials = [
        {
            "trial_id": trial,
            "params": {"memory.size": size},
            "metric": 1.0,
            "status": "finished",
            "step0": "cache",
            "run_dir": f"{ran_in}/runs/{trial}",
        }
        for trial, size in sizes.items()
    ]
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "sweep": "memory",
                "metric": "hIoU",
                "mode": "max",
                "trials": trials,
                "failed": [],
                "best": trials[0],
                "step0_trained": 1,
                "step0_reused": len(trials) - 1,
                **({"missing": missing} if missing is not None else {}),
            }
        )
    )


def test_sweep_trials_are_rows_of_their_own_even_after_the_sweep_dir_moved(tmp_path: Path) -> None:
    sweep = tmp_path / "copied" / "memory"
    sizes = {"a_00000": 100, "a_00001": 25, "a_00002": 0}
    for trial, final in zip(sizes, (30.0, 31.0, 32.0)):
        _run(sweep / "runs" / trial, "eir", 0, final)
    _sweep(sweep, "/somewhere/else/sweeps/memory", sizes)  # the summary names where it ran

    write_report([str(sweep)], str(tmp_path / "out"))
    text = (tmp_path / "out" / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| camvid")]
    assert [row.split(" | ")[3] for row in rows] == ["memory.size=0", "memory.size=25", "memory.size=100"]
    assert all(row.split(" | ")[4] == "1" for row in rows), "trials of different settings are not averaged as seeds"
    assert "| 32.00 | 37.00 | 27.00 | 31.00 |" in rows[0]
    assert "**camvid 5-3 eir memory.size=25** (1 run(s))" in text
    assert (tmp_path / "out" / "memory_hIoU_vs_memory.size.png").is_file()
    assert not list((tmp_path / "out").glob("*_method_table*")), "a memory sweep has no method table"


def test_a_sweeps_grid_points_that_never_ran_are_listed(tmp_path: Path) -> None:
    sweep = tmp_path / "memory"
    _run(sweep / "runs" / "a_00000", "eir", 0, 30.0)
    _sweep(sweep, str(sweep), {"a_00000": 100}, missing=[{"memory.size": 25}, {"memory.size": 0}])
    write_report([str(sweep)], str(tmp_path / "out"))
    text = (tmp_path / "out" / "report.md").read_text()
    assert '- not run: `{"memory.size": 25}`' in text and '- not run: `{"memory.size": 0}`' in text


def test_seeds_of_one_setting_are_averaged(tmp_path: Path) -> None:
    _run(tmp_path / "runs" / "eir", "eir", 0, 30.0)
    _run(tmp_path / "runs" / "eir_seed1", "eir", 1, 34.0)
    _run(tmp_path / "runs" / "finetune", "finetune", 0, 2.0)

    write_report([str(tmp_path / "runs")], str(tmp_path / "out"))
    rows = [line for line in (tmp_path / "out" / "report.md").read_text().splitlines() if line.startswith("| camvid")]
    assert len(rows) == 2
    eir = next(row for row in rows if " eir " in row)
    assert eir.split(" | ")[4] == "2" and "32.00 ± 2.83" in eir
    assert (tmp_path / "out" / "miou_per_step.png").is_file()


def test_report_attaches_to_the_sweeps_mlflow_run_at_the_recorded_uri(tmp_path: Path, monkeypatch, caplog) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("eir-sweep-memory")).info.run_id
    sweep = tmp_path / "out" / "sweeps" / "memory"
    _run(sweep / "runs" / "a_00000", "eir", 0, 30.0)
    _sweep(sweep, str(sweep), {"a_00000": 100})

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sweep's record names the store
    (sweep / "mlflow_sweep.json").write_text(json.dumps({"parent": parent, "tracking_uri": uri}))
    write_report([str(sweep)], str(tmp_path / "report"))
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {"report/report.md", "report/miou_per_step.png"}

    # A sweep recorded before the URI was: MLFLOW_TRACKING_URI, as before.
    second = client.create_run(client.get_experiment_by_name("eir-sweep-memory").experiment_id).info.run_id
    (sweep / "mlflow_sweep.json").write_text(json.dumps({"parent": second}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_report([str(sweep)], str(tmp_path / "report"))
    assert "report/report.md" in {a.path for a in client.list_artifacts(second, "report")}

    # A damaged record: the report is still written, with a warning instead of the attachment.
    (sweep / "mlflow_sweep.json").write_text("{not json")
    (tmp_path / "report" / "report.md").unlink()
    with caplog.at_level(logging.WARNING, logger="eir.report"):
        write_report([str(sweep)], str(tmp_path / "report"))
    assert (tmp_path / "report" / "report.md").is_file()
    assert "report written, but not attached to sweep memory's MLflow run" in caplog.text
    assert str(sweep / "mlflow_sweep.json") in caplog.text


def test_a_dead_tracking_server_is_a_warning_within_seconds(tmp_path: Path, monkeypatch, caplog) -> None:
    import socket
    import time

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sweep = tmp_path / "sweeps" / "memory"
    _run(sweep / "runs" / "a_00000", "eir", 0, 30.0)
    _sweep(sweep, str(sweep), {"a_00000": 100})
    (sweep / "mlflow_sweep.json").write_text(json.dumps({"parent": "abc", "tracking_uri": f"http://127.0.0.1:{port}"}))
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="eir.report"):
        write_report([str(sweep)], str(tmp_path / "report"))
    assert time.perf_counter() - started < 30
    assert (tmp_path / "report" / "report.md").is_file()
    assert "report written, but not attached to sweep memory's MLflow run" in caplog.text and str(port) in caplog.text


# ---------------------------------------------------------------- the method table of a method × seed sweep

# Per (method, seed): mIoU all / old / new / hIoU after each step of CamVid 5-3 (3 steps); None where step 0 has none.
FAKE = {
    ("finetune", 0): [(62.0, 62.0, None, None), (30.0, 20.0, 40.0, 26.0), (2.0, 0.3, 4.5, 0.5)],
    ("finetune", 1): [(63.5, 63.5, None, None), (31.0, 21.0, 41.0, 27.0), (2.8, 0.2, 5.0, 0.4)],
    ("finetune", 2): [(62.8, 62.8, None, None), (29.5, 19.0, 40.5, 25.0), (2.6, 0.3, 4.6, 0.6)],
    ("eir", 0): [(62.0, 62.0, None, None), (40.5, 46.4, 30.0, 36.4), (29.0, 38.5, 19.5, 25.9)],
    ("eir", 1): [(63.5, 63.5, None, None), (41.0, 47.0, 31.0, 37.0), (29.5, 39.0, 20.0, 26.3)],
    ("eir", 2): [(62.8, 62.8, None, None), (39.0, 45.0, 29.5, 35.5)],  # unfinished: step 2 still training
    ("mib", 0): [(61.0, 61.0, None, None), (35.0, 40.0, 28.0, 33.0), (20.0, 25.0, 15.0, 18.8)],
    ("joint", 0): [(40.6, 51.0, 30.3, 38.0)],
    ("joint", 1): [(41.2, 51.4, 30.9, 38.5)],
}
WALL_S = {("finetune", 0): 1500.0, ("finetune", 1): 1620.0, ("eir", 0): 900.0}  # only trials the summary lists


def _trial_run(folder: Path, method: str, seed: int) -> None:
    rows = [
        {"step": step, "mIoU_all": a, "mIoU_old": o, "mIoU_new": n, "hIoU": h}
        for step, (a, o, n, h) in enumerate(FAKE[(method, seed)])
    ]
    finished = method == "joint" or len(rows) == 3
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(
        json.dumps(
            {
                "status": "finished" if finished else "running",
                "dataset": "camvid",
                "task": "5-3",
                "task_setting": "overlapped",
                "method": method,
                "seed": seed,
                "run_name": f"method.name={method},seed={seed}",  # the sweep's trial label
                "mean_mIoU_all_over_steps": round(statistics.mean(r["mIoU_all"] for r in rows), 4),
                "steps": rows,
            }
        )
    )


def _method_sweep(root: Path) -> tuple[Path, str, str]:
    """A method × seed sweep stopped part-way: its summary from an earlier invocation lists three trials;
    the other trials ran later (one is still training); the MLflow parent is in a real sqlite store."""
    sweep = root / "sweeps" / "camvid_5-3_methods"
    ids = {key: f"t{index:05d}" for index, key in enumerate(FAKE)}
    for (method, seed), trial in ids.items():
        _trial_run(sweep / "runs" / trial, method, seed)
    trials = [
        {"trial_id": ids[key], "params": {"method.name": key[0], "seed": key[1]}, "metric": 1.0, "time_total_s": wall}
        for key, wall in WALL_S.items()
    ]
    summary = {"sweep": "camvid_5-3_methods", "metric": "hIoU", "trials": trials, "failed": []}
    (sweep / "summary.json").write_text(json.dumps(summary | {"step0_trained": 2, "step0_reused": 1}))
    tracker = Tracker(storage.resolve(str(root)), "eir-sweep-camvid_5-3_methods")
    parent = tracker.start("camvid_5-3_methods")
    (sweep / "mlflow_sweep.json").write_text(json.dumps({"parent": parent, "tracking_uri": tracker.uri}))
    return sweep, parent, tracker.uri


def _expected(values: list[float]) -> str:
    """A cell as the table should show it, computed here with the statistics module."""
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def test_a_method_sweep_gets_its_method_table_from_what_is_finished(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep, parent, uri = _method_sweep(tmp_path / "outputs")
    out = tmp_path / "report"
    written = write_report([str(sweep)], str(out))

    text = (out / "report.md").read_text()
    section = text[text.index("## Methods: sweep camvid_5-3_methods (camvid 5-3, overlapped)") :]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in section.splitlines() if line.startswith("| ")}
    header = rows.pop("method")
    assert header[-7:-1] == [
        "step 0 mIoU all",
        "final mIoU all",
        "final mIoU old",
        "final mIoU new",
        "final hIoU",
        "mIoU all, mean over steps",
    ]
    assert list(rows) == ["finetune", "eir", "mib", "joint"], "finetune first, joint last, the rest by name"

    def cells(method: str) -> list[str]:
        return [cell.rstrip(" |") for cell in rows[method]]

    finished = {key: steps for key, steps in FAKE.items() if key[0] == "joint" or len(steps) == 3}
    for method in ("finetune", "eir", "mib"):
        every = [FAKE[key] for key in FAKE if key[0] == method]
        done = [finished[key] for key in finished if key[0] == method]
        expected = [
            _expected([steps[0][0] for steps in every]),  # step 0 from every trial past it, the running one too
            *(_expected([steps[-1][i] for steps in done]) for i in range(4)),
            _expected([statistics.mean(s[0] for s in steps) for steps in done]),
        ]
        assert cells(method)[0] == f"{len(every)} ({len(done)})"
        assert cells(method)[1:7] == expected, method
    assert cells("eir")[1].endswith("(n=3)") and cells("eir")[2].endswith("(n=2)"), "n per cell"
    joint = cells("joint")
    assert joint[1] == "–" and joint[6] == "–", "joint has no step 0 of base classes and no steps to average"
    assert joint[2] == _expected([FAKE[("joint", 0)][0][0], FAKE[("joint", 1)][0][0]])
    assert cells("finetune")[7] == _expected([1500.0 / 60, 1620.0 / 60]), "wall time from the sweep's summary"
    assert cells("mib")[7] == "–", "no wall time for a trial the summary does not list"
    assert "not finished: eir seed 2 (running, 2 step(s) done)" in section

    table = json.loads((out / "camvid_5-3_methods_method_table.json").read_text())
    assert table["unfinished"] == [{"method": "eir", "seed": 2, "status": "running", "steps_done": 2}]
    eir_final = next(r for r in table["rows"] if r["method"] == "eir")["cells"]["final_hIoU"]
    assert eir_final["seeds"] == [0, 1] and eir_final["n"] == 2
    assert eir_final["mean"] == pytest.approx(statistics.mean([25.9, 26.3]), abs=1e-4)
    assert eir_final["std"] == pytest.approx(statistics.stdev([25.9, 26.3]), abs=1e-4)
    with open(out / "camvid_5-3_methods_method_table.csv", newline="") as handle:
        csv_rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(csv_rows) == ["finetune", "eir", "mib", "joint"]
    finetune = csv_rows["finetune"]
    assert float(finetune["final_mIoU_old_mean"]) == pytest.approx(statistics.mean([0.3, 0.2, 0.3]), abs=1e-4)
    assert float(finetune["final_mIoU_old_std"]) == pytest.approx(statistics.stdev([0.3, 0.2, 0.3]), abs=1e-4)
    assert finetune["final_mIoU_old_n"] == "3" and csv_rows["mib"]["final_hIoU_std"] == ""
    assert csv_rows["joint"]["step0_mIoU_all_n"] == "0" and csv_rows["joint"]["step0_mIoU_all_mean"] == ""

    plot = out / "camvid_5-3_methods_mIoU_all_per_step.png"
    assert plot.read_bytes()[:4] == b"\x89PNG" and str(plot) in written
    # The general tables group the seeds of a method too (method and seed are not a setting).
    final_rows = [line for line in text.splitlines() if line.startswith("| camvid")]
    assert any(" | eir | – | 2 | " in row for row in final_rows)

    attached = {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert {
        "report/report.md",
        "report/camvid_5-3_methods_method_table.csv",
        "report/camvid_5-3_methods_method_table.json",
        "report/camvid_5-3_methods_mIoU_all_per_step.png",
    } <= attached


def test_a_sweep_stopped_before_any_trial_finished_renders_its_step0_cells(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = tmp_path / "sweeps" / "m"
    for trial, method in (("a", "eir"), ("b", "mib")):
        _trial_run(sweep / "runs" / trial, method, 2 if method == "eir" else 0)
        document = json.loads((sweep / "runs" / trial / "results.json").read_text())
        document.update(status="interrupted", steps=document["steps"][:1])
        (sweep / "runs" / trial / "results.json").write_text(json.dumps(document))
    # The sweep's record, as it is written before the first trial starts (its parent run is not in this store).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (sweep / "mlflow_sweep.json").write_text(json.dumps({"parent": "0" * 32, "tracking_uri": uri}))
    write_report([str(sweep)], str(tmp_path / "out"))
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| eir | 1 (0) | 62.80 (n=1) | – | – | – | – | – | – |" in text
    assert not (tmp_path / "out" / "miou_per_step.png").exists(), "no finished run: no general table or plot"
    assert not (tmp_path / "out" / "m_mIoU_all_per_step.png").exists()


def test_a_seed_run_twice_counts_once(tmp_path: Path, caplog) -> None:
    """A sweep started again without --resume runs every trial anew beside the old ones: one per seed is shown."""
    sweep = tmp_path / "sweeps" / "m"
    _trial_run(sweep / "runs" / "first", "eir", 2)  # stopped after step 1 in the first invocation
    _trial_run(sweep / "runs" / "second", "eir", 0)
    (sweep / "runs" / "second" / "results.json").write_text(
        (sweep / "runs" / "second" / "results.json").read_text().replace('"seed": 0', '"seed": 2')
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (sweep / "mlflow_sweep.json").write_text(json.dumps({"parent": "0" * 32, "tracking_uri": uri}))
    with caplog.at_level(logging.WARNING, logger="eir.method_table"):
        write_report([str(sweep)], str(tmp_path / "out"))
    assert "two trials of eir seed 2" in caplog.text
    text = (tmp_path / "out" / "report.md").read_text()
    final = _expected([FAKE[("eir", 0)][-1][0]])  # the finished one of the two
    assert f"| eir | 1 (1) | {_expected([FAKE[('eir', 0)][0][0]])} | {final} |" in text
