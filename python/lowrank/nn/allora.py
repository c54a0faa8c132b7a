"""ALLoRA: LoRA without dropout or scaling, each row's gradient scaled by its norm.

Huang and Balestriero 2024 ("ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws").
The adapter is ``y = base(x) + x A^T B^T`` (no ``alpha / rank`` scale, no dropout), and
the gradient of each row ``theta_i`` of ``A`` (``rank x in``) and of ``B``
(``out x rank``) is multiplied by

    1 / sqrt(||theta_i||^2 + 1 / eta^2),

a per-row learning rate inversely proportional to the row's l2 norm, bounded by ``eta``
where the row is zero (``B``'s rows at LoRA's init, which then leave zero at ``eta``
times the plain rate). The coefficient depends on the parameter only, so scaling the batch
gradient is scaling every per-sample gradient, as the paper states it.

The scaling lives in the layer's autograd graph (an identity in forward whose backward
multiplies by the coefficient, from the parameter's value at the forward), so it works
with any optimizer, with ``torch.compile``, pickling and ``state_dict``, and no hook needs
to be registered or removed. Everything else is :class:`~lowrank.nn.LoRAAdapter`'s
(inits, merge, PEFT export as a plain LoRA adapter of scale 1).

``convert(model, "allora", rank=8, eta=1.0)`` converts every targeted ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank import _validate as check
from lowrank.nn._base import config_dtype
from lowrank.nn.lora import LoRAAdapter
from lowrank.nn.registry import ConversionContext, KindConfig, register_kind

__all__ = ["ALLoRAAdapter", "ALLoRAConfig", "row_norm_scaled"]

INITS = ("gaussian", "kaiming", "pissa", "olora")


class _RowNormScaledGrad(torch.autograd.Function):
    """Identity in forward; backward multiplies each row of the gradient by
    ``1 / sqrt(||row of p||^2 + 1 / eta^2)``."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, eta: float) -> torch.Tensor:
        ctx.save_for_backward(p)
        ctx.eta = eta
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (p,) = ctx.saved_tensors
        work = torch.float64 if p.dtype == torch.float64 else torch.float32
        norm2 = p.to(work).square().sum(dim=-1, keepdim=True)
        coefficient = torch.rsqrt(norm2 + 1.0 / (ctx.eta * ctx.eta))
        return grad * coefficient.to(grad.dtype), None


def row_norm_scaled(p: torch.Tensor, eta: float) -> torch.Tensor:
    """``p`` itself, whose gradient is ALLoRA's: each row's gradient times
    ``1 / sqrt(||p_i||^2 + 1 / eta^2)``."""
    return _RowNormScaledGrad.apply(p, eta)


class ALLoRAAdapter(LoRAAdapter):
    """ALLoRA around a frozen ``nn.Linear`` (module docstring).

    Args:
        base: the layer to adapt; its parameters are frozen.
        rank: the adapter's rank.
        eta: the bound of the per-row coefficient (reached where a row is zero).
        init: ``"gaussian"`` (default), ``"kaiming"``, ``"pissa"`` or ``"olora"``
            (:class:`~lowrank.nn.LoRAAdapter`'s, with scale 1).
        svd, n_iter, seed, dtype: as for :class:`~lowrank.nn.LoRAAdapter`.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        eta: float = 1.0,
        init: str = "gaussian",
        *,
        svd: str = "randomized",
        n_iter: int = 2,
        seed: int | None = 0,
        dtype: torch.dtype | None = None,
    ) -> None:
        eta = _check_eta(eta)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        super().__init__(base, rank, None, 0.0, init, svd=svd, n_iter=n_iter, seed=seed,
                         dtype=dtype)  # fmt: skip
        self.eta = eta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a = row_norm_scaled(self.A, self.eta)
        b = row_norm_scaled(self.B, self.eta)
        return y + F.linear(F.linear(x.to(a.dtype), a), b).to(y.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "eta": self.eta}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        if isinstance(state, dict) and state.get("eta") is not None:
            self.eta = float(state["eta"])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, eta={self.eta:g}, init={self.init}, merged={self.merged}"
        )


def _check_eta(eta: Any) -> float:
    eta = check.real("eta", eta)
    if eta <= 0:
        raise ValueError(f"eta must be positive, got {eta}")
    return eta


# ---- the conversion kind ------------------------------------------------------------------------


@dataclass
class ALLoRAConfig(KindConfig):
    """``convert(model, "allora", ...)``: :class:`ALLoRAAdapter`'s arguments, the same for
    every layer (``rank`` 8 by default)."""

    rank: int = 8
    eta: float = 1.0
    init: str = "gaussian"
    svd: str = "randomized"
    n_iter: int = 2
    seed: int | None = 0
    dtype: torch.dtype | None = None

    def __post_init__(self):
        self.rank = check.positive_int("rank", self.rank)
        self.eta = _check_eta(self.eta)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.svd not in ("randomized", "exact"):
            raise ValueError(f"svd must be 'randomized' or 'exact', got {self.svd!r}")
        self.n_iter = check.iterations("n_iter", self.n_iter)
        self.dtype = config_dtype(self.dtype)


def _plan(context: ConversionContext, config: ALLoRAConfig):
    def make(name, linear):
        rank = min(config.rank, *context.shapes[name])
        layer = ALLoRAAdapter(linear, rank, config.eta, config.init, svd=config.svd,
                              n_iter=config.n_iter, seed=config.seed,
                              dtype=config.dtype)  # fmt: skip
        return layer, f"rank {rank}, eta {config.eta:g}, init {config.init}"

    return make


def _describe(adapter: ALLoRAAdapter) -> dict:
    return {"rank": adapter.rank, "eta": adapter.eta,
            "dtype": str(adapter.A.dtype).removeprefix("torch."),
            "initial_factors": adapter.A0 is not None}  # fmt: skip


def _rebuild(linear: nn.Linear, d: dict) -> ALLoRAAdapter:
    """The factors, ``A0``/``B0`` and the init's name come from the saved state."""
    adapter = ALLoRAAdapter(linear, d["rank"], d["eta"], dtype=getattr(torch, d["dtype"]))
    if d["initial_factors"]:
        adapter.A0, adapter.B0 = torch.empty_like(adapter.A), torch.empty_like(adapter.B)
    return adapter


register_kind("allora", config=ALLoRAConfig, layers=ALLoRAAdapter, plan=_plan,
              describe=_describe, rebuild=_rebuild, adapter=True)  # fmt: skip
