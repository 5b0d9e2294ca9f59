"""From (dataset, root, split) to a prepared dataset: explicit prepare and the implicit ingest cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from eir import storage
from eir.data import prepare
from eir.data.base import DatasetError
from eir.data.ingest import Manifest, source_fingerprint
from eir.data.prepare import ensure_prepared, prepare_split, synthetic_root
from eir.data.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("prepare") / "raw", 30, image_size=48, progress=False)


@pytest.fixture(scope="module")
def prepared_out(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`launch.py prepare`'s layout: OUT/train and OUT/val."""
    out = tmp_path_factory.mktemp("prepared")
    for split in ("train", "val"):
        prepare_split("synthetic", raw, split, storage.resolve(out / split), progress=False)
    return out


def refuse_to_prepare(*args: object, **kwargs: object) -> Manifest:
    raise AssertionError("prepare_split was called although a prepared dataset exists")


def test_raw_root_is_ingested_once_into_the_cache(raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output_root = storage.resolve(tmp_path / "outputs")
    manifest = ensure_prepared("synthetic", str(raw), "train", output_root, progress=False)
    fingerprint = source_fingerprint(raw, "train", {"dataset": "synthetic", "image_scale": 1.0})
    expected = tmp_path / "outputs" / "datasets" / f"synthetic-train-{fingerprint}"
    assert manifest.location.path == str(expected)
    assert (manifest.split, manifest.num_rows, manifest.source_fingerprint) == ("train", 24, fingerprint)
    assert manifest.source == str(raw.resolve())

    monkeypatch.setattr(prepare, "prepare_split", refuse_to_prepare)
    assert ensure_prepared("synthetic", str(raw), "train", output_root, progress=False) == manifest
    assert [p.name for p in (tmp_path / "outputs" / "datasets").iterdir()] == [expected.name]


def test_image_scale_gets_its_own_cache_entry(raw: Path, tmp_path: Path) -> None:
    output_root = storage.resolve(tmp_path)
    full = ensure_prepared("synthetic", str(raw), "val", output_root, progress=False)
    half = ensure_prepared("synthetic", str(raw), "val", output_root, image_scale=0.5, progress=False)
    assert full.location.path != half.location.path
    assert (full.image_scale, half.image_scale) == (1.0, 0.5)
    assert full.checksum != half.checksum


def test_synthetic_without_root_is_generated_then_ingested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output_root = storage.resolve(tmp_path)
    manifest = ensure_prepared("synthetic", "", "val", output_root, synthetic=(20, 48, 3), progress=False)
    raw = synthetic_root(output_root, 20, 48, 3)
    assert raw == tmp_path / "datasets" / "synthetic-raw-n20-s48-seed3"
    assert (raw / "SYNTHETIC.json").is_file()
    assert manifest.num_rows == 4 and manifest.source == str(raw)
    monkeypatch.setattr(prepare, "prepare_split", refuse_to_prepare)
    assert ensure_prepared("synthetic", "", "val", output_root, synthetic=(20, 48, 3), progress=False) == manifest


def test_a_prepared_folder_is_used_as_is(prepared_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare, "prepare_split", refuse_to_prepare)
    output_root = storage.resolve(tmp_path)
    direct = ensure_prepared("synthetic", str(prepared_out / "train"), "train", output_root)
    assert direct.location.path == str(prepared_out / "train") and direct.split == "train"
    # The parent of `launch.py prepare`'s split folders works too, locally and as a URI.
    assert ensure_prepared("synthetic", str(prepared_out), "val", output_root).location.path == str(prepared_out / "val")
    by_uri = ensure_prepared("synthetic", f"file://{prepared_out}", "val", output_root)
    assert by_uri.location.path == str(prepared_out / "val") and by_uri.split == "val"
    assert list(tmp_path.iterdir()) == []  # nothing cached, nothing generated


def test_the_wrong_split_of_a_prepared_folder_is_an_error(prepared_out: Path, tmp_path: Path) -> None:
    output_root = storage.resolve(tmp_path)
    with pytest.raises(DatasetError, match=r"train.* is the prepared 'train' split, but split 'val' was asked for"):
        ensure_prepared("synthetic", str(prepared_out / "train"), "val", output_root)
    with pytest.raises(DatasetError, match="is the prepared 'train' split, but split 'val'"):
        ensure_prepared("synthetic", f"file://{prepared_out}/train", "val", output_root)


def test_a_uri_that_is_not_prepared_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is not a prepared dataset"):
        ensure_prepared("camvid", f"file://{tmp_path}/nothing", "train", storage.resolve(tmp_path))


def test_missing_roots_are_errors_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "CamVid"
    with pytest.raises(DatasetError, match=rf"dataset root {missing} does not exist"):
        prepare_split("camvid", missing, "train", storage.resolve(tmp_path / "out"), progress=False)
    with pytest.raises(DatasetError, match=rf"{missing} does not exist"):
        ensure_prepared("camvid", str(missing), "train", storage.resolve(tmp_path))
    with pytest.raises(DatasetError, match="dataset.root is empty"):
        ensure_prepared("camvid", "", "train", storage.resolve(tmp_path))


def test_synthetic_generation_needs_local_output(tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    remote = storage.resolve("bucket/outputs", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    with pytest.raises(DatasetError, match="generated on local disk"):
        ensure_prepared("synthetic", "", "train", remote, synthetic=(20, 48, 0), progress=False)


def test_an_object_store_cache_entry_cut_short_is_replaced(raw: Path, tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    output_root = storage.resolve("bucket/outputs", filesystem=fs)
    fingerprint = source_fingerprint(raw, "val", {"dataset": "synthetic", "image_scale": 1.0})
    entry = tmp_path / "bucket" / "outputs" / "datasets" / f"synthetic-val-{fingerprint}"
    entry.mkdir(parents=True)
    (entry / "part-00000.parquet").write_bytes(b"half a shard")  # copied before the crash; no _COMPLETE
    manifest = ensure_prepared("synthetic", str(raw), "val", output_root, progress=False)
    assert manifest.location.path == f"bucket/outputs/datasets/synthetic-val-{fingerprint}"
    assert manifest.num_rows == 6
    assert sorted(p.name for p in entry.iterdir()) == ["_COMPLETE", "manifest.json", "part-00000.parquet"]
    assert (entry / "part-00000.parquet").stat().st_size > len(b"half a shard")
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temp folder left behind
