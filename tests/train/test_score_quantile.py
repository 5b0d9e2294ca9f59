"""`pseudo.rule=score_quantile` through the step's real data path: the planner resolves it, then the histogram
pass and the labelling pass run through Ray with an old model whose logits are known by hand, the thresholds
are written beside the pseudo-labels, and a second attempt at the step reuses both."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from eir import storage
from eir.config import load_config
from eir.data.codec import decode_map
from eir.data.ingest import read_rows
from eir.data.pipeline import THRESHOLDS_FILE, read_class_thresholds, read_prepared_table
from eir.model import build_model
from eir.pseudo import PseudoRule, ScoreThresholds
from eir.replay.image_store import build_image_store
from eir.replay.store import build_store
from eir.train import preview, step_data
from eir.train.memory import memory_file
from eir.train.planner import PreviousStep
from eir.train.resolved import pseudo_label_dir, replayed_pseudo_label_dir, resolve

RULE = ["pseudo.enabled=true", "pseudo.rule=score_quantile", "pseudo.threshold=0.9", "pseudo.quantile=0.3"]
WINNER, WINNER_LOGIT = 4, 1.0  # the old model predicts channel 4 everywhere, with sigmoid 0.731 (below the cap 0.9)


def test_the_planner_resolves_the_rule_and_its_settings(tiny_run: tuple[str, ...]) -> None:
    config = load_config(overrides=[*tiny_run, "method.name=eir", *RULE])
    design = resolve(config, progress=False).design(1, PreviousStep("step_0/model.pt", 0))
    assert design.pseudo and design.pseudo_rule == PseudoRule("score_quantile", threshold=0.9, quantile=0.3)
    assert design.pseudo_rule.per_class


def _constant_old_model(path: Path, step0_classes: int) -> None:
    """A step-0 model whose heads ignore the image: background logit 0, channel WINNER's WINNER_LOGIT, others −5."""
    model = build_model("mobilenet_v2", [step0_classes], weights=None)
    with torch.no_grad():
        for head in model.heads:
            head.weight.zero_()
        model.heads[0].bias.fill_(0.0)
        model.heads[1].bias.fill_(-5.0)
        model.heads[1].bias[WINNER - 1] = WINNER_LOGIT
    torch.save({"model": model.state_dict(), "head_sizes": [step0_classes]}, path)


@pytest.mark.slow
def test_a_step_labels_by_its_per_class_thresholds_and_reuses_them(
    ray_session, tiny_run: tuple[str, ...], tmp_path: Path, monkeypatch, caplog
) -> None:
    config = load_config(overrides=[*tiny_run, "method.name=eir", *RULE, f"run.output_dir={tmp_path}", "run.name=q"])
    exp = resolve(config, progress=False)
    step0_classes = len(exp.schedule.classes_seen(0))
    storage.makedirs(exp.step_dir(0))
    _constant_old_model(Path(exp.step_dir(0).join("model.pt").path), step0_classes)
    design = exp.design(1, PreviousStep(exp.step_dir(0).join("model.pt").uri, 0))
    ids = exp.train_splits.step_ids(1)

    with caplog.at_level(logging.INFO, logger=step_data.__name__):
        rows = step_data.pseudo_labelled_rows(exp, design, ids).take_all()
    # Every background pixel is predicted WINNER with σ(1) = 0.731: its 0.3-quantile (in its bin) sets τ_WINNER
    # below the cap; the channels the old model never predicts keep the cap.
    thresholds = read_class_thresholds(pseudo_label_dir(exp, 1))
    assert isinstance(thresholds, ScoreThresholds) and len(thresholds.thresholds) == 1 + step0_classes
    score = 1 / (1 + math.exp(-WINNER_LOGIT))
    assert thresholds.thresholds[WINNER] == pytest.approx(score, abs=1e-3)
    assert [t for c, t in enumerate(thresholds.thresholds) if c != WINNER] == [0.9] * step0_classes
    assert "score_quantile thresholds from the step 0 model" in caplog.text
    assert sorted(r["id"] for r in rows) == sorted(ids)
    lut = design.stream.lut
    labelled = 0
    for row in rows:
        label, pseudo = lut[decode_map(row["label"])], decode_map(row["pseudo"])
        assert (pseudo[label == 0] == WINNER).all() and (pseudo[label != 0] == 0).all()
        labelled += int((label == 0).sum())
    assert labelled > 0, "the global rule at 0.9 would have labelled none of these pixels"

    def no_pass(*args, **kwargs):
        raise AssertionError("a finished step's pseudo-labels were computed again")

    monkeypatch.setattr(step_data, "threshold_histogram_pass", no_pass)
    monkeypatch.setattr(step_data, "write_pseudo_labels", no_pass)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=step_data.__name__):
        again = step_data.pseudo_labelled_rows(exp, design, ids)
    assert again.count() == len(ids) and thresholds.summary() in caplog.text
    assert np.isclose(read_class_thresholds(pseudo_label_dir(exp, 1)).thresholds[WINNER], score, atol=1e-3)


def test_preview_reads_the_steps_thresholds_or_computes_them_from_its_images(
    tiny_run: tuple[str, ...], tmp_path: Path
) -> None:
    """`launch.py preview` under score_quantile: before the step has run, τ_c comes from the previewed images
    alone; once the step wrote its thresholds, the preview uses those (what training used)."""
    config = load_config(overrides=[*tiny_run, "method.name=eir", *RULE, f"run.output_dir={tmp_path}", "run.name=p"])
    exp = resolve(config, progress=False)
    step0_classes = len(exp.schedule.classes_seen(0))
    storage.makedirs(exp.step_dir(0))
    _constant_old_model(Path(exp.step_dir(0).join("model.pt").path), step0_classes)
    step0_rows = read_rows(exp.train_manifest, exp.train_splits.step_ids(0)).to_pylist()
    memory = {"rule": config.memory.instance_rule, "min_area": config.memory.min_area, "size": 10}
    store, _ = build_store(step0_rows, exp.schedule.classes_learned(0), step=0, previous=None, seed=0, **memory)
    store.write(memory_file(exp.step_dir(0), "instances"))

    panels = preview.preview_panels(exp, 1, count=3)
    assert len(panels) == 3 and all(len(p) == 3 for p in panels)
    design = exp.design(1, PreviousStep(exp.step_dir(0).join("model.pt").uri, len(store)))
    batch = {
        n: read_rows(exp.train_manifest, exp.train_splits.step_ids(1)[:3]).column(n).to_pylist()
        for n in ("id", "image", "label")
    }
    old_model = (exp.step_dir(0).join("model.pt").uri, "mobilenet_v2", 16, design.stream.lut)
    found = preview._preview_thresholds(exp, 1, design.pseudo_rule, 1 + step0_classes, old_model, batch)
    assert found[WINNER] == pytest.approx(1 / (1 + math.exp(-WINNER_LOGIT)), abs=1e-3) and found[0] == 0.9

    written = ScoreThresholds(
        0.9, 0.3, (0,) * (1 + step0_classes), (None,) * (1 + step0_classes), (0.5,) * (1 + step0_classes)
    )
    folder = pseudo_label_dir(exp, 1)
    storage.makedirs(folder)
    storage.write_json_atomic(folder.join(THRESHOLDS_FILE), written.to_json())
    storage.mark_complete(folder)
    assert (
        preview._preview_thresholds(exp, 1, design.pseudo_rule, 1 + step0_classes, old_model, batch)
        == written.thresholds
    )


@pytest.mark.slow
def test_replayed_images_asked_for_are_labelled_once_by_the_steps_own_thresholds(
    ray_session, tiny_run: tuple[str, ...], tmp_path: Path, monkeypatch
) -> None:
    """image_replay with `replay.pseudo_label=true`: the step's own images are labelled first and set τ_c; the
    stored images are then labelled by the same τ_c, each read through its storing step's table (so the step-0
    classes it keeps are never overwritten), and join the stream; a second attempt reuses them."""
    overrides = [*tiny_run, "method.name=image_replay", *RULE, "replay.pseudo_label=true"]
    config = load_config(overrides=[*overrides, f"run.output_dir={tmp_path}", "run.name=r"])
    exp = resolve(config, progress=False)
    storage.makedirs(exp.step_dir(0))
    _constant_old_model(Path(exp.step_dir(0).join("model.pt").path), len(exp.schedule.classes_seen(0)))
    step0_rows = read_rows(exp.train_manifest, exp.train_splits.step_ids(0)).to_pylist()
    store = build_image_store(step0_rows, exp.schedule.classes_learned(0), 6, None, 0, step=0)
    design = exp.design(1, PreviousStep(exp.step_dir(0).join("model.pt").uri, len(store)))
    assert design.replay == "images" and design.pseudo_replayed

    stream = step_data.training_stream(exp, design, store)
    assert stream.count() == design.plan.rows_per_epoch * design.plan.epochs
    folder = replayed_pseudo_label_dir(exp, 1)
    labelled = read_prepared_table(folder)
    assert read_class_thresholds(folder) == read_class_thresholds(pseudo_label_dir(exp, 1))
    assert sorted(labelled.column("id").to_pylist()) == sorted(store.table.column("id").to_pylist())
    stored_lut, kept = design.stream.stored_luts[0], 0
    for row in labelled.to_pylist():
        assert row["stored_step"] == 0
        label, pseudo = stored_lut[decode_map(row["label"])], decode_map(row["pseudo"])
        assert (pseudo[label == 0] == WINNER).all() and (pseudo[label != 0] == 0).all()
        kept += int(((label > 0) & (label != 255)).sum())
    assert kept > 0, "the stored images keep step-0 classes, which the train LUT would have made background"

    def no_pass(*args, **kwargs):
        raise AssertionError("a finished step's pseudo-labels were computed again")

    monkeypatch.setattr(step_data, "write_pseudo_labels", no_pass)
    assert step_data.pseudo_labelled_replay(exp, design, store.table).equals(labelled)
