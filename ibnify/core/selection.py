"""Site selection: which norms each layout converts, and why every other norm stays.

The published IBN-Net layouts (``resnet-a``, ``resnet-b``, ``densenet-a``) pick their sites from
the module structure; ``generic-a`` asks the channel-safety rule of :mod:`ibnify.core.generic`.
:mod:`ibnify.core.layouts` holds the registry that names them and the shared steps around them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import InvalidOptionError
from .backbones import find_resnet_body
from .generic import choose, raise_no_site
from .graph import GraphAnalysis, NormLayer, Role
from .layers import ibn_split_sizes
from .modules import submodule_or_none
from .ops import BATCHNORM_KINDS, NormKind, is_batchnorm_like, is_frozen_batchnorm, norm_kind
from .plans import ConversionSite, SiteKind, stages_text
from .reasons import Reason, ReasonCode

__all__ = [
    "LayoutRequest",
    "Selection",
    "dense_blocks",
    "resnet_stages",
    "select_densenet_a",
    "select_generic_a",
    "select_resnet_a",
    "select_resnet_b",
]


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


def resnet_stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """[(layer name, [block names])] of the model's ResNet body (itself or inside a wrapper)."""
    body = find_resnet_body(model)
    if body is None:
        return []
    return [(blocks[0].rpartition(".")[0], list(blocks)) for blocks in body.stages]


def dense_blocks(model: nn.Module) -> list[tuple[int, str, list[tuple[int, str]]]]:
    """[(block number, block name, [(layer number, layer name)])] for DenseNet-style models."""
    blocks = []
    for name, module in model.named_modules():
        match = _DENSE_BLOCK.match(name)
        if not match:
            continue
        layers = []
        for child_name, child in module.named_children():
            layer_match = _DENSE_LAYER.match(child_name)
            if layer_match and is_batchnorm_like(getattr(child, "norm1", None)):
                layers.append((int(layer_match.group(1)), f"{name}.{child_name}"))
        if layers:
            blocks.append((int(match.group(2)), name, layers))
    return blocks


def _has_affine_parameters(module: nn.Module | None) -> bool:
    """Whether the norm's gamma/beta are parameters (an IN made from it adds none)."""
    return not is_frozen_batchnorm(module) and bool(getattr(module, "affine", True))


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


def select_resnet_a(request: LayoutRequest) -> Selection:
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


def select_resnet_b(request: LayoutRequest) -> Selection:
    """IBN-b: stem ``bn1`` → InstanceNorm2d; IN after the last block's addition per stage."""
    model, analysis = request.model, request.analysis
    body = find_resnet_body(model)
    assert body is not None  # the family is ResNet
    stem_name = body.name("bn1")
    stem_module = submodule_or_none(model, stem_name)
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
    for k, (_, blocks) in enumerate(resnet_stages(model), start=1):
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


def select_densenet_a(request: LayoutRequest) -> Selection:
    """DenseNet IBN-a: ``norm1`` of dense layers 1, 4, 7, ... → IBN(0.4, BN first)."""
    chosen: dict[str, ConversionSite] = {}
    stage_of_block = {}
    for number, block_name, layers in dense_blocks(request.model):
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


def select_generic_a(request: LayoutRequest) -> Selection:
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
