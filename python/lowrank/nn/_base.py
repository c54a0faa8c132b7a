"""What every structured layer shares with ``nn.Linear`` for the code around it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class OptionalExtraState(nn.Module):
    """A module whose ``_extra_state`` (small Python state kept in the state dict) may be
    missing from a checkpoint without failing a strict load: checkpoints written before
    it existed, or by other implementations, load as they are."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
        key = prefix + "_extra_state"
        if key in missing_keys and key not in state_dict:
            missing_keys.remove(key)


class StructuredLinear(OptionalExtraState):
    """Base of the structured layers: ``in_features`` and ``out_features`` (set by the
    subclass), a read-only :attr:`weight` giving the dense equivalent, and the
    ``projection_error`` of ``from_dense``, which travels with the state dict."""

    in_features: int
    out_features: int
    projection_error: float | None = None

    def to_dense(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` equivalent, computed on access (not a
        parameter): for code that reads ``module.weight`` of a linear layer."""
        return self.to_dense()

    def get_extra_state(self) -> dict[str, Any]:
        return {"projection_error": self.projection_error}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict):
            self.projection_error = state.get("projection_error")


class AdapterLinear(OptionalExtraState):
    """Base of the adapters around a frozen ``nn.Linear`` (``self.base``): the subclass
    gives ``delta_weight()``, the dense ``(out, in)`` change, and keeps ``self.merged``.
    Provides the features, a read-only dense :attr:`weight`, and merging."""

    base: nn.Linear
    merged: bool

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The adapted layer's dense weight, ``W + delta_weight()`` (``W`` alone once merged),
        computed on access (not a parameter): for code that reads ``module.weight``."""
        if self.merged:
            return self.base.weight
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)

    def to_dense(self) -> torch.Tensor:
        """The adapted layer's ``(out_features, in_features)`` weight (see :attr:`weight`)."""
        return self.weight

    @torch.no_grad()
    def merge(self) -> None:
        """Adds the change into the base weight (then forward is the base layer alone)."""
        name = type(self).__name__
        if self.merged:
            raise RuntimeError(f"{name}.merge: the adapter is already merged")
        if (
            not isinstance(self.base.weight, nn.Parameter)
            or not self.base.weight.is_floating_point()
        ):
            raise RuntimeError(
                f"{name}.merge: the base layer ({type(self.base).__name__}) does not hold its "
                "weight as a floating-point parameter, so the change cannot be added to it "
                "exactly; unconvert the base layer first"
            )
        merged = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(f"{name}.merge: the merged weight would contain NaN or Inf")
        self.base.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the change from the base weight again."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: the adapter is not merged")
        self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = False
