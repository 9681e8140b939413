"""The converter's core: model → graph analysis → plan → converted module.

Modules here import nothing from ibnify but :mod:`ibnify.errors` (a test enforces it), so the
converter can be read, tested and reused on its own.
"""

__all__: list[str] = []
