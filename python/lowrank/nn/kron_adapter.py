"""``KronAdapter``: a LoKr / KronA adapter that never forms the weight change.

Wrapping a frozen ``nn.Linear`` with weight ``W`` (``out x in``), the adapter
computes ``base(x) + scale * x @ kron(w1, w2).T`` where ``w1`` is
``(out_l, in_m)``, ``w2`` is ``(out_k, in_n)``, ``out = out_l * out_k`` and
``in = in_m * in_n`` (KronA, Edalati et al. 2022; LoKr in LyCORIS and PEFT).
Either factor may be low rank, ``w = w_a @ w_b``; then
``kron(w1_a w1_b, w2_a w2_b) = kron(w1_a, w2_a) kron(w1_b, w2_b)``, so the input
first meets the thin ``*_b`` factors and the product is finished by
:func:`lowrank.ops.kron_matmul_add`, which adds it onto the frozen layer's
output as it is produced. Nothing ``out x in`` is formed, forward or backward;
PEFT's LoKr builds ``kron(w1, w2)`` and its gradient every step.

Factor sizes, the low-rank rule and ``scale = alpha / rank`` follow PEFT's LoKr,
so identical weights give the identical function, and :meth:`KronAdapter.from_peft`
and :meth:`KronAdapter.peft_state_dict` convert both ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.nn._base import AdapterLinear
from lowrank.nn.registry import ConversionContext, KindConfig, register_kind
from lowrank.ops.kron import kron_matmul_add, kron_matmul_add_

_FACTOR_NAMES = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
INITS = ("peft", "lycoris", "random")


# The split searches divisors up to sqrt(dimension): about a million steps at this bound.
MAX_DIMENSION = 2**40


def lokr_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Splits ``dimension`` into ``(m, n)``, ``m * n == dimension``, by LoKr's rule.

    A positive ``factor`` that divides ``dimension`` gives ``(factor, dimension // factor)``.
    Otherwise divisors ``m`` are tried in increasing order, moving towards the
    near-square split while ``m + n`` does not grow and ``m <= factor`` (no bound for
    ``factor=-1``); the result is ordered ``m <= n``.
    """
    dimension = check.positive_int("dimension", dimension)
    factor = check.integer("factor", factor)
    if dimension > MAX_DIMENSION:
        raise ValueError(f"dimension must be at most {MAX_DIMENSION} (a layer's size), "
                         f"got {dimension}")  # fmt: skip
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    # Divisors above sqrt(dimension) only mirror those below it, so the search stops
    # there: O(sqrt(dimension)) steps even for a large prime.
    root = math.isqrt(dimension)
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while candidate <= root and dimension % candidate:
            candidate += 1
        if candidate > root:
            candidate = dimension // m if m > 1 else dimension  # the mirror of m
        if candidate + dimension // candidate > m + n or candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


class KronAdapter(AdapterLinear):
    """Kronecker adapter around a frozen ``nn.Linear``.

    Args:
        base: the layer to adapt; its parameters are frozen.
        factor: LoKr's ``decompose_factor`` (``-1``: near-square split).
        rank: rank of the low-rank factors and the denominator of the scale.
        alpha: numerator of the scale ``alpha / rank`` (default ``rank``, scale 1).
        decompose_both: also make ``w1`` low rank when ``rank < max(w1.shape) / 2``.
            ``w2`` is low rank whenever ``rank < max(w2.shape) / 2`` (PEFT's rule).
        dropout: dropout on the adapter's input.
        init: ``"peft"`` (``w1`` zero, so the adapter starts as the identity change),
            ``"lycoris"`` (``w2`` zero) or ``"random"`` (nothing zero).
        factors: explicit ``((out_l, in_m), (out_k, in_n))`` instead of ``factor``.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        factor: int = -1,
        rank: int = 8,
        alpha: float | None = None,
        decompose_both: bool = False,
        dropout: float = 0.0,
        init: str = "peft",
        factors: tuple[tuple[int, int], tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        check.positive_int("rank", rank)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        out_features, in_features = base.out_features, base.in_features
        if factors is None:
            out_l, out_k = lokr_factorization(out_features, factor)
            in_m, in_n = lokr_factorization(in_features, factor)
        else:
            (out_l, in_m), (out_k, in_n) = (check.int_pair(f"factors[{i}]", f)
                                            for i, f in enumerate(factors))  # fmt: skip
            if out_l * out_k != out_features or in_m * in_n != in_features:
                raise ValueError(
                    f"factors give a ({out_l * out_k}, {in_m * in_n}) weight change, the base "
                    f"layer is ({out_features}, {in_features})"
                )
        base.requires_grad_(False)
        self.base = base
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.merged = False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        low_rank_w1 = decompose_both and rank < max(out_l, in_m) / 2
        low_rank_w2 = rank < max(out_k, in_n) / 2
        for name in _FACTOR_NAMES:
            self.register_parameter(name, None)
        if low_rank_w1:
            self.w1_a = nn.Parameter(torch.empty(out_l, rank, **kw))
            self.w1_b = nn.Parameter(torch.empty(rank, in_m, **kw))
        else:
            self.w1 = nn.Parameter(torch.empty(out_l, in_m, **kw))
        if low_rank_w2:
            self.w2_a = nn.Parameter(torch.empty(out_k, rank, **kw))
            self.w2_b = nn.Parameter(torch.empty(rank, in_n, **kw))
        else:
            self.w2 = nn.Parameter(torch.empty(out_k, in_n, **kw))
        self.kron_shape = ((out_l, in_m), (out_k, in_n))
        self.reset_parameters(init)

    # ---- parameters ----------------------------------------------------------------------

    def reset_parameters(self, init: str = "peft") -> None:
        """PEFT's initialisations: Kaiming-uniform (a=sqrt(5)), with one side zero."""
        for name in _FACTOR_NAMES:
            param = getattr(self, name)
            if param is not None:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        with torch.no_grad():
            if init == "peft":
                (self.w1 if self.w1 is not None else self.w1_a).zero_()
            elif init == "lycoris":
                (self.w2 if self.w2 is not None else self.w2_b).zero_()

    def _outer_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors kron_matmul applies last: w1 or w1_a, and w2 or w2_a."""
        w1 = self.w1 if self.w1 is not None else self.w1_a
        w2 = self.w2 if self.w2 is not None else self.w2_a
        return w1, w2

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ kron(w1_b, w2_b).T`` with a full factor standing for the identity."""
        if self.w1 is not None and self.w2 is not None:
            return x
        (_, in_m), (_, in_n) = self.kron_shape
        rows = x.reshape(*x.shape[:-1], in_m, in_n)
        if self.w2 is None:
            rows = rows @ self.w2_b.T
        if self.w1 is None:
            rows = self.w1_b @ rows
        return rows.reshape(*x.shape[:-1], -1)

    def delta_weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight change ``scale * kron(w1, w2)`` (formed: for merging)."""
        w1 = self.w1 if self.w1 is not None else self.w1_a @ self.w1_b
        w2 = self.w2 if self.w2 is not None else self.w2_a @ self.w2_b
        return torch.kron(w1, w2) * self.scale

    # ---- forward -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check.layer_input(x, self.base.in_features, self.base.weight.dtype)
        y = self.base(x)
        if self.merged:
            return y
        w1, w2 = self._outer_factors()
        inner = self._inner(self.dropout(x))
        needs_grad = torch.is_grad_enabled() and (
            y.requires_grad or inner.requires_grad or w1.requires_grad or w2.requires_grad
        )
        if needs_grad or torch.compiler.is_compiling():
            return kron_matmul_add(y, inner, w1, w2, self.scale)
        return kron_matmul_add_(y, inner, w1, w2, self.scale)  # inference: in place

    def get_extra_state(self) -> dict:
        return {"merged": self.merged}

    def set_extra_state(self, state) -> None:
        # A merged adapter's state dict holds the merged base weight: loading it must not
        # add the change a second time.
        if isinstance(state, dict):
            self.merged = bool(state.get("merged", False))

    # ---- PEFT interoperability ---------------------------------------------------------------

    @classmethod
    def from_peft(cls, lokr_layer: nn.Module, adapter_name: str = "default") -> KronAdapter:
        """A ``KronAdapter`` computing the same function as a PEFT LoKr ``Linear`` layer.

        Shares the base layer; the factor weights are copied.
        """
        base = getattr(lokr_layer, "base_layer", None)
        if not isinstance(base, nn.Linear) or not hasattr(lokr_layer, "lokr_w1"):
            raise TypeError("lokr_layer must be a PEFT LoKr layer wrapping an nn.Linear")
        if getattr(lokr_layer, "merged", False):
            raise ValueError("unmerge the PEFT layer before converting it")
        params = {
            name: getattr(lokr_layer, f"lokr_{name}")[adapter_name]
            for name in _FACTOR_NAMES
            if adapter_name in getattr(lokr_layer, f"lokr_{name}")
        }
        if not params:
            raise ValueError(f"the PEFT layer has no adapter named {adapter_name!r}")
        w1_shape = _full_shape(params, "w1")
        w2_shape = _full_shape(params, "w2")
        rank = int(lokr_layer.r[adapter_name])
        adapter = cls(
            base, rank=rank, alpha=float(lokr_layer.alpha[adapter_name]),
            decompose_both="w1_a" in params, factors=(w1_shape, w2_shape),
        )  # fmt: skip
        adapter.load_peft_state_dict(
            {f"lokr_{k}.{adapter_name}": v for k, v in params.items()}, adapter_name
        )
        return adapter

    def peft_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The adapter's factors under PEFT LoKr's names (``lokr_w1.<adapter>`` and so on)."""
        return {
            f"lokr_{name}.{adapter_name}": getattr(self, name).detach()
            for name in _FACTOR_NAMES
            if getattr(self, name) is not None
        }

    @torch.no_grad()
    def load_peft_state_dict(
        self, state: dict[str, torch.Tensor], adapter_name: str = "default"
    ) -> None:
        """Loads factors saved under PEFT LoKr's names; shapes and names must match exactly."""
        expected = {
            f"lokr_{n}.{adapter_name}": n for n in _FACTOR_NAMES if getattr(self, n) is not None
        }
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(k for k in state if k.startswith("lokr_") and k not in expected)
        if missing or unexpected:
            raise KeyError(f"PEFT LoKr state: missing {missing}, unexpected {unexpected}")
        for key, name in expected.items():
            param = getattr(self, name)
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"{key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}"
                )
        for key, name in expected.items():
            getattr(self, name).copy_(state[key])

    def extra_repr(self) -> str:
        (out_l, in_m), (out_k, in_n) = self.kron_shape
        kinds = ", ".join(n for n in _FACTOR_NAMES if getattr(self, n) is not None)
        return (
            f"w1=({out_l}, {in_m}), w2=({out_k}, {in_n}), rank={self.rank}, "
            f"scale={self.scale:g}, params=[{kinds}], merged={self.merged}"
        )


def _full_shape(params: dict[str, torch.Tensor], name: str) -> tuple[int, int]:
    if name in params:
        return tuple(params[name].shape)
    return params[f"{name}_a"].shape[0], params[f"{name}_b"].shape[1]


# ---- the conversion kind ------------------------------------------------------------------------


@dataclass
class KronAdapterConfig(KindConfig):
    """``convert(model, "kron_adapter", ...)``: :class:`KronAdapter`'s arguments (its
    docstring), the same for every layer."""

    factor: int = -1
    rank: int = 8
    alpha: float | None = None
    decompose_both: bool = False
    dropout: float = 0.0
    init: str = "peft"
    factors: tuple[tuple[int, int], tuple[int, int]] | None = None

    def __post_init__(self):
        self.rank = check.positive_int("rank", self.rank)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")


def _plan(context: ConversionContext, config: KronAdapterConfig):
    options = {f: getattr(config, f) for f in config.__dataclass_fields__}
    return lambda name, linear: (KronAdapter(linear, **options), "")


def _describe(adapter: KronAdapter) -> dict:
    dropout = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
    return {"rank": adapter.rank, "alpha": adapter.alpha, "dropout": dropout,
            "factors": [list(f) for f in adapter.kron_shape],
            "decompose_both": adapter.w1 is None}  # fmt: skip


def _rebuild(linear: nn.Linear, d: dict) -> KronAdapter:
    factors = tuple(tuple(f) for f in d["factors"])
    return KronAdapter(linear, rank=d["rank"], alpha=d["alpha"], dropout=d["dropout"],
                       decompose_both=d["decompose_both"], factors=factors)  # fmt: skip


register_kind("kron_adapter", config=KronAdapterConfig, layers=KronAdapter, plan=_plan,
              describe=_describe, rebuild=_rebuild, adapter=True)  # fmt: skip
