"""``python -m ibnify`` runs the CLI (also what ``torchrun -m ibnify`` uses)."""

from .cli import main

if __name__ == "__main__":
    main()
