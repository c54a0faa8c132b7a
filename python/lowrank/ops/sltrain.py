"""Sparse-plus-low-rank products (SLTrain: Han et al., NeurIPS 2024).

``sltrain_matmul(x, B, A, values, indices, scale, bias)`` returns
``x @ (scale * B @ A + S).T + bias`` where ``S`` (``out x in``) holds ``values`` at
the sorted, unique flat positions ``indices`` (``row * in + col``; int32 when
``out * in`` fits, else int64).

Two paths, chosen per call by :func:`choose_path` (``path="rebuild"`` or
``"factored"`` overrides it):

- rebuild (training-size token counts): ``W`` is built by one fused native pass
  (:func:`sltrain_rebuild`), used for one GEMM and freed; backward rebuilds it
  rather than keeping it alive, forms the dense gradient ``G = dy^T x`` once and
  reads ``dB = s G A^T``, ``dA = s B^T G`` and ``dvalues = G[indices]`` from it.
- factored (small token counts, decoding): ``s (x A^T) B^T + x S^T`` with a
  native sparse kernel, never forming ``W``; backward gives ``dvalues`` by a
  sampled dense-dense product (:func:`sampled_dot`), never forming ``G``.
"""

from __future__ import annotations

import torch

from lowrank import _native
from lowrank import _validate as check
from lowrank.ops._library import (
    below_autograd,
    define,
    register_autograd,
    register_fake,
    register_kernel,
)

PATHS = {"auto": 0, "rebuild": 1, "factored": 2}
# Cost model: a scattered sparse multiply-add costs about this many dense GEMM ones
# on the CPU (measured with bench/bench_sltrain.py at n=1024, r=256, 3% nonzeros: the
# crossover is near 100 tokens).
SPARSE_COST = 60.0

_FORWARD = define(
    "sltrain_matmul(Tensor x, Tensor B, Tensor A, Tensor values, Tensor indices, float scale, "
    "Tensor? bias=None, int path=0) -> Tensor"
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
        path: ``"auto"`` (cost model), ``"rebuild"`` or ``"factored"``.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {tuple(PATHS)}, got {path!r}")
    return _FORWARD(x, B, A, values, indices, float(scale), bias, PATHS[path])


def sltrain_rebuild(B, A, values, indices, scale: float) -> torch.Tensor:
    """The dense ``scale * B @ A + S`` (``out x in``)."""
    return _REBUILD(B, A, values, indices, float(scale))


def sparse_matmul(x, values, indices, rows: int, cols: int, transpose: bool = False):
    """``x @ S.T`` for ``x`` of shape ``(T, cols)``; with ``transpose``, ``x @ S``."""
    return _SPARSE(x, values, indices, rows, cols, transpose)


def sampled_dot(dy, x, indices) -> torch.Tensor:
    """``(dy.T @ x).view(-1)[indices]`` without forming ``dy.T @ x``."""
    return _SAMPLED(dy, x, indices)


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
    if ok:
        return B.shape[0], A.shape[1], B.shape[1]
    for name, t in (("x", x), ("B", B), ("A", A), ("values", values)):
        check.floating(name, t)
    check.ndim("B", B, 2, "(out, r)")
    check.ndim("A", A, 2, "(r, in)")
    check.ndim("values", values, 1, "(nnz,)")
    check.ndim("indices", indices, 1, "(nnz,)")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    check.same_dtype(x=x, B=B, A=A, values=values)
    check.same_device(x=x, B=B, A=A, values=values, indices=indices)
    check.size("A", A, 0, B.shape[1], "the rank r = B.shape[1]")
    check.size("x", x, -1, A.shape[1], "in = A.shape[1]")
    check.size("indices", indices, 0, values.shape[0], "one index per value")
    if bias is not None:
        check.floating("bias", bias)
        check.same_dtype(bias=bias, x=x)
        check.same_device(bias=bias, x=x)
        check.size("bias", bias, 0, B.shape[0], "out = B.shape[0]")
    raise AssertionError("unreachable")


def check_support(indices: torch.Tensor, out: int, inp: int) -> None:
    """Indices sorted, unique and inside ``[0, out*in)`` (a full check, one pass)."""
    if indices.numel() == 0:
        return
    if int(indices.min()) < 0 or int(indices.max()) >= out * inp:
        raise ValueError(f"indices must lie in [0, out*in) = [0, {out * inp})")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError("indices must be sorted and unique")
    if indices.dtype == torch.int32 and out * inp > 2**31 - 1:
        raise ValueError("out*in does not fit int32 indices; use int64")


# ---- kernels -----------------------------------------------------------------------------------


def _index_code(indices):
    return 0 if indices.dtype == torch.int32 else 1


def _rebuild_kernel(B, A, values, indices, scale):
    out, inp, rank = B.shape[0], A.shape[1], B.shape[1]
    if _native.upcast_on_cpu(B):
        return _rebuild_kernel(B.float(), A.float(), values.float(), indices, scale).to(B.dtype)
    launch = _native.launch(B, "sltrain_rebuild")
    if launch is None:
        return torch.addmm(dense_sparse(values, indices, out, inp), B, A, alpha=scale)
    native, launch_args = launch
    B, A, values, indices = (
        B.contiguous(),
        A.contiguous(),
        values.contiguous(),
        indices.contiguous(),
    )
    w = _native.new_output((out, inp), B)
    native.sltrain_rebuild(
        _native.DTYPE_CODES[B.dtype], _index_code(indices), B.data_ptr(), A.data_ptr(),
        values.data_ptr(), indices.data_ptr(), indices.numel(), scale, w.data_ptr(), out, inp,
        rank, *launch_args,
    )  # fmt: skip
    return w


def _sparse_kernel(x, values, indices, rows, cols, transpose):
    width = cols if transpose else rows
    if _native.upcast_on_cpu(x):
        y = _sparse_kernel(x.float(), values.float(), indices, rows, cols, transpose)
        return y.to(x.dtype)
    launch = _native.launch(x, "sparse_matmul")
    if launch is None:
        s = dense_sparse(values, indices, rows, cols)
        return x @ s if transpose else x @ s.T
    native, launch_args = launch
    x, values, indices = x.contiguous(), values.contiguous(), indices.contiguous()
    # CUDA accumulates with atomics into float32; the CPU writes each row itself.
    y = (_native.new_output((x.shape[0], width), x) if x.is_cpu
         else torch.zeros((x.shape[0], width), dtype=torch.float32, device=x.device))  # fmt: skip
    native.sparse_rows(
        _native.DTYPE_CODES[x.dtype], _index_code(indices), x.data_ptr(), x.shape[0], x.shape[1],
        values.data_ptr(), indices.data_ptr(), indices.numel(), cols, transpose, y.data_ptr(),
        width, *launch_args,
    )  # fmt: skip
    return y.to(x.dtype)


def _sampled_kernel(dy, x, indices):
    if _native.upcast_on_cpu(x):
        return _sampled_kernel(dy.float(), x.float(), indices).to(x.dtype)
    launch = _native.launch(x, "sampled_dot")
    if launch is None:
        rows, cols = indices.long() // x.shape[1], indices.long() % x.shape[1]
        return (dy[:, rows] * x[:, cols]).sum(0)
    native, launch_args = launch
    dy, x, indices = dy.contiguous(), x.contiguous(), indices.contiguous()
    g = _native.new_output((indices.numel(),), x)
    native.sampled_dot(
        _native.DTYPE_CODES[x.dtype], _index_code(indices), dy.data_ptr(), x.data_ptr(),
        x.shape[0], dy.shape[1], x.shape[1], indices.data_ptr(), indices.numel(), g.data_ptr(),
        *launch_args,
    )  # fmt: skip
    return g


def _resolve(path, tokens, out, inp, rank, nnz):
    if path == PATHS["auto"]:
        return choose_path(tokens, out, inp, rank, nnz)
    return "rebuild" if path == PATHS["rebuild"] else "factored"


def _forward_kernel(x, B, A, values, indices, scale, bias=None, path=0):
    out, inp, rank = _check(x, B, A, values, indices, bias)
    if x.is_cpu:  # the native kernels index with it; on CUDA torch's scatter checks bounds
        check_support(indices, out, inp)
    rows = x.reshape(-1, inp)
    if _resolve(path, rows.shape[0], out, inp, rank, values.numel()) == "rebuild":
        w = _REBUILD(B, A, values, indices, scale)
        y = torch.nn.functional.linear(rows, w, bias)
    else:
        y = scale * ((rows @ A.T) @ B.T) + _SPARSE(rows, values, indices, out, inp, False)
        if bias is not None:
            y = y + bias
    return y.reshape(*x.shape[:-1], out)


for _device in ("cpu", "cuda"):
    register_kernel(_FORWARD, _device)(_forward_kernel)
    register_kernel(_REBUILD, _device)(_rebuild_kernel)
    register_kernel(_SPARSE, _device)(_sparse_kernel)
    register_kernel(_SAMPLED, _device)(_sampled_kernel)


@register_fake(_FORWARD)
def _forward_fake(x, B, A, values, indices, scale, bias=None, path=0):
    out, _, _ = _check(x, B, A, values, indices, bias)
    return x.new_empty((*x.shape[:-1], out))


@register_fake(_REBUILD)
def _rebuild_fake(B, A, values, indices, scale):
    return B.new_empty((B.shape[0], A.shape[1]))


@register_fake(_SPARSE)
def _sparse_fake(x, values, indices, rows, cols, transpose):
    return x.new_empty((x.shape[0], cols if transpose else rows))


@register_fake(_SAMPLED)
def _sampled_fake(dy, x, indices):
    return x.new_empty(indices.shape)


class _SLTrainMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, B, A, values, indices, scale, bias=None, path=0):
        with below_autograd():
            y = _FORWARD(x, B, A, values, indices, scale, bias, path)
        ctx.save_for_backward(x, B, A, values, indices)
        ctx.scale, ctx.path, ctx.has_bias = scale, path, bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, B, A, values, indices = ctx.saved_tensors
        need_x, need_b, need_a, need_v = ctx.needs_input_grad[:4]
        s = ctx.scale
        out, inp, rank = B.shape[0], A.shape[1], B.shape[1]
        rows, g = x.reshape(-1, inp), grad.reshape(-1, out)
        dx = db = da = dv = None
        if _resolve(ctx.path, rows.shape[0], out, inp, rank, values.numel()) == "rebuild":
            if need_x:  # W rebuilt, used once, freed
                dx = (g @ _REBUILD(B, A, values, indices, s)).reshape(x.shape)
            if need_b or need_a or need_v:
                dense = g.T @ rows  # the dense gradient, formed once
                db = s * dense @ A.T if need_b else None
                da = s * B.T @ dense if need_a else None
                dv = dense.reshape(-1)[indices.long()] if need_v else None
        else:
            gb = g @ B if (need_x or need_a) else None
            if need_x:
                dx = (s * gb @ A + _SPARSE(g, values, indices, out, inp, True)).reshape(x.shape)
            db = s * g.T @ (rows @ A.T) if need_b else None
            da = s * gb.T @ rows if need_a else None
            dv = _SAMPLED(g, rows, indices) if need_v else None
        dbias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[6] else None
        return dx, db, da, dv, None, None, dbias, None


register_autograd(_FORWARD, _SLTrainMatmul)
