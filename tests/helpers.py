"""Helpers shared by tests (and benchmarks): deterministic, non-trivial norm parameters, every
spelling of a residual addition, image folders, crafted checkpoints and ONNX files for the
bad-input and security tests."""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn


class ResidualBlock(nn.Module):
    """A residual block written by hand (a user's own code, no timm/torchvision class)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def digits_search_argv(model: str | Path, out: str | Path, *extra: str) -> list[str]:
    """``ibnify search`` argv the CLI tests share: MODEL on digits, candidates ``a:1;b``, one
    epoch at lr 0.05, one shift, results in OUT; ``extra`` options come before ``--out``."""
    return [
        "search",
        str(model),
        "--dataset",
        "digits",
        "--candidates",
        "a:1;b",
        "--epochs",
        "1",
        "--lr",
        "0.05",
        "--shift",
        "brightness_down",
        *extra,
        "--out",
        str(out),
    ]


def digits_search_setup(**schedule: Any) -> tuple[nn.Module, Any, Any, Any]:
    """What the search tests share: a tiny digits ResNet (width 4) fine-tuned one epoch from
    seed 0, the digits train and test splits, and a CPU schedule at lr 0.05, seed 3 with
    ``schedule`` (e.g. ``epochs=2``) on top. The caller sets torch's threads."""
    from ibnify import finetune
    from ibnify.data.digits import digits_data
    from ibnify.models.small import digits_resnet
    from ibnify.train.config import FinetuneConfig

    torch.manual_seed(0)
    base = digits_resnet(width=4)
    train, val = digits_data("train"), digits_data("test")
    finetune(base, train, epochs=1, lr=0.1, quiet=True, device="cpu")
    config = FinetuneConfig(
        **{"epochs": 1, "lr": 0.05, "seed": 3, "quiet": True, "device": "cpu", **schedule}
    )
    return base, train, val, config


def run_digits_search(setup: tuple[Any, ...], out: Path | None, **kwargs: Any):
    """``search_placement`` on :func:`digits_search_setup`'s tuple: the tiny digits ResNet
    recorded as ``ibnify:digits_resnet`` width 4, the shifts brightness_down and contrast_down,
    results in ``out``; ``kwargs`` (``candidates``, ...) on top."""
    from ibnify.placement.search import search_placement

    base, train, val, config = setup
    options = {
        "config": config,
        "shifts": "brightness_down,contrast_down",
        "out_dir": out,
        "arch": "ibnify:digits_resnet",
        "model_kwargs": {"width": 4},
        **kwargs,
    }
    return search_placement(base, train, val, **options)


def class_folders(root: Path, classes: int, per_class: int = 4, size: int = 16) -> Path:
    """An image folder of ``classes`` classes, ``per_class`` noisy images each whose mean
    colour tells the class apart (seeded): a small labelled set a search can learn."""
    generator = np.random.default_rng(0)
    for index in range(classes):
        folder = root / f"class{index}"
        folder.mkdir(parents=True)
        colour = np.array([(index * 97) % 256, (index * 53 + 80) % 256, (200 - index * 61) % 256])
        for item in range(per_class):
            noise = generator.integers(-40, 40, size=(size, size, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{item}.png")
    return root


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


def craft_checkpoint(base: Path, target: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """Copy ``base`` to ``target`` with its recipe changed by ``change``."""
    with safe_open(str(base), framework="pt") as handle:
        metadata = dict(handle.metadata())
    recipe = json.loads(metadata["ibnify_recipe"])
    change(recipe)
    metadata["ibnify_recipe"] = json.dumps(recipe)
    save_file(load_file(str(base)), str(target), metadata=metadata)
    return target


def write_onnx_traps(folder: Path) -> dict[str, Path]:
    """ONNX files a stranger might send: ``outside`` keeps its weights in ``../secret.bin``,
    ``domain`` uses an op of a domain onnxruntime lacks, ``inside`` keeps its weights in
    ``w.bin`` beside it (legitimate). Each computes ``x + w`` with ``w = [1, 2, 3]``."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.array([1.0, 2.0, 3.0], dtype=np.float32).reshape(1, 3, 1, 1)

    def model(name: str, location: str | None, op: tuple[str, str] = ("Add", "")) -> Path:
        tensor = numpy_helper.from_array(weights, "w")
        if location is not None:
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / name / location).parent.mkdir(parents=True, exist_ok=True)
            (folder / name / location).write_bytes(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", "0"), ("length", "12")):
                tensor.external_data.add(key=key, value=value)
        node = helper.make_node(op[0], ["x", "w"], ["y"], domain=op[1])
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])
        graph = helper.make_graph([node], "trap", [x], [y], [tensor])
        imports = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(op[1], 1)] if op[1] else [])
        proto = helper.make_model(graph, opset_imports=imports, ir_version=8)
        path = folder / name / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(proto.SerializeToString())
        return path

    return {
        "outside": model("outside", "../secret.bin"),
        "domain": model("domain", None, ("Pwn", "com.example.custom")),
        "inside": model("inside", "w.bin"),
    }


# Python internals that mean nothing to a user: addresses, builtin/function/class reprs.
_INTERNALS = re.compile(r"0x[0-9a-f]{6,}|<built-in|<function |<bound method|<class '| object at ")


def message_problems(stderr: str) -> list[str]:
    """Lines that show Python internals, and lines printed more than once."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    shown = [line for line in lines if _INTERNALS.search(line)]
    repeated = sorted({line for line in lines if lines.count(line) > 1})
    return shown + [f"repeated: {line}" for line in repeated]
