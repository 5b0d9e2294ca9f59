"""The per-step figure's curves (seeds averaged with their spread, legend ordered like the results
table), and figures written atomically through one helper."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from eir.visualize import plt, step_curves, steps_figure


def _run(method: str, seed: int, curve: list[float], task: str = "5-3") -> dict:
    return {
        "dataset": "camvid",
        "task": task,
        "method": method,
        "seed": seed,
        "steps": [{"step": i, "mIoU_all": v} for i, v in enumerate(curve)],
    }


RUNS = [
    _run("finetune", 0, [60.0, 10.0, 2.0]),
    _run("eir", 0, [60.0, 40.0, 28.0]),
    _run("eir", 1, [62.0, 44.0, 32.0]),
    _run("eir", 2, [61.0, 42.0]),  # stopped before its last step: the mean covers the steps all seeds reached
    _run("joint", 0, [40.0]),
    _run("eir", 0, [50.0, 49.0], task="6-1"),
]


def test_step_curves_average_seeds_with_their_sample_std_best_first() -> None:
    curves = step_curves(RUNS, "camvid 5-3")
    assert [label for label, _, _ in curves] == ["eir (3 seeds)", "joint", "finetune"]
    _, mean, std = curves[0]
    np.testing.assert_allclose(mean, [61.0, 42.0])
    np.testing.assert_allclose(std, [1.0, 2.0])
    assert curves[2][2] is None  # one seed: no band drawn


def test_steps_figure_writes_one_png_for_every_task(tmp_path: Path) -> None:
    steps_figure(RUNS, tmp_path / "steps.png")
    assert (tmp_path / "steps.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failed_figure_write_leaves_the_old_file_and_no_partial_one(tmp_path: Path, monkeypatch) -> None:
    """A crash between writing and publishing a PNG (here: the rename fails) must leave the
    previous good file untouched, no new file under the final name and no temp file behind."""
    good = tmp_path / "steps.png"
    steps_figure(RUNS, good)
    before = good.read_bytes()

    def refuse(src: str, dst: str) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", refuse)
    for path in (good, tmp_path / "new.png"):
        with pytest.raises(OSError, match="disk went away"):
            steps_figure(RUNS, path)
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.png"]
    assert plt.get_fignums() == []  # closed even when the write failed


def test_figures_accept_a_uri(tmp_path: Path) -> None:
    steps_figure(RUNS, f"file://{tmp_path}/plots/steps.png")
    assert (tmp_path / "plots" / "steps.png").read_bytes()[:4] == b"\x89PNG"


def test_every_figure_in_eir_is_saved_through_save_figure() -> None:
    """`fig.savefig(path)` anywhere else would write straight to the final name again."""
    package = Path(__file__).resolve().parents[1] / "eir"
    callers = [str(p.relative_to(package)) for p in package.rglob("*.py") if ".savefig(" in p.read_text()]
    assert callers == ["visualize.py"]
    assert Path(package / "visualize.py").read_text().count(".savefig(") == 1
