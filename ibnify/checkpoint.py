"""Save and load converted models: safetensors tensors plus a plain-data recipe.

The recipe (source model, constructor arguments, layout, stages, ratio, the full plan and the
ibnify version) lives in the safetensors metadata. Loading builds the base model from its source,
replays the plan and loads the tensors with ``strict=True``: no pickled modules, ever.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize
from torch import nn

from . import __version__
from ._io import atomic_write_bytes
from .core.plans import ConversionPlan
from .core.surgery import apply_plan, get_plan
from .errors import CheckpointError, ModelNotFoundError, WeightsError, first_line
from .models import build_model
from .weights import load_weights

__all__ = ["FORMAT", "load", "read_recipe", "save"]

FORMAT = "ibnify.checkpoint/1"
_RECIPE_KEY = "ibnify_recipe"


def _recipe(model: nn.Module, source: str | None) -> dict[str, Any]:

    plan = get_plan(model)
    if plan is None:
        raise CheckpointError(
            "the model carries no ibnify plan; convert it with ibnify.convert before saving"
        )
    return {
        "format": FORMAT,
        "ibnify_version": __version__,
        "source": source or plan.arch,
        "model_kwargs": plan.extras.get("model_kwargs", {}),
        "layout": plan.layout,
        "stages": list(plan.stages),
        "ratio": plan.ratio,
        "plan": plan.to_dict(),
    }


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    source: str | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write a converted model to ``path`` as safetensors with its recipe; atomic.

    Args:
        model: a model returned by ``ibnify.convert``.
        path: output file (``.safetensors``).
        source: ``source:name`` to rebuild the base model, when the plan does not record one.
        extra_metadata: more string metadata to store beside the recipe.
    """

    recipe = _recipe(model, source)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu()
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if identity in seen or not tensor.is_contiguous():
            tensor = tensor.clone().contiguous()
        seen.add(identity)
        tensors[key] = tensor
    metadata = {_RECIPE_KEY: json.dumps(recipe), **(extra_metadata or {})}
    return atomic_write_bytes(path, serialize(tensors, metadata=metadata))


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the recipe stored in an ibnify checkpoint (without loading tensors)."""

    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(file)!r} does not exist or is not a file")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = first_line(exc)
        raise CheckpointError(
            f"{str(file)!r} is not a valid safetensors checkpoint ({first[:160]})"
        ) from exc
    if _RECIPE_KEY not in metadata:
        raise CheckpointError(
            f"{str(file)!r} holds no ibnify recipe; it is plain weights — use "
            "`ibnify convert MODEL --weights FILE` instead"
        )
    try:
        recipe = json.loads(metadata[_RECIPE_KEY])
        ConversionPlan.from_dict(recipe["plan"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{str(file)!r} has a damaged ibnify recipe ({exc})") from exc
    return recipe


def load(
    path: str | os.PathLike[str], model: nn.Module | None = None, map_location: str = "cpu"
) -> nn.Module:
    """Rebuild a converted model from an ibnify checkpoint alone.

    Args:
        path: a file written by :func:`save`.
        model: the unconverted base model, for models ibnify cannot build by name.
        map_location: device for the tensors.
    """

    recipe = read_recipe(path)
    plan = ConversionPlan.from_dict(recipe["plan"])
    if model is None:
        try:
            model, _ = build_model(recipe["source"], **recipe.get("model_kwargs", {}))
        except ModelNotFoundError as exc:
            raise CheckpointError(
                f"checkpoint's model {recipe['source']!r} cannot be built by name ({exc}); "
                "pass the base model: ibnify.load(path, model=...)"
            ) from exc
    converted = apply_plan(model, plan, inplace=True)
    try:
        state = load_file(str(path), device=map_location)
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} has corrupt tensor data ({exc})") from exc
    try:
        load_weights(converted, state, what=f"checkpoint {str(path)!r}")
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from exc
    return converted
