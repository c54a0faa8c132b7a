"""Optimizers for low-rank training: GaLore's gradient projection on lowrank's rsvd.

:class:`GaLoreProjector` is the projection side (the side, the refresh schedule, the
batched warm-started refresh, ``project``/``project_back``, the refresh log), with the
kind of projector pluggable (:class:`Projection`, :class:`SVDProjection`);
:class:`GaLoreAdamW` is AdamW on top of it.
"""

from lowrank.optim.galore import GaLoreAdamW, galore_groups
from lowrank.optim.projector import GaLoreProjector, Projection, Refresh, SVDProjection

__all__ = ["GaLoreAdamW", "GaLoreProjector", "Projection", "Refresh", "SVDProjection",
           "galore_groups"]  # fmt: skip
