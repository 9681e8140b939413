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

import logging
import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
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

from .._io import check_output_dir, output_lock
from ..core.modules import modes_restored
from ..core.ops import has_batchnorm
from ..data.images import ImageData, Normalize
from ..data.sources import as_image_data
from ..errors import CheckpointError, InvalidOptionError
from ..evaluation import accuracy
from ..models.checkpoint import recipe_input_size
from ..models.heads import reset_classifier
from .checks import check_fits, check_savable
from .config import FinetuneConfig, distillation_loss, lr_factor, make_optimizer
from .progress import format_epoch, kept_on_interrupt
from .runtime import Dist, Runtime, Schedule, init_distributed
from .state import (
    CHECKPOINT_FILE,
    check_resumable,
    check_same_model,
    load_training_state,
    resume_options,
    rng_kept,
    run_state,
    set_rng_state,
    write_run_files,
)

__all__ = ["FinetuneResult", "finetune", "fresh_head"]

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the trained model and one metrics dict per epoch."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    completed: bool = True
    out_dir: Path | None = None


def fresh_head(model: nn.Module, num_classes: int, seed: int) -> None:
    """Give ``model`` a fresh ``num_classes`` head IN PLACE, initialised from ``seed``: a run
    is a function of its options, not of the state the caller left the global RNG in."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reset_classifier(model, num_classes)


def _prepare_out_dir(config: FinetuneConfig, force: bool) -> Path | None:
    """The output folder, refused when ``resume`` finds no run there or a run is there and
    neither ``resume`` nor ``force`` says what to do with it."""
    if not config.out_dir:
        return None
    out = Path(config.out_dir)
    checkpoint = out / CHECKPOINT_FILE
    if config.resume:
        if not checkpoint.is_file():
            raise CheckpointError(
                f"no training checkpoint at {str(checkpoint)!r}; nothing to resume"
            )
    elif checkpoint.exists() and not force:
        raise InvalidOptionError(
            f"{str(out)!r} already holds a training run; pass `resume=True` to continue it "
            "or `force=True` to start over"
        )
    return out


def _out_dir_held(config: FinetuneConfig) -> AbstractContextManager[Path | None]:
    """The output folder checked (a file there, or a folder that cannot be written, is refused
    in one line) and held for the run: a second run on it is refused while this one lives.
    Under ``torchrun`` the rank-0 process, the one that writes, holds it."""
    if not config.out_dir:
        return nullcontext(None)
    out = check_output_dir(config.out_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return nullcontext(out)
    return output_lock(out, "out_dir")


@dataclass
class _Job:
    """One run as :func:`finetune` checked it: what :func:`_run` trains, on what, and where."""

    model: nn.Module
    data: ImageData
    config: FinetuneConfig
    teacher: nn.Module | None = None
    val_data: ImageData | None = None
    out_dir: Path | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    dist_info: Dist = field(default_factory=Dist)


def finetune(
    model: nn.Module,
    train_data: ImageData | Dataset,
    config: FinetuneConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    val_data: ImageData | None = None,
    force: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``train_data`` and return it with per-epoch metrics.
    Reason: nine parameters, the public keyword API (``FinetuneConfig`` holds the rest).

    With ``teacher`` the loss is label-free distillation (labels are ignored, the teacher is
    frozen in eval mode during the run and handed back with its modes and ``requires_grad``
    flags as they were) and the reported accuracy is agreement with the teacher's prediction;
    otherwise it is cross-entropy on the labels. A head that does not fit the data's classes,
    or a teacher whose output does not fit the student's, is refused before training; so is,
    with ``out_dir`` (where the model is saved after every epoch), a model ``ibnify.save``
    would refuse, a folder that cannot be written, and a folder another run is writing (the
    run holds a lock file there until it ends). A run is a function of its options: every RNG
    it draws from is seeded from ``seed``, and ``resume=True`` continues it bit for bit. Under
    ``torchrun`` (``WORLD_SIZE`` > 1) each process trains on its shard with
    DistributedDataParallel; only rank 0 writes files.

    Args:
        model: the network to train (usually from ``ibnify.convert`` or ``ibnify.load``).
        train_data: :class:`ibnify.data.ImageData` (images in [0, 1] plus mean/std), or a plain
            Dataset of already-normalised ``(image, label)`` pairs.
        config: options; keyword ``overrides`` replace single fields (``epochs=2``).
        teacher: the original model, for label-free distillation.
        val_data: labelled data whose clean accuracy is logged after every epoch.
        force: start over in an ``out_dir`` that already holds a run.
        on_epoch: called on rank 0 with each epoch's metrics dict (the CLI prints them).
        num_classes: first give ``model`` a fresh classifier head of this size, drawn from
            ``seed`` (in place, like the training; its plan records ``num_classes`` so the
            saved file loads back).
    """
    config = FinetuneConfig(**{**asdict(config or FinetuneConfig()), **overrides})
    config.validate()
    size = recipe_input_size(model)  # a folder path is read at the size it was converted for
    data = as_image_data(train_data, model, "train", seed=config.seed, input_size=size)
    if val_data is not None:
        val_data = as_image_data(val_data, model, "test", input_size=size)
    if teacher is None and not data.labelled:
        raise InvalidOptionError(
            "the training images have no labels (no class sub-folders); for label-free "
            "fine-tuning pass the original model as `teacher`"
        )
    if len(data) == 0:
        raise InvalidOptionError("the training data is empty")
    with _out_dir_held(config):
        out_dir = _prepare_out_dir(config, force)
        if num_classes is not None:
            fresh_head(model, num_classes, config.seed)
        if out_dir is not None:
            check_savable(model, str(out_dir))
        return _launch(_Job(model, data, config, teacher, val_data, out_dir, on_epoch))


def _launch(job: _Job) -> FinetuneResult:
    """Join the process group ``torchrun`` describes (if any), run, and leave it again; the
    teacher's modes and ``requires_grad`` flags are handed back as they were."""
    config = job.config
    device_type = (
        torch.device(config.device).type
        if config.device
        else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    job.dist_info = init_distributed(device_type)
    try:
        with modes_restored(job.teacher, requires_grad=True):
            return _run(job)
    finally:
        if job.dist_info.owns_group:
            dist.destroy_process_group()


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


def _run(job: _Job) -> FinetuneResult:
    """Place the models, build the optimizer and schedule (or resume them), train the epochs."""
    config, dist_info = job.config, job.dist_info
    runtime = Runtime.create(config, dist_info)
    training, schedule = _start(job, runtime)
    start_epoch, history = 0, []
    if config.resume and job.out_dir is not None:
        start_epoch, history = _resume(training, runtime, config, schedule, job.out_dir)
    if start_epoch >= config.epochs:
        logger.info("the run in %s is already complete (%d epochs)", job.out_dir, start_epoch)
        return FinetuneResult(job.model, history, True, job.out_dir)
    if dist_info.enabled:
        training.net = nn.parallel.DistributedDataParallel(
            job.model,
            device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
        )
    epochs_run = 0
    kept = kept_on_interrupt(job.out_dir, start_epoch, config.epochs)
    with modes_restored(job.model), kept as done:
        training.net.train()
        for epoch in range(start_epoch, config.epochs):
            loader = _epoch_loader(job.data.dataset, config, schedule, runtime, epoch)
            metrics = _train_epoch(training, loader, runtime, config, epoch)
            _finish_epoch(training, metrics, history, runtime, schedule, job)
            done.append(metrics["epoch"])
            if job.on_epoch is not None and dist_info.is_main:
                job.on_epoch(metrics)
            if dist_info.enabled:
                dist.barrier()
            epochs_run += 1
            if config.stop_after is not None and epochs_run >= config.stop_after:
                break
    completed = start_epoch + epochs_run >= config.epochs
    return FinetuneResult(job.model, history, completed, job.out_dir)


def _start(job: _Job, runtime: Runtime) -> tuple[_Training, Schedule]:
    """The models on their device and checked against the data, every RNG seeded, the
    optimizer and its per-iteration schedule built: a run before its first epoch."""
    model, data, config, teacher = job.model, job.data, job.config, job.teacher
    runtime.place(model)
    if teacher is not None:
        runtime.place(teacher)
    check_fits(model, data, teacher, runtime.device, val_data=job.val_data)
    _seed_everything(config.seed)
    small = config.batch_size < config.small_batch_warning
    if small and job.dist_info.is_main and has_batchnorm(model):
        logger.warning(
            "batch size %d per process is small: the BN halves' statistics get noisy "
            "(the IBN-Net recipe uses 32+ per GPU); consider a larger batch or fewer processes",
            config.batch_size,
        )
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    world_size = job.dist_info.world_size
    schedule = Schedule.create(len(data.dataset), config, world_size)  # type: ignore[arg-type]
    optimizer = make_optimizer(model, config)
    min_ratio = config.min_lr / config.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, schedule.warmup_steps, schedule.total_steps, min_ratio),
    )
    training = _Training(
        model, model, optimizer, scheduler, Normalize(data.mean, data.std), teacher
    )
    training.normalize.to(runtime.device)
    return training, schedule


def _resume(
    training: _Training,
    runtime: Runtime,
    config: FinetuneConfig,
    schedule: Schedule,
    out_dir: Path,
) -> tuple[int, list[dict[str, Any]]]:
    """Restore model, optimizer, scheduler, scaler and RNG states; return (epoch, history)."""
    state = load_training_state(out_dir / CHECKPOINT_FILE)
    check_same_model(training.model, state["model"], out_dir)
    check_resumable(state, config, runtime.dist.world_size, schedule.steps_per_epoch)
    training.model.load_state_dict(state["model"], strict=True)
    training.optimizer.load_state_dict(state["optimizer"])
    training.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state and runtime.scaler.is_enabled():
        runtime.scaler.load_state_dict(state["scaler"])
    start_epoch = int(state["epoch"])
    set_rng_state(state["rng"])
    logger.info("resumed %s at epoch %d of %d", out_dir, start_epoch, config.epochs)
    return start_epoch, list(state.get("history", []))


def _epoch_loader(
    dataset: Dataset, config: FinetuneConfig, schedule: Schedule, runtime: Runtime, epoch: int
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
    runtime: Runtime,
    schedule: Schedule,
    job: _Job,
) -> None:
    """Sync buffers, validate, record the metrics, log them and write the epoch's files.

    All of it runs inside :func:`rng_kept`: the next epoch draws from the RNG states training
    left, the very ones ``checkpoint.pt`` records, whatever validation or saving consumed.
    """
    config, val_data, out_dir = job.config, job.val_data, job.out_dir
    if runtime.dist.enabled:
        _sync_buffers(training.model)
    with rng_kept() as rng:
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
            options = resume_options(config, run_info)
            state = run_state(training, runtime.scaler, metrics["epoch"], history, options, rng)
            write_run_files(out_dir, training.model, state)


def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics drift apart per shard)."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def _train_epoch(
    training: _Training,
    loader: DataLoader,
    runtime: Runtime,
    config: FinetuneConfig,
    epoch: int,
) -> dict[str, Any]:
    """One pass over ``loader``; returns the epoch's metrics (summed over processes)."""
    device = runtime.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    start = time.perf_counter()
    # One iterator, handed to tqdm: given the loader, tqdm.auto starts a second one of its own
    # (its async support calls iter() at once), with a second set of workers.
    batches = iter(loader)
    bar = tqdm(
        batches,
        total=len(loader),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        # None: tqdm shows the bar on a terminal only (not in logs, pipes or tests).
        disable=True if config.quiet or not runtime.dist.is_main else None,
        leave=False,
        unit="batch",
    )
    try:
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
                _show_progress(bar, (loss_sum, correct, seen), start, runtime.dist.world_size)
    finally:
        bar.close()
        # A traceback (Ctrl-C) keeps this frame: without these names it does not keep the
        # loader's workers running until it is dropped.
        del bar, batches
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


def _show_progress(
    bar: Any, sums: tuple[torch.Tensor, torch.Tensor, int], start: float, world_size: int
) -> None:
    """The bar's running loss, accuracy and images per second."""
    loss_sum, correct, seen = sums
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(
        loss=f"{loss_sum.item() / seen:.4f}",
        acc=f"{correct.item() / seen:.3f}",
        img_s=f"{seen * world_size / elapsed:.0f}",
    )


def _step(
    training: _Training,
    runtime: Runtime,
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
    logger.info("%s", format_epoch(metrics))
