"""``ibnify verify`` from files: an ONNX file against the checkpoint it was exported from; its
options record and :func:`verify_files`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from ..deploy.ort import check_onnx_file
from ..deploy.record import graph_input_dims, input_shape, read_record
from ..deploy.verify import VerificationReport, VerifyOptions, verify_onnx
from ..errors import VerificationError
from ..models.checkpoint import load
from ..models.registry import check_model_kwargs

__all__ = ["VerifyFiles", "verify_files"]


@dataclass(frozen=True)
class VerifyFiles:
    """What ``ibnify verify`` reads: the ONNX file, the ibnify checkpoint to compare it with,
    and the verification options (batches, tolerance, images, engine, size)."""

    onnx_file: str | os.PathLike[str]
    against: str | os.PathLike[str]
    options: VerifyOptions = field(default_factory=VerifyOptions)

    @property
    def chosen(self) -> VerifyOptions:
        """The options with the recipe gate of ``ibnify.load``: the model registry's check of
        the recorded constructor arguments."""
        return replace(self.options, check_kwargs=check_model_kwargs)

    def check(self) -> None:
        """Refuse, before the model is loaded: the options, a missing or corrupt ONNX file, a
        recorded recipe ``Recipe.from_dict`` refuses, and a size that does not fit the file or
        a dynamic-size file that records none (one line each)."""
        chosen = self.chosen.validate()
        if not os.path.isfile(self.onnx_file):
            raise VerificationError(
                f"ONNX file {str(self.onnx_file)!r} does not exist or is not a file"
            )
        check_onnx_file(self.onnx_file)
        record = read_record(self.onnx_file, chosen.check_kwargs)
        dims = graph_input_dims(self.onnx_file)
        if len(dims) == 4:  # other ranks: verify_onnx refuses them with its own line
            input_shape(self.onnx_file, dims, self.options.input_size, record)


def verify_files(files: VerifyFiles) -> VerificationReport:
    """What ``ibnify verify`` does: check the record, load the checkpoint, run the file and the
    model on the same inputs (the size the file records unless given; the report's ``input``
    note says which) and compare every output. A failing comparison is in the report, not
    raised, so the table can be shown first."""
    files.check()
    model = load(files.against)
    return verify_onnx(files.onnx_file, model, files.chosen)
