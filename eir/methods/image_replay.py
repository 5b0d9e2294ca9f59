"""Image replay: M stored training images join each later step's stream.

The stored images are relabelled with the current step's label map, so the old objects in them
are background there (DKD-M's masking; METHOD.md §3.1).
"""

from eir.methods.base import frozen
from eir.methods.bce_distillation import NO_EXTRAS, BceDistillation


class ImageReplay(BceDistillation):
    name = "image_replay"
    presets = frozen({**NO_EXTRAS, "memory.kind": "images", "loss.rskd_weight": 0.0})
