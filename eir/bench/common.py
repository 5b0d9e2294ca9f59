"""What every benchmark result file records: where, when, with what, from which commit."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import mlflow
import pyarrow
import ray
import torch
import torchvision

from eir import storage
from eir.train.results import git_dirty, git_sha

RESULTS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "results"


def environment() -> dict[str, Any]:
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "ray": ray.__version__,
            "pyarrow": pyarrow.__version__,
            "mlflow": mlflow.__version__,
        },
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),  # true: the code differed from that commit when this ran
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def results_path(name: str, quick: bool = False) -> Path:
    return RESULTS_DIR / f"{name}{'.quick' if quick else ''}.json"


def write_results(path: Path, document: dict[str, Any]) -> None:
    storage.write_json_atomic(storage.resolve(path), document)


def read_results(path: Path) -> dict[str, Any] | None:
    return storage.read_json(storage.resolve(path)) if path.is_file() else None
