"""What every structured layer shares with ``nn.Linear`` for the code around it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank import _validate as check


def check_dropout(value: Any) -> float:
    """An adapter's input dropout probability, a real number in ``[0, 1)``."""
    value = check.real("dropout", value, 0.0, 1.0)
    if value >= 1.0:
        raise ValueError("dropout must be in [0, 1)")
    return value


def config_dtype(value: Any) -> torch.dtype | None:
    """An adapter config's ``dtype``: ``None``, a floating ``torch.dtype``, or its name as
    written in a config file (``"float32"``)."""
    if isinstance(value, str):
        value = getattr(torch, value, None)
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {value!r}")
    return value


def check_base(base: Any) -> tuple[int, int]:
    """The layer an adapter wraps, an ``nn.Linear``: its ``(out_features, in_features)``."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
    out_features, in_features = base.weight.shape
    return out_features, in_features


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

    def _attach_base(self, base: nn.Linear, dropout: float) -> None:
        """Checks and freezes ``base`` (checked by :func:`check_base`) and keeps it, unmerged,
        with the input dropout (already checked by :func:`check_dropout`). A base on the
        meta device (a structure to load values into later) has no values to check."""
        if base.weight.is_meta:
            check.floating("base.weight", base.weight)
        else:
            check.weight("base.weight", base.weight)
        base.requires_grad_(False)
        self.base = base
        self.merged = False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _factory_kwargs(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """``device`` and ``dtype`` for the adapter's tensors: the base's device, and
        ``dtype`` or else the base's."""
        return {"device": self.base.weight.device, "dtype": dtype or self.base.weight.dtype}

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
