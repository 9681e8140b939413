"""A search space instead of a list: ``--space "a:1-3@0.125..0.75;b"``, sampled per trial.

Grammar (items separated by ``;``):

- ``b``: IBN-b.
- ``a``: IBN-a on a prefix of stages ``1..k``, ``k`` from 1 to the last stage but one.
- ``a:K1-K2``: IBN-a on ``1..k`` with ``K1 <= k <= K2`` (the last stage only when written).
- ``@R``, ``@LO..HI``, ``@R1,R2``: the IN ratio fixed, in a range, or one of a list (default
  the layout's own).

A trial first picks an item (``item``), then that item's prefix end (``depth:I``) and ratio
(``ratio:I``); Optuna's TPE sampler, seeded, makes the picks, so a fixed seed proposes the
same trials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from ..errors import InvalidOptionError
from .candidates import Candidate

__all__ = ["SpaceItem", "candidate_params", "parse_space", "resolve_space", "sample_candidate"]


@dataclass(frozen=True)
class SpaceItem:
    """One ``;``-separated item: a layout, the prefix ends ``(low, high)`` (None: all but the
    last stage), and the ratio: ``(low, high)`` range or a tuple of choices (empty: default)."""

    text: str
    layout: str
    depths: tuple[int, int] | None = None
    ratio_range: tuple[float, float] | None = None
    ratios: tuple[float, ...] = ()


def _ratio(text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise InvalidOptionError(
            f"space item {item!r}: ratio {text!r} is not strictly between 0 and 1"
        )
    return value


def _depths(text: str, item: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        first, last = int(low), int(high or low)
    except ValueError:
        first, last = 0, 0
    if first < 1 or last < first:
        raise InvalidOptionError(
            f"space item {item!r}: {text!r} is not a range of prefix ends like 1-3"
        )
    return first, last


def parse_space(spec: str) -> list[SpaceItem]:
    """``"a:1-3@0.125..0.75;b"`` → items (checked; the stage count is checked later).

    Raises:
        InvalidOptionError: an item that is not ``b`` or ``a[:K1-K2][@RATIOS]``, a ratio
            outside (0, 1) or a range whose ends are reversed, or an empty space.
    """
    items: dict[str, SpaceItem] = {}
    for raw in spec.split(";"):
        text = raw.strip().lower()
        if not text:
            continue
        head, _, ratio_text = text.partition("@")
        layout, _, depth_text = head.partition(":")
        if layout == "b" and not depth_text and not ratio_text:
            items.setdefault(text, SpaceItem(text, "b"))
            continue
        if layout != "a":
            raise InvalidOptionError(
                f"unknown space item {raw.strip()!r}; write a[:K1-K2][@LO..HI] or b, separated "
                "by ';' (e.g. \"a:1-3@0.125..0.75;b\")"
            )
        depths = _depths(depth_text, text) if depth_text else None
        ratio_range, ratios = None, ()
        if ".." in ratio_text:
            low, _, high = ratio_text.partition("..")
            ratio_range = (_ratio(low, text), _ratio(high, text))
            if ratio_range[1] <= ratio_range[0]:
                raise InvalidOptionError(f"space item {text!r}: write the ratio range LOW..HIGH")
        elif ratio_text:
            ratios = tuple(_ratio(part, text) for part in ratio_text.split(","))
        items.setdefault(text, SpaceItem(text, "a", depths, ratio_range, ratios))
    if not items:
        raise InvalidOptionError("the search space is empty")
    return list(items.values())


def resolve_space(items: list[SpaceItem], stages: int) -> list[SpaceItem]:
    """Fill in the default prefix ends (1 to ``stages - 1``) and check the written ones."""
    resolved = []
    for item in items:
        if item.layout == "a" and item.depths is None:
            item = SpaceItem(item.text, "a", (1, max(1, stages - 1)), item.ratio_range, item.ratios)
        if item.depths is not None and item.depths[1] > stages:
            raise InvalidOptionError(
                f"space item {item.text!r}: stage {item.depths[1]} is out of range (the model "
                f"has {stages} stages)"
            )
        resolved.append(item)
    return resolved


def sample_candidate(trial: optuna.Trial, items: list[SpaceItem]) -> Candidate:
    """The candidate ``trial`` proposes: an item, then its prefix end and ratio."""
    index = int(trial.suggest_categorical("item", [str(i) for i in range(len(items))]))
    item = items[index]
    if item.layout == "b":
        return Candidate("b")
    assert item.depths is not None
    depth = trial.suggest_int(f"depth:{index}", *item.depths)
    ratio: float | None = None
    if item.ratio_range is not None:
        ratio = round(trial.suggest_float(f"ratio:{index}", *item.ratio_range), 3)
    elif len(item.ratios) > 1:
        ratio = float(trial.suggest_categorical(f"ratio:{index}", list(item.ratios)))
    elif item.ratios:
        ratio = item.ratios[0]
    return Candidate("a", tuple(range(1, depth + 1)), ratio)


def candidate_params(items: list[SpaceItem], candidate: Candidate) -> dict[str, Any] | None:
    """The trial parameters that propose ``candidate`` (a default-ratio IBN-a prefix or IBN-b),
    or None when the space does not hold it: how analyze's suggestion seeds the first trial."""
    stages = candidate.stages
    for index, item in enumerate(items):
        if item.layout != candidate.layout:
            continue
        if item.layout == "b":
            return {"item": str(index)}
        assert item.depths is not None
        prefix = stages == tuple(range(1, len(stages) + 1))
        if not prefix or not item.depths[0] <= len(stages) <= item.depths[1]:
            continue
        params: dict[str, Any] = {"item": str(index), f"depth:{index}": len(stages)}
        if item.ratio_range is not None:  # the layout's own 0.5 where the range holds it
            low, high = item.ratio_range
            params[f"ratio:{index}"] = 0.5 if low <= 0.5 <= high else (low + high) / 2
        elif len(item.ratios) > 1:
            params[f"ratio:{index}"] = item.ratios[0]
        return params
    return None
