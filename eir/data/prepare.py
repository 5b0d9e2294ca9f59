"""From a dataset name and a root to a prepared Parquet dataset, explicitly or through the cache.

`launch.py prepare` calls `prepare_split` with an explicit output folder. Every other command
calls `ensure_prepared`: given a raw dataset root it ingests once into
`<run.output_dir>/datasets/<dataset>-<split>-<checksum[:16]>/`, named by the content checksum so
that identical content is stored once however its files were copied or touched. Finding that
folder must not need a decode, so `datasets/_index/<dataset>-<split>-<fingerprint>.json` maps the
cheap source fingerprint (paths, sizes, mtimes) to it. A root that already is a prepared dataset
(it holds a manifest) is used as is.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from eir import storage
from eir.data.base import DatasetError
from eir.data.ingest import MANIFEST, Manifest, ingest, is_prepared, read_manifest, source_fingerprint, write_prepared
from eir.data.registry import open_reader
from eir.data.synthetic import generate_synthetic
from eir.storage import Location

log = logging.getLogger(__name__)

INDEX_DIR = "_index"


def _fingerprint(dataset: str, root: Path, split: str, image_scale: float) -> str:
    """The source fingerprint of a raw split; it also keys the dataset and the scale it is ingested at."""
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder (dataset {dataset!r})")
    return source_fingerprint(root, split, {"dataset": dataset, "image_scale": image_scale})


def prepare_split(
    dataset: str,
    root: str | Path,
    split: str,
    out: Location,
    *,
    image_scale: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Ingest one split of a raw dataset into `out` (idempotent, atomic)."""
    root = Path(root)
    fingerprint = _fingerprint(dataset, root, split, image_scale)
    return ingest(
        open_reader(dataset, root, split),
        out,
        split=split,
        source=str(root.resolve()),
        image_scale=image_scale,
        overwrite=overwrite,
        progress=progress,
        fingerprint=fingerprint,
    )


def synthetic_root(output_root: Location, num_images: int, image_size: int, seed: int) -> Path:
    """Where the generated synthetic dataset lives (always local: the generator writes files)."""
    if not output_root.is_local:
        raise DatasetError(
            "the synthetic dataset is generated on local disk: prepare it with `launch.py prepare synthetic` "
            "and point dataset.root at the prepared folder when run.output_dir is remote"
        )
    return Path(output_root.path) / "datasets" / f"synthetic-raw-n{num_images}-s{image_size}-seed{seed}"


def _prepared_at(root: Location, split: str) -> Manifest | None:
    """The prepared `split` at root, or at root/<split> as `launch.py prepare` writes it; None if neither.

    Checked the same way for local paths and URIs, so a prepared folder of the wrong split is
    an error wherever it lives rather than silently used.
    """
    for candidate in (root, root.join(split)):
        if is_prepared(candidate):
            manifest = read_manifest(candidate)
            if manifest.split != split:
                raise DatasetError(
                    f"{candidate.uri} is the prepared {manifest.split!r} split, but split {split!r} was asked for"
                )
            return manifest
    return None


def ensure_prepared(
    dataset: str,
    root: str,
    split: str,
    output_root: Location,
    *,
    image_scale: float = 1.0,
    synthetic: tuple[int, int, int] = (600, 112, 0),
    progress: bool = True,
) -> Manifest:
    """The prepared dataset for (dataset, root, split), ingesting into the cache on first use.

    `synthetic` is (num_images, image_size, seed), used when dataset is "synthetic" and no root
    is given: the data is generated first.
    """
    if root:
        manifest = _prepared_at(storage.resolve(root), split)
        if manifest is not None:
            if not output_root.is_local and "://" not in root:
                log.warning("dataset.root=%s is a prepared dataset on this machine's disk while run.output_dir=%s is "
                            "remote: workers on other nodes cannot read it; prepare it onto shared storage "
                            "(`launch.py prepare ... --out s3://...`) or give the raw folder", root, output_root.uri)
            return manifest
        if "://" in root:
            raise DatasetError(
                f"{root} is not a prepared dataset (no complete {MANIFEST} there or in {split}/): raw datasets "
                "are read from local disk; run `launch.py prepare` and point dataset.root at its output"
            )
    if dataset == "synthetic" and not root:
        num_images, image_size, seed = synthetic
        raw = synthetic_root(output_root, num_images, image_size, seed)
        generate_synthetic(raw, num_images, seed=seed, image_size=image_size, progress=progress)
        root = str(raw)
    if not root:
        raise DatasetError(f"dataset.root is empty: dataset {dataset!r} needs the raw dataset folder")
    return _cached_ingest(dataset, Path(root), split, output_root.join("datasets"), image_scale, progress)


def _cached_ingest(
    dataset: str, root: Path, split: str, datasets: Location, image_scale: float, progress: bool
) -> Manifest:
    """The cache entry for a raw split: found through the fingerprint index, or ingested and published.

    A new fingerprint (first use, or files touched or copied) means one decode into a staging
    folder; its checksum names the entry. If that entry already exists the staging copy is
    dropped, so identical content is stored once; either way the index learns the fingerprint
    and the next call decodes nothing.
    """
    fingerprint = _fingerprint(dataset, root, split, image_scale)
    index = datasets.join(INDEX_DIR, f"{dataset}-{split}-{fingerprint}.json")
    if storage.exists(index):
        recorded = storage.read_json(index)
        if not isinstance(recorded, dict) or not isinstance(recorded.get("folder"), str):
            raise DatasetError(f"dataset cache index {index.uri} is damaged (expected {{\"folder\": NAME}}, found "
                               f"{recorded!r}): delete it and the dataset is ingested again")
        entry = datasets.join(recorded["folder"])
        if is_prepared(entry):
            return read_manifest(entry)
        log.info("the dataset cache entry %s named by %s is gone or incomplete: ingesting again", entry.uri, index.uri)
    staging = datasets.join(f".staging-{dataset}-{split}-{fingerprint}-{uuid.uuid4().hex[:8]}")
    storage.makedirs(staging)
    log.info("ingesting %s/%s from %s into the dataset cache %s", dataset, split, root, datasets.uri)
    try:
        checksum = write_prepared(open_reader(dataset, root, split), staging, split=split, source=str(root.resolve()),
                                  image_scale=image_scale, progress=progress, fingerprint=fingerprint)
        entry = datasets.join(f"{dataset}-{split}-{checksum[:16]}")
        if is_prepared(entry):
            log.info("%s already holds this content (checksum %s): keeping it", entry.uri, checksum[:12])
        else:
            _publish(staging, entry)
    finally:
        storage.delete_dir(staging)
    storage.write_json_atomic(index, {"folder": entry.name})
    return read_manifest(entry)


def _publish(staging: Location, entry: Location) -> None:
    """Move a complete staging folder to its cache entry, never deleting a complete entry.

    Another process (a parallel sweep trial) may publish the same content at any moment, and may
    already be reading it, so nothing here deletes what could be complete. On an object store the
    files are copied over whatever is there, marker last: a copy cut short is overwritten by the
    same content-addressed files. Locally the rename fails on an existing entry: a complete one is
    as good as ours; an incomplete one (only a crashed older writer leaves that) is replaced.
    """
    try:
        storage.publish_dir(staging, entry)
    except OSError:
        if not entry.is_local:
            raise
        if is_prepared(entry):
            log.info("%s was published by another process meanwhile: using it", entry.uri)
            return
        storage.replace_dir(staging, entry)
