"""The experiment config: defaults, YAML files with `inherit:`, overrides and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from eir.config import (
    ConfigError,
    ExperimentConfig,
    anchored_paths,
    config_from_dict,
    config_from_yaml,
    dump_yaml,
    load_config,
    parse_overrides,
    valid_keys,
)
from eir.methods import METHOD_NAMES


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
        overrides=[
            "train.lr=1e-3",
            "train.amp=false",
            f"task.class_order=[{REVERSED}]",
            "model.weights=null",
            "scaling.cpus_per_worker=2",
        ]
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
    assert (
        load_config(overrides=["dataset.name=camvid", "task.name=5-3", "dataset.root=/data/CamVid"]).dataset.root
        == "/data/CamVid"
    )
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


def test_anchored_paths_pin_relative_local_paths_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a weights file must exist at config load (relative to the working directory)
    write(tmp_path / "weights" / "mnv2.pth", "")
    relative = load_config(
        overrides=[
            "dataset.name=camvid",
            "task.name=5-3",
            "dataset.root=data/CamVid",
            "run.output_dir=outputs",
            "model.weights=weights/mnv2.pth",
        ]
    )
    assert anchored_paths(relative, tmp_path) == {
        "dataset.root": str(tmp_path / "data" / "CamVid"),
        "run.output_dir": str(tmp_path / "outputs"),
        "model.weights": str(tmp_path / "weights" / "mnv2.pth"),
    }
    elsewhere = load_config(
        overrides=[
            "dataset.name=camvid",
            "task.name=5-3",
            f"dataset.root={tmp_path}",
            "run.output_dir=s3://b/runs",
            "model.weights=imagenet",
        ]
    )
    assert anchored_paths(elsewhere, Path("/somewhere/else")) == {}
    assert anchored_paths(load_config(overrides=["model.weights=null"]), tmp_path) == {
        "run.output_dir": str(tmp_path / "outputs")
    }


# ---------------------------------------------------------------- every setting checked at load (issue 17)


def _float_keys() -> list[str]:
    """Every key whose type admits a float (plain or optional): each must refuse NaN and infinities."""
    import dataclasses
    from typing import get_args, get_type_hints

    keys = []
    for section in dataclasses.fields(ExperimentConfig):
        kind = get_type_hints(ExperimentConfig)[section.name]
        if not dataclasses.is_dataclass(kind):
            continue
        for name, annotation in get_type_hints(kind).items():
            if annotation is float or float in get_args(annotation):
                keys.append(f"{section.name}.{name}")
    return keys


def test_float_keys_are_found() -> None:
    assert {"train.lr", "loss.bce_weight", "replay.ratio", "scaling.cpus_per_worker"} <= set(_float_keys())


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", _float_keys())
def test_non_finite_numbers_are_refused_for_every_float_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"bad value .*(nan|inf).* for {key}: expected a finite number"):
        load_config(overrides=[f"{key}={value}"])


def test_non_finite_number_in_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bad value nan for train.lr: expected a finite number"):
        load_config(write(tmp_path / "exp.yaml", "train:\n  lr: .nan\n"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.checkpoints_to_keep=0", "bad value 0 for train.checkpoints_to_keep: expected a positive integer"),
        ("train.max_failures=-1", "bad value -1 for train.max_failures: expected 0 or more"),
        ("train.momentum=-0.5", "bad value -0.5 for train.momentum: expected 0 < momentum < 1"),
        ("train.momentum=0", "bad value 0.0 for train.momentum: expected 0 < momentum < 1"),
        ("train.momentum=1", "bad value 1.0 for train.momentum: expected 0 < momentum < 1"),
        ("train.weight_decay=-1e-4", "bad value -0.0001 for train.weight_decay: expected a number >= 0"),
        ("scaling.cpus_per_worker=0", "bad value 0.0 for scaling.cpus_per_worker: expected a CPU count > 0"),
        ("scaling.cpus_per_worker=-1", "bad value -1.0 for scaling.cpus_per_worker: expected a CPU count > 0"),
        ("data.num_cpus_per_worker=0", "bad value 0.0 for data.num_cpus_per_worker: expected a CPU count > 0"),
        ("data.pseudo_actors=0", "bad value 0 for data.pseudo_actors: expected a positive integer"),
        ("loss.bce_weight=-1", "bad value -1.0 for loss.bce_weight: expected a number >= 0"),
        ("loss.rskd_weight=-1", "bad value -1.0 for loss.rskd_weight: expected a number >= 0"),
        ("paste.max_instances=0", r"bad value 0 for paste.max_instances: expected 2\.\.4 \(at least the 2 classes"),
        ("eval.batch_size=0", "bad value 0 for eval.batch_size: expected a positive integer"),
        ("eval.crop_size=-8", "bad value -8 for eval.crop_size: expected a positive integer"),
        ("memory.size=-1", "bad value -1 for memory.size: expected 0 or more"),
        ("seed=-1", r"bad value -1 for seed: expected a seed in \[0, 2\*\*32\)"),
        (f"seed={2**32}", "bad value 4294967296 for seed: expected a seed"),
        ("dataset.synthetic_seed=-3", "bad value -3 for dataset.synthetic_seed: expected a seed"),
        ("train.scale_max=0.1", "train.scale_min=0.5, train.scale_max=0.1: expected 0 < scale_min <= scale_max"),
    ],
)
def test_out_of_range_values_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_range_edges_that_are_allowed() -> None:
    config = load_config(
        overrides=[
            "train.checkpoints_to_keep=1",
            "train.max_failures=0",
            "train.weight_decay=0",
            "train.momentum=0.99",
            "scaling.cpus_per_worker=0.5",
            "seed=4294967295",
        ]
    )
    assert (config.train.checkpoints_to_keep, config.train.max_failures, config.scaling.cpus_per_worker) == (1, 0, 0.5)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "would not name a folder"),
        (".", "would not name a folder"),
        ("..", "would not name a folder"),
        ("a/b", "path separator"),
        ("../../x", "path separator"),
        ("a\\b", "path separator"),
        ("a\x00b", "control character"),
        ("a\tb", "control character"),
        (" a", "whitespace"),
        ("a ", "whitespace"),
        ("x" * 201, "longer than 200 bytes"),
        ("bad\udce9", "not valid UTF-8"),
    ],
)
def test_run_name_must_be_one_folder_name(name: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"run.name": name})
    message = str(info.value)
    assert f"bad value {name!r} for run.name: it" in message and problem in message
    assert "expected one folder name (not '', '.' or '..'; no '/', '\\', control characters" in message


@pytest.mark.parametrize("name", ["my-run_1.2", "memory.size=10,seed=1", "ünïcode run", "x" * 200])
def test_run_names_that_are_allowed(name: str) -> None:
    assert load_config(overrides={"run.name": name}).run.name == name


def test_weights_file_must_exist_at_load(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["model.weights=gone.pth"])
    assert str(info.value).startswith(
        f"bad value 'gone.pth' for model.weights: no such file {tmp_path / 'gone.pth'}; expected 'imagenet', null"
    )
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(ConfigError, match=rf"model.weights: {tmp_path / 'folder.pth'} is a folder"):
        load_config(overrides=["model.weights=folder.pth"])
    with pytest.raises(ConfigError, match="for model.weights: .* URIs are not read"):
        load_config(overrides=["model.weights=s3://bucket/mnv2.pth"])
    write(tmp_path / "mnv2.pth", "")
    assert load_config(overrides=["model.weights=mnv2.pth"]).model.weights == "mnv2.pth"
    assert load_config(overrides=["model.weights=null"]).model.weights is None
    assert load_config(overrides=["model.weights=imagenet"]).model.weights == "imagenet"


def test_a_run_config_read_back_does_not_need_its_weights_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "mnv2.pth", "")
    config = load_config(overrides=["model.weights=mnv2.pth"])
    (tmp_path / "mnv2.pth").unlink()  # step 0 is done: the run no longer reads it
    assert config_from_yaml(dump_yaml(config).encode(), "run/config.yaml") == config


# ---------------------------------------------------------------- YAML files


def test_duplicated_section_names_file_key_and_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "train:\n  epochs: 3\nseed: 1\ntrain:\n  lr: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"config file {path} is not valid YAML: key 'train' is given twice, at lines 1 and 4 "
        "(the second would silently replace the first; merge them)"
    )


def test_duplicated_key_inside_a_section_and_in_an_inherited_file(tmp_path: Path) -> None:
    parent = write(tmp_path / "parent.yaml", "train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    child = write(tmp_path / "child.yaml", "inherit: parent.yaml\nseed: 3\n")
    with pytest.raises(
        ConfigError, match=rf"config file {parent} is not valid YAML: key 'lr' is given twice, at lines 2 and 4"
    ):
        load_config(child)


def test_the_same_key_in_a_child_and_its_parent_is_an_override_not_a_duplicate(tmp_path: Path) -> None:
    write(tmp_path / "parent.yaml", "train:\n  epochs: 2\n")
    assert load_config(write(tmp_path / "child.yaml", "inherit: parent.yaml\ntrain:\n  epochs: 5\n")).train.epochs == 5


def test_non_utf8_file_is_one_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  lr: 0.1  # réglé\n".encode("latin-1"))
    with pytest.raises(
        ConfigError, match=rf"config file {path} is not UTF-8 text \(line 2 has the byte 0xe9\): save it as UTF-8"
    ):
        load_config(path)


def test_yaml_syntax_error_is_one_line_with_its_position(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "train:\n  lr: [0.1,\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"config file {path} is not valid YAML: while parsing a flow node: expected the node content"
    )
    assert "at line 3, column 1" in message


def test_a_folder_as_config_file_and_a_bad_inherit_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"config file {tmp_path} is not a file"):
        load_config(tmp_path)
    with pytest.raises(
        ConfigError, match="bad value \\['a.yaml'\\] for inherit in .*child.yaml: expected the path of a YAML file"
    ):
        load_config(write(tmp_path / "child.yaml", "inherit: [a.yaml]\n"))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "run/config.yaml must be a mapping of config sections; it is empty"),
        (b"- 1\n- 2\n", "run/config.yaml must be a mapping of config sections; got list"),
        (b"train: {lr: 0.1\n", "config run/config.yaml is not valid YAML: "),
        (b"seed: 1\x00\xff\n", "config run/config.yaml is not UTF-8 text"),
        (b"train:\n  epochs: -1\n", "run/config.yaml: bad value -1 for train.epochs: expected a positive integer"),
    ],
)
def test_a_corrupt_run_config_is_one_error_naming_it(data: bytes, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_yaml(data, "run/config.yaml")
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_strings_that_look_like_numbers_survive_a_round_trip() -> None:
    config = load_config(overrides={"run.name": "1e-3"})
    assert config_from_yaml(dump_yaml(config).encode(), "config.yaml").run.name == "1e-3"


# Which stream extras each method's loss reads (the BCE family reads soft targets and score pseudo-labels; PLOP
# its entropy-rule labels with rejected pixels; MiB and DKD neither).
BCE_FAMILY = {"finetune", "joint", "image_replay", "instance_replay", "eir_no_rskd", "eir"}
EXTRA_READERS = {
    "paste": BCE_FAMILY,
    "instance replay": BCE_FAMILY,
    "score pseudo-labels": BCE_FAMILY,
    "quantile pseudo-labels": BCE_FAMILY,
    "entropy pseudo-labels": {"plop"},
}
EXTRA_OVERRIDES = {
    "paste": ["memory.kind=instances", "paste.enabled=true", "replay.ratio=0.0"],
    "instance replay": ["memory.kind=instances", "paste.enabled=false", "replay.ratio=0.2"],
    "score pseudo-labels": ["pseudo.enabled=true", "pseudo.rule=score"],
    "quantile pseudo-labels": ["pseudo.enabled=true", "pseudo.rule=score_quantile"],
    "entropy pseudo-labels": ["pseudo.enabled=true", "pseudo.rule=median_entropy"],
}


@pytest.mark.parametrize("extra", sorted(EXTRA_READERS))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_stream_extra_the_methods_loss_does_not_read_is_refused(method: str, extra: str) -> None:
    overrides = [f"method.name={method}", *EXTRA_OVERRIDES[extra]]
    if method in EXTRA_READERS[extra]:
        load_config(overrides=overrides)
        return
    with pytest.raises(ConfigError, match=rf"method '{method}' does not read it .*; the methods that do: "):
        load_config(overrides=overrides)
