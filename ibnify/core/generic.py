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
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import NoBatchNormError
from .graph import ROLE_MAIN, ROLE_OUTSIDE, ROLE_PRE_ADD, ROLE_SHORTCUT, GraphAnalysis, is_norm
from .layers import IBN

__all__ = [
    "RULE_DEPTHWISE",
    "RULE_PLAIN",
    "RULE_RESIDUAL",
    "GenericChoice",
    "NormContext",
    "choose",
    "norm_contexts",
    "op_kind",
    "require_batchnorm",
]

logger = logging.getLogger(__name__)

RULE_RESIDUAL = "generic-a residual: first safe main-branch BN of the block"
RULE_DEPTHWISE = "generic-a depthwise-separable: BN after the expansion (first pointwise) conv"
RULE_PLAIN = "generic-a plain stack: BN after a conv"

# Op kinds: every graph node is one of these, decided in op_kind() only.
CONV = "conv"  # groups == 1: mixes all channels
GROUPED = "grouped"  # 1 < groups < in_channels
DEPTHWISE = "depthwise"  # groups == in_channels
LINEAR = "linear"  # mixes all channels
PER_CHANNEL = "per_channel"  # activations, norms, pools, dropout, scaling: channel i stays i
ADD = "add"  # residual or branch addition of two same-shape tensors
CONCAT = "concat"  # torch.cat along channels
SPLIT = "split"  # chunk / split / tensor_split / unbind
GETITEM = "getitem"  # indexing or slicing
RESHAPE = "reshape"  # view / reshape / flatten / permute / transpose / ...
SHUFFLE = "shuffle"  # channel / pixel shuffle
OUTPUT = "output"
UNKNOWN = "unknown"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_PER_CHANNEL_NAMES = _words(
    """relu relu_ relu6 leaky_relu leaky_relu_ elu elu_ selu celu gelu silu silu_ mish
    hardswish hardswish_ hardsigmoid hardsigmoid_ hardtanh hardtanh_ sigmoid sigmoid_ tanh
    tanh_ softplus swish hard_swish hard_sigmoid hard_mish gelu_tanh quick_gelu
    dropout dropout_ dropout2d drop_path drop_block_2d drop_block_fast_2d
    adaptive_avg_pool2d adaptive_max_pool2d avg_pool2d max_pool2d lp_pool2d interpolate
    upsample pad mul mul_ truediv div div_ sub sub_ rsub neg abs exp pow sqrt rsqrt
    clamp clamp_ clamp_min clamp_max contiguous to float half type_as detach clone
    mean sum amax max min logsumexp batch_norm instance_norm stochastic_depth"""
)
_SPLIT_NAMES = _words("chunk split tensor_split unbind split_with_sizes")
_RESHAPE_NAMES = _words(
    "view reshape flatten unflatten permute transpose squeeze unsqueeze expand movedim swapaxes "
    "view_as reshape_as"
)
_SHUFFLE_NAMES = frozenset({"channel_shuffle", "pixel_shuffle", "pixel_unshuffle"})
_PER_CHANNEL_MODULE_HOMES = (
    "torch.nn.modules.activation",
    "torch.nn.modules.dropout",
    "torch.nn.modules.pooling",
    "torch.nn.modules.padding",
    "torch.nn.modules.upsampling",
    "timm.layers.activations",
    "timm.layers.activations_me",
    "timm.layers.drop",
    "timm.layers.pool2d_same",
    "timm.layers.blur_pool",
    "timm.layers.create_act",
    "torchvision.ops.stochastic_depth",
)


def _shape(node: object) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(int(v) for v in shape) if shape is not None else None


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return str(getattr(node.target, "__name__", node.target))


def op_kind(node: fx.Node, graph_module: fx.GraphModule) -> str:
    """The kind of ``node`` (one of the constants above); unknown ops get ``UNKNOWN``."""
    if node.op == "output":
        return OUTPUT
    if node.op in ("placeholder", "get_attr"):
        return UNKNOWN
    if node.op == "call_module":
        module = graph_module.get_submodule(str(node.target))
        if isinstance(module, nn.Conv2d | nn.Conv1d | nn.Conv3d):
            if module.groups == 1:
                return CONV
            return DEPTHWISE if module.groups == module.in_channels else GROUPED
        if isinstance(module, nn.Linear):
            return LINEAR
        if is_norm(module) or isinstance(module, nn.Identity | nn.GroupNorm | nn.LayerNorm):
            return PER_CHANNEL
        if isinstance(module, nn.Sequential) and len(module) == 0:
            return PER_CHANNEL  # an empty Sequential is an identity (seen by the hook walk)
        if isinstance(module, nn.Flatten):
            return RESHAPE
        if isinstance(module, nn.ChannelShuffle | nn.PixelShuffle | nn.PixelUnshuffle):
            return SHUFFLE
        if type(module).__module__.startswith(_PER_CHANNEL_MODULE_HOMES):
            return PER_CHANNEL
        return UNKNOWN
    name = _target_name(node)
    if node.op == "call_function" and node.target is operator.getitem:
        return GETITEM
    if node.target in (operator.add, operator.iadd, torch.add) or name in ("add", "add_", "iadd"):
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        same = len(tensors) == 2 and _shape(tensors[0]) == _shape(tensors[1])
        return ADD if same else PER_CHANNEL
    if node.target is torch.cat or name in ("cat", "concat", "concatenate"):
        return CONCAT
    if name in _SPLIT_NAMES:
        return SPLIT
    if name in _SHUFFLE_NAMES:
        return SHUFFLE
    if name in _RESHAPE_NAMES:
        return RESHAPE
    if name in _PER_CHANNEL_NAMES or name in ("size", "dim", "getattr"):  # shape queries too
        return PER_CHANNEL
    if name in ("conv2d", "linear"):
        return CONV
    return UNKNOWN


@dataclass(frozen=True)
class NormContext:
    """What the generic rule needs to know about one norm's neighbourhood in the graph.

    ``producer`` is the kind of the op that computes the norm's input (through per-channel ops),
    ``projection`` is true when that op is a 1×1 conv fed by a depthwise conv, ``expansion`` is
    the output stride of the depthwise conv the norm's output reaches (None when it reaches
    none; a downsampling block's expansion BN runs one resolution above the block it belongs
    to), ``hazard`` says why the norm's channels must not be split (None when they may), and
    ``feeds_addition`` is true when that is because its output is an operand of an addition.
    """

    producer: str
    projection: bool
    expansion: int | None
    hazard: str | None
    feeds_addition: bool = False


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
        producer = _producer(node, graph_module)
        producer_kind = op_kind(producer, graph_module) if producer is not None else UNKNOWN
        projection = False
        if producer is not None and producer_kind == CONV and _is_pointwise(producer, graph_module):
            before = _producer(producer, graph_module)
            projection = before is not None and op_kind(before, graph_module) == DEPTHWISE
        hazard = _hazard(node, graph_module)
        if hazard is not None and "does not know" in hazard:
            unknown.add(hazard.rsplit("(at ", 1)[-1].rstrip(")"))
        contexts[str(node.target)] = NormContext(
            producer=producer_kind,
            projection=projection,
            expansion=_depthwise_stride(node, graph_module, analysis.input_size[1]),
            hazard=hazard,
            feeds_addition=hazard is not None and hazard.startswith(_FEEDS_ADDITION),
        )
    if unknown:
        logger.warning(
            "generic IBN rule: ops of unknown kind %s follow some BatchNorms; those BNs are "
            "left unconverted (cautious default)",
            ", ".join(sorted(unknown)),
        )
    return contexts


def _is_pointwise(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    module = graph_module.get_submodule(str(node.target))
    return tuple(getattr(module, "kernel_size", ())) in ((1, 1), (1,))


def _main_input(node: fx.Node) -> fx.Node | None:
    """The input that carries ``node``'s channels: the first one with the output's shape."""
    inputs = node.all_input_nodes
    shape = _shape(node)
    for candidate in inputs:
        if _shape(candidate) == shape:
            return candidate
    return inputs[0] if inputs else None


def _producer(node: fx.Node, graph_module: fx.GraphModule) -> fx.Node | None:
    """The nearest op before ``node`` (skipping per-channel ops) that is not per-channel."""
    current = _main_input(node)
    for _ in range(64):
        if current is None or op_kind(current, graph_module) != PER_CHANNEL:
            return current
        current = _main_input(current)
    return None


def _depthwise_stride(node: fx.Node, graph_module: fx.GraphModule, height: int) -> int | None:
    """Output stride of the depthwise conv ``node``'s output reaches through per-channel ops."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        kind = op_kind(user, graph_module)
        shape = _shape(user)
        if kind == DEPTHWISE and shape is not None and len(shape) == 4 and shape[2]:
            return max(1, round(height / shape[2]))
        if kind == PER_CHANNEL:
            stack.extend(user.users)
    return None


_FEEDS_ADDITION = "its output feeds an addition directly"


def _hazard(start: fx.Node, graph_module: fx.GraphModule) -> str | None:
    """Why ``start``'s channels must not be split into IN and BN parts, or None if they may.

    Follows the channel range [lo, hi) that holds the norm's output through per-channel ops,
    concatenations, slices and splits, until every path reaches an op that mixes channels
    (conv, linear) or a grouped conv.
    """
    channels = (_shape(start) or (0, 0))[1] if len(_shape(start) or ()) >= 2 else 0
    stack: list[tuple[fx.Node, int, int]] = [(start, 0, channels)]
    seen: set[tuple[fx.Node, int, int]] = set()
    while stack:
        node, lo, hi = stack.pop()
        if (node, lo, hi) in seen:
            continue
        seen.add((node, lo, hi))
        for user in node.users:
            kind = op_kind(user, graph_module)
            if kind in (CONV, GROUPED, DEPTHWISE, LINEAR, OUTPUT):
                continue
            name = _target_name(user)
            if kind == PER_CHANNEL:
                out = _shape(user)
                if out is not None and len(out) >= 2 and out[1] == _width(node):
                    stack.append((user, lo, hi))
                continue  # a reduction over channels mixes them: safe
            if kind == ADD:
                return f"{_FEEDS_ADDITION} (at {user.name})"
            if kind == CONCAT:
                stack.extend((user, lo + off, hi + off) for off in _concat_offsets(user, node))
                continue
            if kind == GETITEM:
                kept = _slice(user, node)
                if kept is None:
                    return f"its channels are indexed in a way ibnify cannot follow ({user.name})"
                start_, stop = kept
                if stop <= lo or start_ >= hi:
                    continue
                if start_ > lo or stop < hi:
                    return f"a channel slice cuts through its IN and BN parts (at {user.name})"
                stack.append((user, lo - start_, hi - start_))
                continue
            if kind == SPLIT:
                pieces = _split_pieces(user, node)
                if pieces is None:
                    return f"its channels are split along an unknown dim (at {user.name})"
                if any(lo < begin < hi for begin, _ in pieces):
                    if _every_piece_convolved(user, graph_module):
                        continue  # split → conv per piece → concat: a grouped conv (MixConv)
                    return (
                        "a channel split would send its IN and BN parts down different paths "
                        f"(at {user.name})"
                    )
                for item in user.users:
                    index = item.args[1] if len(item.args) > 1 else None
                    if isinstance(index, int) and index < len(pieces):
                        begin, end = pieces[index]
                        if begin <= lo and hi <= end:
                            stack.append((item, lo - begin, hi - begin))
                continue
            if kind == RESHAPE:
                out, src = _shape(user), _shape(node)
                if out is not None and len(out) <= 2 and src is not None and len(src) >= 2:
                    continue  # flattened for a linear head, which mixes everything
                if out is not None and src is not None and out[:2] == src[:2]:
                    stack.append((user, lo, hi))  # channels stay on dim 1 (e.g. flatten(2))
                    continue
                return (
                    "a reshape/transpose moves its channels (channel shuffle or layout change), "
                    f"ibnify does not follow them (at {user.name})"
                )
            if kind == SHUFFLE:
                return f"a channel shuffle interleaves its channels (at {user.name})"
            return f"its output reaches an op ibnify does not know, cautious default (at {name})"
    return None


def _every_piece_convolved(split: fx.Node, graph_module: fx.GraphModule) -> bool:
    """True when every piece of ``split`` goes only into convs (through per-channel ops)."""
    for item in split.users:
        stack, seen = list(item.users), set()
        if not stack:
            return False
        while stack:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            kind = op_kind(user, graph_module)
            if kind == PER_CHANNEL:
                stack.extend(user.users)
            elif kind not in (CONV, GROUPED, DEPTHWISE):
                return False
    return bool(split.users)


def _width(node: fx.Node) -> int | None:
    shape = _shape(node)
    return shape[1] if shape is not None and len(shape) >= 2 else None


def _concat_offsets(cat: fx.Node, source: fx.Node) -> Iterator[int]:
    inputs = cat.args[0] if cat.args else cat.kwargs.get("tensors", ())
    offset = 0
    for tensor in inputs:
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
    name = _target_name(split)
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
        if isinstance(module, nn.modules.batchnorm._BatchNorm | IBN):
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
    reasons: dict[str, str]


def _stage_of_stride(stride: int, stage_strides: tuple[int, ...]) -> int:
    """The stage working at ``stride``: the deepest stage whose stride is not above it."""
    return max((rank + 1 for rank, s in enumerate(stage_strides) if stride >= s), default=0)


def choose(model: nn.Module, analysis: GraphAnalysis, stages: tuple[int, ...]) -> GenericChoice:
    """Apply the generic IBN-a rule (module docstring) to ``analysis`` for ``stages``."""
    contexts = norm_contexts(analysis)
    residual_net = bool(analysis.blocks)
    rules: dict[str, str] = {}
    reasons: dict[str, str] = {}
    chosen_stage: dict[str, int] = {}
    taken_blocks: set[str] = set()
    for norm in analysis.norms:
        module = model.get_submodule(norm.name)
        ctx = contexts.get(norm.name, NormContext(UNKNOWN, False, None, None))
        stage = norm.stage
        if norm.role == ROLE_OUTSIDE and ctx.expansion is not None and analysis.stage_strides:
            stage = _stage_of_stride(ctx.expansion, analysis.stage_strides)
        candidate = isinstance(module, nn.modules.batchnorm._BatchNorm | IBN)
        if not candidate or len(norm.output_shape) != 4:
            reasons[norm.name] = f"not a 2-D BatchNorm ({norm.kind})"
        elif stage == 0:
            reasons[norm.name] = "stem (IBN-a keeps the stem BN)"
        elif stage not in stages:
            reasons[norm.name] = f"stage {stage} not chosen"
        elif norm.channels < 2:
            reasons[norm.name] = "fewer than 2 channels: nothing to split"
        elif norm.output_shape[2] * norm.output_shape[3] == 1:
            reasons[norm.name] = "runs on pooled 1×1 features (attention/SE branch): IN needs H×W"
        elif norm.role == ROLE_SHORTCUT:
            reasons[norm.name] = f"shortcut BN (block {norm.block})"
        elif norm.role == ROLE_PRE_ADD and ctx.feeds_addition:
            reasons[norm.name] = (
                f"last BN before the residual addition, sets its scale (block {norm.block})"
            )
        elif ctx.hazard is not None:
            reasons[norm.name] = ctx.hazard
        elif norm.role in (ROLE_MAIN, ROLE_PRE_ADD):  # a conv follows a last BN: it is safe
            if norm.block in taken_blocks:
                reasons[norm.name] = (
                    "not the first safe main-branch BN, IBN-a converts one BN per block "
                    f"(block {norm.block})"
                )
            else:
                taken_blocks.add(str(norm.block))
                rules[norm.name] = RULE_RESIDUAL
                chosen_stage[norm.name] = stage
        elif norm.role == ROLE_OUTSIDE:
            rule, reason = _outside_rule(ctx, residual_net)
            if rule is not None:
                rules[norm.name] = rule
                chosen_stage[norm.name] = stage
            else:
                reasons[norm.name] = reason
        else:  # pragma: no cover - every role is handled above
            reasons[norm.name] = f"role {norm.role!r} unknown to the generic rule"
    return GenericChoice(rules=rules, stages=chosen_stage, reasons=reasons)


def _outside_rule(ctx: NormContext, residual_net: bool) -> tuple[str | None, str]:
    """Rule for a BN outside every residual block: depthwise-separable, then plain stacks."""
    if ctx.producer not in (CONV, GROUPED, DEPTHWISE):
        return None, "not fed by a convolution (pre-activation, head or unknown input)"
    if ctx.producer == DEPTHWISE:
        return None, (
            "after a depthwise conv (the depthwise-separable rule converts the BN after the "
            "block's expansion conv)"
        )
    if ctx.expansion is not None:  # also a DS block's pointwise conv feeding the next dw conv
        return RULE_DEPTHWISE, ""
    if ctx.projection:
        return None, "projection BN of a depthwise-separable block (after the depthwise conv)"
    if residual_net:
        return None, "outside the residual blocks (transition or aggregation layer)"
    return RULE_PLAIN, ""
