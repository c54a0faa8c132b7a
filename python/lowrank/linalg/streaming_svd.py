"""Single-pass low-rank approximation from linear sketches (Tropp, Yurtsever, Udell &
Cevher, "Practical sketching algorithms for low-rank matrix approximation", SIMAX 2017,
with the error sketch of their 2019 "Streaming low-rank matrix approximation with an
application to scientific simulation").

For ``A`` (``m x n``) seen once, as blocks of rows or columns or as linear updates
``A <- theta A + tau H``, keep ``Y = A Omega`` (``m x k``), ``W = Psi A`` (``l x n``)
and ``Z = Gamma A`` (``s x n``) for fixed counter-based test matrices ``Omega``
(``n x k``), ``Psi`` (``l x m``) and ``Gamma`` (``s x m``), ``k = rank + oversample``,
``l = 2 k + 1``. Then ``Q = orth(Y)``, ``X = (Psi Q)^+ W`` and ``A ~ Q X``, whose SVD
is returned; ``||A - Q X||_F^2 ~ ||Z - Gamma Q X||_F^2 / s``. Memory is
``O((m + n) k)``, never ``O(m n)``.
"""

from __future__ import annotations

import torch

from lowrank import _validate as check
from lowrank.linalg import sketching
from lowrank.linalg.orthogonalize import householder_qr
from lowrank.linalg.rsvd import resolve_seed, sign_convention

_STREAM_OMEGA, _STREAM_PSI, _STREAM_GAMMA = 32, 33, 34


class StreamingSVD:
    """Sketches of an ``m x n`` matrix updated in one pass; :meth:`result` gives its SVD.

    Args:
        shape: ``(m, n)``.
        rank: rank of the returned approximation.
        oversample: ``k = rank + oversample`` range columns (``l = 2k + 1`` co-range rows).
        seed: the test matrices are a function of it (counter-based), as in ``rsvd``.
        error_sketch: keep ``s = 10`` more rows for the error estimate.
        dtype, device: of the sketches (and of the updates they accept).
    """

    def __init__(self, shape, rank: int, *, oversample: int = 10, seed: int | None = None,
                 error_sketch: bool = True, dtype=torch.float64, device=None):  # fmt: skip
        m, n = check.int_pair("shape", shape)
        check.positive_int("rank", rank)
        if rank > min(m, n):
            raise ValueError(f"rank must be at most min(m, n) = {min(m, n)}, got {rank}")
        self.m, self.n, self.rank = m, n, rank
        self.k = min(rank + oversample, m, n)
        self.l = min(2 * self.k + 1, m)
        seed = resolve_seed(seed, None)
        kw = {"dtype": dtype, "device": torch.device(device or "cpu")}
        self.dtype, self.device = dtype, kw["device"]
        draw = sketching.test_matrix
        self.omega = draw(n, self.k, "gaussian", seed, _STREAM_OMEGA, dtype, self.device)
        self.psi = draw(m, self.l, "gaussian", seed, _STREAM_PSI, dtype, self.device).T
        self.gamma = (draw(m, 10, "gaussian", seed, _STREAM_GAMMA, dtype, self.device).T
                      if error_sketch else None)  # fmt: skip
        self.y = torch.zeros(m, self.k, **kw)
        self.w = torch.zeros(self.l, n, **kw)
        self.z = torch.zeros(10, n, **kw) if error_sketch else None

    def _block(self, name, block):
        check.floating(name, block)
        check.ndim(name, block, 2, "a 2-D block")
        return block.to(dtype=self.dtype, device=self.device)

    def update(self, block: torch.Tensor, *, rows: slice | None = None,
               cols: slice | None = None) -> None:  # fmt: skip
        """Adds ``block`` to ``A[rows, :]`` or ``A[:, cols]`` (a slice with step 1)."""
        if (rows is None) == (cols is None):
            raise ValueError("give exactly one of rows= or cols=")
        block = self._block("block", block)
        if rows is not None:
            start, stop, step = rows.indices(self.m)
            if step != 1 or block.shape != (stop - start, self.n):
                raise ValueError(f"block of shape {tuple(block.shape)} does not fill rows {rows}")
            self.y[start:stop] += block @ self.omega
            self.w += self.psi[:, start:stop] @ block
            if self.z is not None:
                self.z += self.gamma[:, start:stop] @ block
        else:
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
        if h is not None:
            h = self._block("h", h)
            if h.shape != (self.m, self.n):
                raise ValueError(f"h must have shape {(self.m, self.n)}, got {tuple(h.shape)}")
            h_omega, psi_h = h @ self.omega, self.psi @ h
            gamma_h = None if self.z is None else self.gamma @ h
        else:
            f, g = (self._block(name, t) for name, t in zip(("F", "G"), factors))
            if f.shape[0] != self.m or g.shape[1] != self.n or f.shape[1] != g.shape[0]:
                raise ValueError("factors must be F (m x j) and G (j x n)")
            h_omega, psi_h = f @ (g @ self.omega), (self.psi @ f) @ g
            gamma_h = None if self.z is None else (self.gamma @ f) @ g
        self.y.mul_(theta).add_(h_omega, alpha=tau)
        self.w.mul_(theta).add_(psi_h, alpha=tau)
        if self.z is not None:
            self.z.mul_(theta).add_(gamma_h, alpha=tau)

    def result(self):
        """``(U, S, Vh, error)``: the rank-``rank`` SVD of ``Q X`` and the estimate of
        ``||A - Q X||_F`` (None without the error sketch)."""
        q = householder_qr(self.y)
        x = torch.linalg.lstsq(self.psi @ q, self.w).solution  # (k, n)
        ux, s, vh = torch.linalg.svd(x, full_matrices=False)
        u, vh = sign_convention(q @ ux[:, : self.rank], vh[: self.rank])
        error = None
        if self.z is not None:
            residual = self.z - (self.gamma @ q) @ x
            error = float(residual.square().sum().div(self.z.shape[0]).sqrt())
        return u, s[: self.rank], vh, error
