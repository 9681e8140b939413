"""Typed exceptions: library code raises these, the CLI turns each into one ``error:`` line."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConversionError",
    "ExportError",
    "IbnifyError",
    "InvalidOptionError",
    "ModelNotFoundError",
    "NoBatchNormError",
    "TraceError",
    "VerificationError",
    "WeightsError",
    "first_line",
]


class IbnifyError(Exception):
    """Base class of every error ibnify reports to a user; the message is one line."""


class InvalidOptionError(IbnifyError, ValueError):
    """A user-supplied option (stages, ratio, layout, input size) is not valid for this model."""


class ModelNotFoundError(IbnifyError, LookupError):
    """A model name that neither torchvision nor timm knows."""


class NoBatchNormError(IbnifyError):
    """The model, or the chosen stages, hold no BatchNorm layer to convert."""


class TraceError(IbnifyError):
    """torch.fx could not trace the model; the message names the module that failed."""


class ConversionError(IbnifyError):
    """A plan cannot be applied to this model (wrong site, already converted, unknown norm)."""


class WeightsError(IbnifyError):
    """A weights file is missing, corrupt, unsafe, or does not fit the model."""


class CheckpointError(IbnifyError):
    """An ibnify checkpoint is missing, corrupt or lacks its recipe."""


class ExportError(IbnifyError):
    """ONNX export failed or produced an invalid graph."""


class VerificationError(IbnifyError):
    """onnxruntime output differs from PyTorch beyond tolerance, or the files do not match."""


def first_line(exc: BaseException, fallback: str | None = None) -> str:
    """The first line of an exception's message (libraries' messages run to many lines).

    An empty message gives ``fallback``, or the exception's class name when that is None.
    """
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if fallback is None else fallback
