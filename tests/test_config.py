"""The experiment config: defaults, YAML files with `inherit:`, overrides and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from eir.config import (
    ConfigError,
    ExperimentConfig,
    anchored_paths,
    config_from_dict,
    dump_yaml,
    load_config,
    parse_overrides,
    valid_keys,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- loading


def test_defaults_load_and_match_the_dataclasses() -> None:
    config = load_config()
    assert config == ExperimentConfig()
    assert config.dataset.name == "synthetic"
    assert config.train.epochs == 30
    assert config.eval.protocol == "full"
    assert config.task.class_order is None


def test_yaml_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "train:\n  epochs: 3\n  lr: 0.5\nseed: 7\n")
    config = load_config(path)
    assert (config.train.epochs, config.train.lr, config.seed) == (3, 0.5, 7)
    assert config.train.batch_size == ExperimentConfig().train.batch_size


def test_inherit_chain_child_overrides_parent(tmp_path: Path) -> None:
    write(tmp_path / "base" / "grand.yaml", "train:\n  epochs: 1\n  batch_size: 4\nseed: 1\n")
    write(tmp_path / "base" / "parent.yaml", "inherit: grand.yaml\ntrain:\n  epochs: 2\nmodel:\n  output_stride: 8\n")
    child = write(tmp_path / "child.yaml", "inherit: base/parent.yaml\ntrain:\n  epochs: 3\n")
    config = load_config(child)
    assert config.train.epochs == 3  # child beats parent beats grandparent
    assert config.model.output_stride == 8  # from the parent
    assert (config.train.batch_size, config.seed) == (4, 1)  # from the grandparent


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "train:\n  epochs: 3\n")
    assert load_config(path, ["train.epochs=9"]).train.epochs == 9
    assert load_config(path, {"train.epochs": 11}).train.epochs == 11


def test_inherit_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "inherit: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "inherit: a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "inherit: self.yaml\n")
    with pytest.raises(ConfigError, match="inherits itself"):
        load_config(tmp_path / "self.yaml")


def test_missing_file_and_missing_parent_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    child = write(tmp_path / "child.yaml", "inherit: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml does not exist"):
        load_config(child)


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "train: [1,\n"))


def test_scientific_notation_is_a_number_in_files_too(tmp_path: Path) -> None:
    # YAML 1.1 would read 1e-4 (no dot) as a string.
    config = load_config(write(tmp_path / "exp.yaml", "train:\n  weight_decay: 1e-4\n  lr: 5E-2\n"))
    assert config.train.weight_decay == pytest.approx(1e-4)
    assert config.train.lr == pytest.approx(0.05)


# ---------------------------------------------------------------- overrides


def test_override_values_are_parsed_as_yaml() -> None:
    parsed = parse_overrides(["train.lr=1e-3", "train.amp=true", "task.class_order=[3,1,2]", "model.weights=null"])
    assert parsed == {"train.lr": 1e-3, "train.amp": True, "task.class_order": [3, 1, 2], "model.weights": None}
    assert isinstance(parsed["train.lr"], float)
    assert parse_overrides(["run.name=a=b", "dataset.root="]) == {"run.name": "a=b", "dataset.root": ""}


REVERSED = ",".join(map(str, range(20, 0, -1)))  # a valid class order of the default (synthetic) dataset


def test_overrides_apply_with_their_types() -> None:
    config = load_config(
        overrides=["train.lr=1e-3", "train.amp=false", f"task.class_order=[{REVERSED}]", "model.weights=null", "scaling.cpus_per_worker=2"]
    )
    assert config.train.lr == pytest.approx(0.001)
    assert config.train.amp is False
    assert config.task.class_order == list(range(20, 0, -1))
    assert config.model.weights is None
    assert config.scaling.cpus_per_worker == 2.0 and isinstance(config.scaling.cpus_per_worker, float)


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.epochs"])


# ---------------------------------------------------------------- errors


def test_unknown_key_names_it_and_suggests_close_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.epoch=3"])
    message = str(info.value)
    assert "'train.epoch'" in message
    assert "did you mean" in message and "train.epochs" in message


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"'train.batchsize' in .*exp.yaml.*train.batch_size"):
        load_config(path)


def test_unknown_section_and_nested_key() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.lr'"):
        load_config(overrides=["optimizer.lr=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'train.epochs.max'"):
        load_config(overrides=["train.epochs.max=3"])
    with pytest.raises(ConfigError, match="train is a section"):
        load_config(overrides=["train=3"])


def test_bad_literal_lists_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["eval.protocol=sliding"])
    message = str(info.value)
    assert "'sliding'" in message and "eval.protocol" in message
    assert "'full'" in message and "'center_crop'" in message


def test_literal_is_type_strict() -> None:
    assert load_config(overrides=["model.output_stride=8"]).model.output_stride == 8
    with pytest.raises(ConfigError, match="allowed values are 8, 16"):
        load_config(overrides=["model.output_stride=16.0"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochs=three", "expected an integer"),
        ("train.epochs=true", "expected an integer"),  # bool is an int in Python, not here
        ("train.epochs=2.5", "expected an integer"),
        ("train.lr=fast", "expected a number"),
        ("train.lr=true", "expected a number"),
        ("train.amp=1", "expected true or false"),
        ("task.class_order=3", "expected a list"),
        ("task.class_order=[1,x]", r"task.class_order\[1\]"),
        ("run.name=[a]", "expected a string"),
    ],
)
def test_wrong_types_are_refused(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=[override])


def test_batch_size_must_divide_across_workers() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.batch_size=10", "scaling.num_workers=4"])
    assert "train.batch_size=10" in str(info.value) and "scaling.num_workers=4" in str(info.value)
    assert load_config(overrides=["train.batch_size=12", "scaling.num_workers=4"]).scaling.num_workers == 4


def test_range_checks() -> None:
    with pytest.raises(ConfigError, match="train.epochs: expected a positive integer"):
        load_config(overrides=["train.epochs=0"])
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(overrides=["train.lr=0"])
    with pytest.raises(ConfigError, match="dataset.image_scale"):
        load_config(overrides=["dataset.image_scale=1.5"])
    with pytest.raises(ConfigError, match="scale_min"):
        load_config(overrides=["train.scale_min=3.0"])
    with pytest.raises(ConfigError, match="run.name"):
        load_config(overrides=["run.name=a/b"])


def test_dataset_root_required_except_for_synthetic() -> None:
    with pytest.raises(ConfigError, match="dataset.root is required for dataset.name='camvid'"):
        load_config(overrides=["dataset.name=camvid", "task.name=5-3"])
    assert load_config(overrides=["dataset.name=camvid", "task.name=5-3", "dataset.root=/data/CamVid"]).dataset.root == "/data/CamVid"
    assert load_config(overrides=["dataset.name=synthetic"]).dataset.root == ""


# ---------------------------------------------------------------- identity


def test_flat_keys() -> None:
    flat = ExperimentConfig().flat()
    assert flat["train.epochs"] == 30
    assert flat["seed"] == 0
    assert flat["task.class_order"] is None
    assert "train" not in flat and all(not isinstance(v, dict) for v in flat.values())
    assert sorted(flat) == valid_keys()
    assert {"dataset.root", "eval.protocol", "scaling.num_workers", "run.output_dir"} <= set(flat)


def test_fingerprint_is_stable_and_tracks_values() -> None:
    a, b = load_config(), load_config()
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16
    changed = load_config(overrides=["train.lr=0.02"])
    assert changed.fingerprint() != a.fingerprint()
    # Restricted to keys that did not change, the fingerprint does not move.
    keys = ["train.epochs", "model.backbone"]
    assert changed.fingerprint(keys) == a.fingerprint(keys)
    assert changed.fingerprint(["train.lr"]) != a.fingerprint(["train.lr"])


def test_dump_and_reload_round_trip() -> None:
    import yaml

    config = load_config(overrides=["train.lr=1e-3", f"task.class_order=[{REVERSED}]", "model.weights=null"])
    again = config_from_dict(yaml.safe_load(dump_yaml(config)))
    assert again == config
    assert again.fingerprint() == config.fingerprint()


def test_anchored_paths_pin_relative_local_paths_only(tmp_path: Path) -> None:
    relative = load_config(overrides=["dataset.name=camvid", "task.name=5-3", "dataset.root=data/CamVid", "run.output_dir=outputs",
                                      "model.weights=weights/mnv2.pth"])
    assert anchored_paths(relative, tmp_path) == {
        "dataset.root": str(tmp_path / "data" / "CamVid"),
        "run.output_dir": str(tmp_path / "outputs"),
        "model.weights": str(tmp_path / "weights" / "mnv2.pth"),
    }
    elsewhere = load_config(overrides=["dataset.name=camvid", "task.name=5-3", f"dataset.root={tmp_path}", "run.output_dir=s3://b/runs",
                                       "model.weights=imagenet"])
    assert anchored_paths(elsewhere, Path("/somewhere/else")) == {}
    assert anchored_paths(load_config(overrides=["model.weights=null"]), tmp_path) == {"run.output_dir": str(tmp_path / "outputs")}
