"""``ibnify.adapt``: an adapted copy of a model, by AdaBN (``bn``) or entropy minimisation.

``bn`` re-estimates the BN statistics in one pass over the target images, in folder order.
``entropy`` makes ``epochs`` seeded, shuffled passes in which the chosen norms' affine learns
(:mod:`ibnify.adaptation.entropy`), then re-estimates the BN statistics as ``bn`` does, in one
more shuffled pass with the adapted affine, so the fixed model normalises as it did while it
learned. The adaptation is recorded in the copy's recipe.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..core.modules import device_of
from ..core.recipe import get_recipe, with_adaptation
from ..data.images import DataError, ImageData, Normalize
from ..data.sources import as_image_data
from ..errors import InvalidOptionError
from ..models.checkpoint import input_size_for
from .entropy import CollapseGuard, EntropyStep, adapting, affine_parameters, resolve_norms
from .options import AdaptOptions, check_prior
from .statistics import adaptable_norms, estimate_statistics

__all__ = ["adapt", "adapt_with", "adaptations", "check_adaptable", "target_subset"]


def target_subset(data: ImageData, options: AdaptOptions) -> Any:
    """The target images an adaptation reads: all, or a seeded choice of ``options.images``."""
    total = len(data)
    if total == 0:
        raise DataError(f"the target data {data.name!r} holds no images")
    if options.images is None or options.images >= total:
        return data.dataset
    generator = torch.Generator().manual_seed(options.seed)
    chosen = torch.randperm(total, generator=generator)[: options.images].sort().values
    return Subset(data.dataset, chosen.tolist())


def check_adaptable(model: nn.Module, options: AdaptOptions) -> str | None:
    """Refuse, before any work, a model the method cannot change; the norms an entropy run
    adapts (``bn``, ``in``, ``both``), None for ``bn``."""
    if options.method == "entropy":
        return resolve_norms(model, options.norms)
    if not adaptable_norms(model):
        raise InvalidOptionError(
            "the model has no BatchNorm statistics to adapt (no BatchNorm with running "
            "statistics); nothing for method 'bn' to change"
        )
    return None


def _batches(loader: DataLoader, normalize: Normalize, device: torch.device) -> Iterator:
    for batch, _labels in loader:
        yield normalize(batch.float().to(device))


def _learn(
    model: nn.Module, subset: Any, normalize: Normalize, options: AdaptOptions, norms: str
) -> dict[str, Any]:
    """The entropy passes, then the statistics pass; what they did, for the record."""
    device = device_of(model)
    parameters = affine_parameters(model, norms)
    step = EntropyStep(model, parameters, options.learning_rate, options.e_margin)
    generator = torch.Generator().manual_seed(options.seed)
    loader = DataLoader(subset, batch_size=options.batch_size, shuffle=True, generator=generator)
    updates = kept = seen = 0
    with adapting(model, parameters):
        for _epoch in range(options.passes):
            for batch in _batches(loader, normalize, device):
                if options.steps is not None and updates >= options.steps:
                    break
                _logits, used = step(batch)
                updates += int(used > 0)
                kept += used
                seen += batch.shape[0]
    guard = CollapseGuard(options.collapse)
    final = DataLoader(
        subset,
        batch_size=options.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(options.seed),
    )
    estimate_statistics(model, _batches(final, normalize, device), options.prior, guard.add)
    guard.check()
    return {
        "norms": norms,
        "updates": updates,
        "kept": kept,
        "seen": seen,
        "mean_prediction_entropy": round(guard.entropy(), 6),
    }


def adapt_with(model: nn.Module, target: ImageData, options: AdaptOptions) -> nn.Module:
    """An adapted copy of ``model`` on ``target`` as ``options`` say; the model is unchanged
    and the copy keeps every submodule's mode and every parameter's ``requires_grad``."""
    norms = check_adaptable(model, options)
    subset = target_subset(target, options)
    adapted = copy.deepcopy(model)
    normalize = Normalize(target.mean, target.std).to(device_of(adapted))
    found: dict[str, Any] = {}
    if options.method == "entropy":
        found = _learn(adapted, subset, normalize, options, str(norms))
    elif options.prior < 1.0:
        loader = DataLoader(subset, batch_size=options.batch_size, shuffle=False)
        estimate_statistics(adapted, _batches(loader, normalize, device_of(adapted)), options.prior)
    with_adaptation(adapted, options.record(len(subset), target.name, **found))
    return adapted


def adapt(
    model: nn.Module,
    data: ImageData | str | os.PathLike[str],
    images: int | None = None,
    prior: float = 0.0,
    *,
    method: str = "bn",
    norms: str | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    input_size: Sequence[int] | None = None,
) -> nn.Module:
    """An adapted copy of ``model`` on unlabelled target ``data``: AdaBN or entropy minimisation.
    Reason: twelve parameters, ``ibnify adapt``'s options one to one (``AdaptOptions`` holds
    them as one record for callers that keep one).

    Args:
        model: a converted or unconverted model (left unchanged).
        data: target images (labels are not used), or an image folder path.
        images: at most this many images (a seeded random choice); default all.
        prior: weight of the source BN statistics: ``new = prior * source + (1 - prior) *
            target`` (0 = AdaBN, 1 = no change).
        method: ``"bn"`` (statistics only) or ``"entropy"`` (TENT-style: the chosen norms'
            affine minimises the prediction entropy, then statistics as ``bn``).
        norms, epochs, steps, lr: entropy only: ``"bn"``, ``"in"`` or ``"both"`` (default both
            where the model has IN affine), passes over the images (1), at most this many
            updates, the SGD rate.
        batch_size: images per forward pass (each BN normalises with its batch's statistics).
        input_size: (C, H, W) a folder's images are brought to (default: the recorded one).

    ``bn`` changes only ``running_mean``/``running_var``; ``entropy`` also the chosen affine
    parameters. Every other tensor stays bit-identical. The copy records the adaptation in its
    recipe, so a saved checkpoint carries it.
    """
    options = AdaptOptions(
        images, check_prior(prior), batch_size, seed, method, norms, epochs, steps, lr
    )
    check_adaptable(model, options)
    size = input_size_for(model, input_size)
    target = as_image_data(data, model, "test", seed=seed, input_size=size)
    return adapt_with(model, target, options)


def adaptations(model: nn.Module) -> list[dict[str, Any]]:
    """The adaptations recorded in a model's recipe (oldest first)."""
    recipe = get_recipe(model)
    return [] if recipe is None else [dict(entry) for entry in recipe.adaptations]
