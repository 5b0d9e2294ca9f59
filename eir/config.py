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
import math
import re
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from eir.methods import METHOD_NAMES, method_class
from eir.storage import is_uri, local_path
from eir.tasks import DATASET_NUM_CLASSES, TaskError, get_task, parse_task_name


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message says which and why."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key written twice in one YAML mapping (PyYAML would silently keep the second value)."""

    def __init__(self, key: Any, first_line: int, second_line: int, mark: yaml.Mark):
        super().__init__(None, None, f"key {key!r} appears twice", mark)
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _Loader(yaml.SafeLoader):
    """The YAML reader of config, run and sweep files.

    YAML 1.1 reads `1e-3` (no dot) as a string; configs mean the number, as YAML 1.2 does. A key
    given twice in one mapping is an error: PyYAML keeps the second silently, so a duplicated
    `train:` section would drop every setting of the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<` merges are meant to be overridden; complex keys cannot repeat by accident
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise DuplicateKeyError(key, first_line[key], line, key_node.start_mark)
            first_line[key] = line
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """Writes what `_Loader` reads back unchanged: a string like `1e-3` is quoted (it would load as a number)."""


_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _yaml_class in (_Loader, _Dumper):
    _yaml_class.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+.0123456789"))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and at which line and column."""
    if isinstance(exc, DuplicateKeyError):
        return (f"key {exc.key!r} is given twice, at lines {exc.first_line} and {exc.second_line} "
                "(the second would silently replace the first; merge them)")
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f"{exc.context}: " if exc.context else ""
        return f"{context}{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def parse_yaml(data: bytes | str, what: str) -> Any:
    """YAML text (bytes must be UTF-8) → Python values; any problem is one ConfigError naming `what`.

    `what` names the file for the user, e.g. "config experiments/x.yaml" or "sweep file s.yaml".
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise ConfigError(f"{what} is not UTF-8 text (line {line} has the byte 0x{data[exc.start]:02x}): "
                              "save it as UTF-8") from exc
    try:
        return yaml.load(data, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(exc)}") from exc


def read_yaml_file(path: Path, what: str) -> Any:
    """A local YAML file's contents (see `parse_yaml`); a missing file or a folder is a ConfigError too."""
    if not path.is_file():
        raise ConfigError(f"{what} does not exist" if not path.exists() else f"{what} is not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} cannot be read: {exc.strerror or exc}") from exc
    return parse_yaml(data, what)


DatasetName = Literal["synthetic", "voc", "ade20k", "camvid", "folder"]
MethodName = Literal[METHOD_NAMES]  # one per module of eir/methods
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
        if not math.isfinite(value):  # .nan / .inf: no setting means them, and NaN passes every `<` check
            raise ConfigError(f"bad value {value!r} for {key}: expected a finite number")
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


def read_config_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's settings as flat `section.key -> value`, its `inherit:` chain merged in.

    Callers that build many configs from one file (a sweep's trials) read it once with this and
    pass the result to `load_config(file_tree=...)`.
    """
    what = f"config file {path}"
    if path.resolve() in seen:
        raise ConfigError(f"config {path} inherits itself (cycle: {' -> '.join(map(str, (*seen, path.resolve())))})")
    tree = read_yaml_file(path, what)
    if tree is None:
        return {}  # an empty file sets nothing
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(tree).__name__}")
    parent = tree.pop("inherit", None)
    flat = flatten(tree)
    if parent is None:
        return flat
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"bad value {parent!r} for inherit in {path}: expected the path of a YAML file (relative to {path})")
    merged = read_config_tree((path.parent / parent), (*seen, path.resolve()))
    merged.update(flat)
    return merged


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings → flat updates; values are parsed as YAML (`1e-3`, `true`, `[1,2]`, `null`)."""
    updates: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        updates[key.strip()] = parse_yaml(raw, f"the value of override {item!r}") if raw != "" else ""
    return updates


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    file_tree: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Defaults ← YAML file (with its `inherit:` chain) ← overrides, then validated, files included.

    `file_tree`: `read_config_tree(path)`, when the caller has read it already.
    """
    config = ExperimentConfig()
    explicit: set[str] = set()
    if path is not None:
        tree = file_tree if file_tree is not None else read_config_tree(Path(path))
        _apply(config, tree, str(path))
        explicit |= set(tree)
    if overrides:
        updates = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        _apply(config, updates, "overrides")
        explicit |= set(updates)
    preset = {k: v for k, v in method_class(config.method.name).presets.items() if k not in explicit}
    _apply(config, preset, f"method {config.method.name!r}")
    validate(config)
    check_weights_file(config)
    return config


def check_weights_file(config: ExperimentConfig) -> None:
    """A `model.weights` file must exist now, not minutes later inside a Train worker.

    Checked where a config is made from the user's input (`load_config`), not when a run's own
    config.yaml is read back: a finished step 0 no longer needs the file. The path is read as the
    model reads it (relative to the working directory, no `~`); `imagenet` and null are resolved
    elsewhere (eir/weights.py). URIs are refused: the model opens weights with a local path.
    """
    weights = config.model.weights
    if weights is None or weights == "imagenet":
        return
    expected = "expected 'imagenet', null, or the path of a local backbone weights file (.pth)"
    if is_uri(weights):
        raise ConfigError(f"bad value {weights!r} for model.weights: {expected}; URIs are not read, copy the file to a local path")
    path = Path(weights)
    if path.is_dir():
        raise ConfigError(f"bad value {weights!r} for model.weights: {path.absolute()} is a folder; {expected}")
    if not path.is_file():
        raise ConfigError(f"bad value {weights!r} for model.weights: no such file {path.absolute()}; {expected}")


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


def config_from_dict(tree: Any, where: str = "config") -> ExperimentConfig:
    """A config from its nested-dict form (a run's config.yaml); every error names `where`."""
    if not isinstance(tree, dict):
        got = "it is empty" if tree is None else f"got {type(tree).__name__}"
        raise ConfigError(f"{where} must be a mapping of config sections; {got}")
    config = ExperimentConfig()
    try:
        _apply(config, flatten(tree), where)
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return config


def config_from_yaml(data: bytes, where: str) -> ExperimentConfig:
    """A config from the bytes of a YAML file (a run's config.yaml): undecodable, malformed or
    non-mapping input is one ConfigError naming `where`, like a bad value."""
    return config_from_dict(parse_yaml(data, f"config {where}"), where)


SEED_LIMIT = 2**32  # numpy's SeedSequence refuses negatives; torch seeds with seed * 1000 + step * 10 + rank


def _name_problem(value: str) -> str | None:
    """Why `value` is not a single, typeable folder name (None: it is one)."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # undecodable bytes of a command line, carried as surrogates
        return "it is not valid UTF-8 text"
    if value in ("", ".", ".."):
        return "it would not name a folder of its own"
    if "/" in value or "\\" in value:
        return "it contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "it contains a control character"
    if value != value.strip():
        return "it starts or ends with whitespace"
    if size > 200:
        return "it is longer than 200 bytes"
    return None


def check_name(value: str, key: str) -> None:
    """A run or sweep name becomes one folder under the output dir: it must be a single path component.

    `..`, a separator or a NUL would place files outside the output dir (or fail deep inside the
    file system); control characters and edge spaces make names that cannot be typed back.
    """
    problem = _name_problem(value)
    if problem:
        raise ConfigError(f"bad value {value!r} for {key}: {problem}; expected one folder name (not '', '.' or '..'; "
                          "no '/', '\\', control characters or leading/trailing spaces; at most 200 bytes)")


def _check_each(values: dict[str, Any], ok: Callable[[Any], bool], expected: str) -> None:
    """One range rule over several keys, failing on the first value outside it."""
    for key, value in values.items():
        if not ok(value):
            raise ConfigError(f"bad value {value!r} for {key}: expected {expected}")


def validate(config: ExperimentConfig) -> None:
    """Cross-field and range checks that types alone cannot express (non-finite floats fail in `_coerce`)."""
    positive = {
        "train.epochs": config.train.epochs,
        "train.epochs_incremental": config.train.epochs_incremental,
        "train.batch_size": config.train.batch_size,
        "train.crop_size": config.train.crop_size,
        "train.checkpoints_to_keep": config.train.checkpoints_to_keep,
        "eval.batch_size": config.eval.batch_size,
        "eval.crop_size": config.eval.crop_size,
        "scaling.num_workers": config.scaling.num_workers,
        "dataset.synthetic_num_images": config.dataset.synthetic_num_images,
        "dataset.synthetic_image_size": config.dataset.synthetic_image_size,
        "paste.max_instances": config.paste.max_instances,
        "data.pseudo_actors": config.data.pseudo_actors,
    }
    _check_each(positive, lambda v: v >= 1, "a positive integer")
    _check_each({"train.max_failures": config.train.max_failures, "memory.size": config.memory.size},
                lambda v: v >= 0, "0 or more")
    _check_each({"seed": config.seed, "dataset.synthetic_seed": config.dataset.synthetic_seed},
                lambda v: 0 <= v < SEED_LIMIT, "a seed in [0, 2**32)")
    _check_each({"train.lr": config.train.lr, "train.lr_incremental": config.train.lr_incremental},
                lambda v: v > 0, "a learning rate > 0")
    # SGD runs with Nesterov momentum, which torch refuses for momentum 0.
    if not 0 < config.train.momentum < 1:
        raise ConfigError(f"bad value {config.train.momentum!r} for train.momentum: expected 0 < momentum < 1 (Nesterov SGD)")
    at_least_zero = {
        "train.weight_decay": config.train.weight_decay,
        "loss.bce_weight": config.loss.bce_weight,
        "loss.rskd_weight": config.loss.rskd_weight,
    }
    _check_each(at_least_zero, lambda v: v >= 0, "a number >= 0")
    _check_each({"scaling.cpus_per_worker": config.scaling.cpus_per_worker, "data.num_cpus_per_worker": config.data.num_cpus_per_worker},
                lambda v: v > 0, "a CPU count > 0 (fractions allowed)")
    if not 0 < config.dataset.image_scale <= 1:
        raise ConfigError(f"bad value {config.dataset.image_scale!r} for dataset.image_scale: expected 0 < scale <= 1")
    if not 0 <= config.train.warmup_fraction < 1:
        raise ConfigError(f"bad value {config.train.warmup_fraction!r} for train.warmup_fraction: expected a share in [0, 1)")
    if not 0 < config.train.scale_min <= config.train.scale_max:
        raise ConfigError(f"bad values train.scale_min={config.train.scale_min!r}, train.scale_max={config.train.scale_max!r}: "
                          "expected 0 < scale_min <= scale_max")
    if config.train.batch_size % config.scaling.num_workers:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} does not divide across "
            f"scaling.num_workers={config.scaling.num_workers}: the global batch must be a multiple of the worker count"
        )
    _validate_task(config)
    if config.dataset.name != "synthetic" and not config.dataset.root:
        raise ConfigError(f"dataset.root is required for dataset.name={config.dataset.name!r} (the raw dataset folder)")
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
    if config.replay.ratio is not None and not 0 <= config.replay.ratio < 1:
        raise ConfigError(f"bad value {config.replay.ratio!r} for replay.ratio: expected null or a share in [0, 1)")
    needs_instances = {"paste.enabled": config.paste.enabled, "replay.ratio": config.replay.ratio != 0}
    for key, used in needs_instances.items():
        if used and config.memory.kind != "instances":
            raise ConfigError(f"{key} needs the instance store, but memory.kind={config.memory.kind!r} (method {config.method.name!r})")
    check_name(config.run.name, "run.name")


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
    return yaml.dump(config.to_dict(), Dumper=_Dumper, sort_keys=False)


__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "anchored_paths",
    "check_name",
    "config_from_dict",
    "config_from_yaml",
    "describe_keys",
    "dump_yaml",
    "load_config",
    "parse_overrides",
    "parse_yaml",
    "read_config_tree",
    "read_yaml_file",
    "valid_keys",
]
