"""``torch.nn`` layers built on lowrank's ops, whole-model conversion, and saving.

Each conversion kind registers itself next to its layer (:mod:`lowrank.nn.registry`):
``kinds()`` lists them, ``register_kind`` adds one from user code.
"""

from lowrank.nn import adalora, calibration, checkpoints, lora, registry, svd_methods
from lowrank.nn.adalora import AdaLoRAAdapter, AdaLoRAConfig
from lowrank.nn.allora import ALLoRAAdapter, ALLoRAConfig
from lowrank.nn.bone import BoneAdapter, BoneConfig
from lowrank.nn.compensate import CompensationReport, compensate
from lowrank.nn.convert import ConversionReport, LayerReport, convert, unconvert
from lowrank.nn.kron import KronConfig, KronLinear
from lowrank.nn.kron_adapter import KronAdapter, KronAdapterConfig
from lowrank.nn.lora import LoRAAdapter, LoRAConfig
from lowrank.nn.lowrank import LowRankConfig, LowRankLinear
from lowrank.nn.monarch import MonarchConfig, MonarchLinear
from lowrank.nn.randlora import RandLoRAAdapter, RandLoRAConfig
from lowrank.nn.registry import ConversionContext, KindConfig, kinds, register_kind
from lowrank.nn.saving import load, save
from lowrank.nn.sltrain import SLTrainConfig, SLTrainLinear
from lowrank.nn.svd_adapter import SVDAdapter
from lowrank.nn.svd_methods import (
    LoLDUAdapter,
    LoLDUConfig,
    LoRASBAdapter,
    LoRASBConfig,
    LoRAXSAdapter,
    LoRAXSConfig,
    SORSAAdapter,
    SORSAConfig,
    SVFitAdapter,
    SVFitConfig,
)

__all__ = [
    "ALLoRAAdapter",
    "ALLoRAConfig",
    "AdaLoRAAdapter",
    "AdaLoRAConfig",
    "BoneAdapter",
    "BoneConfig",
    "CompensationReport",
    "ConversionContext",
    "ConversionReport",
    "KindConfig",
    "KronAdapter",
    "KronAdapterConfig",
    "KronConfig",
    "KronLinear",
    "LayerReport",
    "LoLDUAdapter",
    "LoLDUConfig",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRASBAdapter",
    "LoRASBConfig",
    "LoRAXSAdapter",
    "LoRAXSConfig",
    "LowRankConfig",
    "LowRankLinear",
    "MonarchConfig",
    "MonarchLinear",
    "RandLoRAAdapter",
    "RandLoRAConfig",
    "SLTrainConfig",
    "SLTrainLinear",
    "SORSAAdapter",
    "SORSAConfig",
    "SVDAdapter",
    "SVFitAdapter",
    "SVFitConfig",
    "adalora",
    "calibration",
    "checkpoints",
    "compensate",
    "convert",
    "kinds",
    "load",
    "lora",
    "register_kind",
    "registry",
    "save",
    "svd_methods",
    "unconvert",
]
