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
plan.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from torch import nn

from ..errors import InvalidOptionError, NoBatchNormError
from .backbones import find_resnet_body
from .generic import choose, raise_no_site, require_batchnorm
from .graph import GraphAnalysis, NormLayer, Role
from .layers import ibn_split_sizes
from .ops import BATCHNORM_KINDS, BN_LIKE_KINDS, FROZEN_KINDS, NormKind, norm_kind
from .plans import (
    ConversionPlan,
    ConversionSite,
    PlanOptions,
    Reason,
    ReasonCode,
    SiteKind,
    SkippedNorm,
    parse_stages,
    stages_text,
)

__all__ = [
    "DEFAULT_RATIO",
    "DEFAULT_STAGES",
    "FAMILY_DENSENET",
    "FAMILY_GENERIC",
    "FAMILY_RESNET",
    "LAYOUTS",
    "Family",
    "Layout",
    "LayoutRequest",
    "PlanOptions",
    "Selection",
    "detect_family",
    "layout_choices",
    "make_plan",
    "parse_stages",
    "resolve_layout",
]


class Family(StrEnum):
    """Architecture families with a published (or the generic) IBN layout."""

    RESNET = "resnet"
    DENSENET = "densenet"
    GENERIC = "generic"


FAMILY_RESNET = Family.RESNET
FAMILY_DENSENET = Family.DENSENET
FAMILY_GENERIC = Family.GENERIC
_FAMILY_TITLE = {Family.RESNET: "ResNet", Family.DENSENET: "DenseNet", Family.GENERIC: "generic"}

_DENSE_BLOCK = re.compile(r"^(?:(.*)\.)?denseblock(\d+)$")
_DENSE_LAYER = re.compile(r"^denselayer(\d+)$")


@dataclass(frozen=True)
class LayoutRequest:
    """What a layout's site selection gets: the model, its analysis and the checked options."""

    model: nn.Module
    analysis: GraphAnalysis
    arch: str
    stages: tuple[int, ...]  # checked against the model's stages
    ratio: float | None  # the user's, else the layout's default
    explicit_stages: bool  # the user chose the stages (not the layout's default)


@dataclass(frozen=True)
class Selection:
    """A layout's answer: the chosen sites, and why every other norm stays as it is."""

    sites: dict[str, ConversionSite]  # by norm name
    reason: Callable[[NormLayer], Reason]
    extra_sites: tuple[ConversionSite, ...] = ()  # new modules (IBN-b's post-addition IN)


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
            return len(_resnet_stages(model))
        if self.family == Family.DENSENET:
            return len(_dense_blocks(model))
        return analysis.num_stages


def detect_family(model: nn.Module) -> Family:
    """``"resnet"``, ``"densenet"`` or ``"generic"``, from the module structure.

    A ResNet has at least two ``layer{k}`` stages; HRNet's lone ``layer1`` does not count.
    """
    if len(_resnet_stages(model)) >= 2:
        return FAMILY_RESNET
    if _dense_blocks(model):
        return FAMILY_DENSENET
    return FAMILY_GENERIC


def _resnet_stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """[(layer name, [block names])] of the model's ResNet body (itself or inside a wrapper)."""
    body = find_resnet_body(model)
    if body is None:
        return []
    return [(blocks[0].rpartition(".")[0], list(blocks)) for blocks in body.stages]


def _dense_blocks(model: nn.Module) -> list[tuple[int, str, list[tuple[int, str]]]]:
    """[(block number, block name, [(layer number, layer name)])] for DenseNet-style models."""
    blocks = []
    for name, module in model.named_modules():
        match = _DENSE_BLOCK.match(name)
        if not match:
            continue
        layers = []
        for child_name, child in module.named_children():
            layer_match = _DENSE_LAYER.match(child_name)
            if layer_match and _is_norm_like(getattr(child, "norm1", None)):
                layers.append((int(layer_match.group(1)), f"{name}.{child_name}"))
        if layers:
            blocks.append((int(match.group(2)), name, layers))
    return blocks


def _is_norm_like(module: object) -> bool:
    return norm_kind(module) in BN_LIKE_KINDS


def _has_affine_parameters(module: nn.Module | None) -> bool:
    """Whether the norm's gamma/beta are parameters (an IN made from it adds none)."""
    return norm_kind(module) not in FROZEN_KINDS and bool(getattr(module, "affine", True))


def _submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


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


def _ibn_site(
    request: LayoutRequest, norm: NormLayer, order: str, rule: str, stage: int
) -> ConversionSite:
    """An IBN site for ``norm`` with the request's ratio."""
    ratio = float(request.ratio)  # type: ignore[arg-type]  # IBN layouts have a default ratio
    in_channels, bn_channels = ibn_split_sizes(norm.channels, ratio, order)  # type: ignore[arg-type]
    affine = _has_affine_parameters(request.model.get_submodule(norm.name))
    return ConversionSite(
        name=norm.name,
        kind=SiteKind.IBN,
        channels=norm.channels,
        stage=stage,
        ratio=request.ratio,
        order=order,
        in_channels=in_channels,
        bn_channels=bn_channels,
        param_delta=0 if affine else 2 * in_channels,
        rule=rule,
    )


def _select_resnet_a(request: LayoutRequest) -> Selection:
    """IBN-a for the ResNet family: ``layer{k}.{i}.bn1`` → IBN(ratio, IN first), k in stages.

    Stages are the body's ``layer{k}``, so a dilated body (DeepLab) keeps the paper's sites; in
    a wrapper (segmentation, detection) the norms outside the body stay as they are.
    """
    body = find_resnet_body(request.model)
    assert body is not None  # the family is ResNet
    chosen: dict[str, ConversionSite] = {}
    for k, blocks in enumerate(body.stages, start=1):
        if k in request.stages:
            for block in blocks:
                norm = request.analysis.norm(f"{block}.bn1")
                chosen[norm.name] = _ibn_site(request, norm, "in_first", "IBN-a: block's bn1", k)

    def reason(norm: NormLayer) -> Reason:
        stage = body.stage_of(norm.name)
        if stage is None:
            return Reason(ReasonCode.OUTSIDE_BODY)
        if stage == 0:
            return Reason(ReasonCode.STEM)
        if stage not in request.stages:
            return Reason(ReasonCode.STAGE_NOT_CHOSEN, value=stage)
        if norm.role == Role.SHORTCUT:
            return Reason(ReasonCode.RESNET_SHORTCUT)
        if norm.role == Role.PRE_ADD:
            return Reason(ReasonCode.RESNET_PRE_ADD)
        return Reason(ReasonCode.RESNET_NOT_BN1)

    return Selection(chosen, reason)


def _select_resnet_b(request: LayoutRequest) -> Selection:
    """IBN-b: stem ``bn1`` → InstanceNorm2d; IN after the last block's addition per stage."""
    model, analysis = request.model, request.analysis
    body = find_resnet_body(model)
    assert body is not None  # the family is ResNet
    stem_name = body.name("bn1")
    stem_module = _submodule_or_none(model, stem_name)
    if norm_kind(stem_module) not in BATCHNORM_KINDS | {NormKind.INSTANCENORM}:
        raise InvalidOptionError(
            f"{request.arch} has no stem {stem_name!r} BatchNorm; IBN-b needs one"
        )
    stem = analysis.norm(stem_name)
    chosen = {
        stem_name: ConversionSite(
            name=stem_name,
            kind=SiteKind.IN,
            channels=stem.channels,
            stage=0,
            in_channels=stem.channels,
            param_delta=0 if _has_affine_parameters(stem_module) else 2 * stem.channels,
            rule="IBN-b: stem BN becomes IN",
        )
    }
    blocks_by_name = {block.name: block for block in analysis.blocks}
    extra: list[ConversionSite] = []
    for k, (_, blocks) in enumerate(_resnet_stages(model), start=1):
        if k not in request.stages:
            continue
        block = blocks_by_name.get(blocks[-1])
        if block is None or not block.main_norms:
            raise InvalidOptionError(
                f"{blocks[-1]} has no residual addition; IBN-b cannot place IN there"
            )
        channels = analysis.norm(block.main_norms[-1]).channels
        extra.append(
            ConversionSite(
                name=f"{blocks[-1]}.IN",
                kind=SiteKind.POST_ADD_IN,
                channels=channels,
                stage=k,
                in_channels=channels,
                param_delta=2 * channels,
                rule="IBN-b: IN after the addition of the stage's last block",
            )
        )
    return Selection(chosen, lambda norm: Reason(ReasonCode.IBN_B_UNTOUCHED), tuple(extra))


def _select_densenet_a(request: LayoutRequest) -> Selection:
    """DenseNet IBN-a: ``norm1`` of dense layers 1, 4, 7, ... → IBN(0.4, BN first)."""
    chosen: dict[str, ConversionSite] = {}
    stage_of_block = {}
    for number, block_name, layers in _dense_blocks(request.model):
        stage_of_block[block_name] = number
        if number not in request.stages:
            continue
        for layer_number, layer_name in layers:
            if (layer_number - 1) % 3 == 0:
                norm = request.analysis.norm(f"{layer_name}.norm1")
                rule = "DenseNet IBN-a: norm1 of dense layers 1, 4, 7, ..."
                chosen[norm.name] = _ibn_site(request, norm, "bn_first", rule, number)

    def reason(norm: NormLayer) -> Reason:
        block = next((b for b in stage_of_block if norm.name.startswith(b + ".")), None)
        if block is None:
            return Reason(ReasonCode.DENSE_OUTSIDE)
        if stage_of_block[block] not in request.stages:
            return Reason(ReasonCode.DENSE_BLOCK_NOT_CHOSEN, value=stage_of_block[block])
        if norm.name.endswith(".norm2"):
            return Reason(ReasonCode.DENSE_NOT_NORM1)
        return Reason(ReasonCode.DENSE_NOT_THIRD)

    return Selection(chosen, reason)


def _select_generic_a(request: LayoutRequest) -> Selection:
    """Generic IBN-a for any BatchNorm CNN, driven by the graph rather than by names.

    The rule lives in :mod:`ibnify.core.generic`: the first safe main-branch BN of each residual
    block, the expansion BN of depthwise-separable blocks, the BN after each conv of plain
    stacks; never a shortcut BN, the last BN before an addition, or a BN whose channels are
    later split or shuffled. Default stages: 1-3, but never the last stage unless asked.

    Raises:
        NoBatchNormError: none of the BatchNorms in the chosen stages can take IN.
        InvalidOptionError: a chosen stage holds no BatchNorm.
        TraceError: fx could not trace the model and the forward-hook walk's record was not
            enough to place IBN safely.
    """
    analysis = request.analysis
    batchnorms = [n for n in analysis.norms if n.norm_kind in BATCHNORM_KINDS]
    empty = [k for k in request.stages if not any(n.stage == k for n in batchnorms)]
    if empty and request.explicit_stages:
        with_bn = sorted({n.stage for n in batchnorms if n.stage > 0})
        raise InvalidOptionError(
            f"stage {stages_text(empty)} of {request.arch} holds no BatchNorm; stages with "
            f"BatchNorm: {stages_text(with_bn) or 'none'}"
        )
    choice = choose(request.model, analysis, request.stages)
    chosen = {
        norm.name: _ibn_site(
            request, norm, "in_first", choice.rules[norm.name], choice.stages[norm.name]
        )
        for norm in analysis.norms
        if norm.name in choice.rules
    }
    if not chosen:
        raise_no_site(request.arch, analysis, request.stages, choice.reasons)

    def reason(norm: NormLayer) -> Reason:
        return choice.reasons.get(norm.name, Reason(ReasonCode.NOT_PICKED))

    return Selection(chosen, reason)


# name, family, title, default stages, default ratio, site selection
_REGISTRY = (
    Layout("resnet-a", Family.RESNET, "IBN-a", (1, 2, 3), 0.5, _select_resnet_a),
    Layout("resnet-b", Family.RESNET, "IBN-b", (1, 2), None, _select_resnet_b),
    Layout("densenet-a", Family.DENSENET, "DenseNet IBN-a", (1, 2, 3), 0.4, _select_densenet_a),
    Layout(
        "generic-a",
        Family.GENERIC,
        "generic IBN-a",
        (1, 2, 3),
        0.5,
        _select_generic_a,
        aliases=("generic",),
        keep_deepest_stage=False,
    ),
)
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in _REGISTRY}
DEFAULT_STAGES = {layout.name: layout.default_stages for layout in _REGISTRY}
DEFAULT_RATIO = {layout.name: layout.default_ratio for layout in _REGISTRY}


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
            f"family only; this model is {family}. Use --layout a"
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
            f"{layout.title} has no channel split; --ratio applies to IBN-a only"
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
            skipped.append(SkippedNorm(norm.name, norm.stage, str(selection.reason(norm))))
        elif _is_converted(model.get_submodule(norm.name), site):
            skipped.append(SkippedNorm(norm.name, norm.stage, str(_CONVERTED)))
            converted += 1
        else:
            sites.append(site)
    for site in selection.extra_sites:
        if _has_module(model, site.name):
            skipped.append(SkippedNorm(site.name, site.stage, str(_CONVERTED)))
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


def _is_converted(module: nn.Module, site: ConversionSite) -> bool:
    kind = norm_kind(module)
    return kind == NormKind.IBN or (site.kind == SiteKind.IN and kind == NormKind.INSTANCENORM)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
