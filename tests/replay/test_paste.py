"""EIR's per-image paste (METHOD.md §3.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eir.replay.paste import (
    NO_INSTANCE,
    NO_PASTE,
    PLAN_COLUMNS,
    PasteConfig,
    ScaledInstances,
    apply_paste,
    empty_plan,
    index_by_channel,
    plan_paste,
    potential_classes,
    rank_cells,
)


def _uniform_instance(class_id: int, height: int, width: int, value: int) -> tuple[int, np.ndarray, np.ndarray]:
    return class_id, np.full((height, width, 3), value, dtype=np.uint8), np.ones((height, width), dtype=bool)


def _store(channels=(1, 2, 3, 4), size=(4, 4)) -> tuple[list, dict[int, np.ndarray]]:
    """One uniform instance per channel (value 10 * channel), identity class → channel LUT."""
    arrays = [_uniform_instance(c, *size, 10 * c) for c in channels]
    lut = np.arange(256, dtype=np.uint8)
    return arrays, index_by_channel(np.array([c for c, _, _ in arrays]), lut)


def _maps(height=16, width=16):
    image = np.full((height, width, 3), 100, dtype=np.uint8)
    return image, np.zeros((height, width), dtype=np.uint8), np.zeros((height, width), dtype=np.uint8)


def _planned(plan: np.ndarray) -> list[dict]:
    """The plan's instances as dicts of `PLAN_COLUMNS` (ints, and λ as a float)."""
    return [dict(zip(PLAN_COLUMNS, (*map(int, row[:5]), float(row[5])))) for row in plan if row[0] != NO_INSTANCE]


def _paste(image, label, pseudo, arrays, index, old=(1, 2, 3, 4), seed=0, **config):
    """Plan as a data worker does, carry the plan out as the trainer does (on the CPU): an H x W x 3 image in and
    out, the two target maps, and one dict per pasted instance."""
    plan = plan_paste(label, pseudo, index, list(old), PasteConfig(**config), np.random.default_rng(seed))
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    out, paste_class, paste_weight = apply_paste(chw, plan[None], ScaledInstances(arrays))
    return out[0].numpy().transpose(1, 2, 0), paste_class[0].numpy(), paste_weight[0].numpy(), _planned(plan)


def test_potential_classes_ranked_by_pixel_count():
    label = np.zeros((6, 6), dtype=np.uint8)
    label[0, 0] = 1  # channel 1 is in the ground truth: never a potential class
    pseudo = np.zeros((6, 6), dtype=np.uint8)
    pseudo.ravel()[1:21] = 1
    pseudo.ravel()[21:31] = 4
    pseudo.ravel()[31:33] = 6
    pseudo.ravel()[33] = 255
    pseudo.ravel()[34:36] = 2  # 2 pixels, ties with 6: the smaller id first
    assert potential_classes(label, pseudo, 3) == [4, 2, 6]
    assert potential_classes(label, pseudo, 1) == [4]
    assert potential_classes(label, np.zeros_like(pseudo), 3) == []


def test_potential_classes_needs_uint8_maps():
    label = np.zeros((4, 4), dtype=np.uint8)
    for bad in (np.zeros((4, 4), dtype=np.int64), np.zeros((4, 4), dtype=bool), np.zeros((4, 4, 1), dtype=np.uint8)):
        with pytest.raises(ValueError, match="pseudo must be an H x W uint8 map"):
            potential_classes(label, bad, 3)
        with pytest.raises(ValueError, match="label must be an H x W uint8 map"):
            potential_classes(bad, label, 3)


def test_potential_classes_equal_a_set_difference_of_the_two_maps():
    """Random maps against the definition written with `np.unique`: pseudo's channels minus 0, 255 and every
    channel of the label, most pseudo pixels first, ties to the smaller channel."""
    rng = np.random.default_rng(9)
    for _ in range(200):
        label = rng.choice([0, 1, 2, 3, 7, 255], (12, 10)).astype(np.uint8)
        pseudo = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 255], (12, 10), p=[0.4] + [0.075] * 8).astype(np.uint8)
        values, counts = np.unique(pseudo, return_counts=True)
        found = {int(v): int(n) for v, n in zip(values, counts) if v not in (0, 255) and not (label == v).any()}
        expected = sorted(found, key=lambda c: (-found[c], c))
        assert potential_classes(label, pseudo, 256) == expected and potential_classes(label, pseudo, 2) == expected[:2]
        # Told which channels the label can hold (any superset of its values: the look-up table's), the same answer,
        # whether those channels meet the pseudo-labels' (the label is counted) or not (it is not).
        for possible in ({0, 1, 2, 3, 7, 255}, {0, 1, 2, 3, 7, 9, 255}, set(np.unique(label).tolist())):
            assert potential_classes(label, pseudo, 256, label_channels=possible) == expected
    # A step's own image: its label holds none of the old channels the pseudo-labels show.
    label = np.random.default_rng(1).choice([0, 8, 9, 255], (12, 10)).astype(np.uint8)
    pseudo = np.random.default_rng(2).choice([0, 1, 2, 3], (12, 10)).astype(np.uint8)
    values, counts = np.unique(pseudo[pseudo > 0], return_counts=True)
    expected = [int(v) for _, v in sorted(zip(-counts, values))]
    assert potential_classes(label, pseudo, 256, label_channels={0, 8, 9, 255}) == expected


def test_rank_cells_by_background_after_pseudo_labelling():
    label = np.zeros((10, 12), dtype=np.uint8)
    pseudo = np.zeros_like(label)
    label[0:5, 0:6] = 3  # top-left: no background
    pseudo[0:2, 6:12] = 2  # top-right: 18 background pixels
    label[5:10, 0:2] = 255  # bottom-left: 20
    # bottom-right: 30, all background
    assert rank_cells(label, pseudo) == [(5, 6, 10, 12), (5, 0, 10, 6), (0, 6, 5, 12), (0, 0, 5, 6)]
    assert rank_cells(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)) == [
        (0, 0, 2, 2),
        (0, 2, 2, 4),
        (2, 0, 4, 2),
        (2, 2, 4, 4),
    ]  # ties keep row-major order
    assert len(rank_cells(label, pseudo, grid=3)) == 9


def test_hard_paste_scales_to_the_cell_and_sits_at_its_corner():
    image, label, pseudo = _maps(10, 16)  # cells are 5 x 8: side 5
    label[0:5, :] = 7  # top cells hold no background: the bottom-left cell is best
    arrays = [(1, np.full((2, 6, 3), 200, np.uint8), np.ones((2, 6), bool))]
    index = {1: np.array([0])}
    out, paste_class, paste_weight, pasted = _paste(image, label, pseudo, arrays, index, old=[1], hard=True)
    (info,) = pasted
    assert (info["y0"], info["x0"], info["side"]) == (5, 0, 5) and info["channel"] == 1 and info["lambda"] == 1.0
    # longer side 6 → 5 (the cell side), shorter 2 → round(2 * 5 / 6) = 2, at the cell's top-left: rows 5–6, cols 0–4
    expected = np.full((10, 16), NO_PASTE, np.uint8)
    expected[5:7, 0:5] = 1
    assert np.array_equal(paste_class, expected)
    assert np.array_equal(paste_weight, np.where(expected == 1, 1.0, 0.0).astype(np.float16))
    assert np.all(out[5:7, 0:5] == 200) and np.all(out[expected == NO_PASTE] == 100)


def test_pasted_pixels_stay_in_their_cells_and_follow_the_mask():
    image, label, pseudo = _maps(20, 20)
    ring = np.ones((9, 9), bool)
    ring[3:6, 3:6] = False
    arrays = [(c, np.full((9, 9, 3), 10 * c, np.uint8), ring) for c in (1, 2, 3)]
    index = {c: np.array([c - 1]) for c in (1, 2, 3)}
    for seed in range(5):
        _, paste_class, paste_weight, pasted = _paste(image, label, pseudo, arrays, index, old=[1, 2, 3], seed=seed)
        assert len(pasted) == 3 and len({(p["y0"], p["x0"]) for p in pasted}) == 3
        covered = np.zeros((20, 20), bool)
        for info in pasted:
            y0, x0, side = info["y0"], info["x0"], info["side"]
            assert side == 10
            in_cell = np.zeros((20, 20), bool)
            in_cell[y0 : y0 + side, x0 : x0 + side] = True
            mine = paste_class == info["channel"]
            assert mine.any() and not (mine & ~in_cell).any()
            assert not mine[y0 + 4, x0 + 4]  # the ring's hole (scaled 9 → 10) is not pasted
            covered |= mine
        assert np.array_equal(covered, paste_class != NO_PASTE)
        assert np.all((paste_weight > 0) <= covered)


def test_blend_arithmetic_is_exact():
    image, label, pseudo = _maps(8, 8)
    arrays = [_uniform_instance(2, 4, 4, 200)]
    out, paste_class, paste_weight, pasted = _paste(image, label, pseudo, arrays, {2: np.array([0])}, old=[2], seed=3)
    (info,) = pasted
    lam = info["lambda"]
    assert 0.0 < lam < 1.0
    assert (info["y0"], info["x0"], info["side"]) == (0, 0, 4)  # all cells tie: the first (top-left) is used
    expected = np.rint(lam * 200 + (1 - lam) * 100)
    assert round(lam, 4) == 0.2368 and expected == 124  # by hand: 47.36 + 76.32 = 123.68
    assert np.all(out[0:4, 0:4] == expected) and np.all(out[4:, :] == 100) and np.all(out[:, 4:] == 100)
    assert np.all(paste_weight[0:4, 0:4] == np.float16(lam)) and paste_weight.dtype == np.float16
    assert np.all(paste_weight[paste_class == NO_PASTE] == 0)
    hard_out, *_ = _paste(image, label, pseudo, arrays, {2: np.array([0])}, old=[2], hard=True)
    assert np.all(hard_out[0:4, 0:4] == 200)


def test_ignore_pixels_under_a_paste_get_the_paste_class():
    image, label, pseudo = _maps(8, 8)
    label[:] = 255
    arrays, index = _store(channels=(3,))
    _, paste_class, paste_weight, _ = _paste(image, label, pseudo, arrays, index, old=[3], hard=True)
    assert np.all(paste_class[0:4, 0:4] == 3) and np.all(paste_weight[0:4, 0:4] == 1)
    assert np.all(label == 255)  # the label itself is left to the loss


@pytest.mark.parametrize("found", [0, 1])
def test_fewer_than_two_potential_classes_are_filled_up_to_three(found):
    image, label, pseudo = _maps()
    if found:
        pseudo[0:3, 0:3] = 4
    arrays, index = _store()
    for seed in range(6):
        _, paste_class, _, pasted = _paste(image, label, pseudo, arrays, index, seed=seed)
        channels = [p["channel"] for p in pasted]
        assert len(channels) == len(set(channels)) == 3 and set(channels) <= {1, 2, 3, 4}
        if found:
            assert channels[0] == 4  # the potential class goes first, into the best cell
        assert set(np.unique(paste_class)) == set(channels) | {NO_PASTE}


def test_two_potential_classes_are_pasted_alone():
    image, label, pseudo = _maps()
    pseudo[0:2, 0:2] = 2
    pseudo[10:15, 10:15] = 3
    arrays, index = _store()
    _, _, _, pasted = _paste(image, label, pseudo, arrays, index)
    assert [p["channel"] for p in pasted] == [3, 2]  # more pixels first


def test_more_potential_classes_keep_the_largest_three():
    image, label, pseudo = _maps()
    pseudo[0, 0:1] = 1
    pseudo[1, 0:4] = 2
    pseudo[2, 0:3] = 3
    pseudo[3, 0:2] = 4
    label[5, 5] = 3  # in the ground truth: not a potential class
    arrays, index = _store()
    _, _, _, pasted = _paste(image, label, pseudo, arrays, index)
    assert [p["channel"] for p in pasted] == [2, 4, 1]


def test_only_stored_classes_are_pasted():
    image, label, pseudo = _maps()
    pseudo[0:4, 0:4] = 9  # an old class with no stored instance: skipped, not a slot
    arrays, index = _store(channels=(1, 2))
    index[5] = np.array([], dtype=np.int64)
    for seed in range(5):
        _, paste_class, _, pasted = _paste(image, label, pseudo, arrays, index, old=[1, 2, 5, 6, 9], seed=seed)
        assert sorted(p["channel"] for p in pasted) == [1, 2]
        assert set(np.unique(paste_class)) == {1, 2, NO_PASTE}


def test_index_by_channel_maps_classes_through_the_lut():
    lut = np.zeros(256, dtype=np.uint8)
    lut[3], lut[5], lut[9], lut[255] = 1, 2, 0, 255
    index = index_by_channel(np.array([3, 5, 3, 9]), lut)
    assert set(index) == {1, 2}
    assert index[1].tolist() == [0, 2] and index[2].tolist() == [1]
    with pytest.raises(ValueError, match="256-entry"):
        index_by_channel(np.array([1]), np.arange(10, dtype=np.uint8))


def test_probability_zero_pastes_nothing():
    image, label, pseudo = _maps()
    arrays, index = _store()
    out, paste_class, paste_weight, pasted = _paste(image, label, pseudo, arrays, index, probability=0.0)
    assert pasted == [] and np.array_equal(out, image)
    assert np.all(paste_class == NO_PASTE) and not paste_weight.any()


def test_same_seed_same_output_and_inputs_untouched():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    label = np.zeros((24, 20), dtype=np.uint8)
    label[0:6, 0:6] = 255
    pseudo = np.zeros_like(label)
    pseudo[12:18, 0:5] = 2
    arrays = [(c, rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), rng.random((5, 7)) < 0.7) for c in (1, 2, 3, 1)]
    index = {1: np.array([0, 3]), 2: np.array([1]), 3: np.array([2])}
    inputs = [image, label, pseudo, *[a for _, crop, mask in arrays for a in (crop, mask)], *index.values()]
    copies = [a.copy() for a in inputs]
    for a in inputs:
        a.setflags(write=False)
    first = _paste(image, label, pseudo, arrays, index, old=[1, 2, 3], seed=11)
    second = _paste(image, label, pseudo, arrays, index, old=[1, 2, 3], seed=11)
    for a, b in zip(first[:3], second[:3]):
        assert np.array_equal(a, b)
    assert first[3] == second[3]
    assert all(np.array_equal(a, c) for a, c in zip(inputs, copies))
    others = [_paste(image, label, pseudo, arrays, index, old=[1, 2, 3], seed=s)[0] for s in range(3)]
    assert any(not np.array_equal(first[0], o) for o in others)


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_instances"):
        PasteConfig(max_instances=5)  # more than the 2 x 2 cells
    with pytest.raises(ValueError, match="min_classes"):
        PasteConfig(max_instances=2, min_classes=3)
    with pytest.raises(ValueError, match="probability"):
        PasteConfig(probability=1.5)
    image, label, pseudo = _maps()
    arrays, index = _store()
    with pytest.raises(ValueError, match="expected two H x W maps"):
        _paste(image, label[:4], pseudo, arrays, index)


def _random_store(rng: np.random.Generator, channels=(1, 2, 3), width=9):
    """Random instances of varied heights with random masks, identity class → channel LUT."""
    arrays = [
        (c, rng.integers(0, 255, (5 + c, width, 3), dtype=np.uint8), rng.random((5 + c, width)) > 0.3) for c in channels
    ]
    return arrays, index_by_channel(np.array(channels), np.arange(256, dtype=np.uint8))


def _reference_paste(image: np.ndarray, plan: np.ndarray, arrays: list) -> tuple[np.ndarray, ...]:
    """METHOD.md §3.3 step 5 written out pixel by pixel, independently of `apply_paste`: PIL resizes the
    instance to the cell side (longer side = side), and each masked pixel becomes rint(r + λ·(i − r)) in float32."""
    out, height, width = image.copy(), *image.shape[:2]
    paste_class = np.full((height, width), NO_PASTE, np.uint8)
    paste_weight = np.zeros((height, width), np.float16)
    for info in _planned(plan):
        _, crop, mask = arrays[info["index"]]
        factor = info["side"] / max(mask.shape)
        size = (max(1, round(mask.shape[1] * factor)), max(1, round(mask.shape[0] * factor)))
        pixels = np.asarray(Image.fromarray(crop).resize(size, Image.BILINEAR))
        inside = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
        lam = np.float32(info["lambda"])
        for dy in range(inside.shape[0]):
            for dx in range(inside.shape[1]):
                y, x = info["y0"] + dy, info["x0"] + dx
                if y < height and x < width and inside[dy, dx]:
                    base = out[y, x].astype(np.float32)
                    out[y, x] = np.rint(base + lam * (pixels[dy, dx].astype(np.float32) - base))
                    paste_class[y, x], paste_weight[y, x] = info["channel"], info["lambda"]
    return out, paste_class, paste_weight


def test_the_trainers_paste_matches_a_pixel_by_pixel_reference():
    """Random instances, masks and λ in a crop whose sides do not divide by the grid (cells 8 or 9 rows by 10 or 9
    columns: instances of two sides in one batch): `apply_paste` on a batch equals the reference per image."""
    rng = np.random.default_rng(5)
    arrays, index = _random_store(rng, width=7)
    images = rng.integers(0, 255, (4, 17, 19, 3), dtype=np.uint8)
    plans = []
    for seed in range(4):
        label, pseudo = np.zeros((17, 19), np.uint8), np.zeros((17, 19), np.uint8)
        pseudo[:4, :4] = 1 + seed % 3
        plans.append(plan_paste(label, pseudo, index, [1, 2, 3], PasteConfig(), np.random.default_rng(seed)))
    plans[3] = empty_plan(PasteConfig())  # an image drawn not to be pasted, in the same batch
    batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    before = batch.clone()
    out, paste_class, paste_weight = apply_paste(batch, torch.from_numpy(np.stack(plans)), ScaledInstances(arrays))
    assert torch.equal(batch, before), "the input batch is not modified"
    assert out.dtype == torch.uint8 and paste_class.dtype == torch.uint8 and paste_weight.dtype == torch.float16
    assert sum(len(_planned(p)) for p in plans) == 9 and {p["side"] for p in map(_planned, plans) for p in p} == {8, 9}
    for i, plan in enumerate(plans):
        expected = _reference_paste(images[i], plan, arrays)
        np.testing.assert_array_equal(out[i].numpy().transpose(1, 2, 0), expected[0])
        np.testing.assert_array_equal(paste_class[i].numpy(), expected[1])
        np.testing.assert_array_equal(paste_weight[i].numpy(), expected[2])
    assert torch.equal(out[3], batch[3]) and bool((paste_class[3] == NO_PASTE).all())


def test_same_seed_same_plan_and_the_plan_is_compact():
    rng = np.random.default_rng(2)
    _, index = _random_store(rng)
    label, pseudo = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
    pseudo[20:, 20:] = 3
    plans = [plan_paste(label, pseudo, index, [1, 2, 3], PasteConfig(), np.random.default_rng(s)) for s in (7, 7, 8)]
    assert np.array_equal(plans[0], plans[1]) and not np.array_equal(plans[0], plans[2])
    assert plans[0].shape == (3, len(PLAN_COLUMNS)) and plans[0].dtype == np.float32 and plans[0].nbytes == 72
    assert _planned(plans[0])[0]["channel"] == 3  # the potential class first
    never_empty = empty_plan(PasteConfig(max_instances=0, min_classes=0))
    assert never_empty.shape == (1, len(PLAN_COLUMNS)), "a stream column of plans never has an empty axis"


def test_scaled_instances_resize_once_per_side_and_check_rows():
    rng = np.random.default_rng(3)
    arrays, _ = _random_store(rng)
    instances = ScaledInstances(arrays)
    pixels, mask = instances(1, 8)
    assert pixels.shape == (3, *mask.shape) and max(mask.shape) == 8 and mask.dtype == torch.bool
    assert instances(1, 8)[0] is pixels, "resized once per (row, side) and kept"
    assert max(instances(1, 5)[1].shape) == 5
    with pytest.raises(ValueError, match="store row 3, but the instance store holds 3 rows"):
        instances(3, 8)


def test_apply_paste_refuses_mismatched_plans_and_images():
    arrays, _ = _store()
    instances = ScaledInstances(arrays)
    images = torch.zeros((2, 3, 8, 8), dtype=torch.uint8)
    plan = np.stack([empty_plan(PasteConfig())] * 2)
    with pytest.raises(ValueError, match="plans of shape \\(1, 3, 6\\) for 2 images"):
        apply_paste(images, plan[:1], instances)
    with pytest.raises(ValueError, match="expected B x 3 x H x W uint8"):
        apply_paste(images.float(), plan, instances)
