"""Where IN should go: feature divergence per norm site (divergence) and the ranked search over
candidate layouts (search), each with its report.

The names below are this package's public face, imported from their modules on first use, so
``import ibnify.placement`` loads neither torch nor Optuna.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "analyze_divergence": "divergence",
    "gaussian_symmetric_kl": "divergence",
    "CONTENT_FACTOR": "divergence_report",
    "SUGGESTION_RULE": "divergence_report",
    "DivergenceReport": "divergence_report",
    "SiteDivergence": "divergence_report",
    "suggest_stages": "divergence_report",
    "CONTROL": "candidates",
    "Candidate": "candidates",
    "auto_candidates": "candidates",
    "choose_candidates": "candidates",
    "parse_candidates": "candidates",
    "SearchInputs": "search",
    "choose_objective": "search",
    "search_placement": "search",
    "OBJECTIVES": "search_report",
    "RANK_RULE": "search_report",
    "CandidateResult": "search_report",
    "SearchReport": "search_report",
    "rank_rule": "search_report",
    "differences": "search_state",
    "search_settings": "search_state",
    "weights_digest": "search_state",
    "SpaceItem": "space",
    "parse_space": "space",
    "resolve_space": "space",
    "RUNG_IMAGES": "runs",
    "rung_epochs": "runs",
    "DEFAULT_STUDY": "study",
    "PRUNERS": "study",
    "STUDY_FILE": "study",
    "SearchInterrupted": "study",
    "StudyOptions": "study",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
