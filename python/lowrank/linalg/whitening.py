"""Whitening by input statistics, and the truncated SVD that fits a weight to them.

A layer ``y = W x`` compressed to ``W'`` changes its outputs on data ``X`` by
``||(W - W') X||_F``. With the input statistics ``G = X X^T = sum_t x_t x_t^T`` and its
Cholesky factor ``G = L L^T`` that error is ``||(W - W') L||_F``: the best rank-``k``
``W'`` is the truncated SVD of the *whitened* weight ``W L`` mapped back by ``L^{-1}``,
``W' = [W L]_k L^{-1}`` (the truncation-aware whitening of SVD-LLM, Wang et al. 2024).

- :func:`cholesky_damped`: ``L``, damped until the factorisation succeeds (statistics of
  real activations are often singular: dead or duplicated features);
- :func:`whitener`: the checked :class:`Whitener` of a layer's statistics (``W L`` and
  ``M L^{-1}``);
- :func:`truncated_svd`: the top singular triplets of a matrix, a given number of them or
  the fewest within a relative error, exact up to ``EXACT_SVD_MAX`` and randomized above.
"""

from __future__ import annotations

import torch

from lowrank import _validate as check
from lowrank.linalg.rsvd import rsvd

# The damping tried in turn, relative to the mean diagonal of the statistics: a matrix that
# needs more than 0.1 is not the statistics of any data.
DAMPING = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def cholesky_damped(g: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive semi-definite ``g``.

    Adds ``1e-6``, ``1e-5``, ... up to ``0.1`` times the mean diagonal of ``g`` until the
    factorisation succeeds (activations are often rank-deficient: dead or duplicated
    features). A matrix that needs more, or has a negative diagonal entry, is not the
    statistics of any data: it raises ``ValueError``.
    """
    check.floating("g", g)
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"g must be a square (n, n) matrix, got shape {tuple(g.shape)}")
    n = g.shape[-1]
    diagonal = g.diagonal()
    if n and bool((diagonal < 0).any()):
        raise ValueError("the input statistics are not positive semi-definite (a negative "
                         "diagonal entry)")  # fmt: skip
    scale = float(diagonal.mean()) if n else 1.0
    scale = scale if scale > 0 else 1.0
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    for damping in DAMPING:
        factor, info = torch.linalg.cholesky_ex(g + damping * scale * eye)
        if int(info) == 0:
            return factor
    raise ValueError("the input statistics are not positive semi-definite")


class Whitener:
    """``G = L L^T`` for input statistics ``G`` (float64, damped until Cholesky succeeds).

    ``W @ factor`` (``W L``) weighs a weight's error by the data; :meth:`unwhiten` maps a
    fit of the whitened weight back (``M L^{-1}``). Built by :func:`whitener`.
    """

    def __init__(self, factor: torch.Tensor):
        self.factor = factor

    def unwhiten(self, m: torch.Tensor) -> torch.Tensor:
        """``m L^{-1}`` for ``m`` of shape ``(k, in)``."""
        return torch.linalg.solve_triangular(self.factor, m, upper=False, left=False)


def whitener(gram: torch.Tensor, in_features: int, device=None) -> Whitener:
    """The :class:`Whitener` of a layer's input statistics ``gram`` (``sum_t x_t x_t^T``).

    Args:
        gram: ``(in_features, in_features)`` floating tensor, finite; symmetrised here.
        in_features: the layer's input size.
        device: where the factor lives (default: ``gram``'s device).

    The factor is computed in float64 by :func:`cholesky_damped`.
    """
    check.floating("gram", gram)
    if gram.shape != (in_features, in_features):
        raise ValueError(f"gram must be the ({in_features}, {in_features}) input statistics, "
                         f"got {tuple(gram.shape)}")  # fmt: skip
    g = gram.detach().to(device=device if device is not None else gram.device,
                         dtype=torch.float64)  # fmt: skip
    g = (g + g.T) / 2
    if not bool(torch.isfinite(g).all()):
        raise ValueError("gram contains NaN or Inf")
    return Whitener(cholesky_damped(g))


# Up to this size the exact SVD costs well under a second (and at most ~3x a randomized
# one) and is exactly optimal; above it the randomized SVD with four power iterations.
EXACT_SVD_MAX = 1024


def truncated_svd(a: torch.Tensor, rank: int | None = None, tol: float | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Top singular triplets ``(U, S, Vh)`` of a matrix ``a`` (``m x n``).

    Args:
        a: 2-D floating tensor.
        rank: the number of triplets, in ``[1, min(m, n)]``; or
        tol: the fewest triplets with ``||a - U diag(S) Vh||_F <= tol ||a||_F``, ``tol`` in
            ``[0, 1]`` (from the exact SVD).
        seed: for the randomized SVD (used when ``min(m, n) > EXACT_SVD_MAX`` and ``rank``
            is well below half of it: :func:`lowrank.linalg.rsvd`, four power iterations).

    Returns:
        ``U`` ``(m, k)``, ``S`` ``(k,)`` descending, ``Vh`` ``(k, n)``. The exact and
        randomized paths are each optimal to working precision for the spectra of trained
        weights; the exact SVD's signs are LAPACK's.
    """
    check.floating("a", a)
    check.ndim("a", a, 2, "(m, n)")
    if (rank is None) == (tol is None):
        raise ValueError("give exactly one of rank and tol")
    small = min(a.shape)
    if tol is not None:
        tol = check.real("tol", tol, 0.0, 1.0)
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        tail = s.square().flip(0).cumsum(0).flip(0)  # tail[k] = sum_{i >= k} s_i^2
        total = float(tail[0]) if tail.numel() else 0.0
        keep = [k for k in range(1, small + 1)
                if (float(tail[k]) if k < small else 0.0) <= tol * tol * total]  # fmt: skip
        rank = keep[0] if keep else small
        return u[:, :rank], s[:rank], vh[:rank]
    rank = check.positive_int("rank", rank)
    if rank > small:
        raise ValueError(f"rank must be at most min(m, n) = {small}, got {rank}")
    if small > EXACT_SVD_MAX and rank + 10 < small // 2:
        return rsvd(a, rank, seed=seed, n_iter=4)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]
