"""The forward-hook walk: a traced-like record of one forward pass for models fx cannot trace."""

from __future__ import annotations

import operator

import pytest
import torch
import torchvision
from torch import fx, nn

import ibnify
from ibnify.core.graph import Role, analyze
from ibnify.core.hookwalk import walk
from ibnify.core.ops import OpKind, classify, is_norm
from ibnify.errors import TraceError
from tests.helpers import ADD_SPELLINGS


class _Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > -1e9 else -x  # data-dependent: fx cannot trace this


class _GatedAdd(nn.Module):
    """Untraceable (the gate), then conv → BN added to the gate's output in one spelling."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.add = ADD_SPELLINGS[spelling]
        self.gate = _Gate()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.gate(x)
        return torch.relu(self.add(self.bn(self.conv(x)), x))


def _walk(model: nn.Module, size: tuple[int, ...]) -> fx.GraphModule:
    with torch.no_grad():
        graph = walk(model.eval(), torch.randn(1, *size), is_norm)
    return fx.GraphModule(model, graph)


@pytest.mark.parametrize("spelling", sorted(ADD_SPELLINGS))
def test_every_add_spelling_is_recorded_as_one_addition(spelling: str) -> None:
    model = _GatedAdd(spelling)
    graph_module = _walk(model, (4, 8, 8))
    adds = [n for n in graph_module.graph.nodes if n.target is operator.add]
    assert len(adds) == 1, spelling
    assert sorted(str(a.target) for a in adds[0].args) == ["bn", "gate"]
    assert classify(graph_module)[adds[0]] == OpKind.ADD
    # The analysis falls back to the walk and finds the residual block.
    analysis = analyze(model, (4, 8, 8), fallback=True)
    assert analysis.trace_error is not None and len(analysis.blocks) == 1
    assert analysis.norm("bn").role == Role.PRE_ADD


class _CatSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = _Gate()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.gate(x)
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        first, _ = y.chunk(2, dim=1)
        return first.flatten(1)


def test_concat_split_and_views_are_recorded_with_shapes() -> None:
    graph_module = _walk(_CatSplit(), (4, 8, 8))
    kinds = classify(graph_module)
    calls = [(n, kinds[n]) for n in graph_module.graph.nodes if n.op.startswith("call")]
    assert [k for _, k in calls] == [
        OpKind.UNKNOWN,  # the gate: a leaf whose kind nobody knows
        OpKind.CONV,
        OpKind.CONV,
        OpKind.CONCAT,
        OpKind.SPLIT,
        OpKind.GETITEM,
        OpKind.GETITEM,
        OpKind.RESHAPE,
    ]
    shapes = {str(n.target): tuple(n.meta["tensor_meta"].shape) for n, _ in calls[:3]}
    assert shapes == {"gate": (1, 4, 8, 8), "a": (1, 4, 8, 8), "b": (1, 4, 8, 8)}


def test_untraceable_model_uses_the_forward_hook_walk() -> None:
    inner = torchvision.models.mobilenet_v2()
    model = nn.Sequential(_Gate(), inner)
    plan = ibnify.plan(model, input_size=(3, 64, 64))
    reference = ibnify.plan(inner, input_size=(3, 64, 64))
    assert [(s.name, s.stage, s.rule) for s in plan.sites] == [
        (f"1.{s.name}", s.stage, s.rule) for s in reference.sites
    ]
    converted = ibnify.convert(model, input_size=(3, 64, 64))
    assert converted(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_untraceable_model_without_a_safe_site_names_the_module() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return x + self.bn(self.conv(x))

    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Residual(), _Gate(), Residual())
    with pytest.raises(TraceError, match=r"failed inside module '2'.*forward-hook walk"):
        ibnify.plan(model, input_size=(3, 32, 32))
