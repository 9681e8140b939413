"""Layouts: pure functions from a model and its graph analysis to a ConversionPlan.

Published IBN-Net layouts win where they apply:
- ``resnet-a`` (IBN-a): the ``bn1`` of every block of the chosen stages becomes IBN (IN first).
- ``resnet-b`` (IBN-b): the stem ``bn1`` becomes InstanceNorm2d, and an InstanceNorm2d is inserted
  after the residual addition of the last block of each chosen stage (default stages 1 and 2).
- ``densenet-a``: ``norm1`` of dense layers 1, 4, 7, ... of the chosen dense blocks becomes IBN
  with ratio 0.4, BN first.
- ``generic-a``: every other BN network (see :func:`generic_a`).

User-facing layout names are ``"a"`` (pick by family), ``"b"`` (ResNet family only) and the
explicit names above; :data:`LAYOUTS` maps each to its function.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from ..errors import InvalidOptionError, NoBatchNormError, TraceError
from .generic import choose, require_batchnorm
from .graph import ROLE_PRE_ADD, ROLE_SHORTCUT, GraphAnalysis, NormLayer
from .layers import IBN, ibn_split_sizes
from .plans import (
    KIND_IBN,
    KIND_IN,
    KIND_POST_ADD_IN,
    ConversionPlan,
    ConversionSite,
    SkippedNorm,
    parse_stages,
)

__all__ = [
    "DEFAULT_RATIO",
    "DEFAULT_STAGES",
    "FAMILY_DENSENET",
    "FAMILY_GENERIC",
    "FAMILY_RESNET",
    "LAYOUTS",
    "detect_family",
    "make_plan",
    "parse_stages",
]

FAMILY_RESNET = "resnet"
FAMILY_DENSENET = "densenet"
FAMILY_GENERIC = "generic"

DEFAULT_STAGES = {
    "resnet-a": (1, 2, 3),
    "resnet-b": (1, 2),
    "densenet-a": (1, 2, 3),
    "generic-a": (1, 2, 3),
}
DEFAULT_RATIO = {"resnet-a": 0.5, "resnet-b": None, "densenet-a": 0.4, "generic-a": 0.5}

_DENSE_BLOCK = re.compile(r"^(?:(.*)\.)?denseblock(\d+)$")
_DENSE_LAYER = re.compile(r"^denselayer(\d+)$")


def detect_family(model: nn.Module) -> str:
    """``"resnet"``, ``"densenet"`` or ``"generic"``, from the module structure.

    A ResNet has at least two ``layer{k}`` stages; HRNet's lone ``layer1`` does not count.
    """
    if len(_resnet_stages(model)) >= 2:
        return FAMILY_RESNET
    if _dense_blocks(model):
        return FAMILY_DENSENET
    return FAMILY_GENERIC


def _resnet_stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """[(f"layer{k}", [block names])] when the model is laid out like a torchvision ResNet."""
    stages = []
    k = 1
    while isinstance(getattr(model, f"layer{k}", None), nn.Sequential):
        layer = getattr(model, f"layer{k}")
        blocks = [f"layer{k}.{name}" for name, _ in layer.named_children()]
        if not blocks or not all(
            _is_norm_like(getattr(block, "bn1", None)) for block in layer.children()
        ):
            return []
        stages.append((f"layer{k}", blocks))
        k += 1
    return stages


def _is_norm_like(module: object) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm | IBN)


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
    norm: NormLayer, module: nn.Module, ratio: float, order: str, rule: str, stage: int
) -> ConversionSite:
    in_channels, bn_channels = ibn_split_sizes(norm.channels, ratio, order)  # type: ignore[arg-type]
    affine = bool(getattr(module, "affine", True))
    return ConversionSite(
        name=norm.name,
        kind=KIND_IBN,
        channels=norm.channels,
        stage=stage,
        ratio=ratio,
        order=order,
        in_channels=in_channels,
        bn_channels=bn_channels,
        param_delta=0 if affine else 2 * in_channels,
        rule=rule,
    )


def _build_plan(
    model: nn.Module,
    analysis: GraphAnalysis,
    *,
    arch: str,
    layout: str,
    family: str,
    stages: tuple[int, ...],
    ratio: float | None,
    num_stages: int,
    chosen: dict[str, ConversionSite],
    reasons: Callable[[NormLayer], str],
    extra_sites: Iterable[ConversionSite] = (),
) -> ConversionPlan:
    """Assemble a plan: chosen sites in execution order, a reason for every other norm."""
    sites: list[ConversionSite] = []
    skipped: list[SkippedNorm] = []
    for norm in analysis.norms:
        if norm.name in chosen:
            module = model.get_submodule(norm.name)
            if isinstance(module, IBN) or (
                chosen[norm.name].kind == KIND_IN and isinstance(module, nn.InstanceNorm2d)
            ):
                skipped.append(SkippedNorm(norm.name, norm.stage, "already converted"))
                continue
            sites.append(chosen[norm.name])
        else:
            skipped.append(SkippedNorm(norm.name, norm.stage, reasons(norm)))
    for site in extra_sites:
        try:
            model.get_submodule(site.name)
        except AttributeError:
            sites.append(site)
        else:
            skipped.append(SkippedNorm(site.name, site.stage, "already converted"))
    if not sites:
        if any(s.reason == "already converted" for s in skipped):
            raise NoBatchNormError(
                f"{arch} is already converted: every site of layout {layout} in stages "
                f"{_stages_text(stages)} is IBN already"
            )
        raise NoBatchNormError(
            f"{arch} has no BatchNorm layer to convert in stages {_stages_text(stages)} "
            f"with layout {layout}"
        )
    return ConversionPlan(
        arch=arch,
        layout=layout,
        stages=stages,
        ratio=ratio,
        sites=tuple(sites),
        skipped=tuple(skipped),
        family=family,
        num_stages=num_stages,
    )


def _stages_text(stages: Sequence[int]) -> str:
    return ",".join(str(s) for s in stages)


def resnet_a(
    model: nn.Module,
    analysis: GraphAnalysis,
    *,
    arch: str,
    stages: Sequence[int] | None,
    ratio: float | None,
) -> ConversionPlan:
    """IBN-a for the ResNet family: ``layer{k}.{i}.bn1`` → IBN(ratio, IN first), k in stages."""
    layout = "resnet-a"
    resnet_stages = _resnet_stages(model)
    chosen_stages = _check_stages(stages or DEFAULT_STAGES[layout], len(resnet_stages), arch)
    ratio = DEFAULT_RATIO[layout] if ratio is None else ratio
    chosen: dict[str, ConversionSite] = {}
    for k, (_, blocks) in enumerate(resnet_stages, start=1):
        if k not in chosen_stages:
            continue
        for block in blocks:
            name = f"{block}.bn1"
            norm = analysis.norm(name)
            chosen[name] = _ibn_site(
                norm, model.get_submodule(name), ratio, "in_first", "IBN-a: block's bn1", k
            )

    def reason(norm: NormLayer) -> str:
        if norm.stage == 0:
            return "stem (IBN-a keeps the stem BN)"
        if norm.stage not in chosen_stages:
            return f"stage {norm.stage} not chosen"
        if norm.role == ROLE_SHORTCUT:
            return "shortcut (downsample) BN"
        if norm.role == ROLE_PRE_ADD:
            return "last BN before the residual addition (sets the residual's scale)"
        return "IBN-a converts only the block's first BN (bn1)"

    return _build_plan(
        model,
        analysis,
        arch=arch,
        layout=layout,
        family=FAMILY_RESNET,
        stages=chosen_stages,
        ratio=ratio,
        num_stages=len(resnet_stages),
        chosen=chosen,
        reasons=reason,
    )


def resnet_b(
    model: nn.Module,
    analysis: GraphAnalysis,
    *,
    arch: str,
    stages: Sequence[int] | None,
    ratio: float | None,
) -> ConversionPlan:
    """IBN-b: stem ``bn1`` → InstanceNorm2d; IN after the last block's addition per stage."""
    layout = "resnet-b"
    if ratio is not None:
        raise InvalidOptionError("IBN-b has no channel split; --ratio applies to IBN-a only")
    resnet_stages = _resnet_stages(model)
    chosen_stages = _check_stages(stages or DEFAULT_STAGES[layout], len(resnet_stages), arch)
    if not isinstance(
        getattr(model, "bn1", None), nn.modules.batchnorm._BatchNorm | nn.InstanceNorm2d
    ):
        raise InvalidOptionError(f"{arch} has no stem 'bn1' BatchNorm; IBN-b needs one")
    stem = analysis.norm("bn1")
    chosen = {
        "bn1": ConversionSite(
            name="bn1",
            kind=KIND_IN,
            channels=stem.channels,
            stage=0,
            in_channels=stem.channels,
            param_delta=0 if getattr(model.bn1, "affine", True) else 2 * stem.channels,
            rule="IBN-b: stem BN becomes IN",
        )
    }
    blocks_by_name = {block.name: block for block in analysis.blocks}
    extra: list[ConversionSite] = []
    for k, (_, blocks) in enumerate(resnet_stages, start=1):
        if k not in chosen_stages:
            continue
        last = blocks[-1]
        block = blocks_by_name.get(last)
        if block is None or not block.main_norms:
            raise InvalidOptionError(
                f"{last} has no residual addition; IBN-b cannot place IN there"
            )
        channels = analysis.norm(block.main_norms[-1]).channels
        extra.append(
            ConversionSite(
                name=f"{last}.IN",
                kind=KIND_POST_ADD_IN,
                channels=channels,
                stage=k,
                in_channels=channels,
                param_delta=2 * channels,
                rule="IBN-b: IN after the addition of the stage's last block",
            )
        )

    def reason(norm: NormLayer) -> str:
        return "IBN-b changes only the stem BN and adds IN after additions"

    return _build_plan(
        model,
        analysis,
        arch=arch,
        layout=layout,
        family=FAMILY_RESNET,
        stages=chosen_stages,
        ratio=None,
        num_stages=len(resnet_stages),
        chosen=chosen,
        reasons=reason,
        extra_sites=extra,
    )


def densenet_a(
    model: nn.Module,
    analysis: GraphAnalysis,
    *,
    arch: str,
    stages: Sequence[int] | None,
    ratio: float | None,
) -> ConversionPlan:
    """DenseNet IBN-a: ``norm1`` of dense layers 1, 4, 7, ... → IBN(0.4, BN first)."""
    layout = "densenet-a"
    dense_blocks = _dense_blocks(model)
    chosen_stages = _check_stages(stages or DEFAULT_STAGES[layout], len(dense_blocks), arch)
    ratio = DEFAULT_RATIO[layout] if ratio is None else ratio
    chosen: dict[str, ConversionSite] = {}
    stage_of_block = {}
    for number, block_name, layers in dense_blocks:
        stage_of_block[block_name] = number
        if number not in chosen_stages:
            continue
        for layer_number, layer_name in layers:
            if (layer_number - 1) % 3 != 0:
                continue
            name = f"{layer_name}.norm1"
            chosen[name] = _ibn_site(
                analysis.norm(name),
                model.get_submodule(name),
                ratio,
                "bn_first",
                "DenseNet IBN-a: norm1 of dense layers 1, 4, 7, ...",
                number,
            )

    def reason(norm: NormLayer) -> str:
        block = next((b for b in stage_of_block if norm.name.startswith(b + ".")), None)
        if block is None:
            return "outside the dense blocks (stem, transition or head)"
        if stage_of_block[block] not in chosen_stages:
            return f"dense block {stage_of_block[block]} not chosen"
        if norm.name.endswith(".norm2"):
            return "DenseNet IBN-a converts norm1 only"
        return "DenseNet IBN-a converts every third dense layer (1, 4, 7, ...)"

    return _build_plan(
        model,
        analysis,
        arch=arch,
        layout=layout,
        family=FAMILY_DENSENET,
        stages=chosen_stages,
        ratio=ratio,
        num_stages=len(dense_blocks),
        chosen=chosen,
        reasons=reason,
    )


def generic_a(
    model: nn.Module,
    analysis: GraphAnalysis,
    *,
    arch: str,
    stages: Sequence[int] | None,
    ratio: float | None,
) -> ConversionPlan:
    """Generic IBN-a for any BatchNorm CNN, driven by the graph rather than by names.

    The rule lives in :mod:`ibnify.generic`: the first safe main-branch BN of each residual
    block, the expansion BN of depthwise-separable blocks, the BN after each conv of plain
    stacks; never a shortcut BN, the last BN before an addition, or a BN whose channels are
    later split or shuffled. Default stages: 1-3, but never the last stage unless asked.

    Raises:
        NoBatchNormError: the model has no BatchNorm, or none in the chosen stages can take IN.
        InvalidOptionError: a chosen stage is out of range or holds no BatchNorm.
        TraceError: fx could not trace the model and the forward-hook walk's record was not
            enough to place IBN safely.
    """
    layout = "generic-a"
    require_batchnorm(model, arch)
    batchnorms = [n for n in analysis.norms if _is_batchnorm(model.get_submodule(n.name))]
    num_stages = analysis.num_stages
    # Default: stages 1-3 but never the deepest stage (IBN keeps BN in the deep layers).
    default = tuple(s for s in DEFAULT_STAGES[layout] if s < num_stages) or (1,)
    chosen_stages = _check_stages(stages or default, num_stages, arch)
    empty = [k for k in chosen_stages if not any(n.stage == k for n in batchnorms)]
    if empty and stages:
        with_bn = sorted({n.stage for n in batchnorms if n.stage > 0})
        raise InvalidOptionError(
            f"stage {_stages_text(empty)} of {arch} holds no BatchNorm; stages with BatchNorm: "
            f"{_stages_text(with_bn) or 'none'}"
        )
    ratio = DEFAULT_RATIO[layout] if ratio is None else ratio
    choice = choose(model, analysis, chosen_stages)
    chosen = {
        norm.name: _ibn_site(
            norm,
            model.get_submodule(norm.name),
            ratio,
            "in_first",
            choice.rules[norm.name],
            choice.stages[norm.name],
        )
        for norm in analysis.norms
        if norm.name in choice.rules
    }
    if not chosen:
        _raise_no_site(arch, analysis, chosen_stages, choice.reasons)
    return _build_plan(
        model,
        analysis,
        arch=arch,
        layout=layout,
        family=FAMILY_GENERIC,
        stages=chosen_stages,
        ratio=ratio,
        num_stages=num_stages,
        chosen=chosen,
        reasons=lambda norm: choice.reasons.get(norm.name, "not picked by the generic rule"),
    )


def _raise_no_site(
    arch: str, analysis: GraphAnalysis, stages: tuple[int, ...], reasons: dict[str, str]
) -> None:
    """One line that says why no BN in ``stages`` can take IN (the commonest reasons)."""
    counts: dict[str, int] = {}
    for norm in analysis.norms:
        if norm.stage in stages:
            reason = re.sub(r" \((?:block|at) [^)]*\)$", "", reasons.get(norm.name, "?"))
            counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        where = sorted({n.stage for n in analysis.norms if _is_batchnorm_kind(n.kind)})
        raise NoBatchNormError(
            f"{arch}: no BatchNorm in stages {_stages_text(stages)}; its BatchNorm layers are in "
            f"stage {_stages_text(where) or 'none'} (stage 0 is the stem, which IBN-a keeps)"
        )
    common = "; ".join(f"{n} × {r}" for r, n in sorted(counts.items(), key=lambda i: -i[1])[:3])
    message = f"{arch}: no BatchNorm in stages {_stages_text(stages)} can take IN safely" + (
        f" ({common})" if common else ""
    )
    if analysis.trace_error is not None:
        raise TraceError(
            f"{analysis.trace_error}; the forward-hook walk's record was not enough to place "
            f"IBN safely ({message})"
        )
    raise NoBatchNormError(message)


def _is_batchnorm_kind(kind: str) -> bool:
    return "BatchNorm" in kind


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


LayoutFn = Callable[..., ConversionPlan]
LAYOUTS: dict[str, LayoutFn] = {
    "resnet-a": resnet_a,
    "resnet-b": resnet_b,
    "densenet-a": densenet_a,
    "generic-a": generic_a,
}
_BY_FAMILY = {
    ("a", FAMILY_RESNET): "resnet-a",
    ("a", FAMILY_DENSENET): "densenet-a",
    ("a", FAMILY_GENERIC): "generic-a",
    ("b", FAMILY_RESNET): "resnet-b",
}


def resolve_layout(layout: str, family: str) -> str:
    """Map a user layout name (``a``, ``b`` or an explicit one) to a key of :data:`LAYOUTS`."""
    key = layout.strip().lower()
    if key in LAYOUTS:
        return key
    if key == "generic":
        return "generic-a"
    if (key, family) in _BY_FAMILY:
        return _BY_FAMILY[(key, family)]
    if key == "b":
        raise InvalidOptionError(
            f"layout b (IBN-b) is defined for the ResNet family only; this model is {family}. "
            "Use --layout a"
        )
    valid = ", ".join(["a", "b", *LAYOUTS])
    raise InvalidOptionError(f"unknown layout {layout!r}; choose one of: {valid}")


def make_plan(
    model: nn.Module,
    analysis: GraphAnalysis,
    *,
    layout: str = "a",
    stages: Sequence[int] | None = None,
    ratio: float | None = None,
    arch: str | None = None,
) -> ConversionPlan:
    """Pick the layout for the model's family and build its plan (touches nothing)."""
    family = detect_family(model)
    key = resolve_layout(layout, family)
    if ratio is not None:
        _check_ratio(ratio)
    return LAYOUTS[key](
        model, analysis, arch=arch or type(model).__name__, stages=stages, ratio=ratio
    )


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not (0.0 < ratio < 1.0):
        raise InvalidOptionError(
            f"ratio must be a number strictly between 0 and 1 (the IN fraction), got {ratio!r}"
        )
