"""Golden files: the plans of seven zoo models and the sites of a 40-model zoo sample.

The plan files were regenerated once when reasons became ``{"code", "at", "value"}`` records;
the files as they were before (reasons as sentences) stay in ``tests/golden/v1/``, and the new
files must carry the same sites and the same reasons (code, location, value) as those
sentences. The converter must keep producing the same bytes.
"""

from __future__ import annotations

import json

import pytest

from ibnify.core.plans import ConversionPlan
from ibnify.core.reasons import Reason, ReasonCode
from tests.golden.make_golden import (
    GOLDEN_PLANS,
    HERE,
    SAMPLE_FILE,
    V1_DIR,
    golden_plan_json,
    sample_sites,
)


@pytest.mark.parametrize("name", sorted(GOLDEN_PLANS))
def test_plan_json_is_byte_identical_to_golden(name: str) -> None:
    model, layout, size = GOLDEN_PLANS[name]
    expected = (HERE / f"plan_{name}.json").read_text()
    assert golden_plan_json(model, layout, size) == expected


@pytest.mark.parametrize("name", sorted(GOLDEN_PLANS))
def test_golden_plans_keep_the_sites_and_reason_codes_of_the_v1_sentences(name: str) -> None:
    """The files store codes where v1 stored sentences: same sites, same reasons."""
    old_data = json.loads((V1_DIR / f"plan_{name}.json").read_text())
    new_data = json.loads((HERE / f"plan_{name}.json").read_text())
    old, new = ConversionPlan.from_dict(old_data), ConversionPlan.from_dict(new_data)
    assert new.sites == old.sites and [s.name for s in new.skipped] == [s.name for s in old.skipped]
    assert [s.reason for s in new.skipped] == [s.reason for s in old.skipped]
    assert all(s.reason.code != ReasonCode.LEGACY for s in old.skipped)  # every sentence mapped
    # the sentence each new record renders is the one v1 stored, word for word
    assert [str(s.reason) for s in new.skipped] == [s["reason"] for s in old_data["skipped"]]
    assert all(set(s["reason"]) == {"code", "at", "value"} for s in new_data["skipped"])


def test_an_unknown_v1_sentence_loads_as_a_legacy_reason() -> None:
    reason = Reason.from_dict("kept by a rule that no longer exists")
    assert reason == Reason(ReasonCode.LEGACY, value="kept by a rule that no longer exists")
    assert str(reason) == "kept by a rule that no longer exists"
    assert Reason.from_dict("stage 3 not chosen") == Reason(ReasonCode.STAGE_NOT_CHOSEN, value=3)
    assert Reason.from_dict("shortcut BN (block s1.b1)") == Reason(ReasonCode.SHORTCUT, at="s1.b1")


_SAMPLE = json.loads(SAMPLE_FILE.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(_SAMPLE))
def test_zoo_sample_sites_unchanged(model: str) -> None:
    entry = _SAMPLE[model]
    assert sample_sites(model, entry["input"]) == entry["sites"]


def test_zoo_sample_holds_forty_models() -> None:
    assert len(_SAMPLE) == 40
    assert sum(len(e["sites"]) for e in _SAMPLE.values()) > 400
