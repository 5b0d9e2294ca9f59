"""`launch.py prepare` and the top-level help, through the command line's own entry point.

In-process (`launch.main`), with the console captured: the same argument parsing, messages and exit
codes a user gets, without a Python start-up per call (tests/test_launch.py runs `launch.py` as a
subprocess where the process boundary itself is what is tested).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import launch as cli
from eir import storage
from eir.data.ingest import read_manifest


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def launch(*args: str) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse's --help and usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return Outcome(code, out.getvalue(), err.getvalue())


def test_prepare_synthetic_writes_both_splits(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    result = launch("prepare", "synthetic", "--num-images", "20", "--image-size", "48", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    # 20 images, 20% for val: 16 train rows, 4 val rows.
    assert lines[0].startswith(f"{out}/train: 16 rows, 1 shards, checksum ")
    assert lines[1].startswith(f"{out}/val: 4 rows, 1 shards, checksum ")
    assert (out / "raw" / "SYNTHETIC.json").is_file()
    train = read_manifest(storage.resolve(out / "train"))
    assert (train.split, train.num_rows) == ("train", 16)
    assert lines[0].endswith(train.checksum[:16])


def test_prepare_synthetic_replaces_a_different_dataset_only_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    small = ("prepare", "synthetic", "--num-images", "10", "--image-size", "48", "--out", str(out))
    assert launch(*small).returncode == 0
    bigger = ("prepare", "synthetic", "--num-images", "15", "--image-size", "48", "--out", str(out))
    refused = launch(*bigger)
    assert refused.returncode == 2 and f"error: {out / 'raw'} already exists" in refused.stderr
    assert "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads((out / "raw" / "SYNTHETIC.json").read_text())["num_images"] == 10  # untouched

    replaced = launch(*bigger, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((out / "raw" / "SYNTHETIC.json").read_text())["num_images"] == 15
    assert len(list((out / "raw" / "JPEGImages").iterdir())) == 15
    rows = [read_manifest(storage.resolve(out / split)).num_rows for split in ("train", "val")]
    assert sum(rows) == 15
    assert sorted(p.name for p in out.iterdir()) == ["raw", "train", "val"]  # no temp or old copy left


def test_prepare_with_a_missing_root_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "CamVid"
    result = launch("prepare", "camvid", "--root", str(missing), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"error: dataset root {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_help_exits_0() -> None:
    top = launch("--help")
    assert top.returncode == 0 and "prepare" in top.stdout and "run" in top.stdout
    sub = launch("prepare", "--help")
    assert sub.returncode == 0
    assert "--image-scale" in sub.stdout and "--overwrite" in sub.stdout and "synthetic" in sub.stdout
