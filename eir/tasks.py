"""Continual-learning tasks: which classes each step learns, which images it sees, how labels are masked.

A *task* splits a dataset's classes 1..K into steps (METHOD.md §1). Everything the data layer
needs to know about a step is answered here, from class ids alone, so this module does no I/O
and is testable in milliseconds:

- which classes are new, old, seen or future at step t;
- whether an image (given the classes present in its label) is a training / test image of step t
  in the overlapped or disjoint setting;
- the 256-entry look-up tables that turn a canonical label map into the step's training label
  (the background shift: everything but C_t becomes 0) or test label (future classes become
  0 or ignore). A LUT is one `lut[label]` numpy gather — no per-pixel Python.

Class ids here are dataset label ids. The model's channels follow step order instead, so with a
class-order permutation a class id is not its channel: `eir.channels.ChannelSpace` maps one to
the other (a permutation only changes which step a class belongs to).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from eir.labels import IGNORE_LABEL

Setting = Literal["overlapped", "disjoint"]
SETTINGS: tuple[str, ...] = get_args(Setting)

DATASET_NUM_CLASSES: dict[str, int] = {"voc": 20, "ade20k": 150, "camvid": 11, "synthetic": 20}
# What unseen classes become in test labels: ADE20K ignores them, the others call them background.
DATASET_FUTURE_LABEL: dict[str, int] = {"voc": 0, "ade20k": IGNORE_LABEL, "camvid": 0, "synthetic": 0}

# The named tasks of each dataset (METHOD.md §1, §6). Any other valid "B-I" name builds too;
# the registry lists the benchmarks that experiments and tests refer to.
_REGISTRY_NAMES: dict[str, tuple[str, ...]] = {
    "voc": ("19-1", "15-5", "15-1", "10-1", "5-3", "10-5", "10-10", "2-2"),
    "ade20k": ("100-50", "100-10", "100-5", "50-50"),
    "camvid": ("6-5", "6-1", "5-3"),
    "synthetic": ("15-5", "15-1", "10-1", "5-3"),
}

_TASK_NAME = re.compile(r"([0-9]+)-([0-9]+)")


class TaskError(ValueError):
    """An invalid task definition or request; the message names the bad value and what is allowed."""


@dataclass(frozen=True)
class Task:
    """One continual-learning task: a sequence of disjoint class sets C_0, C_1, …, C_T.

    `steps` are normalised to sorted tuples of ints on construction and validated (non-empty,
    disjoint, within 1..K), so every other method can trust them.
    """

    dataset: str
    name: str
    setting: Setting
    steps: tuple[tuple[int, ...], ...]
    num_classes: int
    future_label: int

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise TaskError(f"unknown setting {self.setting!r}; expected one of {list(SETTINGS)}")
        if not _is_int(self.num_classes) or self.num_classes < 1:
            raise TaskError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if self.future_label not in (0, IGNORE_LABEL):
            raise TaskError(
                f"future_label must be 0 (future classes are background) or {IGNORE_LABEL} "
                f"(future classes are ignored), got {self.future_label!r}"
            )
        object.__setattr__(self, "steps", _normalise_steps(self.steps, int(self.num_classes)))

    @property
    def num_steps(self) -> int:
        """T + 1: the number of steps, base step included."""
        return len(self.steps)

    def classes_learned(self, step: int) -> tuple[int, ...]:
        """C_t: the classes that are new at `step`."""
        return self.steps[self._check_step(step)]

    def classes_seen(self, step: int) -> tuple[int, ...]:
        """C_0 ∪ … ∪ C_t, sorted; background 0 is not included."""
        self._check_step(step)
        return tuple(sorted(c for s in self.steps[: step + 1] for c in s))

    def old_classes(self, step: int) -> tuple[int, ...]:
        """C_0 ∪ … ∪ C_{t-1}, sorted; empty at step 0."""
        self._check_step(step)
        return tuple(sorted(c for s in self.steps[:step] for c in s))

    def future_classes(self, step: int) -> tuple[int, ...]:
        """Classes of 1..K not seen by `step` (including any that no step learns)."""
        seen = set(self.classes_seen(step))
        return tuple(c for c in range(1, self.num_classes + 1) if c not in seen)

    def keeps_train_image(self, step: int, classes_present: Iterable[int]) -> bool:
        """Whether an image with these label values is a training image of `step`.

        Overlapped: it holds a pixel of C_t. Disjoint: additionally, nothing outside
        C_seen ∪ {0, 255} (no future class), so future objects never appear as background.
        """
        present = _as_int_set(classes_present)
        if present.isdisjoint(self.classes_learned(step)):
            return False
        if self.setting == "overlapped":
            return True
        allowed = set(self.classes_seen(step)) | {0, IGNORE_LABEL}
        return present <= allowed

    def keeps_test_image(self, step: int, classes_present: Iterable[int]) -> bool:
        """Whether an image is a test image of `step`: it holds any class seen so far."""
        return not _as_int_set(classes_present).isdisjoint(self.classes_seen(step))

    def train_lut(self, step: int) -> np.ndarray:
        """256-entry uint8 LUT for step-t training labels: C_t and 255 kept, all else → 0.

        Old and future classes become background — the background shift of METHOD.md §1.
        """
        lut = np.zeros(256, dtype=np.uint8)
        learned = list(self.classes_learned(step))
        lut[learned] = learned
        lut[IGNORE_LABEL] = IGNORE_LABEL
        return lut

    def test_lut(self, step: int) -> np.ndarray:
        """256-entry uint8 LUT for step-t test labels.

        0, C_seen and 255 keep their ids; future classes become `future_label`. Ids above K
        (never produced by a valid reader) become 255 so they can never enter a metric.
        """
        lut = np.full(256, IGNORE_LABEL, dtype=np.uint8)
        seen = [0, *self.classes_seen(step)]
        lut[seen] = seen
        lut[list(self.future_classes(step))] = self.future_label
        return lut

    def joint(self) -> Task:
        """The joint-training upper bound: one step with every class this task learns."""
        every = tuple(sorted(c for s in self.steps for c in s))
        return Task(self.dataset, "joint", self.setting, (every,), self.num_classes, self.future_label)

    def describe(self) -> list[dict]:
        """One row per step for tables and logs: step, its new classes, how many are seen."""
        return [
            {"step": t, "classes": list(s), "num_classes_seen": len(self.classes_seen(t))}
            for t, s in enumerate(self.steps)
        ]

    def _check_step(self, step: int) -> int:
        if not _is_int(step) or not 0 <= step < self.num_steps:
            raise TaskError(
                f"step {step!r} out of range for task {self.dataset} {self.name} (expected 0..{self.num_steps - 1})"
            )
        return int(step)


def parse_task_name(name: str) -> tuple[int, int]:
    """Split a "B-I" task name into (base classes B, classes per incremental step I)."""
    match = _TASK_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise TaskError(
            f"malformed task name {name!r}; expected 'B-I' with B base classes and I classes per step, e.g. '15-1'"
        )
    base, increment = int(match.group(1)), int(match.group(2))
    if base < 1:
        raise TaskError(f"task {name!r}: base B must be >= 1, got {base}")
    if increment < 1:
        raise TaskError(f"task {name!r}: increment I must be >= 1, got {increment}")
    return base, increment


def get_task(
    dataset: str,
    name: str,
    setting: Setting = "overlapped",
    *,
    num_classes: int | None = None,
    class_order: Sequence[int] | None = None,
    future_label: int | None = None,
) -> Task:
    """Build the "B-I" task `name` on `dataset`.

    Known datasets take K from `DATASET_NUM_CLASSES`; any other dataset needs `num_classes`.
    Steps take classes in `class_order` (a permutation of 1..K; default 1..K): the first B
    form step 0, then I per step. (K − B) must be a multiple of I — a ragged last step is
    not a convention of any benchmark, so it is refused rather than guessed.
    """
    k = _resolve_num_classes(dataset, num_classes)
    base, increment = parse_task_name(name)
    if base >= k:
        raise TaskError(
            f"task {name!r} on {dataset}: base B={base} must be < K={k} so that at least one "
            "incremental step remains (use Task.joint() for joint training)"
        )
    if (k - base) % increment:
        valid = [i for i in range(1, k - base + 1) if (k - base) % i == 0]
        raise TaskError(
            f"task {name!r} on {dataset}: the {k - base} classes after the {base} base classes "
            f"do not split into steps of {increment}; valid increments for base {base}: {valid}"
        )
    order = _check_class_order(class_order, k) if class_order is not None else list(range(1, k + 1))
    steps = [tuple(order[:base])]
    steps += [tuple(order[i : i + increment]) for i in range(base, k, increment)]
    return task_from_steps(dataset, steps, setting, k, future_label, name=name)


def task_from_steps(
    dataset: str,
    steps: Sequence[Iterable[int]],
    setting: Setting = "overlapped",
    num_classes: int | None = None,
    future_label: int | None = None,
    *,
    name: str = "custom",
) -> Task:
    """Build a task from explicit class sets per step (validated: non-empty, disjoint, in 1..K).

    Steps need not cover all of 1..K; classes no step learns stay future at every step.
    """
    k = _resolve_num_classes(dataset, num_classes)
    if future_label is None:
        future_label = DATASET_FUTURE_LABEL.get(dataset, 0)
    return Task(dataset, name, setting, tuple(tuple(s) for s in steps), k, future_label)


def step_image_counts(task: Task, classes_per_image: Sequence[Iterable[int]]) -> list[int]:
    """How many training images each step keeps, given each image's label values."""
    present = [_as_int_set(c) for c in classes_per_image]
    return [sum(task.keeps_train_image(t, p) for p in present) for t in range(task.num_steps)]


def check_step_sizes(task: Task, counts: Sequence[int], *, min_images: int = 1, warn_below: int = 10) -> list[str]:
    """Refuse steps with fewer than `min_images` training images; warn below `warn_below`.

    An empty step (e.g. disjoint CamVid, where every class is in most images) would train
    on nothing and report meaningless numbers, so it fails before any compute is spent.
    Returns the warning messages (also issued through `warnings.warn`).
    """
    if len(counts) != task.num_steps:
        raise TaskError(
            f"got {len(counts)} image counts for task {task.dataset} {task.name}, which has {task.num_steps} steps"
        )
    label = f"task {task.dataset} {task.name} ({task.setting})"
    too_few = [
        f"step {t} (classes {list(task.steps[t])}) has {n} training images"
        for t, n in enumerate(counts)
        if n < min_images
    ]
    if too_few:
        hint = "; the overlapped setting keeps more images" if task.setting == "disjoint" else ""
        raise TaskError(f"{label}: " + "; ".join(too_few) + f" (need at least {min_images}){hint}")
    messages = [
        f"{label}: step {t} (classes {list(task.steps[t])}) has only {n} training images (fewer than {warn_below})"
        for t, n in enumerate(counts)
        if n < warn_below
    ]
    for message in messages:
        warnings.warn(message, stacklevel=2)
    return messages


def _resolve_num_classes(dataset: str, num_classes: int | None) -> int:
    known = DATASET_NUM_CLASSES.get(dataset)
    if known is None:
        if num_classes is None:
            raise TaskError(
                f"unknown dataset {dataset!r}: pass num_classes, or use one of {sorted(DATASET_NUM_CLASSES)}"
            )
        if not _is_int(num_classes) or num_classes < 1:
            raise TaskError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        return int(num_classes)
    if num_classes is not None and num_classes != known:
        raise TaskError(f"dataset {dataset!r} has {known} classes, but num_classes={num_classes} was given")
    return known


def _check_class_order(class_order: Sequence[int], k: int) -> list[int]:
    """A class order must be a permutation of 1..K; the error names what is wrong."""
    order = list(class_order)
    non_int = [c for c in order if not _is_int(c)]
    if non_int:
        raise TaskError(f"class_order holds non-integer ids {non_int}; expected a permutation of 1..{k}")
    order = [int(c) for c in order]
    problems = []
    out_of_range = sorted({c for c in order if not 1 <= c <= k})
    duplicates = sorted({c for c in order if order.count(c) > 1})
    missing = sorted(set(range(1, k + 1)) - set(order))
    if out_of_range:
        problems.append(f"out-of-range ids {out_of_range}")
    if duplicates:
        problems.append(f"duplicate ids {duplicates}")
    if missing:
        problems.append(f"missing ids {missing}")
    if problems:
        raise TaskError(f"class_order is not a permutation of 1..{k}: " + ", ".join(problems))
    return order


def _normalise_steps(steps: Iterable[Iterable[int]], k: int) -> tuple[tuple[int, ...], ...]:
    """Sorted int tuples per step; steps must be non-empty, disjoint and within 1..K."""
    result: list[tuple[int, ...]] = []
    owner: dict[int, int] = {}
    for t, step in enumerate(steps):
        classes = list(step)
        if not classes:
            raise TaskError(f"step {t} has no classes; every step must learn at least one class")
        bad = [c for c in classes if not _is_int(c) or not 1 <= c <= k]
        if bad:
            raise TaskError(f"step {t} holds class ids {bad} outside 1..{k}")
        for c in map(int, classes):
            if c in owner:
                where = "twice in that step" if owner[c] == t else f"already in step {owner[c]}"
                raise TaskError(f"class {c} of step {t} is {where}; steps must be disjoint")
            owner[c] = t
        result.append(tuple(sorted(int(c) for c in classes)))
    if not result:
        raise TaskError("a task needs at least one step")
    return tuple(result)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _as_int_set(values: Iterable[int]) -> set[int]:
    return {int(v) for v in values}


TASKS: dict[str, dict[str, tuple[tuple[int, ...], ...]]] = {
    dataset: {name: get_task(dataset, name).steps for name in names} for dataset, names in _REGISTRY_NAMES.items()
}
