from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from eir.model import CheckpointError, build_model, load_step_model

WEIGHTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights" / "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def small(classes=(3, 2), **kwargs):
    return build_model("mobilenet_v2", list(classes), weights=None, **kwargs)


def test_output_channels_follow_the_heads(images):
    model = small()
    assert model.num_classes_total == 6 and model.classes_per_step == [3, 2]
    assert [head.out_channels for head in model.heads] == [1, 3, 2]
    assert model(images).shape == (2, 6, 32, 32)
    model.add_step_head(1)
    assert model.num_classes_total == 7
    assert model(images).shape == (2, 7, 32, 32)


@pytest.mark.parametrize("output_stride, side", [(8, 4), (16, 2), (32, 1)])
def test_mobilenet_output_stride(output_stride, side):
    model = small(output_stride=output_stride).eval()
    with torch.no_grad():
        assert model.backbone(torch.zeros(1, 3, 32, 32)).shape == (1, 1280, side, side)


@pytest.mark.parametrize("output_stride, rates", [(16, [6, 12, 18]), (8, [12, 24, 36])])
def test_aspp_rates_and_widths(output_stride, rates):
    """DeepLabV3: a 1x1 branch, 3x3 branches at 6/12/18 (doubled at OS 8), image pooling, 256 channels."""
    aspp, refine = small(output_stride=output_stride).decoder
    assert [branch[0].dilation[0] for branch in aspp.branches] == [1, *rates]
    assert [branch[0].kernel_size[0] for branch in aspp.branches] == [1, 3, 3, 3]
    assert isinstance(aspp.pooling[0], nn.AdaptiveAvgPool2d)
    assert {branch[0].out_channels for branch in aspp.branches} | {aspp.pooling[1][0].out_channels} == {256}
    assert aspp.project[0].in_channels == 5 * 256 and refine[0].out_channels == 256


def test_resnet50_shapes():
    model = build_model("resnet50", [2], weights=None, output_stride=8).eval()
    with torch.no_grad():
        x = torch.zeros(1, 3, 64, 64)
        assert model.backbone(x).shape == (1, 2048, 8, 8)
        assert model(x).shape == (1, 3, 64, 64)


def test_background_head_reads_detached_features(images):
    model = small()
    model(images)[:, 0].sum().backward()
    assert model.heads[0].weight.grad is not None and model.heads[0].weight.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        if not name.startswith("heads.0."):
            assert param.grad is None or param.grad.abs().sum() == 0, name


def test_load_previous_keeps_old_weights_and_inits_the_new_head():
    previous = small(classes=(3,))
    model = small(classes=(3, 2), new_head_init="copy_background")
    model.load_previous(previous.state_dict())
    for key, value in previous.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    background, new = model.heads[0], model.heads[2]
    for channel in range(2):
        assert torch.equal(new.weight[channel], background.weight[0])
        assert torch.equal(new.bias[channel], background.bias[0])


def test_load_previous_random_init_differs_from_background():
    model = small(classes=(3, 2))
    model.load_previous(small(classes=(3,)).state_dict())
    assert not torch.equal(model.heads[2].weight[0], model.heads[0].weight[0])
    assert model.heads[2].bias.abs().sum() == 0


def test_load_previous_rejects_another_task():
    model = small(classes=(3, 2))
    expected = r"heads\.1\.weight \(checkpoint \(4, 256, 1, 1\), model \(3, 256, 1, 1\)\)"
    with pytest.raises(ValueError, match=expected):
        model.load_previous(small(classes=(4,)).state_dict())
    state = small(classes=(3,)).state_dict()
    del state["decoder.1.0.weight"]
    with pytest.raises(ValueError, match=r"missing: decoder\.1\.0\.weight"):
        model.load_previous(state)
    with pytest.raises(ValueError, match=r"unexpected: heads\.3\.weight"):
        model.load_previous(small(classes=(3, 2, 1)).state_dict())


def test_add_step_head_copy_background():
    model = small(classes=(3,))
    model.add_step_head(2, init="copy_background")
    assert torch.equal(model.heads[2].weight, model.heads[0].weight.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="random, copy_background"):
        model.add_step_head(1, init="zeros")


def test_freeze_batchnorm_survives_train(images):
    model = small()
    model.freeze_batchnorm()
    model.train()
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and all(not m.training for m in batchnorms)
    assert all(not p.requires_grad for m in batchnorms for p in m.parameters())
    assert model.heads[1].training
    before = batchnorms[0].running_mean.clone()
    model(images)
    assert torch.equal(batchnorms[0].running_mean, before)
    assert model(images[:1]).shape == (1, 6, 32, 32)  # batch 1 trains once BN is frozen


def test_param_groups():
    model = small()
    model.freeze_batchnorm()
    groups = model.param_groups(0.01, 1e-4, old_weight_decay=0.0)
    by_name = {group["name"]: group for group in groups}
    assert by_name["backbone"]["lr"] == 0.01
    assert all(by_name[n]["lr"] == pytest.approx(0.1) for n in ("decoder", "old_heads", "new_head"))
    assert [by_name[n]["weight_decay"] for n in ("backbone", "decoder", "old_heads", "new_head")] == [
        0.0,
        0.0,
        0.0,
        1e-4,
    ]
    listed = [id(p) for group in groups for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable)  # every trainable parameter exactly once
    torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True)
    assert {g["weight_decay"] for g in small().param_groups(0.01, 1e-4)} == {1e-4}


def test_unknown_backbone_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="resnet101, resnet50, mobilenet_v2"):
        build_model("vgg16", [3], weights=None)
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_model("mobilenet_v2", [3], weights=str(missing))


def test_weights_file_is_loaded():
    if not WEIGHTS.is_file():
        pytest.skip(f"{WEIGHTS} is absent")
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    model = build_model("mobilenet_v2", [3], weights=str(WEIGHTS))
    assert torch.equal(model.backbone[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(model.backbone[17].conv[1][0].weight, state["features.17.conv.1.0.weight"])


def test_weights_file_of_another_network(tmp_path):
    wrong = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not a torchvision mobilenet_v2 state dict"):
        build_model("mobilenet_v2", [3], weights=str(wrong))


def test_freeze_batchnorm_covers_sync_batchnorm():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(small())
    model.freeze_batchnorm()
    model.train()
    syncs = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert syncs and all(not m.training and not m.weight.requires_grad for m in syncs)


def _publish(model, path: Path) -> str:
    """What a finished step writes: its weights and head sizes in one torch file."""
    torch.save({"model": model.state_dict(), "head_sizes": model.classes_per_step}, path)
    return str(path)


def test_a_published_step_model_loads_in_eval_mode_with_its_weights(tmp_path, images):
    model = small(classes=(3, 2)).eval()
    loaded = load_step_model(_publish(model, tmp_path / "model.pt"), "mobilenet_v2", 16, expected_heads=[3, 2])
    assert not loaded.training and loaded.classes_per_step == [3, 2]
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_a_step_model_of_another_task_is_refused_by_its_heads(tmp_path):
    uri = _publish(small(classes=(3, 2)), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"has heads \[3, 2\] but the step evaluated .* has heads \[4, 1\]"):
        load_step_model(uri, "mobilenet_v2", 16, expected_heads=[4, 1])
