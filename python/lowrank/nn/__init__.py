"""``torch.nn`` layers built on lowrank's ops."""

from lowrank.nn.kron import KronLinear

__all__ = ["KronLinear"]
