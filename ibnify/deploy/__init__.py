"""Deployment: fold BN halves, export to ONNX, run and verify in onnxruntime, measure latency.

Modules here import :mod:`ibnify.core`, :mod:`ibnify.data`, :mod:`ibnify.errors` and
:mod:`ibnify._io` only (a test enforces it).
"""
