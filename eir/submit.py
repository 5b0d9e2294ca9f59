"""`launch.py submit`: run a launch.py command on a Ray cluster as a Ray Job and follow it.

The command runs on the cluster exactly as it would here (`python launch.py run X.yaml k=v`), with
this checkout uploaded as the job's working directory, so the cluster needs only the dependencies
(cluster/*.yaml install them), never a copy of the code. Before the Job SDK is touched, the
dashboard is probed with a short timeout: the SDK's first request has none, and a wrong or dead
address would otherwise hang forever (RAY_NOTES.md, Jobs).

Token authentication is Ray's own: with `RAY_AUTH_MODE=token` the SDK reads the token from
`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` and sends it as a bearer header; the
probe sends the very same header, built by the same Ray helper. The token is never printed: every
text shown (errors, the job's logs and message) passes through `mask`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import ray
from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
from ray._private.runtime_env.packaging import _get_excludes
from ray.exceptions import AuthenticationError, RayError
from ray.job_submission import JobSubmissionClient

REPO_ROOT = Path(__file__).resolve().parents[1]
# Never uploaded with the job: environments, local results, prepared data, reports, MLflow stores and
# caches (the upload limit is 100 MiB, and local results may be private). Gitignore syntax, relative to
# the working dir: `/data` and `/report` are anchored because eir/data and tests/data are code.
EXCLUDES = [
    ".venv",
    "outputs",
    "/data",
    "/report",
    "mlruns",
    "mlartifacts",
    "*.db",
    ".git",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
]
# Never uploaded, at any depth: files that hold credentials or keys. A job's working dir lands on every node
# and in the cluster's package store, so a key copied there has leaked. Listed last in the excludes Ray gets,
# so no `!pattern` of a .gitignore can bring one back.
SECRET_EXCLUDES = [
    ".env",
    ".env.*",
    ".envrc",  # dotenv and direnv files
    ".aws",
    ".azure",
    ".gcloud",
    "**/.config/gcloud",
    "application_default_credentials.json",
    "credentials.json",
    ".ssh",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".gnupg",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.ppk",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
    ".pgpass",
    "**/.docker/config.json",
    ".kube",
    ".ray",  # Ray's auth_token
    "secrets",
    "*.tfstate",
    "*.tfstate.*",
    "*.tfvars",
    "*.tfvars.json",
]  # folder names without a trailing slash: the folder itself matches, so it is neither entered nor uploaded
# The only local settings a job inherits; secrets stay on the cluster (runtime_env is shown on the dashboard).
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI",)
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_USAGE = 2


class SubmitError(Exception):
    """Something to fix before a job can be submitted (bad address, dead cluster, missing token)."""


def strip_separator(launch_args: list[str]) -> list[str]:
    """The command after `--` (argparse keeps the separator in a REMAINDER argument)."""
    return launch_args[1:] if launch_args[:1] == ["--"] else launch_args


def build_entrypoint(launch_args: list[str]) -> str:
    """The shell command the job runs: `python launch.py <launch_args>`, each argument quoted."""
    if not launch_args:
        raise SubmitError(
            "no command to submit: give it after --, e.g. `submit --address URL -- run experiments/quickstart.yaml`"
        )
    return "python launch.py " + shlex.join(launch_args)


def build_runtime_env(working_dir: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    """The job's runtime_env: this checkout as working_dir, plus the pass-through settings that are set."""
    if not (working_dir / "launch.py").is_file():
        raise SubmitError(f"--working-dir {working_dir} has no launch.py: give the root of the eir repository")
    env_vars = {name: environ[name] for name in PASSTHROUGH_ENV if environ.get(name)}
    uri = env_vars.get("MLFLOW_TRACKING_URI")
    if uri and urllib.parse.urlsplit(uri).password:
        raise SubmitError(
            "MLFLOW_TRACKING_URI carries a password (user:password@host); a job's environment is shown on the "
            "Ray dashboard, so give the tracking server's credentials to the cluster instead "
            "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in its environment)"
        )
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": upload_excludes(working_dir)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def gitignore_patterns(working_dir: Path) -> list[str]:
    """The patterns of the working dir's .gitignore: what the repository never commits is never uploaded,
    even with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 (which turns off Ray's own reading of the file)."""
    path = working_dir / ".gitignore"
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SubmitError(f"cannot read {path} ({exc}): it says what must not be uploaded; fix or remove it") from None
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def upload_excludes(working_dir: Path) -> list[str]:
    """Ray's `excludes` for the upload: the .gitignore patterns, the build folders, then the secrets.

    One pattern list is one gitignore file to Ray, where the last matching line decides: with the
    secrets last, a negation such as `!.env` in the .gitignore cannot bring a secret back.
    """
    return [*gitignore_patterns(working_dir), *EXCLUDES, *SECRET_EXCLUDES]


@dataclass(frozen=True)
class UploadScan:
    """What an upload leaves out: the secret-looking paths by name (never their contents), the rest counted."""

    secrets: tuple[str, ...]
    others: int

    def summary(self) -> list[str]:
        lines = []
        if self.secrets:
            lines.append(
                f"upload: left out {len(self.secrets)} path(s) that look like secrets (never uploaded): "
                + ", ".join(self.secrets)
            )
        lines.append(
            f"upload: left out {self.others} other path(s) (environments, results, data, MLflow stores, "
            "caches, .gitignore patterns)"
        )
        return lines


def scan_upload(working_dir: Path, excludes: list[str]) -> UploadScan:
    """Walk `working_dir` as Ray's packager does, with Ray's own matcher: an excluded folder is not entered
    (it counts once), symlinked folders are followed (each real folder once, so a link loop ends)."""
    excluded = _get_excludes(working_dir, excludes)
    looks_secret = _get_excludes(working_dir, SECRET_EXCLUDES)
    secrets: list[str] = []
    others = 0
    pending, seen = [working_dir], set()
    while pending:
        folder = pending.pop()
        real = folder.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(folder.iterdir())
        except OSError:  # unreadable: Ray's packager reports it when it gets there
            continue
        for path in entries:
            if not excluded(path):
                if path.is_dir():
                    pending.append(path)
            elif looks_secret(path):
                secrets.append(path.relative_to(working_dir).as_posix() + ("/" if path.is_dir() else ""))
            else:
                others += 1
    return UploadScan(tuple(sorted(secrets)), others)


def normalize_address(address: str) -> str:
    """The dashboard URL without a trailing slash; anything else (a GCS host:port) is refused early."""
    parts = urllib.parse.urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(
            f"--address {address!r} is not a dashboard URL: give http://HOST:8265 (the Ray dashboard, "
            "not the GCS address HOST:6379)"
        )
    return address.rstrip("/")


def auth_headers() -> dict[str, str]:
    """The header the Job SDK adds by itself (empty unless RAY_AUTH_MODE=token), from Ray's own helper."""
    try:
        return dict(get_auth_headers_if_auth_enabled({}))
    except AuthenticationError:
        raise SubmitError(
            "RAY_AUTH_MODE=token but Ray found no token: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or write "
            "~/.ray/auth_token"
        ) from None


def secrets_of(headers: Mapping[str, str], environ: Mapping[str, str]) -> list[str]:
    """Every form of the token that could end up in a text: the header value, the bare token, RAY_AUTH_TOKEN."""
    found = []
    for value in headers.values():
        found += [value, value.split(" ", 1)[-1]]
    found.append(environ.get("RAY_AUTH_TOKEN", ""))
    return sorted({s.strip() for s in found if s.strip()}, key=len, reverse=True)


def mask(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def probe_failure(reason: object, timeout: float) -> str:
    """A short name for why a connection failed ('connection refused', 'timed out after 5s', ...)."""
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _auth_hint(headers: Mapping[str, str], environ: Mapping[str, str]) -> str:
    if headers:
        return "the token sent was rejected: use the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
    hint = "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or ~/.ray/auth_token)"
    if environ.get("RAY_AUTH_TOKEN") and environ.get("RAY_AUTH_MODE", "").lower() != "token":
        hint += "; RAY_AUTH_TOKEN is set, but no token is sent unless RAY_AUTH_MODE=token"
    return hint


def check_dashboard(address: str, headers: Mapping[str, str], timeout: float, environ: Mapping[str, str]) -> str:
    """GET <address>/api/version within `timeout` seconds; the cluster's Ray version, or a SubmitError saying why
    not.
    """
    request = urllib.request.Request(f"{address}/api/version", headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise SubmitError(
                f"the Ray dashboard at {address} refused the request (GET /api/version answered {exc.code} "
                f"{exc.reason}): it uses token authentication; {_auth_hint(headers, environ)}"
            ) from None
        raise SubmitError(
            f"the server at {address} is not a working Ray dashboard (GET /api/version answered {exc.code} "
            f"{exc.reason})"
        ) from None
    except urllib.error.URLError as exc:
        raise SubmitError(_unreachable(address, probe_failure(exc.reason, timeout))) from None
    except OSError as exc:  # timeouts while reading, resets, a server that hangs up
        raise SubmitError(_unreachable(address, probe_failure(exc, timeout))) from None
    try:
        return str(json.loads(body)["ray_version"])
    except (ValueError, KeyError, TypeError):
        raise SubmitError(
            f"the server at {address} answered GET /api/version without a ray_version: is this the Ray dashboard's "
            "port (8265)?"
        ) from None


def _unreachable(address: str, failure: str) -> str:
    return (
        f"no Ray dashboard answered at {address} (tried GET /api/version, {failure}): is the cluster up, and is this "
        "its dashboard "
        "address? (`ray dashboard cluster/aws.yaml` or `kubectl port-forward svc/eir-head-svc 8265:8265` "
        "forwards it to http://127.0.0.1:8265; see cluster/README.md)"
    )


def _output_dir_note(launch_args: list[str]) -> str | None:
    """A `run` whose run.output_dir is not an object-store URI writes on whichever node runs each process."""
    if "run" not in launch_args[:2]:
        return None
    values = [a.split("=", 1)[1] for a in launch_args if a.startswith("run.output_dir=")]
    if values and "://" in values[-1]:
        return None
    return (
        "note: run.output_dir is not on shared storage: on a multi-node cluster, results, checkpoints and "
        "instance stores must go to an object store (run.output_dir=s3://BUCKET/eir or gs://BUCKET/eir)"
    )


async def _tail_logs(client: Any, job_id: str, out: TextIO, secrets: list[str]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(mask(chunk, secrets))
        out.flush()


def _follow(client: Any, job_id: str, out: TextIO, secrets: list[str], poll_s: float = 2.0) -> str:
    """Stream the job's logs until it ends; its final status."""
    try:
        asyncio.run(_tail_logs(client, job_id, out, secrets))
    except Exception as exc:
        print(mask(f"warning: log streaming stopped ({exc}); waiting for the job to end", secrets), file=sys.stderr)
    while (status := str(client.get_job_status(job_id))) not in TERMINAL_STATUSES:
        time.sleep(poll_s)
    return status


def run_submit(args: argparse.Namespace) -> int:
    """Submit `python launch.py <args.launch_args>`; 0 if the job succeeded (or --no-wait), 1 if not, 2 if it never
    ran.
    """
    environ = os.environ
    secrets = secrets_of({}, environ)
    try:
        address = normalize_address(args.address)
        launch_args = strip_separator(args.launch_args)
        entrypoint = build_entrypoint(launch_args)
        runtime_env = build_runtime_env(Path(args.working_dir).resolve(), environ)
        headers = auth_headers()
        secrets = secrets_of(headers, environ)
        cluster_version = check_dashboard(address, headers, args.probe_timeout, environ)
    except SubmitError as exc:
        print(f"error: {mask(str(exc), secrets)}", file=sys.stderr)
        return EXIT_USAGE

    for line in scan_upload(Path(runtime_env["working_dir"]), runtime_env["excludes"]).summary():
        print(line, flush=True)
    if cluster_version != ray.__version__:
        print(f"warning: the cluster runs Ray {cluster_version}, this machine Ray {ray.__version__}", file=sys.stderr)
    note = _output_dir_note(launch_args)
    if note:
        print(note, file=sys.stderr)
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except (RayError, RuntimeError, ConnectionError, ValueError) as exc:  # refused: auth, upload size, bad runtime_env
        print(mask(f"error: the cluster at {address} did not accept the job: {exc}", secrets), file=sys.stderr)
        return EXIT_USAGE
    print(f"submitted job {job_id} to {address}: {entrypoint}", flush=True)
    print(f"dashboard: {address}/#/jobs/{job_id}", flush=True)
    if args.no_wait:
        print(f"not waiting; follow it with `ray job logs --follow --address {address} {job_id}`")
        return 0
    try:
        status = _follow(client, job_id, sys.stdout, secrets)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job keeps running (stop it: `ray job stop --address {address} {job_id}`)",
            file=sys.stderr,
        )
        return 130
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return 0
    message = client.get_job_info(job_id).message or "no message"
    print(mask(f"job {job_id} {status}: {message}", secrets), file=sys.stderr)
    return 1


def add_submit_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `submit` to launch.py's subcommands."""
    parser = subparsers.add_parser(
        "submit",
        help="run a launch.py command on a Ray cluster as a Ray Job and follow its logs",
        description=textwrap.dedent(
            """\
            Submit `python launch.py <COMMAND...>` to the Ray cluster whose dashboard is at --address, with this
            checkout uploaded as the job's working directory (without .venv, outputs, data, report, MLflow stores,
            .git, caches, what .gitignore lists, and never anything that looks like a secret: .env, .aws/, .ssh/,
            id_rsa*, .netrc, *.pem, *.key, .ray/, secrets/, *.tfstate, ...; the paths left out are printed),
            then follow its logs. Exit code: 0 when the job SUCCEEDED, 1 when it FAILED or was
            STOPPED, 2 when it could not be submitted. MLFLOW_TRACKING_URI is passed to the job when set.
            Token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token); the token
            is never printed. Results must go to shared storage on a multi-node cluster: run.output_dir=s3://...
            (cluster/README.md)."""
        ),
        epilog=textwrap.dedent(
            """\
            examples:
              python launch.py submit --address http://127.0.0.1:8265 -- run experiments/camvid_5-3.yaml \\
                  run.output_dir=s3://my-bucket/eir dataset.root=s3://my-bucket/eir/data/camvid scaling.use_gpu=true
              python launch.py submit --address http://127.0.0.1:8265 --no-wait -- run experiments/quickstart.yaml
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", required=True, help="the cluster's Ray dashboard URL, e.g. http://127.0.0.1:8265")
    parser.add_argument(
        "--working-dir",
        default=str(REPO_ROOT),
        help=f"folder uploaded as the job's working directory (default: this repository, {REPO_ROOT})",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return without following it")
    parser.add_argument(
        "--probe-timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the dashboard to answer before giving up (default 5)",
    )
    parser.add_argument(
        "launch_args",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="the launch.py command to run on the cluster, e.g. -- run experiments/quickstart.yaml k=v",
    )
    parser.set_defaults(func=run_submit)
