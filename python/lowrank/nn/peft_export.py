"""Writing adapters in PEFT's on-disk format: the pieces every exporter shares.

Each adapter family builds its own ``(tensors, adapter_config)`` (``peft_state`` in
:mod:`lowrank.nn.lora`, :mod:`lowrank.nn.bone`, :mod:`lowrank.nn.randlora`,
:mod:`lowrank.nn.adalora`); this module holds what they have in common:

- :func:`adapters`: the adapted layers of a model to export, checked (none merged, at least
  one present);
- :func:`target_regex` / :func:`pattern_key`: module names written so that PEFT matches
  exactly those modules (PEFT matches a ``target_modules`` *list* and the keys of its
  ``rank_pattern``/``alpha_pattern`` as name suffixes);
- :func:`write_folder`: the folder ``peft.PeftModel.from_pretrained(model, folder)`` reads,
  ``adapter_model.safetensors`` (``adapter_model.bin`` without the ``safetensors`` package)
  and ``adapter_config.json``, as ``PeftModel.save_pretrained`` writes it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["adapters", "pattern_key", "target_regex", "write_folder"]


def adapters(model: nn.Module, select: Callable[[nn.Module], bool],
             what: str) -> dict[str, nn.Module]:  # fmt: skip
    """``{name: module}`` of the modules of ``model`` that ``select`` accepts, in module order.

    Raises ValueError naming the layer when one is merged (PEFT stores the change, not the
    merged weight), or naming ``what`` (e.g. ``"BoneAdapter"``) when there is none."""
    found = {}
    for name, module in model.named_modules():
        if not select(module):
            continue
        if getattr(module, "merged", False):
            raise ValueError(f"{name}: unmerge the adapter before saving it for PEFT")
        found[name] = module
    if not found:
        raise ValueError(f"the model holds no {what}")
    return found


def target_regex(names: Iterable[str]) -> str:
    """A ``target_modules`` string that PEFT matches against each module's whole name
    (``re.fullmatch``): exactly ``names``, where a list would also match longer names that
    end in one of them (``"q"`` matches ``"blk.q"``)."""
    return "|".join(f"(?:{re.escape(n)})" for n in sorted(names))


def pattern_key(name: str) -> str:
    r"""A ``rank_pattern``/``alpha_pattern`` key that PEFT matches to the module ``name`` only.

    PEFT tries a key ``k`` as ``(.*\.)?(k)$`` from the start of the module's name, so
    ``^<name>`` (escaped) can match the name itself and nothing that merely ends in it."""
    return f"^{re.escape(name)}"


def write_folder(folder: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 config: dict[str, Any], *,
                 base_model_name_or_path: str | None = None) -> None:  # fmt: skip
    """Writes ``tensors`` (detached, on the CPU, contiguous) and ``config`` (with its
    ``base_model_name_or_path``) into ``folder``, created if needed, as
    ``PeftModel.save_pretrained`` does: ``adapter_model.safetensors`` (``adapter_model.bin``
    without the ``safetensors`` package) and ``adapter_config.json``."""
    config = {**config, "base_model_name_or_path": base_model_name_or_path}
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(tensors, os.path.join(folder, "adapter_model.bin"))
    else:
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
