"""Optimizers for low-rank training: GaLore's gradient projection on lowrank's rsvd."""

from lowrank.optim.galore import GaLoreAdamW, galore_groups

__all__ = ["GaLoreAdamW", "galore_groups"]
