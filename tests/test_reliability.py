"""One test per input that used to crash, mislead or fail unclearly (each reproduced before
its fix): native pointers never see unchecked arguments, no result is silently wrong, and
valid but degenerate input works."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import relative_error
from torch.func import jvp

from lowrank.linalg import StreamingSVD, nystrom_eigh, pca, rsvd, svd_error
from lowrank.nn import MonarchLinear, SLTrainLinear
from lowrank.nn.kron_adapter import lokr_factorization
from lowrank.ops import (
    kron_matmul,
    kron_matmul_add_,
    kron_matmul_reference,
    monarch_matmul,
    monarch_matmul_reference,
    sltrain_matmul,
    sltrain_matmul_reference,
)
from lowrank.ops.sketch import sparse_sign_rows, srht_rows
from lowrank.ops.sltrain import sampled_dot, sltrain_rebuild, sparse_matmul

# ---- 1-3: native pointers -------------------------------------------------------------------


def support(out=6, inp=8, nnz=10):
    return torch.sort(torch.randperm(out * inp)[:nnz]).values


@pytest.mark.parametrize("indices, error, match", [
    (support() + 1000, ValueError, "lie in"),
    (support() - 1000, ValueError, "lie in"),
    (support().flip(0), ValueError, "sorted and unique"),
    (support().float(), TypeError, "int32 or int64"),
])  # fmt: skip
@pytest.mark.parametrize("entry", ["python", "torch.ops"])
def test_sparse_primitives_check_their_indices(indices, error, match, entry):
    x, dy, values = torch.randn(4, 8), torch.randn(4, 6), torch.randn(10)
    sparse = sparse_matmul if entry == "python" else torch.ops.lowrank.sparse_matmul
    sampled = sampled_dot if entry == "python" else torch.ops.lowrank.sampled_dot
    with pytest.raises(error, match=match):
        sparse(x, values, indices, 6, 8, False)
    with pytest.raises(error, match=match):
        sampled(dy, x, indices)


def test_sparse_primitives_check_widths_and_zero_sizes():
    x, values, idx = torch.randn(4, 8), torch.randn(10), support()
    with pytest.raises(ValueError, match=r"x.shape\[1\] must be 8"):
        sparse_matmul(torch.randn(4, 7), values, idx, 6, 8)
    with pytest.raises(ValueError, match="cols must be a positive integer"):
        sparse_matmul(x, values, idx, 6, 0)
    with pytest.raises(ValueError, match="at least one column"):
        sampled_dot(torch.randn(4, 6), torch.randn(4, 0), idx)
    with pytest.raises(ValueError, match="tokens of dy"):
        sampled_dot(torch.randn(3, 6), x, idx)


@pytest.mark.parametrize("cols", [torch.tensor([0, 8]), torch.tensor([-1, 2]),
                                  torch.tensor([0, 10**6])])  # fmt: skip
def test_srht_columns_are_range_checked(cols):
    with pytest.raises(ValueError, match=r"lie in \[0, 8\)"):
        srht_rows(torch.randn(3, 5), torch.ones(5), cols, 8, 1.0)


def test_srht_size_must_be_the_padded_width():
    with pytest.raises(ValueError, match="smallest power of two"):
        srht_rows(torch.randn(3, 5), torch.ones(5), torch.tensor([0, 1]), 2**40, 1.0)


def test_sparse_sign_columns_are_range_checked():
    a, signs = torch.randn(3, 5), torch.ones(5, 2)
    for bad in (4, -1, 10**6):
        cols = torch.zeros(5, 2, dtype=torch.int32)
        cols[2, 1] = bad
        with pytest.raises(ValueError, match=r"cols must lie in \[0, 4\)"):
            sparse_sign_rows(a, cols, signs, 4)


def test_rebuild_rejects_mixed_dtypes():
    with pytest.raises(TypeError, match="dtype"):
        sltrain_rebuild(torch.randn(6, 2), torch.randn(2, 8, dtype=torch.float64),
                        torch.randn(10), support(), 1.0)  # fmt: skip


def test_none_for_a_tensor_is_a_type_error():
    a = torch.randn(2, 2)
    with pytest.raises(TypeError, match=r"a must be a torch\.Tensor"):
        torch.ops.lowrank.kron_matmul(torch.randn(3, 4), None, a)
    with pytest.raises(TypeError, match="argument 'a'"):
        kron_matmul(torch.randn(3, 4), 3, a)


# ---- 4: forward-mode AD ----------------------------------------------------------------------


def test_forward_mode_tangents_are_right():
    d = torch.float64
    x, a, b = torch.randn(5, 12, dtype=d), torch.randn(3, 3, dtype=d), torch.randn(2, 4, dtype=d)
    tangents = tuple(torch.randn_like(t) for t in (x, a, b))
    _, got = jvp(kron_matmul, (x, a, b), tangents)
    _, want = jvp(kron_matmul_reference, (x, a, b), tangents)
    assert relative_error(got, want) <= 1e-12
    w1, w2, xm = torch.randn(4, 3, 3, dtype=d), torch.randn(2, 5, 6, dtype=d), torch.randn(
        7, 12, dtype=d)  # fmt: skip
    tangents = tuple(torch.randn_like(t) for t in (xm, w1, w2))
    _, got = jvp(monarch_matmul, (xm, w1, w2), tangents)
    _, want = jvp(monarch_matmul_reference, (xm, w1, w2), tangents)
    assert relative_error(got, want) <= 1e-12
    idx = support()
    args = (torch.randn(4, 8, dtype=d), torch.randn(6, 2, dtype=d), torch.randn(2, 8, dtype=d),
            torch.randn(10, dtype=d), torch.randn(6, dtype=d))  # fmt: skip
    tangents = tuple(torch.randn_like(t) for t in args)
    _, got = jvp(lambda x, b, a, v, c: sltrain_matmul(x, b, a, v, idx, 0.5, c), args, tangents)
    _, want = jvp(lambda x, b, a, v, c: sltrain_matmul_reference(x, b, a, v, idx, 0.5, c), args,
                  tangents)  # fmt: skip
    assert relative_error(got, want) <= 1e-12
    with fwAD.dual_level():  # the torch.autograd.forward_ad API too (its tangent was None)
        y = kron_matmul(fwAD.make_dual(x, tangents[0][:, :0].new_ones(x.shape)), a, b)
        assert fwAD.unpack_dual(y).tangent is not None


def test_forward_mode_through_an_in_place_op_raises():
    base, x, a, b = torch.randn(2, 6), torch.randn(2, 12), torch.randn(3, 3), torch.randn(2, 4)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
        kron_matmul_add_(base, fwAD.make_dual(x, torch.ones_like(x)), a, b)


# ---- 5: out-of-core on rank-deficient input -----------------------------------------------------


@pytest.mark.parametrize("kind", ["rank3", "integer rank2", "zeros", "ones"])
@pytest.mark.parametrize("n_iter", [0, 2])
def test_out_of_core_rank_deficient_agrees_with_in_memory(kind, n_iter):
    g = torch.Generator().manual_seed(0)
    a = {
        "rank3": torch.randn(200, 3, generator=g, dtype=torch.float64)
        @ torch.randn(3, 150, generator=g, dtype=torch.float64),
        "integer rank2": (torch.randint(-30, 30, (200, 2), generator=g)
                          @ torch.randint(-30, 30, (2, 150), generator=g)).double(),
        "zeros": torch.zeros(200, 150, dtype=torch.float64),
        "ones": torch.ones(200, 150, dtype=torch.float64),
    }[kind]  # fmt: skip
    u, s, vh = rsvd(a.numpy(), 10, n_iter=n_iter, seed=0, progress=False)
    _, s2, _ = rsvd(a, 10, n_iter=n_iter, seed=0)
    assert bool(torch.isfinite(u).all() and torch.isfinite(vh).all())
    assert float((s - s2).abs().max()) <= 1e-9 * max(1.0, float(s2[0]))
    assert relative_error((u * s) @ vh, a) <= 1e-10 or float(a.norm()) == 0.0


# ---- 6-7: overlapping output, Monarch widths ----------------------------------------------------


def test_partially_overlapping_output_raises():
    buf = torch.randn(5, 12)
    with pytest.raises(ValueError, match="base overlaps x"):
        kron_matmul_add_(buf[1:], buf[:-1], torch.randn(3, 3), torch.randn(4, 4))


@pytest.mark.parametrize("width", [3, 11, 12])
def test_monarch_linear_rejects_other_widths(width):
    layer = MonarchLinear(10, 8, nblocks=4)
    with pytest.raises(ValueError, match=r"in_features\) = \(\.\.\., 10\)"):
        layer(torch.randn(2, width))
    assert layer(torch.randn(2, 10)).shape == (2, 8)


# ---- 8-11: numerical corners ----------------------------------------------------------------


def test_float32_fast_decay_keeps_its_accuracy():
    g = torch.Generator().manual_seed(0)
    s = torch.exp(-((torch.arange(100, dtype=torch.float64) / 5) ** 2))
    u, _ = torch.linalg.qr(torch.randn(100, 100, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(500, 100, generator=g, dtype=torch.float64))
    a = ((u * s) @ v.T).float()
    uu, ss, vvh = rsvd(a, 10, oversample=10, n_iter=7, seed=0)  # default normalizer
    assert float((ss.double() - s[:10]).abs().max()) <= 1e-5  # was 2.6e-2
    best = (u[:, :10] * s[:10]) @ v[:, :10].T
    assert float(((uu.double() * ss.double()) @ vvh.double() - best).abs().max()) <= 1e-5


def test_error_bounds_and_projection_errors_are_finite():
    a = torch.randn(30, 20)
    u, s, vh = rsvd(a, 3, seed=0)
    estimate = svd_error(a, u, s, vh, probes=1, seed=0)
    assert all(bool(torch.isfinite(t).all()) for t in estimate)
    assert float(estimate.lower) <= float(estimate.estimate) <= float(estimate.upper)
    assert SLTrainLinear.from_dense(torch.zeros(20, 30), 4, seed=0).projection_error == 0.0


def test_zero_and_constant_input_with_lu():
    u, s, _ = rsvd(torch.zeros(300, 200), 5, normalizer="lu", seed=0)
    assert float(s.abs().max()) == 0.0 and bool(torch.isfinite(u).all())
    batch = torch.stack([torch.zeros(40, 30), torch.randn(40, 30)])
    _, s, _ = rsvd(batch, 4, normalizer="lu", seed=0)
    assert float(s[0].abs().max()) == 0.0 and float(s[1, 0]) > 0
    _, s, _ = pca(torch.full((50, 20), 7.0), 3, normalizer="lu", seed=0)
    assert float(s.abs().max()) <= 1e-4


def test_nystrom_on_zero_and_semidefinite_matrices():
    values, vectors = nystrom_eigh(torch.zeros(100, 100), 5, seed=0)
    assert float(values.abs().max()) == 0.0 and bool(torch.isfinite(vectors).all())
    g = torch.randn(100, 3)
    values, _ = nystrom_eigh(g @ g.T, 5, seed=0)
    exact = torch.linalg.eigvalsh((g @ g.T).double()).flip(0)[:5]
    assert float((values.double() - exact).abs().max()) <= 1e-3 * float(exact[0])


# ---- 12: StreamingSVD -------------------------------------------------------------------------


def test_streaming_rejects_nan_and_keeps_its_sketches():
    sketch = StreamingSVD((10, 8), 2, seed=0)
    sketch.update(torch.randn(5, 8), rows=slice(0, 5))
    y = sketch.y.clone()
    bad = torch.randn(5, 8)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="block contains NaN"):
        sketch.update(bad, rows=slice(5, 10))
    assert torch.equal(sketch.y, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_streaming_follows_its_input(dtype):
    a = torch.randn(30, 20).to(dtype)
    sketch = StreamingSVD(a.shape, 3, seed=0)
    sketch.update(a, rows=slice(0, 30))
    result = sketch.result()
    assert result.U.dtype == result.S.dtype == result.Vh.dtype == dtype
    assert sketch.y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_streaming_defaults_are_accurate_on_slow_spectra():
    g = torch.Generator().manual_seed(0)
    s = 1.0 / (1.0 + torch.arange(200, dtype=torch.float64)) ** 0.5
    u, _ = torch.linalg.qr(torch.randn(400, 200, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(300, 200, generator=g, dtype=torch.float64))
    a = (u * s) @ v.T
    sketch = StreamingSVD(a.shape, 5, seed=1)
    assert (sketch.k, sketch.l) == (21, 43)  # 4r + 1 and 2k + 1
    sketch.update(a, rows=slice(0, 400))
    result = sketch.result()
    truth = float((a - (result.U * result.S) @ result.Vh).norm())
    assert 0.5 * truth <= result.error <= 2.0 * truth  # the returned rank's error
    assert result.sketch_error > 0  # and that of the whole rank-k sketch


# ---- 13: fixed accuracy without a known norm ----------------------------------------------------


def test_fixed_accuracy_for_pca_and_operators():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g) @ torch.randn(8, 100, generator=g) + 5.0
    a = a + 0.01 * torch.randn(300, 100, generator=g)
    _, s, _ = pca(a, 5, tol=0.1, seed=0)
    assert s.shape[0] == 8  # the 8 centred directions, not the noise

    class Operator:
        def __init__(self, m):
            self.m, self.shape, self.dtype, self.device = m, tuple(m.shape), m.dtype, m.device

        def matmat(self, x):
            return self.m @ x

        def rmatmat(self, y):
            return self.m.T @ y

    centred = a - a.mean(0)
    _, s, _ = rsvd(Operator(centred), 3, tol=0.1, seed=0)  # norms estimated by probes
    assert s.shape[0] == 8

    class WithNorm(Operator):
        def frobenius_norm(self):
            return float(self.m.norm())

    _, s, _ = rsvd(WithNorm(centred), 3, tol=0.1, seed=0)
    assert s.shape[0] == 8


# ---- 14: unclear errors -----------------------------------------------------------------------


def test_sltrain_zero_width_and_scalar_input():
    b, a = torch.randn(4, 2), torch.randn(2, 0)
    y = sltrain_matmul(torch.randn(3, 0), b, a, torch.randn(0), torch.zeros(0, dtype=torch.int32),
                       1.0)  # fmt: skip
    assert torch.equal(y, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="x must have at least 1 dims"):
        sltrain_matmul(torch.tensor(1.0), b, torch.randn(2, 3), torch.randn(0),
                       torch.zeros(0, dtype=torch.int32), 1.0)  # fmt: skip


def test_svd_error_checks_factor_shapes():
    a = torch.randn(10, 7)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    with pytest.raises(ValueError, match="do not factor"):
        svd_error(a, u[:, :3], s[:4], vh[:3])


def test_operator_returning_the_wrong_columns_is_caught():
    class Wrong:
        shape, dtype, device = (20, 10), torch.float32, torch.device("cpu")

        def matmat(self, x):
            return torch.randn(20, x.shape[1] + 1)

        def rmatmat(self, y):
            return torch.randn(10, y.shape[1])

    with pytest.raises(ValueError, match="matmat must return a \\(20, "):
        rsvd(Wrong(), 2, seed=0)


def test_numpy_integers_are_integers():
    _, s, _ = rsvd(torch.randn(20, 10), np.int64(3), oversample=np.int32(2), seed=np.int64(4))
    assert s.shape == (3,)


def test_float_indices_are_refused_when_loading():
    layer = SLTrainLinear(8, 6, rank=2, sparsity=0.2, seed=0)
    state = layer.state_dict()
    state["indices"] = state["indices"].float()
    with pytest.raises(TypeError, match="int32 or int64"):
        SLTrainLinear(8, 6, rank=2, sparsity=0.2, seed=1).load_state_dict(state)


# ---- 15: bounded factorisation ----------------------------------------------------------------


def test_lokr_factorization_of_a_large_prime_is_quick():
    start = time.perf_counter()
    assert lokr_factorization(2**31 - 1) == (1, 2**31 - 1)
    assert time.perf_counter() - start < 10  # was minutes: a hang guard, not a benchmark
    with pytest.raises(ValueError, match="dimension must be at most"):
        lokr_factorization(2**41)
