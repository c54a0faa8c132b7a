"""KronAdapter, KronLinear(terms=n), nearest_kronecker and the fused add ops."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, IMPLS, relative_error
from hypothesis import given
from hypothesis import strategies as st

from lowrank import dispatch
from lowrank.linalg import kron_rearrange, nearest_kronecker
from lowrank.nn import KronAdapter, KronLinear
from lowrank.nn.kron_adapter import lokr_factorization
from lowrank.ops import kron_matmul_add, kron_matmul_add_, kron_matmul_add_reference


def make_adapter(in_f=24, out_f=20, dtype=torch.float64, device="cpu", **kw):
    torch.manual_seed(0)
    base = torch.nn.Linear(in_f, out_f, dtype=dtype, device=device)
    adapter = KronAdapter(base, init="random", **kw)
    return base, adapter


def materialised(adapter, x):
    """PEFT's computation: base(x) + F.linear(x, kron(w1, w2) * scale)."""
    return adapter.base(x) + F.linear(x, adapter.delta_weight())


# ---- fused add ops --------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@given(batch=st.lists(st.integers(0, 3), max_size=2), p=st.integers(1, 6), q=st.integers(1, 6),
       r=st.integers(1, 6), s=st.integers(1, 6), scale=st.floats(-3, 3))  # fmt: skip
def test_kron_matmul_add_matches_reference(impl, device, batch, p, q, r, s, scale):
    x = torch.randn(*batch, q * s, dtype=torch.float64, device=device)
    a = torch.randn(p, q, dtype=torch.float64, device=device)
    b = torch.randn(r, s, dtype=torch.float64, device=device)
    base = torch.randn(*batch, p * r, dtype=torch.float64, device=device)
    ref = base + scale * (x @ torch.kron(a, b).T)
    inplace = base.clone()
    with dispatch.force(impl):
        assert relative_error(kron_matmul_add(base, x, a, b, scale), ref) <= 1e-12
        assert kron_matmul_add_(inplace, x, a, b, scale) is inplace
    assert relative_error(kron_matmul_add_reference(base, x, a, b, scale), ref) <= 1e-12
    assert relative_error(inplace, ref) <= 1e-12


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kron_matmul_add_inplace_other_layouts(impl, dtype):
    x = torch.randn(6, 12, dtype=dtype)
    a, b = torch.randn(3, 3, dtype=dtype), torch.randn(2, 4, dtype=dtype)
    base = torch.randn(6, 6, dtype=dtype)
    ref = base.double() + 0.5 * (x.double() @ torch.kron(a, b).double().T)
    strided = torch.randn(6, 12, dtype=dtype)[:, ::2]  # not contiguous
    strided.copy_(base)
    with dispatch.force(impl):
        kron_matmul_add_(strided, x, a, b, 0.5)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert relative_error(strided, ref) <= tol


@pytest.mark.parametrize("impl", IMPLS)
def test_kron_matmul_add_gradients(impl):
    x, base = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    a, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (base, x, a, b))
    with dispatch.force(impl):
        assert torch.autograd.gradcheck(lambda *t: kron_matmul_add(*t, -1.7), inputs)


def test_kron_matmul_add_inplace_refuses_overlapping_memory():
    buf = torch.randn(5, 12)
    a, b = torch.randn(3, 3), torch.randn(4, 4)  # 12 -> 12 columns
    with pytest.raises(ValueError, match="base overlaps x"):
        kron_matmul_add_(buf[1:], buf[:-1], a, b)
    with pytest.raises(ValueError, match="base overlaps x"):
        kron_matmul_add_(buf, buf, a, b)
    weights = torch.randn(12)
    with pytest.raises(ValueError, match="base overlaps a"):
        kron_matmul_add_(weights.view(1, 12), torch.randn(1, 12), weights[3:].view(3, 3), b)


def test_kron_matmul_add_opcheck_and_inplace_refuses_grad():
    x, base = torch.randn(4, 12), torch.randn(4, 6)
    a, b = torch.randn(3, 3, requires_grad=True), torch.randn(2, 4)
    torch.library.opcheck(torch.ops.lowrank.kron_matmul_add.default, (base, x, a, b, 0.5))
    torch.library.opcheck(torch.ops.lowrank.kron_matmul_add_.default, (base, x, a.detach(), b, 0.5))
    with pytest.raises(RuntimeError, match="not differentiable"):
        kron_matmul_add_(base, x, a, b, 0.5)
    with pytest.raises(ValueError, match="base must have shape"):
        kron_matmul_add(torch.randn(4, 7), x, a, b)


# ---- factorisation rule ------------------------------------------------------------------


@pytest.mark.parametrize(
    "dim, factor, expected",
    [(256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)), (128, 4, (4, 32)),
     (100, 3, (2, 50)), (12, -1, (3, 4)), (1024, 16, (16, 64)), (1, -1, (1, 1))],
)  # fmt: skip
def test_lokr_factorization(dim, factor, expected):
    assert lokr_factorization(dim, factor) == expected


# ---- adapter ------------------------------------------------------------------------------

OPTIONS = [
    {"rank": 2},  # w2 low rank
    {"rank": 8},  # both full (8 >= max/2)
    {"rank": 1, "decompose_both": True},  # both low rank
    {"rank": 3, "factor": 2, "alpha": 7.0},
    {"rank": 2, "factors": ((5, 6), (4, 4))},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS)
def test_adapter_equals_materialised(device, options):
    _, adapter = make_adapter(device=device, **options)
    x = torch.randn(3, 7, 24, dtype=torch.float64, device=device)
    assert relative_error(adapter(x), materialised(adapter, x)) <= 1e-12
    with torch.no_grad():  # the in-place inference path
        assert relative_error(adapter(x), materialised(adapter, x)) <= 1e-12


@pytest.mark.parametrize("options", OPTIONS)
def test_adapter_gradients_equal_materialised(options):
    _, adapter = make_adapter(**options)
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 20, dtype=torch.float64)
    adapter(x).backward(grad)
    ours = [x.grad] + [p.grad for p in adapter.parameters() if p.requires_grad]
    x2 = x.detach().clone().requires_grad_()
    adapter.zero_grad()
    materialised(adapter, x2).backward(grad)
    theirs = [x2.grad] + [p.grad for p in adapter.parameters() if p.requires_grad]
    for g1, g2 in zip(ours, theirs):
        assert relative_error(g1, g2) <= 1e-12
    assert all(p.grad is None for p in adapter.base.parameters())


def test_adapter_init_and_scale():
    base = torch.nn.Linear(24, 20, dtype=torch.float64)
    adapter = KronAdapter(base, rank=4, alpha=8.0)
    assert adapter.scale == 2.0
    x = torch.randn(3, 24, dtype=torch.float64)
    assert relative_error(adapter(x), base(x)) == 0.0  # "peft" init: w1 = 0
    lyco = KronAdapter(torch.nn.Linear(24, 20), rank=2, init="lycoris")
    assert lyco.w2_b.abs().sum() == 0 and lyco.w1.abs().sum() > 0


def test_adapter_dropout_only_in_training():
    _, adapter = make_adapter(rank=2, dropout=0.5)
    x = torch.randn(64, 24, dtype=torch.float64)
    adapter.eval()
    assert relative_error(adapter(x), materialised(adapter, x)) <= 1e-12
    adapter.train()
    assert relative_error(adapter(x), materialised(adapter, x)) > 1e-3


def test_merge_unmerge_agree():
    base, adapter = make_adapter(rank=2)
    x = torch.randn(6, 24, dtype=torch.float64)
    original = base.weight.clone()
    before = adapter(x)
    adapter.merge()
    assert adapter.merged and relative_error(adapter(x), before) <= 1e-12
    with pytest.raises(RuntimeError, match="already merged"):
        adapter.merge()
    adapter.unmerge()
    assert not adapter.merged and relative_error(adapter(x), before) <= 1e-12
    assert relative_error(base.weight, original) <= 1e-14
    with pytest.raises(RuntimeError, match="not merged"):
        adapter.unmerge()


def test_merge_refuses_non_finite():
    base, adapter = make_adapter(rank=2)
    with torch.no_grad():
        adapter.w1.fill_(1e308)
        adapter.w2_a.fill_(1e308)
    original = base.weight.clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        adapter.merge()
    assert not adapter.merged and torch.equal(base.weight, original)


def test_adapter_bad_input():
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        KronAdapter(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="weight change"):
        KronAdapter(torch.nn.Linear(24, 20), factors=((5, 6), (4, 5)))
    with pytest.raises(ValueError, match="init"):
        KronAdapter(torch.nn.Linear(24, 20), init="zeros")
    with pytest.raises(ValueError, match="positive integer"):
        KronAdapter(torch.nn.Linear(24, 20), rank=0)


def test_adapter_compile_fullgraph():
    _, adapter = make_adapter(rank=2, dtype=torch.float32)
    compiled = torch.compile(adapter, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 24, requires_grad=True)
    y = compiled(x)
    assert relative_error(y, materialised(adapter, x)) <= 1e-5
    y.sum().backward()
    assert adapter.w1.grad is not None and x.grad is not None


def test_peft_state_dict_round_trip():
    _, adapter = make_adapter(rank=2)
    _, other = make_adapter(rank=2)
    other.load_peft_state_dict(adapter.peft_state_dict("mine"), "mine")
    x = torch.randn(3, 24, dtype=torch.float64)
    assert relative_error(other(x), adapter(x)) <= 1e-14
    with pytest.raises(KeyError, match="missing"):
        other.load_peft_state_dict({}, "default")


# ---- against PEFT itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    "r, alpha, factor, decompose_both", [(2, 4.0, -1, False), (8, 8.0, -1, False),
                                         (1, 3.0, 2, True), (4, 1.0, 4, False)],
)  # fmt: skip
def test_matches_peft_lokr(r, alpha, factor, decompose_both):
    peft = pytest.importorskip("peft")
    from peft.tuners.lokr.layer import Linear as LoKrLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40, dtype=torch.float64)
    config = peft.LoKrConfig(r=r, alpha=alpha, decompose_factor=factor,
                             decompose_both=decompose_both, init_weights=False)  # fmt: skip
    lokr = LoKrLinear(base, "default", config=config, r=r, alpha=alpha).double()
    ours = KronAdapter.from_peft(lokr)
    native = KronAdapter(torch.nn.Linear(48, 40, dtype=torch.float64), rank=r, alpha=alpha,
                         factor=factor, decompose_both=decompose_both)  # fmt: skip
    assert set(native.peft_state_dict()) == set(ours.peft_state_dict())
    x = torch.randn(5, 48, dtype=torch.float64)
    assert relative_error(ours(x), lokr(x)) <= 1e-12
    lokr.load_state_dict(
        {**lokr.state_dict(), **{k: v * 2 for k, v in ours.peft_state_dict().items()}}
    )
    ours.load_peft_state_dict({k: v * 2 for k, v in ours.peft_state_dict().items()})
    assert relative_error(ours(x), lokr(x)) <= 1e-12


# ---- KronLinear(terms) and nearest_kronecker --------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_kron_linear_terms(device):
    layer = KronLinear(12, 10, factors=((2, 3), (5, 4)), terms=3, dtype=torch.float64,
                       device=device)  # fmt: skip
    assert layer.a.shape == (3, 2, 3) and layer.b.shape == (3, 5, 4)
    x = torch.randn(7, 12, dtype=torch.float64, device=device, requires_grad=True)
    dense = sum(torch.kron(layer.a[k], layer.b[k]) for k in range(3))
    assert relative_error(layer(x), F.linear(x, dense, layer.bias)) <= 1e-12
    assert relative_error(layer.to_dense(), dense) <= 1e-14
    assert "terms=3" in repr(layer)


def test_kron_linear_terms_init_variance():
    torch.manual_seed(0)
    var = KronLinear(1024, 1024, terms=4, bias=False).to_dense().var().item()
    assert abs(var * 3 * 1024 - 1) < 0.15


@pytest.mark.parametrize("terms", [1, 2, 3])
def test_nearest_kronecker_recovers_exact_sums(terms):
    a = torch.randn(terms, 3, 4, dtype=torch.float64)
    b = torch.randn(terms, 5, 2, dtype=torch.float64)
    w = sum(torch.kron(a[k], b[k]) for k in range(terms))
    fit = nearest_kronecker(w, (3, 4), (5, 2), terms)
    assert fit.relative_error <= 1e-12
    approx = sum(torch.kron(fit.a[k], fit.b[k]) for k in range(terms))
    assert relative_error(approx, w) <= 1e-12


def test_nearest_kronecker_is_optimal_against_brute_force():
    """No rank-1 Kronecker product on a dense grid of small factors does better."""
    torch.manual_seed(1)
    w = torch.randn(4, 4, dtype=torch.float64)
    fit = nearest_kronecker(w, (2, 2), (2, 2))
    best = fit.relative_error * w.norm()
    grid = torch.linspace(-2, 2, 9, dtype=torch.float64)
    # b fixed to the optimum's direction up to scale is not assumed: search a over a grid and
    # solve for the best b in closed form (least squares), which covers every rank-1 term.
    r = kron_rearrange(w, (2, 2), (2, 2))
    for values in itertools.product(grid, repeat=4):
        va = torch.stack(values)
        if va.norm() == 0:
            continue
        vb = va @ r / va.dot(va)
        err = (r - torch.outer(va, vb)).norm()
        assert err >= best - 1e-10


def test_kron_linear_from_dense():
    target = KronLinear(12, 10, factors=((2, 3), (5, 4)), terms=2, dtype=torch.float64)
    linear = torch.nn.Linear(12, 10, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(target.to_dense())
    fitted = KronLinear.from_dense(linear, factors=((2, 3), (5, 4)), terms=2)
    assert fitted.projection_error <= 1e-12
    x = torch.randn(3, 12, dtype=torch.float64)
    assert relative_error(fitted(x), linear(x)) <= 1e-12
    rough = KronLinear.from_dense(torch.randn(10, 12), factors=((2, 3), (5, 4)))
    assert 0.0 < rough.projection_error < 1.0


def test_nearest_kronecker_bad_input():
    with pytest.raises(ValueError, match="shape"):
        nearest_kronecker(torch.randn(6, 6), (2, 3), (2, 3))
    with pytest.raises(ValueError, match="terms"):
        nearest_kronecker(torch.randn(4, 4), (2, 2), (2, 2), terms=5)
    with pytest.raises(ValueError, match="NaN"):
        nearest_kronecker(torch.full((4, 4), float("nan")), (2, 2), (2, 2))
