"""``KronLinear``: a linear layer whose weight is a sum of Kronecker products.

A weight of shape ``(out, in) = (p*r, q*s)`` stored as ``a`` ``(p, q)`` and
``b`` ``(r, s)`` holds ``p*q + r*s`` parameters instead of ``p*q*r*s`` and is
applied by :func:`lowrank.ops.kron_matmul` without forming it. With
``terms=n`` the weight is ``sum_k kron(a[k], b[k])``, the parameterised
hypercomplex (PHM) layer of Compacter (Mahabadi et al. 2021), applied by
:func:`lowrank.ops.kron_sum_matmul` (per term, in two GEMMs for all terms, or through
the dense weight, whichever measures fastest for the shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.linalg.kronecker import nearest_kronecker
from lowrank.nn._base import StructuredLinear
from lowrank.nn.registry import ConversionContext, KindConfig, register_kind
from lowrank.ops.kron import kron_matmul, kron_sum_dense, kron_sum_matmul


def near_square_factors(n: int) -> tuple[int, int]:
    """``(f, n // f)`` with ``f`` the largest divisor of ``n`` not above ``sqrt(n)``.

    A prime ``n`` gives ``(1, n)``: the layer degenerates to one dense factor.
    """
    check.positive_int("n", n)
    f = math.isqrt(n)
    while n % f:
        f -= 1
    return f, n // f


def _factor_shapes(in_features, out_features, factors):
    if factors is None:
        p, r = near_square_factors(out_features)
        q, s = near_square_factors(in_features)
        return (p, q), (r, s)
    if not isinstance(factors, (tuple, list)) or len(factors) != 2:
        raise ValueError(f"factors must be ((p, q), (r, s)), got {factors!r}")
    p, q = check.int_pair("factors[0]", factors[0])
    r, s = check.int_pair("factors[1]", factors[1])
    if p * r != out_features or q * s != in_features:
        raise ValueError(
            f"factors ({p}, {q}) x ({r}, {s}) give a ({p * r}, {q * s}) weight, "
            f"expected (out_features, in_features) = ({out_features}, {in_features})"
        )
    return (p, q), (r, s)


class KronLinear(StructuredLinear):
    """``y = x @ W.T + bias`` with ``W = kron(a, b)`` (or ``sum_k kron(a[k], b[k])``).

    Args:
        in_features: ``q * s``.
        out_features: ``p * r``.
        factors: ``((p, q), (r, s))``; by default the near-square split of both
            sizes (``p <= r``, ``q <= s``).
        bias: learn an additive bias.
        terms: number of Kronecker products summed. With one term ``a`` is ``(p, q)``
            and ``b`` is ``(r, s)``; with more they are ``(terms, p, q)`` and ``(terms, r, s)``.

    Initialisation gives ``W`` the variance of ``nn.Linear``'s weight,
    ``1 / (3 * in_features)``, split evenly between the factors and the terms.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        factors: tuple[tuple[int, int], tuple[int, int]] | None = None,
        bias: bool = True,
        terms: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check.positive_int("in_features", in_features)
        check.positive_int("out_features", out_features)
        check.positive_int("terms", terms)
        (p, q), (r, s) = _factor_shapes(in_features, out_features, factors)
        self.in_features, self.out_features, self.terms = in_features, out_features, terms
        lead = () if terms == 1 else (terms,)
        kw = {"device": device, "dtype": dtype}
        self.a = nn.Parameter(torch.empty(*lead, p, q, **kw))
        self.b = nn.Parameter(torch.empty(*lead, r, s, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    @property
    def factors(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return tuple(self.a.shape[-2:]), tuple(self.b.shape[-2:])

    def reset_parameters(self) -> None:
        # Var(sum_k kron(a_k, b_k)) = terms * Var(a) Var(b) = 1 / (3 q s), each factor's
        # variance proportional to 1 / its fan-in. U(-h, h) has variance h^2 / 3.
        q, s = self.a.shape[-1], self.b.shape[-1]
        spread = (3.0 * self.terms) ** 0.25
        nn.init.uniform_(self.a, -((3.0 / q) ** 0.5) / spread, (3.0 / q) ** 0.5 / spread)
        nn.init.uniform_(self.b, -((3.0 / s) ** 0.5) / spread, (3.0 / s) ** 0.5 / spread)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check.layer_input(x, self.in_features, self.a.dtype)
        if self.terms == 1:
            y = kron_matmul(x, self.a, self.b)
        else:
            y = kron_sum_matmul(x, self.a, self.b)
        return y if self.bias is None else y.add_(self.bias)

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight."""
        if self.terms == 1:
            return torch.kron(self.a, self.b)
        return kron_sum_dense(self.a, self.b)

    @classmethod
    def from_dense(
        cls,
        linear_or_weight: nn.Linear | torch.Tensor,
        factors: tuple[tuple[int, int], tuple[int, int]] | None = None,
        terms: int = 1,
    ) -> KronLinear:
        """The ``KronLinear`` closest to a dense layer or ``(out, in)`` weight in Frobenius norm.

        Uses :func:`lowrank.linalg.nearest_kronecker`; a Linear's bias is copied. The
        relative error ``||W - W_kron||_F / ||W||_F`` is stored as ``projection_error``.
        """
        if isinstance(linear_or_weight, nn.Linear):
            weight, bias = linear_or_weight.weight, linear_or_weight.bias
        elif isinstance(linear_or_weight, torch.Tensor):
            weight, bias = linear_or_weight, None
        else:
            raise TypeError(
                "linear_or_weight must be an nn.Linear or an (out, in) tensor, "
                f"got {type(linear_or_weight).__name__}"
            )
        check.weight("weight", weight)
        out_features, in_features = weight.shape
        a_shape, b_shape = _factor_shapes(in_features, out_features, factors)
        with torch.no_grad():
            fit = nearest_kronecker(weight.detach(), a_shape, b_shape, terms)
            layer = cls(in_features, out_features, (a_shape, b_shape), bias is not None, terms,
                        device=weight.device, dtype=weight.dtype)  # fmt: skip
            layer.a.copy_(fit.a[0] if terms == 1 else fit.a)
            layer.b.copy_(fit.b[0] if terms == 1 else fit.b)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.projection_error = fit.relative_error
        return layer

    def extra_repr(self) -> str:
        (p, q), (r, s) = self.factors
        terms = f", terms={self.terms}" if self.terms > 1 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"factors=(({p}, {q}), ({r}, {s})){terms}, bias={self.bias is not None}"
        )


# ---- the conversion kind ------------------------------------------------------------------------


@dataclass
class KronConfig(KindConfig):
    """``convert(model, "kron", ...)``: the factor shapes ``((p, q), (r, s))`` (default: the
    near-square split of each layer's sizes) and the number of Kronecker ``terms``
    (default 1, or the most that keep the call's ``params=`` fraction)."""

    factors: tuple[tuple[int, int], tuple[int, int]] | None = None
    terms: int | None = None

    def __post_init__(self):
        if self.terms is not None:
            self.terms = check.positive_int("terms", self.terms)
        if self.factors is not None:
            self.factors = tuple(check.int_pair(f"factors[{i}]", f)
                                 for i, f in enumerate(self.factors))  # fmt: skip


def _plan(context: ConversionContext, config: KronConfig):
    if config.terms is not None and context.params is not None:
        raise ValueError("convert to kron takes terms= or params=, not both")
    params = context.params
    context.report.allocation = "uniform"

    def make(name, linear):
        out, inp = linear.weight.shape
        t = config.terms
        if t is None:
            (p, r), (q, s) = near_square_factors(out), near_square_factors(inp)
            t = 1 if params is None else max(1, min(int(params * out * inp / (p * q + r * s)),
                                                    p * q, r * s))  # fmt: skip
        layer = KronLinear.from_dense(linear, config.factors, t)
        return layer, f"terms {t}"

    return make


def _describe(layer: KronLinear) -> dict:
    return {"factors": [list(f) for f in layer.factors], "terms": layer.terms,
            "bias": layer.bias is not None}  # fmt: skip


def _rebuild(linear: nn.Linear, d: dict) -> KronLinear:
    factors = tuple(tuple(f) for f in d["factors"])
    return KronLinear(linear.in_features, linear.out_features, factors, d["bias"], d["terms"],
                      device=linear.weight.device, dtype=linear.weight.dtype)  # fmt: skip


register_kind("kron", config=KronConfig, layers=KronLinear, plan=_plan, describe=_describe,
              rebuild=_rebuild)  # fmt: skip
