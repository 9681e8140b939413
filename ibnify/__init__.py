"""ibnify: turn an existing BatchNorm CNN into its IBN-Net form.

Public API: :func:`convert`, :func:`plan`, :func:`save`, :func:`load`, :func:`export_onnx`,
:func:`verify_onnx`, and the :class:`IBN` layer. Names are imported on first use so that the
command line starts without loading torch for ``--help`` and usage errors.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "convert": "api",
    "convert_named": "api",
    "load_weights": "models.weights",
    "plan": "api",
    "load": "models.checkpoint",
    "read_recipe": "models.checkpoint",
    "save": "models.checkpoint",
    "IbnifyError": "errors",
    "analyze": "core.graph",
    "list_norm_layers": "core.graph",
    "IBN": "core.layers",
    "IBNAct": "core.layers",
    "ConversionPlan": "core.plans",
    "ConversionSite": "core.plans",
    "PlanOptions": "core.plans",
    "apply_plan": "core.surgery",
    "get_plan": "core.surgery",
    "export_onnx": "deploy.export",
    "verify_onnx": "deploy.verify",
    "finetune": "train.loop",
    "evaluate": "evaluation",
    "analyze_divergence": "placement.divergence",
    "search_placement": "placement.search",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'ibnify' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
