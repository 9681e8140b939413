"""Published layouts on real torchvision/timm architectures: keys, shapes, site counts."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner

import ibnify
from ibnify.cli import cli
from ibnify.core.layouts import LAYOUTS, Family, layout_choices, resolve_layout
from ibnify.core.surgery import get_plan
from ibnify.errors import InvalidOptionError
from tests.reference_ibn import DenseNetIBN, resnet_ibn, state_dict_shapes

SMALL = (3, 64, 64)  # shape analysis input: small for speed, valid for every model here

# name → hand-written IBN-Net reference built with the authors' layout
REFERENCES = {
    "resnet18": lambda: resnet_ibn(18),
    "resnet34": lambda: resnet_ibn(34),
    "resnet50": lambda: resnet_ibn(50),
    "resnet101": lambda: resnet_ibn(101),
    "resnet152": lambda: resnet_ibn(152),
    "resnext50_32x4d": lambda: resnet_ibn(50, groups=32, width=4),
    "resnext101_32x8d": lambda: resnet_ibn(101, groups=32, width=8),
    "wide_resnet50_2": lambda: resnet_ibn(50, width=128),
    "densenet121": lambda: DenseNetIBN((6, 12, 24, 16)),
    "densenet169": lambda: DenseNetIBN((6, 12, 32, 32)),
}
EXPECTED_SITES = {
    "resnet18": 6,
    "resnet34": 13,
    "resnet50": 13,
    "resnet101": 30,
    "resnet152": 47,
    "resnext50_32x4d": 13,
    "resnext101_32x8d": 30,
    "wide_resnet50_2": 13,
    "densenet121": 14,
    "densenet169": 17,
}


def _meta_model(builder):
    with torch.device("meta"):
        return builder()


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_torchvision_ibn_a_equals_reference_architecture(name: str) -> None:
    converted = ibnify.convert(f"tv:{name}", input_size=SMALL)
    plan = get_plan(converted)
    assert len(plan.sites) == EXPECTED_SITES[name]
    reference = _meta_model(REFERENCES[name])
    assert state_dict_shapes(converted) == state_dict_shapes(reference)


def test_resnet50_ibn_a_counts() -> None:
    converted = ibnify.convert("resnet50", input_size=SMALL)
    plan = get_plan(converted)
    assert [s.name for s in plan.sites] == [
        f"layer{k}.{i}.bn1" for k, n in ((1, 3), (2, 4), (3, 6)) for i in range(n)
    ]
    assert plan.sites_per_stage() == {1: 3, 2: 4, 3: 6}
    assert sum(p.numel() for p in converted.parameters()) == 25_557_032
    assert plan.param_delta == 0
    assert converted.state_dict()["layer1.0.bn1.IN.weight"].shape == (32,)
    assert converted.state_dict()["layer3.5.bn1.BN.running_mean"].shape == (128,)


def _expected_ibn_a_shapes(original: dict, pattern: str, ratio: float, bn_first=False) -> dict:
    """Apply the IBN-a key rule to an original state dict by string manipulation alone."""
    expected = {}
    regex = re.compile(pattern)
    for key, shape in original.items():
        module, _, leaf = key.rpartition(".")
        if not regex.fullmatch(module):
            expected[key] = shape
            continue
        channels = shape[0] if shape else None
        if leaf in ("weight", "bias"):
            channels = original[f"{module}.weight"][0]
            if bn_first:
                bn = int(channels * (1 - ratio))
                in_ = channels - bn
            else:
                in_ = int(channels * ratio)
                bn = channels - in_
            expected[f"{module}.IN.{leaf}"] = (in_,)
            expected[f"{module}.BN.{leaf}"] = (bn,)
        else:
            channels = original[f"{module}.weight"][0]
            bn = int(channels * (1 - ratio)) if bn_first else channels - int(channels * ratio)
            expected[f"{module}.BN.{leaf}"] = (bn,) if shape else shape
    return expected


@pytest.mark.parametrize(("name", "sites"), [("timm:resnet50", 13), ("timm:seresnext50_32x4d", 13)])
def test_timm_resnet_family_ibn_a_keys(name: str, sites: int) -> None:
    original, _ = ibnify.models.registry.build_model(name)
    converted = ibnify.convert(original, input_size=SMALL)
    assert len(get_plan(converted).sites) == sites
    expected = _expected_ibn_a_shapes(state_dict_shapes(original), r"layer[123]\.\d+\.bn1", 0.5)
    assert state_dict_shapes(converted) == expected
    if name == "timm:resnet50":  # same names as the authors' ResNet-50-IBN-a
        assert state_dict_shapes(converted) == state_dict_shapes(
            _meta_model(REFERENCES["resnet50"])
        )


def test_densenet121_sites_are_every_third_layer_bn_first() -> None:
    converted = ibnify.convert("densenet121", input_size=SMALL)
    plan = get_plan(converted)
    names = [s.name for s in plan.sites]
    assert names[:2] == [
        "features.denseblock1.denselayer1.norm1",
        "features.denseblock1.denselayer4.norm1",
    ]
    assert all(s.order == "bn_first" and s.ratio == 0.4 for s in plan.sites)
    assert plan.sites_per_stage() == {1: 2, 2: 4, 3: 8}
    layer = converted.features.denseblock1.denselayer1.norm1
    assert (layer.bn_channels, layer.in_channels) == (int(64 * 0.6), 64 - int(64 * 0.6))


@pytest.mark.parametrize("depth", [18, 50])
def test_ibn_b_equals_reference_architecture(depth: int) -> None:
    converted = ibnify.convert(f"resnet{depth}", layout="b", input_size=SMALL)
    plan = get_plan(converted)
    last1, last2 = (1, 1) if depth == 18 else (2, 3)
    assert [s.name for s in plan.sites] == ["bn1", f"layer1.{last1}.IN", f"layer2.{last2}.IN"]
    assert state_dict_shapes(converted) == state_dict_shapes(
        _meta_model(lambda: resnet_ibn(depth, "b"))
    )
    keys = converted.state_dict()
    assert "bn1.running_mean" not in keys and keys["bn1.weight"].shape == (64,)
    if depth == 50:
        assert keys["layer1.2.IN.weight"].shape == (256,)
        assert keys["layer2.3.IN.weight"].shape == (512,)
        assert plan.param_delta == 2 * (256 + 512)


@pytest.mark.parametrize(
    ("stages", "expected"), [((1,), {1: 2}), ((2, 4), {2: 2, 4: 2}), ((1, 2, 3, 4), None)]
)
def test_stage_subsets(stages, expected) -> None:
    plan = ibnify.plan("resnet18", stages=stages, input_size=SMALL)
    assert plan.stages == tuple(stages)
    assert plan.sites_per_stage() == (expected or {1: 2, 2: 2, 3: 2, 4: 2})


def test_custom_ratio_changes_split() -> None:
    plan = ibnify.plan("resnet18", ratio=0.25, input_size=SMALL)
    assert {(s.in_channels, s.bn_channels) for s in plan.sites if s.stage == 1} == {(16, 48)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stages": (5,)}, r"stage 5 is out of range: tv:resnet18 has stages 1-4"),
        ({"stages": (0, 1)}, r"stage 0 is out of range"),
        ({"ratio": 1.0}, r"strictly between 0 and 1"),
        ({"ratio": float("nan")}, r"strictly between 0 and 1"),
        ({"layout": "c"}, r"unknown layout 'c'"),
    ],
)
def test_bad_options_raise_invalid_option(kwargs, message) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        ibnify.plan("resnet18", input_size=SMALL, **kwargs)


def test_ibn_b_refused_for_densenet() -> None:
    with pytest.raises(InvalidOptionError, match="ResNet family only"):
        ibnify.plan(torchvision.models.densenet121(), layout="b", input_size=SMALL)


def test_already_converted_model_is_refused() -> None:
    converted = ibnify.convert("resnet18", input_size=SMALL)
    already = r"tv:resnet18 is already converted \(resnet-a stages 1,2,3\)"
    with pytest.raises(ibnify.errors.ConversionError, match=already):
        ibnify.convert(converted, input_size=SMALL)
    # Adding stage 4 to an IBN-a model converts only the new sites.
    more = ibnify.convert(converted, stages=(1, 2, 3, 4), input_size=SMALL)
    assert [s.name for s in get_plan(more).sites] == ["layer4.0.bn1", "layer4.1.bn1"]


def test_timm_resnet_d_variant_keeps_deep_stem() -> None:
    model = timm.create_model("resnet26d")
    plan = ibnify.plan(model, input_size=SMALL)
    assert plan.family == "resnet"
    assert [s.name for s in plan.sites] == [f"layer{k}.{i}.bn1" for k in (1, 2, 3) for i in (0, 1)]
    assert all(not s.name.startswith("conv1") for s in plan.sites)


def test_layout_names_come_from_the_registry_and_the_cli_offers_them() -> None:
    assert layout_choices() == [
        "a",
        "b",
        "generic",
        "resnet-a",
        "resnet-b",
        "densenet-a",
        "generic-a",
    ]
    assert all(layout.name == name for name, layout in LAYOUTS.items())
    (option,) = [p for p in cli.commands["plan"].params if p.name == "layout"]
    assert list(option.type.choices) == layout_choices()
    # The help text (prose, kept torch-free) names every layout of the registry.
    help_text = " ".join(CliRunner().invoke(cli, ["plan", "--help"]).output.split())
    assert all(f" {name}" in help_text for name in LAYOUTS)
    assert resolve_layout("A", Family.DENSENET) == "densenet-a"
    assert resolve_layout("generic", Family.RESNET) == "generic-a"
    assert resolve_layout("b", Family.RESNET) == "resnet-b"
    with pytest.raises(InvalidOptionError, match=r"layout b \(IBN-b\) is defined for the ResNet"):
        resolve_layout("b", Family.GENERIC)


def test_ibn_b_refuses_a_ratio_and_keeps_none_in_the_plan() -> None:
    with pytest.raises(InvalidOptionError, match="IBN-b has no channel split"):
        ibnify.plan("resnet18", layout="b", ratio=0.5, input_size=SMALL)
    plan = ibnify.plan("resnet18", layout="b", input_size=SMALL)
    assert (plan.ratio, plan.stages, plan.family) == (None, (1, 2), "resnet")
