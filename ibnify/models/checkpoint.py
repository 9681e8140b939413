"""Save and load converted models: safetensors tensors plus the model's recipe.

The :class:`~ibnify.core.recipe.Recipe` (source model, constructor arguments, every plan applied
in order, input size, classes, adaptations, the ibnify version) lives in the safetensors
metadata as JSON. Loading checks it as data before anything is built: a known ``format``, a
source that resolves, and constructor arguments from the allowlist of
:func:`ibnify.models.registry.check_model_kwargs` (nothing that loads weights or reaches the
network). It then builds the base model from its source, replays the plans in order and loads
the tensors with ``strict=True``: no pickled modules, no other file opened, no connection made.

``save`` refuses to write a file ``load`` would refuse: it rebuilds the base model from the
recipe, replays the plans and compares every tensor name and shape before writing. A model
never converted saves with no plan (a control model beside its IBN twin) and loads unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize
from torch import nn

from .. import __version__
from .._io import atomic_write_bytes
from ..core.modules import class_path, unwrap
from ..core.plans import as_input_size
from ..core.recipe import FORMAT, FORMATS, Recipe, get_recipe, set_recipe
from ..core.surgery import apply_plan
from ..errors import CheckpointError, ConversionError, ModelNotFoundError, WeightsError, first_line
from .heads import num_classes_of, reset_classifier
from .registry import build_recorded_model, check_model_kwargs, resolve_name
from .weights import describe_key_mismatch, load_weights

__all__ = [
    "FORMAT",
    "FORMATS",
    "Recipe",
    "base_hint",
    "build_base",
    "input_size_for",
    "load",
    "needs_base",
    "read_recipe",
    "recipe_input_size",
    "save",
    "saved_recipe",
]

_RECIPE_KEY = "ibnify_recipe"
_SOURCE_FORM = re.compile(r"^(tv|timm|ibnify):[A-Za-z0-9_.\-]+$")
_SOURCE_HINT = (
    "name its base model: ibnify.save(model, path, source='tv:resnet50'), or convert it with "
    "ibnify.convert(model, arch='tv:resnet50')"
)


def needs_base(recipe: Recipe) -> bool:
    """Whether ``recipe``'s base model can only come from the caller (a class no registry knows)."""
    return recipe.source is None and recipe.base_class is not None


def base_hint(recipe: Recipe) -> str:
    """How to load a model saved (converted or not) from an instance of a class no registry
    knows."""
    made = "converted from" if recipe.plans else "saved as"
    return (
        f"it was {made} an instance of {recipe.base_class}, which ibnify cannot build "
        f"by name; give the unconverted model in Python: ibnify.load(path, "
        f"base={recipe.base_class_name}(...))"
    )


def build_base(recipe: Recipe, where: str) -> nn.Module:
    """Build the unconverted base model of ``recipe`` from its source and constructor arguments.

    Raises:
        CheckpointError: the source is not buildable by name (or the file needs a base model
            given in Python), or the arguments do not fit.
    """
    if needs_base(recipe):
        raise CheckpointError(f"cannot rebuild {where}: {base_hint(recipe)}")
    try:
        model, _ = build_recorded_model(str(recipe.source), recipe.model_kwargs, where)
    except ModelNotFoundError as exc:
        raise CheckpointError(
            f"the model of {where}, {str(recipe.source)[:80]!r}, cannot be built by name "
            f"({exc}); ibnify rebuilds tv:, timm: and ibnify: models only"
        ) from exc
    return model


def _check_base(recipe: Recipe, base: nn.Module, where: str) -> nn.Module:
    """``base`` unwrapped, refused when the file names another class than the one given."""
    base = unwrap(base)[0]
    converted = get_recipe(base)
    if converted is not None and converted.plans:
        raise CheckpointError(
            f"{where}: base must be the unconverted model, but the given "
            f"{type(base).__name__} is already converted"
        )
    recorded = recipe.base_class
    if recorded is not None and type(base).__qualname__ != recorded.rsplit(".", 1)[-1]:
        raise CheckpointError(
            f"{where} was converted from a {recipe.base_class_name} ({recorded}), "
            f"but base is a {type(base).__name__}"
        )
    return base


def _rebuild(recipe: Recipe, where: str, base: nn.Module | None = None) -> nn.Module:
    """The base model (built, or a copy of ``base``) with every plan replayed; recipe attached."""
    if base is None:
        model = build_base(recipe, where)
    else:
        model = copy.deepcopy(_check_base(recipe, base, where))
        classes = recipe.num_classes
        if classes is not None and num_classes_of(model) not in (None, classes):
            reset_classifier(model, classes)  # a head a run reset; its tensors load below
    for plan in recipe.plans:
        try:
            apply_plan(model, plan, inplace=True)
        except ConversionError as exc:
            built = (
                f"the given {type(base).__name__}"
                if base is not None
                else f"{recipe.source} built with model_kwargs {recipe.model_kwargs or '{}'}"
            )
            raise CheckpointError(
                f"{where}: the recorded plans do not fit {built} ({exc})"
            ) from exc
    set_recipe(model, recipe)
    return model


def saved_recipe(
    model: nn.Module, source: str | None, model_kwargs: dict[str, Any] | None
) -> Recipe:
    """The recipe ``save`` writes, checked so that ``load`` rebuilds exactly this model; what
    runs that save later (fine-tuning with an output folder) call before any work.

    Raises:
        CheckpointError: no buildable source (with how to give one), refused
            constructor arguments, or a rebuilt model whose tensors differ from ``model``'s.
    """
    recipe = _recipe_of(model, source)
    chosen = source or recipe.source or _source_of_plan(recipe)
    if chosen is None and recipe.base_class is not None and model_kwargs is None:
        # a class no registry knows: the file records the class; load needs the base model
        return replace(recipe, format=FORMAT, ibnify_version=__version__)
    if chosen is None:
        raise CheckpointError(
            f"cannot save {recipe.label}: it was made from a model instance, so ibnify "
            f"cannot rebuild it by name; {_SOURCE_HINT}"
        )
    try:
        chosen = resolve_name(chosen)
    except ModelNotFoundError as exc:
        raise CheckpointError(f"cannot save with source {chosen[:80]!r}: {exc}") from exc
    kwargs = recipe.model_kwargs if model_kwargs is None else model_kwargs
    kwargs = check_model_kwargs(kwargs, "ibnify.save")
    recipe = replace(
        recipe, source=chosen, model_kwargs=kwargs, format=FORMAT, ibnify_version=__version__
    )
    if Recipe.from_dict(recipe.to_dict(), "ibnify.save", check_model_kwargs) != recipe:
        raise CheckpointError("ibnify.save: the recipe does not survive its JSON form")
    example = {**kwargs, "num_classes": num_classes_of(model) or 10}
    hint = f"give its constructor arguments, e.g. ibnify.save(model, path, model_kwargs={example})"
    try:
        rebuilt = _rebuild(recipe, "ibnify.save").state_dict()
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {hint}") from exc
    state = model.state_dict()
    if set(rebuilt) != set(state) or any(rebuilt[k].shape != state[k].shape for k in state):
        made = " and converted by the recorded plans" if recipe.plans else ""
        raise CheckpointError(
            f"cannot save: {chosen} built with model_kwargs {kwargs or '{}'}{made} is not this "
            f"model ({describe_key_mismatch(rebuilt, state)}); {hint}"
        )
    return recipe


def _recipe_of(model: nn.Module, source: str | None) -> Recipe:
    """The recipe ``model`` carries; for a model never converted, one with no plans (its class
    recorded when no source names it, as :func:`ibnify.convert` records an instance's)."""
    recipe = get_recipe(model) or Recipe(num_classes=num_classes_of(model))
    if recipe.plans or recipe.source or recipe.base_class or source:
        return recipe
    return replace(recipe, base_class=class_path(model))


def _source_of_plan(recipe: Recipe) -> str | None:
    """A hand-made plan's ``arch`` when it names a source (``tv:resnet18``), else None."""
    arch = recipe.plans[0].arch if recipe.plans else ""
    return arch if _SOURCE_FORM.match(arch) else None


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    source: str | None = None,
    extra_metadata: dict[str, str] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write a model to ``path`` as safetensors with its recipe; atomic.

    Nothing is written that :func:`load` would refuse: the base model is rebuilt from the
    recipe and every tensor name and shape compared first. A model never converted is saved
    with no plan (``plans=()``) and :func:`load` rebuilds it unchanged.

    Args:
        model: a model returned by ``ibnify.convert`` (or ``ibnify.load``), or an unconverted
            one (give ``source`` when a registry builds it).
        path: output file (``.safetensors``).
        source: ``source:name`` of the base model, for a model converted from an instance of a
            registry's class; without it, an instance of a class no registry knows is saved
            with its class name and loads with ``ibnify.load(path, base=MyNet())``.
        extra_metadata: more string metadata to store beside the recipe.
        model_kwargs: the base model's constructor arguments, when they are not recorded.
    """
    model = unwrap(model)[0]
    recipe = saved_recipe(model, source, model_kwargs).to_dict()
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


def read_recipe(path: str | os.PathLike[str]) -> Recipe:
    """The checked :class:`Recipe` stored in an ibnify checkpoint: no tensor is read, nothing
    built (``.source``, ``.plans``, ``.input_size``, ``.adaptations``; ``.layout``,
    ``.stages``, ``.ratio``, ``.sites`` over every plan; ``.to_dict()`` for JSON).

    Raises CheckpointError for a missing file, a file without a recipe, or a recipe
    :meth:`Recipe.from_dict` refuses (format 1 files are read as format 2).
    """
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
            f"{str(file)!r} holds no ibnify recipe; it is plain weights — convert the model "
            "they belong to with `weights=FILE`"
        )
    try:
        data = json.loads(metadata[_RECIPE_KEY])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{str(file)!r} has a damaged ibnify recipe (not JSON: {first_line(exc)[:120]})"
        ) from exc
    return Recipe.from_dict(data, f"checkpoint {str(file)!r}", check_model_kwargs)


def recipe_input_size(
    model_or_path: nn.Module | str | os.PathLike[str],
) -> tuple[int, int, int] | None:
    """The (C, H, W) input size a model or checkpoint was converted for, or None.

    For commands that default their ``--input-size`` to it (a model converted for 32-px
    images is fed 32-px images). A file that is not an ibnify checkpoint gives None.
    """
    if isinstance(model_or_path, nn.Module):
        recipe = get_recipe(model_or_path)
    else:
        try:
            recipe = read_recipe(model_or_path)
        except CheckpointError:
            return None
    return None if recipe is None else recipe.input_size


def input_size_for(
    model_or_path: nn.Module | str | os.PathLike[str],
    given: int | Sequence[int] | None = None,
) -> tuple[int, int, int] | None:
    """The (C, H, W) a command reads images at: ``given`` (as ``--input-size`` parses), else the
    size the model or checkpoint records, else None (the model's own default)."""
    return as_input_size(given) if given is not None else recipe_input_size(model_or_path)


def load(
    path: str | os.PathLike[str],
    base: nn.Module | None = None,
    map_location: str = "cpu",
    *,
    model: nn.Module | None = None,
) -> nn.Module:
    """Rebuild a converted model from an ibnify checkpoint alone.

    The recipe is checked (:meth:`Recipe.from_dict`) before anything is built, so a crafted
    file cannot make the model library open another file or go online. Every recorded plan is
    replayed in order, then the tensors load with ``strict=True``.

    Args:
        path: a file written by :func:`save`.
        base: the unconverted base model, built as it was before conversion: required for a
            model converted from an instance of a class no registry knows (the file names the
            class), optional otherwise. A copy is converted; ``base`` is left as it was.
        map_location: device for the tensors.
        model: the former name of ``base``.

    Raises:
        CheckpointError: a missing or damaged file, a file that needs ``base`` and got none
            (naming the class), a ``base`` of another class, or tensors that do not fit.
    """
    if model is not None and base is not None:
        raise TypeError("give base (the unconverted model) once, not base and model")
    recipe = read_recipe(path)
    where = f"checkpoint {str(path)!r}"
    converted = _rebuild(recipe, where, base if base is not None else model)
    try:
        state = load_file(str(path), device=map_location)
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} has corrupt tensor data ({first_line(exc)})") from exc
    try:
        load_weights(converted, state, what=where)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from exc
    return converted
