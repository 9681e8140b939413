"""Which stages and ratio, measured: convert, fine-tune and evaluate candidate IBN layouts.

Every candidate layout (IBN-a on some stages at some ratio, or IBN-b) is converted from the same
base weights, fine-tuned with the same seed and schedule (:func:`ibnify.finetune`) and evaluated
clean and under the appearance shifts of :mod:`ibnify.evaluation`. A control — the unconverted
model fine-tuned identically — separates the effect of the IN halves from that of the extra
training. Finished candidates are recorded in ``OUT/results.jsonl`` and never rerun, so a search
can be interrupted and resumed, or widened later with more candidates.

This module runs the search; :mod:`ibnify.search_report` holds the results, their ranking and
output (table, JSON, Pareto plot, reproduce command), whose names are re-exported here.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write_bytes
from ..core.generic import require_batchnorm
from ..data.domains import check_same_classes, load_domains, parse_domain
from ..data.images import ImageData, image_folder_data
from ..data.shifts import parse_shifts
from ..data.sources import as_image_data, check_data_source, resolve_data_source
from ..errors import InvalidOptionError
from ..models.checkpoint import input_size_for
from ..train.config import FinetuneConfig
from .candidates import CONTROL, Candidate, choose_candidates, parse_candidates
from .divergence import (
    ModelSource,
    load_model_or_checkpoint,
)
from .runs import Search, halving_rungs, run_all, run_halving
from .search_report import (
    OBJECTIVES,
    SearchReport,
)
from .search_state import RESULTS_FILE, read_results, search_settings

__all__ = ["SearchOptions", "SearchResult", "search_files", "search_placement"]


def search_placement(
    model: nn.Module,
    train_data: ImageData | str | os.PathLike[str],
    val_data: ImageData | str | os.PathLike[str],
    *,
    candidates: str | Sequence[Candidate] = "auto",
    config: FinetuneConfig | None = None,
    shifts: str | Sequence[str] | None = "all",
    budget_min: float | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    echo: Callable[[str], None] | None = None,
    domains: Mapping[str, ImageData | str | os.PathLike[str]] | Sequence[str] | None = None,
    objective: str | None = None,
    max_clean_drop: float | None = 1.0,
    halving: bool | None = None,
    input_size: Sequence[int] | None = None,
) -> SearchReport:
    """Try candidate IBN layouts on ``model`` and rank them by accuracy under shift or on the
    user's target domains.

    Args:
        model: the unconverted, trained base model (left untouched).
        train_data: labelled training images for the fine-tune (same for every candidate), or
            an image folder path (or ``"digits"``).
        val_data: labelled images (or a folder) for the clean and shifted evaluation.
        candidates: ``"auto"`` (:func:`auto_candidates`), a ``--candidates`` string, or a list.
        config: the fine-tune schedule and seed (:class:`ibnify.train.FinetuneConfig`), used
            unchanged for every candidate and the control.
        shifts: shifts to evaluate under (default all).
        budget_min: stop starting candidates once elapsed time plus the estimated time of the
            next one (mean of the runs so far) would exceed this many minutes.
        out_dir: where ``results.jsonl``, ``candidates/*.safetensors``, ``best.safetensors``,
            ``report.json`` and ``pareto.png`` go; finished candidates recorded there are reused.
        force: discard the results recorded in ``out_dir``.
        arch, model_kwargs: recorded in the candidates' checkpoints so ``ibnify.load`` can
            rebuild them (``source:name`` and constructor arguments of the base model).
        echo: called with one progress line per step.
        domains: labelled target domains (``{name: folder or ImageData}`` or ``NAME=FOLDER``
            strings) with the classes of ``val_data``, evaluated for every candidate.
        objective: ``"shifts"``, ``"domains"`` or ``"both"`` (default: domains when given).
        max_clean_drop: a candidate more than this many points of clean accuracy below the
            control cannot win (None: no limit).
        halving: successive halving (default: on with more than 3 candidates): all train the
            first part of the schedule, the worse half by the objective stops, the rest go on;
            the survivors' schedule is the full run's, step for step.
        input_size: (C, H, W) folders are read at (default: the model's).
    """
    # Long by its reason: the checks come first, so that bad input fails before any training.
    say = echo or (lambda _line: None)
    config = copy.deepcopy(config or FinetuneConfig(quiet=True))
    config.out_dir, config.resume, config.stop_after = None, False, None
    config.validate()
    require_batchnorm(model, arch or type(model).__name__)
    shift_names = list(parse_shifts(shifts))
    train = as_image_data(train_data, model, "train", input_size=input_size)
    val = as_image_data(val_data, model, "test", input_size=input_size)
    check_same_classes(train, val, "training and validation folders")
    if not train.labelled or not val.labelled:
        raise InvalidOptionError("search needs labelled training and validation data")
    targets = load_domains(domains, model, val, input_size)
    rule = _objective(objective, targets, max_clean_drop)
    chosen = choose_candidates(candidates, model, val, shift_names, config.seed)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    search = Search(model, train, val, config, shift_names, out, arch, model_kwargs, say,
                     targets, *rule)  # fmt: skip
    use_halving = len(chosen) > 3 if halving is None else halving
    first = math.floor(config.warmup_epochs) + 1  # a rung inside the warmup ranks by noise
    rungs = halving_rungs(config.epochs, len(chosen), first) if use_halving else []
    settings = search_settings(search, rungs)
    done = read_results(out, settings, force) if out is not None else {}
    report = SearchReport(
        [], shift_names, settings, objective=rule[0], max_clean_drop=max_clean_drop,
        domains=list(targets), halving=rungs,
    )  # fmt: skip
    if rungs:
        run_halving(search, [CONTROL, *chosen], done, report, budget_min)
    else:
        run_all(search, [CONTROL, *chosen], done, report, budget_min)
    if out is not None:
        _write_outputs(out, report)
    return report


def _objective(
    objective: str | None, domains: dict[str, ImageData], max_clean_drop: float | None
) -> tuple[str, float | None]:
    """The checked ``(objective, max_clean_drop)``: domains by default when there are some."""
    chosen = objective or ("domains" if domains else "shifts")
    if chosen not in OBJECTIVES:
        raise InvalidOptionError(
            f"unknown objective {chosen!r}; choose from: {', '.join(OBJECTIVES)}"
        )
    if chosen != "shifts" and not domains:
        raise InvalidOptionError(
            f"--objective {chosen} needs target domains: give --domain NAME=FOLDER"
        )
    if max_clean_drop is not None and not max_clean_drop >= 0:
        raise InvalidOptionError(f"max clean drop must be 0 or more points, got {max_clean_drop}")
    return chosen, max_clean_drop


def _write_outputs(out: Path, report: SearchReport) -> None:
    """report.json, pareto.png and best.safetensors (a copy of the winner's checkpoint)."""
    report.files["results"] = out / RESULTS_FILE
    winner = report.winner
    if winner is not None and winner.checkpoint and Path(winner.checkpoint).is_file():
        best = out / "best.safetensors"
        report.files["best"] = atomic_write_bytes(best, Path(winner.checkpoint).read_bytes())
    if report.results:
        report.files["plot"] = report.plot(out / "pareto.png")
    report.files["report"] = atomic_write_bytes(
        out / "report.json", (report.to_json() + "\n").encode()
    )


@dataclass(frozen=True)
class SearchOptions:
    """What ``ibnify search`` is asked, as one record (its options map one to one).

    Data: ``data`` + ``val_data`` (image folders) or ``dataset`` (``"digits"``: its train and
    test splits); ``domains`` are ``NAME=FOLDER`` labelled target folders. ``input_size``
    (C, H, W) is the size folders are read at (default: the checkpoint's recorded size, else
    the model's own).
    """

    weights: str | None = None
    data: str | None = None
    dataset: str | None = None
    val_data: str | None = None
    domains: tuple[str, ...] = ()
    objective: str | None = None
    max_clean_drop: float | None = 1.0
    halving: bool | None = None
    candidates: str = "auto"
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    shifts: str = "all"
    budget_min: float | None = None
    out_dir: str | None = None
    seed: int = 0
    force: bool = False
    progress: bool = False
    input_size: tuple[int, int, int] | None = None

    def finetune_config(self) -> FinetuneConfig:
        """The schedule every candidate and the control are fine-tuned with."""
        return FinetuneConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                              weight_decay=self.weight_decay, warmup_epochs=self.warmup_epochs,
                              seed=self.seed, quiet=not self.progress)  # fmt: skip


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search_files` returns: the report, how the model was given, and the data
    options that rebuild the winner with ``ibnify finetune``."""

    report: SearchReport
    source: ModelSource
    data_args: str

    def reproduce_command(self) -> str | None:
        """The ``ibnify convert`` + ``ibnify finetune`` commands that rebuild the winner."""
        return self.report.reproduce_command(self.source.convert_args(), self.data_args)


def _check_search_options(options: SearchOptions) -> None:
    """Every option check that needs no model, so bad input fails before anything loads."""
    check_data_source(options.data, options.dataset)
    if options.data is not None and options.val_data is None:
        raise InvalidOptionError("give --val-data DIR with --data")
    parse_shifts(options.shifts)
    if options.candidates.strip().lower() != "auto":
        parse_candidates(options.candidates)
    names = [parse_domain(spec)[0] for spec in options.domains]
    if len(set(names)) != len(names):
        raise InvalidOptionError("a --domain name is given twice; give each name once")
    _objective(options.objective, dict.fromkeys(names), options.max_clean_drop)  # type: ignore[arg-type]


def search_files(
    model: str, options: SearchOptions, echo: Callable[[str], None] | None = None
) -> SearchResult:
    """What ``ibnify search`` does: load MODEL (a name, + weights, or an unconverted ibnify
    checkpoint) and the data the options name, then run :func:`search_placement`."""
    _check_search_options(options)
    torch.manual_seed(options.seed)  # a model built without weights gets the same init every run
    source = load_model_or_checkpoint(model, options.weights)
    size = input_size_for(source.model, options.input_size)
    if options.dataset is not None:
        train, val = (
            resolve_data_source(None, options.dataset, source.model, split=split,
                                seed=options.seed, input_size=size)
            for split in ("train", "test")
        )  # fmt: skip
        data_args = f"--dataset {options.dataset}"
    else:
        train = image_folder_data(options.data, source.model, train=True, input_size=size)  # type: ignore[arg-type]
        val = image_folder_data(options.val_data, source.model, input_size=size)  # type: ignore[arg-type]
        data_args = f"--data {options.data} --val-data {options.val_data}"
    report = search_placement(
        source.model, train, val, candidates=options.candidates,
        config=options.finetune_config(), shifts=options.shifts, budget_min=options.budget_min,
        out_dir=options.out_dir, force=options.force, arch=source.source,
        model_kwargs=source.model_kwargs or None, echo=echo, domains=list(options.domains),
        objective=options.objective, max_clean_drop=options.max_clean_drop,
        halving=options.halving, input_size=size,
    )  # fmt: skip
    return SearchResult(report, source, data_args)
