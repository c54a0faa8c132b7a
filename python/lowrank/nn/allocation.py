"""Spreading a parameter budget over layers: one rank per layer, or ranks by worth.

``params=f`` keeps the fraction ``f`` of the targeted layers' weight parameters. A
factored layer of rank ``r`` costs ``r (out + in)`` parameters. :func:`uniform_ranks`
gives every layer the same rank; :func:`greedy_ranks` takes rank-one components by worth
per parameter (their squared singular values, possibly weighted by the output's
sensitivity to the layer) until the budget is spent: a greedy knapsack, optimal for these
separable concave gains. :func:`welore_ranks` is WeLore's data-free rule (Jaiswal et al.
2024): one threshold on every layer's min-max normalised singular values, which also sorts
the layers into low-rank components (factored) and the others (kept dense).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lowrank import _validate as check

# The ways convert(..., allocation=) spreads a params= budget over layers.
ALLOCATIONS = ("global", "uniform", "welore")


def max_rank(out: int, inp: int) -> int:
    """The largest rank that still saves parameters (at least 1)."""
    return max(1, min(out, inp, (out * inp) // (out + inp)))


def check_budget(shapes: Mapping[str, tuple[int, int]], fraction: float) -> None:
    """Raises ``ValueError`` when ``fraction`` of the weights cannot pay for rank one in
    every layer, the least a factored conversion keeps."""
    least = sum(o + i for o, i in shapes.values()) / max(1, sum(o * i for o, i in shapes.values()))
    if fraction < least:
        raise ValueError(
            f"params={fraction:g} is below one rank per layer: the least these "
            f"{len(shapes)} layers can keep is {least:.4g} of their parameters"
        )


def uniform_ranks(shapes: Mapping[str, tuple[int, int]], fraction: float) -> dict[str, int]:
    """One rank ``r`` for every layer: the largest whose total stays within the budget."""
    budget = fraction * sum(o * i for o, i in shapes.values())

    def total(r):
        return sum(min(r, max_rank(o, i)) * (o + i) for o, i in shapes.values())

    r = 1
    while r < max(min(s) for s in shapes.values()) and total(r + 1) <= budget:
        r += 1
    return {name: min(r, max_rank(o, i)) for name, (o, i) in shapes.items()}


def greedy_ranks(worth: Mapping[str, torch.Tensor], shapes, fraction: float) -> dict[str, int]:
    """Ranks maximising the total worth of the kept components within the budget: take
    components by worth per parameter (every layer keeps at least one). ``worth[name][k]``
    is the worth of layer ``name``'s ``k``-th component, non-increasing in ``k``."""
    budget = fraction * sum(o * i for o, i in shapes.values())
    ranks = dict.fromkeys(shapes, 1)
    spent = sum(o + i for o, i in shapes.values())
    heap = [(-float(worth[n][1]) / sum(shapes[n]), n) for n in shapes
            if len(worth[n]) > 1 and max_rank(*shapes[n]) > 1]  # fmt: skip
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        cost = sum(shapes[n])
        if spent + cost > budget:
            continue
        ranks[n] += 1
        spent += cost
        if ranks[n] < min(len(worth[n]), max_rank(*shapes[n])):
            heapq.heappush(heap, (-float(worth[n][ranks[n]]) / cost, n))
    return ranks


# ---- WeLore ------------------------------------------------------------------------------------


# Singular values closer together than this, relative to the largest, differ by rounding (of
# a float32 weight, of the SVD), not by a tail: such a spectrum is flat.
FLAT_SPECTRUM_RTOL = 1e-4


def normalised_spectrum(singular_values: torch.Tensor) -> torch.Tensor:
    """WeLore's normalisation of one layer's singular values: ``(s - min s) / (max s - min s)``
    (in ``[0, 1]``, the largest at 1). A flat spectrum (every value within
    ``FLAT_SPECTRUM_RTOL`` of the largest, e.g. an orthogonal weight, whose rounding errors the
    normalisation would otherwise stretch over ``[0, 1]``) has no tail: all ones."""
    s = singular_values.detach().double()
    low, high = s.min(), s.max()
    if not bool(high - low > FLAT_SPECTRUM_RTOL * high):
        return torch.ones_like(s)
    return (s - low) / (high - low)


@dataclass
class WeLoreAllocation:
    """The outcome of :func:`welore_ranks`.

    Attributes:
        threshold: the threshold ``tau`` on the normalised singular values.
        ranks: per layer, the components kept, ``#{i : s_hat_i >= tau}``.
        compressible: per layer, whether it is a low-rank component (LRC): factored at its
            rank; the others (N-LRCs) stay dense.
        params: the weight parameters kept in all: ``rank (out + in)`` for each LRC,
            ``out in`` for each N-LRC.
    """

    threshold: float
    ranks: dict[str, int]
    compressible: dict[str, bool]
    params: int


def welore_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    *,
    threshold: float | None = None,
    fraction: float | None = None,
    min_reduction: float = 0.0,
) -> WeLoreAllocation:
    """WeLore's rank reduction (Jaiswal et al. 2024, "From GaLore to WeLore"), without data.

    Every layer's singular values ``s`` are min-max normalised
    (:func:`normalised_spectrum`); one threshold ``tau`` is applied to all layers, and the
    components with ``s_hat_i < tau`` are dropped: a layer whose spectrum has a heavy tail
    (most values far below its largest) loses most of its rank, a layer with a flat spectrum
    little. A layer is a low-rank component when its rank reduction ``1 - rank / min(out,
    in)`` exceeds ``min_reduction`` (the paper's minimum reduction ratio) and factoring it at
    that rank saves parameters (``rank (out + in) < out in``); the others keep their dense
    weight, whole.

    Args:
        spectra: per layer, its singular values (any order; all of them).
        shapes: per layer, ``(out_features, in_features)``.
        threshold: ``tau`` in ``[0, 1]``; or
        fraction: a budget: the fraction of the layers' weight parameters to keep. ``tau``
            is then the smallest threshold (the most components kept) whose total
            parameters, low-rank components factored and the others dense, fit the budget;
            the total is non-increasing in ``tau``, so it is found by bisection over the
            normalised singular values, where it changes.
        min_reduction: in ``[0, 1)``: the least rank reduction of a low-rank component.

    Raises:
        ValueError: unless exactly one of ``threshold`` and ``fraction`` is given, for a
            value out of range, or when no threshold meets the budget.
    """
    if (threshold is None) == (fraction is None):
        raise ValueError("welore_ranks needs exactly one of threshold and fraction")
    min_reduction = fraction_below_one("min_reduction", min_reduction)
    normalised = {n: normalised_spectrum(spectra[n]) for n in shapes}
    for n, (out, inp) in shapes.items():
        if normalised[n].numel() != min(out, inp):
            raise ValueError(f"spectra[{n!r}] holds {normalised[n].numel()} singular values, "
                             f"expected min(out, in) = {min(out, inp)}")  # fmt: skip

    def allocate(tau: float) -> WeLoreAllocation:
        ranks, compressible, total = {}, {}, 0
        for n, (out, inp) in shapes.items():
            rank = int((normalised[n] >= tau).sum())
            reduction = 1.0 - rank / min(out, inp)
            low_rank = reduction > min_reduction and rank * (out + inp) < out * inp
            ranks[n], compressible[n] = rank, low_rank
            total += rank * (out + inp) if low_rank else out * inp
        return WeLoreAllocation(tau, ranks, compressible, total)

    if threshold is not None:
        return allocate(check.real("threshold", threshold, 0.0, 1.0))
    budget = fraction * sum(o * i for o, i in shapes.values())
    candidates = sorted({float(v) for s in normalised.values() for v in s.tolist()})
    fits = bisect.bisect_left(candidates, True, key=lambda tau: allocate(tau).params <= budget)
    if fits == len(candidates):
        least = allocate(candidates[-1]).params / max(1, sum(o * i for o, i in shapes.values()))
        raise ValueError(f"params={fraction:g} cannot be met by WeLore's threshold: at the "
                         f"largest threshold the layers keep {least:.4g} of their parameters "
                         f"(min_reduction={min_reduction:g})")  # fmt: skip
    return allocate(candidates[fits])


def fraction_below_one(name: str, value) -> float:
    """A real in ``[0, 1)`` (``ValueError`` naming ``name`` otherwise)."""
    result = check.real(name, value, 0.0, 1.0)
    if result >= 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return result
