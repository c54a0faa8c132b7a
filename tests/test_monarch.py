"""monarch_matmul, MonarchLinear and monarch_project."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, IMPLS, assert_close_lowp, relative_error
from hypothesis import given
from hypothesis import strategies as st

from lowrank import dispatch
from lowrank.linalg import monarch_project
from lowrank.nn import MonarchLinear
from lowrank.ops import monarch_matmul, monarch_matmul_reference
from lowrank.ops.monarch import monarch_matmul_backward_reference


def dense_spec(x, w1, w2):
    """The definition with explicit block-diagonal matrices and permutations, float64."""
    k, _, p = w1.shape
    l, s, r = w2.shape
    b = x.numel() // (k * p)
    x = x.double().reshape(b, k * p)
    h = x @ torch.block_diag(*w1.double()).T  # (b, k*q)
    h = h.reshape(b, r, l).transpose(1, 2).reshape(b, l * r)
    y = h @ torch.block_diag(*w2.double()).T  # (b, l*s)
    return y.reshape(b, l, s).transpose(1, 2).reshape(b, s * l)


def assert_rounding_close(out, x, w1, w2, tol):
    """|out - exact| <= tol * (|x| through |w1|, |w2|): float rounding with cancellation."""
    exact = dense_spec(x, w1, w2)
    scale = dense_spec(x.abs(), w1.abs(), w2.abs())
    assert bool(((out.double().reshape(exact.shape) - exact).abs() <= tol * scale + 1e-300).all())


@st.composite
def shapes(draw):
    k, q, p = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    divisors = [d for d in range(1, k * q + 1) if (k * q) % d == 0]
    l = draw(st.sampled_from(divisors))
    return k, q, p, l, draw(st.integers(1, 6)), k * q // l


def make(batch, shape, dtype, device):
    k, q, p, l, s, r = shape
    x = torch.randn(*batch, k * p, dtype=dtype, device=device)
    return (
        x,
        torch.randn(k, q, p, dtype=dtype, device=device),
        torch.randn(l, s, r, dtype=dtype, device=device),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@given(shape=shapes(), batch=st.lists(st.integers(0, 4), max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64]))  # fmt: skip
def test_forward_matches_definition(impl, device, shape, batch, dtype):
    x, w1, w2 = make(batch, shape, dtype, device)
    with dispatch.force(impl):
        y = monarch_matmul(x, w1, w2)
    l, s = shape[3], shape[4]
    assert y.shape == (*batch, l * s)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_rounding_close(y, x, w1, w2, tol)
    assert_rounding_close(monarch_matmul_reference(x, w1, w2), x, w1, w2, tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@given(shape=shapes(), batch=st.lists(st.integers(0, 3), max_size=2),
       need=st.sampled_from([(True, True, True), (True, False, False), (False, True, False),
                             (False, False, True)]))  # fmt: skip
def test_backward_matches_autograd_of_definition(impl, device, shape, batch, need):
    x, w1, w2 = make(batch, shape, torch.float64, device)
    for t, f in zip((x, w1, w2), need):
        t.requires_grad_(f)
    grad = torch.randn(*batch, shape[3] * shape[4], dtype=torch.float64, device=device)
    with dispatch.force(impl):
        monarch_matmul(x, w1, w2).backward(grad)
    x2, a2, b2 = (t.detach().clone().requires_grad_(f) for t, f in zip((x, w1, w2), need))
    dense_spec(x2, a2, b2).reshape(grad.shape).backward(grad)
    for t, t2, f in zip((x, w1, w2), (x2, a2, b2), need):
        assert (relative_error(t.grad, t2.grad) <= 1e-12) if f else t.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision(device, dtype, impl):
    x, w1, w2 = make((40,), (4, 6, 5, 8, 3, 3), dtype, device)
    ref64 = dense_spec(x, w1, w2)
    with dispatch.force(impl):
        y = monarch_matmul(x, w1, w2)
    assert_close_lowp(y, ref64, monarch_matmul_reference(x, w1, w2))


def test_cpu_cost_model_is_the_static_choice():
    """Without a measurement, small batches with large blocks take the composite path."""
    from lowrank.ops.monarch import reference_is_faster

    x, w1, w2 = make((8,), (2, 64, 64, 2, 64, 64), torch.float64, "cpu")
    assert reference_is_faster(x, w1)
    assert_rounding_close(monarch_matmul(x, w1, w2), x, w1, w2, 1e-12)
    x_big = torch.randn(300, 128, dtype=torch.float64)
    assert not reference_is_faster(x_big, w1)
    assert_rounding_close(monarch_matmul(x_big, w1, w2), x_big, w1, w2, 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_larger_square_case(impl, device):
    x, w1, w2 = make((300,), (16, 16, 16, 16, 16, 16), torch.float32, device)
    with dispatch.force(impl):
        assert relative_error(monarch_matmul(x, w1, w2), dense_spec(x, w1, w2)) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_and_opcheck(impl):
    x, w1, w2 = make((3,), (2, 3, 2, 3, 2, 2), torch.float64, "cpu")
    inputs = tuple(t.requires_grad_() for t in (x, w1, w2))
    with dispatch.force(impl):
        assert torch.autograd.gradcheck(monarch_matmul, inputs)
    x, w1, w2 = make((2, 5), (3, 4, 2, 2, 3, 6), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.lowrank.monarch_matmul.default, (x, w1, w2))
    w1.requires_grad_()
    torch.library.opcheck(torch.ops.lowrank.monarch_matmul.default, (x, w1, w2))
    grad = torch.randn(2, 5, 6)
    torch.library.opcheck(torch.ops.lowrank.monarch_matmul_backward.default,
                          (grad, x, w1.detach(), w2, True, True, True))  # fmt: skip


def saved_by_autograd(y):
    """The tensors ``y``'s backward node keeps (None where nothing is kept)."""
    return [t for t in y.grad_fn.saved_tensors if t is not None]


@pytest.mark.parametrize("batch", [(7,), (2, 3), (0,)])
def test_composite_training_keeps_h_no_larger_than_x(batch):
    """With the composite path, a forward whose w2 needs a gradient keeps h when it is no
    larger than x (q <= p) and backward reads it instead of recomputing it: gradients
    equal the definition's either way."""
    from lowrank.ops.monarch import keeps_intermediate

    for shape, kept in [((3, 4, 5, 6, 2, 2), True), ((3, 5, 5, 5, 4, 3), True),
                        ((3, 6, 5, 6, 2, 3), False)]:  # fmt: skip
        x, w1, w2 = make(batch, shape, torch.float64, "cpu")
        for t in (x, w1, w2):
            t.requires_grad_()
        grad = torch.randn(*batch, shape[3] * shape[4], dtype=torch.float64)
        with dispatch.force("composite"):
            assert keeps_intermediate(x, w1, w2) == kept
            y = monarch_matmul(x, w1, w2)
            saved = saved_by_autograd(y)
            assert len(saved) == (4 if kept else 3)
            if kept:
                assert saved[3].shape == (*batch, shape[0] * shape[1])
            y.backward(grad)
        refs = monarch_matmul_backward_reference(grad, x.detach(), w1.detach(), w2.detach(),
                                                 True, True, True)  # fmt: skip
        for t, ref in zip((x, w1, w2), refs):
            assert relative_error(t.grad, ref) <= 1e-12


def test_h_kept_only_for_the_composite_and_the_w2_gradient():
    x, w1, w2 = make((9,), (4, 4, 4, 4, 4, 4), torch.float32, "cpu")
    with dispatch.force("native"):
        assert len(saved_by_autograd(monarch_matmul(x, w1, w2.requires_grad_()))) == 3
    w2.requires_grad_(False)
    with dispatch.force("composite"):
        assert len(saved_by_autograd(monarch_matmul(x, w1.requires_grad_(), w2))) == 3
        assert len(saved_by_autograd(monarch_matmul(x.requires_grad_(), w1, w2))) == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_with_h_in_any_layout(impl):
    """The backward op reads h in the layout the training forward writes (tokens innermost)
    or any other (a copy), and every implementation gives the definition's gradients."""
    x, w1, w2 = make((3, 5), (3, 4, 4, 6, 3, 2), torch.float64, "cpu")
    grad = torch.randn(3, 5, 18, dtype=torch.float64)
    y, h = torch.ops.lowrank.monarch_matmul_with_h(x, w1, w2)
    assert relative_error(y, monarch_matmul_reference(x, w1, w2)) <= 1e-14
    assert h.stride()[-1] == 15  # the tokens innermost
    refs = monarch_matmul_backward_reference(grad, x, w1, w2, True, True, True)
    for layout in (h, h.contiguous()):
        with dispatch.force(impl):
            got = torch.ops.lowrank.monarch_matmul_backward(grad, x, w1, w2, True, True, True,
                                                            layout)  # fmt: skip
        for g, ref in zip(got, refs):
            assert relative_error(g, ref) <= 1e-12


def test_h_ops_opcheck_and_bad_h():
    x, w1, w2 = make((2, 5), (3, 4, 2, 2, 3, 6), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.lowrank.monarch_matmul_with_h.default, (x, w1, w2))
    _, h = torch.ops.lowrank.monarch_matmul_with_h(x, w1, w2)
    grad = torch.randn(2, 5, 6)
    torch.library.opcheck(torch.ops.lowrank.monarch_matmul_backward.default,
                          (grad, x, w1, w2, True, True, True, h))  # fmt: skip
    backward = torch.ops.lowrank.monarch_matmul_backward
    with pytest.raises(ValueError, match=r"h must have shape \(2, 5, 12\)"):
        backward(grad, x, w1, w2, True, True, True, h[:1])
    with pytest.raises(TypeError, match="h"):
        backward(grad, x, w1, w2, True, True, True, h.double())
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.ops.lowrank.monarch_matmul_with_h(x, w1.requires_grad_(), w2)[0].sum().backward()


def test_compile_fullgraph_with_composite_training():
    """While tracing, h is not kept (the traced graph calls the dispatched forward)."""
    x, w1, w2 = make((6,), (4, 4, 4, 4, 4, 4), torch.float32, "cpu")
    w1.requires_grad_(), w2.requires_grad_()
    with dispatch.force("composite"):
        compiled = torch.compile(monarch_matmul, fullgraph=True, backend="aot_eager")
        compiled(x, w1, w2).sum().backward()
    refs = monarch_matmul_backward_reference(torch.ones(6, 16), x, w1.detach(), w2.detach(),
                                             False, True, True)  # fmt: skip
    assert relative_error(w1.grad, refs[1]) <= 1e-5 and relative_error(w2.grad, refs[2]) <= 1e-5


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(5, 11), torch.randn(3, 4, 4), torch.randn(4, 3, 3)), ValueError,
         r"x.shape\[-1\] must be 12"),
        ((torch.randn(5, 12), torch.randn(3, 4, 4), torch.randn(5, 3, 3)), ValueError, "l\\*r"),
        ((torch.randn(5, 12), torch.randn(3, 4), torch.randn(4, 3, 3)), ValueError,
         "w1 must be 3-D"),
        ((torch.randn(5, 12), torch.randn(3, 4, 4).double(), torch.randn(4, 3, 3)), TypeError,
         "dtype"),
        ((torch.randn(5, 12), torch.randn(3, 4, 4, device="meta"), torch.randn(4, 3, 3)),
         ValueError, "one device"),
    ],
)  # fmt: skip
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        monarch_matmul(*args)


# ---- layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_f, out_f, nblocks", [(64, 64, 4), (60, 36, 4), (37, 50, 3),
                                                  (16, 96, 8)])  # fmt: skip
def test_monarch_linear_matches_dense(device, in_f, out_f, nblocks):
    layer = MonarchLinear(in_f, out_f, nblocks, device=device, dtype=torch.float64)
    x = torch.randn(4, 3, in_f, dtype=torch.float64, device=device)
    assert relative_error(layer(x), F.linear(x, layer.to_dense(), layer.bias)) <= 1e-12
    assert layer.to_dense().shape == (out_f, in_f)


def test_monarch_linear_layout_and_init():
    layer = MonarchLinear(1024, 4096, nblocks=4, bias=False)
    assert layer.w1.shape == (4, 256, 256) and layer.w2.shape == (4, 1024, 256)
    assert float(layer.w1.abs().max()) <= 1 / 16 and float(layer.w2.abs().max()) <= 1 / 16
    with pytest.raises(ValueError, match="nblocks"):
        MonarchLinear(3, 8, nblocks=4)
    assert "w1=(4, 256, 256)" in repr(layer)


def test_compile_fullgraph():
    layer = MonarchLinear(48, 40, 4)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 48, requires_grad=True)
    y = compiled(x)
    assert relative_error(y, layer(x)) <= 1e-6
    y.sum().backward()
    assert layer.w1.grad is not None and x.grad is not None


# ---- projection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k, l, rank", [(4, 4, 1), (3, 5, 2), (2, 6, 1)])
def test_projection_recovers_random_monarch(k, l, rank):
    p, s = 5, 4
    w1 = torch.randn(k, l * rank, p, dtype=torch.float64)
    w2 = torch.randn(l, s, k * rank, dtype=torch.float64)
    w = monarch_matmul(torch.eye(k * p, dtype=torch.float64), w1, w2).T
    fit = monarch_project(w, (k, l), rank)
    assert fit.relative_error <= 1e-12
    rebuilt = monarch_matmul(torch.eye(k * p, dtype=torch.float64), fit.w1, fit.w2).T
    assert relative_error(rebuilt, w) <= 1e-12


def test_projection_recovers_kronecker_products():
    a, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    assert monarch_project(torch.kron(a, b), (3, 5)).relative_error <= 1e-12
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(10):
        hadamard = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64),
                              hadamard)  # fmt: skip
    assert monarch_project(hadamard, 32).relative_error <= 1e-12


def test_projection_is_optimal_per_block():
    """Perturbing the projection's factors never lowers the error."""
    w = torch.randn(24, 24, dtype=torch.float64)
    fit = monarch_project(w, 4, 2)
    eye = torch.eye(24, dtype=torch.float64)
    best = float((monarch_matmul(eye, fit.w1, fit.w2).T - w).norm())
    assert abs(best / float(w.norm()) - fit.relative_error) <= 1e-12
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w1 = fit.w1 + 1e-3 * torch.randn(fit.w1.shape, generator=g, dtype=torch.float64)
        w2 = fit.w2 + 1e-3 * torch.randn(fit.w2.shape, generator=g, dtype=torch.float64)
        assert float((monarch_matmul(eye, w1, w2).T - w).norm()) >= best - 1e-12


def test_from_dense_reproduces_monarch_linear():
    source = MonarchLinear(60, 36, 4, dtype=torch.float64)
    linear = torch.nn.Linear(60, 36, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(source.to_dense())
        linear.bias.copy_(source.bias)
    # Each block of the source has at most ceil(q / l) terms: that rank reproduces it.
    rank = -(-source.w1.shape[1] // 4)
    fitted = MonarchLinear.from_dense(linear, 4, rank=rank)
    assert fitted.projection_error <= 1e-12
    x = torch.randn(7, 60, dtype=torch.float64)
    assert relative_error(fitted(x), linear(x)) <= 1e-12


def test_projection_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        monarch_project(torch.randn(10, 10), 3)
    with pytest.raises(ValueError, match="rank"):
        monarch_project(torch.randn(8, 8), 4, rank=3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, k, q, p, l, s, r", [
    (33, 4, 8, 12, 4, 10, 8), (300, 8, 8, 8, 8, 8, 8), (1, 2, 17, 5, 2, 3, 17),
    (0, 2, 2, 2, 2, 2, 2),
])  # fmt: skip
def test_tensor_core_forward_cuda(dtype, tokens, k, q, p, l, s, r):
    """The tensor-core forward (forced) against the definition; tests/cuda_emulation checks
    the same kernel on the CPU."""
    from lowrank.ops import monarch as monarch_ops

    x = torch.randn(tokens, k * p, device="cuda").to(dtype)
    w1, w2 = (
        torch.randn(k, q, p, device="cuda").to(dtype),
        torch.randn(l, s, r, device="cuda").to(dtype),
    )
    key = monarch_ops._key(x, k, q, p, l, s, r)
    y = monarch_ops._forward_dispatch(key, x, x, w1, w2, names=("tensor-core",))
    ref64 = monarch_matmul_reference(x.double(), w1.double(), w2.double())
    ref_lowp = monarch_matmul_reference(x.float(), w1.float(), w2.float()).to(dtype)
    assert y.shape == ref64.shape
    if tokens:
        assert_close_lowp(y, ref64, ref_lowp, c=4.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, k, q, p, l, s, r", [
    (33, 4, 8, 12, 4, 10, 8), (300, 8, 8, 8, 8, 8, 8), (1, 2, 17, 5, 2, 3, 17),
])  # fmt: skip
def test_tensor_core_input_gradient_cuda(dtype, tokens, k, q, p, l, s, r):
    """dx through the transposed tensor-core kernel (forced, frozen weights)."""
    from lowrank.ops import monarch as monarch_ops

    x = torch.randn(tokens, k * p, device="cuda").to(dtype)
    w1 = torch.randn(k, q, p, device="cuda").to(dtype)
    w2 = torch.randn(l, s, r, device="cuda").to(dtype)
    dy = torch.randn(tokens, l * s, device="cuda").to(dtype)
    key = (*monarch_ops._key(x, k, q, p, l, s, r), True, False, False)
    dx, _, _ = monarch_ops._backward_dispatch(key, x, dy, x, w1, w2, True, False, False,
                                              names=("tensor-core",))  # fmt: skip
    ref64 = monarch_matmul_backward_reference(dy.double(), x.double(), w1.double(), w2.double(),
                                              True, False, False)[0]  # fmt: skip
    ref_lowp = monarch_matmul_backward_reference(dy.float(), x.float(), w1.float(), w2.float(),
                                                 True, False, False)[0].to(dtype)  # fmt: skip
    assert dx.shape == x.shape
    assert_close_lowp(dx, ref64, ref_lowp, c=4.0)
