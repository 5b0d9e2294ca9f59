"""The Arrow/Parquet instance store: build, round trips, atomic writes (METHOD.md §3.1)."""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from eir import storage
from eir.data.base import Sample
from eir.data.ingest import sample_to_row
from eir.data.synthetic import image_rng, render_scene
from eir.replay.instances import extract_instances
from eir.replay.store import INSTANCE_SCHEMA, InstanceStore, build_store


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _row(image: np.ndarray, label: np.ndarray, sample_id: str, instances: np.ndarray | None = None) -> dict:
    return sample_to_row(Sample(sample_id, image, label, instances, _png(image), "png"))


def _blob_row(sample_id: str, blobs: list[tuple[int, int, int]], size: int = 24, seed: int = 0) -> dict:
    """A noise image with one square blob per (class, top, left): 4 x 4 pixels each."""
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    label = np.zeros((size, size), dtype=np.uint8)
    for class_id, top, left in blobs:
        label[top : top + 4, left : left + 4] = class_id
    return _row(image, label, sample_id)


def _rows() -> list[dict]:
    """Class 1 in every image, class 2 in two, class 3 in one: 4 + 2 + 1 candidates."""
    return [
        _blob_row("a", [(1, 0, 0), (2, 10, 10)], seed=1),
        _blob_row("b", [(1, 0, 0), (2, 10, 10), (3, 18, 2)], seed=2),
        _blob_row("c", [(1, 5, 5)], seed=3),
        _blob_row("d", [(1, 12, 0)], seed=4),
    ]


def _build(rows, size, previous=None, classes=(1, 2, 3), step=1, seed=0):
    return build_store(
        rows, classes, rule="single_component", min_area=0.0, step=step, size=size, previous=previous, seed=seed
    )


def test_build_is_class_balanced_and_reports_counts():
    store, report = _build(_rows(), size=5)
    assert len(store) == report.stored == 5
    assert report.candidates_per_class == {1: 4, 2: 2, 3: 1}
    assert store.class_histogram() == report.stored_per_class == {1: 2, 2: 2, 3: 1}
    assert store.classes() == [1, 2, 3]
    assert report.from_previous == 0 and report.notes == []
    assert np.array_equal(np.sort(store.indices_of(2)), np.flatnonzero(store.class_ids() == 2))
    assert set(store.table.column("step").to_pylist()) == {1}


def test_stored_instances_equal_the_extracted_ones():
    rows = _rows()
    store, _ = _build(rows, size=7)
    decoded = {(i.source_id, i.bbox): i for i in store.instances()}
    for row in rows:
        image = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        label = np.asarray(Image.open(io.BytesIO(row["label"])))
        for inst in extract_instances(
            image, label, None, [1, 2, 3], rule="single_component", min_area=0, source_id=row["id"], step=1
        ):
            got = decoded[(inst.source_id, inst.bbox)]
            assert got.class_id == inst.class_id
            assert np.array_equal(got.crop, inst.crop) and got.crop.dtype == np.uint8
            assert np.array_equal(got.mask, inst.mask) and got.mask.dtype == bool


def test_previous_memory_stays_in_the_pool():
    first, _ = _build(_rows()[:2], size=3, classes=[1, 2], step=0)
    rows = [_blob_row("e", [(3, 0, 0)], seed=5), _blob_row("f", [(4, 0, 0)], seed=6)]
    with pytest.warns(UserWarning, match="only 5 instances"):
        second, report = _build(rows, size=10, previous=first, classes=[3, 4], step=1)
    assert report.candidates_per_class == {1: 2, 2: 1, 3: 1, 4: 1}  # 3 from the previous store
    assert second.class_histogram() == {1: 2, 2: 1, 3: 1, 4: 1}
    assert report.from_previous == 3
    old = {(i.source_id, i.bbox) for i in first.instances()}
    assert old <= {(i.source_id, i.bbox) for i in second.instances()}
    steps = Counter(second.table.column("step").to_pylist())
    assert steps == {0: 3, 1: 2}  # stored instances keep the step they came from


def test_size_over_candidates_warns_with_the_count():
    with pytest.warns(UserWarning, match=r"memory.size=200 but only 7 instances were found; stored 7"):
        store, report = _build(_rows(), size=200)
    assert len(store) == 7 and report.notes


def test_no_warning_when_the_size_is_met():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _build(_rows(), size=7)


def test_a_negative_size_is_refused_with_the_key():
    with pytest.raises(ValueError, match=r"memory.size=-1: expected a number of instances >= 0"):
        _build(_rows(), size=-1)


def test_reservoirs_keep_the_selection_balanced_with_many_candidates():
    rows = [_blob_row(f"r{i}", [(1, 0, 0), (2, 10, 10)] if i < 30 else [(1, 0, 0)], seed=i) for i in range(40)]
    store, report = _build(rows, size=6, classes=[1, 2])
    assert report.candidates_per_class == {1: 40, 2: 30}
    assert store.class_histogram() == {1: 3, 2: 3}
    assert len({(i.source_id, i.class_id) for i in store.instances()}) == 6


def test_build_is_seeded():
    a, _ = _build(_rows(), size=3, seed=4)
    b, _ = _build(_rows(), size=3, seed=4)
    assert a.table.equals(b.table)


def test_empty_store_works(tmp_path):
    store, report = _build(_rows(), size=0)
    assert len(store) == 0 and report.stored == 0 and store.classes() == []
    assert report.candidates_per_class == {1: 4, 2: 2, 3: 1}
    loc = storage.resolve(tmp_path / "step_1" / "instances.parquet")
    store.write(loc)
    back = InstanceStore.read(loc)
    assert len(back) == 0 and back.decoded() == [] and back.class_histogram() == {}
    assert len(InstanceStore.empty()) == 0


def test_bytes_round_trip_is_identical():
    store, _ = _build(_rows(), size=7)
    data = store.to_bytes()
    back = InstanceStore.from_bytes(data)
    assert back.table.equals(store.table)
    assert back.to_bytes() == data
    for i in range(len(store)):
        a, b = store.instance(i), back.instance(i)
        assert (a.class_id, a.bbox, a.source_id, a.step) == (b.class_id, b.bbox, b.source_id, b.step)
        assert np.array_equal(a.crop, b.crop) and np.array_equal(a.mask, b.mask)
    assert store.nbytes == store.table.nbytes > 0


def test_decoded_is_cached_and_matches_instances():
    store, _ = _build(_rows(), size=7)
    decoded = store.decoded()
    assert decoded is store.decoded()
    for (class_id, crop, mask), inst in zip(decoded, store.instances()):
        assert class_id == inst.class_id and np.array_equal(crop, inst.crop) and np.array_equal(mask, inst.mask)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._decoded is None and clone.table.equals(store.table)


def test_write_read_and_missing_file(tmp_path):
    store, _ = _build(_rows(), size=4)
    loc = storage.resolve(tmp_path / "run" / "step_1" / "instances.parquet")
    store.write(loc)
    assert InstanceStore.read(loc).table.equals(store.table)
    assert os.listdir(loc.parent.path) == ["instances.parquet"]  # no temp files left
    with pytest.raises(FileNotFoundError, match="no instance store at .*missing.parquet"):
        InstanceStore.read(storage.resolve(tmp_path / "missing.parquet"))


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    old, _ = _build(_rows(), size=2)
    new, _ = _build(_rows(), size=7)
    loc = storage.resolve(tmp_path / "instances.parquet")
    old.write(loc)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        new.write(loc)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["instances.parquet"]
    assert InstanceStore.read(loc).table.equals(old.table)


def test_foreign_tables_are_refused():
    with pytest.raises(ValueError, match="schema"):
        InstanceStore(pa.table({"class_id": pa.array([1], pa.int64())}))
    with pytest.raises(ValueError, match="not a Parquet instance store"):
        InstanceStore.from_bytes(b"not parquet")
    assert InstanceStore.empty().table.schema.equals(INSTANCE_SCHEMA)


def test_instance_masks_rule_reads_the_rows_instance_map():
    scene = render_scene(image_rng(7, 1), 64, 4)
    row = _row(scene.image, scene.label, "syn", scene.instances)
    with pytest.warns(UserWarning, match="memory.size=50"):
        store, report = build_store(
            [row], range(1, 21), rule="instance_masks", min_area=0.0, step=0, size=50, previous=None, seed=0
        )
    assert len(store) == sum(report.candidates_per_class.values()) == sum(1 for o in scene.objects if o.instance_id)
    for inst in store.instances():
        y0, x0, y1, x1 = inst.bbox
        assert np.array_equal(inst.crop, scene.image[y0:y1, x0:x1])
        assert np.all(scene.label[y0:y1, x0:x1][inst.mask] == inst.class_id)
