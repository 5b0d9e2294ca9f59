"""Which prepared rows each step trains and tests on, written once per (dataset, task, setting).

The choice follows METHOD.md §1 from the `classes` column alone. Splits are deterministic (rows
keep the manifest's order) and written as a JSON file keyed by the dataset's content checksum,
the task and the setting, with a checksum of their own that every run logs: two runs that log
the same split checksum trained on the same images.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from eir import storage
from eir.data.ingest import Manifest, read_metadata
from eir.storage import Location
from eir.tasks import Task, check_step_sizes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepSplits:
    """Training ids per step (and the test ids per step, when computed on a test manifest)."""

    dataset_checksum: str
    task_key: str
    ids: tuple[tuple[str, ...], ...]
    checksum: str

    def step_ids(self, step: int) -> list[str]:
        return list(self.ids[step])

    @property
    def counts(self) -> list[int]:
        return [len(step) for step in self.ids]


def task_key(task: Task) -> str:
    """A file-name-safe identity of a task: name, setting and (if permuted) its class order."""
    steps = json.dumps([list(s) for s in task.steps])
    return f"{task.name}-{task.setting}-{hashlib.sha256(steps.encode()).hexdigest()[:8]}"


def select_ids(task: Task, manifest: Manifest, *, purpose: str) -> list[list[str]]:
    """Per step, the ids of the rows the step uses: `purpose` is "train" or "test"."""
    meta = read_metadata(manifest)
    ids = meta.column("id").to_pylist()
    classes = meta.column("classes").to_pylist()
    keep = task.keeps_train_image if purpose == "train" else task.keeps_test_image
    return [[i for i, present in zip(ids, classes) if keep(step, present)] for step in range(task.num_steps)]


def _checksum(dataset_checksum: str, key: str, ids: list[list[str]]) -> str:
    payload = json.dumps({"dataset": dataset_checksum, "task": key, "ids": ids})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _stored(loc: Location, num_steps: int) -> dict[str, Any] | None:
    """The split file at `loc` if it is there and intact; a damaged one is reported and recomputed.

    An intact one is the source of truth (its ids are used as recorded); a damaged one holds
    nothing the manifest and the task do not determine, so writing it again loses nothing.
    """
    if not storage.exists(loc):
        return None
    try:
        data = storage.read_json(loc)
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        problem = f"not JSON ({exc})"
    else:
        ids = data.get("ids") if isinstance(data, dict) else None
        if not (
            isinstance(ids, list)
            and len(ids) == num_steps
            and all(isinstance(step, list) and all(isinstance(i, str) for i in step) for step in ids)
        ):
            problem = f'expected {num_steps} lists of ids under "ids"'
        elif not isinstance(data.get("checksum"), str):
            problem = 'no "checksum"'
        else:
            return data
    log.warning("split file %s is damaged (%s): computing it again", loc.uri, problem)
    return None


def step_splits(task: Task, manifest: Manifest, output_root: Location, *, purpose: str = "train") -> StepSplits:
    """Load the split file for this dataset/task, or compute, check and write it.

    Training splits are checked: a step with no images is an error naming the step and its count
    (e.g. disjoint CamVid), a step with very few is a warning. The check runs on a loaded file
    too, so every run that trains on a thin step says so, not only the first.
    """
    key = task_key(task)
    loc = output_root.join("splits", manifest.checksum[:16], f"{key}-{purpose}.json")
    data = _stored(loc, task.num_steps)
    cached = data is not None
    ids = data["ids"] if cached else select_ids(task, manifest, purpose=purpose)
    if purpose == "train":
        check_step_sizes(task, [len(step) for step in ids])
    if not cached:
        data = {
            "dataset": manifest.dataset,
            "split": manifest.split,
            "dataset_checksum": manifest.checksum,
            "task": task.name,
            "setting": task.setting,
            "steps": [list(s) for s in task.steps],
            "purpose": purpose,
            "counts": [len(step) for step in ids],
            "ids": ids,
            "checksum": _checksum(manifest.checksum, key, ids),
        }
        storage.write_json_atomic(loc, data)
        log.info("wrote %s split %s: images per step %s", purpose, loc.uri, data["counts"])
    return StepSplits(
        dataset_checksum=manifest.checksum,
        task_key=key,
        ids=tuple(tuple(step) for step in ids),
        checksum=data["checksum"],
    )
