"""The one input resolver of the commands that read files, as timm's ``resolve_data_config(args,
model)``: what the user gave (checkpoint, data source, input size) merged with the checkpoint's
recipe. The data source is checked once, the model loaded once, the input size decided once."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..core.plans import as_input_size
from ..data.images import ImageData
from ..data.sources import check_data_source, resolve_data_source
from ..errors import InvalidOptionError
from ..models.checkpoint import input_size_for, load

__all__ = ["InputRequest", "ResolvedInputs", "check_output_dir", "resolve_inputs"]


@dataclass(frozen=True)
class InputRequest:
    """What the user gave for a command's inputs: a data folder or built-in data set, and the
    image size (``None``: the size the checkpoint records, else the model's own)."""

    data: str | os.PathLike[str] | None = None
    dataset: str | None = None
    input_size: int | Sequence[int] | None = None

    def check(self) -> None:
        """Refuse, before any model is built, two data sources or none, and a malformed size."""
        check_data_source(self.data, self.dataset)
        if self.input_size is not None:
            as_input_size(self.input_size)


@dataclass(frozen=True)
class ResolvedInputs:
    """The request merged with the first checkpoint: its model and the one input size every
    data set of the command is read at."""

    request: InputRequest
    model: nn.Module
    input_size: tuple[int, int, int] | None

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
        )


def resolve_inputs(
    request: InputRequest,
    model: nn.Module | str | os.PathLike[str],
) -> ResolvedInputs:
    """Check the request, load ``model`` when it is a checkpoint path, and decide the input
    size: the one given, else the checkpoint's recorded size, else None (the model's own)."""
    request.check()
    loaded = model if isinstance(model, nn.Module) else load(model)
    return ResolvedInputs(request, loaded, input_size_for(loaded, request.input_size))


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """Refuse, before any work, an output folder that is a file or cannot be created or
    written: the nearest existing folder on its path is probed by creating a file in it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InvalidOptionError(f"output {str(out)!r} exists and is not a directory")
    existing = next(p for p in (out, *out.parents) if p.exists())
    probe = existing / f".ibnify-probe-{secrets.token_hex(4)}"
    try:
        probe.touch(exist_ok=False)
    except OSError:
        raise InvalidOptionError(f"output directory {str(existing)!r} is not writable") from None
    probe.unlink(missing_ok=True)
    return out
