"""What makes a search's results comparable (the study's fingerprint, and the one line that
names a difference), and the budget line."""

from __future__ import annotations

import hashlib
from typing import Any

from torch import nn

from ..train.config import TRAJECTORY_FIELDS
from .candidates import Candidate
from .runs import Search
from .search_report import SearchReport

__all__ = [
    "FINGERPRINT_FIELDS",
    "budget_stop",
    "differences",
    "duration",
    "search_settings",
    "weights_digest",
]

# The fine-tuning fields a study's fingerprint records: every trajectory field but the
# distillation temperature, which a search (labelled fine-tunes) never uses and which the
# fingerprints of existing studies do not hold, so that their reruns still match.
FINGERPRINT_FIELDS = tuple(name for name in TRAJECTORY_FIELDS if name != "distill_temperature")


def weights_digest(model: nn.Module) -> str:
    """A short digest of every tensor of ``model``: two searches from other weights differ."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def search_settings(search: Search, pruner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The study's fingerprint: what makes results comparable (base weights, data, shifts,
    domains, schedule, seed, and the rule and rungs of a pruner), recorded once per study."""
    config = search.config
    tune = {k: getattr(config, k) for k in FINGERPRINT_FIELDS}
    settings = {
        "base_weights": weights_digest(search.model),
        "train": f"{search.train.name} ({len(search.train)} images)",
        "val": f"{search.val.name} ({len(search.val)} images)",
        "shifts": search.shifts,
        "finetune": tune,
    }
    if search.domains:
        settings["domains"] = {n: f"{d.name} ({len(d)} images)" for n, d in search.domains.items()}
    settings["objective"] = search.objective
    if pruner:  # which candidates stop early depends on the pruner and its rungs
        settings["pruner"] = pruner
    return settings


def differences(recorded: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The settings that differ, named down to the option: ``finetune.seed 3 → 4``."""
    found = []
    for key in sorted(set(recorded) | set(settings)):
        old, new = recorded.get(key), settings.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            found += [f"{key}.{item}" for item in differences(old, new)]
        elif isinstance(old, dict | list) or isinstance(new, dict | list):
            found.append(key)
        else:
            found.append(f"{key} {old!r} → {new!r}")
    return found


def duration(seconds: float) -> str:
    """``4.2 s`` under a minute, ``3.5 min`` above: a budget line never says ``0.0 min``."""
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def budget_stop(
    report: SearchReport,
    queue: list[Candidate],
    position: tuple[int, float, float],
    budget_min: float,
) -> str:
    """Record why the budget stopped the search before ``queue[index - 1]``; return the line."""
    index, elapsed, estimate = position
    report.not_run = [c.name for c in queue[index - 1 :] if c.name not in report.reused]
    report.stopped = (
        f"budget: stopped before candidate {index} of {len(queue)} ({queue[index - 1].name}); "
        f"{duration(elapsed)} spent and about {duration(estimate)} per candidate would "
        f"exceed `budget_min={budget_min:g}`; not run: {', '.join(report.not_run)} "
        "(rerun with a larger budget: finished candidates are kept)"
    )
    return report.stopped
