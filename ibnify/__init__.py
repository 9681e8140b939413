"""ibnify: turn an existing BatchNorm CNN into its IBN-Net form.

The public API, as the README uses it: convert and plan (:func:`convert`, :func:`plan`,
:func:`analyze_graph`), checkpoints (:func:`save`, :func:`load`, :func:`read_recipe`),
fine-tuning and evaluation (:func:`finetune`, :class:`FinetuneConfig`, :func:`evaluate`,
:class:`ImageData`), placement (:func:`analyze`, the feature divergence, and
:func:`search_placement`), test-time adaptation (:func:`adapt`, :class:`OnlineAdapter`),
deployment (:func:`export_onnx`, :func:`verify_onnx`), the records (:class:`ConversionPlan`,
:class:`Recipe`), the :class:`IBN` layer and the error classes. Everything else lives on a
package face (``ibnify.core``, ``ibnify.models``, ``ibnify.data``, ``ibnify.train``,
``ibnify.placement``, ``ibnify.deploy``, ``ibnify.adaptation``). Names are imported on first
use (``"module:attribute"`` where the two differ) so that the command line starts without
loading torch for ``--help`` and usage errors.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

_ERRORS = (
    "IbnifyError",
    "InvalidOptionError",
    "ModelNotFoundError",
    "NoBatchNormError",
    "TraceError",
    "ConversionError",
    "WeightsError",
    "CheckpointError",
    "ExportError",
    "VerificationError",
)

_EXPORTS = {
    "convert": "api",
    "plan": "api",
    "analyze_graph": "core.graph:analyze",
    "IBN": "core.layers",
    "IBNAct": "core.layers",
    "ConversionPlan": "core.plans",
    "ConversionSite": "core.plans",
    "PlanOptions": "core.plans",
    "Recipe": "core.recipe",
    "load": "models.checkpoint",
    "read_recipe": "models.checkpoint",
    "save": "models.checkpoint",
    "ImageData": "data.images",
    "finetune": "train.loop",
    "FinetuneConfig": "train.config",
    "evaluate": "evaluation",
    "adapt": "adaptation.offline",
    "OnlineAdapter": "adaptation.entropy",
    "analyze": "placement.divergence:analyze_divergence",
    "search_placement": "placement.search",
    "SearchOptions": "commands.search",
    "export_onnx": "deploy.export",
    "ExportOptions": "deploy.export",
    "verify_onnx": "deploy.verify",
    **{name: "errors" for name in _ERRORS},
    "DataError": "data.images",
}

__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, _dir = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
