"""The generic IBN-a rule over timm/torchvision BatchNorm CNNs, its errors and its fallback."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import ibnify
from ibnify.cli import cli
from ibnify.core.generic import RULE_DEPTHWISE, RULE_PLAIN, RULE_RESIDUAL
from ibnify.core.graph import Role, analyze
from ibnify.core.layers import IBN, IBNAct
from ibnify.core.layouts import make_plan
from ibnify.core.ops import OpKind
from ibnify.core.reasons import Reason, ReasonCode
from ibnify.core.surgery import apply_plan
from ibnify.errors import InvalidOptionError, NoBatchNormError
from tests.helpers import randomize_norms

# (model id, input size): small sizes that each network accepts.
MODELS = [
    ("timm:efficientnet_b0", 64),
    ("timm:mobilenetv3_large_100", 64),
    ("timm:mobilenetv2_100", 64),
    ("timm:regnety_008", 64),
    ("timm:regnetx_002", 64),
    ("timm:densenet121", 64),
    ("timm:dla34", 64),
    ("timm:cspresnet50", 64),
    ("timm:ghostnet_100", 64),
    ("timm:rexnet_100", 64),
    ("timm:resnet26d", 64),
    ("tv:mobilenet_v2", 64),
    ("tv:mobilenet_v3_large", 64),
    ("tv:efficientnet_b0", 64),
    ("tv:regnet_y_400mf", 64),
    ("tv:mnasnet1_0", 64),
    ("tv:vgg16_bn", 64),
    ("tv:shufflenet_v2_x1_0", 64),
    ("tv:googlenet", 64),
]


def _build(model_id: str) -> nn.Module:
    source, _, name = model_id.partition(":")
    if source == "tv":
        kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    return timm.create_model(name, pretrained=False)


def _feeds_addition(analysis, name: str) -> bool:
    """True when norm ``name``'s output reaches an addition through per-channel ops only.

    Written against the op table directly (not the rule's channel walk) as an independent check.
    """
    nodes = analysis.graph_module.graph.nodes
    starts = [n for n in nodes if n.op == "call_module" and n.target == name]
    stack = [user for node in starts for user in node.users]
    while stack:
        node = stack.pop()
        if analysis.ops[node] == OpKind.ADD:
            return True
        if analysis.ops[node] == OpKind.PER_CHANNEL:
            stack.extend(node.users)
    return False


@pytest.mark.parametrize(("model_id", "size"), MODELS, ids=[m for m, _ in MODELS])
def test_generic_conversion_properties(model_id: str, size: int) -> None:
    model = _build(model_id).eval()
    randomize_norms(model, seed=1)
    input_size = (3, size, size)
    analysis = analyze(model, input_size)
    plan = make_plan(model, analysis)  # what ibnify.plan does, sharing one analysis
    # At least one site in every chosen stage that holds a BatchNorm.
    bn_stages = {
        n.stage
        for n in analysis.norms
        if isinstance(model.get_submodule(n.name), nn.modules.batchnorm._BatchNorm)
    }
    site_stages = {site.stage for site in plan.sites}
    assert {s for s in plan.stages if s in bn_stages} <= site_stages, plan.sites_per_stage()
    for site in plan.sites:
        # Never a shortcut BN, never a BN directly before an addition. (A block's last BN is
        # allowed when a conv follows it, as in pre-activation or FasterNet blocks.)
        assert analysis.norm(site.name).role != Role.SHORTCUT, site
        assert not _feeds_addition(analysis, site.name), site
        if plan.layout == "generic-a":
            assert site.rule in (RULE_RESIDUAL, RULE_DEPTHWISE, RULE_PLAIN)
        else:
            assert analysis.norm(site.name).role != Role.PRE_ADD
    assert all(s.reason for s in plan.skipped)
    converted = apply_plan(model, plan)
    count = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in converted.parameters()) == count
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        assert converted(x).shape == model(x).shape
    # Eval-mode weight transfer is exact at the layer level.
    for site in plan.sites:
        before = model.get_submodule(site.name)
        after = converted.get_submodule(site.name)
        assert isinstance(after, IBN)
        if type(before).__name__ == "BatchNormAct2d":
            assert isinstance(after, IBNAct) and type(after.act) is type(before.act)
        features = torch.randn(2, site.channels, 5, 5)
        with torch.no_grad():
            expected, actual = before(features), after(features)
        bn, in_ = after.bn_slice(), after.in_slice()
        torch.testing.assert_close(actual[:, bn], expected[:, bn], rtol=1e-6, atol=1e-6)
        assert torch.equal(after.IN.weight, before.weight[in_])
        assert torch.equal(after.IN.bias, before.bias[in_])


def test_repvgg_refuses_with_the_reason() -> None:
    """RepVGG blocks sum BN'd branches: every BN sits directly before an addition."""
    with pytest.raises(NoBatchNormError, match="before the residual addition"):
        ibnify.plan(timm.create_model("repvgg_a2"), input_size=(3, 64, 64))


def test_published_layouts_still_win() -> None:
    plan = ibnify.plan(torchvision.models.resnet50(), input_size=(3, 64, 64))
    expected = [f"layer{k}.{i}.bn1" for k, n in ((1, 3), (2, 4), (3, 6)) for i in range(n)]
    assert plan.layout == "resnet-a" and [s.name for s in plan.sites] == expected
    dense = ibnify.plan(timm.create_model("densenet121"), input_size=(3, 64, 64))
    assert dense.layout == "densenet-a" and len(dense.sites) == 14


@pytest.mark.parametrize(
    "name", ["convnext_atto", "vit_tiny_patch16_224", "nf_resnet26"], ids=lambda n: n
)
def test_models_without_batchnorm_get_one_clear_error(name: str) -> None:
    model = timm.create_model(name)
    with pytest.raises(NoBatchNormError, match=r"has no BatchNorm layer \("):
        ibnify.plan(model, input_size=(3, 224, 224))


def test_cli_no_batchnorm_writes_nothing(tmp_path) -> None:
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(
        cli, ["convert", "timm:nf_resnet26", "--input-size", "64", "-o", str(out)]
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "BatchNorm" in lines[0]
    assert not out.exists()


class _Block(nn.Module):
    """Residual block; with ``norm=False`` it holds no BatchNorm at all."""

    def __init__(self, cin: int, cout: int, stride: int, norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.short = nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.short(x))


def test_stage_without_batchnorm_is_a_clear_error() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),
        nn.BatchNorm2d(8),
        _Block(8, 8, 1, norm=True),
        _Block(8, 16, 2, norm=False),
        _Block(16, 16, 2, norm=True),
    )
    assert ibnify.plan(model, input_size=(3, 32, 32)).sites_per_stage() == {1: 1}
    with pytest.raises(InvalidOptionError, match="stage 2 of Sequential holds no BatchNorm"):
        ibnify.plan(model, stages=(2,), input_size=(3, 32, 32))
    with pytest.raises(InvalidOptionError, match="out of range"):
        ibnify.plan(model, stages=(5,), input_size=(3, 32, 32))
    stem_only = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), _Block(8, 8, 1, False), _Block(8, 8, 2, False)
    )
    with pytest.raises(NoBatchNormError, match=r"BatchNorm layers are in stage 0 \(stage 0 is"):
        ibnify.plan(stem_only, input_size=(3, 32, 32))


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups), nn.BatchNorm2d(cout), nn.ReLU()
    )


def test_plain_stack_counts_resolutions_by_rank() -> None:
    """VGG-style, stride-1 first convs: stage 1 is the first resolution, no stem."""
    model = nn.Sequential(
        _conv_bn(3, 8),
        _conv_bn(8, 8),
        nn.MaxPool2d(2),
        _conv_bn(8, 16),
        nn.MaxPool2d(2),
        _conv_bn(16, 16),
        nn.MaxPool2d(2),
        _conv_bn(16, 16),
    )
    plan = ibnify.plan(model, input_size=(3, 32, 32))
    assert [(s.name, s.stage, s.rule) for s in plan.sites] == [
        ("0.1", 1, RULE_PLAIN),
        ("1.1", 1, RULE_PLAIN),
        ("3.1", 2, RULE_PLAIN),
        ("5.1", 3, RULE_PLAIN),
    ]
    assert plan.num_stages == 4


def test_depthwise_separable_converts_the_expansion_bn() -> None:
    model = nn.Sequential(
        _conv_bn(3, 8, 2),  # stem
        _conv_bn(8, 32, k=1),
        _conv_bn(32, 32, 2, groups=32),
        nn.Conv2d(32, 16, 1),
        nn.BatchNorm2d(16),  # inverted residual without skip
        _conv_bn(16, 64, k=1),
        _conv_bn(64, 64, 2, groups=64),
        nn.Conv2d(64, 24, 1),
        nn.BatchNorm2d(24),
    )
    plan = ibnify.plan(model, stages=(1, 2, 3), input_size=(3, 32, 32))
    reasons = {s.name: s.reason for s in plan.skipped}
    # No residual or concatenation blocks: no stem either, as in VGG.
    assert [(s.name, s.rule) for s in plan.sites] == [
        ("0.1", RULE_PLAIN),
        ("1.1", RULE_DEPTHWISE),
        ("5.1", RULE_DEPTHWISE),
    ]
    assert reasons["2.1"].code == ReasonCode.AFTER_DEPTHWISE
    assert reasons["4"].code == ReasonCode.PROJECTION


class _SplitBlock(nn.Module):
    """An inception-like block, then a CSP-like one: the expanded BN's channels are split
    between a bypass and a conv path; the output is channel-shuffled."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8, 2)
        self.a, self.b = _conv_bn(8, 4), _conv_bn(8, 4, k=1)
        self.exp = _conv_bn(8, 16, 2)
        self.body = _conv_bn(8, 8)
        self.out = _conv_bn(16, 16)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        a, b = self.exp(x).split(8, dim=1)
        y = self.out(torch.cat([a, self.body(b)], dim=1))
        shuffled = y.view(y.shape[0], 2, 8, *y.shape[2:]).transpose(1, 2).flatten(1, 2)
        return shuffled.mean((2, 3))


def test_split_and_shuffle_are_explained() -> None:
    plan = ibnify.plan(_SplitBlock(), stages=(1, 2), input_size=(3, 32, 32))
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["exp.1"] == Reason(ReasonCode.SPLIT_PATHS, at="split")
    assert reasons["out.1"].code == ReasonCode.RESHAPE
    assert "channel shuffle" in str(reasons["out.1"])
    assert [(s.name, s.stage) for s in plan.sites] == [("a.1", 1), ("b.1", 1), ("body.1", 2)]
    assert reasons["stem.1"] == Reason(ReasonCode.STEM)


class _PreActBlock(nn.Module):
    """Main branch conv → BN → ReLU → conv → add: the only BN is the last, but a conv follows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.conv2 = (
            nn.Conv2d(8, 8, 3, 1, 1),
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 8, 1),
        )

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


def test_last_bn_followed_by_a_conv_is_allowed() -> None:
    model = nn.Sequential(_conv_bn(3, 8, 2), _PreActBlock(), _conv_bn(8, 8, 2), _PreActBlock())
    plan = ibnify.plan(model, stages=(1, 2), input_size=(3, 32, 32))
    assert [(s.name, s.stage, s.rule) for s in plan.sites] == [
        ("1.bn", 1, RULE_RESIDUAL),
        ("3.bn", 2, RULE_RESIDUAL),
    ]
    assert analyze(model, (3, 32, 32)).norm("1.bn").role == Role.PRE_ADD
