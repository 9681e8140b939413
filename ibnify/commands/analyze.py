"""``ibnify analyze`` from files: a model by name (+ weights, classes, constructor arguments) or
an ibnify checkpoint, one domain shifted or two domains; its options record and
:func:`analyze_files` over :func:`ibnify.placement.analyze_divergence`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import check_output_path
from ..api import ResolvedModel
from ..data.domains import check_same_classes, parse_domain
from ..data.images import DataError, ImageData, image_folder_data
from ..data.shifts import parse_shifts
from ..errors import InvalidOptionError
from ..placement.divergence import analyze_divergence
from ..placement.divergence_report import DivergenceReport
from .inputs import InputRequest, ModelRequest, ResolvedInputs, resolve_inputs

__all__ = ["AnalyzeOptions", "AnalyzeResult", "analyze_files"]


@dataclass(frozen=True)
class AnalyzeOptions:
    """What ``ibnify analyze`` is asked, as one record.

    Data: ``inputs`` names ``data`` (an image folder) or ``dataset`` (``"digits"``), whose B
    domain is the shifted copy under ``shifts``, or one target domain ``NAME=FOLDER`` in
    ``domains``; or two folders ``domain_a``/``domain_b`` (then ``inputs`` names no data).
    ``inputs.input_size`` is the size folders are read at (default: the checkpoint's recorded
    size, else the model's own). ``plot``: a PNG written after the run (``force``: over an
    existing file).
    """

    model: ModelRequest
    inputs: InputRequest = field(default_factory=InputRequest)
    shifts: str | None = None
    domain_a: str | None = None
    domain_b: str | None = None
    domains: tuple[str, ...] = ()
    images: int | None = 256
    batch_size: int = 64
    seed: int = 0
    progress: bool | None = None
    plot: str | None = None
    force: bool = False

    @property
    def pair(self) -> bool:
        """Whether two domain folders are compared (not one domain and its shifted copy)."""
        return self.domain_a is not None or self.domain_b is not None

    def data_request(self) -> InputRequest:
        """The data domain A is read from: ``inputs``, or the ``domain_a`` folder."""
        if not self.pair:
            return self.inputs
        return InputRequest(
            data=self.domain_a,
            input_size=self.inputs.input_size,
            skip_bad_images=self.inputs.skip_bad_images,
        )

    def check(self) -> Path | None:
        """Refuse, before any model is built: the data options (one way to name them, the
        ``NAME=FOLDER`` syntax, the shifts), the size, the model request, the image and batch
        counts, and the plot path. Returns the checked plot path."""
        self._check_data()
        self.data_request().check()
        self.model.check()
        if self.images is not None and self.images < 4:
            raise InvalidOptionError(f"`images={self.images}` is below 4")
        if self.batch_size < 1:
            raise InvalidOptionError(f"`batch_size={self.batch_size}` is below 1")
        if self.plot is None:
            return None
        return check_output_path(self.plot, force=self.force, suffixes=(".png",))

    def _check_data(self) -> None:
        """One way to name the data: ``data``/``dataset`` (shifted or against one domain) or
        two domain folders."""
        given = self.inputs.data is not None or self.inputs.dataset is not None
        if self.domains:
            if self.pair:
                raise InvalidOptionError("give `domains` or `domain_a`/`domain_b`, not both")
            if len(self.domains) > 1:
                raise InvalidOptionError(
                    "analyze compares two domains: give one `domains=NAME=FOLDER` (run it once "
                    "per target domain)"
                )
            if self.shifts is not None:
                raise InvalidOptionError("`shifts` applies without `domains` (one domain, shifted)")
            parse_domain(self.domains[0])
        if self.pair and given:
            raise InvalidOptionError("give `domain_a`/`domain_b` or `data`/`dataset`, not both")
        if self.pair and (self.domain_a is None or self.domain_b is None):
            raise InvalidOptionError("give both `domain_a=DIR` and `domain_b=DIR`")
        if self.pair and self.shifts is not None:
            raise InvalidOptionError("`shifts` applies to `data`/`dataset` (one domain, shifted)")
        if self.shifts is not None:
            parse_shifts(self.shifts)


@dataclass(frozen=True)
class AnalyzeResult:
    """What :func:`analyze_files` returns: the report, the model as it was resolved, the
    input size asked for (None: the model's or checkpoint's own) and the init seed."""

    report: DivergenceReport
    model: ResolvedModel
    input_size: tuple[int, int, int] | None
    seed: int


def _domain_b(
    options: AnalyzeOptions, inputs: ResolvedInputs, first: ImageData
) -> ImageData | None:
    """Domain B: the ``domain_b`` folder, the one ``NAME=FOLDER`` domain (labels optional,
    named NAME), or None (the shifted copy of A)."""
    read = {"input_size": inputs.input_size, "skip_bad_images": options.inputs.skip_bad_images}
    if options.domain_b is not None:
        second = image_folder_data(options.domain_b, inputs.model, **read)
        check_same_classes(first, second, "domains")
        return second
    if not options.domains:
        return None
    name, folder = parse_domain(options.domains[0])
    try:
        target = image_folder_data(folder, inputs.model, **read)
    except DataError as exc:
        raise DataError(f"domain {name!r}: {exc}") from exc
    target = ImageData(
        target.dataset, target.mean, target.std, target.num_classes, target.labelled, name
    )
    check_same_classes(first, target)
    return target


def analyze_files(options: AnalyzeOptions) -> AnalyzeResult:
    """What ``ibnify analyze`` does: resolve the model (a name, + weights, or an ibnify
    checkpoint) and its data, measure the feature divergence at every norm layer, and write
    the plot when asked.

    Everything :meth:`AnalyzeOptions.check` can refuse is refused before the model is built.
    A model built without weights gets the same init every run (``options.seed``).

    Raises:
        InvalidOptionError: conflicting or incomplete data options, an unknown shift.
        DataError: a missing or empty folder, or two domains with different class sets.
    """
    plot = options.check()
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is handed back as it was
        torch.manual_seed(options.seed)
        return _analyze(options, plot)


def _analyze(options: AnalyzeOptions, plot: Path | None) -> AnalyzeResult:
    """:func:`analyze_files` after its checks, inside its own seeded RNG state."""
    inputs = resolve_inputs(options.data_request(), options.model)
    resolved = inputs.resolved
    assert resolved is not None  # a ModelRequest is always resolved
    first = inputs.data("test", options.seed)
    report = analyze_divergence(
        inputs.model,
        first,
        _domain_b(options, inputs, first),
        shifts=options.shifts or "all",
        images=options.images,
        batch_size=options.batch_size,
        seed=options.seed,
        progress=options.progress,
        arch=resolved.source,
    )
    if plot is not None:
        report.plot(plot)
    size = None if options.inputs.input_size is None else inputs.input_size
    return AnalyzeResult(report, resolved, size, options.seed)
