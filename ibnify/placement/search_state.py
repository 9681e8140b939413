"""What a search records to resume: its settings, the finished candidates (``results.jsonl``),
and the budget line."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .._io import atomic_write_bytes
from ..errors import CheckpointError, InvalidOptionError
from .candidates import Candidate
from .search_report import (
    FORMAT,
    CandidateResult,
    SearchReport,
)

if TYPE_CHECKING:  # the search record is only a type here (runs.py imports this module)
    from .runs import Search

__all__ = [
    "RESULTS_FILE",
    "budget_stop",
    "duration",
    "read_results",
    "search_settings",
    "write_results",
]


RESULTS_FILE = "results.jsonl"


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def search_settings(search: Search, halving: list[int]) -> dict[str, Any]:
    """What must match for recorded results to be reused (``results.jsonl``'s first line)."""
    config = search.config
    tune = {
        k: getattr(config, k)
        for k in ("epochs", "lr", "batch_size", "optimizer", "momentum", "weight_decay",
                  "decay_norm_and_bias", "decay_in_affine", "warmup_epochs", "min_lr", "seed")
    }  # fmt: skip
    settings = {
        "base_weights": _weights_digest(search.model),
        "train": f"{search.train.name} ({len(search.train)} images)",
        "val": f"{search.val.name} ({len(search.val)} images)",
        "shifts": search.shifts,
        "finetune": tune,
    }
    if search.domains:
        settings["domains"] = {n: f"{d.name} ({len(d)} images)" for n, d in search.domains.items()}
    if halving:  # which candidates stop early depends on the rungs and the rank rule
        settings["halving"] = {"rungs": halving, "objective": search.objective,
                               "max_clean_drop": search.max_clean_drop}  # fmt: skip
    return settings


def _differences(recorded: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The settings that differ, named down to the option: ``finetune.seed 3 → 4``."""
    found = []
    for key in sorted(set(recorded) | set(settings)):
        old, new = recorded.get(key), settings.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            found += [f"{key}.{item}" for item in _differences(old, new)]
        elif isinstance(old, dict | list) or isinstance(new, dict | list):
            found.append(key)
        else:
            found.append(f"{key} {old!r} → {new!r}")
    return found


def read_results(out: Path, settings: dict[str, Any], force: bool) -> dict[str, CandidateResult]:
    """Finished candidates recorded in ``out/results.jsonl`` (checked against ``settings``)."""
    path = out / RESULTS_FILE
    if force or not path.exists():
        return {}
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        recorded = lines[0]["settings"]
        results = [CandidateResult(**line["result"]) for line in lines[1:]]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is damaged ({exc}); pass --force to start over"
        ) from exc
    if recorded != settings:
        changed = _differences(recorded, settings)
        raise InvalidOptionError(
            f"{str(out)!r} holds a search with other settings (differs in: {', '.join(changed)}); "
            "pass --force to start over or choose another --out"
        )
    return {r.name: r for r in results}


def write_results(out: Path, settings: dict[str, Any], results: dict[str, CandidateResult]) -> None:
    lines = [json.dumps({"format": FORMAT, "settings": settings})]
    lines += [json.dumps({"result": asdict(r)}) for r in results.values()]
    atomic_write_bytes(out / RESULTS_FILE, ("\n".join(lines) + "\n").encode())


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
        f"exceed --budget-min {budget_min:g}; not run: {', '.join(report.not_run)} "
        "(rerun with a larger budget: finished candidates are kept)"
    )
    return report.stopped
