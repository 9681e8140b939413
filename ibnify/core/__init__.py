"""The converter's core: model → graph analysis → plan → converted module.

Modules here import nothing from ibnify but :mod:`ibnify.errors` (and the lazy-face helper), so
the converter can be read, tested and reused on its own. The names below are this package's
public face, imported from their modules on first use.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "IBN": "layers",
    "IBNAct": "layers",
    "InstanceNormAct2d": "layers",
    "freeze_instance_norms": "layers",
    "ConversionPlan": "plans",
    "ConversionSite": "plans",
    "PlanOptions": "plans",
    "SiteKind": "plans",
    "SkippedNorm": "plans",
    "Reason": "reasons",
    "ReasonCode": "reasons",
    "Recipe": "recipe",
    "get_recipe": "recipe",
    "apply_plan": "surgery",
    "get_plan": "surgery",
    "GraphAnalysis": "graph",
    "NormLayer": "graph",
    "ResidualBlock": "graph",
    "analyze_graph": "graph:analyze",
    "list_norm_layers": "graph",
    "LAYOUTS": "layouts",
    "Family": "layouts",
    "Layout": "layouts",
    "layout_choices": "layouts",
    "make_plan": "layouts",
    "resolve_layout": "layouts",
    "ResNetBody": "backbones",
    "find_resnet_body": "backbones",
    "NormKind": "ops",
    "OpKind": "ops",
    "norm_kind": "ops",
    "register_norm_kind": "ops",
    "has_batchnorm": "ops",
    "is_batchnorm_like": "ops",
    "is_frozen_batchnorm": "ops",
    "is_instance_norm": "ops",
    "device_of": "modules",
    "eval_mode": "modules",
    "modes_restored": "modules",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
