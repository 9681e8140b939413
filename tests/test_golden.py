"""Golden files: the plans of seven zoo models and the sites of a 40-model zoo sample.

They were written by ``tests/golden/make_golden.py`` before the code moved into ``core/`` and
``deploy/``; the converter must keep producing the same bytes.
"""

from __future__ import annotations

import json

import pytest

from tests.golden.make_golden import GOLDEN_PLANS, HERE, SAMPLE_FILE, golden_plan_json, sample_sites


@pytest.mark.parametrize("name", sorted(GOLDEN_PLANS))
def test_plan_json_is_byte_identical_to_golden(name: str) -> None:
    model, layout, size = GOLDEN_PLANS[name]
    expected = (HERE / f"plan_{name}.json").read_text()
    assert golden_plan_json(model, layout, size) == expected


_SAMPLE = json.loads(SAMPLE_FILE.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(_SAMPLE))
def test_zoo_sample_sites_unchanged(model: str) -> None:
    entry = _SAMPLE[model]
    assert sample_sites(model, entry["input"]) == entry["sites"]


def test_zoo_sample_holds_forty_models() -> None:
    assert len(_SAMPLE) == 40
    assert sum(len(e["sites"]) for e in _SAMPLE.values()) > 400
