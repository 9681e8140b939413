"""``ibnify adapt`` from files: load a checkpoint, adapt it on a target folder, save a copy.

Everything that can be refused is refused before the first forward pass: the output name, the
options, the checkpoint (a model of a class no registry knows needs its ``base``), a model the
method cannot change, an empty target, a source check on unlabelled data. Nothing is written
then; the result is written atomically, and the source checkpoint is never written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .._io import check_output_path
from ..data.domains import check_same_classes, domain_specs
from ..data.images import ImageData
from ..data.sources import as_image_data
from ..errors import CheckpointError, InvalidOptionError
from ..evaluation import RobustnessReport, evaluate
from ..models.checkpoint import input_size_for, load, needs_base, read_recipe, save
from .offline import adapt_with, check_adaptable, target_subset
from .options import AdaptOptions

__all__ = ["AdaptResult", "adapt_file", "check_adapt_output"]


@dataclass
class AdaptResult:
    """What :func:`adapt_file` did: the adapted model, the file written, the images used and a
    before/after report (target accuracy when it has labels, source clean accuracy when a
    ``source`` was given; None with neither)."""

    model: nn.Module
    path: Path
    images: int
    report: RobustnessReport | None = None


def adapt_file(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    output: str | os.PathLike[str],
    options: AdaptOptions | None = None,
    *,
    input_size: Sequence[int] | None = None,
    force: bool = False,
    base: nn.Module | None = None,
    source: ImageData | str | os.PathLike[str] | None = None,
    skip_bad_images: bool = False,
) -> AdaptResult:
    """What ``ibnify adapt`` does: load a checkpoint, adapt it on a target folder, save a copy.
    Reason: nine parameters, the command's public keyword API (``AdaptOptions`` holds the rest).

    The source checkpoint is never written; ``output`` must be a new ``.safetensors`` file
    (or ``force``). ``base``: the unconverted model, for a checkpoint of a class no registry
    builds (``ibnify.load(path, base=...)``). ``source``: labelled source data (a folder or
    ``"digits"``) whose clean accuracy before and after goes into the report, with the
    target's as a domain row when the target has labels. ``input_size``: the size the images
    are read at, else the checkpoint's recorded one (``ibnify adapt`` passes the size it
    was given). ``skip_bad_images``: leave unreadable images out instead of refusing them.
    """
    options = options or AdaptOptions()
    target_path = check_adapt_output(checkpoint, output, force)
    _check_base_given(checkpoint, base)
    model = load(checkpoint, base=base)
    size = input_size_for(model, input_size)  # the one rule, for `ibnify adapt` too
    check_adaptable(model, options)
    skip = {"input_size": size, "skip_bad_images": skip_bad_images}
    target = as_image_data(data, model, "test", seed=options.seed, **skip)
    used = len(target_subset(target, options))
    source_data = _source_data(source, model, target, skip)
    adapted = adapt_with(model, target, options)
    report = None
    pair = {"before": model, "after": adapted}
    if source_data is not None:
        domains = {_domain_name(target): target} if target.labelled else None
        report = evaluate(pair, source_data, shifts="none", domains=domains)
    elif target.labelled:
        report = evaluate(pair, target, shifts="none")
    save(adapted, target_path)
    return AdaptResult(adapted, target_path, used, report)


def _check_base_given(checkpoint: str | os.PathLike[str], base: nn.Module | None) -> None:
    """A checkpoint of a class no registry builds needs its base model: say how, for adapt."""
    recipe = read_recipe(checkpoint)
    if base is None and needs_base(recipe):
        name = recipe.base_class_name
        raise CheckpointError(
            f"{str(checkpoint)!r} holds a converted {recipe.base_class}, which ibnify cannot "
            f"build by name; adapt it in Python with its base model: ibnify.adaptation."
            f"adapt_file(path, data, output, base={name}(...)), or ibnify.adapt(ibnify.load("
            f"path, base={name}(...)), data)"
        )


def _source_data(
    source: ImageData | str | os.PathLike[str] | None,
    model: nn.Module,
    target: ImageData,
    reading: dict[str, Any],
) -> ImageData | None:
    """The labelled source data of the before/after check, read as the target was
    (``reading``: its size and bad-image rule); refused when it has no labels."""
    if source is None:
        return None
    data = as_image_data(source, model, "test", **reading)
    if not data.labelled:
        raise InvalidOptionError(
            f"the source data {data.name!r} has no labels (no CLASS sub-folders): the source "
            "check measures accuracy; give a labelled folder or 'digits', or leave it out"
        )
    if target.labelled:
        check_same_classes(data, target)
    return data


def _domain_name(target: ImageData) -> str:
    """The target's row name in the report: its folder's name, or ``target`` where that name is
    empty or taken by a shift or the clean row."""
    try:
        domain_specs({target.name: target})
    except InvalidOptionError:
        return "target"
    return target.name or "target"


def check_adapt_output(
    checkpoint: str | os.PathLike[str], output: str | os.PathLike[str], force: bool
) -> Path:
    """The output path, refused before any work: not the source, a ``.safetensors`` name."""
    target = Path(output)
    if target.suffix.lower() != ".safetensors":
        raise InvalidOptionError(
            f"output {str(target)!r} is not a .safetensors file name (ibnify checkpoints are "
            "safetensors)"
        )
    source = Path(checkpoint)
    if source.exists() and target.exists() and source.resolve() == target.resolve():
        raise InvalidOptionError(
            "the output is the source checkpoint; write the adapted model to a new file"
        )
    return check_output_path(target, force=force)
