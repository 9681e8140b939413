"""ONNX export: torch.onnx.export with a dynamic batch axis, op-type checks, recipe metadata.

Three profiles (stored as ``ibnify.profile`` in the metadata; ``verify`` takes its default
tolerance from there):

- ``default``: the fp32 graph, BN halves folded, the cheaper form at each IBN site.
- ``fp16``: the whole graph in float16 except InstanceNormalization, which stays float32 with
  its statistics (IN in fp16 overflows its variance and was wrong in some runtimes); converted
  by onnxruntime's maintained float16 converter with an op block list. Inputs and outputs stay
  float32.
- ``portable``: every InstanceNormalization decomposed into ReduceMean/Sub/Mul/Sqrt/Div, for
  engines with a slow or clamped IN (TensorRT clamps its epsilon to ≥ 1e-4); same numerics.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel
from torch import nn

from .. import __version__
from .._io import atomic_output
from ..constants import ONNX_OPSETS, PROFILES
from ..core.graph import default_input_size
from ..core.modules import device_of
from ..core.ops import is_instance_norm
from ..core.plans import as_input_size
from ..core.recipe import get_recipe
from ..errors import ExportError, first_line
from .fold import FOLD_FORMS, FoldReport, fold_bn_halves

logger = logging.getLogger(__name__)
_Options = TypeVar("_Options")

__all__ = [
    "INPUT_NAME",
    "PROFILE_TOLERANCES",
    "RECIPE_KEY",
    "ExportOptions",
    "ExportReport",
    "apply_profile",
    "check_opset",
    "decompose_instance_norm",
    "export_onnx",
    "onnx_op_types",
    "options_from",
    "output_names",
    "read_onnx_metadata",
]

INPUT_NAME = "input"
_METADATA_PREFIX = "ibnify."
RECIPE_KEY = "recipe"  # ``ibnify.recipe``: the model's Recipe.to_dict() as JSON
# (atol, rtol) against the fp32 PyTorch model. fp16 keeps ~3 significant digits per op and the
# error grows with depth: measured max abs error 1.1e-3 to 1.6e-3 on random-weight resnet18
# IBN-a/IBN-b and densenet121 IBN-a at 64 px (outputs ~2), 1.4e-2 on random-weight resnet50
# IBN-a at 224 px, 4.7e-4 of the largest logit on a trained digits model.
PROFILE_TOLERANCES = {"default": (1e-4, 1e-3), "portable": (1e-4, 1e-3), "fp16": (5e-2, 1e-2)}


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote."""

    path: Path
    opset: int
    input_shape: tuple[int | str, ...]
    op_types: dict[str, int]
    fold: FoldReport | None
    metadata: dict[str, str]

    def __str__(self) -> str:
        shape = "x".join(str(d) for d in self.input_shape)
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.op_types.items()))
        lines = [f"exported {self.path} (opset {self.opset}, input {shape})", f"ops: {ops}"]
        outputs = self.metadata.get("outputs", "output").split(",")
        if len(outputs) > 1:
            lines.append(f"outputs ({len(outputs)} feature maps): {', '.join(outputs)}")
        lines.append(
            str(self.fold) if self.fold is not None else "BN halves not folded (--no-fold)"
        )
        return "\n".join(lines)

    def details(self) -> str:
        """The report with one line per unfolded IBN site (``ibnify export --verbose``)."""
        if self.fold is None or not self.fold.unfolded:
            return str(self)
        return f"{self}\n{self.fold.details()}"


def _recipe_metadata(model: nn.Module) -> dict[str, str]:
    """The model's recipe as one JSON value (``ibnify.recipe``), with the simple keys older
    readers use (``source``, ``layout``, ``stages``, ``ratio``, ``sites``, the last ``plan``)
    derived from it; a model without a recipe gets the ibnify version only, one with no plan
    (saved unconverted) its recipe and source only."""
    metadata = {"ibnify_version": __version__}
    recipe = get_recipe(model)
    if recipe is None:
        return metadata
    record = {**recipe.to_dict(), "ibnify_version": recipe.ibnify_version or __version__}
    metadata[RECIPE_KEY] = json.dumps(record, separators=(",", ":"))
    metadata["source"] = recipe.label
    if recipe.plan is None:
        return metadata
    summary = recipe.summary()
    metadata.update(
        {
            "layout": summary["layout"],
            "stages": ",".join(str(s) for s in summary["stages"]),
            "ratio": "" if summary["ratio"] is None else repr(summary["ratio"]),
            "sites": str(summary["sites"]),
            "plan": recipe.plan.to_json(indent=None),
        }
    )
    return metadata


def onnx_op_types(path: str | os.PathLike[str]) -> Counter[str]:
    """Count the op types of the main graph of an ONNX file."""
    return Counter(node.op_type for node in onnx.load(os.fspath(path)).graph.node)


def _check_graph(model_proto: Any, expect_instance_norm: bool) -> None:
    """Assert the export hygiene DESIGN.md lists: IN present, no training-mode BN."""
    ops = Counter(node.op_type for node in model_proto.graph.node)
    if expect_instance_norm and ops["InstanceNormalization"] == 0:
        raise ExportError(
            "the exported graph holds no InstanceNormalization although the model has IN layers"
        )
    for node in model_proto.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        for attribute in node.attribute:
            if attribute.name == "training_mode" and attribute.i == 1:
                raise ExportError(
                    f"the exporter emitted BatchNormalization {node.name!r} with training_mode=1;"
                    " the model was not exported in eval mode"
                )


def output_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    """ONNX output names for the model's outputs: ``output`` for one tensor, else one per map.

    Feature extractors (timm ``features_only``, torchvision ``IntermediateLayerGetter`` and
    ``create_feature_extractor``) return a list or a dict of feature maps; each becomes its own
    ONNX output, ``output_<i>`` for a list, ``output_<key>`` for a dict, in the model's order.
    """
    with torch.no_grad():
        result = model(example)
    if isinstance(result, torch.Tensor):
        return ["output"]
    if isinstance(result, dict):
        names = [f"output_{key}" for key in result]
        values = list(result.values())
    elif isinstance(result, list | tuple):
        names = [f"output_{index}" for index in range(len(result))]
        values = list(result)
    else:
        raise ExportError(f"the model returns a {type(result).__name__}, not tensors")
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise ExportError("the model returns nested or non-tensor outputs; ibnify exports tensors")
    return names


def _torch_export(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    options: ExportOptions,
    outputs: list[str],
) -> None:
    """torch.onnx.export with the options' opset and dynamic axes (batch; height and width)."""
    opset, dynamic, dynamic_size = options.opset, options.dynamic_batch, options.dynamic_size
    # The TorchScript exporter (dynamo=False) is the default: in torch 2.14 it gives the same
    # clean InstanceNormalization and dynamic batch axis as the dynamo exporter, exports 4-7x
    # faster (ResNet-50 1 s vs 9 s, DenseNet-121 3.5 s vs 21 s), keeps GlobalAveragePool, and
    # does not specialise a batch-1 example to a static batch. ``dynamo=True`` stays available.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if options.dynamo:
            dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1)} if dynamic else {}
            if dynamic_size:
                dims.update({2: torch.export.Dim("height"), 3: torch.export.Dim("width")})
            shapes = (dims,) if dims else None
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_shapes=shapes,
                verbose=False,
            )
            program.save(str(path), external_data=False)
        else:
            names = {0: "batch"} if dynamic else {}
            if dynamic_size:
                names.update({2: "height", 3: "width"})
            axes = None
            if names:
                axes = {INPUT_NAME: names, **{o: {0: "batch"} if dynamic else {} for o in outputs}}
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_axes=axes,
                do_constant_folding=True,
            )


def check_opset(opset: int) -> int:
    """Return ``opset`` or raise ExportError naming the range ibnify exports (ONNX_OPSETS)."""
    low, high = ONNX_OPSETS[0], ONNX_OPSETS[-1]
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in ONNX_OPSETS:
        raise ExportError(
            f"opset {opset!r} is outside the range ibnify exports ({low} to {high}: 17 is the "
            f"first with InstanceNormalization and Split sizes as an input, {high} the newest "
            "torch's exporter writes)"
        )
    return opset


@dataclass(frozen=True)
class ExportOptions:
    """How :func:`export_onnx` exports: the options as one record (the CLI builds one).

    Attributes:
        input_size: 224, (224, 224) or (3, 224, 224); default: the size the recipe records, else
            the model's timm cfg, else 224.
        opset: ONNX opset, 17 to 20 (:data:`ibnify.constants.ONNX_OPSETS`).
        dynamic_batch: export the batch axis as dynamic (``batch``).
        fold: fold each IBN's BN half into the preceding conv (see :func:`fold_bn_halves`).
        dynamo: use the torch.export-based exporter instead of the TorchScript one.
        dynamic_size: also export height and width as dynamic axes (for fully convolutional
            use; verification then checks a second spatial size).
        profile: ``default``, ``fp16`` or ``portable`` (see the module docstring).
        fold_form: ``auto``, ``concat`` or ``split``: the graph at each folded IBN site (see
            :func:`~ibnify.deploy.fold.choose_form`).
    """

    input_size: Sequence[int] | int | None = None
    opset: int = 18
    dynamic_batch: bool = True
    fold: bool = True
    dynamo: bool = False
    dynamic_size: bool = False
    profile: str = "default"
    fold_form: str = "auto"

    def validate(self) -> ExportOptions:
        """Return the options, or raise ExportError in one line before anything is exported."""
        check_opset(self.opset)
        if self.input_size is not None:
            as_input_size(self.input_size)
        if self.profile not in PROFILES:
            raise ExportError(
                f"export profile {self.profile!r} is not one of {', '.join(PROFILES)}"
            )
        if self.fold_form not in FOLD_FORMS:
            raise ExportError(f"fold form {self.fold_form!r} is not one of {', '.join(FOLD_FORMS)}")
        return self


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    options: ExportOptions | None = None,
    *,
    check: Callable[[Path], None] | None = None,
    **keywords: Any,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` (atomic), BN halves folded, recipe in the metadata.

    Args:
        model: a converted model (or any CNN; a plain one gets no recipe metadata).
        path: output ``.onnx`` file; overwritten if it exists.
        options: an :class:`ExportOptions`; or give its fields as keywords
            (``export_onnx(model, path, input_size=64, profile="fp16")``), not both.
        check: called with the finished temporary file before it replaces ``path`` (e.g. a
            verification); whatever it raises leaves ``path`` untouched.

    Raises:
        ExportError: a bad option (before any export), the exporter failed, or the graph fails
            ``onnx.checker`` or the op checks.
    """
    chosen = _export_options(options, keywords).validate()
    size = _export_size(model, chosen.input_size)
    if chosen.fold:
        export_model, fold_report = fold_bn_halves(model, form=chosen.fold_form, input_size=size)
    else:
        export_model, fold_report = copy.deepcopy(model).eval(), None
    example = torch.randn(2 if chosen.dynamic_batch else 1, *size, device=device_of(export_model))
    outputs = output_names(export_model, example)
    metadata = {**_recipe_metadata(model), **_export_metadata(chosen, fold_report, size, outputs)}
    has_in = any(is_instance_norm(m) for m in model.modules())
    target = Path(path)
    with atomic_output(target) as temp:
        _export_to(export_model, example, temp, chosen, outputs)
        proto = onnx.load(str(temp))
        _check_graph(proto, has_in)
        proto = apply_profile(proto, chosen.profile)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = _METADATA_PREFIX + key, value
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx.checker rejects the exported graph: {exc}") from exc
        onnx.save(proto, str(temp))
        if check is not None:
            check(temp)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_param or d.dim_value for d in dims)
    op_types = dict(Counter(node.op_type for node in proto.graph.node))
    report = ExportReport(target, chosen.opset, shape, op_types, fold_report, metadata)
    logger.info("%s", report)
    return report


def _export_size(model: nn.Module, given: Sequence[int] | int | None) -> tuple[int, int, int]:
    """The (C, H, W) to export at: ``given`` (one or two numbers take the model's channels),
    else the size the recipe records, else the model's own default. A given channel count
    other than the one the recipe records is refused before anything is exported."""
    recipe = get_recipe(model)
    recorded = recipe.input_size if recipe else None
    default = recorded or default_input_size(model)
    if given is None:
        return default
    size = as_input_size(given, default[0])
    if recorded is not None and size[0] != recorded[0]:
        shown = "×".join(str(v) for v in size)
        raise ExportError(
            f"`input_size` {shown} has {size[0]} channel{'s' if size[0] != 1 else ''}, but the "
            "model was converted for "
            f"{recorded[0]}-channel images ({'×'.join(str(v) for v in recorded)})"
        )
    return size


def _export_to(
    model: nn.Module, example: torch.Tensor, temp: Path, options: ExportOptions, outputs: list[str]
) -> None:
    """torch's exporter into ``temp``; whatever it raises becomes one ExportError line."""
    try:
        _torch_export(model, example, temp, options, outputs)
    except Exception as exc:  # the exporters raise many types; all mean "export failed"
        first = first_line(exc)
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {first}") from exc


def _export_options(options: ExportOptions | None, keywords: dict[str, Any]) -> ExportOptions:
    """``options``, or the options the keywords describe (not both; unknown names refused)."""
    return options_from(ExportOptions, options, keywords, "export_onnx")


def options_from(
    kind: type[_Options], options: _Options | None, keywords: dict[str, Any], caller: str
) -> _Options:
    """``options`` (a ``kind`` record), or the ``kind`` its fields given as keywords describe;
    not both, and an unknown name is refused (a ``TypeError``, as for a misspelt argument)."""
    names = [f.name for f in fields(kind)]  # type: ignore[arg-type]
    unknown = sorted(set(keywords) - set(names))
    if unknown:
        raise TypeError(
            f"{caller}() got unknown option {unknown[0]!r}; options: {', '.join(names)}"
        )
    if options is None:
        return kind(**keywords)
    if keywords:
        raise TypeError(f"{caller}() takes options= or option keywords, not both")
    return options


def _export_metadata(
    options: ExportOptions,
    fold_report: FoldReport | None,
    size: tuple[int, int, int],
    outputs: list[str],
) -> dict[str, str]:
    """The export's own ``ibnify.*`` entries (the recipe's come from :func:`_recipe_metadata`)."""
    metadata = {
        "folded_sites": str(len(fold_report.folded)) if fold_report else "0",
        "profile": options.profile,
        "fold_form": options.fold_form if options.fold else "none",
    }
    if fold_report is not None and fold_report.forms:
        chosen = Counter(fold_report.forms.values())
        metadata["site_forms"] = ",".join(f"{form}:{chosen[form]}" for form in sorted(chosen))
    metadata["input_size"] = ",".join(str(v) for v in size)
    metadata["outputs"] = ",".join(outputs)
    return metadata


def apply_profile(proto: onnx.ModelProto, profile: str) -> onnx.ModelProto:
    """Rewrite an exported fp32 graph for ``profile`` (``default`` returns it unchanged)."""
    if profile == "fp16":
        converted = OnnxModel(
            convert_float_to_float16(
                proto, keep_io_types=True, op_block_list=["InstanceNormalization"]
            )
        )
        converted.topological_sort()  # the converter appends the input casts at the end
        return converted.model
    if profile == "portable":
        return decompose_instance_norm(proto)
    return proto


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 17)


def _decomposed(node: onnx.NodeProto, opset: int) -> tuple[list[onnx.NodeProto], list]:
    """ReduceMean/Sub/Mul/Sqrt/Div nodes computing one InstanceNormalization exactly."""
    x, scale, bias = node.input
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    name = node.name or node.output[0]
    t = {k: f"{name}/portable/{k}" for k in ("axes", "cax", "eps", "mean", "d", "sq", "var")}
    t.update({k: f"{name}/portable/{k}" for k in ("ve", "std", "n", "s", "b", "ns")})
    constants = [
        numpy_helper.from_array(np.array([2, 3], dtype=np.int64), t["axes"]),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), t["cax"]),
        numpy_helper.from_array(np.array(eps, dtype=np.float32), t["eps"]),
    ]

    def mean(source: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [source, t["axes"]], [out], keepdims=1)
        return helper.make_node("ReduceMean", [source], [out], axes=[2, 3], keepdims=1)

    nodes = [
        mean(x, t["mean"]),
        helper.make_node("Sub", [x, t["mean"]], [t["d"]]),
        helper.make_node("Mul", [t["d"], t["d"]], [t["sq"]]),
        mean(t["sq"], t["var"]),
        helper.make_node("Add", [t["var"], t["eps"]], [t["ve"]]),
        helper.make_node("Sqrt", [t["ve"]], [t["std"]]),
        helper.make_node("Div", [t["d"], t["std"]], [t["n"]]),
        helper.make_node("Unsqueeze", [scale, t["cax"]], [t["s"]]),
        helper.make_node("Unsqueeze", [bias, t["cax"]], [t["b"]]),
        helper.make_node("Mul", [t["n"], t["s"]], [t["ns"]]),
        helper.make_node("Add", [t["ns"], t["b"]], [node.output[0]]),
    ]
    for index, item in enumerate(nodes):
        item.name = f"{name}/portable/{index}"
    return nodes, constants


def decompose_instance_norm(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every InstanceNormalization of the main graph by its elementary ops.

    y = (x - mean) / sqrt(var + eps) * scale + bias over each sample's channel (H, W), with the
    biased variance, exactly as the op defines it.
    """
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    opset = _opset(result)
    nodes: list[onnx.NodeProto] = []
    for node in result.graph.node:
        if node.op_type != "InstanceNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        replacement, constants = _decomposed(node, opset)
        nodes += replacement
        result.graph.initializer.extend(constants)
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return result


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``ibnify.*`` metadata_props of an ONNX file, without the prefix."""
    proto = onnx.load(os.fspath(path), load_external_data=False)
    return {
        p.key[len(_METADATA_PREFIX) :]: p.value
        for p in proto.metadata_props
        if p.key.startswith(_METADATA_PREFIX)
    }
