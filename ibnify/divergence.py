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
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ._io import atomic_write_bytes
from .api import convert_named
from .api import plan as make_plan
from .checkpoint import load, read_recipe
from .core.graph import analyze
from .core.layers import IBN
from .core.plans import ConversionPlan
from .core.surgery import get_plan
from .data import DataError, ImageData, Normalize
from .errors import IbnifyError, InvalidOptionError, NoBatchNormError
from .evaluation import CLEAN, apply_shift, parse_shifts
from .models import build_model
from .weights import load_state_dict_file, load_weights

__all__ = [
    "CONTENT_FACTOR",
    "SUGGESTION_RULE",
    "DivergenceReport",
    "SiteDivergence",
    "analyze_divergence",
    "check_same_classes",
    "gaussian_symmetric_kl",
    "load_model_or_checkpoint",
    "suggest_stages",
]

CONTENT_FACTOR = 3.0
"""A stage counts as appearance-dominated when its divergence is at least this many times its
content baseline."""

SUGGESTION_RULE = (
    "suggested stages: the longest prefix 1..k of stages, never the last stage, in which every "
    f"stage's mean divergence is at least {CONTENT_FACTOR:g}× its content baseline (the same "
    "measure between two random halves of domain A)"
)

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
        """The ``ibnify convert`` arguments that rebuild this model's weights before conversion."""
        if self.checkpoint is not None:
            return f"{self.source} --weights {self.checkpoint}"
        if self.weights is not None:
            return f"{self.label} --weights {self.weights}"
        return self.label


def load_model_or_checkpoint(spec: str, weights: str | None = None) -> ModelSource:
    """A model name (``resnet50``, ``timm:…``, ``ibnify:…``) with optional weights, or a checkpoint.

    A path to an existing file is read as an ibnify checkpoint (``ibnify.load``); anything else
    is built by name and, with ``weights``, loaded strictly: the original model's keys, or IBN
    keys of the default IBN-a layout (the IBN-Net authors' checkpoints, as ``ibnify convert``).

    Raises:
        InvalidOptionError: ``weights`` given with a checkpoint.
        NoBatchNormError: the model holds no BatchNorm (nothing for IBN to split).
    """
    path = Path(spec)
    if path.is_file() or spec.endswith(".safetensors"):
        if weights is not None:
            raise InvalidOptionError("--weights applies to a model name, not to a checkpoint")
        recipe = read_recipe(path)
        model = load(path)
        kwargs = dict(recipe.get("model_kwargs") or {})
        result = ModelSource(model, recipe["source"], spec, checkpoint=spec, model_kwargs=kwargs)
    else:
        model, source = build_model(spec)
        state = load_state_dict_file(weights) if weights is not None else None
        if state is not None and set(state) == set(model.state_dict()):
            load_weights(model, state, what=f"weights {weights!r}")
        elif state is not None:  # IBN keys, e.g. the IBN-Net authors' checkpoints
            model = convert_named(spec, weights=weights)
        result = ModelSource(model, source, spec, weights=weights)
    require_batchnorm(model, result.source)
    return result


def require_batchnorm(model: nn.Module, name: str) -> None:
    """NoBatchNormError naming the norms ``model`` uses, when it holds no BatchNorm or IBN."""
    others: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm | IBN):
            return
        kind = type(module).__name__
        if "Norm" in kind and not any(True for _ in module.children()):
            others.setdefault(kind, None)
    uses = f"its norms: {', '.join(others)}" if others else "it has no normalization layers"
    raise NoBatchNormError(
        f"{name} has no BatchNorm layer ({uses}); IBN splits BatchNorm layers, so there is "
        "nowhere to place it"
    )


def check_same_classes(data_a: ImageData, data_b: ImageData, what: str = "domains") -> None:
    """DataError when two labelled image folders hold different class sets."""
    classes_a = getattr(data_a.dataset, "classes", None)
    classes_b = getattr(data_b.dataset, "classes", None)
    if classes_a is None and classes_b is None:
        return
    if classes_a != classes_b:
        only_a = sorted(set(classes_a or ()) - set(classes_b or ()))[:3]
        only_b = sorted(set(classes_b or ()) - set(classes_a or ()))[:3]
        raise DataError(
            f"the {what} hold different class sets ({data_a.name!r} only: "
            f"{', '.join(only_a) or '-'}; {data_b.name!r} only: {', '.join(only_b) or '-'}); "
            "give folders with the same CLASS sub-folders"
        )


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


@dataclass
class SiteDivergence:
    """Divergence at one norm layer's output: appearance (A vs B) and content (A vs A)."""

    name: str
    stage: int
    index: int
    kind: str
    channels: int
    divergence: float
    content: float
    per_shift: dict[str, float] = field(default_factory=dict)
    site: str = ""

    @property
    def ratio(self) -> float:
        """Divergence over content baseline (inf when the baseline is 0)."""
        return self.divergence / self.content if self.content > 0 else float("inf")


def suggest_stages(
    stage_divergence: dict[int, float], stage_content: dict[int, float]
) -> tuple[int, ...]:
    """Apply :data:`SUGGESTION_RULE` to per-stage divergences and content baselines."""
    stages = sorted(s for s in stage_divergence if s >= 1)
    if not stages:
        return ()
    chosen: list[int] = []
    for stage in range(1, max(stages)):
        value = stage_divergence.get(stage)
        if value is None or value <= 0 or value < CONTENT_FACTOR * stage_content.get(stage, 0):
            break
        chosen.append(stage)
    return tuple(chosen)


def _stage_text(stages: Sequence[int]) -> str:
    stages = list(stages)
    if stages and stages == list(range(stages[0], stages[-1] + 1)) and len(stages) > 1:
        return f"{stages[0]}-{stages[-1]}"
    return ",".join(str(s) for s in stages)


@dataclass
class DivergenceReport:
    """Feature divergence per norm site and per stage, the content baseline and a suggestion."""

    arch: str
    domain_a: str
    domain_b: str
    images: int
    shifts: list[str]
    sites: list[SiteDivergence]
    converted: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def _per_stage(self, attribute: str) -> dict[int, float]:
        values: dict[int, list[float]] = {}
        for site in self.sites:
            values.setdefault(site.stage, []).append(getattr(site, attribute))
        return {stage: sum(v) / len(v) for stage, v in sorted(values.items())}

    @property
    def stage_divergence(self) -> dict[int, float]:
        """Mean site divergence per stage (0 = stem)."""
        return self._per_stage("divergence")

    @property
    def stage_content(self) -> dict[int, float]:
        """Mean content baseline per stage."""
        return self._per_stage("content")

    @property
    def suggested_stages(self) -> tuple[int, ...]:
        """Stages for ``--stages`` by :data:`SUGGESTION_RULE`; empty when none qualifies."""
        return suggest_stages(self.stage_divergence, self.stage_content)

    def command(self, model: str | None = None) -> str | None:
        """The ``ibnify convert`` command for the suggestion (``model``: its MODEL arguments);
        None when nothing is suggested or the model is converted already."""
        stages = self.suggested_stages
        if not stages or self.converted:
            return None
        target = model or self.arch
        stem = self.arch.split(":")[-1].replace("/", "_") or "model"
        return f"ibnify convert {target} --stages {_stage_text(stages)} -o {stem}_ibn.safetensors"

    def table(self) -> str:
        """Markdown tables: every norm site in execution order, then one row per stage."""
        header = ["#", "layer", "stage", "C", "divergence", "content", "×content", "site"]
        rows = [
            [
                str(s.index),
                s.name,
                str(s.stage),
                str(s.channels),
                f"{s.divergence:.4f}",
                f"{s.content:.4f}",
                _ratio_text(s.ratio),
                s.site,
            ]
            for s in self.sites
        ]
        content = self.stage_content
        counts: dict[int, int] = {}
        for s in self.sites:
            counts[s.stage] = counts.get(s.stage, 0) + 1
        stage_rows = [
            [
                "stem" if stage == 0 else str(stage),
                str(counts[stage]),
                f"{value:.4f}",
                f"{content[stage]:.4f}",
                _ratio_text(value / content[stage] if content[stage] > 0 else float("inf")),
            ]
            for stage, value in self.stage_divergence.items()
        ]
        stage_header = ["stage", "sites", "divergence", "content", "×content"]
        return "\n".join([*_markdown(header, rows), "", *_markdown(stage_header, stage_rows)])

    def summary(self, model: str | None = None) -> str:
        """The suggestion in words, the rule, and the command to run it."""
        stages = self.suggested_stages
        lines = []
        if stages:
            lines.append(f"suggested --stages {_stage_text(stages)}")
        else:
            lines.append(
                "suggested --stages: none (no stage's divergence is clearly above the content "
                "baseline; IN is unlikely to help for these domains)"
            )
        lines.append(f"rule: {SUGGESTION_RULE}")
        if self.converted:
            lines.append(
                "the model is converted already (its sites are marked); apply the suggestion to "
                "the unconverted network"
            )
        command = self.command(model)
        if command:
            lines.append(f"run: {command}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: sites, stages, the suggestion and its rule."""
        return {
            "arch": self.arch,
            "domain_a": self.domain_a,
            "domain_b": self.domain_b,
            "images": self.images,
            "shifts": list(self.shifts),
            "converted": self.converted,
            "sites": [{**asdict(s), "ratio": _finite(s.ratio)} for s in self.sites],
            "stages": {
                str(stage): {"divergence": value, "content": self.stage_content[stage]}
                for stage, value in self.stage_divergence.items()
            },
            "suggested_stages": list(self.suggested_stages),
            "rule": SUGGESTION_RULE,
            "command": self.command(self.extras.get("model_args")),
            **{k: v for k, v in self.extras.items() if k != "model_args"},
        }

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path: str | os.PathLike[str], title: str | None = None) -> Path:
        """PNG of divergence and content baseline against depth, stage boundaries marked; atomic."""
        figure = Figure(figsize=(max(6.0, 0.12 * len(self.sites) + 4), 4.0), dpi=110)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(1, 1, 1)
        depth = list(range(len(self.sites)))
        values = [max(s.divergence, 1e-6) for s in self.sites]  # log axis: 0 drawn at 1e-6
        axes.plot(depth, values, "o-", label="appearance (A vs B)")
        content = [max(s.content, 1e-6) for s in self.sites]
        axes.plot(depth, content, "s--", label="content baseline (A vs A)")
        converted = [i for i, s in enumerate(self.sites) if s.site]
        if converted:
            axes.plot(
                converted,
                [values[i] for i in converted],
                "o",
                mfc="none",
                ms=11,
                color="black",
                label="IBN site" + (" (converted)" if self.converted else " (default IBN-a)"),
            )
        _mark_stages(axes, [s.stage for s in self.sites])
        axes.set_yscale("log")
        axes.set_xlabel("norm layer, in execution order")
        axes.set_ylabel("feature divergence (symmetric KL)")
        axes.set_title(title or f"{self.arch}: {self.domain_a} vs {self.domain_b}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", frameon=False, loc="center right")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return atomic_write_bytes(Path(path), buffer.getvalue())


def _mark_stages(axes: Any, stages: list[int]) -> None:
    start = 0
    for index in range(1, len(stages) + 1):
        if index == len(stages) or stages[index] != stages[start]:
            label = "stem" if stages[start] == 0 else f"stage {stages[start]}"
            axes.text((start + index - 1) / 2, 0.97, label, ha="center", va="top",
                      fontsize="small", transform=axes.get_xaxis_transform())  # fmt: skip
            if index < len(stages):
                axes.axvline(index - 0.5, color="grey", ls=":", lw=1)
            start = index


def _ratio_text(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.1f}"


def _finite(value: float) -> float | None:
    return None if value == float("inf") else value


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


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
    device = next(model.parameters()).device
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
    """Norm name → its IBN role: the converted sites, else the default IBN-a plan's sites."""
    existing = get_plan(model)
    if existing is not None and existing.sites:
        return {s.name: f"{s.kind} (converted)" for s in existing.sites}, True
    try:
        default: ConversionPlan = make_plan(model, input_size=input_size)
    except IbnifyError:
        return {}, False
    return {s.name: "IBN-a default" for s in default.sites}, False


def analyze_divergence(
    model: nn.Module,
    data_a: ImageData,
    data_b: ImageData | None = None,
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
        data_a: domain A, images in [0, 1] with the model's mean/std.
        data_b: domain B; None makes B the shifted copy of A under each of ``shifts`` (the
            appearance shifts of ``ibnify evaluate``) and averages the divergence over them.
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
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with tqdm(total=total, desc="analyze", unit="img", disable=_disabled(progress)) as bar:
            features = _collect(model, data_a, names, views, batch_size, seed, bar)
            if data_b is not None:
                second = _collect(model, data_b, names, [CLEAN], batch_size, seed, bar)
                features["B"] = second[CLEAN]
    finally:
        for module, training in modes.items():
            module.training = training
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


def _disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
