"""Apply a ConversionPlan to a model: module swaps, and an fx rewrite for post-addition IN.

The result is an ordinary ``nn.Module``: train/eval, CPU/CUDA, ``torch.compile``, deepcopy and
``state_dict`` round trips all work. The same base model and plan always give the same structure.
"""

from __future__ import annotations

import copy

from torch import fx, nn

from ..errors import ConversionError
from .layers import IBN, IBNAct, batchnorm_channels, instance_norm_from_batchnorm
from .ops import BATCHNORM_KINDS, NormKind, OpKind, classify, is_in_place, norm_kind
from .plans import ConversionPlan, ConversionSite, SiteKind
from .recipe import Recipe, get_recipe, set_recipe
from .tracing import trace

__all__ = ["apply_plan", "get_plan"]

# The BatchNorm kinds whose forward ibnify knows, and the IBN class that replaces each.
_IBN_CLASS = {
    NormKind.BATCHNORM: IBN,
    NormKind.BATCHNORM_ACT: IBNAct,
    NormKind.FROZEN_BATCHNORM: IBN,
    NormKind.FROZEN_BATCHNORM_ACT: IBNAct,
}


def get_plan(model: nn.Module) -> ConversionPlan | None:
    """The last plan a model was converted with, or None for a model ibnify did not convert.

    Every plan applied, in order, is in the model's :class:`~ibnify.core.recipe.Recipe`.
    """
    recipe = get_recipe(model)
    return None if recipe is None else recipe.plan


def apply_plan(model: nn.Module, plan: ConversionPlan, inplace: bool = False) -> nn.Module:
    """Return ``model`` converted by ``plan`` (a deep copy unless ``inplace``).

    ``plan`` is appended to the model's recipe (a model converted twice records both plans).
    A model without a recipe starts one with no source (``ibnify.convert`` fills it in) and
    the constructor arguments a plan of ibnify 0.1.0 kept in ``extras["model_kwargs"]``.

    Raises:
        ConversionError: a site is missing, already converted, has other channels than planned,
            or is a BatchNorm subclass whose forward ibnify does not know.
    """
    target = model if inplace else copy.deepcopy(model)
    for site in plan.sites:
        if site.kind == SiteKind.POST_ADD_IN:
            _insert_post_add_in(target, site)
        else:
            _swap_norm(target, site)
    recipe = get_recipe(target) or Recipe(model_kwargs=plan.extras.get("model_kwargs") or {})
    set_recipe(target, recipe.with_plan(plan))
    return target


def _split_name(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConversionError(f"the model has no layer named {name!r}") from None


def _swap_norm(model: nn.Module, site: ConversionSite) -> None:
    """Replace the BatchNorm at ``site`` by an IBN or an InstanceNorm2d (weights transferred)."""
    module = _get(model, site.name)
    kind = norm_kind(module)
    if kind == NormKind.IBN:
        raise ConversionError(f"{site.name} is already an IBN layer")
    if kind not in BATCHNORM_KINDS:
        raise ConversionError(
            f"{site.name} is a {type(module).__name__}, not a BatchNorm; the plan does not fit "
            "this model"
        )
    if kind not in _IBN_CLASS:
        raise ConversionError(
            f"{site.name} is a {type(module).__name__}, a BatchNorm subclass whose forward "
            "ibnify does not know; refusing to replace it"
        )
    channels = batchnorm_channels(module)
    if channels != site.channels:
        raise ConversionError(
            f"{site.name} has {channels} channels, the plan expects {site.channels}"
        )
    if site.kind == SiteKind.IBN:
        replacement: nn.Module = _IBN_CLASS[kind].from_batchnorm(
            module, ratio=site.ratio, order=site.order or "in_first"
        )
    elif site.kind == SiteKind.IN:
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
    adds = [node for node, kind in classify(graph_module).items() if kind == OpKind.ADD]
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
    # a block whose parameters are all frozen (a frozen backbone stage) gets a frozen IN too
    norm.requires_grad_(any(p.requires_grad for p in block.parameters()))
    graph_module.add_submodule(child, norm)
    with graph.inserting_after(add):
        in_node = graph.call_module(child, (add,))
    _read_after(add, in_node)
    graph.lint()
    graph_module.recompile()
    _keep_modes(graph_module, block)
    parent_name, block_child = _split_name(block_name)
    setattr(_get(model, parent_name), block_child, graph_module)


def _keep_modes(graph_module: fx.GraphModule, block: nn.Module) -> None:
    """Give every module of the rewritten block the train/eval flag it had in ``block``.

    ``graph_module.train(block.training)`` would put a deliberately frozen (eval) BN inside a
    training block back in train mode; containers fx rebuilt and the new IN follow the block.
    """
    own = dict(block.named_modules())
    for name, module in graph_module.named_modules():
        module.training = own[name].training if name in own else block.training


def _read_after(add: fx.Node, in_node: fx.Node) -> None:
    """Make every later reader of the sum read ``in_node`` instead.

    ``out = out + identity`` (and ``out += identity``, which fx records the same way) hands the
    sum on as the add node's value; ``out.add_(identity)`` hands it on through the mutated first
    operand, which later nodes read. Both are redirected.
    """
    add.replace_all_uses_with(in_node, delete_user_cb=lambda user: user is not in_node)
    if is_in_place(add):
        mutated = add.args[0]
        order = {node: i for i, node in enumerate(add.graph.nodes)}
        for user in list(mutated.users):  # type: ignore[union-attr]
            if user is not add and user is not in_node and order[user] > order[add]:
                user.replace_input_with(mutated, in_node)  # type: ignore[arg-type]
