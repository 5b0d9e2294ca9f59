"""What a run reports: the results.json document, its per-step rows, and the console tables."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

from eir.channels import ChannelSpace
from eir.config import ExperimentConfig
from eir.metrics import StepScores, mean_over_steps
from eir.train.planner import RunFacts

# The scores of a row that MLflow records as metrics (the others are lists, names or counts).
SCORE_KEYS = ("mIoU_all", "mIoU_old", "mIoU_new", "hIoU", "mIoU_all_fg", "mIoU_old_fg")


def _git(checkout: Path, *args: str) -> str | None:
    """git's stdout for `args` run in `checkout`; None when git is missing, fails or this is not a checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@functools.cache
def git_sha() -> str:
    """The commit of the code this process imported (read once: a later commit does not change it)."""
    return (_git(Path(__file__).parent, "rev-parse", "HEAD") or "").strip() or "unknown"


def git_dirty() -> bool | None:
    """Whether the package or `launch.py` differ from the commit `git_sha` names (None: not a git checkout).

    A benchmark run from an edited tree would otherwise carry the SHA of code it did not run.
    """
    package = Path(__file__).resolve().parents[1]
    return paths_modified(package.parent, [package.name, "launch.py"])


def paths_modified(checkout: Path, paths: list[str]) -> bool | None:
    """Whether `paths` (relative to `checkout`) hold changes git has not committed; None outside a git checkout."""
    status = _git(checkout, "status", "--porcelain", "--", *paths)
    return None if status is None else bool(status.strip())


def step_row(
    step: int,
    scores: StepScores,
    *,
    class_names: tuple[str, ...],
    channels: ChannelSpace,
    seen_classes: tuple[int, ...],
    train_images: int,
    source: str,
) -> dict[str, Any]:
    """The results.json entry of one step (IoU in percent; new/hIoU None at step 0)."""
    per_class = {class_names[channels.class_of_channel[ch]]: _clean(v) for ch, v in scores.per_class_iou.items()}
    return {
        "step": step,
        "seen_classes": list(seen_classes),
        **{key: _clean(getattr(scores, key)) for key in SCORE_KEYS},
        "per_class_IoU": per_class,
        "train_images": train_images,
        "source": source,
    }


def numeric_scores(row: dict[str, Any]) -> dict[str, float]:
    """A row's scores that have a value (MLflow takes numbers only)."""
    return {key: row[key] for key in SCORE_KEYS if row.get(key) is not None}


def _clean(value: float | None) -> float | None:
    return None if value is None or value != value else round(float(value), 4)


def results_document(
    config: ExperimentConfig, rows: list[dict[str, Any]], status: str, checksums: dict[str, str]
) -> dict[str, Any]:
    """The results.json document; `checksums` names the data splits the numbers come from."""
    alls = [r["mIoU_all"] for r in rows if r["mIoU_all"] is not None]
    return {
        "status": status,
        "method": config.method.name,
        "dataset": config.dataset.name,
        "task": config.task.name,
        "task_setting": config.task.setting,
        "seed": config.seed,
        "eval_protocol": config.eval.protocol,
        "git_sha": git_sha(),
        "run_name": config.run.name,
        **checksums,
        "mean_mIoU_all_over_steps": round(mean_over_steps(alls), 4) if alls else None,
        "steps": rows,
    }


def step_table(facts: RunFacts, class_names: tuple[str, ...]) -> str:
    """One line per schedule step: its training and test images and the classes it learns."""
    layout = facts.layout
    lines = [f"{'step':>4}  {'train imgs':>10}  {'test imgs':>9}  classes"]
    for step in range(layout.schedule.num_steps):
        classes = layout.schedule.classes_learned(step)
        more = f", … (+{len(classes) - 8})" if len(classes) > 8 else ""
        shown = ", ".join(class_names[c] for c in classes[:8]) + more
        test_count = facts.test_rows[layout.eval_step(step)]
        lines.append(f"{step:>4}  {facts.train_rows[step]:>10}  {test_count:>9}  {shown}")
    return "\n".join(lines)


def scores_table(rows: list[dict[str, Any]]) -> str:
    """The scores of every step so far, one line each (printed after every step)."""
    lines = [f"{'step':>4}  {'all':>6}  {'old':>6}  {'new':>6}  {'hIoU':>6}  source"]
    for row in rows:
        lines.append(
            f"{row['step']:>4}  {_shown(row['mIoU_all'])}  {_shown(row['mIoU_old'])}  {_shown(row['mIoU_new'])}  "
            f"{_shown(row['hIoU'])}  {row.get('source', 'trained')}"
        )
    return "\n".join(lines)


def _shown(value: float | None) -> str:
    return "   –  " if value is None else f"{value:6.2f}"
