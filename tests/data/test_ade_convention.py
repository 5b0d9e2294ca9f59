"""ADE20K's raw label 0 ("other") under both conventions of `dataset.ade_ignore_other` (METHOD.md §1.1).

On the 3 real ADEChallengeData2016 samples, from the config through ingest to the step's label
tables and the scores: DKD's convention (the default) trains raw 0 as background and scores it
among the old classes; `ade_ignore_other=true` (the project's former convention) ignores it. The
expected labels are computed here from the raw PNGs with numpy, never with the code's LUTs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eir import storage
from eir.config import ConfigError, ExperimentConfig, load_config
from eir.data import prepare
from eir.data.base import DatasetError, SegmentationReader
from eir.data.codec import decode_map
from eir.data.ingest import read_rows, source_fingerprint
from eir.data.prepare import ensure_prepared, find_prepared, prepare_split
from eir.metrics import reduce_scores
from eir.train.resolved import Experiment, resolve

SAMPLES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ade20k_samples" / "sampleData"
IDS = ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
STEP0 = range(1, 101)  # task 100-50: C_0 = 1..100, C_1 = 101..150
CONVENTIONS = pytest.mark.parametrize("ignore_other", [False, True], ids=["dkd", "ignore_other"])


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    """An ADEChallengeData2016 layout whose training and validation splits both hold the 3 samples."""
    if not SAMPLES.is_dir():
        pytest.skip(f"shared ADE20K samples {SAMPLES} are absent")
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for kind, suffix in (("images", ".jpg"), ("annotations", ".png")):
            folder = root / kind / split
            folder.mkdir(parents=True)
            for sample_id in IDS:
                (folder / f"{sample_id}{suffix}").symlink_to(SAMPLES.resolve() / kind / f"{sample_id}{suffix}")
    return root


def raw_label(sample_id: str) -> np.ndarray:
    return np.array(Image.open(SAMPLES / "annotations" / f"{sample_id}.png"))


def canonical(raw: np.ndarray, ignore_other: bool) -> np.ndarray:
    return np.where(raw == 0, 255, raw) if ignore_other else raw


def ade_config(root: Path, out: Path, ignore_other: bool) -> ExperimentConfig:
    return load_config(
        overrides=[
            "dataset.name=ade20k",
            f"dataset.root={root}",
            "dataset.train_split=training",
            "dataset.test_split=validation",
            "task.name=100-50",
            f"run.output_dir={out}",
            f"dataset.ade_ignore_other={str(ignore_other).lower()}",
        ]
    )


def resolved(root: Path, out: Path, ignore_other: bool) -> Experiment:
    with warnings.catch_warnings():  # 3 images per step: the thin-step warning is expected
        warnings.simplefilter("ignore")
        return resolve(ade_config(root, out, ignore_other), progress=False)


def ingested_labels(exp: Experiment) -> dict[str, np.ndarray]:
    rows = read_rows(exp.train_manifest).to_pylist()
    return {row["id"]: decode_map(row["label"]) for row in rows}


def test_every_sample_holds_raw_0() -> None:
    """The samples exercise the convention at all: each has "other" pixels, and one a step-1 class."""
    if not SAMPLES.is_dir():
        pytest.skip(f"shared ADE20K samples {SAMPLES} are absent")
    assert all((raw_label(i) == 0).any() for i in IDS)
    assert (raw_label("ADE_val_00000003") == 103).any()


@CONVENTIONS
def test_ingested_labels_follow_the_convention(ade_root: Path, tmp_path: Path, ignore_other: bool) -> None:
    exp = resolved(ade_root, tmp_path / "out", ignore_other)
    for manifest in (exp.train_manifest, exp.test_manifest):
        assert manifest.info.background_is_class is not ignore_other
        assert manifest.info.future_label == 255
    labels = ingested_labels(exp)
    assert sorted(labels) == IDS
    metadata = {row["id"]: row["classes"] for row in read_rows(exp.train_manifest).to_pylist()}
    for sample_id, label in labels.items():
        expected = canonical(raw_label(sample_id), ignore_other)
        np.testing.assert_array_equal(label, expected)
        assert metadata[sample_id] == np.unique(expected).tolist()
        assert (0 in metadata[sample_id]) is not ignore_other and (255 in metadata[sample_id]) is ignore_other


@CONVENTIONS
def test_the_steps_label_tables(ade_root: Path, tmp_path: Path, ignore_other: bool) -> None:
    """Training: C_t kept, other classes 0, raw 0 background (or ignored). Test: future classes ignored in both."""
    exp = resolved(ade_root, tmp_path / "out", ignore_other)
    other = 255 if ignore_other else 0
    step1 = range(101, 151)
    for sample_id, label in ingested_labels(exp).items():
        raw = raw_label(sample_id)
        is_other, in_step0, in_step1 = raw == 0, np.isin(raw, STEP0), np.isin(raw, step1)
        np.testing.assert_array_equal(
            exp.layout.train_lut(0)[label], np.where(in_step0, raw, np.where(is_other, other, 0))
        )
        np.testing.assert_array_equal(
            exp.layout.train_lut(1)[label], np.where(in_step1, raw, np.where(is_other, other, 0))
        )
        np.testing.assert_array_equal(
            exp.layout.test_lut(0)[label], np.where(in_step1, 255, np.where(is_other, other, raw))
        )
        np.testing.assert_array_equal(exp.layout.test_lut(1)[label], np.where(is_other, other, raw))


@CONVENTIONS
def test_class_0_enters_the_old_and_all_means_only_under_dkd(
    ade_root: Path, tmp_path: Path, ignore_other: bool
) -> None:
    """A model that predicts background everywhere, scored at step 0 as the experiment scores it."""
    exp = resolved(ade_root, tmp_path / "out", ignore_other)
    test_lut = exp.layout.test_lut(0)
    targets = np.concatenate([test_lut[label].ravel() for label in ingested_labels(exp).values()])
    targets = targets[targets != 255].astype(np.int64)
    size = 1 + len(STEP0)
    matrix = np.bincount(targets * size, minlength=size * size).reshape(size, size)  # prediction 0 everywhere
    old, new = exp.layout.groups(0)
    scores = reduce_scores(matrix, old, new, background_is_class=exp.train_manifest.info.background_is_class)

    present = sorted(set(np.unique(targets).tolist()) - {0})  # foreground classes in the test labels
    assert scores.mIoU_all_fg == scores.mIoU_old_fg == 0.0  # no foreground pixel is predicted
    if ignore_other:
        assert 0 not in scores.per_class_iou and not (targets == 0).any()
        assert scores.mIoU_all == scores.mIoU_all_fg == 0.0
    else:
        iou_0 = 100.0 * (targets == 0).sum() / targets.size  # every valid pixel is predicted 0
        assert scores.per_class_iou[0] == pytest.approx(iou_0) and iou_0 > 0
        assert scores.mIoU_all == scores.mIoU_old == pytest.approx(iou_0 / (1 + len(present)))


class _RefuseToRead:
    """Stands in for open_reader once everything is ingested: a decode would mean a cache miss."""

    def __call__(self, *args: object, **kwargs: object) -> SegmentationReader:
        raise AssertionError(f"open_reader{args} was called: the dataset cache missed")


def test_the_two_conventions_never_share_a_cache_entry(ade_root: Path, tmp_path: Path, monkeypatch) -> None:
    output_root = storage.resolve(tmp_path / "out")
    dkd = ensure_prepared("ade20k", str(ade_root), "validation", output_root, progress=False)
    assert find_prepared("ade20k", str(ade_root), "validation", output_root, ade_ignore_other=True) is None
    ignored = ensure_prepared("ade20k", str(ade_root), "validation", output_root, ade_ignore_other=True, progress=False)
    assert dkd.location != ignored.location and dkd.checksum != ignored.checksum
    assert dkd.source_fingerprint != ignored.source_fingerprint
    assert dkd.info.background_is_class and not ignored.info.background_is_class

    monkeypatch.setattr(prepare, "open_reader", _RefuseToRead())
    for setting, manifest in ((False, dkd), (True, ignored)):
        again = ensure_prepared(
            "ade20k", str(ade_root), "validation", output_root, ade_ignore_other=setting, progress=False
        )
        assert again.location == manifest.location
        found = find_prepared("ade20k", str(ade_root), "validation", output_root, ade_ignore_other=setting)
        assert found is not None and found.location == manifest.location


def test_fingerprints_key_the_convention_on_ade20k_only(ade_root: Path) -> None:
    """ADE20K's index keys changed with the convention (an older cache of ignored labels is never found for
    DKD's); every other dataset's keys are what they were, so their cache entries stay found."""
    split = "validation"
    before = {"dataset": "ade20k", "image_scale": 1.0}
    keys = {flag: prepare._fingerprint("ade20k", ade_root, split, 1.0, flag, []) for flag in (False, True)}
    assert len({*keys.values(), source_fingerprint(ade_root, split, before)}) == 3
    for dataset in ("voc", "camvid", "folder", "synthetic"):
        unchanged = source_fingerprint(ade_root, split, {"dataset": dataset, "image_scale": 1.0})
        for flag in (False, True):
            assert prepare._fingerprint(dataset, ade_root, split, 1.0, flag, []) == unchanged


def test_a_prepared_folder_of_the_other_convention_is_refused(ade_root: Path, tmp_path: Path) -> None:
    out = storage.resolve(tmp_path / "prepared" / "validation")
    prepare_split("ade20k", ade_root, "validation", out, progress=False)
    output_root = storage.resolve(tmp_path / "out")
    root = str(tmp_path / "prepared")
    assert ensure_prepared("ade20k", root, "validation", output_root).location == out
    with pytest.raises(DatasetError, match=r"as background class 0 .* dataset\.ade_ignore_other=true asks for the"):
        ensure_prepared("ade20k", root, "validation", output_root, ade_ignore_other=True)
    with pytest.raises(DatasetError, match=r"set dataset\.ade_ignore_other=false"):
        find_prepared("ade20k", root, "validation", output_root, ade_ignore_other=True)
    with pytest.raises(FileExistsError, match="holds a different prepared dataset"):
        prepare_split("ade20k", ade_root, "validation", out, ade_ignore_other=True, progress=False)
    ignored = prepare_split("ade20k", ade_root, "validation", out, ade_ignore_other=True, overwrite=True)
    assert not ignored.info.background_is_class
    with pytest.raises(DatasetError, match=r"ignored \(255, MiB's convention\).*ade_ignore_other=false asks"):
        ensure_prepared("ade20k", root, "validation", output_root)


@pytest.mark.parametrize("value", ["1", "'false'", "[]"])
def test_the_knob_takes_a_bool_only(value: str) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.ade_ignore_other"):
        load_config(
            overrides=[
                "dataset.name=ade20k",
                "dataset.root=/data/raw",
                "task.name=100-50",
                f"dataset.ade_ignore_other={value}",
            ]
        )
