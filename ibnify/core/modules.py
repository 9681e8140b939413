"""Facts about a model as a whole, decided once: where it lives and how its modes come back.

Every part of ibnify that runs a caller's model (analysis, evaluation, fine-tuning, divergence,
adaptation, export) finds its device with :func:`device_of` and leaves each submodule's own
train/eval flag as it found it with :func:`modes_restored`, so a frozen BN kept in eval mode
inside a training model stays in eval mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "class_path",
    "device_of",
    "eval_mode",
    "modes_restored",
    "submodule_or_none",
    "unwrap",
]


def device_of(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of ``model``'s first parameter, else of its first buffer, else ``default``."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device(default)


@contextmanager
def modes_restored(*models: nn.Module | None, requires_grad: bool = False) -> Iterator[None]:
    """On exit, give every submodule of ``models`` its own train/eval flag back (and, with
    ``requires_grad``, every parameter its ``requires_grad``), also when the body raises.

    ``None`` entries are skipped (an optional teacher). Each module's flag is restored, not only
    the top one's: ``model.train(was)`` would put a deliberately frozen BN back in train mode.
    """
    modes = [(module, module.training) for m in models if m is not None for module in m.modules()]
    flags = (
        [(param, param.requires_grad) for m in models if m is not None for param in m.parameters()]
        if requires_grad
        else []
    )
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, flag in flags:
            param.requires_grad_(flag)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    with modes_restored(model):
        model.eval()
        yield


def submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    """``model.get_submodule(name)``, or None where ``model`` has no module of that name."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The model inside ``torch.compile``, ``DataParallel`` or ``DistributedDataParallel``
    wrappers (nested ones too), and the outermost wrapper's name (None for a plain model).

    Conversion works on the module a user built: a compiled wrapper's graph would be stale after
    surgery and a parallel wrapper's keys carry ``module.``. Wrap the converted model again.
    """
    wrapper = None
    while True:
        if isinstance(model, _WRAPPERS):
            inner, name = model.module, type(model).__name__
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            inner, name = model._orig_mod, "torch.compile"
        else:
            return model, wrapper
        wrapper = wrapper or name
        model = inner


def class_path(model: nn.Module) -> str:
    """``module.QualName`` of ``model``'s class: how a recipe names a base no registry builds."""
    kind = type(model)
    return f"{kind.__module__}.{kind.__qualname__}"
