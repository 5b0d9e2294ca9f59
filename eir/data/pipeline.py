"""Ray Data streams over prepared Parquet rows: the step's training stream and the test stream.

The driver builds a lazy `ray.data.Dataset` per step; Ray Train splits it across workers and
re-runs it every epoch, so decoding and augmentation happen in Ray Data CPU tasks while the
trainers compute. Rows carry encoded bytes until the map task decodes them; what reaches the
trainer is uint8 crops, uint8 label maps and EIR's paste plans (the paste itself and normalisation
happen on the trainer's device).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from eir import storage
from eir.data.codec import encode_raw_map
from eir.data.ingest import Manifest
from eir.data.pacing import pace
from eir.data.stream_spec import StreamSpec, row_lut
from eir.data.transforms import JointAugment, center_crop_eval, decode_map, decode_rgb, logits_by_size
from eir.model import load_step_model
from eir.pseudo import (
    HISTOGRAM_BINS,
    ClassThresholds,
    PseudoRule,
    chosen_pseudo_labels,
    class_histogram,
    merge_pseudo,
    thresholds_from_json,
)
from eir.replay.image_store import STORED_STEP
from eir.replay.paste import PLAN_COLUMNS, empty_plan, index_by_channel, plan_paste, plan_rows
from eir.replay.replay_sample import replay_canvas
from eir.replay.store import InstanceStore
from eir.storage import Location

log = logging.getLogger(__name__)

ROW_COLUMNS = ["id", "image", "label"]
NOT_STORED = -1  # the `stored_step` of the step's own rows beside replayed images: they take the train LUT


def _read_files(locations: list[Location], fs) -> ray.data.Dataset:
    """Parquet files as a lazy Ray Dataset with one block per file.

    The Parquet V2 datasource packs small datasets into one block (one read task, first batch
    only at the end of the epoch: RAY_NOTES.md), so the V1 reader is used with a block per file.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = False  # one bar per operator floods driver logs; eir prints its own progress
    pace(ctx)  # a backpressured stream must not spin a core (eir.data.pacing)
    return ray.data.read_parquet(
        [loc.path if loc.is_local else loc.uri for loc in locations],
        filesystem=fs,
        override_num_blocks=max(1, len(locations)),
    )


def read_manifest_rows(manifest: Manifest, ids: list[str]) -> ray.data.Dataset:
    """The chosen rows of a prepared dataset (filtered by id inside the read tasks)."""
    ds = _read_files(manifest.shard_locations, manifest.location.fs).select_columns(ROW_COLUMNS)
    wanted = pa.array(sorted(set(ids)), type=pa.string())

    def keep(table: pa.Table) -> pa.Table:
        return table.filter(pc.is_in(table["id"], value_set=wanted))

    return ds.map_batches(keep, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def with_stored_images(rows: ray.data.Dataset, stored: pa.Table, *, pseudo: bool) -> ray.data.Dataset:
    """The step's rows and image replay's stored images (an image store's table) as one dataset of one schema.

    A stored image carries the step it was stored at, which picks its look-up table
    (`StreamSpec.row_lut`); the step's own rows carry NOT_STORED (the train LUT). When the step's
    rows carry pseudo-labels (`pseudo`), a stored image keeps the `pseudo` column of a `stored` table that
    has one (`replay.pseudo_label`: labelled by `write_pseudo_labels`) and gets a null one otherwise:
    replayed images are not pseudo-labelled unless asked (METHOD.md §4.1). One schema, because Ray Data
    fills a column a block lacks only when it meets a block that has it in the same batch: a batch of
    stored rows alone would lack `pseudo` (and a batch of the step's rows alone `stored_step`).
    """
    columns = [*ROW_COLUMNS, "pseudo"] if pseudo else ROW_COLUMNS
    replayed = stored.select(ROW_COLUMNS)
    if pseudo:
        labelled = "pseudo" in stored.column_names
        replayed = replayed.append_column(
            "pseudo", stored.column("pseudo") if labelled else pa.nulls(stored.num_rows, pa.binary())
        )
    replayed = replayed.append_column(stored.schema.field(STORED_STEP), stored.column(STORED_STEP))

    def mark_own(table: pa.Table) -> pa.Table:
        return table.append_column(
            replayed.schema.field(STORED_STEP), pa.array(np.full(table.num_rows, NOT_STORED), pa.int16())
        )

    own = rows.select_columns(columns).map_batches(
        mark_own, batch_format="pyarrow", batch_size=None, zero_copy_batch=True
    )
    return own.union(ray.data.from_arrow(replayed))


_STORES: dict[str, tuple[list, dict[int, np.ndarray]]] = {}


def _store_arrays(spec: StreamSpec) -> tuple[list, dict[int, np.ndarray]]:
    """The decoded store and its rows per channel, kept per worker process (decoded once per step)."""
    key = spec.store.hex()
    if key not in _STORES:
        store = InstanceStore.from_bytes(ray.get(spec.store))
        _STORES.clear()  # one step's store at a time per process
        _STORES[key] = (store.decoded(), index_by_channel(store.class_ids(), spec.class_to_channel))
    return _STORES[key]


@dataclass
class Sample:
    """One training sample as it leaves the data workers (CHW uint8 image, uint8 label map)."""

    image: np.ndarray  # not yet pasted: the trainer carries out `paste_plan` on its device
    label: np.ndarray  # with pseudo-labels merged into background pixels
    paste_plan: np.ndarray | None = None  # `eir.replay.paste.plan_paste`; None when the stream pastes nothing
    pseudo: np.ndarray | None = None  # the cropped pseudo-label map (previews only)


class SampleMaker:
    """Decode → LUT → joint crop/flip (+ pseudo-label) → EIR's paste plan, plus instance-replay samples.

    One piece serves the Ray Data stream (`_train_batch`) and `launch.py preview`, so what a
    preview shows is exactly what the trainer receives (the preview then applies the plan as the
    trainer does, `eir.replay.paste.apply_paste`).
    """

    def __init__(
        self,
        spec: StreamSpec,
        arrays: list,
        by_channel: dict[int, np.ndarray],
        rng: np.random.Generator,
    ):
        self.spec, self.arrays, self.by_channel, self.rng = spec, arrays, by_channel, rng
        self.augment = JointAugment(spec.crop_size, scale=spec.scale)
        self.no_paste = empty_plan(spec.paste) if spec.paste is not None else None
        self.lut_channels: dict[int, frozenset[int]] = {}  # per stored step: the channels its labels can hold

    def label_channels(self, stored_step: int) -> frozenset[int]:
        """Every channel a label read through `stored_step`'s look-up table can hold (computed once per table)."""
        if stored_step not in self.lut_channels:
            self.lut_channels[stored_step] = frozenset(np.unique(self.spec.row_lut(stored_step)).tolist())
        return self.lut_channels[stored_step]

    def __call__(
        self,
        image_bytes: bytes,
        label_bytes: bytes,
        pseudo_bytes: bytes | None = None,
        stored_step: int = NOT_STORED,
    ) -> list[Sample]:
        """The row's samples; `stored_step` >= 0: a replayed image stored at that step (its own LUT)."""
        spec = self.spec
        image, label = decode_rgb(image_bytes), spec.row_lut(stored_step)[decode_map(label_bytes)]
        if pseudo_bytes is not None:
            image_c, label_c, pseudo_c = self.augment(image, label, decode_map(pseudo_bytes))
        else:
            (image_c, label_c), pseudo_c = self.augment(image, label), None
        plan = self.no_paste
        if spec.paste is not None and self.arrays:
            # Potential classes are those the pseudo-labels see but the ground truth lacks, so
            # plan before the pseudo-labels are merged into the label.
            plan = plan_paste(
                label_c,
                pseudo_c if pseudo_c is not None else np.zeros_like(label_c),
                self.by_channel,
                spec.old_channels,
                spec.paste,
                self.rng,
                self.label_channels(stored_step),
            )
        if pseudo_c is not None:
            label_c = merge_pseudo(label_c, pseudo_c).astype(np.uint8, copy=False)
        samples = [Sample(image_c, label_c, plan, pseudo_c)]
        if self.arrays and spec.replay_per_row > 0:
            for _ in range(int(spec.replay_per_row + self.rng.random())):
                class_id, crop, mask = self.arrays[int(self.rng.integers(len(self.arrays)))]
                channel = int(spec.class_to_channel[class_id])
                canvas, canvas_label = replay_canvas(crop, mask, channel, spec.crop_size, self.rng)
                image_r, label_r = self.augment(canvas, canvas_label)
                samples.append(Sample(image_r, label_r, self.no_paste))
        return samples


def _train_batch(batch: dict[str, np.ndarray], spec: StreamSpec) -> dict[str, np.ndarray]:
    """The samples of a batch of rows, stacked per column, rows in the batch's order."""
    torch.set_num_threads(1)
    arrays, by_channel = _store_arrays(spec) if spec.store is not None else ([], {})
    make = SampleMaker(spec, arrays, by_channel, np.random.default_rng())
    stored = batch.get(STORED_STEP)  # only beside replayed images (`with_stored_images`)
    samples = [
        sample
        for row in range(len(batch["image"]))
        for sample in make(
            batch["image"][row],
            batch["label"][row],
            batch["pseudo"][row] if spec.pseudo else None,
            NOT_STORED if stored is None else int(stored[row]),
        )
    ]
    columns = ("image", "label", "paste_plan") if spec.paste is not None else ("image", "label")
    return {name: np.stack([getattr(s, name) for s in samples]) for name in columns}


def epoch_row_blocks(
    count: int, epochs: int, rows_per_block: int, rng: np.random.Generator, first_rows: int | None = None
) -> list[pa.Table]:
    """Every epoch a fresh permutation of the step's `count` rows, cut into blocks of at most `rows_per_block`.

    A block is what one map task turns into samples, and the trainer cuts its batches from a few blocks at a
    time (its local shuffle buffer), so a block must be a draw from the whole step. The rows' own blocks hold
    them in the order they were written — CamVid's in video order, consecutive frames of one sequence — and
    batches cut from those were near duplicates: DKD's step 2 diverged in 3 of 4 such runs at the protocol's
    learning rate (BENCHMARKS.md).

    `first_rows`: the stream's very first block is cut into a ramp of `first_rows`, `first_rows`, then pieces
    as large as all before them (16, 16, 32, 64 of a 128-row block), so the first samples reach the trainer
    after a small task, not after a whole block (`FIRST_BLOCK_ROWS`).
    """
    per_epoch = max(1, -(-count // rows_per_block))
    pieces = [rows for _ in range(epochs) for rows in np.array_split(rng.permutation(count), per_epoch)]
    if first_rows is not None:  # a block no larger than `first_rows` stays one piece
        pieces[:1] = _ramp(pieces[0], first_rows)
    return [pa.table({"row": rows.astype(np.int64)}) for rows in pieces]


def _ramp(rows: np.ndarray, first: int) -> list[np.ndarray]:
    """`rows` in pieces of `first`, `first`, then each as large as all the pieces before it (the last: the rest)."""
    pieces, start = [], 0
    while start < len(rows):
        size = max(first, start)
        pieces.append(rows[start : start + size])
        start += size
    return pieces


def gather_rows(rows: np.ndarray, sources: Sequence[pa.Table]) -> dict[str, np.ndarray]:
    """Rows `rows` (indices into the `sources` tables one after the other), in that order, as a numpy batch.

    Each source table gives up only its own rows (`take` per table): a `take` across a concatenation
    would first join every chunk of a column, copying the whole step's encoded images per task.
    """
    ends = np.cumsum([table.num_rows for table in sources])
    block = np.searchsorted(ends, rows, side="right")
    picked, columns = [], {}
    for index in np.unique(block):
        mine = np.flatnonzero(block == index)
        table = sources[index].take(pa.array(rows[mine] - (ends[index] - sources[index].num_rows)))
        picked.append(mine)
        for name in table.column_names:
            columns.setdefault(name, []).append(table.column(name).to_numpy(zero_copy_only=False))
    order = np.argsort(np.concatenate(picked), kind="stable")  # back to the order asked for
    return {name: np.concatenate(parts)[order] for name, parts in columns.items()}


def _train_block(block: pa.Table, spec: StreamSpec, sources: list) -> dict[str, np.ndarray]:
    """One map task: the rows it was dealt, read from the step's materialised blocks (zero-copy on their node),
    made into samples."""
    return _train_batch(gather_rows(block.column("row").to_numpy(), ray.get(sources)), spec)


# Rows per block of a step's training stream. A Ray Data map task carries a fixed cost (worker lease,
# UDF set-up, one Arrow conversion and one object-store put per output block): on CamVid 5-3 step 1 (362
# rows, 10 epochs, 2 cores) the plain stream ran 525 / 512 / 474 / 406 / 345 img/s with blocks of 120 / 60 /
# 30 / 15 / 8 rows, and with the reservation allocator off (below) 0.94 / 0.95 / 0.98 of the DataLoader's
# rate with blocks of 64 / 96 / 128 (medians of 3 rounds). The step's rows arrive in whatever blocks wrote
# them (the ingest shards, the pseudo-label pass's files, the replayed images' table), so the stream
# deals them to tasks in blocks of this size (`epoch_row_blocks`): variants of one step then differ in
# their work, not in their task count.
# The price of larger blocks was the first batch: every task slot starts at once and shares the cores, so
# the first block finished only after about as many rows as all slots together hold (1.69 s of the plain
# stream's 6.78 s at 128 rows, 8 slots on 2 cores; a DataLoader's first batch took 0.03 s). The stream's
# first block is therefore cut into a ramp (`FIRST_BLOCK_ROWS`, `epoch_row_blocks`): a few small tasks more
# per step, and the trainer starts after the first small tasks (its 32-sample shuffle buffer: two of 16 rows).
ROWS_PER_BLOCK = 128
FIRST_BLOCK_ROWS = 16

# Share of a node's object store under which a whole step's stream runs without Ray Data's reservation
# allocator. The allocator is what holds a stream back when the trainer consumes slower than it produces,
# but Ray Data 2.60 starts it at a budget of zero for its first second (RAY_NOTES.md): one task at a time,
# ~9 % of a CamVid step's stream time on 2 cores. It throttles an operator only past its reservation —
# half of Ray Data's budget (itself half the store), shared by at most the stream's two operators, so at
# least 1/8 of the store — and a stream whose epochs together fit in a tenth never gets there: measured on
# CamVid 5-3 with a 0.5 s-per-batch consumer, the whole 450 MB stream entered the store with the allocator
# as without it. Above the share the allocator stays on (VOC-sized steps are tens of GB).
UNTHROTTLED_STORE_SHARE = 0.1


@dataclass(frozen=True)
class StreamTasks:
    """How the training stream's map tasks run: CPUs each (Ray's resource), and at most `per_core` at once per
    core of a one-node cluster with more logical CPUs than that (0: Ray Data's default, one per logical CPU).

    Why the cap is off by default: Ray Data runs one task per logical CPU, and the local instance starts with
    twice the cores, at least 8 (`eir.raysession.local_num_cpus`, so that a Tune trial, its Train workers and the
    stream's tasks can all be scheduled): 8 tasks on 2 cores. Time-shared that way the same transform costs ~35 %
    more CPU per sample (9.5 s of in-task CPU per 3,620-row run against 7.1 s with 4 tasks: CamVid 5-3 step 1,
    plain stream), and 2 per core brought the stream alone to 0.92 of a DataLoader's rate against 0.79 uncapped
    (`bench pipeline`, full form; `data.stream_tasks_per_core=2`). But a CPU trainer on the same cores trains slower
    while the stream produces, and the capped stream takes longer to produce: training was 20–26 % slower capped
    (BENCHMARKS.md, "Two map tasks per core"). The cap is for a node whose trainer does not compute on its cores.
    """

    num_cpus: float = 1.0
    per_core: int = 0


def task_slots(logical_cpus: float, cores: int, per_core: int) -> int | None:
    """Concurrent training-stream tasks on a node of `logical_cpus` and `cores`: `per_core` per core when its
    logical CPUs exceed that, else None (Ray Data's default, one per logical CPU); per_core 0 never caps."""
    cap = per_core * max(1, cores)
    return cap if per_core and logical_cpus > cap else None


def stream_task_slots(per_core: int) -> int | None:
    """`task_slots` of the cluster when it is this machine alone (the local instance, or a one-node cluster
    started here); None on any other cluster, whose logical CPUs are its nodes' cores and not known here."""
    if not per_core:
        return None
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) != 1 or nodes[0]["NodeID"] != ray.get_runtime_context().get_node_id():
        return None
    return task_slots(nodes[0]["Resources"].get("CPU", 0), os.cpu_count() or 1, per_core)


def sample_nbytes(spec: StreamSpec) -> int:
    """Bytes of one training sample as the stream ships it: uint8 crop, uint8 label map, paste plan."""
    plan = plan_rows(spec.paste) * len(PLAN_COLUMNS) * np.dtype(np.float32).itemsize if spec.paste else 0
    return spec.crop_size * spec.crop_size * (3 + 1) + plan


def smallest_object_store() -> int:
    """The smallest object store of the cluster's live nodes, in bytes (a stream's blocks land on any)."""
    stores = [node["Resources"].get("object_store_memory", 0) for node in ray.nodes() if node["Alive"]]
    return int(min(stores, default=0))


def needs_backpressure(stream_bytes: int, store_bytes: int) -> bool:
    """Whether a stream of `stream_bytes` needs the reservation allocator to bound it in a store of `store_bytes`."""
    return stream_bytes > UNTHROTTLED_STORE_SHARE * store_bytes


def train_stream(
    manifest: Manifest | None,
    ids: list[str] | None,
    spec: StreamSpec,
    *,
    tasks: StreamTasks = StreamTasks(),
    rows: ray.data.Dataset | None = None,
    epochs: int = 1,
) -> ray.data.Dataset:
    """The step's training stream over `epochs` epochs, in Ray Data CPU tasks, as one execution.

    Rows come from the prepared dataset (`manifest` + `ids`) or, when the step has
    pseudo-labels or replayed images, from a ready Dataset (`rows`). They are read once and
    kept in the object store (encoded bytes: the step's share of the dataset); every epoch is a
    fresh permutation of all of them dealt to map tasks in blocks of `ROWS_PER_BLOCK`
    (`epoch_row_blocks`), all epochs one input list of one stream. Re-executing the pipeline per
    epoch instead re-read the Parquet and paid Ray Data's start-up (~0.6 s to the first batch on
    2 cores) every epoch, which on a small dataset and a fast trainer is a large share of the
    epoch (`launch.py bench pipeline`). The transform runs
    once per block (one `SampleMaker`, one stacked output): per batch of 8 it cost ~8 % of the
    plain stream's throughput. The trainer cuts its own batches from the stream. A stream small
    enough that nothing could throttle it runs without Ray Data's reservation allocator
    (`UNTHROTTLED_STORE_SHARE`): its zero-budget first second cost ~9 % of a CamVid step's stream.
    `tasks` can bound how many map tasks share a core (`StreamTasks`).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    source = (rows if rows is not None else read_manifest_rows(manifest, ids)).materialize()
    count = source.count()
    # The stream's input is the rows' indices, a fresh permutation per epoch in blocks of `ROWS_PER_BLOCK`,
    # all epochs one input list (`from_arrow`: one block per table, no operator per epoch).
    blocks = epoch_row_blocks(count, epochs, ROWS_PER_BLOCK, np.random.default_rng(), FIRST_BLOCK_ROWS)
    stream = ray.data.from_arrow(blocks).map_batches(
        _train_block,
        fn_kwargs={"spec": spec, "sources": source.to_arrow_refs()},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=tasks.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=slots) if (slots := stream_task_slots(tasks.per_core)) else None,
    )
    stream_bytes = round(count * epochs * (1 + spec.replay_per_row) * sample_nbytes(spec))
    store_bytes = smallest_object_store()
    throttled = needs_backpressure(stream_bytes, store_bytes)
    stream.context.op_resource_reservation_enabled = throttled
    pace(stream.context)
    log.info(
        "training stream: %d rows x %d epochs, ~%.0f MB of samples (smallest object store %.0f MB): "
        "Ray Data's reservation allocator %s; %s",
        count,
        epochs,
        stream_bytes / 1e6,
        store_bytes / 1e6,
        "on (it bounds the stream)" if throttled else "off (the stream fits, nothing to bound)",
        f"at most {slots} tasks at a time ({tasks.per_core} per core)" if slots else "one task per logical CPU",
    )
    return stream


def eval_batch(batch: dict[str, np.ndarray], lut: np.ndarray, protocol: str, crop_size: int) -> dict[str, np.ndarray]:
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


def eval_stream(
    manifest: Manifest, ids: list[str], lut: np.ndarray, *, protocol: str, crop_size: int
) -> ray.data.Dataset:
    """Decode → test LUT (future classes → 0 or 255) → optional centre crop; no randomness."""
    return read_manifest_rows(manifest, ids).map_batches(
        eval_batch,
        fn_kwargs={"lut": lut, "protocol": protocol, "crop_size": crop_size},
        batch_size=8,
        batch_format="numpy",
    )


class _OldModelPass:
    """The frozen old model as a Ray Data callable class (one model per actor), run on un-augmented images.

    Each actor loads step t−1's model once from shared storage and yields, per image size, the rows of the
    batch, their full-image logits and their step-t labels on its device: the train LUT applied to the step's own
    rows, a replayed image's storing-step table (`stored_luts`, as the training stream gives it) to rows that
    carry a `stored_step`.
    """

    def __init__(
        self,
        model_uri: str,
        backbone: str,
        output_stride: int,
        lut: np.ndarray,
        use_gpu: bool,
        stored_luts: tuple[np.ndarray, ...] = (),
    ):
        torch.set_num_threads(1)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_step_model(model_uri, backbone, output_stride).to(self.device)
        self.lut, self.stored_luts = lut, stored_luts

    def logits(self, batch: dict[str, np.ndarray]) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        images = [decode_rgb(b) for b in batch["image"]]
        stored = batch.get(STORED_STEP, np.full(len(images), NOT_STORED))
        labels = [
            row_lut(self.lut, self.stored_luts, int(step))[decode_map(b)] for b, step in zip(batch["label"], stored)
        ]
        for rows, logits in logits_by_size(self.model, images, self.device, amp=True):
            yield rows, logits, torch.from_numpy(np.stack([labels[row] for row in rows])).to(self.device)


class PseudoLabeler(_OldModelPass):
    """Rows pass through (every column) with a new `pseudo` column, in the same order, chosen by the step's rule
    (`eir.pseudo.chosen_pseudo_labels`; `thresholds`: the τ_c of a per-class rule). The maps are raw
    (`encode_raw_map`): written once per step, decoded by the stream every epoch."""

    def __init__(
        self,
        model_uri: str,
        backbone: str,
        output_stride: int,
        lut: np.ndarray,
        rule: PseudoRule,
        use_gpu: bool,
        thresholds: Sequence[float] | None = None,
        stored_luts: tuple[np.ndarray, ...] = (),
    ):
        super().__init__(model_uri, backbone, output_stride, lut, use_gpu, stored_luts)
        self.rule, self.thresholds = rule, thresholds

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encoded = np.empty(len(batch["image"]), dtype=object)
        for rows, logits, target in self.logits(batch):
            chosen = chosen_pseudo_labels(self.rule, logits, target, self.thresholds)
            for row, pseudo in zip(rows, chosen.cpu().numpy()):
                encoded[row] = encode_raw_map(pseudo)
        return {**batch, "pseudo": encoded}


class ThresholdHistogrammer(_OldModelPass):
    """One row per batch: the batch's histogram for a per-class rule (`eir.pseudo.class_histogram`), as the flat
    indices and counts of its non-empty cells (the dense C_old x bins array would be mostly zeros)."""

    def __init__(
        self, model_uri: str, backbone: str, output_stride: int, lut: np.ndarray, rule: PseudoRule, use_gpu: bool
    ):
        super().__init__(model_uri, backbone, output_stride, lut, use_gpu)
        self.rule = rule

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        total = sum(class_histogram(self.rule, logits, target) for _, logits, target in self.logits(batch))
        flat = np.asarray(total).ravel()
        cells = np.flatnonzero(flat)
        return {"cells": np.array([cells.astype(np.int64)]), "counts": np.array([flat[cells]])}


def _map_with_old_model(
    rows: ray.data.Dataset, callable_class: type, kwargs: dict, *, actors: int, use_gpu: bool, batch_size: int
) -> ray.data.Dataset:
    """`rows` through one of the old-model classes above, on a pool of `actors` (a GPU each when `use_gpu`)."""
    return rows.map_batches(
        callable_class,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
    )


def threshold_histogram_pass(
    manifest: Manifest,
    ids: list[str],
    *,
    rule: PseudoRule,
    old_channels: int,
    model_uri: str,
    backbone: str,
    output_stride: int,
    lut: np.ndarray,
    actors: int,
    use_gpu: bool,
    batch_size: int = 8,
) -> np.ndarray:
    """The histogram a per-class rule reads its τ_c from (`eir.pseudo.class_histogram`, C_old x bins), summed
    over the step's images in one pass of the old model: PLOP's entropy bins or score_quantile's score bins."""
    model = {
        "model_uri": model_uri,
        "backbone": backbone,
        "output_stride": output_stride,
        "lut": lut,
        "rule": rule,
        "use_gpu": use_gpu,
    }
    counted = _map_with_old_model(
        read_manifest_rows(manifest, ids),
        ThresholdHistogrammer,
        model,
        actors=actors,
        use_gpu=use_gpu,
        batch_size=batch_size,
    )
    return dense_histogram(
        counted.iter_batches(batch_size=None, batch_format="numpy"), rule, old_channels=old_channels, source=model_uri
    )


def dense_histogram(
    batches: Iterable[dict[str, np.ndarray]], rule: PseudoRule, *, old_channels: int, source: str
) -> np.ndarray:
    """`ThresholdHistogrammer` outputs (non-empty cells and their counts) summed into one C_old x bins array."""
    bins = HISTOGRAM_BINS[rule.name]
    histogram = np.zeros(old_channels * bins, dtype=np.int64)
    for batch in batches:
        for cells, counts in zip(batch["cells"], batch["counts"]):
            if len(cells) and int(cells.max()) >= histogram.size:
                raise ValueError(f"the model {source} has more than the {old_channels} channels of step t−1")
            np.add.at(histogram, cells, counts)
    return histogram.reshape(old_channels, bins)


THRESHOLDS_FILE = "thresholds.json"  # a per-class rule's τ_c beside the pseudo-labels they chose


def write_pseudo_labels(
    rows: ray.data.Dataset,
    out: Location,
    *,
    expected_rows: int,
    model_uri: str,
    backbone: str,
    output_stride: int,
    lut: np.ndarray,
    rule: PseudoRule,
    actors: int,
    use_gpu: bool,
    batch_size: int = 8,
    thresholds: ClassThresholds | None = None,
    stored_luts: tuple[np.ndarray, ...] = (),
) -> None:
    """Label `rows` (the step's own, or replayed images with their `stored_step`) once by `rule` and publish
    them, every column kept, under `out`.

    A per-class rule's `thresholds` are written beside them (`THRESHOLDS_FILE`), under the same completion
    marker. Written to a temporary sibling and published with a completion marker, so a crash never leaves
    pseudo-labels that a resumed run would trust; a pass that wrote another number of rows than
    `expected_rows` is an error, not a marker.
    """
    if rule.per_class != (thresholds is not None) or (thresholds is not None and thresholds.rule != rule.name):
        raise ValueError(f"pseudo.rule={rule.name!r} with thresholds {thresholds and thresholds.rule!r}")
    tmp = out.parent.join(f".{out.name}.tmp")
    storage.delete_dir(tmp)
    labeler = {
        "model_uri": model_uri,
        "backbone": backbone,
        "output_stride": output_stride,
        "lut": lut,
        "rule": rule,
        "use_gpu": use_gpu,
        "thresholds": None if thresholds is None else thresholds.thresholds,
        "stored_luts": stored_luts,
    }
    labelled = _map_with_old_model(rows, PseudoLabeler, labeler, actors=actors, use_gpu=use_gpu, batch_size=batch_size)
    labelled.write_parquet(tmp.uri if not tmp.is_local else tmp.path, filesystem=tmp.fs)
    written = read_prepared_rows(tmp).count()
    if written != expected_rows:
        raise RuntimeError(f"the pseudo-label pass wrote {written} rows to {tmp.uri}; expected {expected_rows}")
    if thresholds is not None:
        storage.write_json_atomic(tmp.join(THRESHOLDS_FILE), thresholds.to_json())
    storage.mark_complete(tmp, {"rows": expected_rows})
    storage.delete_dir(out)
    storage.publish_dir(tmp, out)


def read_class_thresholds(folder: Location) -> ClassThresholds | None:
    """The thresholds that chose a step's pseudo-labels (None: they were chosen by the global score rule)."""
    loc = folder.join(THRESHOLDS_FILE)
    return thresholds_from_json(storage.read_json(loc)) if storage.exists(loc) else None


def _prepared_files(folder: Location) -> list[Location]:
    return [folder.join(name) for name in storage.list_dir(folder) if name.endswith(".parquet")]


def read_prepared_rows(folder: Location) -> ray.data.Dataset:
    """Rows a step wrote itself (pseudo-labelled rows), one block per file."""
    return _read_files(_prepared_files(folder), folder.fs)


def read_prepared_table(folder: Location) -> pa.Table:
    """The same rows in one table on the driver: for the few replayed images, which join the stream as a table."""
    return pa.concat_tables(pq.read_table(f.path, filesystem=folder.fs) for f in _prepared_files(folder))
