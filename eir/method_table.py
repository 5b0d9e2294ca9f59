"""The method table of a sweep over methods and seeds: what a continual-segmentation paper's main table shows.

One row per method; columns: step 0's mIoU (the base model, shared by the methods of one loss family),
the final step's mIoU all / old / new and hIoU, mIoU all averaged over the steps, and the trial's wall
time. Each cell is the mean ± sample std over the seeds that have the value, with their count n: such a
sweep is filled over days (`launch.py sweep --resume`), so step 0 counts every trial past step 0 and
the other columns count finished trials only, and a partly finished sweep renders what is finished.

Pure: documents in, a JSON-able table and its Markdown and CSV out (`eir.report` reads and writes).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eir.methods import METHODS

log = logging.getLogger(__name__)
# A trial of a method table differs from the others of its sweep in these swept keys only.
SWEPT = frozenset({"method.name", "seed"})
# The bounds frame the table: finetune first, joint last, the other methods between them by name.
FIRST, LAST = "finetune", "joint"


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    value: Callable[[dict[str, Any]], float | None]  # a trial's value, None where it has none (yet)


def _finished(run: dict[str, Any]) -> bool:
    return run["status"] == "finished"


def _joint(run: dict[str, Any]) -> bool:
    """A joint run trains every class in its one step: it has no step 0 of base classes, nor steps to average."""
    method = METHODS.get(run["method"])
    return method is not None and method.joint


def _step0(run: dict[str, Any]) -> float | None:
    return None if _joint(run) or not run["steps"] else run["steps"][0]["mIoU_all"]


def _final(metric: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda run: run["steps"][-1][metric] if _finished(run) else None


def _over_steps(run: dict[str, Any]) -> float | None:
    return run.get("mean_mIoU_all_over_steps") if _finished(run) and not _joint(run) else None


def _wall_min(run: dict[str, Any]) -> float | None:
    return run["wall_s"] / 60 if _finished(run) and run.get("wall_s") is not None else None


COLUMNS = (
    Column("step0_mIoU_all", "step 0 mIoU all", _step0),
    Column("final_mIoU_all", "final mIoU all", _final("mIoU_all")),
    Column("final_mIoU_old", "final mIoU old", _final("mIoU_old")),
    Column("final_mIoU_new", "final mIoU new", _final("mIoU_new")),
    Column("final_hIoU", "final hIoU", _final("hIoU")),
    Column("mean_mIoU_all_over_steps", "mIoU all, mean over steps", _over_steps),
    # Tune's time_total_s: it holds step 0 only for the trial that trained its family's step 0 (the others took it
    # from the cache), so the header says so and the cell is read as "what this trial cost", not a method's speed.
    Column("wall_min", "trial wall (min, with step 0 where trained)", _wall_min),
)


def spread(values: Sequence[float | None]) -> tuple[float, float | None, int] | None:
    """Mean, sample std (ddof 1; None for one value) and count of the values present; None when none is.

    Every table of the project shows seeds this way: the sample std, because the seeds are a sample.
    """
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return float(np.mean(present)), std, len(present)


def is_method_sweep(trials: list[dict[str, Any]]) -> bool:
    """Whether a sweep's trials (runs with their swept `params`) differ by method and seed only, method included."""
    keys = [set(run["params"]) for run in trials]
    return bool(trials) and all(k <= SWEPT for k in keys) and any("method.name" in k for k in keys)


def _one_per_seed(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One trial per (method, seed): a sweep started again without --resume runs each trial anew beside
    the old ones, and the same seed counted twice would narrow the spread. The most advanced is kept."""
    kept: dict[tuple[str, Any], dict[str, Any]] = {}
    for run in trials:
        key = (run["method"], run.get("seed"))
        if key in kept:
            log.warning(
                "method table: two trials of %s seed %s (%s, %s): the more advanced one is shown",
                *key,
                kept[key]["path"],
                run["path"],
            )
        if key not in kept or (_finished(run), len(run["steps"])) > (_finished(kept[key]), len(kept[key]["steps"])):
            kept[key] = run
    return list(kept.values())


def _order(method: str) -> tuple[int, str]:
    return (0 if method == FIRST else 2 if method == LAST else 1, method)


def method_table(sweep: str, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The table of one method sweep from its trials' results.json documents (any status)."""
    trials = _one_per_seed(trials)
    rows = []
    for method in sorted({run["method"] for run in trials}, key=_order):
        runs = sorted((r for r in trials if r["method"] == method), key=lambda r: str(r.get("seed")))
        cells = {}
        for column in COLUMNS:
            present = [(run.get("seed"), column.value(run)) for run in runs]
            present = [(seed, value) for seed, value in present if value is not None]
            stats = spread([value for _, value in present])
            cells[column.key] = (
                None
                if stats is None
                else {
                    "mean": round(stats[0], 4),
                    "std": None if stats[1] is None else round(stats[1], 4),
                    "n": stats[2],
                    "seeds": [seed for seed, _ in present],
                }
            )
        rows.append({"method": method, "trials": len(runs), "finished": sum(map(_finished, runs)), "cells": cells})
    first = trials[0]
    return {
        "sweep": sweep,
        "dataset": first["dataset"],
        "task": first["task"],
        "task_setting": first["task_setting"],
        "columns": {column.key: column.title for column in COLUMNS},
        "rows": rows,
        "unfinished": [
            {"method": r["method"], "seed": r.get("seed"), "status": r["status"], "steps_done": len(r["steps"])}
            for r in sorted(trials, key=lambda r: (_order(r["method"]), str(r.get("seed"))))
            if not _finished(r)
        ],
    }


def _cell_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "–"
    spread_text = "" if cell["std"] is None else f" ± {cell['std']:.2f}"
    return f"{cell['mean']:.2f}{spread_text} (n={cell['n']})"


def markdown(table: dict[str, Any]) -> str:
    """The table as a Markdown section: a line on how cells are counted, the table, the unfinished trials."""
    finished = sum(row["finished"] for row in table["rows"])
    started = sum(row["trials"] for row in table["rows"])
    unfinished = "; ".join(
        f"{u['method']} seed {u['seed']} ({u['status']}, {u['steps_done']} step(s) done)" for u in table["unfinished"]
    )
    lines = [
        f"## Methods: sweep {table['sweep']} ({table['dataset']} {table['task']}, {table['task_setting']})",
        "",
        (
            f"Mean ± sample std over seeds, n = seeds in the cell: step 0 from every trial past step 0, the other "
            f"columns from finished trials ({finished} of {started} trials started"
            f"{'' if not unfinished else '; not finished: ' + unfinished})."
        ),
        "",
        "| method | trials (finished) | " + " | ".join(table["columns"].values()) + " |",
        "|---|---|" + "---|" * len(table["columns"]),
    ]
    for row in table["rows"]:
        cells = [_cell_text(row["cells"][key]) for key in table["columns"]]
        lines.append(f"| {row['method']} | {row['trials']} ({row['finished']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(table: dict[str, Any]) -> str:
    """One line per method: its trial counts, then mean, std and n of every column (empty where none)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    parts = [f"{key}_{part}" for key in table["columns"] for part in ("mean", "std", "n")]
    writer.writerow(["method", "trials", "finished", *parts])
    for row in table["rows"]:
        values = []
        for key in table["columns"]:
            cell = row["cells"][key] or {}
            values += [cell.get("mean", ""), "" if cell.get("std") is None else cell["std"], cell.get("n", 0)]
        writer.writerow([row["method"], row["trials"], row["finished"], *values])
    return buffer.getvalue()
