"""Ray Data streams over prepared Parquet rows: the step's training stream and the test stream.

The driver builds a lazy `ray.data.Dataset` per step; Ray Train splits it across workers and
re-runs it every epoch, so decoding and augmentation happen in Ray Data CPU tasks while the
trainers compute. Rows carry encoded bytes until the map task decodes them; what reaches the
trainer is uint8 crops and uint8 label maps (normalisation happens on the trainer's device).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
import torch

from eir.data.ingest import Manifest
from eir.data.transforms import JointAugment, center_crop_eval, decode_map, decode_rgb

ROW_COLUMNS = ["id", "image", "label"]


def _read_rows(manifest: Manifest, ids: list[str], num_blocks: int | None = None) -> ray.data.Dataset:
    """The chosen rows of a prepared dataset as a lazy Ray Dataset.

    Parquet V2 datasource packs small datasets into one block (one read task, first batch only
    at the end of the epoch: RAY_NOTES.md), so the V1 reader with one block per shard is used.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False
    ds = ray.data.read_parquet(
        manifest.shard_uris if not manifest.location.is_local else [loc.path for loc in manifest.shard_locations],
        filesystem=manifest.location.fs,
        override_num_blocks=num_blocks or len(manifest.shards),
    ).select_columns(ROW_COLUMNS)
    wanted = pa.array(sorted(set(ids)), type=pa.string())

    def keep(table: pa.Table) -> pa.Table:
        return table.filter(pc.is_in(table["id"], value_set=wanted))

    return ds.map_batches(keep, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def _train_batch(batch: dict[str, np.ndarray], lut: np.ndarray, crop_size: int, scale: tuple[float, float]) -> dict[str, np.ndarray]:
    torch.set_num_threads(1)
    augment = JointAugment(crop_size, scale=scale)
    images, labels = [], []
    for image_bytes, label_bytes in zip(batch["image"], batch["label"]):
        image, label = augment(decode_rgb(image_bytes), lut[decode_map(label_bytes)])
        images.append(image)
        labels.append(label)
    return {"image": np.stack(images), "label": np.stack(labels)}


def train_stream(
    manifest: Manifest,
    ids: list[str],
    lut: np.ndarray,
    *,
    crop_size: int,
    scale: tuple[float, float] = (0.5, 2.0),
    batch_size: int = 8,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """Decode → train LUT (background shift) → RandomResizedCrop + flip, per epoch, in CPU tasks."""
    return (
        _read_rows(manifest, ids)
        .randomize_block_order()
        .map_batches(
            _train_batch,
            fn_kwargs={"lut": lut, "crop_size": crop_size, "scale": scale},
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=num_cpus,
        )
    )


def _eval_batch(batch: dict[str, np.ndarray], lut: np.ndarray, protocol: str, crop_size: int) -> dict[str, np.ndarray]:
    images, labels = [], []
    for image_bytes, label_bytes in zip(batch["image"], batch["label"]):
        image, label = decode_rgb(image_bytes), lut[decode_map(label_bytes)]
        if protocol == "center_crop":
            image, label = center_crop_eval(image, label, crop_size)
        images.append(image)
        labels.append(label)
    # Full images may differ in size: ship them as object arrays; the evaluator pads per batch.
    image_column = np.empty(len(images), dtype=object)
    label_column = np.empty(len(labels), dtype=object)
    image_column[:] = images
    label_column[:] = labels
    return {"image": image_column, "label": label_column}


def eval_stream(manifest: Manifest, ids: list[str], lut: np.ndarray, *, protocol: str, crop_size: int) -> ray.data.Dataset:
    """Decode → test LUT (future classes → 0 or 255) → optional centre crop; no randomness."""
    return _read_rows(manifest, ids).map_batches(
        _eval_batch,
        fn_kwargs={"lut": lut, "protocol": protocol, "crop_size": crop_size},
        batch_size=8,
        batch_format="numpy",
    )
