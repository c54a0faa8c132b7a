"""Spreading a parameter budget over layers: one rank per layer, or ranks by worth.

``params=f`` keeps the fraction ``f`` of the targeted layers' weight parameters. A
factored layer of rank ``r`` costs ``r (out + in)`` parameters. :func:`uniform_ranks`
gives every layer the same rank; :func:`greedy_ranks` takes rank-one components by worth
per parameter (their squared singular values, possibly weighted by the output's
sensitivity to the layer) until the budget is spent: a greedy knapsack, optimal for these
separable concave gains.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

import torch


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
