"""Reasons: why a norm is left unchanged, as a ``Reason(code, at, value)`` record.

A plan stores the record (``{"code", "at", "value"}`` in its JSON); the sentence is rendered from
the code only for display. Plans written before reasons were records stored the sentence: it is
mapped back to its code here, or kept as a ``legacy`` reason with the text as its value.
"""

from __future__ import annotations

import ast
import contextlib
import re
import string
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["Reason", "ReasonCode"]


class ReasonCode(StrEnum):
    """Why a norm is left unchanged: the data behind each sentence of a plan's skip list."""

    NOT_2D_BATCHNORM = "not_2d_batchnorm"
    STEM = "stem"
    STAGE_NOT_CHOSEN = "stage_not_chosen"
    TOO_FEW_CHANNELS = "too_few_channels"
    POOLED = "pooled"
    SHORTCUT = "shortcut"
    SETS_RESIDUAL_SCALE = "sets_residual_scale"
    NOT_FIRST_IN_BLOCK = "not_first_in_block"
    NOT_FED_BY_CONV = "not_fed_by_conv"
    AFTER_DEPTHWISE = "after_depthwise"
    PROJECTION = "projection"
    OUTSIDE_BLOCKS = "outside_blocks"
    UNKNOWN_ROLE = "unknown_role"
    NOT_PICKED = "not_picked"
    # Hazards: the norm's channels must not be split into IN and BN parts.
    FEEDS_ADDITION = "feeds_addition"
    INDEXED = "indexed"
    SLICE_CUTS = "slice_cuts"
    SPLIT_UNKNOWN_DIM = "split_unknown_dim"
    SPLIT_PATHS = "split_paths"
    RESHAPE = "reshape"
    SHUFFLE = "shuffle"
    UNKNOWN_OP = "unknown_op"
    # Published layouts.
    ALREADY_CONVERTED = "already_converted"
    RESNET_SHORTCUT = "resnet_shortcut"
    RESNET_PRE_ADD = "resnet_pre_add"
    RESNET_NOT_BN1 = "resnet_not_bn1"
    IBN_B_UNTOUCHED = "ibn_b_untouched"
    DENSE_OUTSIDE = "dense_outside"
    DENSE_BLOCK_NOT_CHOSEN = "dense_block_not_chosen"
    DENSE_NOT_NORM1 = "dense_not_norm1"
    DENSE_NOT_THIRD = "dense_not_third"
    OUTSIDE_BODY = "outside_body"
    # A sentence from a plan written before reasons were stored as codes, matching no template.
    LEGACY = "legacy"


# code -> the sentence, with {value}/{at} fields
_REASON_TEXT: dict[ReasonCode, str] = {
    ReasonCode.NOT_2D_BATCHNORM: "not a 2-D BatchNorm ({value})",
    ReasonCode.STEM: "stem (IBN-a keeps the stem BN)",
    ReasonCode.OUTSIDE_BODY: "outside the ResNet body (segmentation or detection head)",
    ReasonCode.STAGE_NOT_CHOSEN: "stage {value} not chosen",
    ReasonCode.TOO_FEW_CHANNELS: "fewer than 2 channels: nothing to split",
    ReasonCode.POOLED: "runs on pooled 1×1 features (attention/SE branch): IN needs H×W",
    ReasonCode.SHORTCUT: "shortcut BN",
    ReasonCode.SETS_RESIDUAL_SCALE: "last BN before the residual addition, sets its scale",
    ReasonCode.NOT_FIRST_IN_BLOCK: (
        "not the first safe main-branch BN, IBN-a converts one BN per block"
    ),
    ReasonCode.NOT_FED_BY_CONV: "not fed by a convolution (pre-activation, head or unknown input)",
    ReasonCode.AFTER_DEPTHWISE: (
        "after a depthwise conv (the depthwise-separable rule converts the BN after the block's "
        "expansion conv)"
    ),
    ReasonCode.PROJECTION: (
        "projection BN of a depthwise-separable block (after the depthwise conv)"
    ),
    ReasonCode.OUTSIDE_BLOCKS: "outside the residual blocks (transition or aggregation layer)",
    ReasonCode.UNKNOWN_ROLE: "role {value!r} unknown to the generic rule",
    ReasonCode.NOT_PICKED: "not picked by the generic rule",
    ReasonCode.FEEDS_ADDITION: "its output feeds an addition directly",
    ReasonCode.INDEXED: "its channels are indexed in a way ibnify cannot follow ({at})",
    ReasonCode.SLICE_CUTS: "a channel slice cuts through its IN and BN parts",
    ReasonCode.SPLIT_UNKNOWN_DIM: "its channels are split along an unknown dim",
    ReasonCode.SPLIT_PATHS: "a channel split would send its IN and BN parts down different paths",
    ReasonCode.RESHAPE: (
        "a reshape/transpose moves its channels (channel shuffle or layout change), ibnify "
        "does not follow them"
    ),
    ReasonCode.SHUFFLE: "a channel shuffle interleaves its channels",
    ReasonCode.UNKNOWN_OP: "its output reaches an op ibnify does not know, cautious default",
    ReasonCode.ALREADY_CONVERTED: "already converted",
    ReasonCode.RESNET_SHORTCUT: "shortcut (downsample) BN",
    ReasonCode.RESNET_PRE_ADD: "last BN before the residual addition (sets the residual's scale)",
    ReasonCode.RESNET_NOT_BN1: "IBN-a converts only the block's first BN (bn1)",
    ReasonCode.IBN_B_UNTOUCHED: "IBN-b changes only the stem BN and adds IN after additions",
    ReasonCode.DENSE_OUTSIDE: "outside the dense blocks (stem, transition or head)",
    ReasonCode.DENSE_BLOCK_NOT_CHOSEN: "dense block {value} not chosen",
    ReasonCode.DENSE_NOT_NORM1: "DenseNet IBN-a converts norm1 only",
    ReasonCode.DENSE_NOT_THIRD: "DenseNet IBN-a converts every third dense layer (1, 4, 7, ...)",
    ReasonCode.LEGACY: "{value}",
}
# where a location is appended to the sentence (" (at node)", " (block name)")
_AT = " (at {at})"
_BLOCK = " (block {at})"
_SUFFIX: dict[ReasonCode, str] = {
    ReasonCode.SHORTCUT: _BLOCK,
    ReasonCode.SETS_RESIDUAL_SCALE: _BLOCK,
    ReasonCode.NOT_FIRST_IN_BLOCK: _BLOCK,
    ReasonCode.FEEDS_ADDITION: _AT,
    ReasonCode.SLICE_CUTS: _AT,
    ReasonCode.SPLIT_UNKNOWN_DIM: _AT,
    ReasonCode.SPLIT_PATHS: _AT,
    ReasonCode.RESHAPE: _AT,
    ReasonCode.SHUFFLE: _AT,
    ReasonCode.UNKNOWN_OP: _AT,
}


@dataclass(frozen=True)
class Reason:
    """Why a norm is left unchanged, as data; ``str()`` gives the sentence a plan shows.

    ``at`` names the node or block the reason points at, ``value`` fills the sentence (a stage
    number, a module kind). The plan JSON stores ``{"code", "at", "value"}``; code decides on
    ``code``, never on the text.
    """

    code: ReasonCode
    at: str | None = None
    value: str | int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", ReasonCode(self.code))

    @property
    def summary(self) -> str:
        """The sentence without its location suffix (for counting reasons across norms)."""
        return _REASON_TEXT[self.code].format(value=self.value, at=self.at)

    def __str__(self) -> str:
        suffix = _SUFFIX.get(self.code)
        return self.summary + suffix.format(at=self.at) if suffix else self.summary

    def to_dict(self) -> dict[str, Any]:
        """``{"code", "at", "value"}``: how a saved plan holds a reason."""
        return {"code": str(self.code), "at": self.at, "value": self.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str) -> Reason:
        """A reason from its record, or from the sentence an older plan stored instead.

        A sentence maps back to its code (with ``at`` and ``value``) when it matches one of the
        templates; any other sentence becomes ``ReasonCode.LEGACY`` with the text as ``value``,
        so an old plan still loads and shows what it said.
        """
        if isinstance(data, str):
            return _reason_from_sentence(data)
        if not isinstance(data, dict):
            raise TypeError(f"a reason is a record or a sentence, not {type(data).__name__}")
        code = data["code"]
        if code not in _CODES:
            raise ValueError(f"unknown reason code {code!r}")
        return cls(ReasonCode(code), at=data.get("at"), value=data.get("value"))


_CODES = frozenset(str(code) for code in ReasonCode)


def _sentence_pattern(template: str) -> tuple[re.Pattern[str], bool]:
    """A regex matching ``template``'s sentences, and whether its value is written as a repr."""
    parts, as_repr = [], False
    for literal, field_name, _spec, conversion in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field_name is not None:
            parts.append(f"(?P<{field_name}>.+?)")
            as_repr = as_repr or (field_name == "value" and conversion == "r")
    return re.compile("".join(parts) + r"\Z"), as_repr


# Every code but LEGACY, with the pattern of its full sentence (template plus location suffix).
_SENTENCES = {
    code: _sentence_pattern(text + _SUFFIX.get(code, ""))
    for code, text in _REASON_TEXT.items()
    if code != ReasonCode.LEGACY
}


def _reason_from_sentence(sentence: str) -> Reason:
    """The Reason whose ``str()`` is ``sentence`` (older plans), else a LEGACY reason."""
    for code, (pattern, as_repr) in _SENTENCES.items():
        match = pattern.match(sentence)
        if match is None:
            continue
        fields = match.groupdict()
        value: str | int | None = fields.get("value")
        if value is not None and as_repr:
            with contextlib.suppress(ValueError, SyntaxError):
                value = ast.literal_eval(value)
        elif value is not None and value.isdigit():
            value = int(value)
        return Reason(code, at=fields.get("at"), value=value)
    return Reason(ReasonCode.LEGACY, value=sentence)
