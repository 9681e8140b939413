"""``ibnify adapt`` from files: a checkpoint adapted on a target folder, written to a new file;
its options record and :func:`adapt_files`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..adaptation.files import AdaptResult, adapt_file, check_adapt_output
from ..adaptation.options import AdaptOptions
from .inputs import InputRequest

__all__ = ["AdaptFiles", "adapt_files"]


@dataclass(frozen=True)
class AdaptFiles:
    """What ``ibnify adapt`` reads and writes: the checkpoint, the target folder, the new
    ``.safetensors`` file, the adaptation's options (checked when made), the image size and
    optional labelled source data for the before/after table; ``skip_bad_images`` leaves the
    folders' unreadable images out instead of refusing them."""

    checkpoint: str | os.PathLike[str]
    data: str | os.PathLike[str]
    output: str | os.PathLike[str]
    options: AdaptOptions = field(default_factory=AdaptOptions)
    input_size: int | tuple[int, ...] | None = None
    force: bool = False
    source: str | os.PathLike[str] | None = None
    skip_bad_images: bool = False

    def check(self) -> None:
        """Refuse, before any model is built: the size, and an output that is the source, not
        a ``.safetensors`` name, exists without ``force`` or cannot be written."""
        InputRequest(data=self.data, input_size=self.input_size).check()
        check_adapt_output(self.checkpoint, self.output, self.force)


def adapt_files(files: AdaptFiles) -> AdaptResult:
    """What ``ibnify adapt`` does: check the record, then :func:`ibnify.adaptation.adapt_file`,
    which loads the checkpoint and applies the one input-size rule to it (the given size, else
    the checkpoint's recorded one)."""
    files.check()
    return adapt_file(
        files.checkpoint,
        files.data,
        files.output,
        files.options,
        input_size=files.input_size,
        force=files.force,
        source=files.source,
        skip_bad_images=files.skip_bad_images,
    )
