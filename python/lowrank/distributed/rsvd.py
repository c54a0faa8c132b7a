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
from lowrank.linalg.orthogonalize import normalize, well_conditioned
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
    drawn = resolve_seed(seed, generator)
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


def _cholqr(g: _Group, y: torch.Tensor, shift: bool = False) -> torch.Tensor | None:
    """One distributed CholeskyQR pass on row-sharded ``y`` (one all-reduce of the ``l x l``
    Gram matrix), or None when the block is too ill-conditioned for it (the same test as
    the single-process CholeskyQR: failure, or a diagonal spanning over 0.1/sqrt(eps))."""
    gram = g.all_reduce(y.mT @ y)
    if shift:
        rows = int(g.all_reduce(torch.tensor([y.shape[0]], device=y.device))[0])
        l, eps = y.shape[1], torch.finfo(y.dtype).eps
        s = 11.0 * (rows * l + l * (l + 1)) * eps * gram.diagonal().sum()
        gram = gram + s * torch.eye(l, dtype=y.dtype, device=y.device)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0 or not well_conditioned(factor):
        return None
    return torch.linalg.solve_triangular(factor.mT, y, upper=True, left=False)


def _tsqr(g: _Group, y: torch.Tensor) -> torch.Tensor:
    """Householder-quality orthonormal basis of row-sharded ``y`` (TSQR: local QR, the
    stacked ``R`` factors gathered and factored once, replicated): robust to rank
    deficiency, one all-gather of ``l x l`` per rank."""
    l = y.shape[1]
    q_local, r_local = torch.linalg.qr(y)  # reduced: (rows, min(rows, l)), (min(rows, l), l)
    if q_local.shape[1] < l:  # fewer local rows than columns: pad to l x l
        q_local = torch.nn.functional.pad(q_local, (0, l - q_local.shape[1]))
        r_local = torch.nn.functional.pad(r_local, (0, 0, 0, l - r_local.shape[0]))
    stacked = torch.cat(g.all_gather(r_local))  # (ranks * l, l), the same on every rank
    q_stack = torch.linalg.qr(stacked).Q
    me = dist.get_rank(g.group)
    return q_local @ q_stack[me * l : (me + 1) * l]


def _orthonormal(g: _Group, y: torch.Tensor, normalizer: str) -> torch.Tensor:
    """The final orthonormal basis: CholeskyQR2 (shifted CholeskyQR3 when needed), TSQR as
    the fallback and for ``normalizer="qr"``."""
    if normalizer == "qr":
        return _tsqr(g, y)
    q = _cholqr(g, y)
    if q is None:
        q = _cholqr(g, y, shift=True)
        q = None if q is None else _cholqr(g, q)
    q = None if q is None else _cholqr(g, q)
    return _tsqr(g, y) if q is None else q


def _normalize(g: _Group, y: torch.Tensor, normalizer: str) -> torch.Tensor:
    """Between products: one CholeskyQR pass (TSQR when too ill-conditioned), TSQR for
    ``"qr"``, nothing for ``"none"``."""
    if normalizer == "none":
        return y
    if normalizer == "qr":
        return _tsqr(g, y)
    q = _cholqr(g, y)
    return _tsqr(g, y) if q is None else q


def _range_finder(g, matmat, rmatmat, n, dtype, device, l, n_iter, normalizer, sketch, seed):
    omega = sketching.test_matrix(n, l, sketch, seed, sketching.STREAM_TEST_MATRIX, dtype,
                                  device)  # fmt: skip
    y = matmat(omega)
    finite = g.all_reduce(torch.isfinite(y).all().to(torch.float32).reshape(1))
    if int(finite) != g.size:
        raise ValueError("A contains NaN or Inf on some rank (or its products overflow)")
    q = _orthonormal(g, y, normalizer) if n_iter == 0 else _normalize(g, y, normalizer)
    for i in range(n_iter):
        # A^T Q is replicated, so every rank normalises it alike without communicating.
        z = normalize(g.all_reduce(rmatmat(q)), normalizer)
        y = matmat(z)
        q = _orthonormal(g, y, normalizer) if i == n_iter - 1 else _normalize(g, y, normalizer)
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


NORMALIZERS = ("auto", "cholqr2", "qr", "none")


def _run(a_local, rank, matmat, rmatmat, group, oversample, n_iter, normalizer, sketch, seed,
         generator):  # fmt: skip
    rank = check.positive_int("rank", rank)
    oversample = check.integer("oversample", oversample, 0)
    n_iter = check.iterations("n_iter", n_iter)
    if normalizer == "lu":
        raise ValueError(
            "normalizer='lu' needs a pivoted LU across every rank's rows; distributed rsvd "
            f"offers {NORMALIZERS} (qr is TSQR)"
        )
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    if sketch not in sketching.SKETCHES:
        raise ValueError(f"sketch must be one of {sketching.SKETCHES}, got {sketch!r}")
    normalizer = "cholqr2" if normalizer == "auto" else normalizer
    g = _Group(group)
    COMMUNICATED.update(bytes=0, all_reduces=0)
    m, seed = _agree(g, a_local, seed, generator)
    n = a_local.shape[1]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    l = min(rank + oversample, m, n)
    q, bt = _range_finder(g, matmat, rmatmat, n, a_local.dtype, a_local.device, l, n_iter,
                          normalizer, sketch, seed)  # fmt: skip
    u, s, vh = _decompose(q, bt, rank)
    u, vh = _global_sign(g, u, vh)
    return u, s, vh


def _check_local(a_local) -> torch.Tensor:
    """The shard in its compute dtype: float16/bfloat16 are computed in float32, as in
    :func:`lowrank.linalg.rsvd` (results come back in the shard's dtype)."""
    check.floating("A_local", a_local)
    check.ndim("A_local", a_local, 2, "this rank's rows of A")
    return a_local.float() if a_local.dtype in (torch.float16, torch.bfloat16) else a_local


def rsvd(A_local: torch.Tensor, rank: int, *, group=None, oversample: int = 10,
         n_iter: int = 2, normalizer: str = "auto", sketch: str = "gaussian",
         seed: int | None = None, generator: torch.Generator | None = None):  # fmt: skip
    """Randomized SVD of the row-sharded matrix whose rows on this rank are ``A_local``.

    Returns ``(U_local, S, Vh)``: this rank's rows of ``U``, and ``S``, ``Vh`` replicated,
    in ``A_local``'s dtype (float16/bfloat16 computed in float32). Options as in
    :func:`lowrank.linalg.rsvd`: ``normalizer`` ``"auto"``/``"cholqr2"`` (distributed
    CholeskyQR, one all-reduce of ``l x l`` each, TSQR when too ill-conditioned), ``"qr"``
    (TSQR throughout) or ``"none"``; ``"lu"`` is not available across ranks.
    """
    a = _check_local(A_local)
    out = _run(a, rank, lambda z: a @ z, lambda q: (q.mT @ a).mT, group, oversample, n_iter,
               normalizer, sketch, seed, generator)  # fmt: skip
    return tuple(t.to(A_local.dtype) for t in out)


def pca(A_local: torch.Tensor, rank: int, *, group=None, center: bool = True, **options):
    """Distributed :func:`lowrank.linalg.pca`: column means by one all-reduce, then the
    randomized SVD of the implicitly centred shards (``A_i - 1 mu^T`` is never formed)."""
    a = _check_local(A_local)
    if not center:
        return rsvd(A_local, rank, group=group, **options)
    unknown = set(options) - {"oversample", "n_iter", "normalizer", "sketch", "seed", "generator"}
    if unknown:
        raise TypeError(f"pca got unexpected options {sorted(unknown)}")
    g = _Group(group)
    count = torch.tensor([a.shape[0]], dtype=a.dtype, device=a.device)
    sums = torch.cat((a.sum(dim=0), count))
    sums = g.all_reduce(sums)
    mean = sums[:-1] / sums[-1]

    def matmat(z):
        return a @ z - (mean @ z)[None, :]

    def rmatmat(q):
        return (q.mT @ a).mT - mean[:, None] * q.sum(dim=0, keepdim=True)

    out = _run(a, rank, matmat, rmatmat, group, options.get("oversample", 10),
               options.get("n_iter", 2), options.get("normalizer", "auto"),
               options.get("sketch", "gaussian"), options.get("seed"),
               options.get("generator"))  # fmt: skip
    return tuple(t.to(A_local.dtype) for t in out)
