"""Randomized decompositions, projections onto structured matrices, the whitening and
truncated SVD that fit a layer's weight to its inputs, and spectral diagnostics of weights."""

from lowrank.linalg.error import ErrorEstimate, svd_error
from lowrank.linalg.kronecker import KroneckerFactors, kron_rearrange, nearest_kronecker
from lowrank.linalg.monarch import MonarchFactors, monarch_project
from lowrank.linalg.nystrom import nystrom_eigh
from lowrank.linalg.operator import LinearOperator
from lowrank.linalg.pca import pca
from lowrank.linalg.rsvd import rsvd
from lowrank.linalg.spectral import (
    IntruderDimensions,
    PowerLawFit,
    effective_rank,
    heavy_tail_exponent,
    intruder_dimensions,
    spectral_table,
    stable_rank,
)
from lowrank.linalg.streaming_svd import StreamingResult, StreamingSVD
from lowrank.linalg.whitening import Whitener, cholesky_damped, truncated_svd, whitener

__all__ = [
    "ErrorEstimate",
    "IntruderDimensions",
    "KroneckerFactors",
    "LinearOperator",
    "MonarchFactors",
    "PowerLawFit",
    "StreamingResult",
    "StreamingSVD",
    "Whitener",
    "cholesky_damped",
    "effective_rank",
    "heavy_tail_exponent",
    "intruder_dimensions",
    "kron_rearrange",
    "monarch_project",
    "nearest_kronecker",
    "nystrom_eigh",
    "pca",
    "rsvd",
    "spectral_table",
    "stable_rank",
    "svd_error",
    "truncated_svd",
    "whitener",
]
