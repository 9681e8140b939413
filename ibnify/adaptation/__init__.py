"""Test-time adaptation: a trained model fitted to a target domain from unlabelled images.

Two methods. ``bn`` (AdaBN, the default): the BN statistics re-estimated on the target images
(:mod:`.statistics`). ``entropy`` (TENT-style, with EATA's sample filter and a collapse
warning): the chosen norms' affine parameters, BN and/or IN, learn to make the predictions
confident, then the statistics as ``bn`` (:mod:`.entropy`). Offline, :func:`adapt` returns an
adapted copy (:mod:`.offline`) and :func:`adapt_file` writes one (:mod:`.files`); online,
:class:`OnlineAdapter` adapts batch by batch while it predicts. See docs/adapt.md.

The names below are this package's public face, imported from their modules on first use.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "CollapseGuard": "entropy",
    "OnlineAdapter": "entropy",
    "affine_parameters": "entropy",
    "prediction_entropy": "entropy",
    "AdaptResult": "files",
    "adapt_file": "files",
    "adapt": "offline",
    "adaptations": "offline",
    "COLLAPSE_FRACTION": "options",
    "DEFAULT_LR": "options",
    "E_MARGIN_FRACTION": "options",
    "METHODS": "options",
    "NORM_CHOICES": "options",
    "AdaptOptions": "options",
    "check_prior": "options",
    "adaptable_norms": "statistics",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
