"""The CUDA kernels' own source, compiled for the CPU and run under tests/cuda_emulation.

Each CUDA thread becomes a host thread and ``__syncthreads`` a barrier, so the
kernels' index math, shared-memory layout and reductions are checked against the
references on machines without a GPU (CI). Races between blocks and speed are
not: those need a GPU (``pytest -m cuda``, ``scripts/gpu-check``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.ops.kron import kron_matmul_backward_reference
from lowrank.ops.monarch import monarch_matmul_backward_reference, monarch_matmul_reference
from lowrank.ops.sketch import (
    NORMAL,
    SIGN,
    UNIFORM,
    philox_fill_reference,
    sparse_sign_rows_reference,
    srht_rows_reference,
)

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "cuda_emulation"


def cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_fp16.h").exists():
            return Path(root) / "include"
    return None


def build(entry: str, folder: Path) -> ctypes.CDLL:
    """Compiles tests/cuda_emulation/<entry> with the kernels it includes, for the CPU."""
    include = cuda_include()
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if include is None or compiler is None:
        pytest.skip("needs the CUDA headers and a C++20 compiler")
    library = folder / (Path(entry).stem + ".so")
    command = [
        compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
        f"-I{HERE}", f"-I{ROOT / 'cuda'}", f"-I{ROOT / 'cpp' / 'include'}", f"-I{include}",
        str(HERE / entry), "-o", str(library),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return build("kron_entry.cpp", tmp_path_factory.mktemp("emulation"))


@pytest.fixture(scope="module")
def emulated_sketch(tmp_path_factory):
    return build("sketch_entry.cpp", tmp_path_factory.mktemp("emulation"))


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


SHAPES = [(5, 3, 4, 5, 6), (3, 8, 2, 3, 9), (4, 1, 7, 6, 1), (2, 6, 6, 5, 5), (0, 2, 2, 2, 2)]


@pytest.mark.parametrize("tokens, p, q, r, s", SHAPES)
@pytest.mark.parametrize("with_addend", [False, True])
def test_forward_kernel(emulated, tokens, p, q, r, s, with_addend):
    x, a, b = torch.randn(tokens, q * s), torch.randn(p, q), torch.randn(r, s)
    addend = torch.randn(tokens, p * r) if with_addend else None
    y = torch.full((tokens, p * r), float("nan"))
    grid = max(1, min(tokens, 2))  # fewer blocks than tokens: the grid-stride loop runs
    emulated.kron_forward_f32(ptr(x), ptr(a), ptr(b), ptr(addend), ctypes.c_float(0.75), ptr(y),
                              ctypes.c_int64(tokens), p, q, r, s, grid)  # fmt: skip
    ref = 0.75 * (x.double() @ torch.kron(a, b).double().T)
    if with_addend:
        ref += addend.double()
    assert relative_error(y, ref) <= 1e-5 if tokens else y.numel() == 0


def test_forward_kernel_bfloat16(emulated):
    tokens, p, q, r, s = 6, 4, 5, 3, 4
    x, a, b = (torch.randn(*shape).bfloat16() for shape in [(tokens, q * s), (p, q), (r, s)])
    y = torch.full((tokens, p * r), float("nan"), dtype=torch.bfloat16)
    emulated.kron_forward_bf16(ptr(x), ptr(a), ptr(b), ptr(None), ctypes.c_float(1.0), ptr(y),
                               ctypes.c_int64(tokens), p, q, r, s, 3)  # fmt: skip
    ref = x.double() @ torch.kron(a.double(), b.double()).T
    # float32 accumulation, one rounding to bfloat16 at the end
    assert relative_error(y, ref) <= 8e-3


@pytest.mark.parametrize("tokens, p, q, r, s", SHAPES[:4])
def test_factor_gradient_kernel(emulated, tokens, p, q, r, s):
    x, a, b = torch.randn(tokens, q * s), torch.randn(p, q), torch.randn(r, s)
    dy = torch.randn(tokens, p * r)
    da, db = torch.zeros(p, q), torch.zeros(r, s)
    emulated.kron_factor_grads_f32(ptr(dy), ptr(x), ptr(a), ptr(b), ptr(da), ptr(db),
                                   ctypes.c_int64(tokens), p, q, r, s, 2)  # fmt: skip
    _, ref_da, ref_db = kron_matmul_backward_reference(
        dy.double(), x.double(), a.double(), b.double(), False, True
    )
    assert relative_error(da, ref_da) <= 1e-5
    assert relative_error(db, ref_db) <= 1e-5


# ---- Kronecker, tensor-core kernels (emulated WMMA) ---------------------------------------------

LOW = {"f16": torch.float16, "bf16": torch.bfloat16}
factor_size = st.integers(1, 20)  # padding to the 16-wide WMMA tile is exercised throughout


def rounded(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype).double()


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    tokens=st.integers(0, 5),
    p=factor_size,
    q=factor_size,
    r=factor_size,
    s=factor_size,
    tile=st.integers(1, 3),
    kind=st.sampled_from(["f16", "bf16"]),
    with_addend=st.booleans(),
)
def test_forward_tensor_core_kernel(emulated, tokens, p, q, r, s, tile, kind, with_addend):
    dtype = LOW[kind]
    x, a, b = (torch.randn(*shape).to(dtype) for shape in [(tokens, q * s), (p, q), (r, s)])
    addend = torch.randn(tokens, p * r).to(dtype) if with_addend else None
    y = torch.full((tokens, p * r), float("nan"), dtype=dtype)
    grid = 2  # with tile-strided blocks: the grid-stride loop and a partial last tile run
    getattr(emulated, f"kron_forward_tc_{kind}")(
        ptr(x), ptr(a), ptr(b), ptr(addend), ctypes.c_float(0.5), ptr(y), ctypes.c_int64(tokens),
        p, q, r, s, tile, grid)  # fmt: skip
    # the kernel's rounding: Z = X b^T rounded to the storage dtype, float32 accumulation
    z = rounded(x.double().reshape(tokens, q, s) @ b.double().T, dtype)
    ref = 0.5 * (a.double() @ z).reshape(tokens, p * r)
    if with_addend:
        ref += addend.double()
    if tokens:
        assert relative_error(y, ref) <= (1e-2 if kind == "bf16" else 2e-3)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(
    tokens=st.integers(1, 5),
    p=factor_size,
    q=factor_size,
    r=factor_size,
    s=factor_size,
    tile=st.integers(1, 3),
    kind=st.sampled_from(["f16", "bf16"]),
)
def test_factor_gradient_tensor_core_kernel(emulated, tokens, p, q, r, s, tile, kind):
    dtype = LOW[kind]
    x, a, b = (torch.randn(*shape).to(dtype) for shape in [(tokens, q * s), (p, q), (r, s)])
    dy = torch.randn(tokens, p * r).to(dtype)
    grid = 2
    partials = torch.full((grid * (p * q + r * s),), float("nan"))
    results = []
    for _ in range(2):
        da, db = torch.full((p, q), float("nan")), torch.full((r, s), float("nan"))
        getattr(emulated, f"kron_factor_grads_tc_{kind}")(
            ptr(dy), ptr(x), ptr(a), ptr(b), ptr(partials), ptr(da), ptr(db),
            ctypes.c_int64(tokens), p, q, r, s, tile, grid)  # fmt: skip
        results.append((da, db))
    assert all(torch.equal(u, v) for u, v in zip(*results))  # deterministic: no atomics
    da, db = results[0]
    xt, g = x.double().reshape(tokens, q, s), dy.double().reshape(tokens, p, r)
    z = rounded(xt @ b.double().T, dtype)  # X b^T as the kernel keeps it
    gq = rounded(a.double().T @ g, dtype)  # a^T dY likewise
    ref_da = torch.einsum("tpr,tqr->pq", g, z)
    ref_db = torch.einsum("tqr,tqs->rs", gq, xt)
    tol = 1e-2 if kind == "bf16" else 2e-3
    assert relative_error(da, ref_da) <= tol and relative_error(db, ref_db) <= tol


# ---- sketches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [NORMAL, SIGN, UNIFORM])
def test_philox_fill_kernel(emulated_sketch, kind):
    out = torch.full((1001,), float("nan"))
    emulated_sketch.philox_fill_f32(ptr(out), ctypes.c_int64(out.numel()), kind,
                                    ctypes.c_uint64(77), ctypes.c_uint64(3), 2)  # fmt: skip
    ref = philox_fill_reference(torch.empty(1001, dtype=torch.float64), kind, 77, 3)
    assert float((out.double() - ref).abs().max()) <= 1e-5


def test_srht_rows_kernel(emulated_sketch):
    rows, n, n2, l = 5, 13, 16, 6
    a, signs = torch.randn(rows, n), torch.randn(n).sign()
    cols = torch.randperm(n2)[:l]
    out = torch.full((rows, l), float("nan"))
    emulated_sketch.srht_rows_f32(ptr(a), ctypes.c_int64(rows), ctypes.c_int64(n), ptr(signs),
                                  ptr(cols), ctypes.c_int64(l), ctypes.c_int64(n2),
                                  ctypes.c_float(0.5), ptr(out), 2)  # fmt: skip
    assert (
        relative_error(out, srht_rows_reference(a.double(), signs.double(), cols, n2, 0.5)) <= 1e-5
    )


def test_sparse_sign_rows_kernel(emulated_sketch):
    rows, n, l, z = 4, 17, 7, 3
    a = torch.randn(rows, n)
    cols = torch.stack([torch.randperm(l)[:z] for _ in range(n)]).to(torch.int32)
    signs = torch.randn(n, z).sign()
    out = torch.full((rows, l), float("nan"))
    emulated_sketch.sparse_sign_rows_f32(ptr(a), ctypes.c_int64(rows), ctypes.c_int64(n),
                                         ptr(cols), ptr(signs), ctypes.c_int64(z),
                                         ctypes.c_int64(l), ptr(out), 3)  # fmt: skip
    ref = sparse_sign_rows_reference(a.double(), cols, signs.double(), l)
    assert relative_error(out, ref) <= 1e-5


# ---- Monarch ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulated_monarch(tmp_path_factory):
    return build("monarch_entry.cpp", tmp_path_factory.mktemp("emulation"))


MONARCH_SHAPES = [(3, 4, 3, 4, 6, 2, 2), (5, 2, 6, 3, 4, 5, 3), (2, 4, 4, 4, 4, 4, 4)]


@pytest.mark.parametrize("tokens, k, q, p, l, s, r", MONARCH_SHAPES)
def test_monarch_kernels(emulated_monarch, tokens, k, q, p, l, s, r):
    x, w1, w2 = torch.randn(tokens, k * p), torch.randn(k, q, p), torch.randn(l, s, r)
    y = torch.full((tokens, l * s), float("nan"))
    emulated_monarch.monarch_forward_f32(ptr(x), ptr(w1), ptr(w2), ptr(y), ctypes.c_int64(tokens),
                                         k, q, p, l, s, r, 2)  # fmt: skip
    assert relative_error(y, monarch_matmul_reference(x.double(), w1.double(), w2.double())) <= 1e-5
    dy = torch.randn(tokens, l * s)
    dx = torch.full_like(x, float("nan"))
    dw1, dw2 = torch.full_like(w1, float("nan")), torch.full_like(w2, float("nan"))
    workspace = torch.full((2 * tokens * k * q,), float("nan"))
    emulated_monarch.monarch_backward_f32(ptr(dy), ptr(x), ptr(w1), ptr(w2), ptr(dx), ptr(dw1),
                                          ptr(dw2), ptr(workspace), ctypes.c_int64(tokens), k, q,
                                          p, l, s, r, 2)  # fmt: skip
    refs = monarch_matmul_backward_reference(dy.double(), x.double(), w1.double(), w2.double(),
                                             True, True, True)  # fmt: skip
    for got, ref in zip((dx, dw1, dw2), refs):
        assert relative_error(got, ref) <= 1e-5


@st.composite
def monarch_shapes(draw):
    """(k, q, p, l, s, r) with k q = l r (the Monarch constraint), any sizes (padding)."""
    k, l = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    mid = k * l * draw(st.integers(1, 5))
    return k, mid // k, draw(st.integers(1, 18)), l, draw(st.integers(1, 18)), mid // l


def run_monarch_tc(emulated, kind, shape, src, transposed):
    """The emulated tensor-core kernel on ``src`` (x, or dy when transposed): (out, w1, w2)."""
    k, q, p, l, s, r = shape
    dtype = LOW[kind]
    tokens = src.shape[0]
    w1, w2 = torch.randn(k, q, p).to(dtype), torch.randn(l, s, r).to(dtype)
    out = torch.full((tokens, k * p if transposed else l * s), float("nan"), dtype=dtype)
    getattr(emulated, f"monarch_tc_{kind}")(ptr(src), ptr(w1), ptr(w2), ptr(out),
                                            ctypes.c_int64(tokens), k, q, p, l, s, r,
                                            int(transposed), 2)  # fmt: skip
    return out, w1, w2


def check_monarch_tc(out, ref, full, kind):
    """``ref`` models the kernel's rounding (the intermediate rounded to the storage dtype);
    ``full`` is the exact product, which the model must agree with."""
    if out.shape[0] == 0:
        return
    assert relative_error(ref, full) <= 2e-2  # the rounding model is right
    assert relative_error(out, ref) <= (1e-2 if kind == "bf16" else 2e-3)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(tokens=st.integers(0, 20), shape=monarch_shapes(), kind=st.sampled_from(["f16", "bf16"]))
def test_monarch_forward_tensor_core_kernel(emulated_monarch, tokens, shape, kind):
    k, q, p, l, s, r = shape
    x = torch.randn(tokens, k * p).to(LOW[kind])
    y, w1, w2 = run_monarch_tc(emulated_monarch, kind, shape, x, transposed=False)
    h = torch.einsum("kqp,tkp->tkq", w1.double(), x.double().reshape(tokens, k, p))
    h = rounded(h.reshape(tokens, k * q), LOW[kind])
    z = h.reshape(tokens, r, l).transpose(1, 2)  # block ll, row rr: h[rr * l + ll]
    u = torch.einsum("lsr,tlr->tls", w2.double(), z)
    ref = u.transpose(1, 2).reshape(tokens, s * l)  # y[ss * l + ll] = u[ll, ss]
    check_monarch_tc(y, ref, monarch_matmul_reference(x.double(), w1.double(), w2.double()), kind)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(tokens=st.integers(0, 20), shape=monarch_shapes(), kind=st.sampled_from(["f16", "bf16"]))
def test_monarch_transposed_tensor_core_kernel(emulated_monarch, tokens, shape, kind):
    """dx = M^T dy: the same kernel with the stages' roles swapped."""
    k, q, p, l, s, _ = shape
    dy = torch.randn(tokens, l * s).to(LOW[kind])
    dx, w1, w2 = run_monarch_tc(emulated_monarch, kind, shape, dy, transposed=True)
    du = dy.double().reshape(tokens, s, l)  # du[t, ss, ll] = dy[t, ss * l + ll]
    dz = torch.einsum("lsr,tsl->trl", w2.double(), du)  # dh[t, rr * l + ll]
    dh = rounded(dz.reshape(tokens, k * q), LOW[kind]).reshape(tokens, k, q)
    ref = torch.einsum("kqp,tkq->tkp", w1.double(), dh).reshape(tokens, k * p)
    x = torch.zeros(tokens, k * p, dtype=torch.float64)
    full = monarch_matmul_backward_reference(dy.double(), x, w1.double(), w2.double(), True,
                                             False, False)[0]  # fmt: skip
    check_monarch_tc(dx, ref, full, kind)


# ---- SLTrain ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulated_sltrain(tmp_path_factory):
    return build("sltrain_entry.cpp", tmp_path_factory.mktemp("emulation"))


@pytest.mark.parametrize("out, inp, nnz, tokens", [(9, 7, 20, 5), (40, 50, 700, 70), (3, 4, 1, 1)])
def test_sltrain_kernels(emulated_sltrain, out, inp, nnz, tokens):
    rank = 3
    b, a = torch.randn(out, rank), torch.randn(rank, inp)
    idx = torch.sort(torch.randperm(out * inp)[:nnz]).values.to(torch.int32)
    values = torch.randn(nnz)
    s = torch.zeros(out * inp)
    s[idx.long()] = values
    s = s.view(out, inp)
    w = torch.full((out, inp), float("nan"))
    emulated_sltrain.sltrain_rebuild_f32(
        ptr(b), ptr(a), ptr(values), ptr(idx), ctypes.c_int64(nnz), ctypes.c_float(0.5), ptr(w),
        ctypes.c_int64(out), ctypes.c_int64(inp), rank, 3,
    )  # fmt: skip
    assert relative_error(w, 0.5 * b.double() @ a.double() + s.double()) <= 1e-5
    x = torch.randn(tokens, inp)
    for transpose, src, width, ref in [(False, x, out, x @ s.T),
                                       (True, torch.randn(tokens, out), inp, None)]:  # fmt: skip
        ref = src @ s if transpose else ref
        y = torch.zeros(tokens, width)
        emulated_sltrain.sparse_rows_f32(ptr(src), ctypes.c_int64(tokens),
                                         ctypes.c_int64(src.shape[1]), ptr(values), ptr(idx),
                                         ctypes.c_int64(nnz), ctypes.c_int64(inp), transpose,
                                         ptr(y), ctypes.c_int64(width), 2)  # fmt: skip
        assert relative_error(y, ref) <= 1e-5
    dy = torch.randn(tokens, out)
    g = torch.full((nnz,), float("nan"))
    emulated_sltrain.sampled_dot_f32(ptr(dy), ptr(x), ctypes.c_int64(tokens), ctypes.c_int64(out),
                                     ctypes.c_int64(inp), ptr(idx), ctypes.c_int64(nnz), ptr(g),
                                     2)  # fmt: skip
    assert relative_error(g, (dy.T @ x).reshape(-1)[idx.long()]) <= 1e-5
