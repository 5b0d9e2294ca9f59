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
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from eir import storage
from eir.data.codec import encode_png
from eir.progress import progress as progress_bar
from eir.data.base import DatasetError, DatasetInfo, Sample, SegmentationReader
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


def source_fingerprint(root: str | Path, split: str, options: dict[str, Any]) -> str:
    """A cheap identity of a raw dataset folder: every file's relative path, size and mtime.

    It keys the implicit ingest cache, so a command given a raw root knows whether that root
    was already ingested without decoding anything.
    """
    root = Path(root)
    digest = hashlib.sha256(repr((split, sorted(options.items()))).encode())
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def read_manifest(location: Location) -> Manifest:
    """Open a prepared dataset; a missing or incomplete one is an error naming the folder."""
    path = location.join(MANIFEST)
    if not storage.exists(path) or not storage.is_complete(location):
        raise DatasetError(
            f"{location.uri} is not a prepared dataset (no complete {MANIFEST}); "
            "run `launch.py prepare` or give the raw dataset root"
        )
    data = storage.read_json(path)
    if data.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path.uri} has format_version {data.get('format_version')!r}; this eir reads {FORMAT_VERSION}: re-run prepare"
        )
    info = DatasetInfo(
        name=data["dataset"],
        class_names=tuple(data["class_names"]),
        future_label=int(data["future_label"]),
        background_is_class=bool(data["background_is_class"]),
    )
    return Manifest(
        location=location,
        dataset=data["dataset"],
        split=data["split"],
        num_rows=int(data["num_rows"]),
        checksum=data["checksum"],
        shards=tuple(s["file"] for s in data["shards"]),
        info=info,
        image_scale=float(data["image_scale"]),
        source=data["source"],
        source_fingerprint=data["source_fingerprint"],
    )


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
) -> tuple[list[dict[str, Any]], int, str]:
    shards: list[dict[str, Any]] = []
    checksum = hashlib.sha256(label_space)
    batch: list[dict[str, Any]] = []
    total = 0

    def flush() -> None:
        name = f"part-{len(shards):05d}.parquet"
        table = pa.Table.from_pylist(batch, schema=SCHEMA)
        with tmp.fs.open_output_stream(tmp.join(name).path) as sink:
            pq.write_table(table, sink, row_group_size=max(1, min(len(batch), 16)))
        shards.append({"file": name, "rows": len(batch)})
        batch.clear()

    for row in rows:
        checksum.update(_row_digest(row))
        batch.append(row)
        total += 1
        if len(batch) >= shard_rows:
            flush()
    if batch:
        flush()
    return shards, total, checksum.hexdigest()


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
    samples = (reader.read(i) for i in progress_bar(ids, f"ingest {info.name}/{split}", total=len(ids), enabled=progress, unit="img"))
    label_space = label_space_bytes(info.class_names, info.future_label, info.background_is_class)
    shards, total, checksum = _write_shards((sample_to_row(s, image_scale) for s in samples), folder, shard_rows, label_space)
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
    storage.mark_complete(folder, {"rows": total, "checksum": checksum})
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
    if storage.exists(out) and not is_prepared(out):
        if storage.list_dir(out) and not overwrite:
            raise FileExistsError(f"{out.uri} exists but is not a complete prepared dataset; pass --overwrite to replace it")
    if is_prepared(out):
        existing = read_manifest(out)
        if fingerprint is not None and existing.source_fingerprint == fingerprint:
            log.info("%s is already prepared (%d rows, checksum %s)", out.uri, existing.num_rows, existing.checksum[:12])
            return existing

    tmp = out.parent.join(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    storage.makedirs(tmp)
    started = time.perf_counter()
    try:
        checksum = write_prepared(reader, tmp, split=split, source=source, image_scale=image_scale,
                                  shard_rows=shard_rows, progress=progress, fingerprint=fingerprint)
        if is_prepared(out):
            existing = read_manifest(out)
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
    log.info("prepared %s: %d rows in %d shards, %.1fs", out.uri, manifest.num_rows, len(manifest.shards),
             time.perf_counter() - started)
    return manifest


def read_metadata(manifest: Manifest) -> pa.Table:
    """The light columns of every row (no image bytes): id, size, classes and pixel counts."""
    columns = ["id", "height", "width", "classes", "class_pixels"]
    tables = []
    for loc in manifest.shard_locations:
        with loc.fs.open_input_file(loc.path) as handle:
            tables.append(pq.read_table(handle, columns=columns))
    return pa.concat_tables(tables)


def read_rows(manifest: Manifest, ids: list[str] | None = None) -> pa.Table:
    """All columns of the chosen rows (all rows when `ids` is None), in manifest order."""
    tables = []
    for loc in manifest.shard_locations:
        with loc.fs.open_input_file(loc.path) as handle:
            tables.append(pq.read_table(handle))
    table = pa.concat_tables(tables)
    if ids is None:
        return table
    wanted = set(ids)
    missing = wanted - set(table.column("id").to_pylist())
    if missing:
        raise DatasetError(f"{manifest.location.uri} lacks ids {sorted(missing)[:5]} (of {len(missing)} asked for)")
    mask = pa.array([i in wanted for i in table.column("id").to_pylist()])
    return table.filter(mask)
