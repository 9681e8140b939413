"""Apply a ConversionPlan to a model: module swaps, and an fx rewrite for post-addition IN.

The result is an ordinary ``nn.Module``: train/eval, CPU/CUDA, ``torch.compile``, deepcopy and
``state_dict`` round trips all work. The same base model and plan always give the same structure.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

from ..errors import ConversionError
from .graph import trace
from .layers import IBN, IBNAct, instance_norm_from_batchnorm
from .plans import KIND_IBN, KIND_IN, KIND_POST_ADD_IN, ConversionPlan, ConversionSite

__all__ = ["PLAN_ATTRIBUTE", "apply_plan", "get_plan"]

PLAN_ATTRIBUTE = "ibnify_plan"
_ADD_TARGETS = {operator.add, operator.iadd, torch.add}


def get_plan(model: nn.Module) -> ConversionPlan | None:
    """The plan a model was converted with, or None for a model ibnify did not convert."""
    plan = getattr(model, PLAN_ATTRIBUTE, None)
    return plan if isinstance(plan, ConversionPlan) else None


def apply_plan(model: nn.Module, plan: ConversionPlan, inplace: bool = False) -> nn.Module:
    """Return ``model`` converted by ``plan`` (a deep copy unless ``inplace``).

    Raises:
        ConversionError: a site is missing, already converted, has other channels than planned,
            or is a BatchNorm subclass whose forward ibnify does not know.
    """
    target = model if inplace else copy.deepcopy(model)
    for site in plan.sites:
        if site.kind == KIND_POST_ADD_IN:
            _insert_post_add_in(target, site)
        else:
            _swap_norm(target, site)
    setattr(target, PLAN_ATTRIBUTE, plan)
    return target


def _split_name(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConversionError(f"the model has no layer named {name!r}") from None


def _known_batchnorm_kind(module: nn.Module) -> str | None:
    """``"plain"`` or ``"act"`` for BatchNorm classes whose forward ibnify knows, else None."""
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return "plain"
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover
        return None
    if isinstance(module, BatchNormAct2d) and type(module).forward is BatchNormAct2d.forward:
        return "act"
    return None


def _swap_norm(model: nn.Module, site: ConversionSite) -> None:
    module = _get(model, site.name)
    if isinstance(module, IBN):
        raise ConversionError(f"{site.name} is already an IBN layer")
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise ConversionError(
            f"{site.name} is a {type(module).__name__}, not a BatchNorm; the plan does not fit "
            "this model"
        )
    kind = _known_batchnorm_kind(module)
    if kind is None:
        raise ConversionError(
            f"{site.name} is a {type(module).__name__}, a BatchNorm subclass whose forward "
            "ibnify does not know; refusing to replace it"
        )
    if module.num_features != site.channels:
        raise ConversionError(
            f"{site.name} has {module.num_features} channels, the plan expects {site.channels}"
        )
    if site.kind == KIND_IBN:
        factory = IBNAct if kind == "act" else IBN
        replacement: nn.Module = factory.from_batchnorm(
            module, ratio=site.ratio, order=site.order or "in_first"
        )
    elif site.kind == KIND_IN:
        replacement = instance_norm_from_batchnorm(module)
    else:  # pragma: no cover - guarded by ConversionSite
        raise ConversionError(f"unknown site kind {site.kind!r}")
    parent_name, child = _split_name(site.name)
    setattr(_get(model, parent_name), child, replacement)


def _insert_post_add_in(model: nn.Module, site: ConversionSite) -> None:
    """Rewrite block ``site.name``'s parent so an IN runs right after its residual addition."""
    block_name, child = _split_name(site.name)
    block = _get(model, block_name)
    if hasattr(block, child):
        raise ConversionError(f"{block_name} already has a submodule {child!r}")
    graph_module = trace(block)
    graph = graph_module.graph
    adds = [
        node
        for node in graph.nodes
        if node.op == "call_function"
        and node.target in _ADD_TARGETS
        and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2
    ]
    if not adds:
        raise ConversionError(f"{block_name} has no residual addition to put an IN after")
    add = adds[-1]
    reference = next(block.parameters())
    norm = nn.InstanceNorm2d(
        site.channels,
        affine=True,
        track_running_stats=False,
        device=reference.device,
        dtype=reference.dtype,
    )
    graph_module.add_submodule(child, norm)
    with graph.inserting_after(add):
        in_node = graph.call_module(child, (add,))
    add.replace_all_uses_with(in_node, delete_user_cb=lambda user: user is not in_node)
    graph.lint()
    graph_module.recompile()
    graph_module.train(block.training)
    parent_name, block_child = _split_name(block_name)
    setattr(_get(model, parent_name), block_child, graph_module)
