"""Projection of a dense matrix onto Monarch matrices (Dao et al. 2022, Theorem 1).

In the layout of :func:`lowrank.ops.monarch_matmul` (``w1``: ``(k, q, p)``,
``w2``: ``(l, s, r)``), entry ``W[ss*l + ll, kk*p + pp]`` collects the
intermediate indices ``i`` with ``i mod l == ll`` and ``i div q == kk``::

    W_(ll, kk)[ss, pp] = sum_(i) w2[ll, ss, i div l] * w1[kk, i mod q, pp]

Each intermediate index belongs to one block ``(ll, kk)`` only, so the blocks
decouple and the closest Monarch matrix in Frobenius norm takes the truncated
SVD of every ``s x p`` block. With ``q = l * rank`` and ``r = k * rank`` every
block gets exactly ``rank`` terms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lowrank import _validate as check
from lowrank.linalg.rsvd import rsvd


class MonarchFactors(NamedTuple):
    """``w1`` ``(k, l*rank, p)``, ``w2`` ``(l, s, k*rank)`` and the relative Frobenius error."""

    w1: torch.Tensor
    w2: torch.Tensor
    relative_error: float


def _block_counts(nblocks) -> tuple[int, int]:
    if isinstance(nblocks, (tuple, list)):
        return check.int_pair("nblocks", nblocks)
    n = check.positive_int("nblocks", nblocks)
    return n, n


def _truncated_svd(blocks: torch.Tensor, rank: int):
    """Top-``rank`` SVD of a batch of blocks: randomized where that is cheaper."""
    small = min(blocks.shape[-2:])
    if rank + 10 < small // 2:
        return rsvd(blocks, rank, seed=0, n_iter=4)
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def monarch_project(w: torch.Tensor, nblocks, rank: int = 1) -> MonarchFactors:
    """The Monarch matrix closest to ``w`` (``m x n``) in Frobenius norm.

    Args:
        w: ``(m, n)`` with ``n`` divisible by ``k`` and ``m`` by ``l``.
        nblocks: ``k = l`` (an int) or ``(k, l)``: blocks of the first and second factor.
        rank: rank of each ``(m/l) x (n/k)`` block of ``w`` (``q = l*rank``, ``r = k*rank``).
    """
    check.floating("w", w)
    check.ndim("w", w, 2, "(out_features, in_features)")
    k, l = _block_counts(nblocks)
    check.positive_int("rank", rank)
    m, n = w.shape
    if n % k or m % l:
        raise ValueError(
            f"w of shape {(m, n)} does not split into blocks: n = {n} must be divisible by "
            f"k = {k} and m = {m} by l = {l} (pad the weight first)"
        )
    p, s = n // k, m // l
    if rank > min(p, s):
        raise ValueError(f"rank must be at most min(n/k, m/l) = {min(p, s)}, got {rank}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf")
    work = w if w.dtype in (torch.float32, torch.float64) else w.float()
    q, r = l * rank, k * rank
    # blocks[ll, kk] = W[ss*l + ll, kk*p + pp] as (s, p)
    blocks = work.reshape(s, l, k, p).permute(1, 2, 0, 3)
    u, sv, vh = _truncated_svd(blocks, rank)
    root = sv.sqrt()
    w1 = torch.zeros(k, q, p, dtype=work.dtype, device=w.device)
    w2 = torch.zeros(l, s, r, dtype=work.dtype, device=w.device)
    # The j-th intermediate index of block (ll, kk): i = kk*q + j*l + ll.
    ll = torch.arange(l, device=w.device)[:, None, None]
    kk = torch.arange(k, device=w.device)[None, :, None]
    j = torch.arange(rank, device=w.device)[None, None, :]
    i = kk * q + j * l + ll  # (l, k, rank)
    w1[kk.expand_as(i), i % q] = (vh * root[..., None]).reshape(l, k, rank, p)
    w2.permute(0, 2, 1)[ll.expand_as(i), i // l] = (u * root[..., None, :]).mT.reshape(
        l, k, rank, s
    )
    approx = ((u * sv[..., None, :]) @ vh).permute(2, 0, 1, 3).reshape(m, n)
    total = work.norm()
    rel = float((work - approx).norm() / total) if total > 0 else 0.0
    return MonarchFactors(w1.to(w.dtype), w2.to(w.dtype), rel)
