"""Which stages and ratio, measured: convert, fine-tune and evaluate candidate IBN layouts.

Every candidate layout (IBN-a on some stages at some ratio, or IBN-b) is converted from the same
base weights, fine-tuned with the same seed and schedule (:func:`ibnify.finetune`) and evaluated
clean and under the appearance shifts of :mod:`ibnify.evaluation`. A control — the unconverted
model fine-tuned identically — separates the effect of the IN halves from that of the extra
training. The search is one Optuna study (:mod:`ibnify.placement.study`): finished candidates
stay in its storage (``OUT/study.journal`` by default) and are never rerun, so a search can be
interrupted and resumed, widened with more candidates, or shared by workers on many machines.

This module runs the search; :mod:`ibnify.placement.search_report` holds the results, their
ranking and output (table, JSON, Pareto plot, reproduce command).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write_bytes
from ..core.generic import require_batchnorm
from ..core.graph import analyze
from ..data.domains import check_same_classes, load_domains, parse_domain
from ..data.images import ImageData, image_folder_data
from ..data.shifts import parse_shifts
from ..data.sources import as_image_data, check_data_source, resolve_data_source
from ..errors import InvalidOptionError
from ..models.checkpoint import input_size_for
from ..train.config import TRAJECTORY_FIELDS, FinetuneConfig
from .candidates import CONTROL, Candidate, choose_candidates, parse_candidates
from .divergence import ModelSource, analyze_divergence, load_model_or_checkpoint
from .runs import Search
from .search_report import OBJECTIVES, SearchReport
from .search_state import budget_stop, search_settings
from .space import SpaceItem, candidate_params, parse_space, resolve_space
from .study import (
    STUDY_FILE,
    SearchInterrupted,
    StudyOptions,
    StudyRun,
    make_pruner,
    open_storage,
    open_study,
    run_study,
    study_results,
    waiting_candidates,
)

__all__ = [
    "SearchInputs",
    "SearchOptions",
    "SearchResult",
    "StudyOptions",
    "search_files",
    "search_placement",
]


def search_placement(
    model: nn.Module,
    train_data: ImageData | str | os.PathLike[str],
    val_data: ImageData | str | os.PathLike[str],
    options: SearchOptions | None = None,
    *,
    echo: Callable[[str], None] | None = None,
    **keywords: Any,
) -> SearchReport:
    """Try candidate IBN layouts on ``model`` and rank them by accuracy under shift or on the
    user's target domains.

    The search is asked either by ``options`` (a :class:`SearchOptions`, as ``ibnify search``
    holds it; ``keywords`` may then add ``arch``, ``model_kwargs``, ``config`` or
    ``input_size``) or by the keywords below alone; both become one :class:`SearchInputs`.

    Args:
        model: the unconverted, trained base model (left untouched).
        train_data: labelled training images for the fine-tune (same for every candidate), or
            an image folder path (or ``"digits"``).
        val_data: labelled images (or a folder) for the clean and shifted evaluation.
        options: the search as ``ibnify search`` is asked it.
        echo: called with one progress line per step.
        **keywords: the fields of :class:`SearchInputs` (``candidates``, ``config``,
            ``shifts``, ``budget_min``, ``out_dir``, ``force``, ``arch``, ``model_kwargs``,
            ``domains``, ``objective``, ``max_clean_drop``, ``halving``, ``input_size``,
            ``study``), each described there.
    """
    # Long by its reason (a 28-line docstring, ~50 of code): every check comes first, so that
    # bad input fails before any training, then the study runs in one visible sequence.
    asked = SearchInputs.of(options, keywords)
    say = echo or (lambda _line: None)
    study = asked.study or StudyOptions()
    study.validate()
    config = copy.deepcopy(asked.config or FinetuneConfig(quiet=True))
    config.out_dir, config.resume, config.stop_after = None, False, None
    config.validate()
    search, shift_names = _prepare(model, train_data, val_data, asked, config, say)
    if study.workers > 1 and asked.out_dir is None and study.storage is None:
        raise InvalidOptionError("several workers need an output folder or a storage")
    items, chosen, seed_params = _candidates(
        model, search.val, shift_names, config.seed, asked.candidates, study
    )
    out = Path(asked.out_dir) if asked.out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if asked.force:
            shutil.rmtree(out / "runs", ignore_errors=True)
    search.out = out
    count = len(chosen) if items is None else study.trials or 0
    pruner_name = study.pruner or _pruner_name(asked.halving, count)
    first = math.floor(config.warmup_epochs) + 1  # a rung inside the warmup ranks by noise
    pruner, described, rungs = make_pruner(pruner_name, first, config.epochs)
    settings = search_settings(search, described)
    if study.space is not None:
        settings["space"] = study.space.strip().lower()
    run = StudyRun(
        search=search,
        queue=[CONTROL, *chosen],
        options=study,
        settings=settings,
        rungs=rungs,
        pruner=pruner,
        items=items,
        seed_params=seed_params,
        budget_min=asked.budget_min,
    )
    the_study = open_study(run, open_storage(study.storage, out, study.grace_s), asked.force)
    before = set(study_results(the_study))
    try:
        run_study(the_study, run)
    except KeyboardInterrupt as exc:
        raise SearchInterrupted(_interrupted_line(the_study, out, study)) from exc
    report = _report(
        the_study, run, shift_names, list(search.domains), asked.max_clean_drop, before
    )
    if out is not None and not study.join:
        _write_outputs(out, report, study)
    return report


@dataclass(frozen=True)
class SearchInputs:
    """What one :func:`search_placement` call is asked, in Python's terms (data sets as
    :class:`ImageData` or folders, candidates as a list or a string, the schedule as a
    :class:`FinetuneConfig`): built from a :class:`SearchOptions` or from keywords, in
    :meth:`of` only.

    Attributes:
        candidates: ``"auto"`` (:func:`auto_candidates`), a ``--candidates`` string, or a list.
        config: the fine-tune schedule and seed (:class:`ibnify.train.FinetuneConfig`), used
            unchanged for every candidate and the control.
        shifts: shifts to evaluate under (default all).
        budget_min: stop starting candidates once elapsed time plus the estimated time of the
            next one (mean of the runs so far) would exceed this many minutes.
        out_dir: where ``study.journal`` (the study, unless ``study.storage`` says otherwise),
            ``candidates/*.safetensors``, ``best.safetensors``, ``report.json`` and
            ``pareto.png`` go; candidates the study finished earlier are reused.
        force: start the study over (its finished candidates are discarded).
        arch, model_kwargs: recorded in the candidates' checkpoints so ``ibnify.load`` can
            rebuild them (``source:name`` and constructor arguments of the base model).
        domains: labelled target domains (``{name: folder or ImageData}`` or ``NAME=FOLDER``
            strings) with the classes of ``val_data``, evaluated for every candidate.
        objective: ``"shifts"``, ``"domains"`` or ``"both"`` (default: domains when given).
        max_clean_drop: a candidate more than this many points of clean accuracy below the
            control cannot win (None: no limit).
        halving: successive halving (default: on with more than 3 candidates; ``study.pruner``
            chooses Hyperband): a candidate whose objective at a rung (on fixed image subsets)
            is in the worse half of those measured there stops; a candidate that goes on trains
            exactly as without pruning, so the winner's checkpoint is the same file.
        input_size: (C, H, W) folders are read at (default: the model's).
        study: storage, study name, workers, devices, join, pruner, space
            (:class:`StudyOptions`).
    """

    candidates: str | Sequence[Candidate] = "auto"
    config: FinetuneConfig | None = None
    shifts: str | Sequence[str] | None = "all"
    budget_min: float | None = None
    out_dir: str | os.PathLike[str] | None = None
    force: bool = False
    arch: str | None = None
    model_kwargs: dict[str, Any] | None = None
    domains: Mapping[str, ImageData | str | os.PathLike[str]] | Sequence[str] | None = None
    objective: str | None = None
    max_clean_drop: float | None = 1.0
    halving: bool | None = None
    input_size: Sequence[int] | None = None
    study: StudyOptions | None = None

    @classmethod
    def of(cls, options: SearchOptions | None, keywords: Mapping[str, Any]) -> SearchInputs:
        """The one place a search's inputs are built: from ``options`` (then ``keywords``
        add to or replace its fields) or from ``keywords`` alone (an unknown one: TypeError)."""
        if options is None:
            return cls(**keywords)
        asked = cls(
            candidates=options.candidates,
            config=options.finetune_config(),
            shifts=options.shifts,
            budget_min=options.budget_min,
            out_dir=options.out_dir,
            force=options.force,
            domains=list(options.domains),
            objective=options.objective,
            max_clean_drop=options.max_clean_drop,
            halving=options.halving,
            input_size=options.input_size,
            study=options.study_options(),
        )
        return replace(asked, **keywords)


def _prepare(
    model: nn.Module,
    train_data: ImageData | str | os.PathLike[str],
    val_data: ImageData | str | os.PathLike[str],
    asked: SearchInputs,
    config: FinetuneConfig,
    say: Callable[[str], None],
) -> tuple[Search, list[str]]:
    """The checked data, shifts, domains and rule as the search's fixed inputs (no output
    folder yet), so that bad input fails before any training."""
    require_batchnorm(model, asked.arch or type(model).__name__)
    shift_names = list(parse_shifts(asked.shifts))
    train = as_image_data(train_data, model, "train", input_size=asked.input_size)
    val = as_image_data(val_data, model, "test", input_size=asked.input_size)
    check_same_classes(train, val, "training and validation folders")
    if not train.labelled or not val.labelled:
        raise InvalidOptionError("search needs labelled training and validation data")
    targets = load_domains(asked.domains, model, val, asked.input_size)
    objective, max_clean_drop = _objective(asked.objective, targets, asked.max_clean_drop)
    search = Search(
        model=model,
        train=train,
        val=val,
        config=config,
        shifts=shift_names,
        out=None,
        arch=asked.arch,
        model_kwargs=asked.model_kwargs,
        say=say,
        domains=targets,
        objective=objective,
        max_clean_drop=max_clean_drop,
    )
    return search, shift_names


def _pruner_name(halving: bool | None, count: int) -> str:
    """``halving``: on with more than 3 candidates unless said otherwise."""
    on = count > 3 if halving is None else halving
    return "halving" if on else "none"


def _candidates(
    model: nn.Module,
    val: ImageData,
    shifts: list[str],
    seed: int,
    candidates: str | Sequence[Candidate],
    options: StudyOptions,
) -> tuple[list[SpaceItem] | None, list[Candidate], dict[str, Any] | None]:
    """(space items, listed candidates, the seed trial's parameters), every layout planned
    before any training. A worker that joins takes the list from the study."""
    if options.space is None:
        listed = [] if options.join else choose_candidates(candidates, model, val, shifts, seed)
        return None, listed, None
    size = tuple(val.dataset[0][0].shape)
    stages = analyze(model, size, fallback=True).num_stages  # type: ignore[arg-type]
    items = resolve_space(parse_space(options.space), stages)
    extremes = []
    for item in items:
        if item.layout == "b":
            extremes.append(Candidate("b"))
            continue
        assert item.depths is not None
        ratios = item.ratio_range or item.ratios or (None,)
        extremes += [Candidate("a", tuple(range(1, item.depths[1] + 1)), r) for r in ratios]
    choose_candidates(extremes, model, val, shifts, seed)
    seed_params = None
    if options.analyze_first and not options.join:
        report = analyze_divergence(model, val, shifts=shifts, images=128, seed=seed)
        if report.suggested_stages:
            seed_params = candidate_params(items, Candidate("a", report.suggested_stages))
    return items, [], seed_params


def _interrupted_line(study: Any, out: Path | None, options: StudyOptions) -> str:
    """What Ctrl-C kept and how to continue."""
    done = len(study_results(study))
    where = options.storage or (str(out / STUDY_FILE) if out is not None else None)
    if where is None:
        return f"interrupted after {done} finished candidates; nothing was kept (no output folder)"
    return (
        f"interrupted: {done} finished candidates are kept in {where}; rerun the same command "
        "to resume (a stopped candidate continues from its last finished epoch)"
    )


def _report(
    study: Any,
    run: StudyRun,
    shifts: list[str],
    domains: list[str],
    max_clean_drop: float | None,
    before: set[str],
) -> SearchReport:
    """The report of the study's finished candidates; the budget line when it stopped one."""
    results = study_results(study)
    report = SearchReport(
        list(results.values()),
        shifts,
        run.settings,
        objective=run.search.objective,
        max_clean_drop=max_clean_drop,
        domains=domains,
        halving=run.rungs,
    )
    report.reused = [name for name in results if name in before]
    waiting = waiting_candidates(study)
    if waiting and run.budget_min is not None:  # only the budget leaves trials waiting
        recorded = list(study.user_attrs.get("queue", []))
        names = recorded + [n for n in waiting if n not in recorded]
        queue = [
            CONTROL if n == CONTROL.name else parse_candidates(n)[0]
            for n in names
            if n in results or n in waiting
        ]
        index = 1 + next(i for i, c in enumerate(queue) if c.name in waiting)
        timings = [r.seconds for r in results.values()]
        estimate = sum(timings) / max(len(timings), 1)
        budget_stop(
            report, queue, (index, time.perf_counter() - run.started, estimate), run.budget_min
        )
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


def _write_outputs(out: Path, report: SearchReport, options: StudyOptions) -> None:
    """report.json, pareto.png and best.safetensors (a copy of the winner's checkpoint)."""
    if options.storage is None:
        report.files["study"] = out / STUDY_FILE
    with suppress(OSError):  # every run folder is removed once its trial ends
        (out / "runs").rmdir()
    winner = report.winner
    if winner is not None and winner.checkpoint and Path(winner.checkpoint).is_file():
        best = out / "best.safetensors"
        report.files["best"] = atomic_write_bytes(best, Path(winner.checkpoint).read_bytes())
    if report.results:
        report.files["plot"] = report.plot(out / "pareto.png")
    report.files["report"] = atomic_write_bytes(
        out / "report.json", (report.to_json() + "\n").encode()
    )


# The fine-tuning defaults (constants.FINETUNE_DEFAULTS, as the config declares them).
_SCHEDULE = FinetuneConfig()


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
    epochs: int = _SCHEDULE.epochs
    lr: float = _SCHEDULE.lr
    batch_size: int = _SCHEDULE.batch_size
    weight_decay: float = _SCHEDULE.weight_decay
    warmup_epochs: float = _SCHEDULE.warmup_epochs
    shifts: str = "all"
    budget_min: float | None = None
    out_dir: str | None = None
    seed: int = _SCHEDULE.seed
    force: bool = False
    progress: bool = False
    input_size: tuple[int, int, int] | None = None
    storage: str | None = None
    study: str = "ibnify-search"
    workers: int = 1
    devices: str | None = None
    threads: int | None = None
    join: bool = False
    pruner: str | None = None
    space: str | None = None
    trials: int | None = None
    analyze_first: bool = True

    def study_options(self) -> StudyOptions:
        """How the search runs as a study (storage, workers, pruner, space)."""
        devices = tuple(d.strip() for d in (self.devices or "").split(",") if d.strip())
        return StudyOptions(
            storage=self.storage,
            study=self.study,
            workers=self.workers,
            devices=devices,
            threads=self.threads,
            join=self.join,
            pruner=self.pruner,
            space=self.space,
            trials=self.trials,
            analyze_first=self.analyze_first,
        )

    def finetune_config(self) -> FinetuneConfig:
        """The schedule every candidate and the control are fine-tuned with: each fine-tuning
        field (``TRAJECTORY_FIELDS``) this record has, the rest at their defaults."""
        mine = {f.name for f in fields(self)}
        schedule = {name: getattr(self, name) for name in TRAJECTORY_FIELDS if name in mine}
        return FinetuneConfig(**schedule, quiet=not self.progress)


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search_files` returns: the report, how the model was given, and the data
    options that rebuild the winner with ``ibnify finetune``."""

    report: SearchReport
    source: ModelSource
    data_args: str
    input_size: tuple[int, int, int] | None = None
    seed: int = 0
    threads: int | None = field(default=None)

    def reproduce_command(self) -> str | None:
        """The ``ibnify convert`` + ``ibnify finetune`` commands that rebuild the winner: every
        option that shaped it (model, weights, classes, input size, the init seed of a model
        built without weights, data, schedule, seed)."""
        model_args = self.source.convert_args()
        if self.input_size is not None:
            model_args += " --input-size " + ",".join(map(str, self.input_size))
        if self.source.weights is None and self.source.checkpoint is None:
            model_args += f" --seed {self.seed}"  # the random init the search started from
        data_args = self.data_args
        if self.threads is not None:
            data_args += f" --threads {self.threads}"
        return self.report.reproduce_command(model_args, data_args)


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
    study = options.study_options()
    study.validate()
    if study.space is not None:
        parse_space(study.space)


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
            resolve_data_source(
                None, options.dataset, source.model, split=split, seed=options.seed, input_size=size
            )
            for split in ("train", "test")
        )
        data_args = f"--dataset {options.dataset}"
    else:
        train = image_folder_data(options.data, source.model, train=True, input_size=size)  # type: ignore[arg-type]
        val = image_folder_data(options.val_data, source.model, input_size=size)  # type: ignore[arg-type]
        data_args = f"--data {options.data} --val-data {options.val_data}"
    report = search_placement(
        source.model,
        train,
        val,
        replace(options, input_size=size),
        echo=echo,
        arch=source.source,
        model_kwargs=source.model_kwargs or None,
    )
    size = tuple(train.dataset[0][0].shape)  # type: ignore[assignment]
    threads = options.threads
    if threads is None and options.workers > 1:  # what each worker ran with
        threads = max(1, (os.cpu_count() or 1) // options.workers)
    return SearchResult(report, source, data_args, size, options.seed, threads)  # type: ignore[arg-type]
