"""Optimizers for low-rank training: GaLore's gradient projection on lowrank's rsvd.

:class:`GaLoreProjector` is the projection side (the side, the refresh schedule, the
batched warm-started refresh, ``project``/``project_back``, the refresh log), with the
kind of projector pluggable (:class:`Projection`, :class:`SVDProjection`);
:class:`GaLoreAdamW` is AdamW on top of it.
"""

from lowrank.optim.galore import GaLoreAdamW, galore_groups
from lowrank.optim.layerwise import LayerwiseUpdates, layerwise
from lowrank.optim.lora_pro import LoRAPro
from lowrank.optim.projector import (
    DCTProjection,
    GaLoreProjector,
    LazyGaLoreProjector,
    Projection,
    QuantizedProjection,
    RandomProjection,
    Refresh,
    SVDProjection,
)
from lowrank.optim.wrapper import GaLore

__all__ = ["DCTProjection", "GaLore", "GaLoreAdamW", "GaLoreProjector", "LayerwiseUpdates",
           "LazyGaLoreProjector", "LoRAPro", "Projection", "QuantizedProjection",
           "RandomProjection", "Refresh", "SVDProjection", "galore_groups",
           "layerwise"]  # fmt: skip
