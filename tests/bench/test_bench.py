"""The benchmark command's contract: its names, its options, and the accuracy table it prints."""

from __future__ import annotations

from pathlib import Path

import pytest

import launch
from eir.bench import BENCHMARKS
from eir.bench.accuracy import accuracy_table, run_accuracy
from eir.visualize import hbar_figure


def test_every_benchmark_of_the_issue_is_a_command() -> None:
    assert set(BENCHMARKS) == {"pipeline", "iteration", "memory_store", "sweep_cache", "scaling", "accuracy_camvid", "accuracy_synthetic"}


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
    return {"dataset": "camvid", "task": "5-3", "method": method, "seed": seed,
            "final": {"mIoU_all": final, "mIoU_old": final, "mIoU_new": None, "hIoU": None}}


def test_accuracy_table_gives_mean_and_sample_std_over_seeds() -> None:
    table = accuracy_table([_run("eir", 0, 40.0), _run("eir", 1, 44.0), _run("finetune", 0, 2.5)])
    assert "| camvid 5-3 | eir | 2 | 42.00 ± 2.83 | 42.00 ± 2.83 | – | – |" in table
    assert "| camvid 5-3 | finetune | 1 | 2.50 | 2.50 | – | – |" in table


def test_hbar_figure_writes_a_png(tmp_path: Path) -> None:
    hbar_figure({"a": 1.0, "b": 2.5}, tmp_path / "f.png", xlabel="x", title="t")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
