"""ibnify: turn an existing BatchNorm CNN into its IBN-Net form.

Public API: :func:`convert`, :func:`plan`, :func:`save`, :func:`load`, :func:`export_onnx`,
:func:`verify_onnx`, :func:`finetune`, :func:`evaluate`, :func:`analyze` (feature divergence, as
``ibnify analyze``), :func:`analyze_graph` (the norm-layer graph analysis), and the :class:`IBN`
layer. Names are imported on first use (``"module:attribute"`` where the two differ) so that the
command line starts without loading torch for ``--help`` and usage errors.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "adapt": "adaptation",
    "OnlineAdapter": "adaptation",
    "convert": "api",
    "convert_named": "api",
    "load_weights": "models.weights",
    "plan": "api",
    "load": "models.checkpoint",
    "read_recipe": "models.checkpoint",
    "save": "models.checkpoint",
    "IbnifyError": "errors",
    "analyze": "placement.divergence:analyze_divergence",
    "analyze_graph": "core.graph:analyze",
    "list_norm_layers": "core.graph",
    "IBN": "core.layers",
    "IBNAct": "core.layers",
    "ConversionPlan": "core.plans",
    "ConversionSite": "core.plans",
    "PlanOptions": "core.plans",
    "apply_plan": "core.surgery",
    "get_plan": "core.surgery",
    "get_recipe": "core.recipe",
    "recipe_input_size": "models.checkpoint",
    "resolve_model": "api",
    "export_onnx": "deploy.export",
    "ExportOptions": "deploy.export",
    "Recipe": "core.recipe",
    "verify_onnx": "deploy.verify",
    "finetune": "train.loop",
    "evaluate": "evaluation",
    "search_placement": "placement.search",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'ibnify' has no attribute {name!r}")
    module_name, _, attribute = target.partition(":")
    value = getattr(importlib.import_module(f".{module_name}", __name__), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
