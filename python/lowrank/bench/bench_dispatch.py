"""Per-call overhead of the op pattern (ops/_library.py).

- a trivial op (returns its input) defined the way every lowrank op is: schema,
  a CPU kernel, and the autograd kernel of ``register_autograd``; and the same op
  without the autograd kernel;
- ``kron_matmul`` on a 1x1 problem (validation, output allocation and the
  native call included) without and with an input that requires grad, and the
  bare native call (pybind11 only);
- ``torch.mm`` on 1x1 tensors for scale;
- the first-call cost of the measured dispatch (``lowrank.dispatch``) on the CPU suites'
  shapes: a call that meets a new key times every candidate once (or more, within its
  budget); "overhead_ms" is that call's time minus a steady call's, median of 3 fresh keys.
"""

from __future__ import annotations

import statistics
import time

import torch

from lowrank import _native, dispatch
from lowrank.bench.harness import Result, time_ms
from lowrank.nn import SLTrainLinear
from lowrank.ops import kron_matmul, monarch_matmul
from lowrank.ops._library import below_autograd, define, register_autograd, register_kernel

_TRIVIAL = define("trivial(Tensor x) -> Tensor", namespace="lowrank_bench")
_TRIVIAL_BARE = define("trivial_bare(Tensor x) -> Tensor", namespace="lowrank_bench")


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        with below_autograd():
            return _TRIVIAL(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


register_kernel(_TRIVIAL, "cpu")(lambda x: x)
register_kernel(_TRIVIAL_BARE, "cpu")(lambda x: x)
register_autograd(_TRIVIAL, _Identity)


def run(device: torch.device, quick: bool) -> list[Result]:
    if device.type != "cpu":
        return []
    x, a, b = torch.randn(1, 1), torch.randn(1, 1), torch.randn(1, 1)
    y = torch.empty(1, 1)
    xg = x.clone().requires_grad_()
    code = _native.DTYPE_CODES[torch.float32]

    def raw(i):
        _native._C.kron_matmul(
            code, x.data_ptr(), a.data_ptr(), b.data_ptr(), 0, 1.0, y.data_ptr(), 1, 1, 1, 1, 1, 1
        )

    rows = [
        ("call through the harness (subtract)", lambda i: None),
        ("trivial op, pattern (autograd kernel)", lambda i: _TRIVIAL(x)),
        ("trivial op, no autograd kernel", lambda i: _TRIVIAL_BARE(x)),
        ("kron_matmul 1x1, no grad", lambda i: kron_matmul(x, a, b)),
        ("kron_matmul 1x1, input requires grad", lambda i: kron_matmul(xg, a, b)),
        ("native kron_matmul call only", raw),
        ("torch.mm 1x1", lambda i: torch.mm(x, a)),
    ]
    out = []
    for name, fn in rows:
        ms = time_ms(fn, device, min_run_time=0.5)
        out.append(Result("dispatch", name, "lowrank", ms, {"us": ms * 1e3}))
    return out + first_call_overheads(quick)


def _first_call_cases():
    """(name, step) pairs on the CPU suites' shapes; each step runs forward and backward."""
    x = torch.randn(4096, 1024, requires_grad=True)
    a, b = torch.randn(32, 32, requires_grad=True), torch.randn(32, 32, requires_grad=True)
    w1, w2 = (torch.randn(32, 32, 32, requires_grad=True) for _ in range(2))
    layer = SLTrainLinear(1024, 1024, rank=256, sparsity=0.03, seed=0)
    small = torch.randn(16, 1024, requires_grad=True)
    grad = torch.randn(4096, 1024)
    return [
        ("kron 32x32 T=4096 fwd+bwd", lambda: kron_matmul(x, a, b).backward(grad)),
        ("monarch n=1024 blocks=32 T=4096 fwd+bwd",
         lambda: monarch_matmul(x, w1, w2).backward(grad)),
        ("sltrain n=1024 r=256 T=4096 fwd+bwd", lambda: layer(x).backward(grad)),
        ("sltrain n=1024 r=256 T=16 fwd+bwd", lambda: layer(small).backward(grad[:16])),
    ]  # fmt: skip


def first_call_overheads(quick: bool) -> list[Result]:
    """Time of the first call for a key minus a steady call, both fwd+bwd (two keys each)."""
    out = []
    for name, step in _first_call_cases()[: 1 if quick else None]:
        step()  # warm the process: allocator, libraries
        overheads, steady = [], []
        for _ in range(3):
            dispatch.clear()
            start = time.perf_counter()
            step()
            first = time.perf_counter() - start
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                step()
                runs.append(time.perf_counter() - start)
            steady.append(statistics.median(runs))
            overheads.append(first - steady[-1])
        ms = statistics.median(steady) * 1e3
        extra = {"overhead_ms": statistics.median(overheads) * 1e3, "keys": 2}
        out.append(Result("dispatch", f"first call: {name}", "lowrank", ms, extra))
    dispatch.clear()
    return out
