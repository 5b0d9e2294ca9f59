"""Instance extraction and class-balanced selection for the instance memory (METHOD.md §3.1).

An *instance* is what EIR stores and replays: the RGB pixels of an object's bounding box
and its binary mask. Which pixels make one object depends on the dataset, hence three rules:

- ``single_component`` (the paper's): the pixels of class c count as one instance only when
  they form exactly one 4-connected component in the image, a proxy for "one object";
- ``components``: every 4-connected component of class c is an instance (street scenes such
  as CamVid, where nearly no class is a single component; use it with a minimum area);
- ``instance_masks``: the dataset's instance map (VOC SegmentationObject) says which pixels
  belong to one object.

Pure numpy + scipy: it runs in any worker and is tested in milliseconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
from scipy import ndimage

from eir.labels import IGNORE_LABEL

RULES = ("single_component", "components", "instance_masks")
# scipy's default structuring element in 2-D is the 4-neighbourhood cross; spelled out here
# because the rule is part of the method, not an implementation detail.
_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


DecodedInstance = tuple[int, np.ndarray, np.ndarray]  # (class_id, crop h x w x 3 uint8, mask h x w bool)


@dataclass
class Instance:
    """One stored object: its class, bbox pixels and mask, and where it came from."""

    class_id: int
    crop: np.ndarray  # h x w x 3 uint8 RGB: the image inside the bbox
    mask: np.ndarray  # h x w bool: the object's pixels inside the bbox
    bbox: tuple[int, int, int, int]  # (y0, x0, y1, x1) in the source image, y1/x1 exclusive
    source_id: str
    step: int

    @property
    def area(self) -> int:
        return int(self.mask.sum())


class HasClassId(Protocol):
    class_id: int


T = TypeVar("T")


def _check_inputs(image: np.ndarray, label: np.ndarray, instances_map: np.ndarray | None, source_id: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image of {source_id!r}: expected H x W x 3 uint8, got {image.shape} {image.dtype}")
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"label of {source_id!r} is {label.shape}, image is {image.shape[:2]}: expected the same H x W"
        )
    if instances_map is not None and instances_map.shape != label.shape:
        raise ValueError(
            f"instance map of {source_id!r} is {instances_map.shape}, label is {label.shape}: expected the same H x W"
        )


def _instance(
    image: np.ndarray, mask: np.ndarray, box: tuple[slice, slice], class_id: int, source_id: str, step: int
) -> Instance:
    """An Instance from a mask already cut to `box` (a pair of slices into the image)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    y0, x0 = box[0].start + r0, box[1].start + c0
    y1, x1 = box[0].start + r1, box[1].start + c1
    return Instance(
        class_id=int(class_id),
        crop=image[y0:y1, x0:x1].copy(),
        mask=mask[r0:r1, c0:c1].copy(),
        bbox=(int(y0), int(x0), int(y1), int(x1)),
        source_id=source_id,
        step=int(step),
    )


def _connected_instances(
    image: np.ndarray, label: np.ndarray, classes: list[int], rule: str, min_pixels: float, source_id: str, step: int
) -> list[Instance]:
    """Instances under the two connectivity rules, in class order then scan order.

    Components are cut out through their bounding boxes (`find_objects`), never as full-image
    masks, so a street scene with hundreds of fragments stays cheap.
    """
    found: list[Instance] = []
    for class_id in classes:
        pixels = label == class_id
        if not pixels.any():
            continue
        components, count = ndimage.label(pixels, structure=_FOUR_CONNECTED)
        if rule == "single_component" and count != 1:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            if box is not None and sizes[k] >= min_pixels:
                found.append(_instance(image, components[box] == k, box, class_id, source_id, step))
    return found


def _mapped_instances(
    image: np.ndarray,
    label: np.ndarray,
    instances_map: np.ndarray,
    classes: list[int],
    min_pixels: float,
    source_id: str,
    step: int,
) -> list[Instance]:
    """One instance per instance id whose pixels are more than half one wanted class.

    The mask is the instance's pixels that carry that class: VOC's instance and class maps
    differ on boundary (255) pixels, and the label is the source of truth for classes.
    Instances come in class order, then instance-id order.
    """
    wanted = set(classes)
    found: list[Instance] = []
    for instance_id, box in enumerate(ndimage.find_objects(instances_map.astype(np.int32)), start=1):
        if box is None or instance_id == IGNORE_LABEL:
            continue
        pixels = instances_map[box] == instance_id
        values, counts = np.unique(label[box][pixels], return_counts=True)
        best = int(np.argmax(counts))
        class_id = int(values[best])
        if class_id not in wanted or 2 * int(counts[best]) <= int(pixels.sum()):
            continue
        mask = pixels & (label[box] == class_id)
        if mask.sum() >= min_pixels:
            found.append(_instance(image, mask, box, class_id, source_id, step))
    return sorted(found, key=lambda instance: instance.class_id)


def extract_instances(
    image: np.ndarray,
    label: np.ndarray,
    instances_map: np.ndarray | None,
    classes: Iterable[int],
    *,
    rule: str,
    min_area: float,
    source_id: str,
    step: int,
) -> list[Instance]:
    """The instances of `classes` in one un-augmented image, under `rule` (see the module doc).

    `label` holds canonical class ids (255 = ignore); background 0 and ignore are never
    instances, whatever `classes` says. `min_area` is a fraction of the image's
    pixels (h*w): smaller instances are dropped, since fragments of a few pixels teach nothing
    once scaled up to a paste cell. Instances come in class order, then scan/instance-id order.
    """
    if rule not in RULES:
        raise ValueError(f"instance rule {rule!r} is unknown; expected one of {RULES}")
    if not 0.0 <= min_area < 1.0:
        raise ValueError(f"min_area={min_area}: expected a fraction of the image's pixels in [0, 1)")
    _check_inputs(image, label, instances_map, source_id)
    classes = [c for c in sorted({int(c) for c in classes}) if c not in (0, IGNORE_LABEL)]
    min_pixels = max(1.0, min_area * label.size)
    if rule != "instance_masks":
        return _connected_instances(image, label, classes, rule, min_pixels, source_id, step)
    if instances_map is None:
        raise ValueError(
            f"instance rule 'instance_masks' needs an instance map, but {source_id!r} has none; "
            "use rule 'components' (or 'single_component') for datasets without instance masks"
        )
    return _mapped_instances(image, label, instances_map, classes, min_pixels, source_id, step)


def select_balanced(candidates: Sequence[HasClassId], budget: int, rng: np.random.Generator) -> list[int]:
    """Indices of at most `budget` candidates, balanced over their classes (METHOD.md §3.1).

    Round-robin over a shuffled list of the classes present; each turn takes a random unused
    candidate of that class. A class that has run out is skipped, and the loop ends when the
    budget is met or every class has run out (the released code looped forever there).
    Shuffling each class's candidates once and popping from the front is the same as drawing
    a random unused one on every turn, and costs one permutation per class.
    """
    if budget < 0:
        raise ValueError(f"budget={budget}: expected a number of instances >= 0")
    by_class: dict[int, list[int]] = {}
    for index, candidate in enumerate(candidates):
        by_class.setdefault(int(candidate.class_id), []).append(index)
    order = [int(c) for c in rng.permutation(sorted(by_class))] if by_class else []
    queues = {c: deque(by_class[c][i] for i in rng.permutation(len(by_class[c]))) for c in order}
    chosen: list[int] = []
    while len(chosen) < budget and any(queues.values()):
        for class_id in order:
            if len(chosen) == budget:
                break
            if queues[class_id]:
                chosen.append(queues[class_id].popleft())
    return chosen


class ClassReservoirs(Generic[T]):
    """A uniform random sample of at most `size` items per class (reservoir sampling).

    `select_balanced` never takes more than `budget` items of one class and takes a uniformly
    random subset of each class's items, so keeping a uniform sample of `budget` per class
    gives the same selection distribution as keeping every candidate, while memory stays
    bounded by budget x classes however many images a step has.
    """

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        self.rng = rng
        self.kept: dict[int, list[T]] = {}
        self.seen: dict[int, int] = {}  # candidates offered per class, kept or not

    def add(self, class_id: int, item: T) -> T | None:
        """Offer an item; returns the item that is no longer kept (this one or an evicted one)."""
        seen = self.seen[class_id] = self.seen.get(class_id, 0) + 1
        kept = self.kept.setdefault(class_id, [])
        if len(kept) < self.size:
            kept.append(item)
            return None
        slot = int(self.rng.integers(seen))
        if slot >= self.size:
            return item
        evicted, kept[slot] = kept[slot], item
        return evicted

    def items(self) -> list[T]:
        """The kept items, in class order."""
        return [item for class_id in sorted(self.kept) for item in self.kept[class_id]]
