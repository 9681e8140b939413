"""Code shape: no function over MAX_LINES lines or MAX_PARAMETERS parameters without a reason.

Every function (methods and nested functions included) in ``ibnify/``, ``benchmarks/``,
``examples/`` and ``docs/*.py`` is at most MAX_LINES lines long (``def`` to its last line) and
takes at most MAX_PARAMETERS parameters (``self``/``cls`` not counted; ``*args`` and
``**kwargs`` count one each), unless the first paragraph of its docstring holds a line starting
``Reason:`` that says why (a public keyword API mirroring a CLI command, as timm's
``create_model`` does). Sizes are met by parameter objects and helpers with telling names, not by
layout tricks (the "no formatter skip" check lives in tests/test_architecture.py). Parsed from
the syntax tree only: nothing is imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
MAX_PARAMETERS = 8
# Functions whose owners are reshaping them this round ("module:qualified name"); the lead
# empties this set when they are done. It only shrinks: a name that is no longer over the limits
# (or no longer exists) must leave it.
PENDING: set[str] = set()


@dataclass(frozen=True)
class Shape:
    """One function's size: where it is, its lines and parameters, whether it gives a reason."""

    name: str
    lines: int
    parameters: int
    reason: bool

    @property
    def over(self) -> bool:
        return self.lines > MAX_LINES or self.parameters > MAX_PARAMETERS

    def __str__(self) -> str:
        return f"{self.name} ({self.lines} lines, {self.parameters} parameters)"


def has_reason(docstring: str | None) -> bool:
    """Whether the docstring's first paragraph holds a line starting ``Reason:``."""
    first = (docstring or "").strip().split("\n\n", 1)[0]
    return any(line.strip().startswith("Reason:") for line in first.splitlines())


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> int:
    """The parameters a caller can pass: ``self``/``cls`` of a method left out."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    if method and positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    starred = (args.vararg is not None) + (args.kwarg is not None)
    return len(positional) + len(args.kwonlyargs) + starred


def shapes(source: str, module: str) -> list[Shape]:
    """Every function of ``source``, named ``module:Outer.inner``, with its size."""
    found: list[Shape] = []

    def visit(node: ast.AST, prefix: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.", True)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append(
                    Shape(
                        name=f"{module}:{prefix}{child.name}",
                        lines=child.end_lineno - child.lineno + 1,
                        parameters=parameter_count(child, in_class),
                        reason=has_reason(ast.get_docstring(child)),
                    )
                )
                visit(child, f"{prefix}{child.name}.", False)
            else:
                visit(child, prefix, in_class)

    visit(ast.parse(source), "", False)
    return found


def checked_files() -> list[Path]:
    """The Python files the limits apply to."""
    files = [
        path
        for folder in ("ibnify", "benchmarks", "examples")
        for path in sorted((ROOT / folder).rglob("*.py"))
    ]
    return files + sorted((ROOT / "docs").glob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_shapes() -> list[Shape]:
    return [
        shape for path in checked_files() for shape in shapes(path.read_text(), module_name(path))
    ]


def test_no_function_is_over_the_limits_without_a_reason() -> None:
    everything = all_shapes()
    assert len(everything) > 500  # the walk found the package, not an empty folder
    over = sorted(str(s) for s in everything if s.over and not s.reason and s.name not in PENDING)
    assert over == []


def test_every_pending_name_is_still_over_the_limits() -> None:
    """A pending function that its owner brought under the limits (or gave a reason) leaves
    PENDING, so the set only shrinks."""
    offenders = {s.name for s in all_shapes() if s.over and not s.reason}
    assert sorted(PENDING - offenders) == []


SAMPLE = '''
def short(a, b, c, d, e, f, g, h):
    """Eight parameters: at the limit."""
    return a


def many(a, b, c, d, e, f, g, h, *, i=1):
    """Nine parameters."""


def starred(a, b, c, d, e, f, g, *args, **kwargs):
    """Seven named parameters, and two starred ones."""


def excused(a, b, c, d, e, f, g, h, i):
    """Mirrors a CLI command.
    Reason: its keywords are the command's options, one to one.

    Args: ...
    """


def late_reason(a, b, c, d, e, f, g, h, i):
    """No reason in the first paragraph.

    Reason: too late, in the second paragraph.
    """


class Layer:
    def __init__(self, a, b, c, d, e, f, g, h):
        pass

    @classmethod
    def build(cls, a, b, c, d, e, f, g, h, i):
        def inner(x):
            return x
        return inner
'''


def test_the_shape_walk_counts_lines_parameters_and_reasons() -> None:
    long_body = "def long():\n" + "    x = 1\n" * 59 + "    return x\n"
    found = {s.name: s for s in shapes(SAMPLE + "\n\n" + long_body, "m")}
    assert sorted(found) == [
        "m:Layer.__init__",
        "m:Layer.build",
        "m:Layer.build.inner",
        "m:excused",
        "m:late_reason",
        "m:long",
        "m:many",
        "m:short",
        "m:starred",
    ]
    counts = {name: shape.parameters for name, shape in found.items()}
    assert counts == {
        "m:Layer.__init__": 8,
        "m:Layer.build": 9,
        "m:Layer.build.inner": 1,
        "m:excused": 9,
        "m:late_reason": 9,
        "m:long": 0,
        "m:many": 9,
        "m:short": 8,
        "m:starred": 9,
    }
    assert found["m:long"].lines == 61 and found["m:short"].lines == 3
    flagged = {name for name, s in found.items() if s.over and not s.reason}
    assert flagged == {"m:Layer.build", "m:late_reason", "m:long", "m:many", "m:starred"}
    assert found["m:excused"].reason and not found["m:late_reason"].reason
