"""Find the published IBN-Net family inside the model a user brings.

Segmentation and detection models wrap a ResNet body: torchvision's DeepLab/FCN keep it in
``backbone`` (an ``IntermediateLayerGetter``), Faster R-CNN in ``backbone.body``, and
``create_feature_extractor`` rebuilds it as a GraphModule whose containers are plain modules. The
published IBN-a/IBN-b layouts name blocks by their ``layer{k}`` (stage k), not by resolution,
so a dilated body (DeepLab, ``replace_stride_with_dilation``) still gets the paper's sites.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .ops import is_batchnorm_like

__all__ = ["ResNetBody", "find_resnet_body"]

# A wrapper's ResNet body must hold at least this share of the model's norm layers, so that a
# network that merely contains a small ResNet-shaped part is not taken for a ResNet.
_MIN_NORM_SHARE = 0.5
_MAX_WRAPPER_DEPTH = 2


@dataclass(frozen=True)
class ResNetBody:
    """Where a torchvision-style ResNet body sits in a model and how its stages are named.

    ``prefix`` is ``""`` for a ResNet itself, else the qualified name of the body (with a
    trailing dot left off); ``stages[k - 1]`` lists the qualified names of stage k's blocks.
    """

    prefix: str
    stages: tuple[tuple[str, ...], ...]

    def name(self, relative: str) -> str:
        """The qualified name of ``relative`` (e.g. ``"bn1"``) inside the body."""
        return f"{self.prefix}.{relative}" if self.prefix else relative

    def stage_of(self, name: str) -> int | None:
        """Stage k of a layer named ``{prefix}.layer{k}...``; 0 elsewhere in the body (stem);
        None outside the body (a segmentation or detection head)."""
        if self.prefix and not name.startswith(self.prefix + "."):
            return None
        for k, blocks in enumerate(self.stages, start=1):
            if any(name.startswith(block + ".") for block in blocks):
                return k
        return 0


def _numbered_children(module: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """Children of a stage container named 0, 1, 2, ... (Sequential or a rebuilt plain module)."""
    children = list(module.named_children())
    if not children or [name for name, _ in children] != [str(i) for i in range(len(children))]:
        return None
    return children


def _stages(module: nn.Module, prefix: str) -> tuple[tuple[str, ...], ...]:
    """The ``layer1, layer2, ...`` stages of a ResNet-shaped module; () when it is not one."""
    stages = []
    k = 1
    while isinstance(getattr(module, f"layer{k}", None), nn.Module):
        blocks = _numbered_children(getattr(module, f"layer{k}"))
        if blocks is None or not all(
            is_batchnorm_like(getattr(block, "bn1", None)) for _, block in blocks
        ):
            return ()
        base = f"{prefix}.layer{k}" if prefix else f"layer{k}"
        stages.append(tuple(f"{base}.{name}" for name, _ in blocks))
        k += 1
    # HRNet's lone layer1 is not a ResNet body: at least two stages.
    return tuple(stages) if len(stages) >= 2 else ()


def _norm_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if is_batchnorm_like(m))


def find_resnet_body(model: nn.Module) -> ResNetBody | None:
    """The ResNet body of ``model``: the model itself, or a wrapper's submodule at depth ≤ 2.

    A wrapper's body counts only when it holds most of the model's BatchNorm layers (the
    segmentation or detection head around it is small).
    """
    stages = _stages(model, "")
    if stages:
        return ResNetBody("", stages)
    total = _norm_count(model)
    for name, module in model.named_modules():
        if not name or name.count(".") >= _MAX_WRAPPER_DEPTH:
            continue
        stages = _stages(module, name)
        if stages and _norm_count(module) >= _MIN_NORM_SHARE * total:
            return ResNetBody(name, stages)
    return None
