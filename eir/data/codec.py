"""Image and label-map bytes ↔ arrays, torch-free so the pure core (replay store, ingest) can use it."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The normalisation mean as an RGB pixel: a "neutral" grey that normalises to zero (METHOD.md §3.2).
MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)


def decode_rgb(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes → H x W x 3 uint8 (writable: torch refuses read-only arrays)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def decode_map(data: bytes) -> np.ndarray:
    """Single-channel PNG bytes → H x W uint8; palette indices are kept as indices."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im, dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """Lossless and fast (compression level 1): label maps and masks compress well anyway."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
