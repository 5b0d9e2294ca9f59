"""Real services the end-to-end tests start on this machine: an S3 server, an MLflow server, Ray nodes.

One place for the start/stop logic (several test modules need the same servers). Each service runs in
its own process session and is stopped by exactly that session, never by `ray stop` or a name match:
other Ray instances and servers on the machine belong to other tests and runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

S3_KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Ray, MLflow or AWS settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env.update(extra)
    return env


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables a node (or a user) would have, pointing at the local S3 server."""
    return {**S3_KEYS, "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}


def _wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            shown = log.read_text()[-2000:] if log else ""
            pytest.fail(f"{what} exited with code {process.returncode}:\n{shown}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                _stop_session(process)
                pytest.fail(f"{what} did not start within {timeout_s:.0f} s:\n{log.read_text()[-2000:] if log else ''}")
            time.sleep(0.3)


def _stop_session(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the process's session, then SIGKILL it if it does not go (a loaded machine)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def _serving(process: subprocess.Popen, port: int, what: str, log: Path | None, timeout_s: float) -> Iterator[str]:
    """The server's URL once its port answers; its session stopped on exit."""
    _wait_for_port(port, process, what, log, timeout_s)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop_session(process)


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (objects in memory: nothing it stores touches the disk); yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    with _serving(process, port, "the moto S3 server", None, timeout_s=60) as url:
        yield url


@contextlib.contextmanager
def mlflow_server(folder: Path, artifacts: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real tracking server on 127.0.0.1 (sqlite backend in `folder`); yields its URL.

    `artifacts` is where it stores artifacts (default: `folder/artifacts`; an s3:// URI needs `env`
    to reach the bucket). Start-up is slow on a loaded 2-core machine (measured: 9 s idle, 72 s beside
    a training run), so the wait is generous but ends at once if the server exits, showing its log.
    """
    port = free_port()
    log_path = folder / "mlflow-server.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination",
                artifacts or str(folder / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    with _serving(process, port, "mlflow server", log_path, timeout_s=240) as url:
        yield url


# ---------------------------------------------------------------- Ray nodes


@dataclass
class RayNode:
    """One `ray start --block` process: its session holds the node's GCS/raylet/dashboard and workers."""

    process: subprocess.Popen[bytes]
    gcs_port: int  # the cluster's GCS port (the head's), which job drivers' RAY_ADDRESS names
    temp_dir: str
    log: Path
    extra_pids: list[int] = field(default_factory=list)

    def raylet_pid(self) -> int:
        """The node's raylet: the process a lost machine takes with it."""
        for pid in processes_of(self.process.pid, gcs_port=-1):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
        raise AssertionError(f"no raylet in the session of ray start (pid {self.process.pid}):\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def processes_of(session: int, gcs_port: int) -> list[int]:
    """A Ray node's processes: its session (ray start, GCS, raylet, dashboard, workers) and, when
    `gcs_port` is given, the job drivers Ray starts in sessions of their own (RAY_ADDRESS names that port)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0") if gcs_port > 0 else []
        except OSError:
            continue
        state, _, _, sid = stat.rsplit(")", 1)[1].split()[:4]
        if state == "Z":  # exited, waiting to be reaped
            continue
        if int(sid) == session or any(
            v.startswith(b"RAY_ADDRESS=") and v.endswith(f":{gcs_port}".encode()) for v in environ
        ):
            found.append(int(entry))
    return found


def start_ray_node(
    log: Path,
    env: dict[str, str],
    *,
    head_gcs_port: int | None = None,
    dashboard_port: int | None = None,
    num_cpus: int,
    resources: dict[str, float] | None = None,
) -> RayNode:
    """`ray start --block` as a head (no `head_gcs_port`; with a dashboard on `dashboard_port`) or as a
    node joining the head at 127.0.0.1:`head_gcs_port`. Each node gets its own short temp dir (Ray's
    socket paths must stay under 108 characters) and its own process session."""
    venv_bin = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="eir-rt-", dir="/tmp")
    args = [
        str(venv_bin / "ray"),
        "start",
        "--block",
        f"--num-cpus={num_cpus}",
        "--object-store-memory=300000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    if head_gcs_port is None:
        gcs_port = free_port()
        args += [
            "--head",
            f"--port={gcs_port}",
            f"--dashboard-port={dashboard_port or free_port()}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--ray-client-server-port={free_port()}",
        ]
    else:
        gcs_port = head_gcs_port
        args.append(f"--address=127.0.0.1:{head_gcs_port}")
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's memory monitor counts the whole machine, where other runs share the memory: off here.
        "RAY_memory_monitor_refresh_ms": "0",
        **env,
        "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', os.environ['PATH'])}",  # jobs run this venv's python
    }
    with log.open("ab") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return RayNode(process, gcs_port, temp_dir, log)


def stop_ray_node(node: RayNode) -> None:
    """SIGTERM `ray start --block` (it shuts its node down), then SIGKILL whatever of the node is left."""
    with contextlib.suppress(ProcessLookupError):
        node.process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.process.wait(timeout=20)
    for pid in processes_of(node.process.pid, node.gcs_port):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while processes_of(node.process.pid, node.gcs_port) and time.monotonic() < deadline:
        time.sleep(0.2)


def dashboard_get(address: str, path: str, token: str, timeout_s: float = 10) -> dict:
    """GET a dashboard REST path with Ray's token header; the decoded JSON body."""
    request = urllib.request.Request(f"{address}{path}", headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def wait_for_dashboard(address: str, token: str, head: RayNode, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            pytest.fail(f"ray start exited with {head.process.returncode}:\n{head.tail()}")
        try:
            dashboard_get(address, "/api/version", token, timeout_s=2)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    pytest.fail(f"the dashboard at {address} did not answer within {timeout_s}s:\n{head.tail()}")


def alive_nodes(address: str, token: str) -> list[dict]:
    """The cluster's live nodes, from the state API (node_id, resources_total, …)."""
    body = dashboard_get(address, "/api/v0/nodes?limit=100&detail=true", token)
    return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]


def wait_for_nodes(address: str, token: str, count: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(urllib.error.URLError, OSError, KeyError):
            nodes = alive_nodes(address, token)
            if len(nodes) == count:
                return nodes
        if time.monotonic() > deadline:
            pytest.fail(f"the cluster did not reach {count} live nodes within {timeout_s}s")
        time.sleep(1)


def final_job_status(address: str, token: str, job_id: str, timeout_s: float) -> str:
    """The job's status once it is terminal, read from the dashboard's REST API (no Ray in this process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = dashboard_get(address, f"/api/jobs/{job_id}", token)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return status
        time.sleep(1)
