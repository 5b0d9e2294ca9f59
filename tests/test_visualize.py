"""The per-step figure's curves: seeds averaged with their spread, legend ordered like the results table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eir.visualize import step_curves, steps_figure


def _run(method: str, seed: int, curve: list[float], task: str = "5-3") -> dict:
    return {"dataset": "camvid", "task": task, "method": method, "seed": seed,
            "steps": [{"step": i, "mIoU_all": v} for i, v in enumerate(curve)]}


RUNS = [_run("finetune", 0, [60.0, 10.0, 2.0]), _run("eir", 0, [60.0, 40.0, 28.0]), _run("eir", 1, [62.0, 44.0, 32.0]),
        _run("eir", 2, [61.0, 42.0]),  # stopped before its last step: the mean covers the steps all seeds reached
        _run("joint", 0, [40.0]), _run("eir", 0, [50.0, 49.0], task="6-1")]


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
