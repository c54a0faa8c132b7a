"""``torch.nn`` layers built on lowrank's ops, and whole-model conversion."""

from lowrank.nn import calibration, checkpoints, lora
from lowrank.nn.convert import ConversionReport, LayerReport, convert, unconvert
from lowrank.nn.kron import KronLinear
from lowrank.nn.kron_adapter import KronAdapter
from lowrank.nn.lora import LoRAAdapter
from lowrank.nn.lowrank import LowRankLinear
from lowrank.nn.monarch import MonarchLinear
from lowrank.nn.sltrain import SLTrainLinear

__all__ = [
    "ConversionReport",
    "KronAdapter",
    "KronLinear",
    "LayerReport",
    "LoRAAdapter",
    "LowRankLinear",
    "MonarchLinear",
    "SLTrainLinear",
    "calibration",
    "checkpoints",
    "convert",
    "lora",
    "unconvert",
]
