"""Per-sample decoding, joint augmentation and full-image inference, shared by the Ray Data stream and evaluation.

Images travel as uint8 (C x H x W) and labels as uint8 maps; normalisation to ImageNet
statistics happens on the trainer's device (`normalize`), so the data workers never build or
ship float tensors (four times the bytes through Ray's object store).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from eir.data.codec import IMAGENET_MEAN, IMAGENET_STD, MEAN_PIXEL, decode_map, decode_rgb  # noqa: F401 (re-exported)


class JointAugment:
    """RandomResizedCrop + horizontal flip with the same parameters for the image and every map.

    Maps (label, pseudo-label, ...) are `tv_tensors.Mask`, so torchvision resizes them with
    nearest-neighbour and pads nothing. METHOD.md §2: scale 0.5–2.0, ratio 3/4–4/3.
    """

    def __init__(
        self, crop_size: int, scale: tuple[float, float] = (0.5, 2.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
    ):
        self.crop_size = crop_size
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(crop_size, scale=scale, ratio=ratio, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        )

    def __call__(self, image: np.ndarray, *maps: np.ndarray) -> tuple[np.ndarray, ...]:
        """image H x W x 3 uint8, maps H x W uint8 → image 3 x crop x crop uint8, maps crop x crop.

        The maps travel as one stacked mask: one resize and one flip for all of them instead of a
        torchvision dispatch per map (the same nearest-neighbour pixels either way).
        """
        img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        if not maps:
            return (np.asarray(self.transform(img)),)
        stacked = tv_tensors.Mask(torch.from_numpy(np.stack(maps)))
        image_out, maps_out = self.transform(img, stacked)
        maps_np = np.asarray(maps_out)
        return (np.asarray(image_out), *(maps_np[i] for i in range(len(maps))))


def center_crop_eval(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The DKD/EIR test protocol (METHOD.md §1): shorter side resized to `size`, then a square centre crop."""
    height, width = label.shape
    factor = size / min(height, width)
    new_w, new_h = max(size, round(width * factor)), max(size, round(height * factor))
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize((new_w, new_h), Image.NEAREST))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[top : top + size, left : left + size], label[top : top + size, left : left + size]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W (on any device) → float ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean) / std


def size_groups(images: Sequence[np.ndarray]) -> list[list[int]]:
    """Row indices of the images that share one height and width, groups in order of first appearance.

    Full images of different sizes cannot be stacked without padding, and padded pixels would enter
    the convolutions and ASPP's image pooling: a picture's prediction would depend on its neighbours.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for row, image in enumerate(images):
        groups.setdefault(tuple(image.shape[:2]), []).append(row)
    return list(groups.values())


def logits_by_size(
    model: torch.nn.Module, images: Sequence[np.ndarray], device: torch.device, *, amp: bool = False
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Full-image logits, one forward pass per image size: (rows, float32 len(rows) x C x H x W) per group.

    images are H x W x 3 uint8; `amp` autocasts on CUDA only. The caller puts each group's results
    back at its rows, so a batch's order survives the grouping.
    """
    for rows in size_groups(images):
        stacked = torch.from_numpy(np.stack([images[row] for row in rows])).permute(0, 3, 1, 2)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(normalize(stacked.to(device)))
        yield rows, logits.float()
