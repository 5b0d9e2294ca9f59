"""Why a fair image replay ties finetune on CamVid: the stored labels lose a vote to the background shift.

Usage: `python experiments/analysis/image_replay_conflict.py RUN_DIR` on a finished `image_replay` run
(or any run that stored images: `memory.kind=images`). For every incremental step it prints

- per old class, the pixels the step's *own* training images label background (the background shift:
  under a BCE over every channel each one pushes that class's channel down) against the pixels the
  *stored* images label with the class (each one pushes it up), and the share of "up" votes
  `up / (up + down)`: the sigmoid a BCE settles at on that class's pixels when stored and new images
  look alike, as CamVid's street scenes do;
- per old class, the mean sigmoid the step's model gives the class's own channel on its test pixels.

Where every image shows the old classes (CamVid: 362 of 367 training images are in every step) the share
is about 0.2 whatever M is, so the old classes' sigmoids stay below their competitors' and argmax never
picks them: image replay moves the probabilities (finetune's are 0.000) without moving mIoU. BENCHMARKS.md
("The mechanism, measured on the model") has the numbers. About 10 s on CPU for CamVid 5-3.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Iterable

import numpy as np
import pyarrow.parquet as pq
import torch

from eir import storage
from eir.data.codec import decode_map, decode_rgb
from eir.data.transforms import normalize
from eir.model import load_step_model
from eir.replay.image_store import ImageStore
from eir.train.memory import load_memory
from eir.train.resolved import Experiment, resolve
from eir.train.rundir import read_run_config


def count_votes(
    old: tuple[int, ...],
    own_pixels: Iterable[dict[int, int]],
    stored: Iterable[tuple[np.ndarray, Collection[int]]],
) -> dict[int, tuple[int, int]]:
    """Old class → (its pixels in the step's own images, all labelled background there; its pixels in stored images
    whose labels keep it). `own_pixels`: per own image, class → pixel count; `stored`: per stored image, its label
    map and the classes its labels keep (those its storing step had learned; none under DKD-M's masking)."""
    down, up = dict.fromkeys(old, 0), dict.fromkeys(old, 0)
    for pixels in own_pixels:
        for c in old:
            down[c] += pixels.get(c, 0)
    for label, kept in stored:
        for c in old:
            if c in kept:
                up[c] += int((label == c).sum())
    return {c: (down[c], up[c]) for c in old}


def class_pixels(exp: Experiment) -> dict[str, dict[int, int]]:
    """Training image id → class → pixel count, from the manifest's own column (no label is decoded)."""
    return {
        row["id"]: dict(zip(row["classes"], row["class_pixels"], strict=True))
        for uri in exp.train_manifest.shard_uris
        for row in pq.read_table(uri, columns=["id", "classes", "class_pixels"]).to_pylist()
    }


def label_votes(
    exp: Experiment, step: int, pixels: dict[str, dict[int, int]], memory: ImageStore
) -> dict[int, tuple[int, int]]:
    """`count_votes` for `step` of a run: its own training images against `memory`, step t−1's stored ones."""
    own_pixels = (pixels[image_id] for image_id in exp.train_splits.step_ids(step))
    masked = exp.config.replay.image_labels == "current"  # DKD-M's masking: a stored image's old classes are 0
    stored = (
        (decode_map(row["label"]), () if masked else exp.schedule.classes_seen(row["stored_step"]))
        for row in memory.table.select(["label", "stored_step"]).to_pylist()
    )
    return count_votes(exp.schedule.old_classes(step), own_pixels, stored)


def mean_sigmoid(exp: Experiment, step: int, classes: tuple[int, ...], every: int) -> dict[int, float]:
    """Mean sigmoid of each class's own channel on the class's test pixels (every `every`-th test image)."""
    model_config = exp.config.model
    model = load_step_model(exp.step_dir(step).join("model.pt").uri, model_config.backbone, model_config.output_stride)
    channel = exp.channels.lut
    sums, counts = dict.fromkeys(classes, 0.0), dict.fromkeys(classes, 0)
    test_ids = set(exp.test_splits.step_ids(step))
    with torch.no_grad():
        for uri in exp.test_manifest.shard_uris:
            rows = [r for r in pq.read_table(uri, columns=["id", "image", "label"]).to_pylist() if r["id"] in test_ids]
            for row in rows[::every]:
                image = torch.from_numpy(decode_rgb(row["image"])).permute(2, 0, 1)[None]
                probabilities = torch.sigmoid(model(normalize(image)))[0].numpy()
                label = decode_map(row["label"])
                for c in classes:
                    mask = label == c
                    sums[c] += float(probabilities[channel[c]][mask].sum())
                    counts[c] += int(mask.sum())
    return {c: sums[c] / counts[c] if counts[c] else float("nan") for c in classes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run that stored images (image_replay, dkd_m)")
    parser.add_argument("--every", type=int, default=2, help="score every N-th test image (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = storage.resolve(args.run_dir)
    exp = resolve(read_run_config(run), progress=False, run_dir=run)
    names, pixels = exp.train_manifest.info.class_names, class_pixels(exp)
    for step in range(1, exp.schedule.num_steps):
        memory = load_memory(exp.step_dir(step - 1), "images")
        if memory is None:
            raise SystemExit(f"{exp.step_dir(step - 1).uri} stores no images: run this on a memory.kind=images run")
        votes = label_votes(exp, step, pixels, memory)
        sigmoid = mean_sigmoid(exp, step, tuple(votes), args.every)
        own = set(exp.train_splits.step_ids(step))
        stored = memory.table.column("id").to_pylist()
        print(
            f"step {step}: {len(own)} own images, {len(stored)} stored ({len(stored) / (len(own) + len(stored)):.0%} "
            f"of the stream), {len(own.intersection(stored))} of them also among the own images"
        )
        print(f"  {'class':12s} {'down (Mpx)':>10s} {'up (Mpx)':>9s} {'up share':>9s} {'mean sigmoid':>13s}")
        for c, (down, up) in votes.items():
            share = up / (up + down) if up + down else float("nan")
            print(f"  {names[c]:12s} {down / 1e6:10.2f} {up / 1e6:9.2f} {share:9.3f} {sigmoid[c]:13.3f}")


if __name__ == "__main__":
    main()
