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
from dataclasses import dataclass
from itertools import chain

import torch

from lowrank import _validate as check
from lowrank.linalg.orthogonalize import cholqr, cholqr2
from lowrank.linalg.rsvd import rsvd
from lowrank.linalg.sketching import STREAM_TEST_MATRIX, test_matrix

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SIDES = ("right", "left", "full")
GROUP_DEFAULTS = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}

# One parameter's entry for a refresh: the parameter (its gradient is ``param.grad``), its
# optimizer state and its parameter group.
Entry = tuple[torch.Tensor, dict, dict]


@dataclass
class Refresh:
    """One refresh: the optimizer step, how many matrices, the seconds it took."""

    step: int
    matrices: int
    seconds: float


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
        for p in group["params"]:
            if p.dim() == 2 and p.is_complex():
                raise TypeError(f"{describe(p, group)} is complex ({p.dtype}); GaLore projects "
                                "real weights only: put it in a group without rank")  # fmt: skip

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

    # ---- project ---------------------------------------------------------------------------

    def project(self, state: dict, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` (the weight's shape) in the projected space, in the projector's dtype."""
        return self.projection.project(state, SIDES[state["side"]], grad)

    def project_back(self, state: dict, low: torch.Tensor) -> torch.Tensor:
        """A projected-space tensor (an update) back in the weight's shape."""
        return self.projection.project_back(state, SIDES[state["side"]], low)

    # ---- refresh ---------------------------------------------------------------------------

    def refresh(self, entries: Iterable[Entry]) -> None:
        """New projectors for the entries that are due, batched by shape, side and rank.

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
            batches[(tuple(p.shape), p.device, side, rank, warm)].append(entry)
        if not batches:
            return
        start = time.perf_counter()
        seed, results = self.seed, []
        for (_shape, _device, side, rank, warm), batch in batches.items():
            # float32 at least (float16/bfloat16 gradients), float64 stays float64
            grads = torch.stack([p.grad.to(torch.promote_types(p.grad.dtype, torch.float32))
                                 for p, _, _ in batch])  # fmt: skip
            _check_finite(batch, grads)
            if self.projection.randomized:
                seed += 1  # fresh sketches each batched refresh
            previous = [state for _, state, _ in batch] if warm else None
            results.append((seed, self.projection.compute(grads, side, rank, previous, seed)))
        # nothing has changed until every batch is computed
        self.seed = seed
        for ((_shape, _device, side, _rank, _warm), batch), (seed, new) in zip(
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

    def resume(self, states: Iterable[dict]) -> None:
        """Continue the seeds from the parameters' recorded ones (after loading a state dict):
        the next randomized refresh draws what it would have drawn without the interruption."""
        seeds = [state["refresh_seed"] for state in states if "refresh_seed" in state]
        if seeds:
            self.seed = max(seeds)


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
