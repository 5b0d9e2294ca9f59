"""File access through pyarrow.fs: locations, atomic writes, completion markers, publishing dirs."""

from __future__ import annotations

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
    assert storage.read_json(loc.join(COMPLETE_MARKER)) == {"rows": 3}
    storage.mark_complete(loc)
    assert storage.read_json(loc.join(COMPLETE_MARKER)) == {}


def filled_dir(loc: storage.Location) -> None:
    storage.write_bytes_atomic(loc.join("part-0.bin"), b"zero")
    storage.write_bytes_atomic(loc.join("nested", "part-1.bin"), b"one")
    storage.mark_complete(loc, {"rows": 2})


def test_publish_dir_local_is_a_rename(tmp_path: Path) -> None:
    tmp = storage.resolve(tmp_path / ".out.tmp")
    filled_dir(tmp)
    final = storage.resolve(tmp_path / "deeper" / "out")
    storage.publish_dir(tmp, final)
    assert not (tmp_path / ".out.tmp").exists()
    assert tree(tmp_path / "deeper" / "out") == {
        COMPLETE_MARKER: b'{\n  "rows": 2\n}\n',
        "nested/part-1.bin": b"one",
        "part-0.bin": b"zero",
    }
    assert storage.is_complete(final)


def test_publish_dir_on_an_object_store_copies_then_marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A SubTreeFileSystem is not a LocalFileSystem, so this takes the object-store branch.
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    tmp = storage.resolve("bucket/.out.tmp", filesystem=fs)
    final = storage.resolve("bucket/out", filesystem=fs)
    assert not tmp.is_local and tmp.uri == "bucket/.out.tmp"
    filled_dir(tmp)
    assert tree(tmp_path / "bucket" / ".out.tmp")["part-0.bin"] == b"zero"

    order: list[str] = []
    real_copy, real_mark = storage.pafs.copy_files, storage.mark_complete

    def spy_copy(src: str, dst: str, **kwargs: object) -> None:
        order.append(dst.rsplit("/", 1)[-1])
        real_copy(src, dst, **kwargs)

    def spy_mark(loc: storage.Location, info: dict | None = None) -> None:
        order.append(COMPLETE_MARKER)
        real_mark(loc, info)

    monkeypatch.setattr(storage.pafs, "copy_files", spy_copy)
    monkeypatch.setattr(storage, "mark_complete", spy_mark)
    storage.publish_dir(tmp, final)

    assert sorted(order[:-1]) == ["part-0.bin", "part-1.bin"] and order[-1] == COMPLETE_MARKER
    assert tree(tmp_path / "bucket" / "out") == {
        COMPLETE_MARKER: b'{\n  "rows": 2\n}\n',
        "nested/part-1.bin": b"one",
        "part-0.bin": b"zero",
    }
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
    assert tree(tmp_path / "out") == {COMPLETE_MARKER: b'{\n  "rows": 2\n}\n', "nested/part-1.bin": b"one", "part-0.bin": b"zero"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temp or set-aside folder is left"


def test_replace_dir_local_puts_the_old_dir_back_when_the_move_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert tree(tmp_path / "bucket" / "out") == {COMPLETE_MARKER: b'{\n  "rows": 2\n}\n', "nested/part-1.bin": b"one", "part-0.bin": b"zero"}
    assert not (tmp_path / "bucket" / ".out.tmp").exists()
