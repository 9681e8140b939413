"""What :func:`ibnify.analyze` returns: divergence per site and per stage, the
suggested ``stages`` (rule in :data:`SUGGESTION_RULE`), and its table, JSON and plot."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._report import markdown_table, new_figure, save_png, stage_range_text

__all__ = [
    "CONTENT_FACTOR",
    "SUGGESTION_RULE",
    "DivergenceReport",
    "SiteDivergence",
    "suggest_stages",
]

CONTENT_FACTOR = 3.0
"""A stage counts as appearance-dominated when its divergence is at least this many times its
content baseline."""

SUGGESTION_RULE = (
    "suggested stages: the longest prefix 1..k of stages, never the last stage, in which every "
    f"stage's mean divergence is at least {CONTENT_FACTOR:g}× its content baseline (the same "
    "measure between two random halves of domain A)"
)


@dataclass
class SiteDivergence:
    """Divergence at one norm layer's output: appearance (A vs B) and content (A vs A)."""

    name: str
    stage: int
    index: int
    kind: str
    channels: int
    divergence: float
    content: float
    per_shift: dict[str, float] = field(default_factory=dict)
    site: str = ""

    @property
    def ratio(self) -> float:
        """Divergence over content baseline (inf when the baseline is 0)."""
        return self.divergence / self.content if self.content > 0 else float("inf")


def suggest_stages(
    stage_divergence: dict[int, float], stage_content: dict[int, float]
) -> tuple[int, ...]:
    """Apply :data:`SUGGESTION_RULE` to per-stage divergences and content baselines."""
    stages = sorted(s for s in stage_divergence if s >= 1)
    if not stages:
        return ()
    chosen: list[int] = []
    for stage in range(1, max(stages)):
        value = stage_divergence.get(stage)
        if value is None or value <= 0 or value < CONTENT_FACTOR * stage_content.get(stage, 0):
            break
        chosen.append(stage)
    return tuple(chosen)


@dataclass
class DivergenceReport:
    """Feature divergence per norm site and per stage, the content baseline and a suggestion."""

    arch: str
    domain_a: str
    domain_b: str
    images: int
    shifts: list[str]
    sites: list[SiteDivergence]
    converted: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def _per_stage(self, attribute: str) -> dict[int, float]:
        values: dict[int, list[float]] = {}
        for site in self.sites:
            values.setdefault(site.stage, []).append(getattr(site, attribute))
        return {stage: sum(v) / len(v) for stage, v in sorted(values.items())}

    @property
    def stage_divergence(self) -> dict[int, float]:
        """Mean site divergence per stage (0 = stem)."""
        return self._per_stage("divergence")

    @property
    def stage_content(self) -> dict[int, float]:
        """Mean content baseline per stage."""
        return self._per_stage("content")

    @property
    def suggested_stages(self) -> tuple[int, ...]:
        """Stages for ``stages`` by :data:`SUGGESTION_RULE`; empty when none qualifies."""
        return suggest_stages(self.stage_divergence, self.stage_content)

    def table(self) -> str:
        """Markdown tables: every norm site in execution order, then one row per stage."""
        header = ["#", "layer", "stage", "C", "divergence", "content", "×content", "site"]
        rows = [
            [
                str(s.index),
                s.name,
                str(s.stage),
                str(s.channels),
                f"{s.divergence:.4f}",
                f"{s.content:.4f}",
                _ratio_text(s.ratio),
                s.site,
            ]
            for s in self.sites
        ]
        content = self.stage_content
        counts: dict[int, int] = {}
        for s in self.sites:
            counts[s.stage] = counts.get(s.stage, 0) + 1
        stage_rows = [
            [
                "stem" if stage == 0 else str(stage),
                str(counts[stage]),
                f"{value:.4f}",
                f"{content[stage]:.4f}",
                _ratio_text(value / content[stage] if content[stage] > 0 else float("inf")),
            ]
            for stage, value in self.stage_divergence.items()
        ]
        stage_header = ["stage", "sites", "divergence", "content", "×content"]
        return "\n".join(
            [*markdown_table(header, rows), "", *markdown_table(stage_header, stage_rows)]
        )

    def summary(self) -> str:
        """The suggestion in words (the ``stages`` to convert) and the rule."""
        stages = self.suggested_stages
        lines = []
        if stages:
            lines.append(f"suggested `stages={stage_range_text(stages)}`")
        else:
            lines.append(
                "suggested `stages`: none (no stage's divergence is clearly above the content "
                "baseline; IN is unlikely to help for these domains)"
            )
        lines.append(f"rule: {SUGGESTION_RULE}")
        if self.converted:
            lines.append(
                "the model is converted already (its sites are marked); apply the suggestion to "
                "the unconverted network"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: sites, stages, the suggestion and its rule."""
        return {
            "arch": self.arch,
            "domain_a": self.domain_a,
            "domain_b": self.domain_b,
            "images": self.images,
            "shifts": list(self.shifts),
            "converted": self.converted,
            "sites": [{**asdict(s), "ratio": _finite(s.ratio)} for s in self.sites],
            "stages": {
                str(stage): {"divergence": value, "content": self.stage_content[stage]}
                for stage, value in self.stage_divergence.items()
            },
            "suggested_stages": list(self.suggested_stages),
            "rule": SUGGESTION_RULE,
            **self.extras,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path: str | os.PathLike[str], title: str | None = None) -> Path:
        """PNG of divergence and content baseline against depth, stage boundaries marked; atomic."""
        figure = new_figure(max(6.0, 0.12 * len(self.sites) + 4), 4.0)
        axes = figure.add_subplot(1, 1, 1)
        depth = list(range(len(self.sites)))
        values = [max(s.divergence, 1e-6) for s in self.sites]  # log axis: 0 drawn at 1e-6
        axes.plot(depth, values, "o-", label="appearance (A vs B)")
        content = [max(s.content, 1e-6) for s in self.sites]
        axes.plot(depth, content, "s--", label="content baseline (A vs A)")
        converted = [i for i, s in enumerate(self.sites) if s.site]
        if converted:
            axes.plot(
                converted,
                [values[i] for i in converted],
                "o",
                mfc="none",
                ms=11,
                color="black",
                label="IBN site" + (" (converted)" if self.converted else " (default IBN-a)"),
            )
        _mark_stages(axes, [s.stage for s in self.sites])
        axes.set_yscale("log")
        axes.set_xlabel("norm layer, in execution order")
        axes.set_ylabel("feature divergence (symmetric KL)")
        axes.set_title(title or f"{self.arch}: {self.domain_a} vs {self.domain_b}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", frameon=False, loc="center right")
        return save_png(figure, path)


def _mark_stages(axes: Any, stages: list[int]) -> None:
    start = 0
    for index in range(1, len(stages) + 1):
        if index == len(stages) or stages[index] != stages[start]:
            label = "stem" if stages[start] == 0 else f"stage {stages[start]}"
            axes.text(
                (start + index - 1) / 2,
                0.97,
                label,
                ha="center",
                va="top",
                fontsize="small",
                transform=axes.get_xaxis_transform(),
            )
            if index < len(stages):
                axes.axvline(index - 0.5, color="grey", ls=":", lw=1)
            start = index


def _ratio_text(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.1f}"


def _finite(value: float) -> float | None:
    return None if value == float("inf") else value
