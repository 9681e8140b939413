"""Fold each IBN's BN half into the conv before it, so onnxruntime keeps only the IN.

onnxruntime fuses a plain BatchNormalization into the Conv before it, but not one that sits
behind the channel Split of an IBN layer: the naive export keeps 13 extra BatchNormalization
nodes in ResNet-50 IBN-a and runs a few percent slower than the original network.
:func:`fold_bn_halves` scales the matching output channels of the preceding conv by the BN
half's eval-mode affine transform, so the exported graph keeps only the InstanceNormalization.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..constants import FOLD_FORMS
from ..core.graph import default_input_size, trace
from ..core.layers import IBN
from ..core.tracing import dummy_input
from ..errors import ExportError, TraceError, first_line

__all__ = [
    "SPLIT_MIN_POSITIONS",
    "FoldReport",
    "FoldedIBN",
    "SplitConvIBN",
    "SplitNextConvIBN",
    "choose_form",
    "fold_bn_halves",
]

logger = logging.getLogger(__name__)


class FoldedIBN(nn.Module):
    """An IBN whose BN half has been folded into the preceding conv: IN on one half only.

    The BN half passes through unchanged; the IN half, the split sizes and the order are the
    original IBN's, and an ``IBNAct``'s ``drop``/``act`` are kept.
    """

    def __init__(self, ibn: IBN) -> None:
        super().__init__()
        self.IN = ibn.IN
        self.split_sizes = tuple(ibn.split_sizes)
        self.order = ibn.order
        self.num_features = ibn.num_features
        self.drop = getattr(ibn, "drop", nn.Identity())
        self.act = getattr(ibn, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = torch.split(x, self.split_sizes, dim=1)
        if self.order == "in_first":
            out = torch.cat((self.IN(first), second), dim=1)
        else:
            out = torch.cat((first, self.IN(second)), dim=1)
        return self.act(self.drop(out))

    def extra_repr(self) -> str:
        return f"{self.num_features}, order={self.order}, split={self.split_sizes}, BN folded"


class SplitConvIBN(nn.Module):
    """Conv → IBN (BN half folded) → activation, rewritten so onnxruntime keeps its fast layout.

    onnxruntime's CPU optimizer runs convolutions in a blocked channel layout (NCHWc) and has no
    blocked InstanceNormalization: every IN forces layout reorders around it, and a Split or a
    Concat with one plain-layout input forces reorders of the whole tensor. Here the conv is split
    into an IN-half conv and a BN-half conv (BN already folded in, activation fused by
    onnxruntime); the IN half runs a non-affine InstanceNorm whose affine and activation move
    into a depthwise 1×1 conv, which brings the IN half back into the blocked layout. Only the IN
    half is reordered, out and back. This is the ``concat`` form; :class:`SplitNextConvIBN`
    is the ``split`` form, which also drops the Concat.
    """

    def __init__(self, conv: nn.Conv2d, ibn: IBN, act: nn.Module) -> None:
        super().__init__()
        self.order = ibn.order
        self.eps = float(ibn.IN.eps)
        ins, bns = ibn.in_slice(), ibn.bn_slice()
        self.conv_in = _conv_part(conv, conv.weight[ins], _bias(conv, ins))
        self.conv_bn = _conv_part(conv, conv.weight[bns], _bias(conv, bns))
        channels = ibn.in_channels
        reference = ibn.IN.weight
        self.affine = nn.Conv2d(
            channels,
            channels,
            1,
            groups=channels,
            device=reference.device,
            dtype=reference.dtype,
        )
        with torch.no_grad():
            self.affine.weight.copy_(ibn.IN.weight.reshape(channels, 1, 1, 1))
            self.affine.bias.copy_(ibn.IN.bias)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = nn.functional.instance_norm(self.conv_in(x), eps=self.eps)
        normed = self.act(self.affine(normed))
        passed = self.act(self.conv_bn(x))
        if self.order == "in_first":
            return torch.cat((normed, passed), dim=1)
        return torch.cat((passed, normed), dim=1)


class SplitNextConvIBN(nn.Module):
    """The ``split`` form: :class:`SplitConvIBN` without its Concat, the next conv split instead.

    A conv over a concatenation equals the sum of convs over its parts, so the next conv is split
    by input channels into an IN-part and a BN-part conv whose outputs are added (bias on the
    BN part only). onnxruntime fuses that Add into the second conv (Conv+Sum), so nothing leaves
    the blocked layout except the IN half. It saves the Concat but runs two half-input convs;
    :func:`choose_form` uses it at high resolution only.
    """

    def __init__(self, conv: nn.Conv2d, ibn: IBN, act: nn.Module, following: nn.Conv2d) -> None:
        super().__init__()
        self.head = SplitConvIBN(conv, ibn, act)
        ins, bns = ibn.in_slice(), ibn.bn_slice()
        self.next_in = _conv_part(following, following.weight[:, ins], None)
        self.next_bn = _conv_part(following, following.weight[:, bns], following.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.head
        normed = nn.functional.instance_norm(head.conv_in(x), eps=head.eps)
        normed = head.act(head.affine(normed))
        passed = head.act(head.conv_bn(x))
        return self.next_in(normed) + self.next_bn(passed)


# Per-op profiling of onnxruntime's CPU kernels (issue 12) found the split form cheaper at 56×56
# and 28×28 sites and dearer at 14×14. benchmarks/fold_forms.py (2 threads, AVX2 machine, shared)
# puts the two forms within ±1% of each other per site and concat-everywhere the slowest
# whole-network variant; it does not contradict the threshold, so the threshold stays.
SPLIT_MIN_POSITIONS = 28 * 28


def choose_form(height: int, width: int) -> str:
    """The cheaper form for an IBN site whose output is ``height``×``width``: split or concat."""
    return "split" if height * width >= SPLIT_MIN_POSITIONS else "concat"


def _bias(conv: nn.Conv2d, channels: slice) -> torch.Tensor | None:
    return None if conv.bias is None else conv.bias[channels]


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = x * scale + shift`` per channel, in float64."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _conv_part(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A Conv2d with ``conv``'s geometry and the given (sliced) weight and bias; groups == 1."""
    part = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        part.weight.copy_(weight)
        if bias is not None:
            part.bias.copy_(bias)
    return part.eval()


# Element-wise activations: applying them to each half before the Concat is exact.
_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.Mish,
    nn.Identity,
)
_RELU_FUNCTIONS = {torch.relu, nn.functional.relu, torch.relu_}


@dataclass
class FoldReport:
    """Which IBN sites had their BN half folded into a conv, and why the others did not."""

    folded: list[tuple[str, str]] = field(default_factory=list)  # (ibn name, conv name)
    split: list[str] = field(default_factory=list)  # ibn names whose conv was split in two
    unfolded: list[tuple[str, str]] = field(default_factory=list)  # (ibn name, reason)
    forms: dict[str, str] = field(default_factory=dict)  # split sites -> "concat" | "split"

    def __str__(self) -> str:
        counts = Counter(self.forms.values())
        lines = [
            f"BN halves folded: {len(self.folded)} (conv split in two: {len(self.split)}; "
            f"concat form {counts['concat']}, split-next-conv form {counts['split']}), "
            f"left unfolded: {len(self.unfolded)}"
        ]
        lines += [
            f"  {count} site{'s' if count > 1 else ''} left unfolded: {reason}"
            for reason, count in self.unfolded_reasons().items()
        ]
        return "\n".join(lines)

    def unfolded_reasons(self) -> Counter[str]:
        """How many sites were left unfolded for each reason, in the order first seen."""
        return Counter(reason for _, reason in self.unfolded)

    def summary(self) -> str:
        """One line for a warning: the unfolded count and the reasons, without site names."""
        reasons = self.unfolded_reasons()
        text = "; ".join(
            f"{count} × {reason}" if len(reasons) > 1 else reason
            for reason, count in reasons.most_common()
        )
        total = len(self.unfolded)
        return f"{total} IBN site{'s' if total != 1 else ''} exported unfolded ({text})"

    def details(self) -> str:
        """One line per unfolded site with its reason (``ibnify export --verbose``)."""
        return "\n".join(f"  unfolded {name}: {reason}" for name, reason in self.unfolded)


def _plain_conv(module: nn.Module) -> bool:
    """A Conv2d whose forward is torch's own, so per-output-channel scaling is exact."""
    return isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward


def _call_nodes(graph_module: fx.GraphModule, target: str) -> list[fx.Node]:
    return [n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == target]


def _fold_site(graph_module: fx.GraphModule, name: str, ibn: IBN) -> tuple[fx.Node | None, str]:
    """Fold one IBN's BN half into its conv's weights; return (conv node, "") or (None, why)."""
    calls = _call_nodes(graph_module, name)
    if len(calls) != 1:
        return None, f"the layer runs {len(calls)} times in the traced forward"
    source = calls[0].args[0] if calls[0].args else None
    if not isinstance(source, fx.Node) or source.op != "call_module":
        producer = getattr(source, "target", source)
        if callable(producer):  # torch.cat, operator.add: by name, never their repr
            name_of = getattr(producer, "__name__", type(producer).__name__)
            producer = f"{getattr(producer, '__module__', None) or 'torch'}.{name_of}"
            producer = producer.removeprefix("_")
        return None, f"its input comes from {producer}, not from a Conv2d"
    conv = graph_module.get_submodule(str(source.target))
    if not _plain_conv(conv):
        return None, f"its input comes from {source.target} ({type(conv).__name__}), not a Conv2d"
    runs = len(_call_nodes(graph_module, str(source.target)))
    if runs != 1:
        return None, f"conv {source.target} runs {runs} times"
    if len(source.users) != 1:
        others = sorted(str(u.name) for u in source.users if u is not calls[0])
        return None, f"conv {source.target} also feeds {', '.join(others)}"
    bn = ibn.BN
    if bn.running_mean is None or bn.running_var is None:
        return None, "the BN half keeps no running statistics (it normalises by the batch)"
    with torch.no_grad():
        scale, shift = _bn_affine(bn)
        channels = ibn.bn_slice()
        weight = conv.weight.detach().double()
        weight[channels] *= scale.reshape(-1, *([1] * (weight.dim() - 1)))
        if conv.bias is None:
            bias = torch.zeros(conv.out_channels, dtype=torch.float64, device=weight.device)
        else:
            bias = conv.bias.detach().double()
        bias[channels] = bias[channels] * scale + shift
        dtype = conv.weight.dtype
        conv.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return source, ""


def _activation_after(graph_module: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, nn.Module]:
    """The single element-wise activation that consumes ``node``, if there is one."""
    if len(node.users) != 1:
        return None, None  # type: ignore[return-value]
    user = next(iter(node.users))
    if user.op == "call_module":
        module = graph_module.get_submodule(str(user.target))
        if isinstance(module, _ELEMENTWISE):
            return user, copy.deepcopy(module)
    if user.op == "call_function" and user.target in _RELU_FUNCTIONS and len(user.args) == 1:
        return user, nn.ReLU()
    if user.op == "call_method" and user.target in ("relu", "relu_") and len(user.args) == 1:
        return user, nn.ReLU()
    return None, None  # type: ignore[return-value]


def _next_conv(graph_module: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The plain, ungrouped Conv2d that alone consumes ``node`` and runs once, if any."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or user.args[:1] != (node,):
        return None
    conv = graph_module.get_submodule(str(user.target))
    if not _plain_conv(conv) or conv.groups != 1:
        return None
    if len(_call_nodes(graph_module, str(user.target))) != 1:
        return None
    for consumer in user.users:  # the conv feeds another IBN site: keep it for that site's fold
        target = str(consumer.target)
        if consumer.op == "call_module" and isinstance(graph_module.get_submodule(target), IBN):
            return None
    return user


def _split_site(
    graph_module: fx.GraphModule, name: str, ibn: IBN, conv_node: fx.Node, index: int, form: str
) -> str:
    """Replace conv → IBN (→ activation) [→ next conv] by one node; return the form or ""."""
    conv = graph_module.get_submodule(str(conv_node.target))
    drop = getattr(ibn, "drop", None)
    if conv.groups != 1 or not (drop is None or isinstance(drop, nn.Identity | nn.Dropout)):
        return ""
    ibn_node = _call_nodes(graph_module, name)[0]
    inner = getattr(ibn, "act", None)
    if inner is not None and not isinstance(inner, _ELEMENTWISE):
        return ""
    last, act = ibn_node, inner if inner is not None else nn.Identity()
    if isinstance(act, nn.Identity):
        user, module = _activation_after(graph_module, ibn_node)
        if user is not None:
            last, act = user, module
    if form == "auto":
        shape = ibn_node.meta.get("tensor_meta")
        form = choose_form(*shape.shape[-2:]) if shape is not None else "concat"
    following = _next_conv(graph_module, last) if form == "split" else None
    if following is None:
        form, replacement = "concat", SplitConvIBN(conv, ibn, act)
    else:
        next_module = graph_module.get_submodule(str(following.target))
        replacement = SplitNextConvIBN(conv, ibn, act, next_module)
    target = f"ibnify_split_conv_{index}"
    graph_module.add_submodule(target, replacement)
    with graph_module.graph.inserting_before(conv_node):
        new = graph_module.graph.call_module(target, conv_node.args, conv_node.kwargs)
    end = following if following is not None else last
    end.replace_all_uses_with(new)
    for node in dict.fromkeys((end, last, ibn_node, conv_node)):
        graph_module.graph.erase_node(node)
    return form


def _propagate_shapes(graph_module: fx.GraphModule, input_size: tuple[int, ...]) -> None:
    """Record every node's output shape for a batch-1 input (for the per-site form choice)."""
    example = dummy_input(graph_module, input_size)
    try:  # ShapeProp prints a traceback before it re-raises: keep it off the user's stderr
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(graph_module).propagate(example)
    except Exception as exc:  # whatever the model raises on this input: a wrong input size
        cause = exc.__cause__ or exc  # ShapeProp wraps the model's own error
        raise ExportError(
            f"the model does not run on a 1x{'x'.join(map(str, input_size))} input "
            f"({type(cause).__name__}: {first_line(cause)[:200]}); pass its input size"
        ) from exc


def fold_bn_halves(
    model: nn.Module,
    split_conv: bool = True,
    form: str = "auto",
    input_size: tuple[int, ...] | None = None,
) -> tuple[nn.Module, FoldReport]:
    """Return an eval-mode copy of ``model`` with each IBN's BN half folded into its conv.

    A site is folded only where its input is a plain ``Conv2d`` that runs once and feeds nothing
    but this IBN; other sites stay as they are and are listed, with the reason, in the report.
    With ``split_conv`` the folded conv is also split into an IN-half and a BN-half conv and the
    following activation moves before the Concat (see :class:`SplitConvIBN`); the result is then
    an ``fx.GraphModule``. ``form`` picks, per site, the ``concat`` form or the ``split`` form
    (:class:`SplitNextConvIBN`, where a plain conv follows); ``auto`` chooses by the site's
    resolution at ``input_size`` (C, H, W; default the model's), see :func:`choose_form`. The
    caller's model is never modified. The result is for inference.
    """
    if form not in FOLD_FORMS:
        raise ExportError(f"fold form {form!r} is not one of {', '.join(FOLD_FORMS)}")
    folded = copy.deepcopy(model).eval()
    report = FoldReport()
    sites = [(name, m) for name, m in folded.named_modules() if isinstance(m, IBN)]
    if not sites:
        return folded, report

    try:
        graph_module = trace(folded)
    except TraceError as exc:
        report.unfolded = [(name, f"the model cannot be traced ({exc})") for name, _ in sites]
        logger.warning("%s", report.summary())
        return folded, report
    if split_conv and form == "auto":
        _propagate_shapes(graph_module, tuple(input_size or default_input_size(model)))
    for index, (name, ibn) in enumerate(sites):
        conv_node, reason = _fold_site(graph_module, name, ibn)
        if conv_node is None:
            report.unfolded.append((name, reason))
            logger.debug("IBN %s exported unfolded: %s", name, reason)
            continue
        report.folded.append((name, str(conv_node.target)))
        chosen = _split_site(graph_module, name, ibn, conv_node, index, form) if split_conv else ""
        if chosen:
            report.split.append(name)
            report.forms[name] = chosen
        else:
            # fx copies the module hierarchy above the leaves: swap in both trees.
            parent_name, _, child = name.rpartition(".")
            replacement = FoldedIBN(ibn)
            setattr(folded.get_submodule(parent_name), child, replacement)
            setattr(graph_module.get_submodule(parent_name), child, replacement)
    if report.unfolded:
        logger.warning("%s", report.summary())
    if not report.split:
        return folded, report
    graph_module.graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    return graph_module.eval(), report
