"""``KronLinear``: a linear layer whose weight is ``kron(a, b)``.

A weight of shape ``(out, in) = (p*r, q*s)`` stored as ``a`` ``(p, q)`` and
``b`` ``(r, s)`` holds ``p*q + r*s`` parameters instead of ``p*q*r*s`` and is
applied by :func:`lowrank.ops.kron_matmul` without forming it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.ops.kron import kron_matmul


def near_square_factors(n: int) -> tuple[int, int]:
    """``(f, n // f)`` with ``f`` the largest divisor of ``n`` not above ``sqrt(n)``.

    A prime ``n`` gives ``(1, n)``: the layer degenerates to one dense factor.
    """
    check.positive_int("n", n)
    f = math.isqrt(n)
    while n % f:
        f -= 1
    return f, n // f


class KronLinear(nn.Module):
    """``y = x @ kron(a, b).T + bias`` with ``a`` ``(p, q)`` and ``b`` ``(r, s)``.

    Args:
        in_features: ``q * s``.
        out_features: ``p * r``.
        factors: ``((p, q), (r, s))``; by default the near-square split of both
            sizes (``p <= r``, ``q <= s``).
        bias: learn an additive bias.

    Initialisation keeps the variance of the full product equal to that of
    ``nn.Linear``'s weight, ``1 / (3 * in_features)``, split evenly between the factors.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        factors: tuple[tuple[int, int], tuple[int, int]] | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check.positive_int("in_features", in_features)
        check.positive_int("out_features", out_features)
        if factors is None:
            p, r = near_square_factors(out_features)
            q, s = near_square_factors(in_features)
        else:
            if not isinstance(factors, (tuple, list)) or len(factors) != 2:
                raise ValueError(f"factors must be ((p, q), (r, s)), got {factors!r}")
            p, q = check.int_pair("factors[0]", factors[0])
            r, s = check.int_pair("factors[1]", factors[1])
            if p * r != out_features or q * s != in_features:
                raise ValueError(
                    f"factors ({p}, {q}) x ({r}, {s}) give a ({p * r}, {q * s}) weight, "
                    f"expected (out_features, in_features) = ({out_features}, {in_features})"
                )
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.a = nn.Parameter(torch.empty(p, q, **kw))
        self.b = nn.Parameter(torch.empty(r, s, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    @property
    def factors(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return tuple(self.a.shape), tuple(self.b.shape)

    def reset_parameters(self) -> None:
        # Var(kron(a, b)) = Var(a) Var(b) = 1 / (3 q s), each factor's variance
        # proportional to 1 / its fan-in. U(-h, h) has variance h^2 / 3.
        q, s = self.a.shape[1], self.b.shape[1]
        nn.init.uniform_(self.a, -((3.0 / q) ** 0.5) / 3.0**0.25, (3.0 / q) ** 0.5 / 3.0**0.25)
        nn.init.uniform_(self.b, -((3.0 / s) ** 0.5) / 3.0**0.25, (3.0 / s) ** 0.5 / 3.0**0.25)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kron_matmul(x, self.a, self.b)
        return y if self.bias is None else y.add_(self.bias)

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight ``kron(a, b)``."""
        return torch.kron(self.a, self.b)

    def extra_repr(self) -> str:
        (p, q), (r, s) = self.factors
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"factors=(({p}, {q}), ({r}, {s})), bias={self.bias is not None}"
        )
