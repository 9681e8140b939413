"""The one input resolver of the commands that read files, as timm's ``resolve_data_config(args,
model)``: what the user gave (checkpoint, data source, input size) merged with the checkpoint's
recipe. The data source is checked once, the model loaded once, the input size decided once."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..api import ResolvedModel, is_checkpoint_spec, resolve_model
from ..core.plans import as_input_size
from ..data.images import ImageData
from ..data.sources import check_data_source, resolve_data_source
from ..errors import CheckpointError, InvalidOptionError
from ..models.checkpoint import input_size_for, load
from ..models.registry import check_model_kwargs

__all__ = [
    "InputRequest",
    "ModelRequest",
    "ResolvedInputs",
    "check_model_args",
    "resolve_inputs",
]


@dataclass(frozen=True)
class InputRequest:
    """What the user gave for a command's inputs: a data folder or built-in data set, and the
    image size (``None``: the size the checkpoint records, else the model's own)."""

    data: str | os.PathLike[str] | None = None
    dataset: str | None = None
    input_size: int | Sequence[int] | None = None
    skip_bad_images: bool = False  # leave a folder's unreadable images out, not refuse them

    def check(self) -> None:
        """Refuse, before any model is built, two data sources or none, and a malformed size."""
        check_data_source(self.data, self.dataset)
        if self.input_size is not None:
            as_input_size(self.input_size)


def check_model_args(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments a user gave: only keys of the recipe allowlist
    (:data:`ibnify.models.registry.MODEL_KWARGS`), with values that fit, and never the class
    count (``num_classes`` has its own parameter). One line naming the first refused key."""
    if "num_classes" in model_args:
        raise InvalidOptionError("give the class count as `num_classes`, not in `model_args`")
    try:
        return check_model_kwargs(dict(model_args), where="`model_args`")
    except CheckpointError as exc:
        raise InvalidOptionError(str(exc)) from None


@dataclass(frozen=True)
class ModelRequest:
    """What the user gave for a command's model: a name or an ibnify checkpoint (``spec``); for
    a name, a weights file, a class count and constructor arguments (``model_args``)."""

    spec: str
    weights: str | None = None
    num_classes: int | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)

    def model_kwargs(self) -> dict[str, Any]:
        """The constructor arguments the model is built with (``model_args`` + the classes)."""
        kwargs = dict(self.model_args)
        if self.num_classes is not None:
            kwargs["num_classes"] = self.num_classes
        return kwargs

    def check(self) -> None:
        """Refuse, before any model is built: a weights file, classes or constructor arguments
        with a checkpoint, a class count below 1, a key outside the allowlist."""
        if is_checkpoint_spec(self.spec):
            if self.weights is not None:
                raise InvalidOptionError("`weights` applies to a model name, not to a checkpoint")
            if self.num_classes is not None or self.model_args:
                raise InvalidOptionError(
                    f"{self.spec!r} is an ibnify checkpoint, it records its own classes and "
                    "constructor arguments: `num_classes` and `model_args` apply to a model name"
                )
        if self.num_classes is not None and self.num_classes < 1:
            raise InvalidOptionError(f"`num_classes={self.num_classes}` is below 1")
        check_model_args(self.model_args)

    def resolve(self) -> ResolvedModel:
        """The model, by :func:`ibnify.api.resolve_model` (the one model resolver)."""
        self.check()
        return resolve_model(self.spec, self.weights, model_kwargs=self.model_kwargs() or None)


@dataclass(frozen=True)
class ResolvedInputs:
    """The request merged with the first checkpoint: its model and the one input size every
    data set of the command is read at; ``resolved``: how a :class:`ModelRequest` was met."""

    request: InputRequest
    model: nn.Module
    input_size: tuple[int, int, int] | None
    resolved: ResolvedModel | None = None

    def data(self, split: str, seed: int = 0, *, dataset_only: bool = False) -> ImageData:
        """The requested data for ``split`` at the resolved size (``dataset_only``: the built-in
        set's own split, e.g. digits' test split for validation)."""
        folder = None if dataset_only else self.request.data
        return resolve_data_source(
            folder,
            self.request.dataset,
            self.model,
            split=split,
            seed=seed,
            input_size=self.input_size,
            skip_bad_images=self.request.skip_bad_images,
        )


def resolve_inputs(
    request: InputRequest,
    model: nn.Module | str | os.PathLike[str] | ModelRequest,
) -> ResolvedInputs:
    """Check the request, load ``model`` when it is a checkpoint path (or build or load what a
    :class:`ModelRequest` names), and decide the input size: the one given, else the
    checkpoint's recorded size, else None (the model's own)."""
    request.check()
    resolved = model.resolve() if isinstance(model, ModelRequest) else None
    if resolved is not None:
        loaded = resolved.model
    else:
        loaded = model if isinstance(model, nn.Module) else load(model)  # type: ignore[arg-type]
    size = input_size_for(loaded, request.input_size)
    return ResolvedInputs(request, loaded, size, resolved)
