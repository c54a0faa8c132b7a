"""Per-call overhead of the op pattern: a kron_matmul on a 1x1 problem.

Rows: the raw ``_C`` call (pybind11 only), the full op through the dispatcher
without and with autograd, and ``torch.mm`` on 1x1 tensors for scale.
The op's overhead is its time minus the raw call's.
"""

from __future__ import annotations

import torch
from harness import Result, time_ms

from lowrank import _native
from lowrank.ops import kron_matmul


def run(device: torch.device, quick: bool) -> list[Result]:
    if device.type != "cpu":
        return []
    x, a, b = torch.randn(1, 1), torch.randn(1, 1), torch.randn(1, 1)
    y = torch.empty(1, 1)
    xg = x.clone().requires_grad_()
    code = _native.DTYPE_CODES[torch.float32]

    def raw(i):
        _native._C.kron_matmul(
            code, x.data_ptr(), a.data_ptr(), b.data_ptr(), y.data_ptr(), 1, 1, 1, 1, 1, 1
        )

    rows = [
        ("native call only", raw),
        ("kron_matmul, no grad", lambda i: kron_matmul(x, a, b)),
        ("kron_matmul, input requires grad", lambda i: kron_matmul(xg, a, b)),
        ("torch.mm 1x1", lambda i: torch.mm(x, a)),
    ]
    out = []
    for name, fn in rows:
        ms = time_ms(fn, device, min_run_time=0.5)
        out.append(Result("dispatch", name, "lowrank", ms, {"us": ms * 1e3}))
    return out
