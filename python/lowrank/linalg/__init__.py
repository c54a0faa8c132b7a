"""Randomized decompositions and projections onto structured matrices."""

from lowrank.linalg.kronecker import KroneckerFactors, kron_rearrange, nearest_kronecker

__all__ = ["KroneckerFactors", "kron_rearrange", "nearest_kronecker"]
