"""Data: image folders and batches (images), the digits demo set (digits, the only
scikit-learn import), the appearance shifts (shifts), target domains (domains) and the data a
command names (sources).

The names below are this package's public face, imported from their modules on first use, so
that ``import ibnify.data``, ``ibnify.data.images`` and ``ibnify.data.sources`` never load
scikit-learn (the digits set loads it on first use).
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "DataError": "images",
    "ImageData": "images",
    "Normalize": "images",
    "UnlabeledImages": "images",
    "data_config": "images",
    "image_files": "images",
    "image_folder_data": "images",
    "load_images": "images",
    "DIGITS_SIZE": "digits",
    "digits_data": "digits",
    "load_digits_images": "digits",
    "CLEAN": "shifts",
    "SHIFTS": "shifts",
    "SHIFT_GROUPS": "shifts",
    "apply_shift": "shifts",
    "parse_shifts": "shifts",
    "check_same_classes": "domains",
    "load_domains": "domains",
    "parse_domain": "domains",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
