"""DeepLabV3 with one classifier head per continual step (METHOD.md §2).

Layout: `backbone` (torchvision ResNet or MobileNetV2 features, dilated to the output
stride) -> `decoder` (ASPP with image pooling, then a 3x3 conv, 256 channels) -> `heads`.
`heads[0]` is a 1-channel background classifier reading *detached* decoder features, so
the background channel never shapes the shared features; `heads[1 + t]` scores the classes
C_t of step t. The heads' outputs are concatenated, so channels follow step order
(0 = background, then C_0, C_1, ...); `eir.channels.ChannelSpace` maps dataset class ids to
them. The loading functions at the end read a step's published `model.pt` (any storage).
"""

from __future__ import annotations

import io
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import models

from eir import storage
from eir.weights import IMAGENET_WEIGHTS, imagenet_file

BACKBONES = ("resnet101", "resnet50", "mobilenet_v2")
HEAD_INITS = ("random", "copy_background")
OUTPUT_STRIDES = (8, 16, 32)
DECODER_CHANNELS = 256
ASPP_RATES_AT_OS16 = (6, 12, 18)

_HEAD_KEY = re.compile(r"^heads\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this run's task, class order or backbone."""


def build_model(
    backbone: str,
    classes_per_step: Sequence[int],
    *,
    output_stride: int = 16,
    weights: str | None = "imagenet",
    new_head_init: str = "random",
    detach_background: bool = True,
) -> IncrementalDeepLabV3:
    """DeepLabV3 with heads for the given steps (`classes_per_step[t]` = |C_t|).

    `weights`: None (random backbone), "imagenet" (torchvision's ImageNet weights, found or
    fetched into the torch cache by `eir.weights.imagenet_file`) or the path of a torchvision state-dict file for that
    backbone (e.g. `mobilenet_v2-b0353104.pth`). `new_head_init` is how heads absent from a
    checkpoint are initialised by `load_previous` and `add_step_head`.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    body, channels = _build_backbone(backbone, output_stride, weights)
    stage_ends = _STAGE_ENDS["mobilenet_v2" if backbone == "mobilenet_v2" else "resnet"]
    return IncrementalDeepLabV3(
        body, channels, classes_per_step, output_stride, new_head_init, stage_ends, detach_background
    )


def _build_backbone(name: str, output_stride: int, weights: str | None) -> tuple[nn.Module, int]:
    """The feature extractor and its output channels, dilated to `output_stride`."""
    net = _torchvision_model(name, output_stride)
    if weights is not None:
        _load_backbone_file(net, imagenet_file(name) if weights == "imagenet" else Path(weights), name)
    if name == "mobilenet_v2":
        features = net.features
        _dilate_mobilenet(features, output_stride)
        return features, net.last_channel
    stages = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((stage, getattr(net, stage)) for stage in stages)), 2048


def _torchvision_model(name: str, output_stride: int) -> nn.Module:
    """The classification network, randomly initialised (weights are loaded from a file)."""
    if name == "mobilenet_v2":
        return models.mobilenet_v2(weights=None)
    # torchvision dilates whole ResNet stages instead of striding them.
    dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
    constructor = models.resnet101 if name == "resnet101" else models.resnet50
    return constructor(weights=None, replace_stride_with_dilation=dilate)


def _load_backbone_file(net: nn.Module, path: Path, name: str) -> None:
    """Load a torchvision checkpoint of the whole classification network (fc included)."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist (weights= for {name})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"{path} is not a torchvision {name} state dict (expected the file torchvision "
            f"downloads for {IMAGENET_WEIGHTS[name]}): {exc}"
        ) from exc


def _dilate_mobilenet(features: nn.Sequential, output_stride: int) -> None:
    """Trade MobileNetV2's late strides for dilation until the stride is `output_stride`.

    Each block holds one 3x3 conv (the depthwise one), which carries the block's stride.
    As in torchvision's dilated ResNets, a block whose stride would exceed the target gets
    stride 1 and keeps the current rate; every block after it uses twice the rate.
    Downsampling blocks change channel count, so none has a residual connection to break.
    """
    stride, dilation = 1, 1
    for block in features:
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        for conv in convs:
            next_dilation = dilation
            if conv.stride == (2, 2):
                if stride < output_stride:
                    stride *= 2
                    continue
                conv.stride = (1, 1)
                next_dilation = dilation * 2
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)
            dilation = next_dilation


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three atrous 3x3 branches, image pooling.

    The pooling branch applies BatchNorm to a 1x1 map, so training mode needs more than one
    image per worker (frozen BatchNorm lifts that).
    """

    def __init__(self, in_channels: int, rates: Sequence[int], out_channels: int = DECODER_CHANNELS) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates]
        )
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_channels, out_channels, 1))
        self.project = _conv_bn_relu(out_channels * (len(rates) + 2), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [branch(x) for branch in self.branches]
        outputs.append(self.pooling(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(outputs, dim=1))


# Intermediate activations `forward` can return: the backbone's output (stride 8 or 16); the outputs of
# its four stages (PLOP's Local POD reads them: ResNet's layer1..layer4, MobileNetV2's blocks ending at
# strides 4, 8, 16 and its last conv); the decoder's (ASPP + 3x3 conv, what the heads read); the heads'
# logits at the decoder's resolution, before upsampling (PLOP's POD on logits); and the heads' scores split
# by the sign of their weights, without bias, at the decoder's resolution (DKD's decomposed distillation).
STAGES = ("stage1", "stage2", "stage3", "stage4")
FEATURES = ("backbone", *STAGES, "decoder", "head_logits", "positive_logits", "negative_logits")
# The index (in the backbone's nn.Sequential) of the module that ends each stage.
_STAGE_ENDS = {"mobilenet_v2": (3, 6, 13, 18), "resnet": (4, 5, 6, 7)}


class IncrementalDeepLabV3(nn.Module):
    """DeepLabV3 whose classifier grows by one head per step; see the module docstring."""

    def __init__(
        self,
        backbone: nn.Module,
        backbone_channels: int,
        classes_per_step: Sequence[int],
        output_stride: int,
        new_head_init: str = "random",
        stage_ends: Sequence[int] = (),
        detach_background: bool = True,
    ) -> None:
        super().__init__()
        if not classes_per_step or any(n < 1 for n in classes_per_step):
            raise ValueError(f"classes_per_step must list >= 1 class per step, got {list(classes_per_step)}")
        _check_init(new_head_init)
        self.new_head_init = new_head_init
        self.output_stride = output_stride
        self.stage_ends = tuple(stage_ends)
        self.detach_background = detach_background
        self._batchnorm_frozen = False
        self.backbone = backbone
        rates = [rate * 16 // output_stride for rate in ASPP_RATES_AT_OS16]
        self.decoder = nn.Sequential(
            ASPP(backbone_channels, rates), _conv_bn_relu(DECODER_CHANNELS, DECODER_CHANNELS, 3)
        )
        for module in self.decoder.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.heads = nn.ModuleList([nn.Conv2d(DECODER_CHANNELS, 1, 1)])
        _init_random(self.heads[0])
        for num_classes in classes_per_step:
            self.add_step_head(num_classes, "random")

    @property
    def classes_per_step(self) -> list[int]:
        """|C_t| for every step the model has a head for."""
        return [head.out_channels for head in self.heads[1:]]

    @property
    def num_classes_total(self) -> int:
        """Output channels: background + every class seen so far."""
        return sum(head.out_channels for head in self.heads)

    def forward(
        self, x: torch.Tensor, features: Sequence[str] = ()
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits B x num_classes_total x H x W at the input's size (bilinear upsampling).

        With `features` (names from FEATURES) it returns (logits, {name: activation}): the
        intermediate maps a method's loss reads (a distillation on features, not only on logits).
        It goes through `forward`, so DDP's gradient hooks see those losses too.
        """
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown feature(s) {sorted(unknown)}; the model provides {', '.join(FEATURES)}")
        found: dict[str, torch.Tensor] = {}
        wants_stages = any(name in STAGES for name in features)
        if wants_stages and len(self.stage_ends) != len(STAGES):
            raise ValueError("this model was built without its backbone's stage boundaries (build it with build_model)")
        backbone = x
        for index, module in enumerate(self.backbone):
            backbone = module(backbone)
            if wants_stages and index in self.stage_ends:
                found[STAGES[self.stage_ends.index(index)]] = backbone
        decoded = self.decoder(backbone)
        background_input = decoded.detach() if self.detach_background else decoded
        logits = torch.cat([self.heads[0](background_input)] + [head(decoded) for head in self.heads[1:]], dim=1)
        upsampled = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not features:
            return upsampled
        found.update(backbone=backbone, decoder=decoded, head_logits=logits)
        if "positive_logits" in features or "negative_logits" in features:
            found["positive_logits"], found["negative_logits"] = self._decomposed_scores(background_input, decoded)
        return upsampled, {name: found[name] for name in features}

    def _decomposed_scores(
        self, background_input: torch.Tensor, decoded: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every channel's score from its head's positive (resp. negative) weights only, without bias (DKD)."""
        positive, negative = [], []
        for index, head in enumerate(self.heads):
            features = background_input if index == 0 else decoded
            positive.append(F.conv2d(features, head.weight.clamp(min=0)))
            negative.append(F.conv2d(features, head.weight.clamp(max=0)))
        return torch.cat(positive, dim=1), torch.cat(negative, dim=1)

    def add_step_head(self, num_classes: int, init: str | None = None) -> None:
        """Append a head for a new step; `init` defaults to the model's `new_head_init`.

        "random" is Kaiming-normal (EIR); "copy_background" copies the background head into
        every new channel (DKD), so new classes start from the background's current score.
        """
        if num_classes < 1:
            raise ValueError(f"a step head needs >= 1 class, got {num_classes}")
        reference = self.heads[0].weight
        head = nn.Conv2d(DECODER_CHANNELS, num_classes, 1)
        head = head.to(device=reference.device, dtype=reference.dtype)
        self.heads.append(head)
        self._init_head(len(self.heads) - 1, init or self.new_head_init)

    def _init_head(self, index: int, init: str) -> None:
        _check_init(init)
        head = self.heads[index]
        if init == "random":
            _init_random(head)
            return
        with torch.no_grad():
            head.weight.copy_(self.heads[0].weight.expand_as(head.weight))
            head.bias.copy_(self.heads[0].bias.expand_as(head.bias))

    def load_previous(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the previous step's weights; heads the checkpoint lacks are initialised fresh.

        Strict on everything else: a key the model lacks, a missing non-head key, or a shape
        that differs (a checkpoint from another task or backbone) raises a CheckpointError listing
        the keys. Fresh heads (indices beyond the checkpoint's last head) get `new_head_init`
        after loading, so "copy_background" copies the *loaded* background head.
        """
        own = self.state_dict()
        loaded_heads = {int(m.group(1)) for key in state_dict if (m := _HEAD_KEY.match(key))}
        first_new = max(max(loaded_heads, default=-1) + 1, 2)  # background and C_0 always load
        missing = [k for k in own if k not in state_dict and _head_index(k) < first_new]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = [
            f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})"
            for k, v in state_dict.items()
            if k in own and v.shape != own[k].shape
        ]
        found = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        problems = [f"{label}: {_short_list(keys)}" for label, keys in found if keys]
        if problems:
            raise CheckpointError(
                "checkpoint does not fit this model (different task, backbone or output layout?); "
                + "; ".join(problems)
            )
        self.load_state_dict(state_dict, strict=False)
        for index in range(first_new, len(self.heads)):
            self._init_head(index, self.new_head_init)

    def freeze_batchnorm(self) -> None:
        """Put every BatchNorm (SyncBatchNorm included) in eval mode and stop optimising it.

        Used at incremental steps (METHOD.md §2). Survives `.train()`, which the trainer
        calls every epoch. (The model has no dropout, the other thing §2 freezes.)
        """
        self._batchnorm_frozen = True
        for module in self._batchnorms():
            module.eval()
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> IncrementalDeepLabV3:
        super().train(mode)
        if self._batchnorm_frozen:
            for module in self._batchnorms():
                module.eval()
        return self

    def _batchnorms(self) -> Iterator[_BatchNorm]:
        return (m for m in self.modules() if isinstance(m, _BatchNorm))

    def param_groups(self, lr: float, weight_decay: float, old_weight_decay: float | None = None) -> list[dict]:
        """SGD parameter groups: backbone at `lr`, decoder (ASPP + 3x3 conv) and heads at 10 x lr.

        Only trainable parameters are listed (frozen BatchNorm drops out). At steps t > 0 pass
        `old_weight_decay=0.0`: METHOD.md §2's "0 for old parameters", read as DKD does — no
        decay on the backbone, decoder and old heads (background included), `weight_decay` on
        the newest head only. Each group carries a "name" for logging.
        """
        old_decay = weight_decay if old_weight_decay is None else old_weight_decay
        groups = [
            ("backbone", self.backbone.parameters(), lr, old_decay),
            ("decoder", self.decoder.parameters(), 10 * lr, old_decay),
            ("old_heads", self.heads[:-1].parameters(), 10 * lr, old_decay),
            ("new_head", self.heads[-1].parameters(), 10 * lr, weight_decay),
        ]
        result = []
        for name, params, group_lr, decay in groups:
            trainable = [p for p in params if p.requires_grad]
            if trainable:
                result.append({"name": name, "params": trainable, "lr": group_lr, "weight_decay": decay})
        return result


def _check_init(init: str) -> None:
    if init not in HEAD_INITS:
        raise ValueError(f"unknown head init {init!r}; expected one of {', '.join(HEAD_INITS)}")


def _init_random(head: nn.Conv2d) -> None:
    """Kaiming-normal over the 256 inputs, zero bias: new logits start near 0 (sigmoid 0.5)."""
    nn.init.kaiming_normal_(head.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(head.bias)


def _head_index(key: str) -> int:
    """A head key's head index; -1 for a key outside the heads (always required)."""
    match = _HEAD_KEY.match(key)
    return int(match.group(1)) if match else -1


def _short_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_torch(uri: str) -> dict:
    """A torch file from a local path or a URI (weights only: plain tensors and containers)."""
    return torch.load(io.BytesIO(storage.read_bytes(storage.resolve(uri))), map_location="cpu", weights_only=True)


def check_head_sizes(state: dict, expected: Sequence[int], uri: str, what: str) -> None:
    """A checkpoint of another task (or class order) has other heads: say so before loading it."""
    if list(state.get("head_sizes", [])) != list(expected):
        raise CheckpointError(
            f"checkpoint {uri} has heads {state.get('head_sizes')} but {what} of this run's task has heads "
            f"{list(expected)}: it comes from a different task or class order"
        )


def load_step_model(
    model_uri: str, backbone: str, output_stride: int, expected_heads: Sequence[int] | None = None
) -> IncrementalDeepLabV3:
    """A step's published model in eval mode; with `expected_heads`, refuse a checkpoint of another task."""
    state = load_torch(model_uri)
    if expected_heads is not None:
        check_head_sizes(state, expected_heads, model_uri, "the step evaluated")
    model = build_model(backbone, state["head_sizes"], output_stride=output_stride, weights=None)
    model.load_state_dict(state["model"])
    return model.eval()
