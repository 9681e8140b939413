"""The classifier head: find it, read its class count, give it a fresh head of another size.

Fine-tuning a pretrained model on one's own classes starts by replacing the last linear layer,
as timm's ``reset_classifier`` does. timm models use their own ``reset_classifier``; for other
models (torchvision, ibnify's small models) the head is the last ``nn.Linear`` when it is also
the last module with parameters (resnet ``fc``; densenet, vgg, mobilenet, efficientnet
``classifier[-1]``; inception ``fc``), or squeezenet's 1×1 ``classifier`` convolution.
Auxiliary heads (inception ``AuxLogits.fc``, googlenet ``aux1.fc2``) of the same size are reset
with it. Detection and segmentation models have no single classifier head.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from torch import nn

from ..core.recipe import get_recipe, set_recipe
from ..errors import InvalidOptionError

__all__ = [
    "classifier_name",
    "num_classes_of",
    "reset_classifier",
    "with_classifier",
]

_NO_HEAD_PACKAGES = ("torchvision.models.detection", "torchvision.models.segmentation")


def _is_timm_classifier(model: nn.Module) -> bool:
    return callable(getattr(model, "reset_classifier", None)) and callable(
        getattr(model, "get_classifier", None)
    )


def _name_of(model: nn.Module, module: object) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module and name:
            return name
    return None


def _head_like(name: str, module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # squeezenet: Conv2d(512, num_classes, 1) inside ``classifier``.
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and name.split(".")[0] == "classifier"
    )


def _is_aux(name: str) -> bool:
    return "aux" in name.split(".")[0].lower()


def classifier_name(model: nn.Module) -> str | None:
    """Qualified name of ``model``'s classifier head (``"fc"``, ``"classifier.6"``), or None."""
    if type(model).__module__.startswith(_NO_HEAD_PACKAGES):
        return None
    if _is_timm_classifier(model):
        head = model.get_classifier()
        if isinstance(head, tuple):  # distilled ViTs: (head, head_dist)
            head = head[0]
        name = _name_of(model, head)
        if name is not None and isinstance(head, nn.Linear | nn.Conv2d):
            return name
    leaves = [
        (name, module)
        for name, module in model.named_modules()
        if name and not list(module.children()) and any(True for _ in module.parameters(False))
    ]
    leaves = [(name, module) for name, module in leaves if not _is_aux(name)]
    if not leaves:
        return None
    name, module = leaves[-1]
    return name if _head_like(name, module) else None


def num_classes_of(model: nn.Module) -> int | None:
    """The number of outputs of ``model``'s classifier head, or None when it has no head."""
    name = classifier_name(model)
    if name is None:
        return None
    head = model.get_submodule(name)
    return int(head.out_features if isinstance(head, nn.Linear) else head.out_channels)


def _fresh_like(head: nn.Module, num_classes: int) -> nn.Module:
    """A freshly initialised layer of ``head``'s kind, device and dtype with ``num_classes``."""
    weight = head.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(head, nn.Linear):
        return nn.Linear(head.in_features, num_classes, bias=head.bias is not None, **factory)
    return nn.Conv2d(head.in_channels, num_classes, 1, bias=head.bias is not None, **factory)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _record_num_classes(model: nn.Module, num_classes: int) -> None:
    """Write the new class count where the model and its ibnify recipe keep it.

    A converted model's recipe gets ``model_kwargs["num_classes"]``, so that ``ibnify.save``
    records it and ``ibnify.load`` rebuilds the base model with a head of that size.
    """
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "num_classes" in cfg:
        model.pretrained_cfg = {**cfg, "num_classes": num_classes}
    recipe = get_recipe(model)
    if recipe is not None:
        kwargs = {**recipe.model_kwargs, "num_classes": num_classes}
        set_recipe(model, replace(recipe, model_kwargs=kwargs, num_classes=num_classes))


def reset_classifier(model: nn.Module, num_classes: int) -> str:
    """Give ``model`` a fresh classifier head of ``num_classes`` outputs IN PLACE; return its name.

    For models ibnify built or loaded itself; public functions call it on a copy (see
    :func:`with_classifier`). A converted model's recipe records the new ``num_classes``, so its
    saved file loads back. Raises InvalidOptionError (one line) when there is no head.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidOptionError(f"num_classes must be a positive integer, got {num_classes!r}")
    name = classifier_name(model)
    if name is None:
        raise InvalidOptionError(
            f"{type(model).__name__} has no classifier head (a final linear layer) to give "
            f"{num_classes} classes"
        )
    if _is_timm_classifier(model):
        model.reset_classifier(num_classes)
        new_name = classifier_name(model)
        if new_name is None:
            raise InvalidOptionError(f"{type(model).__name__}: timm left no classifier head")
        _record_num_classes(model, num_classes)
        return new_name
    old = model.get_submodule(name)
    old_size = num_classes_of(model)
    _set_submodule(model, name, _fresh_like(old, num_classes))
    for aux_name, module in list(model.named_modules()):
        if _is_aux(aux_name) and isinstance(module, nn.Linear) and module.out_features == old_size:
            _set_submodule(model, aux_name, _fresh_like(module, num_classes))
    _record_num_classes(model, num_classes)
    return name


def with_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """A deep copy of ``model`` with a fresh ``num_classes`` head; ``model`` is left as it was."""
    result = copy.deepcopy(model)
    reset_classifier(result, num_classes)
    return result
