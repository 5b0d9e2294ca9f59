"""The memory a step leaves for the next one: an instance store (EIR) or an image store (image replay).

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
from eir.data.ingest import Manifest, read_rows
from eir.replay.image_store import ImageStore, build_image_store
from eir.replay.store import InstanceStore, build_store
from eir.storage import Location
from eir.train.planner import MemorySpec

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


def build_memory(
    manifest: Manifest,
    ids: list[str],
    spec: MemorySpec,
    previous: InstanceStore | ImageStore | None,
    step_dir: Location,
) -> dict[str, Any]:
    """Extract and select the step's memory from its rows `ids`, write it, and return a summary for logs/MLflow."""
    rows = read_rows(manifest, ids).to_pylist()
    step = spec.step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if spec.kind == "instances":
            store, report = build_store(
                rows,
                spec.classes,
                rule=spec.instance_rule,
                min_area=spec.min_area,
                step=step,
                size=spec.size,
                previous=previous,
                seed=spec.seed,
            )
            summary = {"stored": len(store), "candidates_per_class": report.candidates_per_class}
        else:
            store = build_image_store(rows, spec.classes, spec.size, previous, seed=spec.seed, step=step)
            summary = {"stored": len(store)}
    for warning in caught:
        log.warning("step %d memory: %s", step, warning.message)
    summary["notes"] = [str(w.message) for w in caught]
    summary["histogram"] = store.class_histogram()
    summary["bytes"] = store.nbytes
    store.write(memory_file(step_dir, spec.kind))
    log.info(
        "step %d: stored %d %s (memory.size %d), per class %s",
        step,
        len(store),
        spec.kind,
        spec.size,
        summary["histogram"],
    )
    return summary
