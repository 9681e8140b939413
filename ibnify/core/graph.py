"""Graph analysis: find the residual blocks, the stages and the role of every norm.

Tracing and shape propagation are in :mod:`ibnify.core.tracing`; every node's op kind comes from
:mod:`ibnify.core.ops` (classified once, kept as ``GraphAnalysis.ops``).

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
(:mod:`ibnify.core.hookwalk`) instead of raising.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch
from torch import fx, nn

from ..errors import TraceError, first_line
from .hookwalk import walk
from .layers import batchnorm_channels
from .modules import eval_mode
from .ops import (
    NormKind,
    OpKind,
    classify,
    concat_inputs,
    is_channel_concat,
    is_norm,
    norm_kind,
    shape_of,
)
from .tracing import (
    default_input_size,
    dummy_input,
    record_shapes,
    timm_notrace,
    trace,
)

__all__ = [
    "GraphAnalysis",
    "NormLayer",
    "ResidualBlock",
    "Role",
    "analyze",
    "default_input_size",
    "is_norm",
    "list_norm_layers",
    "output_stride",
    "stage_of_stride",
    "trace",
]


class Role(StrEnum):
    """Where a norm sits relative to the residual block that holds it."""

    MAIN = "main"  # main branch, not the last norm before the addition
    PRE_ADD = "pre_add"  # the main branch's last norm
    SHORTCUT = "shortcut"  # the shortcut (downsample) branch
    OUTSIDE = "outside"  # in no residual block (stem, transitions, heads, plain stacks)


def list_norm_layers(model: nn.Module) -> list[str]:
    """Qualified names of the norm layers in the order the traced forward calls them."""
    graph_module = trace(model)
    seen: dict[str, None] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and is_norm(graph_module.get_submodule(node.target)):
            seen.setdefault(node.target, None)
    return list(seen)


@dataclass(frozen=True)
class NormLayer:
    """One normalization layer as the analysis sees it."""

    name: str
    kind: str  # the module's class name
    channels: int
    output_shape: tuple[int, ...]
    stride: int
    stage: int
    block: str | None
    role: Role
    index: int
    norm_kind: NormKind | None = None


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
    # The kind of every graph node, classified once (see ibnify.core.ops).
    ops: Mapping[fx.Node, OpKind] = field(default_factory=dict, repr=False, compare=False)
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
    dummy = dummy_input(model, input_size)
    try:
        graph_module = trace(model)
    except TraceError as error:
        if not fallback:
            raise
        return _analyze_walk(model, dummy, input_size, error)
    record_shapes(graph_module, dummy, type(model).__name__)
    return _describe(graph_module, input_size)


def _analyze_walk(
    model: nn.Module, dummy: torch.Tensor, input_size: tuple[int, int, int], error: TraceError
) -> GraphAnalysis:
    """The forward-hook fallback: describe the dataflow of one recorded forward pass."""
    leaves = tuple(timm_notrace()[0])
    with eval_mode(model), torch.no_grad():
        try:
            graph = walk(model, dummy, lambda m: is_norm(m) or isinstance(m, leaves))
        except Exception as exc:
            detail = first_line(exc, "")
            raise TraceError(
                f"{error}; the forward-hook fallback failed too ({type(exc).__name__}: {detail})"
            ) from exc
    graph_module = fx.GraphModule(model, graph, type(model).__name__)
    return replace(_describe(graph_module, input_size), trace_error=str(error))


def output_stride(node: fx.Node, input_height: int) -> int | None:
    """Input height / the height of ``node``'s 4-D output (None for other outputs)."""
    shape = shape_of(node)
    if shape is None or len(shape) != 4 or shape[2] == 0:
        return None
    return max(1, round(input_height / shape[2]))


def stage_of_stride(stride: int, stage_strides: Sequence[int]) -> int:
    """The stage working at ``stride``: the deepest stage whose stride is not above it (0: none).

    ``stage_strides`` are the strides of stages 1, 2, ... in ascending order.
    """
    return max((rank + 1 for rank, s in enumerate(stage_strides) if stride >= s), default=0)


@dataclass(frozen=True)
class _Dataflow:
    """The traced graph as the description reads it: node order, ancestor sets, op kinds."""

    nodes: list[fx.Node]
    position: dict[fx.Node, int]
    ancestors: dict[fx.Node, int]  # ancestor sets as integer bitsets over positions
    kinds: dict[fx.Node, OpKind]
    height: int

    @classmethod
    def of(cls, graph_module: fx.GraphModule, height: int) -> _Dataflow:
        """Positions, ancestor bitsets (cheap for a few thousand nodes) and op kinds."""
        nodes = list(graph_module.graph.nodes)
        position = {node: i for i, node in enumerate(nodes)}
        ancestors: dict[fx.Node, int] = {}
        for node in nodes:
            bits = 0
            for parent in node.all_input_nodes:
                bits |= ancestors[parent] | (1 << position[parent])
            ancestors[node] = bits
        return cls(nodes, position, ancestors, classify(graph_module), height)

    def reach(self, node: fx.Node) -> int:
        """Bitset of ``node`` and its ancestors."""
        return self.ancestors[node] | (1 << self.position[node])

    def stride(self, node: fx.Node) -> int | None:
        """Output stride of ``node``."""
        return output_stride(node, self.height)


@dataclass(frozen=True)
class _Region:
    """A fork → add region: the add node, its output stride, main and shortcut bitsets."""

    add: fx.Node
    stride: int | None
    main: int
    shortcut: int

    @property
    def size(self) -> int:
        return (self.main | self.shortcut).bit_count()


def _is_residual_add(node: fx.Node, kind: OpKind) -> bool:
    """An addition of two same-shape 4-D feature maps."""
    shape = shape_of(node.args[0]) if kind == OpKind.ADD else None
    return shape is not None and len(shape) == 4


def _residual_regions(flow: _Dataflow) -> list[_Region]:
    """Every fork → add region; the branch with more nodes is the main branch."""
    regions = []
    for node in flow.nodes:
        if not _is_residual_add(node, flow.kinds[node]):
            continue
        left_set, right_set = (flow.reach(arg) for arg in node.args[:2])
        common = left_set & right_set
        if not common:
            continue
        fork_set = flow.reach(flow.nodes[common.bit_length() - 1])
        branches = [left_set & ~fork_set, right_set & ~fork_set]
        main_bits, short_bits = sorted(branches, key=lambda b: -b.bit_count())
        if main_bits:
            regions.append(_Region(node, flow.stride(node), main_bits, short_bits))
    return regions


def _common_prefix(names: list[str]) -> str:
    parts = [name.split(".") for name in names]
    prefix: list[str] = []
    for column in zip(*parts, strict=False):
        if all(piece == column[0] for piece in column):
            prefix.append(column[0])
        else:
            break
    return ".".join(prefix)


_Membership = dict[fx.Node, tuple[ResidualBlock, Role]]


def _residual_blocks(
    flow: _Dataflow, regions: list[_Region], norm_nodes: list[fx.Node], strides: tuple[int, ...]
) -> tuple[list[ResidualBlock], _Membership]:
    """One ResidualBlock per region, and the innermost block (with the role) of each norm."""
    blocks: list[tuple[int, ResidualBlock]] = []
    membership: _Membership = {}
    for region in sorted(regions, key=lambda r: r.size):  # innermost first
        members = [n for n in flow.nodes if (region.main | region.shortcut) >> flow.position[n] & 1]
        module_names = [str(n.target) for n in members if n.op == "call_module"]
        main_norms = [n for n in norm_nodes if region.main >> flow.position[n] & 1]
        short_norms = [n for n in norm_nodes if region.shortcut >> flow.position[n] & 1]
        stride = region.stride or 1
        block = ResidualBlock(
            name=_common_prefix(module_names) if module_names else region.add.name,
            add_node=region.add.name,
            stride=stride,
            stage=stage_of_stride(stride, strides),
            main_norms=tuple(str(n.target) for n in main_norms),
            shortcut_norms=tuple(str(n.target) for n in short_norms),
        )
        blocks.append((flow.position[region.add], block))
        for i, norm_node in enumerate(main_norms):
            role = Role.PRE_ADD if i == len(main_norms) - 1 else Role.MAIN
            membership.setdefault(norm_node, (block, role))
        for norm_node in short_norms:
            membership.setdefault(norm_node, (block, Role.SHORTCUT))
    return [block for _, block in sorted(blocks, key=lambda b: b[0])], membership


def _stage_outside(flow: _Dataflow, node: fx.Node, first: int, strides: Sequence[int]) -> int:
    """Stage of a norm in no block: the stem (0) before position ``first``, else by stride."""
    if flow.position[node] < first:
        return 0
    return stage_of_stride(flow.stride(node) or 1, strides)


def _stage_by_blocks(
    flow: _Dataflow, norm_nodes: list[fx.Node], membership: _Membership, strides: tuple[int, ...]
) -> dict[fx.Node, int]:
    """Norm stages of a residual network: a block's stage, else stem or by stride."""
    first = min((flow.position[n] for n in membership), default=len(flow.nodes))
    return {
        n: membership[n][0].stage if n in membership else _stage_outside(flow, n, first, strides)
        for n in norm_nodes
    }


def _stage_by_joins(
    flow: _Dataflow, norm_nodes: list[fx.Node]
) -> tuple[tuple[int, ...], dict[fx.Node, int]]:
    """Stage strides and norm stages of a network without residual blocks (see _join_regions)."""
    joins = _join_regions(flow)
    strides = tuple(sorted({stride for stride, _, _ in joins}))
    strides = strides or tuple(sorted({flow.stride(n) or 1 for n in norm_nodes}))
    first_fork = min((fork for _, fork, _ in joins), default=-1)
    stages = {}
    for node in norm_nodes:
        at = flow.position[node]
        inside = [(members.bit_count(), s) for s, _, members in joins if members >> at & 1]
        if inside:  # the innermost join region that holds the norm gives its stage
            stages[node] = stage_of_stride(min(inside)[1], strides)
        else:
            stages[node] = _stage_outside(flow, node, first_fork, strides)
    return strides, stages


def _join_regions(flow: _Dataflow) -> list[tuple[int, int, int]]:
    """(output stride, fork position, member bitset) of each concatenation joining branches.

    Networks without residual additions (GoogLeNet, ShuffleNet, DenseNet) are built from blocks
    whose branches meet in a channel concatenation; those blocks give the stages, and a norm
    inside one (between its fork and the concatenation) has that block's stage. A network with
    no joins at all (VGG-BN) has no stem: every resolution its norms run at is a stage.
    """
    regions = []
    for node in flow.nodes:
        if not is_channel_concat(node, flow.kinds[node]):
            continue
        common, union = -1, 0
        for tensor in concat_inputs(node):
            if isinstance(tensor, fx.Node):
                common &= flow.reach(tensor)
                union |= flow.reach(tensor)
        stride = flow.stride(node)
        if common <= 0 or stride is None:
            continue
        fork = common.bit_length() - 1
        regions.append((stride, fork, union & ~flow.reach(flow.nodes[fork])))
    return regions


def _norm_records(
    graph_module: fx.GraphModule,
    flow: _Dataflow,
    norm_nodes: list[fx.Node],
    membership: _Membership,
    stages: dict[fx.Node, int],
) -> list[NormLayer]:
    """One NormLayer per norm module (its first call), with the stage decided beforehand."""
    records: list[NormLayer] = []
    seen: set[str] = set()
    for index, node in enumerate(norm_nodes):
        name = str(node.target)
        if name in seen:
            continue
        seen.add(name)
        module = graph_module.get_submodule(name)
        block, role = membership.get(node, (None, Role.OUTSIDE))
        records.append(
            NormLayer(
                name=name,
                kind=type(module).__name__,
                channels=batchnorm_channels(module),
                output_shape=shape_of(node) or (),
                stride=flow.stride(node) or 1,
                stage=stages[node],
                block=block.name if block is not None else None,
                role=role,
                index=index,
                norm_kind=norm_kind(module),
            )
        )
    return records


def _describe(graph_module: fx.GraphModule, input_size: tuple[int, int, int]) -> GraphAnalysis:
    """Describe a shape-annotated graph: its residual blocks, stages and norm records.

    Ops are classified once; residual regions (fork → add) give the blocks and, ranked by
    output stride, the stages. A network without residual blocks is staged by its
    concatenation joins instead. Every norm's stage is decided before its record is built.
    """
    flow = _Dataflow.of(graph_module, input_size[1])
    norm_nodes = [
        node
        for node in flow.nodes
        if node.op == "call_module" and is_norm(graph_module.get_submodule(str(node.target)))
    ]
    regions = _residual_regions(flow)
    strides = tuple(sorted({r.stride for r in regions if r.stride is not None}))
    blocks, membership = _residual_blocks(flow, regions, norm_nodes, strides)
    if strides:
        stages = _stage_by_blocks(flow, norm_nodes, membership, strides)
    else:
        strides, stages = _stage_by_joins(flow, norm_nodes)
    return GraphAnalysis(
        input_size=input_size,
        norms=tuple(_norm_records(graph_module, flow, norm_nodes, membership, stages)),
        blocks=tuple(blocks),
        stage_strides=strides,
        graph_module=graph_module,
        ops=flow.kinds,
    )
