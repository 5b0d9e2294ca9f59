"""Pictures people would rather look at than read: confusion matrices, prediction grids, curves."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from eir import storage


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> None:
    """Write `fig` at `path` (a local path or a URI) in the format its suffix names (PNG without one), and close it.

    The image is rendered in memory and written with `storage.write_bytes_atomic`, so an
    interrupted write never leaves a truncated image under the final name (reports and
    benchmark plots are read and committed as they are), and `--out`/`--plot` may be URIs.
    """
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=os.path.splitext(str(path))[1].lstrip(".").lower() or "png", dpi=dpi)
        storage.write_bytes_atomic(storage.resolve(path), buffer.getvalue())
    finally:
        plt.close(fig)


def palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), with ignore (255) drawn white."""
    colors = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colors[index] = (r, g, b)
    colors[255] = (255, 255, 255)
    return colors


def colorize(label: np.ndarray) -> np.ndarray:
    return palette()[label.astype(np.uint8)]


def confusion_figure(matrix: np.ndarray, names: Sequence[str], path: str, title: str) -> None:
    """Row-normalised confusion matrix (recall per ground-truth class)."""
    counts = np.asarray(matrix, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(normalised, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def image_grid(rows: Sequence[Sequence[np.ndarray]], headers: Sequence[str], path: str) -> None:
    """A grid of RGB panels: one row per sample, one column per header."""
    n_rows, n_cols = len(rows), len(headers)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.2 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            ax = axes[r][c]
            ax.imshow(panel)
            ax.axis("off")
            if r == 0:
                ax.set_title(headers[c], fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def bar_chart(counts: dict[str, int], path: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * len(counts) + 2), 3.2))
    ax.bar(range(len(counts)), list(counts.values()), color="#4c72b0")
    ax.set_xticks(range(len(counts)), list(counts), rotation=70, fontsize=7)
    ax.set_ylabel("count")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def hbar_figure(values: dict[str, float], path, *, xlabel: str, title: str, colors: list[str] | None = None) -> None:
    """One horizontal bar per labelled value, first on top: the benchmarks' comparison plots."""
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(values) + 1.4))
    ax.barh(range(len(values)), list(values.values()), color=colors or "#4c72b0")
    ax.set_yticks(range(len(values)), list(values), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def step_curves(
    runs: list[dict], task: str, metric: str = "mIoU_all"
) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(legend label, mean curve, sample-std curve or None for one seed) per method of one task.

    Runs of the same task and label (a run's `label`, else its method: several seeds) are averaged
    over the steps all of them reached; ordered by the final value, best first, so the legend reads
    like the results table.
    """
    methods: dict[str, list[list[float]]] = {}
    for run in runs:
        if f"{run['dataset']} {run['task']}" == task:
            methods.setdefault(run.get("label", run["method"]), []).append([s[metric] for s in run["steps"]])
    curves = []
    for method, per_seed in methods.items():
        length = min(len(c) for c in per_seed)
        stacked = np.array([c[:length] for c in per_seed], dtype=float)
        label = method if len(per_seed) == 1 else f"{method} ({len(per_seed)} seeds)"
        curves.append((label, stacked.mean(axis=0), stacked.std(axis=0, ddof=1) if len(per_seed) > 1 else None))
    return sorted(curves, key=lambda curve: -curve[1][-1])


def steps_figure(runs: list[dict], path, metric: str = "mIoU_all") -> None:
    """The standard continual-segmentation figure: a metric after each step, one line per method,
    with a ±1 sample-std band where there are several seeds (the spread a comparison rests on);
    one panel per task."""
    tasks = sorted({f"{r['dataset']} {r['task']}" for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, mean, std in step_curves(runs, task, metric):
            if len(mean) == 1:  # joint: one point, drawn as a line across the final step
                ax.axhline(mean[0], linestyle="--", color="grey", label=label)
                continue
            (line,) = ax.plot(range(len(mean)), mean, marker="o", label=label)
            if std is not None:
                ax.fill_between(range(len(mean)), mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_title(task)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def knob_figure(points: list[tuple], knob: str, metric: str, path) -> None:
    """A sweep's metric against one knob (categorical knobs get evenly spaced ticks)."""
    values = [v for v, _ in points]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    labels = sorted({str(v) for v in values}) if not numeric else None
    xs = values if numeric else [labels.index(str(v)) for v in values]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.scatter(xs, [m for _, m in points], color="#c44e52")
    if labels:
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(knob)
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def pseudo_quality_figure(documents: Sequence[dict], path) -> None:
    """Pseudo-label recall (top), precision (middle) and the share pseudo-labelled as another old class
    (bottom) of each old class after each step (`launch.py pseudo-labels`), one column per run — the same run
    under two pseudo-label rules side by side — with the pixel-weighted value over all old classes in black: a
    falling recall line is forgetting in the making, a rising bottom line is one old class taught as another."""
    fig, axes = plt.subplots(3, len(documents), figsize=(5.2 * len(documents) + 1.6, 9.2), squeeze=False, sharey=True)
    for column, document in enumerate(documents):
        steps = [s["step"] for s in document["steps"]]
        classes = list(dict.fromkeys(name for s in document["steps"] for name in s["per_class"]))
        for row, (key, overall, label) in enumerate(
            (
                ("recall", "recall_old", "old-class pixels recovered (%)"),
                ("precision", "precision_old", "claimed pixels right (%)"),
                ("as_other_old", "as_other_old", "labelled another old class (%)"),
            )
        ):
            ax = axes[row][column]
            for index, name in enumerate(classes):  # a class keeps its colour in every panel, points or not
                points = [
                    (s["step"], s["per_class"][name][key])
                    for s in document["steps"]
                    if s["per_class"].get(name, {}).get(key) is not None
                ]
                if points:
                    ax.plot(*zip(*points), marker="o", linewidth=1, label=name, color=f"C{index % 10}")
            values = [(step, s[overall]) for step, s in zip(steps, document["steps"]) if s[overall] is not None]
            if values:
                ax.plot(*zip(*values), color="black", linewidth=2.5, marker="s", label="all old")
            ax.set_xticks(steps)
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            if column == 0:
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(
                    f"{document['dataset']} {document['task']} {document['method']}\n{document['rule_label']}",
                    fontsize=9,
                )
            if row == len(axes) - 1:
                ax.set_xlabel("step")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.0))
    fig.tight_layout()
    save_figure(fig, path)
