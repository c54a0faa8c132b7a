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
store ``h``: backward recomputes it, so only ``x`` and the weights are saved.
"""

from __future__ import annotations

import math

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

_FORWARD = define("monarch_matmul(Tensor x, Tensor w1, Tensor w2) -> Tensor")
_BACKWARD = define(
    "monarch_matmul_backward(Tensor grad, Tensor x, Tensor w1, Tensor w2, bool need_x, "
    "bool need_w1, bool need_w2) -> (Tensor, Tensor, Tensor)"
)


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
    return _FORWARD(x, w1, w2)


def monarch_matmul_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch specification: the two batched products and two shuffles."""
    k, _, p, l, s, r = _check(x, w1, w2)
    batch = x.shape[:-1]
    tokens = math.prod(batch)
    rows = x.reshape(tokens, k, p)
    h = torch.einsum("kqp,bkp->bkq", w1, rows).reshape(tokens, r, l).transpose(-1, -2)
    y = torch.einsum("lsr,blr->bsl", w2, h)
    return y.reshape(*batch, s * l)


def monarch_matmul_backward_reference(grad, x, w1, w2, need_x, need_w1, need_w2):
    """Pure-PyTorch gradients of :func:`monarch_matmul`; unneeded ones come back empty."""
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
    if (
        w1.dim() == 3
        and w2.dim() == 3
        and x.dim() >= 1
        and x.dtype in check.FLOATING
        and x.dtype == w1.dtype == w2.dtype
        and x.device == w1.device == w2.device
        and x.shape[-1] == w1.shape[0] * w1.shape[2]
        and w2.shape[0] * w2.shape[2] == w1.shape[0] * w1.shape[1]
    ):
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
    expected = (*x.shape[:-1], l * s)
    if not (grad.dtype == x.dtype and grad.device == x.device and tuple(grad.shape) == expected):
        check.floating("grad", grad)
        check.same_dtype(grad=grad, x=x)
        check.same_device(grad=grad, x=x)
        raise ValueError(f"grad must have shape {expected}, got {tuple(grad.shape)}")


def reference_is_faster(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """The cost model for the CPU: below ``4 * p`` tokens with blocks of 64 or more inputs,
    the two batched products of the reference beat the fused kernel, whose per-call
    cost (transposing the weights once) is not yet paid back (bench/bench_monarch.py)."""
    p = w1.shape[-1]
    return x.is_cpu and p >= 64 and math.prod(x.shape[:-1]) < 4 * p


def _forward_kernel(x, w1, w2):
    k, q, p, l, s, r = _check(x, w1, w2)
    if _native.upcast_on_cpu(x):
        return _forward_kernel(x.float(), w1.float(), w2.float()).to(x.dtype)
    if reference_is_faster(x, w1):
        return monarch_matmul_reference(x, w1, w2)
    launch = _native.launch(x, "monarch_matmul")
    if launch is None:
        return monarch_matmul_reference(x, w1, w2)
    native, launch_args = launch
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    y = _native.new_output((*x.shape[:-1], l * s), x)
    native.monarch_matmul(
        _native.DTYPE_CODES[x.dtype], x.data_ptr(), w1.data_ptr(), w2.data_ptr(), y.data_ptr(),
        math.prod(x.shape[:-1]), k, q, p, l, s, r, *launch_args,
    )  # fmt: skip
    return y


def _backward_kernel(grad, x, w1, w2, need_x, need_w1, need_w2):
    k, q, p, l, s, r = _check(x, w1, w2)
    _check_grad(grad, x, l, s)
    if _native.upcast_on_cpu(x):
        outs = _backward_kernel(grad.float(), x.float(), w1.float(), w2.float(), need_x, need_w1,
                                need_w2)  # fmt: skip
        return tuple(o.to(x.dtype) for o in outs)
    if reference_is_faster(x, w1):
        return monarch_matmul_backward_reference(grad, x, w1, w2, need_x, need_w1, need_w2)
    launch = _native.launch(x, "monarch_matmul_backward")
    if launch is None:
        return monarch_matmul_backward_reference(grad, x, w1, w2, need_x, need_w1, need_w2)
    native, launch_args = launch
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
    if x.is_cpu:
        native.monarch_matmul_backward(*pointers, tokens, k, q, p, l, s, r, *launch_args)
    else:  # h and dh of every token, float32, freed on return
        workspace = torch.empty(2 * tokens * k * q, dtype=torch.float32, device=x.device)
        native.monarch_matmul_backward(*pointers, workspace.data_ptr(), tokens, k, q, p, l, s, r,
                                       *launch_args)  # fmt: skip
    return dx, dw1.to(w1.dtype), dw2.to(w2.dtype)


for _device in ("cpu", "cuda"):
    register_kernel(_FORWARD, _device)(_forward_kernel)
    register_kernel(_BACKWARD, _device)(_backward_kernel)


@register_fake(_FORWARD)
def _forward_fake(x, w1, w2):
    _, _, _, l, s, _ = _check(x, w1, w2)
    return x.new_empty((*x.shape[:-1], l * s))


@register_fake(_BACKWARD)
def _backward_fake(grad, x, w1, w2, need_x, need_w1, need_w2):
    _, _, _, l, s, _ = _check(x, w1, w2)
    _check_grad(grad, x, l, s)
    empty = x.new_empty(0)
    return (
        x.new_empty(x.shape) if need_x else empty,
        w1.new_empty(w1.shape) if need_w1 else empty,
        w2.new_empty(w2.shape) if need_w2 else empty,
    )


class _MonarchMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2):
        with below_autograd():
            y = _FORWARD(x, w1, w2)
        ctx.save_for_backward(x, w1, w2)  # the intermediate is recomputed, never saved
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw1, dw2 = _BACKWARD(grad, x, w1, w2, *need)
        return (dx if need[0] else None, dw1 if need[1] else None, dw2 if need[2] else None)


register_autograd(_FORWARD, _MonarchMatmul)
