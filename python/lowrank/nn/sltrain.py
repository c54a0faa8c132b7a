"""``SLTrainLinear``: a weight trained as ``scale * B A + S`` (SLTrain, Han et al. 2024).

``B`` (``out x r``) starts at zero and ``A`` (``r x in``) Kaiming-uniform, so the
layer starts as the sparse part alone; ``S`` has ``sparsity * out * in``
nonzeros on a support drawn once from ``seed`` and never changed, its values
uniform in ``+-1/sqrt(in)``; ``scale = alpha / r``. The support is stored as
int32 flat indices (4 bytes per nonzero) when ``out * in`` fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.linalg.error import relative_residual
from lowrank.nn._base import StructuredLinear
from lowrank.nn.registry import ConversionContext, KindConfig, register_kind
from lowrank.ops.sltrain import check_support, dense_sparse, sltrain_matmul


def random_support(out: int, inp: int, sparsity: float, seed: int | None, device=None):
    """Sorted unique flat indices of ``int(sparsity * out * in)`` random positions (the count
    the original SLTrain code uses, so its checkpoints fit a layer of the same sparsity)."""
    total = out * inp
    nnz = int(sparsity * total)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=generator)[:nnz]
    dtype = torch.int32 if total <= 2**31 - 1 else torch.int64
    return torch.sort(chosen).values.to(dtype=dtype, device=device)


@dataclass
class SLTrainConfig(KindConfig):
    """``convert(model, "sltrain", ...)``: the low-rank part's ``rank`` (or the one that,
    with the sparse part, keeps the call's ``params=`` fraction), the fraction ``sparsity``
    of weights in the sparse part, the scale's numerator ``alpha`` and the support's
    ``seed``. With calibration data the low-rank part fits the layer's outputs."""

    rank: int | None = None
    sparsity: float = 0.03
    alpha: float = 32.0
    seed: int = 0

    def __post_init__(self):
        if self.rank is not None:
            self.rank = check.positive_int("rank", self.rank)
        self.sparsity = check.real("sparsity", self.sparsity, 0.0, 1.0)
        self.alpha = check.real("alpha", self.alpha)


class SLTrainLinear(StructuredLinear):
    """``y = x @ (scale * B A + S).T + bias`` (see module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        sparsity: float = SLTrainConfig.sparsity,
        alpha: float = SLTrainConfig.alpha,
        bias: bool = True,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check.positive_int("in_features", in_features)
        check.positive_int("out_features", out_features)
        check.positive_int("rank", rank)
        if rank > min(in_features, out_features):
            raise ValueError(
                f"rank must be at most min(in, out) = {min(in_features, out_features)}"
            )
        sparsity = check.real("sparsity", sparsity, 0.0, 1.0)
        alpha = check.real("alpha", alpha)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha, self.scale = float(alpha), float(alpha) / rank
        kw = {"device": device, "dtype": dtype}
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        indices = random_support(out_features, in_features, sparsity, seed, device)
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(torch.empty(indices.numel(), **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.B)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.values, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, path: str = "auto") -> torch.Tensor:
        check.layer_input(x, self.in_features, self.A.dtype)
        return sltrain_matmul(
            x, self.B, self.A, self.values, self.indices, self.scale, self.bias, path
        )

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight."""
        sparse = dense_sparse(self.values, self.indices, self.out_features, self.in_features)
        return self.scale * self.B @ self.A + sparse

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor | nn.Linear,
        rank: int,
        sparsity: float = SLTrainConfig.sparsity,
        alpha: float = SLTrainConfig.alpha,
        seed: int | None = None,
        *,
        gram: torch.Tensor | None = None,
    ) -> SLTrainLinear:
        """``B A`` from a truncated SVD, ``values`` = the residual on the support.

        With ``gram`` (input statistics of calibration data, see
        :meth:`lowrank.nn.LowRankLinear.from_dense`) the low-rank part fits the layer's
        outputs on that data (whitened SVD); the sparse part always takes the residual
        ``W - s B A`` on its support. The relative error ``||W - W_sltrain||_F / ||W||_F`` is
        stored as ``projection_error``.
        """
        from lowrank.nn.lowrank import LowRankLinear

        bias = weight.bias if isinstance(weight, nn.Linear) else None
        w = weight.weight if isinstance(weight, nn.Linear) else weight
        check.weight("weight", w)
        out_f, in_f = w.shape
        layer = cls(in_f, out_f, rank, sparsity, alpha, bias is not None, seed,
                    device=w.device, dtype=w.dtype)  # fmt: skip
        with torch.no_grad():
            low = LowRankLinear.from_dense(w.detach(), rank, gram=gram, seed=0)
            layer.B.copy_(low.B / layer.scale)
            layer.A.copy_(low.A)
            residual = w - low.B @ low.A
            layer.values.copy_(residual.reshape(-1)[layer.indices.long()])
            if bias is not None:
                layer.bias.copy_(bias)
            layer.projection_error = relative_residual(w, layer.to_dense())
        return layer

    def memory_report(self) -> dict[str, int]:
        """Bytes of parameters, support indices and Adam state, against a dense Linear."""
        element = self.A.element_size()
        params = sum(p.numel() for p in self.parameters()) * element
        index_bytes = self.indices.numel() * self.indices.element_size()
        dense = self.out_features * self.in_features + (self.bias is not None) * self.out_features
        return {
            "parameters": params,
            "indices": index_bytes,
            "adam_state": 2 * params,
            "total": 3 * params + index_bytes,
            "dense_total": 3 * dense * element,
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"nnz={self.indices.numel()}, scale={self.scale:g}, bias={self.bias is not None}"
        )

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "alpha": self.alpha}

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        if isinstance(state, dict) and state.get("alpha") is not None:
            self.alpha = float(state["alpha"])  # the checkpoint's scale defines its function
            self.scale = self.alpha / self.rank

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint may carry another support: it is checked first. With as many
        nonzeros as this layer, the support and values are copied into the existing
        tensors, so an optimizer built on this layer keeps updating its ``values``; with
        another count the ``values`` parameter has to be replaced."""
        key = prefix + "indices"
        if key in state_dict:
            indices = state_dict[key]
            check_support(indices, self.out_features, self.in_features)
            if indices.numel() != self.indices.numel():
                self.values = nn.Parameter(self.values.new_empty(indices.numel()))
                self.indices = indices.to(self.indices.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---- the conversion kind ------------------------------------------------------------------------


def _plan(context: ConversionContext, config: SLTrainConfig):
    rank, params, sparsity = config.rank, context.params, config.sparsity
    if (rank is None) == (params is None):
        raise ValueError("sltrain needs exactly one of rank= and params=")
    if params is not None and params <= sparsity:
        raise ValueError(f"params={params:g} leaves nothing for the low-rank part: the sparse "
                         f"part alone keeps sparsity={sparsity:g} of the parameters")  # fmt: skip
    grams = context.grams
    context.report.allocation = "uniform"

    def make(name, linear):
        out, inp = linear.weight.shape
        r = rank if rank is not None else max(1, int((params - sparsity) * out * inp / (out + inp)))
        r = min(r, out, inp)
        layer = SLTrainLinear.from_dense(linear, r, sparsity, config.alpha, config.seed,
                                         gram=grams.get(name))  # fmt: skip
        return layer, f"rank {r}"

    return make


def _describe(layer: SLTrainLinear) -> dict:
    return {"rank": layer.rank, "nnz": layer.indices.numel(), "alpha": layer.alpha,
            "bias": layer.bias is not None}  # fmt: skip


def _rebuild(linear: nn.Linear, d: dict) -> SLTrainLinear:
    """The support and values come from the saved state; the support drawn here is only a
    placeholder with the saved count of nonzeros (``int(sparsity * out * in) = nnz``)."""
    out, inp = linear.out_features, linear.in_features
    sparsity = (d["nnz"] + 0.5) / (out * inp)
    return SLTrainLinear(inp, out, d["rank"], sparsity, d["alpha"], d["bias"], seed=0,
                         device=linear.weight.device, dtype=linear.weight.dtype)  # fmt: skip


register_kind("sltrain", config=SLTrainConfig, layers=SLTrainLinear, plan=_plan,
              describe=_describe, rebuild=_rebuild, calibration="optional")  # fmt: skip
