"""Save and load converted models: safetensors tensors plus a plain-data recipe.

The recipe (:class:`Recipe`: source model, constructor arguments, the full plan and the ibnify
version) lives in the safetensors metadata as JSON. Loading checks it as data before anything is
built: a known ``format``, a source that resolves, and constructor arguments from the allowlist
of :func:`ibnify.models.check_model_kwargs` (nothing that loads weights or reaches the network).
It then builds the base model from its source, replays the plan and loads the tensors with
``strict=True``: no pickled modules, no other file opened, no connection made.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize
from torch import nn

from .. import __version__
from .._io import atomic_write_bytes
from ..core.plans import ConversionPlan
from ..core.surgery import apply_plan, get_plan
from ..errors import CheckpointError, ModelNotFoundError, WeightsError, first_line
from .registry import build_recorded_model, check_model_kwargs
from .weights import load_weights

__all__ = ["FORMAT", "Recipe", "load", "read_recipe", "save"]

FORMAT = "ibnify.checkpoint/1"
FORMATS = (FORMAT,)  # recipe formats this version reads
_RECIPE_KEY = "ibnify_recipe"


def _plan_kwargs(plan: ConversionPlan) -> dict[str, Any]:
    """The constructor arguments a plan carries in memory (a field, or ``extras``)."""
    value = getattr(plan, "model_kwargs", None)
    if isinstance(value, dict) and value:
        return dict(value)
    return dict((getattr(plan, "extras", None) or {}).get("model_kwargs") or {})


def _with_kwargs(plan: ConversionPlan, kwargs: dict[str, Any]) -> ConversionPlan:
    """``plan`` carrying ``kwargs`` in memory, so that saving a loaded model keeps them."""
    if not kwargs:
        return plan
    if "model_kwargs" in {f.name for f in fields(plan)}:
        return replace(plan, model_kwargs=dict(kwargs))
    return replace(plan, extras={**plan.extras, "model_kwargs": dict(kwargs)})


def _split_plan_dict(plan: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the plan dict without constructor arguments, the arguments it held or None)."""
    plan = dict(plan)
    found = plan.pop("model_kwargs", None)
    extras = plan.get("extras")
    if isinstance(extras, dict) and "model_kwargs" in extras:
        extras = dict(extras)
        found = extras.pop("model_kwargs") if found is None else found
        plan["extras"] = extras
    return plan, found


@dataclass(frozen=True)
class Recipe:
    """What an ibnify checkpoint records to rebuild its model, checked as data.

    ``source`` names the base model (``tv:resnet50``), ``model_kwargs`` its constructor
    arguments (stored once, at the top level of the JSON; files written before 0.1.0 also
    repeat them in the plan's ``extras`` and still load), ``plan`` the conversion to replay.
    ``from_dict`` is the one gate for recipes read from files.
    """

    source: str
    plan: ConversionPlan
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    ibnify_version: str = __version__

    @classmethod
    def of(cls, model: nn.Module, source: str | None = None) -> Recipe:
        """The recipe of a converted model (its plan must be attached).

        Its constructor arguments must pass the same allowlist as a loaded recipe, so that a
        file is never written that ``load`` would refuse.
        """
        plan = get_plan(model)
        if plan is None:
            raise CheckpointError(
                "the model carries no ibnify plan; convert it with ibnify.convert before saving"
            )
        kwargs = check_model_kwargs(_plan_kwargs(plan), "ibnify.save")  # must load back
        return cls(source=source or plan.arch, plan=plan, model_kwargs=kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to the metadata (``layout``/``stages``/``ratio`` are
        copies of the plan's, for readers that do not parse the plan)."""
        plan, _ = _split_plan_dict(self.plan.to_dict())
        return {
            "format": self.format,
            "ibnify_version": self.ibnify_version,
            "source": self.source,
            "model_kwargs": dict(self.model_kwargs),
            "layout": self.plan.layout,
            "stages": list(self.plan.stages),
            "ratio": self.plan.ratio,
            "plan": plan,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "the checkpoint") -> Recipe:
        """Check a recipe read from a file and return it; nothing is opened or built.

        Raises:
            CheckpointError: an unknown format (naming the ibnify version that wrote it), a
                missing or malformed field, or a refused constructor argument (named).
        """
        if not isinstance(data, dict):
            raise CheckpointError(f"{where} has a damaged ibnify recipe (not a JSON object)")
        version = data.get("ibnify_version")
        version = str(version)[:40] if isinstance(version, str | int | float) else "unknown"
        fmt = data.get("format")
        if fmt is None:
            raise CheckpointError(f"{where} has a damaged ibnify recipe (no format)")
        if fmt not in FORMATS:
            shown = repr(fmt)[:60] if isinstance(fmt, str) else type(fmt).__name__
            raise CheckpointError(
                f"{where} has recipe format {shown}, written by ibnify {version}; ibnify "
                f"{__version__} reads {', '.join(FORMATS)} only (upgrade ibnify to load it)"
            )
        source = data.get("source")
        if not isinstance(source, str) or not 0 < len(source) <= 200:
            raise CheckpointError(f"{where} has a damaged ibnify recipe (no source model name)")
        if not isinstance(data.get("plan"), dict):
            raise CheckpointError(f"{where} has a damaged ibnify recipe (no plan)")
        plan_data, old_kwargs = _split_plan_dict(data["plan"])
        kwargs = data.get("model_kwargs", old_kwargs)
        kwargs = check_model_kwargs({} if kwargs is None else kwargs, where)
        if old_kwargs is not None and check_model_kwargs(old_kwargs, where) != kwargs:
            raise CheckpointError(
                f"{where} has a damaged ibnify recipe (two different model_kwargs)"
            )
        try:
            plan = ConversionPlan.from_dict(plan_data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{where} has a damaged ibnify recipe ({first_line(exc)[:160]})"
            ) from exc
        return cls(source, _with_kwargs(plan, kwargs), kwargs, fmt, version)

    def build_base(self, where: str = "the checkpoint") -> nn.Module:
        """Build the unconverted base model from ``source`` and ``model_kwargs``.

        Raises:
            CheckpointError: the source is not buildable by name, or the arguments do not fit.
        """
        try:
            model, _ = build_recorded_model(self.source, self.model_kwargs, where)
        except ModelNotFoundError as exc:
            raise CheckpointError(
                f"the model of {where}, {self.source[:80]!r}, cannot be built by name ({exc}); "
                "pass the base model: ibnify.load(path, model=...)"
            ) from exc
        return model


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

    recipe = Recipe.of(model, source).to_dict()
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
    """Return the checked recipe stored in an ibnify checkpoint (without loading tensors).

    The dict is :meth:`Recipe.to_dict` of the checked recipe: ``model_kwargs`` at the top
    level only. Raises CheckpointError for a missing file, a file without a recipe, or a recipe
    :meth:`Recipe.from_dict` refuses.
    """
    return _read(path).to_dict()


def _read(path: str | os.PathLike[str]) -> Recipe:
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
        data = json.loads(metadata[_RECIPE_KEY])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{str(file)!r} has a damaged ibnify recipe (not JSON: {first_line(exc)[:120]})"
        ) from exc
    return Recipe.from_dict(data, where=f"checkpoint {str(file)!r}")


def load(
    path: str | os.PathLike[str], model: nn.Module | None = None, map_location: str = "cpu"
) -> nn.Module:
    """Rebuild a converted model from an ibnify checkpoint alone.

    The recipe is checked (:meth:`Recipe.from_dict`) before anything is built, so a crafted
    file cannot make the model library open another file or go online.

    Args:
        path: a file written by :func:`save`.
        model: the unconverted base model, for models ibnify cannot build by name.
        map_location: device for the tensors.
    """

    recipe = _read(path)
    where = f"checkpoint {str(path)!r}"
    if model is None:
        model = recipe.build_base(where)
    converted = apply_plan(model, recipe.plan, inplace=True)
    try:
        state = load_file(str(path), device=map_location)
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} has corrupt tensor data ({first_line(exc)})") from exc
    try:
        load_weights(converted, state, what=where)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from exc
    return converted
