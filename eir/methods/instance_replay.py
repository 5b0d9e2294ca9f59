"""Instance replay: stored old-class instances are replayed on a neutral background (METHOD.md §3.2),
every stored instance once per epoch by default, without pasting, pseudo-labels or distillation."""

from eir.methods.base import frozen
from eir.methods.bce_distillation import NO_EXTRAS, BceDistillation


class InstanceReplay(BceDistillation):
    name = "instance_replay"
    presets = frozen({**NO_EXTRAS, "memory.kind": "instances", "replay.ratio": None, "loss.rskd_weight": 0.0})
