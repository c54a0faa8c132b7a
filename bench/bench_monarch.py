"""Monarch products against the two-bmm reference and dense nn.Linear.

Baselines: ``monarch_matmul_reference`` (two batched products and two shuffle
copies, autograd keeping the intermediate for backward: the original code's
structure) and ``F.linear`` with the equivalent dense weight. Forward and
forward+backward (gradients of x, w1, w2); "saved_MiB" is what autograd keeps
between forward and backward beyond the inputs and weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import Result, measure_bandwidth_gbs, time_ms

from lowrank.ops import monarch_matmul, monarch_matmul_reference


def square_factors(n: int, nblocks: int, dtype, device):
    b = n // nblocks
    w1 = (torch.randn(nblocks, b, b, device=device, dtype=dtype) / b**0.5).requires_grad_()
    w2 = (torch.randn(nblocks, b, b, device=device, dtype=dtype) / b**0.5).requires_grad_()
    return w1, w2


def cases(device, quick):
    if device.type == "cuda":
        dtype = torch.bfloat16
        shapes = [(4096, 64)] if quick else [(1024, 4), (1024, 16), (4096, 16), (4096, 64)]
        tokens = [8192] if quick else [16, 64, 1024, 8192, 16384]
    else:
        dtype = torch.float32
        shapes = [(1024, 32)] if quick else [(1024, 32), (1024, 4), (4096, 64)]
        tokens = [4096] if quick else [16, 256, 4096]
    for n, nblocks in shapes:
        for t in tokens:
            if device.type == "cpu" and n == 4096 and t > 256:
                continue  # keeps the CPU suite to minutes
            yield n, nblocks, t, dtype


def measure(device, n, nblocks, tokens, dtype, bandwidth):
    w1, w2 = square_factors(n, nblocks, dtype, device)
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, n, device=device, dtype=dtype)
    with torch.no_grad():
        dense = monarch_matmul(torch.eye(n, device=device, dtype=dtype), w1, w2).T.contiguous()
    dense.requires_grad_()
    label = f"n={n} blocks={nblocks} T={tokens}"
    floor_ms = 2 * tokens * n * x.element_size() / (bandwidth * 1e9) * 1e3
    impls = {
        "lowrank": lambda: monarch_matmul(x, w1, w2),
        "two-bmm reference": lambda: monarch_matmul_reference(x, w1, w2),
        "dense F.linear": lambda: F.linear(x, dense),
    }
    saved = {"lowrank": 0.0, "two-bmm reference": tokens * n * x.element_size() / 2**20,
             "dense F.linear": 0.0}  # fmt: skip
    results = []
    for impl, fn in impls.items():

        def forward(i, fn=fn):
            with torch.no_grad():
                return fn()

        def both(i, fn=fn):
            x.grad = w1.grad = w2.grad = dense.grad = None
            fn().backward(grad)

        results.append(Result("monarch", f"{label} fwd", impl, time_ms(forward, device),
                              {"memory_floor_ms": floor_ms}))  # fmt: skip
        results.append(Result("monarch", f"{label} fwd+bwd", impl, time_ms(both, device),
                              {"saved_MiB": saved[impl]}))  # fmt: skip
    return results


def run(device: torch.device, quick: bool) -> list[Result]:
    bandwidth = measure_bandwidth_gbs(device)
    results = []
    for case in cases(device, quick):
        results += measure(device, *case, bandwidth)
    return results
