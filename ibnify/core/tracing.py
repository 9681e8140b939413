"""Tracing and shape propagation: the first step of every analysis.

``trace`` keeps norms and timm's registered non-traceable modules as leaves, and names the module
that fails; ``record_shapes`` stores every node's output shape in ``node.meta["tensor_meta"]``,
on meta tensors where it can (no arithmetic, no memory) and with the real weights where an op
needs data.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

try:  # timm >= 1.0.17 keeps the fx registry in timm.layers
    from timm.layers import _fx as timm_fx
except ImportError:  # timm 1.0.9 - 1.0.16 (the oldest pyproject.toml allows)
    from timm.models import _features_fx as timm_fx

from ..errors import TraceError, first_line
from .modules import device_of, eval_mode
from .ops import is_norm

logger = logging.getLogger(__name__)

__all__ = [
    "TensorShape",
    "check_codegen_safe",
    "default_input_size",
    "dummy_input",
    "is_literal",
    "record_shapes",
    "timm_notrace",
    "trace",
]


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps norms and timm's non-traceable modules/functions as leaves.

    It also remembers which module it was inside when tracing fails, so the error can name it.
    """

    def __init__(self) -> None:
        leaf_modules, autowrap = timm_notrace()
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


def timm_notrace() -> tuple[list[type], list]:
    """timm's registry of modules and functions fx must not trace into."""
    return list(timm_fx.get_notrace_modules()), list(timm_fx.get_notrace_functions())


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
    check_codegen_safe(graph, type(model).__name__)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# Constants fx's code generator writes as valid source; anything else it would print as a repr.
_LITERAL_TYPES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    type(Ellipsis),
    torch.dtype,
    torch.device,
    torch.memory_format,
    torch.layout,
    enum.Enum,
)


def is_literal(value: Any) -> bool:
    """Whether fx's generated code can spell ``value`` (a graph node, a literal, or a container
    of them); an object such as torchvision's ``ImageList`` would appear as its repr instead."""
    return _first_non_literal(value) is None


def _first_non_literal(value: Any) -> tuple[Any] | None:
    """``(obj,)`` for the first object inside ``value`` that generated code cannot spell."""
    if isinstance(value, (fx.Node, *_LITERAL_TYPES)):
        return None
    if isinstance(value, slice):
        value = (value.start, value.stop, value.step)
    elif isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return (value,)
        value = tuple(value.values())
    elif not isinstance(value, list | tuple):
        return (value,)
    return next((found for v in value if (found := _first_non_literal(v)) is not None), None)


def check_codegen_safe(graph: fx.Graph, name: str) -> None:
    """Refuse, in one line, a graph whose generated code would embed an object's repr.

    Raises:
        TraceError: names the first node whose arguments hold a non-literal object.
    """
    for node in graph.nodes:
        found = _first_non_literal((*node.args, *node.kwargs.values()))
        if found is not None:
            raise TraceError(
                f"the graph of {name} passes a {type(found[0]).__name__} object to "
                f"'{node.target if node.op == 'call_module' else node.name}', which generated "
                "code cannot hold"
            )


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


def dummy_input(model: nn.Module, input_size: tuple[int, int, int]) -> torch.Tensor:
    """A zero batch of one ``input_size`` input on the model's device and float dtype."""
    reference = next(iter(model.parameters()), None)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    return torch.zeros((1, *input_size), device=device_of(model), dtype=dtype or torch.float32)


def record_shapes(graph_module: fx.GraphModule, dummy: torch.Tensor, name: str) -> None:
    """Store each node's output shape, in eval mode without gradients (mode restored).

    Raises:
        TraceError: the dummy input does not fit the model (``name`` names it).
    """
    with eval_mode(graph_module), torch.no_grad():
        if _propagate_on_meta(graph_module, dummy):
            return
        try:
            _ShapeRecorder(graph_module).run(dummy)
        except Exception as exc:
            detail = first_line(exc, "")
            raise TraceError(
                f"running a {tuple(dummy.shape)} dummy input through {name} "
                f"failed ({type(exc).__name__}: {detail}); pass a valid input size"
            ) from exc


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
