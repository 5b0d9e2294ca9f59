"""Fine-tuning: the lower bound. Each step trains on its own labels only; nothing is kept."""

from eir.methods.base import frozen
from eir.methods.bce_distillation import NO_EXTRAS, BceDistillation


class Finetune(BceDistillation):
    name = "finetune"
    presets = frozen({**NO_EXTRAS, "loss.rskd_weight": 0.0})
