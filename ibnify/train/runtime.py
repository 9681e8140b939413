"""Where fine-tuning runs: device, precision, memory format, processes, and the schedule."""

from __future__ import annotations

import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import FinetuneConfig

__all__ = ["Dist", "Runtime", "Schedule", "init_distributed", "pick_device"]

logger = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        owns = True
    return Dist(rank, world_size, local_rank, owns)


def pick_device(config: FinetuneConfig, local_rank: int) -> torch.device:
    if config.device:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class Runtime:
    """Where and how steps run: device, memory format, mixed precision and the processes."""

    device: torch.device
    dist: Dist
    memory_format: torch.memory_format
    use_amp: bool
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, config: FinetuneConfig, dist_info: Dist) -> Runtime:
        """AMP and channels-last switch on with CUDA unless the config says otherwise."""
        device = pick_device(config, dist_info.local_rank)
        on_cuda = device.type == "cuda"
        use_amp = on_cuda if config.amp is None else (config.amp and on_cuda)
        channels_last = on_cuda if config.channels_last is None else config.channels_last
        bf16 = on_cuda and torch.cuda.is_bf16_supported()
        return cls(
            device=device,
            dist=dist_info,
            memory_format=torch.channels_last if channels_last else torch.contiguous_format,
            use_amp=use_amp,
            amp_dtype=torch.bfloat16 if bf16 else torch.float16,
            scaler=torch.amp.GradScaler("cuda", enabled=use_amp and not bf16),
        )

    def autocast(self) -> Any:
        """The autocast context of a forward pass (a no-op without AMP)."""
        if not self.use_amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def place(self, module: nn.Module) -> nn.Module:
        """Move ``module`` to the device in the run's memory format."""
        return module.to(device=self.device, memory_format=self.memory_format)


@dataclass(frozen=True)
class Schedule:
    """Steps per epoch and the warmup/cosine schedule's lengths for one run."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    drop_last: bool

    @classmethod
    def create(cls, num_samples: int, config: FinetuneConfig, world_size: int) -> Schedule:
        """Drop the last partial batch (a batch of 1 breaks BN) unless it is the only one."""
        per_process = num_samples // world_size
        drop_last = per_process > config.batch_size
        steps = (
            per_process // config.batch_size
            if drop_last
            else math.ceil(per_process / config.batch_size)
        )
        steps = max(1, steps)
        total = steps * config.epochs
        warmup = round(config.warmup_epochs * steps)
        if warmup > total // 2:
            # A warmup as long as the run would leave no room for the cosine decay.
            logger.info("warmup shortened to half the run (%d steps)", total // 2)
            warmup = total // 2
        return cls(steps, total, warmup, drop_last)
