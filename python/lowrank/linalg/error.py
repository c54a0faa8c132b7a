"""A posteriori estimates of ``||A - U diag(S) Vh||`` from a few random probes.

With Gaussian probes ``omega_1..omega_p`` and ``E = A - U S Vh`` (applied as
``A w - U (S (Vh w))``, never formed):

- Frobenius norm: ``||E||_F^2 ~ (1/p) sum_i ||E omega_i||^2`` (an unbiased estimator;
  Girard-Hutchinson). ``lower``/``upper`` are its 95% interval in the worst case
  (``E`` of rank one, where the ratio is chi-square with ``p`` degrees of
  freedom; Wilson-Hilferty quantiles); flatter spectra concentrate better.
- spectral norm: ``power_iterations`` steps of the power method on ``E^T E`` give
  the estimate, a lower bound in exact arithmetic; ``upper`` is
  ``10 sqrt(2/pi) max_i ||E omega_i||``, which fails with probability at most
  ``10^-p`` (Halko, Martinsson & Tropp 2011, Lemma 4.1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lowrank import _validate as check
from lowrank.linalg import sketching
from lowrank.linalg.operator import as_operator
from lowrank.linalg.rsvd import resolve_seed


class ErrorEstimate(NamedTuple):
    estimate: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor


def _chi2_quantile(p: float, dof: int) -> float:
    z = {0.025: -1.959963984540054, 0.975: 1.959963984540054}[p]
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


def svd_error(
    A,
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    norm: str | int = "fro",
    *,
    probes: int = 10,
    power_iterations: int = 20,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> ErrorEstimate:
    """Randomized estimate of ``||A - U diag(S) Vh||`` (``norm="fro"`` or ``2``), batched.

    Returns ``ErrorEstimate(estimate, lower, upper)`` tensors of ``A``'s batch shape.
    """
    if norm not in ("fro", 2):
        raise ValueError(f"norm must be 'fro' or 2, got {norm!r}")
    check.positive_int("probes", probes)
    op = as_operator(A)
    for name, t in (("U", U), ("S", S), ("Vh", Vh)):
        check.floating(name, t)
    if U.shape[-2] != op.m or Vh.shape[-1] != op.n or U.shape[-1] != S.shape[-1] != Vh.shape[-2]:
        raise ValueError(
            f"U, S, Vh of shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)} do not "
            f"factor an {op.m} x {op.n} matrix"
        )
    u, s, vh = (t.to(op.dtype) for t in (U, S, Vh))

    def residual(x):
        return op.matmat(x) - u @ (s[..., :, None] * (vh @ x))

    def residual_t(y):
        return op.rmatmat(y) - vh.mT @ (s[..., :, None] * (u.mT @ y))

    omega = sketching.test_matrix(op.n, probes, "gaussian", resolve_seed(seed, generator),
                                  sketching.STREAM_PROBES, op.dtype, op.device)  # fmt: skip
    columns = residual(omega).double().square().sum(dim=-2)  # ||E omega_i||^2, (..., probes)
    if norm == "fro":
        mean = columns.mean(dim=-1)
        lower = (probes * mean / _chi2_quantile(0.975, probes)).sqrt()
        upper = (probes * mean / _chi2_quantile(0.025, probes)).sqrt()
        return ErrorEstimate(mean.sqrt(), lower, upper)
    v = omega[..., :1] if op.batch == () else omega[..., :1].expand(*op.batch, op.n, 1)
    estimate = torch.zeros(op.batch, dtype=torch.float64, device=op.device)
    for _ in range(power_iterations):
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(1e-300)
        ev = residual(v)
        estimate = torch.linalg.vector_norm(ev, dim=(-2, -1)).double()
        v = residual_t(ev)
    upper = 10.0 * math.sqrt(2.0 / math.pi) * columns.max(dim=-1).values.sqrt()
    return ErrorEstimate(estimate, estimate, torch.maximum(upper, estimate))
