"""kron_matmul against the materialised Kronecker product and the torch reshape trick.

Baselines: (a) ``F.linear(x, torch.kron(a, b))``, what PEFT's LoKr does every
step; (b) the same reshape trick as lowrank's kernel written with torch ops
(``a @ X @ b^T`` on ``x`` viewed as ``(..., q, s)``). Forward and
forward+backward (gradients of x, a and b).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowrank.bench.harness import (
    LOWRANK_VARIANTS,
    Result,
    auto_choices,
    dispatch_mark,
    measure_bandwidth_gbs,
    time_ms_many,
    under,
)
from lowrank.ops import kron_matmul


def materialised(x, a, b):
    return F.linear(x, torch.kron(a, b))


def torch_reshape(x, a, b):
    p, q = a.shape
    r, s = b.shape
    rows = x.reshape(*x.shape[:-1], q, s)
    return torch.matmul(torch.matmul(a, rows), b.T).reshape(*x.shape[:-1], p * r)


IMPLS = {
    **{name: kron_matmul for name in LOWRANK_VARIANTS},
    "materialised": materialised,
    "torch_reshape": torch_reshape,
}


def cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        yield "in=out=4096 f=64x64 T=8192 bf16", 8192, (64, 64, 64, 64), torch.bfloat16
    else:
        yield "in=out=1024 f=32x32 T=4096 f32", 4096, (32, 32, 32, 32), torch.float32
        if not quick:
            yield "in=out=1024 f=16x64 T=4096 f32", 4096, (16, 16, 64, 64), torch.float32


def run(device: torch.device, quick: bool) -> list[Result]:
    results = []
    rotate = 1 if device.type == "cpu" else 3
    bandwidth = measure_bandwidth_gbs(device)
    for case, tokens, (p, q, r, s), dtype in cases(device, quick):
        sets = []
        for _ in range(rotate):
            x = torch.randn(tokens, q * s, device=device, dtype=dtype, requires_grad=True)
            a = (torch.randn(p, q, device=device, dtype=dtype) / q**0.5).requires_grad_()
            b = (torch.randn(r, s, device=device, dtype=dtype) / s**0.5).requires_grad_()
            grad = torch.randn(tokens, p * r, device=device, dtype=dtype)
            sets.append((x, a, b, grad))
        elem = sets[0][0].element_size()
        floor_ms = (tokens * (q * s + p * r) * elem) / (bandwidth * 1e9) * 1e3
        forwards, boths = {}, {}
        for impl, fn in IMPLS.items():

            def forward(i, fn=fn, sets=sets):
                x, a, b, _ = sets[i]
                with torch.no_grad():
                    return fn(x, a, b)

            def forward_backward(i, fn=fn, sets=sets):
                x, a, b, grad = sets[i]
                x.grad = a.grad = b.grad = None
                fn(x, a, b).backward(grad)

            kind = LOWRANK_VARIANTS.get(impl)  # forced for forward and backward alike
            forwards[impl], boths[impl] = under(kind, forward), under(kind, forward_backward)
        mark = dispatch_mark()
        fwd = time_ms_many(forwards, device, rotate=rotate)
        both = time_ms_many(boths, device, rotate=rotate)
        chose = auto_choices(mark)
        # the op's minimum work and traffic: the cheaper product order; x, y, a, b once
        flop = 2 * tokens * min(q * s * r + p * q * r, p * q * s + p * s * r)
        traffic = (tokens * (q * s + p * r) + p * q + r * s) * elem
        for impl in IMPLS:
            extra = {"auto_chose": chose} if impl == "lowrank" else {}
            results.append(Result("kron", case + " fwd", impl, fwd[impl],
                                  {"memory_floor_ms": floor_ms, "flop": flop, "bytes": traffic,
                                   **extra}))  # fmt: skip
            results.append(Result("kron", case + " fwd+bwd", impl, both[impl], extra))
    return results
