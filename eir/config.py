"""The typed experiment configuration: YAML files under `experiments/` plus `key=value` overrides.

Every setting of an experiment lives here, in one tree of dataclasses, so there is exactly one
place that knows the valid keys, their types and their allowed values. A YAML file may name an
`inherit:` file (relative to itself) whose values it overrides, so CamVid 5-3 and 6-1 share one
base. Unknown keys and bad values fail before anything starts, with a message naming the key,
the closest valid keys and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from eir.storage import is_uri, local_path
from eir.tasks import DATASET_NUM_CLASSES, TaskError, get_task, parse_task_name


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message says which and why."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; configs mean the number, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


DatasetName = Literal["synthetic", "voc", "ade20k", "camvid", "folder"]
MethodName = Literal["finetune", "joint", "image_replay", "instance_replay", "eir_no_rskd", "eir"]
Backbone = Literal["mobilenet_v2", "resnet50", "resnet101"]
EvalProtocol = Literal["full", "center_crop"]


@dataclass
class DatasetConfig:
    name: DatasetName = "synthetic"
    root: str = ""  # raw dataset root; "" for synthetic = generated under run.output_dir
    train_split: str = "train"
    test_split: str = "val"
    image_scale: float = 1.0  # resize at ingest (0.5 = half size); part of the ingest cache key
    synthetic_num_images: int = 600
    synthetic_image_size: int = 112
    synthetic_seed: int = 0


@dataclass
class TaskConfig:
    name: str = "15-1"
    setting: Literal["overlapped", "disjoint"] = "overlapped"
    class_order: list[int] | None = None


@dataclass
class MethodConfig:
    name: MethodName = "finetune"


@dataclass
class MemoryConfig:
    kind: Literal["none", "instances", "images"] = "none"  # set by method.name
    size: int = 100  # budget M: stored instances (or images, for image_replay) over all old classes
    instance_rule: Literal["single_component", "components", "instance_masks"] = "single_component"
    min_area: float = 0.0  # fraction of the image below which an instance is not stored


@dataclass
class PseudoConfig:
    enabled: bool = False  # set by method.name
    threshold: float = 0.7


@dataclass
class PasteConfig:
    enabled: bool = False  # set by method.name
    probability: float = 1.0
    hard: bool = False  # lambda = 1 instead of U(0, 1)
    max_instances: int = 3


@dataclass
class ReplayConfig:
    # Share of stored-instance samples in the step's stream; null = every stored instance once per
    # epoch (M / (N + M)); 0 = none. Set by method.name.
    ratio: float | None = 0.0


@dataclass
class LossConfig:
    bce_weight: float = 1.0
    rskd_weight: float = 0.0  # set by method.name (eir: 5)
    rskd_region: Literal["new_gt", "all", "complement"] = "new_gt"


@dataclass
class DataConfig:
    num_cpus_per_worker: float = 1.0  # CPUs of each Ray Data decode/augment/paste task
    pseudo_actors: int = 1  # actor-pool size of the pseudo-label batch inference


# A method is a named set of knobs (applied to every key the config does not set itself).
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "finetune": {"memory.kind": "none", "pseudo.enabled": False, "paste.enabled": False, "replay.ratio": 0.0, "loss.rskd_weight": 0.0},
    "joint": {"memory.kind": "none", "pseudo.enabled": False, "paste.enabled": False, "replay.ratio": 0.0, "loss.rskd_weight": 0.0},
    "image_replay": {"memory.kind": "images", "pseudo.enabled": False, "paste.enabled": False, "replay.ratio": 0.0, "loss.rskd_weight": 0.0},
    "instance_replay": {"memory.kind": "instances", "pseudo.enabled": False, "paste.enabled": False, "replay.ratio": None, "loss.rskd_weight": 0.0},
    "eir_no_rskd": {"memory.kind": "instances", "pseudo.enabled": True, "paste.enabled": True, "replay.ratio": None, "loss.rskd_weight": 0.0},
    "eir": {"memory.kind": "instances", "pseudo.enabled": True, "paste.enabled": True, "replay.ratio": None, "loss.rskd_weight": 5.0},
}


@dataclass
class ModelConfig:
    backbone: Backbone = "mobilenet_v2"
    weights: str | None = "imagenet"  # "imagenet" (torchvision API), a local .pth path, or null
    output_stride: Literal[8, 16] = 16
    new_head_init: Literal["random", "copy_background"] = "random"


@dataclass
class TrainConfig:
    epochs: int = 30  # step 0 and joint
    epochs_incremental: int = 30
    batch_size: int = 16  # global: divided across the Train workers
    crop_size: int = 96
    lr: float = 0.01
    lr_incremental: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scale_min: float = 0.5  # RandomResizedCrop scale range (METHOD.md §2)
    scale_max: float = 2.0
    amp: bool = True  # only takes effect on GPU
    warmup_fraction: float = 0.0  # share of a step's iterations with a linear LR warm-up (METHOD.md §2: 0.2 on ADE)
    checkpoints_to_keep: int = 2
    max_failures: int = 0


@dataclass
class EvalConfig:
    protocol: EvalProtocol = "full"
    crop_size: int = 512  # center_crop protocol: shorter side resized to this, then a square centre crop
    batch_size: int = 8


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass
class RunConfig:
    output_dir: str = "outputs"
    name: str = "run"
    step0_cache: bool = True  # reuse (and fill) <output_dir>/cache/step0/


@dataclass
class ExperimentConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    paste: PasteConfig = field(default_factory=PasteConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form used for overrides, MLflow params and diffs."""
        return flatten(self.to_dict())

    def fingerprint(self, keys: list[str] | None = None) -> str:
        """A short content hash of the config (or of the named keys only)."""
        flat = self.flat()
        chosen = {k: flat[k] for k in (keys or sorted(flat))}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def inactive_keys(config: ExperimentConfig) -> set[str]:
    """Keys that cannot change this config's results (e.g. paste settings of a method that never pastes).

    `--resume` ignores differences in them, so adding a knob's value to a shared base file does
    not lock out runs of methods that never read it.
    """
    flat = config.flat()
    inactive: set[str] = set()
    if config.memory.kind == "none":
        inactive |= {k for k in flat if k.startswith("memory.") and k != "memory.kind"}
    if config.memory.kind != "instances":
        inactive |= {"memory.instance_rule", "memory.min_area"}
    if not config.pseudo.enabled:
        inactive.add("pseudo.threshold")
    if not config.paste.enabled:
        inactive |= {k for k in flat if k.startswith("paste.") and k != "paste.enabled"}
    if config.loss.rskd_weight == 0:
        inactive.add("loss.rskd_region")
    if not config.pseudo.enabled:
        inactive.add("data.pseudo_actors")
    return inactive


def valid_keys() -> list[str]:
    return sorted(ExperimentConfig().flat())


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint} (run `launch.py run --help` for all keys)")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML value against a field's type annotation."""
    origin = get_origin(annotation)
    if origin is Literal:
        allowed = get_args(annotation)
        # Type-strict: 16.0 or True must not pass for 16 or 1 (they would change fingerprints).
        if not any(type(value) is type(option) and value == option for option in allowed):
            raise ConfigError(f"bad value {value!r} for {key}: allowed values are {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"bad value {value!r} for {key}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"bad value {value!r} for {key}: expected a list")
        (item_type,) = get_args(annotation)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"bad value {value!r} for {key}: expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"bad value {value!r} for {key}: expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"bad value {value!r} for {key}: expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"bad value {value!r} for {key}: expected a string")
        return str(value)
    raise ConfigError(f"unsupported type {annotation!r} for {key}")  # pragma: no cover - a programming error


def _apply(obj: Any, flat_updates: dict[str, Any], where: str) -> None:
    for dotted, value in flat_updates.items():
        parts = dotted.split(".")
        target = obj
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(target) or part not in {f.name for f in fields(target)}:
                raise _unknown_key_error(dotted, where)
            target = getattr(target, part)
        leaf = parts[-1]
        if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in fields(target)}:
            raise _unknown_key_error(dotted, where)
        hints = get_type_hints(type(target))
        if dataclasses.is_dataclass(getattr(target, leaf)):
            raise ConfigError(f"{dotted} is a section; set its keys ({dotted}.<key>) instead")
        setattr(target, leaf, _coerce(value, hints[leaf], dotted))


def _load_yaml_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} inherits itself (cycle: {' -> '.join(map(str, (*seen, path.resolve())))})")
    try:
        tree = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(tree).__name__}")
    parent = tree.pop("inherit", None)
    flat = flatten(tree)
    if parent is None:
        return flat
    merged = _load_yaml_tree((path.parent / parent), (*seen, path.resolve()))
    merged.update(flat)
    return merged


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings → flat updates; values are parsed as YAML (`1e-3`, `true`, `[1,2]`, `null`)."""
    updates: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        try:
            updates[key.strip()] = _load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return updates


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> ExperimentConfig:
    """Defaults ← YAML file (with its `inherit:` chain) ← overrides, then validated."""
    config = ExperimentConfig()
    explicit: set[str] = set()
    if path is not None:
        tree = _load_yaml_tree(Path(path))
        _apply(config, tree, str(path))
        explicit |= set(tree)
    if overrides:
        updates = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        _apply(config, updates, "overrides")
        explicit |= set(updates)
    preset = {k: v for k, v in METHOD_PRESETS[config.method.name].items() if k not in explicit}
    _apply(config, preset, f"method {config.method.name!r}")
    validate(config)
    return config


def anchored_paths(config: ExperimentConfig, base: Path) -> dict[str, str]:
    """Overrides that pin the config's relative local paths to `base` (absolute, URIs untouched).

    Why: a Ray Tune trial runs in its own working directory, so a relative `dataset.root`,
    `run.output_dir` or weights file would point elsewhere there — and each trial would fill a
    step-0 cache of its own. The sweep driver anchors them to the directory it was started in.
    """
    paths = {"dataset.root": config.dataset.root, "run.output_dir": config.run.output_dir}
    if config.model.weights not in (None, "imagenet"):
        paths["model.weights"] = config.model.weights
    anchored = {key: local_path(value, base) for key, value in paths.items() if value and not is_uri(value)}
    return {key: value for key, value in anchored.items() if value != paths[key]}


def config_from_dict(tree: dict[str, Any], where: str = "config") -> ExperimentConfig:
    config = ExperimentConfig()
    _apply(config, flatten(tree), where)
    validate(config)
    return config


def validate(config: ExperimentConfig) -> None:
    """Cross-field and range checks that types alone cannot express."""
    positive = {
        "train.epochs": config.train.epochs,
        "train.epochs_incremental": config.train.epochs_incremental,
        "train.batch_size": config.train.batch_size,
        "train.crop_size": config.train.crop_size,
        "eval.batch_size": config.eval.batch_size,
        "eval.crop_size": config.eval.crop_size,
        "scaling.num_workers": config.scaling.num_workers,
        "dataset.synthetic_num_images": config.dataset.synthetic_num_images,
        "dataset.synthetic_image_size": config.dataset.synthetic_image_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"bad value {value!r} for {key}: expected a positive integer")
    for key, value in {"train.lr": config.train.lr, "train.lr_incremental": config.train.lr_incremental}.items():
        if value <= 0:
            raise ConfigError(f"bad value {value!r} for {key}: expected a learning rate > 0")
    if not 0 < config.dataset.image_scale <= 1:
        raise ConfigError(f"bad value {config.dataset.image_scale!r} for dataset.image_scale: expected 0 < scale <= 1")
    if not 0 <= config.train.warmup_fraction < 1:
        raise ConfigError(f"bad value {config.train.warmup_fraction!r} for train.warmup_fraction: expected a share in [0, 1)")
    if not 0 < config.train.scale_min <= config.train.scale_max:
        raise ConfigError("train.scale_min must be > 0 and <= train.scale_max")
    if config.train.batch_size % config.scaling.num_workers:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} does not divide across "
            f"scaling.num_workers={config.scaling.num_workers}: the global batch must be a multiple of the worker count"
        )
    _validate_task(config)
    if config.dataset.name != "synthetic" and not config.dataset.root:
        raise ConfigError(f"dataset.root is required for dataset.name={config.dataset.name!r} (the raw dataset folder)")
    if config.memory.size < 0:
        raise ConfigError(f"bad value {config.memory.size!r} for memory.size: expected 0 or more")
    if config.memory.size == 0 and config.memory.kind != "none":
        # Allowed (a sweep may include M = 0 as its no-memory point), but never silently.
        warnings.warn(
            f"memory.size=0 with method {config.method.name!r}: nothing is stored, so replay and pasting have "
            "nothing to draw from; the run is this method without a memory",
            stacklevel=2,
        )
    if not 0 <= config.memory.min_area < 1:
        raise ConfigError(f"bad value {config.memory.min_area!r} for memory.min_area: expected a fraction in [0, 1)")
    if not 0 < config.pseudo.threshold < 1:
        raise ConfigError(f"bad value {config.pseudo.threshold!r} for pseudo.threshold: expected a sigmoid score in (0, 1)")
    if not 0 <= config.paste.probability <= 1:
        raise ConfigError(f"bad value {config.paste.probability!r} for paste.probability: expected 0..1")
    if config.paste.max_instances < 1:
        raise ConfigError(f"bad value {config.paste.max_instances!r} for paste.max_instances: expected >= 1")
    if config.replay.ratio is not None and not 0 <= config.replay.ratio < 1:
        raise ConfigError(f"bad value {config.replay.ratio!r} for replay.ratio: expected null or a share in [0, 1)")
    needs_instances = {"paste.enabled": config.paste.enabled, "replay.ratio": config.replay.ratio != 0}
    for key, used in needs_instances.items():
        if used and config.memory.kind != "instances":
            raise ConfigError(f"{key} needs the instance store, but memory.kind={config.memory.kind!r} (method {config.method.name!r})")
    if config.loss.bce_weight < 0 or config.loss.rskd_weight < 0:
        raise ConfigError("loss.bce_weight and loss.rskd_weight must be >= 0")
    if config.data.pseudo_actors < 1 or config.data.num_cpus_per_worker <= 0:
        raise ConfigError("data.pseudo_actors must be >= 1 and data.num_cpus_per_worker > 0")
    if not config.run.name or "/" in config.run.name:
        raise ConfigError(f"bad value {config.run.name!r} for run.name: expected a non-empty name without '/'")


def _validate_task(config: ExperimentConfig) -> None:
    """Build the task now, so a bad `task.*` value fails before any dataset is ingested.

    Datasets of known size get the whole check (B < K, steps that divide, a valid class order);
    for a generic folder, whose K is known only once it is read, the name's form is checked here
    and the rest when the run resolves.
    """
    task = config.task
    try:
        if config.dataset.name in DATASET_NUM_CLASSES:
            get_task(config.dataset.name, task.name, task.setting, class_order=task.class_order)
        else:
            parse_task_name(task.name)
    except TaskError as exc:
        raise ConfigError(f"bad task (task.name={task.name!r}, task.setting={task.setting!r}): {exc}") from exc


def describe_keys() -> str:
    """All keys with their defaults and allowed values, for `--help`."""
    lines = []
    defaults = ExperimentConfig()
    for section in fields(defaults):
        value = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(value):
            lines.append(f"  {section.name} = {value!r}")
            continue
        hints = get_type_hints(type(value))
        for f in fields(value):
            allowed = ""
            ann = hints[f.name]
            if get_origin(ann) is Literal:
                allowed = f"  [{' | '.join(map(str, get_args(ann)))}]"
            lines.append(f"  {section.name}.{f.name} = {getattr(value, f.name)!r}{allowed}")
    return "\n".join(lines)


def dump_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


__all__ = [
    "ConfigError",
    "anchored_paths",
    "ExperimentConfig",
    "config_from_dict",
    "describe_keys",
    "dump_yaml",
    "load_config",
    "parse_overrides",
    "valid_keys",
]
