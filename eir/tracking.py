"""MLflow logging from the driver: one parent run per experiment, one child run per step.

Everything is logged from the driver process (never from Ray Train workers), through an explicit
`MlflowClient`, so no global MLflow state leaks between runs, Tune trials or tests. The default
store is a sqlite file under `run.output_dir` with artifacts beside it; `MLFLOW_TRACKING_URI`
points at a tracking server instead (required when `run.output_dir` is remote). Run ids are
remembered in the run directory, so `--resume` continues the same MLflow runs.

A tracking server is checked when the Tracker is made (before Ray starts), and MLflow's own HTTP
retries are bounded, so a dead server costs seconds, not minutes. Every MLflow failure surfaces as
a `TrackingError` (one `error:` line from launch.py); closing a run tree never raises, so a dead
server cannot hide the error that stopped a run.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import math
import os
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from eir import storage
from eir.config import ConfigError, ExperimentConfig, inactive_keys
from eir.storage import Location
from eir.submit import probe_failure

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 500
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
# results.json's status of a run -> its MLflow status (a scheduler's early stop is a kill, not a failure).
MLFLOW_STATUS = {"finished": FINISHED, "failed": FAILED, "interrupted": KILLED, "stopped": KILLED}
IOU_TABLE = "per_class_iou.json"
PROBE_TIMEOUT_S = 5.0
# MLflow retries a failed request 7 times with backoff factor 2 (about 4.6 minutes on a dead server)
# and waits 120 s for each answer. These bounds (a user's own settings win) make a server that dies
# mid-run fail within ~10 s when it refuses connections, ~1.5 min when it hangs.
MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    # The per-class IoU table is read back before every step's rows are added: MLflow's download bar would
    # print two lines of "Downloading artifacts" between the step tables of the console.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# What a TrackingError suggests: before anything ran, the setting; once a run logs, resuming it.
OPEN_HINT = (
    "check MLFLOW_TRACKING_URI (and a server's credentials: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
    "or MLFLOW_TRACKING_TOKEN)"
)
RESUME_HINT = "the run's files are kept: once the store answers again, continue with --resume"


class TrackingError(ConfigError):
    """The MLflow tracking store cannot be used: unreachable, refusing, or without the runs a resume names."""


def tracking_uri(output_root: Location) -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store in the output root (local roots only)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if not output_root.is_local:
        raise TrackingError(
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


def shown_uri(uri: str) -> str:
    """The URI as messages show it: a password in it (user:password@host) replaced by ***."""
    return _credentials_replaced(uri, lambda parts: parts.netloc.replace(f":{parts.password}@", ":***@", 1))


def uri_without_credentials(uri: str) -> str:
    """The URI as files record it: `user:password@` dropped (MLflow reads credentials from the environment)."""
    return _credentials_replaced(uri, lambda parts: parts.netloc.rsplit("@", 1)[1])


def _credentials_replaced(uri: str, netloc: Callable[[urllib.parse.SplitResult], str]) -> str:
    parts = urllib.parse.urlsplit(uri)
    if not parts.password:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc(parts)))


def set_mlflow_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set MLflow's HTTP retry and timeout knobs and its artifact progress bar (read at every request)
    unless the user set them."""
    for name, value in MLFLOW_DEFAULTS.items():
        environ.setdefault(name, value)


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """GET <uri>/health within `timeout` seconds for a tracking server (http/https); other stores pass.

    Any HTTP answer, even an error status or a TLS complaint, means a server listens (MLflow's own
    requests then judge it); a refused, unresolvable or silent address is a TrackingError.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    # Without user:password@ (urllib would not take it); the health check needs no credentials.
    health = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query="", fragment=""))
    try:
        with urllib.request.urlopen(health.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except urllib.error.URLError as exc:
        reason: object = exc.reason
    except (ValueError, http.client.InvalidURL) as exc:  # no host, a port that is not a number
        raise TrackingError(f"MLFLOW_TRACKING_URI={shown_uri(uri)} is not a usable URL ({exc})") from None
    except (OSError, http.client.HTTPException) as exc:  # it accepts, then hangs, hangs up or answers non-HTTP
        reason = exc
    if isinstance(reason, ssl.SSLError):
        return
    raise TrackingError(
        f"no MLflow tracking server answered at MLFLOW_TRACKING_URI={shown_uri(uri)} (tried GET /health, "
        f"{probe_failure(reason, timeout)}): start the server, correct MLFLOW_TRACKING_URI, or unset it to log to "
        "a sqlite file in run.output_dir"
    )


def run_status(results_status: str) -> str:
    """The MLflow status of a run that results.json calls `results_status` (finished, failed, interrupted, stopped)."""
    try:
        return MLFLOW_STATUS[results_status]
    except KeyError:
        raise ValueError(
            f"no MLflow status for a run {results_status!r}: expected one of {sorted(MLFLOW_STATUS)}"
        ) from None


def run_params(config: ExperimentConfig) -> dict[str, Any]:
    """The config keys this run's method reads (`section.key -> value`): the rest cannot change its results."""
    inactive = inactive_keys(config)
    return {key: value for key, value in config.flat().items() if key not in inactive}


def run_description(config: ExperimentConfig, results_uri: str) -> str:
    """The run's MLflow description (markdown): what ran, on what, and where its results are."""
    return (
        f"**{config.method.name}** on {config.dataset.name}, task {config.task.name} ({config.task.setting}), "
        f"seed {config.seed}, eval protocol {config.eval.protocol}.\n\nResults: `{results_uri}`"
    )


def source_tags(commit: str, entry_point: str = "launch.py") -> dict[str, str]:
    """MLflow's own source tags: the UI shows the commit and the entry point of every run."""
    return {MLFLOW_GIT_COMMIT: commit, MLFLOW_SOURCE_NAME: entry_point, MLFLOW_SOURCE_TYPE: "LOCAL"}


def step_run_name(run_name: str, step: int) -> str:
    """A step's child run name: unique across runs in the MLflow UI's run list (`<run.name>/step_<t>`)."""
    return f"{run_name}/step_{step}"


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Tracker:
    """A thin, explicit wrapper over MlflowClient for the run tree eir writes."""

    def __init__(self, output_root: Location, experiment: str, *, probe_timeout: float = PROBE_TIMEOUT_S):
        self.uri = tracking_uri(output_root)
        set_mlflow_defaults()
        check_reachable(self.uri, probe_timeout)
        self.client = MlflowClient(self.uri)
        with self._calling(f"opening experiment {experiment!r}", OPEN_HINT):
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=artifact_location(self.uri, output_root)
                )
            else:
                self.experiment_id = found.experiment_id

    def _error(self, what: str, exc: BaseException, hint: str = RESUME_HINT) -> TrackingError:
        return TrackingError(
            f"the MLflow tracking store {shown_uri(self.uri)} failed while {what} ({_short(exc)}); {hint}"
        )

    @contextlib.contextmanager
    def _calling(self, what: str, hint: str = RESUME_HINT) -> Iterator[None]:
        """MLflow's failures (a dead server, a refused request, a full disk) as one TrackingError naming the store."""
        try:
            yield
        except (MlflowException, OSError) as exc:
            raise self._error(what, exc, hint) from exc

    def start(
        self,
        name: str,
        *,
        parent: str | None = None,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """A new run, or the existing `run_id` set back to running under `name` (resume); `tags` and
        `description` (markdown, the UI's description) are set either way."""
        all_tags = dict(tags or {})
        if description is not None:
            all_tags[MLFLOW_RUN_NOTE] = description
        if run_id is None:
            if parent is not None:
                all_tags[MLFLOW_PARENT_RUN_ID] = parent
            with self._calling(f"creating run {name!r}"):
                return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        self._check_resumable(run_id, name)
        with self._calling(f"resuming run {name!r}"):
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING), name=name)
        self.tags(run_id, all_tags)
        return run_id

    def _check_resumable(self, run_id: str, name: str) -> None:
        """A run id from mlflow_runs.json must name a live run of this store (not one of another
        MLFLOW_TRACKING_URI).
        """
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise self._error(f"resuming run {name!r}", exc) from exc
            run = None
        except OSError as exc:
            raise self._error(f"resuming run {name!r}", exc) from exc
        if run is None or run.info.lifecycle_stage == "deleted":
            raise TrackingError(
                f"--resume: MLflow run {run_id} ({name}, named in the run's mlflow_runs.json) is "
                f"{'missing from' if run is None else 'deleted in'} the tracking store {shown_uri(self.uri)}: resume "
                "with "
                "the MLFLOW_TRACKING_URI the run started with, or delete mlflow_runs.json to log the rest as new "
                "MLflow runs"
            )

    def params(self, run_id: str, params: Mapping[str, Any]) -> None:
        with self._calling("logging params"):
            existing = self.client.get_run(run_id).data.params
            batch = [
                Param(key, str(value)[:MAX_PARAM_LENGTH])
                for key, value in sorted(params.items())
                if key not in existing  # params are immutable: a resumed run keeps its first values
            ]
            for start in range(0, len(batch), 100):
                self.client.log_batch(run_id, params=batch[start : start + 100])

    def metrics(self, run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if value is not None and not (isinstance(value, float) and math.isnan(value))
        ]
        with self._calling("logging metrics"):
            for start in range(0, len(batch), 500):
                self.client.log_batch(run_id, metrics=batch[start : start + 500])

    def tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        with self._calling("setting tags"):
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)

    def artifact(self, run_id: str, path: str, folder: str | None = None) -> None:
        with self._calling(f"logging artifact {os.path.basename(path)}"):
            self.client.log_artifact(run_id, path, folder)

    def iou_table(self, run_id: str, step: int, per_class: Mapping[str, float | None]) -> None:
        """Step `step`'s per-class IoU as rows (step, class, IoU) of the run's MLflow table `per_class_iou.json`,
        which the UI compares across runs. A step logged before (a resume, a step trained again) has its
        rows replaced, never doubled."""
        rows = pd.DataFrame(
            {
                "step": [step] * len(per_class),
                "class": list(per_class),
                "IoU": [math.nan if v is None else float(v) for v in per_class.values()],
            }
        )
        with self._calling(f"logging {IOU_TABLE}"):
            existing = self._table(run_id, IOU_TABLE)
            if existing is None or step not in set(existing["step"]):
                self.client.log_table(run_id, rows, IOU_TABLE)  # MLflow appends, and marks the table for the UI
                return
            # Already listed: the file is rewritten whole, in log_table's own format (it is already marked).
            table = pd.concat([existing[existing["step"] != step], rows], ignore_index=True).sort_values(
                "step", kind="stable"
            )
            with tempfile.TemporaryDirectory(prefix="eir-table-") as folder:
                path = os.path.join(folder, IOU_TABLE)
                table.to_json(path, orient="split", index=False)
                self.client.log_artifact(run_id, path)

    def _table(self, run_id: str, name: str) -> Any:
        """A table the run already has (a DataFrame), or None."""
        if name not in {a.path for a in self.client.list_artifacts(run_id)}:
            return None
        with tempfile.TemporaryDirectory(prefix="eir-table-") as folder:
            return pd.read_json(self.client.download_artifacts(run_id, name, folder), orient="split")

    def finish(self, run_id: str, status: str | bool = FINISHED) -> None:
        """End one run as FINISHED, FAILED or KILLED (True/False: FINISHED/FAILED)."""
        if isinstance(status, bool):
            status = FINISHED if status else FAILED
        if status not in (FINISHED, FAILED, KILLED):
            raise ValueError(f"bad run status {status!r}: expected FINISHED, FAILED or KILLED")
        with self._calling(f"ending run {run_id} as {status}"):
            self.client.set_terminated(run_id, status)

    def close_tree(self, run_id: str, status: str) -> list[str]:
        """End `run_id` and every run below it (step children, a sweep's trials and their steps) that is still
        RUNNING, with `status`; the ids ended. Called while a run stops, so it never raises: a store that
        fails is logged, and the error that stopped the run stays the one reported."""
        closed: list[str] = []
        try:
            root = self.client.get_run(run_id)
            tree, pending = [], [root]
            while pending:
                run = pending.pop()
                tree.append(run)
                pending += self._children(root.info.experiment_id, run.info.run_id)
            for run in reversed(tree):  # the deepest first: a parent never ends before its children
                if run.info.status == "RUNNING":
                    self.finish(run.info.run_id, status)
                    closed.append(run.info.run_id)
        except (MlflowException, OSError, TrackingError) as exc:
            log.warning(
                "could not end MLflow run %s and its children as %s in %s: %s",
                run_id,
                status,
                shown_uri(self.uri),
                _short(exc),
            )
        return closed

    def _children(self, experiment_id: str, run_id: str) -> list[Any]:
        found, token = [], None
        while True:
            page = self.client.search_runs(
                [experiment_id], f"tags.{MLFLOW_PARENT_RUN_ID} = '{run_id}'", max_results=1000, page_token=token
            )
            found += list(page)
            token = page.token
            if not token:
                return found


def load_run_ids(run_dir: Location) -> dict[str, str]:
    loc = run_dir.join("mlflow_runs.json")
    return storage.read_json(loc) if storage.exists(loc) else {}


def save_run_ids(run_dir: Location, ids: dict[str, str]) -> None:
    storage.write_json_atomic(run_dir.join("mlflow_runs.json"), ids)
