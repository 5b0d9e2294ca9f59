"""The typed experiment configuration: YAML files under `experiments/` plus `key=value` overrides.

Every setting of an experiment lives here, in one tree of dataclasses whose fields are declared
with `knob(default, check, doc, step0=..., active=...)`: a key's type, default, allowed values,
documentation, whether step 0 depends on it (the step-0 cache key) and when it is inactive (the
`--resume` diff, MLflow params) are written once, together, so no key can be added without its
check. The few rules that span several keys are the named functions of `RULES`. A YAML file may
name an `inherit:` file (relative to itself) whose values it overrides, so CamVid 5-3 and 6-1
share one base. Unknown keys and bad values fail before anything starts, with a message naming
the key, the closest valid keys and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
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

from eir.methods import METHOD_NAMES, METHODS, method_class
from eir.replay.paste import PasteConfig as PasteSettings
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
        return (
            f"key {exc.key!r} is given twice, at lines {exc.first_line} and {exc.second_line} "
            "(the second would silently replace the first; merge them)"
        )
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
            raise ConfigError(
                f"{what} is not UTF-8 text (line {line} has the byte 0x{data[exc.start]:02x}): save it as UTF-8"
            ) from exc
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


# ---------------------------------------------------------------- what a single setting must be


SEED_LIMIT = 2**32  # numpy's SeedSequence refuses negatives; torch seeds with seed * 1000 + step * 10 + rank


@dataclass(frozen=True)
class Check:
    """What one setting's value must be beyond its type; declared with the key (`knob`).

    A value outside it fails with `bad value V for KEY: [<explain(V)>; ]expected <expected>`.
    `invalid` holds values of the right type that the check refuses: the schema test sets every
    key to each of them (and to a value of the wrong type) and expects that one-line error.
    """

    expected: str
    ok: Callable[[Any], bool]
    invalid: tuple[Any, ...] = ()
    explain: Callable[[Any], str | None] | None = None  # why a value fails, when `expected` alone would not say

    def enforce(self, value: Any, key: str) -> None:
        if not self.ok(value):
            reason = f"{self.explain(value)}; " if self.explain else ""
            raise ConfigError(f"bad value {value!r} for {key}: {reason}expected {self.expected}")


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


def _class_order_ok(order: list[int] | None) -> bool:
    return order is None or (bool(order) and len(set(order)) == len(order) and min(order) >= 1)


# The reusable checks. CHOICE: a Literal or bool, whose type admits only valid values.
CHOICE = Check("one of the values its type lists", lambda _: True)
POSITIVE_INT = Check("a positive integer", lambda v: v >= 1, (0, -2))
COUNT = Check("0 or more", lambda v: v >= 0, (-1,))
NON_NEGATIVE = Check("a number >= 0", lambda v: v >= 0, (-1.0,))
POSITIVE = Check("a number > 0", lambda v: v > 0, (0.0, -1.0))
LEARNING_RATE = Check("a learning rate > 0", lambda v: v > 0, (0.0, -0.01))
SHARE = Check("a share in [0, 1)", lambda v: 0 <= v < 1, (1.0, -0.1))
CPUS = Check("a CPU count > 0 (fractions allowed)", lambda v: v > 0, (0.0, -1.0))
SEED = Check("a seed in [0, 2**32)", lambda v: 0 <= v < SEED_LIMIT, (-1, SEED_LIMIT))
NON_EMPTY = Check("a non-empty string", lambda v: v != "", ("",))
# Resources Ray defines itself: a worker asks for those through scaling.use_gpu / cpus_per_worker.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
RESOURCE_NAME = Check(
    f"null or a custom resource name: not empty, no whitespace, none of {', '.join(RAY_BUILTIN_RESOURCES)}",
    lambda v: v is None or (v != "" and not any(c.isspace() for c in v) and v not in RAY_BUILTIN_RESOURCES),
    ("", "CPU", "my trainer"),
)
ANY_TEXT = Check("any text", lambda _: True)  # free text whose meaning a cross-field rule checks
FOLDER_NAME = Check(
    "one folder name (not '', '.' or '..'; no '/', '\\', control characters or leading/trailing spaces; "
    "at most 200 bytes)",
    lambda v: _name_problem(v) is None,
    ("..", "a/b", " a"),
    explain=_name_problem,
)
SPLIT_NAME = Check(
    "a split name: not empty, no path separators",
    lambda v: v not in ("", ".", "..") and "/" not in v and "\\" not in v,
    ("", "../val"),
)
# eir.replay.paste fills the potential classes up to `max_instances` when fewer than `min_classes`
# were found, and gives each instance its own cell of a grid x grid split of the crop.
_PASTE_MIN, _PASTE_MAX = PasteSettings.min_classes, PasteSettings.grid**2
PASTE_INSTANCES = Check(
    f"{_PASTE_MIN}..{_PASTE_MAX} (at least the {_PASTE_MIN} classes pasting fills up to, at most one instance per cell "
    f"of the {PasteSettings.grid}x{PasteSettings.grid} grid)",
    lambda v: _PASTE_MIN <= v <= _PASTE_MAX,
    (_PASTE_MIN - 1, _PASTE_MAX + 1),
)


@dataclass(frozen=True)
class Knob:
    """A config key's check and documentation, kept in its dataclass field's metadata."""

    check: Check
    doc: str
    step0: bool  # step 0's result depends on it: part of the step-0 cache key (eir.train.cache)
    active: Callable[[ExperimentConfig], bool] | None  # whether it can change the results (None: always)


def knob(
    default: Any,
    check: Check,
    doc: str,
    *,
    step0: bool = False,
    active: Callable[[ExperimentConfig], bool] | None = None,
) -> Any:
    """A config field declared with its default, its check and its documentation in one place.

    `active`: a key it returns False for cannot change this config's results (a paste setting of a
    method that never pastes): `--resume` ignores differences in it and MLflow does not log it.
    """
    return field(default=default, metadata={"knob": Knob(check, doc, step0, active)})


def _is_ade20k(config: ExperimentConfig) -> bool:
    return config.dataset.name == "ade20k"


def _keeps_memory(config: ExperimentConfig) -> bool:
    return config.memory.kind != "none"


def _stores_instances(config: ExperimentConfig) -> bool:
    return config.memory.kind == "instances"


def _stores_images(config: ExperimentConfig) -> bool:
    return config.memory.kind == "images"


def _speed_only(_: ExperimentConfig) -> bool:
    """`active=` of a setting that changes how fast a run goes, never its results (how the stream's tasks share the
    cores): `--resume` ignores it, so a paused run can continue under other settings."""
    return False


def _pseudo_labels(config: ExperimentConfig) -> bool:
    return config.pseudo.enabled


def _pseudo_rule_is(*rules: str) -> Callable[[ExperimentConfig], bool]:
    """`active=` of a setting of some pseudo-label rules: active when pseudo-labels are on and use one of them."""
    return lambda config: config.pseudo.enabled and config.pseudo.rule in rules


def _pastes(config: ExperimentConfig) -> bool:
    return config.paste.enabled


def _distils(config: ExperimentConfig) -> bool:
    """The RSKD region matters only to a method that reads it and distils (its weight is not 0)."""
    return "loss.rskd_region" in method_class(config.method.name).option_keys and config.loss.rskd_weight != 0


def _read_by_method(key: str) -> Callable[[ExperimentConfig], bool]:
    """`active=` of a key that only some methods read: active when the run's method lists it in its option_keys."""
    return lambda config: key in method_class(config.method.name).option_keys


# ---------------------------------------------------------------- the schema


@dataclass
class DatasetConfig:
    name: Literal["synthetic", "voc", "ade20k", "camvid", "folder"] = knob(
        "synthetic", CHOICE, "the dataset; synthetic is generated under run.output_dir"
    )
    root: str = knob("", ANY_TEXT, "the raw dataset folder (required unless dataset.name=synthetic)")
    train_split: str = knob("train", SPLIT_NAME, "the split trained on")
    test_split: str = knob("val", SPLIT_NAME, "the split scored")
    image_scale: float = knob(
        1.0,
        Check("0 < scale <= 1", lambda v: 0 < v <= 1, (0.0, 1.5)),
        "resize at ingest (0.5 = half size); part of the ingest cache key",
    )
    ade_ignore_other: bool = knob(
        False,
        CHOICE,
        "ADE20K raw label 0 ('other'): false = background class 0, trained and scored among the old classes "
        "(DKD's code, which EIR forks); true = ignore (255) in training and test labels, scored nowhere "
        "(METHOD.md §1.1); part of the ingest cache key",
        active=_is_ade20k,
    )
    synthetic_num_images: int = knob(
        600,
        Check("at least 2 (a training and a validation image)", lambda v: v >= 2, (1,)),
        "images the synthetic generator makes",
    )
    synthetic_image_size: int = knob(
        112,
        Check("at least 32 pixels (the generator's textures need room)", lambda v: v >= 32, (31,)),
        "side of the synthetic images",
    )
    synthetic_seed: int = knob(0, SEED, "seed of the synthetic generator")


@dataclass
class TaskConfig:
    name: str = knob("15-1", NON_EMPTY, "the task 'B-I': B base classes, then I per step (checked against the dataset)")
    setting: Literal["overlapped", "disjoint"] = knob("overlapped", CHOICE, "which images a step trains on")
    class_order: list[int] | None = knob(  # noqa: RUF009 - the default is None, not a shared list
        None,
        Check(
            "null or a list of distinct class ids >= 1 (a permutation of the dataset's classes)",
            _class_order_ok,
            ([], [1, 1], [0, 1]),
        ),
        "the order in which steps take the classes; null = 1..K",
    )


@dataclass
class MethodConfig:
    name: Literal[METHOD_NAMES] = knob(  # one name per method module of eir/methods
        "finetune", CHOICE, "the method (eir/methods); it presets the memory and stream keys"
    )


@dataclass
class MemoryConfig:
    kind: Literal["none", "instances", "images"] = knob("none", CHOICE, "what the memory stores")
    size: int = knob(100, COUNT, "budget M: stored instances (or images) over all old classes", active=_keeps_memory)
    instance_rule: Literal["single_component", "components", "instance_masks"] = knob(
        "single_component", CHOICE, "how a label map is cut into instances", active=_stores_instances
    )
    min_area: float = knob(
        0.0,
        Check("a fraction in [0, 1)", lambda v: 0 <= v < 1, (1.0, -0.1)),
        "share of the image below which an instance is not stored",
        active=_stores_instances,
    )


@dataclass
class PseudoConfig:
    enabled: bool = knob(False, CHOICE, "label old classes with the step t-1 model's predictions")
    threshold: float = knob(
        0.7,
        Check("a sigmoid score in (0, 1)", lambda v: 0 < v < 1, (0.0, 1.0)),
        "sigmoid score a pseudo-label needs (pseudo.rule=score); the most any class's threshold can be "
        "(pseudo.rule=score_quantile)",
        active=_pseudo_rule_is("score", "score_quantile"),
    )
    rule: Literal["score", "median_entropy", "score_quantile"] = knob(
        "score",
        CHOICE,
        "which old-model predictions become pseudo-labels: score = the best old foreground class whose sigmoid "
        "reaches pseudo.threshold (EIR); median_entropy = the old argmax class where the normalised entropy is "
        "below that class's median over the step's background pixels, other background pixels ignored (PLOP; "
        "METHOD.md §4.1); score_quantile = the old argmax class c where its sigmoid reaches "
        "min(pseudo.threshold, the pseudo.quantile-quantile of c's score over the step's background pixels the "
        "old model predicts as c), per-class thresholds for sigmoid heads (METHOD.md §3.3)",
        active=_pseudo_labels,
    )
    quantile: float = knob(
        0.5,
        Check("a number in (0, 1)", lambda v: 0 < v < 1, (0.0, 1.0)),
        "score_quantile: which quantile of a class's scores sets its threshold (0.5: the median, so at least "
        "half of the background pixels the old model predicts as the class are labelled)",
        active=_pseudo_rule_is("score_quantile"),
    )
    entropy_floor: float = knob(
        0.001,
        Check("a number in [0, 1)", lambda v: 0 <= v < 1, (-0.1, 1.0)),
        "median_entropy: the least per-class threshold, in PLOP's code's entropy unit H / (C_old ln C_old ln C) "
        "(its --threshold 0.001)",
        active=_pseudo_rule_is("median_entropy"),
    )


@dataclass
class PasteConfig:
    enabled: bool = knob(False, CHOICE, "paste stored old-class instances into new images")
    probability: float = knob(
        1.0, Check("0..1", lambda v: 0 <= v <= 1, (1.5, -0.1)), "chance that an image gets pasted", active=_pastes
    )
    hard: bool = knob(False, CHOICE, "lambda = 1 instead of U(0, 1)", active=_pastes)
    max_instances: int = knob(3, PASTE_INSTANCES, "potential classes pasted per image", active=_pastes)


@dataclass
class ReplayConfig:
    ratio: float | None = knob(
        0.0,
        Check("null or a share in [0, 1)", lambda v: v is None or 0 <= v < 1, (1.0, -0.5)),
        "share of stored-instance samples in the stream; null = every stored instance once per epoch (M / (N + M))",
    )
    image_labels: Literal["stored", "current"] = knob(
        "stored",
        CHOICE,
        "labels of a replayed image: the classes learned by the step that stored it (later ones -> 0), "
        "or the current step's only (old ones -> 0: DKD-M's masking)",
        active=_stores_images,
    )
    pseudo_label: bool = knob(
        False,
        CHOICE,
        "pseudo-label the replayed images' background pixels too, by the step's pseudo.rule and thresholds "
        "(needs pseudo.enabled): under replay.image_labels=stored, classes the old model learned after an image "
        "was stored can gain labels; under current, every old object the old model sees",
        active=_stores_images,
    )


@dataclass
class LossConfig:
    bce_weight: float = knob(
        1.0,
        NON_NEGATIVE,
        "weight of the BCE term (step 0's whole loss)",
        step0=True,
        active=_read_by_method("loss.bce_weight"),
    )
    bce_old_background: Literal["push_down", "skip", "skip_old_argmax"] = knob(
        "push_down",
        CHOICE,
        "what the BCE says of the old classes on pixels step t labels background (no ground truth, pseudo-label "
        "or paste): push_down = target 0 on their channels (EIR's loss); skip = no term (MiB's unbiased background "
        "for a sigmoid loss: only a distillation that covers those pixels, loss.rskd_region all or complement, "
        "speaks for them there); skip_old_argmax = skip, and no background-channel term either where the old "
        "model's argmax is an old class (an old object below the pseudo-label threshold)",
        active=_read_by_method("loss.bce_old_background"),
    )
    rskd_weight: float = knob(
        0.0, NON_NEGATIVE, "weight of the RSKD distillation term (eir: 5)", active=_read_by_method("loss.rskd_weight")
    )
    rskd_region: Literal["new_gt", "all", "complement"] = knob(
        "new_gt", CHOICE, "pixels RSKD distils on", active=_distils
    )
    # MiB's loss (eir/methods/mib.py, METHOD.md §4.1).
    unkd_weight: float = knob(
        10.0,
        NON_NEGATIVE,
        "MiB: weight of the unbiased distillation (MiB's `--method MiB`: 10, on VOC and ADE)",
        active=_read_by_method("loss.unkd_weight"),
    )
    # DKD's loss (eir/methods/dkd.py, METHOD.md §4.1); the defaults are its VOC settings.
    pos_weight: float = knob(
        1.0,
        POSITIVE,
        "DKD: BCE weight of a new class's positive pixels at steps t >= 1 (DKD's VOC 1, its ADE config 35)",
        active=_read_by_method("loss.pos_weight"),
    )
    pos_weight_step0: float = knob(
        2.0,
        POSITIVE,
        "DKD: the same at step 0 (DKD's VOC scripts: 2); part of DKD's step-0 cache key",
        active=_read_by_method("loss.pos_weight_step0"),
    )
    kd_weight: float = knob(
        5.0,
        NON_NEGATIVE,
        "DKD: weight of the BCE distillation of the old classes' logits",
        active=_read_by_method("loss.kd_weight"),
    )
    dkd_pos_weight: float = knob(
        5.0,
        NON_NEGATIVE,
        "DKD: weight of the distillation of the old heads' positive-weight parts",
        active=_read_by_method("loss.dkd_pos_weight"),
    )
    dkd_neg_weight: float = knob(
        5.0,
        NON_NEGATIVE,
        "DKD: weight of the distillation of the old heads' negative-weight parts",
        active=_read_by_method("loss.dkd_neg_weight"),
    )
    ac_weight: float = knob(
        1.0,
        NON_NEGATIVE,
        "DKD: weight of the auxiliary background channel's loss (pushed to 0 everywhere), every step; "
        "part of DKD's step-0 cache key",
        active=_read_by_method("loss.ac_weight"),
    )
    # PLOP's Local POD (eir/methods/plop.py, METHOD.md §4.1); the defaults are its VOC settings.
    pod_weight: float = knob(
        0.01,
        NON_NEGATIVE,
        "PLOP: factor of Local POD on the backbone stages and the decoder output, times sqrt(channels / |C_t|) "
        "(PLOP's VOC --pod_factor; 0.001 in its ADE scripts)",
        active=_read_by_method("loss.pod_weight"),
    )
    pod_logits_weight: float = knob(
        0.0005,
        NON_NEGATIVE,
        "PLOP: factor of Local POD on the logits before upsampling, times sqrt(channels / |C_t|); 0 = none "
        "(PLOP's VOC setting; 0.00001 in its ADE scripts)",
        active=_read_by_method("loss.pod_logits_weight"),
    )


@dataclass
class DataConfig:
    num_cpus_per_worker: float = knob(1.0, CPUS, "CPUs of each Ray Data decode/augment/paste task")
    stream_tasks_per_core: int = knob(
        0,
        COUNT,
        "at most this many training-stream tasks at once per core, on a one-node cluster with more logical CPUs "
        "than that (the local instance); 0 = one per logical CPU (Ray Data's default; faster under a CPU trainer)",
        active=_speed_only,
    )
    pseudo_actors: int = knob(1, POSITIVE_INT, "actor-pool size of the pseudo-label inference", active=_pseudo_labels)


@dataclass
class ModelConfig:
    backbone: Literal["mobilenet_v2", "resnet50", "resnet101"] = knob(
        "mobilenet_v2", CHOICE, "the DeepLabV3 backbone", step0=True
    )
    weights: str | None = knob(
        "imagenet",
        Check("'imagenet', null, or the path of a local backbone weights file (.pth)", lambda v: v != "", ("",)),
        "backbone initialisation: 'imagenet' (torchvision), a local .pth file, or null (random)",
        step0=True,
    )
    output_stride: Literal[8, 16] = knob(16, CHOICE, "the backbone's output stride", step0=True)
    new_head_init: Literal["random", "copy_background"] = knob(
        "random", CHOICE, "how a step's new head starts", active=_read_by_method("model.new_head_init")
    )


@dataclass
class TrainConfig:
    epochs: int = knob(30, POSITIVE_INT, "epochs of step 0 (and of joint)", step0=True)
    epochs_incremental: int = knob(30, POSITIVE_INT, "epochs of each incremental step")
    batch_size: int = knob(
        16, POSITIVE_INT, "global batch, divided across the Train workers (2 or more each)", step0=True
    )
    crop_size: int = knob(96, POSITIVE_INT, "side of the square training crop", step0=True)
    lr: float = knob(0.01, LEARNING_RATE, "SGD learning rate of step 0 (and of joint)", step0=True)
    lr_incremental: float = knob(0.001, LEARNING_RATE, "SGD learning rate of the incremental steps")
    momentum: float = knob(
        0.9,
        Check("0 < momentum < 1 (Nesterov SGD)", lambda v: 0 < v < 1, (0.0, 1.0, -0.9)),
        "SGD momentum (Nesterov)",
        step0=True,
    )
    weight_decay: float = knob(1e-4, NON_NEGATIVE, "SGD weight decay", step0=True)
    scale_min: float = knob(0.5, POSITIVE, "RandomResizedCrop scale range, low end (METHOD.md §2)", step0=True)
    scale_max: float = knob(2.0, POSITIVE, "RandomResizedCrop scale range, high end", step0=True)
    amp: bool = knob(True, CHOICE, "mixed precision (takes effect on GPU only)", step0=True)
    warmup_fraction: float = knob(
        0.0, SHARE, "share of a step's iterations with a linear LR warm-up (METHOD.md §2: 0.2 on ADE)", step0=True
    )
    checkpoints_to_keep: int = knob(2, POSITIVE_INT, "epoch checkpoints Ray Train keeps")
    max_failures: int = knob(0, COUNT, "worker-group restarts Ray Train may make in a step")


@dataclass
class EvalConfig:
    protocol: Literal["full", "center_crop"] = knob(
        "full", CHOICE, "score whole images, or a resized centre crop", step0=True
    )
    crop_size: int = knob(
        512, POSITIVE_INT, "center_crop: the shorter side is resized to this, then cropped square", step0=True
    )
    batch_size: int = knob(8, POSITIVE_INT, "images per evaluation batch")


@dataclass
class ScalingConfig:
    num_workers: int = knob(1, POSITIVE_INT, "Ray Train workers of each step")
    use_gpu: bool = knob(False, CHOICE, "one GPU per Train worker")
    cpus_per_worker: float = knob(1.0, CPUS, "CPUs reserved per Train worker")
    worker_resource: str | None = knob(
        None,
        RESOURCE_NAME,
        "a custom Ray resource each Train worker also requests one unit of, so workers go only to the nodes "
        "started with it (ray start --resources='{\"NAME\": N}'; cluster/ node types); null = any node",
    )


@dataclass
class RunConfig:
    output_dir: str = knob(
        "outputs",
        Check("a folder path or URI ('.' for the working directory)", lambda v: v != "", ("",)),
        "holds the run folders, datasets, the step-0 cache and MLflow's store",
    )
    name: str = knob("run", FOLDER_NAME, "the run's folder under run.output_dir")
    step0_cache: bool = knob(True, CHOICE, "reuse (and fill) <output_dir>/cache/step0/")


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
    seed: int = knob(0, SEED, "seed of the run (sampling, initialisation, augmentation)", step0=True)

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


@dataclass(frozen=True)
class SchemaKey:
    """One key of the schema: its flat name, type annotation, default and `Knob`."""

    key: str
    annotation: Any
    default: Any
    knob: Knob


@functools.cache
def schema() -> tuple[SchemaKey, ...]:
    """Every config key in declaration order (sections, then their keys); the one list the rest derive from."""
    keys = []

    def walk(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                keys.append(SchemaKey(f"{prefix}{f.name}", hints[f.name], f.default, f.metadata["knob"]))

    walk(ExperimentConfig, "")
    return tuple(keys)


def valid_keys() -> list[str]:
    return sorted(entry.key for entry in schema())


def step0_keys() -> tuple[str, ...]:
    """The keys step 0's result depends on (method, memory and incremental settings deliberately absent)."""
    return tuple(entry.key for entry in schema() if entry.knob.step0)


def inactive_keys(config: ExperimentConfig) -> set[str]:
    """Keys that cannot change this config's results (e.g. paste settings of a method that never pastes).

    `--resume` ignores differences in them, so adding a knob's value to a shared base file does
    not lock out runs of methods that never read it.
    """
    return {entry.key for entry in schema() if entry.knob.active is not None and not entry.knob.active(config)}


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
        raise ConfigError(
            f"bad value {parent!r} for inherit in {path}: expected the path of a YAML file (relative to {path})"
        )
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
        raise ConfigError(
            f"bad value {weights!r} for model.weights: {expected}; URIs are not read, copy the file to a local path"
        )
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


def check_name(value: str, key: str) -> None:
    """A run or sweep name becomes one folder under the output dir: it must be a single path component.

    `..`, a separator or a NUL would place files outside the output dir (or fail deep inside the
    file system); control characters and edge spaces make names that cannot be typed back.
    """
    FOLDER_NAME.enforce(value, key)


# ---------------------------------------------------------------- rules over several keys


def _batch_fits_the_workers(config: ExperimentConfig) -> None:
    """The global batch splits evenly across the Train workers, and BatchNorm sees two images or more.

    Step 0 trains BatchNorm, and ASPP's image-pooling branch has one value per image and channel:
    torch refuses a training batch of one there. SyncBatchNorm (several GPU workers) pools the
    workers' images; otherwise each worker's share of the batch must hold two.
    """
    batch, workers = config.train.batch_size, config.scaling.num_workers
    if batch % workers:
        raise ConfigError(
            f"train.batch_size={batch} does not divide across scaling.num_workers={workers}: "
            "the global batch must be a multiple of the worker count"
        )
    synced = config.scaling.use_gpu and workers > 1
    if (batch if synced else batch // workers) < 2:
        raise ConfigError(
            f"train.batch_size={batch} gives each of the scaling.num_workers={workers} Train worker(s) "
            f"{batch // workers} image per batch: step 0 trains BatchNorm, whose image-pooling branch "
            f"needs at least 2 (expected train.batch_size >= {2 * workers})"
        )


def _scale_range_is_ordered(config: ExperimentConfig) -> None:
    low, high = config.train.scale_min, config.train.scale_max
    if low > high:
        raise ConfigError(
            f"bad values train.scale_min={low!r}, train.scale_max={high!r}: expected 0 < scale_min <= scale_max"
        )


def _task_is_valid(config: ExperimentConfig) -> None:
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


def _dataset_root_is_given(config: ExperimentConfig) -> None:
    if config.dataset.name != "synthetic" and not config.dataset.root:
        raise ConfigError(f"dataset.root is required for dataset.name={config.dataset.name!r} (the raw dataset folder)")


def _extras_have_the_instance_store(config: ExperimentConfig) -> None:
    """Pasting and instance replay draw from the instance store; another memory kind has none."""
    needs_instances = {"paste.enabled": config.paste.enabled, "replay.ratio": config.replay.ratio != 0}
    for key, used in needs_instances.items():
        if used and config.memory.kind != "instances":
            raise ConfigError(
                f"{key} needs the instance store, but memory.kind={config.memory.kind!r} "
                f"(method {config.method.name!r})"
            )


# Datasets whose readers give instance maps: VOC's SegmentationObject folder (the synthetic generator
# writes the VOC layout); CamVid, ADE20K and folder datasets have class masks only.
DATASETS_WITH_INSTANCE_MAPS = ("voc", "synthetic")


def _warn_of_old_classes_left_unheld(config: ExperimentConfig) -> None:
    """`loss.bce_old_background=skip` (or `skip_old_argmax`) leaves the old classes on unlabelled background to the
    distillation; where no distillation covers those pixels they get no signal there at all: allowed (an ablation),
    never silently."""
    if "loss.bce_old_background" not in method_class(config.method.name).option_keys:
        return
    rule = config.loss.bce_old_background
    if rule != "push_down" and (not _distils(config) or config.loss.rskd_region == "new_gt"):
        held = "no distillation" if not _distils(config) else "RSKD only on new-class pixels (loss.rskd_region=new_gt)"
        warnings.warn(
            f"loss.bce_old_background={rule} with {held} (method {config.method.name!r}): nothing trains the old "
            "classes on the step's unlabelled background; loss.rskd_region=all or complement distils there",
            stacklevel=3,
        )


def _replayed_pseudo_labels_have_a_rule(config: ExperimentConfig) -> None:
    """Replayed images are labelled by the step's own pseudo-label pass (its rule, model and thresholds), so
    asking for them without that pass would silently label nothing."""
    if _stores_images(config) and config.replay.pseudo_label and not config.pseudo.enabled:
        raise ConfigError(
            "replay.pseudo_label=true labels replayed images by the step's pseudo-labelling, but "
            f"pseudo.enabled=false (method {config.method.name!r}); set pseudo.enabled=true as well"
        )


def _instance_masks_exist(config: ExperimentConfig) -> None:
    """The instance_masks rule reads instance maps; without them the store build fails after step 0 has trained."""
    rule, dataset = config.memory.instance_rule, config.dataset.name
    if _stores_instances(config) and rule == "instance_masks" and dataset not in DATASETS_WITH_INSTANCE_MAPS:
        raise ConfigError(
            f"memory.instance_rule={rule!r} needs instance maps, which dataset.name={dataset!r} does not "
            "have; use 'components' or 'single_component'"
        )


def _warn_of_an_empty_memory(config: ExperimentConfig) -> None:
    """memory.size=0 is allowed (a sweep may include M = 0 as its no-memory point), but never silently."""
    if config.memory.size == 0 and config.memory.kind != "none":
        warnings.warn(
            f"memory.size=0 with method {config.method.name!r}: nothing is stored, so replay and pasting have "
            "nothing to draw from; the run is this method without a memory",
            stacklevel=3,
        )


def _the_method_reads_its_stream_extras(config: ExperimentConfig) -> None:
    """A stream extra the method's loss does not read is refused: pasted maps under a loss that never looks at
    them, or pseudo-labels of a rule it does not expect (PLOP's rejected pixels, REJECTED_PSEUDO, break every
    other loss; the sigmoid score rule means nothing on softmax logits) would fail late or mislead silently."""
    method = method_class(config.method.name)
    used = {
        "paste": config.paste.enabled or config.replay.ratio != 0,
        f"pseudo:{config.pseudo.rule}": config.pseudo.enabled,
    }
    for extra, on in used.items():
        if on and extra not in method.stream_extras:
            readers = sorted(name for name, cls in METHODS.items() if extra in cls.stream_extras)
            what = (
                "paste.enabled / replay.ratio (pasted targets)"
                if extra == "paste"
                else f"pseudo.enabled with pseudo.rule={config.pseudo.rule!r}"
            )
            raise ConfigError(
                f"{what}: method {config.method.name!r} does not read it (its loss reads "
                f"{', '.join(sorted(method.stream_extras)) or 'no stream extra'}); the methods that do: "
                f"{', '.join(readers)}"
            )


RULES: tuple[Callable[[ExperimentConfig], None], ...] = (
    _batch_fits_the_workers,
    _scale_range_is_ordered,
    _task_is_valid,
    _dataset_root_is_given,
    _extras_have_the_instance_store,
    _replayed_pseudo_labels_have_a_rule,
    _warn_of_old_classes_left_unheld,
    _instance_masks_exist,
    _the_method_reads_its_stream_extras,
    _warn_of_an_empty_memory,
)


def validate(config: ExperimentConfig) -> None:
    """Every key's own check (its `Knob`), then the rules over several keys; the first failure is a ConfigError.

    Types and finiteness were checked as the values were read (`_coerce`).
    """
    flat = config.flat()
    for entry in schema():
        entry.knob.check.enforce(flat[entry.key], entry.key)
    for rule in RULES:
        rule(config)


def describe_keys() -> str:
    """Every key with its default, allowed values or range, and what it does, for `run --help`."""
    preset = {key for cls in METHODS.values() for key in cls.presets}
    lines = []
    for entry in schema():
        annotation = entry.annotation
        if get_origin(annotation) is Literal:
            allowed = " | ".join(map(str, get_args(annotation)))
        elif entry.knob.check in (CHOICE, ANY_TEXT):
            allowed = ""
        else:
            allowed = entry.knob.check.expected
        notes = [entry.knob.doc]
        notes += ["part of the step-0 cache key"] if entry.knob.step0 else []
        notes += ["set by method.name unless given"] if entry.key in preset else []
        lines.append(f"  {entry.key} = {entry.default!r}" + (f"  [{allowed}]" if allowed else ""))
        lines.append(f"      {'; '.join(notes)}")
    return "\n".join(lines)


def dump_yaml(config: ExperimentConfig) -> str:
    return yaml.dump(config.to_dict(), Dumper=_Dumper, sort_keys=False)


__all__ = [
    "RULES",
    "Check",
    "ConfigError",
    "ExperimentConfig",
    "Knob",
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
    "schema",
    "step0_keys",
    "valid_keys",
    "validate",
]
