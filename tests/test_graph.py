"""Graph analysis on small hand-built modules: names, roles, strides, stages, no side effects."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from ibnify.core.graph import analyze, list_norm_layers, trace
from ibnify.errors import TraceError


class TinyBlock(nn.Module):
    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels * stride, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels * stride)
        self.conv2 = nn.Conv2d(channels * stride, channels * stride, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels * stride)
        self.short = (
            nn.Sequential(
                nn.Conv2d(channels, channels * stride, 1, stride, bias=False),
                nn.BatchNorm2d(channels * stride),
            )
            if stride > 1
            else nn.Identity()
        )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class TinyNet(nn.Module):
    """Stem at stride 2, then two blocks at stride 2 (stage 1) and one at stride 4 (stage 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(TinyBlock(8), TinyBlock(8), TinyBlock(8, stride=2))
        self.head_norm = nn.BatchNorm2d(16)

    def forward(self, x):
        return self.head_norm(self.blocks(torch.relu(self.stem(x)))).mean((2, 3))


def test_tiny_net_records_are_pinned() -> None:
    analysis = analyze(TinyNet(), input_size=(3, 32, 32))
    rows = [(n.name, n.stride, n.stage, n.role, n.block) for n in analysis.norms]
    assert rows == [
        ("stem.1", 2, 0, "outside", None),
        ("blocks.0.bn1", 2, 1, "main", "blocks.0"),
        ("blocks.0.bn2", 2, 1, "pre_add", "blocks.0"),
        ("blocks.1.bn1", 2, 1, "main", "blocks.1"),
        ("blocks.1.bn2", 2, 1, "pre_add", "blocks.1"),
        ("blocks.2.bn1", 4, 2, "main", "blocks.2"),
        ("blocks.2.bn2", 4, 2, "pre_add", "blocks.2"),
        ("blocks.2.short.1", 4, 2, "shortcut", "blocks.2"),
        ("head_norm", 4, 2, "outside", None),
    ]
    assert analysis.stage_strides == (2, 4)
    assert [b.name for b in analysis.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert analysis.blocks[2].shortcut_norms == ("blocks.2.short.1",)
    assert analysis.norm("blocks.2.bn1").output_shape == (1, 16, 8, 8)


def test_list_norm_layers_in_execution_order() -> None:
    assert list_norm_layers(TinyNet())[:3] == ["stem.1", "blocks.0.bn1", "blocks.0.bn2"]


def test_torchvision_resnet50_stages_follow_output_stride() -> None:
    analysis = analyze(torchvision.models.resnet50(), input_size=(3, 224, 224))
    assert analysis.stage_strides == (4, 8, 16, 32)
    stage_of = {n.name: n.stage for n in analysis.norms}
    assert stage_of["bn1"] == 0
    assert stage_of["layer1.0.bn1"] == 1 and stage_of["layer2.0.bn1"] == 2
    assert stage_of["layer3.5.bn3"] == 3 and stage_of["layer4.2.bn3"] == 4
    assert len(analysis.blocks) == 16


def test_cifar_style_resnet_counts_stages_by_rank() -> None:
    """3x3 stride-1 stem, no max-pool: first blocks run at stride 1 and are still stage 1."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    analysis = analyze(model, input_size=(3, 32, 32))
    assert analysis.stage_strides == (1, 2, 4, 8)
    assert analysis.norm("layer1.0.bn1").stage == 1
    assert analysis.norm("layer4.1.bn2").stage == 4
    assert analysis.norm("bn1").stage == 0


def test_analysis_has_no_side_effects() -> None:
    model = TinyNet().train()
    model.blocks[1].eval()  # a mixed-mode model must come back exactly as it was
    modes = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    analyze(model, input_size=(3, 32, 32))
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_fx_graph_equals_eager_output() -> None:
    model = TinyNet().eval()
    graph_module = trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(graph_module(x), model(x), atol=0, rtol=0)


def test_untraceable_module_is_named_in_the_error() -> None:
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), DataDependent())
    with pytest.raises(TraceError, match=r"failed inside module '2'"):
        analyze(model)


def test_input_too_small_is_reported() -> None:
    with pytest.raises(TraceError, match="pass a valid input size"):
        analyze(nn.Sequential(nn.Conv2d(3, 4, 5), nn.BatchNorm2d(4)), input_size=(3, 3, 3))
