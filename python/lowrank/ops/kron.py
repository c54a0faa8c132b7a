"""Kronecker-factored products: ``y = x @ kron(a, b).T`` without forming ``kron(a, b)``.

For ``x`` of shape ``(..., q*s)``, ``a`` of shape ``(p, q)`` and ``b`` of shape
``(r, s)``, each row of ``x`` viewed as a ``q x s`` matrix ``X`` satisfies
``kron(a, b) vec(X) = vec(a X b^T)`` (Van Loan, "The ubiquitous Kronecker
product", 2000), so the product costs ``q*s*r + p*q*r`` (or ``p*q*s + p*s*r``)
multiply-adds per row instead of ``p*q*r*s`` and no ``(p*r) x (q*s)`` matrix is
ever built. This is the product behind KronA and LoKr adapters (Edalati et al.
2022; PEFT's LoKr) and ``lowrank.nn.KronLinear``.

Gradients, for ``G = dY`` viewed per row as ``p x r``:
``dX = a^T G b``, ``da = sum_rows G (X b^T)^T``, ``db = sum_rows (a^T G)^T X``.
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

_FORWARD = define("kron_matmul(Tensor x, Tensor a, Tensor b) -> Tensor")
_BACKWARD = define(
    "kron_matmul_backward(Tensor grad, Tensor x, Tensor a, Tensor b, bool need_x, "
    "bool need_factors) -> (Tensor, Tensor, Tensor)"
)


def kron_matmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Returns ``x @ torch.kron(a, b).T`` without materialising the Kronecker product.

    Args:
        x: ``(..., q*s)`` input; any number of leading batch dims (also none, or empty).
        a: ``(p, q)`` left factor.
        b: ``(r, s)`` right factor.

    Returns:
        ``(..., p*r)`` tensor with ``x``'s dtype and device.

    Native kernels: CPU float32/float64 (float16/bfloat16 computed in float32) and
    CUDA float32/float16/bfloat16 with float32 accumulation. Differentiable in all
    three arguments.
    """
    return _FORWARD(x, a, b)


def kron_matmul_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch specification of :func:`kron_matmul` (also the fallback)."""
    p, q, r, s = _check(x, a, b)
    rows = x.reshape(*x.shape[:-1], q, s)
    return (a @ rows @ b.transpose(0, 1)).reshape(*x.shape[:-1], p * r)


def kron_matmul_backward_reference(
    grad: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    need_x: bool,
    need_factors: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch gradients of :func:`kron_matmul`; unneeded ones come back empty."""
    p, q, r, s = _check(x, a, b)
    g = grad.reshape(-1, p, r)
    rows = x.reshape(-1, q, s)
    empty = grad.new_empty(0)
    dx = (a.transpose(0, 1) @ g @ b).reshape(x.shape) if need_x else empty
    if not need_factors:
        return dx, empty, empty
    da = torch.einsum("tpr,tqr->pq", g, rows @ b.transpose(0, 1))
    db = torch.einsum("tqr,tqs->rs", a.transpose(0, 1) @ g, rows)
    return dx, da, db


def _check(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int, int]:
    """(p, q, r, s) of valid arguments; otherwise raises the error that names the problem."""
    # One cheap predicate on the hot path; the itemised checks run only to explain a failure.
    if (
        a.dim() == 2
        and b.dim() == 2
        and x.dim() >= 1
        and x.dtype in check.FLOATING
        and x.dtype == a.dtype == b.dtype
        and x.device == a.device == b.device
        and x.shape[-1] == a.shape[1] * b.shape[1]
    ):
        return (*a.shape, *b.shape)
    check.floating("x", x)
    check.floating("a", a)
    check.floating("b", b)
    check.ndim("a", a, 2, "the (p, q) left factor")
    check.ndim("b", b, 2, "the (r, s) right factor")
    check.min_ndim("x", x, 1, "(..., q*s)")
    check.same_dtype(x=x, a=a, b=b)
    check.same_device(x=x, a=a, b=b)
    (_, q), (_, s) = a.shape, b.shape
    check.size("x", x, -1, q * s, f"a.shape[1] * b.shape[1] = {q} * {s}")
    raise AssertionError("unreachable: the itemised checks disagree with the predicate")


def _check_grad(grad: torch.Tensor, x: torch.Tensor, p: int, r: int) -> None:
    check.floating("grad", grad)
    check.same_dtype(grad=grad, x=x)
    check.same_device(grad=grad, x=x)
    expected = (*x.shape[:-1], p * r)
    if tuple(grad.shape) != expected:
        raise ValueError(f"grad must have shape {expected}, got {tuple(grad.shape)}")


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as a contiguous (rows, width) matrix; copies only a non-contiguous input."""
    return t.reshape(-1, width).contiguous()


# Native kernels get raw addresses: every tensor whose address is taken must stay
# referenced (bound to a name) until the kernel returns, so contiguous copies of the
# factors are made first and held.


# ---- CPU -------------------------------------------------------------------------------


@register_kernel(_FORWARD, "cpu")
def _forward_cpu(x, a, b):
    p, q, r, s = _check(x, a, b)
    if x.dtype not in _native.CPU_NATIVE_DTYPES:
        return _forward_cpu(x.float(), a.float(), b.float()).to(x.dtype)
    if _native._C is None:
        _native.warn_fallback("kron_matmul", "the CPU module is not built")
        return kron_matmul_reference(x, a, b)
    xr, a, b = _rows(x, q * s), a.contiguous(), b.contiguous()
    y = _native.new_output((*x.shape[:-1], p * r), x)
    _native._C.kron_matmul(
        _native.DTYPE_CODES[x.dtype], xr.data_ptr(), a.data_ptr(), b.data_ptr(), y.data_ptr(),
        xr.shape[0], p, q, r, s, _native.cpu_threads(),
    )  # fmt: skip
    return y


@register_kernel(_BACKWARD, "cpu")
def _backward_cpu(grad, x, a, b, need_x, need_factors):
    p, q, r, s = _check(x, a, b)
    _check_grad(grad, x, p, r)
    if x.dtype not in _native.CPU_NATIVE_DTYPES:
        outs = _backward_cpu(grad.float(), x.float(), a.float(), b.float(), need_x, need_factors)
        return tuple(o.to(x.dtype) for o in outs)
    if _native._C is None:
        _native.warn_fallback("kron_matmul_backward", "the CPU module is not built")
        return kron_matmul_backward_reference(grad, x, a, b, need_x, need_factors)
    gr, xr, a, b = _rows(grad, p * r), _rows(x, q * s), a.contiguous(), b.contiguous()
    empty = x.new_empty(0)
    dx = _native.new_output(x.shape, x) if need_x else empty
    da = _native.new_output((p, q), a) if need_factors else empty
    db = _native.new_output((r, s), b) if need_factors else empty
    _native._C.kron_matmul_backward(
        _native.DTYPE_CODES[x.dtype], gr.data_ptr(), xr.data_ptr(), a.data_ptr(), b.data_ptr(),
        dx.data_ptr() if need_x else 0,
        da.data_ptr() if need_factors else 0, db.data_ptr() if need_factors else 0,
        xr.shape[0], p, q, r, s, _native.cpu_threads(),
    )  # fmt: skip
    return dx, da, db


# ---- CUDA ------------------------------------------------------------------------------


def _cuda_fallback_reason(x: torch.Tensor, smem_bytes: int) -> str | None:
    if _native._cuda is None:
        return "the CUDA module is not built"
    if x.dtype not in _native.CUDA_NATIVE_DTYPES:
        return f"no CUDA kernel for {x.dtype}"
    limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
    if smem_bytes > limit:
        return f"factors need {smem_bytes} bytes of shared memory, the GPU has {limit}"
    return None


@register_kernel(_FORWARD, "cuda")
def _forward_cuda(x, a, b):
    p, q, r, s = _check(x, a, b)
    cuda = _native._cuda
    why = _cuda_fallback_reason(x, cuda.kron_forward_smem_bytes(p, q, r, s) if cuda else 0)
    if why:
        _native.warn_fallback("kron_matmul", why)
        return kron_matmul_reference(x, a, b)
    xr, a, b = _rows(x, q * s), a.contiguous(), b.contiguous()
    y = _native.new_output((*x.shape[:-1], p * r), x)
    cuda.kron_matmul(
        _native.DTYPE_CODES[x.dtype], xr.data_ptr(), a.data_ptr(), b.data_ptr(), y.data_ptr(),
        xr.shape[0], p, q, r, s, x.device.index, _native.cuda_stream(x),
    )  # fmt: skip
    return y


@register_kernel(_BACKWARD, "cuda")
def _backward_cuda(grad, x, a, b, need_x, need_factors):
    p, q, r, s = _check(x, a, b)
    _check_grad(grad, x, p, r)
    cuda = _native._cuda
    why = _cuda_fallback_reason(x, cuda.kron_backward_smem_bytes(p, q, r, s) if cuda else 0)
    if why:
        _native.warn_fallback("kron_matmul_backward", why)
        return kron_matmul_backward_reference(grad, x, a, b, need_x, need_factors)
    empty = x.new_empty(0)
    # dX = dY @ kron(a^T, b^T)^T: the forward kernel on transposed factors.
    dx = _forward_cuda(grad, a.t().contiguous(), b.t().contiguous()) if need_x else empty
    if not need_factors:
        return dx, empty, empty
    gr, xr, a, b = _rows(grad, p * r), _rows(x, q * s), a.contiguous(), b.contiguous()
    da = torch.zeros((p, q), dtype=torch.float32, device=x.device)
    db = torch.zeros((r, s), dtype=torch.float32, device=x.device)
    cuda.kron_factor_grads(
        _native.DTYPE_CODES[x.dtype], gr.data_ptr(), xr.data_ptr(), a.data_ptr(), b.data_ptr(),
        da.data_ptr(), db.data_ptr(), xr.shape[0], p, q, r, s, x.device.index,
        _native.cuda_stream(x),
    )  # fmt: skip
    return dx, da.to(a.dtype), db.to(b.dtype)


# ---- fake kernels and autograd ------------------------------------------------------------


@register_fake(_FORWARD)
def _forward_fake(x, a, b):
    p, _, r, _ = _check(x, a, b)
    return x.new_empty((*x.shape[:-1], p * r))


@register_fake(_BACKWARD)
def _backward_fake(grad, x, a, b, need_x, need_factors):
    p, q, r, s = _check(x, a, b)
    _check_grad(grad, x, p, r)
    empty = x.new_empty(0)
    dx = x.new_empty(x.shape) if need_x else empty
    if not need_factors:
        return dx, empty, empty
    return dx, a.new_empty((p, q)), b.new_empty((r, s))


class _KronMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b):
        with below_autograd():
            y = _FORWARD(x, a, b)
        ctx.save_for_backward(x, a, b)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, a, b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad
        dx, da, db = _BACKWARD(grad, x, a, b, need_x, need_a or need_b)
        return (dx if need_x else None, da if need_a else None, db if need_b else None)


register_autograd(_FORWARD, _KronMatmul)
