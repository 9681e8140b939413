"""ConversionPlan: what a conversion will change, as plain data (the dry run and the recipe).

A plan lists every site that changes and every norm left alone, each with the reason. It renders
as a table for people and round-trips through JSON, so a checkpoint can store it and
``ibnify.load`` can replay it on a freshly built base model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from ..errors import InvalidOptionError
from .reasons import Reason

__all__ = [
    "ConversionPlan",
    "ConversionSite",
    "PlanOptions",
    "SiteKind",
    "SkippedNorm",
    "as_input_size",
    "check_ratio",
    "parse_input_size",
    "parse_stages",
    "stages_text",
]


class SiteKind(StrEnum):
    """What happens at a conversion site (the plan JSON holds the value)."""

    IBN = "ibn"  # a BatchNorm becomes IBN (IN + BN halves)
    IN = "in"  # a BatchNorm becomes InstanceNorm2d (IBN-b stem)
    POST_ADD_IN = "post_add_in"  # a new InstanceNorm2d after a residual addition (IBN-b)


_KINDS = tuple(SiteKind)


@dataclass(frozen=True)
class ConversionSite:
    """One layer that changes.

    ``name`` is the qualified module name of the layer after conversion (for a post-addition IN,
    the new module, e.g. ``layer1.2.IN``). ``in_channels``/``bn_channels`` give the split.
    """

    name: str
    kind: SiteKind
    channels: int
    stage: int
    ratio: float | None = None
    order: str | None = None
    in_channels: int = 0
    bn_channels: int = 0
    param_delta: int = 0
    rule: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            kinds = tuple(str(k) for k in _KINDS)
            raise ValueError(f"unknown site kind {self.kind!r}; expected one of {kinds}")
        object.__setattr__(self, "kind", SiteKind(self.kind))

    def __str__(self) -> str:
        split = f"IN={self.in_channels} BN={self.bn_channels}"
        return f"{self.name} [{self.kind}] C={self.channels} {split}"


@dataclass(frozen=True)
class SkippedNorm:
    """A norm layer the plan leaves untouched, and why."""

    name: str
    stage: int
    reason: Reason

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkippedNorm:
        """Inverse of the plan JSON's skipped entry; reads an older plan's sentence too."""
        return cls(str(data["name"]), int(data["stage"]), Reason.from_dict(data["reason"]))


@dataclass(frozen=True)
class ConversionPlan:
    """Everything needed to convert a model and to replay the conversion later."""

    arch: str
    layout: str
    stages: tuple[int, ...]
    ratio: float | None
    sites: tuple[ConversionSite, ...]
    skipped: tuple[SkippedNorm, ...] = ()
    family: str = ""
    num_stages: int = 0
    extras: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def param_delta(self) -> int:
        """Change in the number of parameters the conversion causes."""
        return sum(site.param_delta for site in self.sites)

    def sites_per_stage(self) -> dict[int, int]:
        """Number of sites in each stage (stage 0 is the stem)."""
        counts: dict[int, int] = {}
        for site in self.sites:
            counts[site.stage] = counts.get(site.stage, 0) + 1
        return dict(sorted(counts.items()))

    def __str__(self) -> str:
        return (
            f"ConversionPlan({self.arch}, layout={self.layout}, stages={stages_text(self.stages)}, "
            f"{len(self.sites)} sites, param delta {self.param_delta:+,})"
        )

    def details(self, verbose: bool = False) -> str:
        """A table of the sites (and, with ``verbose``, of every skipped norm and why)."""
        header = ("layer", "change", "channels", "stage", "IN", "BN", "rule")
        rows = [
            (
                site.name,
                site.kind,
                str(site.channels),
                str(site.stage),
                str(site.in_channels),
                str(site.bn_channels),
                site.rule,
            )
            for site in self.sites
        ]
        lines = [str(self), *_table(header, rows)]
        lines.append(
            f"{len(self.sites)} sites; per stage: "
            + ", ".join(f"{stage}: {count}" for stage, count in self.sites_per_stage().items())
            + f"; parameter delta {self.param_delta:+,}"
        )
        if verbose and self.skipped:
            lines.append("")
            lines.append(f"{len(self.skipped)} norm layers left unchanged:")
            lines.extend(
                _table(
                    ("layer", "stage", "reason"),
                    [(s.name, str(s.stage), str(s.reason)) for s in self.skipped],
                )
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists, numbers, strings) that ``from_dict`` restores exactly."""
        data = asdict(self)
        data["stages"] = list(self.stages)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionPlan:
        """Rebuild a plan written by ``to_dict``; raises ValueError on a malformed dict.

        Plans written before reasons were records (a sentence per skipped norm) load too: see
        :meth:`ibnify.core.reasons.Reason.from_dict`.
        """
        try:
            return cls(
                arch=str(data["arch"]),
                layout=str(data["layout"]),
                stages=tuple(int(s) for s in data["stages"]),
                ratio=None if data.get("ratio") is None else float(data["ratio"]),
                sites=tuple(ConversionSite(**site) for site in data["sites"]),
                skipped=tuple(SkippedNorm.from_dict(s) for s in data.get("skipped", ())),
                family=str(data.get("family", "")),
                num_stages=int(data.get("num_stages", 0)),
                extras=dict(data.get("extras", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a valid conversion plan: {exc}") from exc

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of ``to_dict``."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ConversionPlan:
        """Inverse of ``to_json``."""
        return cls.from_dict(json.loads(text))


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]


def stages_text(stages: Sequence[int]) -> str:
    """``1,2,3`` for stages (1, 2, 3): how plans and messages write stages."""
    return ",".join(str(s) for s in stages)


def parse_stages(text: str) -> tuple[int, ...]:
    """Parse ``"1-3"``, ``"1,2,3"`` or ``"2"`` into sorted unique stage numbers (≥ 1)."""
    cleaned = text.strip()
    if not cleaned:
        raise InvalidOptionError("stages are empty; give stages like 1-3 or 1,2,3")
    stages: set[int] = set()
    for part in cleaned.split(","):
        part = part.strip()
        bounds = part.split("-")
        try:
            numbers = [int(b) for b in bounds]
        except ValueError:
            raise InvalidOptionError(
                f"stages {text!r} is not a stage list; give stages like 1-3 or 1,2,3"
            ) from None
        if len(numbers) == 1:
            low = high = numbers[0]
        elif len(numbers) == 2:
            low, high = numbers
            if low > high:
                raise InvalidOptionError(
                    f"stages {text!r}: range {low}-{high} runs backwards; write {high}-{low}"
                )
        else:
            raise InvalidOptionError(f"stages {text!r} is not a stage list; give e.g. 1-3")
        if low < 1:
            raise InvalidOptionError(
                f"stages {text!r}: stages start at 1 (stage 0 is the stem, never converted "
                "by IBN-a)"
            )
        stages.update(range(low, high + 1))
    return tuple(sorted(stages))


def parse_input_size(text: str) -> tuple[int, int, int]:
    """Parse ``"224"``, ``"160,224"`` or ``"3,224,224"`` (also ``3x224x224``) into (C, H, W).

    One or two numbers mean a 3-channel input of that height (and width).
    """
    return as_input_size(text)


def as_input_size(value: str | int | Sequence[int], channels: int = 3) -> tuple[int, int, int]:
    """(C, H, W) from ``224``, ``(160, 224)``, ``(3, 224, 224)`` or their text forms.

    The one input-size parser of the CLI and the library; one or two numbers get ``channels``.
    """
    if isinstance(value, str):
        parts: Sequence[object] = [p for p in value.lower().replace("x", ",").split(",")]
    elif isinstance(value, Sequence):
        parts = value
    else:
        parts = [value]
    try:
        numbers = [_whole_number(p) for p in parts if not (isinstance(p, str) and not p.strip())]
    except ValueError:
        numbers = []
    if len(numbers) in (1, 2):
        numbers = [channels, numbers[0], numbers[-1]]
    if len(numbers) != 3 or min(numbers) < 1:
        raise InvalidOptionError(f"{value!r} is not a size like 224 or 3,224,224")
    return numbers[0], numbers[1], numbers[2]


def _whole_number(value: object) -> int:
    """An int from an int or its text; anything else (bool, float, words) raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(value)
    return int(value)


def check_ratio(ratio: object) -> float:
    """Return ``ratio`` as a float, or raise InvalidOptionError unless 0 < ratio < 1.

    The one place the IN fraction is checked: the library's options and the CLI both call it.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not (0.0 < ratio < 1.0):
        raise InvalidOptionError(
            f"ratio {ratio!r} is not strictly between 0 and 1 (the fraction of channels given "
            "to IN)"
        )
    return float(ratio)


def _ratio_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidOptionError(
            f"ratio {text!r} is not a number; give the fraction of channels given to IN, e.g. 0.5"
        ) from None


@dataclass(frozen=True)
class PlanOptions:
    """What the user asks of a plan: layout, stages, IN ratio and analysis input size.

    ``None`` (or empty stages) means the layout's default. Built once (by the CLI or by
    ``ibnify.plan``/``ibnify.convert`` from their keywords) and passed down to the layouts;
    the ratio is checked on construction. Text parses as on the command line: ``stages="1-3"``,
    ``ratio="0.5"``.
    """

    layout: str = "a"
    stages: tuple[int, ...] | None = None
    ratio: float | None = None
    input_size: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stages, str):
            object.__setattr__(self, "stages", parse_stages(self.stages))
        elif self.stages is not None:
            object.__setattr__(self, "stages", tuple(self.stages))
        if isinstance(self.ratio, str):
            object.__setattr__(self, "ratio", check_ratio(_ratio_number(self.ratio)))
        elif self.ratio is not None:
            check_ratio(self.ratio)
        if self.input_size is not None:
            object.__setattr__(self, "input_size", as_input_size(self.input_size))
