"""Fine-tuning options and the optimisation they choose: parameter groups, optimizer, LR
schedule, distillation loss."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import FINETUNE_DEFAULTS, OPTIMIZERS
from ..core.ops import is_instance_norm
from ..errors import InvalidOptionError

logger = logging.getLogger(__name__)

__all__ = [
    "TRAJECTORY_FIELDS",
    "FinetuneConfig",
    "distillation_loss",
    "lr_factor",
    "make_optimizer",
    "parameter_groups",
]


@dataclass
class FinetuneConfig:
    """Options of :func:`finetune` (the CLI's ``ibnify finetune`` flags map one to one).

    Weight decay: the IBN-Net reference recipe (SGD, lr 0.1, weight decay 1e-4) decays every
    parameter; timm excludes 1-D parameters (norm affine, biases). ``decay_norm_and_bias``
    chooses between the two for ordinary norms and biases, and ``decay_in_affine`` decides the
    InstanceNorm affine separately, because the IN halves are the new part of a converted model.

    Attributes:
        epochs: passes over the training data.
        lr: peak learning rate, reached at the end of the warmup (not scaled by batch size).
        batch_size: images per process and step.
        optimizer: ``"sgd"`` (momentum, Nesterov off) or ``"adamw"``.
        warmup_epochs: linear warmup length (at most half the run); then cosine decay to
            ``min_lr``.
        distill_temperature: softmax temperature of label-free distillation.
        seed: seeds the model's random state, the data order and the workers.
        workers: DataLoader worker processes.
        out_dir: where checkpoints and ``metrics.jsonl`` go; None writes nothing.
        resume: continue from ``out_dir/checkpoint.pt``.
        stop_after: end this run after this many epochs (resume later with ``resume``).
        quiet: no progress bar.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when present.
        amp: mixed precision; default on with CUDA only.
        channels_last: memory format; default on with CUDA only.
    """

    epochs: int = FINETUNE_DEFAULTS["epochs"]
    lr: float = FINETUNE_DEFAULTS["lr"]
    batch_size: int = FINETUNE_DEFAULTS["batch_size"]
    optimizer: str = FINETUNE_DEFAULTS["optimizer"]
    momentum: float = FINETUNE_DEFAULTS["momentum"]
    weight_decay: float = FINETUNE_DEFAULTS["weight_decay"]
    decay_norm_and_bias: bool = FINETUNE_DEFAULTS["decay_norm_and_bias"]
    decay_in_affine: bool = FINETUNE_DEFAULTS["decay_in_affine"]
    warmup_epochs: float = FINETUNE_DEFAULTS["warmup_epochs"]
    min_lr: float = FINETUNE_DEFAULTS["min_lr"]
    distill_temperature: float = FINETUNE_DEFAULTS["distill_temperature"]
    seed: int = FINETUNE_DEFAULTS["seed"]
    workers: int = FINETUNE_DEFAULTS["workers"]
    out_dir: str | None = None
    resume: bool = False
    stop_after: int | None = None
    quiet: bool = False
    device: str | None = None
    amp: bool | None = None
    channels_last: bool | None = None
    small_batch_warning: int = 16

    def validate(self) -> None:
        """Raise InvalidOptionError for values that cannot work."""
        if self.epochs < 1:
            raise InvalidOptionError(f"epochs must be at least 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidOptionError(f"lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise InvalidOptionError(f"batch size must be at least 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidOptionError(
                f"optimizer must be {' or '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.min_lr < 0:
            raise InvalidOptionError("weight decay, warmup and min lr must not be negative")
        if self.distill_temperature <= 0:
            raise InvalidOptionError("distillation temperature must be positive")
        if self.stop_after is not None and self.stop_after < 1:
            raise InvalidOptionError("stop_after must be at least 1")
        if self.resume and not self.out_dir:
            raise InvalidOptionError("resume needs an output directory holding a checkpoint")


# The fields that shape the optimisation trajectory, listed once: every option with a CLI default
# except the worker count. A resumed run must keep them (``train/state.py``, which adds
# ``workers``), and the dataclass above must declare each (a test checks).
TRAJECTORY_FIELDS = tuple(name for name in FINETUNE_DEFAULTS if name != "workers")


def parameter_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """Split parameters into decayed and not-decayed groups as the config says.

    Weight matrices and kernels (≥ 2-D) always decay. InstanceNorm affine parameters follow
    ``decay_in_affine``; other 1-D parameters (BN affine, biases) ``decay_norm_and_bias``.
    """
    in_params = {id(p) for m in model.modules() if is_instance_norm(m) for p in m.parameters(False)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in in_params:
            wanted = config.decay_in_affine
        elif param.ndim <= 1:
            wanted = config.decay_norm_and_bias
        else:
            wanted = True
        (decay if wanted else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD (with the config's momentum) or AdamW over :func:`parameter_groups`."""
    groups = parameter_groups(model, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup from ~0 to 1, then cosine decay to ``min_ratio`` (per step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher ‖ student) on temperature-softened logits, scaled by T² (Hinton et al.)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2
