"""The IBN layer: Instance Normalization on some channels, Batch Normalization on the rest.

Layout follows the IBN-Net reference code so that its published checkpoints load: submodules are
named ``IN`` and ``BN`` and the split sizes are the reference's. Unlike the reference, the split is
by explicit sizes, so odd channel counts and ratios above 0.5 work.
"""

from __future__ import annotations

import copy
import math
from typing import Literal, Self

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from .ops import NormKind, is_frozen_batchnorm, register_norm_kind

__all__ = [
    "IBN",
    "IBNAct",
    "InstanceNormAct2d",
    "Order",
    "batchnorm_channels",
    "freeze_instance_norms",
    "ibn_split_sizes",
    "instance_norm_from_batchnorm",
]

Order = Literal["in_first", "bn_first"]
_ORDERS = ("in_first", "bn_first")


def ibn_split_sizes(num_features: int, ratio: float, order: Order = "in_first") -> tuple[int, int]:
    """Return ``(in_channels, bn_channels)`` for an IBN over ``num_features`` channels.

    ``ratio`` is the fraction of channels that get Instance Normalization. IN-first (ResNet
    IBN-a) gives IN ``int(C * ratio)`` channels; BN-first (DenseNet IBN-a) gives BN
    ``int(C * (1 - ratio))`` channels, exactly as the IBN-Net reference code rounds.
    """
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not math.isfinite(ratio):
        raise ValueError(f"IBN ratio must be a finite number, got {ratio!r} (C={num_features})")
    if not isinstance(num_features, int) or num_features < 2:
        raise ValueError(f"IBN needs at least 2 channels, got C={num_features} (ratio={ratio})")
    if order == "in_first":
        in_channels = int(num_features * ratio)
        bn_channels = num_features - in_channels
    else:
        bn_channels = int(num_features * (1 - ratio))
        in_channels = num_features - bn_channels
    if in_channels < 1 or bn_channels < 1:
        raise ValueError(
            f"ratio={ratio} leaves an empty half for C={num_features} "
            f"(IN {in_channels}, BN {bn_channels} channels); choose a ratio in (0, 1) that "
            "gives both halves at least one channel"
        )
    return in_channels, bn_channels


@register_norm_kind(NormKind.IBN)
class IBN(nn.Module):
    """Instance-Batch Normalization over the channel dimension of an NCHW tensor.

    Accepts the leading arguments of :class:`torch.nn.BatchNorm2d`, so
    ``functools.partial(IBN, ratio=0.5)`` works as a ``norm_layer`` for torchvision and timm.

    Args:
        num_features: channels C of the input.
        ratio: fraction of channels normalised by InstanceNorm2d.
        eps, momentum, affine, track_running_stats: as for BatchNorm2d (IN is always affine and
            never tracks running stats, which keeps it exportable with a dynamic batch).
        order: ``"in_first"`` (ResNet IBN-a: IN on the first channels) or ``"bn_first"``
            (DenseNet IBN-a: BN on the first channels).
    """

    def __init__(
        self,
        num_features: int,
        ratio: float = 0.5,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        order: Order = "in_first",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build the IN and BN halves for ``num_features`` channels.
        Reason: BatchNorm2d's constructor keywords, plus ``ratio`` and ``order``, so that
        ``functools.partial(IBN, ratio=0.5)`` is a ``norm_layer`` torchvision and timm call as
        they call BatchNorm2d.
        """
        super().__init__()
        in_channels, bn_channels = ibn_split_sizes(num_features, ratio, order)
        self.num_features = num_features
        self.ratio = float(ratio)
        self.order: Order = order
        self.in_channels = in_channels
        self.bn_channels = bn_channels
        first, second = (
            (in_channels, bn_channels) if order == "in_first" else (bn_channels, in_channels)
        )
        self.split_sizes: tuple[int, int] = (first, second)
        factory = {"device": device, "dtype": dtype}
        self.IN = nn.InstanceNorm2d(
            in_channels, eps=eps, affine=True, track_running_stats=False, **factory
        )
        self.BN = nn.BatchNorm2d(
            bn_channels,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            **factory,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = torch.split(x, self.split_sizes, dim=1)
        if self.order == "in_first":
            return torch.cat((self.IN(first), self.BN(second)), dim=1)
        return torch.cat((self.BN(first), self.IN(second)), dim=1)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, ratio={self.ratio}, order={self.order}, "
            f"IN={self.in_channels}, BN={self.bn_channels}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def in_slice(self) -> slice:
        """Channel range of the IN half within the full tensor."""
        if self.order == "in_first":
            return slice(0, self.in_channels)
        return slice(self.bn_channels, self.num_features)

    def bn_slice(self) -> slice:
        """Channel range of the BN half within the full tensor."""
        if self.order == "in_first":
            return slice(self.in_channels, self.num_features)
        return slice(0, self.bn_channels)

    @classmethod
    def from_batchnorm(
        cls,
        bn: nn.Module,
        ratio: float = 0.5,
        order: Order = "in_first",
    ) -> Self:
        """Build an IBN that starts from a trained BatchNorm (plain, sync or frozen).

        The BN half keeps its slice of ``weight, bias, running_mean, running_var`` and the IN
        half's affine takes the matching ``gamma, beta`` slice; mode, device and dtype follow
        ``bn``. The BN half is of ``bn``'s kind: a ``SyncBatchNorm`` stays synchronised and a
        frozen BN (detection backbones) stays a ``FrozenBatchNorm2d``. A tensor of ``bn`` with
        ``requires_grad=False`` gives frozen halves (both IN and BN: frozen stays frozen); the IN
        half of a ``FrozenBatchNorm2d`` (buffers, no parameters) trains (see
        :func:`freeze_instance_norms`).
        """
        kwargs = {**_batchnorm_kwargs(bn), **cls._kwargs_from(bn)}
        ibn = cls(batchnorm_channels(bn), ratio=ratio, order=order, **kwargs)
        ibn.BN = _bn_half_like(bn, ibn.bn_channels)
        ibn.copy_from_batchnorm(bn)
        return ibn

    @classmethod
    def _kwargs_from(cls, bn: nn.Module) -> dict:
        """Constructor arguments a subclass takes over from the BN it replaces (none here)."""
        return {}

    @torch.no_grad()
    def copy_from_batchnorm(self, bn: nn.Module) -> None:
        """Copy a BatchNorm's parameters and statistics into the two halves (see from_batchnorm)."""
        channels = batchnorm_channels(bn)
        if channels != self.num_features:
            raise ValueError(f"BatchNorm has {channels} channels, IBN expects {self.num_features}")
        ins, bns = self.in_slice(), self.bn_slice()
        weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
        if weight is not None and bias is not None:
            self.IN.weight.copy_(weight[ins])
            self.IN.bias.copy_(bias[ins])
            self.BN.weight.copy_(weight[bns])
            self.BN.bias.copy_(bias[bns])
        running_mean = getattr(bn, "running_mean", None)
        if running_mean is not None and getattr(self.BN, "running_mean", None) is not None:
            self.BN.running_mean.copy_(running_mean[bns])
            self.BN.running_var.copy_(bn.running_var[bns])
            tracked = getattr(bn, "num_batches_tracked", None)
            if tracked is not None and getattr(self.BN, "num_batches_tracked", None) is not None:
                self.BN.num_batches_tracked.copy_(tracked)
        self.train(bn.training)
        for param, source in ((self.IN.weight, weight), (self.IN.bias, bias)):
            param.requires_grad_(_trainable(source))
        for name, source in (("weight", weight), ("bias", bias)):
            param = getattr(self.BN, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(_trainable(source))


class _ActTail(nn.Module):
    """The ``drop`` then ``act`` a timm norm+act layer applies after normalising, kept by the
    layer that replaces it: a plain norm would silently drop the activation (timm #1254)."""

    def _keep_tail(self, act: nn.Module | None, drop: nn.Module | None) -> None:
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class IBNAct(_ActTail, IBN):
    """IBN that keeps the activation and dropout of a timm ``BatchNormAct2d`` it replaces, so
    the network computes what it did before."""

    def __init__(
        self,
        num_features: int,
        ratio: float = 0.5,
        act: nn.Module | None = None,
        drop: nn.Module | None = None,
        **kwargs,
    ) -> None:
        super().__init__(num_features, ratio=ratio, **kwargs)
        self._keep_tail(act, drop)

    @classmethod
    def _kwargs_from(cls, bn: nn.Module) -> dict:
        """A timm ``BatchNormAct2d``/``FrozenBatchNormAct2d``'s ``act`` and ``drop``, copied."""
        return {
            "act": copy.deepcopy(getattr(bn, "act", None)),
            "drop": copy.deepcopy(getattr(bn, "drop", None)),
        }


def _trainable(source: object) -> bool:
    """Whether a new layer's tensor copied from ``source`` trains: a frozen Parameter stays frozen.

    A buffer (a frozen BN's affine) is no Parameter: the IN half copied from it trains.
    """
    return source.requires_grad if isinstance(source, nn.Parameter) else True


def batchnorm_channels(bn: nn.Module) -> int:
    """Channels of a BatchNorm; frozen BNs (torchvision's) carry no ``num_features``."""
    channels = getattr(bn, "num_features", None)
    if isinstance(channels, int):
        return channels
    return int(bn.running_mean.numel())


def _bn_half_like(bn: nn.Module, channels: int) -> nn.Module:
    """A new BN over ``channels`` of ``bn``'s kind (plain, sync or frozen), on its device."""
    reference = getattr(bn, "running_mean", None)
    if reference is None:
        reference = bn.weight
    factory = {"device": reference.device, "dtype": reference.dtype}
    if is_frozen_batchnorm(bn):
        return FrozenBatchNorm2d(channels, eps=bn.eps).to(**factory)
    kind = nn.SyncBatchNorm if isinstance(bn, nn.SyncBatchNorm) else nn.BatchNorm2d
    return kind(
        channels,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        **factory,
    )


def freeze_instance_norms(model: nn.Module) -> int:
    """Freeze the IN halves' affine of every IBN in ``model``; returns how many were frozen.

    Detection fine-tuning freezes BN entirely; the IN half needs no running statistics, so its
    affine stays trainable by default. Call this to freeze it too.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, IBN):
            module.IN.requires_grad_(False)
            count += 1
    return count


def _batchnorm_kwargs(bn: nn.Module) -> dict:
    """Constructor arguments that make a new norm match ``bn``'s hyper-parameters and placement."""
    reference = getattr(bn, "weight", None)
    if reference is None:
        reference = getattr(bn, "running_mean", None)
    return {
        "eps": bn.eps,
        "momentum": getattr(bn, "momentum", 0.1),
        "affine": getattr(bn, "affine", True),
        "track_running_stats": getattr(bn, "track_running_stats", True),
        "device": reference.device if reference is not None else None,
        "dtype": reference.dtype if reference is not None else None,
    }


class InstanceNormAct2d(_ActTail, nn.InstanceNorm2d):
    """InstanceNorm2d plus the ``drop`` and ``act`` of the timm norm+act layer it replaces."""

    def __init__(
        self,
        num_features: int,
        act: nn.Module | None = None,
        drop: nn.Module | None = None,
        **kwargs,
    ) -> None:
        super().__init__(num_features, **kwargs)
        self._keep_tail(act, drop)


@torch.no_grad()
def instance_norm_from_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> nn.InstanceNorm2d:
    """Replace a BatchNorm by an affine InstanceNorm2d (IBN-b stem) that takes its gamma/beta.

    A timm ``BatchNormAct2d`` becomes an :class:`InstanceNormAct2d` so its activation survives.
    """
    kwargs = _batchnorm_kwargs(bn)
    factory = {"device": kwargs["device"], "dtype": kwargs["dtype"]}
    if hasattr(bn, "act") and isinstance(bn.act, nn.Module):
        norm: nn.InstanceNorm2d = InstanceNormAct2d(
            batchnorm_channels(bn),
            act=copy.deepcopy(bn.act),
            drop=copy.deepcopy(getattr(bn, "drop", None)),
            eps=bn.eps,
            affine=True,
            track_running_stats=False,
            **factory,
        )
    else:
        norm = nn.InstanceNorm2d(
            batchnorm_channels(bn), eps=bn.eps, affine=True, track_running_stats=False, **factory
        )
    if getattr(bn, "weight", None) is not None and getattr(bn, "bias", None) is not None:
        norm.weight.copy_(bn.weight)
        norm.bias.copy_(bn.bias)
        norm.weight.requires_grad_(_trainable(bn.weight))
        norm.bias.requires_grad_(_trainable(bn.bias))
    norm.train(bn.training)
    return norm
