"""From a dataset name and a root to a prepared Parquet dataset, explicitly or through the cache.

`launch.py prepare` calls `prepare_split` with an explicit output folder. Every other command
calls `ensure_prepared`: given a raw dataset root it ingests once into
`<run.output_dir>/datasets/<dataset>-<split>-<checksum[:16]>/`, named by the content checksum so
that identical content is stored once however its files were copied or touched. Finding that
folder must not need a decode, so `datasets/_index/<dataset>-<split>-<fingerprint>.json` maps the
cheap source fingerprint (paths, sizes, mtimes) to it. A root that already is a prepared dataset
(it holds a manifest) is used as is.

Nothing damaged is reused: a cache entry whose manifest is not JSON, lacks keys, or whose shards
are missing or of the wrong size is moved aside (`.<name>.damaged-<id>`, kept for a look) and
ingested again; a damaged index file is rewritten. A damaged prepared folder the user named is an
error naming it (it may be someone's only copy).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from eir import storage
from eir.data.base import DatasetError
from eir.data.ingest import (
    MANIFEST,
    DamagedDatasetError,
    Manifest,
    ingest,
    is_prepared,
    make_output_folder,
    read_manifest,
    source_fingerprint,
    write_prepared,
)
from eir.data.registry import open_reader
from eir.data.synthetic import generate_synthetic
from eir.storage import Location

log = logging.getLogger(__name__)

INDEX_DIR = "_index"


def _fingerprint(
    dataset: str, root: Path, split: str, image_scale: float, ade_ignore_other: bool, outputs: list[Location]
) -> str:
    """The source fingerprint of a raw split; it also keys the dataset and the reader settings it is ingested with.

    Those are the scale and, for ADE20K only, what raw 0 becomes (`dataset.ade_ignore_other`): the
    two conventions must never share a cache entry. Other datasets' fingerprints leave that key out,
    so their existing cache entries stay found. `outputs` are where this command writes: when they
    lie inside the dataset root, the walk leaves them out, so it never reads files being written
    (by us or a parallel trial).
    """
    if not root.is_dir():
        what = (
            "is a symbolic link that leads nowhere or loops"
            if root.is_symlink()
            else "does not exist or is not a folder"
        )
        raise DatasetError(f"dataset root {root} {what} (dataset {dataset!r})")
    exclude = [out.path for out in outputs if out.is_local]
    options: dict[str, object] = {"dataset": dataset, "image_scale": image_scale}
    if dataset == "ade20k":
        options["ade_ignore_other"] = ade_ignore_other
    return source_fingerprint(root, split, options, exclude)


def prepare_split(
    dataset: str,
    root: str | Path,
    split: str,
    out: Location,
    *,
    image_scale: float = 1.0,
    ade_ignore_other: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Ingest one split of a raw dataset into `out` (idempotent, atomic)."""
    root = Path(root)
    fingerprint = _fingerprint(dataset, root, split, image_scale, ade_ignore_other, [out.parent, out])
    return ingest(
        open_reader(dataset, root, split, ade_ignore_other=ade_ignore_other),
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


def _root_location(root: str) -> Location:
    """dataset.root as a Location; a URI pyarrow cannot open is an error naming it."""
    try:
        return storage.resolve(root)
    except ValueError as exc:  # pyarrow.ArrowInvalid: an unknown scheme or a malformed URI
        raise DatasetError(
            f"dataset root {root}: {exc} (expected a local folder or a URI such as s3://bucket/path)"
        ) from None


def _prepared_at(root: Location, split: str, ade_ignore_other: bool) -> Manifest | None:
    """The prepared `split` at root, or at root/<split> as `launch.py prepare` writes it; None if neither.

    Checked the same way for local paths and URIs, so a prepared folder of the wrong split, or an
    ADE20K folder of the other convention for raw 0, is an error wherever it lives rather than
    silently used.
    """
    for candidate in (root, root.join(split)):
        if is_prepared(candidate):
            manifest = read_manifest(candidate)
            if manifest.split != split:
                raise DatasetError(
                    f"{candidate.uri} is the prepared {manifest.split!r} split, but split {split!r} was asked for"
                )
            _check_ade_convention(manifest, ade_ignore_other)
            return manifest
    return None


def _check_ade_convention(manifest: Manifest, ade_ignore_other: bool) -> None:
    """A prepared ADE20K split must hold raw 0 the way `dataset.ade_ignore_other` asks (its manifest says how)."""
    if manifest.dataset != "ade20k" or manifest.info.background_is_class != ade_ignore_other:
        return
    held = "as background class 0 (DKD's convention)" if ade_ignore_other else "ignored (255, MiB's convention)"
    raise DatasetError(
        f"{manifest.location.uri} was prepared with ADE20K's raw label 0 {held}, but dataset.ade_ignore_other="
        f"{str(ade_ignore_other).lower()} asks for the other convention: set dataset.ade_ignore_other="
        f"{str(not ade_ignore_other).lower()}, or give the raw ADEChallengeData2016 folder as dataset.root "
        "(each convention is ingested into a cache entry of its own)"
    )


def ensure_prepared(
    dataset: str,
    root: str,
    split: str,
    output_root: Location,
    *,
    image_scale: float = 1.0,
    ade_ignore_other: bool = False,
    synthetic: tuple[int, int, int] = (600, 112, 0),
    progress: bool = True,
) -> Manifest:
    """The prepared dataset for (dataset, root, split), ingesting into the cache on first use.

    `synthetic` is (num_images, image_size, seed), used when dataset is "synthetic" and no root
    is given: the data is generated first. `ade_ignore_other` is `dataset.ade_ignore_other`.
    """
    if root:
        manifest = _prepared_at(_root_location(root), split, ade_ignore_other)
        if manifest is not None:
            if not output_root.is_local and "://" not in root:
                log.warning(
                    "dataset.root=%s is a prepared dataset on this machine's disk while run.output_dir=%s is "
                    "remote: workers on other nodes cannot read it; prepare it onto shared storage "
                    "(`launch.py prepare ... --out s3://...`) or give the raw folder",
                    root,
                    output_root.uri,
                )
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
    return _cached_ingest(dataset, Path(root), split, output_root, image_scale, ade_ignore_other, progress)


def find_prepared(
    dataset: str,
    root: str,
    split: str,
    output_root: Location,
    *,
    image_scale: float = 1.0,
    ade_ignore_other: bool = False,
    synthetic: tuple[int, int, int] = (600, 112, 0),
) -> Manifest | None:
    """What `ensure_prepared` would return, if it exists already; None otherwise.

    Nothing is generated, ingested or decoded: it lets a command look up a run's training data
    (its label space) without paying for an ingest, or failing where the raw data is gone.
    """
    if root:
        manifest = _prepared_at(_root_location(root), split, ade_ignore_other)
        if manifest is not None or "://" in root:
            return manifest
        raw = Path(root)
    elif dataset == "synthetic" and output_root.is_local:
        raw = synthetic_root(output_root, *synthetic)
    else:
        return None
    if not raw.is_dir():
        return None
    fingerprint = _fingerprint(dataset, raw, split, image_scale, ade_ignore_other, [output_root])
    return _indexed(output_root.join("datasets"), _index_file(output_root, dataset, split, fingerprint))


def _index_file(output_root: Location, dataset: str, split: str, fingerprint: str) -> Location:
    return output_root.join("datasets", INDEX_DIR, f"{dataset}-{split}-{fingerprint}.json")


def _indexed(datasets: Location, index: Location) -> Manifest | None:
    """The sound cache entry an index file names, or None (no index, or nothing usable behind it).

    A damaged index file is reported and then rewritten by the ingest that follows (it only
    points at an entry); a damaged entry is quarantined, never deleted, and ingested again.
    """
    if not storage.exists(index):
        return None
    try:
        recorded = storage.read_json(index)
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        recorded = f"not JSON: {exc}"
    folder = recorded.get("folder") if isinstance(recorded, dict) else None
    if not isinstance(folder, str) or "/" in folder or folder in ("", ".", ".."):
        log.warning(
            'dataset cache index %s is damaged (expected {"folder": NAME}, found %.200r): not used; the '
            "next ingest of this dataset rewrites it",
            index.uri,
            recorded,
        )
        return None
    entry = datasets.join(folder)
    manifest = _sound_entry(entry)
    if manifest is None:
        log.info(
            "the dataset cache entry %s named by %s is gone, incomplete or damaged: not used", entry.uri, index.uri
        )
    return manifest


def _sound_entry(entry: Location) -> Manifest | None:
    """A cache entry's manifest when it is complete and intact; a damaged one is moved out of use first."""
    if not is_prepared(entry):
        return None
    try:
        return read_manifest(entry)
    except DamagedDatasetError as exc:
        try:
            aside = storage.quarantine(entry)
        except FileNotFoundError:  # a parallel process moved it first
            return None
        log.warning(
            "dataset cache entry %s is damaged (%s): moved out of use to %s and ingested again",
            entry.uri,
            exc.problem,
            aside.uri,
        )
        return None


def _cached_ingest(
    dataset: str,
    root: Path,
    split: str,
    output_root: Location,
    image_scale: float,
    ade_ignore_other: bool,
    progress: bool,
) -> Manifest:
    """The cache entry for a raw split: found through the fingerprint index, or ingested and published.

    A new fingerprint (first use, or files touched or copied) means one decode into a staging
    folder; its checksum names the entry. If that entry already exists the staging copy is
    dropped, so identical content is stored once; either way the index learns the fingerprint
    and the next call decodes nothing.
    """
    datasets = output_root.join("datasets")
    fingerprint = _fingerprint(dataset, root, split, image_scale, ade_ignore_other, [output_root])
    index = _index_file(output_root, dataset, split, fingerprint)
    manifest = _indexed(datasets, index)
    if manifest is not None:
        return manifest
    staging = datasets.join(f".staging-{dataset}-{split}-{fingerprint}-{uuid.uuid4().hex[:8]}")
    make_output_folder(staging, datasets)
    log.info("ingesting %s/%s from %s into the dataset cache %s", dataset, split, root, datasets.uri)
    try:
        checksum = write_prepared(
            open_reader(dataset, root, split, ade_ignore_other=ade_ignore_other),
            staging,
            split=split,
            source=str(root.resolve()),
            image_scale=image_scale,
            progress=progress,
            fingerprint=fingerprint,
        )
        entry = datasets.join(f"{dataset}-{split}-{checksum[:16]}")
        if _sound_entry(entry) is not None:
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
