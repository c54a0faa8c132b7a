"""GaLore: AdamW with the gradients of 2-D weights projected onto a low-rank subspace.

Zhao et al. 2024 ("GaLore: memory-efficient LLM training by gradient low-rank
projection"). For a weight ``W`` (``m x n``) with gradient ``G``, a projector ``P`` of rank
``r`` is refreshed every ``update_proj_gap`` steps from the SVD of the current ``G``; Adam's
moments live in the projected space (``r x n`` or ``m x r`` instead of ``m x n``), and the
normalised step is projected back and scaled by ``scale``:

- ``proj_type="std"`` (the default): ``m >= n`` projects on the right, ``R = G P^T`` with
  ``P = V_r^T`` (``r x n``), back ``N P``; ``m < n`` on the left, ``R = P^T G`` with
  ``P = U_r`` (``m x r``), back ``P N``: the smaller side is compressed. ``"reverse_std"``
  swaps the rule; ``"left"``, ``"right"`` fix the side; ``"full"`` projects both sides
  (``U_r^T G V_r``).
- the Adam update of the authors' ``GaLoreAdamW``: ``step_size = lr sqrt(1 - b2^t) /
  (1 - b1^t)``, ``W -= step_size * scale * back(m / (sqrt(v) + eps))``, then decoupled
  weight decay ``W -= lr * weight_decay * W`` (after the update, as theirs); the moments
  are kept across refreshes (not re-projected), as theirs.

What lowrank changes is the refresh: at a step where several parameters are due, all
gradients of one shape are decomposed in **one batched** call instead of one full
``torch.linalg.svd`` per matrix: the first time by :func:`lowrank.linalg.rsvd`, later
**warm-started** from the previous projector (its subspace moves slowly between
refreshes) by :func:`leading_subspace`, a randomized SVD whose test matrix is that
projector, two GEMMs with each gradient. ``svd="exact"`` uses the full SVD (batched) for parity
with the reference. ``refresh_log`` records every refresh's time.

Parameter groups are the authors': groups carrying ``rank`` (with ``update_proj_gap``,
``scale``, ``proj_type``) are projected, other groups (and parameters that are not 2-D)
are plain AdamW with the same update rule; :func:`galore_groups` builds them from a model.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.linalg.orthogonalize import cholqr, cholqr2
from lowrank.linalg.rsvd import rsvd
from lowrank.linalg.sketching import STREAM_TEST_MATRIX, test_matrix

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
# state["side"] holds the index (an int: torch's optimizer state dict mangles strings)
SIDES = ("right", "left", "full")
DEFAULTS = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}


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


@dataclass
class Refresh:
    """One refresh: the optimizer step, how many matrices, the seconds it took."""

    step: int
    matrices: int
    seconds: float


def _side(shape: tuple[int, int], proj_type: str) -> str:
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore projection for the groups that carry ``rank`` (module docstring).

    Args:
        params: parameters or groups, as for ``torch.optim.AdamW``; a group with ``rank``
            (and optionally ``update_proj_gap`` (200), ``scale`` (1.0), ``proj_type``
            (``"std"``)) is projected.
        lr, betas, eps, weight_decay, correct_bias: as the authors' ``GaLoreAdamW``
            (``eps=1e-6`` added to ``sqrt(v)`` before bias correction of the step size).
        svd: ``"randomized"`` (batched: the first refresh by :func:`lowrank.linalg.rsvd`,
            later ones warm-started from the previous projector by
            :func:`leading_subspace`) or ``"exact"`` (batched ``torch.linalg.svd``).
        n_iter: power iterations of a cold (first) randomized refresh.
        warm_iter: power iterations of a warm refresh (default 0: one randomized SVD
            from the previous projector and ``oversample`` random columns).
        oversample: extra sketch columns of a randomized refresh.
        seed: randomness of the randomized refresh.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        svd: str = "randomized",
        n_iter: int = 2,
        warm_iter: int = 0,
        oversample: int = 10,
        seed: int = 0,
    ) -> None:
        check.real("lr", lr, 0.0)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        check.real("eps", eps, 0.0)
        check.real("weight_decay", weight_decay, 0.0)
        if svd not in ("randomized", "exact"):
            raise ValueError(f"svd must be 'randomized' or 'exact', got {svd!r}")
        self.svd = svd
        self.n_iter = check.iterations("n_iter", n_iter)
        self.warm_iter = check.iterations("warm_iter", warm_iter)
        self.oversample = check.integer("oversample", oversample, 0)
        self.seed = seed
        self.refresh_log: list[Refresh] = []
        self._step_count = 0
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias}  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            if "rank" in group:
                group["rank"] = check.positive_int("rank", group["rank"])
                for key, value in DEFAULTS.items():
                    group.setdefault(key, value)
                group["update_proj_gap"] = check.positive_int(
                    "update_proj_gap", group["update_proj_gap"]
                )
                if group["proj_type"] not in PROJ_TYPES:
                    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got "
                                     f"{group['proj_type']!r}")  # fmt: skip

    # ---- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refresh_due()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                state = self.state[p]
                grad = p.grad
                projected = "projector" in state
                if projected:
                    grad = self._project(state, grad)
                if "exp_avg" not in state:
                    state.setdefault("step", 0)
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    t = state["step"]
                    step_size = step_size * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                update = exp_avg / denom
                if projected:
                    update = self._project_back(state, update) * group["scale"]
                p.add_(update.to(p.dtype), alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        self._step_count += 1
        return loss

    # state["projector"] is P (right: r x n, left: m x r) or, for "full", U_r with V_r^T
    # in state["projector_vh"] (tensors only, so the optimizer's state dict holds them).

    def _project(self, state, grad):
        side, proj = SIDES[state["side"]], state["projector"]
        g = grad.to(proj.dtype)
        if side == "right":
            return g @ proj.mT
        if side == "left":
            return proj.mT @ g
        return proj.mT @ g @ state["projector_vh"].mT

    def _project_back(self, state, low):
        side, proj = SIDES[state["side"]], state["projector"]
        if side == "right":
            return low @ proj
        if side == "left":
            return proj @ low
        return proj @ low @ state["projector_vh"]

    # ---- the refresh ----------------------------------------------------------------------------

    def _refresh_due(self) -> None:
        """New projectors for every projected parameter due at this step, batched by shape."""
        batches: dict[tuple, list] = defaultdict(list)
        for group in self.param_groups:
            if "rank" not in group:
                continue
            for p in group["params"]:
                if p.grad is None or p.dim() != 2:
                    continue  # not 2-D: plain AdamW
                state = self.state[p]
                step = state.setdefault("step", 0)
                if "projector" in state and step % group["update_proj_gap"] != 0:
                    continue
                side = _side(tuple(p.shape), group["proj_type"])
                rank = min(group["rank"], *p.shape)
                warm = ("projector" in state and SIDES[state["side"]] == side
                        and side != "full")  # fmt: skip
                key = (tuple(p.shape), p.device, side, rank, warm)
                batches[key].append(p)
        if not batches:
            return
        start = time.perf_counter()
        count = 0
        for (_shape, _device, side, rank, warm), params in batches.items():
            # float32 at least (float16/bfloat16 gradients), float64 stays float64
            grads = torch.stack([p.grad.to(torch.promote_types(p.grad.dtype, torch.float32))
                                 for p in params])  # fmt: skip
            previous = torch.stack([self.state[p]["projector"] for p in params]) if warm else None
            projectors = self._projectors(grads, side, rank, previous)
            for p, proj in zip(params, projectors):
                state = self.state[p]
                state["side"] = SIDES.index(side)
                if side == "full":
                    state["projector"], state["projector_vh"] = proj
                else:
                    state["projector"] = proj
            count += len(params)
        if torch.cuda.is_available() and any(k[1].type == "cuda" for k in batches):
            torch.cuda.synchronize()
        self.refresh_log.append(Refresh(self._step_count, count, time.perf_counter() - start))

    def _projectors(self, grads, side, rank, previous):
        """Per matrix: ``P`` (``r x n``, right), ``P`` (``m x r``, left) or ``(U_r, V_r^T)``."""
        if self.svd == "exact":
            u, _, vh = torch.linalg.svd(grads, full_matrices=False)
            u, vh = u[..., :rank], vh[..., :rank, :]
        elif previous is not None:  # warm (one side only): the leading subspace, nothing more
            if side == "right":  # the right singular vectors are the left ones of G^T
                u, vh = None, self._warm(grads.mT, previous.mT).mT
            else:
                u = self._warm(grads, previous)
        elif side == "right":
            vt, _, _ = self._rsvd(grads.mT, rank)
            u, vh = None, vt.mT
        else:
            u, _, vh = self._rsvd(grads, rank)
        if side == "right":
            return list(vh)
        if side == "left":
            return list(u)
        return list(zip(u, vh))

    def _warm(self, a, previous):
        self.seed += 1
        return leading_subspace(a, previous, self.oversample, self.warm_iter, self.seed)

    def _rsvd(self, a, rank):
        self.seed += 1  # fresh sketches each refresh
        return rsvd(a, rank, oversample=self.oversample, n_iter=self.n_iter, seed=self.seed)

    # ---- reporting -----------------------------------------------------------------------------

    def memory_report(self) -> list[dict]:
        """Per parameter: its shape, the bytes of its optimizer state (moments and
        projector) and what AdamW would hold (two full-size moments)."""
        rows = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                proj = state.get("projector")
                tensors = [state.get(k) for k in ("exp_avg", "exp_avg_sq", "projector",
                                                  "projector_vh")]  # fmt: skip
                held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
                rows.append({"shape": tuple(p.shape), "projected": proj is not None,
                             "state_bytes": held,
                             "adamw_bytes": 2 * p.numel() * p.element_size()})  # fmt: skip
        return rows

    def state_bytes(self) -> int:
        """All optimizer state, in bytes."""
        return sum(row["state_bytes"] for row in self.memory_report())


def galore_groups(
    model: nn.Module,
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: Iterable[str] | None = None,
) -> list[dict]:
    """Parameter groups for :class:`GaLoreAdamW`: the weights of the model's ``nn.Linear``
    layers (those whose name matches ``target_modules`` as PEFT matches them, default all)
    in one projected group, every other parameter in a plain group. Defaults follow the
    GaLore authors' recommended settings (rank 128, gap 200, scale 0.25)."""
    targets = None if target_modules is None else list(target_modules)
    projected, plain, seen = [], [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight is None:
            continue
        if targets is not None and not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if module.weight.requires_grad and id(module.weight) not in seen:
            projected.append(module.weight)
            seen.add(id(module.weight))
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            plain.append(p)
            seen.add(id(p))
    groups = [{"params": plain}] if plain else []
    if projected:
        groups.append({"params": projected, "rank": rank, "update_proj_gap": update_proj_gap,
                       "scale": scale, "proj_type": proj_type})  # fmt: skip
    return groups
