"""The image-replay baseline's memory (METHOD.md §4.1): M whole images and the step each was stored at.

The store keeps each chosen image's id, encoded image and canonical label bytes (the same
column names as an ingest row), so the step's pipeline treats a replayed image like any
other row, and the step at which the image was stored (`stored_step`). The store itself never
relabels: the stream gives each replayed row the look-up table of its storing step
(`replay.image_labels=stored`: the classes learned by then keep their labels, later ones are
background) or the current step's (`current`: DKD-M's masking, old objects are background);
the planner builds those tables.

An image carried over from the previous store keeps its storing step, so its labels never gain
classes the model learned after it was stored. An image that is both in the previous store and
among the step's own rows is a candidate of this step (one candidate, counted for the classes of
both) and is stored at this step, like every image this step stores.

Selection is class-balanced over images, where an image counts for every class it holds:
    candidates = one (image, class) pair per class of the step present in the image,
                 plus the previous store's images with the classes they were counted for;
    order      = `select_balanced` over all pairs, i.e. round-robin over shuffled classes,
                 each turn drawing a random unused image of that class;
    stored     = the first `size` (memory.size) distinct images in that order.
A turn that draws an image already stored (through another of its classes) adds nothing:
that image already holds the class, so the class has had its share for this turn. Class c's
turns end at the latest after `size` draws (they alone give `size` distinct images), so
keeping a uniform sample of `size` pairs per class (`ClassReservoirs`) selects with the
same distribution as keeping them all, and only those images' bytes are held.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from eir.replay.instances import ClassReservoirs, select_balanced
from eir.replay.store import ParquetStore
from eir.storage import Location

IMAGE_STORE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),  # the ingest row's encoded image, untouched
        ("label", pa.binary()),  # the ingest row's canonical label PNG, untouched
        # the classes the image was selected for; "element" is the list item name Parquet writes,
        # so a table read back is identical to the one written
        ("replay_classes", pa.list_(pa.field("element", pa.uint8()))),
        ("stored_step", pa.int16()),  # the step that stored the image; kept when a later store keeps it
    ]
)
STORED_STEP = "stored_step"


class ImageStore(ParquetStore):
    """The stored images of one step; rows in selection order."""

    SCHEMA = IMAGE_STORE_SCHEMA
    KIND = "image store"

    def __init__(self, table: pa.Table):
        if STORED_STEP not in table.schema.names:
            # Written before the storing step was recorded: an image carried over from an earlier
            # store cannot be told from one stored by the file's own step, so its labels are unknown.
            raise ValueError(
                f"{self.KIND} without the {STORED_STEP!r} column (written by an eir older than "
                "replay.image_labels): the step each image was stored at is unknown, so its labels "
                "cannot be rebuilt; rerun the step that wrote it and every step after"
            )
        super().__init__(table)

    @classmethod
    def read(cls, loc: Location) -> ImageStore:
        """The store in `loc`; a file that is not one names itself in the error."""
        try:
            return super().read(loc)
        except ValueError as exc:
            raise ValueError(f"{loc.uri}: {exc}") from exc

    def ids(self) -> list[str]:
        return [str(i) for i in self.table.column("id").to_pylist()]

    def rows(self) -> list[dict[str, Any]]:
        return self.table.to_pylist()

    def stored_steps(self) -> list[int]:
        return [int(s) for s in self.table.column(STORED_STEP).to_pylist()]

    def class_histogram(self) -> dict[int, int]:
        """Stored images per class they count for (an image counts for each of its classes)."""
        counts = Counter(int(c) for classes in self.table.column("replay_classes").to_pylist() for c in classes)
        return dict(sorted(counts.items()))


class _Pair(NamedTuple):
    class_id: int
    image_id: str


class _Pool:
    """Candidate images, holding the bytes only of those some class's reservoir still keeps."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.reservoirs: ClassReservoirs[_Pair] = ClassReservoirs(size, rng)
        self.rows: dict[str, dict[str, Any]] = {}
        self.refs: Counter[str] = Counter()
        self.offered: set[_Pair] = set()
        self.classes: dict[str, set[int]] = {}  # every candidate image's classes, kept or not

    def offer(self, row: dict[str, Any], classes: Iterable[int], stored_step: int) -> None:
        """Offer `row` for `classes`; its bytes and `stored_step` come from its first offer."""
        image_id = str(row["id"])
        classes = sorted({int(c) for c in classes})
        pairs = [_Pair(c, image_id) for c in classes if _Pair(c, image_id) not in self.offered]
        if not pairs:
            return
        # the same image may come twice (stored before and in this step's rows): one candidate
        self.classes.setdefault(image_id, set()).update(classes)
        self.rows.setdefault(
            image_id, {"id": image_id, "image": row["image"], "label": row["label"], STORED_STEP: stored_step}
        )
        self.offered.update(pairs)
        self.refs[image_id] += len(pairs)  # all before any release, so the row outlives the loop
        for pair in pairs:
            dropped = self.reservoirs.add(pair.class_id, pair)
            if dropped is not None:
                self._release(dropped.image_id)

    def _release(self, image_id: str) -> None:
        self.refs[image_id] -= 1
        if self.refs[image_id] == 0:
            del self.rows[image_id], self.refs[image_id]


def build_image_store(
    rows: Iterable[dict[str, Any]],
    classes_of_step: Iterable[int],
    size: int,
    previous: ImageStore | None,
    seed: int,
    *,
    step: int,
) -> ImageStore:
    """Choose `size` (memory.size) images class-balanced over the step's classes and the previous store's.

    `rows` are ingest rows of step `step` with 'id', 'image', 'label' bytes and 'classes' (the
    classes their label holds); a row counts for the classes of `classes_of_step` it holds and is
    stored at `step`. The previous store's images stay candidates, for the classes they were
    chosen for and with the step they were stored at. See the module doc for the selection; warns
    when fewer than `size` candidate images exist.
    """
    if size < 0:
        raise ValueError(f"memory.size={size}: expected a number of images >= 0")
    wanted = {int(c) for c in classes_of_step}
    rng = np.random.default_rng(seed)
    pool = _Pool(size, rng)
    for row in rows:
        for key in ("id", "image", "label", "classes"):
            if row.get(key) is None:
                raise ValueError(f"image store build: row {row.get('id')!r} lacks {key!r} (expected an ingest row)")
        pool.offer(row, wanted.intersection(int(c) for c in row["classes"]), step)
    # after the step's rows: an image in both is stored at this step (module doc)
    for row in previous.rows() if previous is not None else []:
        pool.offer(row, [int(c) for c in row["replay_classes"]], int(row[STORED_STEP]))

    pairs = pool.reservoirs.items()
    chosen: dict[str, None] = {}  # insertion-ordered set
    for index in select_balanced(pairs, len(pairs), rng):
        if len(chosen) == size:
            break
        chosen.setdefault(pairs[index].image_id)
    if size > len(pool.classes):
        warnings.warn(
            f"memory.size={size} but only {len(pool.classes)} candidate images were found; stored {len(chosen)}",
            stacklevel=2,
        )
    stored = [{**pool.rows[i], "replay_classes": sorted(pool.classes[i])} for i in chosen]
    table = pa.Table.from_pylist(stored, schema=IMAGE_STORE_SCHEMA)
    return ImageStore(table)
