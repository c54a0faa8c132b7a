"""``MonarchLinear``: a linear layer whose weight is a Monarch matrix.

Layout, padding and initialisation follow the original Monarch code (Dao et al.
2022): with ``b_in = ceil(in / nblocks)`` and ``b_out = ceil(out / nblocks)``,
``w1`` is ``(nblocks, q, b_in)`` and ``w2`` is ``(nblocks, b_out, q)`` with
``q = min(b_in, b_out)`` rounded as the original does; inputs are zero-padded to
``nblocks * b_in`` and outputs cut to ``out_features``. Each factor starts
uniform in ``+-1/sqrt(fan_in)`` (PyTorch's Linear rule per block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowrank import _validate as check
from lowrank.linalg.monarch import monarch_project
from lowrank.nn._base import StructuredLinear
from lowrank.nn.registry import ConversionContext, KindConfig, register_kind
from lowrank.ops.monarch import monarch_matmul


@dataclass
class MonarchConfig(KindConfig):
    """``convert(model, "monarch", ...)``: ``nblocks`` blocks per factor (at most the
    layer's smaller size), and the rank of the projection's blocks: ``rank``, or the one
    whose factors hold the call's ``params=`` fraction, or by default the rank of
    ``MonarchLinear``'s own square blocks. With calibration data the fit weighs each input
    feature by its root mean square on that data."""

    nblocks: int = 4
    rank: int | None = None

    def __post_init__(self):
        self.nblocks = check.positive_int("nblocks", self.nblocks)
        if self.rank is not None:
            self.rank = check.positive_int("rank", self.rank)


class MonarchLinear(StructuredLinear):
    """``y = M x + bias`` with ``M = P_out blockdiag(w2) P blockdiag(w1)`` (see ops.monarch)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = MonarchConfig.nblocks,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        factor_shapes: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
    ) -> None:
        super().__init__()
        check.positive_int("in_features", in_features)
        check.positive_int("out_features", out_features)
        check.positive_int("nblocks", nblocks)
        if nblocks > min(in_features, out_features):
            raise ValueError(
                f"nblocks = {nblocks} exceeds min(in_features, out_features) = "
                f"{min(in_features, out_features)}: blocks would be pure padding"
            )
        if factor_shapes is None:
            b_in, b_out = math.ceil(in_features / nblocks), math.ceil(out_features / nblocks)
            if b_in * nblocks < b_out * nblocks:
                factor_shapes = ((nblocks, b_in, b_in), (nblocks, b_out, b_in))
            else:
                factor_shapes = ((nblocks, b_out, b_in), (nblocks, b_out, b_out))
        (k, q, p), (l, s, r) = factor_shapes
        if l * r != k * q or k * p < in_features or l * s < out_features:
            raise ValueError(f"factor shapes {factor_shapes} do not make an {out_features}x"
                             f"{in_features} Monarch matrix")  # fmt: skip
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(k, q, p, **kw))
        self.w2 = nn.Parameter(torch.empty(l, s, r, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    @property
    def padded_in(self) -> int:
        return self.w1.shape[0] * self.w1.shape[2]

    @property
    def padded_out(self) -> int:
        return self.w2.shape[0] * self.w2.shape[1]

    def reset_parameters(self) -> None:
        for w in (self.w1, self.w2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check.layer_input(x, self.in_features, self.w1.dtype)
        if self.in_features < self.padded_in:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        y = monarch_matmul(x, self.w1, self.w2)
        if self.padded_out > self.out_features:
            y = y[..., : self.out_features]
        # (under autocast y is in the autocast dtype; the bias follows it, as in F.linear)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight."""
        eye = torch.eye(self.padded_in, dtype=self.w1.dtype, device=self.w1.device)
        return monarch_matmul(eye, self.w1, self.w2).T[: self.out_features, : self.in_features]

    @classmethod
    def from_dense(
        cls,
        linear_or_weight: nn.Linear | torch.Tensor,
        nblocks: int,
        rank: int = 1,
        *,
        input_scale: torch.Tensor | None = None,
    ) -> MonarchLinear:
        """The closest ``MonarchLinear`` (Frobenius norm) to a Linear or ``(out, in)`` weight.

        The weight is zero-padded to multiples of ``nblocks``, projected by
        :func:`lowrank.linalg.monarch_project` and the relative error stored as
        ``projection_error``; a Linear's bias is copied.

        ``input_scale`` (``(in,)``, positive: e.g. the root mean square of each input feature
        on calibration data) weighs the fit by the inputs, minimising
        ``||(W - M) diag(input_scale)||_F``: a diagonal weighting keeps the problem a
        Monarch projection (of ``W diag(d)``; the first factor's columns are then divided
        by ``d``), where a full input covariance would couple the blocks.
        """
        if isinstance(linear_or_weight, nn.Linear):
            weight, bias = linear_or_weight.weight, linear_or_weight.bias
        elif isinstance(linear_or_weight, torch.Tensor):
            weight, bias = linear_or_weight, None
        else:
            raise TypeError("linear_or_weight must be an nn.Linear or an (out, in) tensor")
        check.weight("weight", weight)
        nblocks = check.positive_int("nblocks", nblocks)
        out_f, in_f = weight.shape
        if nblocks > min(out_f, in_f):
            raise ValueError(f"nblocks = {nblocks} exceeds min(out, in) = {min(out_f, in_f)} of "
                             "the weight: blocks would be pure padding")  # fmt: skip
        b_in, b_out = math.ceil(in_f / nblocks), math.ceil(out_f / nblocks)
        scale = None
        if input_scale is not None:
            scale = check.floating("input_scale", input_scale).detach().to(weight.device)
            if scale.shape != (in_f,) or not bool((scale > 0).all()):
                raise ValueError(f"input_scale must be ({in_f},) and positive, got shape "
                                 f"{tuple(scale.shape)}")  # fmt: skip
            scale = F.pad(scale.to(weight.dtype), (0, b_in * nblocks - in_f), value=1.0)
        padded = F.pad(weight.detach(), (0, b_in * nblocks - in_f, 0, b_out * nblocks - out_f))
        fit = monarch_project(padded if scale is None else padded * scale, nblocks, rank)
        shapes = (tuple(fit.w1.shape), tuple(fit.w2.shape))
        layer = cls(in_f, out_f, nblocks, bias is not None, device=weight.device,
                    dtype=weight.dtype, factor_shapes=shapes)  # fmt: skip
        with torch.no_grad():
            w1 = fit.w1 if scale is None else fit.w1 / scale.reshape(nblocks, 1, b_in)
            layer.w1.copy_(w1)
            layer.w2.copy_(fit.w2)
            if bias is not None:
                layer.bias.copy_(bias)
        layer.projection_error = fit.relative_error
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"w1={tuple(self.w1.shape)}, w2={tuple(self.w2.shape)}, bias={self.bias is not None}"
        )


# ---- the conversion kind ------------------------------------------------------------------------


def _plan(context: ConversionContext, config: MonarchConfig):
    if config.rank is not None and context.params is not None:
        raise ValueError("convert to monarch takes rank= or params=, not both")
    scales = {n: (g.diagonal() / max(1.0, float(g.diagonal().mean()))).sqrt().clamp_min(1e-6)
              for n, g in context.grams.items()}  # fmt: skip
    context.report.allocation = "uniform"

    def make(name, linear):
        out, inp = linear.weight.shape
        k = max(1, min(config.nblocks, out, inp))
        if config.rank is not None:
            r = config.rank
        elif context.params is not None:
            r = _budget_rank(context.params, k, out, inp)
        else:
            r = _default_rank(k, out, inp)
        scale = scales.get(name)
        scale = None if scale is None else scale.to(linear.weight.dtype)
        layer = MonarchLinear.from_dense(linear, k, r, input_scale=scale)
        return layer, f"nblocks {k}, rank {r}"

    return make


def _default_rank(k: int, out: int, inp: int) -> int:
    """The rank of MonarchLinear's own square blocks for this size."""
    return max(1, min(math.ceil(inp / k), math.ceil(out / k)) // k)


def _budget_rank(params: float, k: int, out: int, inp: int) -> int:
    """The rank whose Monarch factors hold ``params`` of the layer's parameters:
    ``k*l*r*(p + s)`` with ``l = k`` blocks of ``p = in/k`` inputs and ``s = out/k`` outputs."""
    p, s = math.ceil(inp / k), math.ceil(out / k)
    return max(1, min(int(params * out * inp / (k * k * (p + s))), p, s))


def _describe(layer: MonarchLinear) -> dict:
    return {"w1": list(layer.w1.shape), "w2": list(layer.w2.shape), "nblocks": layer.w1.shape[0],
            "bias": layer.bias is not None}  # fmt: skip


def _rebuild(linear: nn.Linear, d: dict) -> MonarchLinear:
    return MonarchLinear(linear.in_features, linear.out_features, d["nblocks"], d["bias"],
                         device=linear.weight.device, dtype=linear.weight.dtype,
                         factor_shapes=(tuple(d["w1"]), tuple(d["w2"])))  # fmt: skip


register_kind("monarch", config=MonarchConfig, layers=MonarchLinear, plan=_plan,
              describe=_describe, rebuild=_rebuild, calibration="optional")  # fmt: skip
