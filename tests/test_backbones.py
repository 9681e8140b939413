"""Backbones IBN users bring: frozen BN (detection), SyncBatchNorm (multi-GPU), wrappers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import FrozenBatchNormAct2d
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from ibnify.core.layers import IBN, IBNAct, freeze_instance_norms
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
