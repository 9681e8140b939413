"""Lazy package faces: a package's public names, imported from their submodules on first use.

A face (``ibnify/data/__init__.py`` and the others) lists ``{name: "submodule"}`` (or
``"submodule:attribute"`` where the two names differ) and gets a module ``__getattr__`` and
``__dir__`` from :func:`lazy_exports`, so ``import ibnify.data`` loads nothing heavy
(``ibnify.data.images`` never pulls scikit-learn in, ``ibnify --help`` never torch), while
``from ibnify.data import ImageData`` still works as timm's package faces do.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: each name in ``exports`` is imported from
    ``package.<submodule>`` when first read, then kept in the package's namespace."""

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, _, attribute = target.partition(":")
        module = importlib.import_module(f".{module_name}", package)
        value = getattr(module, attribute or name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
