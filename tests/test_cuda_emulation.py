"""The CUDA kernels' own source, compiled for the CPU and run under tests/cuda_emulation.

Each CUDA thread becomes a host thread and ``__syncthreads`` a barrier, so the
kernels' index math, shared-memory layout, barriers and reductions are checked against
the references on machines without a GPU (CI). The threads of a block run one at a time
in an adversarial order (``emulate.h``), so a missing barrier fails deterministically;
alignment, ``ldm``, warp-wide WMMA calls and shared-memory overruns are checked as they
happen. Races between blocks and speed are not: those need a GPU (``pytest -m cuda``,
``scripts/gpu-check``). ``scripts/sanitize --emulation`` runs these tests under
ThreadSanitizer with the threads running in parallel.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import relative_error
from hypothesis import assume, given, settings
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
# scripts/sanitize sets these: the libraries built with -fsanitize=thread, threads in parallel.
SANITIZE = os.environ.get("LOWRANK_EMULATION_SANITIZE", "")
ADVERSARIAL = os.environ.get("LOWRANK_EMULATION_SCHEDULE", "adversarial") == "adversarial"
needs_adversarial = pytest.mark.skipif(
    not ADVERSARIAL, reason="shows what the adversarial schedule catches"
)

# (shared memory one block may use, multiprocessors) of the GPUs the launch plans are made for
H100 = (227 * 1024, 132)
A100 = (163 * 1024, 108)
T4 = (64 * 1024, 40)
ONE_SM = (48 * 1024, 1)  # few blocks: they stride over the tokens


def cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_fp16.h").exists():
            return Path(root) / "include"
    return None


class EmulationError(AssertionError):
    """A check of the emulation failed while a kernel ran (emulate.h, wmma.h)."""


class Emulation:
    """An emulation library: calling an entry point raises EmulationError when the
    emulator caught an error during the call."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library
        library.emulation_take_error.restype = ctypes.c_char_p
        library.emulation_barrier_sites.restype = ctypes.c_char_p

    def __getattr__(self, name: str):
        function = getattr(self.library, name)

        def call(*args):
            result = function(*args)
            error = self.library.emulation_take_error()
            if error:
                raise EmulationError(error.decode())
            return result

        return call


def build(entry: str, folder: Path) -> Emulation:
    """Compiles tests/cuda_emulation/<entry> with the kernels it includes, for the CPU."""
    include = cuda_include()
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if include is None or compiler is None:
        pytest.skip("needs the CUDA headers and a C++20 compiler")
    library = folder / (Path(entry).stem + ".so")
    sanitize = [f"-fsanitize={SANITIZE}", "-g"] if SANITIZE else []
    command = [
        compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", *sanitize,
        f"-I{HERE}", f"-I{ROOT / 'cuda'}", f"-I{ROOT / 'cpp' / 'include'}", f"-I{include}",
        str(HERE / entry), "-o", str(library),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return Emulation(ctypes.CDLL(str(library)))


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return build("kron_entry.cpp", tmp_path_factory.mktemp("emulation"))


@pytest.fixture(scope="module")
def emulated_sketch(tmp_path_factory):
    return build("sketch_entry.cpp", tmp_path_factory.mktemp("emulation"))


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def gpu(device: tuple[int, int]) -> tuple[ctypes.c_int64, int]:
    """The trailing (shared bytes, multiprocessors) arguments of an entry point."""
    return ctypes.c_int64(device[0]), device[1]


SHAPES = [(11, 3, 4, 5, 6), (3, 8, 2, 3, 9), (4, 1, 7, 6, 1), (2, 6, 6, 5, 5), (0, 2, 2, 2, 2)]


@pytest.mark.parametrize("tokens, p, q, r, s", SHAPES)
@pytest.mark.parametrize("with_addend", [False, True])
def test_forward_kernel(emulated, tokens, p, q, r, s, with_addend):
    x, a, b = torch.randn(tokens, q * s), torch.randn(p, q), torch.randn(r, s)
    addend = torch.randn(tokens, p * r) if with_addend else None
    y = torch.full((tokens, p * r), float("nan"))
    # one multiprocessor: 8 blocks, so 11 tokens run the grid-stride loop
    emulated.kron_forward_f32(ptr(x), ptr(a), ptr(b), ptr(addend), ctypes.c_float(0.75), ptr(y),
                              ctypes.c_int64(tokens), p, q, r, s, *gpu(ONE_SM))  # fmt: skip
    ref = 0.75 * (x.double() @ torch.kron(a, b).double().T)
    if with_addend:
        ref += addend.double()
    assert relative_error(y, ref) <= 1e-5 if tokens else y.numel() == 0


def test_forward_kernel_bfloat16(emulated):
    tokens, p, q, r, s = 6, 4, 5, 3, 4
    x, a, b = (torch.randn(*shape).bfloat16() for shape in [(tokens, q * s), (p, q), (r, s)])
    y = torch.full((tokens, p * r), float("nan"), dtype=torch.bfloat16)
    emulated.kron_forward_bf16(ptr(x), ptr(a), ptr(b), ptr(None), ctypes.c_float(1.0), ptr(y),
                               ctypes.c_int64(tokens), p, q, r, s, *gpu(ONE_SM))  # fmt: skip
    ref = x.double() @ torch.kron(a.double(), b.double()).T
    # float32 accumulation, one rounding to bfloat16 at the end
    assert relative_error(y, ref) <= 8e-3


@pytest.mark.parametrize("tokens, p, q, r, s", SHAPES[:4])
def test_factor_gradient_kernel(emulated, tokens, p, q, r, s):
    x, a, b = torch.randn(tokens, q * s), torch.randn(p, q), torch.randn(r, s)
    dy = torch.randn(tokens, p * r)
    da, db = torch.zeros(p, q), torch.zeros(r, s)
    emulated.kron_factor_grads_f32(ptr(dy), ptr(x), ptr(a), ptr(b), ptr(da), ptr(db),
                                   ctypes.c_int64(tokens), p, q, r, s, *gpu(ONE_SM))  # fmt: skip
    _, ref_da, ref_db = kron_matmul_backward_reference(
        dy.double(), x.double(), a.double(), b.double(), False, True
    )
    assert relative_error(da, ref_da) <= 1e-5
    assert relative_error(db, ref_db) <= 1e-5


# ---- Kronecker, tensor-core kernels (emulated WMMA) ---------------------------------------------

LOW = {"f16": torch.float16, "bf16": torch.bfloat16}
factor_size = st.integers(1, 20)  # padding to the 16-wide WMMA tile is exercised throughout
# Small shared memories: the plan picks tiles of 1 to 8 tokens for these factors.
small_gpu = st.sampled_from([(12 * 1024, 1), (24 * 1024, 1), ONE_SM])


def rounded(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype).double()


def kron_tc_plan(emulated, tokens, p, q, r, s, grads, device) -> tuple[int, int, int, int]:
    """(tile, grid, shared bytes, workspace floats) that cuda/kron.cu launches on ``device``."""
    plan = (ctypes.c_int64 * 4)()
    emulated.kron_tc_plan(ctypes.c_int64(tokens), p, q, r, s, int(grads), *gpu(device), plan)
    return tuple(plan)


def run_kron_tc_forward(emulated, kind, x, a, b, addend, scale, device):
    (p, q), (r, s) = a.shape, b.shape
    tokens = x.shape[0]
    y = torch.full((tokens, p * r), float("nan"), dtype=LOW[kind])
    getattr(emulated, f"kron_forward_tc_{kind}")(
        ptr(x), ptr(a), ptr(b), ptr(addend), ctypes.c_float(scale), ptr(y), ctypes.c_int64(tokens),
        p, q, r, s, *gpu(device))  # fmt: skip
    return y


def check_kron_tc_forward(y, x, a, b, addend, scale, kind):
    tokens, (p, q), (r, s) = x.shape[0], a.shape, b.shape
    # the kernel's rounding: Z = X b^T rounded to the storage dtype, float32 accumulation
    z = rounded(x.double().reshape(tokens, q, s) @ b.double().T, LOW[kind])
    ref = scale * (a.double() @ z).reshape(tokens, p * r)
    if addend is not None:
        ref += addend.double()
    if tokens:
        assert relative_error(y, ref) <= (1e-2 if kind == "bf16" else 2e-3)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    tokens=st.integers(0, 9),
    p=factor_size,
    q=factor_size,
    r=factor_size,
    s=factor_size,
    device=small_gpu,
    kind=st.sampled_from(["f16", "bf16"]),
    with_addend=st.booleans(),
)
def test_forward_tensor_core_kernel(emulated, tokens, p, q, r, s, device, kind, with_addend):
    assume(kron_tc_plan(emulated, tokens, p, q, r, s, False, device)[0] > 0)  # the factors fit
    dtype = LOW[kind]
    x, a, b = (torch.randn(*shape).to(dtype) for shape in [(tokens, q * s), (p, q), (r, s)])
    addend = torch.randn(tokens, p * r).to(dtype) if with_addend else None
    y = run_kron_tc_forward(emulated, kind, x, a, b, addend, 0.5, device)
    check_kron_tc_forward(y, x, a, b, addend, 0.5, kind)


def run_kron_tc_grads(emulated, kind, dy, x, a, b, device):
    """da, db from the emulated factor-gradient kernel, with the workspace lowrank.ops.kron
    allocates (blocks * (p q + r s) floats, NaN-poisoned)."""
    (p, q), (r, s) = a.shape, b.shape
    tokens = x.shape[0]
    _, blocks, _, floats = kron_tc_plan(emulated, tokens, p, q, r, s, True, device)
    assert floats == blocks * (p * q + r * s)
    workspace = torch.full((max(1, floats),), float("nan"))
    da, db = torch.full((p, q), float("nan")), torch.full((r, s), float("nan"))
    getattr(emulated, f"kron_factor_grads_tc_{kind}")(
        ptr(dy), ptr(x), ptr(a), ptr(b), ptr(workspace), ptr(da), ptr(db),
        ctypes.c_int64(tokens), p, q, r, s, *gpu(device))  # fmt: skip
    return da, db


def check_kron_tc_grads(da, db, dy, x, a, b, kind):
    tokens, (p, q), (r, s) = x.shape[0], a.shape, b.shape
    xt, g = x.double().reshape(tokens, q, s), dy.double().reshape(tokens, p, r)
    z = rounded(xt @ b.double().T, LOW[kind])  # X b^T as the kernel keeps it
    gq = rounded(a.double().T @ g, LOW[kind])  # a^T dY likewise
    tol = 1e-2 if kind == "bf16" else 2e-3
    assert relative_error(da, torch.einsum("tpr,tqr->pq", g, z)) <= tol
    assert relative_error(db, torch.einsum("tqr,tqs->rs", gq, xt)) <= tol


@settings(max_examples=5, deadline=None, derandomize=True)
@given(
    tokens=st.integers(1, 5),
    p=factor_size,
    q=factor_size,
    r=factor_size,
    s=factor_size,
    device=small_gpu,
    kind=st.sampled_from(["f16", "bf16"]),
)
def test_factor_gradient_tensor_core_kernel(emulated, tokens, p, q, r, s, device, kind):
    assume(kron_tc_plan(emulated, tokens, p, q, r, s, True, device)[0] > 0)
    dtype = LOW[kind]
    x, a, b = (torch.randn(*shape).to(dtype) for shape in [(tokens, q * s), (p, q), (r, s)])
    dy = torch.randn(tokens, p * r).to(dtype)
    first = run_kron_tc_grads(emulated, kind, dy, x, a, b, device)
    again = run_kron_tc_grads(emulated, kind, dy, x, a, b, device)
    assert all(torch.equal(u, v) for u, v in zip(first, again))  # deterministic: no atomics
    check_kron_tc_grads(*first, dy, x, a, b, kind)


@pytest.mark.parametrize(
    "device, forward_tile, grads_tile",
    [(H100, 4, 2), (A100, 4, 2), (T4, 1, 0), ((32 * 1024, 80), 0, 0)],
)
def test_kron_tensor_core_plan_64x64(emulated, device, forward_tile, grads_tile):
    """64x64 factors (in = out = 4096): the tile each GPU gets, or 0 where even one token's
    operands exceed its shared memory (the dispatch then leaves the kernel out)."""
    forward = kron_tc_plan(emulated, 4096, 64, 64, 64, 64, False, device)
    grads = kron_tc_plan(emulated, 4096, 64, 64, 64, 64, True, device)
    assert (forward[0], grads[0]) == (forward_tile, grads_tile)
    for tile, grid, smem, _ in (forward, grads):
        if tile:  # two blocks per multiprocessor, within the shared memory
            assert grid == min(-(-4096 // tile), 2 * device[1]) and smem <= device[0]


def test_kron_tensor_core_kernels_at_64x64(emulated):
    """The real size on an H100's plan: forward at tile 4 (two tiles, the last partial, with
    the fused residual) and the factor gradients at tile 2 (two tiles)."""
    p = q = r = s = 64
    x, a, b = torch.randn(6, q * s).bfloat16(), torch.randn(p, q).bfloat16(), torch.randn(r, s)
    b, addend = b.bfloat16(), torch.randn(6, p * r).bfloat16()
    assert kron_tc_plan(emulated, 6, p, q, r, s, False, H100)[:2] == (4, 2)
    y = run_kron_tc_forward(emulated, "bf16", x, a, b, addend, 0.5, H100)
    check_kron_tc_forward(y, x, a, b, addend, 0.5, "bf16")
    x, dy = x[:3], torch.randn(3, p * r).bfloat16()
    assert kron_tc_plan(emulated, 3, p, q, r, s, True, H100)[:2] == (2, 2)
    check_kron_tc_grads(*run_kron_tc_grads(emulated, "bf16", dy, x, a, b, H100), dy, x, a, b,
                        "bf16")  # fmt: skip


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


MONARCH_SHAPES = [(3, 4, 3, 4, 6, 2, 2), (11, 2, 6, 3, 4, 5, 3), (2, 4, 4, 4, 4, 4, 4)]


@pytest.mark.parametrize("tokens, k, q, p, l, s, r", MONARCH_SHAPES)
def test_monarch_kernels(emulated_monarch, tokens, k, q, p, l, s, r):
    x, w1, w2 = torch.randn(tokens, k * p), torch.randn(k, q, p), torch.randn(l, s, r)
    y = torch.full((tokens, l * s), float("nan"))
    emulated_monarch.monarch_forward_f32(ptr(x), ptr(w1), ptr(w2), ptr(y), ctypes.c_int64(tokens),
                                         k, q, p, l, s, r, *gpu(ONE_SM))  # fmt: skip
    assert relative_error(y, monarch_matmul_reference(x.double(), w1.double(), w2.double())) <= 1e-5
    dy = torch.randn(tokens, l * s)
    dx = torch.full_like(x, float("nan"))
    dw1, dw2 = torch.full_like(w1, float("nan")), torch.full_like(w2, float("nan"))
    workspace = torch.full((2 * tokens * k * q,), float("nan"))
    emulated_monarch.monarch_backward_f32(ptr(dy), ptr(x), ptr(w1), ptr(w2), ptr(dx), ptr(dw1),
                                          ptr(dw2), ptr(workspace), ctypes.c_int64(tokens), k, q,
                                          p, l, s, r, *gpu(ONE_SM))  # fmt: skip
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


def run_monarch_tc(emulated, kind, shape, src, transposed, device=(227 * 1024, 1)):
    """The emulated tensor-core kernel on ``src`` (x, or dy when transposed): (out, w1, w2).
    One multiprocessor by default: two blocks stride over the tiles of 16 tokens."""
    k, q, p, l, s, r = shape
    dtype = LOW[kind]
    tokens = src.shape[0]
    w1, w2 = torch.randn(k, q, p).to(dtype), torch.randn(l, s, r).to(dtype)
    out = torch.full((tokens, k * p if transposed else l * s), float("nan"), dtype=dtype)
    getattr(emulated, f"monarch_tc_{kind}")(ptr(src), ptr(w1), ptr(w2), ptr(out),
                                            ctypes.c_int64(tokens), k, q, p, l, s, r,
                                            int(transposed), *gpu(device))  # fmt: skip
    return out, w1, w2


def check_monarch_tc(out, ref, full, kind):
    """``ref`` models the kernel's rounding (the intermediate rounded to the storage dtype);
    ``full`` is the exact product, which the model must agree with."""
    if out.shape[0] == 0:
        return
    assert relative_error(ref, full) <= 2e-2  # the rounding model is right
    assert relative_error(out, ref) <= (1e-2 if kind == "bf16" else 2e-3)


def check_monarch_tc_forward(y, x, w1, w2, kind):
    tokens, (k, q, p), (l, s, r) = x.shape[0], w1.shape, w2.shape
    h = torch.einsum("kqp,tkp->tkq", w1.double(), x.double().reshape(tokens, k, p))
    h = rounded(h.reshape(tokens, k * q), LOW[kind])
    z = h.reshape(tokens, r, l).transpose(1, 2)  # block ll, row rr: h[rr * l + ll]
    u = torch.einsum("lsr,tlr->tls", w2.double(), z)
    ref = u.transpose(1, 2).reshape(tokens, s * l)  # y[ss * l + ll] = u[ll, ss]
    check_monarch_tc(y, ref, monarch_matmul_reference(x.double(), w1.double(), w2.double()), kind)


def check_monarch_tc_transposed(dx, dy, w1, w2, kind):
    tokens, (k, q, p), (l, s, _) = dy.shape[0], w1.shape, w2.shape
    du = dy.double().reshape(tokens, s, l)  # du[t, ss, ll] = dy[t, ss * l + ll]
    dz = torch.einsum("lsr,tsl->trl", w2.double(), du)  # dh[t, rr * l + ll]
    dh = rounded(dz.reshape(tokens, k * q), LOW[kind]).reshape(tokens, k, q)
    ref = torch.einsum("kqp,tkq->tkp", w1.double(), dh).reshape(tokens, k * p)
    x = torch.zeros(tokens, k * p, dtype=torch.float64)
    full = monarch_matmul_backward_reference(dy.double(), x, w1.double(), w2.double(), True,
                                             False, False)[0]  # fmt: skip
    check_monarch_tc(dx, ref, full, kind)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(tokens=st.integers(0, 40), shape=monarch_shapes(), kind=st.sampled_from(["f16", "bf16"]))
def test_monarch_forward_tensor_core_kernel(emulated_monarch, tokens, shape, kind):
    k, _, p, *_ = shape
    x = torch.randn(tokens, k * p).to(LOW[kind])
    y, w1, w2 = run_monarch_tc(emulated_monarch, kind, shape, x, transposed=False)
    check_monarch_tc_forward(y, x, w1, w2, kind)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(tokens=st.integers(0, 40), shape=monarch_shapes(), kind=st.sampled_from(["f16", "bf16"]))
def test_monarch_transposed_tensor_core_kernel(emulated_monarch, tokens, shape, kind):
    """dx = M^T dy: the same kernel with the stages' roles swapped."""
    *_, l, s, _ = shape
    dy = torch.randn(tokens, l * s).to(LOW[kind])
    dx, w1, w2 = run_monarch_tc(emulated_monarch, kind, shape, dy, transposed=True)
    check_monarch_tc_transposed(dx, dy, w1, w2, kind)


@pytest.mark.parametrize("transposed", [False, True])
def test_monarch_tensor_core_kernel_at_4096(emulated_monarch, transposed):
    """The real size: 4096 features in 64 blocks of 64, about 194 KiB of shared memory per
    block, which an H100 has and an A100 does not; one tile of 16 tokens, three of them live."""
    shape = (64,) * 6
    plan = (ctypes.c_int64 * 2)()
    emulated_monarch.monarch_tc_plan(ctypes.c_int64(3), *shape, int(transposed), *gpu(H100), plan)
    assert tuple(plan) == (1, 198656) and plan[1] > A100[0]
    src = torch.randn(3, 4096).bfloat16()
    out, w1, w2 = run_monarch_tc(emulated_monarch, "bf16", shape, src, transposed, H100)
    if transposed:
        check_monarch_tc_transposed(out, src, w1, w2, "bf16")
    else:
        check_monarch_tc_forward(out, src, w1, w2, "bf16")


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


# ---- the emulation's own checks, on kernels with one deliberate mistake --------------------------


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    if SANITIZE:
        pytest.skip("deliberate mistakes, some of them races a sanitizer rightly reports")
    return build("broken_entry.cpp", tmp_path_factory.mktemp("emulation"))


def test_correct_tile_kernel_passes(broken):
    out = torch.full((16, 16), float("nan"))
    broken.tile_product(ptr(out), 0, 16, -1, -1)
    assert torch.equal(out, torch.full((16, 16), 16.0))


@pytest.mark.parametrize(
    "offset, ldm, message",
    [(8, 16, "pointer not 32-byte (256-bit) aligned"),  # 16 bytes off
     (0, 20, "ldm 20 is not a multiple of 8 elements")],
)  # fmt: skip
def test_wmma_alignment_and_ldm_are_checked(broken, offset, ldm, message):
    out = torch.full((16, 16), float("nan"))
    with pytest.raises(EmulationError, match=re.escape(message)):
        broken.tile_product(ptr(out), offset, ldm, -1, -1)


def test_a_lane_skipping_mma_sync_is_caught(broken):
    out = torch.full((16, 16), float("nan"))
    with pytest.raises(
        EmulationError, match=r"thread 5 waits at broken_entry.cpp:\d+ while others"
    ):
        broken.tile_product(ptr(out), 0, 16, 5, -1)


def test_a_lane_skipping_syncwarp_is_caught(broken):
    out = torch.full((16, 16), float("nan"))
    with pytest.raises(EmulationError, match=r"thread 3 waits at broken_entry.cpp:\d+ while"):
        broken.tile_product(ptr(out), 0, 16, -1, 3)


def test_shared_memory_overrun_is_caught(broken):
    broken.fill_shared(64)  # all of it
    with pytest.raises(EmulationError, match="wrote byte 256 of shared memory, beyond the 256"):
        broken.fill_shared(65)


@pytest.mark.parametrize(
    "mode, message",
    [(1, "all threads must reach the same barrier"),
     (2, "32 thread(s) returned while the others wait")],
)  # fmt: skip
def test_divergent_barriers_are_caught(broken, mode, message):
    broken.divergent(0)
    with pytest.raises(EmulationError, match=re.escape(message)):
        broken.divergent(mode)


@needs_adversarial
def test_a_missing_syncthreads_fails_every_time(broken):
    x = torch.arange(256.0)
    y = torch.full_like(x, float("nan"))
    broken.rotate(ptr(x), ptr(y), 256, 1)
    assert torch.equal(y, x.roll(-1))
    for _ in range(3):  # not by timing luck: the schedule runs a reader before its writer
        y.fill_(float("nan"))
        broken.rotate(ptr(x), ptr(y), 256, 0)
        assert y.isnan().any()


@needs_adversarial
def test_reading_a_wmma_store_without_syncwarp_fails(broken):
    out = torch.full((16, 16), float("nan"))
    broken.read_back(ptr(out), 1)
    assert torch.equal(out, torch.full((16, 16), 32.0))
    out.fill_(float("nan"))
    broken.read_back(ptr(out), 0)  # each lane reads elements other lanes store
    assert out.isnan().any()


@needs_adversarial
def test_removing_any_barrier_of_the_tensor_core_gradient_kernel_is_caught(emulated):
    """Each barrier the factor-gradient kernel reaches, left out in turn, changes the result:
    the adversarial schedule turns every missing barrier of a real kernel into wrong output.
    (Four blocks' worth of tiles on two blocks, so the loop's barriers matter too.)"""
    kind, tokens, (p, q, r, s), device = "f16", 13, (5, 7, 6, 9), (24 * 1024, 1)
    x, a, b = (torch.randn(*shape).half() for shape in [(tokens, q * s), (p, q), (r, s)])
    dy = torch.randn(tokens, p * r).half()
    emulated.emulation_barrier_sites()
    check_kron_tc_grads(*run_kron_tc_grads(emulated, kind, dy, x, a, b, device), dy, x, a, b, kind)
    sites = emulated.library.emulation_barrier_sites().decode().split()
    assert sites and all(site.startswith("kron_kernels.cuh:") for site in sites)
    try:
        for site in sites:
            file, line = site.split(":")
            emulated.emulation_skip_barrier(file.encode(), int(line))
            with pytest.raises(AssertionError):
                check_kron_tc_grads(*run_kron_tc_grads(emulated, kind, dy, x, a, b, device), dy, x,
                                    a, b, kind)  # fmt: skip
    finally:
        emulated.emulation_skip_barrier(b"", 0)
