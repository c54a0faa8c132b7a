"""LowRankLinear: the function, its init, the optimal factors from a dense layer (by weight,
by tolerance and by the outputs on calibration data) and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import RecordShapes, relative_error
from torch import nn

from lowrank.nn import LowRankLinear
from lowrank.nn.lowrank import cholesky_damped


def spectrum_matrix(out, inp, decay=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))
    k = min(out, inp)
    s = torch.exp(-decay * torch.arange(k, dtype=torch.float64))
    return (u[:, :k] * s) @ v[:, :k].T, s


def test_forward_is_the_factored_product():
    layer = LowRankLinear(20, 12, 4, dtype=torch.float64)
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    assert layer.to_dense().shape == (12, 20)
    assert relative_error(layer(x), F.linear(x, layer.B @ layer.A, layer.bias)) <= 1e-13
    assert "rank=4" in repr(layer) and layer.weight.shape == (12, 20)


def test_no_dense_weight_forward_or_backward():
    out_f, in_f = 48, 40
    layer = LowRankLinear(in_f, out_f, 3)
    x = torch.randn(7, in_f, requires_grad=True)
    with RecordShapes() as seen:
        layer(x).square().sum().backward()
    assert (out_f, in_f) not in seen.shapes and (in_f, out_f) not in seen.shapes
    assert layer.A.grad.shape == (3, in_f) and layer.B.grad.shape == (out_f, 3)


def test_init_matches_linear_output_variance():
    torch.manual_seed(0)
    layer = LowRankLinear(512, 512, 64, bias=False)
    linear = nn.Linear(512, 512, bias=False)
    x = torch.randn(4096, 512)
    with torch.no_grad():
        ratio = float(layer(x).var() / linear(x).var())
    assert 0.85 < ratio < 1.15, ratio


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_from_dense_is_the_truncated_svd(rank):
    w, s = spectrum_matrix(60, 45)
    linear = nn.Linear(45, 60, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = LowRankLinear.from_dense(linear, rank)
    optimal = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())  # Eckart-Young
    assert layer.rank == rank and torch.equal(layer.bias, linear.bias)
    assert abs(layer.projection_error - optimal) <= 1e-10 * max(1.0, optimal)
    assert abs(relative_error(layer.to_dense(), w) - optimal) <= 1e-10
    # balanced factors: B^T B = A A^T = S
    assert relative_error(layer.B.T @ layer.B, layer.A @ layer.A.T) <= 1e-10


def test_from_dense_large_uses_the_randomized_svd_and_stays_optimal():
    w, s = spectrum_matrix(300, 200, decay=0.1)
    layer = LowRankLinear.from_dense(w, 20)
    optimal = float(s[20:].square().sum().sqrt() / s.square().sum().sqrt())
    assert layer.projection_error <= optimal * (1 + 1e-6)


@pytest.mark.parametrize("tol", [0.5, 0.1, 0.01, 1e-3])
def test_tol_picks_the_smallest_rank(tol):
    w, s = spectrum_matrix(40, 30)
    layer = LowRankLinear.from_dense(w, tol=tol)
    energy = s.square()
    errors = [float(energy[k:].sum().sqrt() / energy.sum().sqrt()) for k in range(31)]
    smallest = next(k for k in range(1, 31) if errors[k] <= tol)
    assert layer.rank == smallest and layer.projection_error <= tol
    assert errors[smallest - 1] > tol


def test_calibrated_factors_minimise_the_output_error():
    torch.manual_seed(0)
    w, _ = spectrum_matrix(30, 24, decay=0.05)
    # Correlated inputs with very unequal feature scales.
    mix = torch.randn(24, 24, dtype=torch.float64) * torch.logspace(-2, 1, 24, dtype=torch.float64)
    x = torch.randn(500, 24, dtype=torch.float64) @ mix
    gram = x.T @ x
    rank = 6
    plain = LowRankLinear.from_dense(w, rank)
    fitted = LowRankLinear.from_dense(w, rank, gram=gram)

    def output_error(layer):
        return relative_error(x @ layer.to_dense().T, x @ w.T)

    # The optimum of min ||(W - M) X^T|| over rank-6 M: the truncated SVD of W L, mapped back.
    factor = torch.linalg.cholesky(gram)
    u, s, vh = torch.linalg.svd(w @ factor)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(factor)
    optimum = relative_error(x @ best.T, x @ w.T)
    assert abs(output_error(fitted) - optimum) <= 1e-8
    assert abs(fitted.projection_error - optimum) <= 1e-8
    assert output_error(plain) > 1.5 * optimum


def test_cholesky_damped_handles_rank_deficient_statistics():
    x = torch.randn(5, 12, dtype=torch.float64)  # 5 samples: rank 5 < 12
    factor = cholesky_damped(x.T @ x)
    assert torch.isfinite(factor).all()
    assert relative_error(factor @ factor.T, x.T @ x) <= 1e-4
    with pytest.raises(ValueError, match="positive semi-definite"):
        cholesky_damped(-torch.eye(4, dtype=torch.float64) * torch.arange(1, 5))
    indefinite = torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=torch.float64)  # eigenvalue -2
    with pytest.raises(ValueError, match="positive semi-definite"):
        cholesky_damped(indefinite)


def test_bad_input():
    with pytest.raises(ValueError, match="rank must be at most"):
        LowRankLinear(4, 6, 5)
    with pytest.raises(ValueError, match="positive integer"):
        LowRankLinear(4, 6, 0)
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match="exactly one"):
        LowRankLinear.from_dense(w)
    with pytest.raises(ValueError, match="exactly one"):
        LowRankLinear.from_dense(w, 2, tol=0.1)
    with pytest.raises(ValueError, match="at most"):
        LowRankLinear.from_dense(w, 5)
    with pytest.raises(ValueError):
        LowRankLinear.from_dense(w, tol=1.5)
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        LowRankLinear.from_dense([[1.0]], 1)
    with pytest.raises(ValueError, match="gram"):
        LowRankLinear.from_dense(w, 2, gram=torch.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        LowRankLinear.from_dense(w, 2, gram=torch.full((4, 4), float("nan")))
    layer = LowRankLinear(4, 6, 2)
    with pytest.raises(ValueError):
        layer(torch.randn(3, 5))
