"""``ibnify evaluate`` from files: checkpoints side by side on a data folder or the digits set,
under appearance shifts and on labelled target domains; its options record and
:func:`evaluate_files`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import check_output_path
from ..data.domains import domain_specs, load_domains
from ..data.shifts import parse_shifts
from ..errors import InvalidOptionError
from ..evaluation import RobustnessReport, evaluate
from ..models.checkpoint import load
from .inputs import InputRequest, resolve_inputs

__all__ = ["EvaluateFiles", "evaluate_files"]


@dataclass(frozen=True)
class EvaluateFiles:
    """What ``ibnify evaluate`` reads: checkpoints, the data (``inputs``), shifts (default:
    all, or none with ``domains``), target domains (``NAME=FOLDER`` strings or a mapping), the
    batching and the noise shift's seed, and an optional plot file."""

    checkpoints: Sequence[str | os.PathLike[str]]
    inputs: InputRequest = field(default_factory=InputRequest)
    shifts: str | Sequence[str] | None = None
    domains: Mapping[str, Any] | Sequence[str] | None = None
    batch_size: int = 256
    seed: int = 0
    workers: int = 0
    plot: str | os.PathLike[str] | None = None
    force: bool = False

    @property
    def chosen_shifts(self) -> str | Sequence[str]:
        """The shifts asked for; by default all, or none when target domains are given."""
        if self.shifts is not None:
            return self.shifts
        return "none" if self.domains else "all"

    def check(self) -> Path | None:
        """Refuse, before any model is loaded: no checkpoint, the data source, the size, a bad
        shift or domain spec, a plot path that exists or cannot be written. Returns the plot
        path."""
        if not self.checkpoints:
            raise InvalidOptionError("give at least one checkpoint")
        self.inputs.check()
        parse_shifts(self.chosen_shifts)
        domain_specs(self.domains)
        return check_output_path(self.plot, force=self.force) if self.plot else None


def _column_names(paths: Sequence[Path]) -> list[str]:
    """One column per checkpoint, by file stem; parent folder or a number where stems repeat."""
    stems = [p.stem for p in paths]
    names = [
        f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 and p.parent.name else p.stem
        for p in paths
    ]
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def evaluate_files(files: EvaluateFiles) -> RobustnessReport:
    """What ``ibnify evaluate`` does: load ibnify checkpoints and evaluate them side by side.

    Columns are named by file stem (with the parent folder where stems collide). The data is
    read with the first model's eval transform at the one size the resolver decides (the
    given one, else the first checkpoint's recorded size, else the model's own); the digits
    set is its test split. Writes ``plot`` when given.
    """
    plot = files.check()
    paths = [Path(p) for p in files.checkpoints]
    inputs = resolve_inputs(files.inputs, load(paths[0]))
    models = {_column_names(paths)[0]: inputs.model}
    models.update((n, load(p)) for n, p in zip(_column_names(paths)[1:], paths[1:], strict=True))
    data = inputs.data("test")
    domains = domain_specs(files.domains)
    if files.inputs.skip_bad_images:  # the domain folders read as the data folder is
        size, skip = inputs.input_size, {"skip_bad_images": True}
        domains = load_domains(domains, inputs.model, None, size, **skip)  # type: ignore[assignment]
    report = evaluate(
        models,
        data,
        shifts=files.chosen_shifts,
        batch_size=files.batch_size,
        seed=files.seed,
        workers=files.workers,
        domains=domains,
        input_size=inputs.input_size,
    )
    if plot is not None:
        report.plot(plot)
    return report
