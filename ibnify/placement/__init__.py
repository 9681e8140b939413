"""Where IN should go: feature divergence per norm site (divergence) and the ranked search over
candidate layouts (search), each with its report."""

__all__: list[str] = []
