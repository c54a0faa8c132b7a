"""Principal components by randomized SVD of the implicitly centred matrix.

``A - 1 mu^T`` (``mu`` the column means) is never formed: its products are
``A X - 1 (mu^T X)`` and ``A^T Y - mu (1^T Y)``, so a sparse ``A`` stays sparse.
"""

from __future__ import annotations

import numpy as np
import torch

from lowrank import _validate as check
from lowrank.linalg.operator import Operator, as_operator
from lowrank.linalg.rsvd import (
    _check_options,
    _out_of_core,
    from_numpy,
    resolve_seed,
    rsvd,
)


class _Centred:
    """``A - 1 mu^T`` as a LinearOperator; ``||A - 1 mu^T||_F^2 = ||A||_F^2 - m ||mu||^2``."""

    def __init__(self, op: Operator, mean: torch.Tensor):
        self.shape, self.dtype, self.device = (op.m, op.n), op.dtype, op.device
        self._op, self._mean = op, mean

    def frobenius_norm(self):
        total = self._op.frobenius_sq()
        if total is None:
            return None
        centred = total - self._op.m * self._mean.abs().double().square().sum()
        return float(centred.clamp_min(0.0).sqrt())

    def matmat(self, x):
        return self._op.matmat(x) - (self._mean @ x)[None, :]

    def rmatmat(self, y):
        return self._op.rmatmat(y) - self._mean.conj()[:, None] * y.sum(dim=0, keepdim=True)


def pca(A, rank: int, center: bool = True, mean: torch.Tensor | None = None, **rsvd_options):
    """``(U, S, Vh)`` of ``A - mean(A, 0)`` (or of ``A``), rank ``rank``, without centring ``A``.

    The principal axes are the rows of ``Vh`` and ``U * S`` are the scores.
    ``A`` is a 2-D dense or sparse COO/CSR tensor, a NumPy array, or (with ``max_memory``,
    or an ``np.memmap``) a matrix streamed from host memory or disk in row panels, centred
    panel by panel after one more pass for the means; ``rsvd_options`` go to :func:`rsvd`.
    ``mean``: the column means when the caller has them already (in memory only; saves
    the pass over ``A`` that computes them).
    """
    if not center:
        return rsvd(A, rank, **rsvd_options)
    if isinstance(A, np.memmap) or rsvd_options.get("max_memory") is not None:
        if mean is not None:
            raise ValueError("mean= is for in-memory input; a streamed A is centred by its "
                             "own pass")  # fmt: skip
        return _streamed(A, rank, **rsvd_options)
    if isinstance(A, np.ndarray):
        A = from_numpy(A)
    op = as_operator(A, rsvd_options.pop("compute_dtype", None))
    if op.batch:
        raise ValueError(f"A must be a single (m, n) matrix for pca, got batch shape {op.batch}")
    if op.m == 0 or op.n == 0:
        raise ValueError(f"A must have positive sizes, got {op.m} x {op.n}")
    if mean is None:
        ones = torch.ones(op.m, 1, dtype=op.dtype, device=op.device)
        mean = op.rmatmat(ones)[:, 0].conj() / op.m  # A^H 1 = conj(A^T 1)
    else:
        check.floating("mean", mean)
        check.ndim("mean", mean, 1, "the column means")
        check.size("mean", mean, 0, op.n, "A's columns")
        mean = mean.to(dtype=op.dtype, device=op.device)
    u, s, vh = rsvd(_Centred(op, mean), rank, **rsvd_options)
    out = A.dtype if isinstance(A, torch.Tensor) else op.dtype
    return u.to(out), s.to(out.to_real()), vh.to(out)


def _streamed(A, rank, *, oversample=10, n_iter=2, normalizer="auto", sketch="gaussian",
              seed=None, generator=None, compute_dtype=None, device=None, max_memory=None,
              progress=None):  # fmt: skip
    rank, oversample, n_iter, _ = _check_options(rank, oversample, n_iter, normalizer, sketch,
                                                 None, None)  # fmt: skip
    return _out_of_core(A, rank, oversample, n_iter, normalizer, sketch, None, None,
                        resolve_seed(seed, generator), compute_dtype, device, max_memory,
                        progress, center=True)  # fmt: skip
