"""Eigen-decomposition of a symmetric positive semi-definite matrix by the
stabilised Nystrom approximation (Tropp, Yurtsever, Udell & Cevher 2017, Alg. 3;
Li, Linderman, Szlam, Stanton, Kluger & Tygert 2017).

With an orthonormal ``n x l`` test matrix ``Omega``: ``Y = A Omega``, a shift
``nu = eps * ||Y||_F`` (``Y_nu = Y + nu Omega``), ``C = Omega^T Y_nu``,
``B = Y_nu C^{-1/2}`` and ``B = U Sigma V^T``; the eigenvalues are
``max(Sigma^2 - nu, 0)`` with eigenvectors ``U``. One product with ``A``.

``C^{-1/2}`` comes from the eigen-decomposition of the small ``l x l`` matrix ``C``
rather than its Cholesky factor (the two give the same ``B B^T``), with eigenvalues at
rounding level dropped: a zero or semidefinite ``A`` is valid input, and ``C`` is then
singular to working precision.
"""

from __future__ import annotations

import torch

from lowrank import _validate as check
from lowrank.linalg import sketching
from lowrank.linalg.operator import as_operator, check_finite_product
from lowrank.linalg.orthogonalize import householder_qr
from lowrank.linalg.rsvd import resolve_seed


def nystrom_eigh(
    A,
    rank: int,
    *,
    oversample: int = 10,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs ``(eigenvalues, eigenvectors)`` of a PSD ``A``, descending.

    ``A``: dense ``(..., n, n)``, sparse ``(n, n)`` or a LinearOperator; its
    symmetry is assumed, not checked. Eigenvalues are ``(..., rank)`` (non-negative,
    descending) and eigenvectors ``(..., n, rank)``.
    """
    rank = check.positive_int("rank", rank)
    oversample = check.integer("oversample", oversample, 0)
    op = as_operator(A)
    if op.m != op.n:
        raise ValueError(f"A must be square, got {op.m} x {op.n}")
    if rank > op.n:
        raise ValueError(f"rank must be at most n = {op.n}, got {rank}")
    l = min(rank + oversample, op.n)
    omega = sketching.test_matrix(op.n, l, "gaussian", resolve_seed(seed, generator), 0,
                                  op.dtype, op.device)  # fmt: skip
    omega = householder_qr(omega)
    y = op.matmat(omega)
    check_finite_product(y)
    eps = torch.finfo(op.dtype).eps
    nu = (eps * torch.linalg.matrix_norm(y.double())).to(op.dtype)  # no overflow in the sum
    y = y + nu[..., None, None] * omega
    gram = omega.mT @ y
    # The l x l eigenproblem in float64: cheap, and it converges for any finite scale.
    theta, v = torch.linalg.eigh(((gram + gram.mT) / 2).double())
    theta, v = theta.to(op.dtype), v.to(op.dtype)
    keep = theta > (l * eps) * theta.amax(dim=-1, keepdim=True).clamp_min(
        torch.finfo(op.dtype).tiny
    )
    inv_root = torch.where(keep, theta.clamp_min(torch.finfo(op.dtype).tiny).rsqrt(), 0.0)
    b = (y @ v) * inv_root[..., None, :]
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    values = (sigma.square() - nu[..., None]).clamp_min(0)
    out = A.dtype if isinstance(A, torch.Tensor) else op.dtype
    return values[..., :rank].to(out), u[..., :rank].to(out)
