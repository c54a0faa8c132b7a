"""Native ops, registered as ``torch.ops.lowrank.*``; one module per op family.

Each module holds the schema, the CPU and CUDA kernels, the fake kernel, the
autograd formula and the pure-PyTorch ``*_reference`` that specifies the op.
Adding an op family is one import line here.
"""

from lowrank.ops import sketch
from lowrank.ops.kron import (
    kron_matmul,
    kron_matmul_add,
    kron_matmul_add_,
    kron_matmul_add_reference,
    kron_matmul_reference,
    kron_sum_matmul,
    kron_sum_matmul_reference,
)
from lowrank.ops.monarch import monarch_matmul, monarch_matmul_reference
from lowrank.ops.sltrain import sltrain_matmul, sltrain_matmul_reference

__all__ = [
    "kron_matmul",
    "kron_matmul_add",
    "kron_matmul_add_",
    "kron_matmul_add_reference",
    "kron_matmul_reference",
    "kron_sum_matmul",
    "kron_sum_matmul_reference",
    "monarch_matmul",
    "monarch_matmul_reference",
    "sketch",
    "sltrain_matmul",
    "sltrain_matmul_reference",
]
