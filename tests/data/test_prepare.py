"""From (dataset, root, split) to a prepared dataset: explicit prepare and the implicit ingest cache."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from eir import storage
from eir.data import prepare
from eir.data.base import DatasetError, SegmentationReader
from eir.data.ingest import is_prepared, read_manifest, read_rows, source_fingerprint
from eir.data.prepare import ensure_prepared, prepare_split, synthetic_root
from eir.data.synthetic import generate_synthetic
from eir.storage import Location


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


def refuse_to_read(*args: object, **kwargs: object) -> SegmentationReader:
    raise AssertionError("a raw dataset was opened for decoding although its prepared dataset is cached")


def cache_entry(output_root: Path, split: str, checksum: str) -> Path:
    return output_root / "datasets" / f"synthetic-{split}-{checksum[:16]}"


def index_file(output_root: Path, root: Path, split: str) -> Path:
    fingerprint = source_fingerprint(root, split, {"dataset": "synthetic", "image_scale": 1.0})
    return output_root / "datasets" / "_index" / f"synthetic-{split}-{fingerprint}.json"


def test_raw_root_is_ingested_once_into_the_cache(
    raw: Path, prepared_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output_root = storage.resolve(tmp_path / "outputs")
    manifest = ensure_prepared("synthetic", str(raw), "train", output_root, progress=False)
    checksum = read_manifest(storage.resolve(prepared_out / "train")).checksum
    expected = cache_entry(tmp_path / "outputs", "train", checksum)
    assert manifest.location.path == str(expected) and manifest.checksum == checksum
    fingerprint = source_fingerprint(raw, "train", {"dataset": "synthetic", "image_scale": 1.0})
    assert (manifest.split, manifest.num_rows, manifest.source_fingerprint) == ("train", 24, fingerprint)
    assert manifest.source == str(raw.resolve())
    assert storage.read_json(storage.resolve(index_file(tmp_path / "outputs", raw, "train"))) == {
        "folder": expected.name
    }

    monkeypatch.setattr(prepare, "open_reader", refuse_to_read)
    assert ensure_prepared("synthetic", str(raw), "train", output_root, progress=False) == manifest
    assert sorted(p.name for p in (tmp_path / "outputs" / "datasets").iterdir()) == ["_index", expected.name]


def test_a_touched_copy_is_decoded_once_and_stored_once(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same content, new mtimes: one more decode to learn that, then the index answers."""
    output_root = storage.resolve(tmp_path / "outputs")
    first = ensure_prepared("synthetic", str(raw), "val", output_root, progress=False)
    copy = Path(shutil.copytree(raw, tmp_path / "copy", copy_function=shutil.copy))  # copy: new mtimes
    assert index_file(tmp_path, copy, "val").name != index_file(tmp_path, raw, "val").name
    second = ensure_prepared("synthetic", str(copy), "val", output_root, progress=False)
    assert second.location == first.location and second.checksum == first.checksum
    datasets = tmp_path / "outputs" / "datasets"
    assert sorted(p.name for p in datasets.iterdir()) == ["_index", first.location.name]
    assert sorted(p.name for p in (datasets / "_index").iterdir()) == sorted(
        [index_file(tmp_path / "outputs", raw, "val").name, index_file(tmp_path / "outputs", copy, "val").name]
    )
    monkeypatch.setattr(prepare, "open_reader", refuse_to_read)
    for root in (raw, copy):
        assert ensure_prepared("synthetic", str(root), "val", output_root, progress=False).location == first.location


def test_an_index_entry_whose_folder_is_gone_ingests_again(raw: Path, tmp_path: Path) -> None:
    output_root = storage.resolve(tmp_path)
    first = ensure_prepared("synthetic", str(raw), "val", output_root, progress=False)
    shutil.rmtree(first.location.path)
    again = ensure_prepared("synthetic", str(raw), "val", output_root, progress=False)
    assert again.location == first.location and again.checksum == first.checksum
    assert is_prepared(again.location)


def test_content_published_meanwhile_by_another_process_is_used(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs ingesting the same new source at once: the second rename fails, the first entry serves both."""
    real_publish = storage.publish_dir

    def publish_after_a_rival(tmp: Location, final: Location) -> None:
        shutil.copytree(tmp.path, final.path)  # the rival's complete entry lands first
        real_publish(tmp, final)

    monkeypatch.setattr(storage, "publish_dir", publish_after_a_rival)
    manifest = ensure_prepared("synthetic", str(raw), "val", storage.resolve(tmp_path), progress=False)
    assert is_prepared(manifest.location) and manifest.num_rows == 6
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["_index", manifest.location.name]


def test_a_complete_entry_published_by_another_process_is_never_deleted(
    raw: Path, prepared_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rival lands right after this process found no entry: it may already be reading it, so it stays."""
    real_is_prepared = prepare.is_prepared
    rival: list[int] = []

    def rival_lands_after_the_check(loc: Location) -> bool:
        answer = real_is_prepared(loc)
        if loc.name.startswith("synthetic-val-") and not answer and not rival:
            shutil.copytree(prepared_out / "val", loc.path)
            rival.append((Path(loc.path) / "manifest.json").stat().st_ino)
        return answer

    monkeypatch.setattr(prepare, "is_prepared", rival_lands_after_the_check)
    manifest = ensure_prepared("synthetic", str(raw), "val", storage.resolve(tmp_path), progress=False)
    assert rival, "the rival published"
    assert (Path(manifest.location.path) / "manifest.json").stat().st_ino == rival[0], "the rival's entry was kept"
    assert real_is_prepared(manifest.location) and read_rows(manifest).num_rows == 6


def test_a_cache_entry_is_keyed_by_what_the_labels_mean(tmp_path: Path) -> None:
    """Same images and masks, one more class name: a different entry, never the stale one."""
    from PIL import Image

    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (4, 4), (90, 90, 90)).save(root / "images" / f"{name}.png")
        Image.new("L", (4, 4), 1).save(root / "masks" / f"{name}.png")
    (root / "train.txt").write_text("a\nb\n")
    (root / "class_names.txt").write_text("background\ncat\n")
    output_root = storage.resolve(tmp_path / "outputs")
    before = ensure_prepared("folder", str(root), "train", output_root, progress=False)
    (root / "class_names.txt").write_text("background\ncat\ndog\n")
    after = ensure_prepared("folder", str(root), "train", output_root, progress=False)
    assert before.info.class_names == ("background", "cat") and after.info.class_names == ("background", "cat", "dog")
    assert after.checksum != before.checksum and after.location != before.location


def test_a_damaged_index_entry_is_named_and_rewritten(
    raw: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The index only points at an entry: a damaged one is reported, the split ingested again and the index
    rewritten.
    """
    first = ensure_prepared("synthetic", str(raw), "val", storage.resolve(tmp_path), progress=False)
    index = index_file(tmp_path, raw, "val")
    index.write_text("[]")
    with caplog.at_level(logging.WARNING):
        assert ensure_prepared("synthetic", str(raw), "val", storage.resolve(tmp_path), progress=False) == first
    assert f"dataset cache index {index} is damaged" in caplog.text
    assert storage.read_json(storage.resolve(index)) == {"folder": first.location.name}


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
    assert manifest.location.path == str(cache_entry(tmp_path, "val", manifest.checksum))
    monkeypatch.setattr(prepare, "open_reader", refuse_to_read)
    assert ensure_prepared("synthetic", "", "val", output_root, synthetic=(20, 48, 3), progress=False) == manifest


def test_a_prepared_folder_is_used_as_is(prepared_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare, "open_reader", refuse_to_read)
    output_root = storage.resolve(tmp_path)
    direct = ensure_prepared("synthetic", str(prepared_out / "train"), "train", output_root)
    assert direct.location.path == str(prepared_out / "train") and direct.split == "train"
    # The parent of `launch.py prepare`'s split folders works too, locally and as a URI.
    assert ensure_prepared("synthetic", str(prepared_out), "val", output_root).location.path == str(
        prepared_out / "val"
    )
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


def test_an_object_store_cache_entry_cut_short_is_replaced(raw: Path, prepared_out: Path, tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    output_root = storage.resolve("bucket/outputs", filesystem=fs)
    checksum = read_manifest(storage.resolve(prepared_out / "val")).checksum
    entry = cache_entry(tmp_path / "bucket" / "outputs", "val", checksum)
    entry.mkdir(parents=True)
    (entry / "part-00000.parquet").write_bytes(b"half a shard")  # copied before the crash; no _COMPLETE
    manifest = ensure_prepared("synthetic", str(raw), "val", output_root, progress=False)
    assert manifest.location.path == f"bucket/outputs/datasets/{entry.name}"
    assert manifest.num_rows == 6
    assert sorted(p.name for p in entry.iterdir()) == ["_COMPLETE", "manifest.json", "part-00000.parquet"]
    assert (entry / "part-00000.parquet").stat().st_size > len(b"half a shard")
    assert sorted(p.name for p in entry.parent.iterdir()) == ["_index", entry.name]  # no staging folder left behind
    assert read_rows(manifest).num_rows == 6  # the shard paths resolve under the published name
