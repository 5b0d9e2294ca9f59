"""`memory_store`: what the instance store costs against the image-replay store at the same memory.size.

For M = 25, 50, 100, 200 on CamVid (train, step 0 of 5-3) and synthetic (step 0 of 15-1): bytes on
disk (Parquet) and in memory (Arrow), write and read time of both stores. Key:
`store_vs_images_at_100` = instance-store bytes / image-store bytes on disk, CamVid, M = 100.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from eir import storage
from eir.bench.common import environment, results_path, write_results
from eir.config import load_config
from eir.data.ingest import read_rows
from eir.replay.image_store import ImageStore, build_image_store
from eir.replay.store import InstanceStore, build_store
from eir.train.resolved import resolve
from eir.visualize import plt, save_figure

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
SETTINGS = {
    "camvid": ("experiments/camvid_5-3.yaml", []),
    "synthetic": ("experiments/synthetic_15-1.yaml", []),
}


def _timed_roundtrip(store: Any, cls: type, folder: Path, name: str) -> dict[str, float]:
    loc = storage.resolve(folder / f"{name}.parquet")
    started = time.perf_counter()
    store.write(loc)
    written = time.perf_counter() - started
    started = time.perf_counter()
    cls.read(loc)
    read = time.perf_counter() - started
    return {"disk_bytes": Path(loc.path).stat().st_size, "ram_bytes": store.nbytes, "write_s": written, "read_s": read}


def run_memory_store(quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    sizes = [25, 100] if quick else [25, 50, 100, 200]  # memory.size M
    results: dict[str, list[dict[str, Any]]] = {}
    for dataset, (config_path, extra) in SETTINGS.items():
        config = load_config(REPO / config_path, [*extra, *(overrides or [])])
        exp = resolve(config, progress=False)
        rows = read_rows(exp.train_manifest, exp.train_splits.step_ids(0)).to_pylist()
        classes = exp.schedule.classes_learned(0)
        results[dataset] = []
        with tempfile.TemporaryDirectory() as folder:
            for size in sizes:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    started = time.perf_counter()
                    instances, _ = build_store(
                        rows,
                        classes,
                        rule=config.memory.instance_rule,
                        min_area=config.memory.min_area,
                        step=0,
                        size=size,
                        previous=None,
                        seed=0,
                    )
                    build_instances = time.perf_counter() - started
                    started = time.perf_counter()
                    images = build_image_store(rows, classes, size, None, seed=0, step=0)
                    build_images = time.perf_counter() - started
                entry = {
                    "M": size,
                    "instances": {
                        "stored": len(instances),
                        "build_s": build_instances,
                        **_timed_roundtrip(instances, InstanceStore, Path(folder), f"inst{size}"),
                    },
                    "images": {
                        "stored": len(images),
                        "build_s": build_images,
                        **_timed_roundtrip(images, ImageStore, Path(folder), f"img{size}"),
                    },
                }
                entry["disk_ratio"] = entry["instances"]["disk_bytes"] / entry["images"]["disk_bytes"]
                results[dataset].append(entry)
                print(
                    f"{dataset:9s} M={size:4d}  instances {entry['instances']['disk_bytes'] / 1e6:7.2f} MB "
                    f"({len(instances)})  images {entry['images']['disk_bytes'] / 1e6:7.2f} MB ({len(images)})  "
                    f"ratio {entry['disk_ratio']:.3f}"
                )
    camvid_100 = next(e for e in results["camvid"] if e["M"] == 100)
    document = {
        "benchmark": "memory_store",
        "quick": quick,
        "store_vs_images_at_100": round(camvid_100["disk_ratio"], 4),
        **environment(),
        "config": {"budgets": sizes, "settings": SETTINGS, "overrides": overrides or []},
        "results": results,
    }
    path = results_path("memory_store", quick)
    write_results(path, document)
    _plot(results, path.with_suffix(".png"))
    print(f"store_vs_images_at_100 = {document['store_vs_images_at_100']}  → {path}")
    return document


def _plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.4), squeeze=False)
    for ax, (dataset, entries) in zip(axes[0], results.items()):
        sizes = [e["M"] for e in entries]
        ax.plot(sizes, [e["instances"]["disk_bytes"] / 1e6 for e in entries], marker="o", label="instance store")
        ax.plot(sizes, [e["images"]["disk_bytes"] / 1e6 for e in entries], marker="s", label="image store")
        ax.set_title(f"{dataset}: memory on disk")
        ax.set_xlabel("memory.size M")
        ax.set_ylabel("MB")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
