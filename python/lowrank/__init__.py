"""lowrank: fast structured and low-rank linear algebra for PyTorch.

- ``lowrank.ops``: native ops registered with ``torch.library`` (``torch.ops.lowrank.*``),
  each with autograd, fake (meta) kernels and a pure-PyTorch reference.
- ``lowrank.nn``: layers built on those ops.
- ``lowrank.linalg``: randomized decompositions and projections.
- ``lowrank.distributed``: the same over ``torch.distributed`` process groups.
- ``lowrank.optim``: GaLore (AdamW with low-rank gradient projection).
- ``lowrank.info()``: what was built and what can run here (``python -m lowrank`` prints it).
- ``lowrank.verify_cuda()``: runs the CUDA test suite on this GPU and, when it passes, lets
  ``lowrank.dispatch`` measure the native CUDA kernels on this GPU model.
"""

from __future__ import annotations

__version__ = "0.1.0"

import torch  # noqa: F401  (loads torch's OpenMP runtime before lowrank._C)

from lowrank import distributed, linalg, nn, ops, optim
from lowrank._native import info
from lowrank.dispatch import verify_cuda

__all__ = ["__version__", "distributed", "info", "linalg", "nn", "ops", "optim", "verify_cuda"]
