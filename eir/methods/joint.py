"""Joint training: the upper bound. One step over every class with complete labels."""

from eir.methods.base import frozen
from eir.methods.bce_distillation import NO_EXTRAS, BceDistillation


class Joint(BceDistillation):
    name = "joint"
    presets = frozen({**NO_EXTRAS, "loss.rskd_weight": 0.0})
    joint = True
