"""`launch.py report`: Markdown tables and plots from run dirs, sweep dirs, or folders of them.

A setting that ran with several seeds is shown as mean ± std. Plots: the standard continual
segmentation figure (mIoU after each step, one line per method) and, for a sweep, the sweep's
metric against each swept knob. A sweep whose trials differ by method and seed only also gets its
method table (`eir.method_table`: Markdown in report.md, CSV and JSON beside it, and its per-step
plot), rendered from whatever its trials have finished so far. When the input is a sweep with an
MLflow parent run, the same files are attached to it, at the tracking URI the sweep recorded in
`mlflow_sweep.json`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from eir import method_table, storage
from eir.config import ConfigError
from eir.tracking import check_reachable, set_mlflow_defaults, tracking_uri
from eir.visualize import knob_figure, steps_figure

log = logging.getLogger(__name__)
METRICS = ("mIoU_all", "mIoU_old", "mIoU_new", "hIoU")
RUN_KEYS = ("dataset", "task", "task_setting", "method", "steps")
SWEEP_KEYS = ("sweep", "metric", "trials", "failed", "step0_trained", "step0_reused")
TRIAL_KEYS = ("trial_id", "params", "metric")


class ReportError(ConfigError):
    """An input of `report` that cannot be used: a missing folder, no finished run, a damaged file.

    A ConfigError (a bad argument), so the command line reports it as one line without importing
    this module (and matplotlib) to name it.
    """


def _read_object(path: Path, advice: str) -> dict[str, Any]:
    """A JSON object from `path`; anything else is a ReportError naming the file."""
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path} is damaged (not JSON: {exc}); {advice}") from exc
    if not isinstance(document, dict):
        raise ReportError(f"{path} is damaged (expected a JSON object, got {type(document).__name__}); {advice}")
    return document


def _missing(document: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if key not in document]


def _read_run(path: Path) -> dict[str, Any]:
    """A results.json, checked for what the tables read: its steps and their scores (a finished run's for
    every table, an unfinished one's for the cells of a method table it has reached)."""
    advice = "restore it, or move its run folder out of the folders given to report"
    document = _read_object(path, advice)
    finished = document.get("status") == "finished"
    missing = _missing(document, RUN_KEYS)
    steps = document.get("steps")
    if not missing and (
        not isinstance(steps, list) or (finished and not steps) or not all(isinstance(step, dict) for step in steps)
    ):
        missing = ["steps (a list of per-step scores)"]
    if not missing:
        missing = sorted({key for step in steps for key in _missing(step, METRICS)})
    if not missing and not all(_is_score(step[key]) for step in steps for key in METRICS):
        missing = ["numeric scores"]
    if missing:
        state = document.get("status") or "unfinished"
        raise ReportError(f"{path} is damaged (a {state} run without {', '.join(missing)}); {advice}")
    return document


def _is_score(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _read_sweep(path: Path) -> dict[str, Any]:
    """A sweep's summary.json, checked for what the tables and knob plots read."""
    advice = (
        "restore it (launch.py sweep --resume rewrites it), or move its sweep folder out of the folders given to report"
    )
    sweep = _read_object(path, advice)
    missing = _missing(sweep, SWEEP_KEYS)
    if not missing and not (isinstance(sweep["trials"], list) and all(isinstance(t, dict) for t in sweep["trials"])):
        missing = ["trials (a list of trials)"]
    if not missing:
        missing = sorted({f"trials[].{key}" for trial in sweep["trials"] for key in _missing(trial, TRIAL_KEYS)})
    if not missing and not all(isinstance(t["params"], dict) and _is_score(t["metric"]) for t in sweep["trials"]):
        missing = ["trials with params (a mapping) and a numeric metric"]
    if missing:
        raise ReportError(f"{path} is damaged (a sweep summary without {', '.join(missing)}); {advice}")
    return sweep


def collect(paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runs, sweeps): every results.json under the paths, finished or not (a sweep's unfinished
    trials fill the method-table cells they have reached), and every sweep summary.

    A damaged results.json or summary.json stops the report with its name, rather than being
    skipped: a table that silently lost one seed or one trial shows wrong means with nothing to
    say so.
    """
    runs, sweeps = [], []
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise ReportError(
                f"{given} does not exist (expected a run directory, a sweep directory, or a folder holding them)"
            )
        for results in sorted(root.rglob("results.json")) if root.is_dir() else [root]:
            document = _read_run(results)
            document["path"] = str(results.parent)
            runs.append(document)
        for summary in sorted(root.rglob("summary.json")) if root.is_dir() else []:
            sweep = _read_sweep(summary)
            sweep["path"] = str(summary.parent)
            sweeps.append(sweep)
    return runs, sweeps


def _finished(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [run for run in runs if run.get("status") == "finished"]


def sweep_folder(run: dict[str, Any]) -> Path | None:
    """The sweep folder a run is a trial of (`<sweep>/runs/<trial id>` beside the sweep's summary.json, or
    its mlflow_sweep.json while the sweep has not ended yet); None for a plain run."""
    folder = Path(run["path"]).parent.parent
    if Path(run["path"]).parent.name != "runs":
        return None
    return folder if (folder / "summary.json").is_file() or (folder / "mlflow_sweep.json").is_file() else None


def _trial_of(run: dict[str, Any], sweeps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A trial's entry in its sweep's summary (None for a plain run, or a trial the summary does not list yet).

    Matched by where the trial's run dir lies in its sweep dir now (`runs/<trial id>`), not by the
    summary's absolute `run_dir`: that names the directory the sweep ran in, which a copied or
    downloaded sweep no longer has.
    """
    for sweep in sweeps:
        for trial in sweep["trials"]:
            if (Path(sweep["path"]) / "runs" / trial["trial_id"]).resolve() == Path(run["path"]).resolve():
                return trial
    return None


def _label_params(label: str) -> dict[str, Any]:
    """The swept values in a trial's run name (`memory.size=25,seed=1`: a sweep names each trial's run by
    them), for a trial its sweep's summary does not list yet: the sweep was stopped, or is still running."""
    params: dict[str, Any] = {}
    for part in label.split(","):
        key, _, text = part.partition("=")
        try:
            params[key] = json.loads(text)
        except json.JSONDecodeError:
            params[key] = text
    return params


def label_runs(runs: list[dict[str, Any]], sweeps: list[dict[str, Any]]) -> None:
    """Give each run its swept `params`, their text as `setting` ("–" for a plain run) and a `label`
    (method, plus the setting of a sweep trial), so trials of one method stay apart in tables and
    figures while seeds of one setting group (neither the method nor the seed is part of a setting);
    a trial its sweep's summary lists also gets the trial's `wall_s`."""
    for run in runs:
        trial = _trial_of(run, sweeps)
        if trial is not None:
            run["params"], run["wall_s"] = trial["params"], trial.get("time_total_s")
        else:
            run["params"] = _label_params(run["run_name"]) if sweep_folder(run) and run.get("run_name") else {}
        knobs = ", ".join(f"{k}={v}" for k, v in sorted(run["params"].items()) if k not in method_table.SWEPT)
        run["setting"] = knobs or "–"
        run["label"] = f"{run['method']} ({knobs})" if knobs else run["method"]


def _fmt(values: list[float | None]) -> str:
    stats = method_table.spread(values)
    if stats is None:
        return "–"
    mean, std, _ = stats
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _in_order(params: dict[str, Any]) -> tuple:
    """Sort key for swept params: numbers by value (25 before 100), anything else by text."""
    return tuple(
        (k, (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))) for k, v in sorted(params.items())
    )


def tables(runs: list[dict[str, Any]], sweeps: list[dict[str, Any]]) -> str:
    """Markdown: final-step and per-step scores per setting (runs of `label_runs`)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["dataset"], run["task"], run["task_setting"], run["method"], run["setting"])].append(run)
    lines = [
        "## Final step",
        "",
        "| dataset | task | method | setting | seeds | mIoU all | mIoU old | mIoU new | hIoU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(groups.items(), key=lambda group: (group[0][:4], _in_order(group[1][0]["params"])))
    for (dataset, task, setting, method, label), items in ordered:
        cells = [_fmt([r["steps"][-1][m] for r in items]) for m in METRICS]
        lines.append(
            f"| {dataset} | {task} ({setting}) | {method} | {label} | {len(items)} | " + " | ".join(cells) + " |"
        )
    lines += ["", "## Per step (mIoU all / old / new / hIoU)", ""]
    for (dataset, task, _setting, method, label), items in ordered:
        lines.append(f"**{dataset} {task} {method}{'' if label == '–' else ' ' + label}** ({len(items)} run(s))")
        lines.append("")
        lines.append("| step | mIoU all | mIoU old | mIoU new | hIoU |")
        lines.append("|---|---|---|---|---|")
        for step in range(min(len(r["steps"]) for r in items)):
            cells = [_fmt([r["steps"][step][m] for r in items]) for m in METRICS]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    for sweep in sweeps:
        lines += [
            f"## Sweep {sweep['sweep']}",
            "",
            (
                f"{len(sweep['trials'])} trials, {len(sweep['failed'])} failed; step 0 trained "
                f"{sweep['step0_trained']}×, reused {sweep['step0_reused']}×; best: "
                f"{sweep['best']['params'] if sweep.get('best') else '–'}"
            ),
            "",
        ]
        # Grid points no trial ran (a summary written before `missing` existed has none to show).
        lines += [f"- not run: `{json.dumps(params, sort_keys=True)}`" for params in sweep.get("missing", [])]
        lines += [""] if sweep.get("missing") else []
    return "\n".join(lines) + "\n"


def write_report(paths: list[str], out: str) -> list[str]:
    documents, sweeps = collect(paths)
    label_runs(documents, sweeps)
    runs = _finished(documents)
    names = {Path(s["path"]).resolve(): s["sweep"] for s in sweeps}  # sweep folder -> the sweep's name
    methods = _method_tables(documents, names)
    if not runs and not methods:
        raise ReportError(f"no finished run under {', '.join(paths)} (no results.json with status 'finished')")
    os.makedirs(out, exist_ok=True)
    written = []
    markdown = os.path.join(out, "report.md")
    text = (tables(runs, sweeps) if runs else "") + "".join("\n" + method_table.markdown(t) for t, _ in methods)
    storage.write_bytes_atomic(storage.resolve(markdown), text.lstrip("\n").encode())
    written.append(markdown)
    if runs:
        steps_png = os.path.join(out, "miou_per_step.png")
        steps_figure(runs, steps_png)
        written.append(steps_png)
    for sweep in sweeps:
        points = [(t["params"], t["metric"]) for t in sweep["trials"] if t["metric"] is not None]
        for knob in sorted({k for params, _ in points for k in params}):
            path = os.path.join(out, _file_name(f"{sweep['sweep']}_{sweep['metric']}_vs_{knob}") + ".png")
            knob_figure([(p.get(knob), m) for p, m in points], knob, sweep["metric"], path)
            written.append(path)
    for table, trials in methods:
        written += _write_method_table(table, trials, out)
    for folder in sorted({f.resolve() for f in map(sweep_folder, documents) if f} | set(names)):
        _attach_to_mlflow(names.get(folder, folder.name), folder, written)
    return written


def _file_name(text: str) -> str:
    """Names from a summary file or a run become one file name inside `out`, whatever they contain."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def _method_tables(
    documents: list[dict[str, Any]], names: dict[Path, str]
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(table, trials) of every sweep among the inputs whose trials differ by method and seed only."""
    by_folder: dict[Path, list[dict[str, Any]]] = defaultdict(list)
    for run in documents:
        folder = sweep_folder(run)
        if folder is not None:
            by_folder[folder.resolve()].append(run)
    return [
        (method_table.method_table(names.get(folder, folder.name), trials), trials)
        for folder, trials in sorted(by_folder.items())
        if method_table.is_method_sweep(trials)
    ]


def _write_method_table(table: dict[str, Any], trials: list[dict[str, Any]], out: str) -> list[str]:
    """The table as CSV and JSON (its Markdown is in report.md) and its plot: mIoU all after each step,
    one line per method, mean ± sample std over its finished trials."""
    stem = os.path.join(out, _file_name(table["sweep"]))
    storage.write_bytes_atomic(storage.resolve(f"{stem}_method_table.csv"), method_table.csv_text(table).encode())
    storage.write_json_atomic(storage.resolve(f"{stem}_method_table.json"), table)
    written = [f"{stem}_method_table.csv", f"{stem}_method_table.json"]
    finished = _finished(trials)
    if finished:  # a method sweep's runs are labelled by their method (`label_runs`): one line per method
        steps_figure(finished, f"{stem}_mIoU_all_per_step.png")
        written.append(f"{stem}_mIoU_all_per_step.png")
    return written


def _attach_to_mlflow(name: str, folder: Path, files: list[str]) -> None:
    """Attach the report to the sweep's MLflow parent run, at the tracking URI the sweep recorded.

    Sweeps from before the URI was recorded fall back to MLFLOW_TRACKING_URI, then the default
    store under the sweep's output dir. The report's files are written by then, so a store that
    cannot be reached (or a damaged mlflow_sweep.json) is a warning, not a failed report.
    """
    ids_path = folder / "mlflow_sweep.json"
    if not ids_path.is_file():
        return
    try:
        ids = _read_object(ids_path, "the report is not attached to MLflow")
        uri = ids.get("tracking_uri") or tracking_uri(storage.resolve(folder.parents[1]))
        set_mlflow_defaults()  # a dead server costs seconds, not MLflow's minutes of retries
        check_reachable(uri)
        client = MlflowClient(uri)
        for path in files:
            client.log_artifact(ids["parent"], path, "report")
    except (ReportError, MlflowException, OSError, ValueError, KeyError) as exc:
        log.warning("report written, but not attached to sweep %s's MLflow run: %s", name, exc)
