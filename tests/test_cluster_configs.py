"""cluster/: the launcher configs and KubeRay manifests stay valid and give a real cluster what it needs.

The configs cannot be launched here; what can drift silently is checked instead: the YAML parses,
Ray's own launcher validation accepts it, every node installs the same torch/torchvision/ray as
pyproject.toml, the images carry the same Ray version, and the RayJob runs an experiment that exists.
And what a multi-node run needs from the cluster: workers reach the bucket with credentials of their own
that leave the head's alone (AWS: Ray's IAM bootstrap run against moto's IAM; GCP: the service accounts),
GPU nodes get an NVIDIA driver that runs torch's CUDA 13 build, and `ray up` copies exactly what
`launch.py submit` uploads (real rsync against Ray's own packager, where rsync is installed).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import moto
import pytest
import yaml
from ray._private.runtime_env.packaging import create_package
from ray.autoscaler._private.aws import config as ray_aws_config
from ray.autoscaler._private.command_runner import SSHCommandRunner
from ray.autoscaler._private.util import prepare_config, validate_config

from eir.submit import EXCLUDES, SECRET_EXCLUDES, upload_excludes

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
PINNED = ("torch", "torchvision", "ray")
# torch 2.14.1 installs from PyPI as a CUDA 13 build; CUDA 13.0 needs a Linux driver of branch R580 or newer
# (its release notes: >= 580.65.06), and a 570 driver cannot load it.
MIN_NVIDIA_DRIVER = 580
WORKER_IDENTITY = "eir-ray-worker"  # the AWS instance profile (and its role) and the GCP service account of workers
GCP_DEFAULT_HEAD_ACCOUNT = "ray-autoscaler-sa-v1"  # ray/autoscaler/_private/gcp/config.py DEFAULT_SERVICE_ACCOUNT_ID
STORAGE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"


def _pyproject_dependencies() -> list[str]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def _pins(requirements: list[str]) -> dict[str, str]:
    """name -> version for the `name[extras]==version` requirements among `requirements`."""
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;,]+)", requirement.strip())
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _pip_requirements(command: str) -> list[str]:
    """The requirement arguments of the `pip install` in a shell command line (flags and paths dropped)."""
    segment = next(part for part in re.split(r"&&|;", command) if "pip install" in part)
    words = shlex.split(segment)
    return [w for w in words[words.index("install") + 1 :] if not w.startswith(("-", "~", "/", "."))]


def _containers(pod_specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for spec in pod_specs for c in spec["template"]["spec"]["containers"]]


def _cluster_specs(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _group_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _cluster_specs(doc)
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def test_every_cluster_yaml_parses() -> None:
    paths = sorted(CLUSTER.rglob("*.yaml"))
    assert {p.relative_to(CLUSTER).as_posix() for p in paths} >= {
        "aws.yaml",
        "gcp.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
    }
    for path in paths:
        assert isinstance(_load(path), dict), f"{path} is not a YAML mapping"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_has_the_required_keys_and_a_gpu_node_type(path: Path) -> None:
    config = _load(path)
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "max_workers",
    ):
        assert config.get(key), f"{path.name}: {key} is missing or empty"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [name for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, f"{path.name}: no node type declares a GPU"
    for name in gpu_types:
        assert types[name]["max_workers"] > types[name].get("min_workers", 0), f"{path.name}: {name} cannot autoscale"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=0.0.0.0" in head_start


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_ray_accepts_the_launcher_config(path: Path) -> None:
    """Ray's own `ray up` validation: defaults filled in for the provider, then its JSON schema and rules."""
    validate_config(prepare_config(_load(path)))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_setup_installs_the_pyproject_pins_and_the_project(path: Path) -> None:
    expected = _pins(_pyproject_dependencies())
    assert set(PINNED) <= set(expected), f"pyproject.toml no longer pins {PINNED}"
    commands = _load(path)["setup_commands"]
    installed = _pins([r for c in commands if "pip install" in c for r in _pip_requirements(c)])
    assert {name: installed.get(name) for name in PINNED} == {name: expected[name] for name in PINNED}
    assert any(re.search(r"pip install .*-e ~/eir\b", c) for c in commands), (
        f"{path.name}: the project is not installed"
    )
    assert _load(path)["file_mounts"].get("~/eir") == ".", f"{path.name}: the repository is not mounted at ~/eir"


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifest_has_a_head_and_an_autoscaling_gpu_group(name: str, kind: str) -> None:
    """The keys KubeRay needs to create the cluster, and a GPU group the in-tree autoscaler may grow."""
    doc = _load(CLUSTER / "kuberay" / name)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind)
    assert doc["metadata"]["name"]
    spec = _cluster_specs(doc)
    assert spec["enableInTreeAutoscaling"] is True, f"{name}: the GPU group would never scale"
    assert all(c["name"] and c["image"] for c in _containers([spec["headGroupSpec"]])), f"{name}: no head container"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if all(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in _containers([g]))
    ]
    assert gpu_groups, f"{name}: no worker group limits nvidia.com/gpu"
    for group in gpu_groups:
        assert group["groupName"]
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], f"{name}: {group['groupName']} cannot autoscale"
        for container in _containers([group]):  # Kubernetes refuses a GPU request that differs from the limit
            resources = container["resources"]
            assert (
                resources.get("requests", {}).get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"])
                == resources["limits"]["nvidia.com/gpu"]
            )


def test_kuberay_images_match_the_pyproject_ray_pin() -> None:
    ray_version = _pins(_pyproject_dependencies())["ray"]
    for path in (CLUSTER / "kuberay").glob("*.yaml"):
        doc = _load(path)
        assert _cluster_specs(doc)["rayVersion"] == ray_version, f"{path.name}: rayVersion"
        images = [c["image"] for c in _containers(_group_specs(doc))]
        assert images, f"{path.name}: no containers"
        for image in images:
            name, tag = image.rsplit(":", 1)
            assert name == "rayproject/ray" and tag.split("-")[0] == ray_version, f"{path.name}: image {image}"


def test_kuberay_installs_exactly_the_pyproject_dependencies() -> None:
    """Pods get the project's dependencies from the manifests, so the lists must equal pyproject.toml's."""
    expected = sorted(_pyproject_dependencies())
    cluster = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    for container in _containers(_group_specs(cluster)):
        command = " ".join(container["args"])
        assert "$KUBERAY_GEN_RAY_START_CMD" in command, f"{container['name']}: KubeRay's ray start is not run"
        assert sorted(_pip_requirements(command)) == expected, f"raycluster.yaml {container['name']}"
    job = _load(CLUSTER / "kuberay" / "rayjob.yaml")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert sorted(runtime_env["pip"]) == expected, "rayjob.yaml runtimeEnvYAML pip"


def test_kuberay_enables_token_authentication() -> None:
    for path in (CLUSTER / "kuberay").glob("*.yaml"):
        assert _cluster_specs(_load(path))["authOptions"] == {"mode": "token"}, path.name


def test_rayjob_runs_an_existing_experiment_with_shared_storage() -> None:
    job = _load(CLUSTER / "kuberay" / "rayjob.yaml")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "launch.py", "run"]
    assert (REPO / words[3]).is_file() and words[3].startswith("experiments/"), f"no experiment file {words[3]}"
    overrides = dict(w.split("=", 1) for w in words[4:])
    assert overrides["run.output_dir"].startswith(("s3://", "gs://")), "the run must write to shared storage"


def _worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def _head_launch_config(bootstrapped: dict[str, Any]) -> dict[str, Any]:
    """The node_config `ray up` launches the head with: the provider bootstrap's defaults (`head_node`) updated
    by the head type's own node_config (ray/autoscaler/_private/commands.py, get_or_create_head_node)."""
    merged = copy.deepcopy(bootstrapped.get("head_node", {}))
    merged.update(bootstrapped["available_node_types"][bootstrapped["head_node_type"]]["node_config"])
    return merged


@pytest.fixture
def aws_default_profile_arn(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto AWS account that already holds Ray's default instance profile, as after any earlier `ray up`
    (creating it would make Ray wait twice 15 s for IAM to propagate); yields the profile's ARN."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_IAM"):
        monkeypatch.delenv(name, raising=False)
    ray_aws_config.resource_cache.cache_clear()  # Ray keeps its boto3 resources: none may outlive the mock
    with moto.mock_aws():
        iam = boto3.client("iam", region_name="us-west-2")
        name = ray_aws_config.DEFAULT_RAY_INSTANCE_PROFILE
        iam.create_role(
            RoleName=name, AssumeRolePolicyDocument=(CLUSTER / "aws-iam" / "ec2-trust-policy.json").read_text()
        )
        iam.create_instance_profile(InstanceProfileName=name)
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        yield iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Arn"]
    ray_aws_config.resource_cache.cache_clear()


def test_aws_head_keeps_rays_profile_and_every_worker_gets_the_bucket_profile(aws_default_profile_arn: str) -> None:
    """Ray's IAM step of `ray up` (bootstrap_aws -> _configure_iam_role) on aws.yaml: the head launches with Ray's
    default profile (EC2 rights to start and stop workers), the workers with the bucket profile, which Ray
    neither replaces nor shares with the head."""
    config = prepare_config(_load(CLUSTER / "aws.yaml"))
    workers = _worker_types(config)
    assert workers
    for name, node_type in workers.items():
        assert node_type["node_config"].get("IamInstanceProfile") == {"Name": WORKER_IDENTITY}, name
    assert WORKER_IDENTITY != ray_aws_config.DEFAULT_RAY_INSTANCE_PROFILE

    bootstrapped = ray_aws_config._configure_iam_role({**copy.deepcopy(config), "head_node": {}})
    assert _head_launch_config(bootstrapped)["IamInstanceProfile"] == {"Arn": aws_default_profile_arn}, (
        "aws.yaml: the head no longer launches with Ray's default instance profile (its EC2 rights)"
    )
    assert _worker_types(bootstrapped) == workers

    # Why the head names no profile: with one, Ray gives it nothing of its own, so the head would run as the
    # bucket-only profile and could not launch a single worker.
    trapped = copy.deepcopy(config)
    trapped["available_node_types"][config["head_node_type"]]["node_config"]["IamInstanceProfile"] = {
        "Name": WORKER_IDENTITY
    }
    head = _head_launch_config(ray_aws_config._configure_iam_role({**trapped, "head_node": {}}))
    assert head["IamInstanceProfile"] == {"Name": WORKER_IDENTITY}


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def test_aws_worker_policy_reads_and_writes_one_bucket_and_nothing_else() -> None:
    """cluster/aws-iam/: the workers' role may list, read, write and delete in one bucket (what pyarrow's S3
    filesystem does for run.output_dir and dataset.root; IAM authorises HeadBucket as s3:ListBucket), the head
    may pass that role to the instances it launches, and EC2 may assume it. moto's IAM accepts each document."""
    policies = CLUSTER / "aws-iam"
    statements = json.loads((policies / "worker-s3-policy.json").read_text())["Statement"]
    resources = {r for st in statements for r in _as_list(st["Resource"])}
    buckets = {r.removeprefix("arn:aws:s3:::").split("/", 1)[0] for r in resources}
    assert len(buckets) == 1, f"the worker policy names {sorted(buckets)}: one bucket expected"
    bucket_arn = f"arn:aws:s3:::{buckets.pop()}"
    assert resources == {bucket_arn, f"{bucket_arn}/*"}
    allowed: dict[str, set[str]] = {}
    for statement in statements:
        assert statement["Effect"] == "Allow" and not {"NotAction", "NotResource"} & set(statement)
        for action in _as_list(statement["Action"]):
            allowed.setdefault(action, set()).update(_as_list(statement["Resource"]))
    read_write = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    assert set(allowed) == {"s3:ListBucket", *read_write}, f"not read/write on the bucket: {sorted(allowed)}"
    assert allowed["s3:ListBucket"] == {bucket_arn}
    assert all(allowed[action] == {f"{bucket_arn}/*"} for action in read_write)

    (pass_role,) = json.loads((policies / "head-pass-worker-role.json").read_text())["Statement"]
    assert (pass_role["Effect"], pass_role["Action"]) == ("Allow", "iam:PassRole")
    assert pass_role["Resource"].endswith(f":role/{WORKER_IDENTITY}")
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    (trust,) = json.loads((policies / "ec2-trust-policy.json").read_text())["Statement"]
    assert trust == {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}

    readme = (CLUSTER / "README.md").read_text()
    for path in sorted(policies.glob("*.json")):
        assert f"cluster/aws-iam/{path.name}" in readme, f"cluster/README.md does not say how to use {path.name}"
    with moto.mock_aws():  # the README's commands, against moto's IAM: each document is well-formed
        iam = boto3.client("iam", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
        iam.create_role(
            RoleName=WORKER_IDENTITY, AssumeRolePolicyDocument=(policies / "ec2-trust-policy.json").read_text()
        )
        for role, name, document in (
            (WORKER_IDENTITY, "eir-bucket", "worker-s3-policy.json"),
            (WORKER_IDENTITY, "eir-pass-worker-role", "head-pass-worker-role.json"),
        ):
            iam.put_role_policy(RoleName=role, PolicyName=name, PolicyDocument=(policies / document).read_text())


def test_gcp_head_keeps_rays_account_and_every_worker_runs_as_the_bucket_account() -> None:
    """Ray gives the head its own service account (compute admin: it launches the workers) unless the head's
    node_config names one, which then replaces it; workers get only what their node_config names."""
    config = _load(CLUSTER / "gcp.yaml")
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert "serviceAccounts" not in head, f"gcp.yaml: a head service account replaces Ray's {GCP_DEFAULT_HEAD_ACCOUNT}"
    project = config["provider"]["project_id"]
    expected = [{"email": f"{WORKER_IDENTITY}@{project}.iam.gserviceaccount.com", "scopes": [STORAGE_SCOPE]}]
    workers = _worker_types(config)
    assert workers
    for name, node_type in workers.items():
        assert node_type["node_config"].get("serviceAccounts") == expected, f"gcp.yaml {name}"
    assert WORKER_IDENTITY != GCP_DEFAULT_HEAD_ACCOUNT


def test_gcp_images_ship_a_driver_that_runs_the_cuda_13_torch() -> None:
    """Every node boots a Deep Learning VM family whose name carries its NVIDIA driver branch (R580+), and the
    GPU nodes ask the image to install that driver."""
    config = _load(CLUSTER / "gcp.yaml")
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        (image,) = [d["initializeParams"]["sourceImage"] for d in node_config["disks"] if d.get("boot")]
        match = re.fullmatch(
            r"projects/deeplearning-platform-release/global/images/family/[a-z0-9-]+-nvidia-(\d+)", image
        )
        assert match and int(match.group(1)) >= MIN_NVIDIA_DRIVER, f"gcp.yaml {name}: {image} (driver R580+ needed)"
        if node_type["resources"].get("GPU"):
            metadata = {item["key"]: item["value"] for item in node_config["metadata"]["items"]}
            assert metadata.get("install-nvidia-driver") == "True", f"gcp.yaml {name}: the driver is not installed"


def test_kuberay_gpu_workers_refuse_a_driver_older_than_r580(tmp_path: Path) -> None:
    """Each GPU worker container starts with the same driver check, run here by bash against a stand-in
    nvidia-smi: it passes R580 and newer, stops older or missing drivers with a message naming the version."""
    checks = set()
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for group in _cluster_specs(_load(CLUSTER / "kuberay" / name))["workerGroupSpecs"]:
            for container in _containers([group]):
                if int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1:
                    check = container["args"][0].split(" && ", 1)[0]
                    # KubeRay adds its own `ray start` after args only when they do not contain one (pod.go).
                    assert "nvidia-smi" in check and "ray start" not in check, f"{name} {group['groupName']}"
                    checks.add(check)
    assert len(checks) == 1, "the GPU workers' driver checks differ"
    check = checks.pop()

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answer = tmp_path / "answer"
    nvidia_smi = bin_dir / "nvidia-smi"  # first on PATH, so a real one on this machine is not asked
    nvidia_smi.write_text(f'#!/bin/sh\ncat "{answer}"\nexit "$(cat "{answer}.status")"\n')
    nvidia_smi.chmod(0o755)

    def run(output: str, status: int = 0) -> subprocess.CompletedProcess[str]:
        answer.write_text(output)
        answer.with_suffix(".status").write_text(str(status))
        env = {"PATH": f"{bin_dir}:{os.defpath}"}
        return subprocess.run(["bash", "-c", check], env=env, capture_output=True, text=True, timeout=30, check=False)

    for output in ("580.65.06\n", "595.91.07\n595.91.07\n"):
        assert run(output).returncode == 0, output
    for output, status in (("570.172.08\n", 0), ("NVIDIA-SMI has failed because it couldn't communicate\n", 9)):
        result = run(output, status)
        assert result.returncode != 0 and "R580" in result.stderr and output.split()[0] in result.stderr, result


def _ignore_patterns(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_ray_up_excludes_what_submit_excludes(path: Path) -> None:
    """`ray up` reads the exclude patterns from /.rayignore and the .gitignore files (rsync_filter), and
    /.rayignore holds eir/submit.py's lists; nothing goes in rsync_exclude (see the SSH key test below)."""
    assert _ignore_patterns(REPO / ".rayignore") == [*EXCLUDES, *SECRET_EXCLUDES], ".rayignore: not eir/submit.py's"
    config = _load(path)
    assert config["rsync_filter"] == [".gitignore", ".rayignore"], f"{path.name}: rsync_filter"
    assert not config.get("rsync_exclude"), f"{path.name}: rsync_exclude also filters the head's SSH key mount"


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _rsync(filter_args: list[str], source: Path | str, target: Path | str) -> None:
    subprocess.run(["rsync", "-a", *filter_args, str(source), str(target)], check=True, timeout=60)


def _ray_up_rsync_args(config: dict[str, Any]) -> list[str]:
    """The filter arguments `ray up` gives rsync for this config (Ray's own builder; it reads no state)."""
    options = {"rsync_exclude": config.get("rsync_exclude"), "rsync_filter": config.get("rsync_filter")}
    return SSHCommandRunner._create_rsync_filter_args(None, options)


NEEDS_RSYNC = pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync, which `ray up` copies with")


@NEEDS_RSYNC
@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_ray_up_copies_exactly_what_submit_uploads(path: Path, tmp_path: Path) -> None:
    """rsync with the config's filter arguments copies the same files
    as Ray's packager keeps for a submitted job, in a tree with a file, a nested file and a folder named after
    every exclude pattern, code named like them (eir/data, eir/report.py), and .gitignore files (the
    repository's, a nested one, and a negation that tries to bring a secret back)."""
    repo = tmp_path / "repo"
    for pattern in [*EXCLUDES, *SECRET_EXCLUDES]:
        name = pattern.lstrip("/").replace("**/", "").replace("*", "x")
        for relative in (name, f"nested/{name}", f"as_folder/{name}/inside.txt"):
            _touch(repo / relative)
    kept = {"launch.py", "eir/data/ingest.py", "eir/report.py", "tests/data/test_ingest.py", "sub/kept.txt"}
    for relative in [*kept, "logs/run.log", "sub/local.txt"]:
        _touch(repo / relative)
    shutil.copy(REPO / ".rayignore", repo / ".rayignore")
    (repo / ".gitignore").write_text((REPO / ".gitignore").read_text() + "*.log\n!.env\n")
    (repo / "sub" / ".gitignore").write_text("local.txt\n")

    package = tmp_path / "job.zip"
    create_package(str(repo), package, include_gitignore=True, excludes=upload_excludes(repo))
    with zipfile.ZipFile(package) as archive:
        uploaded = {name for name in archive.namelist() if not name.endswith("/")}
    node = tmp_path / "node"
    _rsync(_ray_up_rsync_args(_load(path)), f"{repo}/", f"{node}/")  # Ray adds the trailing / to a folder mount
    copied = _files(node)
    assert copied == uploaded, f"only rsync: {sorted(copied - uploaded)}; only submit: {sorted(uploaded - copied)}"
    left_out = {".env", "data", "nested/id_rsax", "logs/run.log", "sub/local.txt", "as_folder/.ssh/inside.txt"}
    assert kept <= copied and not left_out & copied


@NEEDS_RSYNC
@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_ray_up_still_copies_its_single_file_mounts(path: Path, tmp_path: Path) -> None:
    """`ray up` rsyncs each file mount with the same filter arguments: the cluster token, the head's bootstrap
    config and the SSH key the head uses to reach the workers (Ray's own `~/.ssh/ray-autoscaler_<region>.pem`
    or a user's `id_rsa`) must all arrive. The same secret patterns as rsync_exclude would drop the key."""
    config = _load(path)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    home = tmp_path / "home"
    mounts = {  # target on the node: source here (ray/autoscaler/_private/commands.py _set_up_config_for_head_node)
        ".ray/auth_token": home / ".ray" / "auth_token",
        "ray_bootstrap_config.yaml": tmp_path / "tmp" / "ray-bootstrap-x2k9q1",
        "ray_bootstrap_key.pem": home / ".ssh" / "ray-autoscaler_us-west-2.pem",
        "user_key/ray_bootstrap_key.pem": home / ".ssh" / "id_rsa",
    }
    node = tmp_path / "node_home"
    for target, source in mounts.items():
        _touch(source)
        (node / target).parent.mkdir(parents=True, exist_ok=True)  # Ray runs `mkdir -p` on the target's folder
        _rsync(_ray_up_rsync_args(config), source, node / target)
    assert _files(node) == set(mounts)

    as_rsync_exclude = {"rsync_exclude": [*EXCLUDES, *SECRET_EXCLUDES], "rsync_filter": config["rsync_filter"]}
    _rsync(_ray_up_rsync_args(as_rsync_exclude), mounts["ray_bootstrap_key.pem"], tmp_path / "key.pem")
    assert not (tmp_path / "key.pem").exists(), "rsync no longer filters a single file by its name"
