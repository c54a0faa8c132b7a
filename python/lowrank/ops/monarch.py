"""Monarch products (Dao et al., "Monarch: Expressive structured matrices for
efficient and accurate training", ICML 2022), in the original code's layout.

For ``x`` of shape ``(..., n)``, ``w1`` of shape ``(k, q, p)`` with ``k*p == n`` and
``w2`` of shape ``(l, s, r)`` with ``l*r == k*q``::

    h[..., kk*q + qq] = sum_pp w1[kk, qq, pp] * x[..., kk*p + pp]      (block-diagonal R)
    y[..., ss*l + ll] = sum_rr w2[ll, ss, rr] * h[..., rr*l + ll]       (P, block-diagonal L, P_out)

i.e. ``y = P_out blockdiag(w2) P blockdiag(w1) x`` where ``P`` regroups the
``k*q`` intermediate values by their index modulo ``l`` and ``P_out`` interleaves
the ``l`` output blocks. About ``(p*q*k + r*s*l)`` multiply-adds per row instead
of ``n * l*s``. Checkpoints of the original ``blockdiag_butterfly_multiply`` load
unchanged.

The native kernels fuse both block products and both permutations and never
store ``h``: their backward recomputes it, so only ``x`` and the weights are saved. The
composite path's first GEMM writes ``h`` to memory anyway; when autograd needs it (``w2``
requires a gradient) and it is no larger than ``x`` (``q <= p``, so at most doubling what
autograd keeps for the product), training keeps it for backward instead of paying a GEMM
to recompute it (:func:`keeps_intermediate`).
"""

from __future__ import annotations

import math

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

_FORWARD = define("monarch_matmul(Tensor x, Tensor w1, Tensor w2) -> Tensor")
_BACKWARD = define(
    "monarch_matmul_backward(Tensor grad, Tensor x, Tensor w1, Tensor w2, bool need_x, "
    "bool need_w1, bool need_w2, Tensor? h=None) -> (Tensor, Tensor, Tensor)"
)
# The product and the intermediate h (for backward), by the composite path.
_WITH_H = define("monarch_matmul_with_h(Tensor x, Tensor w1, Tensor w2) -> (Tensor, Tensor)")


def monarch_matmul(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The Monarch product ``P_out blockdiag(w2) P blockdiag(w1) x`` (module docstring).

    Args:
        x: ``(..., k*p)``.
        w1: ``(k, q, p)`` first block-diagonal factor.
        w2: ``(l, s, r)`` second block-diagonal factor, ``l*r == k*q``.

    Returns:
        ``(..., l*s)``. Native kernels: CPU float32/float64 (float16/bfloat16 via
        float32), CUDA float32/float16/bfloat16 with float32 accumulation.
    """
    return call(_FORWARD, x, w1, w2)


def monarch_matmul_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch specification: the two batched products and two shuffles."""
    k, _, p, l, s, r = _check(x, w1, w2)
    batch = x.shape[:-1]
    tokens = math.prod(batch)
    rows = x.reshape(tokens, k, p)
    h = torch.einsum("kqp,bkp->bkq", w1, rows).reshape(tokens, r, l).transpose(-1, -2)
    y = torch.einsum("lsr,blr->bsl", w2, h)
    return y.reshape(*batch, s * l)


def monarch_matmul_backward_reference(grad, x, w1, w2, need_x, need_w1, need_w2, h=None):
    """Pure-PyTorch gradients of :func:`monarch_matmul`; unneeded ones come back empty.
    ``h`` (the forward's intermediate, which the op may reuse) is recomputed here."""
    k, q, p, l, s, r = _check(x, w1, w2)
    tokens = math.prod(x.shape[:-1])
    rows = x.reshape(tokens, k, p)
    g = grad.reshape(tokens, s, l)  # g[b, ss, ll]
    h = torch.einsum("kqp,bkp->bkq", w1, rows).reshape(tokens, r, l)  # h[b, rr, ll]
    empty = x.new_empty(0)
    dw2 = torch.einsum("bsl,brl->lsr", g, h) if need_w2 else empty
    dh = torch.einsum("lsr,bsl->brl", w2, g).reshape(tokens, k, q)
    dw1 = torch.einsum("bkq,bkp->kqp", dh, rows) if need_w1 else empty
    dx = torch.einsum("kqp,bkq->bkp", w1, dh).reshape(x.shape) if need_x else empty
    return dx, dw1, dw2


def _check(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[int, ...]:
    """(k, q, p, l, s, r) of valid arguments; otherwise the error that names the problem."""
    try:  # one predicate on the hot path (torch.ops lets None through: no tensor at all)
        ok = (
            w1.dim() == 3
            and w2.dim() == 3
            and x.dim() >= 1
            and x.dtype in check.FLOATING
            and x.dtype == w1.dtype == w2.dtype
            and x.device == w1.device == w2.device
            and x.shape[-1] == w1.shape[0] * w1.shape[2]
            and w2.shape[0] * w2.shape[2] == w1.shape[0] * w1.shape[1]
        )
    except (AttributeError, TypeError):
        ok = False
    if ok:
        return (*w1.shape, *w2.shape)
    check.floating("x", x)
    check.floating("w1", w1)
    check.floating("w2", w2)
    check.ndim("w1", w1, 3, "(k, q, p) blocks")
    check.ndim("w2", w2, 3, "(l, s, r) blocks")
    check.min_ndim("x", x, 1, "(..., k*p)")
    check.same_dtype(x=x, w1=w1, w2=w2)
    check.same_device(x=x, w1=w1, w2=w2)
    k, q, p = w1.shape
    l, _, r = w2.shape
    check.size("x", x, -1, k * p, f"w1.shape[0] * w1.shape[2] = {k} * {p}")
    raise ValueError(
        f"w2 of shape {tuple(w2.shape)} does not fit w1 of shape {tuple(w1.shape)}: "
        f"l*r = {l * r} must equal k*q = {k * q}"
    )


def _check_grad(grad, x, l, s):
    check.companion("grad", grad, x, (*x.shape[:-1], l * s))


def reference_is_faster(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """The CPU cost model (the static choice when nothing was measured): below ``4 * p``
    tokens with blocks of 64 or more inputs, batched GEMMs beat the fused kernel, whose
    per-call cost (transposing the weights once) is not yet paid back
    (lowrank/bench/bench_monarch.py)."""
    p = w1.shape[-1]
    return x.is_cpu and p >= 64 and math.prod(x.shape[:-1]) < 4 * p


def _static(x, w1, *args):
    if not x.is_cpu:
        return dispatch.COMPOSITE
    return dispatch.COMPOSITE if reference_is_faster(x, w1) else dispatch.NATIVE


def _key(x, k, q, p, l, s, r):
    return (x.dtype, dispatch.bucket(math.prod(x.shape[:-1])), k, q, p, l, s, r)


# ---- composite path: strided-batched GEMMs on views ----------------------------------------------
# With the token index innermost, stage one writes h^T (k*q, T) and the stride-l regrouping
# between the factors is a free view: h^T read as (r, l, T) gives block ll's (r, T) operand
# with unit stride over tokens. x enters as a transposed view and the GEMMs write y, dx and
# dh^T straight into their final storage through strided views, so each direction copies
# once, a transpose inside each token's row (y's (l, s) -> (s, l) forward, dy's back), where
# the original two-bmm code copies twice and keeps h alive for backward.


def new_intermediate(x: torch.Tensor, k: int, q: int) -> torch.Tensor:
    """An uninitialised ``h`` for ``x``'s tokens: shape ``(..., k*q)`` like ``x``, stored with
    the tokens innermost (``h^T`` contiguous), the layout in which the composite path's
    GEMMs write it and read it back."""
    batch = x.shape[:-1]
    strides, step = [], 1
    for size in reversed(batch):
        strides.append(step)
        step *= max(size, 1)
    return x.new_empty_strided((*batch, k * q), (*reversed(strides), step))


def _transposed_intermediate(h: torch.Tensor, k: int, q: int, tokens: int) -> torch.Tensor:
    """``h^T`` as ``(k, q, tokens)``: a view of :func:`new_intermediate`'s layout, a copy of
    any other."""
    return h.reshape(tokens, k * q).t().reshape(k, q, tokens)


def _composite_with_h(x, w1, w2):
    """``(y, h)``: two strided-batched GEMMs, ``h`` left in :func:`new_intermediate`'s
    layout."""
    (k, q, p), (l, s, r) = w1.shape, w2.shape
    batch = x.shape[:-1]
    tokens = math.prod(batch)
    h = new_intermediate(x, k, q)
    ht = _transposed_intermediate(h, k, q, tokens)  # (k, q, T), a view of h
    torch.bmm(w1, x.reshape(tokens, k, p).permute(1, 2, 0), out=ht)
    y = x.new_empty((tokens, l, s))
    torch.bmm(ht.view(r, l, tokens).permute(1, 2, 0), w2.transpose(1, 2), out=y.transpose(0, 1))
    result = x.new_empty((*batch, s * l))  # a fresh tensor (no view) in the output's shape
    result.view(tokens, s, l).copy_(y.transpose(1, 2))
    return result, h


def _composite_forward(x, w1, w2):
    return _composite_with_h(x, w1, w2)[0]


def _composite_backward(grad, x, w1, w2, need_x, need_w1, need_w2, h=None):
    (k, q, p), (l, s, r) = w1.shape, w2.shape
    tokens = math.prod(x.shape[:-1])
    rows = x.reshape(tokens, k, p)
    empty = x.new_empty(0)
    # dy regrouped by output block: (T, l, s), read as (l, s, T).
    gt = grad.reshape(tokens, s, l).transpose(1, 2).contiguous().permute(1, 2, 0)
    dw2 = empty
    if need_w2:  # h as the forward kept it, else recomputed
        if h is None:
            ht = torch.bmm(w1, rows.permute(1, 2, 0))  # (k, q, T)
        else:
            ht = _transposed_intermediate(h, k, q, tokens)
        dw2 = torch.bmm(gt, ht.reshape(r, l, tokens).permute(1, 2, 0))  # (l, s, T) @ (l, T, r)
    if not (need_x or need_w1):
        return empty, empty, dw2
    dht = grad.new_empty((r, l, tokens))  # dh^T in h^T's layout (k*q, T)
    torch.bmm(w2.transpose(1, 2), gt, out=dht.transpose(0, 1))
    dht = dht.view(k, q, tokens)
    dw1 = torch.bmm(dht, rows.transpose(0, 1)) if need_w1 else empty  # (k, q, T) @ (k, T, p)
    dx = empty
    if need_x:
        dx = x.new_empty((tokens, k, p))
        torch.bmm(dht.transpose(1, 2), w1, out=dx.transpose(0, 1))  # (k, T, q) @ (k, q, p)
        dx = dx.view(x.shape)
    return dx, dw1, dw2


# ---- native kernels ------------------------------------------------------------------------------


def _forward_smem(k, q, p):
    return (k * p + k * q) * 4  # x and h of one token, float32


def _forward_unavailable(x, w1, w2):
    k, q, p = w1.shape
    return _native.unavailable(x, lambda: _forward_smem(k, q, p))


def _backward_unavailable(grad, x, w1, w2, *needs):
    k, q, p = w1.shape
    return _native.unavailable(x, lambda: _forward_smem(k, q, p))


def _native_forward(x, w1, w2):
    if _native.upcast_on_cpu(x):
        return _native_forward(x.float(), w1.float(), w2.float()).to(x.dtype)
    (k, q, p), (l, s, r) = w1.shape, w2.shape
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    y = _native.new_output((*x.shape[:-1], l * s), x)
    _native.module(x).monarch_matmul(
        _native.DTYPE_CODES[x.dtype], x.data_ptr(), w1.data_ptr(), w2.data_ptr(), y.data_ptr(),
        math.prod(x.shape[:-1]), k, q, p, l, s, r, *_native.launch_args(x),
    )  # fmt: skip
    return y


def _native_backward(grad, x, w1, w2, need_x, need_w1, need_w2, h=None):
    """The fused kernel recomputes ``h`` on chip; a kept ``h`` is not read."""
    if _native.upcast_on_cpu(x):
        outs = _native_backward(grad.float(), x.float(), w1.float(), w2.float(), need_x, need_w1,
                                need_w2)  # fmt: skip
        return tuple(o.to(x.dtype) for o in outs)
    (k, q, p), (l, s, r) = w1.shape, w2.shape
    grad, x, w1, w2 = grad.contiguous(), x.contiguous(), w1.contiguous(), w2.contiguous()
    empty = x.new_empty(0)
    # CUDA sums the weight gradients across blocks in float32.
    acc = torch.float32 if not x.is_cpu else x.dtype
    dx = _native.new_output(x.shape, x) if need_x else empty
    dw1 = torch.zeros(w1.shape, dtype=acc, device=x.device) if need_w1 else empty
    dw2 = torch.zeros(w2.shape, dtype=acc, device=x.device) if need_w2 else empty
    tokens = math.prod(x.shape[:-1])
    pointers = (
        _native.DTYPE_CODES[x.dtype], grad.data_ptr(), x.data_ptr(), w1.data_ptr(),
        w2.data_ptr(), dx.data_ptr() if need_x else 0, dw1.data_ptr() if need_w1 else 0,
        dw2.data_ptr() if need_w2 else 0,
    )  # fmt: skip
    native = _native.module(x)
    if x.is_cpu:
        native.monarch_matmul_backward(*pointers, tokens, k, q, p, l, s, r,
                                       *_native.launch_args(x))  # fmt: skip
    else:  # h and dh of every token, float32, freed on return
        workspace = torch.empty(2 * tokens * k * q, dtype=torch.float32, device=x.device)
        native.monarch_matmul_backward(*pointers, workspace.data_ptr(), tokens, k, q, p, l, s, r,
                                       *_native.launch_args(x))  # fmt: skip
    return dx, dw1.to(w1.dtype), dw2.to(w2.dtype)


def _tc_applies(x, *_) -> bool:
    """The tensor-core kernels are for float16/bfloat16 on CUDA."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def _tc_unavailable(x, w1, w2, transposed=False):
    shapes = (*w1.shape, *w2.shape)
    return _native.tensor_cores_unavailable(
        x, lambda: _native._cuda.monarch_tc_smem_bytes(*shapes, transposed)
    )


def _tc_product(src, w1, w2, transposed):
    """``M x`` (or ``M^T dy``), both stages per tile of 16 tokens on tensor cores, the
    intermediate on chip."""
    (k, q, p), (l, s, r) = w1.shape, w2.shape
    src, w1, w2 = src.contiguous(), w1.contiguous(), w2.contiguous()
    dst = _native.new_output((*src.shape[:-1], k * p if transposed else l * s), src)
    _native._cuda.monarch_matmul_tc(
        _native.DTYPE_CODES[src.dtype], src.data_ptr(), w1.data_ptr(), w2.data_ptr(),
        dst.data_ptr(), math.prod(src.shape[:-1]), k, q, p, l, s, r, transposed,
        *_native.launch_args(src),
    )  # fmt: skip
    return dst


def _tc_forward(x, w1, w2):
    return _tc_product(x, w1, w2, transposed=False)


def _tc_backward_applies(grad, x, w1, w2, need_x, need_w1, need_w2, h=None) -> bool:
    """Only ``dx`` (frozen weights): with weight gradients, the composite's reductions over
    tokens run at the GEMM peak and leave ``dh`` in memory, from which ``dx`` costs the same
    bytes as the fused transpose (cuda/monarch_kernels.cuh)."""
    return _tc_applies(x) and need_x and not (need_w1 or need_w2)


def _tc_backward_unavailable(grad, x, w1, w2, *needs):
    return _tc_unavailable(x, w1, w2, transposed=True)


def _tc_backward(grad, x, w1, w2, need_x, need_w1, need_w2, h=None):
    empty = x.new_empty(0)
    return _tc_product(grad, w1, w2, transposed=True).view(x.shape), empty, empty


_forward_dispatch = dispatch.Dispatcher("monarch_matmul", (
    dispatch.Impl("native", dispatch.NATIVE, _native_forward, _forward_unavailable),
    dispatch.Impl("tensor-core", dispatch.NATIVE, _tc_forward, _tc_unavailable,
                  applies=_tc_applies),
    dispatch.Impl("composite", dispatch.COMPOSITE, _composite_forward),
), _static, (0,))  # fmt: skip
_backward_dispatch = dispatch.Dispatcher("monarch_matmul_backward", (
    dispatch.Impl("native", dispatch.NATIVE, _native_backward, _backward_unavailable),
    dispatch.Impl("tensor-core", dispatch.NATIVE, _tc_backward, _tc_backward_unavailable,
                  applies=_tc_backward_applies),
    dispatch.Impl("composite", dispatch.COMPOSITE, _composite_backward),
), lambda grad, x, w1, *args: _static(x, w1), (0, 1, 7))  # fmt: skip


def keeps_intermediate(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether a training forward keeps ``h`` for the gradient of ``w2`` (the only one that
    reads it) rather than having backward recompute it.

    Memory rule: ``h`` is kept only when it is no larger than ``x`` (``q <= p``), so keeping
    it at most doubles what autograd holds for the product. Speed: only the composite path
    writes ``h`` to memory (the native kernels keep it on chip), so it is kept only when the
    forward's dispatch runs the composite for these sizes (measuring now if it has not yet).
    While tracing, ``h`` is not kept: the traced graph calls the dispatched forward, whose
    choice is made when it runs.
    """
    k, q, p = w1.shape
    if tracing(x) or q > p:
        return False
    key = _key(x, k, q, p, *w2.shape)
    return _forward_dispatch.choose(key, x, x, w1, w2).kind == dispatch.COMPOSITE


def _forward_kernel(x, w1, w2):
    dims = _check(x, w1, w2)
    return _forward_dispatch(_key(x, *dims), x, x, w1, w2)


def _with_h_kernel(x, w1, w2):
    _check(x, w1, w2)
    return _composite_with_h(x, w1, w2)


def _backward_kernel(grad, x, w1, w2, need_x, need_w1, need_w2, h=None):
    dims = _check(x, w1, w2)
    _check_grad(grad, x, dims[3], dims[4])
    if h is not None:
        _check_h(h, x, dims[0] * dims[1])
    key = (*_key(x, *dims), need_x, need_w1, need_w2, h is not None)
    return _backward_dispatch(key, x, grad, x, w1, w2, need_x, need_w1, need_w2, h)


def _check_h(h, x, kq):
    check.companion("h", h, x, (*x.shape[:-1], kq), "x's tokens, k*q")


for _device in ("cpu", "cuda"):
    register_kernel(_FORWARD, _device)(_forward_kernel)
    register_kernel(_WITH_H, _device)(_with_h_kernel)
    register_kernel(_BACKWARD, _device)(_backward_kernel)


@register_fake(_FORWARD)
def _forward_fake(x, w1, w2):
    _, _, _, l, s, _ = _check(x, w1, w2)
    return x.new_empty((*x.shape[:-1], l * s))


@register_fake(_WITH_H)
def _with_h_fake(x, w1, w2):
    k, q, _, l, s, _ = _check(x, w1, w2)
    return x.new_empty((*x.shape[:-1], l * s)), new_intermediate(x, k, q)


@register_fake(_BACKWARD)
def _backward_fake(grad, x, w1, w2, need_x, need_w1, need_w2, h=None):
    k, q, _, l, s, _ = _check(x, w1, w2)
    _check_grad(grad, x, l, s)
    if h is not None:
        _check_h(h, x, k * q)
    empty = x.new_empty(0)
    return (
        x.new_empty(x.shape) if need_x else empty,
        w1.new_empty(w1.shape) if need_w1 else empty,
        w2.new_empty(w2.shape) if need_w2 else empty,
    )


class _MonarchMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2):
        h = None
        if ctx.needs_input_grad[2] and keeps_intermediate(x, w1, w2):
            with below_autograd():
                y, h = _WITH_H(x, w1, w2)
        else:
            y = run_below(_FORWARD, x, w1, w2)
        ctx.save_for_backward(x, w1, w2, h)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w1, w2, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw1, dw2 = _BACKWARD(grad, x, w1, w2, *need, h)
        return (dx if need[0] else None, dw1 if need[1] else None, dw2 if need[2] else None)


register_autograd(_FORWARD, _MonarchMatmul, multilinear_jvp(_FORWARD, (0, 1, 2)))
register_not_differentiable(_BACKWARD, "double backward through monarch_matmul is not supported")
register_not_differentiable(_WITH_H, "it is monarch_matmul's training forward; use monarch_matmul")
register_autocast(_FORWARD)
