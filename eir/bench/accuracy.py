"""Accuracy benchmarks: every method of a task, run to the end, compared at each step.

Runs go one after the other in one Ray instance; step 0 is trained once per task, seed and loss
family and taken from the step-0 cache by every other method of the family. A run already
recorded in the results file is skipped, and an interrupted run resumes from its run directory,
so the benchmark can span sessions: rerun the same command and it continues. A method added to
`eir.methods` joins the plan by itself; its rows land beside the recorded ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eir import storage
from eir.bench.common import environment, read_results, results_path, write_results
from eir.config import load_config
from eir.method_table import spread
from eir.methods import METHOD_NAMES
from eir.train.experiment import run_experiment
from eir.train.rundir import config_differences, read_run_config
from eir.visualize import steps_figure

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
# The bounds first: every other method is read against them.
BOUNDS = ("finetune", "joint")
EVERY_METHOD = [*BOUNDS, *(name for name in METHOD_NAMES if name not in BOUNDS)]
# The methods run with seeds 1 and 2 as well: the order goals are judged beyond their seed spread.
SEEDED = ("finetune", "image_replay", "eir")


@dataclass(frozen=True)
class Planned:
    config: str  # experiment YAML, relative to the repository
    method: str
    seed: int
    overrides: tuple[str, ...] = ()

    def key(self, task: str) -> tuple[str, str, int]:
        return (task, self.method, self.seed)


def _plan(name: str) -> list[Planned]:
    if name == "accuracy_camvid":
        first = [Planned("experiments/camvid_5-3.yaml", m, 0) for m in EVERY_METHOD]
        second = [Planned("experiments/camvid_6-1.yaml", m, 0) for m in EVERY_METHOD]
        seeds = [Planned("experiments/camvid_5-3.yaml", m, s) for s in (1, 2) for m in SEEDED]
        # The seeds before 6-1: the goal "beyond the seed spread" is read from them.
        return first + seeds + second
    if name == "accuracy_synthetic":
        return [Planned("experiments/synthetic_15-1.yaml", m, 0) for m in ("finetune", "image_replay", "eir", "joint")]
    raise ValueError(f"unknown accuracy benchmark {name!r}")


def run_entry(document: dict[str, Any], wall_s: float | None) -> dict[str, Any]:
    """One run of the results file; `wall_s` is None for a run recorded from an earlier run dir."""
    final = document["steps"][-1]
    return {
        "dataset": document["dataset"],
        "task": document["task"],
        "task_setting": document["task_setting"],
        "method": document["method"],
        "seed": document["seed"],
        "final": {k: final[k] for k in ("mIoU_all", "mIoU_old", "mIoU_new", "hIoU")},
        "mean_mIoU_all_over_steps": document["mean_mIoU_all_over_steps"],
        "steps": document["steps"],
        "run_name": document["run_name"],
        "git_sha": document.get("git_sha"),  # the code that trained it: a method changed later is told apart
        "wall_s": None if wall_s is None else round(wall_s, 1),
    }


def run_accuracy(
    name: str,
    extra_overrides: list[str] | None = None,
    limit: int | None = None,
    methods: list[str] | None = None,
    rerun: bool = False,
) -> dict[str, Any]:
    """Run the benchmark's planned runs in order; `limit` caps how many runs are trained this time and
    `methods` restricts this invocation to some methods (to see the one in question first).

    `rerun` (with `methods`), after a change to those methods: their recorded rows move to the file's
    `superseded` list at once, and their runs are trained again in run dirs of their own
    (`<run name>_v2`, `_v3` after a second rerun). Continue an interrupted rerun without `rerun`.
    """
    unknown = sorted(set(methods or []) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"--methods: unknown method(s) {unknown}; expected some of {', '.join(EVERY_METHOD)}")
    if rerun and not methods:
        raise ValueError("--rerun needs --methods: the methods whose recorded runs are trained again")
    path = results_path(name)
    document = read_results(path) or {"benchmark": name, "runs": []}
    planned_runs = [(p, load_config(REPO / p.config)) for p in _plan(name) if not methods or p.method in methods]
    if rerun and _supersede(document, {planned.key(base.task.name) for planned, base in planned_runs}):
        _publish(name, path, document, extra_overrides)  # before training: a rerun is continued without --rerun
    done = set(map(_key, document["runs"]))
    for planned, base in planned_runs:
        task = base.task.name
        key = planned.key(task)
        if key in done:
            log.info("%s %s seed %d: already in %s, skipped", task, planned.method, planned.seed, path.name)
            continue
        suffix = "" if planned.seed == 0 else f"_seed{planned.seed}"
        version = 1 + sum(_key(row) == key for row in document.get("superseded", []))
        overrides = [
            f"method.name={planned.method}",
            f"seed={planned.seed}",
            f"run.name={base.run.name}_{planned.method}{suffix}{'' if version == 1 else f'_v{version}'}",
            *planned.overrides,
            *(extra_overrides or []),
        ]
        config = load_config(REPO / planned.config, overrides)
        started = time.perf_counter()
        run_dir = storage.resolve(config.run.output_dir).join(config.run.name)
        finished = run_dir.join("results.json")
        recorded = (
            storage.exists(finished)
            and storage.read_json(finished).get("status") == "finished"
            and not config_differences(read_run_config(run_dir), config)
        )
        if recorded:
            result = storage.read_json(finished)  # trained earlier (e.g. by `launch.py run`): record it
            log.info("%s %s seed %d: recorded from %s", task, planned.method, planned.seed, finished.uri)
        else:
            if limit is not None and limit <= 0:
                log.info("benchmark %s: run limit reached; rerun to continue", name)
                break
            limit = None if limit is None else limit - 1
            log.info("benchmark %s: %s %s seed %d", name, task, planned.method, planned.seed)
            # Resume an interrupted run; a first run has no folder, and `resume` refuses a run that does not exist.
            result = run_experiment(config, resume=storage.exists(run_dir.join("config.yaml")))
        document["runs"].append(run_entry(result, None if recorded else time.perf_counter() - started))
        _publish(name, path, document, extra_overrides)
    goals = accuracy_goals(document["runs"])
    if document["runs"] and document.get("goals") != goals:
        _publish(name, path, document, extra_overrides)  # a file written before the goals were summarised
    print(accuracy_table(document["runs"]))
    print(goals_table(goals))
    return document


def _key(row: dict[str, Any]) -> tuple[str, str, int]:
    return (row["task"], row["method"], row["seed"])


def _supersede(document: dict[str, Any], keys: set[tuple[str, str, int]]) -> bool:
    """Move the recorded rows of `keys` to the file's `superseded` list, stamped with the date and the commit
    that superseded them (their own `git_sha` says what trained them); whether any row moved."""
    moved = [row for row in document["runs"] if _key(row) in keys]
    stamp = {key: value for key, value in environment().items() if key in ("date", "git_sha")}
    document["runs"] = [row for row in document["runs"] if _key(row) not in keys]
    document.setdefault("superseded", []).extend({**row, "superseded": stamp} for row in moved)
    return bool(moved)


def _publish(name: str, path: Path, document: dict[str, Any], extra_overrides: list[str] | None) -> None:
    """Write the results file and its figure, the goals recomputed from every run recorded so far."""
    document["goals"] = accuracy_goals(document["runs"])
    document.update(environment())
    document["config"] = {"plan": [p.__dict__ for p in _plan(name)], "overrides": extra_overrides or []}
    write_results(path, document)
    figure = path.with_suffix(".png")
    if document["runs"]:
        steps_figure(document["runs"], figure)
    else:  # every row superseded (`--rerun --limit 0`): a figure would show numbers the file no longer stands behind
        figure.unlink(missing_ok=True)


def _groups(runs: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Runs by ("<dataset> <task>", method): the seeds of one method on one task."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((f"{run['dataset']} {run['task']}", run["method"]), []).append(run)
    return groups


def _final_stats(items: list[dict[str, Any]], key: str) -> tuple[float, float | None, int] | None:
    """Mean, sample std (None for one seed) and seed count of a final-step score, or None when unscored."""
    return spread([r["final"][key] for r in items])


# The order goal: each method above the next on these final-step scores.
ORDER = [("eir", "image_replay"), ("image_replay", "finetune")]
ORDER_SCORES = ("mIoU_all", "hIoU")


def accuracy_goals(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The accuracy goals per task, read from the runs recorded so far.

    `eir_vs_joint` is eir's mean final `mIoU_all` over joint's. An order entry compares the first
    method's mean with the second's (`above`) and says whether the gap is *beyond the seed spread*:
    their mean ± sample-std intervals do not overlap. The goal is `met` when both hold. With fewer
    than two seeds of either method the spread is unknown: `beyond_seed_spread` and `met` are None,
    never a guess.
    """
    groups = _groups(runs)
    goals: dict[str, dict[str, Any]] = {}
    for task in sorted({task for task, _ in groups}):
        entry: dict[str, Any] = {}
        eir, joint = (_final_stats(groups.get((task, m), []), "mIoU_all") for m in ("eir", "joint"))
        if eir and joint and joint[0] > 0:
            entry["eir_vs_joint"] = round(eir[0] / joint[0], 3)
        for upper, lower in ORDER:
            for score in ORDER_SCORES:
                a, b = (_final_stats(groups.get((task, m), []), score) for m in (upper, lower))
                if a is None or b is None:
                    continue
                above = a[0] > b[0]
                beyond = abs(a[0] - b[0]) > a[1] + b[1] if a[1] is not None and b[1] is not None else None
                entry[f"{upper}_above_{lower}_{score}"] = {
                    "means": [round(a[0], 2), round(b[0], 2)],
                    "stds": [None if std is None else round(std, 2) for std in (a[1], b[1])],
                    "seeds": [a[2], b[2]],
                    "above": above,
                    "beyond_seed_spread": beyond,
                    "met": None if beyond is None else above and beyond,
                }
        goals[task] = entry
    return goals


_SPREAD_WORDS = {True: "beyond the seed spread", False: "within the seed spread", None: "seed spread unknown"}


def goals_table(goals: dict[str, dict[str, Any]]) -> str:
    """The goals as lines a person reads after the scores table."""
    lines = []
    for task, entry in goals.items():
        if "eir_vs_joint" in entry:
            lines.append(f"{task}: eir / joint mIoU_all = {entry['eir_vs_joint']:.3f}")
        for name, check in entry.items():
            if name == "eir_vs_joint":
                continue
            verdict = ("above" if check["above"] else "NOT above") + ", " + _SPREAD_WORDS[check["beyond_seed_spread"]]
            lines.append(f"{task}: {name}: {check['means'][0]:.2f} vs {check['means'][1]:.2f} ({verdict})")
    return "\n".join(lines)


def accuracy_table(runs: list[dict[str, Any]]) -> str:
    """Final-step scores per task and method (mean ± std over seeds)."""
    groups = _groups(runs)
    lines = ["| task | method | seeds | mIoU all | mIoU old | mIoU new | hIoU |", "|---|---|---|---|---|---|---|"]
    for (task, method), items in sorted(groups.items()):
        cells = []
        for key in ("mIoU_all", "mIoU_old", "mIoU_new", "hIoU"):
            stats = _final_stats(items, key)
            if stats is None:
                cells.append("–")
            elif stats[1] is None:
                cells.append(f"{stats[0]:.2f}")
            else:
                cells.append(f"{stats[0]:.2f} ± {stats[1]:.2f}")
        lines.append(f"| {task} | {method} | {len(items)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
