"""Package faces: what ``ibnify`` and each subpackage export, that every exported name resolves
to the object its module defines, that a face loads nothing heavy until a name is read, and
that the README, the docs and the examples import only from faces."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ibnify

ROOT = Path(ibnify.__file__).parent.parent
FACES = ("core", "models", "data", "train", "placement", "deploy", "adaptation")
# The root's public names: what the README and the guides call (issue 23), nothing internal.
ROOT_NAMES = {
    "__version__",
    *("convert", "plan", "analyze_graph", "load", "save", "read_recipe"),
    *("finetune", "FinetuneConfig", "evaluate", "ImageData"),
    *("adapt", "OnlineAdapter", "analyze", "search_placement", "SearchOptions"),
    *("export_onnx", "ExportOptions", "verify_onnx"),
    *("Recipe", "ConversionPlan", "ConversionSite", "PlanOptions", "IBN", "IBNAct"),
    *("IbnifyError", "InvalidOptionError", "ModelNotFoundError", "NoBatchNormError"),
    *("TraceError", "ConversionError", "WeightsError", "CheckpointError"),
    *("ExportError", "VerificationError", "DataError"),
}
# Internal names that left the root for a package face.
MOVED = {
    "apply_plan": "core",
    "get_plan": "core",
    "list_norm_layers": "core",
    "get_recipe": "core",
    "load_weights": "models",
    "recipe_input_size": "models",
}
# A name a face must resolve to, per face, and a module it must not load before that name is read.
PROBES = {
    "core": ("IBN", "ibnify.core.layers"),
    "models": ("build_model", "ibnify.models.registry"),
    "data": ("ImageData", "ibnify.data.images"),
    "train": ("FinetuneConfig", "ibnify.train.config"),
    "placement": ("SearchReport", "ibnify.placement.search_report"),
    "deploy": ("export_onnx", "ibnify.deploy.export"),
    "adaptation": ("OnlineAdapter", "ibnify.adaptation.entropy"),
}


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-800:]
    return done.stdout.strip()


def test_the_root_exports_what_the_readme_uses_and_nothing_internal() -> None:
    assert set(ibnify.__all__) == ROOT_NAMES
    assert len(ibnify.__all__) == len(ROOT_NAMES) == 36
    assert not set(MOVED) & set(ibnify.__all__)
    for name, face in MOVED.items():
        module = importlib.import_module(f"ibnify.{face}")
        assert name in module.__all__, (face, name)
    assert issubclass(ibnify.InvalidOptionError, ibnify.IbnifyError)
    # every error class the package defines is on the root, and each is an IbnifyError
    errors = {
        name
        for name in ibnify.__all__
        if isinstance(getattr(ibnify, name), type) and issubclass(getattr(ibnify, name), Exception)
    }
    assert errors == {name for name in ROOT_NAMES if name.endswith("Error")}
    assert all(issubclass(getattr(ibnify, name), ibnify.IbnifyError) for name in errors)
    assert ibnify.DataError is importlib.import_module("ibnify.data").DataError
    assert ibnify.FinetuneConfig is importlib.import_module("ibnify.train.config").FinetuneConfig
    assert ibnify.analyze.__name__ == "analyze_divergence"
    assert ibnify.analyze_graph.__module__ == "ibnify.core.graph"
    assert set(ibnify.__all__) <= set(dir(ibnify))
    with pytest.raises(AttributeError, match="module 'ibnify' has no attribute 'resolve_model'"):
        ibnify.resolve_model  # noqa: B018
    for name in MOVED:  # gone from the root, not kept there as hidden aliases
        with pytest.raises(AttributeError, match=f"module 'ibnify' has no attribute '{name}'"):
            getattr(ibnify, name)


@pytest.mark.parametrize("face", ["", *FACES])
def test_every_name_a_face_exports_resolves_to_its_modules_object(face: str) -> None:
    """Each name is the very object a submodule defines, no name is also a submodule (which the
    import system would set over it), and ``dir()`` lists the names."""
    package = importlib.import_module(f"ibnify.{face}" if face else "ibnify")
    assert package.__all__ == sorted(package.__all__, key=lambda n: (n != "__version__", n))
    submodules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    exports = package._EXPORTS
    assert set(package.__all__) - {"__version__"} == set(exports)
    for name, target in exports.items():
        module_name, _, attribute = target.partition(":")
        module = importlib.import_module(f"{package.__name__}.{module_name}")
        assert getattr(package, name) is getattr(module, attribute or name), (face, name)
        assert name not in submodules, (face, name)
        if name in package.__all__:
            assert name in module.__all__ or attribute in module.__all__, (face, name)
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(
        AttributeError, match=rf"module '{package.__name__}' has no attribute 'nope'"
    ):
        package.nope  # noqa: B018


def test_importing_a_face_loads_nothing_heavy_until_a_name_is_read() -> None:
    """``import ibnify.<face>`` runs no submodule (no torch, no scikit-learn, no onnx); reading
    one name imports its module; scikit-learn comes only with ``ibnify.data.digits``. One
    process for all faces (each probe's module is checked unloaded before any name is read)."""
    faces = ", ".join(f"ibnify.{face}" for face in FACES)
    code = (
        f"import sys, {faces}\n"
        "print(sorted(m for m in ('torch', 'sklearn', 'onnx') if m in sys.modules))\n"
        f"probes = {PROBES!r}\n"
        "print([m for _n, m in probes.values() if m in sys.modules])\n"
        "for face, (name, module) in probes.items():\n"
        "    value = getattr(sys.modules['ibnify.' + face], name)\n"
        "    print(face, value is getattr(sys.modules[module], name), 'sklearn' in sys.modules)\n"
        "from ibnify.data import digits_data\n"
        "print('sklearn' in sys.modules)\n"
    )
    expected = ["[]", "[]", *(f"{face} True False" for face in PROBES), "True"]
    assert _run(code).splitlines() == expected


def test_the_root_loads_no_torch_on_import() -> None:
    code = "import sys, ibnify; print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))"
    assert _run(code) == "[]"


_IMPORT = re.compile(r"^\s*(?:from\s+(ibnify[\w.]*)\s+import|import\s+(ibnify[\w.]*))", re.M)
# Modules a user script may import beside the faces: the demo is its own entry point
# (``run_demo``, ``DemoConfig``; docs/demo.md), no package's public name.
PUBLIC_MODULES = {"ibnify.demo"}


def is_face(name: str) -> bool:
    """Whether ``ibnify.X`` names the root or a package face (a folder with ``__init__``)."""
    parts = name.split(".")
    return len(parts) == 1 or (
        len(parts) == 2 and (ROOT / "ibnify" / parts[1] / "__init__.py").is_file()
    )


def deep_imports(text: str) -> set[str]:
    """The ibnify modules behind the faces (``ibnify.train.config``, ``ibnify.evaluation``)
    a piece of Python imports from."""
    names = {a or b for a, b in _IMPORT.findall(text)}
    return {name for name in names if not is_face(name) and name not in PUBLIC_MODULES}


def _python_blocks(markdown: str) -> str:
    """Every fenced block's text (``python`` or not: a plain block may hold Python too)."""
    return "\n".join(re.findall(r"^```[\w-]*\n(.*?)^```", markdown, flags=re.S | re.M))


def test_readme_docs_and_examples_import_only_from_faces() -> None:
    sources = {
        str(path.relative_to(ROOT)): _python_blocks(path.read_text())
        for path in [
            ROOT / "README.md",
            ROOT / "CONTRIBUTING.md",
            *sorted((ROOT / "docs").glob("*.md")),
        ]
    }
    sources |= {
        str(path.relative_to(ROOT)): path.read_text()
        for path in sorted((ROOT / "examples").glob("*.py"))
    }
    assert "README.md" in sources and "docs/api.md" in sources and len(sources) >= 14
    found = {(where, name) for where, text in sources.items() for name in deep_imports(text)}
    assert found == set()


def test_the_deep_import_check_catches_them() -> None:
    text = (
        "import ibnify\nfrom ibnify.data import ImageData\nfrom ibnify.train.config import X\n"
        "    import ibnify.core.graph as g\nfrom ibnify.demo import run_demo\n"
        "from ibnify.evaluation import evaluate\nimport ibnify.api\nfrom ibnify import core\n"
    )
    assert deep_imports(text) == {
        "ibnify.train.config",
        "ibnify.core.graph",
        "ibnify.evaluation",
        "ibnify.api",
    }
    markdown = (
        "x\n```python\nfrom ibnify.core.plans import P\n```\n```\nfrom ibnify.a.b import c\n```"
        "\nfrom ibnify.outside import fence\n```py\nimport ibnify.models.registry\n```\n"
    )
    assert deep_imports(_python_blocks(markdown)) == {
        "ibnify.core.plans",
        "ibnify.a.b",
        "ibnify.models.registry",
    }
