"""Which stages and ratio, measured: convert, fine-tune and evaluate candidate IBN layouts.

Every candidate layout (IBN-a on some stages at some ratio, or IBN-b) is converted from the same
base weights, fine-tuned with the same seed and schedule (:func:`ibnify.finetune`) and evaluated
clean and under the appearance shifts of :mod:`ibnify.evaluation`. A control — the unconverted
model fine-tuned identically — separates the effect of the IN halves from that of the extra
training. The search is one Optuna study (:mod:`ibnify.placement.study`): finished candidates
stay in its storage (``OUT/study.journal`` by default) and are never rerun, so a search can be
interrupted and resumed, widened with more candidates, or shared by workers on many machines.

This module runs the search; :mod:`ibnify.placement.search_report` holds the results, their
ranking and output (table, JSON, Pareto plot, the winner's conversion).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from .._io import atomic_write_bytes, output_lock
from ..api import ResolvedModel
from ..core.generic import require_batchnorm
from ..core.graph import analyze
from ..core.modules import device_of
from ..data.domains import check_same_classes, domain_specs, load_domains
from ..data.images import ImageData
from ..data.shifts import parse_shifts
from ..data.sources import as_image_data
from ..errors import InvalidOptionError
from ..train.checks import check_fits
from ..train.config import FinetuneConfig
from .candidates import CONTROL, Candidate, choose_candidates, parse_candidates
from .divergence import analyze_divergence
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
    "StudyOptions",
    "choose_objective",
    "search_placement",
]


def search_placement(
    model: nn.Module | ResolvedModel,
    train_data: ImageData | str | os.PathLike[str],
    val_data: ImageData | str | os.PathLike[str],
    options: SearchInputs | None = None,
    *,
    echo: Callable[[str], None] | None = None,
    **keywords: Any,
) -> SearchReport:
    """Try candidate IBN layouts on ``model`` and rank them by accuracy under shift or on the
    user's target domains.

    The search is asked by ``options`` (a :class:`SearchInputs`; ``keywords`` then replace its
    fields) or by the keywords alone; both become one :class:`SearchInputs`.

    Args:
        model: the unconverted, trained base model (left untouched); a
            :class:`~ibnify.api.ResolvedModel` also names its source and constructor
            arguments, recorded in every candidate's checkpoint so ``ibnify.load`` rebuilds it.
        train_data: labelled training images for the fine-tune (same for every candidate), or
            an image folder path (or ``"digits"``).
        val_data: labelled images (or a folder) for the clean and shifted evaluation.
        options: the search as ``ibnify search`` asks it.
        echo: called with one progress line per step.
        **keywords: the fields of :class:`SearchInputs` (``candidates``, ``config``,
            ``shifts``, ``budget_min``, ``out_dir``, ``force``, ``domains``, ``objective``,
            ``max_clean_drop``, ``halving``, ``input_size``, ``study``), each described there;
            with an ``nn.Module``, ``arch`` and ``model_kwargs`` name its source and
            constructor arguments (what a ResolvedModel carries).
    """
    base = _base(model, keywords.pop("arch", None), keywords.pop("model_kwargs", None))
    asked = SearchInputs.of(options, keywords)
    asked.check()
    config = copy.deepcopy(asked.config or FinetuneConfig(quiet=True))
    config.out_dir, config.resume, config.stop_after = None, False, None
    config.validate()
    search, shift_names = _prepare(base, train_data, val_data, asked, config, echo)
    joining = asked.study is not None and asked.study.join
    # the starting run holds the folder; workers that join the study share it on purpose
    held = nullcontext() if asked.out_dir is None or joining else output_lock(asked.out_dir)
    with held:
        run, out = _study_run(search, shift_names, asked)
        study = run.options
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


def _base(
    model: nn.Module | ResolvedModel, arch: str | None, model_kwargs: dict[str, Any] | None
) -> ResolvedModel:
    """The base model with its provenance: a ResolvedModel as given, or a module with the
    ``arch``/``model_kwargs`` keywords (not both)."""
    if isinstance(model, ResolvedModel):
        if arch is not None or model_kwargs is not None:
            raise InvalidOptionError(
                "a resolved model names its own source: give `arch` and `model_kwargs` with a "
                "module only"
            )
        return model
    return ResolvedModel(model, arch or "", model_kwargs=dict(model_kwargs or {}))


def _study_run(
    search: Search, shift_names: list[str], asked: SearchInputs
) -> tuple[StudyRun, Path | None]:
    """Every candidate planned (bad input fails here, before any training), the output folder
    made, the pruner and fingerprint chosen: the study's run and its output folder."""
    study, config = asked.study or StudyOptions(), search.config
    if study.workers > 1 and asked.out_dir is None and study.storage is None:
        raise InvalidOptionError("several `workers` need an `out_dir` or a `storage`")
    items, chosen, seed_params = _candidates(
        search.model, search.val, shift_names, config.seed, asked.candidates, study
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
    return run, out


@dataclass(frozen=True)
class SearchInputs:
    """What one :func:`search_placement` call is asked, in Python's terms (data sets as
    :class:`ImageData` or folders, candidates as a list or a string, the schedule as a
    :class:`FinetuneConfig`, the study as :class:`StudyOptions`): each field once; ``ibnify
    search`` holds one in its options record.

    Attributes:
        candidates: ``"auto"`` (:func:`auto_candidates`), a candidates string
            (``"a:1;a:1-2@0.25;b"``), or a list.
        config: the fine-tune schedule and seed (:class:`ibnify.train.FinetuneConfig`), used
            unchanged for every candidate and the control.
        shifts: shifts to evaluate under (default all).
        budget_min: stop starting candidates once elapsed time plus the estimated time of the
            next one (mean of the runs so far) would exceed this many minutes.
        out_dir: where ``study.journal`` (the study, unless ``study.storage`` says otherwise),
            ``candidates/*.safetensors``, ``best.safetensors``, ``report.json`` and
            ``pareto.png`` go; candidates the study finished earlier are reused.
        force: start the study over (its finished candidates are discarded).
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
        skip_bad_images: leave the unreadable images of the folders read here out instead of
            refusing them.
        study: storage, study name, workers, devices, threads, join, pruner, space
            (:class:`StudyOptions`).
    """

    candidates: str | Sequence[Candidate] = "auto"
    config: FinetuneConfig | None = None
    shifts: str | Sequence[str] | None = "all"
    budget_min: float | None = None
    out_dir: str | os.PathLike[str] | None = None
    force: bool = False
    domains: Mapping[str, ImageData | str | os.PathLike[str]] | Sequence[str] | None = None
    objective: str | None = None
    max_clean_drop: float | None = 1.0
    halving: bool | None = None
    input_size: Sequence[int] | None = None
    skip_bad_images: bool = False
    study: StudyOptions | None = None

    @classmethod
    def of(cls, options: SearchInputs | None, keywords: Mapping[str, Any]) -> SearchInputs:
        """``options`` with ``keywords`` replacing its fields, or the keywords alone (an
        unknown one: TypeError)."""
        return cls(**keywords) if options is None else replace(options, **keywords)

    def check(self) -> None:
        """Every check that needs neither model nor data, so that bad input fails before
        anything loads: shifts, candidates and space syntax, domain names, objective, study
        and schedule."""
        parse_shifts(self.shifts)
        if isinstance(self.candidates, str) and self.candidates.strip().lower() != "auto":
            parse_candidates(self.candidates)
        names = list(domain_specs(self.domains))
        choose_objective(self.objective, names, self.max_clean_drop)
        study = self.study or StudyOptions()
        study.validate()
        if study.space is not None:
            parse_space(study.space)


def _prepare(
    base: ResolvedModel,
    train_data: ImageData | str | os.PathLike[str],
    val_data: ImageData | str | os.PathLike[str],
    asked: SearchInputs,
    config: FinetuneConfig,
    echo: Callable[[str], None] | None,
) -> tuple[Search, list[str]]:
    """The checked data, shifts, domains and rule as the search's fixed inputs (no output
    folder yet), so that bad input fails before any training."""
    model = base.model
    require_batchnorm(model, base.source or type(model).__name__)
    shift_names = list(parse_shifts(asked.shifts))
    read = {"input_size": asked.input_size, "skip_bad_images": asked.skip_bad_images}
    train = as_image_data(train_data, model, "train", **read)
    val = as_image_data(val_data, model, "test", **read)
    check_same_classes(train, val, "training and validation folders")
    if not train.labelled or not val.labelled:
        raise InvalidOptionError("search needs labelled training and validation data")
    check_fits(model, train, None, device_of(model), val)  # the head fits, before any run
    targets = load_domains(
        asked.domains, model, val, asked.input_size, skip_bad_images=asked.skip_bad_images
    )
    objective, max_clean_drop = choose_objective(asked.objective, targets, asked.max_clean_drop)
    search = Search(
        base=base,
        train=train,
        val=val,
        config=config,
        shifts=shift_names,
        out=None,
        say=echo or (lambda _line: None),
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


def choose_objective(
    objective: str | None, domains: Sequence[str], max_clean_drop: float | None
) -> tuple[str, float | None]:
    """The checked ``(objective, max_clean_drop)`` for target ``domains`` (their names):
    domains by default when there are some."""
    chosen = objective or ("domains" if domains else "shifts")
    if chosen not in OBJECTIVES:
        raise InvalidOptionError(
            f"unknown objective {chosen!r}; choose from: {', '.join(OBJECTIVES)}"
        )
    if chosen != "shifts" and not domains:
        raise InvalidOptionError(
            f"`objective={chosen}` needs target domains: give `domains=NAME=FOLDER`"
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
