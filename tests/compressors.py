"""Weight compressors for the compensation tests, in the forms compressed layers take.

- :func:`rtn_quantize`: round-to-nearest, asymmetric (scale and zero point per group),
  ``bits`` bits per weight in groups of ``group`` consecutive inputs; codes and the
  dequantized weight.
- :func:`prune_2_4`: of every 4 consecutive inputs the 2 of smallest magnitude are zeroed
  (2:4 semi-structured sparsity); :func:`prune_magnitude`: the smallest ``sparsity`` of a
  matrix's entries, unstructured.
- The compressed weight held as a plain ``nn.Linear`` (fake quantization), inside a
  :class:`QuantizedLinear` module that stores codes and exposes ``.weight``, or as a
  :class:`PackedWeight` tensor subclass with ``dequantize()`` (as torchao's weights are):
  :func:`compress`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group: int = 128):
    """``(codes, scale, zero, dequantized)``: ``codes`` (uint8, ``weight``'s shape) in
    ``[0, 2^bits)``, per group of ``group`` inputs a ``scale`` and integer ``zero`` with
    ``dequantized = (codes - zero) * scale``; a group's minimum and maximum map to the ends
    of the code range. ``in_features`` must be a multiple of ``group``."""
    out, inp = weight.shape
    assert inp % group == 0, (inp, group)
    w = weight.detach().double().reshape(out, inp // group, group)
    lo = w.amin(-1, keepdim=True).clamp_max(0.0)
    hi = w.amax(-1, keepdim=True).clamp_min(0.0)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero = (-lo / scale).round()
    codes = (w / scale + zero).round().clamp(0, levels)
    dequantized = ((codes - zero) * scale).reshape(out, inp).to(weight.dtype)
    return codes.to(torch.uint8).reshape(out, inp), scale, zero, dequantized


def dequantize(codes, scale, zero, dtype):
    out, inp = codes.shape
    groups = scale.shape[1]
    w = (codes.double().reshape(out, groups, -1) - zero) * scale
    return w.reshape(out, inp).to(dtype)


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """The weight with the 2 smallest-magnitude entries of every 4 consecutive inputs zeroed."""
    out, inp = weight.shape
    groups = weight.detach().reshape(out, inp // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(out, inp)


def prune_magnitude(weight: torch.Tensor, sparsity: float = 0.5) -> torch.Tensor:
    """The weight with its ``sparsity`` fraction of smallest-magnitude entries zeroed."""
    w = weight.detach()
    drop = int(sparsity * w.numel())
    threshold = w.abs().flatten().kthvalue(drop).values
    return torch.where(w.abs() > threshold, w, torch.zeros_like(w))


class QuantizedLinear(nn.Module):
    """A linear layer storing RTN codes (no floating weight parameter); ``weight`` is the
    dequantized matrix, computed on access."""

    def __init__(self, linear: nn.Linear, bits: int = 4, group: int = 128):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scale, zero, _ = rtn_quantize(linear.weight, bits, group)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero", zero.float())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.dtype = linear.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale.double(), self.zero.double(), self.dtype)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class PackedWeight(torch.Tensor):
    """RTN codes posing as a floating weight: every op but ``detach`` sees the dequantized
    matrix; ``copy_`` (writing into it) is refused, as a packed format would."""

    @staticmethod
    def __new__(cls, codes, scale, zero, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype,
                                                   device=codes.device)  # fmt: skip

    def __init__(self, codes, scale, zero, dtype):
        self.codes, self.scale, self.zero = codes, scale, zero

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.dtype)

    def __repr__(self):
        return f"PackedWeight(shape={tuple(self.shape)})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            t = args[0]
            return PackedWeight(t.codes, t.scale, t.zero, t.dtype)
        if func in (torch.ops.aten.copy_.default, torch.ops.aten.sub_.Tensor):
            raise NotImplementedError("a PackedWeight cannot be written to")

        def unwrap(t):
            return t.dequantize() if isinstance(t, PackedWeight) else t

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


def compress(model: nn.Module, how: str, form: str = "linear") -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` compressed: ``how`` is ``"rtn"`` (4 bits,
    groups of 128 or of the whole row when ``in_features`` is smaller), ``"2:4"`` or
    ``"magnitude"`` (50%). ``form``: ``"linear"`` (the compressed weight in an
    ``nn.Linear``), ``"module"`` (:class:`QuantizedLinear`) or ``"packed"`` (an
    ``nn.Linear`` holding a :class:`PackedWeight`); the last two are for ``"rtn"``."""
    model = copy.deepcopy(model)
    for name, linear in list(model.named_modules()):
        if not isinstance(linear, nn.Linear):
            continue
        group = min(128, linear.in_features)
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        if form == "module":
            setattr(owner, attr, QuantizedLinear(linear, 4, group))
            continue
        if form == "packed":
            codes, scale, zero, _ = rtn_quantize(linear.weight, 4, group)
            packed = PackedWeight(codes, scale, zero, linear.weight.dtype)
            linear.weight = nn.Parameter(packed, requires_grad=False)
            continue
        with torch.no_grad():
            if how == "rtn":
                linear.weight.copy_(rtn_quantize(linear.weight, 4, group)[3])
            elif how == "2:4":
                linear.weight.copy_(prune_2_4(linear.weight))
            else:
                linear.weight.copy_(prune_magnitude(linear.weight, 0.5))
    return model
