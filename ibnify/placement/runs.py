"""Running the candidates of a search: one after another, or by successive halving (every
candidate to a rung, the worse half stops there, survivors continue their own runs)."""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from ..api import convert
from ..data.images import ImageData
from ..evaluation import evaluate
from ..models.checkpoint import save
from ..train.config import FinetuneConfig
from ..train.loop import finetune
from .candidates import CONTROL, Candidate
from .search_report import (
    CandidateResult,
    SearchReport,
)
from .search_state import budget_stop, write_results

__all__ = ["RUNG_IMAGES", "Search", "halving_rungs", "run_all", "run_halving"]


RUNG_IMAGES = 200
"""Images (per data set) a successive-halving rung evaluates a candidate on."""


@dataclass
class Search:
    """The fixed inputs of one search: base model, data, schedule, rule, where results go."""

    model: nn.Module
    train: ImageData
    val: ImageData
    config: FinetuneConfig
    shifts: list[str]
    out: Path | None
    arch: str | None
    model_kwargs: dict[str, Any] | None
    say: Callable[[str], None]
    domains: dict[str, ImageData] = field(default_factory=dict)
    objective: str = "shifts"
    max_clean_drop: float | None = None

    def build(self, candidate: Candidate) -> nn.Module:
        """The candidate's model: the base converted by its layout (a copy for the control)."""
        if candidate == CONTROL:
            return copy.deepcopy(self.model)
        return convert(
            self.model,
            layout=candidate.layout,
            stages=candidate.stages or None,
            ratio=candidate.ratio,
            input_size=tuple(self.val.dataset[0][0].shape),  # type: ignore[arg-type]
            arch=self.arch,
            model_kwargs=self.model_kwargs,
        )

    def measure(
        self, candidate: Candidate, model: nn.Module, seconds: float, rung: bool = False
    ) -> CandidateResult:
        """Evaluate ``model`` clean, under the shifts and on the domains; at a halving ``rung``
        on the rung's fixed subsets of those images (what the decision needs)."""
        val, shifts, domains = self.val, self.shifts, self.domains
        if rung:
            val, domains = _rung_subset(val), {n: _rung_subset(d) for n, d in domains.items()}
        # noise seed 0, as `ibnify evaluate` and the demo use: the same table for the same model
        report = evaluate({"m": model}, val, shifts=shifts, seed=0, device="cpu",
                          domains=domains)  # fmt: skip
        accuracy = dict(report.accuracy["m"])
        domains = {name: accuracy.pop(name) for name in domains}
        return CandidateResult(
            name=candidate.name,
            layout=candidate.layout,
            stages=list(candidate.stages),
            ratio=candidate.ratio,
            accuracy=accuracy,
            seconds=round(seconds, 3),
            domains=domains,
        )

    def keep(self, candidate: Candidate, model: nn.Module, result: CandidateResult) -> None:
        """Save a fully trained candidate's checkpoint under ``out/candidates``."""
        if self.out is not None and candidate != CONTROL:
            folder = self.out / "candidates"
            folder.mkdir(exist_ok=True)
            result.checkpoint = str(save(model, folder / f"{candidate.slug}.safetensors"))

    def run(self, candidate: Candidate) -> CandidateResult:
        """Convert (unless control), fine-tune, evaluate, save the checkpoint."""
        started = time.perf_counter()
        model = self.build(candidate)
        finetune(model, self.train, self.config)
        result = self.measure(candidate, model, time.perf_counter() - started)
        self.keep(candidate, model, result)
        return result


def halving_rungs(epochs: int, candidates: int, first: int = 1) -> list[int]:
    """The epochs after which successive halving stops the worse half of the candidates.

    One rung per halving needed to leave one candidate (``ceil(log2(candidates))``), at
    ``epochs / 2``, ``epochs / 4``, ... (whole epochs, at least ``first``, fewer than
    ``epochs``); a search puts ``first`` after the LR warmup, where the ranking means something.
    """
    if candidates < 2 or epochs < 2:
        return []
    halvings = math.ceil(math.log2(candidates))
    rungs = {max(first, epochs // 2**k) for k in range(1, halvings + 1)}
    return sorted(r for r in rungs if r < epochs)


def _reuse(report: SearchReport, done: dict[str, CandidateResult], candidate: Candidate) -> bool:
    """Put a candidate recorded by an earlier run into ``report`` as reused; False if none."""
    if candidate.name not in done:
        return False
    report.results.append(done[candidate.name])
    report.reused.append(candidate.name)
    return True


def _record(
    search: Search, report: SearchReport, done: dict[str, CandidateResult], result: CandidateResult
) -> None:
    """A finished candidate: into ``done``, the report and ``results.jsonl`` (for resume)."""
    done[result.name] = result
    report.results.append(result)
    if search.out is not None:
        write_results(search.out, report.settings, done)


def run_all(
    search: Search,
    queue: list[Candidate],
    done: dict[str, CandidateResult],
    report: SearchReport,
    budget_min: float | None,
) -> None:
    """Run (or reuse) each candidate in order, respecting the time budget."""
    started = time.perf_counter()
    total = len(queue)
    for index, candidate in enumerate(queue, start=1):
        if _reuse(report, done, candidate):
            search.say(f"candidate {index} of {total}: {candidate.name} (finished earlier, reused)")
            continue
        timings = [r.seconds for r in done.values()]
        estimate = sum(timings) / len(timings) if timings else 0.0
        elapsed = time.perf_counter() - started
        if budget_min is not None and timings and elapsed + estimate > 60 * budget_min:
            budget_stop(report, queue, (index, elapsed, estimate), budget_min)
            break
        search.say(f"candidate {index} of {total}: {candidate.name} ...")
        result = search.run(candidate)
        _record(search, report, done, result)
        search.say(
            f"candidate {index} of {total}: {candidate.name} done in {result.seconds:.1f} s: "
            f"clean {100 * result.clean:.1f}%, mean drop {100 * result.mean_drop:.1f} points"
        )


@dataclass
class _Running:
    """A candidate under successive halving: its model, run folder and time so far."""

    candidate: Candidate
    model: nn.Module
    folder: Path
    seconds: float = 0.0
    epochs: int = 0


def run_halving(
    search: Search,
    queue: list[Candidate],
    done: dict[str, CandidateResult],
    report: SearchReport,
    budget_min: float | None,
) -> None:
    """Successive halving: train every candidate to each rung, stop the worse half there.

    Each run continues from its own training checkpoint (``finetune``'s bit-for-bit resume), so
    a survivor's schedule is the full run's. A rung ranks the candidates by the objective on
    fixed image subsets; the control runs to the end and is measured there, the reference of
    ``max_clean_drop``. Recorded candidates are reused as finished; ``--budget-min`` decides
    which candidates start.
    """
    with tempfile.TemporaryDirectory(prefix="ibnify-search-") as scratch:
        runs_root = search.out / "runs" if search.out is not None else Path(scratch)
        running = _start_all(search, queue, done, report, budget_min, runs_root)
        for rung in [*report.halving, search.config.epochs]:
            for entry in running:
                _train_until(search, entry, rung)
            final = rung == search.config.epochs
            # a rung ranks the candidates among themselves; the control is measured at the end
            measured = [e for e in running if final or e.candidate != CONTROL]
            results = {e.candidate.name: _measured(search, e, not final) for e in measured}
            if final:
                break
            stopped = _worse_half(report, results)
            for entry in [e for e in running if e.candidate.name in stopped]:
                result = results[entry.candidate.name]
                result.stopped_at = rung
                _finish(search, entry, result, done, report)
            running = [e for e in running if e.candidate.name not in stopped]
        for entry in running:
            search.keep(entry.candidate, entry.model, results[entry.candidate.name])
            _finish(search, entry, results[entry.candidate.name], done, report)
    report.results.sort(key=lambda r: [c.name for c in queue].index(r.name))


def _start_all(
    search: Search,
    queue: list[Candidate],
    done: dict[str, CandidateResult],
    report: SearchReport,
    budget_min: float | None,
    runs_root: Path,
) -> list[_Running]:
    """Reuse the recorded candidates; build the others, as far as the budget allows."""
    running: list[_Running] = []
    started = time.perf_counter()
    first_rung = (report.halving or [search.config.epochs])[0]
    for index, candidate in enumerate(queue, start=1):
        if _reuse(report, done, candidate):
            search.say(f"candidate {index} of {len(queue)}: {candidate.name} (reused)")
            continue
        per_epoch = [e.seconds / e.epochs for e in running if e.epochs]
        if budget_min is not None and per_epoch:
            estimate = first_rung * sum(per_epoch) / len(per_epoch)
            elapsed = time.perf_counter() - started
            if elapsed + estimate > 60 * budget_min:
                budget_stop(report, queue, (index, elapsed, estimate), budget_min)
                break
        entry = _Running(candidate, search.build(candidate), runs_root / candidate.slug)
        search.say(f"candidate {index} of {len(queue)}: {candidate.name} ...")
        _train_until(search, entry, first_rung)
        running.append(entry)
    return running


def _train_until(search: Search, entry: _Running, epoch: int) -> None:
    """Fine-tune ``entry`` from where it stands up to ``epoch`` (resuming its own run)."""
    if entry.epochs >= epoch:
        return
    started = time.perf_counter()
    config = replace(search.config, out_dir=str(entry.folder), resume=entry.epochs > 0,
                     stop_after=epoch - entry.epochs)  # fmt: skip
    finetune(entry.model, search.train, config, force=entry.epochs == 0)
    entry.epochs = epoch
    entry.seconds += time.perf_counter() - started


def _rung_subset(data: ImageData) -> ImageData:
    """The fixed images a rung measures on: at most :data:`RUNG_IMAGES`, the same for every
    candidate (a seeded choice), so a halving decision costs a fraction of a full evaluation."""
    if len(data) <= RUNG_IMAGES:
        return data
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:RUNG_IMAGES]
    subset = Subset(data.dataset, sorted(chosen.tolist()))
    return ImageData(subset, data.mean, data.std, data.num_classes, data.labelled, data.name)


def _measured(search: Search, entry: _Running, rung: bool = False) -> CandidateResult:
    started = time.perf_counter()
    result = search.measure(entry.candidate, entry.model, entry.seconds, rung)
    entry.seconds += time.perf_counter() - started
    result.seconds = round(entry.seconds, 3)
    result.epochs = entry.epochs
    return result


def _worse_half(report: SearchReport, results: dict[str, CandidateResult]) -> set[str]:
    """The names a rung stops: the worse half by the objective alone (``len // 2`` of them
    survive, at least one). The clean-accuracy limit is left to the end: mid-schedule clean
    accuracy on a subset is too coarse to exclude on (one image is half a point)."""
    rung = SearchReport(list(results.values()), report.shifts, report.settings,
                        objective=report.objective)  # fmt: skip
    ranked = [r.name for r in rung.ranked()]
    return set(ranked[max(1, len(ranked) // 2) :])


def _finish(
    search: Search,
    entry: _Running,
    result: CandidateResult,
    done: dict[str, CandidateResult],
    report: SearchReport,
) -> None:
    """Record a candidate that will train no further; remove its run folder."""
    _record(search, report, done, result)
    shutil.rmtree(entry.folder, ignore_errors=True)
    where = "full schedule" if result.full else f"halving stops it after epoch {result.stopped_at}"
    value = 100 * result.objective(search.objective)
    search.say(
        f"{entry.candidate.name}: {where}; clean {100 * result.clean:.1f}%, "
        f"{search.objective} objective {value:.1f}%"
    )
