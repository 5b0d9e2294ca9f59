"""MLflow logging from the driver: one parent run per experiment, one child run per step.

Everything is logged from the driver process (never from Ray Train workers), through an explicit
`MlflowClient`, so no global MLflow state leaks between runs, Tune trials or tests. The default
store is a sqlite file under `run.output_dir` with artifacts beside it; `MLFLOW_TRACKING_URI`
points at a tracking server instead (required when `run.output_dir` is remote). Run ids are
remembered in the run directory, so `--resume` continues the same MLflow runs.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from eir import storage
from eir.storage import Location

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 500


def tracking_uri(output_root: Location) -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store in the output root (local roots only)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if not output_root.is_local:
        raise ValueError(
            f"run.output_dir={output_root.uri} is remote: set MLFLOW_TRACKING_URI to a tracking server "
            "(a sqlite file cannot live on an object store)"
        )
    os.makedirs(output_root.path, exist_ok=True)
    return f"sqlite:///{os.path.join(output_root.path, 'mlflow.db')}"


def artifact_location(uri: str, output_root: Location) -> str | None:
    """Where a new experiment's artifacts go with a sqlite store: beside the runs (local roots) or
    beside the database (remote roots), never MLflow's default `./mlruns` in whatever directory the
    command ran from. A tracking server decides for itself (None)."""
    if not uri.startswith("sqlite:"):
        return None
    if output_root.is_local:
        return "file://" + os.path.join(output_root.path, "mlartifacts")
    database = uri.removeprefix("sqlite:///")
    return "file://" + os.path.join(os.path.dirname(os.path.abspath(database)), "mlartifacts")


class Tracker:
    """A thin, explicit wrapper over MlflowClient for the run tree eir writes."""

    def __init__(self, output_root: Location, experiment: str):
        self.uri = tracking_uri(output_root)
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location(self.uri, output_root))
        else:
            self.experiment_id = found.experiment_id

    def start(self, name: str, *, parent: str | None = None, tags: dict[str, str] | None = None, run_id: str | None = None) -> str:
        """A new run, or the existing `run_id` set back to running (resume)."""
        if run_id is not None:
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return run_id
        all_tags = dict(tags or {})
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def params(self, run_id: str, params: dict[str, Any]) -> None:
        existing = self.client.get_run(run_id).data.params
        batch = [
            Param(key, str(value)[:MAX_PARAM_LENGTH])
            for key, value in sorted(params.items())
            if key not in existing  # params are immutable: a resumed run keeps its first values
        ]
        for start in range(0, len(batch), 100):
            self.client.log_batch(run_id, params=batch[start : start + 100])

    def metrics(self, run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if value is not None and not (isinstance(value, float) and math.isnan(value))
        ]
        for start in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[start : start + 500])

    def tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def artifact(self, run_id: str, path: str, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, path, folder)

    def finish(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


def load_run_ids(run_dir: Location) -> dict[str, str]:
    loc = run_dir.join("mlflow_runs.json")
    return storage.read_json(loc) if storage.exists(loc) else {}


def save_run_ids(run_dir: Location, ids: dict[str, str]) -> None:
    storage.write_json_atomic(run_dir.join("mlflow_runs.json"), ids)
