"""Backbones IBN users bring: frozen BN (detection), SyncBatchNorm (multi-GPU), wrappers."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import FrozenBatchNormAct2d
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FrozenBatchNorm2d

import ibnify
from ibnify.core.layers import IBN, IBNAct, freeze_instance_norms
from ibnify.core.reasons import Reason, ReasonCode
from tests.helpers import randomize_norms


def _frozen(channels: int, seed: int = 0) -> FrozenBatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    bn = FrozenBatchNorm2d(channels)
    bn.weight.copy_(0.5 + torch.rand(channels, generator=generator))
    bn.bias.copy_(torch.rand(channels, generator=generator) - 0.5)
    bn.running_mean.copy_(torch.rand(channels, generator=generator) - 0.5)
    bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    return bn


def _reference(x: torch.Tensor, bn: nn.Module, half: int) -> torch.Tensor:
    """IN (affine from the BN's first ``half`` gammas/betas) on the first half, frozen BN after."""
    inst = F.instance_norm(x[:, :half], weight=bn.weight[:half], bias=bn.bias[:half], eps=bn.eps)
    scale = bn.weight[half:] * (bn.running_var[half:] + bn.eps).rsqrt()
    shift = bn.bias[half:] - bn.running_mean[half:] * scale
    frozen = x[:, half:] * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return torch.cat([inst, frozen], 1)


@pytest.mark.parametrize("channels", [8, 13])
def test_frozen_batchnorm_becomes_ibn_with_a_frozen_bn_half(channels: int) -> None:
    bn = _frozen(channels)
    ibn = IBN.from_batchnorm(bn, ratio=0.5)
    half = channels // 2
    assert isinstance(ibn.BN, FrozenBatchNorm2d)
    assert list(ibn.state_dict()) == [
        "IN.weight",
        "IN.bias",
        "BN.weight",
        "BN.bias",
        "BN.running_mean",
        "BN.running_var",
    ]
    assert torch.equal(ibn.BN.running_var, bn.running_var[half:])
    # the BN half has no parameters; the IN affine is trainable unless frozen
    assert [name for name, p in ibn.named_parameters() if p.requires_grad] == [
        "IN.weight",
        "IN.bias",
    ]
    x = torch.randn(2, channels, 5, 6)
    for mode in (True, False):  # a frozen BN computes the same in train and eval mode
        ibn.train(mode)
        torch.testing.assert_close(ibn(x), _reference(x, bn, half), atol=1e-5, rtol=1e-5)
    assert freeze_instance_norms(ibn) == 1
    assert not any(p.requires_grad for p in ibn.parameters())


def test_timm_frozen_batchnorm_act_keeps_its_activation() -> None:
    bn = FrozenBatchNormAct2d(10, act_layer=nn.ReLU)
    reference = _frozen(10, seed=3)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).copy_(getattr(reference, name))
    ibn = IBNAct.from_batchnorm(bn, ratio=0.5)
    assert isinstance(ibn.BN, FrozenBatchNorm2d) and isinstance(ibn.act, nn.ReLU)
    x = torch.randn(3, 10, 4, 4)
    torch.testing.assert_close(ibn(x), _reference(x, reference, 5).relu(), atol=1e-5, rtol=1e-5)


def test_sync_batchnorm_half_stays_sync_with_its_slice() -> None:
    bn = randomize_norms(nn.SyncBatchNorm(12))
    ibn = IBN.from_batchnorm(bn, ratio=0.25)
    assert type(ibn.BN) is nn.SyncBatchNorm and ibn.BN.num_features == 9
    assert torch.equal(ibn.BN.running_mean, bn.running_mean[3:])
    assert torch.equal(ibn.IN.weight.detach(), bn.weight.detach()[:3])
    plain = IBN.from_batchnorm(
        nn.BatchNorm2d(12).eval().load_state_dict(bn.state_dict()) and nn.BatchNorm2d(12),
        ratio=0.25,
    )
    assert type(plain.BN) is nn.BatchNorm2d


# --------------------------------------------------------------------------- whole models

SIZE = 64


class _ReferenceFrozenIBN(nn.Module):
    """Hand-built IBN over a frozen BN: IN (affine from its gammas/betas) on the first half."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn, self.half = bn, bn.weight.numel() // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _reference(x, self.bn, self.half)


class _ReferenceIBN(nn.Module):
    """Hand-built IBN over a plain BN in eval mode (running statistics on the BN half)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.bn, self.half = bn, bn.num_features // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, h = self.bn, self.half
        first = F.instance_norm(x[:, :h], weight=bn.weight[:h], bias=bn.bias[:h], eps=bn.eps)
        second = F.batch_norm(
            x[:, h:], bn.running_mean[h:], bn.running_var[h:], bn.weight[h:], bn.bias[h:]
        )
        return torch.cat([first, second], 1)


def _hand_converted(model: nn.Module, names: list[str], wrap: type[nn.Module]) -> nn.Module:
    reference = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = reference.get_submodule(parent)
        setattr(owner, child, wrap(getattr(owner, child)))
    return reference.eval()


def _bn1_sites(prefix: str, blocks: tuple[int, ...]) -> list[str]:
    return [
        f"{prefix}layer{k}.{i}.bn1" for k, count in enumerate(blocks, start=1) for i in range(count)
    ]


def _randomize_frozen(model: nn.Module) -> nn.Module:
    for index, module in enumerate(model.modules()):
        if isinstance(module, FrozenBatchNorm2d):
            fresh = _frozen(module.weight.numel(), seed=index)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(module, name).copy_(getattr(fresh, name))
    return model


def test_detection_backbone_with_frozen_batchnorm_converts_and_keeps_frozen_halves() -> None:
    """torchvision's Faster R-CNN body: a ResNet with FrozenBatchNorm2d inside BackboneWithFPN."""
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5
    )
    _randomize_frozen(backbone).eval()
    plan = ibnify.plan(backbone, input_size=(3, SIZE, SIZE))
    expected = _bn1_sites("body.", (2, 2, 2))
    assert plan.layout == "resnet-a" and [s.name for s in plan.sites] == expected
    assert plan.param_delta == sum(2 * s.in_channels for s in plan.sites)  # IN affine is new
    converted = ibnify.convert(backbone, input_size=(3, SIZE, SIZE)).eval()
    half = converted.get_submodule("body.layer2.0.bn1")
    original = backbone.get_submodule("body.layer2.0.bn1")
    assert isinstance(half.BN, FrozenBatchNorm2d)
    assert torch.equal(half.BN.running_mean, original.running_mean[64:])
    reference = _hand_converted(backbone, expected, _ReferenceFrozenIBN)
    x = torch.randn(2, 3, SIZE, SIZE)
    got, want = converted(x), reference(x)
    assert list(got) == list(want) == ["0", "1", "2", "3", "pool"]
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("builder", ["deeplabv3_resnet50", "fcn_resnet50"])
def test_segmentation_models_get_the_published_layout_in_their_backbone(builder: str) -> None:
    """DeepLab/FCN dilate layer2-4 (one resolution); stages still follow layer{k}."""
    model = getattr(torchvision.models.segmentation, builder)(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False
    )
    randomize_norms(model).eval()
    plan = ibnify.plan(model, input_size=(3, SIZE, SIZE))
    expected = _bn1_sites("backbone.", (3, 4, 6))
    assert plan.layout == "resnet-a" and [s.name for s in plan.sites] == expected
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons[
        "classifier.0.project.1" if builder == "deeplabv3_resnet50" else "classifier.1"
    ] == Reason(ReasonCode.OUTSIDE_BODY)
    assert reasons["backbone.layer4.0.bn1"] == Reason(ReasonCode.STAGE_NOT_CHOSEN, value=4)
    if builder == "fcn_resnet50":
        converted = ibnify.convert(model, input_size=(3, SIZE, SIZE)).eval()
        reference = _hand_converted(model, expected, _ReferenceIBN)
        x = torch.randn(2, 3, SIZE, SIZE)
        torch.testing.assert_close(converted(x)["out"], reference(x)["out"], atol=1e-4, rtol=1e-4)


def test_dilated_resnet_and_reid_last_stride_one_keep_the_published_sites() -> None:
    dilated = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    assert [s.name for s in ibnify.plan(dilated, input_size=(3, SIZE, SIZE)).sites] == (
        _bn1_sites("", (3, 4, 6))
    )
    reid = torchvision.models.resnet50()
    reid.layer4[0].conv2.stride = (1, 1)  # fast-reid / torchreid: last stride 1
    reid.layer4[0].downsample[0].stride = (1, 1)
    plan = ibnify.plan(reid, input_size=(3, SIZE, SIZE))
    assert [s.name for s in plan.sites] == _bn1_sites("", (3, 4, 6))


def test_sync_batchnorm_model_keeps_sync_halves_and_computes_like_the_plain_one() -> None:
    plain = randomize_norms(torchvision.models.resnet18()).eval()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)).eval()
    a = ibnify.convert(plain, input_size=(3, SIZE, SIZE)).eval()
    b = ibnify.convert(synced, input_size=(3, SIZE, SIZE)).eval()
    assert type(b.layer1[0].bn1.BN) is nn.SyncBatchNorm
    assert type(a.layer1[0].bn1.BN) is nn.BatchNorm2d
    assert list(a.state_dict()) == list(b.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["timm_features_only", "intermediate_layer_getter", "fx"])
def test_feature_extractors_convert_every_output(kind: str) -> None:
    if kind == "timm_features_only":
        model = timm.create_model("resnet18", features_only=True)
    elif kind == "intermediate_layer_getter":
        model = IntermediateLayerGetter(
            torchvision.models.resnet18(), {"layer1": "c1", "layer3": "c3", "layer4": "c4"}
        )
    else:
        model = create_feature_extractor(torchvision.models.resnet18(), ["layer2", "layer4"])
    randomize_norms(model).eval()
    plan = ibnify.plan(model, input_size=(3, SIZE, SIZE))
    expected = _bn1_sites("", (2, 2, 2))
    assert plan.layout == "resnet-a" and [s.name for s in plan.sites] == expected
    converted = ibnify.convert(model, input_size=(3, SIZE, SIZE)).eval()
    reference = _hand_converted(model, expected, _ReferenceIBN)
    x = torch.randn(2, 3, SIZE, SIZE)
    got, want = converted(x), reference(x)
    got = list(got.values()) if isinstance(got, dict) else list(got)
    want = list(want.values()) if isinstance(want, dict) else list(want)
    assert len(got) == len(want) >= 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
