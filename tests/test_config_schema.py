"""The config schema: every key is declared with its check, and what derives from it stays right.

`tests/test_bad_input.py` drives one bad value per key through `launch.py run`; this module checks
the schema itself (no key without a check, range checks that agree with the code that reads the
key) and what is derived from it: the step-0 cache key, the inactive keys, `run --help`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, get_origin, get_type_hints

import pytest
import torch

from eir.config import (
    ANY_TEXT,
    CHOICE,
    ConfigError,
    ExperimentConfig,
    describe_keys,
    inactive_keys,
    load_config,
    schema,
    step0_keys,
    valid_keys,
)
from eir.data.synthetic import generate_synthetic
from eir.methods import METHOD_NAMES
from eir.model import build_model
from eir.replay.paste import PasteConfig as PasteSettings
from eir.train import cache


def _fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, object]]:
    """Every leaf field of the config tree, straight from the dataclasses (not through `schema`)."""
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f, hints[f.name]))
    return out


def test_every_key_is_declared_with_its_check_and_doc() -> None:
    leaves = _fields(ExperimentConfig)
    missing = [key for key, f, _ in leaves if "knob" not in f.metadata]
    assert not missing, f"declare these with knob(default, check, doc): {missing}"
    assert [entry.key for entry in schema()] == [key for key, _, _ in leaves]
    assert sorted(valid_keys()) == sorted(ExperimentConfig().flat())
    for entry in schema():
        assert entry.knob.doc, entry.key


def test_only_choices_and_free_text_go_without_a_range() -> None:
    """CHOICE passes everything: only a Literal or a bool, whose type admits nothing else, may use it;
    ANY_TEXT only a string key that a cross-key rule checks. Every other key names the values it refuses."""
    for entry in schema():
        check = entry.knob.check
        if check is CHOICE:
            assert get_origin(entry.annotation) is Literal or entry.annotation is bool, entry.key
        elif check is ANY_TEXT:
            assert entry.annotation is str, entry.key
        else:
            assert check.invalid, f"{entry.key}: a range check needs the values it refuses (Check.invalid)"


@pytest.mark.parametrize("entry", schema(), ids=lambda entry: entry.key)
def test_each_check_takes_its_default_and_refuses_its_invalid_values(entry) -> None:
    check = entry.knob.check
    assert check.ok(entry.default), f"{entry.key}'s default {entry.default!r} fails its own check"
    for value in check.invalid:
        with pytest.raises(ConfigError, match=rf"^bad value .* for {entry.key}: .*expected "):
            check.enforce(value, entry.key)


def test_the_step0_cache_key_holds_the_same_keys_as_before() -> None:
    """Existing step-0 cache entries stay valid only while this set is unchanged (else bump STEP0_CODE_VERSION)."""
    assert (
        set(cache.STEP0_KEYS)
        == set(step0_keys())
        == {
            "model.backbone",
            "model.weights",
            "model.output_stride",
            "train.epochs",
            "train.batch_size",
            "train.crop_size",
            "train.lr",
            "train.momentum",
            "train.weight_decay",
            "train.scale_min",
            "train.scale_max",
            "train.amp",
            "train.warmup_fraction",
            "loss.bce_weight",
            "eval.protocol",
            "eval.crop_size",
            "seed",
        }
    )
    assert cache.STEP0_CODE_VERSION == 5


@pytest.mark.parametrize(
    ("method", "inactive"),
    [
        (
            "finetune",
            {
                "memory.size",
                "memory.instance_rule",
                "memory.min_area",
                "pseudo.threshold",
                "pseudo.rule",
                "pseudo.entropy_floor",
                "data.pseudo_actors",
                "paste.probability",
                "paste.hard",
                "paste.max_instances",
                "loss.rskd_region",
                "replay.image_labels",
                "replay.pseudo_label",
            },
        ),
        (
            "image_replay",
            {
                "memory.instance_rule",
                "memory.min_area",
                "pseudo.threshold",
                "pseudo.rule",
                "pseudo.entropy_floor",
                "data.pseudo_actors",
                "paste.probability",
                "paste.hard",
                "paste.max_instances",
                "loss.rskd_region",
            },
        ),
        (
            "instance_replay",
            {
                "pseudo.threshold",
                "pseudo.rule",
                "pseudo.entropy_floor",
                "data.pseudo_actors",
                "paste.probability",
                "paste.hard",
                "paste.max_instances",
                "loss.rskd_region",
                "replay.image_labels",
                "replay.pseudo_label",
            },
        ),
        ("eir_no_rskd", {"loss.rskd_region", "replay.image_labels", "replay.pseudo_label", "pseudo.entropy_floor"}),
        ("eir", {"replay.image_labels", "replay.pseudo_label", "pseudo.entropy_floor"}),
        (
            "plop",
            {
                "memory.size",
                "memory.instance_rule",
                "memory.min_area",
                "pseudo.threshold",
                "paste.probability",
                "paste.hard",
                "paste.max_instances",
                "loss.rskd_region",
                "replay.image_labels",
                "replay.pseudo_label",
                # the BCE family's keys, which PLOP's softmax loss and MiB's fixed initialisation never read
                "loss.bce_weight",
                "loss.bce_old_background",
                "loss.rskd_weight",
                "model.new_head_init",
            },
        ),
    ],
)
def test_inactive_keys_follow_what_the_method_switches_on(method: str, inactive: set[str]) -> None:
    # dataset.ade_ignore_other is inactive on every dataset but ade20k (the default is synthetic), pseudo.quantile
    # under every rule but score_quantile (no method presets it), data.stream_tasks_per_core under every method
    # (it changes how fast a run goes, never its results).
    expected = inactive | {"dataset.ade_ignore_other", "loss.unkd_weight", "pseudo.quantile"} | set(DKD_KEYS)
    expected |= {"data.stream_tasks_per_core"}
    assert inactive_keys(load_config(overrides=[f"method.name={method}"])) == expected | (
        set() if method == "plop" else set(PLOP_KEYS)
    )


# The keys only PLOP's loss reads (eir/methods/plop.py).
PLOP_KEYS = ("loss.pod_weight", "loss.pod_logits_weight")


# The keys only DKD's loss reads (eir/methods/dkd.py).
DKD_KEYS = (
    "loss.pos_weight",
    "loss.pos_weight_step0",
    "loss.kd_weight",
    "loss.dkd_pos_weight",
    "loss.dkd_neg_weight",
    "loss.ac_weight",
)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_dkd_keys_are_active_only_for_the_methods_that_read_them(method: str) -> None:
    inactive = inactive_keys(load_config(overrides=[f"method.name={method}"]))
    reads = method in ("dkd", "dkd_m")
    assert {key: key not in inactive for key in DKD_KEYS} == dict.fromkeys(DKD_KEYS, reads)


@pytest.mark.parametrize(
    ("dataset", "task", "active"), [("ade20k", "100-50", True), ("voc", "15-1", False), ("camvid", "5-3", False)]
)
def test_ade_ignore_other_is_active_on_ade20k_only(dataset: str, task: str, active: bool) -> None:
    config = load_config(overrides=[f"dataset.name={dataset}", "dataset.root=/data/raw", f"task.name={task}"])
    assert ("dataset.ade_ignore_other" not in inactive_keys(config)) == active


def test_paste_max_instances_agrees_with_the_paste_module() -> None:
    """The late failure of issue 18: max_instances=1 or 5 passed the config and failed at step 1."""
    for value in range(-1, 8):
        try:
            PasteSettings(max_instances=value)
            pastes = True
        except ValueError:
            pastes = False
        try:
            load_config(overrides=[f"paste.max_instances={value}"])
            loads = True
        except ConfigError:
            loads = False
        assert loads == pastes, (
            f"paste.max_instances={value}: config {'accepts' if loads else 'refuses'} it, paste does not"
        )


def test_synthetic_image_size_agrees_with_the_generator(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size=31"):
        generate_synthetic(tmp_path / "small", 2, image_size=31, progress=False)
    with pytest.raises(ConfigError, match="bad value 31 for dataset.synthetic_image_size: expected at least 32"):
        load_config(overrides=["dataset.synthetic_image_size=31"])
    assert load_config(overrides=["dataset.synthetic_image_size=32"]).dataset.synthetic_image_size == 32


def test_a_training_batch_of_one_image_per_worker_is_refused() -> None:
    """BatchNorm after ASPP's image pooling sees one value per image: torch refuses a batch of one."""
    model = build_model("mobilenet_v2", [2], weights=None).train()
    with torch.no_grad(), pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(
        ConfigError, match=r"train.batch_size=1 gives each .* needs at least 2 \(expected train.batch_size >= 2\)"
    ):
        load_config(overrides=["train.batch_size=1"])
    with pytest.raises(ConfigError, match=r"train.batch_size=4 gives each of the scaling.num_workers=4 .* >= 8\)"):
        load_config(overrides=["train.batch_size=4", "scaling.num_workers=4"])
    # SyncBatchNorm pools the images of several GPU workers.
    assert (
        load_config(overrides=["train.batch_size=4", "scaling.num_workers=4", "scaling.use_gpu=true"]).train.batch_size
        == 4
    )
    assert load_config(overrides=["train.batch_size=2"]).train.batch_size == 2


def test_run_help_shows_every_key_with_its_range_and_doc() -> None:
    text = describe_keys()
    for entry in schema():
        assert f"  {entry.key} = {entry.default!r}" in text, entry.key
        assert entry.knob.doc in text
    assert (
        "  train.lr = 0.01  [a learning rate > 0]\n"
        "      SGD learning rate of step 0 (and of joint); part of the step-0 cache key" in text
    )
    assert (
        "  paste.enabled = False\n"
        "      paste stored old-class instances into new images; set by method.name unless given" in text
    )
    assert "  eval.protocol = 'full'  [full | center_crop]" in text


def test_instance_masks_need_a_dataset_with_instance_maps() -> None:
    camvid = [
        "dataset.name=camvid",
        "task.name=5-3",
        "dataset.root=/data/CamVid",
        "memory.instance_rule=instance_masks",
    ]
    with pytest.raises(
        ConfigError,
        match="memory.instance_rule='instance_masks' needs instance maps, which "
        "dataset.name='camvid' does not have; use 'components' or 'single_component'",
    ):
        load_config(overrides=[*camvid, "method.name=eir"])
    assert load_config(overrides=[*camvid, "method.name=finetune"]).memory.kind == "none"  # no store: inactive
    assert load_config(overrides=["method.name=eir", "memory.instance_rule=instance_masks"]).dataset.name == "synthetic"


@pytest.mark.parametrize(
    ("method", "reads", "ignores"),
    [
        (
            "mib",
            {"loss.unkd_weight"},
            {"loss.bce_weight", "loss.rskd_weight", "loss.rskd_region", "model.new_head_init"},
        ),
        (
            "eir",
            {"loss.bce_weight", "loss.rskd_weight", "loss.rskd_region", "model.new_head_init"},
            {"loss.unkd_weight"},
        ),
        ("dkd", {"model.new_head_init", "loss.kd_weight"}, {"loss.bce_weight", "loss.rskd_weight", "loss.unkd_weight"}),
    ],
)
def test_a_loss_key_is_active_only_for_a_method_that_reads_it(method: str, reads: set, ignores: set) -> None:
    """A sweep over a key the method ignores would train identical runs, and --resume would refuse a harmless change."""
    inactive = inactive_keys(load_config(overrides=[f"method.name={method}"]))
    assert not reads & inactive and ignores <= inactive
