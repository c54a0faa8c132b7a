"""Kronecker adapters: KronAdapter against the materialised LoKr computation.

Baselines: the PEFT-style adapter ``base(x) + F.linear(x, kron(w1, w2) * scale)``,
which forms the ``out x in`` weight change and its gradient every step, and
PEFT's own LoKr layer when peft is installed. Forward+backward with the base
frozen and the input requiring grad (as inside a model). Two rows per case:
the adapter's own cost (its branch, residual add included) and the whole layer.
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
    time_ms_many,
    under,
)
from lowrank.nn import KronAdapter
from lowrank.ops import kron_matmul_add

FULL = 1 << 30  # a rank that keeps both factors full


def cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        dtype, sizes, token_counts = torch.bfloat16, (1024, 4096), (16, 1024, 8192, 16384)
    else:
        dtype, sizes, token_counts = torch.float32, (1024,), (16, 4096)
    if quick:
        sizes, token_counts = sizes[-1:], token_counts[-1:]
    for n in sizes:
        for factor in (-1, 16):
            for rank in (8, FULL):
                for tokens in token_counts:
                    yield n, factor, rank, tokens, dtype


def peft_layer(base, rank, factor, alpha):
    try:
        import peft
        from peft.tuners.lokr.layer import Linear as LoKrLinear
    except ImportError:
        return None
    config = peft.LoKrConfig(r=rank, alpha=alpha, decompose_factor=factor, init_weights=False)
    return LoKrLinear(base, "default", config=config, r=rank, alpha=alpha).to(base.weight.dtype)


def measure(device, n, factor, rank, tokens, dtype) -> list[Result]:
    base = torch.nn.Linear(n, n, device=device, dtype=dtype)
    adapter = KronAdapter(base, factor=factor, rank=min(rank, n), alpha=8.0, init="random")
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, n, device=device, dtype=dtype)
    with torch.no_grad():
        y0 = base(x)
    w1, w2 = adapter._outer_factors()
    label = f"n={n} factor={factor} rank={'full' if rank == FULL else rank} T={tokens}"

    def ours_branch(i):
        kron_matmul_add(y0, adapter._inner(x), w1, w2, adapter.scale).backward(grad)

    def materialised_branch(i):
        (y0 + F.linear(x, adapter.delta_weight())).backward(grad)

    def ours_layer(i):
        adapter(x).backward(grad)

    def materialised_layer(i):
        (base(x) + F.linear(x, adapter.delta_weight())).backward(grad)

    rows = [
        *(("adapter fwd+bwd", name, ours_branch) for name in LOWRANK_VARIANTS),
        ("adapter fwd+bwd", "materialised", materialised_branch),
        *(("layer fwd+bwd", name, ours_layer) for name in LOWRANK_VARIANTS),
        ("layer fwd+bwd", "materialised", materialised_layer),
    ]
    lokr = peft_layer(base, min(rank, n), factor, 8.0)
    if lokr is not None:
        rows.append(("layer fwd+bwd", "peft LoKr", lambda i: lokr(x).backward(grad)))
    results = []
    for what in dict.fromkeys(w for w, _, _ in rows):
        fns = {impl: under(LOWRANK_VARIANTS.get(impl), fn)  # forward and backward
               for w, impl, fn in rows if w == what}  # fmt: skip
        mark = dispatch_mark()
        ms = time_ms_many(fns, device, min_run_time=0.3)
        chose = auto_choices(mark)
        for impl, fn in fns.items():
            peak = peak_bytes(lambda fn=fn: fn(0), device)
            extra = {"peak_MiB": None if peak is None else peak / 2**20}
            if impl == "lowrank":
                extra["auto_chose"] = chose
            results.append(Result("kron_adapter", f"{label} {what}", impl, ms[impl], extra))
    return results


def run(device: torch.device, quick: bool) -> list[Result]:
    results = []
    for case in cases(device, quick):
        results.extend(measure(device, *case))
    return results
