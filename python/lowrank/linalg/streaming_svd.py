"""Single-pass low-rank approximation from linear sketches (Tropp, Yurtsever, Udell &
Cevher, "Practical sketching algorithms for low-rank matrix approximation", SIMAX 2017,
with the error sketch of their 2019 "Streaming low-rank matrix approximation with an
application to scientific simulation").

For ``A`` (``m x n``) seen once, as blocks of rows or columns or as linear updates
``A <- theta A + tau H``, keep ``Y = A Omega`` (``m x k``), ``W = Psi A`` (``l x n``)
and ``Z = Gamma A`` (``s x n``) for fixed counter-based test matrices ``Omega``
(``n x k``), ``Psi`` (``l x m``) and ``Gamma`` (``s x m``), ``k = 4 rank + 1`` by
default and ``l = 2 k + 1``. Then ``Q = orth(Y)``, ``X = (Psi Q)^+ W`` and ``A ~ Q X``,
whose truncated SVD is returned; the error of any approximation ``A_hat`` built from
the sketches is estimated as ``||A - A_hat||_F^2 ~ ||Z - Gamma A_hat||_F^2 / s``, for
the returned rank and for ``Q X``. Memory is ``O((m + n) k)``, never ``O(m n)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lowrank import _validate as check
from lowrank.linalg import sketching
from lowrank.linalg.orthogonalize import householder_qr
from lowrank.linalg.rsvd import resolve_seed, sign_convention

_STREAM_OMEGA, _STREAM_PSI, _STREAM_GAMMA = 32, 33, 34
_ERROR_ROWS = 10


class StreamingResult(NamedTuple):
    """``U S Vh`` of the requested rank, ``error``: the estimate of ``||A - U S Vh||_F``, and
    ``sketch_error``: that of the whole sketched approximation ``Q X`` (rank ``k``). Both
    are None without the error sketch."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    error: float | None
    sketch_error: float | None


class StreamingSVD:
    """Sketches of an ``m x n`` matrix updated in one pass; :meth:`result` gives its SVD.

    Args:
        shape: ``(m, n)``.
        rank: rank of the returned approximation.
        oversample: ``k = rank + oversample`` range columns; by default ``k = 4 rank + 1``
            and ``l = 2k + 1`` co-range rows, the sizes Tropp et al. recommend when no
            storage budget binds (2019, eq. 5.3).
        seed: the test matrices are a function of it (counter-based), as in ``rsvd``.
        error_sketch: keep ``s = 10`` more rows for the error estimates.
        dtype: of the results. By default the dtype of the first update (float32 when
            nothing was added). The sketches accumulate in float64 for float64 data and in
            float32 otherwise (float16/bfloat16 updates are accumulated in float32).
        device: of the sketches and results (default: that of the first update, or CPU).
    """

    def __init__(self, shape, rank: int, *, oversample: int | None = None,
                 seed: int | None = None, error_sketch: bool = True, dtype=None,
                 device=None):  # fmt: skip
        m, n = check.int_pair("shape", shape)
        rank = check.positive_int("rank", rank)
        if rank > min(m, n):
            raise ValueError(f"rank must be at most min(m, n) = {min(m, n)}, got {rank}")
        if oversample is None:
            k = 4 * rank + 1
        else:
            k = rank + check.integer("oversample", oversample, 0)
        if dtype is not None and dtype not in check.FLOATING:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.m, self.n, self.rank = m, n, rank
        self.k = min(k, m, n)
        self.l = min(2 * self.k + 1, m)
        self._seed = resolve_seed(seed, None)
        self._error_sketch = error_sketch
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.omega = self.psi = self.gamma = self.y = self.w = self.z = None
        if dtype is not None:
            self._allocate(dtype, self.device or torch.device("cpu"))

    def _allocate(self, dtype, device) -> None:
        """Test matrices and zero sketches in the accumulation dtype for ``dtype`` data."""
        if self.dtype is None:
            self.dtype = dtype
        if self.device is None:
            self.device = torch.device(device)
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.work_dtype = work
        m, n, dev = self.m, self.n, self.device
        draw = sketching.test_matrix
        seed = self._seed
        self.omega = draw(n, self.k, "gaussian", seed, _STREAM_OMEGA, work, dev)
        self.psi = draw(m, self.l, "gaussian", seed, _STREAM_PSI, work, dev).T
        self.y = torch.zeros(m, self.k, dtype=work, device=dev)
        self.w = torch.zeros(self.l, n, dtype=work, device=dev)
        if self._error_sketch:
            self.gamma = draw(m, _ERROR_ROWS, "gaussian", seed, _STREAM_GAMMA, work, dev).T
            self.z = torch.zeros(_ERROR_ROWS, n, dtype=work, device=dev)

    def _block(self, name, block):
        check.floating(name, block)
        check.ndim(name, block, 2, "a 2-D block")
        if self.y is None:
            self._allocate(block.dtype, block.device)
        if not bool(torch.isfinite(block).all()):
            raise ValueError(f"{name} contains NaN or Inf; the sketches are left unchanged")
        return block.to(dtype=self.work_dtype, device=self.device)

    def update(self, block: torch.Tensor, *, rows: slice | None = None,
               cols: slice | None = None) -> None:  # fmt: skip
        """Adds ``block`` to ``A[rows, :]`` or ``A[:, cols]`` (a slice with step 1)."""
        if (rows is None) == (cols is None):
            raise ValueError("give exactly one of rows= or cols=")
        block = self._block("block", block)
        if rows is not None:
            if not isinstance(rows, slice):
                raise TypeError(f"rows must be a slice, got {type(rows).__name__}")
            start, stop, step = rows.indices(self.m)
            if step != 1 or block.shape != (stop - start, self.n):
                raise ValueError(f"block of shape {tuple(block.shape)} does not fill rows {rows}")
            self.y[start:stop] += block @ self.omega
            self.w += self.psi[:, start:stop] @ block
            if self.z is not None:
                self.z += self.gamma[:, start:stop] @ block
        else:
            if not isinstance(cols, slice):
                raise TypeError(f"cols must be a slice, got {type(cols).__name__}")
            start, stop, step = cols.indices(self.n)
            if step != 1 or block.shape != (self.m, stop - start):
                raise ValueError(f"block of shape {tuple(block.shape)} does not fill cols {cols}")
            self.y += block @ self.omega[start:stop]
            self.w[:, start:stop] += self.psi @ block
            if self.z is not None:
                self.z[:, start:stop] += self.gamma @ block

    def linear_update(self, theta: float, tau: float, h=None, *, factors=None) -> None:
        """``A <- theta A + tau H``, with ``H`` dense (``m x n``) or ``factors=(F, G)`` for
        ``H = F @ G`` (never formed)."""
        if (h is None) == (factors is None):
            raise ValueError("give exactly one of h or factors=(F, G)")
        for name, value in (("theta", theta), ("tau", tau)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if h is not None:
            h = self._block("h", h)
            if h.shape != (self.m, self.n):
                raise ValueError(f"h must have shape {(self.m, self.n)}, got {tuple(h.shape)}")
            h_omega, psi_h = h @ self.omega, self.psi @ h
            gamma_h = None if self.z is None else self.gamma @ h
        else:
            if not isinstance(factors, (tuple, list)) or len(factors) != 2:
                raise ValueError("factors must be a pair (F, G)")
            f, g = (self._block(name, t) for name, t in zip(("F", "G"), factors))
            if f.shape[0] != self.m or g.shape[1] != self.n or f.shape[1] != g.shape[0]:
                raise ValueError("factors must be F (m x j) and G (j x n)")
            h_omega, psi_h = f @ (g @ self.omega), (self.psi @ f) @ g
            gamma_h = None if self.z is None else (self.gamma @ f) @ g
        self.y.mul_(theta).add_(h_omega, alpha=tau)
        self.w.mul_(theta).add_(psi_h, alpha=tau)
        if self.z is not None:
            self.z.mul_(theta).add_(gamma_h, alpha=tau)

    def result(self) -> StreamingResult:
        """The rank-``rank`` SVD of ``Q X`` and the error estimates (see
        :class:`StreamingResult`), in :attr:`dtype` on :attr:`device`."""
        if self.y is None:
            self._allocate(torch.float32, torch.device("cpu"))
        q = householder_qr(self.y)
        x = torch.linalg.lstsq(self.psi @ q, self.w).solution  # (k, n)
        ux, s, vh = torch.linalg.svd(x, full_matrices=False)
        u, vh = sign_convention(q @ ux[:, : self.rank], vh[: self.rank])
        s = s[: self.rank]
        error = sketch_error = None
        if self.z is not None:

            def estimate(approx_rows):  # ||Z - Gamma A_hat||_F / sqrt(s)
                return float((self.z - approx_rows).square().sum().div(_ERROR_ROWS).sqrt())

            gamma_q = self.gamma @ q
            sketch_error = estimate(gamma_q @ x)
            error = estimate(((self.gamma @ u) * s) @ vh)
        out = self.dtype
        return StreamingResult(u.to(out), s.to(out), vh.to(out), error, sketch_error)
