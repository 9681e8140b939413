"""Layouts: where IBN goes, as a registry of :class:`Layout` records.

Published IBN-Net layouts win where they apply:
- ``resnet-a`` (IBN-a): the ``bn1`` of every block of the chosen stages becomes IBN (IN first).
- ``resnet-b`` (IBN-b): the stem ``bn1`` becomes InstanceNorm2d, and an InstanceNorm2d is inserted
  after the residual addition of the last block of each chosen stage (default stages 1 and 2).
- ``densenet-a``: ``norm1`` of dense layers 1, 4, 7, ... of the chosen dense blocks becomes IBN
  with ratio 0.4, BN first.
- ``generic-a``: every other BN network (the rule in :mod:`ibnify.core.generic`).

A layout contributes only what is its own (family, defaults, how to count stages, which norms to
pick and why the others stay); :func:`make_plan` does the shared steps once: resolve the user's
layout name (``"a"``, ``"b"``, an alias or an explicit name; :func:`layout_choices` lists them),
apply defaults, check stages and ratio, record a reason for every norm left alone and assemble the
plan. Each layout's site selection is in :mod:`ibnify.core.selection`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from torch import nn

from ..errors import InvalidOptionError, NoBatchNormError
from .generic import require_batchnorm
from .graph import GraphAnalysis
from .modules import submodule_or_none
from .ops import NormKind, norm_kind
from .plans import (
    ConversionPlan,
    ConversionSite,
    PlanOptions,
    SiteKind,
    SkippedNorm,
    stages_text,
)
from .reasons import Reason, ReasonCode
from .selection import (
    LayoutRequest,
    Selection,
    dense_blocks,
    resnet_stages,
    select_densenet_a,
    select_generic_a,
    select_resnet_a,
    select_resnet_b,
)

__all__ = [
    "LAYOUTS",
    "Family",
    "Layout",
    "detect_family",
    "layout_choices",
    "make_plan",
    "resolve_layout",
]


class Family(StrEnum):
    """Architecture families with a published (or the generic) IBN layout."""

    RESNET = "resnet"
    DENSENET = "densenet"
    GENERIC = "generic"


_FAMILY_TITLE = {Family.RESNET: "ResNet", Family.DENSENET: "DenseNet", Family.GENERIC: "generic"}


@dataclass(frozen=True)
class Layout:
    """One IBN layout: its names, family, defaults and site selection.

    The user's short name is the ``variant`` after the family in ``name`` (``resnet-b`` → ``b``);
    the family decides how stages are counted.
    """

    name: str
    family: Family
    title: str  # for messages: "IBN-a", "IBN-b", ...
    default_stages: tuple[int, ...]
    default_ratio: float | None  # None: no channel split, a ratio is refused
    select: Callable[[LayoutRequest], Selection]
    aliases: tuple[str, ...] = ()
    keep_deepest_stage: bool = True  # False: defaults never include the deepest stage

    @property
    def variant(self) -> str:
        """``"a"`` or ``"b"``: what the user may call the layout within its family."""
        return self.name.rpartition("-")[2]

    def count_stages(self, model: nn.Module, analysis: GraphAnalysis) -> int:
        """Stages of ``model`` as this layout's family counts them."""
        if self.family == Family.RESNET:
            return len(resnet_stages(model))
        if self.family == Family.DENSENET:
            return len(dense_blocks(model))
        return analysis.num_stages


def detect_family(model: nn.Module) -> Family:
    """``"resnet"``, ``"densenet"`` or ``"generic"``, from the module structure.

    A ResNet has at least two ``layer{k}`` stages; HRNet's lone ``layer1`` does not count.
    """
    if len(resnet_stages(model)) >= 2:
        return Family.RESNET
    if dense_blocks(model):
        return Family.DENSENET
    return Family.GENERIC


def _check_stages(stages: Sequence[int], num_stages: int, arch: str) -> tuple[int, ...]:
    chosen = tuple(sorted(set(int(s) for s in stages)))
    if not chosen:
        raise InvalidOptionError("no stages chosen; give stages like 1-3")
    for stage in chosen:
        if stage < 1 or stage > num_stages:
            raise InvalidOptionError(
                f"stage {stage} is out of range: {arch} has stages 1-{num_stages}"
            )
    return chosen


# name, family, title, default stages, default ratio, site selection
_REGISTRY = (
    Layout("resnet-a", Family.RESNET, "IBN-a", (1, 2, 3), 0.5, select_resnet_a),
    Layout("resnet-b", Family.RESNET, "IBN-b", (1, 2), None, select_resnet_b),
    Layout("densenet-a", Family.DENSENET, "DenseNet IBN-a", (1, 2, 3), 0.4, select_densenet_a),
    Layout(
        "generic-a",
        Family.GENERIC,
        "generic IBN-a",
        (1, 2, 3),
        0.5,
        select_generic_a,
        aliases=("generic",),
        keep_deepest_stage=False,
    ),
)
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in _REGISTRY}


def _variants() -> list[str]:
    return list(dict.fromkeys(layout.variant for layout in _REGISTRY))


def layout_choices() -> list[str]:
    """Every layout name a user may give: variants (a, b), aliases, explicit names."""
    aliases = [alias for layout in _REGISTRY for alias in layout.aliases]
    return [*_variants(), *aliases, *LAYOUTS]


def resolve_layout(layout: str, family: str) -> str:
    """Map a user layout name (``a``, ``b``, an alias or an explicit one) to a key of LAYOUTS."""
    key = layout.strip().lower()
    if key in LAYOUTS:
        return key
    for record in _REGISTRY:
        if key in record.aliases or (key, family) == (record.variant, record.family):
            return record.name
    other = next((record for record in _REGISTRY if record.variant == key), None)
    if other is not None:
        raise InvalidOptionError(
            f"layout {key} ({other.title}) is defined for the {_FAMILY_TITLE[other.family]} "
            f"family only; this model is {family}. Use `layout=a`"
        )
    valid = ", ".join([*_variants(), *LAYOUTS])
    raise InvalidOptionError(f"unknown layout {layout!r}; choose one of: {valid}")


def make_plan(
    model: nn.Module,
    analysis: GraphAnalysis,
    options: PlanOptions | None = None,
    *,
    arch: str | None = None,
) -> ConversionPlan:
    """Pick the layout for the model's family and build its plan (touches nothing).

    The shared steps of every layout: resolve the name, refuse a ratio where the layout has no
    split, apply the default stages and ratio, check the stages against the model, then let the
    layout select its sites and assemble the plan.
    """
    options = options or PlanOptions()
    arch = arch or type(model).__name__
    layout = LAYOUTS[resolve_layout(options.layout, detect_family(model))]
    if layout.default_ratio is None and options.ratio is not None:
        raise InvalidOptionError(
            f"{layout.title} has no channel split; `ratio` applies to IBN-a only"
        )
    require_batchnorm(model, arch)
    num_stages = layout.count_stages(model, analysis)
    defaults = layout.default_stages
    if not layout.keep_deepest_stage:  # IBN keeps BN in the deep layers
        defaults = tuple(s for s in defaults if s < num_stages) or (1,)
    request = LayoutRequest(
        model=model,
        analysis=analysis,
        arch=arch,
        stages=_check_stages(options.stages or defaults, num_stages, arch),
        ratio=layout.default_ratio if options.ratio is None else options.ratio,
        explicit_stages=bool(options.stages),
    )
    return _assemble(request, layout, num_stages, layout.select(request))


def _assemble(
    request: LayoutRequest, layout: Layout, num_stages: int, selection: Selection
) -> ConversionPlan:
    """Assemble a plan: chosen sites in execution order, a reason for every other norm."""
    model, arch, stages = request.model, request.arch, request.stages
    sites: list[ConversionSite] = []
    skipped: list[SkippedNorm] = []
    converted = 0  # sites that are converted already
    for norm in request.analysis.norms:
        site = selection.sites.get(norm.name)
        if site is None:
            skipped.append(SkippedNorm(norm.name, norm.stage, selection.reason(norm)))
        elif _is_converted(model.get_submodule(norm.name), site):
            skipped.append(SkippedNorm(norm.name, norm.stage, _CONVERTED))
            converted += 1
        else:
            sites.append(site)
    _check_spatial_size(request, sites)
    for site in selection.extra_sites:
        if submodule_or_none(model, site.name) is not None:
            skipped.append(SkippedNorm(site.name, site.stage, _CONVERTED))
            converted += 1
        else:
            sites.append(site)
    if not sites:
        if converted:
            raise NoBatchNormError(
                f"{arch} is already converted: every site of layout {layout.name} in stages "
                f"{stages_text(stages)} is IBN already"
            )
        raise NoBatchNormError(
            f"{arch} has no BatchNorm layer to convert in stages {stages_text(stages)} "
            f"with layout {layout.name}"
        )
    return ConversionPlan(
        arch=arch,
        layout=layout.name,
        stages=stages,
        ratio=request.ratio,
        sites=tuple(sites),
        skipped=tuple(skipped),
        family=layout.family,
        num_stages=num_stages,
    )


_CONVERTED = Reason(ReasonCode.ALREADY_CONVERTED)


def _check_spatial_size(request: LayoutRequest, sites: Sequence[ConversionSite]) -> None:
    """InvalidOptionError for a site whose feature map is 1×1 at the planned input size.

    Instance Normalization needs more than one spatial element (its statistics are per image
    and channel over H×W); such a model would fail at its first forward, not here.
    """
    shapes = {norm.name: norm.output_shape for norm in request.analysis.norms}
    for site in sites:
        shape = shapes.get(site.name, ())
        if len(shape) == 4 and shape[2] * shape[3] == 1:
            raise InvalidOptionError(
                f"{site.name} (stage {site.stage}) sees a 1×1 feature map at this input size, "
                "and instance normalization needs more than one pixel; convert at a larger input "
                f"size or leave stage {site.stage} out"
            )


def _is_converted(module: nn.Module, site: ConversionSite) -> bool:
    kind = norm_kind(module)
    return kind == NormKind.IBN or (site.kind == SiteKind.IN and kind == NormKind.INSTANCENORM)
