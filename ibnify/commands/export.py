"""``ibnify export`` from files: a checkpoint exported to ONNX and verified in onnxruntime
before the file is written; its options record and :func:`export_files`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .._io import check_output_path
from ..deploy.export import PROFILE_TOLERANCES, ExportOptions, ExportReport, export_onnx
from ..deploy.verify import VerificationReport, VerifyOptions, verify_onnx
from ..models.checkpoint import load
from ..models.registry import check_model_kwargs

__all__ = ["ExportFiles", "ExportResult", "export_files"]


@dataclass(frozen=True)
class ExportFiles:
    """What ``ibnify export`` reads and writes: the checkpoint, the ``.onnx`` file, the export
    options (opset, size, profile, …), whether to verify the file before it is written, and
    whether an existing file may be replaced."""

    checkpoint: str | os.PathLike[str]
    output: str | os.PathLike[str]
    options: ExportOptions = field(default_factory=ExportOptions)
    verify: bool = True
    force: bool = False

    def check(self) -> Path:
        """Refuse, before the model is loaded: the opset, the size's syntax, the profile and
        fold form, and an output that is not an ``.onnx`` name, exists without ``force`` or
        cannot be written. Returns the output path."""
        self.options.validate()
        return check_output_path(self.output, force=self.force, suffixes=(".onnx",))


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_files` wrote, and its verification (None with ``verify=False``)."""

    report: ExportReport
    verification: VerificationReport | None


def export_files(files: ExportFiles) -> ExportResult:
    """What ``ibnify export`` does: check the record, load the checkpoint, export it (the size
    and channels are checked against the model before anything is exported) and verify the
    finished file with the profile's tolerance before it replaces the output."""
    target = files.check()
    model = load(files.checkpoint)
    atol, rtol = PROFILE_TOLERANCES[files.options.profile]
    batches = (1, 2) if files.options.dynamic_batch else (1,)
    verifying = VerifyOptions(batches, atol, rtol, check_kwargs=check_model_kwargs)
    verified: list[VerificationReport] = []

    def check(path: Path) -> None:
        verified.append(verify_onnx(path, model, verifying))

    report = export_onnx(model, target, files.options, check=check if files.verify else None)
    return ExportResult(report, verified[0] if verified else None)
