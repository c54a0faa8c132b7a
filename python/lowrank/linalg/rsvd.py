"""Randomized SVD (Halko, Martinsson & Tropp, SIAM Review 2011).

For ``A`` (``..., m x n``) and a target rank ``k``, with ``l = k + oversample``:

1. sketch the range: ``Y = A Omega`` for an ``n x l`` random test matrix;
2. power (subspace) iterations ``Q <- orth(A orth(A^T Q))``, ``n_iter`` times, so
   the spectrum decays like ``s_i^(2 q + 1)`` (or a block Krylov space
   ``[Y, (A A^T) Y, ...]`` with ``block_krylov=True``: Musco & Musco 2015);
3. ``B^T = A^T Q`` and the small SVD ``B = U_B S V^T``, ``U = Q U_B``.

That is ``2 + 2 n_iter`` products with ``A``, each ``m n l`` multiply-adds; the
rest is ``O((m + n) l^2)``. Between products the tall blocks are normalised by
CholeskyQR2 (``orthogonalize.py``), BLAS-3 and several times cheaper than the
Householder QR ``torch.svd_lowrank`` runs after every product.

Fixed-accuracy mode (``tol=``) grows the basis block by block (blocked randQB,
Martinsson & Voronin 2016) until ``||A - Q B||_F <= tol ||A||_F``, tracked as
``||A||_F^2 - ||B||_F^2`` (reliable for ``tol`` down to about ``sqrt(eps)``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from lowrank import _validate as check
from lowrank.linalg import sketching
from lowrank.linalg.operator import Operator, as_operator, check_finite_product
from lowrank.linalg.orthogonalize import (
    NORMALIZERS,
    normalize,
    orthonormal,
    times_power_of_two,
)
from lowrank.linalg.out_of_core import RowPanels, streamed_range


def rsvd(
    A,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int | str = 2,
    normalizer: str = "auto",
    sketch: str = "gaussian",
    block_krylov: bool = False,
    tol: float | None = None,
    max_rank: int | None = None,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD ``A ~ U diag(S) Vh`` of rank ``rank``, by randomized range finding.

    Args:
        A: dense tensor ``(..., m, n)`` (batched; real or complex), torch sparse COO/CSR
            ``(m, n)``, or a :class:`lowrank.linalg.LinearOperator`. A complex ``A`` is
            sketched with a real test matrix and gives ``A ~ U diag(S) Vh`` with ``S`` real.
        rank: number of singular triplets, ``1 <= rank <= min(m, n)``. With ``tol`` it
            is the block size by which the basis grows.
        oversample: extra sketch columns (``l = rank + oversample``).
        n_iter: power iterations (or Krylov blocks); 2 suits decaying spectra.
            ``"auto"``: scikit-learn's rule, 7 when ``rank < 0.1 min(m, n)``, else 4.
        normalizer: ``"cholqr2"``, ``"qr"``, ``"lu"``, ``"none"`` or ``"auto"`` (CholeskyQR2
            with its shifted and Householder fallbacks: stable for any input).
        sketch: ``"gaussian"``, ``"rademacher"``, ``"srht"`` or ``"sparse_sign"``.
        block_krylov: use the whole Krylov space instead of its last block.
        tol: fixed-accuracy mode: smallest rank with ``||A - U S Vh||_F <= tol ||A||_F``
            (up to ``max_rank``, default ``min(m, n)``); single matrices only. Exact for
            tensors and for operators with a ``frobenius_norm()`` method; for other
            operators both norms are estimated from 32 Gaussian probes.
        init: ``(..., m, k)`` starting basis (e.g. the previous ``U``): warm start for
            subspace tracking; random columns complete it to ``l``.
        generator, seed: randomness. The test matrix is a function of ``seed`` alone
            (counter-based), identical on every device; without ``seed`` one is drawn
            from ``generator`` (torch's default generator when None).
        compute_dtype: dtype of the computation; default float32 for float16/bfloat16
            input (products may run in the input precision on CUDA), else the input's.
        device, max_memory, progress: out-of-core mode, taken for an ``np.memmap`` or when
            ``max_memory`` is given (for a memmap, a NumPy array or a 2-D CPU tensor): ``A``
            is streamed in row panels of at most ``max_memory`` bytes (default 1 GiB) onto
            ``device`` (default CPU) in ``n_iter + 1`` passes (see
            ``lowrank.linalg.out_of_core``), with a progress bar per pass when ``progress``
            is True, or when it is None and a pass reads more than 1 GiB. An in-memory
            NumPy array without ``max_memory`` is used as the tensor ``torch.from_numpy(A)``
            (results are tensors, as for that tensor).

    Returns:
        ``(U, S, Vh)`` like ``torch.linalg.svd(A, full_matrices=False)`` truncated: ``U``
        ``(..., m, k)``, ``S`` ``(..., k)`` descending, ``Vh`` ``(..., k, n)``, on ``A``'s
        device in its dtype (``S`` in the real one). Each column of ``U`` has its
        largest-magnitude entry real and positive (a deterministic sign or phase).
    """
    rank, oversample, n_iter, max_rank = _check_options(rank, oversample, n_iter, normalizer,
                                                        sketch, tol, max_rank)  # fmt: skip
    if isinstance(A, np.memmap) or max_memory is not None:
        return _out_of_core(A, rank, oversample, n_iter, normalizer, sketch, tol, init,
                            resolve_seed(seed, generator), compute_dtype, device, max_memory,
                            progress)  # fmt: skip
    if isinstance(A, np.ndarray):
        A = from_numpy(A)
    op = as_operator(A, compute_dtype)
    n_iter = _auto_iterations(n_iter, rank, (op.m, op.n))
    if not 1 <= rank <= min(op.m, op.n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(op.m, op.n)}], got {rank}")
    out_dtype = A.dtype if isinstance(A, torch.Tensor) else op.dtype
    seed = resolve_seed(seed, generator)
    normalizer = "cholqr2" if normalizer == "auto" else normalizer
    if init is not None:
        init = _check_init(init, op)
    # Work on the side with fewer rows when that is free: the blocks are then shorter.
    transpose = op.m < op.n and init is None and tol is None
    if transpose:
        op = op.transposed()
    if tol is not None:
        u, s, vh = _fixed_accuracy(op, rank, tol, max_rank, n_iter, normalizer, sketch, seed)
    else:
        u, s, vh = _fixed_rank(op, rank, oversample, n_iter, normalizer, sketch, block_krylov,
                               init, seed)  # fmt: skip
    if transpose:
        u, vh = vh.mH, u.mH
    u, vh = sign_convention(u, vh)
    return u.to(out_dtype), s.to(out_dtype.to_real()), vh.to(out_dtype)


def _fixed_rank(op: Operator, rank, oversample, n_iter, normalizer, sketch, krylov, init, seed):
    l = min(rank + oversample, op.m, op.n)
    if init is None:
        y = sketching.sketch_columns(op, l, sketch, seed)
    else:
        # Warm start: the test matrix A^T U_prev points along the previous right
        # singular vectors; random columns complete it to l.
        y = op.matmat(op.rmatmat(init[..., :l]))
        if init.shape[-1] < l:
            extra = sketching.sketch_columns(op, l - init.shape[-1], sketch, seed)
            y = torch.cat((y, extra), dim=-1)
    check_finite_product(y)
    if krylov:
        q = orthonormal(y, normalizer)
        blocks = [q]
        for _ in range(n_iter):
            q = orthonormal(op.matmat(orthonormal(op.rmatmat(q), normalizer)), normalizer)
            blocks.append(q)
        # The Krylov space can be wider than the matrix is tall: Householder copes.
        q = orthonormal(torch.cat(blocks, dim=-1), "qr")
    else:
        q = orthonormal(y, normalizer) if n_iter == 0 else normalize(y, normalizer)
        for i in range(n_iter):
            y = op.matmat(normalize(op.rmatmat(q), normalizer))
            q = orthonormal(y, normalizer) if i == n_iter - 1 else normalize(y, normalizer)
    return _project_and_decompose(op, q, rank)


def _project_and_decompose(op: Operator, q: torch.Tensor, rank: int):
    """``B^T = A^T Q`` and its SVD; ``U = Q U_B``, truncated to ``rank``."""
    return _decompose(q, op.rmatmat(q), rank)


def _decompose(q: torch.Tensor, bt: torch.Tensor, rank: int):
    """SVD of ``B = (B^T)^T`` lifted by ``Q``, truncated to ``rank``.

    The tall ``B^T`` (``n x l``) is first reduced by CholeskyQR2, ``B^T = Q_B R``, so the
    SVD runs on the ``l x l`` factor: ``R = W S U_B^T`` gives ``B = U_B S (Q_B W)^T``.
    """
    qb, r = _qr_with_factor(bt)
    w, s, ubh = torch.linalg.svd(r)
    u = q @ ubh.mH[..., :rank]
    vh = (qb @ w[..., :rank]).mH
    return u, s[..., :rank], vh


def _qr_with_factor(bt: torch.Tensor):
    """``bt = Q R`` with Q orthonormal (CholeskyQR2, Householder when that fails)."""
    q = orthonormal(bt, "cholqr2")
    r = q.mH @ bt
    return q, r


def _out_of_core(a, rank, oversample, n_iter, normalizer, sketch, tol, init, seed,
                 compute_dtype, device, max_memory, progress, center=False):  # fmt: skip
    """Streamed rsvd; with ``center``, of ``a`` minus its column means (one more pass)."""
    if tol is not None or init is not None:
        raise ValueError("tol= and init= are not available for out-of-core input")
    panels = RowPanels(a, device or "cpu", (1 << 30) if max_memory is None else max_memory,
                       compute_dtype, progress)  # fmt: skip
    if center:
        panels.mean = panels.column_mean()
    if not 1 <= rank <= min(panels.m, panels.n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(panels.m, panels.n)}]")
    n_iter = _auto_iterations(n_iter, rank, (panels.m, panels.n))
    l = min(rank + oversample, panels.m, panels.n)
    normalizer = "cholqr2" if normalizer == "auto" else normalizer
    q, bt = streamed_range(panels, l, n_iter, normalizer, sketch, seed)
    u, s, vh = _decompose(q, bt, rank)
    u, vh = sign_convention(u, vh)
    return u, s, vh


def _fixed_accuracy(op: Operator, block, tol, max_rank, n_iter, normalizer, sketch, seed):
    """Blocked randQB on ``A / 2^e``, ``2^e`` the power of two nearest ``||A||_F``: the
    products of products in the power iterations and the residual's energy then stay in
    range at every magnitude of ``A``, and the result is exactly the one for ``A`` (scaled
    back by ``2^e``), as the fixed-rank mode's is."""
    if op.batch:
        raise ValueError("tol= (fixed-accuracy mode) takes a single matrix, not a batch")
    max_rank = min(op.m, op.n) if max_rank is None else min(max_rank, op.m, op.n)
    norm_sq = op.frobenius_sq()
    probes = None
    if norm_sq is None:  # an operator that does not know its norm: Gaussian probes
        stream = sketching.STREAM_NORM_PROBES
        omega = sketching.test_matrix(op.n, NORM_PROBES, "gaussian", seed, stream, op.dtype,
                                      op.device)  # fmt: skip
        probes = op.matmat(omega)
        check_finite_product(probes)
        norm_sq = _squares(probes).sum() / NORM_PROBES
    _, exponent = math.frexp(math.sqrt(float(norm_sq)))  # 0 for a zero, NaN or Inf norm
    if exponent:
        op = _scaled(op, -exponent)
        norm_sq = norm_sq * 4.0**-exponent
        probes = None if probes is None else times_power_of_two(probes, -exponent)
    target = tol * tol * norm_sq
    q = torch.zeros(op.m, 0, dtype=op.dtype, device=op.device)
    bt = torch.zeros(op.n, 0, dtype=op.dtype, device=op.device)
    energy = norm_sq
    index = 0
    while q.shape[-1] < max_rank and bool(energy > target):
        k = min(block, max_rank - q.shape[-1])
        y = sketching.sketch_columns(op, k, sketch, block_seed(seed, index))
        check_finite_product(y)
        for _ in range(n_iter):  # power iterations on the residual A - Q B
            z = normalize(op.rmatmat(y) - bt @ (q.mH @ y), normalizer)
            y = op.matmat(z) - q @ (bt.mH @ z)
        qi = orthonormal(y - q @ (q.mH @ y), normalizer)
        qi = orthonormal(qi - q @ (q.mH @ qi), normalizer)  # re-orthogonalise once
        bti = op.rmatmat(qi)
        q, bt = torch.cat((q, qi), -1), torch.cat((bt, bti), -1)
        if probes is None:
            energy = energy - _squares(bti).sum()
        else:  # (A - Q B) Omega = (I - Q Q^T) A Omega
            energy = _squares(probes - q @ (q.mH @ probes)).sum() / NORM_PROBES
        index += 1
    w, s, ubh = torch.linalg.svd(bt, full_matrices=False)
    u = q @ ubh.mH
    if probes is None:
        tail = norm_sq - torch.cumsum(s.double().square(), 0)
    else:
        captured = _squares(u.mH @ probes).sum(-1) / NORM_PROBES
        tail = norm_sq - torch.cumsum(captured, 0)
    met = torch.nonzero(tail <= target)
    k = int(met[0]) + 1 if met.numel() else s.shape[0]
    return u[:, :k], times_power_of_two(s[:k], exponent), w.mH[:k]


def _scaled(op: Operator, exponent: int) -> Operator:
    """``2^exponent A``: every product (and sketch) of ``op`` times ``2^exponent``, applied
    after the product so that it is exact."""

    def matmat(x):
        return times_power_of_two(op.matmat(x), exponent)

    def rmatmat(y):
        return times_power_of_two(op.rmatmat(y), exponent)

    return Operator(op.batch, op.m, op.n, op.dtype, op.device, matmat, rmatmat, op.dense,
                    scale_exponent=op.scale_exponent + exponent)  # fmt: skip


# Gaussian probes that estimate ||A||_F and the residual in fixed-accuracy mode when the
# operator cannot say its norm: the ratio of the estimates is within about 25% of the truth.
NORM_PROBES = 32


def sign_convention(u: torch.Tensor, vh: torch.Tensor):
    """Flips singular pairs so each column of ``u`` has its largest-magnitude entry positive
    (complex: real and positive, the pair rotated by its phase)."""
    index = u.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sgn(torch.gather(u, -2, index))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs.conj(), vh * signs.mT


def _squares(t: torch.Tensor) -> torch.Tensor:
    """``|t|^2`` elementwise, in float64."""
    return (t.abs() if t.is_complex() else t).double().square()


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    if seed is not None:
        try:
            seed = check.integer("seed", seed, 0)
        except TypeError as error:
            raise ValueError(str(error)) from None
        if seed >= 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        return seed
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))


def block_seed(seed: int, index: int) -> int:
    """A distinct seed per block of the fixed-accuracy mode (block 0 keeps ``seed``)."""
    return (seed + index * 0x9E3779B97F4A7C15) % (2**63)


def _auto_iterations(n_iter, rank: int, shape) -> int:
    """scikit-learn's rule for ``n_iter="auto"``: 7 when ``rank < 0.1 min(m, n)``, else 4."""
    if n_iter != "auto":
        return n_iter
    return 7 if rank < 0.1 * min(int(shape[0]), int(shape[1])) else 4


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` that also takes read-only arrays (only ever read here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _check_options(rank, oversample, n_iter, normalizer, sketch, tol, max_rank):
    """The options, validated; returns ``(rank, oversample, n_iter, max_rank)`` as ints
    (``n_iter`` may stay ``"auto"``, resolved once the shape is known)."""
    rank = check.positive_int("rank", rank)
    oversample = check.integer("oversample", oversample, 0)
    if not (isinstance(n_iter, str) and n_iter == "auto"):
        n_iter = check.iterations("n_iter", n_iter)
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    if sketch not in sketching.SKETCHES:
        raise ValueError(f"sketch must be one of {sketching.SKETCHES}, got {sketch!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    if max_rank is not None:
        max_rank = check.positive_int("max_rank", max_rank)
    return rank, oversample, n_iter, max_rank


def _check_init(init, op: Operator) -> torch.Tensor:
    check.floating("init", init)
    if init.dim() < 2 or init.shape[-2] != op.m:
        raise ValueError(
            f"init must be a (..., m, k) basis with m = {op.m} rows, got {tuple(init.shape)}"
        )
    if init.device != op.device:
        raise ValueError(f"init is on {init.device}, A on {op.device}")
    if tuple(init.shape[:-2]) not in ((), op.batch):
        raise ValueError(f"init's batch shape {tuple(init.shape[:-2])} differs from A's {op.batch}")
    if not bool(torch.isfinite(init).all()):
        raise ValueError("init contains NaN or Inf")
    return init.to(op.dtype)
