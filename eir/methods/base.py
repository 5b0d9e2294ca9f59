"""What a continual-segmentation method decides, as one unit the training loop calls.

A method says: which config values it sets (its memory kind and stream extras: pseudo-labels,
paste, replay), whether it trains on the joint schedule, which config keys its workers read,
whether it needs the frozen step t−1 model, its loss terms and their weights, how a new step's
head starts, and how logits become a class map. The worker loop (`eir.train.worker`) calls these
and branches on nothing else, so a new method is one new module in this package plus its tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from eir.metrics import predict as sigmoid_predict

if TYPE_CHECKING:  # the model module imports the weights resolver and, through it, the config
    from eir.model import IncrementalDeepLabV3


@dataclass(frozen=True)
class StepShape:
    """The channel layout of the model a step trains: background, then one head per step."""

    step: int
    head_sizes: tuple[int, ...]  # |C_0|, …, |C_t|

    @property
    def num_channels(self) -> int:
        return 1 + sum(self.head_sizes)

    @property
    def old_num_channels(self) -> int:
        """Channels of the step t−1 model (background included)."""
        return 1 + sum(self.head_sizes[:-1])

    @property
    def current_channels(self) -> tuple[int, ...]:
        """The channels of C_t, the classes this step learns."""
        return tuple(range(self.old_num_channels, self.num_channels))


@dataclass
class LossInputs:
    """One training batch as the loss sees it, on the trainer's device.

    `label` is the step-t label map in channel space (pseudo-labels merged, 255 = ignore) before
    pasting; `paste_class`/`paste_weight` say what was pasted where (None when the stream does not
    paste). `features` and `old_features` hold what the method asked the model for (`Method.features`).
    """

    logits: torch.Tensor  # B x C x H x W, float32
    label: torch.Tensor  # B x H x W, int64
    shape: StepShape
    paste_class: torch.Tensor | None = None
    paste_weight: torch.Tensor | None = None
    old_logits: torch.Tensor | None = None  # the frozen step t−1 model's, when `needs_old_model`
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    old_features: dict[str, torch.Tensor] = field(default_factory=dict)


def frozen(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy: a method's presets are shared by every run, so nothing may change them."""
    return MappingProxyType(dict(values))


class Method:
    """The base of every method. Subclasses set the class attributes and override what differs.

    `options` are the values of the config keys named in `option_keys` (flat `section.key` names),
    resolved on the driver into the step plan: workers never read the config.
    """

    name: ClassVar[str]
    # Config values the method sets, applied to every key the experiment's config leaves unset.
    presets: ClassVar[Mapping[str, Any]] = frozen({})
    # Config keys this method's workers read (its loss weights, its head initialisation, ...).
    option_keys: ClassVar[tuple[str, ...]] = ()
    # Trains every class in one step (the joint upper bound), scored with the final step's protocol.
    joint: ClassVar[bool] = False
    # Intermediate activations the loss needs (names in eir.model.FEATURES).
    features: ClassVar[tuple[str, ...]] = ()
    # What step 0 is trained with. Methods of one family train the same step 0 from the same config, so
    # they share its step-0 cache entry; another family (softmax cross-entropy, DKD's BCE) never reuses it.
    # None: the method's own name (a method that declares no family shares its step 0 with no other).
    step0_family: ClassVar[str | None] = None
    # The stream extras its loss reads: "paste" (the paste-class/weight maps of EIR's pasting and of instance
    # replay) and "pseudo:<rule>" (pseudo-labels of that `pseudo.rule` merged into the labels). The config refuses
    # an extra the method would silently ignore or misread (a sigmoid score rule on softmax logits).
    stream_extras: ClassVar[frozenset[str]] = frozenset()
    # The background head reads detached decoder features (DKD's auxiliary classifier, kept by every
    # sigmoid method here) or, False, the features themselves (softmax methods: background is a class).
    detach_background: ClassVar[bool] = True

    registry: ClassVar[dict[str, type[Method]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete method (shared bases leave `name` unset)
            if cls.name in Method.registry:
                raise TypeError(f"two methods are named {cls.name!r}: {Method.registry[cls.name]} and {cls}")
            Method.registry[cls.name] = cls

    def __init__(self, options: Mapping[str, Any]) -> None:
        missing = [key for key in self.option_keys if key not in options]
        if missing:
            raise ValueError(f"method {self.name!r} needs the options {missing}; got {sorted(options)}")
        self.options = {key: options[key] for key in self.option_keys}

    @classmethod
    def options_from(cls, flat_config: Mapping[str, Any]) -> dict[str, Any]:
        """The method's options out of a flat (`section.key`) config."""
        return {key: flat_config[key] for key in cls.option_keys}

    def step0_identity(self) -> dict[str, Any]:
        """What step 0's training depends on beyond the config's step-0 keys: the loss family and the
        options the family's step-0 loss reads. Part of the step-0 cache key."""
        return {"family": self.step0_family or self.name}

    def needs_old_model(self, step: int) -> bool:
        """Whether the loss reads the frozen step t−1 model's outputs (`LossInputs.old_logits`)."""
        return False

    def loss_weights(self, step: int) -> dict[str, float]:
        """Each loss term's weight at `step`; the terms of `loss_terms` and only those."""
        raise NotImplementedError

    def loss_terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        """The unweighted loss terms (scalars), by name: logged apart, summed with `loss_weights`."""
        raise NotImplementedError

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the terms, and the terms themselves."""
        terms = self.loss_terms(inputs)
        weights = self.loss_weights(inputs.shape.step)
        if set(terms) != set(weights):
            raise RuntimeError(f"method {self.name!r}: loss terms {sorted(terms)} but weights for {sorted(weights)}")
        total = sum(
            (weights[name] * value for name, value in terms.items()), torch.zeros((), device=inputs.logits.device)
        )
        return total, terms

    def init_new_head(self, model: IncrementalDeepLabV3, num_classes: int) -> None:
        """Add step t's head to the step t−1 model (its weights are loaded already)."""
        model.add_step_head(num_classes, init="random")

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits B x C x H x W → class map B x H x W. Default: sigmoid heads, foreground argmax, 0.5 background
        rule.
        """
        return sigmoid_predict(logits)
