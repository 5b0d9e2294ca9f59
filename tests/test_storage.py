"""File access through pyarrow.fs: locations, atomic writes, completion markers, publishing dirs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from eir import storage
from eir.storage import COMPLETE_MARKER


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resolve_local_path_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loc = storage.resolve("sub/file.txt")
    assert loc.is_local
    assert loc.path == str(tmp_path / "sub" / "file.txt") == loc.uri
    assert loc.name == "file.txt"
    assert loc.parent.path == str(tmp_path / "sub")
    assert loc.join("a", "/b/").path == str(tmp_path / "sub" / "file.txt" / "a" / "b")


def test_resolve_file_uri(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_bytes(b"hello")
    loc = storage.resolve(f"file://{tmp_path}/x.txt")
    assert loc.is_local
    assert loc.path == str(tmp_path / "x.txt")
    assert loc.uri == f"file://{tmp_path}/x.txt"
    assert storage.read_bytes(loc) == b"hello"
    assert loc.join("y").uri == f"file://{tmp_path}/x.txt/y"


def test_atomic_write_creates_parents_and_leaves_no_temp_files(tmp_path: Path) -> None:
    loc = storage.resolve(tmp_path / "a" / "b" / "data.json")
    storage.write_json_atomic(loc, {"x": [1, 2]})
    storage.write_json_atomic(loc, {"x": [3]})
    assert storage.read_json(loc) == {"x": [3]}
    assert os.listdir(tmp_path / "a" / "b") == ["data.json"]


def test_failed_atomic_write_keeps_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loc = storage.resolve(tmp_path / "data.bin")
    storage.write_bytes_atomic(loc, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        storage.write_bytes_atomic(loc, b"new content")
    monkeypatch.undo()
    assert (tmp_path / "data.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]  # the temp file was cleaned up


def test_exists_is_dir_list_dir_delete_dir(tmp_path: Path) -> None:
    root = storage.resolve(tmp_path / "d")
    assert not storage.exists(root) and not storage.is_dir(root)
    assert storage.list_dir(root) == []
    storage.write_bytes_atomic(root.join("b.txt"), b"b")
    storage.write_bytes_atomic(root.join("a", "c.txt"), b"c")
    assert storage.exists(root) and storage.is_dir(root)
    assert not storage.is_dir(root.join("b.txt"))
    assert storage.list_dir(root) == ["a", "b.txt"]  # direct children only, sorted
    assert storage.list_dir(root.join("b.txt")) == []
    storage.delete_dir(root)
    assert not (tmp_path / "d").exists()
    storage.delete_dir(root)  # deleting a missing directory is a no-op


def test_mark_complete_and_is_complete(tmp_path: Path) -> None:
    loc = storage.resolve(tmp_path / "out")
    storage.makedirs(loc)
    assert not storage.is_complete(loc)
    storage.mark_complete(loc, {"rows": 3})
    assert storage.is_complete(loc)
    assert storage.read_json(loc.join(COMPLETE_MARKER)) == {"rows": 3, "files": {}}
    storage.mark_complete(loc)
    assert storage.read_json(loc.join(COMPLETE_MARKER)) == {"files": {}}


def test_the_marker_vouches_for_each_file_by_size_and_sha256(tmp_path: Path) -> None:
    loc = storage.resolve(tmp_path / "out")
    storage.write_bytes_atomic(loc.join("model.pt"), b"weights")
    storage.write_bytes_atomic(loc.join("sub", "part-0.parquet"), b"rows")
    storage.mark_complete(loc)
    files = storage.read_json(loc.join(COMPLETE_MARKER))["files"]
    assert files["model.pt"] == {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert set(files) == {"model.pt", "sub/part-0.parquet"}
    assert storage.damaged_files(loc) == []
    (tmp_path / "out" / "model.pt").write_bytes(b"weights"[:3])  # truncated
    assert storage.damaged_files(loc) == ["model.pt has 3 bytes, expected 7"]
    (tmp_path / "out" / "model.pt").write_bytes(b"WEIGHTS")  # same size, other bytes
    assert storage.damaged_files(loc) == ["model.pt does not match its recorded SHA-256"]
    assert storage.damaged_files(loc, checksums=False) == [], "sizes only"
    (tmp_path / "out" / "sub" / "part-0.parquet").unlink()
    assert "sub/part-0.parquet is missing" in storage.damaged_files(loc)
    for marker in ("{not json", '["a list"]', '{"files": ["a list"]}', '{"files": {"model.pt": {"size": 7}}}'):
        (tmp_path / "out" / COMPLETE_MARKER).write_text(marker)
        assert "is not a readable completion marker" in storage.damaged_files(loc)[0], marker


def test_mark_complete_can_vouch_for_named_files_only(tmp_path: Path) -> None:
    loc = storage.resolve(tmp_path / "step_0")
    storage.write_bytes_atomic(loc.join("model.pt"), b"w")
    storage.write_bytes_atomic(loc.join("figure.png"), b"drawn later")
    storage.mark_complete(loc, files=["model.pt"])
    (tmp_path / "step_0" / "figure.png").write_bytes(b"redrawn")
    assert storage.damaged_files(loc) == []


def test_reusable_quarantines_a_damaged_directory(tmp_path: Path, caplog) -> None:
    loc = storage.resolve(tmp_path / "entry")
    assert not storage.reusable(loc, "cache entry"), "no marker: not done"
    storage.write_bytes_atomic(loc.join("model.pt"), b"weights")
    storage.mark_complete(loc)
    assert storage.reusable(loc, "cache entry")
    (tmp_path / "entry" / "model.pt").write_bytes(b"w")
    with caplog.at_level("WARNING"):
        assert not storage.reusable(loc, "cache entry")
    assert not (tmp_path / "entry").exists(), "moved out of use"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".entry.damaged-")]
    assert len(aside) == 1 and (aside[0] / "model.pt").read_bytes() == b"w", "kept for a look"
    assert "cache entry" in caplog.text and "model.pt has 1 bytes, expected 7" in caplog.text


def test_quarantine_on_an_object_store_drops_the_marker(tmp_path: Path) -> None:
    """No directory rename on object stores: the marker goes, so the directory is redone in place."""
    import pyarrow.fs as pafs

    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not a LocalFileSystem: the remote path
    loc = storage.resolve("entry", filesystem=fs)
    assert not loc.is_local
    storage.write_bytes_atomic(loc.join("model.pt"), b"weights")
    storage.mark_complete(loc)
    assert storage.quarantine(loc) == loc
    assert not storage.is_complete(loc) and (tmp_path / "entry" / "model.pt").exists()


def filled_dir(loc: storage.Location) -> None:
    storage.write_bytes_atomic(loc.join("part-0.bin"), b"zero")
    storage.write_bytes_atomic(loc.join("nested", "part-1.bin"), b"one")
    storage.mark_complete(loc, {"rows": 2})


FILLED_MARKER = {
    "rows": 2,
    "files": {
        "nested/part-1.bin": {"size": 3, "sha256": hashlib.sha256(b"one").hexdigest()},
        "part-0.bin": {"size": 4, "sha256": hashlib.sha256(b"zero").hexdigest()},
    },
}
FILLED_TREE = {
    COMPLETE_MARKER: (json.dumps(FILLED_MARKER, indent=2) + "\n").encode(),
    "nested/part-1.bin": b"one",
    "part-0.bin": b"zero",
}


def test_publish_dir_local_is_a_rename(tmp_path: Path) -> None:
    tmp = storage.resolve(tmp_path / ".out.tmp")
    filled_dir(tmp)
    final = storage.resolve(tmp_path / "deeper" / "out")
    storage.publish_dir(tmp, final)
    assert not (tmp_path / ".out.tmp").exists()
    files = tree(tmp_path / "deeper" / "out")
    assert json.loads(files.pop(COMPLETE_MARKER)) == FILLED_MARKER
    assert files == {"nested/part-1.bin": b"one", "part-0.bin": b"zero"}
    assert storage.is_complete(final) and storage.damaged_files(final) == []


def test_publish_dir_on_an_object_store_copies_then_marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A SubTreeFileSystem is not a LocalFileSystem, so this takes the object-store branch.
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    tmp = storage.resolve("bucket/.out.tmp", filesystem=fs)
    final = storage.resolve("bucket/out", filesystem=fs)
    assert not tmp.is_local and tmp.uri == "bucket/.out.tmp"
    filled_dir(tmp)
    assert tree(tmp_path / "bucket" / ".out.tmp")["part-0.bin"] == b"zero"

    order: list[str] = []
    real_copy, real_write = storage.pafs.copy_files, storage.write_bytes_atomic

    def spy_copy(src: str, dst: str, **kwargs: object) -> None:
        order.append(dst.rsplit("/", 1)[-1])
        real_copy(src, dst, **kwargs)

    def spy_write(loc: storage.Location, data: bytes) -> None:
        order.append(loc.name)
        real_write(loc, data)

    monkeypatch.setattr(storage.pafs, "copy_files", spy_copy)
    monkeypatch.setattr(storage, "write_bytes_atomic", spy_write)
    storage.publish_dir(tmp, final)

    assert sorted(order[:-1]) == ["part-0.bin", "part-1.bin"] and order[-1] == COMPLETE_MARKER
    files = tree(tmp_path / "bucket" / "out")
    assert json.loads(files.pop(COMPLETE_MARKER)) == FILLED_MARKER, "the temp dir's inventory, copied as is"
    assert files == {"nested/part-1.bin": b"one", "part-0.bin": b"zero"}
    assert not (tmp_path / "bucket" / ".out.tmp").exists()
    assert storage.is_complete(final)
    assert storage.list_dir(final) == [COMPLETE_MARKER, "nested", "part-0.bin"]


def test_write_on_an_object_store_is_a_single_put(tmp_path: Path) -> None:
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    loc = storage.resolve("b/k/v.json", filesystem=fs)
    storage.write_json_atomic(loc, {"a": 1})
    assert storage.read_json(loc) == {"a": 1}
    assert os.listdir(tmp_path / "b" / "k") == ["v.json"]


def _old_dir(path: Path) -> None:
    (path / "nested").mkdir(parents=True)
    (path / "stale.bin").write_bytes(b"old")
    (path / "nested" / "part-1.bin").write_bytes(b"old one")


def test_replace_dir_local_swaps_a_non_empty_dir_and_leaves_nothing_aside(tmp_path: Path) -> None:
    _old_dir(tmp_path / "out")
    tmp = storage.resolve(tmp_path / ".out.tmp")
    filled_dir(tmp)
    storage.replace_dir(tmp, storage.resolve(tmp_path / "out"))
    assert tree(tmp_path / "out") == FILLED_TREE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temp or set-aside folder is left"


def test_replace_dir_local_puts_the_old_dir_back_when_the_move_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _old_dir(tmp_path / "out")
    before = tree(tmp_path / "out")
    tmp = storage.resolve(tmp_path / ".out.tmp")
    filled_dir(tmp)
    real_replace = os.replace

    def refuse_to_move_tmp(src: str, dst: str) -> None:
        if src == tmp.path:
            raise OSError("disk went away")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_to_move_tmp)
    with pytest.raises(OSError, match="disk went away"):
        storage.replace_dir(tmp, storage.resolve(tmp_path / "out"))
    monkeypatch.undo()
    assert tree(tmp_path / "out") == before, "the old directory is back, whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp", "out"]


def test_replace_dir_on_an_object_store_drops_the_old_files(tmp_path: Path) -> None:
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    _old_dir(tmp_path / "bucket" / "out")
    tmp = storage.resolve("bucket/.out.tmp", filesystem=fs)
    filled_dir(tmp)
    storage.replace_dir(tmp, storage.resolve("bucket/out", filesystem=fs))
    assert tree(tmp_path / "bucket" / "out") == FILLED_TREE
    assert not (tmp_path / "bucket" / ".out.tmp").exists()


def test_a_full_disk_names_the_file_it_was_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = storage.resolve(tmp_path / "results.json")
    with pytest.raises(OSError) as caught:
        storage.write_json_atomic(target, {"a": 1})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == target.path
    assert list(tmp_path.iterdir()) == [], "no temp file and no half-written target are left"
