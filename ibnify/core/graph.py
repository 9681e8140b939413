"""Graph analysis: trace with torch.fx, propagate shapes, find stages and residual blocks.

The analysis never modifies the model and always restores its train/eval mode. Every record is
keyed by the module's qualified name as ``named_modules()`` gives it.

Definitions (see DESIGN.md):
- output stride of a node: input height / node output height;
- residual block: the region between a fork and the ``add`` that joins its two branches; the
  larger branch is the main branch, the other the shortcut;
- stage: blocks are ranked by their output stride, highest resolution first (stage 1); a norm
  inside a block has the block's stage; a norm that runs before the first block is in the stem
  (stage 0). Ranking, not absolute strides, keeps CIFAR-style networks (stride-1 first blocks)
  numbered like ImageNet ones. Networks without residual blocks use the regions that end in a
  channel concatenation (Inception, ShuffleNet units) as blocks; with neither (VGG-BN) there is
  no stem and every resolution a norm runs at is a stage.

``analyze(model, fallback=True)`` describes models fx cannot trace from a forward-hook walk
(:mod:`ibnify.hookwalk`) instead of raising.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import TraceError, first_line
from .hookwalk import walk
from .layers import IBN

logger = logging.getLogger(__name__)

__all__ = [
    "GraphAnalysis",
    "NormLayer",
    "ResidualBlock",
    "analyze",
    "default_input_size",
    "is_norm",
    "list_norm_layers",
    "trace",
]

ROLE_MAIN = "main"
ROLE_PRE_ADD = "pre_add"
ROLE_SHORTCUT = "shortcut"
ROLE_OUTSIDE = "outside"

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


def is_norm(module: nn.Module) -> bool:
    """True for modules the converter treats as normalization leaves (BN, IN, IBN)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm | nn.InstanceNorm2d | IBN)


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps norms and timm's non-traceable modules/functions as leaves.

    It also remembers which module it was inside when tracing fails, so the error can name it.
    """

    def __init__(self) -> None:
        leaf_modules, autowrap = _timm_notrace()
        super().__init__(autowrap_functions=tuple(autowrap))
        self._timm_leaves = tuple(leaf_modules)
        self.ibnify_module_path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_norm(m) or (self._timm_leaves and isinstance(m, self._timm_leaves)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.ibnify_module_path.append(name)
        result = super().call_module(m, forward, args, kwargs)
        self.ibnify_module_path.pop()
        return result


def _timm_notrace() -> tuple[list[type], list]:
    """timm's registry of modules and functions fx must not trace into (empty without timm)."""
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # pragma: no cover - timm is a dependency, but stay usable without it
        return [], []
    modules = list(timm_fx.get_notrace_modules())
    functions = list(timm_fx.get_notrace_functions())
    return modules, functions


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; raise TraceError naming the module that failed."""
    tracer = _LeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        where = tracer.ibnify_module_path[-1] if tracer.ibnify_module_path else "<root>"
        where = where or "<root>"
        detail = first_line(exc)
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: failed inside module '{where}' "
            f"({type(exc).__name__}: {detail})"
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def list_norm_layers(model: nn.Module) -> list[str]:
    """Qualified names of the norm layers in the order the traced forward calls them."""
    graph_module = trace(model)
    seen: dict[str, None] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and is_norm(graph_module.get_submodule(node.target)):
            seen.setdefault(node.target, None)
    return list(seen)


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the dummy input: timm's ``pretrained_cfg`` where present, else 3×224×224."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size is not None and len(size) == 3:
        return tuple(int(v) for v in size)  # type: ignore[return-value]
    channels = 3
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            channels = module.in_channels
            break
    return (channels, 224, 224)


@dataclass(frozen=True)
class NormLayer:
    """One normalization layer as the analysis sees it."""

    name: str
    kind: str
    channels: int
    output_shape: tuple[int, ...]
    stride: int
    stage: int
    block: str | None
    role: str
    index: int


@dataclass(frozen=True)
class ResidualBlock:
    """A fork → add region. ``name`` is the deepest module that holds the whole region."""

    name: str
    add_node: str
    stride: int
    stage: int
    main_norms: tuple[str, ...]
    shortcut_norms: tuple[str, ...]


@dataclass(frozen=True)
class GraphAnalysis:
    """Result of :func:`analyze`: norms in execution order, residual blocks, stage strides."""

    input_size: tuple[int, int, int]
    norms: tuple[NormLayer, ...]
    blocks: tuple[ResidualBlock, ...]
    stage_strides: tuple[int, ...]
    graph_module: fx.GraphModule = field(repr=False, compare=False)
    # Set when fx could not trace the model and the graph is a forward-hook walk's record.
    trace_error: str | None = field(default=None, compare=False)

    def norm(self, name: str) -> NormLayer:
        """The record of norm ``name``; KeyError names the function that lists valid names."""
        for record in self.norms:
            if record.name == name:
                return record
        raise KeyError(f"no norm layer named {name!r}; see list_norm_layers(model)")

    @property
    def num_stages(self) -> int:
        """Number of stages (excluding the stem)."""
        return len(self.stage_strides)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def analyze(
    model: nn.Module,
    input_size: tuple[int, int, int] | None = None,
    *,
    fallback: bool = False,
) -> GraphAnalysis:
    """Trace ``model``, run one dummy input through it in eval mode and describe its norms.

    Args:
        model: the network; it is not modified and its mode is restored.
        input_size: (C, H, W) of the dummy input; default from :func:`default_input_size`.
        fallback: when fx cannot trace the model, describe the graph recorded by a forward-hook
            walk instead of raising (the analysis then carries ``trace_error``).
    """
    if input_size is None:
        input_size = default_input_size(model)
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    dummy = torch.zeros((1, *input_size), device=device, dtype=dtype or torch.float32)
    try:
        graph_module = trace(model)
    except TraceError as error:
        if not fallback:
            raise
        return _analyze_walk(model, dummy, input_size, error)
    with _eval_mode(graph_module), torch.no_grad():
        if _propagate_on_meta(graph_module, dummy):
            return _describe(graph_module, input_size)
        try:
            _ShapeRecorder(graph_module).run(dummy)
        except Exception as exc:
            detail = first_line(exc, "")
            raise TraceError(
                f"running a {tuple(dummy.shape)} dummy input through {type(model).__name__} "
                f"failed ({type(exc).__name__}: {detail}); pass a valid input size"
            ) from exc
    return _describe(graph_module, input_size)


class _ShapeRun(nn.Module):
    """Wraps a GraphModule so functional_call can swap its tensors while shapes are recorded."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, x: torch.Tensor) -> Any:
        return _ShapeRecorder(self.graph_module).run(x)


def _propagate_on_meta(graph_module: fx.GraphModule, dummy: torch.Tensor) -> bool:
    """Record shapes with meta tensors (no arithmetic, no memory); False if an op needs data.

    Shapes are all the analysis needs, so the weights are swapped for meta tensors for the one
    pass; where an op has no meta kernel or depends on values, the caller runs real tensors.
    """
    wrapper = _ShapeRun(graph_module)
    tensors = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in (*wrapper.named_parameters(), *wrapper.named_buffers())
    }
    try:
        torch.func.functional_call(wrapper, tensors, (dummy.to("meta"),))
    except Exception as exc:  # any failure only means "use real tensors"
        logger.debug("meta shape propagation failed (%s); using real tensors", exc)
        return False
    return True


def _analyze_walk(
    model: nn.Module, dummy: torch.Tensor, input_size: tuple[int, int, int], error: TraceError
) -> GraphAnalysis:
    """The forward-hook fallback: describe the dataflow of one recorded forward pass."""
    from dataclasses import replace

    leaves, _ = _timm_notrace()
    leaf_types = (*leaves, nn.modules.batchnorm._BatchNorm, nn.InstanceNorm2d, IBN)
    with _eval_mode(model), torch.no_grad():
        try:
            graph = walk(model, dummy, lambda m: isinstance(m, leaf_types))
        except Exception as exc:
            detail = first_line(exc, "")
            raise TraceError(
                f"{error}; the forward-hook fallback failed too ({type(exc).__name__}: {detail})"
            ) from exc
    graph_module = fx.GraphModule(model, graph, type(model).__name__)
    return replace(_describe(graph_module, input_size), trace_error=str(error))


@dataclass(frozen=True)
class TensorShape:
    """What shape propagation records for a node: ``node.meta["tensor_meta"].shape``."""

    shape: tuple[int, ...]


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and stores each tensor node's output shape in ``node.meta``.

    Unlike torch's ShapeProp it does not print a traceback when a node fails, so a bad input
    size ends in one clear error.
    """

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = TensorShape(tuple(result.shape))
        return result


def _output_stride(node: fx.Node, input_height: int) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) != 4 or shape[2] == 0:
        return None
    return max(1, round(input_height / shape[2]))


def _is_add(node: fx.Node) -> bool:
    is_add_call = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )
    if not is_add_call:
        return False
    tensors = [arg for arg in node.args[:2] if isinstance(arg, fx.Node)]
    if len(tensors) != 2:
        return False
    shapes = [getattr(t.meta.get("tensor_meta"), "shape", None) for t in tensors]
    return shapes[0] is not None and shapes[0] == shapes[1] and len(shapes[0]) == 4


def _common_prefix(names: list[str]) -> str:
    parts = [name.split(".") for name in names]
    prefix: list[str] = []
    for column in zip(*parts, strict=False):
        if all(piece == column[0] for piece in column):
            prefix.append(column[0])
        else:
            break
    return ".".join(prefix)


def _describe(graph_module: fx.GraphModule, input_size: tuple[int, int, int]) -> GraphAnalysis:
    nodes = list(graph_module.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    # Ancestor sets as integer bitsets: cheap for graphs of a few thousand nodes.
    ancestors: dict[fx.Node, int] = {}
    for node in nodes:
        bits = 0
        for parent in node.all_input_nodes:
            bits |= ancestors[parent] | (1 << position[parent])
        ancestors[node] = bits
    input_height = input_size[1]

    norm_nodes = [
        node
        for node in nodes
        if node.op == "call_module" and is_norm(graph_module.get_submodule(node.target))
    ]
    raw_blocks = []
    for node in nodes:
        if not _is_add(node):
            continue
        left, right = (arg for arg in node.args[:2])
        left_set = ancestors[left] | (1 << position[left])
        right_set = ancestors[right] | (1 << position[right])
        common = left_set & right_set
        if not common:
            continue
        fork = nodes[common.bit_length() - 1]
        fork_set = ancestors[fork] | (1 << position[fork])
        branches = [left_set & ~fork_set, right_set & ~fork_set]
        main_bits, short_bits = sorted(branches, key=lambda b: -b.bit_count())
        if main_bits == 0:
            continue
        members = [n for n in nodes if (main_bits | short_bits) >> position[n] & 1]
        module_names = [n.target for n in members if n.op == "call_module"]
        raw_blocks.append((node, fork, main_bits, short_bits, module_names))

    block_strides = sorted(
        {s for s in (_output_stride(b[0], input_height) for b in raw_blocks) if s is not None}
    )
    stage_of_stride = {stride: rank + 1 for rank, stride in enumerate(block_strides)}

    blocks: list[ResidualBlock] = []
    norm_block: dict[fx.Node, tuple[ResidualBlock, str]] = {}
    # Innermost block first: a norm belongs to the smallest region that contains it.
    for add, _fork, main_bits, short_bits, module_names in sorted(
        raw_blocks, key=lambda b: (b[2] | b[3]).bit_count()
    ):
        stride = _output_stride(add, input_height) or 1
        main_norms = [n for n in norm_nodes if main_bits >> position[n] & 1]
        short_norms = [n for n in norm_nodes if short_bits >> position[n] & 1]
        block = ResidualBlock(
            name=_common_prefix(module_names) if module_names else add.name,
            add_node=add.name,
            stride=stride,
            stage=stage_of_stride.get(stride, 0),
            main_norms=tuple(n.target for n in main_norms),
            shortcut_norms=tuple(n.target for n in short_norms),
        )
        blocks.append(block)
        for i, norm_node in enumerate(main_norms):
            role = ROLE_PRE_ADD if i == len(main_norms) - 1 else ROLE_MAIN
            norm_block.setdefault(norm_node, (block, role))
        for norm_node in short_norms:
            norm_block.setdefault(norm_node, (block, ROLE_SHORTCUT))
    blocks.sort(key=lambda b: position[next(n for n in nodes if n.name == b.add_node)])

    first_block_start = min((position[n] for n in norm_block), default=len(nodes))
    norms: list[NormLayer] = []
    norm_by_name: dict[str, fx.Node] = {}
    seen: set[str] = set()
    for index, node in enumerate(norm_nodes):
        if node.target in seen:
            continue
        seen.add(node.target)
        norm_by_name[node.target] = node
        module = graph_module.get_submodule(node.target)
        meta = node.meta.get("tensor_meta")
        shape = tuple(int(v) for v in getattr(meta, "shape", ()))
        stride = _output_stride(node, input_height) or 1
        if node in norm_block:
            block, role = norm_block[node]
            stage, block_name = block.stage, block.name
        else:
            role, block_name = ROLE_OUTSIDE, None
            stage = _stage_outside_blocks(stride, position[node] < first_block_start, block_strides)
        norms.append(
            NormLayer(
                name=node.target,
                kind=type(module).__name__,
                channels=_channels(module),
                output_shape=shape,
                stride=stride,
                stage=stage,
                block=block_name,
                role=role,
                index=index,
            )
        )
    stage_strides = tuple(block_strides)
    if not block_strides:
        joins = _join_regions(nodes, position, ancestors, input_height)
        stage_strides = tuple(sorted({stride for stride, _, _ in joins}))
        stage_strides = stage_strides or tuple(sorted({n.stride for n in norms}))
        first_fork = min((fork for _, fork, _ in joins), default=-1)
        stage_of_stride = {stride: rank + 1 for rank, stride in enumerate(stage_strides)}
        restaged = []
        for n in norms:
            at = position[norm_by_name[n.name]]
            inside = [(members.bit_count(), s) for s, _, members in joins if members >> at & 1]
            if inside:  # the innermost join region that holds the norm gives its stage
                stage = stage_of_stride[min(inside)[1]]
            else:
                stage = _stage_outside_blocks(n.stride, at < first_fork, list(stage_strides))
            restaged.append(_replace_stage(n, stage))
        norms = restaged
    return GraphAnalysis(
        input_size=input_size,
        norms=tuple(norms),
        blocks=tuple(blocks),
        stage_strides=stage_strides,
        graph_module=graph_module,
    )


def _channels(module: nn.Module) -> int:
    return int(module.num_features)


def _stage_outside_blocks(stride: int, before_first_block: bool, block_strides: list[int]) -> int:
    """Stage of a norm that is in no residual block (stem, transitions, heads)."""
    if before_first_block or not block_strides:
        return 0
    stage = 0
    for rank, block_stride in enumerate(block_strides):
        if stride >= block_stride:
            stage = rank + 1
    return stage


def _is_channel_concat(node: fx.Node) -> bool:
    """``torch.cat(tensors, dim=1)`` over at least two 4-D feature maps."""
    if node.op != "call_function" or node.target is not torch.cat or not node.args:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    inputs = node.args[0]
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape is None or len(shape) != 4 or dim not in (1, -3):
        return False
    return isinstance(inputs, list | tuple) and sum(isinstance(t, fx.Node) for t in inputs) >= 2


def _join_regions(
    nodes: list[fx.Node], position: dict[fx.Node, int], ancestors: dict[fx.Node, int], height: int
) -> list[tuple[int, int, int]]:
    """(output stride, fork position, member bitset) of each concatenation joining branches.

    Networks without residual additions (GoogLeNet, ShuffleNet, DenseNet) are built from blocks
    whose branches meet in a channel concatenation; those blocks give the stages, and a norm
    inside one (between its fork and the concatenation) has that block's stage. A network with
    no joins at all (VGG-BN) has no stem: every resolution its norms run at is a stage.
    """
    regions = []
    for node in nodes:
        if not _is_channel_concat(node):
            continue
        inputs = [t for t in node.args[0] if isinstance(t, fx.Node)]
        common, union = -1, 0
        for tensor in inputs:
            reach = ancestors[tensor] | (1 << position[tensor])
            common &= reach
            union |= reach
        stride = _output_stride(node, height)
        if common <= 0 or stride is None:
            continue
        fork = common.bit_length() - 1
        fork_set = ancestors[nodes[fork]] | (1 << fork)
        regions.append((stride, fork, union & ~fork_set))
    return regions


def _replace_stage(norm: NormLayer, stage: int) -> NormLayer:
    from dataclasses import replace

    return replace(norm, stage=stage)
