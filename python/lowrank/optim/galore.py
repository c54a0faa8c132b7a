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

The projection (side, schedule, refresh, project and project back, refresh log) is a
:class:`~lowrank.optim.projector.GaLoreProjector`; this optimizer is the update rule on top
of it. What lowrank changes is the refresh: at a step where several parameters are due,
all gradients of one shape are decomposed in **one batched** call instead of one full
``torch.linalg.svd`` per matrix: the first time by :func:`lowrank.linalg.rsvd`, later
**warm-started** from the previous projector (its subspace moves slowly between
refreshes) by :func:`leading_subspace`, a randomized SVD whose test matrix is that
projector, two GEMMs with each gradient. ``svd="exact"`` uses the full SVD (batched) for parity
with the reference. ``refresh_log`` records every refresh's time.

Parameter groups are the authors': groups carrying ``rank`` (with ``update_proj_gap``,
``scale``, ``proj_type``) are projected, other groups (and parameters that are not 2-D)
are plain AdamW with the same update rule (complex parameters as ``torch.optim.AdamW``
treats them, as pairs of reals); :func:`galore_groups` builds them from a model.

The state dict resumes a run exactly: projectors and projected moments stay float32 for
float16/bfloat16 weights, and the randomized refresh continues its seeds.

The variants are options, each a small piece on the projector or in the step:

- ``residual``: what becomes of the part of the gradient the projection drops, ``E = G -
  back(R)`` (``R`` the projected gradient). ``"fira"`` (Chen et al. 2024, Fira) adds it
  to the update scaled by Adam's own effect on ``R``, ``phi = ||psi(R)|| / ||R||`` with
  ``psi(R) = m / (sqrt(v) + eps)`` the projected Adam direction, one factor per row or
  column along the side the projection keeps (per row of ``E`` when projecting on the
  right, per column on the left, one number for ``"full"``; 0 where that part of ``R`` is
  zero), through the same bias-corrected step size: ``W -= step_size (scale back(psi) +
  S)``, ``S = phi * E``. Its norm-growth limiter rescales ``S`` to ``limiter_gamma`` times
  the previous step's ``||S||`` when it would grow faster (``state["fira_norm"]``, one
  number). ``"signsgd"`` and ``"sgd"`` (Zmushko et al. 2024, FRUGAL) update with ``E``
  by a state-free rule at the group's ``residual_lr`` (default its ``lr``, no bias
  correction): ``W -= residual_lr sign(E)`` or ``W -= residual_lr E``, after the Adam part.
  Weight decay applies after both.
- ``reset_moments`` (group option): whether the projected moments restart (zeroed, the
  bias correction counting again from the refresh, ``state["moments_from"]``) when a
  parameter's projector is replaced. By default they are kept across refreshes, as
  GaLore's, for the SVD projector, and restart for ``"dct"`` and ``"random"``, whose
  coordinates name chosen basis vectors: after a refresh a coordinate may stand for
  another vector, whose moments the kept ones are not.
- ``projector``: ``"svd"`` (GaLore's), ``"dct"`` (the DCT columns on which the gradient has
  most energy, chosen by FFT, stored as indices: :class:`~lowrank.optim.projector.
  DCTProjection`) or ``"random"`` (random rows or columns, FRUGAL's RandK:
  :class:`~lowrank.optim.projector.RandomProjection`).
- ``projector_bits`` (8 or 4) with ``group_size``: the SVD projector stored quantized
  (Q-GaLore), dequantized at each use (:class:`~lowrank.optim.projector.
  QuantizedProjection`).
- ``lazy_refresh``: Q-GaLore's per-layer refresh intervals that grow while a layer's
  subspace stays put (:class:`~lowrank.optim.projector.LazyGaLoreProjector`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.optim.projector import (
    SIDES,
    DCTProjection,
    GaLoreProjector,
    LazyGaLoreProjector,
    Projection,
    QuantizedProjection,
    RandomProjection,
    Refresh,
    SVDProjection,
    check_projector_bits,
    describe,
    leading_subspace,
    restore_saved_dtypes,
)

__all__ = ["SIDES", "GaLoreAdamW", "Refresh", "galore_groups", "leading_subspace"]

PROJECTORS = ("svd", "dct", "random")
RESIDUALS = (None, "fira", "sgd", "signsgd")
# The projector's options: one projector serves every group, so they are the optimizer's.
OPTIMIZER_OPTIONS = ("svd", "n_iter", "warm_iter", "oversample", "seed", "projection",
                     "projector", "projector_bits", "group_size", "lazy_refresh",
                     "cos_threshold", "queue_size", "refresh_growth")  # fmt: skip


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore projection for the groups that carry ``rank`` (module docstring).

    Args:
        params: parameters or groups, as for ``torch.optim.AdamW``; a group with ``rank``
            (and optionally ``update_proj_gap`` (200), ``scale`` (1.0), ``proj_type``
            (``"std"``)) is projected. Groups added later by ``add_param_group`` get the
            same defaults and checks.
        lr, betas, eps, weight_decay, correct_bias: as the authors' ``GaLoreAdamW``
            (``eps=1e-6`` added to ``sqrt(v)`` before bias correction of the step size);
            ``lr`` may be a 0-dim tensor, as for torch's optimizers.
        svd: ``"randomized"`` (batched: the first refresh by :func:`lowrank.linalg.rsvd`,
            later ones warm-started from the previous projector by
            :func:`leading_subspace`) or ``"exact"`` (batched ``torch.linalg.svd``).
        n_iter: power iterations of a cold (first) randomized refresh.
        warm_iter: power iterations of a warm refresh (default 0: one randomized SVD
            from the previous projector and ``oversample`` random columns).
        oversample: extra sketch columns of a randomized refresh.
        seed: randomness of the randomized refresh.
        projection: another kind of projector (a
            :class:`~lowrank.optim.projector.Projection`) instead of the SVD one that
            ``svd``, ``n_iter``, ``warm_iter`` and ``oversample`` describe (leave those at
            their defaults then).
        residual: ``None`` (GaLore), ``"fira"``, ``"sgd"`` or ``"signsgd"`` (FRUGAL): the
            update with the gradient's part outside the projection (module docstring); a
            group option (this is its default), as are ``limiter_gamma`` (Fira's
            norm-growth limit, 1.01) and ``residual_lr`` (FRUGAL's rate for it, default the
            group's ``lr``).
        projector: ``"svd"``, ``"dct"`` or ``"random"`` (module docstring).
        reset_moments: restart the projected moments at each refresh (a group option:
            ``None``, the default, restarts them for ``"dct"`` and ``"random"`` only;
            module docstring).
        projector_bits: ``None`` (float32 projectors), 8 or 4: the SVD projector stored in
            groups of ``group_size`` elements (a positive integer, even for 4 bits).
        lazy_refresh: Q-GaLore's per-parameter refresh intervals: an interval (at first
            the group's ``update_proj_gap``) grows by ``refresh_growth`` after
            ``queue_size`` consecutive refreshes whose subspace similarity to the previous
            projector is at least ``cos_threshold``
            (:class:`~lowrank.optim.projector.LazyGaLoreProjector`).

    Options are checked before any state exists: a bad one raises ``ValueError`` (a
    wrong type ``TypeError``) naming it, and for a group option the group
    (``param_groups[i]``).
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
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
        projection: Projection | None = None,
        residual: str | None = None,
        limiter_gamma: float = 1.01,
        residual_lr: float | None = None,
        projector: str = "svd",
        reset_moments: bool | None = None,
        projector_bits: int | None = None,
        group_size: int = 256,
        lazy_refresh: bool = False,
        cos_threshold: float = 0.4,
        queue_size: int = 5,
        refresh_growth: float = 2.0,
    ) -> None:
        if projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {projector!r}")
        if projection is None and projector == "svd":
            projection = SVDProjection(svd, n_iter=n_iter, warm_iter=warm_iter,
                                       oversample=oversample)  # fmt: skip
        else:
            check_svd_options_unused(svd, n_iter, warm_iter, oversample)
            if projection is None:
                projection = DCTProjection() if projector == "dct" else RandomProjection()
            elif projector != "svd":
                raise ValueError(f"projector={projector!r} and projection= both choose the "
                                 "projection; give one")  # fmt: skip
        if projector_bits is not None:
            check_projector_bits(projector_bits)
            if projector != "svd":
                raise ValueError(f"projector_bits quantizes dense projectors; "
                                 f"projector={projector!r} is stored as indices")  # fmt: skip
            projection = QuantizedProjection(projection, projector_bits, group_size)
        elif group_size != 256:
            raise ValueError("group_size applies to quantized projectors (projector_bits)")
        if not isinstance(lazy_refresh, bool):
            raise TypeError(f"lazy_refresh must be True or False, got {lazy_refresh!r}")
        if lazy_refresh:
            self.projector = LazyGaLoreProjector(
                projection, seed=seed, cos_threshold=cos_threshold, queue_size=queue_size,
                growth=refresh_growth,
            )  # fmt: skip
        elif (cos_threshold, queue_size, refresh_growth) != (0.4, 5, 2.0):
            raise ValueError("cos_threshold, queue_size and refresh_growth describe the lazy "
                             "refresh: give lazy_refresh=True or leave them at their "
                             "defaults")  # fmt: skip
        else:
            self.projector = GaLoreProjector(projection, seed=seed)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias, "residual": residual,
                    "limiter_gamma": limiter_gamma, "residual_lr": residual_lr,
                    "reset_moments": reset_moments}  # fmt: skip
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)

    @property
    def refresh_log(self) -> list[Refresh]:
        """Every projector refresh: its step, matrices and seconds."""
        return self.projector.refresh_log

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` with GaLore's defaults and checks (a
        group that fails them is not added)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hyperparameters(group)
            self.projector.configure(group)
        except (TypeError, ValueError) as error:
            self.param_groups.pop()
            raise type(error)(f"param_groups[{len(self.param_groups)}]: {error}") from None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping every state tensor in the
        dtype it was saved in (float32 projectors and projected moments for
        float16/bfloat16 weights) and continuing the randomized refresh's seeds."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            _check_hyperparameters(group)
            self.projector.configure(group)
        restore_saved_dtypes(self, state_dict)
        self.projector.resume(self.state.values())

    # ---- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_step()
        entries = [(p, self.state[p], group) for group in self.param_groups
                   for p in group["params"] if p.grad is not None]  # fmt: skip
        replaced = self.projector.refresh(entries)
        for _, state, group in replaced:
            if self.projector.resets(group) and "exp_avg" in state:
                del state["exp_avg"], state["exp_avg_sq"]
                state["moments_from"] = state["step"]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad, target = p.grad, p
                projected = self.projector.active(state)
                if projected:
                    grad = self.projector.project(state, grad)
                    residual = group["residual"]
                elif p.is_complex():  # as torch.optim.AdamW: the real and imaginary parts
                    grad, target = torch.view_as_real(grad), torch.view_as_real(p)
                if "exp_avg" not in state:
                    state.setdefault("step", 0)
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = lr
                if group["correct_bias"]:
                    t = state["step"] - state.get("moments_from", 0)
                    step_size = step_size * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                update = exp_avg / denom
                if projected:
                    low_update = update
                    update = self.projector.project_back(state, update) * group["scale"]
                    if residual == "fira":
                        rest = self._residual(state, p.grad, grad)
                        update = update + self._fira(state, group, rest, grad, low_update)
                target.add_(update.to(target.dtype), alpha=-step_size)
                if projected and residual in ("sgd", "signsgd"):
                    rest = self._residual(state, p.grad, grad)
                    if residual == "signsgd":
                        rest = rest.sign_()
                    rate = lr if group["residual_lr"] is None else float(group["residual_lr"])
                    target.add_(rest.to(target.dtype), alpha=-rate)
                if group["weight_decay"] > 0.0:
                    target.add_(target, alpha=-lr * group["weight_decay"])
        return loss

    def _residual(self, state: dict, grad: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """The gradient's part outside the projection, ``G - back(R)`` (``R = low``, the
        projected gradient), in the projector's dtype."""
        return grad.to(low.dtype) - self.projector.project_back(state, low)

    @staticmethod
    def _fira(state: dict, group: dict, rest: torch.Tensor, low: torch.Tensor,
              psi: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Fira's scaled residual ``phi * rest`` with its norm-growth limiter (module
        docstring): ``low`` is the projected gradient ``R``, ``psi`` Adam's direction."""
        side = SIDES[state["side"]]
        dim = {"right": -1, "left": -2, "full": (-2, -1)}[side]
        num = torch.linalg.vector_norm(psi, dim=dim, keepdim=True)
        den = torch.linalg.vector_norm(low, dim=dim, keepdim=True)
        scaled = rest * torch.where(den > 0, num / den, 0.0)
        norm = torch.linalg.vector_norm(scaled)
        previous = state.get("fira_norm")
        if previous is not None:  # no limit before a previous norm exists, or from zero
            limit = group["limiter_gamma"] * previous
            factor = torch.where((previous > 0) & (norm > limit), limit / norm, 1.0)
            scaled, norm = scaled * factor, norm * factor
        state["fira_norm"] = norm
        return scaled

    def _check_step(self) -> None:
        """Before anything changes: no sparse gradient, and each group's ``lr`` (and ``lr *
        weight_decay``) within the range of its parameters' dtypes (torch cannot scale by
        a factor beyond it)."""
        for group in self.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"{describe(p, group)} has a sparse .grad; "
                                    "GaLoreAdamW does not support sparse gradients")  # fmt: skip
                largest = torch.finfo(p.dtype).max
                if lr > largest or lr * group["weight_decay"] > largest:
                    raise ValueError(f"lr = {lr:g} (with weight_decay = {group['weight_decay']:g}) "
                                     f"is beyond the range of {describe(p, group)}'s dtype, "
                                     f"{p.dtype}")  # fmt: skip

    # ---- reporting -----------------------------------------------------------------------------

    def memory_report(self) -> list[dict]:
        """Per parameter: its shape, the bytes of its optimizer state as stored (moments,
        the projector in whatever form it is kept: dense, quantized codes with their
        group offsets and steps, or indices; Fira's limiter), of which the projector's,
        and what AdamW would hold (two full-size moments)."""
        keys = self.projector.projection.keys
        rows = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                sizes = {k: t.numel() * t.element_size() for k, t in state.items()
                         if isinstance(t, torch.Tensor)}  # fmt: skip
                rows.append({"shape": tuple(p.shape), "projected": self.projector.active(state),
                             "state_bytes": sum(sizes.values()),
                             "projector_bytes": sum(v for k, v in sizes.items() if k in keys),
                             "adamw_bytes": 2 * p.numel() * p.element_size()})  # fmt: skip
        return rows

    def state_bytes(self) -> int:
        """All optimizer state, in bytes."""
        return sum(row["state_bytes"] for row in self.memory_report())


def check_svd_options_unused(svd: str, n_iter: int, warm_iter: int, oversample: int) -> None:
    """Raises unless the options of the SVD projection GaLore builds by default are at their
    defaults: for when a projection is given (or chosen) instead."""
    if (svd, n_iter, warm_iter, oversample) != ("randomized", 2, 0, 10):
        raise ValueError("svd, n_iter, warm_iter and oversample describe the SVD "
                         "projection; leave them at their defaults")  # fmt: skip


def _check_hyperparameters(group: dict) -> None:
    """Checks a group's AdamW options (``lr`` a number or a 0-dim real tensor), and that it
    holds none of the projector's options, which only the optimizer takes."""
    misplaced = [key for key in OPTIMIZER_OPTIONS if key in group]
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: the projector's options apply to every group; "
                         f"give them to GaLoreAdamW, not to a group")  # fmt: skip
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.dim() != 0 or not lr.is_floating_point():
            raise ValueError(f"lr must be a number or a 0-dim floating tensor, got a "
                             f"{lr.dim()}-dim {lr.dtype} tensor")  # fmt: skip
        lr = lr.item()
    check.real("lr", lr, 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check.real("betas[0]", betas[0])
    check.real("betas[1]", betas[1])
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas must be in [0, 1), got {betas}")
    check.real("eps", group["eps"], 0.0)
    check.real("weight_decay", group["weight_decay"], 0.0)
    if group.get("residual") not in RESIDUALS:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {group['residual']!r}")
    check.real("limiter_gamma", group.get("limiter_gamma", 1.01), 1.0)
    if group.get("residual_lr") is not None:
        check.real("residual_lr", group["residual_lr"], 0.0)


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
