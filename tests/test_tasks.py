"""Tests for eir.tasks: registry, class bookkeeping, image filters, label LUTs, step sizes."""

from __future__ import annotations

import numpy as np
import pytest

from eir.tasks import (
    DATASET_NUM_CLASSES,
    TASKS,
    Task,
    TaskError,
    check_step_sizes,
    get_task,
    parse_task_name,
    step_image_counts,
    task_from_steps,
)

EXPECTED_NUM_STEPS = {
    ("voc", "19-1"): 2,
    ("voc", "15-5"): 2,
    ("voc", "15-1"): 6,
    ("voc", "10-1"): 11,
    ("voc", "5-3"): 6,
    ("voc", "10-5"): 3,
    ("voc", "10-10"): 2,
    ("voc", "2-2"): 10,
    ("ade20k", "100-50"): 2,
    ("ade20k", "100-10"): 6,
    ("ade20k", "100-5"): 11,
    ("ade20k", "50-50"): 3,
    ("camvid", "6-5"): 2,
    ("camvid", "6-1"): 6,
    ("camvid", "5-3"): 3,
    ("synthetic", "15-5"): 2,
    ("synthetic", "15-1"): 6,
    ("synthetic", "10-1"): 11,
    ("synthetic", "5-3"): 6,
}


# --- registry ---------------------------------------------------------------------------


def test_registry_lists_exactly_the_expected_tasks():
    listed = {(d, n) for d, names in TASKS.items() for n in names}
    assert listed == set(EXPECTED_NUM_STEPS)


@pytest.mark.parametrize(("dataset", "name"), sorted(EXPECTED_NUM_STEPS))
def test_every_registry_entry_builds_and_covers_all_classes_once(dataset, name):
    task = get_task(dataset, name)
    k = DATASET_NUM_CLASSES[dataset]
    flat = [c for step in task.steps for c in step]
    assert sorted(flat) == list(range(1, k + 1))
    assert len(flat) == k
    assert task.num_steps == EXPECTED_NUM_STEPS[(dataset, name)]
    assert task.steps == TASKS[dataset][name]
    base, increment = parse_task_name(name)
    assert task.steps[0] == tuple(range(1, base + 1))
    assert all(len(s) == increment for s in task.steps[1:])


def test_future_label_defaults_per_dataset():
    assert get_task("voc", "15-1").future_label == 0
    assert get_task("camvid", "6-1").future_label == 0
    assert get_task("synthetic", "15-1").future_label == 0
    assert get_task("ade20k", "100-10").future_label == 255


# --- class bookkeeping ------------------------------------------------------------------


def test_camvid_5_3_steps():
    task = get_task("camvid", "5-3")
    assert task.steps == ((1, 2, 3, 4, 5), (6, 7, 8), (9, 10, 11))
    assert task.num_classes == 11


def test_voc_15_1_class_sets():
    task = get_task("voc", "15-1")
    assert task.classes_learned(0) == tuple(range(1, 16))
    assert task.classes_learned(3) == (18,)
    assert task.classes_seen(3) == tuple(range(1, 19))
    assert task.old_classes(3) == tuple(range(1, 18))
    assert task.old_classes(0) == ()
    assert task.future_classes(3) == (19, 20)
    assert task.future_classes(5) == ()


def test_step_out_of_range_is_refused():
    task = get_task("voc", "15-5")
    for bad in (-1, 2, 1.0):
        with pytest.raises(TaskError, match="expected 0..1"):
            task.classes_seen(bad)


def test_describe_rows():
    assert get_task("camvid", "5-3").describe() == [
        {"step": 0, "classes": [1, 2, 3, 4, 5], "num_classes_seen": 5},
        {"step": 1, "classes": [6, 7, 8], "num_classes_seen": 8},
        {"step": 2, "classes": [9, 10, 11], "num_classes_seen": 11},
    ]


def test_joint_has_one_step_with_every_class():
    task = get_task("voc", "15-1", "disjoint")
    joint = task.joint()
    assert joint.steps == (tuple(range(1, 21)),)
    assert joint.num_steps == 1
    assert (joint.dataset, joint.name, joint.setting) == ("voc", "joint", "disjoint")
    assert joint.future_label == task.future_label
    lut = joint.train_lut(0)
    assert lut[:21].tolist() == list(range(21)) and lut[255] == 255
    # a task whose steps skip a class: joint learns only what the steps learn
    partial = task_from_steps("voc", [(1, 2), (5,)]).joint()
    assert partial.steps == ((1, 2, 5),)


# --- label LUTs -------------------------------------------------------------------------


def test_voc_15_1_train_lut_keeps_only_the_new_class():
    task = get_task("voc", "15-1")
    lut = task.train_lut(4)  # C_4 = {19}
    expected = np.zeros(256, dtype=np.uint8)
    expected[19] = 19
    expected[255] = 255
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    np.testing.assert_array_equal(lut, expected)
    step3 = np.zeros(256, dtype=np.uint8)  # C_3 = {18}: old 1..17 and future 19, 20 become background
    step3[18], step3[255] = 18, 255
    np.testing.assert_array_equal(task.train_lut(3), step3)


def test_voc_15_1_step_3_test_lut_keeps_the_seen_classes():
    expected = np.full(256, 255, dtype=np.uint8)  # ids above K never come from a valid reader: ignored
    expected[:19] = np.arange(19)  # seen at step 3: background and 1..18
    expected[19] = expected[20] = 0  # future classes are background in VOC's test labels
    np.testing.assert_array_equal(get_task("voc", "15-1").test_lut(3), expected)


def test_voc_15_1_test_lut_maps_future_to_background():
    lut = get_task("voc", "15-1").test_lut(4)  # seen 1..19, future {20}
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert lut[:20].tolist() == list(range(20))
    assert lut[20] == 0
    assert lut[255] == 255
    # ids above K never come from a valid reader; they are kept out of metrics
    assert (lut[21:255] == 255).all()


def test_ade_100_10_test_lut_ignores_future_classes():
    lut = get_task("ade20k", "100-10").test_lut(1)  # seen 1..110
    assert lut[:111].tolist() == list(range(111))
    assert (lut[111:151] == 255).all()
    assert lut[255] == 255


def test_luts_applied_to_a_label_map():
    task = get_task("voc", "15-1")
    label = np.array([[0, 3, 16], [17, 20, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(task.train_lut(1)[label], [[0, 0, 16], [0, 0, 255]])
    np.testing.assert_array_equal(task.test_lut(1)[label], [[0, 3, 16], [0, 0, 255]])


def test_luts_are_fresh_copies():
    task = get_task("voc", "15-5")
    task.train_lut(1)[16] = 0
    assert task.train_lut(1)[16] == 16


# --- image filters ----------------------------------------------------------------------


def test_disjoint_drops_images_with_future_classes():
    disjoint = get_task("voc", "15-1", "disjoint")
    overlapped = get_task("voc", "15-1", "overlapped")
    # step 1 learns 16; 17 is a future class, 3 is old
    with_future = {0, 16, 17}
    old_and_current = {0, 3, 16, 255}
    assert not disjoint.keeps_train_image(1, with_future)
    assert disjoint.keeps_train_image(1, old_and_current)
    assert overlapped.keeps_train_image(1, with_future)
    assert overlapped.keeps_train_image(1, old_and_current)
    # no pixel of C_t: dropped in both settings
    assert not overlapped.keeps_train_image(1, [0, 3, 255])
    assert not disjoint.keeps_train_image(1, [0, 3])


def test_keeps_train_image_accepts_numpy_values():
    task = get_task("voc", "15-1", "disjoint")
    assert task.keeps_train_image(1, np.unique(np.array([0, 16, 255], dtype=np.uint8)))


def test_keeps_test_image():
    task = get_task("voc", "15-1")
    assert task.keeps_test_image(0, [0, 7])
    assert not task.keeps_test_image(0, [0, 16, 255])  # only a future class
    assert task.keeps_test_image(1, [0, 16])
    assert not task.keeps_test_image(5, [0, 255])  # background and ignore only


# --- class order ------------------------------------------------------------------------


def test_class_order_permutation_sets_the_steps():
    order = [20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    task = get_task("voc", "15-1", class_order=order)
    assert task.steps[0] == tuple(range(6, 21))
    assert task.steps[1:] == ((5,), (4,), (3,), (2,), (1,))
    # class ids stay label ids
    assert np.flatnonzero(task.train_lut(1)).tolist() == [5, 255]
    assert task.future_classes(1) == (1, 2, 3, 4)


def test_class_order_accepts_numpy_permutation():
    order = np.random.default_rng(0).permutation(np.arange(1, 12))
    task = get_task("camvid", "5-3", class_order=order)
    assert task.steps[0] == tuple(sorted(order[:5].tolist()))
    assert task.steps[2] == tuple(sorted(order[8:].tolist()))


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], r"missing ids \[11\]"),
        ([1, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11], r"duplicate ids \[1\].*missing ids \[2\]"),
        ([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], r"out-of-range ids \[0, 12\].*missing ids \[1\]"),
        ([1.5, 2, 3], r"non-integer ids \[1.5\]"),
    ],
)
def test_class_order_must_be_a_permutation(order, message):
    with pytest.raises(TaskError, match=message):
        get_task("camvid", "5-3", class_order=order)


# --- generic B-I names and invalid requests ---------------------------------------------


def test_parse_task_name():
    assert parse_task_name("15-1") == (15, 1)
    assert parse_task_name("100-50") == (100, 50)


@pytest.mark.parametrize("name", ["15_1", "abc", "15-", "-1", "15-1-1", "15-1\n", " 15-1", "", None])
def test_malformed_names_are_refused(name):
    with pytest.raises(TaskError, match="malformed task name"):
        parse_task_name(name)


def test_unregistered_name_builds():
    task = get_task("voc", "16-2")
    assert task.steps == (tuple(range(1, 17)), (17, 18), (19, 20))
    assert task.name == "16-2"


def test_unknown_dataset_needs_num_classes():
    with pytest.raises(TaskError, match=r"unknown dataset 'cityscapes'.*num_classes"):
        get_task("cityscapes", "10-3")
    task = get_task("cityscapes", "10-3", num_classes=19)
    assert task.num_steps == 4 and task.num_classes == 19 and task.future_label == 0
    assert get_task("cityscapes", "10-3", num_classes=19, future_label=255).test_lut(0)[11] == 255


def test_known_dataset_refuses_a_different_num_classes():
    with pytest.raises(TaskError, match="has 20 classes, but num_classes=21"):
        get_task("voc", "15-1", num_classes=21)
    assert get_task("voc", "15-1", num_classes=20).num_classes == 20


def test_unknown_setting_names_the_allowed_ones():
    with pytest.raises(TaskError, match=r"'mixed'.*\['overlapped', 'disjoint'\]"):
        get_task("voc", "15-1", "mixed")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("20-1", "base B=20 must be < K=20"),
        ("25-1", "base B=25 must be < K=20"),
        ("0-5", "base B must be >= 1"),
        ("15-0", "increment I must be >= 1"),
        ("15-4", r"do not split into steps of 4; valid increments for base 15: \[1, 5\]"),
    ],
)
def test_invalid_base_and_increment(name, message):
    with pytest.raises(TaskError, match=message):
        get_task("voc", name)


def test_invalid_future_label():
    with pytest.raises(TaskError, match="future_label must be 0"):
        task_from_steps("voc", [(1,)], future_label=7)


# --- task_from_steps --------------------------------------------------------------------


def test_task_from_steps_normalises_and_defaults():
    task = task_from_steps("ade20k", [[3, 1, 2], np.array([5, 4])])
    assert task.steps == ((1, 2, 3), (4, 5))
    assert all(type(c) is int for s in task.steps for c in s)
    assert (task.name, task.setting) == ("custom", "overlapped")
    assert (task.num_classes, task.future_label) == (150, 255)
    # classes no step learns stay future at every step
    assert task.future_classes(1)[0] == 6
    assert task.test_lut(1)[6] == 255


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([(1, 2), (2, 3)], "class 2 of step 1 is already in step 0; steps must be disjoint"),
        ([(1, 1)], "class 1 of step 0 is twice in that step"),
        ([(1, 2), ()], "step 1 has no classes"),
        ([(0, 1)], r"step 0 holds class ids \[0\] outside 1..20"),
        ([(1,), (21,)], r"step 1 holds class ids \[21\] outside 1..20"),
        ([], "at least one step"),
    ],
)
def test_task_from_steps_validation(steps, message):
    with pytest.raises(TaskError, match=message):
        task_from_steps("voc", steps)


def test_task_constructor_validates_too():
    with pytest.raises(TaskError, match="disjoint"):
        Task("voc", "x", "overlapped", ((1, 2), (2,)), 20, 0)


# --- step sizes -------------------------------------------------------------------------


def test_step_image_counts_overlapped_and_disjoint():
    images = [
        {0, 1, 2},  # base only
        {0, 1, 6},  # base + step-1 class 6 (camvid 5-3: steps (1..5), (6,7,8), (9,10,11))
        {0, 6, 9, 255},  # step 1 class with a future class 9
        {0, 10},  # step 2 only
        iter([0, 3, 9]),  # a one-shot iterable: base + future
    ]
    overlapped = get_task("camvid", "5-3", "overlapped")
    disjoint = get_task("camvid", "5-3", "disjoint")
    assert step_image_counts(overlapped, [*images[:4], [0, 3, 9]]) == [3, 2, 3]
    assert step_image_counts(disjoint, images) == [1, 1, 3]


def test_check_step_sizes_raises_on_empty_step():
    task = get_task("camvid", "5-3", "disjoint")
    empty_step = r"step 1 \(classes \[6, 7, 8\]\) has 0 training images.*overlapped"
    with pytest.raises(TaskError, match=empty_step):
        check_step_sizes(task, [120, 0, 40])
    with pytest.raises(TaskError, match=r"step 2 \(classes \[9, 10, 11\]\) has 4 training images"):
        check_step_sizes(task, [120, 30, 4], min_images=5)
    with pytest.raises(TaskError, match="got 2 image counts.*3 steps"):
        check_step_sizes(task, [1, 2])


def test_check_step_sizes_warns_on_small_steps():
    task = get_task("camvid", "5-3")
    with pytest.warns(UserWarning, match=r"step 2 \(classes \[9, 10, 11\]\) has only 3 training images"):
        messages = check_step_sizes(task, [200, 50, 3])
    assert len(messages) == 1 and "fewer than 10" in messages[0]
    assert check_step_sizes(task, [200, 50, 10]) == []
