"""``torch.nn`` layers built on lowrank's ops."""

from lowrank.nn.kron import KronLinear
from lowrank.nn.kron_adapter import KronAdapter
from lowrank.nn.monarch import MonarchLinear
from lowrank.nn.sltrain import SLTrainLinear

__all__ = ["KronAdapter", "KronLinear", "MonarchLinear", "SLTrainLinear"]
