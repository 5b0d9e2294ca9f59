"""Ingest: raw split -> Parquet shards + manifest, byte-exact, idempotent and atomic."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eir import storage
from eir.data.base import DatasetError, Sample, SegmentationReader
from eir.data.camvid import CamVidReader
from eir.data.ingest import (
    MANIFEST,
    Manifest,
    ingest,
    is_prepared,
    read_manifest,
    read_metadata,
    read_rows,
    source_fingerprint,
)
from eir.data.registry import open_reader
from eir.data.synthetic import generate_synthetic
from eir.storage import COMPLETE_MARKER, Location

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
NUM_TRAIN = 24  # generate_synthetic(30 images) keeps 20% (6) for val


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("ingest") / "raw", 30, image_size=48, progress=False)


@pytest.fixture(scope="module")
def prepared(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """The train split ingested once, in shards of 10 rows; tests must not modify it."""
    out = storage.resolve(tmp_path_factory.mktemp("prepared") / "train")
    return run_ingest(open_reader("synthetic", raw, "train"), out, raw, shard_rows=10, fingerprint="fp-1")


def run_ingest(reader: SegmentationReader, out: Location, raw: Path, **kwargs: object) -> Manifest:
    kwargs.setdefault("split", "train")
    return ingest(reader, out, source=str(raw), progress=False, **kwargs)  # type: ignore[arg-type]


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image)


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def leftovers(parent: Path) -> list[str]:
    """Temporary ingest folders (`.<name>.tmp-*`) left in parent."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


class FailingReader(SegmentationReader):
    """Delegates to a real reader but raises on the `fail_at`-th read (1-based), like a corrupt file."""

    def __init__(self, inner: SegmentationReader, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.info = inner.info

    def ids(self) -> list[str]:
        return self.inner.ids()

    def read(self, sample_id: str) -> Sample:
        self.calls += 1
        if self.calls == self.fail_at:
            raise DatasetError(f"corrupt file for {sample_id}")
        return self.inner.read(sample_id)


class FirstIds(SegmentationReader):
    """A reader restricted to the first n ids of another (keeps real-data tests fast)."""

    def __init__(self, inner: SegmentationReader, n: int) -> None:
        self.inner, self.n = inner, n
        self.info = inner.info

    def ids(self) -> list[str]:
        return self.inner.ids()[: self.n]

    def read(self, sample_id: str) -> Sample:
        return self.inner.read(sample_id)


class EmptyReader(SegmentationReader):
    def __init__(self, info: object) -> None:
        self.info = info  # type: ignore[assignment]

    def ids(self) -> list[str]:
        return []

    def read(self, sample_id: str) -> Sample:  # pragma: no cover - never called
        raise AssertionError


# ---------------------------------------------------------------- round trip


def test_round_trip_is_byte_exact(prepared: Manifest, raw: Path) -> None:
    reader = open_reader("synthetic", raw, "train")
    table = read_rows(prepared)
    assert table.column("id").to_pylist() == reader.ids()  # split-list order
    for row in table.to_pylist():
        sample = reader.read(row["id"])
        assert row["image"] == (raw / "JPEGImages" / f"{row['id']}.png").read_bytes()
        assert row["image_format"] == "png"
        np.testing.assert_array_equal(decode(row["label"]), sample.label)
        assert row["instances"] is not None
        np.testing.assert_array_equal(decode(row["instances"]), sample.instances)
        assert (row["height"], row["width"]) == (48, 48)
        values, counts = np.unique(sample.label, return_counts=True)
        assert row["classes"] == values.tolist()
        assert row["class_pixels"] == counts.tolist()
        assert sum(row["class_pixels"]) == 48 * 48


def test_manifest_describes_the_shards(prepared: Manifest, raw: Path) -> None:
    assert prepared.num_rows == NUM_TRAIN
    assert prepared.shards == ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet")
    assert (prepared.dataset, prepared.split, prepared.image_scale) == ("synthetic", "train", 1.0)
    assert prepared.source == str(raw) and prepared.source_fingerprint == "fp-1"
    assert prepared.info.class_names[0] == "background" and prepared.info.num_classes == 20
    assert sorted(storage.list_dir(prepared.location)) == sorted([*prepared.shards, MANIFEST, COMPLETE_MARKER])
    marker = storage.read_json(prepared.location.join(COMPLETE_MARKER))
    shards = {name: storage.file_digest(prepared.location.join(name)) for name in prepared.shards}
    assert marker == {"rows": NUM_TRAIN, "checksum": prepared.checksum, "files": shards}
    again = read_manifest(prepared.location)
    assert again == prepared


def test_checksum_is_the_hash_of_label_space_and_row_contents(prepared: Manifest) -> None:
    """checksum = sha256(label space JSON, then per row sha256(sha256(id) sha256(image) sha256(label)
    sha256(instances))).
    """
    info = prepared.info
    space = {
        "class_names": list(info.class_names),
        "future_label": info.future_label,
        "background_is_class": info.background_is_class,
    }
    expected = hashlib.sha256(json.dumps(space, sort_keys=True).encode())
    for row in read_rows(prepared).to_pylist():
        row_digest = hashlib.sha256()
        for key in ("id", "image", "label", "instances"):
            value = row[key].encode() if key == "id" else row[key]
            row_digest.update(hashlib.sha256(value).digest())
        expected.update(row_digest.digest())
    assert prepared.checksum == expected.hexdigest()


def test_metadata_and_row_selection(prepared: Manifest) -> None:
    meta = read_metadata(prepared)
    assert meta.column_names == ["id", "height", "width", "classes", "class_pixels"]
    assert meta.num_rows == NUM_TRAIN
    ids = meta.column("id").to_pylist()
    picked = read_rows(prepared, [ids[15], ids[2]])
    assert picked.column("id").to_pylist() == [ids[2], ids[15]]  # manifest order, across shards
    with pytest.raises(DatasetError, match="lacks ids"):
        read_rows(prepared, ["nope"])


@pytest.mark.slow
def test_ray_data_reads_the_shards(prepared: Manifest, ray_session: None) -> None:
    import ray

    assert ray.data.read_parquet(prepared.shard_uris).count() == prepared.num_rows == NUM_TRAIN


def test_camvid_round_trip(tmp_path: Path) -> None:
    root = SHARED_DATA / "camvid" / "CamVid"
    if not root.is_dir():
        pytest.skip(f"shared CamVid fixture {root} is absent")
    reader = FirstIds(CamVidReader(root, "val"), 3)
    manifest = run_ingest(reader, storage.resolve(tmp_path / "camvid"), root, split="val")
    rows = read_rows(manifest).to_pylist()
    assert [r["id"] for r in rows] == reader.ids() and manifest.num_rows == 3
    for row in rows:
        sample = reader.read(row["id"])
        assert row["image"] == (root / "val" / f"{row['id']}.png").read_bytes()
        assert row["instances"] is None  # CamVid has no instance maps
        label = decode(row["label"])
        np.testing.assert_array_equal(label, sample.label)
        assert label.shape == (row["height"], row["width"]) == (360, 480)
        assert row["classes"] == np.unique(label).tolist()
        assert set(row["classes"]) <= set(range(12))


# ---------------------------------------------------------------- idempotence and overwrite


def test_same_fingerprint_returns_without_reading_or_writing(prepared: Manifest, raw: Path) -> None:
    folder = Path(prepared.location.path)
    before = mtimes(folder)
    reader = FailingReader(open_reader("synthetic", raw, "train"), fail_at=1)
    again = run_ingest(reader, prepared.location, raw, fingerprint="fp-1")
    assert again == prepared
    assert reader.calls == 0
    assert mtimes(folder) == before


def test_same_content_with_another_fingerprint_is_kept_and_relabelled(raw: Path, tmp_path: Path) -> None:
    """Touched or copied files (same bytes, new fingerprint): decoded once more, then never again."""
    out = storage.resolve(tmp_path / "train")
    first = run_ingest(open_reader("synthetic", raw, "train"), out, raw, fingerprint="old")
    shards_before = {k: v for k, v in mtimes(tmp_path / "train").items() if k != MANIFEST}
    moved = tmp_path / "moved-raw"  # where the "new" source lives; the reader still reads `raw`
    second = run_ingest(open_reader("synthetic", raw, "train"), out, moved, fingerprint="new")
    assert (second.checksum, second.shards, second.location) == (first.checksum, first.shards, first.location)
    assert (second.source_fingerprint, second.source) == ("new", str(moved))
    assert read_manifest(out) == second  # recorded on disk, not only returned
    assert {k: v for k, v in mtimes(tmp_path / "train").items() if k != MANIFEST} == shards_before
    assert leftovers(tmp_path) == []

    reader = FailingReader(open_reader("synthetic", raw, "train"), fail_at=1)
    assert run_ingest(reader, out, moved, fingerprint="new") == second
    assert reader.calls == 0  # the refreshed fingerprint spares the decode


def test_different_content_needs_overwrite(raw: Path, tmp_path: Path) -> None:
    out = storage.resolve(tmp_path / "data")
    train = run_ingest(open_reader("synthetic", raw, "train"), out, raw)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_ingest(open_reader("synthetic", raw, "val"), out, raw, split="val")
    assert read_manifest(out) == train  # refused: nothing changed
    assert leftovers(tmp_path) == []
    val = run_ingest(open_reader("synthetic", raw, "val"), out, raw, split="val", overwrite=True)
    assert (val.split, val.num_rows) == ("val", 30 - NUM_TRAIN)
    assert val.checksum != train.checksum
    assert read_manifest(out) == val
    assert sorted(storage.list_dir(out)) == ["_COMPLETE", "manifest.json", "part-00000.parquet"]


def test_a_foreign_non_empty_folder_is_not_replaced_without_overwrite(raw: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    out = storage.resolve(tmp_path / "data")
    with pytest.raises(FileExistsError, match="not a complete prepared dataset"):
        run_ingest(open_reader("synthetic", raw, "val"), out, raw, split="val")
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"
    manifest = run_ingest(open_reader("synthetic", raw, "val"), out, raw, split="val", overwrite=True)
    assert manifest.num_rows == 30 - NUM_TRAIN
    assert not (tmp_path / "data" / "notes.txt").exists()


# ---------------------------------------------------------------- failures


def test_a_crash_mid_ingest_leaves_nothing_behind(raw: Path, tmp_path: Path) -> None:
    reader = FailingReader(open_reader("synthetic", raw, "train"), fail_at=5)
    with pytest.raises(DatasetError, match="corrupt file"):
        run_ingest(reader, storage.resolve(tmp_path / "train"), raw, shard_rows=2)  # shards were written already
    assert reader.calls == 5
    assert list(tmp_path.iterdir()) == []


def test_a_crash_while_replacing_keeps_the_old_output(raw: Path, tmp_path: Path) -> None:
    out = storage.resolve(tmp_path / "data")
    val = run_ingest(open_reader("synthetic", raw, "val"), out, raw, split="val")
    before = mtimes(tmp_path / "data")
    with pytest.raises(DatasetError):
        run_ingest(FailingReader(open_reader("synthetic", raw, "train"), 3), out, raw, overwrite=True)
    assert read_manifest(out) == val
    assert mtimes(tmp_path / "data") == before
    assert leftovers(tmp_path) == []


def test_an_empty_split_is_an_error(raw: Path, tmp_path: Path) -> None:
    reader = EmptyReader(open_reader("synthetic", raw, "train").info)
    with pytest.raises(DatasetError, match="split 'train' of .* is empty"):
        run_ingest(reader, storage.resolve(tmp_path / "train"), raw)
    assert list(tmp_path.iterdir()) == []


def test_read_manifest_refuses_incomplete_folders(prepared: Manifest, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is not a prepared dataset"):
        read_manifest(storage.resolve(tmp_path / "missing"))
    half = tmp_path / "half"
    half.mkdir()
    (half / MANIFEST).write_bytes(Path(prepared.location.join(MANIFEST).path).read_bytes())
    loc = storage.resolve(half)
    assert not is_prepared(loc)
    with pytest.raises(DatasetError, match=rf"{half} is not a prepared dataset"):
        read_manifest(loc)
    storage.mark_complete(loc)
    assert is_prepared(loc)


# ---------------------------------------------------------------- options


def test_image_scale_halves_every_size(raw: Path, tmp_path: Path) -> None:
    reader = open_reader("synthetic", raw, "val")
    manifest = run_ingest(reader, storage.resolve(tmp_path / "half"), raw, split="val", image_scale=0.5)
    assert manifest.image_scale == 0.5
    for row in read_rows(manifest).to_pylist():
        sample = reader.read(row["id"])
        assert (row["height"], row["width"]) == (24, 24)
        assert decode(row["image"]).shape == (24, 24, 3)
        label = decode(row["label"])
        assert label.shape == decode(row["instances"]).shape == (24, 24)
        assert row["classes"] == np.unique(label).tolist()
        assert set(row["classes"]) <= set(np.unique(sample.label).tolist())  # nearest: no new values


@pytest.mark.parametrize("scale", [0.0, -0.5, 2.0])
def test_image_scale_outside_0_1_is_refused(raw: Path, tmp_path: Path, scale: float) -> None:
    with pytest.raises(DatasetError, match=f"image_scale={scale}: expected 0 < scale <= 1"):
        run_ingest(open_reader("synthetic", raw, "val"), storage.resolve(tmp_path / "x"), raw, image_scale=scale)
    assert list(tmp_path.iterdir()) == []


def test_source_fingerprint_tracks_files_and_options(raw: Path, tmp_path: Path) -> None:
    copy = tmp_path / "raw"
    copy.mkdir()
    (copy / "a.txt").write_text("a")
    base = source_fingerprint(copy, "train", {"dataset": "synthetic"})
    assert source_fingerprint(copy, "train", {"dataset": "synthetic"}) == base
    assert source_fingerprint(copy, "val", {"dataset": "synthetic"}) != base
    assert source_fingerprint(copy, "train", {"dataset": "synthetic", "image_scale": 0.5}) != base
    (copy / "b.txt").write_text("b")
    assert source_fingerprint(copy, "train", {"dataset": "synthetic"}) != base
