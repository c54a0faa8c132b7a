"""AdaLoRA: an SVD-form adapter whose ranks are allocated during training, by itself.

Zhang et al. 2023 ("Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"). Each
adapted layer ``k`` is ``W + s P_k Lambda_k Q_k`` on lowrank's
:class:`~lowrank.nn.svd_adapter.SVDAdapter` core (``B = P``: ``out x r``, a diagonal
``C = Lambda``: ``r`` values, ``A = Q``: ``r x in``; all three trainable; ``s = alpha /
rank``). It starts as the identity change (``Lambda = 0``) with ``P`` and ``Q``
orthonormal (random, ``init="orthogonal"``, the default) or drawn from ``N(0, 0.02^2)``
(``init="gaussian"``, the paper's and PEFT's). During training:

- **Importance** of every entry ``w`` of ``P``, ``Lambda``, ``Q``: the sensitivity
  ``I = |w dL/dw|``, smoothed ``Ibar = beta1 Ibar + (1 - beta1) I`` and its uncertainty
  ``Ubar = beta2 Ubar + (1 - beta2) |I - Ibar|``, the score ``Ibar * Ubar`` (eqs. 8-10).
  A triplet's score is ``S_i = score(lambda_i) + mean_j score(P_ji) + mean_j score(Q_ij)``
  (eq. 7). The gradients are read before the optimizer's step, with the step's weights.
- **Budget** ``b(t)``, the number of triplets kept over all layers, cubic (eq. 12): ``b(0)``
  (the sum of the initial ranks) for ``t < t_init``, then ``b(T) + (b(0) - b(T)) (1 - (t -
  t_init) / (T - t_init - t_final))^3`` (rounded down), and ``b(T) = target_rank x
  layers`` from ``t = T - t_final`` (``T = total_steps``).
- **Masking** every ``delta_t`` steps of the cubic phase: the ``b(t)`` triplets with the
  largest scores over all layers are kept (the layer's boolean buffer ``mask``), the
  others' ``lambda_i`` are set to zero (they keep training and may be selected again, as in
  the paper and PEFT). At ``t = T - t_final`` the final allocation (budget ``b(T)``) is
  made and kept, and the importance is no longer updated. From then on the mask is part of
  the layer's function: its core is ``Lambda * mask`` (:meth:`AdaLoRAAdapter.core`) in the
  forward, the merge and both PEFT exports, so a pruned ``lambda_i`` never acts again,
  after :meth:`AdaLoRAAllocator.detach` too.
- **Orthogonality**: ``orth_reg_weight * (||P^T P - I||_F^2 + ||Q Q^T - I||_F^2)`` per layer
  is added to the training objective through its gradient, added to ``P``'s and ``Q``'s
  gradients before each step (the same as adding it to the loss, without touching it).

**No manual call.** :func:`attach` registers the above on the optimizer once, as a
pre-step hook (importance, regulariser) and a post-step hook (schedule, masking)::

    model = lowrank.nn.convert(model, "adalora", rank=8, target_rank=4, total_steps=1000,
                               t_init=100, t_final=300, delta_t=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    allocator = lowrank.nn.adalora.attach(model, opt)
    for batch in data:                     # an ordinary loop
        loss(model, batch).backward(); opt.step(); opt.zero_grad()
    allocator.ranks()                      # {layer name: final rank}
    lowrank.nn.adalora.save_peft(model, "adapter")   # PEFT's AdaLoRA format

The allocation uses ``torch.topk`` on the concatenated scores with ``k = b(t)`` (clamped to
``[0, all]``), never ``kthvalue``: a budget of everything, of nothing, a layer that loses
all its triplets, and a single layer are ordinary cases. :meth:`AdaLoRAAllocator.state_dict`
holds the step and the scores for resuming (the masks are buffers in the model's state,
so :func:`lowrank.nn.save`/:func:`lowrank.nn.load` keep the layers' function).

**PEFT export.** :func:`save_peft` writes PEFT's ``AdaLoraConfig`` (``init_r`` = ``rank``,
``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``total_step``, ``beta1``, ``beta2``,
``orth_reg_weight``) with ``rank_pattern`` (``"<layer>.lora_E"``: the kept triplets) and
the kept rows of PEFT's ``lora_A`` (``Q``), ``lora_E`` (``Lambda``, with the scale folded
in) and ``lora_B`` (``P``): ``peft.PeftModel.from_pretrained(original_model, folder)``
gives the same outputs.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.nn import peft_export
from lowrank.nn._base import check_dropout, config_dtype
from lowrank.nn.registry import ConversionContext, KindConfig, kind_of
from lowrank.nn.svd_adapter import SVDAdapter, register_svd_kind

__all__ = ["AdaLoRAAdapter", "AdaLoRAAllocator", "AdaLoRAConfig", "attach", "budget",
           "peft_state", "save_peft"]  # fmt: skip

INIT_STD = 0.02  # the paper's and PEFT's N(0, 0.02^2) for P and Q
INITS = ("orthogonal", "gaussian")


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class AdaLoRAAdapter(SVDAdapter):
    """AdaLoRA's layer (module docstring): ``W + s P diag(Lambda) Q`` with ``P``, ``Lambda``,
    ``Q`` trainable and a boolean buffer ``mask`` of the triplets the allocation keeps.

    Args:
        base: the layer to adapt; its parameters are frozen.
        rank: the initial rank ``r``.
        alpha: the scale is ``alpha / rank`` (default ``alpha = rank``: scale 1).
        dropout: dropout on the adapter's input.
        init: ``"orthogonal"`` (default: ``P`` with orthonormal columns and ``Q`` with
            orthonormal rows, from the QR factorisation of Gaussian draws, where the
            orthogonality regulariser is zero) or ``"gaussian"`` (the paper's and PEFT's
            ``N(0, 0.02^2)`` entries, which start the change very small: with few steps the
            adapter barely moves). ``Lambda = 0`` either way.
        seed: for ``P`` and ``Q``'s initial draw.
        dtype: the adapter's dtype (default the base's).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        *,
        init: str = "orthogonal",
        seed: int | None = 0,
        dtype: torch.dtype | None = None,
    ) -> None:
        rank = check.positive_int("rank", rank)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        alpha = float(rank if alpha is None else check.real("alpha", alpha))
        super().__init__(base, rank, diagonal=True, trainable=("B", "C", "A"),
                         scale=alpha / rank, dropout=dropout, dtype=dtype)  # fmt: skip
        self._add_mask()
        self.init = init
        #: the final allocation is made: the mask is part of the function (:meth:`core`)
        self.mask_final = False
        if not self.A.is_meta:
            generator = None
            if seed is not None:
                generator = torch.Generator(device=self.A.device).manual_seed(seed)
            with torch.no_grad():
                if init == "gaussian":
                    self.A.normal_(0.0, INIT_STD, generator=generator)
                    self.B.normal_(0.0, INIT_STD, generator=generator)
                else:  # orthonormal rows of Q and columns of P: the regulariser's fixed point
                    for p, rows in ((self.A, self.in_features), (self.B, self.out_features)):
                        draw = torch.randn(rows, rank, generator=generator, device=p.device,
                                           dtype=_work_dtype(p))  # fmt: skip
                        q = torch.linalg.qr(draw).Q
                        p.copy_(q.T if p is self.A else q)

    def _add_mask(self) -> None:
        self.register_buffer("mask", torch.ones(self.rank, dtype=torch.bool,
                                                device=self.A.device))  # fmt: skip

    @classmethod
    def empty(cls, base: nn.Linear, structure: Mapping[str, Any]) -> AdaLoRAAdapter:
        """An adapter of this structure with zero values, for loading."""
        self = super().empty(base, structure)
        self.init = "orthogonal"  # the values come from the saved state
        self._add_mask()
        self.mask_final = False  # as the saved state says
        return self

    def core(self) -> torch.Tensor:
        """The singular values the layer's function uses (forward, merge, exports): after
        the final allocation ``Lambda * mask``, the pruned ones zero whatever ``C`` holds;
        before it ``Lambda`` itself, whose pruned values the allocations zero and the
        optimizer may move again in between (the schedule of the paper and PEFT)."""
        return self.C.masked_fill(~self.mask, 0.0) if self.mask_final else self.C

    @property
    def current_rank(self) -> int:
        """The number of triplets the last allocation keeps."""
        return int(self.mask.sum())

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Sets the pruned triplets' stored singular values to zero."""
        self.C.masked_fill_(~self.mask, 0.0)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "mask_final": self.mask_final}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        if isinstance(state, dict):
            self.mask_final = bool(state.get("mask_final", False))

    def orthogonality_penalty(self) -> torch.Tensor:
        """``||P^T P - I||_F^2 + ||Q Q^T - I||_F^2`` (differentiable)."""
        eye = torch.eye(self.rank, dtype=self.A.dtype, device=self.A.device)
        return (self.B.mT @ self.B - eye).square().sum() + (self.A @ self.A.mT - eye).square().sum()


def budget(step: int, initial: int, target: int, total_steps: int, t_init: int,
           t_final: int) -> int:  # fmt: skip
    """The paper's cubic budget ``b(t)`` after ``step`` optimizer steps (module docstring)."""
    if step < t_init:
        return initial
    if step >= total_steps - t_final:
        return target
    progress = (step - t_init) / (total_steps - t_final - t_init)
    return int(target + (initial - target) * (1.0 - progress) ** 3)


# ---- the configuration and the kind --------------------------------------------------------------


@dataclass
class AdaLoRAConfig(KindConfig):
    """``convert(model, "adalora", ...)``: the layers' options (:class:`AdaLoRAAdapter`) and
    the schedule :func:`attach` runs (module docstring). ``total_steps`` (the number of
    optimizer steps of the training) is required; ``target_rank`` is the final *average*
    rank. PEFT's names: ``init_r = rank``, ``target_r = target_rank``, ``tinit = t_init``,
    ``tfinal = t_final``, ``deltaT = delta_t``, ``total_step = total_steps``."""

    rank: int = 8
    target_rank: int = 4
    total_steps: int | None = None
    t_init: int = 0
    t_final: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    alpha: float | None = None
    dropout: float = 0.0
    init: str = "orthogonal"
    seed: int | None = 0
    dtype: torch.dtype | None = None

    def __post_init__(self):
        self.rank = check.positive_int("rank", self.rank)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        self.target_rank = check.integer("target_rank", self.target_rank, 0)
        if self.target_rank > self.rank:
            raise ValueError(f"target_rank ({self.target_rank}) must be at most the initial "
                             f"rank ({self.rank})")  # fmt: skip
        if self.total_steps is None:
            raise ValueError("total_steps must be given: the number of optimizer steps of the "
                             "training, which the rank schedule spans")  # fmt: skip
        self.total_steps = check.positive_int("total_steps", self.total_steps)
        self.t_init = check.integer("t_init", self.t_init, 0)
        self.t_final = check.integer("t_final", self.t_final, 0)
        if self.t_init + self.t_final >= self.total_steps:
            raise ValueError(f"the schedule is longer than the training: t_init + t_final = "
                             f"{self.t_init + self.t_final} must be less than total_steps = "
                             f"{self.total_steps}")  # fmt: skip
        self.delta_t = check.positive_int("delta_t", self.delta_t)
        for name in ("beta1", "beta2"):
            value = check.real(name, getattr(self, name), 0.0, 1.0)
            if value >= 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
            setattr(self, name, value)
        self.orth_reg_weight = check.real("orth_reg_weight", self.orth_reg_weight, 0.0)
        if self.alpha is not None:
            self.alpha = check.real("alpha", self.alpha)
        self.dropout = check_dropout(self.dropout)
        self.dtype = config_dtype(self.dtype)


def _plan(context: ConversionContext, config: AdaLoRAConfig):
    alpha = float(config.rank if config.alpha is None else config.alpha)

    def make(name, linear):
        r = min(config.rank, *linear.weight.shape)
        # the scale alpha / rank is the same for every layer, a smaller layer included
        layer = AdaLoRAAdapter(linear, r, alpha * r / config.rank, config.dropout,
                               init=config.init, seed=config.seed, dtype=config.dtype)  # fmt: skip
        return layer, f"initial rank {r}"

    return make


register_svd_kind("adalora", config=AdaLoRAConfig, layer=AdaLoRAAdapter, plan=_plan)


# ---- the allocator ----------------------------------------------------------------------------


def _adapters(model: nn.Module) -> dict[str, AdaLoRAAdapter]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRAAdapter)}
    if not found:
        raise ValueError("model holds no AdaLoRAAdapter (convert it with kind 'adalora')")
    return found


class AdaLoRAAllocator:
    """Runs AdaLoRA's importance, budget and masking from an optimizer's steps (module
    docstring); made by :func:`attach`.

    Attributes:
        config: the :class:`AdaLoRAConfig` of the schedule.
        step: the optimizer steps taken since attaching (or restored).
        history: ``(step, budget)`` of every allocation made.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 config: AdaLoRAConfig) -> None:  # fmt: skip
        self.layers = _adapters(model)
        self.config = config
        self.optimizer = optimizer
        self.step = 0
        self.final = False
        self.history: list[tuple[int, int]] = []
        self.initial_budget = sum(m.rank for m in self.layers.values())
        self.target_budget = min(config.target_rank * len(self.layers), self.initial_budget)
        # Ibar and Ubar of every entry of P, Lambda, Q, by layer
        self._ema: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]  # fmt: skip

    def detach(self) -> None:
        """Removes the hooks (the ranks stay as they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def ranks(self) -> dict[str, int]:
        """``{layer name: rank kept}``."""
        return {name: m.current_rank for name, m in self.layers.items()}

    def budget(self, step: int | None = None) -> int:
        """``b(step)`` (default: after the steps taken)."""
        c = self.config
        return budget(self.step if step is None else step, self.initial_budget,
                      self.target_budget, c.total_steps, c.t_init, c.t_final)  # fmt: skip

    # ---- the hooks ---------------------------------------------------------------------------

    @torch.no_grad()
    def _before_step(self, _optimizer, _args, _kwargs) -> None:
        c = self.config
        if not self.final:
            self._update_importance()
        if c.orth_reg_weight > 0:
            for m in self.layers.values():
                for p, gram in ((m.B, m.B.mT @ m.B), (m.A, m.A @ m.A.mT)):
                    if p.grad is None:
                        continue
                    eye = torch.eye(m.rank, dtype=gram.dtype, device=gram.device)
                    # d/dP ||P^T P - I||^2 = 4 P (P^T P - I); d/dQ ||Q Q^T - I||^2 = 4 (Q Q^T - I) Q
                    g = 4 * (p @ (gram - eye) if p is m.B else (gram - eye) @ p)
                    p.grad.add_(g.to(p.grad.dtype), alpha=c.orth_reg_weight)

    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for name, m in self.layers.items():
            parts = {"B": m.B, "C": m.C, "A": m.A}
            if any(p.grad is None for p in parts.values()):
                continue
            ema = self._ema.setdefault(name, {})
            for key, p in parts.items():
                sensitivity = (p.detach() * p.grad).abs().float()
                if key not in ema:
                    ema[key] = (torch.zeros_like(sensitivity), torch.zeros_like(sensitivity))
                ibar, ubar = ema[key]
                ibar.mul_(b1).add_(sensitivity, alpha=1 - b1)
                ubar.mul_(b2).add_((sensitivity - ibar).abs(), alpha=1 - b2)

    @torch.no_grad()
    def _after_step(self, _optimizer, _args, _kwargs) -> None:
        c = self.config
        self.step += 1
        t = self.step
        if self.final:
            for m in self.layers.values():
                m.apply_mask()
        elif t >= c.total_steps - c.t_final:
            self.allocate(self.target_budget)
            self.final = True
            for m in self.layers.values():
                m.mask_final = True
        elif t >= c.t_init and (t - c.t_init) % c.delta_t == 0:
            self.allocate(self.budget())

    def scores(self) -> dict[str, torch.Tensor]:
        """``{layer name: S}``, the triplets' importance scores (eq. 7; zeros for a layer
        without scores yet)."""
        out = {}
        for name, m in self.layers.items():
            ema = self._ema.get(name)
            if ema is None:
                out[name] = torch.zeros(m.rank, device=m.C.device)
                continue
            score = {k: ibar * ubar for k, (ibar, ubar) in ema.items()}
            out[name] = score["C"] + score["B"].mean(dim=0) + score["A"].mean(dim=1)
        return out

    @torch.no_grad()
    def allocate(self, budget: int) -> dict[str, int]:
        """Keeps the ``budget`` triplets with the largest scores over all layers and zeros
        the others' singular values; returns the ranks. The layers must be unmerged (a new
        mask changes their function)."""
        merged = [name for name, m in self.layers.items() if m.merged]
        if merged:
            raise RuntimeError(f"AdaLoRAAllocator.allocate: unmerge the layers {merged[:5]} "
                               "first (a new mask changes their function)")  # fmt: skip
        budget = max(0, min(int(budget), self.initial_budget))
        scores = self.scores()
        names = list(self.layers)
        flat = torch.cat([scores[n].to(torch.float32).cpu() for n in names])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        if budget > 0:
            keep[torch.topk(flat, budget, sorted=False).indices] = True
        start = 0
        for name in names:
            m = self.layers[name]
            m.mask.copy_(keep[start : start + m.rank].to(m.mask.device))
            m.apply_mask()
            start += m.rank
        self.history.append((self.step, budget))
        return self.ranks()

    # ---- resuming ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The step, whether the final allocation is made, the allocations and the scores'
        moving averages (the masks are in the model's state dict)."""
        return {"step": self.step, "final": self.final, "history": list(self.history),
                "ema": {n: {k: (i.clone(), u.clone()) for k, (i, u) in e.items()}
                        for n, e in self._ema.items()}}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` gave."""
        unknown = sorted(set(state.get("ema", {})) - set(self.layers))
        if unknown:
            raise ValueError(f"state holds scores of layers this model lacks: {unknown[:5]}")
        self.step = int(state["step"])
        self.final = bool(state["final"])
        self.history = [tuple(h) for h in state.get("history", [])]
        self._ema = {n: {k: (i.clone(), u.clone()) for k, (i, u) in e.items()}
                     for n, e in state.get("ema", {}).items()}  # fmt: skip


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, **schedule) -> AdaLoRAAllocator:
    """Runs AdaLoRA's schedule on ``model``'s :class:`AdaLoRAAdapter` layers from
    ``optimizer``'s steps (hooks; nothing to call in the training loop). The schedule is the
    configuration ``convert`` recorded on the layers, with any :class:`AdaLoRAConfig` field
    given here replacing it (for layers built directly, give at least ``total_steps`` and
    ``target_rank``). Build the optimizer over the model's parameters first."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")  # fmt: skip
    layers = _adapters(model)
    recorded = [kind_of(m) for m in layers.values()]
    configs = {json.dumps(r[1], sort_keys=True) for r in recorded if r is not None and r[1]}
    if len(configs) > 1:
        raise ValueError("the model's AdaLoRA layers were converted with different "
                         "configurations; attach one allocator per configuration")  # fmt: skip
    options = json.loads(configs.pop()) if configs else {}
    options.update(schedule)
    options.setdefault("rank", max(m.rank for m in layers.values()))
    config = AdaLoRAConfig.from_options("adalora", options)
    return AdaLoRAAllocator(model, optimizer, config)


# ---- PEFT --------------------------------------------------------------------------------------


def peft_state(model: nn.Module, config: AdaLoRAConfig | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
    """``(tensors, adapter_config)`` of the model's :class:`AdaLoRAAdapter` layers in PEFT's
    AdaLoRA format (module docstring). ``config`` defaults to the one ``convert``
    recorded. PEFT's scale is ``lora_alpha / (init_r + 1e-5)``: ``lora_alpha = init_r`` and
    each layer's ``s (init_r + 1e-5) / init_r`` is folded into ``lora_E``."""
    layers = _adapters(model)
    if config is None:
        recorded = kind_of(next(iter(layers.values())))
        if recorded is None or not recorded[1]:
            raise ValueError("config must be given for AdaLoRA layers not made by convert")
        config = AdaLoRAConfig.from_options("adalora", recorded[1])
    init_r = max(m.rank for m in layers.values())
    fold = (init_r + 1e-5) / init_r
    tensors: dict[str, torch.Tensor] = {}
    pattern: dict[str, list[bool]] = {}
    for name, m in layers.items():
        if m.merged:
            raise ValueError(f"{name}: unmerge the adapter before saving it for PEFT")
        keep = m.mask.cpu()
        prefix = f"base_model.model.{name}"
        values = m.core().detach().cpu()
        moved = values[~keep]
        if bool((moved != 0).any()):
            warnings.warn(f"{name}: {int(torch.count_nonzero(moved))} pruned singular values "
                          "have moved since the last allocation and act in the model, but the "
                          "export keeps the allocation's triplets only; export after the final "
                          "allocation for the model's exact function", stacklevel=2)  # fmt: skip
        scale = float(m.scale) * fold
        tensors[f"{prefix}.lora_A"] = m.A.detach().cpu()[keep].contiguous()
        tensors[f"{prefix}.lora_B"] = m.B.detach().cpu()[:, keep].contiguous()
        tensors[f"{prefix}.lora_E"] = (values[keep] * scale)[:, None].contiguous()
        pattern[f"{name}.lora_E"] = keep.tolist() + [False] * (init_r - m.rank)
    dropouts = {float(getattr(m.dropout, "p", 0.0)) for m in layers.values()}
    adapter_config = {
        "peft_type": "ADALORA",
        "task_type": None,
        "init_r": init_r,
        "target_r": config.target_rank,
        "tinit": config.t_init,
        "tfinal": config.t_final,
        "deltaT": config.delta_t,
        "total_step": config.total_steps,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight,
        "lora_alpha": init_r,
        "lora_dropout": max(dropouts),
        # a string is matched against each module's whole name (re.fullmatch)
        "target_modules": peft_export.target_regex(layers),
        "rank_pattern": pattern,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "bias": "none",
        "inference_mode": True,
    }
    return tensors, adapter_config


def save_peft(model: nn.Module, folder: str, config: AdaLoRAConfig | None = None, *,
              base_model_name_or_path: str | None = None) -> None:  # fmt: skip
    """Writes the model's AdaLoRA layers where ``peft.PeftModel.from_pretrained(
    original_model, folder)`` loads them: ``adapter_model.safetensors`` and
    ``adapter_config.json`` (:func:`peft_state`)."""
    tensors, adapter_config = peft_state(model, config)
    peft_export.write_folder(folder, tensors, adapter_config,
                             base_model_name_or_path=base_model_name_or_path)  # fmt: skip
