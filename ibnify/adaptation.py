"""AdaBN: re-estimate every BatchNorm's running statistics on unlabelled target images.

IN halves need nothing at test time, but the BN halves (and every other BN) still carry the
source's statistics. Re-estimating them on target images (AdaBN, Li et al. 2016), optionally
mixed with the source's (the "prior" BN of Schneider et al. 2020), removes the dataset-level
shift that IN leaves. Only norm buffers change: the forward passes run without gradients, every
module stays in eval mode (dropout off), and each BN normalises with its batch's statistics
(mixed with the prior), as train mode would. The statistics are a cumulative average over the
batches (``momentum=None``): ``new = prior * source + (1 - prior) * target``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ._io import check_output_path
from .core.modules import device_of, eval_mode
from .core.ops import is_frozen_batchnorm
from .core.recipe import get_recipe, with_adaptation
from .data.images import DataError, ImageData, Normalize
from .data.sources import as_image_data
from .errors import InvalidOptionError
from .evaluation import RobustnessReport, evaluate
from .models.checkpoint import input_size_for, load, save

__all__ = [
    "AdaptOptions",
    "AdaptResult",
    "adapt",
    "adapt_file",
    "adaptable_norms",
    "adaptations",
    "check_prior",
]


@dataclass(frozen=True)
class AdaptOptions:
    """How :func:`adapt` estimates the target statistics.

    ``images``: at most this many target images (a seeded random choice; None = all).
    ``prior``: weight of the source statistics in [0, 1] (0 = target only, 1 = no change).
    """

    images: int | None = None
    prior: float = 0.0
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_prior(self.prior)
        if self.images is not None and (not isinstance(self.images, int) or self.images < 1):
            raise InvalidOptionError(f"images must be a positive whole number, got {self.images}")
        if self.batch_size < 2:
            raise InvalidOptionError("batch size must be at least 2 to estimate a variance")

    def record(self, used: int, data_name: str) -> dict[str, Any]:
        """What a checkpoint records about this adaptation."""
        return {"kind": "adabn", "data": data_name, "images": used, "prior": self.prior,
                "batch_size": self.batch_size, "seed": self.seed}  # fmt: skip


def check_prior(prior: Any) -> float:
    """``prior`` as a float in [0, 1]; InvalidOptionError otherwise."""
    try:
        value = float(prior)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"prior must be a number between 0 and 1, got {prior!r}") from None
    if not 0.0 <= value <= 1.0:
        raise InvalidOptionError(f"prior must be between 0 and 1, got {prior!r}")
    return value


def adaptable_norms(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm with running statistics: BatchNorm (plain, sync, timm's) and frozen BN."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.track_running_stats and module.running_mean is not None:
                found[name] = module
        elif is_frozen_batchnorm(module):
            found[name] = module
    return found


class _Statistics:
    """One norm's source statistics and the running sums of its target batch statistics."""

    def __init__(self, module: nn.Module, prior: float) -> None:
        self.module = module
        self.prior = prior
        self.source_mean = module.running_mean.detach().clone()
        self.source_var = module.running_var.detach().clone()
        self.mean_sum = torch.zeros_like(self.source_mean, dtype=torch.float64)
        self.var_sum = torch.zeros_like(self.source_var, dtype=torch.float64)
        self.batches = 0

    def hook(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        """Before the norm runs: record the batch's statistics and normalise with them."""
        x = inputs[0].detach()
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims)
        biased = x.var(dim=dims, unbiased=False)
        count = x.numel() // x.shape[1]
        unbiased = biased * count / max(count - 1, 1)
        self.mean_sum += mean.double()
        self.var_sum += unbiased.double()
        self.batches += 1
        # train mode normalises with the biased batch variance, and records the unbiased one
        self._set(self._mix(self.source_mean, mean), self._mix(self.source_var, biased))

    def _mix(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.prior * source + (1.0 - self.prior) * target.to(source.dtype)

    def _set(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.module.running_mean.copy_(mean)
        self.module.running_var.copy_(var)

    def finish(self) -> None:
        """Write ``prior * source + (1 - prior) * cumulative target mean`` into the buffers."""
        if self.batches == 0:  # a norm the forward never reached keeps its statistics
            self._set(self.source_mean, self.source_var)
            return
        mean = (self.mean_sum / self.batches).to(self.source_mean.dtype)
        var = (self.var_sum / self.batches).to(self.source_var.dtype)
        self._set(self._mix(self.source_mean, mean), self._mix(self.source_var, var))


@contextmanager
def _recording(norms: dict[str, nn.Module], prior: float) -> Iterator[list[_Statistics]]:
    stats = [_Statistics(module, prior) for module in norms.values()]
    handles = [s.module.register_forward_pre_hook(s.hook) for s in stats]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def _target_subset(data: ImageData, options: AdaptOptions) -> Any:
    total = len(data)
    if total == 0:
        raise DataError(f"the target data {data.name!r} holds no images")
    if options.images is None or options.images >= total:
        return data.dataset
    generator = torch.Generator().manual_seed(options.seed)
    chosen = torch.randperm(total, generator=generator)[: options.images].sort().values
    return Subset(data.dataset, chosen.tolist())


@torch.no_grad()
def adapt(
    model: nn.Module,
    data: ImageData | str | os.PathLike[str],
    images: int | None = None,
    prior: float = 0.0,
    *,
    batch_size: int = 64,
    seed: int = 0,
    input_size: Sequence[int] | None = None,
) -> nn.Module:
    """An adapted copy of ``model``: its BN statistics re-estimated on target ``data`` (AdaBN).

    Args:
        model: a converted or unconverted model (left unchanged).
        data: target images (labels are not used), or an image folder path.
        images: at most this many images (a seeded random choice); default all.
        prior: weight of the source statistics: ``new = prior * source + (1 - prior) * target``
            (0 = AdaBN, 1 = no change).
        batch_size: images per forward pass (each BN normalises with its batch's statistics).
        input_size: (C, H, W) a folder's images are brought to (default: the model's).

    Only ``running_mean``/``running_var`` change; every parameter stays bit-identical. A model
    ibnify converted records the adaptation in its recipe, so a saved checkpoint carries it.
    """
    options = AdaptOptions(images, check_prior(prior), batch_size, seed)
    target_data = as_image_data(data, model, "test", seed=seed, input_size=input_size)
    adapted = copy.deepcopy(model)
    norms = adaptable_norms(adapted)
    if not norms:
        raise InvalidOptionError("the model has no BatchNorm statistics to adapt")
    subset = _target_subset(target_data, options)
    used = len(subset)
    if options.prior < 1.0:
        device = device_of(adapted)
        normalize = Normalize(target_data.mean, target_data.std).to(device)
        loader = DataLoader(subset, batch_size=options.batch_size, shuffle=False)
        with eval_mode(adapted), _recording(norms, options.prior) as stats:
            for batch, _labels in loader:
                adapted(normalize(batch.float().to(device)))
            for entry in stats:
                entry.finish()
    adapted.train(model.training)
    with_adaptation(adapted, options.record(used, target_data.name))
    return adapted


def adaptations(model: nn.Module) -> list[dict[str, Any]]:
    """The adaptations recorded in a model's recipe (oldest first)."""
    recipe = get_recipe(model)
    return [] if recipe is None else [dict(entry) for entry in recipe.adaptations]


@dataclass
class AdaptResult:
    """What :func:`adapt_file` did: the adapted model, the file written, a before/after report
    on the target data when it has labels (None without)."""

    model: nn.Module
    path: Path
    images: int
    report: RobustnessReport | None = None


def adapt_file(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    output: str | os.PathLike[str],
    options: AdaptOptions | None = None,
    *,
    input_size: Sequence[int] | None = None,
    force: bool = False,
) -> AdaptResult:
    """What ``ibnify adapt`` does: load a checkpoint, adapt it on a target folder, save a copy.

    The source checkpoint is never written; ``output`` must be a new ``.safetensors`` file
    (or ``force``). With class sub-folders the result carries a before/after accuracy report.
    """
    options = options or AdaptOptions()
    target_path = _check_output(checkpoint, output, force)
    size = input_size_for(checkpoint, input_size)
    model = load(checkpoint)
    target = as_image_data(data, model, "test", seed=options.seed, input_size=size)
    adapted = adapt(model, target, options.images, options.prior, batch_size=options.batch_size,
                    seed=options.seed)  # fmt: skip
    report = None
    if target.labelled:
        report = evaluate({"before": model, "after": adapted}, target, shifts="none")
    save(adapted, target_path)
    return AdaptResult(adapted, target_path, len(_target_subset(target, options)), report)


def _check_output(
    checkpoint: str | os.PathLike[str], output: str | os.PathLike[str], force: bool
) -> Path:
    """The output path, refused before any work: not the source, a ``.safetensors`` name."""
    target = Path(output)
    if target.suffix.lower() != ".safetensors":
        raise InvalidOptionError(
            f"output {str(target)!r} is not a .safetensors file name (ibnify checkpoints are "
            "safetensors)"
        )
    source = Path(checkpoint)
    if source.exists() and target.exists() and source.resolve() == target.resolve():
        raise InvalidOptionError(
            "the output is the source checkpoint; write the adapted model to a new file"
        )
    return check_output_path(target, force=force)
