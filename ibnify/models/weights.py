"""Weights files: read them safely, unwrap their containers, load them strictly.

Files are read with ``torch.load(weights_only=True)`` or safetensors only, so loading a file
never runs code from it. Wrappers (``{"state_dict": ...}``, ``module.`` prefixes) are undone and
every mismatch is reported in one line; nothing is loaded non-strictly.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import WeightsError, first_line

__all__ = [
    "clean_state_dict",
    "describe_key_mismatch",
    "load_state_dict_file",
    "load_weights",
    "state_fits",
]

_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "model_ema", "net", "weights")


def clean_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}``-style containers and strip ``module.``/``_orig_mod.``.

    Raises:
        WeightsError: the object is not a mapping of names to tensors.
    """
    for key in _WRAPPER_KEYS:
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and inner and _all_tensors(inner):
            state = inner
            break
    if not isinstance(state, Mapping) or not state:
        raise WeightsError("the file holds no state dict (expected a mapping of names to tensors)")
    if not _all_tensors(state):
        bad = next(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise WeightsError(
            f"the file is not plain weights: entry {bad!r} is a {type(state[bad]).__name__}"
        )
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    changed = True
        cleaned[name] = value
    return cleaned


def _all_tensors(mapping: Mapping[str, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors``, ``.pth``/``.pt``/``.bin`` weights file safely and clean it.

    Raises:
        WeightsError: missing, a directory, empty, corrupt, truncated, or not plain weights.
    """
    file = Path(path)
    if not file.exists():
        raise WeightsError(f"weights file {str(file)!r} does not exist")
    if file.is_dir():
        raise WeightsError(f"weights path {str(file)!r} is a directory, not a file")
    if file.stat().st_size == 0:
        raise WeightsError(f"weights file {str(file)!r} is empty")
    if file.suffix == ".safetensors" or _has_safetensors_header(file):
        return clean_state_dict(_load_safetensors(file))
    try:
        with warnings.catch_warnings():  # garbage bytes read as an odd protocol number
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _looks_like_pickle(file) or zipfile.is_zipfile(file):
            raise WeightsError(
                f"refusing to load {str(file)!r}: it is a pickle that is not plain weights "
                "(torch.load with weights_only=True rejected it); ibnify never unpickles "
                "arbitrary objects — save a state dict of tensors or use safetensors"
            ) from exc
        raise WeightsError(
            f"weights file {str(file)!r} is corrupt or truncated: not a readable checkpoint"
        ) from exc
    except Exception as exc:  # on garbage bytes the unpickler raises Index/Key/Type errors too
        first = first_line(exc, "")
        raise WeightsError(
            f"weights file {str(file)!r} is corrupt or truncated "
            f"({type(exc).__name__}: {first[:160]})"
        ) from exc
    if not isinstance(state, Mapping):
        raise WeightsError(
            f"weights file {str(file)!r} holds a {type(state).__name__}, not a state dict"
        )
    return clean_state_dict(state)


def _looks_like_pickle(file: Path) -> bool:
    """A bare pickle (protocol 2+) starts with the PROTO opcode."""
    with file.open("rb") as handle:
        head = handle.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _has_safetensors_header(file: Path) -> bool:
    with file.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = first_line(exc)
        raise WeightsError(
            f"weights file {str(file)!r} is not a valid safetensors file ({first[:160]})"
        ) from exc


def describe_key_mismatch(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], limit: int = 3
) -> str:
    """One-line summary of missing, unexpected and wrongly shaped keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shape = [
        k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
        if keys:
            shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    return "; ".join(parts) if parts else "keys and shapes match"


def state_fits(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` has exactly the keys of ``expected``, each with the same shape."""
    return set(expected) == set(state) and all(
        tuple(expected[k].shape) == tuple(state[k].shape) for k in expected
    )


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str = "weights") -> None:
    """Load ``state`` into ``model`` strictly; a mismatch raises WeightsError with a summary."""
    expected = model.state_dict()
    if not state_fits(expected, state):
        raise WeightsError(
            f"{what}: the tensors do not fit {type(model).__name__}: "
            + describe_key_mismatch(expected, state)
        )
    model.load_state_dict(state, strict=True)
