"""Applying plans: numerics against hand-written references, weight transfer, module behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import ibnify
from ibnify.core.layers import IBN
from ibnify.core.plans import ConversionSite
from ibnify.core.surgery import apply_plan, get_plan
from ibnify.errors import ConversionError
from tests.helpers import ADD_SPELLINGS, randomize_norms
from tests.reference_ibn import BottleneckIBN, resnet_ibn

SMALL = (3, 64, 64)


def test_ibn_b_block_matches_hand_written_reference_bottleneck() -> None:
    """IBN-b's post-addition IN sits after the add and before the final ReLU."""
    converted = ibnify.convert(
        randomize_norms(torchvision.models.resnet50()), layout="b", input_size=SMALL
    )
    block = converted.layer1[2]
    with torch.no_grad():
        block.IN.weight.uniform_(0.5, 1.5)
        block.IN.bias.normal_()
    reference = BottleneckIBN(256, 64, ibn="b")
    reference.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(3, 256, 16, 16)
    for mode in (True, False):
        block.train(mode)
        reference.train(mode)
        torch.testing.assert_close(block(x.clone()), reference(x.clone()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["a", "b"])
def test_whole_resnet50_equals_reference_with_same_weights(layout: str) -> None:
    converted = ibnify.convert(
        randomize_norms(torchvision.models.resnet50()), layout=layout, input_size=SMALL
    ).eval()
    reference = resnet_ibn(50, layout).eval()
    reference.load_state_dict(converted.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), atol=1e-4, rtol=1e-4)


def test_every_site_transfers_its_batchnorm_slices() -> None:
    original = randomize_norms(torchvision.models.resnet18())
    converted = ibnify.convert(original, input_size=SMALL)
    plan = get_plan(converted)
    assert len(plan.sites) == 6
    for site in plan.sites:
        bn = original.get_submodule(site.name)
        ibn = converted.get_submodule(site.name)
        assert isinstance(ibn, IBN)
        half = site.in_channels
        torch.testing.assert_close(ibn.IN.weight, bn.weight[:half], atol=0, rtol=0)
        torch.testing.assert_close(ibn.IN.bias, bn.bias[:half], atol=0, rtol=0)
        torch.testing.assert_close(ibn.BN.weight, bn.weight[half:], atol=0, rtol=0)
        torch.testing.assert_close(ibn.BN.running_mean, bn.running_mean[half:], atol=0, rtol=0)
        torch.testing.assert_close(ibn.BN.running_var, bn.running_var[half:], atol=0, rtol=0)
    # Everything that is not a site is copied unchanged.
    before, after = original.state_dict(), converted.state_dict()
    untouched = [k for k in before if not any(k.startswith(s.name + ".") for s in plan.sites)]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)


def test_input_model_untouched_unless_inplace() -> None:
    model = torchvision.models.resnet18()
    snapshot = copy.deepcopy(model.state_dict())
    converted = ibnify.convert(model, input_size=SMALL)
    assert converted is not model
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d)
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    same = ibnify.convert(model, inplace=True, input_size=SMALL)
    assert same is model and isinstance(model.layer1[0].bn1, IBN)


@pytest.mark.parametrize("training", [True, False])
def test_mode_is_kept_and_train_eval_both_work(training: bool) -> None:
    model = torchvision.models.resnet18().train(training)
    converted = ibnify.convert(model, layout="b", input_size=SMALL)
    assert converted.training is training
    assert all(m.training is training for m in converted.modules())
    assert model.training is training  # analysis restored the input's mode
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):
        assert converted.train(mode)(x).shape == (2, 1000)


def test_every_parameter_gets_a_gradient() -> None:
    converted = ibnify.convert("resnet18", layout="b", input_size=SMALL).train()
    converted(torch.randn(2, 3, 64, 64)).sum().backward()
    missing = [n for n, p in converted.named_parameters() if p.grad is None]
    assert missing == []


def test_deepcopy_and_state_dict_round_trip() -> None:
    converted = ibnify.convert("resnet18", layout="b", input_size=SMALL).eval()
    clone = copy.deepcopy(converted)
    fresh = ibnify.convert("resnet18", layout="b", input_size=SMALL).eval()
    fresh.load_state_dict(converted.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = converted(x)
        torch.testing.assert_close(clone(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)
    assert get_plan(clone) == get_plan(converted)


def test_same_model_and_plan_give_same_structure() -> None:
    first = ibnify.convert("resnet18", input_size=SMALL)
    second = ibnify.convert("resnet18", input_size=SMALL)
    assert str(first) == str(second)
    assert list(first.state_dict()) == list(second.state_dict())


def test_torch_compile_traces_without_graph_breaks() -> None:
    converted = ibnify.convert("resnet18", layout="b", input_size=SMALL).eval()
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), converted(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_cpu() -> None:  # pragma: no cover - no GPU in CI
    converted = ibnify.convert("resnet18", input_size=SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = converted(x)
        actual = converted.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_unknown_batchnorm_subclass_is_refused() -> None:
    class OddBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = torchvision.models.resnet18()
    plan = ibnify.plan(model, input_size=SMALL)
    model.layer1[0].bn1 = OddBatchNorm(64)
    with pytest.raises(ConversionError, match=r"OddBatchNorm.*forward ibnify does not know"):
        apply_plan(model, plan)


def test_plan_that_does_not_fit_is_refused() -> None:
    plan = ibnify.plan("resnet18", input_size=SMALL)
    wrong = type(plan)(
        **{
            **plan.__dict__,
            "sites": (ConversionSite("layer1.0.bn1", "ibn", 32, 1, 0.5, "in_first", 16, 16),),
        }
    )
    with pytest.raises(ConversionError, match="has 64 channels, the plan expects 32"):
        apply_plan(torchvision.models.resnet18(), wrong)
    missing = type(plan)(
        **{
            **plan.__dict__,
            "sites": (ConversionSite("layer9.0.bn1", "ibn", 64, 1, 0.5, "in_first", 32, 32),),
        }
    )
    with pytest.raises(ConversionError, match=r"no layer named .layer9\.0\.bn1."):
        apply_plan(torchvision.models.resnet18(), missing)


class _Block(nn.Module):
    """A basic residual block whose addition is spelled ``style``."""

    def __init__(self, channels: int, style: str) -> None:
        super().__init__()
        self.style = style
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.style == "add_":
            out.add_(identity)  # the sum lives on in the mutated tensor
        elif self.style == "+=":
            out += identity
        else:
            out = ADD_SPELLINGS[self.style](out, identity)
        return self.relu(out)


class _TinyResNet(nn.Module):
    """torchvision's ResNet layout (conv1/bn1 stem, layer1, layer2), 8 channels, no downsampling."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(_Block(8, style), _Block(8, style))
        self.layer2 = nn.Sequential(_Block(8, style), _Block(8, style))

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.layer2(self.layer1(x)).mean((2, 3))


def _reference_ibn_b(model: nn.Module, x: torch.Tensor, with_in: bool = True) -> torch.Tensor:
    """IBN-b by hand with the converted model's layers: IN after the addition, before the ReLU."""
    x = torch.relu(model.bn1(model.conv1(x)))
    for layer in (model.layer1, model.layer2):
        for block in layer:
            out = torch.relu(block.bn1(block.conv1(x)))
            out = block.bn2(block.conv2(out)) + x
            if with_in and hasattr(block, "IN"):
                out = block.IN(out)
            x = torch.relu(out)
    return x.mean((2, 3))


@pytest.mark.parametrize("style", ["add_", "+=", "torch.add", "add"])
def test_ibn_b_with_any_addition_spelling_equals_hand_written_reference(style: str) -> None:
    model = randomize_norms(_TinyResNet(style))
    converted = ibnify.convert(model, layout="b", input_size=(3, 32, 32)).eval()
    plan = get_plan(converted)
    assert [(s.name, s.kind) for s in plan.sites] == [
        ("bn1", "in"),
        ("layer1.1.IN", "post_add_in"),
        ("layer2.1.IN", "post_add_in"),
    ]
    assert isinstance(converted.bn1, nn.InstanceNorm2d)
    with torch.no_grad():
        for name in ("layer1.1.IN", "layer2.1.IN"):
            converted.get_submodule(name).weight.uniform_(0.5, 1.5)
            converted.get_submodule(name).bias.normal_()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        actual = converted(x.clone())
        torch.testing.assert_close(actual, _reference_ibn_b(converted, x), atol=1e-5, rtol=1e-5)
        without_in = _reference_ibn_b(converted, x, with_in=False)
    assert (actual - without_in).abs().max() > 1e-2  # the post-addition IN really runs
