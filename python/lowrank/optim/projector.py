"""GaLore's gradient projector: the projection side of a low-rank-gradient optimizer.

An optimizer that keeps its state in a low-rank projection of each weight's gradient
(GaLore, Zhao et al. 2024, and its variants) needs the same five things, which
:class:`GaLoreProjector` owns so that an optimizer is only its update rule:

- **the side**: a weight ``W`` (``m x n``) with gradient ``G`` is projected on the right,
  ``R = G P^T`` with ``P = V_r^T`` (``r x n``), on the left, ``R = P^T G`` with ``P = U_r``
  (``m x r``), or on both sides, ``R = U_r^T G V_r``; ``proj_type="std"`` (the default)
  compresses the smaller side, ``"reverse_std"`` the larger one, ``"left"``, ``"right"``
  and ``"full"`` fix it.
- **the schedule**: a parameter gets its first projector at its first step and a new one
  whenever ``state["step"] % update_proj_gap == 0`` (``state["step"]``: the updates the
  optimizer has made to it so far).
- **the batched refresh**: every gradient due at a step is decomposed together with the
  others of its shape, side and rank, in one batched call (:meth:`GaLoreProjector.refresh`);
  the gradients are checked first (dense, finite), so a bad one raises an error naming
  the parameter and leaves every projector as it was.
- :meth:`~GaLoreProjector.project` and :meth:`~GaLoreProjector.project_back`.
- **the refresh log** (:attr:`GaLoreProjector.refresh_log`): each refresh's step, matrices
  and seconds.

What a projector is, how it is computed and how it applies is the pluggable
:class:`Projection`; :class:`SVDProjection` is GaLore's (the leading singular vectors,
batched, warm-started from the previous projector). A projection keeps its tensors in the
parameter's optimizer state, next to the optimizer's own, so the optimizer's state dict
saves and restores them; :func:`restore_saved_dtypes` undoes the cast to the parameter's
dtype that ``torch.optim.Optimizer.load_state_dict`` applies, so projectors and projected
moments stay float32 for float16/bfloat16 weights across save and load.

The per-parameter state keys a projector writes: ``"side"`` (the index in :data:`SIDES`,
an int: the optimizer's state dict holds tensors and numbers only), the projection's
tensors (:class:`SVDProjection`: ``"projector"``, and ``"projector_vh"`` for ``"full"``)
and, for a randomized projection, ``"refresh_seed"``, the seed of the sketch that made
it: seeds advance by one per batched refresh, and :meth:`GaLoreProjector.resume`
continues from the largest one recorded, so a resumed run draws the same sketches as an
uninterrupted one.

Parameter groups carrying ``rank`` are projected (with ``update_proj_gap`` (200),
``scale`` (1.0) and ``proj_type`` (``"std"``), filled in by
:meth:`GaLoreProjector.configure`); their parameters that are not 2-D are not.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch

from lowrank import _validate as check
from lowrank.linalg.orthogonalize import cholqr, cholqr2
from lowrank.linalg.rsvd import rsvd
from lowrank.linalg.sketching import STREAM_TEST_MATRIX, test_matrix

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SIDES = ("right", "left", "full")
GROUP_DEFAULTS = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std", "reset_moments": None}

# One parameter's entry for a refresh: the parameter (its gradient is ``param.grad``), its
# optimizer state and its parameter group.
Entry = tuple[torch.Tensor, dict, dict]


@dataclass
class Refresh:
    """One refresh: the optimizer step, how many matrices, the seconds it took, and (lazy
    refresh, :class:`LazyGaLoreProjector`) each refreshed parameter's refresh interval from
    then on, by name (the group's ``param_names``, else its position and shape)."""

    step: int
    matrices: int
    seconds: float
    intervals: dict[str, int] = field(default_factory=dict)


def side_of(shape: tuple[int, int], proj_type: str) -> str:
    """The side (``"right"``, ``"left"`` or ``"full"``) ``proj_type`` projects an
    ``m x n`` weight on."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def leading_subspace(
    g: torch.Tensor, previous: torch.Tensor, oversample: int = 10, n_iter: int = 0, seed: int = 0
) -> torch.Tensor:
    """The ``r`` leading left singular vectors of each ``g`` (``..., m x n``), in descending
    order, warm-started from ``previous`` (``..., m x r``).

    A randomized SVD of ``G^T`` whose test matrix is the previous projector with
    ``oversample`` Gaussian columns beside it: ``Z = G^T [P_prev, Omega]`` (then ``n_iter``
    power iterations ``Z <- G^T G Z``) spans ``G``'s leading right singular subspace, so
    ``G ~ (G Q_Z) Q_Z^T`` with ``Q_Z`` an orthonormal basis of ``Z``; the leading left
    singular vectors of ``C = G Q_Z`` are ``C W`` with ``W`` the leading eigenvectors of
    ``C^T C`` (``l x l``), orthonormalised. A projector needs the subspace and its order,
    not ``V`` or accurate small singular values, so this takes two GEMMs with ``G`` per
    matrix where a full SVD costs ``O(m n min(m, n))`` at a fraction of the GEMM rate.
    """
    m, n = g.shape[-2:]
    rank = previous.shape[-1]
    l = min(rank + oversample, m, n)
    z = g.mT @ previous
    if l > rank:
        omega = test_matrix(m, l - rank, "gaussian", seed, STREAM_TEST_MATRIX, g.dtype, g.device)
        z = torch.cat((z, g.mT @ omega), dim=-1)
    for _ in range(n_iter):
        z = g.mT @ (g @ cholqr(_unit_columns(z)))
    # A gradient's singular values fall by orders of magnitude within the rank, so Z's
    # trailing columns are nearly dependent (cond ~1e5 after unit scaling): CholeskyQR2 in
    # float64 takes that (up to ~1e7) where float32 would fall back to Householder QR.
    work = torch.float64 if g.dtype != torch.float64 else g.dtype
    c = g @ cholqr2(_unit_columns(z).to(work)).to(g.dtype)
    _, w = torch.linalg.eigh(c.mT @ c)  # ascending
    # C W has orthogonal columns of decreasing norm; unit-scaled, they are well conditioned
    return cholqr2(_unit_columns(c @ w[..., -rank:].flip(-1)))


def _unit_columns(y: torch.Tensor) -> torch.Tensor:
    """y with unit columns (zero columns stay zero): the same span, with the columns'
    spread of norms (the gradient's singular values) taken out of CholeskyQR's way."""
    return y / torch.linalg.vector_norm(y, dim=-2, keepdim=True).clamp_min(
        torch.finfo(y.dtype).tiny
    )


# ---- the kind of projection ----------------------------------------------------------------


class Projection:
    """The pluggable part of :class:`GaLoreProjector`: how the projectors of a batch of
    gradients are computed, which tensors hold one, and how it applies.

    A subclass implements :meth:`compute`; the default :meth:`project` and
    :meth:`project_back` apply dense factors, ``state["projector"]`` (right: ``P``,
    ``r x n``; left: ``P``, ``m x r``; full: ``U_r``) and ``state["projector_vh"]`` (full:
    ``V_r^T``), in the projector's dtype (float32 for float16/bfloat16 gradients). A
    projection stored otherwise (column indices, quantized factors) overrides both.
    """

    #: ``compute`` draws random numbers: each batched refresh then gets a fresh seed
    randomized = False
    #: the state keys a projector's tensors may occupy (a new projector replaces them all)
    keys = frozenset(("projector", "projector_vh"))
    #: a projected coordinate may stand for another direction after a refresh (chosen
    #: basis vectors, in any order): moments kept across it would be another direction's,
    #: so by default they restart (the group option ``reset_moments``)
    slots_change = False

    def compute(
        self,
        grads: torch.Tensor,
        side: str,
        rank: int,
        previous: Sequence[dict] | None,
        seed: int,
    ) -> list[dict[str, torch.Tensor]]:
        """The new projector of each gradient in ``grads`` (``b x m x n``, float32 or
        float64), as the tensors to store in its parameter's state.

        ``previous`` holds the parameters' states with their current projectors (all on
        ``side``) when :meth:`warm_starts` said yes for each, else it is ``None``; ``seed``
        is this refresh's seed.
        """
        raise NotImplementedError

    def warm_starts(self, state: dict, side: str, rank: int) -> bool:
        """Whether :meth:`compute` starts a rank-``rank`` projector on ``side`` from the
        current one in ``state`` (which is on ``side`` too)."""
        return False

    def project(self, state: dict, side: str, grad: torch.Tensor) -> torch.Tensor:
        """The projected gradient: ``G P^T`` (right), ``P^T G`` (left), ``U_r^T G V_r``."""
        proj = state["projector"]
        g = grad.to(proj.dtype)
        if side == "right":
            return g @ proj.mT
        if side == "left":
            return proj.mT @ g
        return proj.mT @ g @ state["projector_vh"].mT

    def project_back(self, state: dict, side: str, low: torch.Tensor) -> torch.Tensor:
        """A projected-space tensor in the weight's shape: ``N P``, ``P N``, ``U_r N V_r^T``."""
        proj = state["projector"]
        if side == "right":
            return low @ proj
        if side == "left":
            return proj @ low
        return proj @ low @ state["projector_vh"]


class SVDProjection(Projection):
    """GaLore's projector: the gradient's ``rank`` leading singular vectors.

    Args:
        method: ``"randomized"`` (the first refresh by :func:`lowrank.linalg.rsvd`, later
            ones on the same side warm-started from the previous projector by
            :func:`leading_subspace`, two GEMMs per gradient) or ``"exact"`` (batched
            ``torch.linalg.svd``, the authors' projector).
        n_iter: power iterations of a cold (first) randomized refresh.
        warm_iter: power iterations of a warm refresh.
        oversample: extra sketch columns of a randomized refresh.
    """

    def __init__(
        self, method: str = "randomized", *, n_iter: int = 2, warm_iter: int = 0,
        oversample: int = 10,
    ) -> None:  # fmt: skip
        if method not in ("randomized", "exact"):
            raise ValueError(f"svd must be 'randomized' or 'exact', got {method!r}")
        self.method = method
        self.randomized = method == "randomized"
        self.n_iter = check.iterations("n_iter", n_iter)
        self.warm_iter = check.iterations("warm_iter", warm_iter)
        self.oversample = check.integer("oversample", oversample, 0)

    def warm_starts(self, state, side, rank):
        if not self.randomized or side == "full":
            return False
        previous = state["projector"]  # right: r x n, left: m x r
        return (previous.shape[0] if side == "right" else previous.shape[1]) == rank

    def compute(self, grads, side, rank, previous, seed):
        if not self.randomized:
            u, _, vh = torch.linalg.svd(grads, full_matrices=False)
            u, vh = u[..., :rank], vh[..., :rank, :]
        elif previous is not None:  # warm (one side only): the leading subspace, nothing more
            before = torch.stack([state["projector"] for state in previous])
            if side == "right":  # the right singular vectors are the left ones of G^T
                u, vh = None, self._warm(grads.mT, before.mT, seed).mT
            else:
                u = self._warm(grads, before, seed)
        elif side == "right":
            vt, _, _ = self._rsvd(grads.mT, rank, seed)
            u, vh = None, vt.mT
        else:
            u, _, vh = self._rsvd(grads, rank, seed)
        if side == "right":
            return [{"projector": p} for p in vh]
        if side == "left":
            return [{"projector": p} for p in u]
        return [{"projector": a, "projector_vh": b} for a, b in zip(u, vh)]

    def _warm(self, a, previous, seed):
        return leading_subspace(a, previous, self.oversample, self.warm_iter, seed)

    def _rsvd(self, a, rank, seed):
        return rsvd(a, rank, oversample=self.oversample, n_iter=self.n_iter, seed=seed)


# ---- projections stored as indices: DCT columns and random coordinates ----------------------


def dct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The orthonormal DCT-II of ``x`` along ``dim`` by one FFT of the same length.

    ``y_k = s_k sum_j x_j cos(pi (2j + 1) k / (2n))`` with ``s_0 = sqrt(1/n)``, ``s_k =
    sqrt(2/n)``: ``y = x Q`` for a row ``x`` and ``Q`` the orthonormal DCT-II basis (its
    column ``k`` the ``k``-th cosine). Makhoul's reordering ``v = (x_0, x_2, x_4, ...,
    x_5, x_3, x_1)`` gives ``y_k = s_k Re(exp(-i pi k / (2n)) FFT(v)_k)``: ``O(n log n)``
    per vector where the product with ``Q`` costs ``O(n^2)``.
    """
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    v = torch.cat((x[..., ::2], x[..., 1::2].flip(-1)), dim=-1)
    k = torch.arange(n, dtype=torch.float64, device=x.device)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n)).to(
        torch.promote_types(x.dtype, torch.float32).to_complex()
    )
    y = (torch.fft.fft(v, dim=-1) * twiddle).real * math.sqrt(2.0 / n)
    y[..., 0] *= math.sqrt(0.5)
    return y.to(x.dtype).movedim(-1, dim)


def dct_basis(size: int, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Columns ``index`` of the orthonormal DCT-II basis of length ``size`` (``size x r``),
    computed from the indices (the angle reduced exactly in integers, then in float64)."""
    j = torch.arange(size, dtype=torch.int64, device=index.device)
    k = index.to(torch.int64)
    angle = ((2 * j[:, None] + 1) * k[None, :]) % (4 * size)  # cos has period 4n here
    basis = torch.cos(angle.to(torch.float64) * (math.pi / (2 * size))) * math.sqrt(2.0 / size)
    basis = torch.where(k == 0, math.sqrt(1.0 / size), basis)
    return basis.to(dtype)


class IndexProjection(Projection):
    """A projector that keeps ``rank`` vectors of a fixed orthonormal basis along the
    projected side, stored as their indices (``"projector_index"``, int32, with the side's
    length ``"projector_size"``; for ``"full"`` the right side's in ``"..._vh"``).

    A subclass chooses the indices (:meth:`select`) and applies the basis (:meth:`apply`,
    :meth:`apply_back`) along the last dimension.
    """

    keys = frozenset(("projector_index", "projector_size", "projector_index_vh",
                      "projector_size_vh"))  # fmt: skip
    slots_change = True

    def select(self, x: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
        """The indices (``b x rank``) to keep along the last dimension of ``x`` (``b x a x
        c``) for each of the ``b`` matrices (``generator``: the refresh's CPU generator)."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        """``x`` (``... x size``) in the kept basis vectors' coordinates (``... x r``)."""
        raise NotImplementedError

    def apply_back(self, y: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        """Coordinates ``y`` (``... x r``) back along the kept basis vectors (``... x size``)."""
        raise NotImplementedError

    def compute(self, grads, side, rank, previous, seed):
        m, n = grads.shape[-2:]
        result = [{} for _ in grads]
        generator = torch.Generator().manual_seed(seed) if self.randomized else None
        if side in ("left", "full"):  # along the rows: the columns of G^T
            for tensors, index in zip(result, self.select(grads.mT, rank, generator)):
                tensors.update(projector_index=index.to(torch.int32), projector_size=m)
        if side in ("right", "full"):
            suffix = "_vh" if side == "full" else ""
            for tensors, index in zip(result, self.select(grads, rank, generator)):
                tensors["projector_index" + suffix] = index.to(torch.int32)
                tensors["projector_size" + suffix] = n
        return result

    def project(self, state, side, grad):
        g = grad.to(torch.promote_types(grad.dtype, torch.float32))
        if side == "right":
            return self.apply(g, state["projector_index"], state["projector_size"])
        low = self.apply(g.mT, state["projector_index"], state["projector_size"]).mT
        if side == "left":
            return low
        return self.apply(low, state["projector_index_vh"], state["projector_size_vh"])

    def project_back(self, state, side, low):
        if side == "right":
            return self.apply_back(low, state["projector_index"], state["projector_size"])
        if side == "full":
            low = self.apply_back(low, state["projector_index_vh"], state["projector_size_vh"])
        return self.apply_back(low.mT, state["projector_index"], state["projector_size"]).mT


class DCTProjection(IndexProjection):
    """The DCT projector of SVD-free low-rank gradient optimisation: of the orthonormal
    DCT-II basis ``Q`` along the projected side, the ``rank`` vectors on which the gradient
    has the most energy, the columns of ``S = G Q`` (right side; ``Q^T G``'s rows on the
    left) with the largest norms, in descending order.

    ``S`` is computed by FFT (:func:`dct`), ``O(m n log n)`` per refresh; the projector is
    stored as the ``rank`` indices, and applied as the ``size x rank`` cosines they name,
    built at each use (``O(n r)``, against the ``O(m n r)`` product with the gradient).
    """

    def select(self, x, rank, generator):
        energy = dct(x, -1).square().sum(-2)
        return torch.topk(energy, rank, dim=-1).indices

    def apply(self, x, index, size):
        return x @ dct_basis(size, index, x.dtype)

    def apply_back(self, y, index, size):
        return y @ dct_basis(size, index, y.dtype).mT


class RandomProjection(IndexProjection):
    """Random coordinates (FRUGAL's RandK): ``rank`` distinct rows or columns of the weight,
    uniformly at random, fresh at every refresh; the projected gradient is those columns
    of ``G`` (right side) or rows (left).

    The draw is reproducible: a batched refresh with seed ``s`` draws
    ``torch.randperm(size, generator=g)[:rank]`` for each matrix in order from one CPU
    generator ``g`` seeded with ``s``, the rows first (left side, and ``"full"``), then the
    columns (right side, and ``"full"``).
    """

    randomized = True

    def select(self, x, rank, generator):
        size = x.shape[-1]
        draws = [torch.randperm(size, generator=generator)[:rank] for _ in range(x.shape[0])]
        return torch.stack(draws).to(x.device)

    def apply(self, x, index, size):
        return x.index_select(-1, index)

    def apply_back(self, y, index, size):
        out = y.new_zeros(*y.shape[:-1], size)
        return out.index_copy_(-1, index.to(torch.int64), y)


# ---- projectors stored quantized ------------------------------------------------------------


def quantize(x: torch.Tensor, bits: int, group_size: int) -> dict:
    """``x`` in ``bits``-bit codes (8 or 4), per group of ``group_size`` consecutive
    elements (of the flattened tensor; the last group padded with its last element):
    ``code = round((x - low) / step)`` with ``low`` the group's minimum and ``step = (max -
    min) / (2^bits - 1)``, both float32.

    The grid spans each group's own range, so a group of one sign keeps its sign and its
    extremes exactly, and a constant group (``step = 0``) comes back exactly; 4-bit codes
    are packed two to a byte. Returns ``codes`` (uint8), ``low``, ``step`` and ``shape``.
    """
    flat = x.detach().reshape(-1).to(torch.float32)
    pad = -flat.numel() % group_size
    if pad:
        flat = torch.cat((flat, flat[-1:].expand(pad)))
    groups = flat.view(-1, group_size)
    low = groups.amin(-1)
    step = (groups.amax(-1) - low) / (2**bits - 1)
    scaled = (groups - low[:, None]) / torch.where(step > 0, step, 1.0)[:, None]
    codes = scaled.round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"codes": codes, "low": low, "step": step, "shape": tuple(x.shape)}


def dequantize(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, shape: Sequence[int],
               bits: int) -> torch.Tensor:  # fmt: skip
    """The float32 tensor of shape ``shape`` that :func:`quantize`'s codes stand for:
    ``low + code * step`` per group."""
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
    values = low[:, None] + codes.to(torch.float32) * step[:, None]
    return values.reshape(-1)[: math.prod(shape)].view(tuple(shape))


class QuantizedProjection(Projection):
    """Another projection's dense factors stored in ``bits``-bit groups (Q-GaLore's
    quantized projectors) and dequantized on each use (:func:`quantize`).

    For each of the inner projection's tensors ``key`` the state holds ``key + "_codes"``,
    ``"_low"``, ``"_step"`` and ``"_shape"``. A warm-started refresh starts from the
    dequantized previous projector.

    Args:
        inner: the projection whose dense factors are stored (e.g. :class:`SVDProjection`).
        bits: 8 or 4.
        group_size: elements per group; a positive integer, even for 4 bits (two codes a
            byte, a group in whole bytes).
    """

    PARTS = ("_codes", "_low", "_step", "_shape")

    def __init__(self, inner: Projection, bits: int = 4, group_size: int = 256) -> None:
        dense = isinstance(inner, Projection) and not isinstance(
            inner, (IndexProjection, QuantizedProjection)
        )
        if not dense:
            raise TypeError("projector_bits quantizes a projection stored as dense factors "
                            f"(the SVD one), not {type(inner).__name__}")  # fmt: skip
        self.inner = inner
        self.bits = check_projector_bits(bits)
        self.group_size = check_group_size(group_size, bits)
        self.randomized = inner.randomized
        self.keys = frozenset(k + part for k in inner.keys for part in self.PARTS)

    def dense(self, state: dict, dtype: torch.dtype = torch.float32) -> dict:
        """The inner projection's tensors, dequantized, from ``state``: float32, or float64
        for a float64 ``dtype`` (the values are float32's, applied at the gradient's
        precision)."""
        dtype = torch.promote_types(dtype, torch.float32)
        return {k: dequantize(state[k + "_codes"], state[k + "_low"], state[k + "_step"],
                              state[k + "_shape"], self.bits).to(dtype)
                for k in self.inner.keys if k + "_codes" in state}  # fmt: skip

    def warm_starts(self, state, side, rank):
        return self.inner.warm_starts(self.dense(state), side, rank)

    def compute(self, grads, side, rank, previous, seed):
        if previous is not None:  # warm starts at the gradients' precision
            previous = [self.dense(state, grads.dtype) for state in previous]
        result = []
        for tensors in self.inner.compute(grads, side, rank, previous, seed):
            stored = {}
            for key, value in tensors.items():
                parts = quantize(value, self.bits, self.group_size)
                stored.update({key + "_" + name: v for name, v in parts.items()})
            result.append(stored)
        return result

    def project(self, state, side, grad):
        return self.inner.project(self.dense(state, grad.dtype), side, grad)

    def project_back(self, state, side, low):
        return self.inner.project_back(self.dense(state, low.dtype), side, low)


def check_projector_bits(bits) -> int:
    """``projector_bits``: 8 or 4."""
    if isinstance(bits, bool) or bits not in (8, 4):
        raise ValueError(f"projector_bits must be None, 8 or 4, got {bits!r}")
    return int(bits)


def check_group_size(group_size, bits: int) -> int:
    """``group_size`` of ``bits``-bit projectors: a positive integer, even for 4 bits."""
    size = check.positive_int("group_size", group_size)
    if bits == 4 and size % 2:
        raise ValueError(f"group_size must be even for 4-bit projectors (two codes a byte), "
                         f"got {size}")  # fmt: skip
    return size


# ---- the projector -------------------------------------------------------------------------


class GaLoreProjector:
    """Per-parameter low-rank projection of gradients (module docstring): the side, the
    refresh schedule, the batched refresh, ``project``/``project_back`` and the refresh log.

    The projector holds no per-parameter state itself: it reads and writes the state dict
    an optimizer keeps for each parameter, so the optimizer's ``state_dict`` holds it. An
    optimizer calls :meth:`configure` on each parameter group it gets, :meth:`refresh` with
    its projected parameters before updating them, and, after loading a state dict,
    :func:`restore_saved_dtypes` and :meth:`resume`.

    Args:
        projection: the kind of projector (default :class:`SVDProjection`, randomized).
        seed: the seed before the first randomized refresh (each one adds one).
    """

    def __init__(self, projection: Projection | None = None, *, seed: int = 0) -> None:
        if projection is not None and not isinstance(projection, Projection):
            raise TypeError(f"projection must be a Projection, got {type(projection).__name__}")
        self.projection = SVDProjection() if projection is None else projection
        self.seed = check.integer("seed", seed)
        self.refresh_log: list[Refresh] = []

    # ---- groups and parameters ---------------------------------------------------------------

    @staticmethod
    def configure(group: dict) -> None:
        """Fills in the defaults of a projected group (one with ``rank``) and checks its
        options and parameters; a group without ``rank`` is left as it is."""
        if "rank" not in group:
            return
        for key, value in GROUP_DEFAULTS.items():
            group.setdefault(key, value)
        group["rank"] = check.positive_int("rank", group["rank"])
        group["update_proj_gap"] = check.positive_int("update_proj_gap", group["update_proj_gap"])
        check.real("scale", group["scale"])
        if group["proj_type"] not in PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got "
                             f"{group['proj_type']!r}")  # fmt: skip
        if group["reset_moments"] not in (None, True, False):
            raise TypeError(f"reset_moments must be None, True or False, got "
                            f"{group['reset_moments']!r}")  # fmt: skip
        for p in group["params"]:
            if p.dim() != 2:
                continue
            if p.is_complex():
                raise TypeError(f"{describe(p, group)} is complex ({p.dtype}); GaLore projects "
                                "real weights only: put it in a group without rank")  # fmt: skip
            if group["rank"] > min(p.shape):
                raise ValueError(f"rank = {group['rank']} is larger than {describe(p, group)} "
                                 f"allows: a rank-r projection of an m x n weight needs r <= "
                                 f"min(m, n) = {min(p.shape)}")  # fmt: skip

    @staticmethod
    def projects(group: dict, param: torch.Tensor) -> bool:
        """Whether ``param`` of ``group`` is projected (a 2-D weight of a group with rank)."""
        return "rank" in group and param.dim() == 2

    @staticmethod
    def active(state: dict) -> bool:
        """Whether the parameter with this state has a projector."""
        return "side" in state

    def due(self, state: dict, group: dict) -> bool:
        """Whether the parameter with this state needs a new projector before its next
        update: it has none yet, or ``state["step"]`` is a multiple of the group's gap."""
        return not self.active(state) or state.get("step", 0) % group["update_proj_gap"] == 0

    def resets(self, group: dict) -> bool:
        """Whether the projected moments of ``group``'s parameters restart when their
        projector is replaced: the group's ``reset_moments``, by default whether the
        projection's coordinates may change meaning at a refresh (``slots_change``: the
        index projections, DCT and random columns; the SVD projector's moments are kept, as
        GaLore's)."""
        reset = group.get("reset_moments")
        return self.projection.slots_change if reset is None else reset

    # ---- project ---------------------------------------------------------------------------

    def project(self, state: dict, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` (the weight's shape) in the projected space, in the projector's dtype."""
        return self.projection.project(state, SIDES[state["side"]], grad)

    def project_back(self, state: dict, low: torch.Tensor) -> torch.Tensor:
        """A projected-space tensor (an update) back in the weight's shape."""
        return self.projection.project_back(state, SIDES[state["side"]], low)

    # ---- refresh ---------------------------------------------------------------------------

    def refresh(self, entries: Iterable[Entry]) -> list[Entry]:
        """New projectors for the entries that are due, batched by shape, dtype, side and
        rank; returns the entries whose projector was replaced (they had one before).

        ``entries``: ``(param, state, group)`` for parameters of any groups; those without a
        gradient, not projected or not due are passed over. The gradients due are checked
        (dense, finite) before any projector changes: a sparse one raises ``TypeError``, a
        NaN or infinity ``ValueError``, naming the parameter.
        """
        batches: dict[tuple, list[Entry]] = defaultdict(list)
        for entry in entries:
            p, state, group = entry
            if p.grad is None or not self.projects(group, p) or not self.due(state, group):
                continue
            if p.grad.is_sparse:
                raise TypeError(f"{describe(p, group)} has a sparse .grad; GaLore projects "
                                "dense gradients only")  # fmt: skip
            side = side_of(tuple(p.shape), group["proj_type"])
            rank = min(group["rank"], *p.shape)
            warm = (self.active(state) and SIDES[state["side"]] == side
                    and self.projection.warm_starts(state, side, rank))  # fmt: skip
            # float32 at least (float16/bfloat16 gradients), float64 stays float64
            dtype = torch.promote_types(p.grad.dtype, torch.float32)
            batches[(tuple(p.shape), p.device, dtype, side, rank, warm)].append(entry)
        if not batches:
            return []
        start = time.perf_counter()
        seed, results = self.seed, []
        for (_shape, _device, dtype, side, rank, warm), batch in batches.items():
            grads = torch.stack([p.grad.to(dtype) for p, _, _ in batch])
            _check_finite(batch, grads)
            if self.projection.randomized:
                seed += 1  # fresh sketches each batched refresh
            previous = [state for _, state, _ in batch] if warm else None
            results.append((seed, self.projection.compute(grads, side, rank, previous, seed)))
        # nothing has changed until every batch is computed
        self.seed = seed
        replaced = [entry for batch in batches.values() for entry in batch
                    if self.active(entry[1])]  # fmt: skip
        for ((_shape, _device, _dtype, side, _rank, _warm), batch), (seed, new) in zip(
            batches.items(), results
        ):
            for (_, state, _), tensors in zip(batch, new):
                for key in self.projection.keys - tensors.keys():
                    state.pop(key, None)
                state.update(tensors)
                state["side"] = SIDES.index(side)
                if self.projection.randomized:
                    state["refresh_seed"] = seed
        if torch.cuda.is_available() and any(key[1].type == "cuda" for key in batches):
            torch.cuda.synchronize()
        count = sum(len(batch) for batch in batches.values())
        step = max(state.get("step", 0) for batch in batches.values() for _, state, _ in batch)
        self.refresh_log.append(Refresh(step, count, time.perf_counter() - start))
        return replaced

    def resume(self, states: Iterable[dict]) -> None:
        """Continue the seeds from the parameters' recorded ones (after loading a state dict):
        the next randomized refresh draws what it would have drawn without the interruption."""
        seeds = [state["refresh_seed"] for state in states if "refresh_seed" in state]
        if seeds:
            self.seed = max(seeds)


class LazyGaLoreProjector(GaLoreProjector):
    """Q-GaLore's lazy, per-layer refresh schedule on :class:`GaLoreProjector`.

    Each projected parameter has its own refresh interval, at first its group's
    ``update_proj_gap``. At each refresh the new projector is compared with the previous
    one: their similarity is ``||P_old^T P_new||_F^2 / r``, the mean squared cosine of the
    principal angles between the two rank-``r`` subspaces (1 for the same subspace, 0 for
    orthogonal ones; free of the sign and order of the vectors; computed for any projection
    as ``project(old, project_back(new, I_r))``). When the last ``queue_size`` comparisons
    of a parameter are all at least ``cos_threshold``, its interval is multiplied by
    ``growth`` (rounded down) and the queue starts afresh; a comparison below the threshold
    empties it. Layers whose subspace has settled are refreshed less and less often.

    Per-parameter state: ``"refresh_interval"``, ``"refresh_at"`` (the step of the next
    refresh) and ``"similar_refreshes"`` (the comparisons in the queue); each refresh's
    intervals are in its :class:`Refresh` record.

    Args:
        projection, seed: as :class:`GaLoreProjector`.
        cos_threshold: the similarity in [0, 1] above which a refresh counts as unchanged.
        queue_size: consecutive unchanged refreshes before the interval grows.
        growth: the factor (>= 1) the interval grows by.
    """

    def __init__(
        self, projection: Projection | None = None, *, seed: int = 0, cos_threshold: float = 0.4,
        queue_size: int = 5, growth: float = 2.0,
    ) -> None:  # fmt: skip
        super().__init__(projection, seed=seed)
        self.cos_threshold = check.real("cos_threshold", cos_threshold, 0.0, 1.0)
        self.queue_size = check.positive_int("queue_size", queue_size)
        self.growth = check.real("growth", growth, 1.0)

    def due(self, state: dict, group: dict) -> bool:
        if "refresh_at" not in state:  # no projector yet, or one from the fixed schedule
            return super().due(state, group)
        return state.get("step", 0) >= state["refresh_at"]

    def refresh(self, entries: Iterable[Entry]) -> list[Entry]:
        due = [(p, state, group) for p, state, group in entries if p.grad is not None
               and self.projects(group, p) and self.due(state, group)]  # fmt: skip
        before = [{key: state[key] for key in self.projection.keys | {"side"} if key in state}
                  for _, state, _ in due]  # fmt: skip
        logged = len(self.refresh_log)
        replaced = super().refresh(due)
        if len(self.refresh_log) == logged:
            return replaced
        intervals = {}
        for (p, state, group), old in zip(due, before):
            interval = state.get("refresh_interval", group["update_proj_gap"])
            similar = state.get("similar_refreshes", 0)
            if old.get("side") == state["side"]:
                if self.similarity(old, state, p) >= self.cos_threshold:
                    similar += 1
                    if similar >= self.queue_size:
                        interval, similar = max(interval, int(interval * self.growth)), 0
                else:
                    similar = 0
            state.update(refresh_interval=interval, similar_refreshes=similar,
                         refresh_at=state.get("step", 0) + interval)  # fmt: skip
            intervals[describe(p, group).removeprefix("parameter ")] = interval
        self.refresh_log[-1].intervals = intervals
        return replaced

    def similarity(self, old: dict, new: dict, param: torch.Tensor) -> float:
        """``||P_old^T P_new||_F^2 / r`` of two projectors (states) of ``param`` on the same
        side; 0 when their ranks differ."""
        side = SIDES[new["side"]]
        zero = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        low = self.projection.project(new, side, zero)  # in the projector's dtype
        if self.projection.project(old, side, zero).shape != low.shape:
            return 0.0
        rank = low.shape[-1] if side == "right" else low.shape[-2]
        eye = torch.eye(rank, dtype=low.dtype, device=param.device)
        overlap = self.projection.project(old, side, self.projection.project_back(new, side, eye))
        return float(overlap.double().square().sum()) / rank


def _check_finite(batch: list[Entry], grads: torch.Tensor) -> None:
    """Raises ``ValueError`` naming the first parameter of ``batch`` whose gradient (in
    ``grads``, stacked) is not finite.

    NaN and infinity reach the gradient's sum, so this is one reduction and one
    synchronisation per batch (``torch.isfinite`` of every gradient costs a hundred times
    more on the CPU); a finite gradient whose sum overflows is refused too, as its
    products would overflow in the refresh.
    """
    sums = grads.sum((-2, -1))
    if bool(torch.isfinite(sums).all()):
        return
    for (p, _, group), g, total in zip(batch, grads, sums.tolist()):
        if not math.isfinite(total):
            what = "with NaN or infinity" if not bool(torch.isfinite(g).all()) else (
                "that overflows (its sum is not finite)")  # fmt: skip
            raise ValueError(f"{describe(p, group)} has a .grad {what}; no projector can be "
                             "computed from it")  # fmt: skip


def describe(param: torch.Tensor, group: dict) -> str:
    """A parameter as an error message names it: its name when the group has
    ``param_names`` (parameters given as ``model.named_parameters()``), else its position
    and shape."""
    index = next((i for i, q in enumerate(group["params"]) if q is param), None)
    names = group.get("param_names")
    if names is not None and index is not None:
        return f"parameter {names[index]!r}"
    shape = " x ".join(map(str, param.shape)) or "scalar"
    where = f"parameter {index} of its group" if index is not None else "a parameter"
    return f"{where} (shape {shape})"


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """After ``optimizer.load_state_dict(state_dict)``: every floating state tensor back in
    the dtype it was saved in.

    ``torch.optim.Optimizer.load_state_dict`` casts floating state to its parameter's dtype
    (right for AdamW's moments, which have the parameter's dtype), which would round a
    bfloat16 weight's float32 projector and projected moments to bfloat16.
    """
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    for pid, p in zip(saved_ids, params):
        saved = state_dict["state"].get(pid)
        if not saved or p not in optimizer.state:
            continue
        state = optimizer.state[p]
        for key, value in saved.items():
            current = state.get(key)
            if (isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor)
                    and value.dtype != current.dtype):  # fmt: skip
                state[key] = value.to(device=current.device)
