"""Enhanced Instance Replay's pure core (METHOD.md §3.1–3.3): instance extraction, the Arrow
instance store, the image-replay baseline's store and the per-image paste.

The modules re-exported here import no Ray: they run inside Ray Data workers, the step driver and
(`apply_paste`, torch) the trainer, and are unit-tested in milliseconds.
"""

from eir.replay.image_store import ImageStore, build_image_store
from eir.replay.instances import ClassReservoirs, Instance, extract_instances, select_balanced
from eir.replay.paste import (
    PasteConfig,
    ScaledInstances,
    apply_paste,
    index_by_channel,
    plan_paste,
    potential_classes,
    rank_cells,
)
from eir.replay.store import InstanceStore, StoreReport, build_store

__all__ = [
    "ClassReservoirs",
    "ImageStore",
    "Instance",
    "InstanceStore",
    "PasteConfig",
    "ScaledInstances",
    "StoreReport",
    "apply_paste",
    "build_image_store",
    "build_store",
    "extract_instances",
    "index_by_channel",
    "plan_paste",
    "potential_classes",
    "rank_cells",
    "select_balanced",
]
