"""`launch.py report` on hand-written run and sweep dirs: no training needed to check the tables."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from eir.report import write_report


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


def _sweep(folder: Path, ran_in: str, sizes: dict[str, int]) -> None:
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
