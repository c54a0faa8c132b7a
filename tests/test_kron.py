"""kron_matmul and KronLinear: values, gradients, registration and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, IMPLS, assert_close_lowp, relative_error
from hypothesis import given
from hypothesis import strategies as st

import lowrank
from lowrank import _native, dispatch
from lowrank.nn import KronLinear
from lowrank.nn.kron import near_square_factors
from lowrank.ops import (
    kron_matmul,
    kron_matmul_reference,
    kron_sum_matmul,
    kron_sum_matmul_reference,
)
from lowrank.ops.kron import kron_matmul_backward_reference

factor = st.integers(1, 9)
batch_shape = st.lists(st.integers(0, 4), min_size=0, max_size=3)


def dense(x, a, b):
    """The definition, in float64: x @ kron(a, b)^T."""
    return x.double() @ torch.kron(a.double(), b.double()).T


def make(batch, p, q, r, s, dtype, device):
    x = torch.randn(*batch, q * s, dtype=dtype, device=device)
    a = torch.randn(p, q, dtype=dtype, device=device)
    b = torch.randn(r, s, dtype=dtype, device=device)
    return x, a, b


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@given(batch=batch_shape, p=factor, q=factor, r=factor, s=factor,
       dtype=st.sampled_from([torch.float32, torch.float64]))  # fmt: skip
def test_forward_matches_definition(impl, device, batch, p, q, r, s, dtype):
    x, a, b = make(batch, p, q, r, s, dtype, device)
    with dispatch.force(impl):
        y = kron_matmul(x, a, b)
    assert y.shape == (*batch, p * r) and y.dtype == dtype and y.device == x.device
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert relative_error(y, dense(x, a, b)) <= tol


@pytest.mark.parametrize("shape", [(64, 32, 32, 32, 32), (300, 7, 40, 9, 3), (33, 2, 64, 64, 2)])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_larger_shapes(impl, device, shape):
    tokens, p, q, r, s = shape
    x, a, b = make((tokens,), p, q, r, s, torch.float32, device)
    with dispatch.force(impl):
        assert relative_error(kron_matmul(x, a, b), dense(x, a, b)) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_against_own_rounding(device, dtype, impl):
    x, a, b = make((50,), 6, 8, 5, 7, dtype, device)
    ref64 = dense(x, a, b)
    ref_lowp = x @ torch.kron(a, b).T
    with dispatch.force(impl):
        assert_close_lowp(kron_matmul(x, a, b), ref64, ref_lowp)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@given(batch=batch_shape, p=factor, q=factor, r=factor, s=factor,
       need=st.sampled_from([(True, True, True), (True, False, False), (False, True, True),
                             (False, True, False)]))  # fmt: skip
def test_backward_matches_autograd_of_definition(impl, device, batch, p, q, r, s, need):
    x, a, b = make(batch, p, q, r, s, torch.float64, device)
    for t, flag in zip((x, a, b), need):
        t.requires_grad_(flag)
    grad = torch.randn(*batch, p * r, dtype=torch.float64, device=device)
    with dispatch.force(impl):
        kron_matmul(x, a, b).backward(grad)
    x2, a2, b2 = (t.detach().clone().requires_grad_(f) for t, f in zip((x, a, b), need))
    dense(x2, a2, b2).backward(grad)
    for t, t2, flag in zip((x, a, b), (x2, a2, b2), need):
        if flag:
            assert relative_error(t.grad, t2.grad) <= 1e-12
        else:
            assert t.grad is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(impl, device):
    x, a, b = make((2, 3), 3, 2, 2, 4, torch.float64, device)
    inputs = tuple(t.requires_grad_() for t in (x, a, b))
    with dispatch.force(impl):
        assert torch.autograd.gradcheck(kron_matmul, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [(5,), (2, 3), (0,)])
def test_opcheck(device, batch):
    x, a, b = make(batch, 3, 4, 2, 5, torch.float32, device)
    torch.library.opcheck(torch.ops.lowrank.kron_matmul.default, (x, a, b))
    x.requires_grad_()
    a.requires_grad_()
    torch.library.opcheck(torch.ops.lowrank.kron_matmul.default, (x, a, b))
    grad = torch.randn(*batch, 6, device=device)
    torch.library.opcheck(
        torch.ops.lowrank.kron_matmul_backward.default,
        (grad, x.detach(), a.detach(), b, True, True),
    )


def test_reference_is_the_definition():
    x, a, b = make((4, 3), 2, 3, 4, 5, torch.float64, "cpu")
    assert relative_error(kron_matmul_reference(x, a, b), dense(x, a, b)) <= 1e-13


def test_non_contiguous_input():
    x, a, b = make((6, 2), 3, 4, 5, 6, torch.float64, "cpu")
    xt = x.transpose(0, 1)  # (2, 6, 24), not contiguous
    assert relative_error(kron_matmul(xt, a.T.contiguous().T, b), dense(xt, a, b)) <= 1e-13


def test_fallback_warns_once_and_is_correct(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(dispatch, "_warned", set())
    x, a, b = make((5,), 2, 3, 4, 5, torch.float64, "cpu")
    with pytest.warns(RuntimeWarning, match="CPU module is not built"):
        y = kron_matmul(x, a, b)
    assert relative_error(y, dense(x, a, b)) <= 1e-13
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kron_matmul(x, a, b)


def test_no_grad_inputs_take_no_autograd_path():
    x, a, b = make((5,), 2, 3, 4, 5, torch.float32, "cpu")
    assert kron_matmul(x, a, b).grad_fn is None
    a.requires_grad_()
    assert kron_matmul(x, a, b).grad_fn is not None
    with torch.no_grad():
        assert kron_matmul(x, a, b).grad_fn is None


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda: (torch.randn(5, 11), torch.randn(2, 3), torch.randn(2, 4)), ValueError,
         r"x.shape\[-1\] must be 12"),
        (lambda: (torch.randn(5, 12), torch.randn(2, 3, 1), torch.randn(2, 4)), ValueError,
         "a must be 2-D"),
        (lambda: (torch.randn(5, 12), torch.randn(2, 3), torch.randn(8)), ValueError,
         "b must be 2-D"),
        (lambda: (torch.randn(5, 12), torch.randn(2, 3).double(), torch.randn(2, 4)), TypeError,
         "dtype"),
        (lambda: (torch.randint(0, 5, (5, 12)), torch.randn(2, 3), torch.randn(2, 4)), TypeError,
         "x must be float"),
        (lambda: (torch.randn(5, 12), torch.randn(2, 3), torch.ones(2, 4, dtype=torch.int32)),
         TypeError, "b must be float"),
        (lambda: (torch.randn(()), torch.randn(1, 1), torch.randn(1, 1)), ValueError,
         "at least 1 dims"),
        (lambda: (torch.randn(5, 12), torch.randn(2, 3, device="meta"), torch.randn(2, 4)),
         ValueError, "one device"),
    ],
)  # fmt: skip
def test_bad_input(make_args, error, match):
    with pytest.raises(error, match=match):
        kron_matmul(*make_args())


@pytest.mark.cuda
def test_device_mismatch_cuda():
    with pytest.raises(ValueError, match="one device"):
        kron_matmul(torch.randn(3, 4, device="cuda"), torch.randn(2, 2), torch.randn(2, 2))


# ---- KronLinear ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, expected", [(1024, (32, 32)), (12, (3, 4)), (13, (1, 13)), (1, (1, 1))]
)
def test_near_square_factors(n, expected):
    assert near_square_factors(n) == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_f, out_f, factors", [(64, 48, None), (13, 7, None),
                                                  (12, 10, ((2, 3), (5, 4)))])  # fmt: skip
def test_kron_linear_matches_dense(device, in_f, out_f, factors):
    layer = KronLinear(in_f, out_f, factors=factors, device=device, dtype=torch.float64)
    x = torch.randn(3, 5, in_f, dtype=torch.float64, device=device)
    ref = F.linear(x, layer.to_dense(), layer.bias)
    assert relative_error(layer(x), ref) <= 1e-12
    assert layer.to_dense().shape == (out_f, in_f)


def test_kron_linear_init_matches_linear_variance():
    torch.manual_seed(0)
    layer = KronLinear(1024, 1024, bias=False)
    var = layer.to_dense().var().item()
    assert abs(var * 3 * 1024 - 1) < 0.15


def test_kron_linear_repr_and_bad_factors():
    layer = KronLinear(12, 10, factors=((2, 3), (5, 4)), bias=False)
    assert "factors=((2, 3), (5, 4))" in repr(layer) and "bias=False" in repr(layer)
    with pytest.raises(ValueError, match="expected"):
        KronLinear(12, 10, factors=((2, 3), (5, 5)))
    with pytest.raises(ValueError, match="positive integer"):
        KronLinear(0, 10)


def test_kron_linear_trains():
    torch.manual_seed(0)
    layer = KronLinear(16, 16, dtype=torch.float64)
    target = KronLinear(16, 16, dtype=torch.float64)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 16, dtype=torch.float64)
    with torch.no_grad():
        y = target(x)
    first = None
    for _ in range(300):
        loss = F.mse_loss(layer(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_compile_fullgraph():
    layer = KronLinear(24, 20)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 24, requires_grad=True)
    y = compiled(x)
    assert relative_error(y, layer(x)) <= 1e-6
    y.sum().backward()
    assert x.grad is not None and layer.a.grad is not None


SUM_IMPLS = ["terms", "batched", "rebuild"]


@pytest.mark.parametrize("impl", SUM_IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, terms, p, q, r, s", [
    ((3, 5), 4, 3, 6, 2, 4), ((0,), 2, 2, 2, 2, 2), ((7,), 9, 1, 5, 8, 1),
])  # fmt: skip
def test_kron_sum_matches_definition(impl, device, batch, terms, p, q, r, s):
    x = torch.randn(*batch, q * s, dtype=torch.float64, device=device, requires_grad=True)
    a = torch.randn(terms, p, q, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(terms, r, s, dtype=torch.float64, device=device, requires_grad=True)
    ref = kron_sum_matmul_reference(x, a, b)
    with dispatch.force("auto"):
        y = _kron_sum_dispatch(impl, x, a, b)
    assert y.shape == (*batch, p * r)
    assert relative_error(y, ref) <= 1e-12 or ref.numel() == 0
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, (x, a, b), g)
    expected = torch.autograd.grad(ref, (x, a, b), g)
    for got, want in zip(grads, expected):
        assert relative_error(got, want) <= 1e-12 or want.abs().max() == 0


def _kron_sum_dispatch(impl, x, a, b):
    from lowrank.ops import kron as kron_ops

    key = (x.dtype, dispatch.bucket(x.shape[:-1].numel()), *a.shape, *b.shape[1:])
    return kron_ops._sum_dispatch(key, x, x, a, b, names=(impl,))


def test_kron_sum_public_call_and_errors():
    x, a, b = torch.randn(4, 12), torch.randn(3, 2, 3), torch.randn(3, 5, 4)
    assert relative_error(kron_sum_matmul(x, a, b), kron_sum_matmul_reference(x, a, b)) <= 1e-5
    assert relative_error(kron_sum_matmul(x, a[:1], b[:1]), kron_matmul(x, a[0], b[0])) <= 1e-6
    with pytest.raises(ValueError, match="same K"):
        kron_sum_matmul(x, a, b[:2])
    with pytest.raises(ValueError, match="same K"):
        kron_sum_matmul(x, a[0], b[0])
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 12\)"):
        kron_sum_matmul(torch.randn(4, 11), a, b)
    with pytest.raises(TypeError):
        kron_sum_matmul(x.double(), a, b)
    with pytest.raises(TypeError):
        kron_sum_matmul(x, a.tolist(), b)


def test_kron_linear_terms_matches_dense():
    layer = KronLinear(24, 20, terms=5, dtype=torch.float64)
    x = torch.randn(6, 24, dtype=torch.float64)
    dense_weight = sum(torch.kron(layer.a[k], layer.b[k]) for k in range(5))
    assert relative_error(layer.to_dense(), dense_weight) <= 1e-14
    assert relative_error(layer(x), F.linear(x, dense_weight, layer.bias)) <= 1e-12


def test_info():
    report = lowrank.info()
    assert report["version"] == lowrank.__version__
    assert report["cpu_module"] is True
    assert isinstance(report["gpu_usable"], bool)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, p, q, r, s", [(64, 3, 17, 5, 20), (300, 64, 64, 64, 64),
                                                (1, 16, 16, 16, 16), (0, 2, 2, 2, 2)])  # fmt: skip
def test_tensor_core_kernels_cuda(dtype, tokens, p, q, r, s):
    """The tensor-core path (forced) against the definition, with its own rounding as the
    tolerance (tests/cuda_emulation checks the same kernels on the CPU)."""
    from lowrank.ops import kron as kron_ops

    x, a, b = make((tokens,), p, q, r, s, dtype, "cuda")
    base = torch.randn(tokens, p * r, dtype=dtype, device="cuda")
    key = (dtype, dispatch.bucket(tokens), p, q, r, s)
    y = kron_ops._add_dispatch(key, x, x, a, b, base, 0.5, names=("tensor-core",))
    ref64 = base.double() + 0.5 * dense(x, a, b)
    ref_lowp = base.float() + 0.5 * kron_matmul_reference(x.float(), a.float(), b.float())
    assert_close_lowp(y, ref64, ref_lowp.to(dtype), c=4.0)
    g = torch.randn(tokens, p * r, dtype=dtype, device="cuda")
    bkey = (*key, True, True)
    dx, da, db = kron_ops._backward_dispatch(bkey, x, g, x, a, b, True, True,
                                             names=("tensor-core",))  # fmt: skip
    refs = kron_matmul_backward_reference(g.double(), x.double(), a.double(), b.double(), True,
                                          True)  # fmt: skip
    for got, want in zip((dx, da, db), refs):
        assert got.shape == want.shape
        if want.numel():
            assert relative_error(got, want) <= 3e-2
