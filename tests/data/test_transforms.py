"""Joint augmentation: the image and its maps must get the same crop and flip."""

from __future__ import annotations

import numpy as np
import torch

from eir.data.transforms import JointAugment


def test_image_and_label_get_the_same_crop_and_flip() -> None:
    # Four quadrants, each painted with its own grey and labelled with its own class: after any
    # crop and flip, a pixel's grey must still say which class its label holds.
    label = np.zeros((64, 96), dtype=np.uint8)
    label[:32, 48:], label[32:, :48], label[32:, 48:] = 1, 2, 3
    image = np.repeat((label * 60 + 20)[..., None], 3, axis=2).astype(np.uint8)
    augment = JointAugment(32, scale=(0.1, 0.5))
    shown = set()
    for _ in range(50):
        image_c, label_c = augment(image, label)
        assert image_c.shape == (3, 32, 32) and label_c.shape == (32, 32)
        grey_class = np.rint((image_c[0].astype(float) - 20) / 60)
        # Bilinear resizing blurs the image along quadrant borders only; labels are nearest.
        assert (grey_class == label_c).mean() > 0.9
        shown.update(np.unique(label_c).tolist())
    assert shown == {0, 1, 2, 3}, "the crops moved over the whole image"


def test_every_map_gets_the_crop_it_would_get_alone() -> None:
    """Maps travel stacked (one resize for all): each must come out as it would on its own."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    label, pseudo = rng.integers(0, 5, (40, 50), dtype=np.uint8), rng.integers(0, 9, (40, 50), dtype=np.uint8)
    augment = JointAugment(24)
    for seed in range(10):
        torch.manual_seed(seed)
        image_2, label_2, pseudo_2 = augment(image, label, pseudo)
        torch.manual_seed(seed)
        image_1, label_1 = augment(image, label)
        torch.manual_seed(seed)
        _, pseudo_1 = augment(image, pseudo)
        assert np.array_equal(image_2, image_1) and np.array_equal(label_2, label_1)
        assert np.array_equal(pseudo_2, pseudo_1) and pseudo_2.shape == (24, 24)
