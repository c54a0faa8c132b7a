"""Nearest sum of Kronecker products (Van Loan & Pitsianis, 1993).

For ``W`` of shape ``(p*r, q*s)``, the rearrangement ``R(W)`` of shape
``(p*q, r*s)`` has row ``i*q + j`` equal to ``vec`` of block ``W[i*r:(i+1)*r,
j*s:(j+1)*s]``, and ``R(kron(A, B)) = vec(A) vec(B)^T``. So
``||W - sum_k kron(A_k, B_k)||_F = ||R(W) - sum_k vec(A_k) vec(B_k)^T||_F``, and
the best ``terms``-term approximation is the rank-``terms`` truncated SVD of
``R(W)``: ``A_k = sqrt(s_k) u_k``, ``B_k = sqrt(s_k) v_k`` (reshaped).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lowrank import _validate as check


class KroneckerFactors(NamedTuple):
    """``a`` ``(terms, p, q)``, ``b`` ``(terms, r, s)`` and ``||W - sum kron||_F / ||W||_F``."""

    a: torch.Tensor
    b: torch.Tensor
    relative_error: float


def kron_rearrange(w: torch.Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int]):
    """``R(W)``: the ``(p*q, r*s)`` matrix whose rank-1 terms are Kronecker products."""
    (p, q), (r, s) = a_shape, b_shape
    return w.reshape(p, r, q, s).permute(0, 2, 1, 3).reshape(p * q, r * s)


def _top_singular_triplets(m: torch.Tensor, k: int):
    # Exact SVD in float64-or-float32; the matrices here are (p*q, r*s), small next to W.
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def nearest_kronecker(
    w: torch.Tensor,
    a_shape: tuple[int, int],
    b_shape: tuple[int, int],
    terms: int = 1,
) -> KroneckerFactors:
    """The sum of ``terms`` Kronecker products closest to ``w`` in Frobenius norm.

    Args:
        w: ``(p*r, q*s)`` matrix.
        a_shape: ``(p, q)``, the shape of each left factor.
        b_shape: ``(r, s)``, the shape of each right factor.
        terms: number of Kronecker products, at most ``min(p*q, r*s)``.

    Returns:
        ``KroneckerFactors(a, b, relative_error)`` with ``a`` of shape ``(terms, p, q)`` and
        ``b`` of shape ``(terms, r, s)``, so ``sum(torch.kron(a[k], b[k]))`` approximates ``w``.
        Float16/bfloat16 input is decomposed in float32 and returned in its own dtype.
    """
    check.floating("w", w)
    check.ndim("w", w, 2, "a (p*r, q*s) matrix")
    p, q = check.int_pair("a_shape", a_shape)
    r, s = check.int_pair("b_shape", b_shape)
    if w.shape != (p * r, q * s):
        raise ValueError(
            f"w must have shape (p*r, q*s) = ({p * r}, {q * s}) for a_shape {a_shape} and "
            f"b_shape {b_shape}, got {tuple(w.shape)}"
        )
    check.positive_int("terms", terms)
    if terms > min(p * q, r * s):
        raise ValueError(f"terms must be at most min(p*q, r*s) = {min(p * q, r * s)}, got {terms}")
    if not torch.isfinite(w).all():
        raise ValueError("w contains NaN or Inf")
    work = w if w.dtype in (torch.float32, torch.float64) else w.float()
    rearranged = kron_rearrange(work, (p, q), (r, s))
    u, sv, vh = _top_singular_triplets(rearranged, terms)
    root = sv.sqrt()
    a = (u * root).T.reshape(terms, p, q)
    b = (vh * root[:, None]).reshape(terms, r, s)
    total = rearranged.norm()
    residual = (rearranged - (u * sv) @ vh).norm()  # explicit: no cancellation for tiny errors
    rel = float(residual / total) if total > 0 else 0.0
    return KroneckerFactors(a.to(w.dtype), b.to(w.dtype), rel)
