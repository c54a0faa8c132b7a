"""Randomized decompositions and projections onto structured matrices."""

from lowrank.linalg.error import ErrorEstimate, svd_error
from lowrank.linalg.kronecker import KroneckerFactors, kron_rearrange, nearest_kronecker
from lowrank.linalg.monarch import MonarchFactors, monarch_project
from lowrank.linalg.nystrom import nystrom_eigh
from lowrank.linalg.operator import LinearOperator
from lowrank.linalg.pca import pca
from lowrank.linalg.rsvd import rsvd
from lowrank.linalg.streaming_svd import StreamingResult, StreamingSVD

__all__ = [
    "ErrorEstimate",
    "KroneckerFactors",
    "LinearOperator",
    "MonarchFactors",
    "StreamingResult",
    "StreamingSVD",
    "kron_rearrange",
    "monarch_project",
    "nearest_kronecker",
    "nystrom_eigh",
    "pca",
    "rsvd",
    "svd_error",
]
