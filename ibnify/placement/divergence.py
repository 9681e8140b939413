"""Where appearance lives in a network: feature divergence per norm site (IBN-Net §3).

IBN-Net (Pan et al., ECCV 2018, §3) measured, layer by layer, how far the feature statistics of
two domains lie apart: per channel, the mean activation over H×W of each image; a Gaussian per
channel and domain; the symmetric KL divergence between the two Gaussians, averaged over the
channels. Appearance differences (brightness, contrast, colour, style) dominate in shallow
layers, which is why IN goes there and BN stays deep. :func:`analyze_divergence` gives a user that
measurement for their own network and data: at the output of every norm layer the graph analysis
finds (converted or not, in execution order, with its stage), plus a content baseline — the same
measure between two random halves of one domain — so divergence can be read against noise. The
report suggests ``--stages`` from it (rule in :data:`SUGGESTION_RULE`).

This module measures; :mod:`ibnify.placement.divergence_report` holds the report (table, JSON,
plot) and the suggestion rule, whose names are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..api import is_checkpoint_spec, resolve_model
from ..api import plan as make_plan
from ..core.generic import require_batchnorm
from ..core.graph import analyze
from ..core.modules import device_of, eval_mode
from ..core.plans import ConversionPlan
from ..core.recipe import get_recipe
from ..data.domains import check_same_classes, parse_domain
from ..data.images import DataError, ImageData, Normalize, image_folder_data
from ..data.shifts import CLEAN, apply_shift, parse_shifts
from ..data.sources import as_image_data, resolve_data_source
from ..errors import IbnifyError, InvalidOptionError
from ..models.checkpoint import input_size_for, recipe_input_size
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
    "AnalyzeOptions",
    "AnalyzeResult",
    "DivergenceReport",
    "SiteDivergence",
    "analyze_divergence",
    "analyze_files",
    "gaussian_symmetric_kl",
    "load_model_or_checkpoint",
    "suggest_stages",
]

# Variance floor, relative to the site's mean channel variance: a channel that is constant in
# both domains (an IN channel's mean over H×W is exactly its beta; a dead ReLU is zero) then
# contributes 0 instead of 0/0.
_VARIANCE_FLOOR = 1e-5


@dataclass(frozen=True)
class ModelSource:
    """How the analysed model was given: a name (+ weights file) or an ibnify checkpoint."""

    model: nn.Module
    source: str
    label: str
    weights: str | None = None
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def convert_args(self) -> str:
        """The ``ibnify convert`` arguments that rebuild this model's weights before conversion.

        Of a checkpoint's constructor arguments only ``num_classes`` has a CLI option; a recipe
        with others (``width``, ``in_chans``, ...) cannot be rebuilt from the command line.
        """
        if self.checkpoint is not None:
            classes = self.model_kwargs.get("num_classes")
            extra = f" --num-classes {classes}" if classes is not None else ""
            return f"{self.source} --weights {self.checkpoint}{extra}"
        if self.weights is not None:
            return f"{self.label} --weights {self.weights}"
        return self.label


def _convert_args(source: ModelSource, input_size: Sequence[int] | None, seed: int) -> str:
    """MODEL arguments of the printed ``ibnify convert``: the model, its weights or classes,
    the input size it was analysed at, and the init seed of a model built without weights."""
    args = source.convert_args()
    if input_size is not None:
        args += " --input-size " + ",".join(map(str, input_size))
    if source.weights is None and source.checkpoint is None:
        args += f" --seed {seed}"
    return args


def load_model_or_checkpoint(spec: str, weights: str | None = None) -> ModelSource:
    """A model name (``resnet50``, ``timm:…``, ``ibnify:…``) with optional weights, or a checkpoint.

    Resolved by :func:`ibnify.api.resolve_model`, as every command's MODEL: a path to an
    existing file (or ``*.safetensors``) is an ibnify checkpoint; anything else is built by
    name and, with ``weights``, loaded strictly: the original model's keys, or IBN keys of the
    default IBN-a layout (the IBN-Net authors' checkpoints, as ``ibnify convert``).

    Raises:
        InvalidOptionError: ``weights`` given with a checkpoint.
        NoBatchNormError: the model holds no BatchNorm (nothing for IBN to split).
    """
    if weights is not None and is_checkpoint_spec(spec):
        raise InvalidOptionError("--weights applies to a model name, not to a checkpoint")
    resolved = resolve_model(spec, weights)
    if resolved.checkpoint is not None:
        result = ModelSource(
            resolved.model,
            resolved.source,
            spec,
            checkpoint=spec,
            model_kwargs=dict(resolved.model_kwargs),
        )
    else:
        result = ModelSource(resolved.model, resolved.source, spec, weights=weights)
    require_batchnorm(resolved.model, result.source)
    return result


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

    Args:
        model: a BatchNorm CNN (converted or not); put in eval mode for the run, then restored.
        data_a: domain A, images in [0, 1] with the model's mean/std; or an image folder
            path (or ``"digits"``), read as ``ibnify analyze --data`` reads it.
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
    # Nine parameters by its reason: this is ``ibnify.analyze``, whose keywords the docs and
    # examples call (seven of them keyword-only); its length is mostly the docstring.
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


@dataclass(frozen=True)
class AnalyzeOptions:
    """What ``ibnify analyze`` is asked, as one record (its options map one to one).

    Data: ``data`` (an image folder) or ``dataset`` (``"digits"``), whose B domain is the
    shifted copy under ``shifts``, or one target domain ``NAME=FOLDER`` in ``domains``
    (as ``evaluate``/``search`` take it); or two folders ``domain_a``/``domain_b``. ``input_size``
    (C, H, W) is the size folders are read at (default: the checkpoint's recorded size, else
    the model's own).
    """

    weights: str | None = None
    data: str | None = None
    dataset: str | None = None
    shifts: str | None = None
    domain_a: str | None = None
    domain_b: str | None = None
    domains: tuple[str, ...] = ()
    images: int | None = 256
    batch_size: int = 64
    seed: int = 0
    input_size: tuple[int, int, int] | None = None
    progress: bool | None = None


@dataclass(frozen=True)
class AnalyzeResult:
    """What :func:`analyze_files` returns: the report and how the model was given."""

    report: DivergenceReport
    source: ModelSource


def _check_analyze_data(options: AnalyzeOptions) -> None:
    """One way to name the data: ``data``/``dataset`` (shifted) or two domain folders."""
    pair = options.domain_a is not None or options.domain_b is not None
    if options.domains:
        if pair:
            raise InvalidOptionError("give --domain or --domain-a/--domain-b, not both")
        if len(options.domains) > 1:
            raise InvalidOptionError(
                "analyze compares two domains: give one --domain NAME=FOLDER (run it once per "
                "target domain)"
            )
        if options.shifts is not None:
            raise InvalidOptionError("--shift applies without --domain (one domain, shifted)")
        parse_domain(options.domains[0])
    if pair and (options.data is not None or options.dataset is not None):
        raise InvalidOptionError("give --domain-a/--domain-b or --data/--dataset, not both")
    if pair and (options.domain_a is None or options.domain_b is None):
        raise InvalidOptionError("give both --domain-a DIR and --domain-b DIR")
    if pair and options.shifts is not None:
        raise InvalidOptionError("--shift applies to --data/--dataset (one domain, shifted)")
    if not pair and options.shifts is not None:
        parse_shifts(options.shifts)  # a bad --shift fails before anything loads


def _target_domain(
    domains: tuple[str, ...],
    model: nn.Module,
    source: ImageData,
    size: tuple[int, int, int] | None,
) -> ImageData | None:
    """Domain B from ``--domain NAME=FOLDER`` (labels optional), named NAME; None without one."""
    if not domains:
        return None
    name, folder = parse_domain(domains[0])
    try:
        target = image_folder_data(folder, model, input_size=size)
    except DataError as exc:
        raise DataError(f"domain {name!r}: {exc}") from exc
    target = ImageData(
        target.dataset, target.mean, target.std, target.num_classes, target.labelled, name
    )
    check_same_classes(source, target)
    return target


def analyze_files(model: str, options: AnalyzeOptions | None = None) -> AnalyzeResult:
    """What ``ibnify analyze`` does: load MODEL (a name, + weights, or an ibnify checkpoint) and
    its data, then measure the feature divergence at every norm layer.

    A model built without weights gets the same init every run (``options.seed``).

    Raises:
        InvalidOptionError: conflicting or incomplete data options, an unknown shift.
        DataError: a missing or empty folder, or two domains with different class sets.
    """
    options = options or AnalyzeOptions()
    _check_analyze_data(options)
    torch.manual_seed(options.seed)
    source = load_model_or_checkpoint(model, options.weights)
    size = input_size_for(source.model, options.input_size)
    if options.domain_a is not None:
        first = image_folder_data(options.domain_a, source.model, input_size=size)
        second = image_folder_data(options.domain_b, source.model, input_size=size)  # type: ignore[arg-type]
        check_same_classes(first, second, "domains")
    else:
        first = resolve_data_source(
            options.data,
            options.dataset,
            source.model,
            split="test",
            seed=options.seed,
            input_size=size,
        )
        second = _target_domain(options.domains, source.model, first, size)
    report = analyze_divergence(
        source.model,
        first,
        second,
        shifts=options.shifts or "all",
        images=options.images,
        batch_size=options.batch_size,
        seed=options.seed,
        progress=options.progress,
        arch=source.source,
    )
    report.extras["model_args"] = _convert_args(source, options.input_size, options.seed)
    return AnalyzeResult(report, source)
