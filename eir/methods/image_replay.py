"""Image replay: M stored training images join each later step's stream (METHOD.md §4.1).

A stored image keeps the labels of the classes the model had learned when the image was stored;
classes learned after that are background in it (`replay.image_labels=stored`, the preset): the
partial annotation a fair image replay has. `replay.image_labels=current` relabels the stored
images with the current step's classes only, so their old objects are background (DKD-M's
masking): under this BCE over every channel that teaches "old class = background", which is why
DKD-M pairs it with a BCE over the new channels only. The loss is the family's BCE; replayed
images keep their own labels whatever `pseudo.enabled` says, unless `replay.pseudo_label=true` asks
for them to be pseudo-labelled too (classes learned after an image was stored can then gain labels).
"""

from eir.methods.base import frozen
from eir.methods.bce_distillation import NO_EXTRAS, BceDistillation


class ImageReplay(BceDistillation):
    name = "image_replay"
    presets = frozen({**NO_EXTRAS, "memory.kind": "images", "replay.image_labels": "stored", "loss.rskd_weight": 0.0})
