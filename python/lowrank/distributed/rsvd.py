"""Randomized SVD and PCA of a matrix sharded by rows over a ``torch.distributed`` group.

Rank ``i`` holds rows ``A_i`` (contiguous, possibly uneven blocks). The range finder
of :func:`lowrank.linalg.rsvd` runs with every product kept local or reduced:

- ``Y_i = A_i Z`` stays on its rank; CholeskyQR normalises ``Y`` with one all-reduce
  of the ``l x l`` Gram matrix ``sum_i Y_i^T Y_i`` (no rank ever gathers ``Y`` or ``A``);
- ``A^T Q = sum_i A_i^T Q_i`` is one all-reduce of ``n x l``;

so each pass communicates ``O(n l + l^2)`` numbers, independent of ``m``. ``U`` comes
back sharded like ``A``; ``S`` and ``Vh`` are replicated. The test matrix is drawn
from the shared seed (counter-based), so the result equals single-process
``rsvd`` of the concatenated matrix to rounding. Collectives fail after the group's
timeout (``init_process_group(timeout=...)``) instead of hanging on a dead peer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lowrank import _validate as check
from lowrank.linalg import sketching
from lowrank.linalg.orthogonalize import NORMALIZERS, cholqr
from lowrank.linalg.rsvd import _decompose, resolve_seed

# Bytes moved by the collectives of the last call on this process (for benchmarks).
COMMUNICATED = {"bytes": 0, "all_reduces": 0}


class _Group:
    def __init__(self, group):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised (init_process_group first)")
        self.group = group
        self.size = dist.get_world_size(group)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, group=self.group)
        COMMUNICATED["bytes"] += t.numel() * t.element_size()
        COMMUNICATED["all_reduces"] += 1
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts


def _agree(g: _Group, a: torch.Tensor, seed: int | None, generator) -> tuple[int, int]:
    """Checks that every rank has the same columns and dtype; returns (total rows, seed)."""
    codes = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
    drawn = resolve_seed(seed, generator) if seed is None else seed
    meta = torch.tensor([a.shape[0], a.shape[1], codes[a.dtype], drawn], dtype=torch.int64,
                        device=a.device)  # fmt: skip
    metas = torch.stack(g.all_gather(meta)).cpu()
    if bool((metas[:, 1] != metas[0, 1]).any()):
        raise ValueError(f"ranks hold different column counts: {metas[:, 1].tolist()}")
    if bool((metas[:, 2] != metas[0, 2]).any()):
        raise ValueError("ranks hold different dtypes")
    if seed is not None and bool((metas[:, 3] != metas[0, 3]).any()):
        raise ValueError("ranks were given different seeds")
    return int(metas[:, 0].sum()), int(metas[0, 3])  # rank 0's seed when none was given


def _cholqr(g: _Group, y: torch.Tensor) -> torch.Tensor:
    """One distributed (shifted if needed) CholeskyQR pass on row-sharded ``y``."""
    gram = g.all_reduce(y.mT @ y)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        rows = int(g.all_reduce(torch.tensor([y.shape[0]], device=y.device))[0])
        l, eps = y.shape[1], torch.finfo(y.dtype).eps
        shift = 11.0 * (rows * l + l * (l + 1)) * eps * gram.diagonal().sum()
        eye = torch.eye(l, dtype=y.dtype, device=y.device)
        factor, info = torch.linalg.cholesky_ex(gram + shift * eye)
        if int(info) != 0:
            raise RuntimeError("the sketch is numerically rank-deficient; lower the rank")
    return torch.linalg.solve_triangular(factor.mT, y, upper=True, left=False)


def _range_finder(g, matmat, rmatmat, n, dtype, device, l, n_iter, sketch, seed):
    omega = sketching.test_matrix(n, l, sketch, seed, sketching.STREAM_TEST_MATRIX, dtype,
                                  device)  # fmt: skip
    y = matmat(omega)
    finite = g.all_reduce(torch.isfinite(y).all().to(torch.float32).reshape(1))
    if int(finite) != g.size:
        raise ValueError("A contains NaN or Inf on some rank (or its products overflow)")
    q = _cholqr(g, y)
    if n_iter == 0:
        q = _cholqr(g, q)
    for i in range(n_iter):
        z = cholqr(g.all_reduce(rmatmat(q)))  # replicated: every rank normalises alike
        y = matmat(z)
        q = _cholqr(g, y)
        if i == n_iter - 1:
            q = _cholqr(g, q)
    return q, g.all_reduce(rmatmat(q))


def _global_sign(g: _Group, u: torch.Tensor, vh: torch.Tensor):
    """The sign convention of lowrank.linalg.rsvd, decided across the row shards."""
    local = u.abs().max(dim=0)
    peak = torch.gather(u, 0, local.indices[None, :])[0] if u.shape[0] else torch.zeros_like(
        local.values)  # fmt: skip
    values = torch.stack(g.all_gather(torch.stack((local.values, peak))))  # (ranks, 2, k)
    owner = values[:, 0, :].argmax(dim=0)
    signs = torch.sign(values[owner, 1, torch.arange(u.shape[1], device=u.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs[:, None]


def _run(a_local, rank, matmat, rmatmat, group, oversample, n_iter, normalizer, sketch, seed,
         generator):  # fmt: skip
    check.positive_int("rank", rank)
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    g = _Group(group)
    COMMUNICATED.update(bytes=0, all_reduces=0)
    m, seed = _agree(g, a_local, seed, generator)
    n = a_local.shape[1]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    l = min(rank + oversample, m, n)
    q, bt = _range_finder(g, matmat, rmatmat, n, a_local.dtype, a_local.device, l, n_iter,
                          sketch, seed)  # fmt: skip
    u, s, vh = _decompose(q, bt, rank)
    u, vh = _global_sign(g, u, vh)
    return u, s, vh


def _check_local(a_local):
    check.floating("A_local", a_local)
    check.ndim("A_local", a_local, 2, "this rank's rows of A")
    if a_local.dtype in (torch.float16, torch.bfloat16):
        raise TypeError("distributed rsvd takes float32 or float64 shards")


def rsvd(A_local: torch.Tensor, rank: int, *, group=None, oversample: int = 10,
         n_iter: int = 2, normalizer: str = "auto", sketch: str = "gaussian",
         seed: int | None = None, generator: torch.Generator | None = None):  # fmt: skip
    """Randomized SVD of the row-sharded matrix whose rows on this rank are ``A_local``.

    Returns ``(U_local, S, Vh)``: this rank's rows of ``U``, and ``S``, ``Vh`` replicated.
    Options as in :func:`lowrank.linalg.rsvd`; the normaliser between products is
    always CholeskyQR (one all-reduce each), with its shifted fallback.
    """
    _check_local(A_local)
    return _run(A_local, rank, lambda z: A_local @ z, lambda q: (q.mT @ A_local).mT, group,
                oversample, n_iter, normalizer, sketch, seed, generator)  # fmt: skip


def pca(A_local: torch.Tensor, rank: int, *, group=None, center: bool = True, **options):
    """Distributed :func:`lowrank.linalg.pca`: column means by one all-reduce, then the
    randomized SVD of the implicitly centred shards (``A_i - 1 mu^T`` is never formed)."""
    _check_local(A_local)
    if not center:
        return rsvd(A_local, rank, group=group, **options)
    g = _Group(group)
    sums = torch.cat((A_local.sum(dim=0), torch.tensor([A_local.shape[0]], dtype=A_local.dtype,
                                                       device=A_local.device)))  # fmt: skip
    sums = g.all_reduce(sums)
    mean = sums[:-1] / sums[-1]

    def matmat(z):
        return A_local @ z - (mean @ z)[None, :]

    def rmatmat(q):
        return (q.mT @ A_local).mT - mean[:, None] * q.sum(dim=0, keepdim=True)

    return _run(A_local, rank, matmat, rmatmat, group, options.get("oversample", 10),
                options.get("n_iter", 2), options.get("normalizer", "auto"),
                options.get("sketch", "gaussian"), options.get("seed"),
                options.get("generator"))  # fmt: skip
