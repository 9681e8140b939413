"""``python -m ibnify.cli`` runs the CLI, as ``python -m ibnify`` does."""

from . import main

__all__: list[str] = []

if __name__ == "__main__":  # pragma: no cover
    main()
