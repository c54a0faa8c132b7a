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

import math

import torch

from lowrank import _native, dispatch
from lowrank import _validate as check
from lowrank.ops._library import (
    autocast_cast,
    call,
    define,
    multilinear_jvp,
    register_autocast,
    register_autograd,
    register_fake,
    register_kernel,
    register_not_differentiable,
    run_below,
)

_FORWARD = define("kron_matmul(Tensor x, Tensor a, Tensor b) -> Tensor")
_ADD = define(
    "kron_matmul_add(Tensor base, Tensor x, Tensor a, Tensor b, float scale=1.0) -> Tensor"
)
_ADD_INPLACE = define(
    "kron_matmul_add_(Tensor(a!) base, Tensor x, Tensor a, Tensor b, float scale=1.0) -> ()"
)
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
    return call(_FORWARD, x, a, b)


def kron_matmul_add(
    base: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Returns ``base + scale * (x @ torch.kron(a, b).T)`` in one pass.

    The Kronecker product is added onto ``base`` (shape ``(..., p*r)``) as it is
    produced, so no output-sized temporary is made: the residual add of a
    Kronecker adapter (``base`` is the frozen layer's output). Differentiable in
    ``base``, ``x``, ``a`` and ``b``.
    """
    return call(_ADD, base, x, a, b, scale)


def kron_matmul_add_(
    base: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """In place: ``base += scale * (x @ torch.kron(a, b).T)``; returns ``base``.

    For inference: nothing output-sized is allocated when ``base`` is contiguous.
    Not differentiable (it raises when an input requires grad); training uses
    :func:`kron_matmul_add`.
    """
    call(_ADD_INPLACE, base, x, a, b, scale)
    return base


def kron_matmul_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch specification of :func:`kron_matmul` (also the fallback)."""
    p, q, r, s = _check(x, a, b)
    rows = x.reshape(*x.shape[:-1], q, s)
    return (a @ rows @ b.transpose(0, 1)).reshape(*x.shape[:-1], p * r)


def kron_matmul_add_reference(
    base: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Pure-PyTorch specification of :func:`kron_matmul_add` (also the fallback)."""
    return base + scale * kron_matmul_reference(x, a, b)


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
    tokens = math.prod(x.shape[:-1])
    g = grad.reshape(tokens, p, r)
    rows = x.reshape(tokens, q, s)
    empty = grad.new_empty(0)
    dx = (a.transpose(0, 1) @ g @ b).reshape(x.shape) if need_x else empty
    if not need_factors:
        return dx, empty, empty
    da = torch.einsum("tpr,tqr->pq", g, rows @ b.transpose(0, 1))
    db = torch.einsum("tqr,tqs->rs", a.transpose(0, 1) @ g, rows)
    return dx, da, db


def _check(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int, int]:
    """(p, q, r, s) of valid arguments; otherwise raises the error that names the problem."""
    # One cheap predicate on the hot path; the itemised checks run only to explain a failure
    # (also of arguments that are no tensors at all: torch.ops lets None through).
    try:
        ok = (
            a.dim() == 2
            and b.dim() == 2
            and x.dim() >= 1
            and x.dtype in check.FLOATING
            and x.dtype == a.dtype == b.dtype
            and x.device == a.device == b.device
            and x.shape[-1] == a.shape[1] * b.shape[1]
        )
    except (AttributeError, TypeError):
        ok = False
    if ok:
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
    check.companion("grad", grad, x, (*x.shape[:-1], p * r))


def _check_output_like(name: str, t: torch.Tensor, x: torch.Tensor, p: int, r: int) -> None:
    """``t`` (grad or base) matches the op's output: x's dtype and device, shape (..., p*r)."""
    check.floating(name, t)
    check.same_dtype(**{name: t, "x": x})
    check.same_device(**{name: t, "x": x})
    expected = (*x.shape[:-1], p * r)
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


# ---- implementations ------------------------------------------------------------------------
# Each op has a native kernel and a composite path on torch's GEMMs; lowrank.dispatch picks
# per (device, dtype, token bucket, factor shapes). Native kernels get raw addresses: every
# tensor whose address is taken stays bound to a name until the kernel returns.


def b_first(p: int, q: int, r: int, s: int) -> bool:
    """True when ``Z = X b^T`` then ``a Z`` costs no more than ``W = a X`` then ``W b^T``."""
    return q * s * r + p * q * r <= p * q * s + p * s * r


def _forward_unavailable(x, a, b, base, scale):
    p, q, r, s = a.shape[0], a.shape[1], b.shape[0], b.shape[1]
    return _native.unavailable(x, lambda: _native._cuda.kron_forward_smem_bytes(p, q, r, s))


def _forward_native(x, a, b, base, scale, out=None):
    """The fused kernel. With ``out`` (contiguous, and ``base is out``) it works in place:
    the kernel reads each element of base before writing it."""
    if _native.upcast_on_cpu(x):
        base32 = None if base is None else base.float()
        y = _forward_native(x.float(), a.float(), b.float(), base32, scale).to(x.dtype)
        return y if out is None else out.copy_(y)
    (p, q), (r, s) = a.shape, b.shape
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    if out is None:
        base = None if base is None else base.contiguous()
        out = _native.new_output((*x.shape[:-1], p * r), x)
    _native.module(x).kron_matmul(
        _native.DTYPE_CODES[x.dtype], x.data_ptr(), a.data_ptr(), b.data_ptr(),
        0 if base is None else base.data_ptr(), 1.0 if scale is None else scale, out.data_ptr(),
        math.prod(x.shape[:-1]), p, q, r, s, *_native.launch_args(x),
    )  # fmt: skip
    return out


def _forward_composite(x, a, b, base, scale, out=None):
    """``a X b^T`` per token on torch's GEMMs: one product over all tokens' rows and one
    batched product sharing the factor, the cheaper order first; a residual ``base`` is
    added by the last product itself (``addmm``/``baddbmm``). The result is written into a
    tensor of the output's shape (so it is no view), or into ``out`` (``base is out``:
    in place)."""
    (p, q), (r, s) = a.shape, b.shape
    lead = x.shape[:-1]
    tokens = math.prod(lead)
    rows = x.reshape(tokens, q, s)
    alpha = 1.0 if scale is None else scale
    in_place = out is not None
    result = out if in_place else x.new_empty((*lead, p * r))
    if b_first(p, q, r, s):
        z = (rows.reshape(tokens * q, s) @ b.T).view(tokens, q, r)
        a_rows, target = a.expand(tokens, p, q), result.view(tokens, p, r)
        if in_place:
            target.baddbmm_(a_rows, z, alpha=alpha)
        elif base is None:
            torch.bmm(a_rows, z, out=target)
        else:
            torch.baddbmm(base.reshape(tokens, p, r), a_rows, z, alpha=alpha, out=target)
    else:
        w = torch.bmm(a.expand(tokens, p, q), rows).view(tokens * p, s)
        target = result.view(tokens * p, r)
        if in_place:
            target.addmm_(w, b.T, alpha=alpha)
        elif base is None:
            torch.mm(w, b.T, out=target)
        else:
            torch.addmm(base.reshape(tokens * p, r), w, b.T, alpha=alpha, out=target)
    return result


_TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)


def _tc_applies(x, *_) -> bool:
    """The tensor-core kernels are for float16/bfloat16 on CUDA."""
    return x.is_cuda and x.dtype in _TENSOR_CORE_DTYPES


def _tc_unavailable(x, a, b, *_, grads: bool = False):
    """Why the tensor-core kernels cannot run here (where they apply), or None."""
    (p, q), (r, s) = a.shape, b.shape
    return _native.tensor_cores_unavailable(
        x,
        lambda: _native._cuda.kron_tc_smem_bytes(p, q, r, s, grads),  # one token per tile
    )


def _forward_tc(x, a, b, base, scale, out=None):
    """The tensor-core kernel (CUDA, float16/bfloat16): both products per tile of tokens on
    chip, the residual fused; with ``out`` (``base is out``) in place."""
    (p, q), (r, s) = a.shape, b.shape
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    if out is None:
        base = None if base is None else base.contiguous()
        out = _native.new_output((*x.shape[:-1], p * r), x)
    _native._cuda.kron_matmul_tc(
        _native.DTYPE_CODES[x.dtype], x.data_ptr(), a.data_ptr(), b.data_ptr(),
        0 if base is None else base.data_ptr(), 1.0 if scale is None else scale, out.data_ptr(),
        math.prod(x.shape[:-1]), p, q, r, s, *_native.launch_args(x),
    )  # fmt: skip
    return out


def _static_forward(x, *args):
    return dispatch.default_kind(x)


_FORWARD_IMPLS = (
    dispatch.Impl("native", dispatch.NATIVE, _forward_native, _forward_unavailable),
    dispatch.Impl(
        "tensor-core", dispatch.NATIVE, _forward_tc, _tc_unavailable, applies=_tc_applies
    ),
    dispatch.Impl("composite", dispatch.COMPOSITE, _forward_composite),
)
_forward_dispatch = dispatch.Dispatcher("kron_matmul", _FORWARD_IMPLS, _static_forward, (0, 3))
_add_dispatch = dispatch.Dispatcher("kron_matmul_add", _FORWARD_IMPLS, _static_forward, (0, 3))


def _key(x, p, q, r, s):
    return (x.dtype, dispatch.bucket(math.prod(x.shape[:-1])), p, q, r, s)


def _forward_kernel(x, a, b):
    p, q, r, s = _check(x, a, b)
    return _forward_dispatch(_key(x, p, q, r, s), x, x, a, b, None, None)


def _add_kernel(base, x, a, b, scale=1.0):
    p, q, r, s = _check(x, a, b)
    _check_output_like("base", base, x, p, r)
    return _add_dispatch(_key(x, p, q, r, s), x, x, a, b, base, scale)


def _add_inplace_kernel(base, x, a, b, scale=1.0):
    p, q, r, s = _check(x, a, b)
    _check_output_like("base", base, x, p, r)
    check.no_overlap("kron_matmul_add_", "base", base, x=x, a=a, b=b)
    impl = _add_dispatch.choose(_key(x, p, q, r, s), x, x, a, b, base, scale)
    if not base.is_contiguous():
        base.copy_(impl.run(x, a, b, base, scale))
    else:  # both implementations read each element of base before writing it
        impl.run(x, a, b, base, scale, out=base)


def _backward_unavailable(grad, x, a, b, need_x, need_factors):
    p, q, r, s = a.shape[0], a.shape[1], b.shape[0], b.shape[1]
    return _native.unavailable(
        x,
        lambda: max(
            _native._cuda.kron_backward_smem_bytes(p, q, r, s),
            _native._cuda.kron_forward_smem_bytes(q, p, s, r),
        ),
    )


def _backward_native(grad, x, a, b, need_x, need_factors):
    if _native.upcast_on_cpu(x):
        outs = _backward_native(grad.float(), x.float(), a.float(), b.float(), need_x, need_factors)
        return tuple(o.to(x.dtype) for o in outs)
    (p, q), (r, s) = a.shape, b.shape
    native, launch_args = _native.module(x), _native.launch_args(x)
    empty = x.new_empty(0)
    if not x.is_cpu:
        # dX = dY @ kron(a^T, b^T)^T: the forward kernel on transposed factors.
        dx = _forward_native(grad, a.t(), b.t(), None, None) if need_x else empty
        need_x = False
    else:
        dx = _native.new_output(x.shape, x) if need_x else empty
    if not need_factors and not need_x:
        return dx, empty, empty
    grad, x, a, b = grad.contiguous(), x.contiguous(), a.contiguous(), b.contiguous()
    tokens = math.prod(x.shape[:-1])
    code = _native.DTYPE_CODES[x.dtype]
    if x.is_cpu:
        da = _native.new_output((p, q), a) if need_factors else empty
        db = _native.new_output((r, s), b) if need_factors else empty
        native.kron_matmul_backward(
            code, grad.data_ptr(), x.data_ptr(), a.data_ptr(), b.data_ptr(),
            dx.data_ptr() if need_x else 0, da.data_ptr() if need_factors else 0,
            db.data_ptr() if need_factors else 0, tokens, p, q, r, s, *launch_args,
        )  # fmt: skip
        return dx, da, db
    # CUDA: the factor gradients accumulate across blocks in float32 (atomics).
    da = torch.zeros((p, q), dtype=torch.float32, device=x.device)
    db = torch.zeros((r, s), dtype=torch.float32, device=x.device)
    native.kron_factor_grads(
        code, grad.data_ptr(), x.data_ptr(), a.data_ptr(), b.data_ptr(), da.data_ptr(),
        db.data_ptr(), tokens, p, q, r, s, *launch_args,
    )  # fmt: skip
    return dx, da.to(a.dtype), db.to(b.dtype)


def _backward_composite(grad, x, a, b, need_x, need_factors):
    """Gradients on torch's GEMMs: ``K = a^T G`` (batched, shared), ``dX = K b`` and
    ``db = sum_t K_t^T X_t`` (products over all tokens' rows), ``da = sum_t G_t Z_t^T``
    with ``Z = X b^T`` (one product over tokens x r after regrouping G by rows of a)."""
    (p, q), (r, s) = a.shape, b.shape
    tokens = math.prod(x.shape[:-1])
    g = grad.reshape(tokens, p, r)
    rows = x.reshape(tokens, q, s)
    empty = x.new_empty(0)
    k = torch.bmm(a.T.expand(tokens, q, p), g).view(tokens * q, r)
    dx = (k @ b).view(x.shape) if need_x else empty
    if not need_factors:
        return dx, empty, empty
    db = k.T @ rows.reshape(tokens * q, s)
    z = torch.bmm(rows.transpose(0, 1), b.T.expand(q, s, r))  # (q, tokens, r): Z by rows of a
    da = g.transpose(0, 1).reshape(p, tokens * r) @ z.view(q, tokens * r).T
    return dx, da, db


def _backward_tc_unavailable(grad, x, a, b, need_x, need_factors):
    return _tc_unavailable(x, a, b, grads=True) or _tc_unavailable(x, a.t(), b.t())


def _backward_tc(grad, x, a, b, need_x, need_factors):
    """Tensor-core gradients: dX by the forward kernel on the transposed factors, da and db
    as per-block partial sums reduced in a fixed order (deterministic)."""
    (p, q), (r, s) = a.shape, b.shape
    empty = x.new_empty(0)
    dx = _forward_tc(grad, a.t(), b.t(), None, None) if need_x else empty
    if not need_factors:
        return dx, empty, empty
    grad, x, a, b = grad.contiguous(), x.contiguous(), a.contiguous(), b.contiguous()
    tokens = math.prod(x.shape[:-1])
    device, stream = _native.launch_args(x)
    blocks = _native._cuda.kron_tc_grad_blocks(tokens, p, q, r, s, device)
    workspace = torch.empty(max(1, blocks * (p * q + r * s)), dtype=torch.float32,
                            device=x.device)  # fmt: skip
    da = torch.empty((p, q), dtype=torch.float32, device=x.device)
    db = torch.empty((r, s), dtype=torch.float32, device=x.device)
    _native._cuda.kron_factor_grads_tc(
        _native.DTYPE_CODES[x.dtype], grad.data_ptr(), x.data_ptr(), a.data_ptr(), b.data_ptr(),
        da.data_ptr(), db.data_ptr(), workspace.data_ptr(), tokens, p, q, r, s, device, stream,
    )  # fmt: skip
    return dx, da.to(a.dtype), db.to(b.dtype)


_BACKWARD_IMPLS = (
    dispatch.Impl("native", dispatch.NATIVE, _backward_native, _backward_unavailable,
                  nondeterministic_on=frozenset({"cuda"})),
    dispatch.Impl("tensor-core", dispatch.NATIVE, _backward_tc, _backward_tc_unavailable,
                  applies=lambda grad, x, *_: _tc_applies(x)),
    dispatch.Impl("composite", dispatch.COMPOSITE, _backward_composite),
)  # fmt: skip
_backward_dispatch = dispatch.Dispatcher("kron_matmul_backward", _BACKWARD_IMPLS, _static_forward,
                                         (0, 1))  # fmt: skip


def _backward_kernel(grad, x, a, b, need_x, need_factors):
    p, q, r, s = _check(x, a, b)
    _check_output_like("grad", grad, x, p, r)
    key = (*_key(x, p, q, r, s), need_x, need_factors)
    return _backward_dispatch(key, x, grad, x, a, b, need_x, need_factors)


for _device in ("cpu", "cuda"):
    register_kernel(_FORWARD, _device)(_forward_kernel)
    register_kernel(_ADD, _device)(_add_kernel)
    register_kernel(_ADD_INPLACE, _device)(_add_inplace_kernel)
    register_kernel(_BACKWARD, _device)(_backward_kernel)


# ---- fake kernels and autograd ------------------------------------------------------------


@register_fake(_FORWARD)
def _forward_fake(x, a, b):
    p, _, r, _ = _check(x, a, b)
    return x.new_empty((*x.shape[:-1], p * r))


@register_fake(_ADD)
def _add_fake(base, x, a, b, scale=1.0):
    p, _, r, _ = _check(x, a, b)
    _check_output_like("base", base, x, p, r)
    return x.new_empty((*x.shape[:-1], p * r))


@register_fake(_ADD_INPLACE)
def _add_inplace_fake(base, x, a, b, scale=1.0):
    p, _, r, _ = _check(x, a, b)
    _check_output_like("base", base, x, p, r)


@register_fake(_BACKWARD)
def _backward_fake(grad, x, a, b, need_x, need_factors):
    p, q, r, s = _check(x, a, b)
    _check_output_like("grad", grad, x, p, r)
    empty = x.new_empty(0)
    dx = x.new_empty(x.shape) if need_x else empty
    if not need_factors:
        return dx, empty, empty
    return dx, a.new_empty((p, q)), b.new_empty((r, s))


def _grads(grad, x, a, b, scale, needs):
    """Gradients of scale * kron_matmul(x, a, b) for the (x, a, b) flags in needs."""
    need_x, need_a, need_b = needs
    # Folding scale into b scales dx and da; db does not involve b, so it is scaled after.
    b_scaled = b if scale == 1.0 else b * scale
    dx, da, db = _BACKWARD(grad, x, a, b_scaled, need_x, need_a or need_b)
    if need_b and scale != 1.0:
        db = db * scale
    return (dx if need_x else None, da if need_a else None, db if need_b else None)


class _KronMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b):
        y = run_below(_FORWARD, x, a, b)
        ctx.save_for_backward(x, a, b)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, a, b = ctx.saved_tensors
        return _grads(grad, x, a, b, 1.0, ctx.needs_input_grad)


class _KronMatmulAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, x, a, b, scale=1.0):
        y = run_below(_ADD, base, x, a, b, scale)
        ctx.save_for_backward(x, a, b)
        ctx.scale = scale
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, a, b = ctx.saved_tensors
        need_base = ctx.needs_input_grad[0]
        grads = _grads(grad, x, a, b, ctx.scale, ctx.needs_input_grad[1:4])
        return (grad if need_base else None, *grads, None)


class _KronMatmulAddInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        raise RuntimeError(
            "lowrank.ops.kron_matmul_add_ is not differentiable; use kron_matmul_add when "
            "gradients are needed"
        )


def _add_jvp(primals, tangents):
    """``t_base + scale * (kron(t_x, a, b) + kron(x, t_a, b) + kron(x, a, t_b))``."""
    _, x, a, b, scale = primals
    out = tangents[0]
    for i in (1, 2, 3):
        if tangents[i] is not None:
            args = [x, a, b]
            args[i - 1] = tangents[i]
            out = scale * _FORWARD(*args) if out is None else _ADD(out, *args, scale)
    return out


register_autograd(_FORWARD, _KronMatmul, multilinear_jvp(_FORWARD, (0, 1, 2)))
register_autograd(_ADD, _KronMatmulAdd, _add_jvp)
register_autograd(_ADD_INPLACE, _KronMatmulAddInplace)
register_not_differentiable(_BACKWARD, "double backward through kron_matmul is not supported")
register_autocast(_FORWARD)
register_autocast(_ADD)
register_autocast(_ADD_INPLACE, like=0)


# ---- sums of Kronecker products -----------------------------------------------------------------


def kron_sum_matmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Returns ``x @ W.T`` for ``W = sum_k torch.kron(a[k], b[k])`` (the weight of
    ``KronLinear(terms=K)``, Compacter's PHM layer).

    Args:
        x: ``(..., q*s)`` input.
        a: ``(K, p, q)`` left factors.
        b: ``(K, r, s)`` right factors.

    Returns:
        ``(..., p*r)`` with ``x``'s dtype. Differentiable in all three arguments.

    Three formulations, chosen by :mod:`lowrank.dispatch` per shape (measured; a FLOP
    count where nothing is measured): ``terms``, one :func:`kron_matmul` per term
    accumulated in place (cheap for few terms); ``batched``, all terms in two GEMMs,
    ``Z = X [b_1; ...; b_K]^T`` then ``[a_1 ... a_K] Z`` (``2 K q r (s + p)`` flops per
    token, no per-term launches); ``rebuild``, the dense ``W`` (``K p q r s``
    multiply-adds, once per call) then one GEMM. With many terms a sum of Kronecker
    products costs more per token than the dense weight, and ``rebuild`` wins as soon as
    there are more tokens than terms.
    """
    x, a, b = check.tensor("x", x), check.tensor("a", a), check.tensor("b", b)
    x, a, b = autocast_cast(x, a, b)
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[0] == 0:
        raise ValueError(f"a and b must be (K, p, q) and (K, r, s) with the same K >= 1, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")  # fmt: skip
    terms, p, q = a.shape
    _, r, s = b.shape
    if x.dim() == 0 or x.shape[-1] != q * s:
        raise ValueError(f"x must be (..., {q * s}) for factors of shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}, got {tuple(x.shape)}")  # fmt: skip
    check.floating("x", x)
    check.same_dtype(x=x, a=a, b=b)
    check.same_device(x=x, a=a, b=b)
    if terms == 1:
        return kron_matmul(x, a[0], b[0])
    tokens = math.prod(x.shape[:-1])
    key = (x.dtype, dispatch.bucket(tokens), terms, p, q, r, s)
    return _sum_dispatch(key, x, x, a, b)


def _sum_terms(x, a, b):
    y = kron_matmul(x, a[0], b[0])
    for k in range(1, a.shape[0]):
        y = kron_matmul_add(y, x, a[k], b[k])
    return y


def _sum_batched(x, a, b):
    terms, p, q = a.shape
    _, r, s = b.shape
    lead = x.shape[:-1]
    tokens = math.prod(lead)
    # z[t, q, k, r] = sum_s x[t, q, s] b[k, r, s]
    z = x.reshape(tokens * q, s) @ b.reshape(terms * r, s).T
    # y[p, (t, r)] = sum_(k, q) a[k, p, q] z[t, q, k, r]
    z = z.view(tokens, q, terms, r).permute(2, 1, 0, 3).reshape(terms * q, tokens * r)
    y = a.permute(1, 0, 2).reshape(p, terms * q) @ z
    return y.view(p, tokens, r).transpose(0, 1).reshape(*lead, p * r)


def kron_sum_dense(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_k torch.kron(a[k], b[k])`` as one contraction over ``k``."""
    _, p, q = a.shape
    _, r, s = b.shape
    w = torch.einsum("kpq,krs->prqs", a, b)
    return w.reshape(p * r, q * s)


def _sum_rebuild(x, a, b):
    return torch.nn.functional.linear(x, kron_sum_dense(a, b))


def _static_sum(_sample, x, a, b):
    """Fewest flops between ``batched`` and ``rebuild``."""
    terms, p, q = a.shape
    _, r, s = b.shape
    tokens = math.prod(x.shape[:-1])
    batched = tokens * terms * q * r * (s + p)
    rebuild = (terms + tokens) * p * q * r * s
    return "batched" if batched <= rebuild else "rebuild"


_sum_dispatch = dispatch.Dispatcher("kron_sum_matmul", (
    dispatch.Impl("terms", dispatch.NATIVE, _sum_terms),
    dispatch.Impl("batched", dispatch.COMPOSITE, _sum_batched),
    dispatch.Impl("rebuild", dispatch.COMPOSITE, _sum_rebuild),
), _static_sum, (0,))  # fmt: skip


def kron_sum_matmul_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch specification of :func:`kron_sum_matmul`."""
    w = sum(torch.kron(a[k], b[k]) for k in range(a.shape[0]))
    return x @ w.T
