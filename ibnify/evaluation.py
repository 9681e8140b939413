"""Accuracy on clean data and under appearance shifts, for several models side by side.

The shifts act on pixel values in [0, 1], before the model's normalisation, as a camera or a
different domain would: brightness and contrast up and down, the IBN-Net paper's colour offsets
(RGB +50 and R +50 on a 0-255 scale), gamma, blur and noise. They are deterministic (noise uses a
fixed seed per batch), so a table can be reproduced exactly. IN removes per-channel scale and
offset of its input, so a model with IN in its shallow layers should lose less accuracy under
the photometric shifts than its all-BN twin.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ._report import markdown_table, new_figure, save_png
from .data.images import ImageData, Normalize
from .data.shifts import CLEAN, SHIFT_DESCRIPTIONS, apply_shift, parse_shifts
from .data.sources import check_data_source, resolve_data_source
from .errors import InvalidOptionError
from .models.checkpoint import load

__all__ = [
    "RobustnessReport",
    "accuracy",
    "evaluate",
    "evaluate_files",
]


def _loader(data: ImageData, batch_size: int, workers: int = 0) -> DataLoader:
    return DataLoader(data.dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def accuracy(
    model: nn.Module,
    data: ImageData,
    shift: str = CLEAN,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> float:
    """Top-1 accuracy of ``model`` on labelled ``data`` under ``shift``; restores train mode."""
    shifts = () if shift == CLEAN else (shift,)
    report = evaluate(
        {"model": model}, data, shifts=shifts, batch_size=batch_size, device=device, seed=seed
    )
    return report.accuracy["model"][shift]


@dataclass
class RobustnessReport:
    """Accuracy per model and shift (fractions in [0, 1]); ``clean`` is the reference."""

    models: list[str]
    shifts: list[str]
    accuracy: dict[str, dict[str, float]]
    images: int = 0
    dataset: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def drop(self, model: str, shift: str) -> float:
        """Clean accuracy minus accuracy under ``shift`` (positive = worse), as a fraction."""
        return self.accuracy[model][CLEAN] - self.accuracy[model][shift]

    def mean_drop(self, model: str) -> float:
        """Mean drop over the report's shifts."""
        shifts = [s for s in self.shifts if s != CLEAN]
        return sum(self.drop(model, s) for s in shifts) / max(len(shifts), 1)

    def table(self) -> str:
        """Markdown table: one row per shift, one column per model, ``acc (drop)`` in %."""
        header = ["shift", *self.models]
        rows = []
        for shift in self.shifts:
            cells = [shift]
            for model in self.models:
                acc = 100 * self.accuracy[model][shift]
                if shift == CLEAN:
                    cells.append(f"{acc:.1f}")
                else:
                    cells.append(f"{acc:.1f} ({-100 * self.drop(model, shift):+.1f})")
            rows.append(cells)
        if len(self.shifts) > 1:
            rows.append(["mean drop", *(f"{-100 * self.mean_drop(m):+.1f}" for m in self.models)])
        return "\n".join(markdown_table(header, rows))

    def to_dict(self) -> dict[str, Any]:
        """Plain data: accuracies, drops (fractions) and the shift descriptions."""
        return {
            "dataset": self.dataset,
            "images": self.images,
            "models": list(self.models),
            "shifts": list(self.shifts),
            "accuracy": self.accuracy,
            "drop": {
                m: {s: self.drop(m, s) for s in self.shifts if s != CLEAN} for m in self.models
            },
            "descriptions": {s: SHIFT_DESCRIPTIONS.get(s, s) for s in self.shifts},
            **self.extras,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path: str | os.PathLike[str], title: str | None = None) -> Path:
        """Write a grouped bar chart of accuracy per shift (PNG, matplotlib Agg); atomic."""
        figure = new_figure(max(6.0, 0.9 * len(self.shifts) + 2), 4.0)
        axes = figure.add_subplot(1, 1, 1)
        count = len(self.models)
        width = 0.8 / max(count, 1)
        positions = range(len(self.shifts))
        for index, model in enumerate(self.models):
            values = [100 * self.accuracy[model][s] for s in self.shifts]
            offsets = [p - 0.4 + width * (index + 0.5) for p in positions]
            axes.bar(offsets, values, width=width, label=model)
        axes.set_xticks(list(positions))
        axes.set_xticklabels(self.shifts, rotation=30, ha="right")
        axes.set_ylabel("top-1 accuracy (%)")
        axes.set_ylim(0, 112)
        axes.set_yticks(range(0, 101, 20))
        axes.grid(axis="y", alpha=0.3)
        axes.set_title(title or f"accuracy under appearance shift ({self.dataset})")
        axes.legend(loc="upper center", ncol=max(count, 1), fontsize="small", frameon=False)
        return save_png(figure, path)


def _named_models(
    models: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module,
) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {"model": models}
    if isinstance(models, Mapping):
        return dict(models)
    return {f"model{i}": m for i, m in enumerate(models)}


def _device_of(model: nn.Module, default: torch.device) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else default


@torch.no_grad()
def evaluate(
    models: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module,
    data: ImageData,
    shifts: str | Sequence[str] | None = "all",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    workers: int = 0,
) -> RobustnessReport:
    """Top-1 accuracy of each model on ``data``, clean and under each shift.

    Args:
        models: ``{name: model}`` (the table's column names), a list, or one model.
        data: labelled images in [0, 1] with the mean/std the models expect.
        shifts: ``"all"``, a comma list or a sequence of shift/group names (see :data:`SHIFTS`).
        seed: seed of the noise shift.

    Every model sees exactly the same shifted pixels. Models are put in eval mode and restored.
    """
    named = _named_models(models)
    if not named:
        raise InvalidOptionError("no models to evaluate")
    if not data.labelled:
        raise InvalidOptionError("evaluation needs labelled data (class sub-folders)")
    shift_names = [CLEAN, *parse_shifts(shifts)]
    target = torch.device(device) if device is not None else _default_device()
    normalize = Normalize(data.mean, data.std).to(target)
    modes = {name: model.training for name, model in named.items()}
    correct = {name: dict.fromkeys(shift_names, 0) for name in named}
    total = 0
    try:
        for model in named.values():
            model.eval()
        for batch_index, (images, labels) in enumerate(_loader(data, batch_size, workers)):
            labels = labels.to(target)
            for shift in shift_names:
                shifted = apply_shift(shift, images.float(), seed=seed, batch_index=batch_index)
                inputs = normalize(shifted.to(target))
                for name, model in named.items():
                    logits = model(inputs.to(_device_of(model, target)))
                    correct[name][shift] += int((logits.argmax(1).to(target) == labels).sum())
            total += int(labels.shape[0])
    finally:
        for name, model in named.items():
            model.train(modes[name])
    if total == 0:
        raise InvalidOptionError("the evaluation data is empty")
    table = {name: {s: correct[name][s] / total for s in shift_names} for name in named}
    return RobustnessReport(list(named), shift_names, table, total, data.name)


def evaluate_files(
    checkpoints: Sequence[str | os.PathLike[str]],
    *,
    data: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    shifts: str | Sequence[str] | None = "all",
    batch_size: int = 256,
    seed: int = 0,
    workers: int = 0,
) -> RobustnessReport:
    """What ``ibnify evaluate`` does: load ibnify checkpoints and evaluate them side by side.

    Columns are named by file stem (with the parent folder where stems collide). ``data`` is an
    ImageFolder directory, transformed with timm's eval transform for the first model;
    ``dataset="digits"`` is the digits demo set's test split.
    """

    check_data_source(data, dataset)
    if not checkpoints:
        raise InvalidOptionError("give at least one checkpoint")
    parse_shifts(shifts)  # fail on a bad --shift before loading anything
    paths = [Path(p) for p in checkpoints]
    stems = [p.stem for p in paths]
    names = [
        f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 and p.parent.name else p.stem
        for p in paths
    ]
    names = [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]
    models = {name: load(path) for name, path in zip(names, paths, strict=True)}
    eval_data = resolve_data_source(data, dataset, next(iter(models.values())), split="test")
    return evaluate(
        models, eval_data, shifts=shifts, batch_size=batch_size, seed=seed, workers=workers
    )
