"""Normalising thin blocks ``Y`` (``..., m x l``, ``m >= l``) between products.

- ``cholqr2``: CholeskyQR twice (``G = Y^T Y = R^T R``, ``Q = Y R^{-1}``; Fukaya et al.
  2014): two Gram products, two small triangular inverses and two products, all BLAS-3,
  far cheaper than Householder QR on tall blocks. CholeskyQR is accurate only while
  ``cond(Y)`` stays below about ``eps^(-1/2)``; past that ``G`` is singular to working
  precision and the factorisation can succeed with a wrong ``R``. So a pass counts as
  failed when Cholesky fails *or* ``R``'s diagonal spans more than ``0.1 / sqrt(eps)`` (a
  lower bound on ``cond(Y)``); then the first pass is shifted (``G + s I``, shifted
  CholeskyQR3 of Fukaya, Kannan, Nakatsukasa, Yamamoto & Yanagisawa 2020), and a block
  that stays singular (rank-deficient input) falls back to Householder QR.
- ``qr``: Householder QR.
- ``lu``: the unit-lower-trapezoidal ``P L`` factor of a pivoted LU (well-conditioned,
  not orthonormal: only between power iterations, as scikit-learn does).
- ``none``: no normalisation between power iterations, only a scaling by a power of two
  (exact: the same result as none at all wherever that one neither overflows nor
  underflows, and the same result for ``2^j A`` as for ``A`` at every magnitude).
"""

from __future__ import annotations

import torch

NORMALIZERS = ("auto", "cholqr2", "qr", "lu", "none")


def householder_qr(y: torch.Tensor) -> torch.Tensor:
    """Q of the Householder QR of ``y``, computed at ordinary magnitude (:func:`rescale`):
    LAPACK's own guards against underflow round differently at extreme ones."""
    return torch.linalg.qr(rescale(y)).Q


def well_conditioned(factor: torch.Tensor) -> bool:
    """False when the triangular ``factor`` is singular or its diagonal spans more than
    ``0.1 / sqrt(eps)``: its CholeskyQR, or a solve with it, would be inaccurate (the span
    bounds ``cond`` of the block from below)."""
    d = factor.diagonal(dim1=-2, dim2=-1).abs()
    if d.shape[-1] == 0:
        return True
    limit = 0.1 / torch.finfo(factor.dtype).eps ** 0.5
    low = d.amin(dim=-1)
    return bool(((low > 0) & (d.amax(dim=-1) <= limit * low)).all())


def _cholesky_pass(y: torch.Tensor, shift: bool) -> torch.Tensor | None:
    qr = _cholesky_qr(y, shift)
    return None if qr is None else qr[0]


def _cholesky_qr(y: torch.Tensor, shift: bool, rescaled: bool = False):
    """``(Q, R)`` with ``Q = Y R^{-1}`` from one (shifted) Cholesky pass, or None.

    A block whose Gram matrix leaves the range (entries beyond about ``1e19`` or below
    ``1e-19`` in float32) is tried again scaled by a power of two (exact, and only when the
    first try fails): ``Q`` is then the one of the same block at ordinary magnitude."""
    gram = y.mH @ y
    if shift:
        m, l = y.shape[-2], y.shape[-1]
        eps = torch.finfo(y.dtype).eps
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True).unsqueeze(-1)
        s = 11.0 * (m * l + l * (l + 1)) * eps * trace
        gram = gram + s * torch.eye(l, dtype=y.dtype, device=y.device)
    factor, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()) or not well_conditioned(factor):
        if rescaled or not _out_of_range(y):
            return None
        exponent = _peak_exponent(y)
        qr = _cholesky_qr(times_power_of_two(y, -exponent), shift, rescaled=True)
        return None if qr is None else (qr[0], times_power_of_two(qr[1], exponent))
    # Q = Y R^{-1} with R = L^T. R^{-1} is formed (l x l, cheap) and applied by one GEMM:
    # a batched triangular solve with m-row right-hand sides runs matrix by matrix and
    # costs several times the GEMM, for the same forward error (cond(R) eps, which the
    # span check above bounds and the second pass removes).
    r = factor.mH
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return y @ torch.linalg.solve_triangular(r, eye, upper=True), r


def cholqr2(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of y's columns: (shifted) CholeskyQR2, Householder QR as last resort."""
    q = _cholesky_pass(y, shift=False)
    if q is None:
        q = _cholesky_pass(y, shift=True)
        q = None if q is None else _cholesky_pass(q, shift=False)
    if q is not None:
        q = _cholesky_pass(q, shift=False)
    return householder_qr(y) if q is None else q


def lu_normalize(y: torch.Tensor) -> torch.Tensor:
    """``P L`` of a partially pivoted LU; a singular ``U`` (zero or rank-deficient ``y``) is
    fine, since ``L`` is unit lower-trapezoidal whatever ``U`` holds."""
    lu, pivots, _ = torch.linalg.lu_factor_ex(y)
    p, lower, _ = torch.lu_unpack(lu, pivots, unpack_data=True, unpack_pivots=True)
    return p @ lower


def orthonormal_with_factor(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, R)``, ``Q`` orthonormal and ``Q = Y R^{-1}`` (R upper triangular), by CholeskyQR2
    with the shifted and Householder fallbacks. With R known, ``A^T Q = (A^T Y) R^{-1}``
    needs no further product with A (the streamed range finder's one pass per iteration)."""
    first = _cholesky_qr(y, shift=False) or _cholesky_qr(y, shift=True)
    second = None if first is None else _cholesky_qr(first[0], shift=False)
    if second is None:
        q, r = torch.linalg.qr(y)
        return q, r
    return second[0], second[1] @ first[1]


def orthonormal(y: torch.Tensor, normalizer: str) -> torch.Tensor:
    """An orthonormal basis (the final step of every range finder)."""
    return householder_qr(y) if normalizer == "qr" else cholqr2(y)


def cholqr(y: torch.Tensor) -> torch.Tensor:
    """One CholeskyQR pass: well-conditioned, orthonormal to about ``eps * cond(y)^2``;
    enough between power iterations, where only conditioning matters. A block too
    ill-conditioned for it takes Householder QR: a shifted pass would squash the
    directions below ``sqrt(eps) * ||y||``, which the next product then loses."""
    q = _cholesky_pass(y, shift=False)
    return householder_qr(y) if q is None else q


def times_power_of_two(y: torch.Tensor, exponent) -> torch.Tensor:
    """``y * 2**exponent`` (an int, or an integer tensor broadcast against ``y``), in two
    factors so that neither leaves float32's range: exact unless the result does."""
    half = exponent // 2
    if isinstance(exponent, int):
        return y * 2.0**half * 2.0 ** (exponent - half)
    real = y.dtype.to_real()
    return y * torch.exp2(half.to(real)) * torch.exp2((exponent - half).to(real))


def _peak_exponent(y: torch.Tensor) -> torch.Tensor:
    """Per matrix of ``y`` (``..., m x l``, not empty), the ``e`` with its largest entry in
    ``[2^(e-1), 2^e)`` (0 for a zero matrix), shaped ``(..., 1, 1)``."""
    return torch.frexp(y.abs().amax(dim=(-2, -1), keepdim=True))[1]


def _out_of_range(y: torch.Tensor) -> bool:
    """Whether the Gram matrix of a block ``y`` (``..., m x l``) may overflow, or underflow
    to where rounding is no longer relative (squares below ``tiny / eps``); a zero block is
    in range."""
    info = torch.finfo(y.dtype)
    peak = y.abs().amax(dim=(-2, -1))
    low, high = (info.tiny / info.eps) ** 0.5, (info.max / max(y.shape[-2], 1)) ** 0.5
    return bool(((peak > 0) & (peak < low) | (peak > high) | ~torch.isfinite(peak)).any())


def rescale(y: torch.Tensor) -> torch.Tensor:
    """``y`` (``..., m x l``) times the power of two that brings each matrix's largest entry
    into ``[0.5, 1)`` (a zero matrix stays zero): products with ``A`` in power iterations then
    neither overflow nor underflow, whatever ``A``'s magnitude, and nothing else changes."""
    if y.numel() == 0:
        return y
    return times_power_of_two(y, -_peak_exponent(y))


def normalize(y: torch.Tensor, normalizer: str) -> torch.Tensor:
    """The between-iterations normalisation named by ``normalizer`` (never "auto")."""
    if normalizer == "none":
        return rescale(y)
    if normalizer == "lu":
        return lu_normalize(y)
    if normalizer == "qr":
        return householder_qr(y)
    return cholqr(y)
