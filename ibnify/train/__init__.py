"""Fine-tuning: the loop (loop), its options and losses (config), the checks before training
(checks), devices and processes (runtime), run files and resume (state), and what a run prints
(progress).

The names below are this package's public face, imported from their modules on first use.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "FinetuneResult": "loop",
    "finetune": "loop",
    "fresh_head": "loop",
    "FinetuneConfig": "config",
    "distillation_loss": "config",
    "lr_factor": "config",
    "make_optimizer": "config",
    "parameter_groups": "config",
    "check_fits": "checks",
    "FinetuneInterrupted": "progress",
    "pick_device": "runtime",
    "CHECKPOINT_FILE": "state",
    "METRICS_FILE": "state",
    "MODEL_FILE": "state",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
