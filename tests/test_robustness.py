"""Numerical robustness of the randomized SVD family on hard but valid input.

Every method (in-memory, batched, out-of-core, streaming, pca, nystrom; the distributed
one in tests/test_distributed.py) meets zero, constant, rank-1, rank-deficient, exactly
low-rank integer, fast- and slow-decaying, repeated-singular-value, very tall and very
wide matrices, in float16, bfloat16, float32 and float64, with every normaliser and
sketch: no NaN, and the result agrees with torch.linalg.svd to a tolerance set by the
dtype and by what the spectrum allows a rank-k method to achieve.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowrank.linalg import StreamingSVD, nystrom_eigh, pca, rsvd

RANK = 5
NORMALIZERS = ("auto", "cholqr2", "qr", "lu", "none")
SKETCHES = ("gaussian", "rademacher", "srht", "sparse_sign")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Rounding of the computation, relative to ||A||: half precision inputs are computed in
# float32 (and rounded once on output).
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def spectrum_matrix(s, m, n, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * torch.as_tensor(s, dtype=torch.float64)) @ v.T


def matrices():
    """(name, matrix in float64, 'exact' when rank <= RANK else the spectrum's kind)."""
    g = torch.Generator().manual_seed(7)
    k = torch.arange(40, dtype=torch.float64)
    yield "zero", torch.zeros(60, 40, dtype=torch.float64), "exact"
    yield "constant", torch.full((60, 40), 3.0, dtype=torch.float64), "exact"
    yield "rank1", torch.randn(60, 1, generator=g, dtype=torch.float64) @ torch.randn(
        1, 40, generator=g, dtype=torch.float64), "exact"  # fmt: skip
    yield "rank3", spectrum_matrix([5.0, 2.0, 1.0], 60, 40, 1), "exact"
    ints = torch.randint(-9, 10, (60, 2), generator=g) @ torch.randint(-9, 10, (2, 40), generator=g)
    yield "integer rank2", ints.double(), "exact"
    yield "fast decay", spectrum_matrix(torch.exp(-k / 2), 60, 40, 2), "fast"
    yield "slow decay", spectrum_matrix(1.0 / (1.0 + k), 60, 40, 3), "slow"
    yield "repeated", spectrum_matrix([3.0] * 4 + [1.0] * 30, 60, 40, 4), "slow"
    yield "tall", spectrum_matrix(torch.exp(-k[:8]), 300, 8, 5), "fast"
    yield "wide", spectrum_matrix(torch.exp(-k[:8]), 8, 300, 6), "fast"


MATRICES = list(matrices())


def check(a64, u, s, vh, kind, dtype, rank=RANK, floor=0.0, scale=None):
    """The SVD (u, s, vh) of a (rounded to dtype) against the exact SVD of that matrix.

    ``floor`` (relative to ||A||_2): singular values below it cannot be resolved by the
    method (unnormalised power iterations), so errors of that size are allowed. ``scale``:
    the size rounding is relative to (default ||A||_2; for PCA that of the uncentred data).
    """
    for t in (u, s, vh):
        assert bool(torch.isfinite(t.double()).all()), "NaN or Inf in the result"
    a = a64.to(dtype).double()
    exact = torch.linalg.svdvals(a)
    if scale is None:
        scale = max(float(exact[0]), 1e-300) if exact.numel() else 1.0
    tol = TOL[dtype] + floor
    u, s, vh = u.double(), s.double(), vh.double()
    k = min(rank, len(exact))
    assert s.shape[-1] == k and u.shape[-1] == k and vh.shape[-2] == k
    # Orthonormal factors (the completion of a rank-deficient basis included).
    eye = torch.eye(k, dtype=torch.float64)
    assert float((u.mT @ u - eye).abs().max()) <= 50 * tol + 1e-6
    assert float((vh @ vh.mT - eye).abs().max()) <= 50 * tol + 1e-6
    optimal = float(exact[k:].square().sum().sqrt())
    error = float((a - (u * s) @ vh).norm())
    slack = {"exact": 0.0, "fast": 0.05, "slow": 0.6, "single pass": 1.0}[kind]
    assert error <= (1 + slack) * optimal + 20 * tol * scale
    if kind == "single pass":
        return  # X = (Psi Q)^+ W is no projection: its singular values may overshoot
    if kind != "slow":  # the top singular values themselves
        assert float((s - exact[:k]).abs().max()) <= 20 * tol * scale + slack * scale
    else:  # a rank-k method underestimates a flat spectrum, never overshoots it
        assert bool((s <= exact[:k] * (1 + 20 * tol) + 20 * tol * scale).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, a, kind", MATRICES, ids=[m[0] for m in MATRICES])
def test_rsvd_every_normalizer_and_sketch(name, a, kind, dtype):
    x = a.to(dtype)
    for normalizer in NORMALIZERS:
        for sketch in SKETCHES:
            u, s, vh = rsvd(x, min(RANK, *a.shape), normalizer=normalizer, sketch=sketch, seed=3)
            assert u.dtype == s.dtype == vh.dtype == dtype
            # Without normalisation, q power iterations keep only the directions above
            # eps^(1 / (2q + 1)) of the largest in the working precision.
            eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
            floor = eps ** (1 / 5) if normalizer == "none" else 0.0
            try:
                check(a, u, s, vh, kind, dtype, floor=floor)
            except AssertionError as error:
                raise AssertionError(f"normalizer={normalizer} sketch={sketch}: {error}") from None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_with_degenerate_members(dtype):
    batch = torch.stack([m[1][:60, :40] for m in MATRICES if m[1].shape == (60, 40)])
    for normalizer in NORMALIZERS:
        u, s, vh = rsvd(batch.to(dtype), RANK, normalizer=normalizer, seed=1)
        for i, (_, a, kind) in enumerate(m for m in MATRICES if m[1].shape == (60, 40)):
            check(a, u[i], s[i], vh[i], kind, dtype)


@pytest.mark.parametrize("name, a, kind", MATRICES, ids=[m[0] for m in MATRICES])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.float16), ids=str)
def test_out_of_core_agrees(name, a, kind, dtype):
    array = a.to(dtype).numpy()
    for n_iter in (0, 2):
        panel = max(1, array.shape[0] // 7) * array.shape[1] * max(array.itemsize, 4)
        u, s, vh = rsvd(array, min(RANK, *a.shape), n_iter=n_iter, seed=2, max_memory=panel,
                        progress=False)  # fmt: skip
        check(a, u, s, vh, kind if n_iter else {"fast": "slow"}.get(kind, kind), dtype)


@pytest.mark.parametrize("name, a, kind", MATRICES, ids=[m[0] for m in MATRICES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pca(name, a, kind, dtype):
    x = a.to(dtype)
    centred = a.to(dtype).double() - a.to(dtype).double().mean(0)
    for normalizer in ("auto", "lu", "qr"):
        u, s, vh = pca(x, min(RANK, *a.shape), normalizer=normalizer, seed=4)
        # Centring an exactly low-rank matrix keeps it low rank (rank + 1 at most).
        check(centred, u, s, vh, "slow" if kind != "exact" else "exact",
              torch.float64 if dtype == torch.float64 else dtype,
              scale=float(torch.linalg.matrix_norm(x.double(), 2)))  # fmt: skip


@pytest.mark.parametrize("name, a, kind", MATRICES, ids=[m[0] for m in MATRICES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nystrom_on_gram_matrices(name, a, kind, dtype):
    gram = a.T @ a / max(float(a.norm()) ** 2, 1.0)  # scaled to fit float16
    psd = gram.to(dtype)  # PSD, singular whenever a is rank-deficient
    values, vectors = nystrom_eigh(psd, min(RANK, psd.shape[0]), seed=5)
    assert bool(torch.isfinite(values.double()).all() and torch.isfinite(vectors.double()).all())
    exact = torch.linalg.eigvalsh(psd.double()).flip(0)[: values.shape[0]]
    scale = max(float(exact[0]), 1e-300) if exact.numel() else 1.0
    assert bool((values.double() >= 0).all())
    assert bool((values.double() <= exact * (1 + 1e-2) + 50 * TOL[dtype] * scale).all())
    if kind != "slow":
        assert (
            float((values.double() - exact).abs().max()) <= 0.05 * scale + 50 * TOL[dtype] * scale
        )


@pytest.mark.parametrize("name, a, kind", MATRICES, ids=[m[0] for m in MATRICES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_streaming(name, a, kind, dtype):
    x = a.to(dtype)
    rank = min(RANK, *a.shape)
    sketch = StreamingSVD(x.shape, rank, seed=6)
    step = max(1, x.shape[0] // 3)
    for i in range(0, x.shape[0], step):
        sketch.update(x[i : i + step], rows=slice(i, min(i + step, x.shape[0])))
    result = sketch.result()
    assert result.U.dtype == dtype
    check(a, result.U, result.S, result.Vh, kind if kind == "exact" else "single pass", dtype)
    assert result.error is not None and np.isfinite(result.error)


# ---- magnitude -------------------------------------------------------------------------------

SCALED = [m for m in MATRICES if m[0] in ("rank3", "fast decay", "wide")]


@pytest.mark.parametrize("exponent", (-100, 100))  # 2^-100 ~ 8e-31, 2^100 ~ 1e30
def test_fixed_accuracy_is_scale_invariant(exponent):
    """tol= on float32 A times 2^j, every normaliser and sketch: the rank and the triplets of
    A, S times 2^j (a power of two scales exactly, so only subnormal entries may differ)."""
    tol = TOL[torch.float32]
    for name, a, _ in SCALED:
        x = a.to(torch.float32)
        for normalizer in NORMALIZERS:
            for sketch in SKETCHES:
                options = {"tol": 1e-2, "normalizer": normalizer, "sketch": sketch, "seed": 3}
                u0, s0, vh0 = rsvd(x, 3, **options)
                u, s, vh = rsvd(x * 2.0**exponent, 3, **options)
                where = f"{name} normalizer={normalizer} sketch={sketch}"
                assert s.shape == s0.shape, where
                assert torch.allclose(s.double() * 2.0**-exponent, s0.double(), rtol=tol,
                                      atol=0), where  # fmt: skip
                assert torch.allclose(u, u0, atol=tol) and torch.allclose(vh, vh0, atol=tol), where


def same(scaled, unscaled, scale, where):
    """``scaled / scale`` equals ``unscaled`` to float32's rounding (relative to the largest)."""
    scaled, unscaled = np.asarray(scaled, dtype=np.float64), np.asarray(unscaled, dtype=np.float64)
    assert np.all(np.isfinite(scaled)), where
    atol = 1e-4 * np.abs(unscaled).max()
    assert np.allclose(scaled / scale, unscaled, rtol=1e-4, atol=atol), where


@pytest.mark.parametrize("scale", (2.0**-100, 2.0**100))
def test_entry_points_at_extreme_magnitudes(scale):
    """float32 data times 2^-100 or 2^100 (about 1e-30, 1e30) through compat and the
    scikit-learn estimators: the singular values of the unscaled data (same seed) times
    ``scale``, and the same explained variance ratios (the variances themselves, near 1e-60
    or 1e60, are beyond float32). A power of two scales exactly: even what unnormalised
    power iterations cannot resolve comes out the same."""
    compat = pytest.importorskip("lowrank.compat")
    sklearn = pytest.importorskip("lowrank.sklearn")
    for name, a, _ in SCALED:
        x = a.to(torch.float32)
        big = x * scale
        for function in (compat.svd_lowrank, compat.pca_lowrank):
            torch.manual_seed(0)
            unscaled = function(x, q=3)[1]
            torch.manual_seed(0)
            same(function(big, q=3)[1], unscaled, scale, (name, function.__name__))
        for normalizer in ("auto", "QR", "LU", "none"):

            def call(data, normalizer=normalizer):
                return compat.randomized_svd(data.numpy(), 3, random_state=0,
                                             power_iteration_normalizer=normalizer)[1]  # fmt: skip

            same(call(big), call(x), scale, (name, normalizer))
        for solver in ("full", "covariance_eigh", "randomized"):
            fit = sklearn.PCA(2, svd_solver=solver, random_state=0)
            with np.errstate(over="ignore"):
                ratio = fit.fit(big.numpy()).explained_variance_ratio_
            same(ratio, fit.fit(x.numpy()).explained_variance_ratio_, 1.0, (name, solver))
