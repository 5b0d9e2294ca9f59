"""A stored instance as a training sample of its own (METHOD.md §3.2).

The instance's pixels sit on a constant background equal to the normalisation mean (so the
background normalises to zero), labelled with its class inside the mask and 0 elsewhere; the
usual augmentation follows in the stream.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from eir.data.codec import MEAN_PIXEL


def replay_canvas(
    crop: np.ndarray, mask: np.ndarray, channel: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A size x size mean-grey canvas with the instance scaled to 50–100 % of the side, placed at random.

    Returns (image H x W x 3 uint8, label H x W uint8 with `channel` inside the mask).
    """
    height, width = mask.shape
    target = round(size * rng.uniform(0.5, 1.0))
    factor = target / max(height, width)
    new_h, new_w = max(1, min(size, round(height * factor))), max(1, min(size, round(width * factor)))
    scaled = np.asarray(Image.fromarray(crop).resize((new_w, new_h), Image.BILINEAR))
    scaled_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((new_w, new_h), Image.NEAREST)) > 127
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = MEAN_PIXEL
    label = np.zeros((size, size), dtype=np.uint8)
    top = int(rng.integers(0, size - new_h + 1))
    left = int(rng.integers(0, size - new_w + 1))
    window = image[top : top + new_h, left : left + new_w]
    window[scaled_mask] = scaled[scaled_mask]
    label[top : top + new_h, left : left + new_w][scaled_mask] = channel
    return image, label
