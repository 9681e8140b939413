"""Test-time entropy minimisation (TENT, Wang et al. 2021) on the BN *and* IN affine of a model.

Only the chosen norms' affine parameters learn: the BN layers' (every ``_BatchNorm``, the BN
halves of the IBN layers included) and/or the InstanceNorm layers' (the IN halves, an IBN-b
stem, an IN after a residual addition). While learning, every module is in eval mode except the
BatchNorm layers, which normalise with each batch's own statistics (as TENT does) without
touching their running buffers; frozen BN normalise with their batch's statistics through the
AdaBN hook. The loss is the mean prediction entropy over the batch's *reliable* samples, those
whose entropy is below ``e_margin * ln(C)`` (EATA's filter, Niu et al. 2022): a confident
sample sharpens, a confused one would only push the model towards arbitrary classes. The mean
prediction's entropy is watched, and one warning says when it falls below ``collapse * ln(C)``
(the predictions crowd into a few classes: a one-class target, or a rate too high).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..core.modules import modes_restored
from ..core.ops import is_frozen_batchnorm, is_instance_norm
from ..errors import InvalidOptionError
from .options import (
    COLLAPSE_FRACTION,
    DEFAULT_LR,
    E_MARGIN_FRACTION,
    NORM_CHOICES,
    AdaptOptions,
)
from .statistics import recording

__all__ = [
    "CollapseGuard",
    "EntropyStep",
    "OnlineAdapter",
    "adapting",
    "affine_parameters",
    "prediction_entropy",
    "resolve_norms",
]

logger = logging.getLogger(__name__)

MOMENTUM = 0.9  # TENT's SGD momentum


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the softmax prediction, in nats: ``-sum_c p_c log p_c``."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def _norm_family(module: nn.Module) -> str | None:
    """``"in"`` for an InstanceNorm, ``"bn"`` for a BatchNorm with learnable affine, else None."""
    if is_instance_norm(module):
        return "in"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn"
    return None


def _affine_by_family(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    found: dict[str, dict[str, nn.Parameter]] = {"bn": {}, "in": {}}
    for name, module in model.named_modules():
        family = _norm_family(module)
        if family is None or not getattr(module, "affine", False):
            continue
        for key in ("weight", "bias"):
            value = getattr(module, key, None)
            if isinstance(value, nn.Parameter):
                found[family][f"{name}.{key}" if name else key] = value
    return found


def resolve_norms(model: nn.Module, norms: str | None) -> str:
    """The norms ``norms`` means for ``model``: None is ``both`` where the model has IN affine,
    else ``bn``; ``both`` on a model without IN is ``bn``. InvalidOptionError where the choice
    leaves nothing to learn, with the choice that would."""
    if norms is not None and norms not in NORM_CHOICES:
        raise InvalidOptionError(f"norms must be one of {', '.join(NORM_CHOICES)}, got {norms!r}")
    found = _affine_by_family(model)
    if not found["bn"] and not found["in"]:
        frozen = any(is_frozen_batchnorm(m) for m in model.modules())
        why = (
            "its BatchNorm layers are frozen (affine stored as buffers)"
            if frozen
            else ("it has no BatchNorm or InstanceNorm with affine parameters")
        )
        raise InvalidOptionError(
            f"entropy adaptation learns norm affine parameters, and {why}; use method 'bn' "
            "(statistics only)"
        )
    if norms == "in" and not found["in"]:
        raise InvalidOptionError(
            "norms 'in' chosen, but the model has no InstanceNorm with affine parameters (is it "
            "converted to IBN?); use norms 'bn'"
        )
    if norms == "bn" and not found["bn"]:
        raise InvalidOptionError(
            "norms 'bn' chosen, but the model has no BatchNorm with affine parameters; use "
            "norms 'in'"
        )
    if norms is None or norms == "both":
        return "both" if found["in"] and found["bn"] else ("in" if found["in"] else "bn")
    return norms


def affine_parameters(model: nn.Module, norms: str) -> dict[str, nn.Parameter]:
    """The affine parameters that learn under ``norms`` (``bn``, ``in``, ``both``), by name."""
    found = _affine_by_family(model)
    families = ("bn", "in") if norms == "both" else (norms,)
    return {name: p for family in families for name, p in found[family].items()}


@contextmanager
def adapting(model: nn.Module, parameters: dict[str, nn.Parameter]) -> Iterator[None]:
    """While open: every module in eval mode except the BatchNorm layers, which normalise with
    their batch's statistics and leave their buffers alone (frozen BN likewise, by the AdaBN
    hook); only ``parameters`` require gradients. Modes, flags and buffers come back on exit."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [(m, m.track_running_stats) for m in batchnorms]
    frozen = {str(i): m for i, m in enumerate(model.modules()) if is_frozen_batchnorm(m)}
    chosen = {id(p) for p in parameters.values()}
    with ExitStack() as stack:
        stack.enter_context(modes_restored(model, requires_grad=True))
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in chosen)
        for module in batchnorms:
            module.train()
            module.track_running_stats = False  # batch statistics, buffers untouched
        stack.enter_context(recording(frozen, 0.0))  # restored on exit: finish is never called
        try:
            yield
        finally:
            for module, flag in tracked:
                module.track_running_stats = flag


class EntropyStep:
    """One TENT/EATA update: forward, per-sample entropy, reliable samples' mean, SGD step.

    Call it inside :func:`adapting`. Returns the batch's logits (computed before the update,
    as TENT returns them) and how many samples the loss kept.
    """

    def __init__(
        self, model: nn.Module, parameters: dict[str, nn.Parameter], lr: float, e_margin: float
    ) -> None:
        self.model = model
        self.parameters = parameters
        self.lr = lr
        self.e_margin = e_margin
        self.optimizer = self.new_optimizer()

    def new_optimizer(self) -> torch.optim.Optimizer:
        """SGD with TENT's momentum over the learning parameters, with fresh (empty) state."""
        return torch.optim.SGD(list(self.parameters.values()), lr=self.lr, momentum=MOMENTUM)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        logits = self.model(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
            shape = (
                tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            )
            raise InvalidOptionError(
                f"entropy adaptation needs a classifier's logits (batch, classes), and the model "
                f"returns {shape}; use method 'bn'"
            )
        entropy = prediction_entropy(logits)
        keep = entropy < self.e_margin * math.log(logits.shape[1])
        kept = int(keep.sum())
        if kept:
            loss = entropy[keep].mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return logits.detach(), kept


class CollapseGuard:
    """The mean prediction over the images seen, and one warning when its entropy falls below
    ``fraction * ln(C)``: the predictions crowd into a few classes."""

    def __init__(self, fraction: float = COLLAPSE_FRACTION) -> None:
        self.fraction = fraction
        self.reset()

    def reset(self) -> None:
        """Forget the images seen (and allow the warning again)."""
        self.total: torch.Tensor | None = None
        self.count = 0
        self.warned = False

    def add(self, logits: torch.Tensor) -> None:
        """Count a batch's predictions."""
        probabilities = logits.detach().double().softmax(dim=1).sum(dim=0).cpu()
        self.total = probabilities if self.total is None else self.total + probabilities
        self.count += logits.shape[0]

    def entropy(self) -> float:
        """Entropy of the mean prediction, in nats (nan before any image)."""
        if self.total is None or self.count == 0:
            return math.nan
        mean = self.total / self.count
        return float(-(mean * mean.clamp_min(1e-300).log()).sum())

    def threshold(self) -> float:
        """The entropy below which the predictions count as collapsed."""
        classes = 2 if self.total is None else self.total.numel()
        return self.fraction * math.log(classes)

    def check(self, minimum: int = 1) -> bool:
        """Warn once (a single line) when collapsed after at least ``minimum`` images; True
        when collapsed."""
        value = self.entropy()
        collapsed = self.count >= minimum and value < self.threshold()
        if collapsed and not self.warned:
            self.warned = True
            classes = 0 if self.total is None else self.total.numel()
            logger.warning(
                "adaptation collapse: the mean prediction over %d images has entropy %.3f nats, "
                "below %.3f (%.2f x ln %d); the predictions crowd into few classes (a one-class "
                "target, or a learning rate too high): check the adapted model before using it",
                self.count,
                value,
                self.threshold(),
                self.fraction,
                classes,
            )
        return collapsed


class OnlineAdapter:
    """Adapt while predicting, batch by batch (TENT's online use); ``reset()`` goes back to the
    source state bit for bit (episodic use).

    ``adapter(x)`` takes a batch the model takes (normalised, on the model's device, at least
    two images), updates the chosen norms' affine on it and returns its logits (computed before
    the update). BatchNorm layers normalise with each batch's statistics and keep their running
    buffers. The caller's model is copied, never changed; ``adapter.model`` is the adapted copy.
    """

    def __init__(
        self,
        model: nn.Module,
        norms: str | None = None,
        *,
        lr: float = DEFAULT_LR,
        e_margin: float = E_MARGIN_FRACTION,
        collapse: float = COLLAPSE_FRACTION,
    ) -> None:
        AdaptOptions(method="entropy", norms=norms, lr=lr, e_margin=e_margin, collapse=collapse)
        self.norms = resolve_norms(model, norms)
        self.model = copy.deepcopy(model)
        parameters = affine_parameters(self.model, self.norms)
        self._step = EntropyStep(self.model, parameters, float(lr), e_margin)
        self._source = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.guard = CollapseGuard(collapse)
        self.updates = 0
        self.images = 0

    @property
    def parameter_names(self) -> list[str]:
        """The names of the parameters that learn."""
        return list(self._step.parameters)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[0] < 2:
            raise InvalidOptionError(
                "online adaptation needs batches of at least 2 images (BatchNorm normalises "
                "with the batch's statistics)"
            )
        with adapting(self.model, self._step.parameters):
            logits, kept = self._step(x)
        self.updates += int(kept > 0)
        self.images += x.shape[0]
        self.guard.add(logits)
        self.guard.check(minimum=2 * logits.shape[1])
        return logits

    @torch.no_grad()
    def reset(self) -> None:
        """Every tensor back to the source state, the optimizer's momentum cleared."""
        for key, value in self.model.state_dict().items():
            value.copy_(self._source[key])
        self._step.optimizer = self._step.new_optimizer()
        self.guard.reset()
        self.updates = 0
        self.images = 0
