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
