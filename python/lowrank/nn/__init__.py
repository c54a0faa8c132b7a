"""``torch.nn`` layers built on lowrank's ops."""

from lowrank.nn.kron import KronLinear
from lowrank.nn.kron_adapter import KronAdapter

__all__ = ["KronAdapter", "KronLinear"]
