"""Per-call overhead of the op pattern (ops/_library.py).

- a trivial op (returns its input) defined the way every lowrank op is: schema,
  a CPU kernel, and the autograd kernel of ``register_autograd``; and the same op
  without the autograd kernel;
- ``kron_matmul`` on a 1x1 problem (validation, output allocation and the
  native call included) without and with an input that requires grad, and the
  bare native call (pybind11 only);
- ``torch.mm`` on 1x1 tensors for scale.
"""

from __future__ import annotations

import torch
from harness import Result, time_ms

from lowrank import _native
from lowrank.ops import kron_matmul
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
    return out
