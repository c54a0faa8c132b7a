"""``LowRankLinear``: a linear layer whose weight is a product of two thin factors.

``y = x A^T B^T + bias`` with ``B`` (``out x rank``) and ``A`` (``rank x in``):
``rank * (in + out)`` parameters instead of ``in * out``, and ``rank * (in + out)``
multiply-adds per token. The product ``B A`` is never formed, forward or backward.

From a dense layer (:meth:`LowRankLinear.from_dense`): the truncated SVD
``W ~ U S V^T`` (exact up to ``min(out, in) = 1024``, above that by
:func:`lowrank.linalg.rsvd` with four power iterations), balanced between the factors
(``B = U sqrt(S)``, ``A = sqrt(S) V^T``), which minimises ``||W - B A||_F``. Given the
input statistics ``G = sum_t x_t x_t^T`` of calibration data, the factors minimise the
error of the layer's *outputs* on that data instead, ``||(W - B A) X||_F``: the SVD of
the whitened weight ``W L`` (``G = L L^T``, Cholesky) truncated and mapped back,
``B A = [W L]_k L^{-1}`` (the truncation-aware whitening of SVD-LLM, Wang et al. 2024),
which is optimal for that objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowrank import _validate as check
from lowrank.linalg.error import relative_residual

# The whitening and truncated SVD of from_dense, importable here as before.
from lowrank.linalg.whitening import EXACT_SVD_MAX, Whitener, cholesky_damped  # noqa: F401
from lowrank.linalg.whitening import truncated_svd as _truncated_svd
from lowrank.linalg.whitening import whitener as _whitener
from lowrank.nn._base import StructuredLinear
from lowrank.nn.registry import ConversionContext, KindConfig, register_kind


class LowRankLinear(StructuredLinear):
    """``y = x @ (B @ A).T + bias`` with ``B`` ``(out_features, rank)``, ``A`` ``(rank, in)``.

    Initialisation matches ``nn.Linear``'s output variance: ``A`` uniform with variance
    ``1 / in_features`` (so ``x A^T`` keeps the input's scale) and ``B`` uniform with
    variance ``1 / (3 rank)``, giving ``B A`` the variance ``1 / (3 in_features)`` of
    ``nn.Linear``'s weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check.positive_int("in_features", in_features)
        self.out_features = check.positive_int("out_features", out_features)
        self.rank = check.positive_int("rank", rank)
        if rank > min(in_features, out_features):
            raise ValueError(f"rank must be at most min(in_features, out_features) = "
                             f"{min(in_features, out_features)}, got {rank}")  # fmt: skip
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        a = math.sqrt(3.0 / self.in_features)
        b = math.sqrt(1.0 / self.rank)
        nn.init.uniform_(self.A, -a, a)
        nn.init.uniform_(self.B, -b, b)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check.layer_input(x, self.in_features, self.A.dtype)
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight ``B A``."""
        return self.B @ self.A

    @classmethod
    def from_dense(
        cls,
        linear_or_weight: nn.Linear | torch.Tensor,
        rank: int | None = None,
        *,
        tol: float | None = None,
        gram: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> LowRankLinear:
        """The rank-``rank`` (or the smallest rank within ``tol``) layer closest to a dense one.

        Args:
            linear_or_weight: an ``nn.Linear`` (its bias is copied) or an ``(out, in)`` weight.
            rank: the rank; or
            tol: the smallest rank whose relative error ``||W - B A||_F / ||W||_F`` (or, with
                ``gram``, the relative error of the outputs on the calibration data) is at
                most ``tol``.
            gram: ``(in, in)`` input statistics ``sum_t x_t x_t^T`` of calibration data: fit
                the outputs on that data instead of the weight (module docstring).
            seed: for the randomized SVD (default 0, so conversions are reproducible).

        The relative error achieved is stored as ``projection_error`` (of the outputs on the
        calibration data when ``gram`` is given).
        """
        weight, bias = _dense(linear_or_weight)
        if (rank is None) == (tol is None):
            raise ValueError("give exactly one of rank and tol")
        if rank is not None:
            rank = check.positive_int("rank", rank)
            if rank > min(weight.shape):
                raise ValueError(f"rank must be at most min(out, in) = {min(weight.shape)}, "
                                 f"got {rank}")  # fmt: skip
        else:
            tol = check.real("tol", tol, 0.0, 1.0)
        seed = 0 if seed is None else seed
        with torch.no_grad():
            work = weight.detach().double() if weight.dtype != torch.float64 else weight.detach()
            whitener = None
            if gram is not None:
                whitener = _whitener(gram, weight.shape[1], weight.device)
                target = work @ whitener.factor
            else:
                target = work
            u, s, vh = _truncated_svd(target, rank, tol, seed)
            root = s.sqrt()
            b = u * root
            a = root[:, None] * vh
            if whitener is not None:
                a = whitener.unwhiten(a)  # (sqrt(S) V^T) L^{-1}
            layer = cls(weight.shape[1], weight.shape[0], s.shape[0], bias is not None,
                        device=weight.device, dtype=weight.dtype)  # fmt: skip
            layer.A.copy_(a)
            layer.B.copy_(b)
            if bias is not None:
                layer.bias.copy_(bias)
            approx = b @ a
            if whitener is None:
                layer.projection_error = relative_residual(work, approx)
            else:
                layer.projection_error = relative_residual(target, approx @ whitener.factor)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )


# ---- the conversion kind ------------------------------------------------------------------------


@dataclass
class LowRankConfig(KindConfig):
    """``convert(model, "lowrank", ...)``: exactly one of ``rank`` (every layer),
    ``tol`` (the smallest rank within this relative error, per layer) or the call's
    ``params=`` budget; ``seed`` for the randomized SVD. With calibration data the factors
    fit the layers' outputs (whitened SVD).

    With ``allocation="welore"`` (WeLore, :func:`lowrank.nn.allocation.welore_ranks`) the
    ranks come from one threshold on every layer's min-max normalised singular values:
    ``welore_threshold`` (in ``[0, 1]``) gives it, or the call's ``params=`` budget sets it
    (give one of the two). Only the low-rank components are factored, the layers whose rank
    reduction exceeds ``welore_min_reduction`` (default 0) and whose factors are smaller
    than their weight; the others stay dense ``nn.Linear`` layers (listed in the report's
    ``skipped`` with the reason). ``convert(..., freeze=True)`` then leaves only the
    low-rank components trainable (WeLore's fine-tuning)."""

    rank: int | None = None
    tol: float | None = None
    seed: int = 0
    welore_threshold: float | None = None
    welore_min_reduction: float = 0.0

    def __post_init__(self):
        from lowrank.nn.allocation import fraction_below_one

        if self.rank is not None:
            self.rank = check.positive_int("rank", self.rank)
        if self.tol is not None:
            self.tol = check.real("tol", self.tol, 0.0, 1.0)
        if self.welore_threshold is not None:
            self.welore_threshold = check.real("welore_threshold", self.welore_threshold,
                                               0.0, 1.0)  # fmt: skip
        self.welore_min_reduction = fraction_below_one("welore_min_reduction",
                                                       self.welore_min_reduction)  # fmt: skip


def _plan(context: ConversionContext, config: LowRankConfig):
    """Ranks for every layer (uniform, by tolerance, or a budget spread across layers: see
    :mod:`lowrank.nn.convert`), then the whitened truncated SVD of each."""
    from lowrank.nn import allocation
    from lowrank.nn.calibration import output_sensitivity

    rank, tol, params = config.rank, config.tol, context.params
    shapes, grams, report = context.shapes, context.grams, context.report
    if context.allocation == "welore":
        return _plan_welore(context, config)
    if config.welore_threshold is not None or config.welore_min_reduction != 0.0:
        raise ValueError("welore_threshold and welore_min_reduction are options of allocation="
                         f"'welore', not of allocation={context.allocation!r}")  # fmt: skip
    if sum(x is not None for x in (rank, tol, params)) != 1:
        raise ValueError("convert to lowrank needs exactly one of rank=, tol= and params=")
    if rank is not None:
        ranks = {n: min(rank, *shapes[n]) for n in shapes}
        report.allocation = f"uniform rank {rank}"
    elif tol is not None:
        ranks = None
        report.allocation = f"tol {tol}"
    else:
        allocation.check_budget(shapes, params)
        if context.allocation == "uniform":
            ranks = allocation.uniform_ranks(shapes, params)
            report.allocation = f"uniform rank for {params:g} of the parameters"
        else:
            spectra = {n: _spectrum(context.linears[n].weight, grams.get(n)) for n in shapes}
            if context.batches is not None:
                gains = output_sensitivity(context.model, context.batches[0], context.linears)
                worth = {n: gains[n] * spectra[n].square() for n in shapes}
                report.allocation = (f"global for {params:g} of the parameters: singular "
                                     "values weighted by the output's sensitivity")  # fmt: skip
            else:
                worth = {n: spectra[n].square() for n in shapes}
                report.allocation = (f"global for {params:g} of the parameters: least total "
                                     "squared weight error")  # fmt: skip
            ranks = allocation.greedy_ranks(worth, shapes, params)

    def make(name, linear):
        gram = grams.get(name)
        if ranks is None:
            layer = LowRankLinear.from_dense(linear, tol=tol, gram=gram, seed=config.seed)
        else:
            layer = LowRankLinear.from_dense(linear, ranks[name], gram=gram, seed=config.seed)
        return layer, f"rank {layer.rank}"

    return make


def _plan_welore(context: ConversionContext, config: LowRankConfig):
    """WeLore: ranks from one threshold on the weights' own normalised spectra (the
    paper's rule, data-free even when calibration batches are given); the low-rank
    components are factored (by the whitened SVD with calibration data), the others left
    dense."""
    from lowrank.nn import allocation

    params, threshold = context.params, config.welore_threshold
    if config.rank is not None or config.tol is not None:
        raise ValueError("allocation='welore' chooses the ranks: give params= or "
                         "welore_threshold=, not rank= or tol=")  # fmt: skip
    if (params is None) == (threshold is None):
        raise ValueError("allocation='welore' needs exactly one of params= and "
                         "welore_threshold=")  # fmt: skip
    shapes, grams, report = context.shapes, context.grams, context.report
    spectra = {n: _spectrum(context.linears[n].weight, None) for n in shapes}
    found = allocation.welore_ranks(spectra, shapes, threshold=threshold, fraction=params,
                                    min_reduction=config.welore_min_reduction)  # fmt: skip
    report.compressible = dict(found.compressible)
    kept = found.params / max(1, sum(o * i for o, i in shapes.values()))
    budget = "" if params is None else f" for {params:g} of the parameters"
    report.allocation = (f"welore{budget}: threshold {found.threshold:.4g}, "
                         f"{sum(found.compressible.values())} of {len(shapes)} layers low-rank, "
                         f"{kept:.4g} of the parameters kept")  # fmt: skip

    def make(name, linear):
        rank, full = found.ranks[name], min(shapes[name])
        if not found.compressible[name]:
            return None, (f"not a low-rank component (WeLore rank {rank} of {full}): "
                          "kept dense")  # fmt: skip
        layer = LowRankLinear.from_dense(linear, rank, gram=grams.get(name), seed=config.seed)
        return layer, f"rank {rank} of {full}, low-rank component"

    return make


def _spectrum(weight: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """All singular values of the weight (whitened by the input statistics), in float64."""
    w = weight.detach().double()
    if gram is not None:
        w = w @ _whitener(gram, w.shape[1], w.device).factor
    return torch.linalg.svdvals(w)


def _describe(layer: LowRankLinear) -> dict:
    return {"rank": layer.rank, "bias": layer.bias is not None}


def _rebuild(linear: nn.Linear, d: dict) -> LowRankLinear:
    return LowRankLinear(linear.in_features, linear.out_features, d["rank"], d["bias"],
                         device=linear.weight.device, dtype=linear.weight.dtype)  # fmt: skip


register_kind("lowrank", config=LowRankConfig, layers=LowRankLinear, plan=_plan,
              describe=_describe, rebuild=_rebuild, calibration="optional")  # fmt: skip


def _dense(linear_or_weight) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(linear_or_weight, nn.Linear):
        weight, bias = linear_or_weight.weight, linear_or_weight.bias
    elif isinstance(linear_or_weight, torch.Tensor):
        weight, bias = linear_or_weight, None
    else:
        raise TypeError("linear_or_weight must be an nn.Linear or an (out, in) tensor, got "
                        f"{type(linear_or_weight).__name__}")  # fmt: skip
    check.weight("weight", weight)
    return weight, bias
