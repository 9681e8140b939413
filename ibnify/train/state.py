"""The files of a fine-tuning run: training state for bit-for-bit resume, metrics lines.

The state holds plain tensors and dicts only, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_bytes
from ..core.surgery import get_plan
from ..errors import CheckpointError, InvalidOptionError, first_line
from ..models.checkpoint import save
from ..models.weights import describe_key_mismatch, state_fits
from .config import FinetuneConfig

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FILE", "METRICS_FILE", "MODEL_FILE", "load_training_state"]

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


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
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


def check_resumable(
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


def check_same_model(model: nn.Module, saved: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Refuse to resume a run that was started from another model, with a key summary."""
    expected = model.state_dict()
    if not state_fits(expected, saved):
        raise CheckpointError(
            f"cannot resume: the run in {str(out_dir)!r} was started from another model ("
            + describe_key_mismatch(expected, saved)
            + "); resume with the checkpoint it started from, or use a new --out"
        )


def write_run_files(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    epochs_done: int,
    history: list[dict[str, Any]],
    config: FinetuneConfig,
    run_info: dict[str, int],
) -> None:
    """Write the training state, the metrics lines and (for converted models) the model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    saved_config = {key: getattr(config, key) for key in _RESUME_KEYS}
    saved_config.update(run_info)
    state = {
        "format": _FORMAT,
        "epoch": epochs_done,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "history": history,
        "config": saved_config,
    }
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(out_dir / CHECKPOINT_FILE, buffer.getvalue())
    metrics = "".join(json.dumps(line) + "\n" for line in history)
    atomic_write_bytes(out_dir / METRICS_FILE, metrics.encode())
    if get_plan(model) is not None:
        save(model, out_dir / MODEL_FILE)
