"""Plans as data: JSON round trip, the table, skip reasons, options and their parsers."""

from __future__ import annotations

import json

import pytest
import torchvision

import ibnify
from ibnify.core.plans import (
    ConversionPlan,
    ConversionSite,
    PlanOptions,
    SiteKind,
    as_input_size,
    check_ratio,
    parse_input_size,
    parse_stages,
)
from ibnify.core.reasons import Reason, ReasonCode
from ibnify.errors import InvalidOptionError

SMALL = (3, 64, 64)


def test_plan_json_round_trip_and_reasons() -> None:
    plan = ibnify.plan("resnet50", input_size=SMALL)
    text = plan.to_json()
    again = ConversionPlan.from_json(text)
    assert again == plan and again.to_json() == text
    assert all(type(site.kind) is SiteKind for site in again.sites)
    assert json.loads(text)["sites"][0]["kind"] == "ibn" and json.loads(text)["extras"] == {}
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["bn1"] == Reason(ReasonCode.STEM)
    assert reasons["layer1.0.downsample.1"] == Reason(ReasonCode.RESNET_SHORTCUT)
    assert reasons["layer1.0.bn3"] == Reason(ReasonCode.RESNET_PRE_ADD)
    assert reasons["layer1.0.bn2"] == Reason(ReasonCode.RESNET_NOT_BN1)
    assert reasons["layer4.0.bn1"] == Reason(ReasonCode.STAGE_NOT_CHOSEN, value=4)
    saved = json.loads(text)["skipped"]
    stem = {"code": "stem", "at": None, "value": None}
    assert saved[0] == {"name": "bn1", "stage": 0, "reason": stem}
    # text only at display: the table renders the sentence from the code
    rows = [line.split() for line in plan.details(verbose=True).splitlines()]
    assert ["layer4.0.bn1", "4", "stage", "4", "not", "chosen"] in rows


def test_plan_table_lists_sites_and_with_verbose_every_skipped_norm() -> None:
    plan = ibnify.plan("resnet18", input_size=SMALL)
    table = plan.details().splitlines()
    assert (
        table[0]
        == str(plan)
        == ("ConversionPlan(tv:resnet18, layout=resnet-a, stages=1,2,3, 6 sites, param delta +0)")
    )
    assert table[1].split() == ["layer", "change", "channels", "stage", "IN", "BN", "rule"]
    assert table[3].split()[:6] == ["layer1.0.bn1", "ibn", "64", "1", "32", "32"]
    assert table[-1] == "6 sites; per stage: 1: 2, 2: 2, 3: 2; parameter delta +0"
    verbose = plan.details(verbose=True)
    assert f"{len(plan.skipped)} norm layers left unchanged:" in verbose
    assert len(verbose.splitlines()) == len(table) + 1 + 1 + 2 + len(plan.skipped)


def test_model_kwargs_are_recorded_in_a_new_plan_not_by_mutation() -> None:
    plan = ibnify.plan("resnet18", input_size=SMALL, model_kwargs={"num_classes": 10})
    assert plan.extras == {"model_kwargs": {"num_classes": 10}}
    assert ConversionPlan.from_json(plan.to_json()).extras == plan.extras
    assert ibnify.plan("resnet18", input_size=SMALL).extras == {}


def test_site_kind_is_checked_and_kept_as_the_enum() -> None:
    site = ConversionSite("a.bn", "post_add_in", 8, 1)
    assert site.kind is SiteKind.POST_ADD_IN and str(site) == "a.bn [post_add_in] C=8 IN=0 BN=0"
    with pytest.raises(ValueError, match="unknown site kind 'bn'"):
        ConversionSite("a.bn", "bn", 8, 1)


@pytest.mark.parametrize(
    ("text", "stages"),
    [("1-3", (1, 2, 3)), ("1,3", (1, 3)), (" 2 ", (2,)), ("3,1-2", (1, 2, 3)), ("2-2", (2,))],
)
def test_parse_stages(text: str, stages: tuple[int, ...]) -> None:
    assert parse_stages(text) == stages


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "stages are empty"),
        ("a", "is not a stage list"),
        ("3-1", "runs backwards; write 1-3"),
        ("0-2", "stages start at 1"),
        ("1-2-3", "is not a stage list"),
    ],
)
def test_parse_stages_refuses(text: str, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        parse_stages(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("224", (3, 224, 224)), ("160,224", (3, 160, 224)), ("1x64x64", (1, 64, 64))],
)
def test_parse_input_size(text: str, size: tuple[int, int, int]) -> None:
    assert parse_input_size(text) == size


@pytest.mark.parametrize("text", ["big", "0", "1,2,3,4", "3,-1,4"])
def test_parse_input_size_refuses(text: str) -> None:
    with pytest.raises(InvalidOptionError, match=r"is not a size like 224 or 3,224,224"):
        parse_input_size(text)


@pytest.mark.parametrize(
    ("value", "channels", "size"),
    [
        (224, 3, (3, 224, 224)),
        ((160, 224), 1, (1, 160, 224)),
        ([2, 64, 80], 3, (2, 64, 80)),
        (" 3, 64, 64 ", 3, (3, 64, 64)),
    ],
)
def test_as_input_size_accepts_numbers_sequences_and_text(value, channels, size) -> None:
    """The one parser of the CLI and the library (export, PlanOptions) gives (C, H, W)."""
    assert as_input_size(value, channels) == size


@pytest.mark.parametrize("value", [2.5, True, None, (3, 0, 4), (1, 2, 3, 4), (3.5, 2), "a,b"])
def test_as_input_size_refuses(value: object) -> None:
    with pytest.raises(InvalidOptionError, match=r"is not a size like 224 or 3,224,224"):
        as_input_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1, float("nan"), True, "0.5"])
def test_check_ratio_refuses(ratio: object) -> None:
    with pytest.raises(InvalidOptionError, match="is not strictly between 0 and 1"):
        check_ratio(ratio)


def test_plan_options_are_one_checked_record() -> None:
    options = PlanOptions(layout="b", stages=[2, 1], input_size=[3, 32, 32])  # type: ignore[arg-type]
    assert options.stages == (2, 1) and options.input_size == (3, 32, 32)
    assert check_ratio(0.25) == 0.25
    with pytest.raises(InvalidOptionError, match=r"ratio 1\.0 is not strictly between 0 and 1"):
        PlanOptions(ratio=1.0)
    model = torchvision.models.resnet18()
    by_keywords = ibnify.plan(model, stages=(1,), ratio=0.25, input_size=SMALL)
    by_options = ibnify.plan(model, options=PlanOptions(stages=(1,), ratio=0.25, input_size=SMALL))
    assert by_options.to_json() == by_keywords.to_json()
    with pytest.raises(InvalidOptionError, match="not both"):
        ibnify.plan(model, stages=(1,), options=PlanOptions())


def test_reason_text_is_rendered_from_the_code_never_parsed() -> None:
    hazard = Reason(ReasonCode.SPLIT_PATHS, at="chunk_1")
    assert str(hazard) == (
        "a channel split would send its IN and BN parts down different paths (at chunk_1)"
    )
    assert hazard.summary == "a channel split would send its IN and BN parts down different paths"
    assert str(Reason(ReasonCode.SHORTCUT, at="layer1.0")) == "shortcut BN (block layer1.0)"
    assert str(Reason(ReasonCode.STAGE_NOT_CHOSEN, value=4)) == "stage 4 not chosen"
    assert str(Reason(ReasonCode.NOT_2D_BATCHNORM, value="BatchNorm1d")) == (
        "not a 2-D BatchNorm (BatchNorm1d)"
    )
    for code in ReasonCode:  # every code has a sentence, fully filled in
        text = str(Reason(code, at="x", value=1))
        assert text and "{" not in text and text.startswith(Reason(code, "x", 1).summary)


def test_every_reason_sentence_maps_back_to_its_record() -> None:
    """Format-1 plans stored ``str(reason)``: each template's sentence parses to its record."""
    for code in ReasonCode:
        if code == ReasonCode.LEGACY:
            continue
        sentence = str(Reason(code, at="layer1.0", value=3))
        back = Reason.from_dict(sentence)
        assert back.code == code, sentence
        assert str(back) == sentence and back.to_dict()["code"] == str(code)
    assert Reason.from_dict("role 'main' unknown to the generic rule").value == "main"
    with pytest.raises(ValueError, match="unknown reason code 'gone'"):
        Reason.from_dict({"code": "gone", "at": None, "value": None})


def test_a_site_with_a_one_pixel_feature_map_is_refused_at_plan_time() -> None:
    """Stage 4 of resnet18 at 32×32 is 1×1: IN cannot normalise one pixel, so the plan says so
    in one line instead of a model that fails at its first forward. Stages 1-3 still plan."""
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(InvalidOptionError, match=r"^layer4\.0\.bn1 \(stage 4\) sees a 1×1"):
        ibnify.plan(model, stages=(4,), input_size=(3, 32, 32))
    assert len(ibnify.plan(model, stages=(1, 2, 3), input_size=(3, 32, 32)).sites) == 6
    assert len(ibnify.plan(model, stages=(4,), input_size=(3, 64, 64)).sites) == 2
