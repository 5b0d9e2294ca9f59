"""Run directories: reading the config a run was made with, and whether a run may start or resume there.

Light on purpose (config and storage only): `launch.py` reads `RunDirError` from here for every
command, and the commands that open an existing run (evaluate, preview, pseudo-labels) read its
config here without importing the trainer.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from eir import storage
from eir.config import ConfigError, ExperimentConfig, config_from_yaml, inactive_keys
from eir.storage import Location

# Local paths compared by where they point (`outputs` from the repo = `/repo/outputs`).
PATH_KEYS = ("dataset.root", "run.output_dir")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists without --resume, config differs)."""


def config_differences(previous: ExperimentConfig, current: ExperimentConfig) -> list[str]:
    """Keys whose values differ and matter to at least one of the two configs."""
    before, after = _normalised(previous.flat()), _normalised(current.flat())
    # run.name names the folder (or, in a sweep, the trial's label): it cannot change what the run computes.
    ignored = (inactive_keys(previous) & inactive_keys(current)) | {"run.name"}
    return sorted(key for key in after if key not in ignored and before.get(key) != after[key])


def _normalised(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: (os.path.abspath(v) if k in PATH_KEYS and v and "://" not in v else v) for k, v in flat.items()}


def read_run_config(run_dir: Location) -> ExperimentConfig:
    """The config a run dir was made with (every command that opens a run dir reads it here)."""
    loc = run_dir.join("config.yaml")
    if not storage.exists(loc):
        raise RunDirError(f"{run_dir.uri} is not a run directory (no config.yaml)")
    try:
        return config_from_yaml(storage.read_bytes(loc), where=loc.uri)
    except ConfigError as exc:
        raise RunDirError(
            f"the run's config is damaged: {exc}; restore {loc.uri}, or start a new run under another run.name"
        ) from exc


def require_existing_run(name: str, output_root: Location, run_dir: Location) -> None:
    """--resume of a mistyped name is an error (naming the close ones), never a new run."""
    if storage.exists(run_dir.join("config.yaml")):
        return
    runs = [entry for entry in storage.list_dir(output_root) if storage.exists(output_root.join(entry, "config.yaml"))]
    close = difflib.get_close_matches(name, runs, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; runs there: {', '.join(runs[:10]) or 'none'}"
    raise RunDirError(
        f"--resume: there is no run {name!r} in {output_root.uri} (no {run_dir.join('config.yaml').uri}){hint}"
    )


def check_run_dir(config: ExperimentConfig, output_root: Location, run_dir: Location, resume: bool) -> None:
    """A new run needs a free name; --resume needs an existing run made by the same config."""
    if resume:
        require_existing_run(config.run.name, output_root, run_dir)
    if not storage.exists(run_dir.join("config.yaml")):
        return
    if not resume:
        raise RunDirError(
            f"run directory {run_dir.uri} already exists: pass --resume to continue it, or choose another run.name"
        )
    previous = read_run_config(run_dir)
    differ = config_differences(previous, config)
    if differ:
        before, after = previous.flat(), config.flat()
        detail = ", ".join(f"{k} ({before.get(k)!r} → {after[k]!r})" for k in differ)
        raise RunDirError(f"--resume: {run_dir.uri} was made by a different config; keys that differ: {detail}")
