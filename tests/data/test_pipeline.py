"""The Ray Data streams: plain and EIR-pasted training batches, pseudo-label batch inference."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import ray.data
import torch

from eir import storage
from eir.data.codec import decode_map, encode_png, encode_raw_map
from eir.data.ingest import read_rows
from eir.data.pipeline import (
    StreamSpec,
    epoch_row_blocks,
    eval_stream,
    gather_rows,
    read_manifest_rows,
    read_prepared_rows,
    read_prepared_table,
    sample_nbytes,
    stream_task_slots,
    task_slots,
    train_stream,
    with_stored_images,
    write_pseudo_labels,
)
from eir.data.prepare import ensure_prepared
from eir.model import build_model
from eir.pseudo import PseudoRule
from eir.replay.image_store import build_image_store
from eir.replay.paste import NO_INSTANCE, NO_PASTE, PLAN_COLUMNS, PasteConfig, ScaledInstances, apply_paste
from eir.replay.store import build_store
from eir.tasks import get_task

pytestmark = pytest.mark.slow
OLD = tuple(range(1, 11))  # synthetic 10-10: step 1 learns 11..20


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = storage.resolve(tmp_path_factory.mktemp("pipeline"))
    manifest = ensure_prepared("synthetic", "", "train", root, synthetic=(30, 48, 0), progress=False)
    return root, manifest, get_task("synthetic", "10-10")


def _rows_with_pseudo(manifest, task) -> ray.data.Dataset:
    """Rows whose pseudo-label column marks the old classes of the ground truth (a perfect old model), as the
    pseudo-label pass writes them (raw maps)."""
    items = []
    for row in read_rows(manifest).to_pylist():
        label = decode_map(row["label"])
        pseudo = np.where(np.isin(label, OLD), label, 0).astype(np.uint8)
        items.append({"id": row["id"], "image": row["image"], "label": row["label"], "pseudo": encode_raw_map(pseudo)})
    return ray.data.from_items(items)


def test_plain_stream_yields_uint8_crops(ray_session, prepared) -> None:
    _, manifest, task = prepared
    ids = read_rows(manifest).column("id").to_pylist()[:12]
    spec = StreamSpec(lut=task.train_lut(1), crop_size=32)
    batches = list(train_stream(manifest, ids, spec).iter_batches(batch_size=None, batch_format="numpy"))
    assert sum(len(b["image"]) for b in batches) == 12
    batch = batches[0]
    assert set(batch) == {"image", "label"}
    assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (3, 32, 32)
    assert set(np.unique(np.concatenate([b["label"].ravel() for b in batches]))) <= {0, *range(11, 21), 255}
    assert sum(column[0].nbytes for column in batch.values()) == sample_nbytes(spec)


def test_a_capped_stream_still_yields_every_row(ray_session, prepared, monkeypatch) -> None:
    """The local instance's cap (`TaskPoolStrategy`) takes the same path as a cluster's default."""
    _, manifest, task = prepared
    ids = read_rows(manifest).column("id").to_pylist()[:12]
    monkeypatch.setattr("eir.data.pipeline.stream_task_slots", lambda per_core: 1)
    stream = train_stream(manifest, ids, StreamSpec(lut=task.train_lut(1), crop_size=32), epochs=2)
    assert sum(len(b["image"]) for b in stream.iter_batches(batch_size=None, batch_format="numpy")) == 24


def test_task_slots_cap_a_node_with_more_logical_cpus_than_asked_per_core(ray_session) -> None:
    assert task_slots(8, 2, 2) == 4  # the local instance on this project's 2-core machine
    assert task_slots(8, 2, 3) == 6 and task_slots(8, 2, 4) is None  # 8 logical CPUs: nothing left to cap
    assert task_slots(4, 2, 2) is None and task_slots(16, 16, 2) is None  # nothing to cap: Ray Data's default
    assert task_slots(64, 0, 2) == 2  # an unknown core count counts as one
    assert task_slots(64, 2, 0) is None  # per_core 0: never capped
    node = ray.nodes()[0]["Resources"]["CPU"]
    assert stream_task_slots(2) == task_slots(node, os.cpu_count() or 1, 2)  # the suite's one-node instance


def test_every_epoch_deals_a_fresh_permutation_of_all_rows() -> None:
    rng = np.random.default_rng(0)
    blocks = epoch_row_blocks(10, 3, 4, rng)
    assert [block.num_rows for block in blocks] == [4, 3, 3] * 3  # ceil(10 / 4) = 3 balanced blocks per epoch
    epochs = [np.concatenate([block.column("row").to_numpy() for block in blocks[i : i + 3]]) for i in (0, 3, 6)]
    assert all(sorted(order) == list(range(10)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3 and tuple(epochs[0]) != tuple(range(10))
    assert [block.num_rows for block in epoch_row_blocks(3, 2, 128, rng)] == [3, 3]


def test_the_streams_first_block_is_cut_into_a_ramp_and_epochs_stay_permutations() -> None:
    """The first block becomes pieces of 2, 2, 4, 8, rest (the first samples come from a small task); the
    other blocks and every epoch's rows are as without the ramp."""
    blocks = epoch_row_blocks(40, 2, 20, np.random.default_rng(1), first_rows=2)
    assert [block.num_rows for block in blocks] == [2, 2, 4, 8, 4, 20, 20, 20]
    rows = [block.column("row").to_numpy() for block in blocks]
    assert sorted(np.concatenate(rows[:6]).tolist()) == list(range(40))
    assert sorted(np.concatenate(rows[6:]).tolist()) == list(range(40))
    small = epoch_row_blocks(3, 2, 128, np.random.default_rng(1), first_rows=16)  # a block under the ramp's start
    assert [block.num_rows for block in small] == [3, 3]


def test_gather_rows_reads_across_blocks_in_the_order_asked() -> None:
    sources = [pa.table({"id": ids, "n": ns}) for ids, ns in ((["a", "b"], [0, 1]), (["c"], [2]), (["d"], [3]))]
    batch = gather_rows(np.array([3, 0, 2]), sources)
    assert batch["id"].tolist() == ["d", "a", "c"] and batch["n"].tolist() == [3, 0, 2]
    order = np.random.default_rng(0).permutation(4)
    assert gather_rows(order, sources)["n"].tolist() == order.tolist()


def _numbered_rows(count: int, blocks: int) -> ray.data.Dataset:
    """Rows whose image is filled with the row's number, written in order into `blocks` contiguous blocks."""
    label = encode_png(np.zeros((16, 16), np.uint8))
    items = [{"image": encode_png(np.full((16, 16, 3), n, np.uint8)), "label": label} for n in range(count)]
    return ray.data.from_items(items, override_num_blocks=blocks)


def test_stream_blocks_draw_from_the_whole_step_not_from_the_blocks_rows_were_written_in(
    ray_session, monkeypatch
) -> None:
    """Rows written in order (as CamVid's are: video frames) reach the trainer mixed across the whole step:
    each map task's block is a draw from all rows, every row once per epoch."""
    import eir.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "ROWS_PER_BLOCK", 4)
    spec = StreamSpec(lut=np.arange(256, dtype=np.uint8), crop_size=16, scale=(1.0, 1.0))
    stream = train_stream(None, None, spec, rows=_numbered_rows(12, 3), epochs=4)
    blocks = [b["image"][:, 0, 0, 0] for b in stream.iter_batches(batch_size=None, batch_format="numpy")]
    assert sorted(np.concatenate(blocks).tolist()) == sorted(list(range(12)) * 4)
    written_in = [set((block // 4).tolist()) for block in blocks]  # the written block of each row
    # A block of 4 drawn from 12 rows lies inside one written block with probability 3 / 495.
    assert sum(len(written) > 1 for written in written_in) >= 9, written_in


def test_every_epoch_in_one_stream(ray_session, prepared) -> None:
    _, manifest, task = prepared
    ids = read_rows(manifest).column("id").to_pylist()[:12]
    spec = StreamSpec(lut=task.train_lut(1), crop_size=32)
    stream = train_stream(manifest, ids, spec, epochs=3)
    assert sum(len(b["image"]) for b in stream.iter_batches(batch_size=None, batch_format="numpy")) == 36
    with pytest.raises(ValueError, match="epochs"):
        train_stream(manifest, ids, spec, epochs=0)


def test_stream_reblocks_rows_whatever_blocks_they_came_in(ray_session, prepared, monkeypatch) -> None:
    """The map's task count follows `ROWS_PER_BLOCK`, not the blocks the rows were written in (one per row
    here), and the transform runs once per block: each output block is one re-blocked input block."""
    import eir.data.pipeline as pipeline

    _, manifest, task = prepared
    monkeypatch.setattr(pipeline, "ROWS_PER_BLOCK", 5)
    rows = read_manifest_rows(manifest, read_rows(manifest).column("id").to_pylist()[:12])
    one_per_row = ray.data.from_items(rows.take_all(), override_num_blocks=12)
    spec = StreamSpec(lut=task.train_lut(1), crop_size=32)
    for source in (one_per_row, rows):
        stream = train_stream(None, None, spec, rows=source, epochs=2)
        sizes = sorted(len(b["image"]) for b in stream.iter_batches(batch_size=None, batch_format="numpy"))
        assert sizes == [4, 4, 4, 4, 4, 4]  # 12 rows → ceil(12 / 5) = 3 blocks per epoch, 2 epochs


def test_reservation_allocator_only_for_streams_the_store_could_not_hold(ray_session, prepared, monkeypatch) -> None:
    """A stream that fits in a tenth of the smallest object store runs without Ray Data's reservation allocator
    (its zero-budget first second); a larger one keeps it, so a slow trainer holds the stream back."""
    import eir.data.pipeline as pipeline

    _, manifest, task = prepared
    ids = read_rows(manifest).column("id").to_pylist()[:12]
    spec = StreamSpec(lut=task.train_lut(1), crop_size=32)
    stream_bytes = 12 * 2 * sample_nbytes(spec)
    assert (
        0
        < pipeline.smallest_object_store()
        == min(node["Resources"]["object_store_memory"] for node in ray.nodes() if node["Alive"])
    )
    assert not pipeline.needs_backpressure(stream_bytes, 10 * stream_bytes)
    assert pipeline.needs_backpressure(stream_bytes + 1, 10 * stream_bytes)
    small = train_stream(manifest, ids, spec, epochs=2)
    assert small.context.op_resource_reservation_enabled is False
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled is True, "the global context is untouched"
    monkeypatch.setattr(pipeline, "smallest_object_store", lambda: 10 * stream_bytes - 1)
    large = train_stream(manifest, ids, spec, epochs=2)
    assert large.context.op_resource_reservation_enabled is True
    assert sum(len(b["image"]) for b in large.iter_batches(batch_size=None, batch_format="numpy")) == 24


def test_eir_stream_pastes_stored_old_classes(ray_session, prepared) -> None:
    _, manifest, task = prepared
    rows = read_rows(manifest).to_pylist()
    store, _ = build_store(rows, OLD, rule="components", min_area=0.0, step=0, size=40, previous=None, seed=0)
    assert len(store) > 0
    identity = np.arange(256, dtype=np.uint8)
    spec = StreamSpec(
        lut=task.train_lut(1),
        crop_size=32,
        pseudo=True,
        paste=PasteConfig(),
        old_channels=OLD,
        class_to_channel=identity,
        replay_per_row=0.5,
        store=ray.put(store.to_bytes()),
    )
    stream = train_stream(None, None, spec, rows=_rows_with_pseudo(manifest, task))
    batches = list(stream.iter_batches(batch_size=None, batch_format="numpy"))
    assert all(set(b) == {"image", "label", "paste_plan"} for b in batches), "plans ship, not paste maps"
    images = np.concatenate([b["image"] for b in batches])
    plans = np.concatenate([b["paste_plan"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert len(images) > len(rows), "instance-replay samples are mixed into the stream"
    assert plans.shape == (len(images), PasteConfig().max_instances, len(PLAN_COLUMNS))
    assert images[0].nbytes + labels[0].nbytes + plans[0].nbytes == sample_nbytes(spec)
    planned = plans[plans[:, :, 0] != NO_INSTANCE]
    assert len(planned), "some images are pasted into"
    channels = identity[np.asarray(store.class_ids())[planned[:, 0].astype(int)]]
    assert np.array_equal(planned[:, 1], channels), "each planned instance is a stored row of its channel"
    assert set(planned[:, 1].astype(int)) <= set(store.classes())
    assert ((planned[:, 5] >= 0) & (planned[:, 5] <= 1)).all() and (planned[:, 4] == 16).all()  # λ; 2 x 2 cells of 16
    # The trainer carries the plans out: pasted pixels get the planned channels, the rest stays as it was.
    pasted, paste_class, weight = apply_paste(
        torch.from_numpy(images), torch.from_numpy(plans), ScaledInstances(store.decoded())
    )
    hit = paste_class != NO_PASTE
    assert hit.any() and set(np.unique(paste_class[hit].numpy())) <= set(store.classes())
    untouched = (~hit).unsqueeze(1).expand_as(pasted)
    assert torch.equal(pasted[untouched], torch.from_numpy(images)[untouched]) and (weight[~hit] == 0).all()
    # Pseudo-labels were merged into the label: old classes appear in the training labels.
    assert np.isin(labels, OLD).any()


def test_replayed_images_keep_their_stored_labels_and_get_no_pseudo_labels(ray_session, prepared) -> None:
    """Image replay beside pseudo-labelled rows (METHOD.md §4.1): each stored image takes the LUT of its
    storing step and no pseudo-label. One row per batch, so batches of stored rows alone occur too."""
    _, manifest, task = prepared
    label = np.zeros((48, 48), dtype=np.uint8)
    label[:24] = 3  # an old class (step 0 of 10-10) in the top half, background below
    stored_row = {"image": encode_png(np.full((48, 48, 3), 7, dtype=np.uint8)), "label": encode_png(label)}
    rows = [{"id": f"stored{i}", **stored_row, "classes": [0, 3]} for i in range(2)]
    store = build_image_store(rows, [3], 2, None, 0, step=0)
    keeps_3 = np.zeros(256, dtype=np.uint8)
    keeps_3[[3, 255]] = [3, 255]
    spec = StreamSpec(lut=task.train_lut(1), crop_size=32, pseudo=True, stored_luts=(keeps_3,))
    own = _rows_with_pseudo(manifest, task)
    joined = with_stored_images(own, store.table, pseudo=True)
    assert joined.schema().names == ["id", "image", "label", "pseudo", "stored_step"]
    stream = train_stream(None, None, spec, rows=joined, epochs=2)
    batches = list(stream.iter_batches(batch_size=None, batch_format="numpy"))
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert len(images) == 2 * (own.count() + 2)
    replayed = (images == 7).all(axis=(1, 2, 3))  # the stored image is one colour; no dataset image is
    assert replayed.sum() == 4
    for replayed_label in labels[replayed]:
        # the train LUT would have made class 3 background; a pseudo-label would have filled the background
        assert set(np.unique(replayed_label)) == {0, 3}


def _old_model(tmp_path: Path, confident_channel: int | None = None) -> str:
    """A step-0 checkpoint of synthetic 10-10; `confident_channel`: its sigmoid is ≈ 1 everywhere, the others ≈ 0."""
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", [10], weights=None)
    if confident_channel is not None:
        with torch.no_grad():
            model.heads[1].bias.fill_(-20.0)
            model.heads[1].bias[confident_channel - 1] = 20.0
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "head_sizes": [10]}, checkpoint)
    return str(checkpoint)


def _label(rows: ray.data.Dataset, out, expected_rows: int, checkpoint: str, lut: np.ndarray, **extra) -> None:
    """`write_pseudo_labels` by the global score rule at 0.7, with the old model `checkpoint`."""
    write_pseudo_labels(
        rows,
        out,
        expected_rows=expected_rows,
        model_uri=checkpoint,
        backbone="mobilenet_v2",
        output_stride=16,
        lut=lut,
        rule=PseudoRule("score", threshold=0.7),
        actors=1,
        use_gpu=False,
        **extra,
    )


def test_replayed_images_asked_for_are_pseudo_labelled_through_their_storing_steps_table(
    ray_session, prepared, tmp_path: Path
) -> None:
    """`replay.pseudo_label`: the old-model pass reads each stored image through its storing step's table, so only
    the pixels that table leaves background gain a pseudo-label (the train LUT would have made class 3 background
    too); the labelled table then joins the stream with its own pseudo column instead of nulls."""
    root, manifest, task = prepared
    label = np.zeros((48, 48), dtype=np.uint8)
    label[:24] = 3  # a class the storing step had learned: kept
    label[24:] = 5  # a class learned after the image was stored: background in it
    stored_row = {"image": encode_png(np.full((48, 48, 3), 7, dtype=np.uint8)), "label": encode_png(label)}
    store = build_image_store(
        [{"id": f"s{i}", **stored_row, "classes": [3, 5]} for i in range(2)], [3], 2, None, 0, step=0
    )
    keeps_3 = np.zeros(256, dtype=np.uint8)
    keeps_3[[3, 255]] = [3, 255]
    out = root.join("pseudo-replayed")
    replayed_rows = ray.data.from_arrow(store.table.select(["id", "image", "label", "stored_step"]))
    _label(replayed_rows, out, 2, _old_model(tmp_path, confident_channel=5), task.train_lut(1), stored_luts=(keeps_3,))
    table = read_prepared_table(out)
    assert table.num_rows == 2 and table.column("stored_step").to_pylist() == [0, 0]
    for encoded in table.column("pseudo").to_pylist():
        pseudo = decode_map(encoded)
        assert (pseudo[:24] == 0).all() and (pseudo[24:] == 5).all()

    spec = StreamSpec(lut=task.train_lut(1), crop_size=48, scale=(1.0, 1.0), pseudo=True, stored_luts=(keeps_3,))
    joined = with_stored_images(_rows_with_pseudo(manifest, task), table, pseudo=True)
    batches = list(train_stream(None, None, spec, rows=joined).iter_batches(batch_format="numpy"))
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    replayed = (images == 7).all(axis=(1, 2, 3))
    assert replayed.sum() == 2
    for replayed_label in labels[replayed]:  # the whole image, unscaled: top half kept, bottom half pseudo-labelled
        assert (replayed_label[:24] == 3).all() and (replayed_label[24:] == 5).all()


def test_a_pseudo_label_pass_that_loses_rows_publishes_nothing(ray_session, prepared, tmp_path: Path) -> None:
    root, manifest, task = prepared
    ids = read_rows(manifest).column("id").to_pylist()[:3]
    out = root.join("pseudo-short")
    with pytest.raises(RuntimeError, match="wrote 3 rows .* expected 4"):
        _label(read_manifest_rows(manifest, ids), out, 4, _old_model(tmp_path), task.train_lut(1))
    assert not storage.exists(out) and not storage.is_complete(out)


def test_eval_stream_keeps_full_images(ray_session, prepared) -> None:
    _, manifest, task = prepared
    ids = read_rows(manifest).column("id").to_pylist()[:5]
    batches = list(
        eval_stream(manifest, ids, task.test_lut(0), protocol="full", crop_size=64).iter_batches(batch_format="numpy")
    )
    assert sum(len(b["image"]) for b in batches) == 5
    assert batches[0]["image"][0].shape == (48, 48, 3)
    centre = list(
        eval_stream(manifest, ids, task.test_lut(0), protocol="center_crop", crop_size=32).iter_batches(
            batch_format="numpy"
        )
    )
    assert centre[0]["image"][0].shape == (32, 32, 3)


def test_pseudo_labels_by_batch_inference(ray_session, prepared, tmp_path: Path) -> None:
    root, manifest, task = prepared
    ids = read_rows(manifest).column("id").to_pylist()[:6]
    out = root.join("pseudo-test")
    # class 3 confident everywhere: every background pixel gets pseudo-label 3
    _label(read_manifest_rows(manifest, ids), out, len(ids), _old_model(tmp_path, 3), task.train_lut(1), batch_size=3)
    assert storage.is_complete(out)
    rows = read_prepared_rows(out).take_all()
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for row in rows:
        label = task.train_lut(1)[decode_map(row["label"])]
        pseudo = decode_map(row["pseudo"])
        assert (pseudo[label == 0] == 3).all() and (pseudo[label != 0] == 0).all()
