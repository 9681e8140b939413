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
from .core.modules import device_of, modes_restored
from .data.domains import load_domains
from .data.images import ImageData, Normalize
from .data.shifts import CLEAN, SHIFT_DESCRIPTIONS, apply_shift, parse_shifts
from .data.sources import as_image_data
from .errors import InvalidOptionError

__all__ = [
    "RobustnessReport",
    "accuracy",
    "evaluate",
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
    """Accuracy per model and shift (fractions in [0, 1]); ``clean`` is the reference.

    ``domains`` are labelled target-domain folders: their clean accuracy is stored in
    ``accuracy[model][domain]`` beside the shifts, and their image counts in ``domain_images``.
    """

    models: list[str]
    shifts: list[str]
    accuracy: dict[str, dict[str, float]]
    images: int = 0
    dataset: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)
    domain_images: dict[str, int] = field(default_factory=dict)

    def drop(self, model: str, shift: str) -> float:
        """Clean accuracy minus accuracy under ``shift`` or on a domain (positive = worse)."""
        return self.accuracy[model][CLEAN] - self.accuracy[model][shift]

    def mean_drop(self, model: str) -> float:
        """Mean drop over the report's shifts."""
        shifts = [s for s in self.shifts if s != CLEAN]
        return sum(self.drop(model, s) for s in shifts) / max(len(shifts), 1)

    def mean_domain_drop(self, model: str) -> float:
        """Mean drop over the target domains (0 without domains)."""
        return sum(self.drop(model, d) for d in self.domains) / max(len(self.domains), 1)

    def _cell(self, model: str, row: str) -> str:
        acc = 100 * self.accuracy[model][row]
        return f"{acc:.1f}" if row == CLEAN else f"{acc:.1f} ({-100 * self.drop(model, row):+.1f})"

    def table(self) -> str:
        """Markdown table: one row per shift and domain, one column per model, ``acc (drop)``."""
        header = ["shift", *self.models]
        rows = [[shift, *(self._cell(m, shift) for m in self.models)] for shift in self.shifts]
        if len(self.shifts) > 1:
            rows.append(["mean drop", *(f"{-100 * self.mean_drop(m):+.1f}" for m in self.models)])
        for domain in self.domains:
            rows.append([f"domain {domain}", *(self._cell(m, domain) for m in self.models)])
        if len(self.domains) > 1:
            drops = (f"{-100 * self.mean_domain_drop(m):+.1f}" for m in self.models)
            rows.append(["mean domain drop", *drops])
        return "\n".join(markdown_table(header, rows))

    def to_dict(self) -> dict[str, Any]:
        """Plain data: accuracies, drops (fractions) and the shift descriptions."""
        data = {
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
        if self.domains:
            data["domains"] = list(self.domains)
            data["domain_images"] = dict(self.domain_images)
            data["domain_drop"] = {
                m: {d: self.drop(m, d) for d in self.domains} for m in self.models
            }
        return data

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path: str | os.PathLike[str], title: str | None = None) -> Path:
        """Write a grouped bar chart of accuracy per shift (PNG, matplotlib Agg); atomic."""
        columns = [*self.shifts, *self.domains]
        figure = new_figure(max(6.0, 0.9 * len(columns) + 2), 4.0)
        axes = figure.add_subplot(1, 1, 1)
        count = len(self.models)
        width = 0.8 / max(count, 1)
        positions = range(len(columns))
        for index, model in enumerate(self.models):
            values = [100 * self.accuracy[model][s] for s in columns]
            offsets = [p - 0.4 + width * (index + 0.5) for p in positions]
            axes.bar(offsets, values, width=width, label=model)
        axes.set_xticks(list(positions))
        labels = [*self.shifts, *(f"domain {d}" for d in self.domains)]
        axes.set_xticklabels(labels, rotation=30, ha="right")
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


def _check_head(name: str, logits: torch.Tensor, num_classes: int | None) -> None:
    """InvalidOptionError when a model's class scores do not match the data's class count.

    A 5-class head scored on a 10-class folder would print a meaningless accuracy.
    """
    classes = int(logits.shape[1]) if logits.ndim == 2 else None
    if num_classes is None or classes == num_classes:
        return
    head = f"a {classes}-class head" if classes is not None else "no (batch, classes) output"
    raise InvalidOptionError(
        f"model {name!r} has {head} but the evaluation data has {num_classes} classes; "
        "evaluate it on images of the classes it was trained on"
    )


@dataclass(frozen=True)
class _Pass:
    """How the images are fed: batch size, the device they go to, noise seed, loader workers."""

    batch_size: int
    target: torch.device
    seed: int
    workers: int


def _count_correct(
    named: dict[str, nn.Module],
    data: ImageData,
    shift_names: Sequence[str],
    feed: _Pass,
) -> tuple[dict[str, dict[str, int]], int]:
    """Correct predictions per model and shift on ``data``, and the number of images."""
    target = feed.target
    normalize = Normalize(data.mean, data.std).to(target)
    correct = {name: dict.fromkeys(shift_names, 0) for name in named}
    total = 0
    for batch_index, (images, labels) in enumerate(_loader(data, feed.batch_size, feed.workers)):
        labels = labels.to(target)
        for shift in shift_names:
            shifted = apply_shift(shift, images.float(), seed=feed.seed, batch_index=batch_index)
            inputs = normalize(shifted.to(target))
            for name, model in named.items():
                logits = model(inputs.to(device_of(model, target)))
                _check_head(name, logits, data.num_classes)
                correct[name][shift] += int((logits.argmax(1).to(target) == labels).sum())
        total += int(labels.shape[0])
    return correct, total


@torch.no_grad()
def evaluate(
    models: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module,
    data: ImageData | str | os.PathLike[str],
    shifts: str | Sequence[str] | None = "all",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    workers: int = 0,
    *,
    domains: Mapping[str, ImageData | str | os.PathLike[str]] | None = None,
    input_size: Sequence[int] | None = None,
) -> RobustnessReport:
    """Top-1 accuracy of each model on ``data``, clean and under each shift, and on each domain.
    Reason: nine parameters, the public ``ibnify.evaluate`` keywords (``ibnify evaluate``'s).

    Args:
        models: ``{name: model}`` (the table's column names), a list, or one model.
        data: labelled images in [0, 1] with the mean/std the models expect, an image folder
            path, or ``"digits"``.
        shifts: ``"all"``, a comma list or a sequence of shift/group names (see :data:`SHIFTS`).
        seed: seed of the noise shift.
        domains: labelled target domains, ``{name: folder or ImageData}``, with the classes of
            ``data``: their clean accuracy is reported beside the shifts.
        input_size: (C, H, W) folders' images are brought to (default: the first model's).

    Every model sees exactly the same shifted pixels. Models are put in eval mode and restored.
    """
    # The argument checks come first, so that nothing runs on bad input.
    named = _named_models(models)
    if not named:
        raise InvalidOptionError("no models to evaluate")
    first = next(iter(named.values()))
    data = as_image_data(data, first, "test", input_size=input_size)
    if not data.labelled:
        raise InvalidOptionError("evaluation needs labelled data (class sub-folders)")
    shift_names = [CLEAN, *parse_shifts(shifts)]
    domain_data = load_domains(domains, first, data, input_size)
    target = torch.device(device) if device is not None else _default_device()
    feed = _Pass(batch_size, target, seed, workers)
    with modes_restored(*named.values()):
        for model in named.values():
            model.eval()
        return _measure(named, data, shift_names, domain_data, feed)


def _measure(
    named: dict[str, nn.Module],
    data: ImageData,
    shift_names: list[str],
    domain_data: Mapping[str, ImageData],
    feed: _Pass,
) -> RobustnessReport:
    """The report of models already in eval mode: ``data`` under every shift, then each
    domain clean."""
    correct, total = _count_correct(named, data, shift_names, feed)
    if total == 0:
        raise InvalidOptionError("the evaluation data is empty")
    table = {name: {s: correct[name][s] / total for s in shift_names} for name in named}
    counts = {}
    for domain, images in domain_data.items():
        found, counts[domain] = _count_correct(named, images, [CLEAN], feed)
        for name in named:
            table[name][domain] = found[name][CLEAN] / max(counts[domain], 1)
    return RobustnessReport(
        list(named),
        shift_names,
        table,
        total,
        data.name,
        domains=list(domain_data),
        domain_images=counts,
    )
