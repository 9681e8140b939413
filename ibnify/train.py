"""Fine-tuning: labelled cross-entropy, or label-free distillation from the original model.

A converted network starts close to the original (see ``IBN.from_batchnorm``) but its IN halves
need a short fine-tune to settle. :func:`finetune` runs that fine-tune: SGD or AdamW, a cosine
schedule with linear warmup stepped per iteration, optional distillation (KL divergence between
temperature-softened logits of a frozen teacher and the student), a checkpoint after every
epoch that holds everything needed to resume bit-for-bit (model, optimizer, scheduler, epoch,
RNG states: plain tensors and dicts, read back with ``torch.load(weights_only=True)``), and
multi-process data parallel training when started by ``torchrun`` (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from ._io import atomic_write_bytes
from .checkpoint import load, read_recipe, save
from .core.surgery import get_plan
from .data import (
    ImageData,
    Normalize,
    check_data_source,
    digits_data,
    image_folder_data,
    resolve_data_source,
)
from .errors import CheckpointError, InvalidOptionError, first_line
from .evaluation import accuracy
from .models import build_model
from .weights import describe_key_mismatch, load_state_dict_file, load_weights

__all__ = [
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "FinetuneConfig",
    "FinetuneResult",
    "distillation_loss",
    "finetune",
    "finetune_files",
    "load_teacher",
    "load_training_state",
    "parameter_groups",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
_FORMAT = "ibnify.training-state/1"
# Options that shape the optimisation trajectory: resuming with other values would not continue
# the same run, so a mismatch is an error.
_RESUME_KEYS = (
    "epochs",
    "lr",
    "batch_size",
    "optimizer",
    "momentum",
    "weight_decay",
    "decay_norm_and_bias",
    "decay_in_affine",
    "warmup_epochs",
    "min_lr",
    "distill_temperature",
    "seed",
)


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

    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True
    decay_in_affine: bool = True
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    distill_temperature: float = 4.0
    seed: int = 0
    workers: int = 0
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
        if self.optimizer not in ("sgd", "adamw"):
            raise InvalidOptionError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.min_lr < 0:
            raise InvalidOptionError("weight decay, warmup and min lr must not be negative")
        if self.distill_temperature <= 0:
            raise InvalidOptionError("distillation temperature must be positive")
        if self.stop_after is not None and self.stop_after < 1:
            raise InvalidOptionError("stop_after must be at least 1")
        if self.resume and not self.out_dir:
            raise InvalidOptionError("resume needs an output directory holding a checkpoint")


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the trained model and one metrics dict per epoch."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    completed: bool = True
    out_dir: Path | None = None


@dataclass
class _Dist:
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


def _init_distributed(device_type: str) -> _Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        owns = True
    return _Dist(rank, world_size, local_rank, owns)


def _pick_device(config: FinetuneConfig, local_rank: int) -> torch.device:
    if config.device:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _is_instance_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.instancenorm._InstanceNorm)


def parameter_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """Split parameters into decayed and not-decayed groups as the config says.

    Weight matrices and kernels (≥ 2-D) always decay. InstanceNorm affine parameters follow
    ``decay_in_affine``; other 1-D parameters (BN affine, biases) ``decay_norm_and_bias``.
    """
    in_params = {
        id(p) for m in model.modules() if _is_instance_norm(m) for p in m.parameters(False)
    }
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


def _make_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def _lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
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


def _rng_state() -> dict[str, Any]:
    """Every RNG state as plain tensors, ints and lists (loadable with weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint safely (``weights_only=True``: tensors and plain data only)."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"no training checkpoint at {str(file)!r}; nothing to resume")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = first_line(exc)
        raise CheckpointError(
            f"training checkpoint {str(file)!r} is corrupt or unsafe ({first[:160]})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{str(file)!r} is not an ibnify training checkpoint")
    return state


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _as_image_data(data: ImageData | Dataset) -> ImageData:
    if isinstance(data, ImageData):
        return data
    # A plain Dataset is taken as already normalised.
    return ImageData(data, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), name="dataset")


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextmanager
def _training_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    try:
        yield
    finally:
        model.train(was_training)


def _prepare_out_dir(config: FinetuneConfig, force: bool) -> Path | None:
    if not config.out_dir:
        return None
    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidOptionError(f"output {str(out)!r} exists and is not a directory")
    checkpoint = out / CHECKPOINT_FILE
    if config.resume:
        if not checkpoint.is_file():
            raise CheckpointError(
                f"no training checkpoint at {str(checkpoint)!r}; nothing to resume"
            )
    elif checkpoint.exists() and not force:
        raise InvalidOptionError(
            f"{str(out)!r} already holds a training run; pass --resume to continue it "
            "or --force to start over"
        )
    return out


def finetune(
    model: nn.Module,
    train_data: ImageData | Dataset,
    config: FinetuneConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    val_data: ImageData | None = None,
    force: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``train_data`` and return it with per-epoch metrics.

    With ``teacher`` the loss is label-free distillation (labels are ignored, the teacher stays
    frozen in eval mode) and the reported accuracy is agreement with the teacher's prediction;
    otherwise it is cross-entropy on the labels. Under ``torchrun`` (``WORLD_SIZE`` > 1) each
    process trains on its shard with DistributedDataParallel; only rank 0 writes files.

    Args:
        model: the network to train (usually from ``ibnify.convert`` or ``ibnify.load``).
        train_data: :class:`ibnify.data.ImageData` (images in [0, 1] plus mean/std), or a plain
            Dataset of already-normalised ``(image, label)`` pairs.
        config: options; keyword ``overrides`` replace single fields (``epochs=2``).
        teacher: the original model, for label-free distillation.
        val_data: labelled data whose clean accuracy is logged after every epoch.
        force: start over in an ``out_dir`` that already holds a run.
        on_epoch: called on rank 0 with each epoch's metrics dict (the CLI prints them).
    """
    config = FinetuneConfig(**{**asdict(config or FinetuneConfig()), **overrides})
    config.validate()
    data = _as_image_data(train_data)
    if teacher is None and not data.labelled:
        raise InvalidOptionError(
            "the training images have no labels (no class sub-folders); give a teacher for "
            "label-free fine-tuning (--distill-from the original model)"
        )
    if len(data) == 0:
        raise InvalidOptionError("the training data is empty")
    out_dir = _prepare_out_dir(config, force)

    device_type = (
        torch.device(config.device).type
        if config.device
        else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dist_info = _init_distributed(device_type)
    try:
        return _run(model, data, config, teacher, val_data, out_dir, dist_info, on_epoch)
    finally:
        if dist_info.owns_group:
            dist.destroy_process_group()


@dataclass
class _Runtime:
    """Where and how steps run: device, memory format, mixed precision and the processes."""

    device: torch.device
    dist: _Dist
    memory_format: torch.memory_format
    use_amp: bool
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, config: FinetuneConfig, dist_info: _Dist) -> _Runtime:
        """AMP and channels-last switch on with CUDA unless the config says otherwise."""
        device = _pick_device(config, dist_info.local_rank)
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
class _Schedule:
    """Steps per epoch and the warmup/cosine schedule's lengths for one run."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    drop_last: bool

    @classmethod
    def create(cls, num_samples: int, config: FinetuneConfig, world_size: int) -> _Schedule:
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


@dataclass
class _Training:
    """What a run updates: the model (and its DDP wrapper), optimizer and LR scheduler."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    normalize: Normalize
    teacher: nn.Module | None


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _run(
    model: nn.Module,
    data: ImageData,
    config: FinetuneConfig,
    teacher: nn.Module | None,
    val_data: ImageData | None,
    out_dir: Path | None,
    dist_info: _Dist,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> FinetuneResult:
    runtime = _Runtime.create(config, dist_info)
    _seed_everything(config.seed)
    small = config.batch_size < config.small_batch_warning
    if small and dist_info.is_main and _has_batchnorm(model):
        logger.warning(
            "batch size %d per process is small: the BN halves' statistics get noisy "
            "(the IBN-Net recipe uses 32+ per GPU); consider a larger batch or fewer processes",
            config.batch_size,
        )
    runtime.place(model)
    if teacher is not None:
        runtime.place(teacher).eval()
        teacher.requires_grad_(False)
    schedule = _Schedule.create(len(data.dataset), config, dist_info.world_size)  # type: ignore[arg-type]
    optimizer = _make_optimizer(model, config)
    min_ratio = config.min_lr / config.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: _lr_factor(step, schedule.warmup_steps, schedule.total_steps, min_ratio),
    )
    training = _Training(
        model, model, optimizer, scheduler, Normalize(data.mean, data.std), teacher
    )
    training.normalize.to(runtime.device)
    start_epoch, history = 0, []
    if config.resume and out_dir is not None:
        start_epoch, history = _resume(training, runtime, config, schedule, out_dir)
    if start_epoch >= config.epochs:
        logger.info("the run in %s is already complete (%d epochs)", out_dir, start_epoch)
        return FinetuneResult(model, history, True, out_dir)
    if dist_info.enabled:
        training.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    epochs_run = 0
    with _training_mode(model):
        training.net.train()
        for epoch in range(start_epoch, config.epochs):
            loader = _epoch_loader(data.dataset, config, schedule, runtime, epoch)
            metrics = _train_epoch(training, loader, runtime, config, epoch)
            _finish_epoch(training, metrics, history, runtime, config, schedule, val_data, out_dir)
            if on_epoch is not None and dist_info.is_main:
                on_epoch(metrics)
            if dist_info.enabled:
                dist.barrier()
            epochs_run += 1
            if config.stop_after is not None and epochs_run >= config.stop_after:
                break
    completed = start_epoch + epochs_run >= config.epochs
    return FinetuneResult(model, history, completed, out_dir)


def _resume(
    training: _Training,
    runtime: _Runtime,
    config: FinetuneConfig,
    schedule: _Schedule,
    out_dir: Path,
) -> tuple[int, list[dict[str, Any]]]:
    """Restore model, optimizer, scheduler, scaler and RNG states; return (epoch, history)."""
    state = load_training_state(out_dir / CHECKPOINT_FILE)
    _check_same_model(training.model, state["model"], out_dir)
    _check_resumable(state, config, runtime.dist.world_size, schedule.steps_per_epoch)
    training.model.load_state_dict(state["model"], strict=True)
    training.optimizer.load_state_dict(state["optimizer"])
    training.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state and runtime.scaler.is_enabled():
        runtime.scaler.load_state_dict(state["scaler"])
    start_epoch = int(state["epoch"])
    _set_rng_state(state["rng"])
    logger.info("resumed %s at epoch %d of %d", out_dir, start_epoch, config.epochs)
    return start_epoch, list(state.get("history", []))


def _epoch_loader(
    dataset: Dataset, config: FinetuneConfig, schedule: _Schedule, runtime: _Runtime, epoch: int
) -> DataLoader:
    """This epoch's loader: a seeded shuffle (per shard under DDP), so resume is exact."""
    if runtime.dist.enabled:
        sampler: Any = DistributedSampler(
            dataset,
            num_replicas=runtime.dist.world_size,
            rank=runtime.dist.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(
            dataset, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)
        )
    return DataLoader(
        dataset,
        sampler=sampler,
        generator=torch.Generator().manual_seed(config.seed * 1000 + epoch),
        batch_size=config.batch_size,
        num_workers=config.workers,
        drop_last=schedule.drop_last,
        pin_memory=runtime.device.type == "cuda",
    )


def _finish_epoch(
    training: _Training,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    runtime: _Runtime,
    config: FinetuneConfig,
    schedule: _Schedule,
    val_data: ImageData | None,
    out_dir: Path | None,
) -> None:
    """Sync buffers, validate, record the metrics, log them and write the epoch's files."""
    if runtime.dist.enabled:
        _sync_buffers(training.model)
    if val_data is not None:
        metrics["val_acc"] = accuracy(
            training.model, val_data, batch_size=256, device=runtime.device
        )
        training.net.train()
    history.append(metrics)
    if not runtime.dist.is_main:
        return
    _log_epoch(metrics, config)
    if out_dir is not None:
        run_info = {
            "world_size": runtime.dist.world_size,
            "steps_per_epoch": schedule.steps_per_epoch,
        }
        _write_outputs(out_dir, training, runtime, metrics["epoch"], history, config, run_info)


def _check_resumable(
    state: dict[str, Any], config: FinetuneConfig, world_size: int, steps_per_epoch: int
) -> None:
    saved = state.get("config", {})
    different = [
        f"{key} {saved.get(key)!r} → {getattr(config, key)!r}"
        for key in _RESUME_KEYS
        if key in saved and saved[key] != getattr(config, key)
    ]
    if saved.get("world_size", world_size) != world_size:
        different.append(f"processes {saved.get('world_size')} → {world_size}")
    if saved.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        different.append(f"steps per epoch {saved.get('steps_per_epoch')} → {steps_per_epoch}")
    if different:
        raise InvalidOptionError(
            "cannot resume: options differ from the checkpoint's run (" + "; ".join(different) + ")"
        )


def _check_same_model(model: nn.Module, saved: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Refuse to resume a run that was started from another model, with a key summary."""

    expected = model.state_dict()
    if set(expected) != set(saved) or any(
        tuple(expected[k].shape) != tuple(saved[k].shape) for k in expected
    ):
        raise CheckpointError(
            f"cannot resume: the run in {str(out_dir)!r} was started from another model ("
            + describe_key_mismatch(expected, saved)
            + "); resume with the checkpoint it started from, or use a new --out"
        )


def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics drift apart per shard)."""

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def _train_epoch(
    training: _Training,
    loader: DataLoader,
    runtime: _Runtime,
    config: FinetuneConfig,
    epoch: int,
) -> dict[str, Any]:
    """One pass over ``loader``; returns the epoch's metrics (summed over processes)."""
    device = runtime.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        # None: tqdm shows the bar on a terminal only (not in logs, pipes or tests).
        disable=True if config.quiet or not runtime.dist.is_main else None,
        leave=False,
        unit="batch",
    )
    for step, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True).contiguous(
            memory_format=runtime.memory_format
        )
        labels = labels.to(device, non_blocking=True)
        loss, logits, target = _step(training, runtime, config, images, labels)
        batch = images.shape[0]
        seen += batch
        loss_sum += loss.detach().double() * batch
        correct += (logits.detach().argmax(1) == target).sum()
        if not bar.disable and (step % 10 == 0 or step == len(loader) - 1):
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.4f}",
                acc=f"{correct.item() / seen:.3f}",
                img_s=f"{seen * runtime.dist.world_size / elapsed:.0f}",
            )
    bar.close()
    seconds = time.perf_counter() - start
    totals = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device).double()])
    if runtime.dist.enabled:
        dist.all_reduce(totals)
    loss_total, correct_total, count = (float(v) for v in totals.tolist())
    return {
        "epoch": epoch + 1,
        "epochs": config.epochs,
        "loss": loss_total / max(count, 1.0),
        "metric": "teacher_agreement" if training.teacher is not None else "accuracy",
        "acc": correct_total / max(count, 1.0),
        "lr": training.optimizer.param_groups[0]["lr"],
        "images": int(count),
        "seconds": round(seconds, 4),
        "images_per_s": round(count / max(seconds, 1e-9), 1),
    }


def _step(
    training: _Training,
    runtime: _Runtime,
    config: FinetuneConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step; returns (loss, logits, the targets accuracy is counted against)."""
    inputs = training.normalize(images)
    with runtime.autocast():
        logits = training.net(inputs)
        if training.teacher is not None:
            with torch.no_grad():
                target_logits = training.teacher(inputs)
            loss = distillation_loss(logits, target_logits, config.distill_temperature)
            target = target_logits.argmax(1)
        else:
            loss = F.cross_entropy(logits.float(), labels)
            target = labels
    training.optimizer.zero_grad(set_to_none=True)
    runtime.scaler.scale(loss).backward()
    runtime.scaler.step(training.optimizer)
    runtime.scaler.update()
    training.scheduler.step()
    return loss, logits, target


def _log_epoch(metrics: dict[str, Any], config: FinetuneConfig) -> None:
    text = (
        f"epoch {metrics['epoch']}/{config.epochs}: loss {metrics['loss']:.4f} "
        f"{metrics['metric']} {metrics['acc']:.4f} lr {metrics['lr']:.3g} "
        f"{metrics['images_per_s']:.0f} img/s"
    )
    if "val_acc" in metrics:
        text += f" val_acc {metrics['val_acc']:.4f}"
    logger.info(text)


def _write_outputs(
    out_dir: Path,
    training: _Training,
    runtime: _Runtime,
    epochs_done: int,
    history: list[dict[str, Any]],
    config: FinetuneConfig,
    run_info: dict[str, int],
) -> None:
    """Write the training state, the metrics lines and (for converted models) the model."""
    model = training.model
    out_dir.mkdir(parents=True, exist_ok=True)
    saved_config = {key: getattr(config, key) for key in _RESUME_KEYS}
    saved_config.update(run_info)
    state = {
        "format": _FORMAT,
        "epoch": epochs_done,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "rng": _rng_state(),
        "history": history,
        "config": saved_config,
    }
    if runtime.scaler.is_enabled():
        state["scaler"] = runtime.scaler.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(out_dir / CHECKPOINT_FILE, buffer.getvalue())
    metrics = "".join(json.dumps(line) + "\n" for line in history)
    atomic_write_bytes(out_dir / METRICS_FILE, metrics.encode())
    if get_plan(model) is not None:
        save(model, out_dir / MODEL_FILE)


def load_teacher(spec: str, recipe: dict[str, Any]) -> nn.Module:
    """The original (unconverted) model for ``--distill-from``.

    ``spec`` is an ibnify checkpoint, a plain weights file of the student's base architecture
    (built from the student's recipe, loaded strictly), or a model name (built with the
    library's pretrained weights).
    """

    path = Path(spec)
    kwargs = dict(recipe.get("model_kwargs", {}))
    if path.is_file():
        try:
            read_recipe(path)
        except CheckpointError:
            model, _ = build_model(recipe["source"], **kwargs)
            load_weights(model, load_state_dict_file(path), what=f"teacher weights {spec!r}")
            return model
        return load(path)
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors") or os.sep in spec:
        raise CheckpointError(f"teacher file {spec!r} does not exist")
    model, _ = build_model(spec, pretrained=True, **kwargs)
    return model


def finetune_files(
    checkpoint: str | os.PathLike[str],
    config: FinetuneConfig,
    *,
    data: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    val_data: str | os.PathLike[str] | None = None,
    distill_from: str | None = None,
    force: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """What ``ibnify finetune`` does: load an ibnify checkpoint and its data, then fine-tune.

    ``data`` is an ImageFolder directory (or, with ``distill_from``, any folder of images);
    ``dataset="digits"`` uses the digits demo set (its test split validates by default).
    The result lands in ``config.out_dir`` as ``model.safetensors`` (an ibnify checkpoint),
    ``checkpoint.pt`` (training state for ``--resume``) and ``metrics.jsonl``.
    """

    check_data_source(data, dataset)
    if not config.out_dir:
        raise InvalidOptionError("give an output directory (--out DIR)")
    recipe = read_recipe(checkpoint)
    model = load(checkpoint)
    train_data = resolve_data_source(data, dataset, model, split="train", seed=config.seed)
    # The digits set validates on its test split by default; a folder only with --val-data.
    validation = digits_data("test", seed=config.seed) if dataset is not None else None
    if val_data is not None:
        validation = image_folder_data(val_data, model, train=False)
    teacher = load_teacher(distill_from, recipe) if distill_from else None
    return finetune(
        model,
        train_data,
        config,
        teacher=teacher,
        val_data=validation,
        force=force,
        on_epoch=on_epoch,
    )
