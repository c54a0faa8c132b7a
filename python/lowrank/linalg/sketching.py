"""Test matrices for randomized range finders, drawn from counter-based streams.

``A @ Omega`` for an ``n x l`` test matrix of one of four kinds (Halko, Martinsson
& Tropp 2011; Tropp, Yurtsever, Udell & Cevher 2019):

- ``gaussian``: i.i.d. N(0, 1); ``rademacher``: i.i.d. +-1;
- ``srht``: ``D H S`` (random signs, Walsh-Hadamard, ``l`` sampled columns), applied
  to the rows of a dense ``A`` by a fast transform, ``O(m n log n)``;
- ``sparse_sign``: ``min(8, l)`` random +-1 per row of ``Omega``, applied by a
  scatter, ``O(m n nnz)``.

Every draw comes from ``lowrank.ops.sketch.philox_fill_`` with the given seed, so
the same seed gives the same ``Omega`` on every device and process. Streams
keep the different random quantities independent.
"""

from __future__ import annotations

import math

import torch

from lowrank.linalg.orthogonalize import times_power_of_two
from lowrank.ops import sketch as ops

SKETCHES = ("gaussian", "rademacher", "srht", "sparse_sign")
SPARSE_SIGN_NONZEROS = 8

# Stream numbers of the random quantities drawn from one seed.
STREAM_TEST_MATRIX = 0
STREAM_SRHT_SIGNS = 1
STREAM_SRHT_COLUMNS = 2
STREAM_SPARSE_COLUMNS = 3
STREAM_SPARSE_SIGNS = 4
STREAM_BLOCK = 16  # fixed-accuracy mode: block b uses stream STREAM_BLOCK + b
STREAM_PROBES = 1 << 20  # error estimation
STREAM_NORM_PROBES = (1 << 20) + 1  # norms of operators in fixed-accuracy mode


def test_matrix(n: int, l: int, kind: str, seed: int, stream: int, dtype, device) -> torch.Tensor:
    """The dense ``n x l`` test matrix (for operators without row access)."""
    if kind == "gaussian":
        return ops.random_matrix((n, l), ops.NORMAL, seed, stream, dtype, device)
    if kind == "rademacher":
        return ops.random_matrix((n, l), ops.SIGN, seed, stream, dtype, device)
    if kind == "srht":
        signs, cols, _ = _srht_parts(n, l, seed, dtype, device)
        return ops.hadamard_columns(n, cols, dtype, device) * signs[:, None] / math.sqrt(l)
    cols, signs = _sparse_sign_parts(n, l, seed, dtype, device)
    omega = torch.zeros(n, l, dtype=dtype, device=device)
    rows = torch.arange(n, device=device).repeat_interleave(cols.shape[1])
    omega.index_put_((rows, cols.reshape(-1).long()), signs.reshape(-1), accumulate=True)
    return omega


def sketch_columns(op, l: int, kind: str, seed: int, stream: int = STREAM_TEST_MATRIX):
    """``A @ Omega`` (``..., m x l``) for the operator ``op``."""
    if kind in ("srht", "sparse_sign") and op.dense is not None and not op.dtype.is_complex:
        a = op.dense
        rows = a.reshape(math.prod(a.shape[:-1]), op.n).to(op.dtype)
        if kind == "srht":
            signs, cols, n2 = _srht_parts(op.n, l, seed, op.dtype, a.device)
            y = ops.srht_rows(rows, signs, cols, n2, 1.0 / math.sqrt(l))
        else:
            cols, signs = _sparse_sign_parts(op.n, l, seed, op.dtype, a.device)
            y = ops.sparse_sign_rows(rows, cols, signs, l)
        y = y.reshape(*op.batch, op.m, l)
        return times_power_of_two(y, op.scale_exponent) if op.scale_exponent else y
    # A complex A takes the real test matrix (the range finder needs no complex one).
    omega = test_matrix(op.n, l, kind, seed, stream, op.dtype.to_real(), op.device)
    return op.matmat(omega.to(op.dtype))


def _srht_parts(n, l, seed, dtype, device):
    n2 = ops.next_power_of_two(n)
    if l > n2:
        raise ValueError(f"an SRHT sketch of {n} columns has at most {n2} samples, asked {l}")
    signs = ops.random_matrix((n,), ops.SIGN, seed, STREAM_SRHT_SIGNS, dtype, device)
    keys = ops.random_matrix((n2,), ops.UNIFORM, seed, STREAM_SRHT_COLUMNS, torch.float64, device)
    cols = torch.sort(torch.topk(keys, l, largest=False).indices).values
    return signs, cols, n2


def _sparse_sign_parts(n, l, seed, dtype, device):
    """Column indices (int32, distinct within a row) and signs of each row of Omega."""
    nonzeros = min(SPARSE_SIGN_NONZEROS, l)
    keys = ops.random_matrix((n, nonzeros), ops.UNIFORM, seed, STREAM_SPARSE_COLUMNS,
                             torch.float64, device)  # fmt: skip
    cols = torch.clamp((keys * l).long(), max=l - 1)
    for t in range(1, nonzeros):  # move repeats to the next free column
        for _ in range(nonzeros):
            repeated = (cols[:, t : t + 1] == cols[:, :t]).any(dim=1)
            if not bool(repeated.any()):
                break
            cols[repeated, t] = (cols[repeated, t] + 1) % l
    signs = ops.random_matrix((n, nonzeros), ops.SIGN, seed, STREAM_SPARSE_SIGNS, dtype, device)
    return cols.to(torch.int32), signs / math.sqrt(nonzeros)
