"""A real two-node Ray cluster on this machine: a run placed across nodes, then a node lost mid-step.

The head (`ray start --head`, token auth, its own temp dir) hosts the job driver and the Ray Data tasks;
a second node (`ray start --address ...`, its own temp dir) offers the only unit of the custom resource
`trainer` and one CPU, so `scaling.worker_resource=trainer` puts the Train worker there and nothing else
fits beside it. Both nodes get the standard AWS variables (as instance profiles give them on a cloud) and
reach a moto S3 server, which keeps objects in memory: every dataset shard, checkpoint, model and result
lives in the bucket, and the MLflow server stores its artifacts there too. So any run output found on
disk afterwards is something a node wrote locally — the test looks for such files in both nodes' temp
dirs (which hold the job's uploaded working directory) and fails on any.

Runs are submitted with `launch.py submit`, as a user would. Node placement is read from Ray's state API
(the dashboard's REST endpoints), never from the run's own logs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
import pytest
from local_services import (
    RayNode,
    alive_nodes,
    aws_env,
    clean_env,
    dashboard_get,
    final_job_status,
    free_port,
    mlflow_server,
    processes_of,
    s3_server,
    start_ray_node,
    stop_ray_node,
    wait_for_dashboard,
    wait_for_nodes,
)
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
REPO = Path(__file__).resolve().parents[1]
TOKEN = "eir-multinode-token-3c7a91d0"
BUCKET = "eir-multinode"
RESOURCE = "trainer"
PREPARE = [sys.executable, "launch.py", "prepare", "synthetic", "--num-images", "40", "--image-size", "48", "--out"]
# The GCS declares a node dead after ~3 missed 1-s health checks (defaults: 5 × 3 s after a 10-s timeout),
# so a lost node is noticed in seconds rather than a minute.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
# Files a run writes (results, configs, models, checkpoints, Parquet shards, MLflow artifacts): none may
# appear on a node's disk when run.output_dir is an object store.
RUN_OUTPUT = re.compile(r"(results\.json|model\.pt|checkpoint\.pt|.*\.parquet|_COMPLETE|mlflow_runs\.json)$")


@dataclass
class Cluster:
    head: RayNode
    workers: list[RayNode]
    address: str  # the dashboard URL `launch.py submit --address` takes
    endpoint: str  # the S3 server
    tracking_uri: str
    node_env: dict[str, str]
    head_node_id: str

    def node_ids(self) -> set[str]:
        return {n["node_id"] for n in alive_nodes(self.address, TOKEN)}

    def add_trainer_node(self, log: Path) -> RayNode:
        node = start_ray_node(log, self.node_env, head_gcs_port=self.head.gcs_port, num_cpus=1, resources={RESOURCE: 1})
        self.workers.append(node)
        return node


def _submit(cluster: Cluster, run_args: list[str], *, wait: bool, timeout: float) -> subprocess.CompletedProcess:
    client_env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, MLFLOW_TRACKING_URI=cluster.tracking_uri)
    command = [sys.executable, "launch.py", "submit", "--address", cluster.address]
    return subprocess.run(
        [*command, *([] if wait else ["--no-wait"]), "--", "run", *run_args],
        cwd=REPO,
        env=client_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _job_id(result: subprocess.CompletedProcess) -> str:
    found = re.search(r"submitted job (raysubmit_\w+)", result.stdout)
    assert found, result.stdout[-3000:] + result.stderr[-3000:]
    return found.group(1)


def _run_args(name: str, task: str, *extra: str) -> list[str]:
    return [
        "experiments/quickstart.yaml",
        f"run.output_dir=s3://{BUCKET}/runs",
        f"run.name={name}",
        f"dataset.root=s3://{BUCKET}/data",
        f"task.name={task}",
        "method.name=eir",
        "memory.size=10",
        "model.weights=null",
        "train.epochs_incremental=1",
        "train.batch_size=8",
        "train.crop_size=48",
        "eval.batch_size=8",
        "scaling.cpus_per_worker=1",
        f"scaling.worker_resource={RESOURCE}",
        *extra,
    ]


def _s3(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=endpoint, access_key="test", secret_key="test", region="us-east-1", allow_bucket_creation=True
    )


def _read_json(endpoint: str, path: str) -> dict:
    with _s3(endpoint).open_input_stream(f"{BUCKET}/{path}") as stream:
        return json.loads(stream.read())


def _state(cluster: Cluster, kind: str, job_id: str | None = None) -> list[dict]:
    """Ray's state API: every actor or task the cluster remembers (of one Ray job, when given)."""
    query = f"/api/v0/{kind}?limit=10000&detail=true"
    if job_id:
        query += f"&filter_keys=job_id&filter_predicates=%3D&filter_values={job_id}"
    return dashboard_get(cluster.address, query, TOKEN, timeout_s=60)["data"]["result"]["result"]


def _run_outputs_on_disk(*folders: str | Path) -> list[str]:
    return sorted(str(p) for folder in folders for p in Path(folder).rglob("*") if RUN_OUTPUT.match(p.name))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("multinode")
    with s3_server() as endpoint:
        _s3(endpoint).create_dir(BUCKET)  # moto creates the bucket
        node_env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, **aws_env(endpoint), **FAST_HEALTH_CHECKS)
        # The data a cluster reads: prepared once from the user's machine onto the bucket.
        prepared = subprocess.run(
            [*PREPARE, f"s3://{BUCKET}/data"],
            cwd=REPO,
            env=clean_env(**aws_env(endpoint)),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert prepared.returncode == 0, prepared.stdout[-2000:] + prepared.stderr[-2000:]
        dashboard_port = free_port()
        head = start_ray_node(logs / "head.log", node_env, dashboard_port=dashboard_port, num_cpus=6)
        address = f"http://127.0.0.1:{dashboard_port}"
        workers: list[RayNode] = []
        try:
            wait_for_dashboard(address, TOKEN, head, timeout_s=180)
            head_node_id = wait_for_nodes(address, TOKEN, 1, timeout_s=60)[0]["node_id"]
            with mlflow_server(logs, artifacts=f"s3://{BUCKET}/mlflow", env={**node_env}) as tracking_uri:
                found = Cluster(head, workers, address, endpoint, tracking_uri, node_env, head_node_id)
                found.add_trainer_node(logs / "node-2.log")
                wait_for_nodes(address, TOKEN, 2, timeout_s=120)
                yield found
        finally:
            for node in [*workers, head]:
                stop_ray_node(node)
    left = [pid for node in [*workers, head] for pid in processes_of(node.process.pid, node.gcs_port)]
    assert left == [], f"processes of the test's Ray nodes outlived them: {left}"


def test_a_run_places_its_train_worker_on_the_second_node(cluster: Cluster, record_property) -> None:
    """EIR on 19-1 (its last step has one class: every score must stay finite), everything in the bucket."""
    second = next(iter(cluster.node_ids() - {cluster.head_node_id}))
    started = time.monotonic()
    result = _submit(cluster, _run_args("placed", "19-1", "train.epochs=1"), wait=True, timeout=900)
    shown = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, shown
    wall_s = time.monotonic() - started
    record_property("two_node_submit_wall_s", round(wall_s, 1))
    print(f"two-node run: {wall_s:.0f} s from submit to SUCCEEDED")
    assert TOKEN not in result.stdout + result.stderr
    assert "SUCCEEDED" in result.stdout and "Running entrypoint for job" in result.stdout  # logs were followed
    assert f"results: s3://{BUCKET}/runs/placed/results.json" in result.stdout
    job = dashboard_get(cluster.address, f"/api/jobs/{_job_id(result)}", TOKEN)

    # Where things ran, by Ray's own record.
    assert job["driver_node_id"] == cluster.head_node_id, "the job driver runs on the head"
    actors = _state(cluster, "actors", job["job_id"])
    trainers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len(trainers) == 2, f"one Train worker per step: {[(a['class_name'], a['node_id']) for a in actors]}"
    assert {a["node_id"] for a in trainers} == {second}, "every Train worker on the node with the resource"
    controllers = [a for a in actors if a["class_name"] == "TrainController"]
    assert controllers and {a["node_id"] for a in controllers} == {cluster.head_node_id}
    data_tasks = [t for t in _state(cluster, "tasks", job["job_id"]) if t["type"] == "NORMAL_TASK"]
    assert any(t["node_id"] == cluster.head_node_id for t in data_tasks), (
        f"Ray Data tasks on the head: {sorted({(t['name'], t['node_id'][:8]) for t in data_tasks})}"
    )

    # Complete results in the bucket: no atomic rename there, and the workers read what the driver wrote.
    document = _read_json(cluster.endpoint, "runs/placed/results.json")
    assert document["status"] == "finished"
    assert [s["source"] for s in document["steps"]] == ["trained", "trained"]
    assert _non_finite(document) == [], "a one-class step leaves no NaN/inf in results.json"
    s3 = _s3(cluster.endpoint)
    for path in (
        "config.yaml",
        "step_0/_COMPLETE",
        "step_0/model.pt",
        "step_0/instances.parquet",
        "step_1/_COMPLETE",
        "step_1/model.pt",
        "step_1/pseudo/_COMPLETE",
        "../cache/step0",
    ):
        key = os.path.normpath(f"{BUCKET}/runs/placed/{path}")
        assert s3.get_file_info(key).type != pafs.FileType.NotFound, f"s3://{key} missing"

    # Complete MLflow runs behind the server, artifacts in the bucket, no NaN in any metric's history.
    client = mlflow.MlflowClient(cluster.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("eir-synthetic-19-1").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"placed", "placed/step_0", "placed/step_1"} <= set(by_name), sorted(by_name)
    assert all(by_name[n].info.status == "FINISHED" for n in ("placed", "placed/step_0", "placed/step_1"))
    assert "mIoU_all" in by_name["placed/step_1"].data.metrics and "loss" in by_name["placed/step_1"].data.metrics
    for run in runs:
        for key in run.data.metrics:
            history = [m.value for m in client.get_metric_history(run.info.run_id, key)]
            assert all(math.isfinite(v) for v in history), f"{run.info.run_name}: {key} = {history}"
    assert client.list_artifacts(by_name["placed/step_1"].info.run_id), "step artifacts reached the store"
    artifacts = s3.get_file_info(pafs.FileSelector(f"{BUCKET}/mlflow", recursive=True))
    assert any(info.type == pafs.FileType.File for info in artifacts), "the MLflow server keeps them in the bucket"

    # Nothing on either node's disk: the job's working directory and Ray's files are in these temp dirs.
    nodes = [cluster.head, *cluster.workers]
    assert _run_outputs_on_disk(*(n.temp_dir for n in nodes)) == []


def test_a_failed_job_exits_1_with_its_message_and_no_wait_returns_at_once(cluster: Cluster) -> None:
    """A job that fails on the cluster (its config file does not exist there), then a --no-wait submission."""
    failed = _submit(cluster, ["experiments/missing.yaml"], wait=True, timeout=300)
    assert failed.returncode == 1, (failed.stdout + failed.stderr)[-4000:]
    assert re.search(
        r"job raysubmit_\w+ FAILED: .*config file experiments/missing\.yaml does not exist", failed.stderr, re.DOTALL
    ), failed.stderr  # the message ends with the job's last log lines
    detached = _submit(cluster, ["experiments/missing.yaml"], wait=False, timeout=300)
    assert detached.returncode == 0, (detached.stdout + detached.stderr)[-4000:]
    assert "not waiting" in detached.stdout and "Running entrypoint" not in detached.stdout
    assert final_job_status(cluster.address, TOKEN, _job_id(detached), timeout_s=120) == "FAILED"
    assert TOKEN not in failed.stdout + failed.stderr + detached.stdout + detached.stderr


def _non_finite(value, where: str = "") -> list[str]:
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in _non_finite(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [bad for i, item in enumerate(value) for bad in _non_finite(item, f"{where}[{i}]")]
    return [where] if isinstance(value, float) and not math.isfinite(value) else []


def _a_checkpoint_is_registered(s3: pafs.S3FileSystem, train_dir: str) -> bool:
    """Whether Ray Train's controller has registered a checkpoint of the step (what a restart resumes from).

    A checkpoint file in the bucket is not enough: the worker uploads it before it reports it, and the
    controller registers it when it next polls the workers; a node lost in between restarts the step from
    scratch (seen once, on a loaded machine). The controller persists each registration in its snapshot file.
    """
    selector = pafs.FileSelector(train_dir, recursive=True, allow_not_found=True)
    for info in s3.get_file_info(selector):
        if info.base_name == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME:
            with s3.open_input_stream(info.path) as stream:
                return json.loads(stream.read()).get("latest_checkpoint_result") is not None
    return False


def test_a_lost_node_is_replaced_and_the_step_resumes_from_its_checkpoint(
    cluster: Cluster, tmp_path: Path, record_property
) -> None:
    """The trainer node's raylet is killed once step 0's first epoch checkpoint is registered; a new node joins.

    Step 0 has 8 epochs so that, on an idle machine too (1–2 s per epoch), the kill lands inside step 0.
    """
    run = "node_lost"
    submitted = _submit(
        cluster, _run_args(run, "15-5", "train.epochs=8", "train.max_failures=1"), wait=False, timeout=300
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = _job_id(submitted)
    s3 = _s3(cluster.endpoint)
    deadline = time.monotonic() + 600
    while not _a_checkpoint_is_registered(s3, f"{BUCKET}/runs/{run}/step_0/train"):
        status = dashboard_get(cluster.address, f"/api/jobs/{job_id}", TOKEN)["status"]
        assert status in ("PENDING", "RUNNING"), f"the job ended ({status}) before its first checkpoint"
        assert time.monotonic() < deadline, "no epoch checkpoint within 600 s"
        time.sleep(0.5)
    lost_id = next(iter(cluster.node_ids() - {cluster.head_node_id}))
    killed_at = time.time()
    os.kill(cluster.workers[-1].raylet_pid(), signal.SIGKILL)  # the machine is gone: its raylet and its workers
    cluster.add_trainer_node(tmp_path / "node-3.log")
    ray_job = dashboard_get(cluster.address, f"/api/jobs/{job_id}", TOKEN)["job_id"]
    while not any(
        a["class_name"] == "RayTrainWorker"
        and a["state"] == "ALIVE"
        and a["node_id"] not in (lost_id, cluster.head_node_id)
        for a in _state(cluster, "actors", ray_job)
    ):
        assert time.monotonic() < deadline + 300, "no Train worker came back within the test's time"
        time.sleep(0.5)
    recovery_s = time.time() - killed_at
    record_property("node_loss_recovery_s", round(recovery_s, 1))
    print(f"node lost → a Train worker alive on the replacement node after {recovery_s:.1f} s")

    assert final_job_status(cluster.address, TOKEN, job_id, timeout_s=900) == "SUCCEEDED", dashboard_get(
        cluster.address, f"/api/jobs/{job_id}", TOKEN
    ).get("message", "")
    document = _read_json(cluster.endpoint, f"runs/{run}/results.json")
    assert document["status"] == "finished"
    assert [s["checkpoint_resumes"] for s in document["steps"]] == [1, 0], "step 0 resumed once, step 1 never"
    trainers = [a for a in _state(cluster, "actors", ray_job) if a["class_name"] == "RayTrainWorker"]
    replacement = cluster.node_ids() - {cluster.head_node_id}
    assert lost_id not in replacement and len(replacement) == 1, "the lost node is dead, its replacement alive"
    placed = {a["node_id"] for a in trainers}
    assert placed == {lost_id, *replacement}, "step 0 began on the lost node, resumed (and step 1 ran) on the new one"
