"""The memory a step leaves for the next one: an instance store (EIR) or an image store (DKD-M).

Built on the driver after step t from step t's own training rows, read without augmentation,
with the previous step's memory in the candidate pool (METHOD.md §3.1), and written next to
the step's model (`step_<t>/instances.parquet` or `step_<t>/images.parquet`) before the step is
marked complete, so a resumed run finds it or rebuilds it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from eir import storage
from eir.data.ingest import read_rows
from eir.replay.image_store import ImageStore, build_image_store
from eir.replay.store import InstanceStore, build_store
from eir.storage import Location

log = logging.getLogger(__name__)

FILES = {"instances": "instances.parquet", "images": "images.parquet"}


def memory_file(step_dir: Location, kind: str) -> Location:
    return step_dir.join(FILES[kind])


def load_memory(step_dir: Location, kind: str) -> InstanceStore | ImageStore | None:
    """Step t−1's memory, or None when the method keeps none."""
    if kind == "none":
        return None
    loc = memory_file(step_dir, kind)
    if not storage.exists(loc):
        raise FileNotFoundError(f"{loc.uri} is missing: step {step_dir.name} finished without its {kind} memory")
    return (InstanceStore if kind == "instances" else ImageStore).read(loc)


def build_memory(exp: Any, step: int, step_dir: Location, previous: InstanceStore | ImageStore | None) -> dict[str, Any]:
    """Extract and select step `step`'s memory, write it, and return a summary for logs/MLflow."""
    cfg = exp.config
    kind = cfg.memory.kind
    table = read_rows(exp.train_manifest, exp.train_splits.step_ids(step))
    rows = table.to_pylist()
    classes = exp.schedule.classes_learned(step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "instances":
            store, report = build_store(
                rows,
                classes,
                rule=cfg.memory.instance_rule,
                min_area=cfg.memory.min_area,
                step=step,
                budget=cfg.memory.size,
                previous=previous,
                seed=cfg.seed * 1000 + step,
            )
            summary = {"stored": len(store), "candidates_per_class": report.candidates_per_class}
        else:
            store = build_image_store(rows, classes, cfg.memory.size, previous, seed=cfg.seed * 1000 + step)
            summary = {"stored": len(store)}
    for warning in caught:
        log.warning("step %d memory: %s", step, warning.message)
    summary["notes"] = [str(w.message) for w in caught]
    summary["histogram"] = store.class_histogram()
    summary["bytes"] = store.nbytes
    store.write(memory_file(step_dir, kind))
    log.info("step %d: stored %d %s (budget %d), per class %s", step, len(store), kind, cfg.memory.size, summary["histogram"])
    return summary
