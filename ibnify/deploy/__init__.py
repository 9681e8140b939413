"""Deployment: fold BN halves, export to ONNX, run and verify in onnxruntime, measure latency.

Modules here import :mod:`ibnify.core`, :mod:`ibnify.data.images` (never scikit-learn),
:mod:`ibnify.errors`, :mod:`ibnify._io` and :mod:`ibnify.constants` only (the table in
``docs/architecture.md``, enforced by a test). The names below are this package's public face,
imported from their modules on first use.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "PROFILE_TOLERANCES": "export",
    "ExportOptions": "export",
    "ExportReport": "export",
    "export_onnx": "export",
    "read_onnx_metadata": "export",
    "Comparison": "verify",
    "VerifyOptions": "verify",
    "VerificationReport": "verify",
    "verify_onnx": "verify",
    "BenchOptions": "bench",
    "BenchReport": "bench",
    "Timing": "bench",
    "bench_onnx": "bench",
    "FoldReport": "fold",
    "fold_bn_halves": "fold",
    "check_onnx_file": "ort",
    "open_session": "ort",
    "open_engine": "engines",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
