"""The vote count behind BENCHMARKS.md's "why the fair image replay ties finetune", on hand-made labels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "analysis" / "image_replay_conflict.py"
_spec = importlib.util.spec_from_file_location("image_replay_conflict", SCRIPT)
conflict = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conflict)


def test_own_images_vote_down_and_stored_images_vote_up_only_for_classes_their_labels_keep() -> None:
    own = [{0: 10, 1: 5, 2: 3, 6: 4}, {1: 7, 255: 2}]  # class 6 is the step's own: not an old class
    stored_at_0 = np.array([[1, 1, 2], [2, 2, 0]], dtype=np.uint8)  # stored when only class 1 was learned
    stored_at_1 = np.array([[1, 2, 2], [255, 0, 0]], dtype=np.uint8)  # stored when 1 and 2 were learned
    votes = conflict.count_votes((1, 2), own, [(stored_at_0, (1,)), (stored_at_1, (1, 2))])
    # down: class 1 has 5 + 7 own pixels, class 2 has 3; up: class 1 is kept by both stored images (2 + 1 pixels),
    # class 2 only by the second (2 pixels: the first's three class-2 pixels are background in its labels).
    assert votes == {1: (12, 3), 2: (3, 2)}


def test_masked_stored_images_give_no_up_votes() -> None:
    stored = np.ones((2, 2), dtype=np.uint8)
    assert conflict.count_votes((1,), [{1: 4}], [(stored, ())]) == {1: (4, 0)}


def test_a_class_absent_everywhere_has_no_votes() -> None:
    assert conflict.count_votes((3,), [{1: 4}], []) == {3: (0, 0)}
