"""The one op vocabulary: what a graph node or a norm module is, decided here and nowhere else.

In the manner of Torch-Pruning's ``ops.py``: every fact the converter reads off a graph (is this
node an addition, a channel concatenation, a split, a per-channel op, a conv of which kind; is
this module a BatchNorm ibnify can convert) is decided by the functions below. The graph analysis
classifies each node once (:func:`classify`) and keeps the table, so the generic rule, the
forward-hook walk and the surgery cannot disagree about, say, whether ``out.add_(identity)`` is
a residual addition. The norm predicates (:func:`is_batchnorm_like`, :func:`is_frozen_batchnorm`,
:func:`is_instance_norm`, :func:`has_batchnorm`) are defined here and nowhere else.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Any, TypeVar

import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d
from torch import fx, nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = [
    "ADD_FUNCTIONS",
    "ADD_METHODS",
    "BATCHNORM_KINDS",
    "BN_LIKE_KINDS",
    "CONV_KINDS",
    "FROZEN_KINDS",
    "GRAPH_NORM_KINDS",
    "NormKind",
    "OpKind",
    "classify",
    "concat_inputs",
    "has_batchnorm",
    "is_add_call",
    "is_add_function",
    "is_batchnorm_like",
    "is_channel_concat",
    "is_frozen_batchnorm",
    "is_in_place",
    "is_instance_norm",
    "is_norm",
    "norm_kind",
    "op_kind",
    "reached",
    "register_norm_kind",
    "shape_of",
    "target_name",
]


class OpKind(StrEnum):
    """What a graph node does to the channels of its input."""

    CONV = "conv"  # groups == 1: mixes all channels
    GROUPED = "grouped"  # 1 < groups < in_channels
    DEPTHWISE = "depthwise"  # groups == in_channels
    LINEAR = "linear"  # mixes all channels
    PER_CHANNEL = "per_channel"  # activations, norms, pools, dropout, scaling: channel i stays i
    ADD = "add"  # residual or branch addition of two same-shape tensors
    CONCAT = "concat"  # torch.cat (along any dim; see is_channel_concat)
    SPLIT = "split"  # chunk / split / tensor_split / unbind
    GETITEM = "getitem"  # indexing or slicing
    RESHAPE = "reshape"  # view / reshape / flatten / permute / transpose / ...
    SHUFFLE = "shuffle"  # channel / pixel shuffle
    OUTPUT = "output"
    UNKNOWN = "unknown"


CONV_KINDS = frozenset({OpKind.CONV, OpKind.GROUPED, OpKind.DEPTHWISE})


class NormKind(StrEnum):
    """What a normalization module is, as far as converting it goes."""

    BATCHNORM = "batchnorm"  # nn.BatchNorm2d, nn.SyncBatchNorm: forward known
    BATCHNORM_ACT = "batchnorm_act"  # timm BatchNormAct2d (carries act and drop)
    IBN = "ibn"  # already converted
    INSTANCENORM = "instancenorm"  # nn.InstanceNorm2d (e.g. an IBN-b stem)
    # Frozen BN (detection backbones): statistics and affine are buffers, forward x*scale+shift.
    FROZEN_BATCHNORM = "frozen_batchnorm"  # torchvision.ops, or detectron2-style (duck typed)
    FROZEN_BATCHNORM_ACT = "frozen_batchnorm_act"  # timm FrozenBatchNormAct2d
    UNKNOWN_BATCHNORM = "unknown_batchnorm"  # a _BatchNorm subclass whose forward is unknown


# torch's _BatchNorm family (what IBN splits), and the same with already converted IBN layers.
BATCHNORM_KINDS = frozenset(
    {
        NormKind.BATCHNORM,
        NormKind.BATCHNORM_ACT,
        NormKind.FROZEN_BATCHNORM,
        NormKind.FROZEN_BATCHNORM_ACT,
        NormKind.UNKNOWN_BATCHNORM,
    }
)
# Kinds whose parameters are buffers: an IBN made from one adds the IN half's affine parameters.
FROZEN_KINDS = frozenset({NormKind.FROZEN_BATCHNORM, NormKind.FROZEN_BATCHNORM_ACT})
BN_LIKE_KINDS = BATCHNORM_KINDS | {NormKind.IBN}
# Norms the analysis keeps as graph leaves and records.
GRAPH_NORM_KINDS = BN_LIKE_KINDS | {NormKind.INSTANCENORM}


# Classes that declared their kind where they are defined (IBN in core/layers.py): the vocabulary
# does not import the layers, so the layers can ask it what a norm is.
_REGISTERED: dict[type, NormKind] = {}
_Class = TypeVar("_Class", bound=type)


def register_norm_kind(kind: NormKind) -> Callable[[_Class], _Class]:
    """Class decorator: instances of the class (and its subclasses) are norms of ``kind``."""

    def register(cls: _Class) -> _Class:
        _REGISTERED[cls] = kind
        return cls

    return register


def norm_kind(module: object) -> NormKind | None:
    """The :class:`NormKind` of ``module``; None for modules that are not normalization layers.

    Only ``nn.BatchNorm2d``/``nn.SyncBatchNorm`` and timm's ``BatchNormAct2d`` with its own
    forward are known well enough to replace; any other ``_BatchNorm`` subclass is
    ``UNKNOWN_BATCHNORM`` (refused by the surgery, as its forward may do more than normalise).
    """
    for cls, kind in _REGISTERED.items():
        if isinstance(module, cls):
            return kind
    if isinstance(module, nn.InstanceNorm2d):
        return NormKind.INSTANCENORM
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return NormKind.BATCHNORM
    if isinstance(module, BatchNormAct2d) and type(module).forward is BatchNormAct2d.forward:
        return NormKind.BATCHNORM_ACT
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return NormKind.UNKNOWN_BATCHNORM
    if isinstance(module, FrozenBatchNorm2d):
        return NormKind.FROZEN_BATCHNORM
    if isinstance(module, FrozenBatchNormAct2d):
        return NormKind.FROZEN_BATCHNORM_ACT
    if isinstance(module, nn.Module) and _behaves_as_frozen_batchnorm(module):
        return NormKind.FROZEN_BATCHNORM
    return None


_FROZEN_BUFFERS = ("bias", "running_mean", "running_var", "weight")


def _behaves_as_frozen_batchnorm(module: nn.Module) -> bool:
    """A frozen BN of another library (detectron2's): found by its buffers, proven by its forward.

    It must hold exactly the four 1-D buffers of equal length and no parameters or children,
    and compute ``x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))`` on a probe input;
    a module that only looks like one (its forward may do more) is not treated as a norm.
    """
    buffers = dict(module.named_buffers(recurse=False))
    if sorted(buffers) != list(_FROZEN_BUFFERS) or any(True for _ in module.parameters()):
        return False
    if any(True for _ in module.children()) or not isinstance(getattr(module, "eps", None), float):
        return False
    sizes = {tuple(b.shape) for b in buffers.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        return False
    channels = next(iter(sizes))[0]
    reference = buffers["weight"]
    probe = torch.randn(
        2, channels, 3, 3, generator=torch.Generator().manual_seed(0), dtype=reference.dtype
    ).to(reference.device)
    scale = buffers["weight"] * (buffers["running_var"] + module.eps).rsqrt()
    shift = buffers["bias"] - buffers["running_mean"] * scale
    expected = probe * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    try:
        with torch.no_grad():
            output = module(probe)
    except Exception:  # its forward is not a per-channel affine on NCHW input
        return False
    return (
        isinstance(output, torch.Tensor)
        and output.shape == expected.shape
        and torch.allclose(output, expected, rtol=1e-4, atol=1e-5)
    )


def is_norm(module: object) -> bool:
    """True for the modules the analysis treats as normalization leaves (BN, IN, IBN)."""
    return norm_kind(module) in GRAPH_NORM_KINDS


def is_batchnorm_like(module: object) -> bool:
    """A BatchNorm of any kind (plain, sync, norm+act, frozen, unknown) or an IBN that replaced
    one: what a layout counts as a BN position."""
    return norm_kind(module) in BN_LIKE_KINDS


def is_frozen_batchnorm(module: object) -> bool:
    """A BN whose statistics and affine are buffers (``x * scale + shift`` only): torchvision's
    ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``, detectron2-style duck types."""
    return norm_kind(module) in FROZEN_KINDS


def is_instance_norm(module: object) -> bool:
    """Any torch InstanceNorm (1-D, 2-D, 3-D; an IBN's IN half, an IBN-b stem): its affine is
    what ``decay_in_affine`` of the fine-tuning config governs."""
    return isinstance(module, nn.modules.instancenorm._InstanceNorm)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is a BatchNorm of any kind, frozen ones included."""
    return any(norm_kind(module) in BATCHNORM_KINDS for module in model.modules())


# Every spelling of an addition: fx gives operator.add (also for ``+=``), torch.add or the
# ``add``/``add_`` methods; the forward-hook walk sees torch's functions and Tensor methods.
ADD_FUNCTIONS: frozenset[Any] = frozenset(
    {
        operator.add,
        operator.iadd,
        torch.add,
        torch.Tensor.add,
        torch.Tensor.add_,
        torch.Tensor.__add__,
        torch.Tensor.__iadd__,
        torch.Tensor.__radd__,
    }
)
ADD_METHODS = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})
_ADD_NAMES = ADD_METHODS | {"iadd"}
_CONCAT_NAMES = frozenset({"cat", "concat", "concatenate"})


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
    mean sum amax max min logsumexp batch_norm instance_norm stochastic_depth
    size dim getattr"""
)  # the last line: shape queries
_SPLIT_NAMES = _words("chunk split tensor_split unbind split_with_sizes")
_RESHAPE_NAMES = _words(
    "view reshape flatten unflatten permute transpose squeeze unsqueeze expand movedim swapaxes "
    "view_as reshape_as"
)
_SHUFFLE_NAMES = _words("channel_shuffle pixel_shuffle pixel_unshuffle")
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


def shape_of(node: object) -> tuple[int, ...] | None:
    """The output shape shape propagation recorded for ``node`` (None when unknown)."""
    if not isinstance(node, fx.Node):
        return None
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(int(v) for v in shape) if shape is not None else None


def target_name(node: fx.Node) -> str:
    """The method name of a ``call_method`` node, else the ``__name__`` of its target."""
    if node.op == "call_method":
        return str(node.target)
    return str(getattr(node.target, "__name__", node.target))


def is_add_function(func: Any) -> bool:
    """True for a torch function or Tensor method that adds (as the hook walk sees them)."""
    return func in ADD_FUNCTIONS


def is_add_call(node: fx.Node) -> bool:
    """True when ``node`` calls an addition, in any spelling (shapes are not checked)."""
    if node.op == "call_function":
        return node.target in ADD_FUNCTIONS or target_name(node) in _ADD_NAMES
    return node.op == "call_method" and node.target in ADD_METHODS


def is_in_place(node: fx.Node) -> bool:
    """True for an in-place Tensor method (``add_``, ``mul_``): its result is its first operand,
    and later readers of that operand see the result."""
    return node.op == "call_method" and str(node.target).endswith("_")


def concat_inputs(node: fx.Node) -> list[Any]:
    """The tensors a concatenation joins (the first argument or ``tensors=``)."""
    inputs = node.args[0] if node.args else node.kwargs.get("tensors", ())
    return list(inputs) if isinstance(inputs, list | tuple) else []


def is_channel_concat(node: fx.Node, kind: OpKind) -> bool:
    """A concatenation along channels (dim 1) of at least two 4-D feature maps."""
    if kind != OpKind.CONCAT or not node.args:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = shape_of(node)
    if shape is None or len(shape) != 4 or dim not in (1, -3):
        return False
    return sum(isinstance(t, fx.Node) for t in concat_inputs(node)) >= 2


def _module_kind(module: nn.Module) -> OpKind:
    if isinstance(module, nn.Conv2d | nn.Conv1d | nn.Conv3d):
        if module.groups == 1:
            return OpKind.CONV
        return OpKind.DEPTHWISE if module.groups == module.in_channels else OpKind.GROUPED
    if isinstance(module, nn.Linear):
        return OpKind.LINEAR
    if is_norm(module) or isinstance(module, nn.Identity | nn.GroupNorm | nn.LayerNorm):
        return OpKind.PER_CHANNEL
    if isinstance(module, nn.Sequential) and len(module) == 0:
        return OpKind.PER_CHANNEL  # an empty Sequential is an identity (seen by the hook walk)
    if isinstance(module, nn.Flatten):
        return OpKind.RESHAPE
    if isinstance(module, nn.ChannelShuffle | nn.PixelShuffle | nn.PixelUnshuffle):
        return OpKind.SHUFFLE
    if type(module).__module__.startswith(_PER_CHANNEL_MODULE_HOMES):
        return OpKind.PER_CHANNEL
    return OpKind.UNKNOWN


def _function_kind(node: fx.Node) -> OpKind:
    """Kind of a ``call_function``/``call_method`` node, from its target."""
    name = target_name(node)
    if node.op == "call_function" and node.target is operator.getitem:
        return OpKind.GETITEM
    if is_add_call(node):
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        same = len(tensors) == 2 and shape_of(tensors[0]) == shape_of(tensors[1])
        return OpKind.ADD if same else OpKind.PER_CHANNEL  # adding a bias or scalar
    if node.target is torch.cat or name in _CONCAT_NAMES:
        return OpKind.CONCAT
    for names, kind in _NAMED_KINDS:
        if name in names:
            return kind
    if name in ("conv2d", "linear"):
        return OpKind.CONV
    return OpKind.UNKNOWN


_NAMED_KINDS = (
    (_SPLIT_NAMES, OpKind.SPLIT),
    (_SHUFFLE_NAMES, OpKind.SHUFFLE),
    (_RESHAPE_NAMES, OpKind.RESHAPE),
    (_PER_CHANNEL_NAMES, OpKind.PER_CHANNEL),
)


def op_kind(node: fx.Node, graph_module: fx.GraphModule) -> OpKind:
    """The :class:`OpKind` of ``node``; ops ibnify does not know get ``UNKNOWN``.

    Shapes recorded by shape propagation decide whether an addition joins two feature maps
    (``ADD``) or adds a bias (``PER_CHANNEL``); without shapes every two-tensor addition is
    ``ADD``.
    """
    if node.op == "output":
        return OpKind.OUTPUT
    if node.op in ("placeholder", "get_attr"):
        return OpKind.UNKNOWN
    if node.op == "call_module":
        return _module_kind(graph_module.get_submodule(str(node.target)))
    return _function_kind(node)


def classify(graph_module: fx.GraphModule) -> dict[fx.Node, OpKind]:
    """The kind of every node of ``graph_module``'s graph: the table an analysis keeps."""
    return {node: op_kind(node, graph_module) for node in graph_module.graph.nodes}


def reached(start: list[fx.Node], kinds: dict[fx.Node, OpKind]) -> Iterator[tuple[fx.Node, OpKind]]:
    """Nodes that are not per-channel, reached from ``start`` through per-channel ops only.

    Depth-first, each node once: the walk both "where does this BN's output go" questions of
    the generic rule (a depthwise conv? only convs?) share.
    """
    stack, seen = list(start), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        kind = kinds[node]
        if kind == OpKind.PER_CHANNEL:
            stack.extend(node.users)
        else:
            yield node, kind
