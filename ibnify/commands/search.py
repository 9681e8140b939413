"""``ibnify search`` from files: a model by name (+ weights, classes, constructor arguments) or
an unconverted ibnify checkpoint, a data folder with a validation folder or the digits set; its
options record and :func:`search_files` over :func:`ibnify.placement.search_placement`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .._io import check_output_dir
from ..api import ResolvedModel
from ..data.images import image_folder_data
from ..errors import InvalidOptionError
from ..placement.search import SearchInputs, search_placement
from ..placement.search_report import SearchReport
from ..placement.study import StudyOptions
from ..train.config import FinetuneConfig
from .inputs import InputRequest, ModelRequest, resolve_inputs

__all__ = ["SearchOptions", "SearchResult", "search_files"]


@dataclass(frozen=True)
class SearchOptions:
    """What ``ibnify search`` is asked, as one record: the model, the data, and the search
    itself (a :class:`~ibnify.placement.search.SearchInputs`, which holds the schedule as a
    :class:`~ibnify.train.FinetuneConfig` and the study as a
    :class:`~ibnify.placement.study.StudyOptions`: each field once).

    Data: ``inputs`` names ``data`` (an image folder, with ``val_data``) or ``dataset``
    (``"digits"``: its train and test splits); ``search.domains`` are ``NAME=FOLDER`` labelled
    target folders. ``inputs.input_size`` is the size folders are read at (default: the
    checkpoint's recorded size, else the model's own).
    """

    model: ModelRequest
    inputs: InputRequest = field(default_factory=InputRequest)
    val_data: str | None = None
    search: SearchInputs = field(default_factory=SearchInputs)

    @property
    def config(self) -> FinetuneConfig:
        """The schedule and seed every candidate and the control are fine-tuned with."""
        return self.search.config or FinetuneConfig(quiet=True)

    @property
    def study(self) -> StudyOptions:
        """How the search runs as a study (storage, workers, threads, pruner, space)."""
        return self.search.study or StudyOptions()

    def check(self) -> None:
        """Refuse, before any model is built: the data source and size, a folder without its
        validation folder, the model request (classes, constructor arguments), the candidates,
        space, shifts, ``NAME=FOLDER`` domains, objective and study, and an output folder that
        cannot be written."""
        self.inputs.check()
        if self.inputs.data is not None and self.val_data is None:
            raise InvalidOptionError("give `val_data=DIR` with `data`")
        self.model.check()
        self.search.check()
        if self.search.out_dir is not None:
            check_output_dir(self.search.out_dir)


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search_files` returns: the report, the base model as it was resolved, the
    size the images were read at, and the torch threads each worker ran with (None: torch's
    own choice), so that the winner can be rebuilt."""

    report: SearchReport
    model: ResolvedModel
    input_size: tuple[int, int, int]
    threads: int | None = None


def search_files(options: SearchOptions, echo: Callable[[str], None] | None = None) -> SearchResult:
    """What ``ibnify search`` does: resolve MODEL (a name, + weights, or an unconverted ibnify
    checkpoint) and the data the options name, then run :func:`search_placement`.

    Everything :meth:`SearchOptions.check` can refuse is refused before the model is built;
    a model built without weights gets the same init every run (the schedule's seed).
    """
    options.check()
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is handed back as it was
        torch.manual_seed(options.config.seed)
        return _search(options, echo)


def _search(options: SearchOptions, echo: Callable[[str], None] | None) -> SearchResult:
    """:func:`search_files` after its checks, inside its own seeded RNG state."""
    seed = options.config.seed
    inputs = resolve_inputs(options.inputs, options.model)
    resolved = inputs.resolved
    assert resolved is not None  # a ModelRequest is always resolved
    train = inputs.data("train", seed)
    if options.val_data is not None:
        val = image_folder_data(
            options.val_data,
            inputs.model,
            input_size=inputs.input_size,
            skip_bad_images=options.inputs.skip_bad_images,
        )
    else:
        val = inputs.data("test", seed)
    asked = replace(
        options.search,
        input_size=inputs.input_size,
        skip_bad_images=options.inputs.skip_bad_images,
    )
    report = search_placement(resolved, train, val, asked, echo=echo)
    threads, workers = options.study.threads, options.study.workers
    if threads is None and workers > 1:  # what each worker ran with
        threads = max(1, (os.cpu_count() or 1) // workers)
    size = tuple(train.dataset[0][0].shape)
    return SearchResult(report, resolved, size, threads)  # type: ignore[arg-type]
