"""The generic IBN-a rule: where IN can go in any BatchNorm CNN, read from its graph.

IBN-Net published hand-written ResNet and DenseNet layouts only. For every other network the rule
below is applied to the traced graph (or to a forward-hook walk's record of one forward pass).
Only BatchNorm2d layers in the chosen stages are candidates; stages come from the graph analysis
(output-stride rank, stem = stage 0).

Sites, each named by the rule that picked it:
- ``residual``: in each residual block (fork → add), the first main-branch BN that is safe.
- ``depthwise-separable``: outside residual blocks, the BN after a block's expansion (first
  pointwise) conv, i.e. a conv whose output, after its BN and activation, feeds a depthwise conv.
- ``plain``: in networks without residual blocks (VGG-BN, GoogLeNet, ShuffleNet), the BN after
  each conv — except BNs after a depthwise conv and the projection BN that follows it (the
  depthwise-separable rule speaks for those blocks).

Never converted, with the reason recorded in the plan:
- the stem, stages not chosen, norms that are not 2-D BatchNorm;
- a shortcut BN, and the last BN before a residual addition when its output reaches the addition
  through per-channel ops only (it sets the residual's scale). A block's last BN that a conv
  follows (pre-activation, FasterNet, MetaNeXt blocks) is an ordinary main-branch BN;
- a BN whose channels reach, through per-channel ops only, an addition, a channel split or slice
  that cuts through them (CSP's cross-stage split, ShuffleNet's chunk: the IN part and the BN part
  would take different paths), a reshape/transpose that moves channels (channel shuffle), or an op
  this module does not know (cautious default, logged as a warning).
A grouped conv after the BN is allowed: each group then sees IN channels, BN channels or both,
exactly as in the published ResNeXt-IBN-a, whose ``bn1`` feeds a 32-group conv. For the same
reason a split whose every piece goes straight into a conv (MixConv) is allowed.

Re-parameterisable branch sums (RepVGG, MobileOne) put every BN directly before an addition, so
they get no site; the layout then raises NoBatchNormError with the commonest reasons.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import fx, nn

from ..errors import NoBatchNormError, TraceError
from .graph import GraphAnalysis, NormLayer, Role, output_stride, stage_of_stride
from .ops import (
    BATCHNORM_KINDS,
    BN_LIKE_KINDS,
    CONV_KINDS,
    OpKind,
    concat_inputs,
    is_norm,
    norm_kind,
    reached,
    shape_of,
    target_name,
)
from .plans import stages_text
from .reasons import Reason, ReasonCode

__all__ = [
    "RULE_DEPTHWISE",
    "RULE_PLAIN",
    "RULE_RESIDUAL",
    "GenericChoice",
    "NormContext",
    "choose",
    "norm_contexts",
    "raise_no_site",
    "require_batchnorm",
]

logger = logging.getLogger(__name__)

RULE_RESIDUAL = "generic-a residual: first safe main-branch BN of the block"
RULE_DEPTHWISE = "generic-a depthwise-separable: BN after the expansion (first pointwise) conv"
RULE_PLAIN = "generic-a plain stack: BN after a conv"

Kinds = Mapping[fx.Node, OpKind]


@dataclass(frozen=True)
class NormContext:
    """What the generic rule needs to know about one norm's neighbourhood in the graph.

    ``producer`` is the kind of the op that computes the norm's input (through per-channel ops),
    ``projection`` is true when that op is a 1×1 conv fed by a depthwise conv, ``expansion`` is
    the output stride of the depthwise conv the norm's output reaches (None when it reaches
    none; a downsampling block's expansion BN runs one resolution above the block it belongs
    to), and ``hazard`` says why the norm's channels must not be split (None when they may).
    """

    producer: OpKind
    projection: bool
    expansion: int | None
    hazard: Reason | None

    @property
    def feeds_addition(self) -> bool:
        """True when the hazard is that the norm's output is an operand of an addition."""
        return self.hazard is not None and self.hazard.code == ReasonCode.FEEDS_ADDITION


_NO_CONTEXT = NormContext(OpKind.UNKNOWN, False, None, None)


def norm_contexts(analysis: GraphAnalysis) -> dict[str, NormContext]:
    """One :class:`NormContext` per norm of ``analysis`` (first call of each norm module)."""
    graph_module = analysis.graph_module
    contexts: dict[str, NormContext] = {}
    unknown: set[str] = set()
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or node.target in contexts:
            continue
        if not is_norm(graph_module.get_submodule(str(node.target))):
            continue
        context = _context(node, graph_module, analysis.ops, analysis.input_size[1])
        if context.hazard is not None and context.hazard.code == ReasonCode.UNKNOWN_OP:
            unknown.add(str(context.hazard.at))
        contexts[str(node.target)] = context
    if unknown:
        logger.warning(
            "generic IBN rule: ops of unknown kind %s follow some BatchNorms; those BNs are "
            "left unconverted (cautious default)",
            ", ".join(sorted(unknown)),
        )
    return contexts


def _context(node: fx.Node, graph_module: fx.GraphModule, kinds: Kinds, height: int) -> NormContext:
    """The :class:`NormContext` of the norm called by ``node``."""
    producer = _producer(node, kinds)
    producer_kind = kinds[producer] if producer is not None else OpKind.UNKNOWN
    projection = False
    if producer_kind == OpKind.CONV and _is_pointwise(producer, graph_module):
        before = _producer(producer, kinds)
        projection = before is not None and kinds[before] == OpKind.DEPTHWISE
    return NormContext(
        producer=producer_kind,
        projection=projection,
        expansion=_depthwise_stride(node, kinds, height),
        hazard=_hazard(node, kinds),
    )


def _is_pointwise(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    module = graph_module.get_submodule(str(node.target))
    return tuple(getattr(module, "kernel_size", ())) in ((1, 1), (1,))


def _main_input(node: fx.Node) -> fx.Node | None:
    """The input that carries ``node``'s channels: the first one with the output's shape."""
    inputs = node.all_input_nodes
    shape = shape_of(node)
    for candidate in inputs:
        if shape_of(candidate) == shape:
            return candidate
    return inputs[0] if inputs else None


def _producer(node: fx.Node, kinds: Kinds) -> fx.Node | None:
    """The nearest op before ``node`` (skipping per-channel ops) that is not per-channel."""
    current = _main_input(node)
    for _ in range(64):
        if current is None or kinds[current] != OpKind.PER_CHANNEL:
            return current
        current = _main_input(current)
    return None


def _depthwise_stride(node: fx.Node, kinds: Kinds, height: int) -> int | None:
    """Output stride of the depthwise conv ``node``'s output reaches through per-channel ops."""
    for user, kind in reached(list(node.users), kinds):
        stride = output_stride(user, height) if kind == OpKind.DEPTHWISE else None
        if stride is not None:
            return stride
    return None


# One step of the channel walk in _hazard: a reason to stop, or the (node, lo, hi) to follow.
_Step = Reason | list[tuple[fx.Node, int, int]]
_Follow = Callable[[fx.Node, fx.Node, int, int, Kinds], _Step]


def _hazard(start: fx.Node, kinds: Kinds) -> Reason | None:
    """Why ``start``'s channels must not be split into IN and BN parts, or None if they may.

    Follows the channel range [lo, hi) that holds the norm's output through per-channel ops,
    concatenations, slices and splits, until every path reaches an op that mixes channels
    (conv, linear) or a grouped conv. What each kind of op does is in :data:`_FOLLOW`.
    """
    shape = shape_of(start) or ()
    channels = shape[1] if len(shape) >= 2 else 0
    stack: list[tuple[fx.Node, int, int]] = [(start, 0, channels)]
    seen: set[tuple[fx.Node, int, int]] = set()
    while stack:
        node, lo, hi = stack.pop()
        if (node, lo, hi) in seen:
            continue
        seen.add((node, lo, hi))
        for user in node.users:
            step = _FOLLOW.get(kinds[user], _at_unknown)(user, node, lo, hi, kinds)
            if isinstance(step, Reason):
                return step
            stack.extend(step)
    return None


def _stop(user: fx.Node, node: fx.Node, lo: int, hi: int, kinds: Kinds) -> _Step:
    """Convs, linear layers and the output end the walk: they mix (or keep) all channels."""
    return []


def _through_per_channel(user: fx.Node, node: fx.Node, lo: int, hi: int, kinds: Kinds) -> _Step:
    out = shape_of(user)
    if out is not None and len(out) >= 2 and out[1] == _width(node):
        return [(user, lo, hi)]
    return []  # a reduction over channels mixes them: safe


def _at_addition(user: fx.Node, node: fx.Node, lo: int, hi: int, kinds: Kinds) -> _Step:
    return Reason(ReasonCode.FEEDS_ADDITION, at=user.name)


def _through_concat(user: fx.Node, node: fx.Node, lo: int, hi: int, kinds: Kinds) -> _Step:
    return [(user, lo + off, hi + off) for off in _concat_offsets(user, node)]


def _through_getitem(user: fx.Node, node: fx.Node, lo: int, hi: int, kinds: Kinds) -> _Step:
    kept = _slice(user, node)
    if kept is None:
        return Reason(ReasonCode.INDEXED, at=user.name)
    start, stop = kept
    if stop <= lo or start >= hi:
        return []
    if start > lo or stop < hi:
        return Reason(ReasonCode.SLICE_CUTS, at=user.name)
    return [(user, lo - start, hi - start)]


def _through_split(user: fx.Node, node: fx.Node, lo: int, hi: int, kinds: Kinds) -> _Step:
    pieces = _split_pieces(user, node)
    if pieces is None:
        return Reason(ReasonCode.SPLIT_UNKNOWN_DIM, at=user.name)
    if any(lo < begin < hi for begin, _ in pieces):
        if _every_piece_convolved(user, kinds):
            return []  # split → conv per piece → concat: a grouped conv (MixConv)
        return Reason(ReasonCode.SPLIT_PATHS, at=user.name)
    steps = []
    for item in user.users:
        index = item.args[1] if len(item.args) > 1 else None
        if isinstance(index, int) and index < len(pieces):
            begin, end = pieces[index]
            if begin <= lo and hi <= end:
                steps.append((item, lo - begin, hi - begin))
    return steps


def _through_reshape(user: fx.Node, node: fx.Node, lo: int, hi: int, kinds: Kinds) -> _Step:
    out, src = shape_of(user), shape_of(node)
    if out is not None and len(out) <= 2 and src is not None and len(src) >= 2:
        return []  # flattened for a linear head, which mixes everything
    if out is not None and src is not None and out[:2] == src[:2]:
        return [(user, lo, hi)]  # channels stay on dim 1 (e.g. flatten(2))
    return Reason(ReasonCode.RESHAPE, at=user.name)


def _at_shuffle(user: fx.Node, node: fx.Node, lo: int, hi: int, kinds: Kinds) -> _Step:
    return Reason(ReasonCode.SHUFFLE, at=user.name)


def _at_unknown(user: fx.Node, node: fx.Node, lo: int, hi: int, kinds: Kinds) -> _Step:
    return Reason(ReasonCode.UNKNOWN_OP, at=target_name(user))


_FOLLOW: dict[OpKind, _Follow] = {
    OpKind.CONV: _stop,
    OpKind.GROUPED: _stop,
    OpKind.DEPTHWISE: _stop,
    OpKind.LINEAR: _stop,
    OpKind.OUTPUT: _stop,
    OpKind.PER_CHANNEL: _through_per_channel,
    OpKind.ADD: _at_addition,
    OpKind.CONCAT: _through_concat,
    OpKind.GETITEM: _through_getitem,
    OpKind.SPLIT: _through_split,
    OpKind.RESHAPE: _through_reshape,
    OpKind.SHUFFLE: _at_shuffle,
}


def _every_piece_convolved(split: fx.Node, kinds: Kinds) -> bool:
    """True when every piece of ``split`` goes only into convs (through per-channel ops)."""
    for item in split.users:
        if not item.users:
            return False
        if any(kind not in CONV_KINDS for _, kind in reached(list(item.users), kinds)):
            return False
    return bool(split.users)


def _width(node: fx.Node) -> int | None:
    shape = shape_of(node)
    return shape[1] if shape is not None and len(shape) >= 2 else None


def _concat_offsets(cat: fx.Node, source: fx.Node) -> Iterator[int]:
    offset = 0
    for tensor in concat_inputs(cat):
        if tensor is source:
            yield offset
        offset += _width(tensor) or 0 if isinstance(tensor, fx.Node) else 0


def _slice(item: fx.Node, source: fx.Node) -> tuple[int, int] | None:
    """The channel range [start, stop) kept by ``source[index]``; None when not a plain slice."""
    width = _width(source) or 0
    index = item.args[1] if len(item.args) > 1 else None
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis or i is None for i in index):
        return None
    if len(index) < 2 or index[1] == slice(None):
        return (0, width) if isinstance(index[0], slice | int) else None
    channel = index[1]
    if not isinstance(channel, slice) or channel.step not in (None, 1):
        return None
    if not all(v is None or isinstance(v, int) for v in (channel.start, channel.stop)):
        return None
    start, stop, _ = channel.indices(width)
    return start, stop


def _split_pieces(split: fx.Node, source: fx.Node) -> list[tuple[int, int]] | None:
    """Channel ranges of the pieces of a split/chunk along dim 1; None for another dim."""
    width = _width(source) or 0
    name = target_name(split)
    args = list(split.args[1:])
    size_arg = args[0] if args else split.kwargs.get("chunks", split.kwargs.get("split_size"))
    size_arg = split.kwargs.get("split_size_or_sections", size_arg)
    dim = args[1] if len(args) > 1 else split.kwargs.get("dim", 0)
    if name == "unbind":
        dim = args[0] if args else split.kwargs.get("dim", 0)
        if dim in (1, -3):
            return [(c, c + 1) for c in range(width)]
        return [(0, width)] * max(1, len(split.users))
    if dim not in (1, -3):
        return [(0, width)] * max(1, len(split.users)) if dim in (0,) else None
    if name == "chunk" and isinstance(size_arg, int):
        step = -(-width // size_arg)
        sizes = [step] * (width // step) + ([width % step] if width % step else [])
    elif isinstance(size_arg, int):
        sizes = [size_arg] * (width // size_arg) + ([width % size_arg] if width % size_arg else [])
    elif isinstance(size_arg, list | tuple) and all(isinstance(s, int) for s in size_arg):
        sizes = list(size_arg)
    else:
        return None
    pieces, begin = [], 0
    for size in sizes:
        pieces.append((begin, begin + size))
        begin += size
    return pieces


def require_batchnorm(model: nn.Module, arch: str) -> None:
    """Raise NoBatchNormError (naming the norms the model does use) when it has no BatchNorm."""
    others: dict[str, None] = {}
    for module in model.modules():
        if norm_kind(module) in BN_LIKE_KINDS:
            return
        kind = type(module).__name__
        if "Norm" in kind and not any(True for _ in module.children()):
            others.setdefault(kind, None)
    uses = f"its norms: {', '.join(others)}" if others else "it has no normalization layers"
    raise NoBatchNormError(
        f"{arch} has no BatchNorm layer ({uses}); IBN splits BatchNorm layers, so there is "
        "nothing to convert"
    )


@dataclass(frozen=True)
class GenericChoice:
    """The generic rule's answer: chosen norms with their rule and stage, a reason for the rest."""

    rules: dict[str, str]
    stages: dict[str, int]
    reasons: dict[str, Reason]


def choose(model: nn.Module, analysis: GraphAnalysis, stages: Sequence[int]) -> GenericChoice:
    """Apply the generic IBN-a rule (module docstring) to ``analysis`` for ``stages``."""
    contexts = norm_contexts(analysis)
    residual_net = bool(analysis.blocks)
    choice = GenericChoice(rules={}, stages={}, reasons={})
    taken_blocks: set[str] = set()
    for norm in analysis.norms:
        ctx = contexts.get(norm.name, _NO_CONTEXT)
        stage = norm.stage
        if norm.role == Role.OUTSIDE and ctx.expansion is not None and analysis.stage_strides:
            stage = stage_of_stride(ctx.expansion, analysis.stage_strides)
        module = model.get_submodule(norm.name)
        reason = _skip_reason(norm, norm_kind(module) in BN_LIKE_KINDS, ctx, stage, stages)
        rule = None
        if reason is None:
            rule, reason = _site_rule(norm, ctx, residual_net, taken_blocks)
        if rule is not None:
            choice.rules[norm.name] = rule
            choice.stages[norm.name] = stage
        else:
            choice.reasons[norm.name] = reason or Reason(ReasonCode.NOT_PICKED)
    return choice


def _skip_reason(
    norm: NormLayer, batchnorm: bool, ctx: NormContext, stage: int, stages: Sequence[int]
) -> Reason | None:
    """Why ``norm`` can take no IN at all, checked in order; None when it may."""
    if not batchnorm or len(norm.output_shape) != 4:
        return Reason(ReasonCode.NOT_2D_BATCHNORM, value=norm.kind)
    if stage == 0:
        return Reason(ReasonCode.STEM)
    if stage not in stages:
        return Reason(ReasonCode.STAGE_NOT_CHOSEN, value=stage)
    if norm.channels < 2:
        return Reason(ReasonCode.TOO_FEW_CHANNELS)
    if norm.output_shape[2] * norm.output_shape[3] == 1:
        return Reason(ReasonCode.POOLED)
    if norm.role == Role.SHORTCUT:
        return Reason(ReasonCode.SHORTCUT, at=norm.block)
    if norm.role == Role.PRE_ADD and ctx.feeds_addition:
        return Reason(ReasonCode.SETS_RESIDUAL_SCALE, at=norm.block)
    return ctx.hazard


def _site_rule(
    norm: NormLayer, ctx: NormContext, residual_net: bool, taken_blocks: set[str]
) -> tuple[str | None, Reason | None]:
    """The rule that converts a norm that may take IN, or why none does."""
    if norm.role in (Role.MAIN, Role.PRE_ADD):  # a conv follows a last BN: it is safe
        if norm.block in taken_blocks:
            return None, Reason(ReasonCode.NOT_FIRST_IN_BLOCK, at=norm.block)
        taken_blocks.add(str(norm.block))
        return RULE_RESIDUAL, None
    if norm.role == Role.OUTSIDE:
        return _outside_rule(ctx, residual_net)
    return None, Reason(ReasonCode.UNKNOWN_ROLE, value=norm.role)  # pragma: no cover


def _outside_rule(ctx: NormContext, residual_net: bool) -> tuple[str | None, Reason | None]:
    """Rule for a BN outside every residual block: depthwise-separable, then plain stacks."""
    if ctx.producer not in CONV_KINDS:
        return None, Reason(ReasonCode.NOT_FED_BY_CONV)
    if ctx.producer == OpKind.DEPTHWISE:
        return None, Reason(ReasonCode.AFTER_DEPTHWISE)
    if ctx.expansion is not None:  # also a DS block's pointwise conv feeding the next dw conv
        return RULE_DEPTHWISE, None
    if ctx.projection:
        return None, Reason(ReasonCode.PROJECTION)
    if residual_net:
        return None, Reason(ReasonCode.OUTSIDE_BLOCKS)
    return RULE_PLAIN, None


def raise_no_site(
    arch: str, analysis: GraphAnalysis, stages: Sequence[int], reasons: dict[str, Reason]
) -> None:
    """Raise one line that says why no BN in ``stages`` can take IN (the commonest reasons).

    Raises:
        NoBatchNormError: always; TraceError instead when the analysis is a hook walk's record.
    """
    counts: dict[str, int] = {}
    for norm in analysis.norms:
        if norm.stage in stages:
            summary = reasons[norm.name].summary if norm.name in reasons else "?"
            counts[summary] = counts.get(summary, 0) + 1
    if not counts:
        where = sorted({n.stage for n in analysis.norms if n.norm_kind in BATCHNORM_KINDS})
        raise NoBatchNormError(
            f"{arch}: no BatchNorm in stages {stages_text(stages)}; its BatchNorm layers are in "
            f"stage {stages_text(where) or 'none'} (stage 0 is the stem, which IBN-a keeps)"
        )
    common = "; ".join(f"{n} × {r}" for r, n in sorted(counts.items(), key=lambda i: -i[1])[:3])
    message = f"{arch}: no BatchNorm in stages {stages_text(stages)} can take IN safely" + (
        f" ({common})" if common else ""
    )
    if analysis.trace_error is not None:
        raise TraceError(
            f"{analysis.trace_error}; the forward-hook walk's record was not enough to place "
            f"IBN safely ({message})"
        )
    raise NoBatchNormError(message)
