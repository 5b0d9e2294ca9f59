"""Instance extraction rules and class-balanced selection (METHOD.md §3.1)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

from eir.data.synthetic import image_rng, render_scene
from eir.replay.instances import ClassReservoirs, extract_instances, select_balanced


def _image(height: int, width: int) -> np.ndarray:
    """Every pixel a distinct colour, so a crop shows exactly where it was cut from."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([ys, xs, (ys + xs) % 256], axis=-1).astype(np.uint8)


def _two_blobs() -> tuple[np.ndarray, np.ndarray]:
    """10 x 10: class 3 as two separate blobs, class 5 as one L-shaped blob."""
    label = np.zeros((10, 10), dtype=np.uint8)
    label[1:3, 1:4] = 3  # 6 pixels
    label[6:9, 6:8] = 3  # 6 pixels
    label[5:8, 1] = 5
    label[7, 2:4] = 5  # L of 5 pixels, bbox rows 5..7, cols 1..3
    return _image(10, 10), label


def _extract(image, label, rule="single_component", min_area=0.0, instances=None, classes=(3, 5)):
    return extract_instances(image, label, instances, classes, rule=rule, min_area=min_area, source_id="img", step=1)


def test_single_component_rejects_a_class_in_two_pieces():
    image, label = _two_blobs()
    found = _extract(image, label)
    assert [inst.class_id for inst in found] == [5]
    (inst,) = found
    assert inst.bbox == (5, 1, 8, 4)
    assert inst.mask.tolist() == [[True, False, False], [True, False, False], [True, True, True]]
    assert np.array_equal(inst.crop, image[5:8, 1:4])
    assert (inst.source_id, inst.step, inst.area) == ("img", 1, 5)


def test_diagonal_touch_is_two_components():
    label = np.zeros((4, 4), dtype=np.uint8)
    label[0, 0] = label[1, 1] = 3  # 8-connected but not 4-connected
    assert _extract(_image(4, 4), label, classes=[3]) == []
    assert len(_extract(_image(4, 4), label, rule="components", classes=[3])) == 2


def test_components_gives_each_piece():
    image, label = _two_blobs()
    found = _extract(image, label, rule="components")
    assert [(inst.class_id, inst.bbox) for inst in found] == [(3, (1, 1, 3, 4)), (3, (6, 6, 9, 8)), (5, (5, 1, 8, 4))]
    assert all(inst.mask.all() for inst in found[:2])  # rectangles fill their bbox
    assert np.array_equal(found[1].crop, image[6:9, 6:8])


def test_only_requested_classes_and_ignore_never_an_instance():
    image, label = _two_blobs()
    label[0, :] = 255
    found = _extract(image, label, rule="components", classes=[5, 255, 7])
    assert [inst.class_id for inst in found] == [5]


def test_min_area_is_a_fraction_of_the_image():
    image, label = _two_blobs()
    # 100 pixels: 0.06 keeps the 6-pixel blobs and drops the 5-pixel L; 0.07 drops all.
    assert [i.class_id for i in _extract(image, label, rule="components", min_area=0.06)] == [3, 3]
    assert _extract(image, label, rule="components", min_area=0.07) == []
    assert len(_extract(image, label, rule="components", min_area=0.05)) == 3


def test_instance_masks_use_the_instance_map():
    image, label = _two_blobs()
    instances = np.zeros_like(label)
    instances[1:3, 1:4] = 1
    instances[6:9, 6:8] = 2
    instances[5:8, 1] = 3
    instances[7, 2:4] = 3
    instances[0, 0] = 4  # an instance over background only: not a class-3/5 object
    found = _extract(image, label, rule="instance_masks", instances=instances)
    assert [(inst.class_id, inst.bbox) for inst in found] == [(3, (1, 1, 3, 4)), (3, (6, 6, 9, 8)), (5, (5, 1, 8, 4))]


def test_instance_masks_majority_class_and_mask_is_intersection():
    label = np.zeros((6, 6), dtype=np.uint8)
    label[1:4, 1:4] = 3
    label[1, 1] = 255  # boundary pixel: ignore in the label, inside the instance
    instances = np.zeros_like(label)
    instances[1:4, 1:4] = 7
    instances[4, 1:3] = 7  # two background pixels: 8 of 11 are class 3, a majority
    (inst,) = _extract(_image(6, 6), label, rule="instance_masks", instances=instances, classes=[3])
    assert inst.bbox == (1, 1, 4, 4)  # the bbox of the class pixels, not of the whole instance
    assert inst.area == 8 and not inst.mask[0, 0]

    plurality = np.zeros((1, 5), dtype=np.uint8)
    plurality_label = np.array([[3, 3, 0, 5, 255]], dtype=np.uint8)
    plurality[0, :] = 1  # class 3 is the largest share (2 of 5) but not more than half
    assert _extract(_image(1, 5), plurality_label, rule="instance_masks", instances=plurality, classes=[3, 5]) == []
    plurality_label[0, 2] = 3  # now 3 of 5
    (inst,) = _extract(_image(1, 5), plurality_label, rule="instance_masks", instances=plurality, classes=[3, 5])
    assert inst.mask.tolist() == [[True, True, True]]


def test_instance_masks_without_a_map_names_the_alternative():
    image, label = _two_blobs()
    with pytest.raises(ValueError, match="instance_masks.*components"):
        _extract(image, label, rule="instance_masks")


def test_bad_rule_and_shapes_are_errors():
    image, label = _two_blobs()
    with pytest.raises(ValueError, match="unknown"):
        _extract(image, label, rule="blobs")
    with pytest.raises(ValueError, match="same H x W"):
        _extract(image, label[:5])
    with pytest.raises(ValueError, match="min_area"):
        _extract(image, label, min_area=1.5)


def test_synthetic_scene_instances_match_its_instance_map():
    scene = render_scene(image_rng(3, 0), 64, 4)
    classes = range(1, 21)
    by_map = _extract(scene.image, scene.label, rule="instance_masks", instances=scene.instances, classes=classes)
    visible = [o for o in scene.objects if o.instance_id]
    assert sorted(i.class_id for i in by_map) == sorted(o.class_id for o in visible)
    for inst in by_map:
        y0, x0, y1, x1 = inst.bbox
        assert np.array_equal(inst.crop, scene.image[y0:y1, x0:x1])
        assert np.all(scene.label[y0:y1, x0:x1][inst.mask] == inst.class_id)


@dataclass
class _Cand:
    class_id: int


def _cands(counts: dict[int, int]) -> list[_Cand]:
    return [_Cand(c) for c, n in counts.items() for _ in range(n)]


def test_select_balanced_is_balanced_when_every_class_has_enough():
    cands = _cands({1: 20, 2: 20, 3: 20, 4: 20})
    for seed in range(5):
        chosen = select_balanced(cands, 10, np.random.default_rng(seed))
        assert len(chosen) == len(set(chosen)) == 10
        counts = Counter(cands[i].class_id for i in chosen)
        assert set(counts) == {1, 2, 3, 4} and max(counts.values()) - min(counts.values()) <= 1


def test_select_balanced_skips_exhausted_classes():
    cands = _cands({1: 1, 2: 2, 3: 30})
    chosen = select_balanced(cands, 12, np.random.default_rng(0))
    assert Counter(cands[i].class_id for i in chosen) == {1: 1, 2: 2, 3: 9}


def test_select_balanced_budget_over_candidates_returns_all_and_ends():
    cands = _cands({1: 2, 2: 3})
    assert sorted(select_balanced(cands, 100, np.random.default_rng(0))) == [0, 1, 2, 3, 4]
    assert select_balanced(cands, 0, np.random.default_rng(0)) == []
    assert select_balanced([], 5, np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="budget"):
        select_balanced(cands, -1, np.random.default_rng(0))


def test_select_balanced_is_random_within_a_class_and_seeded():
    cands = _cands({1: 50})
    first = select_balanced(cands, 5, np.random.default_rng(1))
    assert first == select_balanced(cands, 5, np.random.default_rng(1))
    assert first != select_balanced(cands, 5, np.random.default_rng(2))


def test_reservoirs_keep_a_bounded_uniform_sample():
    rng = np.random.default_rng(0)
    hits = Counter()
    for _ in range(2000):
        pool: ClassReservoirs[int] = ClassReservoirs(2, rng)
        dropped = [pool.add(1, item) for item in range(10)]
        kept = pool.items()
        assert len(kept) == 2 and pool.seen == {1: 10}
        assert sorted(kept + [d for d in dropped if d is not None]) == list(range(10))  # each item dropped once or kept
        hits.update(kept)
    # each of 10 items kept with probability 2/10: 400 of 2000 draws, binomial sd ~ 18
    assert all(330 < hits[i] < 470 for i in range(10)), hits
