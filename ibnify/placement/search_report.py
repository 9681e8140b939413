"""What :func:`ibnify.search_placement` returns: finished candidates, ranked by accuracy under
shift (:data:`RANK_RULE`), with their Pareto front, table, JSON, plot and reproduce command."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._report import markdown_table, new_figure, save_png, stage_range_text
from ..data.shifts import CLEAN

__all__ = ["CONTROL_NAME", "FORMAT", "RANK_RULE", "CandidateResult", "SearchReport"]

RANK_RULE = (
    "ranked by mean accuracy under the shifts (clean accuracy minus mean drop), then by clean "
    "accuracy; the control is listed for reference and cannot win"
)
FORMAT = "ibnify.layout-search/1"
"""The ``format`` field of ``results.jsonl`` and ``report.json``."""
CONTROL_NAME = "control"
"""The name of the control: the unconverted model fine-tuned identically."""


@dataclass
class CandidateResult:
    """One finished candidate: accuracies (fractions) clean and per shift, and its cost."""

    name: str
    layout: str
    stages: list[int]
    ratio: float | None
    accuracy: dict[str, float]
    seconds: float
    checkpoint: str | None = None

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
        """Mean accuracy under the shifts: what the ranking sorts by."""
        return self.clean - self.mean_drop


@dataclass
class SearchReport:
    """The control and every finished candidate, ranked; what stopped the search, if anything."""

    results: list[CandidateResult]
    shifts: list[str]
    settings: dict[str, Any]
    reused: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    stopped: str | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def control(self) -> CandidateResult | None:
        """The unconverted model fine-tuned identically."""
        return next((r for r in self.results if r.name == CONTROL_NAME), None)

    def ranked(self) -> list[CandidateResult]:
        """Candidates by :data:`RANK_RULE` (deterministic: ties broken by name)."""
        candidates = [r for r in self.results if r.name != CONTROL_NAME]
        return sorted(candidates, key=lambda r: (-round(r.score, 9), -round(r.clean, 9), r.name))

    @property
    def winner(self) -> CandidateResult | None:
        """The first of :meth:`ranked`, or None when no candidate finished."""
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def pareto(self) -> set[str]:
        """Names not dominated in (clean accuracy ↑, mean drop ↓), control included."""
        front = set()
        for r in self.results:
            dominated = any(
                o.clean >= r.clean
                and o.mean_drop <= r.mean_drop
                and (o.clean > r.clean or o.mean_drop < r.mean_drop)
                for o in self.results
            )
            if not dominated:
                front.add(r.name)
        return front

    def table(self) -> str:
        """Markdown table: rank, candidate, clean %, mean and worst drop, ratio to control."""
        control = self.control
        front = self.pareto()
        header = ["rank", "candidate", "clean", "mean drop", "worst drop", "×control", "pareto"]
        rows = []
        ordered = self.ranked() + ([control] if control else [])
        for index, r in enumerate(ordered, start=1):
            worst_name, worst = r.worst
            ratio = (
                f"{r.mean_drop / control.mean_drop:.2f}"
                if control is not None and control.mean_drop > 0
                else "-"
            )
            rows.append(
                [
                    "-" if r.name == CONTROL_NAME else str(index),
                    r.name,
                    f"{100 * r.clean:.1f}",
                    f"{100 * r.mean_drop:.1f}",
                    f"{100 * worst:.1f} ({worst_name})",
                    ratio,
                    "yes" if r.name in front else "",
                ]
            )
        return "\n".join(markdown_table(header, rows))

    def reproduce_command(self, model_args: str, data_args: str) -> str | None:
        """The ``ibnify convert`` + ``ibnify finetune`` commands that rebuild the winner."""
        winner = self.winner
        if winner is None:
            return None
        s = self.settings["finetune"]
        if winner.layout == "b":
            layout = "--layout b"
        else:
            layout = f"--layout a --stages {stage_range_text(winner.stages)}"
            if winner.ratio is not None:
                layout += f" --ratio {winner.ratio:g}"
        return (
            f"ibnify convert {model_args} {layout} -o ibn.safetensors && "
            f"ibnify finetune ibn.safetensors {data_args} --epochs {s['epochs']} "
            f"--lr {s['lr']:g} --batch-size {s['batch_size']} --optimizer {s['optimizer']} "
            f"--weight-decay {s['weight_decay']:g} --warmup-epochs {s['warmup_epochs']:g} "
            f"--seed {s['seed']} --out runs/ibn"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data: settings, results with drops, ranking, Pareto front, stop reason."""
        return {
            "format": FORMAT,
            "settings": self.settings,
            "shifts": list(self.shifts),
            "rule": RANK_RULE,
            "ranking": [r.name for r in self.ranked()],
            "winner": self.winner.name if self.winner else None,
            "pareto": sorted(self.pareto()),
            "results": [
                {
                    **asdict(r),
                    "mean_drop": r.mean_drop,
                    "worst_drop": r.worst[1],
                    "worst_shift": r.worst[0],
                    "drop": r.drops(),
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
        """Pareto plot (clean accuracy vs mean drop) as PNG; the front is joined; atomic."""
        figure = new_figure(6.0, 4.2)
        axes = figure.add_subplot(1, 1, 1)
        front = self.pareto()
        for index, r in enumerate(self.results):
            marker = "s" if r.name == CONTROL_NAME else "o"
            color = "tab:red" if r.name == CONTROL_NAME else "tab:blue"
            axes.scatter(100 * r.mean_drop, 100 * r.clean, marker=marker, color=color, zorder=3)
            axes.annotate(r.name, (100 * r.mean_drop, 100 * r.clean), textcoords="offset points",
                          xytext=(5, 4 if index % 2 else -11), fontsize="small")  # fmt: skip
        points = sorted((100 * r.mean_drop, 100 * r.clean) for r in self.results if r.name in front)
        if len(points) > 1:
            axes.plot(*zip(*points, strict=True), "--", color="grey", lw=1, label="Pareto front")
            axes.legend(fontsize="small", frameon=False)
        axes.set_xlabel("mean accuracy drop under shift (points, lower is better)")
        axes.set_ylabel("clean accuracy (%)")
        axes.set_title("candidate layouts: clean accuracy vs robustness")
        axes.grid(alpha=0.3)
        return save_png(figure, path)
