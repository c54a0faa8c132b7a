"""``RandLoRAAdapter``: a full-rank update from shared random bases with trainable diagonals.

RandLoRA (Albert et al. 2025, "RandLoRA: full-rank parameter-efficient fine-tuning of large
models") adapts a frozen ``nn.Linear`` by

    delta W = (alpha / r) * sum_{i=1..n} B_i Lambda_i A Gamma_i,

with ``n = ceil(d / r)`` terms, ``d = min(in, out)`` the smaller side, frozen random bases
``B_i`` (``D x r``, ``D = max(in, out)``) and ``A`` (``r x d``, one shared by all terms), and
trainable diagonals ``Lambda_i`` (``r x r``) and ``Gamma_i`` (``d x d``): ``n r + n d``
parameters per layer, and the sum has rank up to ``d`` (full rank). The trainable side
``A Gamma_i`` always acts on the smaller dimension: for ``in <= out`` the change is the
sum above, for ``in > out`` its transpose.

Conventions follow PEFT's ``RandLoraConfig`` exactly, so an adapter exports to PEFT and
loads with the same outputs (:func:`save_peft`):

- the bases are drawn once for the whole model, sized for its largest adapted shape
  (``basis_shape = (D_max, d_max)``), and each layer uses their leading slices;
- they are drawn by a CPU ``torch.Generator`` seeded with ``seed`` (PEFT's
  ``projection_prng_key``): ``"dense"`` Kaiming-uniform in bfloat16, ``"sparse"`` and
  ``"very_sparse"`` ternary (``-1, 0, 1`` with probabilities ``1/(2s), 1 - 1/s, 1/(2s)``,
  ``s = 3`` or ``sqrt(d_max)``), each divided by its standard deviation;
- with PEFT's layout of the flattened ``(D, n r)`` basis, ``B_i`` is its columns
  ``i, i + n, i + 2n, ...``;
- ``Lambda = 0`` and ``Gamma = 1 / max(n, d)`` at init (the identity change), and
  ``alpha = 20 r`` by default (PEFT's ``randlora_alpha=640`` for ``r=32``).

The bases are never stored: the state dict holds ``lam`` (``r x n``, column ``i`` the
diagonal of ``Lambda_i``), ``gamma`` (``n x d``) and, in the extra state, the seed and the
basis shape. They are regenerated on first use, once per (seed, shape, device, dtype) and
shared by every layer of the model. The forward never forms ``delta W`` (nor saves anything
``d x d`` for backward): the input meets the frozen basis or the scaled ``A`` first, and the
scaled ``(n r, d)`` factor is formed on the fly inside one autograd function that recomputes
it in backward.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank import _validate as check
from lowrank.nn import peft_export
from lowrank.nn._base import AdapterLinear, check_base, check_dropout, config_dtype
from lowrank.nn.registry import ConversionContext, KindConfig, register_kind

BASES = ("dense", "sparse", "very_sparse")


# ---- the random bases ---------------------------------------------------------------------------


def basis_count(min_dim: int, rank: int) -> int:
    """``n = ceil(min_dim / rank)``: enough rank-``rank`` terms for a full-rank sum."""
    return -(-min_dim // rank)


def random_bases(
    seed: int, rank: int, basis_shape: tuple[int, int], basis: str = "dense"
) -> tuple[torch.Tensor, torch.Tensor]:
    """RandLoRA's shared bases ``(A, B)`` of shapes ``(rank, 1, d)`` and ``(D, n, rank)`` for
    ``basis_shape = (D, d)``, drawn on the CPU from ``seed`` as PEFT draws them (module
    docstring): the same values in every process and on every device."""
    max_dim, min_dim = basis_shape
    n = basis_count(min_dim, rank)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if basis == "dense":

        def kaiming(shape):
            t = torch.empty(shape, dtype=torch.bfloat16)
            return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)

        a = kaiming((rank, 1, min_dim))
        b = torch.cat([kaiming((max_dim, 1, rank)) for _ in range(n)], dim=1)
    else:
        sparsity = 3.0 if basis == "sparse" else math.sqrt(min_dim)
        a = torch.rand((rank, 1, min_dim), generator=generator)
        b = torch.rand((max_dim, n, rank), generator=generator)
        low, high = 1 / (2 * sparsity), 1 - 1 / (2 * sparsity)
        a, b = ((t > high).float() - (t < low).float() for t in (a, b))
    a, b = a / a.std(), b / b.std()
    if not bool(torch.isfinite(a).all() & torch.isfinite(b).all()):
        raise ValueError(f"basis={basis!r} drew an all-zero basis for basis_shape={basis_shape} "
                         "and this rank; use a denser basis")  # fmt: skip
    return a, b


class _SharedBases:
    """One model's bases on one device and dtype, with the flattened ``(D', n' r)`` slices the
    layers use (views when a layer uses all ``n`` terms)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a[:, 0], b  # (r, d), (D, n, r)
        self._flat: dict[tuple[int, int], torch.Tensor] = {}

    def flat_b(self, max_dim: int, n: int) -> torch.Tensor:
        key = (max_dim, n)
        if key not in self._flat:
            self._flat[key] = self.b[:max_dim, :n].reshape(max_dim, -1)
        return self._flat[key]


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_bases(seed, rank, basis_shape, basis, device, dtype) -> _SharedBases:
    """The bases for these settings on ``device`` in ``dtype``, drawn once while any layer
    holds them."""
    key = (int(seed), rank, tuple(basis_shape), basis, torch.device(device), dtype)
    found = _SHARED.get(key)
    if found is None:
        a, b = random_bases(seed, rank, basis_shape, basis)
        found = _SharedBases(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
        _SHARED[key] = found
    return found


# ---- the scaled factor --------------------------------------------------------------------------


def scaled_basis(lam: torch.Tensor, a: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The ``(r n, d)`` factor whose row ``k n + i`` is ``lam[k, i] * A[k] * gamma[i]``: the
    rows of ``Lambda_i A Gamma_i`` for every ``i``, in PEFT's order."""
    r, n = lam.shape
    return (lam[:, :, None] * a[:, None, :] * gamma[None]).reshape(r * n, -1)


class _ScaledBasisProduct(torch.autograd.Function):
    """``h @ S^T`` (or ``h @ S`` with ``transpose``) for ``S = scaled_basis(lam, a, gamma)``,
    saving only the inputs: ``S`` is recomputed in backward."""

    @staticmethod
    def forward(ctx, h, lam, a, gamma, transpose):
        s = scaled_basis(lam, a, gamma)
        ctx.save_for_backward(h, lam, a, gamma)
        ctx.transpose = transpose
        return h @ s if transpose else h @ s.T

    @staticmethod
    def backward(ctx, grad):
        h, lam, a, gamma = ctx.saved_tensors
        s = scaled_basis(lam, a, gamma)
        grad = grad.to(s.dtype)  # the forward may have run under autocast
        grad_h = grad_lam = grad_gamma = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad @ s.T if ctx.transpose else grad @ s).to(h.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            h2 = h.reshape(-1, h.shape[-1]).to(s.dtype)
            g2 = grad.reshape(-1, grad.shape[-1])
            grad_s = (h2.T @ g2 if ctx.transpose else g2.T @ h2).view(*lam.shape, -1)
            if ctx.needs_input_grad[1]:
                grad_lam = (grad_s * (a[:, None, :] * gamma[None])).sum(-1)
            if ctx.needs_input_grad[3]:
                grad_gamma = (grad_s * (lam[:, :, None] * a[:, None, :])).sum(0)
        return grad_h, grad_lam, None, grad_gamma, None


# ---- the layer ----------------------------------------------------------------------------------


class RandLoRAAdapter(AdapterLinear):
    """RandLoRA around a frozen ``nn.Linear`` (module docstring).

    Args:
        base: the layer to adapt; its parameters are frozen.
        rank: the rank ``r`` of each random basis (PEFT's ``r``), at most ``min(in, out)``;
            fewer terms and fewer trainable parameters as it grows.
        alpha: the scale is ``alpha / rank`` (default ``20 * rank``, PEFT's default scale).
        dropout: dropout on the adapter's input.
        seed: the bases' seed (PEFT's ``projection_prng_key``).
        basis: one of :data:`BASES`.
        basis_shape: ``(D, d)`` the bases are drawn for, shared by all the model's layers
            (default this layer's ``(max(in, out), min(in, out))``; ``convert`` gives every
            layer the largest, as PEFT does).
        dtype: the adapter's dtype (default the base's); the bases are used in it.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 32,
        alpha: float | None = None,
        dropout: float = 0.0,
        *,
        seed: int = 0,
        basis: str = "dense",
        basis_shape: tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_features, in_features = check_base(base)
        rank, alpha, dropout, seed = _check_options(rank, alpha, dropout, seed, basis)
        basis_shape = _check_shape(rank, basis_shape, out_features, in_features)
        self._attach_base(base, dropout)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.seed = seed
        self.basis = basis
        self.basis_shape = basis_shape
        self.min_dim, self.max_dim = min(in_features, out_features), max(in_features, out_features)
        self.n_bases = basis_count(self.min_dim, rank)
        kw = self._factory_kwargs(dtype)
        self.lam = nn.Parameter(torch.zeros(rank, self.n_bases, **kw))
        self.gamma = nn.Parameter(
            torch.full((self.n_bases, self.min_dim), 1 / max(self.n_bases, self.min_dim), **kw)
        )
        self._bases: _SharedBases | None = None
        self._a: torch.Tensor | None = None
        self._b: torch.Tensor | None = None

    # ---- the bases ---------------------------------------------------------------------------

    def _fetch_bases(self) -> None:
        self._bases = shared_bases(self.seed, self.rank, self.basis_shape, self.basis,
                                   self.lam.device, self.lam.dtype)  # fmt: skip
        self._a = self._bases.a[:, : self.min_dim]
        self._b = self._bases.flat_b(self.max_dim, self.n_bases)

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` this layer uses: ``A`` ``(r, d)`` and the flattened ``B`` ``(D, n r)``,
        on the parameters' device and in their dtype."""
        a = self._a
        if a is None or a.device != self.lam.device or a.dtype != self.lam.dtype:
            self._fetch_bases()
        return self._a, self._b

    def __getstate__(self) -> dict[str, Any]:
        # Pickles and deep copies hold the seed, not the bases: they are drawn again on use.
        state = dict(super().__getstate__())
        state.update(_bases=None, _a=None, _b=None)
        return state

    # ---- the function ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check.layer_input(x, self.in_features, self.base.weight.dtype)
        y = self.base(x)
        if self.merged:
            return y
        a, b = self.bases()
        h = self.dropout(x).to(self.lam.dtype)
        if self.in_features <= self.out_features:  # A Gamma_i on the inputs, B_i on the outputs
            h = _ScaledBasisProduct.apply(h, self.lam, a, self.gamma, False)
            z = F.linear(h * self.scale, b)
        else:  # the transpose: B_i^T on the inputs, (A Gamma_i)^T on the outputs
            h = torch.matmul(h, b) * self.scale
            z = _ScaledBasisProduct.apply(h, self.lam, a, self.gamma, True)
        return y + z.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight change (formed: for merging)."""
        a, b = self.bases()
        s = scaled_basis(self.lam, a, self.gamma)
        if self.in_features <= self.out_features:
            return self.scale * (b @ s)
        return self.scale * (s.T @ b.T)

    # ---- state -------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"merged": self.merged, "alpha": self.alpha, "seed": self.seed,
                "basis": self.basis, "basis_shape": list(self.basis_shape)}  # fmt: skip

    def set_extra_state(self, state: Any) -> None:
        # A merged adapter's state dict holds the merged base weight: loading it must not
        # add the change a second time.
        if not isinstance(state, dict):
            return
        self.merged = bool(state.get("merged", False))
        if state.get("alpha") is not None:
            self.alpha = float(state["alpha"])
            self.scale = self.alpha / self.rank
        seed = state.get("seed", self.seed)
        basis = state.get("basis", self.basis)
        shape = state.get("basis_shape", self.basis_shape)
        _check_options(self.rank, self.alpha, 0.0, seed, basis)
        self.seed, self.basis = int(seed), basis
        self.basis_shape = _check_shape(self.rank, shape, self.out_features, self.in_features)
        self._bases = self._a = self._b = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bases={self.n_bases}, scale={self.scale:g}, seed={self.seed}, "
            f"basis={self.basis}, merged={self.merged}"
        )


def _check_options(rank, alpha, dropout, seed, basis) -> tuple[int, float, float, int]:
    """The options that do not depend on a layer's shape, normalised."""
    rank = check.positive_int("rank", rank)
    alpha = float(20 * rank if alpha is None else check.real("alpha", alpha))
    dropout = check_dropout(dropout)
    seed = check.integer("seed", seed, 0)
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    return rank, alpha, dropout, seed


def _check_shape(rank, basis_shape, out_features, in_features) -> tuple[int, int]:
    """``basis_shape`` (default the layer's own) as a pair covering the layer."""
    low, high = min(in_features, out_features), max(in_features, out_features)
    if rank > low:
        raise ValueError(f"rank must be at most min(in_features, out_features) = {low}, "
                         f"got {rank}")  # fmt: skip
    if basis_shape is None:
        return high, low
    max_dim, min_dim = check.int_pair("basis_shape", basis_shape)
    if max_dim < high or min_dim < low or min_dim > max_dim:
        raise ValueError(f"basis_shape must be (D, d) with D >= {high}, d >= {low} and "
                         f"D >= d for a ({out_features}, {in_features}) layer, got "
                         f"{(max_dim, min_dim)}")  # fmt: skip
    return max_dim, min_dim


def peft_basis_shape(shapes) -> tuple[int, int]:
    """PEFT's shared basis shape for layers of ``(out, in)`` shapes: the largest ``out`` and
    the largest ``in``, as ``(max, min)`` of the two."""
    out_max = max(s[0] for s in shapes)
    in_max = max(s[1] for s in shapes)
    return max(out_max, in_max), min(out_max, in_max)


# ---- saving for PEFT ----------------------------------------------------------------------------


def peft_state(
    model: nn.Module, *, save_projection: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, adapter_config)`` of every :class:`RandLoRAAdapter` in ``model`` in PEFT's
    RandLoRA format: ``base_model.model.<name>.randlora_lambda`` / ``.randlora_gamma`` and,
    with ``save_projection`` (PEFT's default), the shared bases ``base_model.randlora_A`` /
    ``base_model.randlora_B`` (without, PEFT draws them again from the seed: the same values
    where it draws in bfloat16, i.e. on the CPU and GPUs with bfloat16).

    PEFT has one ``r``, alpha, seed, basis kind and dropout for all layers and sizes the
    bases from the adapted layers, so the adapters must agree and their ``basis_shape`` must
    be the one PEFT derives (what ``convert`` gives them)."""
    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, tuple] = {}
    shapes, first = [], None
    layers = peft_export.adapters(model, lambda m: isinstance(m, RandLoRAAdapter),
                                  "RandLoRAAdapter")  # fmt: skip
    for name, module in layers.items():
        dtype = module.base.weight.dtype
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.randlora_lambda"] = module.lam.detach().to(dtype)
        tensors[f"{prefix}.randlora_gamma"] = module.gamma.detach().to(dtype)
        dropout = float(getattr(module.dropout, "p", 0.0))
        settings[name] = (module.rank, module.alpha, module.seed, module.basis,
                          tuple(module.basis_shape), dropout)  # fmt: skip
        shapes.append((module.out_features, module.in_features))
        first = first or module
    if len(set(settings.values())) > 1:
        raise ValueError("PEFT's RandLoRA has one (rank, alpha, seed, basis, basis_shape, "
                         "dropout) for all layers; the adapters have "
                         f"{sorted(set(settings.values()))}")  # fmt: skip
    rank, alpha, seed, basis, basis_shape, dropout = next(iter(settings.values()))
    if basis_shape != peft_basis_shape(shapes):
        raise ValueError(f"the adapters' basis_shape {basis_shape} is not the one PEFT derives "
                         f"from the adapted layers, {peft_basis_shape(shapes)}; convert the "
                         "model with lowrank.nn.convert to share it")  # fmt: skip
    if save_projection:  # the shared bases, and under every layer as PEFT writes them
        a, b = random_bases(seed, rank, basis_shape, basis)
        dtype = first.base.weight.dtype
        for prefix in ["base_model", *(f"base_model.model.{name}" for name in settings)]:
            tensors[f"{prefix}.randlora_A"] = a.to(dtype, copy=True)
            tensors[f"{prefix}.randlora_B"] = b.to(dtype, copy=True)
    config = {
        "peft_type": "RANDLORA",
        "task_type": None,
        "r": rank,
        "randlora_alpha": alpha,
        "randlora_dropout": dropout,
        "projection_prng_key": seed,
        "save_projection": bool(save_projection),
        "sparse": basis == "sparse",
        "very_sparse": basis == "very_sparse",
        "target_modules": peft_export.target_regex(settings),
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "inference_mode": True,
    }
    return tensors, config


def save_peft(model: nn.Module, folder: str, *, save_projection: bool = True,
              base_model_name_or_path: str | None = None) -> None:  # fmt: skip
    """Writes the model's RandLoRA adapters where ``peft.PeftModel.from_pretrained(
    original_model, folder)`` loads them with the same outputs (see :func:`peft_state`)."""
    tensors, config = peft_state(model, save_projection=save_projection)
    peft_export.write_folder(folder, tensors, config,
                             base_model_name_or_path=base_model_name_or_path)  # fmt: skip


# ---- the conversion kind ------------------------------------------------------------------------


@dataclass
class RandLoRAConfig(KindConfig):
    """``convert(model, "randlora", ...)``: :class:`RandLoRAAdapter`'s arguments (its
    docstring), the same for every layer; the bases are shared, drawn for the largest
    adapted shape as PEFT does."""

    rank: int = 32
    alpha: float | None = None
    dropout: float = 0.0
    seed: int = 0
    basis: str = "dense"
    dtype: torch.dtype | None = None

    def __post_init__(self):
        check_options = _check_options(self.rank, self.alpha, self.dropout, self.seed, self.basis)
        self.rank, _, self.dropout, self.seed = check_options
        if self.alpha is not None:
            self.alpha = float(self.alpha)
        self.dtype = config_dtype(self.dtype)


def _plan(context: ConversionContext, config: RandLoRAConfig):
    shapes = context.shapes
    for name, (out_f, in_f) in shapes.items():  # every layer before the first is converted
        try:
            _check_shape(config.rank, None, out_f, in_f)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    basis_shape = peft_basis_shape(shapes.values()) if shapes else None
    options = {"dropout": config.dropout, "seed": config.seed, "basis": config.basis,
               "basis_shape": basis_shape, "dtype": config.dtype}  # fmt: skip
    if basis_shape is not None:  # a basis too sparse to use fails here, before any change
        random_bases(config.seed, config.rank, basis_shape, config.basis)

    def make(name, linear):
        layer = RandLoRAAdapter(linear, config.rank, config.alpha, **options)
        return layer, f"rank {layer.rank}, {layer.n_bases} bases"

    return make


def _describe(adapter: RandLoRAAdapter) -> dict:
    dropout = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
    return {"rank": adapter.rank, "alpha": adapter.alpha, "dropout": dropout,
            "seed": adapter.seed, "basis": adapter.basis,
            "basis_shape": list(adapter.basis_shape),
            "dtype": str(adapter.lam.dtype).removeprefix("torch.")}  # fmt: skip


def _rebuild(linear: nn.Linear, d: dict) -> RandLoRAAdapter:
    return RandLoRAAdapter(linear, d["rank"], d["alpha"], d["dropout"], seed=d["seed"],
                           basis=d["basis"], basis_shape=tuple(d["basis_shape"]),
                           dtype=getattr(torch, d["dtype"]))  # fmt: skip


register_kind("randlora", config=RandLoRAConfig, layers=RandLoRAAdapter, plan=_plan,
              describe=_describe, rebuild=_rebuild, adapter=True)  # fmt: skip
