"""Random sketching primitives for randomized SVD: counter-based test matrices,
the subsampled randomized Hadamard transform (SRHT) and sparse sign embeddings.

- ``philox_fill_(out, kind, seed, stream)``: ``out.view(-1)[e]`` is draw ``e`` of the
  Philox4x32-10 stream ``(seed, stream)`` (Salmon et al. 2011): standard normal
  (Box-Muller, kind 0), Rademacher (kind 1) or uniform on (0, 1] (kind 2). The
  values depend only on ``(seed, stream, e)``: the same on every device and process.
- ``srht_rows(a, signs, cols, n2, scale)``: the rows of ``scale * A D H S`` with
  ``D = diag(signs)``, ``H`` the ``n2 x n2`` Walsh-Hadamard matrix (rows of ``A``
  zero-padded to ``n2 = 2^k``) and ``S`` the columns ``cols`` (Woolfe, Liberty,
  Rokhlin & Tygert 2008), by a fast Walsh-Hadamard transform per row.
- ``sparse_sign_rows(a, cols, signs, l)``: ``A S`` for the ``n x l`` sparse sign
  matrix with ``S[j, cols[j, t]] = signs[j, t]`` (Clarkson & Woodruff 2013), by a
  scatter per row.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lowrank import _native, dispatch
from lowrank import _validate as check
from lowrank.ops._library import (
    call,
    define,
    multilinear_jvp,
    register_autograd,
    register_fake,
    register_kernel,
    run_below,
)

NORMAL, SIGN, UNIFORM = 0, 1, 2

_FILL = define("philox_fill_(Tensor(a!) out, int kind, int seed, int stream) -> ()")
_SRHT = define("srht_rows(Tensor a, Tensor signs, Tensor cols, int n2, float scale) -> Tensor")
_SPARSE_SIGN = define("sparse_sign_rows(Tensor a, Tensor cols, Tensor signs, int l) -> Tensor")

_FILL_DTYPES = {"cpu": (torch.float32, torch.float64),
                "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}  # fmt: skip


def philox_fill_(out: torch.Tensor, kind: int, seed: int, stream: int = 0) -> torch.Tensor:
    """Fills a contiguous ``out`` with counter-based random draws; returns ``out``."""
    check.tensor("out", out)
    call(_FILL, out, kind, seed, stream)
    return out


def random_matrix(shape, kind: int, seed: int, stream: int, dtype: torch.dtype, device):
    """A new tensor of counter-based draws (see :func:`philox_fill_`)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return philox_fill_(out, kind, seed, stream)


def srht_rows(a: torch.Tensor, signs: torch.Tensor, cols: torch.Tensor, n2: int, scale: float):
    """Rows of ``scale * (A * signs) H_{n2}`` at columns ``cols``; ``a`` is ``(rows, n)``."""
    return call(_SRHT, a, signs, cols, n2, scale)


def sparse_sign_rows(a: torch.Tensor, cols: torch.Tensor, signs: torch.Tensor, l: int):
    """``A @ S`` with ``S[j, cols[j, t]] += signs[j, t]``; ``a`` is ``(rows, n)``."""
    return call(_SPARSE_SIGN, a, cols, signs, l)


# ---- references ------------------------------------------------------------------------------


def walsh_hadamard_reference(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dim (a power of two)."""
    n2 = x.shape[-1]
    h = 1
    while h < n2:
        pairs = x.reshape(*x.shape[:-1], n2 // (2 * h), 2, h)
        x = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]),
                        dim=-2).reshape(*x.shape[:-1], n2)  # fmt: skip
        h *= 2
    return x


def srht_rows_reference(a, signs, cols, n2, scale):
    padded = torch.nn.functional.pad(a * signs, (0, n2 - a.shape[-1]))
    return scale * walsh_hadamard_reference(padded)[..., cols]


def sparse_sign_rows_reference(a, cols, signs, l):
    n, nonzeros = cols.shape
    dense = torch.zeros(n, l, dtype=a.dtype, device=a.device)
    rows = torch.arange(n, device=a.device).repeat_interleave(nonzeros)
    dense.index_put_((rows, cols.reshape(-1).long()), signs.reshape(-1), accumulate=True)
    return a @ dense


_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_reference(counter, stream: int, seed: int) -> np.ndarray:
    """Philox4x32-10 words for an array of 64-bit counters: shape ``(len(counter), 4)``."""
    counter = np.asarray(counter, dtype=np.uint64)
    c0, c1 = counter & _MASK32, counter >> np.uint64(32)
    c2 = np.full_like(counter, np.uint64(stream) & _MASK32)
    c3 = np.full_like(counter, np.uint64(stream) >> np.uint64(32))
    k0, k1 = np.uint64(seed) & _MASK32, np.uint64(seed) >> np.uint64(32)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + np.uint64(0x9E3779B9)) & _MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _MASK32
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def philox_fill_reference(out: torch.Tensor, kind: int, seed: int, stream: int = 0):
    """Pure NumPy specification of :func:`philox_fill_` (float64 arithmetic)."""
    e = np.arange(out.numel(), dtype=np.uint64)
    if kind == SIGN:
        words = philox4x32_reference(e >> np.uint64(7), stream, seed)
        word = words[np.arange(e.size), ((e >> np.uint64(5)) & np.uint64(3)).astype(np.int64)]
        bit = (word.astype(np.uint64) >> (e & np.uint64(31))) & np.uint64(1)
        values = np.where(bit == 1, 1.0, -1.0)
    else:
        words = philox4x32_reference(e >> np.uint64(2), stream, seed).astype(np.float64)
        uniform = (np.floor(words / 256.0) + 1.0) / 16777216.0
        lane = (e & np.uint64(3)).astype(np.int64)
        if kind == UNIFORM:
            values = uniform[np.arange(e.size), lane]
        else:
            pair = lane & 2
            u1, u2 = uniform[np.arange(e.size), pair], uniform[np.arange(e.size), pair + 1]
            radius = np.sqrt(-2.0 * np.log(u1))
            angle = 2.0 * np.pi * u2
            values = radius * np.where(lane & 1, np.sin(angle), np.cos(angle))
    out.copy_(torch.from_numpy(values).reshape(out.shape))
    return out


# ---- checks ------------------------------------------------------------------------------


def _check_rows(name: str, a: torch.Tensor) -> None:
    check.floating(name, a)
    check.ndim(name, a, 2, "(rows, n)")


def _check_srht(a, signs, cols, n2):
    _check_rows("a", a)
    check.floating("signs", signs)
    check.tensor("cols", cols)
    check.same_dtype(a=a, signs=signs)
    check.same_device(a=a, signs=signs, cols=cols)
    n = a.shape[1]
    if signs.shape != (n,):
        raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
    if cols.dtype != torch.int64 or cols.dim() != 1:
        raise TypeError(f"cols must be a 1-D int64 tensor, got {cols.dtype} of shape "
                        f"{tuple(cols.shape)}")  # fmt: skip
    if isinstance(n2, bool) or not isinstance(n2, int) or n2 != next_power_of_two(n):
        raise ValueError(f"n2 must be the smallest power of two >= n = {n}, i.e. "
                         f"{next_power_of_two(n)}, got {n2!r}")  # fmt: skip


def _check_sparse_sign(a, cols, signs, l):
    _check_rows("a", a)
    check.floating("signs", signs)
    check.tensor("cols", cols)
    check.same_dtype(a=a, signs=signs)
    check.same_device(a=a, signs=signs, cols=cols)
    if cols.dtype != torch.int32 or cols.dim() != 2 or cols.shape[0] != a.shape[1]:
        raise TypeError(f"cols must be an int32 ({a.shape[1]}, nonzeros) tensor, got "
                        f"{cols.dtype} of shape {tuple(cols.shape)}")  # fmt: skip
    if signs.shape != cols.shape:
        raise ValueError(f"signs must have the shape of cols {tuple(cols.shape)}, got "
                         f"{tuple(signs.shape)}")  # fmt: skip
    check.positive_int("l", l)


def _check_range(name: str, t: torch.Tensor, bound: int) -> None:
    """Every entry of the index tensor t in [0, bound): kernels index memory with them."""
    if t.numel() == 0:
        return
    low, high = torch.aminmax(t)
    if int(low) < 0 or int(high) >= bound:
        raise ValueError(f"{name} must lie in [0, {bound}), got values in [{int(low)}, "
                         f"{int(high)}]")  # fmt: skip


# ---- kernels ----------------------------------------------------------------------------------


def _native_module(t: torch.Tensor):
    return _native._C if t.is_cpu else _native._cuda


def _fill_kernel(out, kind, seed, stream):
    check.floating("out", out)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if kind not in (NORMAL, SIGN, UNIFORM):
        raise ValueError(f"kind must be 0 (normal), 1 (sign) or 2 (uniform), got {kind}")
    if not 0 <= seed < 2**63 or not 0 <= stream < 2**63:
        raise ValueError("seed and stream must be in [0, 2**63)")
    native = _native_module(out)
    if native is None:
        raise RuntimeError(f"philox_fill_ needs lowrank's native module for {out.device.type}")
    if out.dtype not in _FILL_DTYPES[out.device.type]:
        filled = philox_fill_(torch.empty_like(out, dtype=torch.float32), kind, seed, stream)
        out.copy_(filled)
        return
    native.philox_fill(_native.DTYPE_CODES[out.dtype], out.data_ptr(), out.numel(), kind, seed,
                       stream, *_native.launch_args(out))  # fmt: skip


def hadamard_columns(n: int, cols: torch.Tensor, dtype, device) -> torch.Tensor:
    """Rows ``0..n-1`` of the Walsh-Hadamard matrix at columns ``cols``: ``(n, len(cols))``
    entries ``(-1)^popcount(j & c)``."""
    v = torch.arange(n, device=device)[:, None] & cols.to(device)[None, :]
    for shift in (32, 16, 8, 4, 2, 1):
        v = v ^ (v >> shift)
    return 1.0 - 2.0 * (v & 1).to(dtype)


def _srht_native(a, signs, cols, n2, scale):
    if _native.upcast_on_cpu(a):
        return _srht_native(a.float(), signs.float(), cols, n2, scale).to(a.dtype)
    a, signs, cols = a.contiguous(), signs.contiguous(), cols.contiguous()
    out = _native.new_output((a.shape[0], cols.shape[0]), a)
    _native.module(a).srht_rows(
        _native.DTYPE_CODES[a.dtype], a.data_ptr(), a.shape[0], a.shape[1], signs.data_ptr(),
        cols.data_ptr(), cols.shape[0], n2, scale, out.data_ptr(), *_native.launch_args(a),
    )  # fmt: skip
    return out


def _srht_composite(a, signs, cols, n2, scale):
    """One GEMM with the sampled columns of ``D H`` (``n x l``): the vendor library's
    rate beats the transform's fewer operations at sketch sizes."""
    omega = hadamard_columns(a.shape[1], cols, a.dtype, a.device) * (scale * signs[:, None])
    return a @ omega


def _sparse_sign_native(a, cols, signs, l):
    if _native.upcast_on_cpu(a):
        return _sparse_sign_native(a.float(), cols, signs.float(), l).to(a.dtype)
    a, cols, signs = a.contiguous(), cols.contiguous(), signs.contiguous()
    out = _native.new_output((a.shape[0], l), a)
    _native.module(a).sparse_sign_rows(
        _native.DTYPE_CODES[a.dtype], a.data_ptr(), a.shape[0], a.shape[1], cols.data_ptr(),
        signs.data_ptr(), cols.shape[1], l, out.data_ptr(), *_native.launch_args(a),
    )  # fmt: skip
    return out


_srht_dispatch = dispatch.Dispatcher("srht_rows", (
    dispatch.Impl("native", dispatch.NATIVE, _srht_native,
                  lambda a, signs, cols, n2, scale: _native.unavailable(a, lambda: n2 * 4)),
    dispatch.Impl("composite", dispatch.COMPOSITE, _srht_composite),
), dispatch.default_kind, (0,))  # fmt: skip
_sparse_sign_dispatch = dispatch.Dispatcher("sparse_sign_rows", (
    dispatch.Impl("native", dispatch.NATIVE, _sparse_sign_native,
                  lambda a, cols, signs, l: _native.unavailable(a, lambda: l * 4),
                  frozenset({"cuda"})),
    dispatch.Impl("composite", dispatch.COMPOSITE, sparse_sign_rows_reference),
), dispatch.default_kind, (0,))  # fmt: skip


def _srht_kernel(a, signs, cols, n2, scale):
    _check_srht(a, signs, cols, n2)
    _check_range("cols", cols, n2)
    key = (a.dtype, dispatch.bucket(a.shape[0]), a.shape[1], cols.shape[0])
    return _srht_dispatch(key, a, a, signs, cols, n2, scale)


def _sparse_sign_kernel(a, cols, signs, l):
    _check_sparse_sign(a, cols, signs, l)
    _check_range("cols", cols, l)
    key = (a.dtype, dispatch.bucket(a.shape[0]), a.shape[1], l, cols.shape[1])
    return _sparse_sign_dispatch(key, a, a, cols, signs, l)


for _device in ("cpu", "cuda"):
    register_kernel(_FILL, _device)(_fill_kernel)
    register_kernel(_SRHT, _device)(_srht_kernel)
    register_kernel(_SPARSE_SIGN, _device)(_sparse_sign_kernel)


@register_fake(_FILL)
def _fill_fake(out, kind, seed, stream):
    return None


@register_fake(_SRHT)
def _srht_fake(a, signs, cols, n2, scale):
    _check_srht(a, signs, cols, n2)
    return a.new_empty((a.shape[0], cols.shape[0]))


@register_fake(_SPARSE_SIGN)
def _sparse_sign_fake(a, cols, signs, l):
    _check_sparse_sign(a, cols, signs, l)
    return a.new_empty((a.shape[0], l))


# ---- autograd: both sketches are linear in a and in the signs ---------------------------------


class _Srht(torch.autograd.Function):
    """``Y = scale * (A D) H[:, cols]``: ``dA = G Omega^T`` with ``Omega = scale D H[:, cols]``,
    ``dsigns = sum_rows A * (G (scale H[:, cols])^T)``."""

    @staticmethod
    def forward(ctx, a, signs, cols, n2, scale):
        y = run_below(_SRHT, a, signs, cols, n2, scale)
        ctx.save_for_backward(a, signs, cols)
        ctx.scale = scale
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, signs, cols = ctx.saved_tensors
        mixed = grad @ (ctx.scale * hadamard_columns(a.shape[1], cols, grad.dtype, grad.device)).T
        da = mixed * signs if ctx.needs_input_grad[0] else None
        dsigns = (mixed * a).sum(0) if ctx.needs_input_grad[1] else None
        return da, dsigns, None, None, None


class _SparseSign(torch.autograd.Function):
    """``Y = A S``: ``dA = G S^T``; ``dsigns[j, t] = (A^T G)[j, cols[j, t]]``."""

    @staticmethod
    def forward(ctx, a, cols, signs, l):
        y = run_below(_SPARSE_SIGN, a, cols, signs, l)
        ctx.save_for_backward(a, cols, signs)
        ctx.l = l
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, cols, signs = ctx.saved_tensors
        da = dsigns = None
        if ctx.needs_input_grad[0]:
            dense = torch.zeros(a.shape[1], ctx.l, dtype=grad.dtype, device=grad.device)
            rows = torch.arange(a.shape[1], device=grad.device).repeat_interleave(cols.shape[1])
            dense.index_put_((rows, cols.reshape(-1).long()), signs.reshape(-1), accumulate=True)
            da = grad @ dense.T
        if ctx.needs_input_grad[2]:
            dsigns = torch.gather(a.mT @ grad, 1, cols.long())
        return da, None, dsigns, None


register_autograd(_SRHT, _Srht, multilinear_jvp(_SRHT, (0, 1)))
register_autograd(_SPARSE_SIGN, _SparseSign, multilinear_jvp(_SPARSE_SIGN, (0, 2)))


def next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))
