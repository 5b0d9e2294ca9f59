"""Enhanced Instance Replay's pure core (METHOD.md §3.1–3.3): instance extraction, the Arrow
instance store, the image-replay baseline's store and the per-image paste.

The modules re-exported here import neither Ray nor torch: they run inside Ray Data workers
and the step driver, and are unit-tested in milliseconds.
"""

from eir.replay.image_store import ImageStore, build_image_store
from eir.replay.instances import ClassReservoirs, Instance, extract_instances, select_balanced
from eir.replay.paste import PasteConfig, index_by_channel, paste_instances, potential_classes, rank_cells
from eir.replay.store import InstanceStore, StoreReport, build_store

__all__ = [
    "ClassReservoirs",
    "ImageStore",
    "Instance",
    "InstanceStore",
    "PasteConfig",
    "StoreReport",
    "build_image_store",
    "build_store",
    "extract_instances",
    "index_by_channel",
    "paste_instances",
    "potential_classes",
    "rank_cells",
    "select_balanced",
]
