"""Where MLflow state goes: the tracking store and the artifact root, for local and remote output dirs."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from eir import storage
from eir.tracking import artifact_location, tracking_uri


def remote_root(tmp_path: Path) -> storage.Location:
    return storage.resolve(str(tmp_path / "bucket"), filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))


def test_local_root_keeps_database_and_artifacts_beside_the_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = storage.resolve(str(tmp_path))
    assert tracking_uri(root) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert artifact_location(tracking_uri(root), root) == f"file://{tmp_path / 'mlartifacts'}"


def test_remote_root_needs_a_tracking_uri(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        tracking_uri(remote_root(tmp_path))


def test_remote_root_with_sqlite_puts_artifacts_beside_the_database(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    assert artifact_location(uri, remote_root(tmp_path)) == f"file://{tmp_path / 'db' / 'mlartifacts'}"
    assert artifact_location("http://127.0.0.1:5000", remote_root(tmp_path)) is None
