"""sltrain_matmul (both paths), its primitives, and SLTrainLinear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, IMPLS, relative_error
from hypothesis import given
from hypothesis import strategies as st

from lowrank import dispatch
from lowrank.nn import SLTrainLinear
from lowrank.ops import sltrain_matmul, sltrain_matmul_reference
from lowrank.ops.sltrain import PATHS, choose_path, sampled_dot, sltrain_rebuild, sparse_matmul


def problem(out, inp, rank, nnz, batch, dtype=torch.float64, device="cpu", index=torch.int32):
    g = torch.Generator().manual_seed(out * 1000 + inp * 10 + nnz)
    x = torch.randn(*batch, inp, generator=g, dtype=dtype).to(device)
    b = torch.randn(out, rank, generator=g, dtype=dtype).to(device)
    a = torch.randn(rank, inp, generator=g, dtype=dtype).to(device)
    idx = torch.sort(torch.randperm(out * inp, generator=g)[:nnz]).values.to(index).to(device)
    values = torch.randn(nnz, generator=g, dtype=dtype).to(device)
    bias = torch.randn(out, generator=g, dtype=dtype).to(device)
    return x, b, a, values, idx, bias


def dense_definition(x, b, a, values, idx, scale, bias):
    w = scale * b.double() @ a.double()
    w.view(-1)[idx.long()] += values.double()
    return x.double() @ w.T + (0 if bias is None else bias.double())


@st.composite
def shapes(draw):
    out, inp = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    rank = draw(st.integers(1, min(out, inp)))
    nnz = draw(st.integers(0, min(out * inp, 20)))
    return out, inp, rank, nnz


@pytest.mark.parametrize("impl", [*IMPLS, "auto"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["rebuild", "factored", "auto"])
@given(shape=shapes(), batch=st.lists(st.integers(0, 3), max_size=2), use_bias=st.booleans(),
       index=st.sampled_from([torch.int32, torch.int64]))  # fmt: skip
def test_forward_and_backward_match_definition(impl, device, path, shape, batch, use_bias, index):
    out, inp, rank, nnz = shape
    x, b, a, values, idx, bias = problem(out, inp, rank, nnz, batch, device=device, index=index)
    bias = bias if use_bias else None
    leaves = [t.requires_grad_() for t in (x, b, a, values)] + ([bias.requires_grad_()] if use_bias
                                                                 else [])  # fmt: skip
    with dispatch.force(impl):
        y = sltrain_matmul(x, b, a, values, idx, 0.75, bias, path=path)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    rx, rb, ra, rv = ref_leaves[:4]
    rbias = ref_leaves[4] if use_bias else None
    ref = dense_definition(rx, rb, ra, rv, idx, 0.75, rbias)
    assert y.shape == (*batch, out)
    assert relative_error(y, ref) <= 1e-12 or y.numel() == 0
    grad = torch.randn_like(y)
    with dispatch.force(impl):
        y.backward(grad)
    ref.backward(grad)
    for got, want in zip(leaves, ref_leaves):
        assert relative_error(got.grad, want.grad) <= 1e-11 or want.grad.norm() == 0


def test_paths_agree_and_cost_model():
    x, b, a, values, idx, bias = problem(64, 48, 8, 90, (33,))
    y1 = sltrain_matmul(x, b, a, values, idx, 2.0, bias, path="rebuild")
    y2 = sltrain_matmul(x, b, a, values, idx, 2.0, bias, path="factored")
    assert relative_error(y1, y2) <= 1e-12
    assert choose_path(16, 1024, 1024, 256, 31457) == "factored"
    assert choose_path(4096, 1024, 1024, 256, 31457) == "rebuild"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_primitives(impl, device, dtype):
    x, b, a, values, idx, _ = problem(9, 7, 2, 15, (5,), dtype=dtype, device=device)
    s = torch.zeros(63, dtype=torch.float64, device=device)
    s[idx.long()] = values.double()
    s = s.view(9, 7)
    dy = torch.randn(5, 9, dtype=dtype, device=device)
    tol = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    with dispatch.force(impl):
        w = sltrain_rebuild(b, a, values, idx, 0.5)
        y, yt = sparse_matmul(x, values, idx, 9, 7), sparse_matmul(dy, values, idx, 9, 7, True)
        g = sampled_dot(dy, x, idx)
    assert w.dtype == y.dtype == yt.dtype == g.dtype == dtype
    assert relative_error(w, 0.5 * b.double() @ a.double() + s) <= tol
    assert relative_error(y, x.double() @ s.T) <= tol
    assert relative_error(yt, dy.double() @ s) <= tol
    assert relative_error(g, (dy.double().T @ x.double()).view(-1)[idx.long()]) <= tol
    x, b, a, values = (t.double() for t in (x, b, a, values))
    ref = sltrain_matmul_reference(x, b, a, values, idx, 0.5)
    assert relative_error(ref, dense_definition(x, b, a, values, idx, 0.5, None)) <= 1e-13


def test_opcheck_and_gradcheck():
    x, b, a, values, idx, bias = problem(6, 5, 2, 7, (3,))
    op = torch.ops.lowrank.sltrain_matmul.default
    torch.library.opcheck(op, (x.float(), b.float(), a.float(), values.float(), idx, 0.5,
                               bias.float(), 2))  # fmt: skip
    leaves = tuple(t.requires_grad_() for t in (x, b, a, values, bias))
    for path in ("rebuild", "factored"):
        for impl in IMPLS:
            with dispatch.force(impl):
                assert torch.autograd.gradcheck(
                    lambda x, b, a, v, bias, p=path: sltrain_matmul(x, b, a, v, idx, 0.5, bias, p),
                    leaves,
                )


def kept_weight(y):
    """The rebuilt W ``y``'s backward node keeps, or None (x, B, A, values, indices, W)."""
    return y.grad_fn.saved_tensors[5]


@pytest.mark.parametrize("impl", IMPLS)
def test_training_keeps_w_no_larger_than_x(impl):
    """The rebuild path's training forward keeps W for dx when it is no larger than x
    (out <= tokens) and backward reads it instead of rebuilding; the factored path, a
    larger W or an x without gradient keep nothing. Gradients equal the definition's."""
    from lowrank.ops.sltrain import keeps_weight

    cases = [
        ((2, 5), "rebuild", True, True),
        ((2, 5), "auto", True, None),  # the measured path decides
        ((2, 3), "rebuild", True, False),  # W (8 x 6) larger than x (6 x 6)
        ((2, 5), "factored", True, False),
        ((2, 5), "rebuild", False, False),  # no dx: W is not needed
    ]
    for batch, path, x_grad, kept in cases:
        x, b, a, values, idx, bias = problem(8, 6, 2, 10, batch)
        leaves = [x.requires_grad_(x_grad), *(t.requires_grad_() for t in (b, a, values, bias))]
        with dispatch.force(impl):
            y = sltrain_matmul(x, b, a, values, idx, 0.75, bias, path=path)
            if kept is None:
                kept = keeps_weight(x, b, a, values, idx, 0.75, bias, PATHS[path])
            w = kept_weight(y)
            assert (w is not None) == kept
            if kept:
                assert relative_error(w, sltrain_rebuild(b, a, values, idx, 0.75)) <= 1e-14
            grad = torch.randn_like(y)
            y.backward(grad)
        ref_leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        dense_definition(*ref_leaves[:4], idx, 0.75, ref_leaves[4]).backward(grad)
        for got, want in zip(leaves, ref_leaves):
            assert (got.grad is None) == (want.grad is None)
            assert got.grad is None or relative_error(got.grad, want.grad) <= 1e-12


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("path", [1, 2])
def test_backward_with_w(impl, path):
    """Given the kept W, every implementation of the backward op gives the definition's
    gradients; opcheck of the training forward and of the backward with W; a W that does
    not fit is named."""
    x, b, a, values, idx, bias = problem(6, 5, 2, 7, (3, 3))
    y, w = torch.ops.lowrank.sltrain_matmul_with_w(x, b, a, values, idx, 0.5, bias)
    assert relative_error(y, dense_definition(x, b, a, values, idx, 0.5, bias)) <= 1e-14
    assert relative_error(w, sltrain_rebuild(b, a, values, idx, 0.5)) <= 1e-14
    grad = torch.randn(3, 3, 6, dtype=torch.float64)
    backward = torch.ops.lowrank.sltrain_matmul_backward
    with dispatch.force(impl):
        got = backward(grad, x, b, a, values, idx, 0.5, path, True, True, True, True, w)
        want = backward(grad, x, b, a, values, idx, 0.5, path, True, True, True, True)
    leaves = [t.clone().requires_grad_() for t in (x, b, a, values)]
    dense_definition(*leaves, idx, 0.5, None).backward(grad)
    for g, g_rebuilt, leaf in zip(got, want, leaves):
        assert relative_error(g, leaf.grad) <= 1e-12 and relative_error(g, g_rebuilt) <= 1e-12
    op_args = (x.float(), b.float(), a.float(), values.float(), idx, 0.5, bias.float())
    torch.library.opcheck(torch.ops.lowrank.sltrain_matmul_with_w.default, op_args)
    torch.library.opcheck(backward.default, (grad.float(), *op_args[:-1], path, True, True, True,
                                             True, w.float()))  # fmt: skip
    with pytest.raises(ValueError, match=r"w must have shape \(6, 5\)"):
        backward(grad, x, b, a, values, idx, 0.5, path, True, True, True, True, w.T)
    with pytest.raises(TypeError, match="w"):
        backward(grad, x, b, a, values, idx, 0.5, path, True, True, True, True, w.float())


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda p: {**p, "indices": p["indices"].flip(0)}, ValueError, "sorted"),
        (lambda p: {**p, "indices": p["indices"] + 10_000}, ValueError, "lie in"),
        (lambda p: {**p, "indices": p["indices"].float()}, TypeError, "int32 or int64"),
        (lambda p: {**p, "values": p["values"][:-1]}, ValueError, "one index per value"),
        (lambda p: {**p, "A": p["A"][:, :-1]}, ValueError, "in = A.shape"),
        (lambda p: {**p, "B": p["B"].float()}, TypeError, "dtype"),
    ],
)  # fmt: skip
def test_bad_input(mutate, error, match):
    x, b, a, values, idx, _ = problem(8, 6, 2, 10, (4,))
    args = mutate({"x": x, "B": b, "A": a, "values": values, "indices": idx})
    with pytest.raises(error, match=match):
        sltrain_matmul(args["x"], args["B"], args["A"], args["values"], args["indices"], 1.0)


# ---- layer ------------------------------------------------------------------------------------


def test_layer_init_support_and_state_dict():
    layer = SLTrainLinear(64, 48, rank=8, sparsity=0.05, alpha=32, seed=3)
    assert layer.indices.dtype == torch.int32 and layer.indices.numel() == int(0.05 * 64 * 48)
    assert bool((layer.indices[1:] > layer.indices[:-1]).all())
    assert float(layer.B.detach().abs().max()) == 0.0 and layer.scale == 4.0
    same = SLTrainLinear(64, 48, rank=8, sparsity=0.05, seed=3)
    assert torch.equal(layer.indices, same.indices)
    x = torch.randn(5, 64)
    assert relative_error(layer(x), F.linear(x, layer.to_dense(), layer.bias)) <= 1e-5
    other = SLTrainLinear(64, 48, rank=8, sparsity=0.05, seed=99)
    other.load_state_dict(layer.state_dict())
    assert relative_error(other(x), layer(x)) <= 1e-6
    report = layer.memory_report()
    assert (
        report["indices"] == 4 * layer.indices.numel() and report["total"] < report["dense_total"]
    )


def test_layer_from_dense():
    torch.manual_seed(0)
    low = torch.randn(40, 6, dtype=torch.float64) @ torch.randn(6, 30, dtype=torch.float64)
    layer = SLTrainLinear.from_dense(low, rank=6, sparsity=0.1, seed=1)
    assert layer.projection_error <= 1e-10
    w = torch.randn(40, 30, dtype=torch.float64)
    rough = SLTrainLinear.from_dense(w, rank=6, sparsity=0.1, seed=1)
    assert 0.0 < rough.projection_error < 1.0
    assert relative_error(rough.to_dense(), w) == pytest.approx(rough.projection_error, rel=1e-9)


def test_layer_compile_fullgraph():
    layer = SLTrainLinear(32, 24, rank=4, seed=0)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 32, requires_grad=True)
    y = compiled(x)
    assert relative_error(y, layer(x)) <= 1e-5
    y.sum().backward()
    assert layer.values.grad is not None and layer.A.grad is not None


def test_pretraining_loss_falls_like_dense():
    """A few hundred steps on random regression data: SLTrain's loss falls like a dense layer's."""
    torch.manual_seed(0)
    # A teacher both layers can represent: rank 16 plus a bias.
    w = torch.randn(64, 16) @ torch.randn(16, 64) / 16
    x = torch.randn(512, 64)
    y = x @ w.T + 0.1 * torch.randn(64)

    def train(model):
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(300):
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    dense = train(torch.nn.Linear(64, 64))
    sl = train(SLTrainLinear(64, 64, rank=32, sparsity=0.05, alpha=32, seed=0))
    assert dense[-1] < 1e-2 * dense[0]
    assert sl[-1] < 1e-2 * sl[0]
    assert sl[-1] < 10 * dense[-1] + 1e-4
