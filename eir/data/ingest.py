"""Ingest a dataset split into Parquet shards: decode once, train many times.

Each row holds the encoded image (the original file bytes when not resized), the canonical
label map as PNG, the instance map as PNG when the dataset has one, the size and the classes
present with their pixel counts. The classes column lets every later step choose its images
(METHOD.md §1 filters) from metadata alone, without decoding a single label.

A prepared dataset is a directory:
    part-00000.parquet ...   the rows, in the split list's order
    manifest.json            row count, shard list, content checksum, label space, source
    _COMPLETE                written last (object stores have no atomic directory rename)
It is written into a temporary sibling and published in one step, so a crash never leaves a
directory that a later run would trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from eir import storage
from eir.data.base import (
    IGNORE_LABEL,
    DatasetError,
    DatasetInfo,
    Sample,
    SegmentationReader,
    check_class_names,
    shown,
)
from eir.data.codec import encode_png
from eir.progress import progress as progress_bar
from eir.storage import Location

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("image_format", pa.string()),
        ("label", pa.binary()),
        ("instances", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("classes", pa.list_(pa.uint8())),
        ("class_pixels", pa.list_(pa.int64())),
    ]
)


@dataclass(frozen=True)
class Manifest:
    """What a prepared dataset holds; `checksum` identifies its content for splits and logs."""

    location: Location
    dataset: str
    split: str
    num_rows: int
    checksum: str
    shards: tuple[str, ...]
    info: DatasetInfo
    image_scale: float
    source: str
    source_fingerprint: str

    @property
    def shard_locations(self) -> list[Location]:
        return [self.location.join(name) for name in self.shards]

    @property
    def shard_uris(self) -> list[str]:
        return [loc.uri for loc in self.shard_locations]


def _rescale(sample: Sample, scale: float) -> tuple[bytes, str, np.ndarray, np.ndarray | None]:
    """Resize image (bilinear) and label/instances (nearest) by `scale`; re-encode the image."""
    height, width = sample.label.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = np.asarray(Image.fromarray(sample.image).resize(size, Image.BILINEAR))
    label = np.asarray(Image.fromarray(sample.label).resize(size, Image.NEAREST))
    instances = None
    if sample.instances is not None:
        instances = np.asarray(Image.fromarray(sample.instances).resize(size, Image.NEAREST))
    buffer = io.BytesIO()
    if sample.image_format == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        fmt = "jpeg"
    else:
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
        fmt = "png"
    return buffer.getvalue(), fmt, label, instances


def sample_to_row(sample: Sample, image_scale: float = 1.0) -> dict[str, Any]:
    """One Parquet row; at scale 1 the image bytes are the source file's, untouched."""
    if image_scale == 1.0:
        image_bytes, fmt, label, instances = sample.image_bytes, sample.image_format, sample.label, sample.instances
    else:
        image_bytes, fmt, label, instances = _rescale(sample, image_scale)
    classes, counts = np.unique(label, return_counts=True)
    return {
        "id": sample.id,
        "image": image_bytes,
        "image_format": fmt,
        "label": encode_png(label),
        "instances": encode_png(instances) if instances is not None else None,
        "height": int(label.shape[0]),
        "width": int(label.shape[1]),
        "classes": classes.astype(np.uint8).tolist(),
        "class_pixels": counts.astype(np.int64).tolist(),
    }


def _row_digest(row: dict[str, Any]) -> bytes:
    digest = hashlib.sha256()
    for key in ("id", "image", "label", "instances"):
        value = row[key]
        data = value.encode() if isinstance(value, str) else (value or b"")
        digest.update(hashlib.sha256(data).digest())
    return digest.digest()


def source_fingerprint(
    root: str | Path, split: str, options: dict[str, Any], exclude: Iterable[str | Path] = ()
) -> str:
    """A cheap identity of a raw dataset folder: every file's relative path, size and mtime.

    It keys the implicit ingest cache, so a command given a raw root knows whether that root
    was already ingested without decoding anything. `exclude` names folders inside the root
    that are outputs (a run.output_dir or prepare --out placed in the dataset folder): their
    files change while ingest writes them and belong to no dataset.
    """
    root = Path(root)
    digest = hashlib.sha256(repr((split, sorted(options.items()))).encode())
    for path, stat in walk_files(root, {Path(os.path.abspath(p)) for p in exclude}):
        relative = os.fsencode(path.relative_to(root))  # names need not be UTF-8 here
        digest.update(relative + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def walk_files(root: Path, exclude: set[Path]) -> Iterator[tuple[Path, os.stat_result]]:
    """Every file under `root` with its stat, following symbolic links, in sorted depth-first order.

    A link back to a folder above it (a loop) is an error naming the link: following it would
    never end. A dangling link counts as itself (it is part of the folder as given); a file
    deleted during the walk is left out.
    """
    absolute = Path(os.path.abspath(root))
    stack: list[tuple[Path, frozenset[tuple[int, int]]]] = [(root, frozenset({_dir_key(root)}))]
    while stack:
        folder, above = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            raise DatasetError(
                f"cannot list {shown(folder)} in dataset root {shown(root)}: {exc.strerror or exc}"
            ) from None
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if absolute / path.relative_to(root) in exclude:
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                if not entry.is_symlink():
                    continue
                stat = entry.stat(follow_symlinks=False)
            except OSError as exc:  # ELOOP: a link to itself or a ring of links
                raise DatasetError(
                    f"cannot follow {shown(path)} in dataset root {shown(root)}: {exc.strerror or exc} "
                    "(expected a file or folder; remove or fix the symbolic link)"
                ) from None
            if not S_ISDIR(stat.st_mode):
                yield path, stat
                continue
            key = (stat.st_dev, stat.st_ino)
            if key in above:
                raise DatasetError(
                    f"symbolic link loop in dataset root {shown(root)}: {shown(path)} leads back to "
                    f"{shown(os.path.realpath(path))}, a folder above it (remove the link or point it elsewhere)"
                )
            subfolders.append((path, above | {key}))
        stack.extend(reversed(subfolders))


def _dir_key(folder: Path) -> tuple[int, int]:
    stat = folder.stat()
    return stat.st_dev, stat.st_ino


class DamagedDatasetError(DatasetError):
    """A prepared dataset whose manifest is unreadable or whose files contradict it: redo it, never read it."""

    def __init__(self, location: Location, problem: str) -> None:
        super().__init__(
            f"prepared dataset {location.uri} is damaged: {problem}; prepare it again "
            "(`launch.py prepare ... --overwrite`) or remove the folder"
        )
        self.problem = problem


# Manifest keys and the JSON types they must have (bool is no int here: JSON true is not a count).
_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "dataset": str,
    "split": str,
    "num_rows": int,
    "checksum": str,
    "shards": list,
    "class_names": list,
    "future_label": int,
    "background_is_class": bool,
    "image_scale": (int, float),
    "source": str,
    "source_fingerprint": str,
}


_HEX = re.compile(r"[0-9a-f]{16,64}")


def read_manifest(location: Location) -> Manifest:
    """Open a prepared dataset; a missing or incomplete one is an error naming the folder.

    A manifest that is not JSON, lacks a key, or lists shards that are not there raises
    DamagedDatasetError: the dataset cache quarantines such an entry and ingests again.
    """
    path = location.join(MANIFEST)
    if not storage.exists(path) or not storage.is_complete(location):
        raise DatasetError(
            f"{location.uri} is not a prepared dataset (no complete {MANIFEST}); "
            "run `launch.py prepare` or give the raw dataset root"
        )
    data = _manifest_data(location, path)
    if data.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path.uri} has format_version {data.get('format_version')!r}; this eir reads {FORMAT_VERSION}: re-run "
            "prepare"
        )
    _check_manifest(location, data)
    info = DatasetInfo(
        name=data["dataset"],
        class_names=tuple(data["class_names"]),
        future_label=data["future_label"],
        background_is_class=data["background_is_class"],
    )
    return Manifest(
        location=location,
        dataset=data["dataset"],
        split=data["split"],
        num_rows=data["num_rows"],
        checksum=data["checksum"],
        shards=tuple(s["file"] for s in data["shards"]),
        info=info,
        image_scale=float(data["image_scale"]),
        source=data["source"],
        source_fingerprint=data["source_fingerprint"],
    )


def _manifest_data(location: Location, path: Location) -> dict[str, Any]:
    try:
        data = storage.read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise DamagedDatasetError(location, f"{MANIFEST} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DamagedDatasetError(location, f"{MANIFEST} holds a {type(data).__name__}, expected an object")
    return data


def _check_manifest(location: Location, data: dict[str, Any]) -> None:
    """Every key with its type, a label space eir can hold, and shards that exist and add up."""
    for key, kind in _MANIFEST_TYPES.items():
        if key not in data:
            raise DamagedDatasetError(location, f"{MANIFEST} lacks the key {key!r}")
        value = data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DamagedDatasetError(
                location, f"{MANIFEST} key {key!r} is {value!r}, expected a {getattr(kind, '__name__', 'number')}"
            )
    if not 0 <= data["future_label"] <= IGNORE_LABEL:
        raise DamagedDatasetError(
            location, f"{MANIFEST} future_label is {data['future_label']}, expected a label value 0..{IGNORE_LABEL}"
        )
    if not 0 < data["image_scale"] <= 1 or data["num_rows"] < 0:
        raise DamagedDatasetError(
            location, f"{MANIFEST} has image_scale {data['image_scale']} and num_rows {data['num_rows']}"
        )
    if not _HEX.fullmatch(data["checksum"]):  # it names the split folder: no path may hide in it
        raise DamagedDatasetError(location, f"{MANIFEST} checksum {data['checksum']!r} is not a hex digest")
    names = data["class_names"]
    if not all(isinstance(name, str) for name in names):
        raise DamagedDatasetError(location, f"{MANIFEST} class_names holds non-text entries")
    check_class_names(names, f"{location.join(MANIFEST).uri} class_names")
    shards = data["shards"]
    for shard in shards:
        if not (
            isinstance(shard, dict)
            and isinstance(shard.get("file"), str)
            and isinstance(shard.get("rows"), int)
            and "/" not in shard["file"]
            and shard["file"] not in ("", ".", "..")
        ):
            raise DamagedDatasetError(
                location, f'{MANIFEST} lists the shard {shard!r}, expected {{"file": NAME, "rows": N}}'
            )
    if sum(shard["rows"] for shard in shards) != data["num_rows"]:
        raise DamagedDatasetError(
            location, f"its shards hold {sum(s['rows'] for s in shards)} rows, {MANIFEST} says {data['num_rows']}"
        )
    present = set(storage.list_dir(location))
    missing = [shard["file"] for shard in shards if shard["file"] not in present]
    if missing:
        raise DamagedDatasetError(location, f"shard(s) {', '.join(missing[:3])} listed in {MANIFEST} are missing")
    problems = storage.damaged_files(location, checksums=False)  # sizes only: datasets can be large
    if problems:
        raise DamagedDatasetError(location, "; ".join(problems[:3]))


def is_prepared(location: Location) -> bool:
    return storage.exists(location.join(MANIFEST)) and storage.is_complete(location)


def label_space_bytes(class_names: Iterable[str], future_label: int, background_is_class: bool) -> bytes:
    """What the label values mean, as the first bytes the content checksum covers.

    Rows alone do not say it: a folder dataset whose class_names.txt gained a class decodes to
    the same rows, and reusing its old prepared copy would train with the wrong K.
    """
    space = {"class_names": list(class_names), "future_label": future_label, "background_is_class": background_is_class}
    return json.dumps(space, sort_keys=True).encode()


def _write_shards(
    rows: Iterable[dict[str, Any]], tmp: Location, shard_rows: int, label_space: bytes
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], int, str]:
    shards: list[dict[str, Any]] = []
    digests: dict[str, dict[str, Any]] = {}
    checksum = hashlib.sha256(label_space)
    batch: list[dict[str, Any]] = []
    total = 0

    def flush() -> None:
        name = f"part-{len(shards):05d}.parquet"
        table = pa.Table.from_pylist(batch, schema=SCHEMA)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, row_group_size=max(1, min(len(batch), 16)))
        data = buffer.getvalue().to_pybytes()
        with tmp.fs.open_output_stream(tmp.join(name).path) as sink:
            sink.write(data)
        shards.append({"file": name, "rows": len(batch)})
        digests[name] = storage.bytes_digest(data)  # for the completion marker, without reading the shard back
        batch.clear()

    for row in rows:
        checksum.update(_row_digest(row))
        batch.append(row)
        total += 1
        if len(batch) >= shard_rows:
            flush()
    if batch:
        flush()
    return shards, digests, total, checksum.hexdigest()


def write_prepared(
    reader: SegmentationReader,
    folder: Location,
    *,
    split: str,
    source: str,
    image_scale: float = 1.0,
    shard_rows: int = 64,
    progress: bool = True,
    fingerprint: str | None = None,
) -> str:
    """Decode `reader`'s split into `folder` (a fresh, private temp folder) and return the content checksum.

    The folder ends complete (shards, manifest, marker) but is never where readers look: the
    caller publishes it under its final name, which may depend on the checksum (the ingest cache).
    """
    if not 0 < image_scale <= 1:
        raise DatasetError(f"image_scale={image_scale}: expected 0 < scale <= 1 (0.5 = half size)")
    ids = reader.ids()
    if not ids:
        raise DatasetError(f"split {split!r} of {source} is empty: no images to ingest")
    info = reader.info
    listed = progress_bar(ids, f"ingest {info.name}/{split}", total=len(ids), enabled=progress, unit="img")
    samples = (reader.read(i) for i in listed)
    label_space = label_space_bytes(info.class_names, info.future_label, info.background_is_class)
    try:
        shards, digests, total, checksum = _write_shards(
            (sample_to_row(s, image_scale) for s in samples), folder, shard_rows, label_space
        )
    finally:  # a bad sample ends the bar on its own line before the error is printed (a generator: closable)
        getattr(listed, "close", lambda: None)()
    if total != len(ids):  # a converter that asserts its counts (mmsegmentation-style)
        raise DatasetError(f"ingest of {source} wrote {total} rows but the split lists {len(ids)} ids")
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": info.name,
        "split": split,
        "num_rows": total,
        "checksum": checksum,
        "shards": shards,
        "class_names": list(info.class_names),
        "future_label": info.future_label,
        "background_is_class": info.background_is_class,
        "image_scale": image_scale,
        "source": source,
        "source_fingerprint": fingerprint or "",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json_atomic(folder.join(MANIFEST), manifest)
    # The marker vouches for the shards' sizes and checksums; the manifest is checked by its own
    # structure, since `_record_source` may rewrite it.
    storage.mark_complete(
        folder, {"rows": total, "checksum": checksum}, files=[shard["file"] for shard in shards], known=digests
    )
    return checksum


def _record_source(out: Location, source: str, fingerprint: str) -> Manifest:
    """Point a prepared dataset's manifest at a new source of identical content.

    Without this, a source whose files were touched or copied (same bytes, new mtimes) would
    be decoded again on every later call just to learn that nothing changed.
    """
    path = out.join(MANIFEST)
    data = storage.read_json(path)
    data["source"], data["source_fingerprint"] = source, fingerprint
    storage.write_json_atomic(path, data)
    return read_manifest(out)


def make_output_folder(folder: Location, target: Location) -> None:
    """Create the private folder a prepared dataset is written into before it is published as `target`.

    A target under a file or in a folder we may not write to is a user error naming the target.
    """
    try:
        storage.makedirs(folder)
    except OSError as exc:
        raise DatasetError(f"cannot write the prepared dataset {target.uri}: {exc}") from None


def _existing_output(out: Location, overwrite: bool) -> Manifest | None:
    """The prepared dataset `out` holds, or None where there is none or `overwrite` may replace what is there.

    Anything else there (a foreign folder, a damaged or older-format prepared dataset) is only
    replaced with `overwrite`: it may be someone's data.
    """
    if not is_prepared(out):
        if storage.list_dir(out) and not overwrite:
            raise FileExistsError(
                f"{out.uri} exists but is not a complete prepared dataset; pass --overwrite to replace it"
            )
        return None
    try:
        return read_manifest(out)
    except DatasetError:
        if overwrite:
            return None
        raise


def ingest(
    reader: SegmentationReader,
    out: Location,
    *,
    split: str,
    source: str,
    image_scale: float = 1.0,
    shard_rows: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    fingerprint: str | None = None,
) -> Manifest:
    """Write `reader`'s split to `out` as Parquet shards; idempotent and atomic.

    An existing complete output with the same source fingerprint is returned untouched. One with
    a different fingerprint is re-ingested to a temp folder and compared by content checksum:
    equal content is kept and its manifest records the new source and fingerprint (so the next
    call skips decoding); different content is refused unless `overwrite`.
    """
    existing = _existing_output(out, overwrite)
    if existing is not None and fingerprint is not None and existing.source_fingerprint == fingerprint:
        log.info("%s is already prepared (%d rows, checksum %s)", out.uri, existing.num_rows, existing.checksum[:12])
        return existing

    tmp = out.parent.join(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    make_output_folder(tmp, out)
    started = time.perf_counter()
    try:
        checksum = write_prepared(
            reader,
            tmp,
            split=split,
            source=source,
            image_scale=image_scale,
            shard_rows=shard_rows,
            progress=progress,
            fingerprint=fingerprint,
        )
        existing = _existing_output(out, overwrite)
        if existing is not None:
            if existing.checksum == checksum:
                log.info("%s already holds identical content (checksum %s)", out.uri, checksum[:12])
                return existing if fingerprint is None else _record_source(out, source, fingerprint)
            if not overwrite:
                raise FileExistsError(
                    f"{out.uri} holds a different prepared dataset (checksum {existing.checksum[:12]} != "
                    f"{checksum[:12]}); pass --overwrite to replace it"
                )
        storage.replace_dir(tmp, out)
    finally:
        storage.delete_dir(tmp)
    manifest = read_manifest(out)
    log.info(
        "prepared %s: %d rows in %d shards, %.1fs",
        out.uri,
        manifest.num_rows,
        len(manifest.shards),
        time.perf_counter() - started,
    )
    return manifest


def read_metadata(manifest: Manifest) -> pa.Table:
    """The light columns of every row (no image bytes): id, size, classes and pixel counts."""
    return _read_shards(manifest, ["id", "height", "width", "classes", "class_pixels"])


def read_rows(manifest: Manifest, ids: list[str] | None = None) -> pa.Table:
    """All columns of the chosen rows (all rows when `ids` is None), in manifest order."""
    table = _read_shards(manifest, None)
    if ids is None:
        return table
    wanted = set(ids)
    missing = wanted - set(table.column("id").to_pylist())
    if missing:
        raise DatasetError(f"{manifest.location.uri} lacks ids {sorted(missing)[:5]} (of {len(missing)} asked for)")
    mask = pa.array([i in wanted for i in table.column("id").to_pylist()])
    return table.filter(mask)


def _read_shards(manifest: Manifest, columns: list[str] | None) -> pa.Table:
    """The shards' rows; a shard that is truncated, corrupt or gone is an error naming it and its folder."""
    tables = []
    for loc in manifest.shard_locations:
        try:
            with loc.fs.open_input_file(loc.path) as handle:
                tables.append(pq.read_table(handle, columns=columns))
        except (OSError, pa.ArrowException) as exc:
            raise DamagedDatasetError(manifest.location, f"shard {loc.name} cannot be read ({exc})") from None
    return pa.concat_tables(tables)
