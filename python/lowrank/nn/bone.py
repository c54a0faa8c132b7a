"""``BoneAdapter``: Bone / MiSS, a block-shared matrix added to (or combined with) the
weight's blocks, around a frozen ``nn.Linear``.

Bone (Kang 2024, "Bone: Block-Affine Adaptation of Large Language Models"; in PEFT first
as ``BoneConfig``, now ``MissConfig``) splits the ``(out, in)`` weight ``W`` into blocks
along the input dimension and trains one matrix shared by all of them. With ``r`` the
block size, ``n = ceil(in / r)`` blocks and ``x_j`` the ``j``-th ``r`` inputs (the last
block zero-padded), the three variants of PEFT's ``MissConfig.init_weights`` are:

- ``"balance"`` (PEFT's default, ``init_weights=True``; Bone's default form): a trainable
  ``D`` of shape ``(r, out)`` is added to every ``(out, r)`` column block,
  ``delta W = [D^T, D^T, ..., D^T]`` (the last copy cut to ``in - (n - 1) r`` columns),
  i.e. ``kron(1_{1 x n}, D^T)``. So ``x delta W^T = (sum_j x_j) D``: the blocks of the input
  are summed (``r`` numbers per token) and meet ``D``; nothing ``out x in`` is formed.
- ``"mini"`` (``init_weights="mini"``): ``D`` is ``(r, m)`` with ``m = mini_rank`` dividing
  ``out``, repeated ``out / m`` times along the outputs (``kron(1_{out/m x n}, D^T)``):
  ``r m`` parameters per layer.
- ``"bat"`` (``init_weights="bat"``, Block Affine Transformation): ``W`` is cut into
  ``r x r`` blocks ``W_ab`` (``r`` must divide ``in`` and ``out``) and a trainable ``M_a``
  per output block row, ``M`` of shape ``(out / r, r, r)``, gives
  ``W'_ab = W_ab + W_ab M_a + M_a``. The change depends on ``W``, so the forward forms
  the adapted weight ``W'`` (as PEFT and the paper do: any factored form costs ``out / r``
  times the input's size in activations), and ``unmerge`` inverts ``I + M_a`` blockwise.

Every variant starts at ``D = 0`` / ``M = 0`` (the identity change), PEFT's default init;
``init="kaiming"`` is PEFT's ``init_weights=False`` (Kaiming-uniform ``D``).

The state dict holds ``D`` (``M``) as ``block``; :func:`save_peft` writes PEFT's MiSS
format (``miss_block``), which ``peft.PeftModel.from_pretrained`` loads to the same
outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank import _validate as check
from lowrank.nn import peft_export
from lowrank.nn._base import AdapterLinear, check_base, check_dropout
from lowrank.nn.registry import ConversionContext, KindConfig, register_kind

VARIANTS = ("balance", "bat", "mini")
INITS = ("zeros", "kaiming")
_PEFT_INIT_WEIGHTS = {"balance": True, "bat": "bat", "mini": "mini"}


class BoneAdapter(AdapterLinear):
    """Bone / MiSS around a frozen ``nn.Linear`` (module docstring).

    Args:
        base: the layer to adapt; its parameters are frozen.
        rank: the block size ``r`` along the inputs (PEFT's ``r``), at most ``in_features``;
            for ``"bat"`` it must divide ``in_features`` and ``out_features``.
        variant: one of :data:`VARIANTS`.
        mini_rank: ``m`` for ``"mini"`` (PEFT's ``mini_r``), dividing ``out_features``.
        dropout: dropout on the adapter's input (``"balance"`` and ``"mini"``; ``"bat"``
            has no separate adapter path, so it takes none).
        init: ``"zeros"`` (PEFT's default: the identity change) or ``"kaiming"``.
        seed: for ``init="kaiming"``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 64,
        variant: str = "balance",
        *,
        mini_rank: int = 1,
        dropout: float = 0.0,
        init: str = "zeros",
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        out_features, in_features = check_base(base)
        rank, mini_rank = _check_options(rank, variant, mini_rank, dropout, init)
        _check_shape(rank, variant, mini_rank, out_features, in_features)
        self._attach_base(base, dropout)
        self.rank = rank
        self.variant = variant
        self.mini_rank = mini_rank if variant == "mini" else None
        self.init = init
        shape = {"balance": (rank, out_features), "mini": (rank, mini_rank),
                 "bat": (out_features // rank, rank, rank)}[variant]  # fmt: skip
        kw = self._factory_kwargs()
        self.block = nn.Parameter(torch.zeros(shape, **kw))
        if init == "kaiming" and not self.block.is_meta:
            generator = None
            if seed is not None:
                generator = torch.Generator(device=self.block.device).manual_seed(seed)
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.block, a=math.sqrt(5), generator=generator)

    # ---- the function ------------------------------------------------------------------------

    def _block_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_j x_j``: the ``r``-sized input blocks summed, the last one zero-padded."""
        r = self.rank
        aligned = (x.shape[-1] // r) * r
        s = x[..., :aligned].unflatten(-1, (-1, r)).sum(-2)
        if aligned < x.shape[-1]:
            s = s + F.pad(x[..., aligned:], (0, r - (x.shape[-1] - aligned)))
        return s

    def _adapted_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``"bat"``: ``W'`` with blocks ``W_ab + W_ab M_a + M_a``."""
        r, m = self.rank, self.block.to(w.dtype)
        blocks = w.unflatten(0, (-1, r)).unflatten(-1, (-1, r))  # (out/r, r, in/r, r)
        adapted = blocks + torch.einsum("aibj,ajl->aibl", blocks, m) + m[:, :, None, :]
        return adapted.reshape(w.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check.layer_input(x, self.in_features, self.base.weight.dtype)
        if self.merged:
            return self.base(x)
        if self.variant == "bat":
            w = self._adapted_weight(self.base.weight)
            if torch.is_autocast_enabled(x.device.type):
                return F.linear(x, w, self.base.bias)  # autocast casts x, w and the bias
            bias = None if self.base.bias is None else self.base.bias.to(w.dtype)
            return F.linear(x.to(w.dtype), w, bias)
        y = self.base(x)
        s = self._block_sum(self.dropout(x).to(self.block.dtype))
        if self.variant == "balance":
            return y + (s @ self.block).to(y.dtype)
        z = s @ self.block  # (..., m), repeated along the outputs
        return (y.unflatten(-1, (-1, self.mini_rank)) + z.unsqueeze(-2).to(y.dtype)).flatten(-2)

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight without the change (recovered from the merged one if merged)."""
        w = self.base.weight.detach()
        if not self.merged:
            return w
        if self.variant == "bat":
            return self._inverse_bat(w)
        return w - self._additive_delta().to(w.dtype)

    def _additive_delta(self) -> torch.Tensor:
        """``"balance"`` / ``"mini"``: the ``(out, in)`` change, which does not depend on ``W``."""
        d = self.block
        if self.variant == "mini":
            d = d.repeat(1, self.out_features // self.mini_rank)
        n = -(-self.in_features // self.rank)
        return d.T.repeat(1, n)[:, : self.in_features]

    def delta_weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight change (formed: for merging); for ``"bat"`` relative to
        the unmerged base weight, ``W' - W``."""
        if self.variant == "bat":
            w = self._unmerged_weight()
            return self._adapted_weight(w) - w
        return self._additive_delta()

    def _inverse_bat(self, merged: torch.Tensor) -> torch.Tensor:
        """``W`` from ``W'``: ``W_ab = (W'_ab - M_a) (I + M_a)^{-1}`` for every block."""
        r = self.rank
        work = merged.double() if merged.dtype == torch.float64 else merged.float()
        m = self.block.detach().to(work.dtype)
        eye = torch.eye(r, dtype=work.dtype, device=work.device)
        blocks = work.unflatten(0, (-1, r)).unflatten(-1, (-1, r)).transpose(1, 2)  # (a, b, i, j)
        rhs = blocks - m[:, None]
        w = torch.linalg.solve((eye + m)[:, None], rhs, left=False)
        return w.transpose(1, 2).reshape(merged.shape).to(merged.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Removes the change from the base weight again (for ``"bat"`` by solving with
        ``I + M_a``, which must be invertible)."""
        if self.variant != "bat":
            return super().unmerge()
        if not self.merged:
            raise RuntimeError("BoneAdapter.unmerge: the adapter is not merged")
        w = self._inverse_bat(self.base.weight)
        if not torch.isfinite(w).all():
            raise ValueError("BoneAdapter.unmerge: I + M is singular for some block")
        self.base.weight.copy_(w)
        self.merged = False

    # ---- state -------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"merged": self.merged, "init": self.init}

    def set_extra_state(self, state: Any) -> None:
        # A merged adapter's state dict holds the merged base weight: loading it must not
        # add the change a second time.
        if isinstance(state, dict):
            self.merged = bool(state.get("merged", False))
            self.init = state.get("init", self.init)

    def extra_repr(self) -> str:
        mini = f", mini_rank={self.mini_rank}" if self.variant == "mini" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, variant={self.variant}{mini}, merged={self.merged}"
        )


def _check_options(rank, variant, mini_rank, dropout, init) -> tuple[int, int]:
    """The options that do not depend on a layer's shape; returns ``(rank, mini_rank)``."""
    rank = check.positive_int("rank", rank)
    mini_rank = check.positive_int("mini_rank", mini_rank)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    dropout = check_dropout(dropout)
    if dropout > 0 and variant == "bat":
        raise ValueError("dropout must be 0 for variant='bat' (it has no separate adapter path)")
    return rank, mini_rank


def _check_shape(rank, variant, mini_rank, out_features, in_features) -> None:
    if rank > in_features:
        raise ValueError(f"rank must be at most in_features = {in_features}, got {rank}")
    if variant == "bat" and (in_features % rank or out_features % rank):
        raise ValueError(f"rank must divide in_features and out_features for variant='bat' "
                         f"(r x r blocks), got rank={rank} for a ({out_features}, "
                         f"{in_features}) weight")  # fmt: skip
    if variant == "mini" and out_features % mini_rank:
        raise ValueError(f"mini_rank must divide out_features = {out_features}, "
                         f"got {mini_rank}")  # fmt: skip


# ---- saving for PEFT ----------------------------------------------------------------------------


def peft_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, adapter_config)`` of every :class:`BoneAdapter` in ``model`` in PEFT's MiSS
    format: keys ``base_model.model.<name>.miss_block``. PEFT's MiSS has one ``r``, variant,
    ``mini_r`` and dropout for all layers, so the adapters must agree on them."""
    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, tuple] = {}
    layers = peft_export.adapters(model, lambda m: isinstance(m, BoneAdapter), "BoneAdapter")
    for name, module in layers.items():
        tensors[f"base_model.model.{name}.miss_block"] = module.block.detach()
        dropout = float(getattr(module.dropout, "p", 0.0))
        settings[name] = (module.rank, module.variant, module.mini_rank or 1, dropout)
    if len(set(settings.values())) > 1:
        raise ValueError("PEFT's MiSS has one (rank, variant, mini_rank, dropout) for all "
                         f"layers; the adapters have {sorted(set(settings.values()))}")  # fmt: skip
    rank, variant, mini_rank, dropout = next(iter(settings.values()))
    config = {
        "peft_type": "MISS",
        "task_type": None,
        "r": rank,
        "mini_r": mini_rank,
        "miss_dropout": dropout,
        "init_weights": _PEFT_INIT_WEIGHTS[variant],
        "target_modules": peft_export.target_regex(settings),
        "bias": "none",
        "inference_mode": True,
    }
    return tensors, config


def save_peft(model: nn.Module, folder: str, *, base_model_name_or_path: str | None = None):
    """Writes the model's Bone adapters where ``peft.PeftModel.from_pretrained(original_model,
    folder)`` loads them as MiSS adapters with the same outputs."""
    tensors, config = peft_state(model)
    peft_export.write_folder(folder, tensors, config,
                             base_model_name_or_path=base_model_name_or_path)  # fmt: skip


# ---- the conversion kind ------------------------------------------------------------------------


@dataclass
class BoneConfig(KindConfig):
    """``convert(model, "bone", ...)``: :class:`BoneAdapter`'s arguments (its docstring), the
    same for every layer. ``rank`` is capped at each layer's ``in_features``."""

    rank: int = 64
    variant: str = "balance"
    mini_rank: int = 1
    dropout: float = 0.0
    init: str = "zeros"
    seed: int | None = 0

    def __post_init__(self):
        self.rank, self.mini_rank = _check_options(self.rank, self.variant, self.mini_rank,
                                                   self.dropout, self.init)  # fmt: skip


def _plan(context: ConversionContext, config: BoneConfig):
    # Every layer is checked before the first one is converted.
    ranks = {}
    for name, (out_f, in_f) in context.shapes.items():
        ranks[name] = min(config.rank, in_f)
        try:
            _check_shape(ranks[name], config.variant, config.mini_rank, out_f, in_f)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    options = {"variant": config.variant, "mini_rank": config.mini_rank,
               "dropout": config.dropout, "init": config.init, "seed": config.seed}  # fmt: skip

    def make(name, linear):
        layer = BoneAdapter(linear, ranks[name], **options)
        return layer, f"rank {layer.rank}, {layer.variant}"

    return make


def _describe(adapter: BoneAdapter) -> dict:
    dropout = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
    return {"rank": adapter.rank, "variant": adapter.variant,
            "mini_rank": adapter.mini_rank or 1, "dropout": dropout}  # fmt: skip


def _rebuild(linear: nn.Linear, d: dict) -> BoneAdapter:
    return BoneAdapter(linear, d["rank"], d["variant"], mini_rank=d["mini_rank"],
                       dropout=d["dropout"])  # fmt: skip


register_kind("bone", config=BoneConfig, layers=BoneAdapter, plan=_plan, describe=_describe,
              rebuild=_rebuild, adapter=True)  # fmt: skip
