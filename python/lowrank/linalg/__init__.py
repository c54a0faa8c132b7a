"""Randomized decompositions and projections onto structured matrices."""

__all__: list[str] = []
