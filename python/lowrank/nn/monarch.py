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

import torch
import torch.nn.functional as F
from torch import nn

from lowrank import _validate as check
from lowrank.linalg.monarch import monarch_project
from lowrank.nn._base import StructuredLinear
from lowrank.ops.monarch import monarch_matmul


class MonarchLinear(StructuredLinear):
    """``y = M x + bias`` with ``M = P_out blockdiag(w2) P blockdiag(w1)`` (see ops.monarch)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
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
