"""What :func:`ibnify.search_placement` returns: finished candidates, ranked by accuracy under
shift (:data:`RANK_RULE`), with their Pareto front, table, JSON, plot, winner conversion."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._report import markdown_table, new_figure, save_png
from ..data.shifts import CLEAN

__all__ = [
    "CONTROL_NAME",
    "FORMAT",
    "OBJECTIVES",
    "RANK_RULE",
    "CandidateResult",
    "SearchReport",
    "rank_rule",
]

OBJECTIVES = ("shifts", "domains", "both")
"""What a search ranks by: mean accuracy under the shifts, on the target domains, or the mean
of the two."""
RANK_RULE = (
    "ranked by mean accuracy under the shifts (clean accuracy minus mean drop), then by clean "
    "accuracy; the control is listed for reference and cannot win"
)
FORMAT = "ibnify.layout-search/1"
"""The ``format`` field of ``results.jsonl`` and ``report.json``."""
CONTROL_NAME = "control"
"""The name of the control: the unconverted model fine-tuned identically."""

_OBJECTIVE_TEXT = {
    "shifts": "mean accuracy under the shifts (clean accuracy minus mean drop)",
    "domains": "mean accuracy on the target domains",
    "both": "the mean of the accuracy under the shifts and on the target domains",
}


def _plural(value: float) -> str:
    return "" if value == 1 else "s"


def rank_rule(objective: str = "shifts", max_clean_drop: float | None = None) -> str:
    """The ranking rule in words, as the report and ``report.json`` state it."""
    limit = (
        ""
        if max_clean_drop is None
        else f"; a candidate more than {max_clean_drop:g} point{_plural(max_clean_drop)} of clean "
        "accuracy below the control cannot win"
    )
    return (
        f"ranked by {_OBJECTIVE_TEXT[objective]}, then by clean accuracy{limit}; the control is "
        "listed for reference and cannot win"
    )


@dataclass
class CandidateResult:
    """One finished candidate: accuracies (fractions) clean, per shift and per target domain,
    its cost, and the epoch it stopped at when successive halving stopped it early."""

    name: str
    layout: str
    stages: list[int]
    ratio: float | None
    accuracy: dict[str, float]
    seconds: float
    checkpoint: str | None = None
    domains: dict[str, float] = field(default_factory=dict)
    epochs: int | None = None
    stopped_at: int | None = None

    @property
    def clean(self) -> float:
        """Clean accuracy."""
        return self.accuracy[CLEAN]

    def drops(self) -> dict[str, float]:
        """Clean accuracy minus accuracy under each shift."""
        return {s: self.clean - a for s, a in self.accuracy.items() if s != CLEAN}

    @property
    def mean_drop(self) -> float:
        """Mean drop over the shifts."""
        drops = self.drops()
        return sum(drops.values()) / max(len(drops), 1)

    @property
    def worst(self) -> tuple[str, float]:
        """The shift with the largest drop, and that drop."""
        drops = self.drops()
        if not drops:
            return "-", 0.0
        name = max(drops, key=lambda s: (drops[s], s))
        return name, drops[name]

    @property
    def score(self) -> float:
        """Mean accuracy under the shifts: what the ``shifts`` objective sorts by."""
        return self.clean - self.mean_drop

    @property
    def domain_mean(self) -> float:
        """Mean accuracy over the target domains (clean accuracy without domains)."""
        if not self.domains:
            return self.clean
        return sum(self.domains.values()) / len(self.domains)

    def objective(self, objective: str) -> float:
        """The value ``objective`` ranks by (see :data:`OBJECTIVES`)."""
        if objective == "domains":
            return self.domain_mean
        if objective == "both":
            return (self.score + self.domain_mean) / 2
        return self.score

    @property
    def full(self) -> bool:
        """True unless successive halving stopped this candidate before the full schedule."""
        return self.stopped_at is None


@dataclass
class SearchReport:
    """The control and every finished candidate, ranked; what stopped the search, if anything.

    ``objective`` is what candidates are ranked by (:data:`OBJECTIVES`); a candidate whose
    clean accuracy lies more than ``max_clean_drop`` points below the control's cannot win
    (None: no limit); ``halving`` lists the epochs after which the worse half stopped.
    """

    results: list[CandidateResult]
    shifts: list[str]
    settings: dict[str, Any]
    reused: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    stopped: str | None = None
    files: dict[str, Path] = field(default_factory=dict)
    objective: str = "shifts"
    max_clean_drop: float | None = None
    domains: list[str] = field(default_factory=list)
    halving: list[int] = field(default_factory=list)

    @property
    def control(self) -> CandidateResult | None:
        """The unconverted model fine-tuned identically."""
        return next((r for r in self.results if r.name == CONTROL_NAME), None)

    @property
    def rule(self) -> str:
        """The ranking rule in words."""
        return rank_rule(self.objective, self.max_clean_drop)

    def clean_cost(self, result: CandidateResult) -> float | None:
        """Points of clean accuracy ``result`` loses against the control (negative: gains)."""
        control = self.control
        return None if control is None else 100 * (control.clean - result.clean)

    def excluded(self, result: CandidateResult) -> bool:
        """True when ``result`` loses more clean accuracy than ``max_clean_drop`` allows."""
        cost = self.clean_cost(result)
        if cost is None or self.max_clean_drop is None or result.name == CONTROL_NAME:
            return False
        return cost > self.max_clean_drop + 1e-9

    def ranked(self) -> list[CandidateResult]:
        """Candidates by :attr:`rule`: those within the clean-accuracy limit first, then the
        excluded ones, then those halving stopped (latest first); ties broken by name."""
        candidates = [r for r in self.results if r.name != CONTROL_NAME]

        def key(r: CandidateResult) -> tuple:
            stopped = -(r.stopped_at or 0) if not r.full else 0
            value = -round(r.objective(self.objective), 9)
            return (not r.full, stopped, self.excluded(r), value, -round(r.clean, 9), r.name)

        return sorted(candidates, key=key)

    @property
    def winner(self) -> CandidateResult | None:
        """The best candidate that ran the full schedule within the clean-accuracy limit."""
        return next((r for r in self.ranked() if r.full and not self.excluded(r)), None)

    def _robustness(self, result: CandidateResult) -> float:
        """The Pareto axis besides clean accuracy (higher is better)."""
        return -result.mean_drop if self.objective == "shifts" else result.objective(self.objective)

    def pareto(self) -> set[str]:
        """Full-schedule names not dominated in (clean accuracy ↑, robustness ↑), control
        included; robustness is minus the mean drop (``shifts``) or the objective."""
        full = [r for r in self.results if r.full]
        front = set()
        for r in full:
            dominated = any(
                o.clean >= r.clean
                and self._robustness(o) >= self._robustness(r)
                and (o.clean > r.clean or self._robustness(o) > self._robustness(r))
                for o in full
            )
            if not dominated:
                front.add(r.name)
        return front

    def _note(self, result: CandidateResult) -> str:
        if not result.full:
            return f"halving: stopped after epoch {result.stopped_at} (figures on the rung subset)"
        if self.excluded(result):
            return f"excluded: clean {-self.clean_cost(result):+.1f} vs control"  # type: ignore[operator]
        return ""

    def table(self) -> str:
        """Markdown table: rank, candidate, clean %, mean and worst drop, ratio to control, the
        target domains' accuracy, and a note for excluded or early-stopped candidates."""
        control = self.control
        front = self.pareto()
        header = ["rank", "candidate", "clean", "mean drop", "worst drop", "×control", "pareto"]
        header += [f"domain {d}" for d in self.domains]
        ordered = self.ranked() + ([control] if control else [])
        notes = [self._note(r) for r in ordered]
        if any(notes):
            header.append("note")
        rows = []
        for index, (r, note) in enumerate(zip(ordered, notes, strict=True), start=1):
            worst_name, worst = r.worst
            ratio = (
                f"{r.mean_drop / control.mean_drop:.2f}"
                if control is not None and control.mean_drop > 0
                else "-"
            )
            row = [
                "-" if r.name == CONTROL_NAME or note else str(index),
                r.name,
                f"{100 * r.clean:.1f}",
                f"{100 * r.mean_drop:.1f}",
                f"{100 * worst:.1f} ({worst_name})",
                ratio,
                "yes" if r.name in front else "",
            ]
            row += [f"{100 * r.domains[d]:.1f}" if d in r.domains else "-" for d in self.domains]
            rows.append(row + ([note] if any(notes) else []))
        return "\n".join(markdown_table(header, rows))

    def winner_line(self) -> str:
        """One line: the winner, its objective value and its clean cost against the control;
        or why there is none."""
        winner = self.winner
        if winner is None:
            if any(self.excluded(r) for r in self.results):
                return (
                    f"no winner: every finished candidate loses more than {self.max_clean_drop:g} "
                    "points of clean accuracy against the control (`max_clean_drop`)"
                )
            return "no winner: no candidate finished the full schedule"
        cost = self.clean_cost(winner)
        clean = f"clean {100 * winner.clean:.1f}%"
        if cost is not None:
            clean += f", {-cost:+.1f} points vs the control"
        value = 100 * winner.objective(self.objective)
        return f"winner: {winner.name} ({clean}; {self.objective} objective {value:.1f}%)"

    def winner_conversion(self) -> dict[str, Any] | None:
        """How the winner is converted from the base, in :func:`ibnify.convert`'s keywords
        (``layout``; for IBN-a ``stages`` and any ``ratio``); None without a winner. The
        fine-tuning that follows is ``settings["finetune"]``."""
        winner = self.winner
        if winner is None:
            return None
        if winner.layout == "b":
            return {"layout": "b"}
        found: dict[str, Any] = {"layout": "a", "stages": tuple(winner.stages)}
        if winner.ratio is not None:
            found["ratio"] = winner.ratio
        return found

    def to_dict(self) -> dict[str, Any]:
        """Plain data: settings, results with drops, ranking, Pareto front, stop reason."""
        return {
            "format": FORMAT,
            "settings": self.settings,
            "shifts": list(self.shifts),
            "rule": self.rule,
            "objective": self.objective,
            "max_clean_drop": self.max_clean_drop,
            "domains": list(self.domains),
            "halving": list(self.halving),
            "ranking": [r.name for r in self.ranked()],
            "excluded": [r.name for r in self.results if self.excluded(r)],
            "winner": self.winner.name if self.winner else None,
            "pareto": sorted(self.pareto()),
            "results": [
                {
                    **asdict(r),
                    "mean_drop": r.mean_drop,
                    "worst_drop": r.worst[1],
                    "worst_shift": r.worst[0],
                    "drop": r.drops(),
                    "clean_cost": self.clean_cost(r),
                }
                for r in self.results
            ],
            "reused": list(self.reused),
            "not_run": list(self.not_run),
            "stopped": self.stopped,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Pareto plot (clean accuracy vs mean drop, or vs the objective) as PNG; atomic."""
        figure = new_figure(6.0, 4.2)
        axes = figure.add_subplot(1, 1, 1)
        front = self.pareto()
        shifts = self.objective == "shifts"

        def x_of(r: CandidateResult) -> float:
            return 100 * (r.mean_drop if shifts else r.objective(self.objective))

        for index, r in enumerate(self.results):
            marker = "s" if r.name == CONTROL_NAME else ("o" if r.full else "x")
            color = "tab:red" if r.name == CONTROL_NAME else "tab:blue"
            axes.scatter(x_of(r), 100 * r.clean, marker=marker, color=color, zorder=3)
            axes.annotate(
                r.name,
                (x_of(r), 100 * r.clean),
                textcoords="offset points",
                xytext=(5, 4 if index % 2 else -11),
                fontsize="small",
            )
        points = sorted((x_of(r), 100 * r.clean) for r in self.results if r.name in front)
        if len(points) > 1:
            axes.plot(*zip(*points, strict=True), "--", color="grey", lw=1, label="Pareto front")
            axes.legend(fontsize="small", frameon=False)
        axes.set_xlabel(
            "mean accuracy drop under shift (points, lower is better)"
            if shifts
            else f"{self.objective} objective: accuracy (%, higher is better)"
        )
        axes.set_ylabel("clean accuracy (%)")
        axes.set_title("candidate layouts: clean accuracy vs robustness")
        axes.grid(alpha=0.3)
        return save_png(figure, path)
