"""Matrices as operators: what randomized SVD needs from its input.

Randomized range finders touch ``A`` only through products ``A @ X`` and
``A^T @ Y`` with thin ``X`` and ``Y`` (Halko, Martinsson & Tropp 2011), so any
object with ``shape``, ``dtype``, ``device``, ``matmat`` and ``rmatmat`` can be
decomposed without being formed: ``B @ A + S`` held as factors, a Monarch or
Kronecker weight, a matrix spread over devices. Dense tensors (with leading
batch dimensions) and torch sparse COO/CSR matrices are wrapped here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lowrank import _validate as check


@runtime_checkable
class LinearOperator(Protocol):
    """An ``m x n`` matrix known through its products with thin matrices.

    ``matmat(X)`` returns ``A @ X`` for ``X`` of shape ``(n, k)``; ``rmatmat(Y)``
    returns ``A^T @ Y`` for ``Y`` of shape ``(m, k)``. Both take and return tensors
    of ``dtype`` on ``device``.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, x: torch.Tensor) -> torch.Tensor: ...

    def rmatmat(self, y: torch.Tensor) -> torch.Tensor: ...


class Operator:
    """The internal form of every input: batch shape, ``m x n``, products and norms."""

    def __init__(self, batch, m, n, dtype, device, matmat, rmatmat, dense=None, fro_sq=None,
                 scale_exponent=0):  # fmt: skip
        self.batch, self.m, self.n = tuple(batch), m, n
        self.dtype, self.device = dtype, device
        self.matmat, self.rmatmat = matmat, rmatmat
        # the (..., m, n) tensor when there is one, for row sketches: the operator is
        # 2^scale_exponent times it
        self.dense, self.scale_exponent = dense, scale_exponent
        self._fro_sq = fro_sq

    def frobenius_sq(self) -> torch.Tensor | None:
        """``||A||_F^2`` per batch element (float64), or None when the operator cannot say."""
        return None if self._fro_sq is None else self._fro_sq()

    def transposed(self) -> Operator:
        dense = None if self.dense is None else self.dense.mH
        return Operator(self.batch, self.n, self.m, self.dtype, self.device, self.rmatmat,
                        self.matmat, dense, self._fro_sq, self.scale_exponent)  # fmt: skip


def dense_operator(a: torch.Tensor, compute_dtype: torch.dtype) -> Operator:
    """Products with a dense ``(..., m, n)`` tensor in ``compute_dtype``.

    On CUDA a float16/bfloat16 ``a`` is multiplied in its own precision (float32
    accumulation) and the result promoted; on the CPU it is promoted once.
    """
    if a.dtype != compute_dtype and not (a.is_cuda and a.dtype in (torch.float16, torch.bfloat16)):
        a = a.to(compute_dtype)
    low = a.dtype != compute_dtype

    def matmat(x):
        return (a @ x.to(a.dtype)).to(compute_dtype) if low else a @ x

    # A^H Y as (Y^H A)^H: BLAS runs the product with A untransposed 1.5x faster here.
    def rmatmat(y):
        return (y.mT.to(a.dtype) @ a).mT.to(compute_dtype) if low else (y.mH @ a).mH

    def fro_sq():
        return (a.abs() if a.is_complex() else a).double().square().sum(dim=(-2, -1))

    return Operator(a.shape[:-2], a.shape[-2], a.shape[-1], compute_dtype, a.device, matmat,
                    rmatmat, a, fro_sq)  # fmt: skip


def sparse_operator(a: torch.Tensor, compute_dtype: torch.dtype) -> Operator:
    """Products with a 2-D sparse COO or CSR matrix; its transpose is built once."""
    if a.dim() != 2:
        raise ValueError(f"sparse input must be 2-D, got shape {tuple(a.shape)}")
    a = a.to(compute_dtype)
    if a.layout == torch.sparse_coo:
        a = a.coalesce()
        at = a.t().coalesce()
        values = a.values()
    else:
        at = a.t().to_sparse_csr()
        values = a.values()
    return Operator((), a.shape[0], a.shape[1], compute_dtype, a.device, lambda x: a @ x,
                    lambda y: at @ y, None,
                    lambda: values.double().square().sum())  # fmt: skip


def protocol_operator(op: LinearOperator, compute_dtype: torch.dtype) -> Operator:
    """Wraps a user object following :class:`LinearOperator`; every product it returns is
    checked (a tensor of the right shape), and its ``frobenius_norm()``, when it has one,
    is used by the fixed-accuracy mode."""
    shape = op.shape
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"the operator's shape must be (m, n), got {shape!r}")
    m = check.positive_int("shape[0]", shape[0])
    n = check.positive_int("shape[1]", shape[1])

    def product(name, fn, x, rows):
        out = fn(x.to(op.dtype))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (rows, x.shape[-1]):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the operator's {name} must return a ({rows}, {x.shape[-1]}) tensor for a "
                f"({x.shape[0]}, {x.shape[-1]}) input, got {got}"
            )
        return out.to(compute_dtype)

    def matmat(x):
        return product("matmat", op.matmat, x, m)

    def rmatmat(y):
        return product("rmatmat", op.rmatmat, y, n)

    fro_sq = None
    if callable(getattr(op, "frobenius_norm", None)):

        def fro_sq():
            norm = op.frobenius_norm()
            return None if norm is None else torch.as_tensor(float(norm), dtype=torch.float64) ** 2

    return Operator((), m, n, compute_dtype, torch.device(op.device), matmat, rmatmat,
                    fro_sq=fro_sq)  # fmt: skip


SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr)
COMPLEX = (torch.complex64, torch.complex128)


def as_operator(a, compute_dtype: torch.dtype | None = None) -> Operator:
    """The :class:`Operator` for a dense tensor, a sparse COO/CSR matrix or a LinearOperator.

    ``compute_dtype`` defaults to the input's dtype, float32 for float16/bfloat16.
    """
    if isinstance(a, torch.Tensor):
        if a.dtype in COMPLEX and a.layout == torch.strided:
            check.min_ndim("A", a, 2, "(..., m, n)")
            if compute_dtype is not None and compute_dtype not in COMPLEX:
                raise TypeError(f"compute_dtype must be complex for a complex A, got "
                                f"{compute_dtype}")  # fmt: skip
            return dense_operator(a, compute_dtype or a.dtype)
        if a.dtype not in check.FLOATING:
            raise TypeError(f"A must be a floating tensor (float16 to float64, or a dense "
                            f"complex64/complex128 one), got {a.dtype} ({a.layout})")  # fmt: skip
        dtype = compute_dtype or _default_compute(a.dtype)
        if a.layout == torch.strided:
            check.min_ndim("A", a, 2, "(..., m, n)")
            return dense_operator(a, dtype)
        if a.layout in SPARSE_LAYOUTS:
            return sparse_operator(a, dtype)
        raise ValueError(f"unsupported sparse layout {a.layout}; use sparse COO or CSR")
    if isinstance(a, LinearOperator):
        if a.dtype not in check.FLOATING and a.dtype not in COMPLEX:
            raise TypeError(f"the operator's dtype must be floating or complex, got {a.dtype}")
        return protocol_operator(a, compute_dtype or _default_compute(a.dtype))
    raise TypeError(
        "A must be a tensor (dense, sparse COO or CSR) or a LinearOperator "
        f"(shape, dtype, device, matmat, rmatmat), got {type(a).__name__}"
    )


def _default_compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_finite_product(y: torch.Tensor) -> None:
    """Raises unless the first sketch ``A @ Omega`` is finite.

    NaN or Inf anywhere in ``A`` reaches the sketch (every entry of ``A`` meets a
    nonzero of the test matrix), so this costs ``m x l`` reads instead of a pass over ``A``.
    """
    if not bool(torch.isfinite(y).all()):
        raise ValueError("A contains NaN or Inf (or its products overflow)")
