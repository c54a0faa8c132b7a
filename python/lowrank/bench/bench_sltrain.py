"""SLTrain products against the dense-rebuild reference and dense nn.Linear.

The reference is written from the paper's description: int64 flat indices,
``W = s B A`` plus ``scatter_add`` of the values, rebuilt again in backward, and
the dense gradient ``dy^T x`` formed for ``dB``, ``dA`` and the values. Rows give
forward+backward time (all of x, B, A, values and bias need gradients), peak
device memory (CUDA only), the bytes of parameters plus indices and what autograd keeps
for backward beyond them and the input (lowrank keeps the rebuilt ``W`` on the rebuild
path when it is no larger than ``x``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowrank.bench.harness import (
    LOWRANK_VARIANTS,
    Result,
    auto_choices,
    dispatch_mark,
    peak_bytes,
    saved_bytes,
    time_ms_many,
    under,
)
from lowrank.nn import SLTrainLinear


class _DenseRebuild(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, a, values, indices, scale, bias):
        w = scale * b @ a
        w.view(-1).scatter_add_(0, indices, values)
        ctx.save_for_backward(x, b, a, values, indices)
        ctx.scale = scale
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x, b, a, values, indices = ctx.saved_tensors
        s = ctx.scale
        w = s * b @ a
        w.view(-1).scatter_add_(0, indices, values)
        g = grad.reshape(-1, grad.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        dense = g.T @ rows
        return ((g @ w).reshape(x.shape), s * dense @ a.T, s * b.T @ dense,
                dense.view(-1).gather(0, indices), None, None, g.sum(0))  # fmt: skip


def reference(x, layer, indices64):
    return _DenseRebuild.apply(x, layer.B, layer.A, layer.values, indices64, layer.scale,
                               layer.bias)  # fmt: skip


def measure(device, n, tokens, dtype):
    layer = SLTrainLinear(n, n, rank=n // 4, sparsity=0.03, seed=0, device=device, dtype=dtype)
    with torch.no_grad():
        layer.B.normal_(0, 0.02)  # not the zero init, so every term does work
    dense = torch.nn.Linear(n, n, device=device, dtype=dtype)
    indices64 = layer.indices.long()
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, n, device=device, dtype=dtype)
    label = f"n={n} r={n // 4} T={tokens}"
    params = sum(p.numel() for p in layer.parameters()) * x.element_size()
    ours = params + 4 * layer.indices.numel()
    impls = {
        **{name: (lambda: layer(x), ours) for name in LOWRANK_VARIANTS},
        "dense-rebuild reference": (lambda: reference(x, layer, indices64),
                                    params + 8 * layer.indices.numel()),
        "dense nn.Linear": (lambda: dense(x), sum(p.numel() for p in dense.parameters())
                            * x.element_size()),
    }  # fmt: skip
    steps = {}
    for impl, (fn, _) in impls.items():

        def step(i, fn=fn):
            for p in (x, *layer.parameters(), *dense.parameters()):
                p.grad = None
            fn().backward(grad)

        steps[impl] = under(LOWRANK_VARIANTS.get(impl), step)  # forward and backward
    mark = dispatch_mark()
    ms = time_ms_many(steps, device)
    chose = auto_choices(mark)
    kept = (x, indices64, *layer.parameters(), *layer.buffers(), *dense.parameters())
    results = []
    for impl, (fn, bytes_) in impls.items():
        peak = peak_bytes(lambda step=steps[impl]: step(0), device)
        saved = saved_bytes(under(LOWRANK_VARIANTS.get(impl), fn), kept)
        extra = {"param_index_MiB": bytes_ / 2**20, "saved_MiB": saved / 2**20,
                 "peak_MiB": None if peak is None else peak / 2**20}  # fmt: skip
        if impl == "lowrank":
            extra["auto_chose"] = chose
        results.append(Result("sltrain", f"{label} fwd+bwd", impl, ms[impl], extra))
    return results


def run(device: torch.device, quick: bool) -> list[Result]:
    if device.type == "cuda":
        dtype, sizes = torch.bfloat16, [2048, 4096]
        tokens = [64, 8192] if quick else [16, 64, 1024, 8192, 16384]
    else:
        dtype, sizes = torch.float32, [1024]
        tokens = [16, 4096] if quick else [16, 256, 4096]
    return [r for n in sizes for t in tokens for r in measure(device, n, t, dtype)]
