"""The one op classifier: additions in every spelling, concat, split, views, convs, norm kinds."""

from __future__ import annotations

import pytest
import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d
from torch import fx, nn
from torchvision.ops import FrozenBatchNorm2d

import ibnify
from ibnify.core.graph import Role, analyze, trace
from ibnify.core.layers import IBN, IBNAct
from ibnify.core.ops import (
    NormKind,
    OpKind,
    classify,
    has_batchnorm,
    is_batchnorm_like,
    is_channel_concat,
    is_frozen_batchnorm,
    is_instance_norm,
    is_norm,
    norm_kind,
)
from ibnify.core.surgery import apply_plan
from ibnify.errors import ConversionError
from tests.helpers import ADD_SPELLINGS


class _AddNet(nn.Module):
    """conv → BN, added to the input with one spelling of ``+``, then ReLU."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.add = ADD_SPELLINGS[spelling]
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.add(self.bn(self.conv(x)), x))


def _kinds(model: nn.Module, channels: int) -> list[OpKind]:
    """The kinds of the call nodes, in graph order (shapes from a 16×16 input)."""
    analysis = analyze(model, (channels, 16, 16))
    return [analysis.ops[n] for n in analysis.graph_module.graph.nodes if n.op.startswith("call")]


# fx cannot trace ``torch.Tensor.add(proxy, ...)`` (the forward-hook walk covers it).
@pytest.mark.parametrize("spelling", sorted(set(ADD_SPELLINGS) - {"Tensor.add"}))
def test_every_add_spelling_is_one_residual_addition_in_fx(spelling: str) -> None:
    model = _AddNet(spelling)
    kinds = classify(trace(model))
    assert sorted(str(k) for k in kinds.values()).count("add") == 1, spelling
    analysis = analyze(model, (4, 16, 16))
    assert len(analysis.blocks) == 1
    assert analysis.norm("bn").role == Role.PRE_ADD
    assert analysis.blocks[0].main_norms == ("bn",)


class _BiasAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x):
        return self.conv(x) + self.bias


def test_adding_a_broadcast_bias_is_per_channel_not_an_addition_of_branches() -> None:
    assert _kinds(_BiasAdd(), 4) == [OpKind.CONV, OpKind.PER_CHANNEL]
    # Without recorded shapes the classifier cannot tell and calls it an addition.
    assert OpKind.ADD in classify(trace(_BiasAdd())).values()


class _Ops(nn.Module):
    """One of each op family on an 8-channel map."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.op(self.conv(x))


@pytest.mark.parametrize(
    ("name", "op", "kind", "channel_concat"),
    [
        ("cat", lambda y: torch.cat([y, y], dim=1), OpKind.CONCAT, True),
        ("concat", lambda y: torch.concat([y, y], 1), OpKind.CONCAT, True),
        ("concatenate", lambda y: torch.concatenate([y, y], dim=-3), OpKind.CONCAT, True),
        ("cat-batch", lambda y: torch.cat([y, y], dim=0), OpKind.CONCAT, False),
        ("cat-width", lambda y: torch.cat([y, y], dim=3), OpKind.CONCAT, False),
    ],
)
def test_concatenations(name, op, kind, channel_concat) -> None:
    analysis = analyze(_Ops(op), (8, 8, 8))
    (node,) = [n for n, k in analysis.ops.items() if k == kind]
    assert is_channel_concat(node, analysis.ops[node]) is channel_concat


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        (lambda y: y.chunk(2, dim=1)[0], [OpKind.SPLIT, OpKind.GETITEM]),
        (lambda y: torch.split(y, 4, 1)[1], [OpKind.SPLIT, OpKind.GETITEM]),
        (lambda y: y.tensor_split(2, dim=1)[0], [OpKind.SPLIT, OpKind.GETITEM]),
        (lambda y: y.unbind(1)[0], [OpKind.SPLIT, OpKind.GETITEM]),
        (lambda y: y[:, :4], [OpKind.GETITEM]),
        (lambda y: y.view(1, 2, 4, 16, 16), [OpKind.RESHAPE]),
        (lambda y: y.flatten(1), [OpKind.RESHAPE]),
        (lambda y: y.permute(0, 2, 3, 1), [OpKind.RESHAPE]),
        (lambda y: nn.functional.pixel_shuffle(y, 2), [OpKind.SHUFFLE]),
        (lambda y: torch.sigmoid(y) * y, [OpKind.PER_CHANNEL, OpKind.PER_CHANNEL]),
        (lambda y: nn.functional.relu(y).mean((2, 3)), [OpKind.PER_CHANNEL] * 2),
        (lambda y: torch.fft.fft2(y).real, [OpKind.UNKNOWN, OpKind.PER_CHANNEL]),  # getattr
    ],
    ids=[
        "chunk",
        "split",
        "tensor_split",
        "unbind",
        "slice",
        "view",
        "flatten",
        "permute",
        "pixel_shuffle",
        "sigmoid-mul",
        "relu-mean",
        "fft",
    ],
)
def test_split_slice_view_shuffle_per_channel_unknown(op, expected) -> None:
    assert _kinds(_Ops(op), 8) == [OpKind.CONV, *expected]


@pytest.mark.parametrize(
    ("module", "kind"),
    [
        (nn.Conv2d(8, 8, 3), OpKind.CONV),
        (nn.Conv2d(8, 8, 3, groups=8), OpKind.DEPTHWISE),
        (nn.Conv2d(8, 16, 3, groups=4), OpKind.GROUPED),
        (nn.Linear(8, 8), OpKind.LINEAR),
        (nn.BatchNorm2d(8), OpKind.PER_CHANNEL),
        (nn.ReLU(), OpKind.PER_CHANNEL),
        (nn.Identity(), OpKind.PER_CHANNEL),
        (nn.Flatten(), OpKind.RESHAPE),
        (nn.ChannelShuffle(2), OpKind.SHUFFLE),
        (nn.Upsample(scale_factor=2), OpKind.PER_CHANNEL),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_module_kinds(module: nn.Module, kind: OpKind) -> None:
    graph_module = fx.symbolic_trace(nn.Sequential(module))
    assert [k for k in classify(graph_module).values()] == [
        OpKind.UNKNOWN,  # the placeholder
        kind,
        OpKind.OUTPUT,
    ]


class _DoublingBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class _OwnForwardBatchNormAct(BatchNormAct2d):
    def forward(self, x):
        return super().forward(x) + 1


class _Detectron2FrozenBatchNorm(nn.Module):
    """detectron2's FrozenBatchNorm2d, re-written: four buffers, the frozen affine forward."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.rand(num_features) + 0.5)
        self.register_buffer("bias", torch.rand(num_features))
        self.register_buffer("running_mean", torch.rand(num_features))
        self.register_buffer("running_var", torch.rand(num_features) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class _LooksFrozenButShifts(_Detectron2FrozenBatchNorm):
    """Same buffers, but its forward does more than the frozen affine: not a norm to ibnify."""

    def forward(self, x):
        return super().forward(x) + 1


@pytest.mark.parametrize(
    ("module", "kind", "graph_norm"),
    [
        (nn.BatchNorm2d(4), NormKind.BATCHNORM, True),
        (nn.SyncBatchNorm(4), NormKind.BATCHNORM, True),
        (BatchNormAct2d(4), NormKind.BATCHNORM_ACT, True),
        (IBN(4), NormKind.IBN, True),
        (IBNAct(4, act=nn.ReLU()), NormKind.IBN, True),
        (nn.InstanceNorm2d(4), NormKind.INSTANCENORM, True),
        (FrozenBatchNorm2d(4), NormKind.FROZEN_BATCHNORM, True),
        (FrozenBatchNormAct2d(4), NormKind.FROZEN_BATCHNORM_ACT, True),
        (_Detectron2FrozenBatchNorm(4), NormKind.FROZEN_BATCHNORM, True),
        (_LooksFrozenButShifts(4), None, False),
        (_DoublingBatchNorm(4), NormKind.UNKNOWN_BATCHNORM, True),
        (_OwnForwardBatchNormAct(4), NormKind.UNKNOWN_BATCHNORM, True),
        (nn.BatchNorm1d(4), NormKind.UNKNOWN_BATCHNORM, True),
        (nn.LayerNorm(4), None, False),
        (nn.GroupNorm(2, 4), None, False),
        (nn.Conv2d(4, 4, 1), None, False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_norm_kinds(module: nn.Module, kind: NormKind | None, graph_norm: bool) -> None:
    assert norm_kind(module) == kind
    assert is_norm(module) is graph_norm


def test_an_unknown_batchnorm_subclass_is_a_leaf_but_refused_by_the_surgery() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, 1, 1))
    plan = ibnify.plan(model, input_size=(3, 16, 16))
    model[1] = _DoublingBatchNorm(4)
    with pytest.raises(ConversionError, match="whose forward ibnify does not know"):
        apply_plan(model, plan)


def test_the_norm_predicates_agree_with_norm_kind() -> None:
    """Each predicate, for each kind of norm: (BN-like, frozen, instance norm)."""
    table = {
        "bn": (nn.BatchNorm2d(4), (True, False, False)),
        "sync": (nn.SyncBatchNorm(4), (True, False, False)),
        "bn_act": (BatchNormAct2d(4), (True, False, False)),
        "frozen": (FrozenBatchNorm2d(4), (True, True, False)),
        "frozen_act": (FrozenBatchNormAct2d(4), (True, True, False)),
        "ibn": (IBN(4), (True, False, False)),
        "ibn_act": (IBNAct(4), (True, False, False)),
        "in2d": (nn.InstanceNorm2d(4), (False, False, True)),
        "in1d": (nn.InstanceNorm1d(4), (False, False, True)),
        "conv": (nn.Conv2d(4, 4, 1), (False, False, False)),
    }
    got = {
        name: (is_batchnorm_like(m), is_frozen_batchnorm(m), is_instance_norm(m))
        for name, (m, _) in table.items()
    }
    assert got == {name: expected for name, (_, expected) in table.items()}
    assert norm_kind(IBNAct(4)) == NormKind.IBN  # registered by core/layers.py


def test_a_model_with_only_frozen_batchnorm_has_batchnorm() -> None:
    """The small-batch warning of fine-tuning asks this; frozen BN counts, IN alone does not."""
    assert has_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4)))
    assert has_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNormAct2d(4)))
    assert not has_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4)))
