"""Randomized SVD, PCA, Nystrom and error estimates against exact decompositions."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, IMPLS, relative_error

from lowrank import dispatch
from lowrank.linalg import nystrom_eigh, pca, rsvd, svd_error
from lowrank.ops.sketch import (
    NORMAL,
    SIGN,
    UNIFORM,
    philox4x32_reference,
    philox_fill_reference,
    random_matrix,
    sparse_sign_rows,
    sparse_sign_rows_reference,
    srht_rows,
    srht_rows_reference,
)


def matrix_with_spectrum(s, m, n, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    k = s.numel()
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((u * s.double()) @ v.T).to(dtype=dtype, device=device)


SPECTRA = {
    "fast": lambda k: torch.exp(-torch.arange(k, dtype=torch.float64) / 4),
    "slow": lambda k: 1.0 / (1.0 + torch.arange(k, dtype=torch.float64)),
    "flat": lambda k: torch.ones(k, dtype=torch.float64),
    "ill": lambda k: torch.logspace(0, -12, k, dtype=torch.float64),
}


def optimal(a, rank):
    return float(torch.linalg.svdvals(a.double())[rank:].square().sum().sqrt())


def error(a, u, s, vh):
    return float((a.double() - (u.double() * s.double()) @ vh.double()).norm())


# ---- sketching primitives ------------------------------------------------------------------


def test_philox_known_answers():
    """Random123's published Philox4x32-10 test vectors."""
    cases = [
        ((0, 0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ((2**64 - 1, 2**64 - 1, 2**64 - 1), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ((0x85A308D3243F6A88, 0x0370734413198A2E, 0x299F31D0A4093822),
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]  # fmt: skip
    import numpy as np

    for (counter, stream, seed), expected in cases:
        words = philox4x32_reference(np.array([counter], dtype=np.uint64), stream, seed)
        assert [int(w) for w in words[0]] == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", [NORMAL, SIGN, UNIFORM])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_philox_fill_matches_reference(device, kind, dtype):
    out = random_matrix((13, 11), kind, 987654321, 5, dtype, device)
    ref = philox_fill_reference(torch.empty(13, 11, dtype=torch.float64), kind, 987654321, 5)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert float((out.cpu().double() - ref).abs().max()) <= tol * 10


def test_philox_streams_are_distinct_and_normal():
    a = random_matrix((200, 200), NORMAL, 1, 0, torch.float64, "cpu")
    b = random_matrix((200, 200), NORMAL, 1, 1, torch.float64, "cpu")
    assert not torch.equal(a, b)
    assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1) < 0.02
    signs = random_matrix((10000,), SIGN, 3, 0, torch.float32, "cpu")
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and abs(float(signs.mean())) < 0.05


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 5, 16, 37])
def test_srht_rows_matches_reference(impl, device, n):
    a = torch.randn(7, n, dtype=torch.float64, device=device)
    n2 = 1 << (n - 1).bit_length()
    signs = random_matrix((n,), SIGN, 2, 1, torch.float64, device)
    cols = torch.randperm(n2, device=device)[: min(n2, 5)]
    with dispatch.force(impl):
        out = srht_rows(a, signs, cols, n2, 0.5)
    assert relative_error(out, srht_rows_reference(a, signs, cols, n2, 0.5)) <= 1e-12


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_sparse_sign_rows_matches_reference(impl, device):
    n, l, z = 23, 9, 3
    a = torch.randn(6, n, dtype=torch.float64, device=device)
    cols = torch.stack([torch.randperm(l)[:z] for _ in range(n)]).to(torch.int32).to(device)
    signs = random_matrix((n, z), SIGN, 4, 4, torch.float64, device)
    with dispatch.force(impl):
        out = sparse_sign_rows(a, cols, signs, l)
    assert relative_error(out, sparse_sign_rows_reference(a, cols, signs, l)) <= 1e-12


# ---- accuracy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spectrum", ["fast", "slow", "flat", "ill"])
@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
def test_accuracy_against_exact_svd(spectrum, shape):
    m, n = shape
    a = matrix_with_spectrum(SPECTRA[spectrum](min(m, n)), m, n)
    u, s, vh = rsvd(a, 10, seed=0)
    assert u.shape == (m, 10) and s.shape == (10,) and vh.shape == (10, n)
    assert bool((s[:-1] >= s[1:]).all())
    exact = torch.linalg.svdvals(a)[:10]
    factor = {"fast": 1.02, "ill": 1.02, "slow": 1.25, "flat": 1.6}[spectrum]
    assert error(a, u, s, vh) <= factor * optimal(a, 10) + 1e-12
    if spectrum in ("fast", "ill"):
        assert relative_error(s, exact) <= 1e-6
    eye = torch.eye(10, dtype=a.dtype)
    assert float((u.T @ u - eye).abs().max()) <= 1e-10
    assert float((vh @ vh.T - eye).abs().max()) <= 1e-10


def test_decaying_spectrum_target_accuracy():
    """oversample=10, n_iter=2 on a decaying spectrum: within 1.02x of optimal."""
    a = matrix_with_spectrum(torch.exp(-torch.arange(300, dtype=torch.float64) / 20), 400, 300)
    u, s, vh = rsvd(a, 32, oversample=10, n_iter=2, seed=3)
    assert error(a, u, s, vh) <= 1.02 * optimal(a, 32)


@pytest.mark.parametrize("normalizer", ["auto", "cholqr2", "qr", "lu", "none"])
@pytest.mark.parametrize("sketch", ["gaussian", "rademacher", "srht", "sparse_sign"])
def test_every_normalizer_and_sketch(normalizer, sketch):
    a = matrix_with_spectrum(SPECTRA["fast"](60), 90, 70)
    u, s, vh = rsvd(a, 8, normalizer=normalizer, sketch=sketch, seed=11)
    assert error(a, u, s, vh) <= 1.02 * optimal(a, 8)


def test_block_krylov_helps_slow_spectra():
    a = matrix_with_spectrum(SPECTRA["slow"](200), 300, 200)
    plain = error(a, *rsvd(a, 10, oversample=2, n_iter=2, seed=1))
    krylov = error(a, *rsvd(a, 10, oversample=2, n_iter=2, block_krylov=True, seed=1))
    assert krylov <= plain * 1.0001
    assert krylov <= 1.05 * optimal(a, 10)


def test_float32_ill_conditioned_stays_stable():
    a = matrix_with_spectrum(SPECTRA["ill"](100), 200, 100, dtype=torch.float32)
    u, _, vh = rsvd(a, 20, n_iter=4, seed=0)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    eye = torch.eye(20)
    assert float((u.T @ u - eye).abs().max()) <= 1e-4


# ---- inputs -----------------------------------------------------------------------------------


def test_batched_equals_loop():
    a = torch.stack([matrix_with_spectrum(SPECTRA["fast"](40), 50, 40, seed=i) for i in range(6)])
    a = a.reshape(2, 3, 50, 40)
    u, s, vh = rsvd(a, 5, seed=7)
    for i in range(2):
        for j in range(3):
            u1, s1, vh1 = rsvd(a[i, j], 5, seed=7)
            assert relative_error(s[i, j], s1) <= 1e-12
            assert relative_error(u[i, j], u1) <= 1e-10
            assert relative_error(vh[i, j], vh1) <= 1e-10


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_inputs(layout):
    dense = matrix_with_spectrum(SPECTRA["fast"](30), 60, 45)
    dense = dense * (torch.rand(60, 45, generator=torch.Generator().manual_seed(0)) < 0.3)
    sparse = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    u, s, vh = rsvd(sparse, 6, seed=2)
    _, s2, _ = rsvd(dense, 6, seed=2)
    assert relative_error(s, s2) <= 1e-10
    assert error(dense, u, s, vh) <= 1.02 * optimal(dense, 6)


def test_linear_operator_input():
    b, a_factor = torch.randn(70, 5, dtype=torch.float64), torch.randn(5, 50, dtype=torch.float64)
    noise = 1e-6 * torch.randn(70, 50, dtype=torch.float64)

    class LowRankPlusNoise:
        shape, dtype, device = (70, 50), torch.float64, torch.device("cpu")

        def matmat(self, x):
            return b @ (a_factor @ x) + noise @ x

        def rmatmat(self, y):
            return a_factor.T @ (b.T @ y) + noise.T @ y

    dense = b @ a_factor + noise
    u, s, vh = rsvd(LowRankPlusNoise(), 5, seed=0)
    assert error(dense, u, s, vh) <= 1.02 * optimal(dense, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(dtype):
    a = matrix_with_spectrum(SPECTRA["fast"](50), 64, 50).to(dtype)
    u, s, vh = rsvd(a, 6, seed=0)
    assert u.dtype == s.dtype == vh.dtype == dtype
    assert error(a, u, s, vh) <= 1.1 * optimal(a, 6) + 1e-2 * float(a.double().norm())


def test_same_seed_same_result_and_sign_convention():
    a = matrix_with_spectrum(SPECTRA["slow"](40), 60, 40)
    r1, r2 = rsvd(a, 5, seed=42), rsvd(a, 5, seed=42)
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))
    u = r1[0]
    peak = u.gather(0, u.abs().argmax(0, keepdim=True))
    assert bool((peak > 0).all())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(rsvd(a, 5, generator=g1)[1], rsvd(a, 5, generator=g2)[1])


def test_zero_and_rank_deficient_matrices():
    u, s, vh = rsvd(torch.zeros(30, 20), 5, seed=0)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all() and float(s.abs().max()) == 0.0
    a = matrix_with_spectrum(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), 40, 30)
    u, s, vh = rsvd(a, 10, seed=0)
    assert torch.isfinite(u).all() and float(s[3:].abs().max()) <= 1e-12
    assert error(a, u, s, vh) <= 1e-12


def test_fixed_accuracy_meets_tol():
    a = matrix_with_spectrum(torch.exp(-torch.arange(150, dtype=torch.float64) / 10), 200, 150)
    for tol in (1e-1, 1e-3, 1e-5):
        u, s, vh = rsvd(a, 8, tol=tol, seed=0)
        assert error(a, u, s, vh) <= tol * float(a.norm()) * 1.0001
        k = s.numel()
        assert optimal(a, k - 1) > tol * float(a.norm()) * 0.5  # not much larger than needed


@pytest.mark.parametrize("normalizer", ["auto", "qr", "lu", "none"])
@pytest.mark.parametrize("exponent", [-100, -66, 57, 100])  # 2^-100 ~ 8e-31, 2^100 ~ 1e30
def test_fixed_accuracy_is_scale_invariant_in_float32(normalizer, exponent):
    """A rank-5 float32 matrix times 2^j: tol= finds the same 5 triplets, S times 2^j (a power
    of two scales exactly). Unscaled, products of products leave float32's range."""
    a = matrix_with_spectrum(torch.tensor([5.0, 4, 3, 2, 1]), 200, 120, dtype=torch.float32)
    u0, s0, vh0 = rsvd(a, 10, tol=1e-3, normalizer=normalizer, seed=0)
    assert s0.numel() == 5
    u, s, vh = rsvd(a * 2.0**exponent, 10, tol=1e-3, normalizer=normalizer, seed=0)
    assert s.numel() == 5
    assert torch.allclose(s.double() * 2.0**-exponent, s0.double(), rtol=1e-6, atol=0)
    assert torch.allclose(u, u0, atol=1e-6) and torch.allclose(vh, vh0, atol=1e-6)


@pytest.mark.parametrize("exponent", [-100, 100])
def test_unnormalised_power_iterations_are_scale_invariant(exponent):
    """normalizer="none" in fixed-rank mode: A (A^T A)^q Omega would underflow or overflow
    float32 at these magnitudes; the triplets are as accurate as the unscaled matrix's."""
    a = matrix_with_spectrum(torch.tensor([5.0, 4, 3, 2, 1]), 200, 120, dtype=torch.float32)
    _, s0, _ = rsvd(a, 5, normalizer="none", seed=0)
    scaled = a * 2.0**exponent
    u, s, vh = rsvd(scaled, 5, normalizer="none", seed=0)
    assert torch.allclose(s.double() * 2.0**-exponent, s0.double(), rtol=1e-5, atol=0)
    assert error(scaled, u, s, vh) <= 1e-4 * float(scaled.double().norm())


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_matrices(dtype):
    """Complex A, every normaliser and sketch, both orientations: near-optimal error, real S,
    and each column of U with its largest entry real and positive."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(80, 8, generator=g, dtype=dtype) @ torch.randn(8, 50, generator=g, dtype=dtype)
    a = a + 1e-3 * torch.randn(80, 50, generator=g, dtype=dtype)
    tol = 1e-5 if dtype == torch.complex64 else 1e-12
    for x in (a, a.mT):
        optimum = float(torch.linalg.svdvals(x)[6:].square().sum().sqrt())
        for normalizer in ("auto", "qr", "lu", "none"):
            for sketch in ("gaussian", "srht", "sparse_sign"):
                u, s, vh = rsvd(x, 6, normalizer=normalizer, sketch=sketch, seed=0)
                assert s.dtype == dtype.to_real() and u.dtype == vh.dtype == dtype
                residual = float((x - (u * s.to(dtype)) @ vh).norm())
                assert residual <= 1.01 * optimum + tol * float(x.norm()), (normalizer, sketch)
                top = u.gather(0, u.abs().argmax(0, keepdim=True))
                assert float(top.imag.abs().max()) <= tol and bool((top.real > 0).all())
    u, s, vh = rsvd(a, 4, tol=1e-2, seed=0)
    assert float((a - (u * s.to(dtype)) @ vh).norm()) <= 1e-2 * float(a.norm())


def test_warm_start_tracks_a_subspace():
    a = matrix_with_spectrum(SPECTRA["fast"](60), 80, 60)
    u0, _, _ = rsvd(a, 6, seed=0)
    drifted = a + 1e-3 * torch.randn(80, 60, dtype=torch.float64)
    u, s, vh = rsvd(drifted, 6, init=u0, n_iter=0, oversample=4, seed=1)
    assert error(drifted, u, s, vh) <= 1.05 * optimal(drifted, 6)


def test_pca_matches_centred_svd_and_keeps_sparse():
    dense = torch.randn(100, 30, dtype=torch.float64) @ torch.randn(30, 30, dtype=torch.float64)
    dense += 5.0
    _, s, _ = pca(dense, 5, seed=0)
    exact = torch.linalg.svdvals(dense - dense.mean(0))[:5]
    assert relative_error(s, exact) <= 1e-3
    sparse_in = (dense * (dense > 6)).to_sparse()
    centred = sparse_in.to_dense() - sparse_in.to_dense().mean(0)
    _, s_sparse, _ = pca(sparse_in, 5, seed=0, n_iter=4)
    assert relative_error(s_sparse, torch.linalg.svdvals(centred)[:5]) <= 1e-3


def test_nystrom_eigh():
    g = torch.randn(80, 80, dtype=torch.float64)
    q, _ = torch.linalg.qr(g)
    values = torch.exp(-torch.arange(80, dtype=torch.float64))
    a = (q * values) @ q.T
    lam, vec = nystrom_eigh(a, 6, seed=0)
    assert relative_error(lam, values[:6]) <= 1e-4
    assert bool((lam[:-1] >= lam[1:]).all())
    assert relative_error(a @ vec, vec * lam) <= 1e-3


@pytest.mark.parametrize("norm", ["fro", 2])
def test_error_estimate_brackets_truth(norm):
    a = matrix_with_spectrum(SPECTRA["slow"](60), 80, 60)
    u, s, vh = rsvd(a, 5, n_iter=0, oversample=0, seed=0)
    residual = a - (u * s) @ vh
    truth = float(torch.linalg.matrix_norm(residual, ord="fro" if norm == "fro" else 2))
    hits = 0
    for trial in range(20):
        est = svd_error(a, u, s, vh, norm=norm, seed=trial)
        hits += float(est.lower) <= truth <= float(est.upper) * (1 + 1e-9)
        assert 0.3 * truth <= float(est.estimate) <= 3.0 * truth
    assert hits >= 18


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.randn(10, 8), 0), {}, ValueError, "rank"),
        ((torch.randn(10, 8), 9), {}, ValueError, "rank must be in"),
        ((torch.randint(0, 3, (10, 8)), 2), {}, TypeError, "floating"),
        ((torch.full((10, 8), float("nan")), 2), {}, ValueError, "NaN"),
        ((torch.randn(10, 8), 2), {"init": torch.randn(9, 3)}, ValueError, "init"),
        ((torch.randn(10, 8), 2), {"normalizer": "svd"}, ValueError, "normalizer"),
        ((torch.randn(10, 8), 2), {"sketch": "fourier"}, ValueError, "sketch"),
        ((torch.randn(10, 8), 2), {"seed": -1}, ValueError, "seed"),
        ((torch.randn(10, 8), 2), {"tol": 2.0}, ValueError, "tol"),
        ((torch.randn(10, 8).to_sparse_bsr((2, 2)), 2), {}, ValueError, "layout"),
        (("not a matrix", 2), {}, TypeError, "LinearOperator"),
    ],
)  # fmt: skip
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        rsvd(*args, **kwargs)


@pytest.mark.cuda
def test_cpu_and_cuda_agree_for_a_seed():
    a = matrix_with_spectrum(SPECTRA["fast"](60), 90, 70, dtype=torch.float32)
    cpu = rsvd(a, 8, seed=123)
    gpu = rsvd(a.cuda(), 8, seed=123)
    for x, y in zip(cpu, gpu):
        assert relative_error(y.cpu(), x) <= 1e-4
