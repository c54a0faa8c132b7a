"""lowrank.sklearn: scikit-learn's estimator checks, agreement with scikit-learn's PCA,
TruncatedSVD and IncrementalPCA, and the inputs scikit-learn does not take (tensors,
streamed memmaps)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

sklearn = pytest.importorskip("sklearn")
from sklearn import decomposition  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from lowrank.sklearn import PCA, TruncatedSVD  # noqa: E402


@parametrize_with_checks([TruncatedSVD(), PCA(), PCA(n_components=1, svd_solver="randomized")])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def data(m=300, n=40, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, n)) * np.logspace(0, -2, n) + rng.standard_normal(n)
    return x.astype(dtype)


def assert_same_fit(ours, theirs, x, atol=1e-9):
    assert ours.n_components_ == theirs.n_components_
    for name in ("components_", "explained_variance_", "explained_variance_ratio_",
                 "singular_values_", "mean_"):  # fmt: skip
        assert np.allclose(getattr(ours, name), getattr(theirs, name), atol=atol), name
    assert np.isclose(ours.noise_variance_, theirs.noise_variance_, atol=atol)
    assert np.allclose(ours.transform(x), theirs.transform(x), atol=atol * 100)


@pytest.mark.parametrize("solver", ["full", "covariance_eigh", "auto"])
@pytest.mark.parametrize("n_components", [5, None, 0.9])
@pytest.mark.parametrize("whiten", [False, True])
def test_pca_exact_solvers_equal_scikit_learn(solver, n_components, whiten):
    x = data()
    kw = {"svd_solver": solver, "whiten": whiten}
    ours, theirs = PCA(n_components, **kw).fit(x), decomposition.PCA(n_components, **kw).fit(x)
    assert_same_fit(ours, theirs, x)
    assert np.allclose(ours.fit_transform(x), theirs.fit_transform(x), atol=1e-7)
    assert np.allclose(ours.inverse_transform(ours.transform(x)),
                       theirs.inverse_transform(theirs.transform(x)), atol=1e-7)  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pca_randomized_agrees_with_scikit_learn(dtype):
    x = data(dtype=dtype)
    ours = PCA(5, svd_solver="randomized", random_state=0).fit(x)
    theirs = decomposition.PCA(5, svd_solver="randomized", random_state=0).fit(x)
    assert ours.components_.dtype == dtype and ours.transform(x).dtype == dtype
    tol = 1e-3 if dtype == np.float32 else 1e-5
    assert np.allclose(ours.explained_variance_ratio_, theirs.explained_variance_ratio_,
                       rtol=tol)  # fmt: skip
    assert np.allclose(np.abs(ours.components_ @ theirs.components_.T), np.eye(5), atol=tol * 10)


def test_truncated_svd_agrees_with_scikit_learn():
    x = data()
    ours = TruncatedSVD(5, random_state=0).fit(x)
    theirs = decomposition.TruncatedSVD(5, random_state=0).fit(x)
    for name in ("components_", "explained_variance_", "explained_variance_ratio_",
                 "singular_values_"):  # fmt: skip
        assert np.allclose(getattr(ours, name), getattr(theirs, name), atol=1e-6), name
    assert np.allclose(ours.fit_transform(x), theirs.fit_transform(x), atol=1e-5)


def test_sparse_input_is_never_densified(monkeypatch):
    x = sp.random(400, 50, density=0.05, random_state=0, format="csr")
    dense = x.toarray()
    reference = PCA(5, svd_solver="randomized", random_state=0, iterated_power=8).fit(dense)
    monkeypatch.setattr(torch.Tensor, "to_dense", lambda self: (_ for _ in ()).throw(
        AssertionError("densified")))  # fmt: skip
    fitted = PCA(5, random_state=0, iterated_power=8).fit(x)  # auto: randomized for sparse
    assert np.allclose(fitted.explained_variance_ratio_, reference.explained_variance_ratio_,
                       rtol=1e-6)  # fmt: skip
    assert np.allclose(fitted.transform(x), reference.transform(dense), atol=1e-6)
    svd = TruncatedSVD(5, random_state=0, n_iter=8).fit(x)
    assert svd.transform(x).shape == (400, 5)


def test_partial_fit_equals_incremental_pca():
    x = data()
    ours, theirs = PCA(5), decomposition.IncrementalPCA(5)
    for start in range(0, 300, 60):
        ours.partial_fit(x[start : start + 60])
        theirs.partial_fit(x[start : start + 60])
    for name in ("components_", "explained_variance_", "explained_variance_ratio_",
                 "singular_values_", "mean_", "var_"):  # fmt: skip
        assert np.allclose(getattr(ours, name), getattr(theirs, name), atol=1e-9), name
    assert ours.n_samples_seen_ == theirs.n_samples_seen_ == 300
    # continues a full fit as well
    PCA(5).fit(x[:100]).partial_fit(x[100:200])


def test_torch_tensors_in_and_out():
    x = data()
    tensor = torch.from_numpy(x)
    fitted = PCA(5, svd_solver="randomized", random_state=0).fit(tensor)
    out = fitted.transform(tensor)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    reference = PCA(5, svd_solver="randomized", random_state=0).fit(x)
    assert np.allclose(out.numpy(), reference.transform(x), atol=1e-9)
    assert isinstance(fitted.components_, np.ndarray)
    assert isinstance(TruncatedSVD(3).fit_transform(tensor.float()), torch.Tensor)
    back = fitted.inverse_transform(out)
    assert isinstance(back, torch.Tensor) and back.shape == tensor.shape


def test_streamed_memmap_equals_in_memory(tmp_path):
    x = data()
    mm = np.memmap(tmp_path / "x.bin", dtype=np.float64, mode="w+", shape=x.shape)
    mm[:] = x
    budget = 40 * 8 * 50  # panels of 50 rows
    for solver, k in (("randomized", 5), ("auto", 0.9), ("covariance_eigh", 5)):
        # the same power iterations both ways ("auto" is block Krylov in memory only)
        options = {"svd_solver": solver, "random_state": 0, "iterated_power": 4}
        streamed = PCA(k, max_memory=budget, **options).fit(mm)
        in_memory = PCA(k, **options).fit(x)
        assert streamed.n_components_ == in_memory.n_components_
        assert np.allclose(streamed.components_, in_memory.components_, atol=1e-9)
        assert np.allclose(streamed.explained_variance_ratio_,
                           in_memory.explained_variance_ratio_, rtol=1e-9)  # fmt: skip
        assert np.allclose(streamed.transform(mm), in_memory.transform(x), atol=1e-9)
    svd = TruncatedSVD(5, random_state=0, max_memory=budget).fit(mm)
    assert np.allclose(svd.components_, TruncatedSVD(5, random_state=0).fit(x).components_,
                       atol=1e-9)  # fmt: skip
    with pytest.raises(TypeError, match="full"):
        PCA(5, svd_solver="full", max_memory=budget).fit(mm)


def test_clone_and_params():
    est = PCA(3, svd_solver="randomized", device="cpu", max_memory=1 << 20)
    assert clone(est).get_params() == est.get_params()
    assert est.set_params(n_components=2) is est and est.n_components == 2
    with pytest.raises(ValueError, match="not supported"):
        PCA("mle").fit(data())
    with pytest.raises(ValueError, match="arpack"):
        TruncatedSVD(algorithm="arpack").fit(data())


def test_auto_iterations_match_the_exact_explained_variance():
    """iterated_power="auto" (two block Krylov iterations) on a slowly decaying spectrum:
    explained variances as the exact solver's, where two power iterations are not."""
    g = np.random.default_rng(0)
    latent = g.standard_normal((3000, 60)) * np.logspace(0, -1.5, 60)
    x = latent @ g.standard_normal((60, 200)) + 0.05 * g.standard_normal((3000, 200))
    exact = PCA(20, svd_solver="full").fit(x).explained_variance_
    auto = PCA(20, svd_solver="randomized", random_state=0).fit(x).explained_variance_
    two = PCA(20, svd_solver="randomized", random_state=0, iterated_power=2).fit(x)
    assert np.max(np.abs(auto - exact) / exact) < 1e-4
    assert np.max(np.abs(two.explained_variance_ - exact) / exact) > 1e-4  # the case is hard


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_covariance_solver_is_accurate_whatever_the_mean(offset):
    """float32 data whose mean is 0 or 1e4 times its spread: covariance_eigh's explained
    variances match the exact float64 ones (a raw X^T X would lose them to cancellation)."""
    g = np.random.default_rng(0)
    x = (g.standard_normal((4000, 30)) * np.logspace(0, -1, 30) + offset).astype(np.float32)
    exact = np.linalg.svd(x.astype(np.float64) - x.astype(np.float64).mean(0),
                          compute_uv=False)[:10] ** 2 / 3999  # fmt: skip
    fitted = PCA(10, svd_solver="covariance_eigh").fit(x)
    assert np.max(np.abs(fitted.explained_variance_ - exact) / exact) < 1e-4


def test_results_keep_the_input_dtype():
    """fit_transform of a float32 tensor is float32, as transform and NumPy input are;
    noise_variance_ is a NumPy scalar of the data's dtype."""
    x = data(dtype=np.float32)
    estimators = [PCA(5, svd_solver=solver, random_state=0)
                  for solver in ("randomized", "full", "covariance_eigh")]  # fmt: skip
    for estimator in [*estimators, TruncatedSVD(5, random_state=0)]:
        out = estimator.fit_transform(torch.from_numpy(x))
        assert out.dtype == estimator.transform(torch.from_numpy(x)).dtype == torch.float32
    for dtype in (np.float32, np.float64):
        for solver in ("full", "covariance_eigh", "randomized"):
            fitted = PCA(5, svd_solver=solver, random_state=0).fit(data(dtype=dtype))
            assert type(fitted.noise_variance_) is dtype, solver
        assert type(PCA(5).partial_fit(data(dtype=dtype)).noise_variance_) is dtype


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("solver", ["full", "covariance_eigh", "randomized"])
def test_float32_at_extreme_magnitudes(solver, scale):
    """Finite float32 data times 1e-30 or 1e30: the same explained variance ratios,
    components and (scaled) scores as unscaled; only the variances themselves (1e-60, 1e60)
    are beyond float32, and underflow or overflow as scikit-learn's do."""
    x = data(dtype=np.float32)
    scaled = x * np.float32(scale)
    reference = PCA(5, svd_solver=solver, random_state=0).fit(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
        fitted = PCA(5, svd_solver=solver, random_state=0).fit(scaled)
        svd = TruncatedSVD(5, random_state=0).fit(scaled)
    assert np.allclose(fitted.explained_variance_ratio_, reference.explained_variance_ratio_,
                       rtol=1e-4)  # fmt: skip
    assert np.allclose(np.abs(fitted.components_ @ reference.components_.T), np.eye(5), atol=1e-3)
    assert np.allclose(fitted.transform(scaled) / scale, reference.transform(x), atol=1e-3)
    ratio = TruncatedSVD(5, random_state=0).fit(x).explained_variance_ratio_
    assert np.allclose(svd.explained_variance_ratio_, ratio, rtol=1e-4)
