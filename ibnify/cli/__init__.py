"""Command line: a thin click layer over the library.

Error convention: every failure prints one line on stderr starting with ``error:`` and exits
with 2 for usage errors, 1 for everything else; ``--debug`` shows the traceback instead.

``_group`` holds the group and the shared options; each command module registers its
commands on that one group when it is imported below.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import adapt, convert, deploy, placement, training  # noqa: F401  (registers the commands)
from ._group import cli

__all__ = ["cli", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="ibnify")


if __name__ == "__main__":  # pragma: no cover
    main()
