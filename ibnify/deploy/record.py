"""What an exported ONNX file records about itself, read once, and the input size it runs at.

The recipe stored in the metadata (``ibnify.recipe``; files written before it was stored whole
carry the last ``plan`` and its ``source``) passes :meth:`ibnify.core.recipe.Recipe.from_dict`,
the one gate for recipes read from files, so a damaged or forged recipe is refused in one line.
``verify`` and ``bench`` run a file at the size given, else the size the file records, else the
graph's fixed shape, and say which; a dynamic-size file that records none is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from ..core.plans import as_input_size
from ..core.recipe import LEGACY_FORMAT, KwargsCheck, Recipe
from ..errors import CheckpointError, InvalidOptionError, VerificationError
from .export import RECIPE_KEY, read_onnx_metadata

__all__ = [
    "SIZE_FIXED",
    "SIZE_GIVEN",
    "SIZE_RECORDED",
    "InputShape",
    "RecordedMetadata",
    "graph_input_dims",
    "input_shape",
    "read_record",
    "size_text",
]

SIZE_GIVEN = "`input_size`"  # the CLI shows it as --input-size
SIZE_RECORDED = "recorded in the file"
SIZE_FIXED = "the graph's fixed shape"


@dataclass(frozen=True)
class RecordedMetadata:
    """What an exported file records about itself: the export profile, the input size it was
    exported at (``ibnify.input_size``, else the recipe's), and the model's checked recipe.
    ``whole`` is False for files written before the recipe was stored whole: their recipe
    holds the last plan only."""

    profile: str = "default"
    input_size: tuple[int, int, int] | None = None
    recipe: Recipe | None = None
    whole: bool = True


@dataclass(frozen=True)
class InputShape:
    """The (C, H, W) a file is run at and where that size came from (one of ``SIZE_*``)."""

    size: tuple[int, ...]
    source: str

    def __str__(self) -> str:
        return f"input {size_text(self.size)} ({self.source})"


def size_text(size: Sequence[Any]) -> str:
    """``3×16×16``; a dynamic axis shows by its name."""
    return "×".join(str(d) for d in size)


def read_record(
    path: str | os.PathLike[str], check_kwargs: KwargsCheck | None = None
) -> RecordedMetadata:
    """The file's :class:`RecordedMetadata`; its recipe checked by ``Recipe.from_dict``.

    ``check_kwargs`` vets the recipe's constructor arguments (``ibnify verify`` passes the
    model registry's allowlist, as ``ibnify.load`` does); without it only their form is checked.
    A file without ibnify metadata gives the defaults (no size, no recipe).

    Raises:
        VerificationError: a recipe or input size that is not what ibnify writes (one line).
    """
    where = f"ONNX file {str(path)!r}"
    try:
        stored = read_onnx_metadata(path)
    except Exception:  # unreadable metadata: the caller's session refuses the file itself
        return RecordedMetadata()
    recipe, whole = _recipe(stored, where, check_kwargs)
    size = _size(stored.get("input_size"), where)
    if size is None and recipe is not None:
        size = recipe.input_size
    return RecordedMetadata(stored.get("profile", "default"), size, recipe, whole)


def _recipe(
    stored: dict[str, str], where: str, check_kwargs: KwargsCheck | None
) -> tuple[Recipe | None, bool]:
    """(recipe, whole): ``ibnify.recipe`` as is, else an older file's last ``plan`` read as the
    single-plan format; either way through the one gate."""
    if RECIPE_KEY in stored:
        data, whole = _json(stored[RECIPE_KEY], where), True
    elif "plan" in stored:
        plan = _json(stored["plan"], where)
        source = stored.get("source") or (plan.get("arch") if isinstance(plan, dict) else None)
        data, whole = {"format": LEGACY_FORMAT, "source": source, "plan": plan}, False
    else:
        return None, True
    try:
        return Recipe.from_dict(data, where, check_kwargs), whole
    except CheckpointError as exc:
        raise VerificationError(str(exc)) from exc


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise VerificationError(f"{where} has a damaged ibnify recipe (not JSON)") from None


def _size(text: str | None, where: str) -> tuple[int, int, int] | None:
    if text is None:
        return None
    if text.count(",") == 2:
        try:
            return as_input_size(text)
        except InvalidOptionError:
            pass
    raise VerificationError(f"{where} records input_size {text[:40]!r}, not C,H,W")


def input_shape(
    path: str | os.PathLike[str],
    dims: Sequence[Any],
    given: int | str | Sequence[int] | None,
    recorded: RecordedMetadata,
) -> InputShape:
    """The (C, H, W) to run the file at: ``given``, else the recorded size, else the graph's
    fixed shape. ``dims`` is the graph input's shape (ints fixed, anything else dynamic).

    Raises:
        InvalidOptionError: ``given`` does not fit the graph's fixed axes, or the graph has a
            dynamic axis and neither ``given`` nor the file says what size to use.
    """
    fixed = [d if isinstance(d, int) and d > 0 else None for d in list(dims)[1:]]
    name = str(path)
    if len(fixed) != 3:
        if all(d is not None for d in fixed):
            return InputShape(tuple(fixed), SIZE_FIXED)  # type: ignore[arg-type]
        raise InvalidOptionError(
            f"{name!r} takes a rank-{len(dims)} input with dynamic axes; ibnify picks sizes "
            "for NCHW images only"
        )

    def fits(size: Sequence[int]) -> bool:
        return all(f is None or f == s for f, s in zip(fixed, size, strict=True))

    shape_text = size_text([f if f is not None else "?" for f in fixed])
    if None in fixed:
        shape_text += ", ? dynamic"
    if given is not None:
        size = as_input_size(given, fixed[0] or 3)
        if not fits(size):
            raise InvalidOptionError(
                f"`input_size` {size_text(size)} does not fit {name!r}, whose input is {shape_text}"
            )
        return InputShape(size, SIZE_GIVEN)
    if recorded.input_size is not None and fits(recorded.input_size):
        return InputShape(recorded.input_size, SIZE_RECORDED)
    if all(f is not None for f in fixed):
        return InputShape(tuple(fixed), SIZE_FIXED)  # type: ignore[arg-type]
    raise InvalidOptionError(
        f"{name!r} has a dynamic input size ({shape_text}) and records none; give the size to "
        "run it at with `input_size`"
    )


def graph_input_dims(path: str | os.PathLike[str]) -> list[Any]:
    """The first graph input's dims (ints where fixed, names where dynamic), read from the
    protobuf alone (no tensor data); for checks before a session or a model is opened.

    Raises:
        VerificationError: the file is not an ONNX model or has no input.
    """
    try:
        graph = onnx.load(os.fspath(path), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError and friends for bad files
        raise VerificationError(f"{str(path)!r} is not a valid ONNX model") from exc
    stored = {tensor.name for tensor in graph.initializer}
    inputs = [i for i in graph.input if i.name not in stored]
    if not inputs:
        raise VerificationError(f"{str(path)!r} has no graph input")
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
