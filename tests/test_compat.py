"""lowrank.compat: torch.svd_lowrank / pca_lowrank and scikit-learn's randomized_svd, with
their signatures, shapes, dtypes and sign conventions, at least as accurate."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from lowrank.compat import pca_lowrank, randomized_svd, svd_lowrank

extmath = pytest.importorskip("sklearn.utils.extmath")


def decaying(m, n, decay=0.15, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.exp(-decay * torch.arange(min(m, n), dtype=torch.float64))
    return ((u * s) @ v.T).to(dtype)


def error(a, u, s, v):
    return float(torch.linalg.matrix_norm(a.double() - (u.double() * s.double()) @ v.double().mT))


@pytest.mark.parametrize("shape, q", [((60, 30), 6), ((30, 60), 10), ((20, 8), 10), ((4, 10), 6)])
def test_svd_lowrank_shapes_and_convention(shape, q):
    a = decaying(*shape)
    u, s, v = svd_lowrank(a, q=q)
    theirs = torch.svd_lowrank(a, q=q)
    assert [t.shape for t in (u, s, v)] == [t.shape for t in theirs]
    assert error(a, u, s, v) <= error(a, *theirs) * (1 + 1e-9) + 1e-12


def test_svd_lowrank_is_at_least_as_accurate_and_repeatable():
    a = decaying(400, 300, decay=0.03)
    worse = 0
    for seed in range(5):
        torch.manual_seed(seed)
        ours = error(a, *svd_lowrank(a, q=20, niter=1))
        torch.manual_seed(seed)
        worse += ours > error(a, *torch.svd_lowrank(a, q=20, niter=1))
    assert worse == 0  # oversampling: better at every seed
    torch.manual_seed(7)
    first = svd_lowrank(a, q=5)
    torch.manual_seed(7)
    assert all(torch.equal(x, y) for x, y in zip(first, svd_lowrank(a, q=5)))


def test_svd_lowrank_batched_sparse_and_mean():
    a = decaying(50, 20)
    batched = torch.stack([a, 2 * a])
    u, s, v = svd_lowrank(batched, q=4)
    assert u.shape == (2, 50, 4) and torch.allclose(s[1], 2 * s[0])
    torch.manual_seed(0)
    dense = svd_lowrank(a, q=4)[1]
    for sparse in (a.to_sparse(), a.to_sparse_csr()):
        torch.manual_seed(0)  # the same test matrix
        assert torch.allclose(svd_lowrank(sparse, q=4)[1], dense, rtol=1e-8)
    mean = a.mean(0, keepdim=True)
    u, s, v = svd_lowrank(a, q=20, M=mean)
    assert error(a - mean, u, s, v) <= 1e-10


def test_pca_lowrank_dense_and_sparse():
    a = decaying(80, 12, decay=0.6) + 3.0
    torch.manual_seed(0)
    ours, theirs = pca_lowrank(a, q=4), torch.pca_lowrank(a, q=4)
    exact = torch.linalg.svdvals(a - a.mean(0))[:4]
    assert (ours[1] - exact).abs().max() <= (theirs[1] - exact).abs().max() + 1e-12
    assert torch.allclose(ours[1], exact, rtol=1e-6)
    for sparse in (a.to_sparse(), a.to_sparse_csr()):  # torch rejects CSR here
        torch.manual_seed(0)
        assert torch.allclose(pca_lowrank(sparse, q=4)[1], ours[1], rtol=1e-8)
    assert pca_lowrank(a)[0].shape == (80, 6)
    assert pca_lowrank(a, q=0)[1].shape == (0,)
    with pytest.raises(ValueError, match=r"q\(=13\)"):
        pca_lowrank(a, q=13)
    with pytest.raises(ValueError, match=r"niter\(=-1\)"):
        pca_lowrank(a, q=2, niter=-1)


@pytest.mark.parametrize("shape", [(200, 60), (60, 200)])
@pytest.mark.parametrize("n_iter", ["auto", 0, 3])
def test_randomized_svd_matches_scikit_learn(shape, n_iter):
    a = decaying(*shape).numpy()
    ours = randomized_svd(a, 8, n_iter=n_iter, random_state=0)
    theirs = extmath.randomized_svd(a, 8, n_iter=n_iter, random_state=0)
    assert all(isinstance(x, np.ndarray) for x in ours)
    assert [x.shape for x in ours] == [x.shape for x in theirs]
    if n_iter != 0:  # converged on a fast-decaying spectrum: the same triplets and signs
        fast = decaying(*shape, decay=1.0).numpy()
        ours_fast = randomized_svd(fast, 8, n_iter=n_iter, random_state=0)
        theirs_fast = extmath.randomized_svd(fast, 8, n_iter=n_iter, random_state=0)
        for x, y in zip(ours_fast, theirs_fast):
            assert np.allclose(x, y, rtol=1e-6, atol=1e-6)
    exact = np.linalg.svd(a, compute_uv=False)
    optimum = np.sqrt((exact[8:] ** 2).sum())

    def err(usv):
        return np.linalg.norm(a - (usv[0] * usv[1]) @ usv[2])

    assert err(ours) <= max(err(theirs), optimum) * (1 + 1e-6)


def test_randomized_svd_dtypes_sparse_and_arguments():
    a = decaying(40, 30).numpy()
    assert randomized_svd(a.astype(np.float32), 3, random_state=0)[0].dtype == np.float32
    assert randomized_svd((a * 10).astype(np.int64), 3, random_state=0)[1].dtype == np.float64
    assert randomized_svd(a.tolist(), 3, random_state=0)[1].dtype == np.float64
    csr = sp.csr_matrix(a.astype(np.float32))
    u, s, _ = randomized_svd(csr, 3, random_state=0)
    assert u.dtype == np.float32 and np.allclose(
        s, randomized_svd(a, 3, random_state=0)[1], rtol=1e-4
    )
    assert randomized_svd(a, 50, random_state=0)[1].shape == (30,)  # as many as there are
    for state in (None, np.random.RandomState(0), np.random.default_rng(0), np.int64(3)):
        assert randomized_svd(a, 2, random_state=state)[1].shape == (2,)
    for normalizer in ("QR", "LU", "none", "auto"):
        s = randomized_svd(a, 3, power_iteration_normalizer=normalizer, random_state=0)[1]
        assert np.allclose(s, np.linalg.svd(a, compute_uv=False)[:3], rtol=1e-6)
    with pytest.raises(ValueError):
        randomized_svd(a, 0)
    with pytest.raises(ValueError):
        randomized_svd(a, 2, power_iteration_normalizer="qr")
    with pytest.raises(ValueError):
        randomized_svd(a, 2, flip_sign=1)
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        randomized_svd(bad, 2)
    with pytest.raises(ValueError, match="2D"):
        randomized_svd(a[0], 2)
    for malformed in (bad, a[0], a[:0]):  # the messages name the argument
        with pytest.raises(ValueError, match=r"\bM\b"):
            randomized_svd(malformed, 2)
    with pytest.raises(ValueError, match="niter"):
        svd_lowrank(torch.from_numpy(a), niter=2**40)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_input_as_torch(dtype):
    """Complex A, as torch.svd_lowrank / pca_lowrank take it: V with A ~ U diag(S) V^H, S
    real, at least as accurate as torch's; batched, with M, and q = 0."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 6, generator=g, dtype=dtype) @ torch.randn(6, 40, generator=g, dtype=dtype)
    a = a + 1e-3 * torch.randn(60, 40, generator=g, dtype=dtype)
    torch.manual_seed(0)
    ours, theirs = svd_lowrank(a, q=6), torch.svd_lowrank(a, q=6)
    assert [(t.shape, t.dtype) for t in ours] == [(t.shape, t.dtype) for t in theirs]
    u, s, v = ours
    assert s.dtype == dtype.to_real()
    tol = 1e-5 if dtype == torch.complex64 else 1e-12
    optimum = float(torch.linalg.svdvals(a)[6:].square().sum().sqrt())
    assert float((a - (u * s.to(dtype)) @ v.mH).norm()) <= 1.01 * optimum + tol * float(a.norm())
    mean = a.mean(0, keepdim=True)
    batch = svd_lowrank(torch.stack([a, 2 * a]), q=4, M=mean)
    assert batch[0].shape == (2, 60, 4) and batch[1].dtype == dtype.to_real()
    _, s_pca, _ = pca_lowrank(a, q=4)
    assert torch.allclose(s_pca, torch.linalg.svdvals(a - mean)[:4], rtol=tol * 10)
    empty = svd_lowrank(a, q=0)
    assert [t.shape for t in empty] == [(60, 0), (0,), (40, 0)] and empty[1].dtype == s.dtype
