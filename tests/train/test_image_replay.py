"""Image replay's labels (METHOD.md §4.1): from the store through the planner to the sample the trainer gets.

A tiny synthetic image holding a class of each step of a 3-step task is stored at step 0 or 1 and
replayed at step 2; the stream's own `SampleMaker` (what the Ray Data workers run) labels it. The
crop is the whole image and the label is in horizontal bands, so a flip changes nothing and each
band's label can be compared with channel ids worked out here by hand. No Ray is started.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from eir.config import load_config
from eir.data.pipeline import NOT_STORED, SampleMaker
from eir.replay.image_store import build_image_store
from eir.tasks import get_task
from eir.train.planner import PreviousStep, RunFacts, RunLayout, plan_step

# voc 10-5 in reverse class order: step 0 learns 11..20, step 1 learns 6..10, step 2 learns 1..5;
# channels follow step order, each step's classes sorted: 11..20 → 1..10, 6..10 → 11..15, 1..5 → 16..20.
ORDER = list(range(20, 0, -1))
BANDS = [15, 8, 3, 255, 0]  # classes of step 0, 1, 2, then ignore and background; two pixel rows each
CHANNEL = {15: 15 - 10, 8: 8 + 5, 3: 3 + 15}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _row(image_id: str) -> dict:
    label = np.repeat(np.array(BANDS, dtype=np.uint8), 2)[:, None].repeat(10, axis=1)
    image = np.full((10, 10, 3), 7, dtype=np.uint8)
    return {"id": image_id, "image": _png(image), "label": _png(label), "classes": sorted(set(BANDS))}


def _stream_at_step2(image_labels: str):
    config = load_config(
        overrides=[
            "method.name=image_replay",
            "model.weights=null",
            "task.name=10-5",
            f"task.class_order=[{','.join(map(str, ORDER))}]",
            f"replay.image_labels={image_labels}",
            "train.crop_size=10",  # the whole image, unscaled: each band stays where it is
            "train.scale_min=1.0",
            "train.scale_max=1.0",
        ]
    )
    task = get_task("voc", "10-5", class_order=ORDER)
    facts = RunFacts(RunLayout.of(config, task), (10, 10, 10), (10, 10, 10), progress=False)
    return plan_step(config, facts, 2, PreviousStep("model.pt", memory_items=2)).stream


def _band_labels(spec, row: dict, stored_step: int) -> list[int]:
    """The label of each band of `row` as the trainer receives it."""
    sample = SampleMaker(spec, [], {}, np.random.default_rng(0))(row["image"], row["label"], None, stored_step)[0]
    bands = sample.label[::2]
    assert (bands[:, :1] == bands).all() and (sample.label[::2] == sample.label[1::2]).all()
    return bands[:, 0].tolist()


@pytest.fixture(scope="module")
def stored() -> list[dict]:
    """Image a, stored at step 0 and kept by step 1's store; image b, stored at step 1."""
    first = build_image_store([_row("a")], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], 1, None, 0, step=0)
    second = build_image_store([_row("b")], [6, 7, 8, 9, 10], 2, first, 1, step=1)
    rows = {row["id"]: row for row in second.rows()}
    assert {i: row["stored_step"] for i, row in rows.items()} == {"a": 0, "b": 1}
    return [rows["a"], rows["b"]]


def test_stored_labels_keep_the_classes_learned_when_stored(stored) -> None:
    spec = _stream_at_step2("stored")
    a, b = stored
    # stored at 0: its class of step 0 keeps its channel; classes of steps 1 and 2 are background
    assert _band_labels(spec, a, a["stored_step"]) == [CHANNEL[15], 0, 0, 255, 0]
    # stored at 1: classes of steps 0 and 1 keep their channels; the class of step 2 is background
    assert _band_labels(spec, b, b["stored_step"]) == [CHANNEL[15], CHANNEL[8], 0, 255, 0]
    # the step's own image: its new class only (background shift)
    assert _band_labels(spec, _row("own"), NOT_STORED) == [0, 0, CHANNEL[3], 255, 0]


def test_the_channels_a_rows_label_can_hold_follow_its_storing_steps_table(stored) -> None:
    """What the paste planner is told a label can hold (`SampleMaker.label_channels`): the channels of the
    classes learned by the step whose table reads it, background and ignore; no old channel in a step's own rows."""
    make = SampleMaker(_stream_at_step2("stored"), [], {}, np.random.default_rng(0))
    assert make.label_channels(NOT_STORED) == {0, 255, *range(16, 21)}
    assert make.label_channels(0) == {0, 255, *range(1, 11)}
    assert make.label_channels(1) == {0, 255, *range(1, 16)}
    for row in stored:
        assert set(_band_labels(make.spec, row, row["stored_step"])) <= make.label_channels(row["stored_step"])


def test_current_labels_are_the_steps_own_classes_only(stored) -> None:
    spec = _stream_at_step2("current")
    for row in stored:  # DKD-M's masking: the old objects are background, the current class is labelled
        assert _band_labels(spec, row, row["stored_step"]) == [0, 0, CHANNEL[3], 255, 0]


def test_a_storing_step_the_stream_has_no_table_for_is_an_error() -> None:
    with pytest.raises(ValueError, match="stored at step 2, but the stream has look-up tables for images stored"):
        _stream_at_step2("stored").row_lut(2)
