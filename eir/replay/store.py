"""The instance memory as a self-contained Arrow table (METHOD.md §3.1).

Every stored instance carries its class, the PNG of its bounding box, the PNG of its mask,
the bbox and where it came from, so any node can replay it without the original dataset.
The store travels as Parquet bytes: written once per step under the run directory, and put
once into Ray's object store for the data workers, which decode it once per process.

Building the store for step t+1 at the end of step t:
    candidates = instances of the step's classes in its training images (un-augmented)
               + every instance of step t's store (the previous memory stays in the pool)
    stored     = class-balanced selection of `size` of them (`select_balanced`, `size` = memory.size).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eir import storage
from eir.data.codec import decode_map, decode_rgb, encode_png
from eir.replay.instances import ClassReservoirs, DecodedInstance, Instance, extract_instances, select_balanced
from eir.storage import Location

INSTANCE_SCHEMA = pa.schema(
    [
        ("class_id", pa.uint8()),
        ("crop", pa.binary()),  # PNG, RGB pixels of the bbox
        ("mask", pa.binary()),  # PNG, mode L, 255 inside the object, 0 outside
        ("y0", pa.int32()),
        ("x0", pa.int32()),
        ("y1", pa.int32()),
        ("x1", pa.int32()),
        ("source_id", pa.string()),
        ("step", pa.int16()),
    ]
)


S = TypeVar("S", bound="ParquetStore")


class ParquetStore:
    """An Arrow table with a fixed schema that moves as Parquet bytes or one Parquet file.

    Subclasses set `SCHEMA` and `KIND` (the word used in error messages).
    """

    SCHEMA: ClassVar[pa.Schema]
    KIND: ClassVar[str]

    def __init__(self, table: pa.Table):
        if not table.schema.equals(self.SCHEMA):
            raise ValueError(f"{self.KIND} table has schema\n{table.schema}\nexpected\n{self.SCHEMA}")
        self.table = table

    @classmethod
    def empty(cls: type[S]) -> S:
        return cls(cls.SCHEMA.empty_table())

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def nbytes(self) -> int:
        """Bytes of the in-memory table (what each data worker holds before decoding)."""
        return self.table.nbytes

    def to_bytes(self) -> bytes:
        """The table as Parquet bytes; the crops are PNG already, so no Parquet compression."""
        buffer = io.BytesIO()
        pq.write_table(self.table, buffer, compression="none")
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls: type[S], data: bytes) -> S:
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"not a Parquet {cls.KIND}: {exc}") from exc
        return cls(table.replace_schema_metadata(None))

    def write(self, loc: Location) -> None:
        """Atomic: a reader sees the previous file or the whole new one, never a torn write."""
        storage.write_bytes_atomic(loc, self.to_bytes())

    @classmethod
    def read(cls: type[S], loc: Location) -> S:
        if not storage.exists(loc):
            raise FileNotFoundError(
                f"no {cls.KIND} at {loc.uri}: it is written at the end of the previous step; "
                "run (or resume) that step first"
            )
        return cls.from_bytes(storage.read_bytes(loc))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle only the table: decoded caches are rebuilt where they are used."""
        return {"table": self.table}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.table = state["table"]


class InstanceStore(ParquetStore):
    """The stored instances of one step; rows in selection order."""

    SCHEMA = INSTANCE_SCHEMA
    KIND = "instance store"

    def __init__(self, table: pa.Table):
        super().__init__(table)
        self._decoded: list[DecodedInstance] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._decoded = None

    @classmethod
    def from_instances(cls, instances: Iterable[Instance]) -> InstanceStore:
        rows = [
            {
                "class_id": inst.class_id,
                "crop": encode_png(np.ascontiguousarray(inst.crop)),
                "mask": encode_png(inst.mask.astype(np.uint8) * 255),
                "y0": inst.bbox[0],
                "x0": inst.bbox[1],
                "y1": inst.bbox[2],
                "x1": inst.bbox[3],
                "source_id": inst.source_id,
                "step": inst.step,
            }
            for inst in instances
        ]
        return cls(pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA))

    def class_ids(self) -> np.ndarray:
        return self.table.column("class_id").to_numpy(zero_copy_only=False).astype(np.int64)

    def classes(self) -> list[int]:
        return sorted(int(c) for c in np.unique(self.class_ids()))

    def class_histogram(self) -> dict[int, int]:
        values, counts = np.unique(self.class_ids(), return_counts=True)
        return {int(v): int(n) for v, n in zip(values, counts)}

    def indices_of(self, class_id: int) -> np.ndarray:
        return np.flatnonzero(self.class_ids() == int(class_id))

    def instance(self, i: int) -> Instance:
        if not 0 <= i < len(self):
            raise IndexError(f"instance {i} of an {self.KIND} holding {len(self)}")
        row = self.table.slice(i, 1).to_pylist()[0]
        return Instance(
            class_id=int(row["class_id"]),
            crop=decode_rgb(row["crop"]),
            mask=decode_map(row["mask"]) > 127,
            bbox=(row["y0"], row["x0"], row["y1"], row["x1"]),
            source_id=row["source_id"],
            step=int(row["step"]),
        )

    def instances(self) -> list[Instance]:
        return [self.instance(i) for i in range(len(self))]

    def decoded(self) -> list[DecodedInstance]:
        """(class_id, crop, mask) of every instance, decoded on first use and cached: a data
        worker pays the PNG decoding once per process, not once per pasted image."""
        if self._decoded is None:
            self._decoded = [(inst.class_id, inst.crop, inst.mask) for inst in self.instances()]
        return self._decoded


@dataclass
class StoreReport:
    """What a store build found and kept, per class; logged with the step."""

    candidates_per_class: dict[int, int]  # new candidates + previous store's instances
    stored_per_class: dict[int, int]
    size: int  # memory.size: the instances it was asked to keep
    stored: int
    from_previous: int = 0  # stored instances that were already in the previous store
    notes: list[str] = field(default_factory=list)


def _row_instances(
    rows: Iterable[dict[str, Any]], classes: list[int], rule: str, min_area: float, step: int
) -> Iterator[Instance]:
    for row in rows:
        for key in ("id", "image", "label"):
            if row.get(key) is None:
                raise ValueError(f"store build: row {row.get('id')!r} lacks {key!r} (expected an ingest row)")
        instances_map = decode_map(row["instances"]) if row.get("instances") is not None else None
        yield from extract_instances(
            decode_rgb(row["image"]),
            decode_map(row["label"]),
            instances_map,
            classes,
            rule=rule,
            min_area=min_area,
            source_id=str(row["id"]),
            step=step,
        )


def _histogram(class_ids: Iterable[int]) -> dict[int, int]:
    values, counts = np.unique(np.fromiter(class_ids, dtype=np.int64), return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts)}


def build_store(
    rows: Iterable[dict[str, Any]],
    classes: Iterable[int],
    *,
    rule: str,
    min_area: float,
    step: int,
    size: int,
    previous: InstanceStore | None,
    seed: int,
) -> tuple[InstanceStore, StoreReport]:
    """Extract, pool with the previous memory, select `size` (memory.size) class-balanced (METHOD.md §3.1).

    `rows` are ingest rows (dicts with 'id', 'image', 'label' and optionally 'instances'
    bytes; label in canonical class ids), read once and decoded without augmentation;
    `classes` are the classes whose instances are extracted from them (the step's own). Every
    instance of `previous` joins the candidate pool. Only a uniform sample of `size`
    candidates per class is held (`ClassReservoirs`), so the build's memory does not grow with
    the number of images. Stored instances come in selection order. Warns when `size`
    exceeds the candidates found.
    """
    if size < 0:
        raise ValueError(f"memory.size={size}: expected a number of instances >= 0")
    rng = np.random.default_rng(seed)
    pool: ClassReservoirs[tuple[Instance, bool]] = ClassReservoirs(size, rng)
    for instance in _row_instances(rows, sorted({int(c) for c in classes}), rule, min_area, step):
        pool.add(instance.class_id, (instance, False))
    for instance in previous.instances() if previous is not None else []:
        pool.add(instance.class_id, (instance, True))
    items = pool.items()
    chosen = [items[i] for i in select_balanced([inst for inst, _ in items], size, rng)]
    found = sum(pool.seen.values())
    report = StoreReport(
        candidates_per_class=dict(sorted(pool.seen.items())),
        stored_per_class=_histogram(inst.class_id for inst, _ in chosen),
        size=size,
        stored=len(chosen),
        from_previous=sum(1 for _, from_previous in chosen if from_previous),
    )
    if size > found:
        message = f"memory.size={size} but only {found} instances were found; stored {len(chosen)}"
        report.notes.append(message)
        warnings.warn(message, stacklevel=2)
    return InstanceStore.from_instances(inst for inst, _ in chosen), report
