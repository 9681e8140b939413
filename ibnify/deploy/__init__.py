"""Deployment: fold BN halves, export to ONNX, run and verify in onnxruntime, measure latency.

Modules here import :mod:`ibnify.core`, :mod:`ibnify.data.images` (never scikit-learn),
:mod:`ibnify.errors`, :mod:`ibnify._io` and :mod:`ibnify.constants` only (the table in
``docs/architecture.md``, enforced by a test).
"""

__all__: list[str] = []
