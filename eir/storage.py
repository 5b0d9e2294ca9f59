"""One way to read and write the project's files, local or on an object store.

Every path under `run.output_dir` goes through here, so a run dir, a Parquet dataset or the
step-0 cache works the same on a laptop (a local path) and on a cluster (`s3://`, `gs://`,
anything `pyarrow.fs` understands). Writes never leave a half-written file that a later run
would trust: local files are written to a temporary name and renamed; object stores have no
atomic rename, so directories that must be complete carry a marker file written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it; `uri` is what users and logs see."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])
        uri = "/".join([self.uri.rstrip("/"), *[p.strip("/") for p in parts]])
        return Location(self.fs, path, uri)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.path.rstrip("/").rsplit("/", 1)[0], self.uri.rstrip("/").rsplit("/", 1)[0])


def is_uri(text: str) -> bool:
    """`s3://…`, `gs://…`, `file://…`: anything else is a local path."""
    return "://" in text


def local_path(text: str, base: str | os.PathLike[str] | None = None) -> str:
    """A local path made absolute (`~` expanded) against `base`, the working directory by default."""
    return os.path.abspath(os.path.join(base if base is not None else os.getcwd(), os.path.expanduser(text)))


def resolve(uri_or_path: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> Location:
    """Turn a local path or a URI into a Location (local paths are made absolute)."""
    text = os.fspath(uri_or_path)
    if filesystem is not None:
        return Location(filesystem, text, text)
    if not is_uri(text):
        path = local_path(text)
        return Location(pafs.LocalFileSystem(), path, path)
    fs, path = pafs.FileSystem.from_uri(text)
    return Location(fs, path, text)


def ray_storage(loc: Location) -> dict[str, Any]:
    """`storage_path`/`storage_filesystem` for Ray Train and Tune run configs.

    With an explicit filesystem Ray wants the path on it (`bucket/key`), not the URI; passing
    our own filesystem keeps the options the URI carried (endpoint, region) for every worker.
    """
    return {"storage_path": loc.path, "storage_filesystem": None if loc.is_local else loc.fs}


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def is_dir(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type == pafs.FileType.Directory


def makedirs(loc: Location) -> None:
    loc.fs.create_dir(loc.path, recursive=True)


def list_dir(loc: Location) -> list[str]:
    """Names directly under a directory (sorted); empty when it does not exist."""
    if not is_dir(loc):
        return []
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
    return sorted(info.base_name for info in infos)


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as stream:
        return stream.read()


def read_json(loc: Location) -> Any:
    return json.loads(read_bytes(loc).decode("utf-8"))


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one.

    Local filesystems: write a sibling temp file, then rename over the target (atomic on
    POSIX). Object stores: a single PUT is already all-or-nothing.
    """
    makedirs(loc.parent)
    if not loc.is_local:
        with loc.fs.open_output_stream(loc.path) as stream:
            stream.write(data)
        return
    tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, loc.path)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:  # a full disk fails in write/fsync: name the file
            raise OSError(exc.errno, exc.strerror, loc.path) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(loc: Location, obj: Any) -> None:
    write_bytes_atomic(loc, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def delete_dir(loc: Location) -> None:
    if is_dir(loc):
        loc.fs.delete_dir(loc.path)


def is_complete(loc: Location) -> bool:
    """A directory counts as written only once its completion marker exists (see `damaged_files`)."""
    return exists(loc.join(COMPLETE_MARKER))


def mark_complete(
    loc: Location,
    info: dict[str, Any] | None = None,
    files: list[str] | None = None,
    known: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Written last, after every other file of the directory.

    The marker records the size and SHA-256 of each file it vouches for (`files`, relative to
    `loc`; by default every file under it), so a reader can tell a complete directory from one
    whose files were truncated or lost after the marker was written (`damaged_files`). `known`
    holds digests the writer computed from the bytes it wrote (`bytes_digest`), so large outputs
    are not read back just to be hashed.
    """
    names = files if files is not None else _files_under(loc)
    inventory = {name: (known or {}).get(name) or file_digest(loc.join(name)) for name in names}
    write_json_atomic(loc.join(COMPLETE_MARKER), {**(info or {}), "files": inventory})


def damaged_files(loc: Location, *, checksums: bool = True) -> list[str]:
    """What is wrong with a directory its marker calls complete: [] when every file is intact.

    Each problem names the file and how it differs (missing, size, checksum). `checksums=False`
    compares sizes only (cheap on large datasets). A marker that is not JSON is a problem; a
    marker from before markers carried an inventory vouches for nothing and reports nothing.
    """
    marker = loc.join(COMPLETE_MARKER)
    if not exists(marker):
        return [f"{marker.uri} is missing"]
    try:
        inventory = read_json(marker).get("files", {})
        expected_sizes = {str(name): int(entry["size"]) for name, entry in inventory.items()}
        expected_sums = {str(name): str(entry["sha256"]) for name, entry in inventory.items()}
    except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as exc:
        return [f"{marker.uri} is not a readable completion marker ({type(exc).__name__}: {exc})"]
    problems = []
    for name in sorted(expected_sizes):
        target = loc.join(name)
        info = target.fs.get_file_info(target.path)
        if info.type != pafs.FileType.File:
            problems.append(f"{name} is missing")
        elif info.size != expected_sizes[name]:
            problems.append(f"{name} has {info.size} bytes, expected {expected_sizes[name]}")
        elif checksums and file_digest(target)["sha256"] != expected_sums[name]:
            problems.append(f"{name} does not match its recorded SHA-256")
    return problems


def reusable(loc: Location, what: str) -> bool:
    """Whether `loc` is complete and intact; a damaged one is quarantined (and logged) so it is redone.

    The one check every "skip what is done" path makes (finished steps on --resume, step-0 cache
    entries, stored pseudo-labels), so nothing truncated or lost after its marker is ever reused.
    """
    if not is_complete(loc):
        return False
    problems = damaged_files(loc)
    if not problems:
        return True
    try:
        aside = quarantine(loc)
    except FileNotFoundError:  # a concurrent reader quarantined it first
        return False
    log.warning(
        "%s %s is damaged (%s): moved out of use (%s) and redone", what, loc.uri, "; ".join(problems), aside.uri
    )
    return False


def file_digest(loc: Location) -> dict[str, Any]:
    """Size and SHA-256 of one file, streamed (model files and shards can be large)."""
    digest, size = hashlib.sha256(), 0
    with loc.fs.open_input_stream(loc.path) as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
            size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


def bytes_digest(data: bytes) -> dict[str, Any]:
    """What `file_digest` would say of a file holding exactly `data`."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _files_under(loc: Location) -> list[str]:
    base = loc.path.rstrip("/") + "/"
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    return sorted(
        info.path[len(base) :]
        for info in infos
        if info.type == pafs.FileType.File and info.base_name != COMPLETE_MARKER
    )


def quarantine(loc: Location) -> Location:
    """Take a damaged directory out of use so it is redone; returns where its files are now.

    Locally it is renamed aside (`.<name>.damaged-<id>`), kept for a look. Object stores have
    no directory rename: its marker is deleted, so nothing trusts it and it is rewritten in place.
    """
    if not loc.is_local:
        if exists(loc.join(COMPLETE_MARKER)):
            loc.fs.delete_file(loc.join(COMPLETE_MARKER).path)
        return loc
    aside = loc.parent.join(f".{loc.name}.damaged-{uuid.uuid4().hex[:8]}")
    os.replace(loc.path, aside.path)
    return aside


def publish_dir(tmp: Location, final: Location) -> None:
    """Move a fully written temp directory into place.

    Local: one rename (atomic). Object stores: copy the files, then the marker last, so a
    reader that checks `is_complete` never trusts a partial copy.
    """
    if final.is_local and tmp.is_local:
        os.makedirs(os.path.dirname(final.path), exist_ok=True)
        os.replace(tmp.path, final.path)
        return
    selector = pafs.FileSelector(tmp.path, recursive=True)
    for info in tmp.fs.get_file_info(selector):
        if info.type != pafs.FileType.File or info.base_name == COMPLETE_MARKER:
            continue
        rel = info.path[len(tmp.path.rstrip("/")) + 1 :]
        target = final.join(rel)
        makedirs(target.parent)
        pafs.copy_files(info.path, target.path, source_filesystem=tmp.fs, destination_filesystem=final.fs)
    marker = tmp.join(COMPLETE_MARKER)
    if exists(marker):  # its inventory is relative to the directory, so it holds for the copy
        write_bytes_atomic(final.join(COMPLETE_MARKER), read_bytes(marker))
    else:
        mark_complete(final)
    delete_dir(tmp)


def replace_dir(tmp: Location, final: Location) -> None:
    """Move a fully written temp directory into place, replacing whatever `final` holds.

    Locally a directory cannot be renamed over a non-empty one, so the old one is renamed aside
    first and deleted last: `final` never holds a mix or a half-deleted tree, and if moving the
    new one in fails the old one is put back. Object stores have no rename: the old files are
    deleted and the new ones copied marker last, so a reader never trusts what is in between.
    """
    if not (final.is_local and tmp.is_local):
        delete_dir(final)
        publish_dir(tmp, final)
        return
    if not os.path.lexists(final.path):
        publish_dir(tmp, final)
        return
    aside = final.parent.join(f".{final.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.replace(final.path, aside.path)
    try:
        os.replace(tmp.path, final.path)
    except OSError:
        os.replace(aside.path, final.path)
        raise
    delete_dir(aside)
