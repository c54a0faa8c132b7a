"""Sparse-plus-low-rank products (SLTrain: Han et al., NeurIPS 2024).

``sltrain_matmul(x, B, A, values, indices, scale, bias)`` returns
``x @ (scale * B @ A + S).T + bias`` where ``S`` (``out x in``) holds ``values`` at
the sorted, unique flat positions ``indices`` (``row * in + col``; int32 when
``out * in`` fits, else int64).

Two paths, each with a native and a composite implementation; ``lowrank.dispatch``
measures which of the four runs (``path="rebuild"`` or ``"factored"`` restricts it):

- rebuild (training-size token counts): ``W`` is built (natively in one fused pass,
  or by the GEMM library and a native in-place scatter of ``S``) and used for one GEMM;
  backward forms the dense gradient ``G = dy^T x`` once and reads ``dB = s G A^T``,
  ``dA = s B^T G`` and ``dvalues = G[indices]`` from it. ``dx = dy W`` needs ``W``
  again: a training forward keeps it when it is no larger than ``x`` (``out <= tokens``,
  so at most doubling what autograd holds for the product), else it is freed and
  backward rebuilds it (:func:`keeps_weight`).
- factored (small token counts, decoding): ``s (x A^T) B^T + x S^T`` with a native
  sparse kernel or torch's CSR product, never forming ``W``; backward gives
  ``dvalues`` by a sampled dense-dense product (:func:`sampled_dot`), never forming ``G``.

Every entry point checks the support (sorted, unique, in range) before a native kernel
sees it; a checked index tensor is remembered until it is modified.
"""

from __future__ import annotations

import math
import warnings

import torch

from lowrank import _native, dispatch
from lowrank import _validate as check
from lowrank.ops._library import (
    below_autograd,
    call,
    define,
    multilinear_jvp,
    register_autocast,
    register_autograd,
    register_fake,
    register_kernel,
    register_not_differentiable,
    run_below,
    tracing,
)

PATHS = {"auto": 0, "rebuild": 1, "factored": 2}
# Cost model (the static choice on the CPU when nothing was measured): a scattered sparse
# multiply-add costs about this many dense GEMM ones (lowrank/bench/bench_sltrain.py at n=1024,
# r=256, 3% nonzeros: the crossover is near 100 tokens).
SPARSE_COST = 60.0

_FORWARD = define(
    "sltrain_matmul(Tensor x, Tensor B, Tensor A, Tensor values, Tensor indices, float scale, "
    "Tensor? bias=None, int path=0) -> Tensor"
)
_BACKWARD = define(
    "sltrain_matmul_backward(Tensor grad, Tensor x, Tensor B, Tensor A, Tensor values, "
    "Tensor indices, float scale, int path, bool need_x, bool need_B, bool need_A, "
    "bool need_values, Tensor? w=None) -> (Tensor, Tensor, Tensor, Tensor)"
)
# The product and the rebuilt W (for backward), by the rebuild path.
_WITH_W = define(
    "sltrain_matmul_with_w(Tensor x, Tensor B, Tensor A, Tensor values, Tensor indices, "
    "float scale, Tensor? bias=None) -> (Tensor, Tensor)"
)
_REBUILD = define(
    "sltrain_rebuild(Tensor B, Tensor A, Tensor values, Tensor indices, float scale) -> Tensor"
)
_SPARSE = define(
    "sparse_matmul(Tensor x, Tensor values, Tensor indices, int rows, int cols, bool transpose)"
    " -> Tensor"
)
_SAMPLED = define("sampled_dot(Tensor dy, Tensor x, Tensor indices) -> Tensor")


def sltrain_matmul(x, B, A, values, indices, scale: float, bias=None, path: str = "auto"):
    """``x @ (scale * B @ A + S).T + bias`` (module docstring); differentiable in
    ``x``, ``B``, ``A``, ``values`` and ``bias``.

    Args:
        x: ``(..., in)``; B: ``(out, r)``; A: ``(r, in)``; values: ``(nnz,)``;
        indices: ``(nnz,)`` int32/int64, sorted, unique, in ``[0, out*in)``;
        scale: the low-rank scale (``alpha / r`` in SLTrain); bias: ``(out,)`` or None;
        path: ``"auto"`` (measured by ``lowrank.dispatch``), ``"rebuild"`` or ``"factored"``.
    """
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"path must be one of {tuple(PATHS)}, got {path!r}")
    scale = check.real("scale", scale)
    return call(_FORWARD, x, B, A, values, indices, scale, bias, PATHS[path])


def sltrain_rebuild(B, A, values, indices, scale: float) -> torch.Tensor:
    """The dense ``scale * B @ A + S`` (``out x in``)."""
    return call(_REBUILD, B, A, values, indices, check.real("scale", scale))


def sparse_matmul(x, values, indices, rows: int, cols: int, transpose: bool = False):
    """``x @ S.T`` for ``x`` of shape ``(T, cols)``; with ``transpose``, ``x @ S`` for ``x`` of
    shape ``(T, rows)``. ``S`` is ``rows x cols`` with ``values`` at the flat ``indices``."""
    return call(_SPARSE, x, values, indices, rows, cols, transpose)


def sampled_dot(dy, x, indices) -> torch.Tensor:
    """``(dy.T @ x).view(-1)[indices]`` without forming ``dy.T @ x``; ``dy`` is ``(T, out)``,
    ``x`` is ``(T, in)``."""
    return call(_SAMPLED, dy, x, indices)


def choose_path(tokens: int, out: int, inp: int, rank: int, nnz: int) -> str:
    """The cheaper path by a multiply-add count (sparse ones weighted by ``SPARSE_COST``)."""
    rebuild = out * inp * rank + tokens * out * inp
    factored = tokens * rank * (out + inp) + SPARSE_COST * tokens * nnz
    return "factored" if factored < rebuild else "rebuild"


# ---- references -----------------------------------------------------------------------------


def dense_sparse(values, indices, out, inp):
    s = values.new_zeros(out * inp)
    s.index_add_(0, indices.long(), values)
    return s.view(out, inp)


def sltrain_matmul_reference(x, B, A, values, indices, scale, bias=None, path="auto"):
    """Pure-PyTorch specification: rebuild ``W`` and multiply."""
    w = scale * B @ A + dense_sparse(values, indices, B.shape[0], A.shape[1])
    return torch.nn.functional.linear(x, w, bias)


# ---- checks ----------------------------------------------------------------------------------


def _check(x, B, A, values, indices, bias):
    try:  # one predicate on the hot path (torch.ops lets None through: no tensor at all)
        ok = (
            B.dim() == 2 and A.dim() == 2 and values.dim() == 1 and indices.dim() == 1
            and x.dim() >= 1 and x.dtype in check.FLOATING
            and x.dtype == B.dtype == A.dtype == values.dtype
            and indices.dtype in (torch.int32, torch.int64)
            and x.device == B.device == A.device == values.device == indices.device
            and B.shape[1] == A.shape[0] and x.shape[-1] == A.shape[1]
            and values.shape[0] == indices.shape[0]
            and (bias is None or (bias.shape == (B.shape[0],) and bias.dtype == x.dtype
                                  and bias.device == x.device))
        )  # fmt: skip
    except (AttributeError, TypeError):
        ok = False
    if ok:
        return B.shape[0], A.shape[1], B.shape[1]
    for name, t in (("x", x), ("B", B), ("A", A), ("values", values)):
        check.floating(name, t)
    check.tensor("indices", indices)
    check.min_ndim("x", x, 1, "(..., in)")
    check.ndim("B", B, 2, "(out, r)")
    check.ndim("A", A, 2, "(r, in)")
    _check_support_tensors(values, indices)
    check.same_dtype(x=x, B=B, A=A, values=values)
    check.same_device(x=x, B=B, A=A, values=values, indices=indices)
    check.size("A", A, 0, B.shape[1], "the rank r = B.shape[1]")
    check.size("x", x, -1, A.shape[1], "in = A.shape[1]")
    if bias is not None:
        check.floating("bias", bias)
        check.ndim("bias", bias, 1, "(out,)")
        check.same_dtype(bias=bias, x=x)
        check.same_device(bias=bias, x=x)
        check.size("bias", bias, 0, B.shape[0], "out = B.shape[0]")
    raise AssertionError("unreachable")


def _check_support_tensors(values, indices):
    check.tensor("indices", indices)
    check.ndim("values", values, 1, "(nnz,)")
    check.ndim("indices", indices, 1, "(nnz,)")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    check.size("indices", indices, 0, values.shape[0], "one index per value")


def check_support(indices: torch.Tensor, out: int, inp: int) -> None:
    """Indices sorted, unique and inside ``[0, out*in)`` (a full check, one pass).

    Native kernels index with them, so they are checked on every device before any
    pointer crosses. The check reads the indices back to the host; a tensor that passed is
    remembered (by its version counter, so an in-place change is checked again), which
    keeps a layer's fixed support from being re-read every step and lets a checked layer be
    captured in a CUDA graph.
    """
    stamp = (indices._version, out, inp)
    if getattr(indices, "_lowrank_checked", None) == stamp:
        return
    check.tensor("indices", indices)
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    check.ndim("indices", indices, 1, "(nnz,) flat positions")
    if indices.numel():
        if indices.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "sltrain indices must be checked before CUDA-graph capture: run the op once "
                "(a warm-up step) before capturing"
            )
        if indices.dtype == torch.int32 and out * inp > 2**31 - 1:
            raise ValueError(f"out*in = {out * inp} does not fit int32 indices; use int64")
        low, high = torch.aminmax(indices)
        if int(low) < 0 or int(high) >= out * inp:
            raise ValueError(f"indices must lie in [0, out*in) = [0, {out * inp}), got values "
                             f"in [{int(low)}, {int(high)}]")  # fmt: skip
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("indices must be sorted and unique (no repeated positions)")
    indices._lowrank_checked = stamp


def _index_code(indices):
    return 0 if indices.dtype == torch.int32 else 1


def _static_forward(rows, B, A, values, *args):
    """The cost model's path; native on the CPU, composite elsewhere."""
    path = choose_path(rows.shape[0], B.shape[0], A.shape[1], B.shape[1], values.numel())
    return f"{path}-{dispatch.default_kind(rows)}"


def _static_backward(g, rows, B, A, values, *args):
    return _static_forward(rows, B, A, values)


# ---- the rebuilt weight ----------------------------------------------------------------------


def _rebuild_native(B, A, values, indices, scale):
    """``W`` in one fused native pass (CPU: register-tiled ``B A`` rows with the nonzeros
    added while in cache; CUDA: low-rank kernel, then the scatter)."""
    if _native.upcast_on_cpu(B):
        return _rebuild_native(B.float(), A.float(), values.float(), indices, scale).to(B.dtype)
    (out, rank), inp = B.shape, A.shape[1]
    B, A = B.contiguous(), A.contiguous()
    values, indices = values.contiguous(), indices.contiguous()
    w = _native.new_output((out, inp), B)
    _native.module(B).sltrain_rebuild(
        _native.DTYPE_CODES[B.dtype], _index_code(indices), B.data_ptr(), A.data_ptr(),
        values.data_ptr(), indices.data_ptr(), indices.numel(), scale, w.data_ptr(), out, inp,
        rank, *_native.launch_args(B),
    )  # fmt: skip
    return w


def _scatter_add_(w, values, indices):
    """``W.view(-1)[indices] += values`` in place: the native scatter where it runs (no
    atomics: the indices are unique), else torch's indexed update."""
    if _native.unavailable(w) is None and not _native.upcast_on_cpu(w) and w.is_contiguous():
        values, indices = values.contiguous(), indices.contiguous()
        _native.module(w).sltrain_scatter(
            _native.DTYPE_CODES[w.dtype], _index_code(indices), values.data_ptr(),
            indices.data_ptr(), indices.numel(), w.data_ptr(), *_native.launch_args(w),
        )  # fmt: skip
        return w
    flat = w.view(-1)
    idx = indices.long()
    flat.index_put_((idx,), flat[idx] + values)
    return w


def _rebuild_composite(B, A, values, indices, scale):
    """``scale * B A`` on the GEMM library, then the nonzeros scattered in place."""
    return _scatter_add_(torch.mm(B * scale, A), values, indices)


# ---- sparse products: native kernels and torch's CSR ------------------------------------------


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _csr_structure(indices, rows, cols):
    """``(crow, col, order)`` of S in CSR and of S^T in CSR (``order`` permutes the values
    into S^T's order); computed once per support and kept on the index tensor."""
    stamp = (indices._version, rows, cols, indices.device)
    cached = getattr(indices, "_lowrank_csr", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    idx = indices.long()
    bounds = torch.arange(rows + 1, device=idx.device) * cols
    crow = torch.searchsorted(idx, bounds)
    r, c = idx // cols, idx % cols
    order = torch.argsort(c * rows + r)
    flat_t = c[order] * rows + r[order]
    crow_t = torch.searchsorted(flat_t, torch.arange(cols + 1, device=idx.device) * rows)
    structure = (crow, c, crow_t, r[order], order)
    indices._lowrank_csr = (stamp, structure)
    return structure


def _csr(values, indices, rows, cols, transpose):
    crow, col, crow_t, row_t, order = _csr_structure(indices, rows, cols)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        if transpose:
            return torch.sparse_csr_tensor(crow_t, row_t, values[order], (cols, rows),
                                           check_invariants=False)  # fmt: skip
        return torch.sparse_csr_tensor(crow, col, values, (rows, cols), check_invariants=False)


def _sparse_composite(x, values, indices, rows, cols, transpose):
    """``x S^T`` (or ``x S``) as a CSR product on torch's sparse library (float16/bfloat16
    in float32, which the sparse libraries do not all take)."""
    if x.dtype in _LOW_PRECISION:
        y = _sparse_composite(x.float(), values.float(), indices, rows, cols, transpose)
        return y.to(x.dtype)
    if x.shape[0] == 0 or values.numel() == 0:
        return x.new_zeros((x.shape[0], cols if transpose else rows))
    s = _csr(values, indices, rows, cols, transpose)  # S, or S^T when transposed
    return torch.sparse.mm(s, x.T).T.contiguous()


def _sparse_native(x, values, indices, rows, cols, transpose):
    width = cols if transpose else rows
    if _native.upcast_on_cpu(x):
        y = _sparse_native(x.float(), values.float(), indices, rows, cols, transpose)
        return y.to(x.dtype)
    x, values, indices = x.contiguous(), values.contiguous(), indices.contiguous()
    # CUDA accumulates with atomics into float32; the CPU writes each row itself.
    y = (_native.new_output((x.shape[0], width), x) if x.is_cpu
         else torch.zeros((x.shape[0], width), dtype=torch.float32, device=x.device))  # fmt: skip
    _native.module(x).sparse_rows(
        _native.DTYPE_CODES[x.dtype], _index_code(indices), x.data_ptr(), x.shape[0], x.shape[1],
        values.data_ptr(), indices.data_ptr(), indices.numel(), cols, transpose, y.data_ptr(),
        width, *_native.launch_args(x),
    )  # fmt: skip
    return y.to(x.dtype)


def _sampled_native(dy, x, indices):
    if _native.upcast_on_cpu(x):
        return _sampled_native(dy.float(), x.float(), indices).to(x.dtype)
    dy, x, indices = dy.contiguous(), x.contiguous(), indices.contiguous()
    g = _native.new_output((indices.numel(),), x)
    _native.module(x).sampled_dot(
        _native.DTYPE_CODES[x.dtype], _index_code(indices), dy.data_ptr(), x.data_ptr(),
        x.shape[0], dy.shape[1], x.shape[1], indices.data_ptr(), indices.numel(), g.data_ptr(),
        *_native.launch_args(x),
    )  # fmt: skip
    return g


def _sampled_composite(dy, x, indices):
    """``(dy^T x)`` at the support, by torch's sampled dense-dense product into CSR."""
    if x.dtype in _LOW_PRECISION:
        return _sampled_composite(dy.float(), x.float(), indices).to(x.dtype)
    out, inp = dy.shape[1], x.shape[1]
    if indices.numel() == 0 or x.shape[0] == 0:
        return x.new_zeros(indices.shape)
    pattern = _csr(x.new_zeros(indices.shape), indices, out, inp, False)
    return torch.sparse.sampled_addmm(pattern, dy.T, x, beta=0.0).values()


def _native_unavailable(x, *args):
    return _native.unavailable(x)


# ---- the product, both paths, both kinds ------------------------------------------------------


# The forward implementations write into ``out`` (the ``(tokens, out)`` view of the op's
# result), so the op returns a fresh tensor and never a view of an intermediate.


def _forward_rebuild(rebuild, with_w=False):
    def run(rows, B, A, values, indices, scale, bias, out):
        w = rebuild(B, A, values, indices, scale)
        if bias is None:
            torch.mm(rows, w.T, out=out)
        else:
            torch.addmm(bias, rows, w.T, out=out)
        return (out, w) if with_w else out

    return run


def _forward_factored(sparse):
    def run(rows, B, A, values, indices, scale, bias, out):
        sparse_part = sparse(rows, values, indices, B.shape[0], A.shape[1], False)
        torch.addmm(sparse_part, rows @ A.T, B.T, alpha=scale, out=out)
        return out if bias is None else out.add_(bias)

    return run


def _backward_rebuild(rebuild):
    def run(g, rows, B, A, values, indices, scale, need_x, need_b, need_a, need_v, w=None):
        empty = rows.new_empty(0)
        dx = empty
        if need_x:  # W as the forward kept it, else rebuilt and used once
            dx = g @ (rebuild(B, A, values, indices, scale) if w is None else w)
        db = da = dv = empty
        if need_b or need_a or need_v:
            dense = g.T @ rows  # the dense gradient, formed once
            db = torch.mm(dense, A.T).mul_(scale) if need_b else empty
            da = torch.mm(B.T, dense).mul_(scale) if need_a else empty
            dv = dense.view(-1)[indices.long()] if need_v else empty
        return dx, db, da, dv

    return run


def _backward_factored(sparse, sampled):
    def run(g, rows, B, A, values, indices, scale, need_x, need_b, need_a, need_v, w=None):
        empty = rows.new_empty(0)
        out, inp = B.shape[0], A.shape[1]
        gb = g @ B if (need_x or need_a) else None
        dx = empty
        if need_x:
            dx = torch.addmm(sparse(g, values, indices, out, inp, True), gb, A, alpha=scale)
        db = torch.mm(g.T, rows @ A.T).mul_(scale) if need_b else empty
        da = torch.mm(gb.T, rows).mul_(scale) if need_a else empty
        dv = sampled(g, rows, indices) if need_v else empty
        return dx, db, da, dv

    return run


_CUDA_ATOMICS = frozenset({"cuda"})
# Token-major arguments: the rows (0) and the output buffer (7), which every path overwrites.
_forward_dispatch = dispatch.Dispatcher("sltrain_matmul", (
    dispatch.Impl("rebuild-native", dispatch.NATIVE, _forward_rebuild(_rebuild_native),
                  _native_unavailable),
    dispatch.Impl("rebuild-composite", dispatch.COMPOSITE, _forward_rebuild(_rebuild_composite)),
    dispatch.Impl("factored-native", dispatch.NATIVE, _forward_factored(_sparse_native),
                  _native_unavailable, _CUDA_ATOMICS),
    dispatch.Impl("factored-composite", dispatch.COMPOSITE, _forward_factored(_sparse_composite)),
), _static_forward, (0, 7), out_args=(7,))  # fmt: skip
_backward_dispatch = dispatch.Dispatcher("sltrain_matmul_backward", (
    dispatch.Impl("rebuild-native", dispatch.NATIVE, _backward_rebuild(_rebuild_native),
                  _native_unavailable),
    dispatch.Impl("rebuild-composite", dispatch.COMPOSITE, _backward_rebuild(_rebuild_composite)),
    dispatch.Impl("factored-native", dispatch.NATIVE,
                  _backward_factored(_sparse_native, _sampled_native), _native_unavailable,
                  _CUDA_ATOMICS),
    dispatch.Impl("factored-composite", dispatch.COMPOSITE,
                  _backward_factored(_sparse_composite, _sampled_composite)),
), _static_backward, (0, 1))  # fmt: skip
_with_w_dispatch = dispatch.Dispatcher("sltrain_matmul_with_w", (
    dispatch.Impl("rebuild-native", dispatch.NATIVE,
                  _forward_rebuild(_rebuild_native, with_w=True), _native_unavailable),
    dispatch.Impl("rebuild-composite", dispatch.COMPOSITE,
                  _forward_rebuild(_rebuild_composite, with_w=True)),
), lambda rows, *args: f"rebuild-{dispatch.default_kind(rows)}", (0, 7),
   out_args=(7,))  # fmt: skip
_PATH_NAMES = {
    PATHS["rebuild"]: ("rebuild-native", "rebuild-composite"),
    PATHS["factored"]: ("factored-native", "factored-composite"),
}
_rebuild_dispatch = dispatch.Dispatcher("sltrain_rebuild", (
    dispatch.Impl("native", dispatch.NATIVE, _rebuild_native, _native_unavailable),
    dispatch.Impl("composite", dispatch.COMPOSITE, _rebuild_composite),
), dispatch.default_kind)  # fmt: skip
_sparse_dispatch = dispatch.Dispatcher("sparse_matmul", (
    dispatch.Impl("native", dispatch.NATIVE, _sparse_native, _native_unavailable, _CUDA_ATOMICS),
    dispatch.Impl("composite", dispatch.COMPOSITE, _sparse_composite),
), dispatch.default_kind, (0,))  # fmt: skip
_sampled_dispatch = dispatch.Dispatcher("sampled_dot", (
    dispatch.Impl("native", dispatch.NATIVE, _sampled_native,
                  lambda dy, x, indices: _native.unavailable(x)),
    dispatch.Impl("composite", dispatch.COMPOSITE, _sampled_composite),
), dispatch.default_kind, (0, 1))  # fmt: skip


def _key(x, tokens, out, inp, rank, nnz):
    return (x.dtype, dispatch.bucket(tokens), out, inp, rank, nnz)


def _forward_call(x, B, A, values, indices, scale, bias, path):
    """Checks the arguments; the forward dispatch's key, the result (unwritten) and the
    arguments of an implementation."""
    out, inp, rank = _check(x, B, A, values, indices, bias)
    check_support(indices, out, inp)
    tokens = math.prod(x.shape[:-1])
    rows = x.reshape(tokens, inp)
    result = x.new_empty((*x.shape[:-1], out))
    key = (*_key(x, tokens, out, inp, rank, values.numel()), bias is not None, path)
    return key, result, (rows, B, A, values, indices, scale, bias, result.view(tokens, out))


def _forward_kernel(x, B, A, values, indices, scale, bias=None, path=0):
    key, result, args = _forward_call(x, B, A, values, indices, scale, bias, path)
    _forward_dispatch(key, args[0], *args, names=_PATH_NAMES.get(path))
    return result


def _with_w_kernel(x, B, A, values, indices, scale, bias=None):
    key, result, args = _forward_call(x, B, A, values, indices, scale, bias, PATHS["rebuild"])
    _, w = _with_w_dispatch(key, args[0], *args)
    return result, w


def keeps_weight(x, B, A, values, indices, scale, bias=None, path=0) -> bool:
    """Whether a training forward keeps the rebuilt ``W`` for ``dx = dy W`` rather than
    having backward rebuild it (the caller asks only when ``x`` needs a gradient).

    Memory rule: ``W`` (``out x in``) is kept only when it is no larger than ``x``
    (``out <= tokens``), so keeping it at most doubles what autograd holds for the product.
    Speed: only the rebuild path forms ``W``, so it is kept only when the forward's dispatch
    runs a rebuild implementation for these sizes (measuring now if it has not yet). While
    tracing, ``W`` is not kept: the traced graph calls the dispatched forward, whose choice
    is made when it runs.
    """
    if tracing(x) or path == PATHS["factored"] or B.shape[0] > math.prod(x.shape[:-1]):
        return False
    key, _, args = _forward_call(x, B, A, values, indices, scale, bias, path)
    chosen = _forward_dispatch.choose(key, args[0], *args, names=_PATH_NAMES.get(path))
    return chosen.name.startswith("rebuild")


def _backward_kernel(grad, x, B, A, values, indices, scale, path, need_x, need_b, need_a, need_v,
                     w=None):  # fmt: skip
    out, inp, rank = _check(x, B, A, values, indices, None)
    _check_grad(grad, x, out)
    if w is not None:
        _check_w(w, x, out, inp)
    check_support(indices, out, inp)
    tokens = math.prod(x.shape[:-1])
    rows, g = x.reshape(tokens, inp), grad.reshape(tokens, out)
    key = (*_key(x, rows.shape[0], out, inp, rank, values.numel()), path, need_x, need_b,
           need_a, need_v, w is not None)  # fmt: skip
    needs = (need_x, need_b, need_a, need_v)
    dx, db, da, dv = _backward_dispatch(key, rows, g, rows, B, A, values, indices, scale, *needs,
                                        w, names=_PATH_NAMES.get(path))  # fmt: skip
    return (dx.reshape(x.shape) if need_x else dx), db, da, dv


def _check_w(w, x, out, inp):
    check.companion("w", w, x, (out, inp), "out, in")


def _check_grad(grad, x, out):
    check.companion("grad", grad, x, (*x.shape[:-1], out))


def _rebuild_kernel(B, A, values, indices, scale):
    for name, t in (("B", B), ("A", A), ("values", values)):
        check.floating(name, t)
    check.ndim("B", B, 2, "(out, r)")
    check.ndim("A", A, 2, "(r, in)")
    _check_support_tensors(values, indices)
    check.same_dtype(B=B, A=A, values=values)
    check.same_device(B=B, A=A, values=values, indices=indices)
    check.size("A", A, 0, B.shape[1], "the rank r = B.shape[1]")
    (out, rank), inp = B.shape, A.shape[1]
    check_support(indices, out, inp)
    key = (B.dtype, out, inp, rank, values.numel())
    return _rebuild_dispatch(key, B, B, A, values, indices, scale)


def _check_sparse(x, values, indices, rows, cols, transpose):
    check.floating("x", x)
    check.floating("values", values)
    check.ndim("x", x, 2, "(T, width)")
    _check_support_tensors(values, indices)
    check.same_dtype(x=x, values=values)
    check.same_device(x=x, values=values, indices=indices)
    check.positive_int("rows", rows)
    check.positive_int("cols", cols)
    check.size("x", x, 1, rows if transpose else cols,
               "rows (transpose=True)" if transpose else "cols")  # fmt: skip


def _sparse_kernel(x, values, indices, rows, cols, transpose):
    _check_sparse(x, values, indices, rows, cols, transpose)
    check_support(indices, rows, cols)
    key = (x.dtype, dispatch.bucket(x.shape[0]), rows, cols, values.numel(), transpose)
    return _sparse_dispatch(key, x, x, values, indices, rows, cols, transpose)


def _check_sampled(dy, x, indices):
    check.floating("dy", dy)
    check.floating("x", x)
    check.ndim("dy", dy, 2, "(T, out)")
    check.ndim("x", x, 2, "(T, in)")
    check.tensor("indices", indices)
    check.ndim("indices", indices, 1, "(nnz,)")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    check.same_dtype(dy=dy, x=x)
    check.same_device(dy=dy, x=x, indices=indices)
    check.size("x", x, 0, dy.shape[0], "the tokens of dy")
    if dy.shape[1] < 1 or x.shape[1] < 1:
        raise ValueError(f"dy and x need at least one column, got {tuple(dy.shape)} and "
                         f"{tuple(x.shape)}")  # fmt: skip


def _sampled_kernel(dy, x, indices):
    _check_sampled(dy, x, indices)
    check_support(indices, dy.shape[1], x.shape[1])
    key = (x.dtype, dispatch.bucket(x.shape[0]), dy.shape[1], x.shape[1], indices.numel())
    return _sampled_dispatch(key, x, dy, x, indices)


for _device in ("cpu", "cuda"):
    register_kernel(_FORWARD, _device)(_forward_kernel)
    register_kernel(_BACKWARD, _device)(_backward_kernel)
    register_kernel(_WITH_W, _device)(_with_w_kernel)
    register_kernel(_REBUILD, _device)(_rebuild_kernel)
    register_kernel(_SPARSE, _device)(_sparse_kernel)
    register_kernel(_SAMPLED, _device)(_sampled_kernel)


@register_fake(_FORWARD)
def _forward_fake(x, B, A, values, indices, scale, bias=None, path=0):
    out, _, _ = _check(x, B, A, values, indices, bias)
    return x.new_empty((*x.shape[:-1], out))


@register_fake(_WITH_W)
def _with_w_fake(x, B, A, values, indices, scale, bias=None):
    out, inp, _ = _check(x, B, A, values, indices, bias)
    return x.new_empty((*x.shape[:-1], out)), x.new_empty((out, inp))


@register_fake(_BACKWARD)
def _backward_fake(grad, x, B, A, values, indices, scale, path, need_x, need_b, need_a, need_v,
                   w=None):  # fmt: skip
    out, inp, _ = _check(x, B, A, values, indices, None)
    _check_grad(grad, x, out)
    if w is not None:
        _check_w(w, x, out, inp)
    empty = x.new_empty(0)
    return (x.new_empty(x.shape) if need_x else empty, B.new_empty(B.shape) if need_b else empty,
            A.new_empty(A.shape) if need_a else empty,
            values.new_empty(values.shape) if need_v else empty)  # fmt: skip


@register_fake(_REBUILD)
def _rebuild_fake(B, A, values, indices, scale):
    return B.new_empty((B.shape[0], A.shape[1]))


@register_fake(_SPARSE)
def _sparse_fake(x, values, indices, rows, cols, transpose):
    _check_sparse(x, values, indices, rows, cols, transpose)
    return x.new_empty((x.shape[0], cols if transpose else rows))


@register_fake(_SAMPLED)
def _sampled_fake(dy, x, indices):
    _check_sampled(dy, x, indices)
    return x.new_empty(indices.shape)


class _SLTrainMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, B, A, values, indices, scale, bias=None, path=0):
        w = None
        if ctx.needs_input_grad[0] and keeps_weight(x, B, A, values, indices, scale, bias, path):
            with below_autograd():
                y, w = _WITH_W(x, B, A, values, indices, scale, bias)
        else:
            y = run_below(_FORWARD, x, B, A, values, indices, scale, bias, path)
        ctx.save_for_backward(x, B, A, values, indices, w)
        ctx.scale, ctx.path, ctx.has_bias = scale, path, bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, B, A, values, indices, w = ctx.saved_tensors
        need_x, need_b, need_a, need_v = ctx.needs_input_grad[:4]
        dx, db, da, dv = _BACKWARD(grad, x, B, A, values, indices, ctx.scale, ctx.path, need_x,
                                   need_b, need_a, need_v, w)  # fmt: skip
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[6]:
            dbias = grad.reshape(math.prod(grad.shape[:-1]), grad.shape[-1]).sum(0)
        return (dx if need_x else None, db if need_b else None, da if need_a else None,
                dv if need_v else None, None, None, dbias, None)  # fmt: skip


def _jvp(primals, tangents):
    """``y`` is linear in ``x``, in ``(B, values)`` together, in ``A`` and in ``bias``."""
    x, B, A, values, indices, scale, _, path = primals
    tx, tb, ta, tv, _, _, tbias, _ = tangents
    no_values = values.new_zeros(values.shape)
    no_b = torch.zeros_like(B) if tb is None else tb
    terms = []
    if tx is not None:
        terms.append(_FORWARD(tx, B, A, values, indices, scale, None, path))
    if tb is not None or tv is not None:
        tv = no_values if tv is None else tv
        terms.append(_FORWARD(x, no_b, A, tv, indices, scale, None, path))
    if ta is not None:
        terms.append(_FORWARD(x, B, ta, no_values, indices, scale, None, path))
    if tbias is not None:
        terms.append(tbias.expand(*x.shape[:-1], B.shape[0]))
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


register_autograd(_FORWARD, _SLTrainMatmul, _jvp)
register_not_differentiable(_BACKWARD, "double backward through sltrain_matmul is not supported")
register_not_differentiable(_WITH_W, "it is sltrain_matmul's training forward; use sltrain_matmul")
register_autocast(_FORWARD)


# ---- the primitives are differentiable too: each is linear in its float arguments ----------


class _Rebuild(torch.autograd.Function):
    """``W = s B A + S``: ``dB = s G A^T``, ``dA = s B^T G``, ``dvalues = G[indices]``."""

    @staticmethod
    def forward(ctx, B, A, values, indices, scale):
        w = run_below(_REBUILD, B, A, values, indices, scale)
        ctx.save_for_backward(B, A, indices)
        ctx.scale = scale
        return w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        B, A, indices = ctx.saved_tensors
        need_b, need_a, need_v = ctx.needs_input_grad[:3]
        s = ctx.scale
        return (s * grad @ A.T if need_b else None, s * B.T @ grad if need_a else None,
                grad.reshape(-1)[indices.long()] if need_v else None, None, None)  # fmt: skip


def _rebuild_jvp(primals, tangents):
    B, A, values, indices, scale = primals
    tb, ta, tv = tangents[:3]
    out = None
    if tb is not None or tv is not None:
        tb = torch.zeros_like(B) if tb is None else tb
        tv = values.new_zeros(values.shape) if tv is None else tv
        out = _REBUILD(tb, A, tv, indices, scale)
    if ta is not None:
        term = _REBUILD(B, ta, values.new_zeros(values.shape), indices, scale)
        out = term if out is None else out + term
    return out


class _Sparse(torch.autograd.Function):
    """``y = x S^T`` (or ``x S``): ``dx = g S`` (or ``g S^T``), ``dvalues`` sampled from
    ``g^T x`` (or ``x^T g``) at the support."""

    @staticmethod
    def forward(ctx, x, values, indices, rows, cols, transpose):
        y = run_below(_SPARSE, x, values, indices, rows, cols, transpose)
        ctx.save_for_backward(x, values, indices)
        ctx.shape = (rows, cols, transpose)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, values, indices = ctx.saved_tensors
        rows, cols, transpose = ctx.shape
        need_x, need_v = ctx.needs_input_grad[:2]
        dx = _SPARSE(grad, values, indices, rows, cols, not transpose) if need_x else None
        dv = None
        if need_v:
            dv = _SAMPLED(x, grad, indices) if transpose else _SAMPLED(grad, x, indices)
        return dx, dv, None, None, None, None


class _Sampled(torch.autograd.Function):
    """``g = (dy^T x)[indices]``: ``d dy = x S(G)^T``, ``d x = dy S(G)`` for the sparse
    ``S(G)`` holding the incoming gradient at the support."""

    @staticmethod
    def forward(ctx, dy, x, indices):
        g = run_below(_SAMPLED, dy, x, indices)
        ctx.save_for_backward(dy, x, indices)
        return g

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        dy, x, indices = ctx.saved_tensors
        out, inp = dy.shape[1], x.shape[1]
        d_dy = _SPARSE(x, grad, indices, out, inp, False) if ctx.needs_input_grad[0] else None
        d_x = _SPARSE(dy, grad, indices, out, inp, True) if ctx.needs_input_grad[1] else None
        return d_dy, d_x, None


register_autograd(_REBUILD, _Rebuild, _rebuild_jvp)
register_autograd(_SPARSE, _Sparse, multilinear_jvp(_SPARSE, (0, 1)))
register_autograd(_SAMPLED, _Sampled, multilinear_jvp(_SAMPLED, (0, 1)))
