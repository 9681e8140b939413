"""The package's shape, enforced: import direction between layers, no hidden upward imports,
public names that submodules cannot shadow.

``core`` (model → analysis → plan → converted module) imports only ``ibnify.errors``;
``deploy`` imports ``core``, ``data``, ``errors`` and ``_io``. Imports inside functions would
hide such dependencies (and cycles), so only the ``ibnify.cli`` package and ``__init__.py``
(which keep ``--help`` fast) and optional extras may import lazily.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import ibnify

PACKAGE = Path(ibnify.__file__).parent
# Top-level packages that are optional extras: imported where used, so ibnify works without them.
OPTIONAL_EXTRAS = {"openvino"}
# Modules that may import inside functions: the package root, and the command line (every
# module of the ibnify.cli package) so that --help and usage errors never load torch.
LAZY_MODULES = {"ibnify", "ibnify.__main__"}
LAZY_PACKAGES = ("ibnify.cli",)
ALLOWED = {
    "ibnify.core": {"ibnify.errors", "ibnify.core"},
    "ibnify.deploy": {
        "ibnify.core",
        "ibnify.data",
        "ibnify.errors",
        "ibnify._io",
        "ibnify.deploy",
        "ibnify.__version__",
    },
}


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


def test_every_layer_imports_only_what_it_may() -> None:
    violations = []
    for module, path, tree in _modules():
        layer = next((name for name in ALLOWED if module.startswith(name)), None)
        if layer is None:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in _imported(node, module, path):
                if not name.startswith("ibnify"):
                    continue
                if not any(name == ok or name.startswith(ok + ".") for ok in ALLOWED[layer]):
                    violations.append(f"{module}:{node.lineno} imports {name}")
    assert violations == []


def test_the_import_rule_catches_an_upward_import() -> None:
    """The checker itself: a core module reaching up to ibnify.api is a violation."""
    tree = ast.parse("from ..api import convert\nfrom ..errors import TraceError\n")
    path = PACKAGE / "core" / "graph.py"
    names = [n for node in tree.body for n in _imported(node, "ibnify.core.graph", path)]
    assert names == ["ibnify.api", "ibnify.errors"]


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
