"""Helpers shared by tests (and benchmarks): deterministic, non-trivial norm parameters, and
every spelling of a residual addition."""

from __future__ import annotations

import operator
from pathlib import Path

import torch
from PIL import Image
from torch import nn


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm non-trivial affine parameters and running statistics.

    With default init (gamma 1, beta 0, mean 0, var 1) a broken weight transfer or BN fold can
    still look right; random values make such bugs show up in the outputs.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.InstanceNorm2d):
                if module.affine:
                    n = module.num_features
                    module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                    module.bias.copy_(0.4 * torch.rand(n, generator=generator) - 0.2)
                if module.track_running_stats and module.running_mean is not None:
                    n = module.num_features
                    module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                    module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
    return model


# Every spelling of a residual addition ``a + b`` (the sum is what each returns).
def _plus(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


def _augmented(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a += b
    return a


def _inplace_method(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a.add_(b)  # the sum is handed on through the mutated tensor, not the call's value
    return a


ADD_SPELLINGS = {
    "plus": _plus,
    "augmented": _augmented,
    "add_": _inplace_method,
    "add": lambda a, b: a.add(b),
    "torch.add": lambda a, b: torch.add(a, b),
    "Tensor.add": lambda a, b: torch.Tensor.add(a, b),
    "operator.add": lambda a, b: operator.add(a, b),
    "operator.iadd": lambda a, b: operator.iadd(a, b),
    "radd": lambda a, b: b.__radd__(a),
}


def bad_class_folders(root: Path) -> dict[str, Path]:
    """Image folders for bad-input cases: ``a`` (cat, dog) and ``b`` (cat, fox) whose class
    sets differ, and ``empty`` with no images; one 16×16 image per class."""
    folders = {"a": root / "a", "b": root / "b", "empty": root / "empty"}
    folders["empty"].mkdir()
    for folder, classes in ((folders["a"], ("cat", "dog")), (folders["b"], ("cat", "fox"))):
        for name in classes:
            (folder / name).mkdir(parents=True)
            Image.new("RGB", (16, 16), (90, 20, 200)).save(folder / name / "x.png")
    return folders
