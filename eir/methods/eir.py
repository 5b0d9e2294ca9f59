"""Enhanced Instance Replay (METHOD.md §3): instance replay, pseudo-labels, pasting, and RSKD.

`eir_no_rskd` is the ablation without the distillation term.
"""

from eir.methods.base import frozen
from eir.methods.bce_distillation import BceDistillation

EIR_EXTRAS = {"memory.kind": "instances", "pseudo.enabled": True, "paste.enabled": True, "replay.ratio": None}


class Eir(BceDistillation):
    name = "eir"
    presets = frozen({**EIR_EXTRAS, "loss.rskd_weight": 5.0})


class EirNoRskd(BceDistillation):
    name = "eir_no_rskd"
    presets = frozen({**EIR_EXTRAS, "loss.rskd_weight": 0.0})
