"""Where appearance lives in a network: feature divergence per norm site (IBN-Net §3).

IBN-Net (Pan et al., ECCV 2018, §3) measured, layer by layer, how far the feature statistics of
two domains lie apart: per channel, the mean activation over H×W of each image; a Gaussian per
channel and domain; the symmetric KL divergence between the two Gaussians, averaged over the
channels. Appearance differences (brightness, contrast, colour, style) dominate in shallow
layers, which is why IN goes there and BN stays deep. :func:`analyze_divergence` gives a user that
measurement for their own network and data: at the output of every norm layer the graph analysis
finds (converted or not, in execution order, with its stage), plus a content baseline — the same
measure between two random halves of one domain — so divergence can be read against noise. The
report suggests ``stages`` from it (rule in :data:`SUGGESTION_RULE`).

This module measures; :mod:`ibnify.placement.divergence_report` holds the report (table, JSON,
plot) and the suggestion rule, whose names are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..api import plan as make_plan
from ..core.generic import require_batchnorm
from ..core.graph import analyze
from ..core.modules import device_of, eval_mode
from ..core.plans import ConversionPlan
from ..core.recipe import get_recipe
from ..data.images import DataError, ImageData, Normalize
from ..data.shifts import CLEAN, apply_shift, parse_shifts
from ..data.sources import as_image_data
from ..errors import IbnifyError, InvalidOptionError
from ..models.checkpoint import recipe_input_size
from .divergence_report import (
    CONTENT_FACTOR,
    SUGGESTION_RULE,
    DivergenceReport,
    SiteDivergence,
    suggest_stages,
)

__all__ = [
    "CONTENT_FACTOR",
    "SUGGESTION_RULE",
    "DivergenceReport",
    "SiteDivergence",
    "analyze_divergence",
    "gaussian_symmetric_kl",
    "suggest_stages",
]

# Variance floor, relative to the site's mean channel variance: a channel that is constant in
# both domains (an IN channel's mean over H×W is exactly its beta; a dead ReLU is zero) then
# contributes 0 instead of 0/0.
_VARIANCE_FLOOR = 1e-5


def gaussian_symmetric_kl(
    mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor
) -> torch.Tensor:
    """Per-channel ``KL(A‖B) + KL(B‖A)`` of two Gaussians (the paper's feature divergence).

    ``0.5·((σa² + Δ²)/σb² + (σb² + Δ²)/σa²) − 1`` with Δ = μa − μb, after adding a variance
    floor of 1e-5 × the mean channel variance (so that channels constant in both domains give 0).
    """
    floor = _VARIANCE_FLOOR * 0.5 * (var_a.mean() + var_b.mean()) + 1e-12
    va, vb = var_a + floor, var_b + floor
    delta = (mean_a - mean_b) ** 2
    return 0.5 * ((va + delta) / vb + (vb + delta) / va) - 1.0


def _divergence(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Channel-mean symmetric KL between per-image channel means ``(N, C)`` of two domains."""
    a, b = features_a.double(), features_b.double()
    kl = gaussian_symmetric_kl(
        a.mean(0), a.var(0, unbiased=True), b.mean(0), b.var(0, unbiased=True)
    )
    return float(kl.mean())


def _subset(data: ImageData, images: int | None, seed: int) -> ImageData:
    """At most ``images`` items, a seeded random choice (ImageFolders are sorted by class)."""
    total = len(data)
    if total == 0:
        raise DataError(f"data {data.name!r} holds no images")
    if images is None or images >= total:
        return data
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:images]
    subset = Subset(data.dataset, sorted(order.tolist()))
    return ImageData(subset, data.mean, data.std, data.num_classes, data.labelled, data.name)


@contextmanager
def _norm_hooks(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that store each norm output's per-image channel means ``(N, C)``."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, tuple | list) else output
            captured[name] = tensor.detach().float().mean(dim=(2, 3)).cpu()

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _collect(
    model: nn.Module,
    data: ImageData,
    names: Sequence[str],
    views: Sequence[str],
    batch_size: int,
    seed: int,
    bar: Any,
) -> dict[str, dict[str, torch.Tensor]]:
    """Channel means at every norm site for ``data`` under each view (``clean`` or a shift)."""
    device = device_of(model)
    normalize = Normalize(data.mean, data.std).to(device)
    loader = DataLoader(data.dataset, batch_size=batch_size, shuffle=False)
    parts: dict[str, dict[str, list[torch.Tensor]]] = {v: {n: [] for n in names} for v in views}
    with _norm_hooks(model, names) as captured:
        for batch_index, (images, _labels) in enumerate(loader):
            for view in views:
                shifted = apply_shift(view, images.float(), seed=seed, batch_index=batch_index)
                captured.clear()
                # channels-last input: oneDNN's faster conv path (about 1.3× for resnet50 on
                # CPU); the model's own tensors are left as they are
                model(normalize(shifted.to(device)).contiguous(memory_format=torch.channels_last))
                for name in names:
                    parts[view][name].append(captured[name])
                bar.update(int(images.shape[0]))
    return {v: {n: torch.cat(parts[v][n]) for n in names} for v in views}


def _site_labels(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[dict[str, str], bool]:
    """Norm name → its IBN role: the converted sites (of every plan applied), else the default
    IBN-a plan's sites."""
    recipe = get_recipe(model)
    converted = [site for plan in (recipe.plans if recipe else ()) for site in plan.sites]
    if converted:
        return {s.name: f"{s.kind} (converted)" for s in converted}, True
    try:
        default: ConversionPlan = make_plan(model, input_size=input_size)
    except IbnifyError:
        return {}, False
    return {s.name: "IBN-a default" for s in default.sites}, False


def analyze_divergence(
    model: nn.Module,
    data_a: ImageData | str | os.PathLike[str],
    data_b: ImageData | str | os.PathLike[str] | None = None,
    *,
    shifts: str | Sequence[str] | None = "all",
    images: int | None = 256,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool | None = None,
    arch: str | None = None,
) -> DivergenceReport:
    """Feature divergence between two domains at every norm layer of ``model`` (IBN-Net §3).
    Reason: nine parameters, as ``ibnify.analyze`` (the docs and examples call its keywords).

    Args:
        model: a BatchNorm CNN (converted or not); put in eval mode for the run, then restored.
        data_a: domain A, images in [0, 1] with the model's mean/std; or an image folder
            path (or ``"digits"``), read as ``ibnify analyze`` reads its data.
        data_b: domain B (ImageData or a folder path); None makes B the shifted copy of A under
            each of ``shifts`` (the appearance shifts of ``ibnify evaluate``) and averages the
            divergence over them.
        shifts: used only without ``data_b``.
        images: at most this many images per domain (a seeded random choice); None for all.
        seed: the subset, the content halves and the noise shift.
        progress: tqdm bar; None shows it on a terminal only.
        arch: the model's name in the report.

    Cost: ``(1 + len(shifts)) × images`` forward passes (two-folder mode: ``2 × images``).
    """
    views = [CLEAN] if data_b is not None else [CLEAN, *parse_shifts(shifts)]
    if len(views) == 1 and data_b is None:
        raise InvalidOptionError("give a second domain or at least one shift")
    name = arch or type(model).__name__
    require_batchnorm(model, name)
    size = recipe_input_size(model)  # a folder path is read at the size it was converted for
    data_a = as_image_data(data_a, model, "test", seed=seed, input_size=size)
    if data_b is not None:
        data_b = as_image_data(data_b, model, "test", seed=seed, input_size=size)
    data_a = _subset(data_a, images, seed)
    data_b = _subset(data_b, images, seed) if data_b is not None else None
    if len(data_a) < 4 or (data_b is not None and len(data_b) < 4):
        raise DataError("feature divergence needs at least 4 images per domain")
    input_size = tuple(data_a.dataset[0][0].shape)
    analysis = analyze(model, input_size, fallback=True)  # type: ignore[arg-type]
    norms = list(analysis.norms)
    labels, converted = _site_labels(model, input_size)  # type: ignore[arg-type]
    names = [n.name for n in norms]
    features = _features(model, data_a, data_b, names, views, batch_size, seed, progress)
    others = ["B"] if data_b is not None else views[1:]
    sites = _sites(norms, features, others, labels, seed)
    if data_b is not None:
        for site in sites:
            site.per_shift = {}
    return DivergenceReport(
        arch=name,
        domain_a=data_a.name or "A",
        domain_b=(data_b.name or "B") if data_b is not None else "shifted copy",
        images=len(data_a),
        shifts=[] if data_b is not None else list(views[1:]),
        sites=sites,
        converted=converted,
    )


def _features(
    model: nn.Module,
    data_a: ImageData,
    data_b: ImageData | None,
    names: Sequence[str],
    views: Sequence[str],
    batch_size: int,
    seed: int,
    progress: bool | None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-image channel means per view of A (and ``"B"``), the model in eval mode meanwhile."""
    total = len(data_a) * len(views) + (len(data_b) if data_b is not None else 0)
    disable = None if progress is None else not progress
    with eval_mode(model), tqdm(total=total, desc="analyze", unit="img", disable=disable) as bar:
        features = _collect(model, data_a, names, views, batch_size, seed, bar)
        if data_b is not None:
            second = _collect(model, data_b, names, [CLEAN], batch_size, seed, bar)
            features["B"] = second[CLEAN]
    return features


def _sites(
    norms: Sequence[Any],
    features: dict[str, dict[str, torch.Tensor]],
    others: Sequence[str],
    labels: dict[str, str],
    seed: int,
) -> list[SiteDivergence]:
    """Divergence of clean A against each of ``others`` per norm, and A's content baseline."""
    count = len(next(iter(features[CLEAN].values())))
    half = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 1))
    first, second = half[: count // 2], half[count // 2 :]
    sites = []
    for norm in norms:
        clean = features[CLEAN][norm.name]
        per_shift = {o: _divergence(clean, features[o][norm.name]) for o in others}
        sites.append(
            SiteDivergence(
                name=norm.name,
                stage=norm.stage,
                index=norm.index,
                kind=norm.kind,
                channels=norm.channels,
                divergence=sum(per_shift.values()) / len(per_shift),
                content=_divergence(clean[first], clean[second]),
                per_shift=per_shift,
                site=labels.get(norm.name, ""),
            )
        )
    return sites
