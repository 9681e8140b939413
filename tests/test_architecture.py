"""The package's shape, enforced: import direction between floors, no hidden upward imports,
``__all__`` in every module, public names that submodules cannot shadow.

The floors come from the table in ``docs/architecture.md`` (read here, so the page and the check
cannot drift apart): every module of ibnify belongs to one row, imports only what its row allows,
and a row allows only lower floors. Imports inside functions would hide such dependencies (and
cycles), so only the ``ibnify.cli`` package and ``__init__.py`` (which keep ``--help`` fast) and
optional extras may import lazily.
"""

from __future__ import annotations

import ast
import graphlib
import importlib
import pkgutil
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import ibnify

PACKAGE = Path(ibnify.__file__).parent
DOC = PACKAGE.parent / "docs" / "architecture.md"
# Top-level packages that are optional extras: imported where used, so ibnify works without them.
OPTIONAL_EXTRAS = {"openvino"}
# Modules that may import inside functions: the package root, and the command line (every
# module of the ibnify.cli package) so that --help and usage errors never load torch.
LAZY_MODULES = {"ibnify", "ibnify.__main__"}
LAZY_PACKAGES = ("ibnify.cli",)
ROOT = "__init__"  # the table's name for the package root, ibnify/__init__.py
PSEUDO_UNITS = {"__version__"}  # rows that name a value, not a module


@dataclass(frozen=True)
class Floor:
    """One row of the import table: the floor number and what the module or package may import."""

    level: int
    may: frozenset[str]


_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([^`]+)`\s*\|(.*)\|\s*$")


def read_table(text: str) -> dict[str, Floor]:
    """The rows between the ``import-table`` markers, as ``{unit: Floor}`` (relative names)."""
    body = text.split("<!-- import-table: start -->")[1].split("<!-- import-table: end -->")[0]
    table = {}
    for line in body.splitlines():
        match = _ROW.match(line.strip())
        if match:
            level, unit, may = match.groups()
            table[unit] = Floor(int(level), frozenset(re.findall(r"`([^`]+)`", may)))
    return table


TABLE = read_table(DOC.read_text())


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imported(node: ast.Import | ast.ImportFrom, module: str, path: Path) -> list[str]:
    """Absolute names an import statement brings in (``from .. import x`` gives ``ibnify.x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        return [node.module or ""]
    base = _package_of(module, path).split(".")
    base = base[: len(base) - (node.level - 1)]
    target = ".".join([*base, node.module] if node.module else base)
    if node.module:
        return [target]
    return [f"{target}.{alias.name}" for alias in node.names]


def _modules() -> list[tuple[str, Path, ast.Module]]:
    return [(_module_name(p), p, ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def unit_of(name: str, table: dict[str, Floor]) -> str | None:
    """The table row covering ``name`` (``ibnify.core.graph`` → ``core``); None if no row does."""
    relative = ROOT if name == "ibnify" else name.removeprefix("ibnify.")
    matches = [unit for unit in table if _within(relative, unit)]
    return max(matches, key=len) if matches else None


def violations(module: str, path: Path, tree: ast.Module, table: dict[str, Floor]) -> list[str]:
    """``module:line imports name`` for each ibnify import its row does not allow."""
    unit = unit_of(module, table)
    if unit is None:
        return [f"{module} is on no floor of docs/architecture.md"]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        for name in _imported(node, module, path):
            if not _within(name, "ibnify") or unit_of(name, table) == unit:
                continue
            relative = name.removeprefix("ibnify.")
            if not any(_within(relative, ok) for ok in table[unit].may):
                found.append(f"{module}:{node.lineno} imports {name}")
    return found


def upward(table: dict[str, Floor]) -> list[str]:
    """Rows that allow a target on their own floor or above, or a target no row covers."""
    found = []
    for unit, floor in table.items():
        for target in sorted(floor.may):
            covering = unit_of(f"ibnify.{target}", table)
            if covering is None:
                found.append(f"{unit} may import {target}, which is on no floor")
            elif table[covering].level >= floor.level:
                found.append(
                    f"{unit} (floor {floor.level}) may import {target} "
                    f"(floor {table[covering].level})"
                )
    return found


def test_the_table_covers_every_module_and_names_only_real_ones() -> None:
    modules = [module for module, _path, _tree in _modules()]
    assert [m for m in modules if unit_of(m, TABLE) is None] == []
    used = {unit_of(m, TABLE) for m in modules}
    assert set(TABLE) - used - PSEUDO_UNITS == set()
    # every package and top-level module of the new tree has its row
    assert {"core", "models", "data", "train", "placement", "deploy", "cli"} <= set(TABLE)
    assert {"api", "evaluation", "demo", "errors", "_io", "_report", "adaptation"} <= set(TABLE)


def test_the_table_is_a_strict_layering() -> None:
    """Every allowed import points to a lower floor: no cycles, no upward reach."""
    assert upward(TABLE) == []
    assert TABLE["core"].may == {"errors", "_lazy"} and TABLE["_lazy"].may == frozenset()
    assert "data" not in TABLE["deploy"].may and "data.images" in TABLE["deploy"].may


def test_every_module_imports_only_what_its_floor_may() -> None:
    found = [v for module, path, tree in _modules() for v in violations(module, path, tree, TABLE)]
    assert found == []


def test_the_import_rule_catches_violations() -> None:
    """The checker itself, on the real table: upward imports, the scikit-learn rule of deploy,
    a module on no floor, and a table row that reaches up."""

    def check(module: str, source: str) -> list[str]:
        relative = module.removeprefix("ibnify.").replace(".", "/")
        return violations(module, PACKAGE / f"{relative}.py", ast.parse(source), TABLE)

    assert check("ibnify.core.graph", "from ..api import convert\nfrom ..errors import E\n") == [
        "ibnify.core.graph:1 imports ibnify.api"
    ]
    assert check("ibnify.models.registry", "from ..data.images import ImageData\n") == [
        "ibnify.models.registry:1 imports ibnify.data.images"
    ]
    verify = "from ..data.images import load_images\nfrom ..data.digits import digits_data\n"
    assert check("ibnify.deploy.verify", verify) == [
        "ibnify.deploy.verify:2 imports ibnify.data.digits"
    ]
    assert check("ibnify.train.loop", "from ..placement import search\n") == [
        "ibnify.train.loop:1 imports ibnify.placement"
    ]
    assert check("ibnify.cli.deploy", "def f():\n    from ..deploy.verify import v\n") == []
    assert check("ibnify.newthing", "") == [
        "ibnify.newthing is on no floor of docs/architecture.md"
    ]
    reaching_up = {**TABLE, "models": Floor(3, TABLE["models"].may | {"data"})}
    assert upward(reaching_up) == ["models (floor 3) may import data (floor 4)"]


def test_only_the_digits_set_loads_scikit_learn() -> None:
    """deploy imports data.images only; the command layer reaches digits through the data face
    (on first use), so a command on an image folder never pays for scikit-learn's import;
    data.digits is the one scikit-learn import."""
    code = (
        "import sys, ibnify.deploy.verify, ibnify.deploy.bench, ibnify.data.images; "
        "import ibnify.data.sources, ibnify.commands.search, ibnify.commands.finetune; "
        "import ibnify.commands.evaluate, ibnify.commands.analyze, ibnify.commands.adapt; "
        "assert 'sklearn' not in sys.modules, 'sklearn loaded'; "
        "import ibnify.data.digits; assert 'sklearn' in sys.modules; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr[-500:]


def readme_layout(text: str) -> set[str]:
    """The ``.py`` paths a "Project layout" tree lists (indentation gives folders)."""
    block = text.split("## Project layout")[1].split("```")[1]
    stack: list[tuple[int, str]] = []
    paths = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(folder for _, folder in stack) + name
        if name.endswith("/"):
            stack.append((indent, name))
        elif name.endswith(".py"):
            paths.add(path)
    return paths


def test_the_readme_layout_lists_every_module() -> None:
    """Every module, one line each; a sub-package's face (an ``__init__.py`` whose names come
    through ``_lazy.lazy_exports``, or an empty one) goes without saying, and may be listed."""
    listed = readme_layout((PACKAGE.parent / "docs" / "architecture.md").read_text())
    real = {str(path.relative_to(PACKAGE.parent)) for _module, path, _tree in _modules()}
    faces = {
        str(path.relative_to(PACKAGE.parent))
        for module, path, _tree in _modules()
        if path.name == "__init__.py"
        and module != "ibnify"
        and (
            "_EXPORTS" in vars(importlib.import_module(module))
            or importlib.import_module(module).__all__ == []
        )
    }
    assert "ibnify/core/__init__.py" in faces and "ibnify/cli/__init__.py" not in faces
    assert {p for p in listed if p.startswith("ibnify/")} - faces == real - faces
    tree = "## Project layout\n```\nibnify/\n  a.py  x\n  core/\n    b.py  y\n  c.py\n```\n"
    assert readme_layout(tree) == {"ibnify/a.py", "ibnify/core/b.py", "ibnify/c.py"}


def _declares_all(tree: ast.Module) -> bool:
    """Whether a module assigns ``__all__`` at its top level."""
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return True
    return False


def test_every_module_declares_all_and_every_name_in_it_exists() -> None:
    missing, unknown = [], []
    for module, _path, tree in _modules():
        if not _declares_all(tree):
            missing.append(module)
            continue
        imported = importlib.import_module(module)
        unknown += [f"{module}.{name}" for name in imported.__all__ if not hasattr(imported, name)]
    assert (missing, unknown) == ([], [])
    assert not _declares_all(ast.parse("x = 1\ndef f():\n    __all__ = []\n"))
    assert _declares_all(ast.parse("__all__: list[str] = []\n"))


def _may_import_lazily(module: str) -> bool:
    return module in LAZY_MODULES or any(
        module == package or module.startswith(package + ".") for package in LAZY_PACKAGES
    )


def _lazy_imports(module: str, tree: ast.Module) -> list[str]:
    """``module:line in function()`` for each import inside a function that the rule forbids."""
    if _may_import_lazily(module):
        return []
    lazy = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                top = (node.module or "") if isinstance(node, ast.ImportFrom) else ""
                roots = {n.split(".")[0] for n in [*names, top] if n}
                if node_level(node) == 0 and roots and roots <= OPTIONAL_EXTRAS:
                    continue
                lazy.append(f"{module}:{node.lineno} in {function.name}()")
    return lazy


def test_no_imports_inside_functions() -> None:
    lazy = [where for module, _path, tree in _modules() for where in _lazy_imports(module, tree)]
    assert lazy == []


def test_the_lazy_import_rule_allows_only_the_cli_package() -> None:
    """The checker itself: a function-level import is flagged in core and in library modules,
    allowed in the ibnify.cli package (any depth), and for optional extras anywhere."""
    tree = ast.parse("def f():\n    from ..api import convert\n    import openvino\n")
    assert _lazy_imports("ibnify.core.graph", tree) == ["ibnify.core.graph:2 in f()"]
    assert _lazy_imports("ibnify.train", tree) == ["ibnify.train:2 in f()"]
    assert _lazy_imports("ibnify.clinic", tree) == ["ibnify.clinic:2 in f()"]
    assert _lazy_imports("ibnify.cli", tree) == []
    assert _lazy_imports("ibnify.cli.deploy", tree) == []
    modules = {module for module, _path, _tree in _modules()}
    assert {"ibnify.cli", "ibnify.cli._group"} <= modules  # the rule names real modules


def node_level(node: ast.Import | ast.ImportFrom) -> int:
    return node.level if isinstance(node, ast.ImportFrom) else 0


@pytest.mark.parametrize("name", sorted(ibnify.__all__))
def test_public_names_are_not_shadowed_by_submodules(name: str) -> None:
    """Importing every submodule, at any depth, leaves each public name as it was exported."""
    for info in pkgutil.walk_packages(ibnify.__path__, prefix="ibnify."):
        if info.name != "ibnify.__main__":
            importlib.import_module(info.name)
    value = getattr(ibnify, name)
    assert not isinstance(value, type(ibnify)), f"ibnify.{name} is a module"
    if name != "__version__":
        assert callable(value), name


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the module import graph (``[a, b, a]``), or ``[]`` when there is none."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return list(error.args[1])
    return []


def test_no_import_cycle_between_modules() -> None:
    """Within a package too (the floors only order packages): ``placement/runs.py`` once
    imported ``search_state.py``, which imported it back."""
    modules = _modules()
    names = {module for module, _path, _tree in modules}
    graph = {
        module: {
            name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for name in _imported(node, module, path)
            if name in names and name != module
        }
        for module, path, tree in modules
    }
    assert graph["ibnify.placement.runs"] >= {"ibnify.placement.candidates", "ibnify.api"}
    assert import_cycle(graph) == []
    closing = {**graph, "ibnify.placement.candidates": {"ibnify.placement.runs"}}
    assert sorted(set(import_cycle(closing))) == [
        "ibnify.placement.candidates",
        "ibnify.placement.runs",
    ]


def imports_of_test_modules(source: str) -> list[str]:
    """``line: name`` for each import of a ``test_*`` module (shared test code goes to
    ``tests/helpers.py``, never into a test module that others import)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
            names = [f"{module}.{alias.name}" for alias in node.names]
            if any(p.startswith("test_") for name in names for p in name.split(".")):
                found.append(f"{node.lineno}: {', '.join(n.lstrip('.') for n in names)}")
    return found


def test_no_test_module_imports_another() -> None:
    tests = PACKAGE.parent / "tests"
    found = [
        f"{path.name}:{where}"
        for path in sorted(tests.rglob("*.py"))
        for where in imports_of_test_modules(path.read_text())
    ]
    assert found == []
    assert imports_of_test_modules("from tests.test_x import a\nfrom tests import helpers\n") == [
        "1: tests.test_x.a"
    ]
    assert imports_of_test_modules("from .test_y import b\nimport tests.test_z\n") == [
        "1: test_y.b",
        "2: tests.test_z",
    ]


# Files that may still pack lines under a formatter-skip comment: none left (issue 23).
FMT_SKIP_PENDING: set[str] = set()


def test_no_fmt_skip_outside_the_pending_files() -> None:
    """Size limits are met by parameter objects and plain formatting, not by lines the
    formatter may not touch; the pending list only shrinks."""
    root = PACKAGE.parent
    marker = "# fmt: " + "skip"  # split, so this file does not match itself
    found = {
        str(path.relative_to(root))
        for folder in ("ibnify", "tests", "benchmarks", "examples", "docs")
        for path in (root / folder).rglob("*.py")
        if marker in path.read_text()
    }
    assert found - FMT_SKIP_PENDING == set()
