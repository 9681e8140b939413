"""``python -m ibnify`` runs the CLI (also what ``torchrun -m ibnify`` uses)."""

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
