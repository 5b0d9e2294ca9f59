"""Full-image inference never pads: an image's prediction is the same alone and in a mixed-size batch.

Both consumers are checked (the evaluator and the pseudo-labeller), called directly: no Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eir.data.codec import decode_map, encode_png
from eir.data.pipeline import PseudoLabeler
from eir.data.transforms import size_groups
from eir.metrics import predict
from eir.model import build_model
from eir.pseudo import PseudoRule
from eir.train.evaluate import confusion_on_batches

NUM_CHANNELS = 4  # background + one step of 3 classes
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mobilenet_v2", [NUM_CHANNELS - 1], weights=None).eval()


def _picture(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured image (random blocks, so the untrained model's classes vary) and a label map."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    image = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))
    label = rng.integers(0, NUM_CHANNELS, (height, width), dtype=np.uint8)
    label[:8] = 255  # an ignored band
    return image, label


# Two sizes, three pictures: the first and last share a size and form one group around the other.
PICTURES = [_picture(48, 64, 1), _picture(80, 40, 2), _picture(48, 64, 3)]


def _objects(items: list) -> np.ndarray:
    """A column as Ray Data hands over full images of different sizes (or bytes): an object array."""
    column = np.empty(len(items), dtype=object)
    for row, item in enumerate(items):
        column[row] = item
    return column


def _batch(*pictures: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image": _objects([image for image, _ in pictures]), "label": _objects([label for _, label in pictures])}


def test_size_groups_keep_rows_in_order_of_first_appearance() -> None:
    shapes = [(48, 64), (80, 40), (48, 64), (10, 10), (80, 40)]
    assert size_groups([np.zeros((*shape, 3), np.uint8) for shape in shapes]) == [[0, 2], [1, 4], [3]]


def _scored(model: torch.nn.Module, batches: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, list[torch.Tensor]]:
    """The matrix and every class map the prediction rule returned, in the order it returned them."""
    seen: list[torch.Tensor] = []

    def recording_predict(logits: torch.Tensor) -> torch.Tensor:
        classes = predict(logits)
        seen.extend(classes)
        return classes

    matrix = confusion_on_batches(model, batches, NUM_CHANNELS, CPU, predict=recording_predict)
    return matrix, seen


def test_evaluation_of_a_picture_does_not_depend_on_its_batch(model: torch.nn.Module) -> None:
    alone = [_scored(model, [_batch(picture)]) for picture in PICTURES]
    mixed_matrix, mixed_maps = _scored(model, [_batch(*PICTURES)])
    # one forward pass per size: rows 0 and 2 first (48 x 64), then row 1 (80 x 40)
    for row, position in ((0, 0), (2, 1), (1, 2)):
        assert torch.equal(mixed_maps[position], alone[row][1][0]), f"picture {row} changed class in a mixed batch"
    assert np.array_equal(mixed_matrix, sum(matrix for matrix, _ in alone))
    assert all(len(torch.unique(maps[0])) > 1 for _, maps in alone), "the model predicts one class: nothing tested"


def test_pseudo_labels_of_a_picture_do_not_depend_on_its_batch(model: torch.nn.Module, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "head_sizes": [NUM_CHANNELS - 1]}, checkpoint)
    # threshold 0.5: any foreground logit >= 0 makes a pseudo-label, so the untrained model gives many
    labeler = PseudoLabeler(
        str(checkpoint), "mobilenet_v2", 16, np.arange(256, dtype=np.uint8), PseudoRule("score", 0.5), use_gpu=False
    )
    background = [(image, np.zeros_like(label)) for image, label in PICTURES]  # pseudo-labels only fill background

    def rows(*pictures: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "id": _objects([f"p{row}" for row in range(len(pictures))]),
            "image": _objects([encode_png(image) for image, _ in pictures]),
            "label": _objects([encode_png(label) for _, label in pictures]),
        }

    alone = [decode_map(labeler(rows(picture))["pseudo"][0]) for picture in background]
    batch = rows(*background)
    out = labeler(batch)
    assert list(out["id"]) == list(batch["id"]) and list(out["image"]) == list(batch["image"])
    for row, expected in enumerate(alone):
        pseudo = decode_map(out["pseudo"][row])
        assert np.array_equal(pseudo, expected), f"row {row}'s pseudo-labels changed in a mixed batch"
    assert all(len(np.unique(pseudo)) > 1 for pseudo in alone), "the model labels nothing or everything: nothing tested"
