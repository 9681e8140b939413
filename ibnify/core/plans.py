"""ConversionPlan: what a conversion will change, as plain data (the dry run and the recipe).

A plan lists every site that changes and every norm left alone, each with the reason. It renders
as a table for people and round-trips through JSON, so a checkpoint can store it and
``ibnify.load`` can replay it on a freshly built base model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InvalidOptionError

__all__ = [
    "KIND_IBN",
    "KIND_IN",
    "KIND_POST_ADD_IN",
    "ConversionPlan",
    "ConversionSite",
    "SkippedNorm",
    "parse_stages",
]

KIND_IBN = "ibn"  # a BatchNorm becomes IBN (IN + BN halves)
KIND_IN = "in"  # a BatchNorm becomes InstanceNorm2d (IBN-b stem)
KIND_POST_ADD_IN = "post_add_in"  # a new InstanceNorm2d after a residual addition (IBN-b)
_KINDS = (KIND_IBN, KIND_IN, KIND_POST_ADD_IN)


@dataclass(frozen=True)
class ConversionSite:
    """One layer that changes.

    ``name`` is the qualified module name of the layer after conversion (for a post-addition IN,
    the new module, e.g. ``layer1.2.IN``). ``in_channels``/``bn_channels`` give the split.
    """

    name: str
    kind: str
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
            raise ValueError(f"unknown site kind {self.kind!r}; expected one of {_KINDS}")

    def __str__(self) -> str:
        split = f"IN={self.in_channels} BN={self.bn_channels}"
        return f"{self.name} [{self.kind}] C={self.channels} {split}"


@dataclass(frozen=True)
class SkippedNorm:
    """A norm layer the plan leaves untouched, and why."""

    name: str
    stage: int
    reason: str


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
        stages = ",".join(str(s) for s in self.stages)
        return (
            f"ConversionPlan({self.arch}, layout={self.layout}, stages={stages}, "
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
                    [(s.name, str(s.stage), s.reason) for s in self.skipped],
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
        """Rebuild a plan written by ``to_dict``; raises ValueError on a malformed dict."""
        try:
            return cls(
                arch=str(data["arch"]),
                layout=str(data["layout"]),
                stages=tuple(int(s) for s in data["stages"]),
                ratio=None if data.get("ratio") is None else float(data["ratio"]),
                sites=tuple(ConversionSite(**site) for site in data["sites"]),
                skipped=tuple(SkippedNorm(**s) for s in data.get("skipped", ())),
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
