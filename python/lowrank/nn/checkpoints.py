"""State dicts of the original Monarch and SLTrain code, to and from lowrank's layers.

- Monarch (Dao et al. 2022, ``MonarchLinear`` of the authors' code): parameters
  ``blkdiag1`` ``(nblocks, q, in/nblocks)``, ``blkdiag2`` ``(nblocks, out/nblocks, q)`` and
  ``bias``, in the layout :class:`lowrank.nn.MonarchLinear` uses: the names change, the
  tensors do not.
- SLTrain (Han et al. 2024, ``SpLoRaLinear`` of the authors' code): ``lora_A`` ``(r, in)``,
  ``lora_B`` ``(out, r)``, ``sparse_value`` and ``sparse_index`` (sorted int64 flat
  positions ``row * in + col``) and ``bias``; the weight is
  ``(lora_alpha / r) lora_B lora_A + S``. ``lora_alpha`` is not in the original state
  dict (it is a run setting): :func:`from_original` takes it as ``alpha`` and stores it in
  the layer's extra state. A ``scaling`` entry (trainable scaling, weight
  ``tanh(scaling) lora_B lora_A + S``) is converted the same way.

Both work on whole-model state dicts (any key prefix), so a model converted with
:func:`lowrank.nn.convert` (or built with lowrank's layers) loads a checkpoint of the
original code, and exports one back.
"""

from __future__ import annotations

import math

FORMATS = ("monarch", "sltrain")
_MONARCH = {"blkdiag1": "w1", "blkdiag2": "w2"}
_SLTRAIN = {"lora_A": "A", "lora_B": "B", "sparse_value": "values", "sparse_index": "indices"}


def _renamed(state: dict, names: dict[str, str]) -> dict:
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        new = names.get(leaf)
        out[f"{prefix}.{new}" if prefix and new else new or key] = value
    return out


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def from_original(state_dict: dict, format: str, *, alpha: float | None = None) -> dict:
    """A state dict of the original ``format`` (``"monarch"`` or ``"sltrain"``) with
    lowrank's names, ready for ``load_state_dict`` on lowrank's layers.

    ``alpha``: SLTrain's ``lora_alpha`` (the scale is ``alpha / r``); required for SLTrain
    layers without a trainable ``scaling`` entry.
    """
    _check_format(format)
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    if format == "monarch":
        return _renamed(state_dict, _MONARCH)
    out = _renamed({k: v for k, v in state_dict.items() if not k.endswith("scaling")}, _SLTRAIN)
    for key, a in state_dict.items():
        if not key.endswith("lora_A"):
            continue
        prefix = key[: -len("lora_A")]
        rank = a.shape[0]
        scaling = state_dict.get(prefix + "scaling")
        if scaling is not None:
            layer_alpha = math.tanh(float(scaling.reshape(-1)[0])) * rank
        elif alpha is not None:
            layer_alpha = float(alpha)
        else:
            raise ValueError(f"{prefix}lora_A: SLTrain's scale is lora_alpha / r and lora_alpha "
                             "is not in the state dict; pass alpha=")  # fmt: skip
        extra = out.get(prefix + "_extra_state") or {}
        out[prefix + "_extra_state"] = {**extra, "alpha": layer_alpha}
    return out


def to_original(state_dict: dict, format: str) -> dict:
    """lowrank's state dict with the original code's names (the inverse of
    :func:`from_original`; SLTrain's ``alpha`` is left out, as the original keeps it in its
    run settings, and its support is saved as int64)."""
    _check_format(format)
    names = {v: k for k, v in (_MONARCH if format == "monarch" else _SLTRAIN).items()}
    out = _renamed({k: v for k, v in state_dict.items() if not k.endswith("_extra_state")},
                   names)  # fmt: skip
    if format == "sltrain":
        out = {k: v.long() if k.endswith("sparse_index") else v for k, v in out.items()}
    return out


def original_alpha(state_dict: dict) -> dict[str, float]:
    """The SLTrain ``alpha`` of each layer in a lowrank state dict (for the original code's
    run settings, which :func:`to_original` leaves out)."""
    return {k[: -len("._extra_state")]: v["alpha"] for k, v in state_dict.items()
            if k.endswith("_extra_state") and isinstance(v, dict) and "alpha" in v}  # fmt: skip
