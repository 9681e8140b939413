"""Models: names and constructor arguments (registry), the digits nets (small), safe weight
loading (weights) and ibnify checkpoints (checkpoint)."""

__all__: list[str] = []
