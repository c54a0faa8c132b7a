"""Monarch products against the original two-bmm code and dense nn.Linear.

Baselines: the structure of the original Monarch code (Dao et al. 2022) rebuilt here
as ``original_two_bmm``: per direction two batched GEMMs and two permutation copies,
with the intermediate ``h`` kept by autograd for backward; and ``F.linear`` with the
equivalent dense weight. lowrank's rows: the measured dispatch, its native kernel and
its composite path. Forward and forward+backward (gradients of x, w1, w2);
"saved_MiB" is what autograd keeps between forward and backward beyond the inputs
and weights (measured: lowrank keeps ``h`` where its composite path runs and ``h`` is no
larger than ``x``).
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
    saved_bytes,
    time_ms_many,
    under,
)
from lowrank.ops import monarch_matmul


class _OriginalTwoBmm(torch.autograd.Function):
    """``y = P_out blockdiag(w2) P blockdiag(w1) x`` as the original code computes it."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        (k, q, p), (l, s, r) = w1.shape, w2.shape
        tokens = x.shape[0]
        h = x.new_empty((tokens, k, q))
        torch.bmm(x.view(tokens, k, p).transpose(0, 1), w1.transpose(1, 2), out=h.transpose(0, 1))
        h = h.view(tokens, r, l).transpose(1, 2).contiguous()  # copy 1: (T, l, r)
        y = x.new_empty((tokens, l, s))
        torch.bmm(h.transpose(0, 1), w2.transpose(1, 2), out=y.transpose(0, 1))
        ctx.save_for_backward(x, w1, w2, h)
        return y.transpose(1, 2).reshape(tokens, s * l)  # copy 2

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, h = ctx.saved_tensors
        (k, q, p), (l, s, r) = w1.shape, w2.shape
        tokens = x.shape[0]
        g = grad.reshape(tokens, s, l).transpose(1, 2).contiguous().transpose(0, 1)  # copy 1
        dw2 = torch.bmm(g.transpose(1, 2), h.transpose(0, 1))
        dh = x.new_empty((tokens, l, r))
        torch.bmm(g, w2, out=dh.transpose(0, 1))
        dh = dh.transpose(1, 2).contiguous().view(tokens, k, q)  # copy 2
        dx = x.new_empty((tokens, k, p))
        torch.bmm(dh.transpose(0, 1), w1, out=dx.transpose(0, 1))
        dw1 = torch.bmm(dh.transpose(0, 1).transpose(1, 2), x.view(tokens, k, p).transpose(0, 1))
        return dx.view(tokens, k * p), dw1, dw2


def original_two_bmm(x, w1, w2):
    return _OriginalTwoBmm.apply(x, w1, w2)


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
        **{name: monarch_matmul for name in LOWRANK_VARIANTS},
        "original two-bmm": original_two_bmm,
        "dense F.linear": F.linear,
    }
    # the op's minimum work and traffic (the dense row does more, counted the same way)
    flop = 2 * tokens * (w1.numel() + w2.numel())
    traffic = (2 * tokens * n + w1.numel() + w2.numel()) * x.element_size()
    forwards, boths, trainings = {}, {}, {}
    for impl, fn in impls.items():
        weights = (dense,) if impl == "dense F.linear" else (w1, w2)

        def forward(i, fn=fn, weights=weights):
            with torch.no_grad():
                return fn(x, *weights)

        def both(i, fn=fn, weights=weights):
            x.grad = w1.grad = w2.grad = dense.grad = None
            fn(x, *weights).backward(grad)

        def training(fn=fn, weights=weights):
            return fn(x, *weights)

        kind = LOWRANK_VARIANTS.get(impl)  # forced for forward and backward alike
        forwards[impl], boths[impl] = under(kind, forward), under(kind, both)
        trainings[impl] = under(kind, training)
    mark = dispatch_mark()
    fwd_ms, both_ms = time_ms_many(forwards, device), time_ms_many(boths, device)
    chose = auto_choices(mark)
    results = []
    for impl in impls:
        extra = {"auto_chose": chose} if impl == "lowrank" else {}
        saved = saved_bytes(trainings[impl], (x, w1, w2, dense)) / 2**20
        results.append(Result("monarch", f"{label} fwd", impl, fwd_ms[impl],
                              {"memory_floor_ms": floor_ms, "flop": flop, "bytes": traffic,
                               **extra}))  # fmt: skip
        results.append(Result("monarch", f"{label} fwd+bwd", impl, both_ms[impl],
                              {"saved_MiB": saved, **extra}))  # fmt: skip
    return results


def run(device: torch.device, quick: bool) -> list[Result]:
    bandwidth = measure_bandwidth_gbs(device)
    results = []
    for case in cases(device, quick):
        results += measure(device, *case, bandwidth)
    return results
