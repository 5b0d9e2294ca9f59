"""cluster/: the launcher configs and KubeRay manifests stay valid and install what pyproject.toml pins.

The configs cannot be launched here; what can drift silently is checked instead: the YAML parses,
Ray's own launcher validation accepts it, every node installs the same torch/torchvision/ray as
pyproject.toml, the images carry the same Ray version, and the RayJob runs an experiment that exists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
PINNED = ("torch", "torchvision", "ray")


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
    from ray.autoscaler._private.util import prepare_config, validate_config

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
