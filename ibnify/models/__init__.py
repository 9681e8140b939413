"""Models: names and constructor arguments (registry), the digits nets (small), safe weight
loading (weights), classifier heads (heads) and ibnify checkpoints (checkpoint).

The names below are this package's public face, imported from their modules on first use.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "MODEL_KWARGS": "registry",
    "SOURCES": "registry",
    "build_model": "registry",
    "check_model_kwargs": "registry",
    "resolve_name": "registry",
    "DigitsResNet": "small",
    "digits_resnet": "small",
    "clean_state_dict": "weights",
    "load_state_dict_file": "weights",
    "load_weights": "weights",
    "num_classes_of": "heads",
    "reset_classifier": "heads",
    "input_size_for": "checkpoint",
    "load": "checkpoint",
    "read_recipe": "checkpoint",
    "recipe_input_size": "checkpoint",
    "save": "checkpoint",
    "saved_recipe": "checkpoint",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
