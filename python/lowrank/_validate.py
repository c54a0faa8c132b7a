"""Argument checks shared by every lowrank op and layer.

Each check raises ``TypeError`` (wrong kind of object or dtype) or
``ValueError`` (wrong shape, size, device or range) with a message that names
the argument and says what was expected. Native kernels receive only pointers,
so nothing reaches them unchecked.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch

FLOATING = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))

# Ops keep validation off the hot path's budget (a few microseconds per call):
# one combined predicate first, and these itemised checks, which name the
# argument at fault, only when the predicate fails.


def tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


# Sizes, counts and seeds beyond this are no sizes a tensor can have (int64 indexing).
MAX_INT = 2**62


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """A Python int from any integral value (int, NumPy integers; not bool or float)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} "
                        f"{value!r}") from None  # fmt: skip
    if minimum is not None and result < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {result}")
    if abs(result) > MAX_INT:
        raise ValueError(f"{name} = {result} is out of range (at most 2**62)")
    return result


# Power iterations converge within a few dozen steps; a count far beyond is a mistake that
# would run for hours.
MAX_ITERATIONS = 1000


def iterations(name: str, value: Any) -> int:
    """A count of iterations in [0, MAX_ITERATIONS]."""
    result = integer(name, value, 0)
    if result > MAX_ITERATIONS:
        raise ValueError(f"{name} must be at most {MAX_ITERATIONS}, got {result}")
    return result


def real(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite Python float (int, float, NumPy scalars; not bool), within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if (low is not None and result < low) or (high is not None and result > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return result


def floating(name: str, value: Any) -> torch.Tensor:
    """A tensor of a floating dtype lowrank computes in."""
    t = tensor(name, value)
    if t.dtype not in FLOATING:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def ndim(name: str, t: torch.Tensor, expected: int, meaning: str = "") -> None:
    if t.dim() != expected:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be {expected}-D{what}, got shape {tuple(t.shape)}")


def min_ndim(name: str, t: torch.Tensor, expected: int, meaning: str = "") -> None:
    if t.dim() < expected:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(
            f"{name} must have at least {expected} dims{what}, got shape {tuple(t.shape)}"
        )


def size(name: str, t: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name}.shape[{dim}] must be {expected} ({meaning}), got shape {tuple(t.shape)}"
        )


def weight(name: str, value: Any) -> torch.Tensor:
    """A dense layer weight: a finite floating ``(out_features, in_features)`` tensor with
    no zero side (a one-off check, for conversions)."""
    t = floating(name, value)
    ndim(name, t, 2, "(out_features, in_features)")
    if 0 in t.shape:
        raise ValueError(f"{name} must have positive sizes, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def layer_input(x: Any, in_features: int, dtype: torch.dtype) -> None:
    """A layer's input: a tensor of shape ``(..., in_features)`` in the layer's ``dtype`` (or
    any floating dtype under autocast). One predicate on the hot path; the itemised checks
    run only to explain a failure."""
    if (
        isinstance(x, torch.Tensor)
        and x.dim() > 0
        and x.shape[-1] == in_features
        and (x.dtype == dtype or (x.dtype in FLOATING and torch.is_autocast_enabled(x.device.type)))
    ):
        return
    floating("input", x)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"input must have shape (..., in_features) = (..., {in_features}), "
                         f"got {tuple(x.shape)}")  # fmt: skip
    raise TypeError(f"input has dtype {x.dtype} but the layer's parameters {dtype}; they must "
                    "match (or run under torch.autocast)")  # fmt: skip


def same_dtype(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match"
            )


def same_device(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "they must be on one device"
            )


def companion(
    name: str, t: Any, x: torch.Tensor, shape: tuple[int, ...], meaning: str = ""
) -> None:
    """``t`` goes with ``x`` (a gradient, a saved intermediate): a floating tensor of
    ``x``'s dtype and device and of ``shape``. One combined test on the hot path; the
    itemised checks only to explain a failure."""
    tensor(name, t)
    if t.dtype == x.dtype and t.device == x.device and tuple(t.shape) == shape:
        return
    floating(name, t)
    same_dtype(**{name: t, "x": x})
    same_device(**{name: t, "x": x})
    note = f" ({meaning})" if meaning else ""
    raise ValueError(f"{name} must have shape {shape}{note}, got {tuple(t.shape)}")


def positive_int(name: str, value: Any) -> int:
    """A positive Python int (NumPy integers accepted); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if result < 1 or result > MAX_INT:
        raise ValueError(f"{name} must be a positive integer (at most 2**62), got {value!r}")
    return result


def int_pair(name: str, value: Any) -> tuple[int, int]:
    """A pair of positive integers, e.g. a factor shape (rows, cols)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (rows, cols), got {value!r}")
    positive_int(f"{name}[0]", value[0])
    positive_int(f"{name}[1]", value[1])
    return int(value[0]), int(value[1])


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def no_overlap(op: str, out_name: str, out: torch.Tensor, **inputs: torch.Tensor) -> None:
    """An output written in place must not share memory with an input it reads (the kernel
    would read values it has already overwritten)."""
    if out.numel() == 0 or out.device.type == "meta":
        return
    lo, hi = _byte_range(out)
    for name, t in inputs.items():
        if t.numel() == 0 or t.device != out.device:
            continue
        t_lo, t_hi = _byte_range(t)
        if t_lo < hi and lo < t_hi:
            raise ValueError(
                f"{op}: {out_name} overlaps {name} in memory; the in-place update would read "
                f"values it has already overwritten (pass a copy of {name})"
            )
