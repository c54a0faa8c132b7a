"""Saving a converted model, and loading it onto the original model without recomputing.

:func:`save` writes two files into a directory:

- ``model.safetensors``: the model's state dict (every parameter and buffer; a tensor
  reachable by several names, such as tied weights, once);
- ``lowrank.json``: the format version, every converted module (its names, kind, the
  configuration that made it, the structure its kind needs to rebuild it, the original
  layer's shape and dtype), which names are aliases of a stored tensor, the modules'
  small Python state (``_extra_state``), which parameters are frozen, and the
  :class:`~lowrank.nn.ConversionReport`\\ s given.

:func:`load` takes the original, unconverted model (e.g. straight from ``transformers``'
``from_pretrained``), rebuilds each converted module around or in place of its original
``nn.Linear`` from the description (no decomposition is recomputed), and loads the saved
state. It reads only JSON and safetensors, never pickle, and never runs code from the
directory. Everything is checked before the model is touched: a directory that does not
match the model (a missing module, another shape, dtype or kind, a truncated file, an
unknown format version) raises ``ValueError`` naming the module and the mismatch and
leaves the model as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from lowrank.nn._base import AdapterLinear
from lowrank.nn.convert import _set
from lowrank.nn.registry import _KINDS, kind_of, layer_classes, mark

FORMAT = "lowrank.nn"
VERSION = 1
WEIGHTS = "model.safetensors"
DESCRIPTION = "lowrank.json"

__all__ = ["load", "save"]


def save(model: nn.Module, directory: str | os.PathLike, report=None) -> None:
    """Writes ``model`` (converted by :func:`lowrank.nn.convert`, in one or several calls)
    into ``directory`` (created if needed; the two files are replaced atomically).

    Args:
        model: the converted model.
        directory: where to write ``model.safetensors`` and ``lowrank.json``.
        report: a :class:`~lowrank.nn.ConversionReport` (or a list of them) to keep with
            the model, as JSON.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    reports = [] if report is None else report if isinstance(report, (list, tuple)) else [report]
    for r in reports:
        if not hasattr(r, "to_dict"):
            raise TypeError(f"report must be a ConversionReport, got {type(r).__name__}")
    modules = _converted_modules(model)
    if not modules:
        raise ValueError("the model holds no converted module: save it with torch's own "
                         "state_dict (or convert it first)")  # fmt: skip
    tensors, aliases, extra = {}, {}, {}
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        if not isinstance(value, torch.Tensor):
            extra[key] = _json_checked(key, value)
            continue
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(),
                    tuple(value.shape), tuple(value.stride()), value.dtype)  # fmt: skip
        if value.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value.detach().cpu().contiguous()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    description = {
        "format": FORMAT,
        "version": VERSION,
        "versions": _versions(),
        "modules": modules,
        "aliases": aliases,
        "extra_state": extra,
        "frozen": frozen,
        "reports": [r.to_dict() for r in reports],
    }
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as staging:
        weights = os.path.join(staging, WEIGHTS)
        save_file(tensors, weights, metadata={"format": "pt"})
        text = os.path.join(staging, DESCRIPTION)
        with open(text, "w") as f:
            json.dump(description, f, indent=1)
        os.replace(weights, os.path.join(directory, WEIGHTS))
        os.replace(text, os.path.join(directory, DESCRIPTION))


def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Makes the original model ``model`` identical to the one saved in ``directory``
    (module docstring) and returns it. Raises ``ValueError`` (``FileNotFoundError`` for a
    missing file) before changing anything when the directory does not match the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    description = _read_description(directory)
    state = _read_weights(directory)
    for key, target in description["aliases"].items():
        if target not in state:
            raise ValueError(f"{DESCRIPTION}: the alias {key} names {target}, which "
                             f"{WEIGHTS} does not hold")  # fmt: skip
        state[key] = state[target]
    state.update(description["extra_state"])

    planned = [(entry, _rebuild(model, entry)) for entry in description["modules"]]
    originals = []
    try:
        for entry, new in planned:
            for name in entry["names"]:
                originals.append((name, model.get_submodule(name)))
                _set(model, name, new)
        _check_state(model, state)
        model.load_state_dict(state, strict=True)
    except BaseException:
        for name, module in reversed(originals):
            _set(model, name, module)
        raise
    frozen = set(description["frozen"])
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return model


# ---- saving -------------------------------------------------------------------------------------


def _converted_modules(model: nn.Module) -> list[dict[str, Any]]:
    """The outermost converted modules, each once with all its names."""
    classes = layer_classes()
    entries: dict[int, dict[str, Any]] = {}
    inside: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in inside or not isinstance(module, classes) or not name:
            continue
        if id(module) in entries:
            entries[id(module)]["names"].append(name)
            continue
        inside |= {id(sub) for sub in module.modules() if sub is not module}
        kind, config = kind_of(module)
        entries[id(module)] = {
            "names": [name],
            "kind": kind.name,
            "config": config,
            "structure": _json_checked(name, kind.describe(module)),
            "shape": [module.out_features, module.in_features],
            "dtype": _dtype_name(_module_dtype(module)),
        }
    return list(entries.values())


def _module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the layer the module replaced or wraps."""
    if isinstance(module, AdapterLinear):
        return module.base.weight.dtype
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json_checked(key: str, value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{key}: {type(value).__name__} cannot be saved as JSON (a module's extra state "
            "and its kind's description must be JSON values)"
        ) from None
    return value


def _versions() -> dict[str, str]:
    import lowrank

    return {"lowrank": lowrank.__version__, "torch": torch.__version__}


# ---- loading ------------------------------------------------------------------------------------


def _read_description(directory) -> dict[str, Any]:
    path = os.path.join(directory, DESCRIPTION)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no such directory: {directory}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} holds no {DESCRIPTION}: not a model saved by "
                                "lowrank.nn.save")  # fmt: skip
    try:
        with open(path) as f:
            description = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise ValueError(f"{path} is not a description written by lowrank.nn.save")
    if description.get("version") != VERSION:
        raise ValueError(f"{path} has format version {description.get('version')!r}; this "
                         f"lowrank reads version {VERSION}")  # fmt: skip
    for field in ("modules", "aliases", "extra_state", "frozen"):
        if field not in description:
            raise ValueError(f"{path} lacks the field {field!r}")
    return description


def _read_weights(directory) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} holds no {WEIGHTS}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read (truncated or not safetensors): {error}") from None


def _rebuild(model: nn.Module, entry: dict[str, Any]) -> nn.Module:
    """The empty converted module for one entry, after checking the model's layer there."""
    names, kind_name = entry.get("names") or ["?"], entry.get("kind")
    where = names[0]
    if kind_name not in _KINDS:
        raise ValueError(
            f"module {where}: saved as kind {kind_name!r}, which is not registered "
            f"(registered: {tuple(_KINDS)}); import the code that registers it"
        )
    kind = _KINDS[kind_name]
    layer = None
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"module {name}: the model has no such module") from None
        if isinstance(module, layer_classes()):
            raise ValueError(f"module {name}: already converted ({type(module).__name__}); "
                             "load onto the original, unconverted model")  # fmt: skip
        if not isinstance(module, nn.Linear):
            raise ValueError(f"module {name}: the saved model has a {kind_name} layer here, "
                             f"the model a {type(module).__name__}, not an nn.Linear")  # fmt: skip
        if layer is not None and module is not layer:
            raise ValueError(f"module {name}: the saved model shares one layer between "
                             f"{names}, the model does not")  # fmt: skip
        layer = module
    shape = list(layer.weight.shape)
    if shape != list(entry["shape"]):
        raise ValueError(f"module {where}: saved for an nn.Linear of shape {entry['shape']} "
                         f"(out, in), the model's is {shape}")  # fmt: skip
    dtype = _dtype_name(layer.weight.dtype)
    if dtype != entry["dtype"]:
        raise ValueError(f"module {where}: saved in {entry['dtype']}, the model's layer is "
                         f"{dtype}; load the model in {entry['dtype']}")  # fmt: skip
    try:
        with torch.no_grad():
            new = kind.rebuild(layer, entry["structure"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"module {where}: the saved structure of its {kind_name} layer does "
                         f"not fit it ({type(error).__name__}: {error})") from None  # fmt: skip
    mark(new, kind, entry.get("config"))
    return new


def _check_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Every key the model expects, of the same shape and dtype, and nothing else."""
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        what = "is missing from the saved state" if missing else "is not in the model"
        raise ValueError(
            f"module {_module_of(key)}: {key} {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    for key, value in expected.items():
        saved = state[key]
        if not isinstance(value, torch.Tensor):
            continue
        if not isinstance(saved, torch.Tensor):
            raise ValueError(f"module {_module_of(key)}: {key} is not a tensor in the saved state")
        if tuple(saved.shape) != tuple(value.shape):
            raise ValueError(f"module {_module_of(key)}: {key} is {tuple(saved.shape)} in the "
                             f"saved state, {tuple(value.shape)} in the model")  # fmt: skip
        if saved.dtype != value.dtype:
            raise ValueError(f"module {_module_of(key)}: {key} is {saved.dtype} in the saved "
                             f"state, {value.dtype} in the model")  # fmt: skip


def _module_of(key: str) -> str:
    return key.rpartition(".")[0] or "(the model)"
