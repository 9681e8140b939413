"""ONNX export: torch.onnx.export with a dynamic batch axis, op-type checks, recipe metadata."""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from .. import __version__
from .._io import atomic_output
from ..core.graph import default_input_size
from ..core.surgery import get_plan
from ..errors import ExportError, first_line
from .fold import FoldReport, fold_bn_halves

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
_METADATA_PREFIX = "ibnify."


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
        lines.append(
            str(self.fold) if self.fold is not None else "BN halves not folded (--no-fold)"
        )
        return "\n".join(lines)


def _recipe_metadata(model: nn.Module) -> dict[str, str]:

    metadata = {"ibnify_version": __version__}
    plan = get_plan(model)
    if plan is not None:
        metadata.update(
            {
                "source": plan.arch,
                "layout": plan.layout,
                "stages": ",".join(str(s) for s in plan.stages),
                "ratio": "" if plan.ratio is None else repr(plan.ratio),
                "sites": str(len(plan.sites)),
                "plan": plan.to_json(indent=None),
            }
        )
    return metadata


def _input_size(model: nn.Module, input_size: Sequence[int] | int | None) -> tuple[int, int, int]:

    if input_size is None:
        return default_input_size(model)
    size = (input_size,) if isinstance(input_size, int) else tuple(int(v) for v in input_size)
    if len(size) == 1:
        channels = default_input_size(model)[0]
        size = (channels, size[0], size[0])
    elif len(size) == 2:
        size = (default_input_size(model)[0], *size)
    if len(size) != 3 or min(size) < 1:
        raise ExportError(f"input size {input_size!r} is not like 224 or (3, 224, 224)")
    return size  # type: ignore[return-value]


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


def _torch_export(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    dynamic: bool,
    dynamic_size: bool,
    dynamo: bool,
) -> None:
    # The TorchScript exporter (dynamo=False) is the default: in torch 2.14 it gives the same
    # clean InstanceNormalization and dynamic batch axis as the dynamo exporter, exports 4-7x
    # faster (ResNet-50 1 s vs 9 s, DenseNet-121 3.5 s vs 21 s), keeps GlobalAveragePool, and
    # does not specialise a batch-1 example to a static batch. ``dynamo=True`` stays available.
    output_names = ["output"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if dynamo:
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
                output_names=output_names,
                dynamic_shapes=shapes,
                verbose=False,
            )
            program.save(str(path), external_data=False)
        else:
            names = {0: "batch"} if dynamic else {}
            if dynamic_size:
                names.update({2: "height", 3: "width"})
            axes = {INPUT_NAME: names, "output": {0: "batch"} if dynamic else {}} if names else None
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_axes=axes,
                do_constant_folding=True,
            )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_size: Sequence[int] | int | None = None,
    opset: int = 18,
    dynamic_batch: bool = True,
    fold: bool = True,
    dynamo: bool = False,
    dynamic_size: bool = False,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` (atomic), BN halves folded, recipe in the metadata.

    Args:
        model: a converted model (or any CNN; a plain one gets no recipe metadata).
        path: output ``.onnx`` file; overwritten if it exists.
        input_size: 224, (224, 224) or (3, 224, 224); default from the model's timm cfg, else 224.
        opset: ONNX opset (≥ 17: InstanceNormalization and Split with sizes as input).
        dynamic_batch: export the batch axis as dynamic (``batch``).
        fold: fold each IBN's BN half into the preceding conv (see :func:`fold_bn_halves`).
        dynamo: use the torch.export-based exporter instead of the TorchScript one.
        dynamic_size: also export height and width as dynamic axes (for fully convolutional
            use; verification then checks a second spatial size).

    Raises:
        ExportError: the exporter failed, or the graph fails ``onnx.checker`` or the op checks.
    """

    if opset < 17:
        raise ExportError(f"opset {opset} is too old; use 17 or newer")
    size = _input_size(model, input_size)
    metadata = _recipe_metadata(model)
    if fold:
        export_model, fold_report = fold_bn_halves(model)
    else:
        export_model, fold_report = copy.deepcopy(model).eval(), None
    metadata["folded_sites"] = str(len(fold_report.folded)) if fold_report else "0"
    metadata["input_size"] = ",".join(str(v) for v in size)
    reference = next(export_model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    batch = 2 if dynamic_batch else 1
    example = torch.randn(batch, *size, device=device)
    has_in = any(isinstance(m, nn.InstanceNorm2d) for m in model.modules())
    target = Path(path)
    with atomic_output(target) as temp:
        try:
            _torch_export(export_model, example, temp, opset, dynamic_batch, dynamic_size, dynamo)
        except Exception as exc:  # the exporters raise many types; all mean "export failed"
            first = first_line(exc)
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {first}") from exc
        proto = onnx.load(str(temp))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = _METADATA_PREFIX + key, value
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx.checker rejects the exported graph: {exc}") from exc
        _check_graph(proto, has_in)
        onnx.save(proto, str(temp))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_param or d.dim_value for d in dims)
    op_types = dict(Counter(node.op_type for node in proto.graph.node))
    report = ExportReport(target, opset, shape, op_types, fold_report, metadata)
    logger.info("%s", report)
    return report


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``ibnify.*`` metadata_props of an ONNX file, without the prefix."""

    proto = onnx.load(os.fspath(path), load_external_data=False)
    return {
        p.key[len(_METADATA_PREFIX) :]: p.value
        for p in proto.metadata_props
        if p.key.startswith(_METADATA_PREFIX)
    }
