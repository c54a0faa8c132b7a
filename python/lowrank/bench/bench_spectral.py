"""Intruder dimensions of a weight pair: lowrank's against the definition with full SVDs.

The pair is a pretrained-like ``n x n`` weight (singular values ``1 / (1 + i)^0.7``) and a
LoRA-like tuned copy (a rank-2 update large enough to enter the top singular vectors), at
``k = 10`` and ``epsilon = 0.5``. ``full SVDs`` is the paper's definition taken literally:
``torch.linalg.svd`` of both weights in float64, the tuned one's top ``k`` left singular
vectors against all of the original's. lowrank's :func:`lowrank.linalg.intruder_dimensions`
takes the tuned weight's top ``k`` by rsvd and the original's full basis from the
eigendecomposition of its Gram matrix. Each row records whether its set equals the
definition's (``same_set``) and the largest difference of the best cosines.
"""

from __future__ import annotations

import torch

from lowrank.bench.harness import Result, time_ms_many
from lowrank.linalg.spectral import intruder_dimensions, intruder_dimensions_reference


def pair(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    w0 = (u / (1 + torch.arange(n, dtype=torch.float64)) ** 0.7) @ v.T
    b, a = torch.randn(n, 2, generator=g), torch.randn(2, n, generator=g)
    tuned = w0 + ((b * torch.tensor([0.9, 0.6])) @ a).double() / n * 2
    return w0.float(), tuned.float()


def intruder_case(device: torch.device, n: int, k: int = 10, epsilon: float = 0.5):
    w0, tuned = pair(n)
    label = f"intruders {n}x{n} k={k} eps={epsilon}"
    fns = {
        "lowrank": lambda i: intruder_dimensions(w0, tuned, k, epsilon),
        "full SVDs": lambda i: intruder_dimensions_reference(w0, tuned, k, epsilon),
    }
    times = time_ms_many(fns, "cpu", min_run_time=1.0, warmup=1, min_rounds=3)
    ref = fns["full SVDs"](0)
    results = []
    for impl, fn in fns.items():
        found = fn(0)
        diff = float((found.max_cosine - ref.max_cosine).abs().max())
        extra = {"same_set": found.indices == ref.indices, "intruders": found.indices,
                 "max_cosine_diff": diff}  # fmt: skip
        results.append(Result("spectral", label, impl, times[impl], extra))
    return results


def run(device: torch.device, quick: bool) -> list[Result]:
    """CPU only (float64 decompositions); on a GPU machine the rows still run on the CPU."""
    return intruder_case(device, 512 if quick else 1024)
