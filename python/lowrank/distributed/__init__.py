"""lowrank's algorithms over ``torch.distributed`` groups (gloo on the CPU, NCCL on GPUs)."""

from lowrank.distributed import rsvd as rsvd_module
from lowrank.distributed.rsvd import pca, rsvd

__all__ = ["pca", "rsvd", "rsvd_module"]
