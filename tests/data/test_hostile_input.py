"""Hostile and malformed dataset input: each case ends in one DatasetError naming the file, or is handled.

Built from tiny files in tmp_path (no Ray). A few cases also go through `launch.main` to show
that the user reads one `error:` line with exit code 2 and no traceback.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import launch
from eir import storage
from eir.data import prepare
from eir.data.ade20k import ADE20KReader
from eir.data.base import (
    MAX_CLASSES,
    MAX_IMAGE_PIXELS,
    DatasetError,
    SegmentationReader,
    decode_image,
)
from eir.data.camvid import CamVidReader
from eir.data.folder import FolderReader, read_class_names
from eir.data.ingest import (
    MANIFEST,
    DamagedDatasetError,
    read_manifest,
    read_metadata,
    source_fingerprint,
)
from eir.data.prepare import ensure_prepared, find_prepared, prepare_split
from eir.data.splits import step_splits
from eir.data.voc import VOCReader
from eir.tasks import get_task

CLASSES = ("background", "cat", "dog")


# ---------------------------------------------------------------- helpers


def write_rgb(path: Path, size: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(path)


def write_mask(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)


def folder_dataset(root: Path, ids: tuple[str, ...] = ("a", "b"), classes: tuple[str, ...] = CLASSES) -> Path:
    """The generic layout (eir/data/folder.py) with a train list naming every id."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "class_names.txt").write_text("\n".join(classes) + "\n")
    for number, sample_id in enumerate(ids):
        write_rgb(root / "images" / f"{sample_id}.png")
        write_mask(root / "masks" / f"{sample_id}.png", np.full((4, 4), number % len(classes)))
    (root / "train.txt").write_text("".join(f"{sample_id}\n" for sample_id in ids))
    return root


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """launch.py in-process: exit code 2 and one `error:` line on stderr, no traceback."""
    code = launch.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1].startswith("error: "), err  # after an ingest progress bar, if any
    return lines[-1]


def prepare_argv(root: Path, out: Path, split: str = "train") -> list[str]:
    return ["prepare", "folder", "--root", str(root), "--split", split, "--out", str(out)]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_png(width: int, height: int, *, full_data: bool, extra: bytes = b"") -> bytes:
    """An 8-bit greyscale PNG of all zeros, built by hand so no test allocates the pixels.

    `full_data` writes every row (a real decompression bomb: tiny file, huge image); otherwise
    the data is cut short, so anything that decodes it fails with another message.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    rows = b"".join(compressor.compress(row) for _ in range(height if full_data else 1))
    data = rows + compressor.flush(zlib.Z_FINISH if full_data else zlib.Z_SYNC_FLUSH)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """11000 x 11000 = 121 MP in about 120 KB: what the issue measured decoding for a minute."""
    return grey_png(11_000, 11_000, full_data=True)


# ---------------------------------------------------------------- 1. text and names that are not UTF-8


def test_a_non_utf8_image_name_is_named_with_its_bytes(tmp_path: Path, capsys) -> None:
    root = folder_dataset(tmp_path / "raw")
    bad = os.fsencode(root / "images") + b"/caf\xe9.png"
    os.rename(root / "images" / "b.png", bad)
    (root / "train.txt").unlink()  # no lists: every image is read, so the bad name is met
    with pytest.raises(DatasetError, match=r"file name .*images/caf\\xe9\.png is not valid UTF-8"):
        FolderReader(root, "train").ids()
    with pytest.warns(UserWarning, match="no split lists"):
        err = fails(capsys, *prepare_argv(root, tmp_path / "out"))
    assert "caf\\xe9.png is not valid UTF-8" in err and "rename the file" in err
    assert not (tmp_path / "out" / "train").exists()


def test_a_non_utf8_ade_image_name_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "images" / "training"
    folder.mkdir(parents=True)
    (Path(os.fsdecode(os.fsencode(folder) + b"/ADE_\xff.jpg"))).write_bytes(b"")
    with pytest.raises(DatasetError, match=r"ADE_\\xff\.jpg is not valid UTF-8"):
        ADE20KReader(tmp_path, "train").ids()


def test_an_unrelated_non_utf8_file_name_does_not_break_the_fingerprint(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "raw")
    Path(os.fsdecode(os.fsencode(root) + b"/notes-\xe9.md")).write_text("x")
    manifest = prepare_split("folder", root, "train", storage.resolve(tmp_path / "out" / "train"), progress=False)
    assert manifest.num_rows == 2


def test_a_class_name_list_that_is_not_utf8_names_file_byte_and_line(tmp_path: Path, capsys) -> None:
    root = folder_dataset(tmp_path / "raw")
    (root / "class_names.txt").write_bytes("background\ncaf\xe9\ndog\n".encode("latin-1"))
    expected = rf"class name list {root}/class_names\.txt is not UTF-8 text: byte 0xe9 on line 2"
    with pytest.raises(DatasetError, match=expected):
        read_class_names(root / "class_names.txt")
    err = fails(capsys, *prepare_argv(root, tmp_path / "out"))
    assert "class_names.txt is not UTF-8 text: byte 0xe9 on line 2" in err
    assert "expected one class name per line, background first, saved as UTF-8" in err


def test_split_lists_that_are_not_utf8_are_named(tmp_path: Path, capsys) -> None:
    root = folder_dataset(tmp_path / "raw")
    (root / "train.txt").write_bytes(b"a\n\xff\xfeb\n")
    err = fails(capsys, *prepare_argv(root, tmp_path / "out"))
    assert f"split list {root}/train.txt is not UTF-8 text: byte 0xff on line 2" in err
    # Asked for a split without a list, the unreadable one is still an error, not "no lists".
    with pytest.raises(DatasetError, match=r"train\.txt is not UTF-8 text"):
        FolderReader(root, "val").ids()

    voc_list = tmp_path / "voc" / "ImageSets" / "Segmentation" / "train.txt"
    voc_list.parent.mkdir(parents=True)
    voc_list.write_bytes("2007_000032\n2007_00003\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"VOC split list .*train\.txt is not UTF-8 text: byte 0xe9 on line 2"):
        VOCReader(tmp_path / "voc", "train").ids()

    (tmp_path / "camvid").mkdir()
    (tmp_path / "camvid" / "train.txt").write_bytes(b"/x/train/\xe0.png /x/trainannot/\xe0.png\n")
    with pytest.raises(DatasetError, match=r"CamVid split list .*train\.txt is not UTF-8 text: byte 0xe0 on line 1"):
        CamVidReader(tmp_path / "camvid", "train").ids()


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "raw")
    (root / "class_names.txt").write_bytes(b"\xef\xbb\xbfbackground\r\ncat\r\ndog\r\n")
    (root / "train.txt").write_bytes(b"\xef\xbb\xbfa\r\nb\r\n")
    reader = FolderReader(root, "train")
    assert reader.info.class_names == CLASSES and reader.ids() == ["a", "b"]


# ---------------------------------------------------------------- 2. ids with spaces


def test_an_id_is_the_whole_line_spaces_included(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "raw", ids=("IMG 0001", "IMG 0002"))
    (root / "train.txt").write_text("  IMG 0001 \r\n\nIMG 0002\t\n")
    reader = FolderReader(root, "train")
    assert reader.ids() == ["IMG 0001", "IMG 0002"]
    assert [sample.id for sample in reader] == ["IMG 0001", "IMG 0002"]
    manifest = prepare_split("folder", root, "train", storage.resolve(tmp_path / "out" / "train"), progress=False)
    assert read_metadata(manifest).column("id").to_pylist() == ["IMG 0001", "IMG 0002"]


def test_an_id_with_spaces_missing_on_disk_is_named_whole(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "raw", ids=("IMG 0001",))
    (root / "train.txt").write_text("IMG 0001\nIMG 0003\n")
    reader = FolderReader(root, "train")
    assert reader.ids() == ["IMG 0001", "IMG 0003"]
    with pytest.raises(DatasetError, match=r"missing image for id 'IMG 0003'"):
        reader.read("IMG 0003")


def test_path_lines_keep_the_deeplab_form_and_refuse_spaces_in_paths(tmp_path: Path) -> None:
    split = tmp_path / "ImageSets" / "Segmentation" / "train_aug.txt"
    split.parent.mkdir(parents=True)
    split.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n")
    assert VOCReader(tmp_path, "train_aug").ids() == ["2007_000032"]
    split.write_text("/JPEGImages/a b.jpg /SegmentationClassAug/a b.png\n")
    with pytest.raises(DatasetError, match=r"train_aug\.txt line 1: .* has 4 fields; expected one id per line"):
        VOCReader(tmp_path, "train_aug").ids()


def test_an_id_with_control_characters_is_refused(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "raw")
    (root / "train.txt").write_text("a\nb\x00c\n")
    with pytest.raises(DatasetError, match=r"train\.txt line 2: 'b\\x00c' holds control characters"):
        FolderReader(root, "train").ids()


def test_an_id_listed_twice_is_named_with_both_lines(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "raw")
    (root / "train.txt").write_text("a\nb\na\n")
    with pytest.raises(DatasetError, match=r"train\.txt line 3: id 'a' is listed twice \(first on line 1\)"):
        FolderReader(root, "train").ids()


# ---------------------------------------------------------------- 3. decompression bombs


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path: Path, bomb_png: bytes, capsys) -> None:
    assert len(bomb_png) < 500_000
    root = folder_dataset(tmp_path / "raw")
    (root / "images" / "b.png").write_bytes(bomb_png)
    started = time.perf_counter()
    err = fails(capsys, *prepare_argv(root, tmp_path / "out"))
    assert time.perf_counter() - started < 5  # decoding it takes a minute and 2.4 GB (RGB)
    assert f"image {root}/images/b.png declares 11000x11000 = 121,000,000 pixels" in err
    assert f"more than eir's limit of {MAX_IMAGE_PIXELS:,}" in err and "refused before decoding" in err
    assert not (tmp_path / "out" / "train").exists()


def test_the_pixel_limit_is_checked_before_any_decoding(tmp_path: Path) -> None:
    # The data is cut short: a decode would fail with "truncated", so this message proves none ran.
    header_only = grey_png(10_000, 5_001, full_data=False)
    with pytest.raises(DatasetError, match=r"x\.png declares 10000x5001 = 50,010,000 pixels"):
        decode_image(header_only, tmp_path / "x.png")


def test_a_bomb_mask_is_refused_too(tmp_path: Path, bomb_png: bytes) -> None:
    root = folder_dataset(tmp_path / "raw")
    (root / "masks" / "a.png").write_bytes(bomb_png)
    with pytest.raises(DatasetError, match=r"mask .*masks/a\.png declares 11000x11000"):
        FolderReader(root, "train").read("a")


def test_a_bomb_beyond_pillows_own_limit_is_a_dataset_error(tmp_path: Path) -> None:
    huge = grey_png(20_000, 20_000, full_data=False)  # 400 MP: Pillow itself raises here
    with pytest.raises(
        DatasetError, match=r"image .*y\.png is refused before decoding: Image size \(400000000 pixels\)"
    ):
        decode_image(huge, tmp_path / "y.png")


def test_an_image_at_the_limit_is_not_refused_for_its_size(tmp_path: Path) -> None:
    side = int(MAX_IMAGE_PIXELS**0.5)
    with pytest.raises(DatasetError, match=r"unreadable image .*z\.png"):  # cut short, so it fails decoding
        decode_image(grey_png(side, side, full_data=False), tmp_path / "z.png")


def test_an_oversized_png_text_chunk_is_a_dataset_error(tmp_path: Path) -> None:
    # Pillow raises ValueError (not OSError) for a text chunk that inflates past its 1 MB limit.
    ztxt = png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(bytes(2_000_000)))
    with pytest.raises(DatasetError, match=r"unreadable image .*t\.png: Decompressed .*too large"):
        decode_image(grey_png(4, 4, full_data=True, extra=ztxt), tmp_path / "t.png")


# ---------------------------------------------------------------- 4. symbolic links


@pytest.mark.timeout(30)
def test_a_symlink_loop_in_the_dataset_root_is_named(tmp_path: Path, capsys) -> None:
    root = folder_dataset(tmp_path / "raw")
    (root / "images" / "again").symlink_to(root)
    (root / "images" / "twice").symlink_to(root)  # two loops: following them is 2^40 folders
    with pytest.raises(
        DatasetError, match=rf"symbolic link loop in dataset root {root}: {root}/images/again leads back"
    ):
        source_fingerprint(root, "train", {})
    err = fails(capsys, *prepare_argv(root, tmp_path / "out"))
    assert "symbolic link loop" in err and "images/again" in err
    err = fails(
        capsys,
        "run",
        str(Path(launch.__file__).parent / "experiments" / "quickstart.yaml"),
        "--dry-run",
        f"run.output_dir={tmp_path / 'runs'}",
        "dataset.name=folder",
        f"dataset.root={root}",
        "dataset.test_split=train",
        "task.name=1-1",
    )
    assert "symbolic link loop" in err


def test_a_link_to_itself_is_named(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "raw")
    (root / "images" / "self.png").symlink_to(root / "images" / "self.png")
    with pytest.raises(DatasetError, match=r"cannot follow .*images/self\.png .*(symbolic links|loop)"):
        source_fingerprint(root, "train", {})
    with pytest.raises(DatasetError, match=r"cannot read image .*images/self\.png"):
        FolderReader(root).read("self")


def test_dangling_links_and_folders_named_like_images(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "raw")
    (root / "stale-link").symlink_to(tmp_path / "gone")  # unused: the fingerprint only notes it
    assert source_fingerprint(root, "train", {}) != source_fingerprint(root, "val", {})
    (root / "images" / "b.png").unlink()
    (root / "images" / "b.png").symlink_to(tmp_path / "moved.png")
    with pytest.raises(DatasetError, match=r"missing image: .*images/b\.png is a symbolic link to .*moved\.png, which"):
        FolderReader(root, "train").read("b")
    (root / "images" / "b.png").unlink()
    (root / "images" / "b.png").mkdir()
    with pytest.raises(DatasetError, match=r"cannot read image .*images/b\.png: Is a directory"):
        FolderReader(root, "train").read("b")


def test_a_symlinked_folder_that_is_no_loop_is_followed(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "raw")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "extra.txt").write_text("1")
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    before = source_fingerprint(root, "train", {})
    (tmp_path / "elsewhere" / "extra.txt").write_text("22")
    assert source_fingerprint(root, "train", {}) != before


# ---------------------------------------------------------------- 5. label spaces that do not fit 8 bits


def test_more_than_254_classes_is_refused_at_read_time(tmp_path: Path, capsys) -> None:
    root = folder_dataset(tmp_path / "raw")
    names = ["background", *[f"class{i}" for i in range(1, MAX_CLASSES + 2)]]  # K = 255 collides with ignore
    (root / "class_names.txt").write_text("\n".join(names) + "\n")
    err = fails(capsys, *prepare_argv(root, tmp_path / "out"))
    assert "class_names.txt names 255 classes after background; at most 254 fit" in err
    assert "0 is background and 255 means ignore" in err
    (root / "class_names.txt").write_text("\n".join(names[:-1]) + "\n")  # K = 254 fits
    assert FolderReader(root).info.num_classes == MAX_CLASSES


def test_a_class_name_used_twice_is_refused(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "raw")
    (root / "class_names.txt").write_text("background\ncat\ndog\ncat\n")
    with pytest.raises(DatasetError, match=r"class name 'cat' appears twice \(ids 1 and 3\)"):
        FolderReader(root)


# ---------------------------------------------------------------- 6. damaged prepared datasets and cache metadata


@pytest.fixture
def cached(tmp_path: Path) -> tuple[Path, storage.Location, Path]:
    """A folder dataset ingested once into the dataset cache: (raw root, output root, cache entry)."""
    root = folder_dataset(tmp_path / "raw")
    output_root = storage.resolve(tmp_path / "outputs")
    manifest = ensure_prepared("folder", str(root), "train", output_root, progress=False)
    return root, output_root, Path(manifest.location.path)


def refuse_to_read(*args: object, **kwargs: object) -> SegmentationReader:
    raise AssertionError("the raw dataset was decoded again")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda entry: (entry / MANIFEST).write_text("{not json"), f"{MANIFEST} is not JSON"),
        (lambda entry: (entry / MANIFEST).write_text("[1, 2]"), f"{MANIFEST} holds a list, expected an object"),
        (lambda entry: (entry / MANIFEST).write_bytes(b'{"format_version": 1, "\xff"}'), f"{MANIFEST} is not JSON"),
        (
            lambda entry: _edit_manifest(entry, lambda m: m.pop("class_names")),
            f"{MANIFEST} lacks the key 'class_names'",
        ),
        (
            lambda entry: _edit_manifest(entry, lambda m: m.update(num_rows="2")),
            "key 'num_rows' is '2', expected a int",
        ),
        (lambda entry: (entry / "part-00000.parquet").unlink(), "shard(s) part-00000.parquet listed in"),
        (lambda entry: _truncate(entry / "part-00000.parquet"), "part-00000.parquet has 100 bytes, expected"),
        (lambda entry: _edit_manifest(entry, lambda m: m["shards"][0].update(file="../../x")), "lists the shard"),
        (lambda entry: _edit_manifest(entry, lambda m: m.update(checksum="../../../x" * 2)), "is not a hex digest"),
        (lambda entry: _edit_manifest(entry, lambda m: m.update(future_label=999)), "future_label is 999"),
    ],
)
def test_a_damaged_cache_entry_is_quarantined_and_ingested_again(
    cached: tuple[Path, storage.Location, Path], damage, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    root, output_root, entry = cached
    damage(entry)
    with pytest.raises(DamagedDatasetError, match=rf"prepared dataset {entry} is damaged: .*{_re(problem)}"):
        read_manifest(storage.resolve(entry))
    with caplog.at_level(logging.WARNING):
        again = ensure_prepared("folder", str(root), "train", output_root, progress=False)
    assert Path(again.location.path) == entry and again.num_rows == 2
    assert f"dataset cache entry {entry} is damaged (" in caplog.text and problem in caplog.text
    assert "moved out of use to" in caplog.text and "--overwrite" not in caplog.text
    aside = [path for path in entry.parent.iterdir() if path.name.startswith(f".{entry.name}.damaged-")]
    assert len(aside) == 1 and (aside[0] / MANIFEST).exists(), "the damaged entry is kept aside, not deleted"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _edit_manifest(entry: Path, edit) -> None:
    data = storage.read_json(storage.resolve(entry / MANIFEST))
    edit(data)
    storage.write_json_atomic(storage.resolve(entry / MANIFEST), data)


def _re(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"folder": "../../elsewhere"}', b"\xff\xfe"])
def test_a_damaged_index_file_is_reported_and_rewritten(
    cached: tuple[Path, storage.Location, Path], content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    root, output_root, entry = cached
    (index,) = (Path(output_root.path) / "datasets" / "_index").iterdir()
    index.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        again = ensure_prepared("folder", str(root), "train", output_root, progress=False)
    assert f"dataset cache index {index} is damaged" in caplog.text
    assert Path(again.location.path) == entry
    assert storage.read_json(storage.resolve(index)) == {"folder": entry.name}


def test_a_corrupt_shard_of_the_right_size_names_the_shard_and_the_folder(
    cached: tuple[Path, storage.Location, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, output_root, entry = cached
    shard = entry / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-4] + b"XXXX")  # its footer magic gone; sizes cannot tell
    monkeypatch.setattr(prepare, "open_reader", refuse_to_read)
    manifest = ensure_prepared("folder", str(root), "train", output_root, progress=False)
    with pytest.raises(
        DamagedDatasetError,
        match=rf"prepared dataset {entry} is damaged: shard part-00000\.parquet "
        r"cannot be read .*remove the folder",
    ):
        read_metadata(manifest)


def test_a_damaged_prepared_root_is_an_error_naming_it(tmp_path: Path, capsys) -> None:
    root = folder_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    assert launch.main(prepare_argv(root, out)) == 0
    capsys.readouterr()
    (out / "train" / MANIFEST).write_text("{")
    err = fails(
        capsys,
        "run",
        str(Path(launch.__file__).parent / "experiments" / "quickstart.yaml"),
        "--dry-run",
        f"run.output_dir={tmp_path / 'runs'}",
        "dataset.name=folder",
        f"dataset.root={out}",
        "dataset.test_split=train",
        "task.name=1-1",
    )
    assert f"prepared dataset {out}/train is damaged: {MANIFEST} is not JSON" in err
    err = fails(capsys, *prepare_argv(root, out))  # the user's folder: replaced only when asked
    assert f"prepared dataset {out}/train is damaged" in err and "--overwrite" in err
    assert launch.main([*prepare_argv(root, out), "--overwrite"]) == 0
    assert read_manifest(storage.resolve(out / "train")).num_rows == 2


def test_outputs_inside_the_dataset_root_are_not_part_of_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = folder_dataset(tmp_path / "raw")
    output_root = storage.resolve(root / "outputs")
    first = ensure_prepared("folder", str(root), "train", output_root, progress=False)
    (root / "outputs" / "some-run").mkdir()
    (root / "outputs" / "some-run" / "half-written.tmp").write_bytes(b"x")
    monkeypatch.setattr(prepare, "open_reader", refuse_to_read)
    assert ensure_prepared("folder", str(root), "train", output_root, progress=False) == first

    # prepare --out inside the root: a second call finds the same fingerprint (else it would record a new one).
    monkeypatch.undo()  # prepare_split opens its reader (class names only) before it knows it need not decode
    out = storage.resolve(root / "prepared" / "train")
    made = prepare_split("folder", root, "train", out, progress=False)
    assert prepare_split("folder", root, "train", out, progress=False) == made


def test_find_prepared_decodes_nothing(cached: tuple[Path, storage.Location, Path], monkeypatch) -> None:
    root, output_root, entry = cached
    monkeypatch.setattr(prepare, "open_reader", refuse_to_read)
    assert Path(find_prepared("folder", str(root), "train", output_root).location.path) == entry
    assert find_prepared("folder", str(root), "val", output_root) is None
    assert find_prepared("folder", str(root.parent / "gone"), "train", output_root) is None
    assert not (root.parent / "gone").exists()


def test_a_damaged_split_file_is_computed_again(cached: tuple[Path, storage.Location, Path], caplog) -> None:
    _root, output_root, entry = cached
    manifest = read_manifest(storage.resolve(entry))
    task = get_task("folder", "1-1", num_classes=2)
    splits = step_splits(task, manifest, output_root, purpose="test")
    (split_file,) = (Path(output_root.path) / "splits").rglob("*-test.json")
    for damage in ("{", '{"ids": [["a"]], "checksum": "0"}', '{"ids": 3}'):
        split_file.write_text(damage)
        with caplog.at_level(logging.WARNING):
            assert step_splits(task, manifest, output_root, purpose="test") == splits
        assert f"split file {split_file} is damaged" in caplog.text
        assert storage.read_json(storage.resolve(split_file))["checksum"] == splits.checksum


# ---------------------------------------------------------------- 8. other tracebacks met on the way


def test_a_root_uri_pyarrow_cannot_open_is_named(tmp_path: Path, capsys) -> None:
    err = fails(
        capsys,
        "run",
        str(Path(launch.__file__).parent / "experiments" / "quickstart.yaml"),
        "--dry-run",
        f"run.output_dir={tmp_path}",
        "dataset.name=folder",
        "dataset.root=foo://bucket/data",
        "task.name=1-1",
    )
    assert "dataset root foo://bucket/data: Unrecognized filesystem type" in err


def test_a_prepare_output_under_a_file_is_named(tmp_path: Path, capsys) -> None:
    root = folder_dataset(tmp_path / "raw")
    (tmp_path / "a-file").write_text("x")
    err = fails(capsys, *prepare_argv(root, tmp_path / "a-file"))
    assert f"cannot write the prepared dataset {tmp_path}/a-file/train: " in err and "Not a directory" in err


def test_an_empty_image_file_says_what_it_is(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "raw")
    (root / "images" / "a.png").write_bytes(b"")
    with pytest.raises(
        DatasetError, match=r"unreadable image .*images/a\.png: not a format Pillow recognises, 0 bytes"
    ):
        FolderReader(root, "train").read("a")


def test_a_nul_byte_in_a_listed_path_is_a_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("/x/train/a\x00.png /x/trainannot/a.png\n")
    reader = CamVidReader(tmp_path, "train")
    with pytest.raises(
        DatasetError, match=r"cannot read image .*train/a\\x00\.png'?: a file name cannot hold a NUL byte"
    ):
        reader.read(reader.ids()[0])
