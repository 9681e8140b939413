"""The files of a fine-tuning run: training state for bit-for-bit resume, metrics lines.

The state holds plain tensors and dicts only, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_bytes, output_error
from ..core.recipe import get_recipe
from ..errors import CheckpointError, InvalidOptionError, first_line
from ..models.checkpoint import save
from ..models.weights import describe_key_mismatch, state_fits
from .config import TRAJECTORY_FIELDS, FinetuneConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "check_resumable",
    "check_same_model",
    "load_training_state",
    "resume_options",
    "rng_kept",
    "rng_state",
    "run_state",
    "set_rng_state",
    "write_run_files",
]

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
_FORMAT = "ibnify.training-state/1"
# Resuming with other trajectory options would not continue the same run, so a mismatch is an
# error; so is another worker count: which worker process augments an image (and from which
# seed) depends on their number.
_RESUME_KEYS = (*TRAJECTORY_FIELDS, "workers")


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
    """Restore every RNG state that :func:`rng_state` recorded."""
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


@contextmanager
def rng_kept() -> Iterator[dict[str, Any]]:
    """Yield every RNG state as it is now and put it back on exit.

    What runs inside (validation, writing the run's files: saving a model rebuilds it, which
    draws initial weights) then leaves the run's random streams where training left them, so
    the state saved after an epoch is the one the next epoch starts from, straight or resumed.
    """
    state = rng_state()
    try:
        yield state
    finally:
        set_rng_state(state)


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
    if not isinstance(state, dict) or state.get("format") != _FORMAT or not _well_formed(state):
        raise CheckpointError(f"{str(file)!r} is not an ibnify training checkpoint")
    return state


# The entries every training state holds, with their types (the scaler's is optional).
_STATE_TYPES = {
    "epoch": int,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "rng": dict,
    "history": list,
    "config": dict,
}


def _well_formed(state: dict[str, Any]) -> bool:
    """Every entry present with its type, the RNG states there, the model's entries tensors."""
    if any(not isinstance(state.get(key), kind) for key, kind in _STATE_TYPES.items()):
        return False
    if isinstance(state["epoch"], bool) or state["epoch"] < 0:
        return False
    rng = state["rng"]
    if not isinstance(rng.get("torch"), torch.Tensor):
        return False
    if not all(isinstance(rng.get(name), dict) for name in ("numpy", "python")):
        return False
    model = state["model"]
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items())


def check_resumable(
    state: dict[str, Any], config: FinetuneConfig, world_size: int, steps_per_epoch: int
) -> None:
    """Refuse to resume with options that shape the trajectory differently (one line)."""
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
            + "); resume with the checkpoint it started from, or use a new `out_dir`"
        )


def run_state(
    training: Any,
    scaler: torch.amp.GradScaler,
    epoch: int,
    history: list[dict[str, Any]],
    options: dict[str, Any],
    rng: dict[str, Any],
) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds after ``epoch``: model, optimizer, scheduler, scaler, the
    RNG states the next epoch starts from, the metrics so far and the options that shape them.

    ``training`` has ``model``, ``optimizer`` and ``scheduler`` (the loop's record of a run).
    """
    state = {
        "format": _FORMAT,
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in training.model.state_dict().items()},
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "rng": rng,
        "history": history,
        "config": options,
    }
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    return state


def resume_options(config: FinetuneConfig, run_info: dict[str, int]) -> dict[str, Any]:
    """The options a resume must match (see ``_RESUME_KEYS``) plus processes and steps."""
    return {**{key: getattr(config, key) for key in _RESUME_KEYS}, **run_info}


def write_run_files(out_dir: Path, model: nn.Module, state: dict[str, Any]) -> None:
    """Write the training state, the metrics lines and (for a model with a recipe: converted,
    or loaded from a checkpoint with no plan) the model."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, out_dir, "output directory") from exc
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(out_dir / CHECKPOINT_FILE, buffer.getvalue())
    metrics = "".join(json.dumps(line) + "\n" for line in state["history"])
    atomic_write_bytes(out_dir / METRICS_FILE, metrics.encode())
    if get_recipe(model) is not None:
        save(model, out_dir / MODEL_FILE)
