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

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..core.modules import eval_mode
from ..core.ops import NormKind, is_frozen_batchnorm, norm_kind

__all__ = ["adaptable_norms", "estimate_statistics", "native_recording", "recording"]

# Norms whose own train-mode forward is known to be torch's (normalise with the batch's biased
# variance, record the unbiased one; ``momentum=None``: the cumulative average): with no prior
# they estimate in their fused kernel, about half the cost of the hook's extra reductions.
_NATIVE_KINDS = frozenset({NormKind.BATCHNORM, NormKind.BATCHNORM_ACT})


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
        self.finished = False

    def hook(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        """Before the norm runs: record the batch's statistics and normalise with them."""
        x = inputs[0].detach()
        dims = [0, *range(2, x.dim())]
        biased, mean = torch.var_mean(x, dim=dims, unbiased=False)  # one pass over x
        count = x.numel() // x.shape[1]
        unbiased = biased * count / max(count - 1, 1)
        self.mean_sum += mean.double()
        self.var_sum += unbiased.double()
        self.batches += 1
        # train mode normalises with the biased batch variance, and records the unbiased one
        self._set(self._mix(self.source_mean, mean), self._mix(self.source_var, biased))

    def restore(self) -> None:
        """The source statistics back in the buffers."""
        self._set(self.source_mean, self.source_var)

    def _mix(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.prior * source + (1.0 - self.prior) * target.to(source.dtype)

    def _set(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.module.running_mean.copy_(mean)
        self.module.running_var.copy_(var)

    def finish(self) -> None:
        """Write ``prior * source + (1 - prior) * cumulative target mean`` into the buffers."""
        self.finished = True
        if self.batches == 0:  # a norm the forward never reached keeps its statistics
            self._set(self.source_mean, self.source_var)
            return
        mean = (self.mean_sum / self.batches).to(self.source_mean.dtype)
        var = (self.var_sum / self.batches).to(self.source_var.dtype)
        self._set(self._mix(self.source_mean, mean), self._mix(self.source_var, var))


@contextmanager
def recording(norms: dict[str, nn.Module], prior: float) -> Iterator[list[_Statistics]]:
    """While open, every norm of ``norms`` normalises with its batch's statistics (mixed with
    ``prior``) and records them; the caller calls ``finish`` on each entry to keep the
    estimate. An entry not finished gets its source statistics back on exit."""
    stats = [_Statistics(module, prior) for module in norms.values()]
    handles = [s.module.register_forward_pre_hook(s.hook) for s in stats]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        for entry in stats:
            if not entry.finished:
                entry.restore()


@contextmanager
def native_recording(norms: Iterable[nn.Module]) -> Iterator[None]:
    """While open, each norm (of a kind in ``_NATIVE_KINDS``) runs its own train-mode forward
    with ``momentum=None`` from reset statistics; on exit its momentum and batch count come
    back, and a norm no batch reached (or a body that raised) gets its source statistics back."""
    saved = [
        (
            m,
            m.momentum,
            m.running_mean.clone(),
            m.running_var.clone(),
            m.num_batches_tracked.clone(),
        )
        for m in norms
    ]
    completed = False
    try:
        for module, *_rest in saved:
            module.momentum = None
            module.reset_running_stats()
            module.training = True  # the norm only: timm's act/drop children stay in eval
        yield
        completed = True
    finally:
        for module, momentum, mean, var, count in saved:
            if not completed or int(module.num_batches_tracked) == 0:
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)
            module.momentum = momentum
            module.num_batches_tracked.copy_(count)


def _native(module: nn.Module, prior: float) -> bool:
    return (
        prior == 0.0
        and norm_kind(module) in _NATIVE_KINDS
        and getattr(module, "num_batches_tracked", None) is not None
    )


@torch.no_grad()
def estimate_statistics(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    prior: float,
    on_logits: Callable[[torch.Tensor], None] | None = None,
) -> int:
    """Re-estimate ``model``'s BN statistics in place over ``batches`` (normalised inputs on
    its device); every module in eval mode, modes restored. Returns the batches seen.

    ``on_logits`` sees each batch's output (the collapse check reads the predictions)."""
    norms = adaptable_norms(model)
    native = [m for m in norms.values() if _native(m, prior)]
    hooked = {name: m for name, m in norms.items() if not _native(m, prior)}
    seen = 0
    with eval_mode(model), native_recording(native), recording(hooked, prior) as stats:
        for batch in batches:
            output = model(batch)
            if on_logits is not None:
                on_logits(output)
            seen += 1
        for entry in stats:
            entry.finish()
    return seen
