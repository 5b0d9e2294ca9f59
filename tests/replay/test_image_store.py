"""The image-replay baseline's store: class-balanced images, de-duplicated (METHOD.md §4)."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eir import storage
from eir.replay.image_store import ImageStore, _Pool, build_image_store


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _row(sample_id: str, classes: list[int]) -> dict:
    """A 4 x 4 image whose label holds `classes` (one pixel each) on background."""
    label = np.zeros((4, 4), dtype=np.uint8)
    label.ravel()[: len(classes)] = classes
    image = np.full((4, 4, 3), len(sample_id), dtype=np.uint8)
    present = sorted(set(label.ravel().tolist()))
    return {"id": sample_id, "image": _png(image), "label": _png(label), "classes": present}


def _build(rows, classes, size, previous=None, seed=0, step=0):
    return build_image_store(rows, classes, size, previous, seed, step=step)


def test_every_class_gets_its_share_of_images():
    rows = [_row("a", [1, 2]), _row("b", [1]), _row("c", [1]), _row("d", [2]), _row("e", [2]), _row("f", [1])]
    for seed in range(8):
        store = _build(rows, [1, 2], 4, seed=seed)
        assert len(store) == len(set(store.ids())) == 4
        # each class had at least two turns, and each turn yields an image holding it
        assert all(count >= 2 for count in store.class_histogram().values())


def test_an_image_counts_for_each_class_and_is_stored_once():
    rows = [_row(f"r{i}", [1, 2, 9]) for i in range(5)]  # 9 is not a class of the step
    store = _build(rows, [1, 2], 3)
    assert len(store) == len(set(store.ids())) == 3
    assert store.class_histogram() == {1: 3, 2: 3}
    assert all(r["replay_classes"] == [1, 2] for r in store.rows())


def test_images_without_a_class_of_the_step_are_not_candidates():
    rows = [_row("a", [1]), _row("b", [5]), _row("c", [])]
    with pytest.warns(UserWarning, match="memory.size=3 but only 1 candidate images were found; stored 1"):
        store = _build(rows, [1], 3)
    assert store.ids() == ["a"]


def test_previous_images_stay_in_the_pool_with_their_classes():
    first = _build([_row("p1", [1]), _row("p2", [2])], [1, 2], 2)
    rows = [_row("n1", [3]), _row("n2", [3]), _row("n3", [3])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _build(rows, [3], 4, previous=first, step=1)
    assert {"p1", "p2"} <= set(second.ids())
    assert second.class_histogram() == {1: 1, 2: 1, 3: 2}
    old = {r["id"]: r for r in first.rows()}
    for row in second.rows():
        if row["id"] in old:  # bytes untouched: relabelling is the pipeline's job
            assert row["image"] == old[row["id"]]["image"] and row["label"] == old[row["id"]]["label"]


def test_an_image_both_stored_and_new_is_one_candidate():
    first = _build([_row("p1", [1, 3])], [1], 1)
    second = _build([_row("p1", [1, 3]), _row("n1", [3])], [3], 1, previous=first, seed=1, step=1)
    with pytest.warns(UserWarning, match="only 2 candidate images"):
        both = _build([_row("p1", [1, 3]), _row("n1", [3])], [3], 5, previous=first, step=1)
    assert len(second) == 1
    assert sorted(both.ids()) == ["n1", "p1"]
    assert {r["id"]: r["replay_classes"] for r in both.rows()} == {"p1": [1, 3], "n1": [3]}
    # one of step 1's own images: stored at step 1, like every image step 1 stores (module doc)
    assert {r["id"]: r["stored_step"] for r in both.rows()} == {"p1": 1, "n1": 1}


def test_an_image_kept_from_an_earlier_store_keeps_its_storing_step():
    first = _build([_row("a0", [1]), _row("b0", [2])], [1, 2], 2, step=0)
    assert dict(zip(first.ids(), first.stored_steps())) == {"a0": 0, "b0": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _build([_row("c1", [3]), _row("d1", [3])], [3], 4, previous=first, step=1)
        third = _build([_row("e2", [4])], [4], 5, previous=second, step=2)
    assert dict(zip(second.ids(), second.stored_steps())) == {"a0": 0, "b0": 0, "c1": 1, "d1": 1}
    assert dict(zip(third.ids(), third.stored_steps())) == {"a0": 0, "b0": 0, "c1": 1, "d1": 1, "e2": 2}
    assert ImageStore.from_bytes(third.to_bytes()).stored_steps() == third.stored_steps()


def test_a_store_without_storing_steps_fails_naming_the_file(tmp_path):
    """A store written before `stored_step` existed cannot say which labels its images keep: refused."""
    store = _build([_row("a", [1])], [1], 1)
    old = store.table.drop_columns(["stored_step"])
    loc = storage.resolve(tmp_path / "images.parquet")
    buffer = io.BytesIO()
    pq.write_table(old, buffer)
    storage.write_bytes_atomic(loc, buffer.getvalue())
    with pytest.raises(ValueError, match=r"images\.parquet: image store without the 'stored_step' column") as info:
        ImageStore.read(loc)
    assert "rerun the step that wrote it" in str(info.value)


def test_pool_holds_only_images_some_reservoir_keeps():
    pool = _Pool(size=3, rng=np.random.default_rng(0))
    for i in range(50):
        pool.offer(_row(f"r{i}", [1, 2]), [1] if i % 2 else [1, 2], 0)
    assert len(pool.classes) == 50
    kept = {pair.image_id for pair in pool.reservoirs.items()}
    assert set(pool.rows) == kept and len(kept) <= 6
    assert all(pool.refs[i] == sum(p.image_id == i for p in pool.reservoirs.items()) for i in kept)


def test_size_zero_and_round_trips(tmp_path):
    rows = [_row("a", [1]), _row("b", [2]), _row("c", [1, 2])]
    empty = _build(rows, [1, 2], 0)
    assert len(empty) == 0 and empty.class_histogram() == {}
    store = _build(rows, [1, 2], 2, seed=3)
    assert _build(rows, [1, 2], 2, seed=3).table.equals(store.table)
    data = store.to_bytes()
    assert ImageStore.from_bytes(data).table.equals(store.table) and ImageStore.from_bytes(data).to_bytes() == data
    for kept in (empty, store):
        loc = storage.resolve(tmp_path / f"images-{len(kept)}.parquet")
        kept.write(loc)
        assert ImageStore.read(loc).table.equals(kept.table)
    assert sorted(os.listdir(tmp_path)) == ["images-0.parquet", "images-2.parquet"]
    assert store.nbytes > 0
    with pytest.raises(FileNotFoundError, match="no image store"):
        ImageStore.read(storage.resolve(tmp_path / "nothing.parquet"))


def test_rows_must_be_ingest_rows():
    with pytest.raises(ValueError, match="lacks 'classes'"):
        _build([{"id": "x", "image": b"", "label": b""}], [1], 1)
    with pytest.raises(ValueError, match=r"memory.size=-1: expected a number of images >= 0"):
        _build([], [1], -1)
