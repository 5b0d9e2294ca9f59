"""`launch.py report`: Markdown tables and plots from run dirs, sweep dirs, or folders of them.

A setting that ran with several seeds is shown as mean ± std. Plots: the standard continual
segmentation figure (mIoU after each step, one line per method) and, for a sweep, the sweep's
metric against each swept knob. When the input is a sweep with an MLflow parent run, the same
files are attached to it.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from eir import storage
from eir.visualize import knob_figure, steps_figure

log = logging.getLogger(__name__)
METRICS = ("mIoU_all", "mIoU_old", "mIoU_new", "hIoU")


def collect(paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runs, sweeps): every finished results.json under the paths, and every sweep summary."""
    runs, sweeps = [], []
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise FileNotFoundError(f"report: {given} does not exist")
        for results in sorted(root.rglob("results.json")) if root.is_dir() else [root]:
            document = json.loads(results.read_text())
            if document.get("status") == "finished" and document.get("steps"):
                document["path"] = str(results.parent)
                runs.append(document)
        for summary in sorted(root.rglob("summary.json")) if root.is_dir() else []:
            sweep = json.loads(summary.read_text())
            sweep["path"] = str(summary.parent)
            sweeps.append(sweep)
    if not runs:
        raise FileNotFoundError(f"report: no finished results.json under {', '.join(paths)}")
    return runs, sweeps


def _params_of(run: dict[str, Any], sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    """The swept params of a trial's run ({} for a plain run).

    Matched by where the trial's run dir lies in its sweep dir now (`runs/<trial id>`), not by the
    summary's absolute `run_dir`: that names the directory the sweep ran in, which a copied or
    downloaded sweep no longer has.
    """
    for sweep in sweeps:
        for trial in sweep["trials"]:
            if (Path(sweep["path"]) / "runs" / trial["trial_id"]).resolve() == Path(run["path"]).resolve():
                return trial["params"]
    return {}


def label_runs(runs: list[dict[str, Any]], sweeps: list[dict[str, Any]]) -> None:
    """Give each run its swept `params`, their text as `setting` ("–" for a plain run) and a `label`
    (method, plus the setting of a sweep trial), so trials of one method stay apart in tables and
    figures while seeds of one setting group."""
    for run in runs:
        run["params"] = _params_of(run, sweeps)
        knobs = ", ".join(f"{k}={v}" for k, v in sorted(run["params"].items()))
        run["setting"] = knobs or "–"
        run["label"] = f"{run['method']} ({knobs})" if knobs else run["method"]


def _fmt(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    if len(present) == 1:
        return f"{present[0]:.2f}"
    return f"{np.mean(present):.2f} ± {np.std(present, ddof=1):.2f}"


def _in_order(params: dict[str, Any]) -> tuple:
    """Sort key for swept params: numbers by value (25 before 100), anything else by text."""
    return tuple((k, (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))) for k, v in sorted(params.items()))


def tables(runs: list[dict[str, Any]], sweeps: list[dict[str, Any]]) -> str:
    """Markdown: final-step and per-step scores per setting (runs of `label_runs`)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["dataset"], run["task"], run["task_setting"], run["method"], run["setting"])].append(run)
    lines = ["## Final step", "", "| dataset | task | method | setting | seeds | mIoU all | mIoU old | mIoU new | hIoU |",
             "|---|---|---|---|---|---|---|---|---|"]
    ordered = sorted(groups.items(), key=lambda group: (group[0][:4], _in_order(group[1][0]["params"])))
    for (dataset, task, setting, method, label), items in ordered:
        cells = [_fmt([r["steps"][-1][m] for r in items]) for m in METRICS]
        lines.append(f"| {dataset} | {task} ({setting}) | {method} | {label} | {len(items)} | " + " | ".join(cells) + " |")
    lines += ["", "## Per step (mIoU all / old / new / hIoU)", ""]
    for (dataset, task, setting, method, label), items in ordered:
        lines.append(f"**{dataset} {task} {method}{'' if label == '–' else ' ' + label}** ({len(items)} run(s))")
        lines.append("")
        lines.append("| step | mIoU all | mIoU old | mIoU new | hIoU |")
        lines.append("|---|---|---|---|---|")
        for step in range(min(len(r["steps"]) for r in items)):
            cells = [_fmt([r["steps"][step][m] for r in items]) for m in METRICS]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    for sweep in sweeps:
        lines += [f"## Sweep {sweep['sweep']}", "",
                  f"{len(sweep['trials'])} trials, {len(sweep['failed'])} failed; step 0 trained "
                  f"{sweep['step0_trained']}×, reused {sweep['step0_reused']}×; best: "
                  f"{sweep['best']['params'] if sweep.get('best') else '–'}", ""]
    return "\n".join(lines) + "\n"


def write_report(paths: list[str], out: str) -> list[str]:
    runs, sweeps = collect(paths)
    label_runs(runs, sweeps)
    os.makedirs(out, exist_ok=True)
    written = []
    markdown = os.path.join(out, "report.md")
    storage.write_bytes_atomic(storage.resolve(markdown), tables(runs, sweeps).encode())
    written.append(markdown)
    steps_png = os.path.join(out, "miou_per_step.png")
    steps_figure(runs, steps_png)
    written.append(steps_png)
    for sweep in sweeps:
        points = [(t["params"], t["metric"]) for t in sweep["trials"] if t["metric"] is not None]
        for knob in sorted({k for params, _ in points for k in params}):
            path = os.path.join(out, f"{sweep['sweep']}_{sweep['metric']}_vs_{knob}.png")
            knob_figure([(p.get(knob), m) for p, m in points], knob, sweep["metric"], path)
            written.append(path)
        _attach_to_mlflow(sweep, written)
    return written


def _attach_to_mlflow(sweep: dict[str, Any], files: list[str]) -> None:
    ids = Path(sweep["path"]) / "mlflow_sweep.json"
    if not ids.is_file():
        return
    from eir.tracking import Tracker

    output_root = storage.resolve(Path(sweep["path"]).parents[1])
    tracker = Tracker(output_root, f"eir-sweep-{sweep['sweep']}")
    parent = json.loads(ids.read_text())["parent"]
    for path in files:
        tracker.artifact(parent, path, "report")
