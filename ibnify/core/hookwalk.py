"""Forward-hook walk: a record of one real forward pass, for models torch.fx cannot trace.

Module forward hooks give the leaf modules in execution order with their output shapes; a
``TorchFunctionMode`` records the tensor functions called between them (additions, concatenations,
splits, views). Tensors are matched by identity, so the record is a dataflow graph of that one
forward pass. It is returned as an ``fx.Graph`` with the same node conventions as a symbolic
trace (``call_module`` for leaves, ``operator.add`` for additions, ``tensor_meta`` shapes), so the
graph analysis and the layouts read it exactly like a traced graph.

What the walk cannot see (an op outside torch's function dispatch, a branch not taken by the dummy
input) shows up as a tensor with no producer; the layouts treat such gaps cautiously.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .ops import is_add_function
from .tracing import check_codegen_safe, is_literal

__all__ = ["walk"]

_GETITEM_FUNCS: set[Any] = {torch.Tensor.__getitem__}


def _dunder_operator(func: Any) -> Callable | None:
    """``operator.mul`` for ``Tensor.__mul__`` and the like (fx's own spelling of them)."""
    name = getattr(func, "__name__", "")
    if not (name.startswith("__") and name.endswith("__")):
        return None
    return getattr(operator, name.strip("_").removeprefix("r"), None) or getattr(
        operator, name.strip("_"), None
    )


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, list | tuple) and any(isinstance(v, torch.Tensor) for v in value)


def _named(func: Callable) -> Callable:
    """``func`` itself, or a plain wrapper when fx's code generator cannot name it."""
    if isinstance(getattr(func, "__module__", None), str):
        return func
    name = "".join(c if c.isalnum() else "_" for c in getattr(func, "__name__", "op")).strip("_")

    def call(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"walked_{name or 'op'}"
    return call


class _Recorder(TorchFunctionMode):
    """Records tensor functions called outside leaf modules, and leaf module calls."""

    def __init__(self, is_leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.producer: dict[int, fx.Node] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids unique while the walk runs
        self.depth = 0
        self.pending: list[tuple] = []
        self.is_leaf = is_leaf

    def _arg(self, value: Any) -> Any:
        """The graph argument for ``value``: its producer node, or a literal; an object the
        generated code cannot spell (torchvision's ``ImageList``) is a gap, like an unknown
        tensor."""
        if isinstance(value, torch.Tensor):
            return self.producer.get(id(value))
        if isinstance(value, list | tuple):
            items = [self._arg(v) for v in value]
            return items if isinstance(value, list) else tuple(items)
        if isinstance(value, dict):
            return {k: self._arg(v) for k, v in value.items() if isinstance(k, str)}
        return value if is_literal(value) else None

    def _outputs(self, node: fx.Node, result: Any) -> None:
        if isinstance(result, torch.Tensor):
            self.keep.append(result)
            self.producer[id(result)] = node
            node.meta["tensor_meta"] = SimpleNamespace(shape=result.shape)
        elif isinstance(result, list | tuple):
            for i, item in enumerate(result):
                if isinstance(item, torch.Tensor):
                    element = self.graph.call_function(operator.getitem, (node, i))
                    self._outputs(element, item)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.depth > 0 or not any(
            isinstance(a, torch.Tensor) and id(a) in self.producer
            for a in (*args, *(x for v in args if isinstance(v, list | tuple) for x in v))
        ):
            return result
        if not _has_tensor(result):  # shape queries and other plain results
            return result
        node_args = self._arg(tuple(args))
        node_kwargs = self._arg(kwargs)
        if is_add_function(func):  # every spelling becomes fx's operator.add
            node = self.graph.call_function(operator.add, node_args[:2])
        elif func in _GETITEM_FUNCS:
            node = self.graph.call_function(operator.getitem, node_args, node_kwargs)
        elif _dunder_operator(func) is not None:
            node = self.graph.call_function(_dunder_operator(func), node_args, node_kwargs)
        elif getattr(torch.Tensor, getattr(func, "__name__", ""), None) is func:
            node = self.graph.call_method(func.__name__, node_args, node_kwargs)
        else:
            node = self.graph.call_function(_named(func), node_args, node_kwargs)
        self._outputs(node, result)
        return result


def walk(model: nn.Module, dummy: torch.Tensor, is_leaf: Callable[[nn.Module], bool]) -> fx.Graph:
    """Run ``dummy`` through ``model`` once and return the recorded dataflow as an fx graph.

    The caller sets the model's mode (eval) and disables gradients. Hooks are always removed.
    """
    recorder = _Recorder(is_leaf)
    placeholder = recorder.graph.placeholder("x")
    recorder._outputs(placeholder, dummy)
    handles = []

    def pre_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple) -> None:
            if recorder.depth == 0:
                recorder.pending.append(tuple(inputs))
            recorder.depth += 1

        return hook

    def post_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            recorder.depth -= 1
            if recorder.depth == 0:
                node = recorder.graph.call_module(name, recorder._arg(recorder.pending.pop()))
                recorder._outputs(node, output)

        return hook

    for name, module in model.named_modules():
        if name and (is_leaf(module) or not any(True for _ in module.children())):
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name)))
    try:
        with recorder:
            output = model(dummy)
        node = recorder._arg(output)
        recorder.graph.output(node if isinstance(node, fx.Node) else None)
    finally:
        for handle in handles:
            handle.remove()
    check_codegen_safe(recorder.graph, type(model).__name__)
    return recorder.graph
