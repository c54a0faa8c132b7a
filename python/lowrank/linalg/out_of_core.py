"""Randomized SVD of matrices larger than memory, streamed in row panels.

``A`` (a NumPy array, ``np.memmap`` or CPU tensor, ``m x n``) is read in panels of
rows that fit in ``max_memory`` bytes on the compute device. Each pass over the
panels computes both ``Y = A Z`` and ``W = A^T Y`` (a panel contributes
``A_p Z`` and ``A_p^T (A_p Z)`` while it is resident), and with ``Y = Q R`` from
CholeskyQR2 the next product ``A^T Q = W R^{-1}`` needs no further pass. So the
range finder of :func:`lowrank.linalg.rsvd` (``Q = orth(A Omega)``, then
``Q <- orth(A orth(A^T Q))`` ``n_iter`` times, then ``B^T = A^T Q``) takes
``n_iter + 1`` passes instead of ``2 n_iter + 2``, computes the same subspaces
and returns the in-memory result to rounding for the same seed.

The shortcut amplifies rounding by ``cond(R)``: when ``Y`` is rank-deficient (zero,
constant or exactly low-rank input) or too ill-conditioned for CholeskyQR, ``R`` is
singular or nearly so and ``W R^{-1}`` would be garbage. Then that iteration's
``A^T Q`` is computed by one more pass instead (``Q`` from Householder QR).

On CUDA the next panel is copied from pinned host memory on a side stream while
the current one is multiplied (two panels are resident, each half of ``max_memory``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from lowrank.linalg import sketching
from lowrank.linalg.orthogonalize import normalize, orthonormal_with_factor, well_conditioned

_NUMPY_FLOATS = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}  # fmt: skip


class RowPanels:
    """``A`` read panel by panel onto ``device`` in ``dtype``."""

    def __init__(self, a, device, max_memory: int, dtype: torch.dtype | None, progress):
        if isinstance(a, torch.Tensor):
            if a.layout != torch.strided or a.device.type != "cpu" or a.dim() != 2:
                raise ValueError("a streamed A must be a 2-D dense CPU tensor, array or memmap")
            source_dtype = a.dtype
        elif isinstance(a, np.ndarray):
            if a.ndim != 2:
                raise ValueError(f"A must be 2-D, got an array of shape {a.shape}")
            if a.dtype not in _NUMPY_FLOATS:
                raise TypeError(f"A must hold float16, float32 or float64, got {a.dtype}")
            source_dtype = _NUMPY_FLOATS[a.dtype]
        else:
            raise TypeError(f"A must be a NumPy array, np.memmap or CPU tensor to be streamed, "
                            f"got {type(a).__name__}")  # fmt: skip
        self.a, self.m, self.n = a, int(a.shape[0]), int(a.shape[1])
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float32 if source_dtype in (torch.float16, torch.bfloat16)
                               else source_dtype)  # fmt: skip
        row_bytes = self.n * torch.finfo(self.dtype).bits // 8
        resident = 2 if self.device.type == "cuda" else 1
        self.rows = int(max_memory) // (resident * row_bytes)
        if self.rows < 1:
            raise ValueError(
                f"max_memory = {max_memory} bytes is smaller than one row panel "
                f"({resident} x {row_bytes} bytes for rows of {self.n} {self.dtype})"
            )
        # By default a bar only when a pass is long: it reads more than 1 GiB.
        self.progress = progress if progress is not None else self.m * row_bytes > (1 << 30)
        self.passes = 0
        self.mean: torch.Tensor | None = None  # when set, panels are centred by it

    def column_mean(self) -> torch.Tensor:
        """The column means of ``A``, in one pass (float64 sums)."""
        total = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        for _, _, panel in self._panels():
            total += panel.sum(dim=0, dtype=torch.float64)
        mean = total / self.m
        if not bool(torch.isfinite(mean).all()):
            raise ValueError("A contains NaN or Inf (or its products overflow)")
        return mean.to(self.dtype)

    def _host_panel(self, i0: int, i1: int) -> torch.Tensor:
        block = self.a[i0:i1]
        if isinstance(block, np.ndarray):
            block = np.ascontiguousarray(block)
            with warnings.catch_warnings():
                # A read-only memmap is only ever read: multiply straight from the mapping.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                block = torch.from_numpy(block)
        return block.to(self.dtype)

    def _panels(self):
        bounds = [(i, min(self.m, i + self.rows)) for i in range(0, self.m, self.rows)]
        if self.device.type != "cuda":
            for i0, i1 in bounds:
                panel = self._host_panel(i0, i1)
                yield i0, i1, panel if self.mean is None else panel - self.mean
            return
        copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)

        def start(i0, i1):
            host = self._host_panel(i0, i1).pin_memory()
            with torch.cuda.stream(copy_stream):
                panel = host.to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(copy_stream)
            return panel, done, host

        pending = start(*bounds[0])
        for index, (i0, i1) in enumerate(bounds):
            panel, done, _ = pending
            if index + 1 < len(bounds):
                pending = start(*bounds[index + 1])  # overlaps with this panel's products
            compute.wait_event(done)
            panel.record_stream(compute)
            yield i0, i1, panel if self.mean is None else panel - self.mean

    def fused_pass(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A z, A^T (A z))`` in one pass over the panels."""
        self.passes += 1
        y = torch.empty(self.m, z.shape[1], dtype=self.dtype, device=self.device)
        w = torch.zeros(self.n, z.shape[1], dtype=self.dtype, device=self.device)
        bar = self._bar()
        for i0, i1, panel in self._panels():
            yp = panel @ z
            y[i0:i1] = yp
            w += (yp.mT @ panel).mT
            if bar is not None:
                bar.update((i1 - i0) * self.n * torch.finfo(self.dtype).bits // 8)
        if bar is not None:
            bar.close()
        return y, w

    def rmatmat_pass(self, q: torch.Tensor) -> torch.Tensor:
        """``A^T q`` in one pass over the panels."""
        self.passes += 1
        w = torch.zeros(self.n, q.shape[1], dtype=self.dtype, device=self.device)
        bar = self._bar()
        for i0, i1, panel in self._panels():
            w += (q[i0:i1].mT @ panel).mT
            if bar is not None:
                bar.update((i1 - i0) * self.n * torch.finfo(self.dtype).bits // 8)
        if bar is not None:
            bar.close()
        return w

    def _bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        total = self.m * self.n * torch.finfo(self.dtype).bits // 8
        return tqdm(total=total, unit="B", unit_scale=True, desc=f"rsvd pass {self.passes}")


def streamed_range(panels: RowPanels, l: int, n_iter: int, normalizer: str, sketch: str,
                   seed: int):  # fmt: skip
    """``(Q, B^T)`` of the randomized range finder in ``n_iter + 1`` passes."""
    omega = sketching.test_matrix(panels.n, l, sketch, seed, sketching.STREAM_TEST_MATRIX,
                                  panels.dtype, panels.device)  # fmt: skip
    y, w = panels.fused_pass(omega)
    for i in range(n_iter + 1):
        if not bool(torch.isfinite(y).all()):
            raise ValueError("A contains NaN or Inf (or its products overflow)")
        q, r = orthonormal_with_factor(y)
        if well_conditioned(r):
            at_q = torch.linalg.solve_triangular(r, w, upper=True, left=False)  # W R^{-1}
        else:  # rank-deficient or ill-conditioned Y: the shortcut would amplify rounding
            at_q = panels.rmatmat_pass(q)
        if i == n_iter:
            return q, at_q
        y, w = panels.fused_pass(normalize(at_q, normalizer))
    raise AssertionError("unreachable")
