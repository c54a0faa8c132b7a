"""Conversion kinds: every way of turning an ``nn.Linear`` into a lowrank layer, described once.

A kind is a :class:`Kind`: its name, a configuration dataclass holding its options and
their defaults (one subclass of :class:`KindConfig` per kind), the layer classes it
produces, whether it is an adapter (the base layer stays, frozen, and the kind adds a
change to it) and whether it reads calibration statistics, plus four functions:

- ``plan(context, config)``: called once per :func:`lowrank.nn.convert` call with the
  :class:`ConversionContext` (the targeted layers, calibration statistics, the budget); it
  returns ``make(name, linear) -> (module or None, note)``, which builds the new module for
  one layer (``None`` leaves the layer as it is, with ``note`` as the reason). Budget
  allocation across layers happens here, before the first ``make``.
- ``describe(module) -> dict``: what :func:`rebuild` needs to recreate the module's
  structure (sizes, not values), as JSON.
- ``rebuild(linear, description) -> module``: a module of that structure around or in
  place of the original ``linear``, cheaply (no decomposition): its values are then loaded
  from a saved state dict by :func:`lowrank.nn.load`.

Each kind registers itself next to its layer (``lowrank/nn/<layer>.py``) with
:func:`register_kind`; a kind defined outside the package registers the same way and then
converts, unconverts, saves and loads like a built-in one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "ConversionContext",
    "Kind",
    "KindConfig",
    "get_kind",
    "kind_of",
    "kinds",
    "register_kind",
]


@dataclass
class KindConfig:
    """Base of the kinds' configuration dataclasses: the options of one kind, with their
    defaults. Subclasses validate their fields in ``__post_init__``."""

    @classmethod
    def from_options(cls, kind: str, options: Mapping[str, Any]) -> KindConfig:
        """The configuration from keyword options; an unknown option raises ``ValueError``
        naming the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"convert to {kind}: unknown options {unknown}; the options of "
                             f"{kind} are {names}")  # fmt: skip
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (dtypes as their names, tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


Make = Callable[[str, nn.Linear], "tuple[nn.Module | None, str]"]


@dataclass
class ConversionContext:
    """What a kind's ``plan`` sees of one :func:`lowrank.nn.convert` call.

    Attributes:
        model: the model being converted.
        linears: the targeted layers by (first) name, in model order.
        stats: their calibration input statistics by name (empty without calibration or
            when the kind does not use it).
        batches: the calibration batches (``None`` without).
        params: the parameter budget, a fraction of the targeted weights (or ``None``).
        allocation: ``"global"``, ``"uniform"`` or ``"welore"`` (how a budget is spread:
            :data:`lowrank.nn.allocation.ALLOCATIONS`).
        report: the :class:`~lowrank.nn.ConversionReport` being filled; a plan sets its
            ``allocation`` text (and ``compressible``, if it classifies layers).
        progress: whether progress bars are shown.
    """

    model: nn.Module
    linears: dict[str, nn.Linear]
    stats: dict[str, Any] = field(default_factory=dict)
    batches: list | None = None
    params: float | None = None
    allocation: str = "global"
    report: Any = None
    progress: bool = False

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``(out_features, in_features)`` of every targeted layer."""
        return {name: tuple(linear.weight.shape) for name, linear in self.linears.items()}

    @property
    def grams(self) -> dict[str, torch.Tensor]:
        """The input statistics ``sum_t x_t x_t^T`` of every calibrated layer."""
        return {name: st.gram for name, st in self.stats.items()}


@dataclass(frozen=True)
class Kind:
    """One conversion kind (module docstring). ``calibration`` is ``"none"`` (ignores
    calibration data), ``"optional"`` (fits better with it) or a callable
    ``config -> bool`` saying whether this configuration reads it."""

    name: str
    config: type[KindConfig]
    layers: tuple[type[nn.Module], ...]
    plan: Callable[[ConversionContext, KindConfig], Make]
    describe: Callable[[nn.Module], dict]
    rebuild: Callable[[nn.Linear, dict], nn.Module]
    adapter: bool = False
    calibration: str | Callable[[KindConfig], bool] = "none"
    budget: bool = True  # takes convert(..., params=)

    def uses_calibration(self, config: KindConfig) -> bool:
        if callable(self.calibration):
            return bool(self.calibration(config))
        return self.calibration != "none"


_KINDS: dict[str, Kind] = {}


def register_kind(
    name: str,
    *,
    config: type[KindConfig],
    layers: type[nn.Module] | tuple[type[nn.Module], ...],
    plan: Callable[[ConversionContext, KindConfig], Make],
    describe: Callable[[nn.Module], dict],
    rebuild: Callable[[nn.Linear, dict], nn.Module],
    adapter: bool = False,
    calibration: str | Callable[[KindConfig], bool] = "none",
    budget: bool | None = None,
    replace: bool = False,
) -> Kind:
    """Registers a conversion kind under ``name`` (see the module docstring for the
    functions). ``budget`` (default: not ``adapter``) says whether the kind takes
    ``convert(..., params=)``. Registering a taken name raises unless ``replace``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier string, got {name!r}")
    if not (isinstance(config, type) and issubclass(config, KindConfig)):
        raise TypeError(f"config must be a KindConfig dataclass, got {config!r}")
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config {config.__name__} must be a dataclass")
    layers = layers if isinstance(layers, tuple) else (layers,)
    if not layers or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in layers):
        raise TypeError("layers must be nn.Module classes")
    for what, fn in (("plan", plan), ("describe", describe), ("rebuild", rebuild)):
        if not callable(fn):
            raise TypeError(f"{what} must be callable")
    if not (callable(calibration) or calibration in ("none", "optional")):
        raise ValueError(f"calibration must be 'none', 'optional' or a callable, got "
                         f"{calibration!r}")  # fmt: skip
    if name in _KINDS and not replace:
        raise ValueError(f"a conversion kind {name!r} is already registered (replace=True to "
                         "replace it)")  # fmt: skip
    kind = Kind(name, config, layers, plan, describe, rebuild, bool(adapter), calibration,
                (not adapter) if budget is None else bool(budget))  # fmt: skip
    _KINDS[name] = kind
    return kind


def kinds() -> tuple[str, ...]:
    """The names of the registered conversion kinds."""
    return tuple(_KINDS)


def get_kind(kind: str | KindConfig | Kind) -> Kind:
    """The registered :class:`Kind` for a name, a configuration instance or a Kind."""
    if isinstance(kind, Kind):
        return kind
    if isinstance(kind, KindConfig):
        found = [k for k in _KINDS.values() if type(kind) is k.config]
        if not found:
            raise ValueError(f"{type(kind).__name__} is not the configuration of a registered "
                             f"kind; registered: {kinds()}")  # fmt: skip
        return found[0]
    if isinstance(kind, str) and kind in _KINDS:
        return _KINDS[kind]
    raise ValueError(f"kind must be one of {kinds()} (or a configuration instance), got "
                     f"{kind!r}")  # fmt: skip


# The kind that made a module, remembered on the module by convert (and by load).
_KIND_ATTRIBUTE = "_lowrank_kind"


def mark(module: nn.Module, kind: Kind, config: KindConfig | dict | None) -> None:
    """Remembers on ``module`` that ``kind`` (with ``config``, kept as a dict) made it."""
    if isinstance(config, KindConfig):
        config = config.to_dict()
    object.__setattr__(module, _KIND_ATTRIBUTE, (kind.name, config))


def kind_of(module: nn.Module) -> tuple[Kind, dict | None] | None:
    """``(kind, configuration dict)`` for a module a kind made, else ``None``: the kind
    :func:`lowrank.nn.convert` recorded, or for a layer built directly (e.g. by
    ``from_dense``) the first registered kind producing its class, with an unknown
    configuration (``None``)."""
    recorded = getattr(module, _KIND_ATTRIBUTE, None)
    if recorded is not None and recorded[0] in _KINDS:
        return _KINDS[recorded[0]], recorded[1]
    for k in _KINDS.values():
        if type(module) in k.layers:
            return k, None
    return None


def layer_classes() -> tuple[type[nn.Module], ...]:
    """Every class a registered kind produces."""
    return tuple({c: None for k in _KINDS.values() for c in k.layers})
