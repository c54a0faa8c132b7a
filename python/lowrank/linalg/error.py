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


def relative_residual(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """``||exact - approx||_F / ||exact||_F`` in float64 (0 when both are zero, inf when only
    ``exact`` is)."""
    exact = exact.detach().double()
    residual = float((exact - approx.detach().double()).norm())
    total = float(exact.norm())
    if total == 0.0:
        return 0.0 if residual == 0.0 else math.inf
    return residual / total


class ErrorEstimate(NamedTuple):
    estimate: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor


def _chi2_cdf(x: float, dof: int) -> float:
    """P(chi2_dof <= x): the regularised lower incomplete gamma P(dof/2, x/2), by its
    series (x/2 < dof/2 + 1) or continued fraction (Numerical Recipes' gser / gcf)."""
    a, t = dof / 2.0, x / 2.0
    if t <= 0.0:
        return 0.0
    log_front = a * math.log(t) - t - math.lgamma(a)
    if t < a + 1.0:
        term = total = 1.0 / a
        k = a
        for _ in range(1000):
            k += 1.0
            term *= t / k
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return min(1.0, total * math.exp(log_front))
    tiny = 1e-300
    b = t + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return max(0.0, 1.0 - math.exp(log_front) * h)


def _chi2_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of chi-square with ``dof`` degrees of freedom (bisection on the
    CDF; exact for every ``dof``, where the Wilson-Hilferty formula fails for small ones)."""
    low, high = 0.0, max(1.0, dof + 10.0 * math.sqrt(2.0 * dof) + 50.0)
    for _ in range(200):
        mid = 0.5 * (low + high)
        if _chi2_cdf(mid, dof) < p:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


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
    probes = check.positive_int("probes", probes)
    power_iterations = check.iterations("power_iterations", power_iterations)
    op = as_operator(A)
    for name, t in (("U", U), ("S", S), ("Vh", Vh)):
        check.floating(name, t)
    if (U.dim() < 2 or S.dim() < 1 or Vh.dim() < 2 or U.shape[-2] != op.m
            or Vh.shape[-1] != op.n or not U.shape[-1] == S.shape[-1] == Vh.shape[-2]):  # fmt: skip
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
    tiny = torch.finfo(op.dtype).tiny
    v = omega[..., :1] if op.batch == () else omega[..., :1].expand(*op.batch, op.n, 1)
    estimate = torch.zeros(op.batch, dtype=torch.float64, device=op.device)
    for _ in range(power_iterations):
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(tiny)
        ev = residual(v)
        estimate = torch.linalg.vector_norm(ev, dim=(-2, -1)).double()
        v = residual_t(ev)
    upper = 10.0 * math.sqrt(2.0 / math.pi) * columns.max(dim=-1).values.sqrt()
    return ErrorEstimate(estimate, estimate, torch.maximum(upper, estimate))
