"""One candidate of a search: convert it from the base, fine-tune it, evaluate it (at a
halving rung on fixed image subsets, at the end on everything), keep its checkpoint."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from ..api import ResolvedModel, convert
from ..data.images import ImageData
from ..evaluation import evaluate
from ..models.checkpoint import save
from ..train.config import FinetuneConfig
from ..train.loop import finetune
from ..train.state import CHECKPOINT_FILE
from .candidates import CONTROL, Candidate
from .search_report import CandidateResult

__all__ = ["RUNG_IMAGES", "Pruned", "Search", "rung_epochs"]


RUNG_IMAGES = 200
"""Images (per data set) a successive-halving rung evaluates a candidate on."""


class Pruned(Exception):  # a signal that stops training, not an error
    """Raised from a rung's check to stop a candidate's training; carries the rung's result."""

    def __init__(self, result: CandidateResult) -> None:
        super().__init__(f"{result.name} stopped after epoch {result.stopped_at}")
        self.result = result


RungCheck = Callable[[CandidateResult, int], bool]
"""Called at a rung with the candidate's result on the rung subsets and the epoch; True stops
the candidate there (the pruner's decision)."""


def rung_epochs(epochs: int, first: int, factor: int = 2) -> list[int]:
    """The epochs a pruner decides at: ``first``, ``first × factor``, ... below ``epochs``.

    ``first`` comes after the LR warmup, where the ranking means something; successive halving
    and Hyperband (whose brackets start at ``first × factor^k``) decide at no other epoch, so a
    candidate is measured on the rung subsets there only.
    """
    if epochs < 2 or first < 1:
        return []
    found, epoch = [], first
    while epoch < epochs:
        found.append(epoch)
        epoch *= factor
    return found


@dataclass
class Search:
    """The fixed inputs of one search: base model, data, schedule, rule, where results go.

    ``base`` is the base model with its provenance (``source:name`` and constructor
    arguments, recorded in every candidate's checkpoint so ``ibnify.load`` rebuilds it);
    ``device`` is where this worker trains and evaluates (``config.device`` when None).
    """

    base: ResolvedModel
    train: ImageData
    val: ImageData
    config: FinetuneConfig
    shifts: list[str]
    out: Path | None
    say: Callable[[str], None]
    domains: dict[str, ImageData] = field(default_factory=dict)
    objective: str = "shifts"
    max_clean_drop: float | None = None
    device: str | None = None

    @property
    def model(self) -> nn.Module:
        """The unconverted base model every candidate is converted from."""
        return self.base.model

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) of the validation images: what every candidate is planned at."""
        return tuple(self.val.dataset[0][0].shape)  # type: ignore[return-value]

    def build(self, candidate: Candidate) -> nn.Module:
        """The candidate's model: the base converted by its layout (a copy for the control)."""
        if candidate == CONTROL:
            return copy.deepcopy(self.model)
        return convert(
            self.model,
            layout=candidate.layout,
            stages=candidate.stages or None,
            ratio=candidate.ratio,
            input_size=self.input_size,
            arch=self.base.source or None,
            model_kwargs=self.base.model_kwargs or None,
        )

    def measure(
        self, candidate: Candidate, model: nn.Module, seconds: float, rung: bool = False
    ) -> CandidateResult:
        """Evaluate ``model`` clean, under the shifts and on the domains; at a halving ``rung``
        on the rung's fixed subsets of those images (what the decision needs)."""
        val, shifts, domains = self.val, self.shifts, self.domains
        if rung:
            val, domains = _rung_subset(val), {n: _rung_subset(d) for n, d in domains.items()}
        device = self.device or self.config.device or "cpu"
        # noise seed 0, as `ibnify evaluate` and the demo use: the same table for the same
        # model; the global RNG is left as training had it (a rung sits inside a run)
        with torch.random.fork_rng(devices=[]):
            report = evaluate(
                {"m": model}, val, shifts=shifts, seed=0, device=device, domains=domains
            )
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

    def run(
        self,
        candidate: Candidate,
        rungs: list[int] | None = None,
        check: RungCheck | None = None,
        folder: Path | None = None,
    ) -> CandidateResult:
        """Convert (unless control), fine-tune, evaluate, save the checkpoint.

        At each epoch of ``rungs`` the candidate is measured on the rung subsets and ``check``
        decides whether it stops (:class:`Pruned` is raised with that result). The training is
        one uninterrupted :func:`finetune` either way, so a candidate that goes on trains
        exactly as without rungs. With ``folder`` the run writes its epoch checkpoints there and
        continues from one left by a killed worker.
        """
        started = time.perf_counter()
        model = self.build(candidate)
        config = replace(self.config, device=self.device or self.config.device)
        resume = folder is not None and (folder / CHECKPOINT_FILE).is_file()
        if folder is not None:
            config = replace(config, out_dir=str(folder), resume=resume)

        def on_epoch(metrics: dict[str, Any]) -> None:
            epoch = int(metrics["epoch"])
            if check is None or epoch not in (rungs or []):
                return
            result = self.measure(candidate, model, time.perf_counter() - started, rung=True)
            result.epochs, result.stopped_at = epoch, epoch
            if check(result, epoch):
                raise Pruned(result)

        finetune(model, self.train, config, force=not resume, on_epoch=on_epoch)
        result = self.measure(candidate, model, time.perf_counter() - started)
        result.seconds = round(time.perf_counter() - started, 3)
        result.epochs = config.epochs
        self.keep(candidate, model, result)
        return result


def _rung_subset(data: ImageData) -> ImageData:
    """The fixed images a rung measures on: at most :data:`RUNG_IMAGES`, the same for every
    candidate (a seeded choice), so a halving decision costs a fraction of a full evaluation."""
    if len(data) <= RUNG_IMAGES:
        return data
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:RUNG_IMAGES]
    subset = Subset(data.dataset, sorted(chosen.tolist()))
    return ImageData(subset, data.mean, data.std, data.num_classes, data.labelled, data.name)
