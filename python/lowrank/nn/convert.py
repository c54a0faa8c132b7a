"""Whole models: every targeted ``nn.Linear`` turned into a structured layer in one call.

:func:`convert` walks the model, replaces each targeted linear layer by the closest layer
of the requested kind (each kind's ``from_dense``) or wraps it in an adapter, and returns
a :class:`ConversionReport`. :func:`unconvert` turns every lowrank layer back into an
``nn.Linear`` holding its dense equivalent, so a converted model exports to any runtime.

Budgets. ``rank=`` (or the kind's own size knob) applies one size to every layer;
``params=f`` keeps the fraction ``f`` of the targeted layers' weight parameters. For
``"lowrank"`` a budget is allocated across layers (``allocation="global"``, the default):
each rank-one component of each layer is worth its squared singular value (the squared
output error it removes: of the whitened weight with calibration data) times the
sensitivity of the model's output to that layer, and components are taken by worth per
parameter until the budget is spent (a greedy knapsack, optimal for these separable
concave gains). The sensitivity is measured with a few backward passes of random probes
through the model on a calibration batch (``lowrank.nn.calibration.output_sensitivity``).
Without calibration data a component is worth its squared singular value alone: the
allocation minimises the total squared weight error ``sum_l ||W_l - W'_l||_F^2``, the
output error for inputs of unit scale and equal sensitivity everywhere (normalising each
layer's spectrum by its total energy instead does worse than a uniform rank on
all-MiniLM-L6-v2). ``allocation="uniform"`` gives every layer the rank that
spends the same budget.

Calibration. ``calibration=batches`` runs the model over the batches with hooks on the
targeted layers and fits each layer's *outputs* on them instead of its weight:
``"lowrank"`` and the low-rank part of ``"sltrain"`` by the whitened SVD (SVD-LLM),
``"monarch"`` by a per-input-feature weighting (the diagonal of the input statistics, which
keeps the fit a Monarch projection). ``"kron"`` and the adapters ignore it.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.linalg import cholesky_damped
from lowrank.linalg.error import relative_residual
from lowrank.nn import calibration as calib
from lowrank.nn._base import AdapterLinear
from lowrank.nn.allocation import ALLOCATIONS
from lowrank.nn.registry import ConversionContext, Kind, KindConfig, get_kind, mark
from lowrank.nn.registry import layer_classes as _layer_classes


@dataclass
class LayerReport:
    """One layer of a conversion (or a skipped one, with the reason as ``note``)."""

    name: str
    kind: str
    shape: tuple[int, int]  # (out_features, in_features)
    params_before: int
    params_after: int
    weight_error: float | None = None  # ||W - W'||_F / ||W||_F
    output_error: float | None = None  # the same on the calibration data's outputs
    seconds: float = 0.0
    note: str = ""


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``layers`` converted, ``skipped`` ones with reasons, the
    converted ``model`` and the totals; ``print(report)`` gives a table."""

    kind: str
    model: nn.Module
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[LayerReport] = field(default_factory=list)
    allocation: str = ""
    calibration_seconds: float = 0.0
    seconds: float = 0.0
    # Per targeted layer, whether the allocation judged it a low-rank component (filled by
    # allocation="welore"; the others are left dense, in ``skipped``).
    compressible: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON values (without the model)."""
        return {
            "kind": self.kind,
            "allocation": self.allocation,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "ratio": self.ratio,
            "seconds": self.seconds,
            "calibration_seconds": self.calibration_seconds,
            "layers": [_layer_dict(r) for r in self.layers],
            "skipped": [_layer_dict(r) for r in self.skipped],
            "compressible": dict(self.compressible),
        }

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Parameters after over before, over the converted layers."""
        return self.params_after / max(1, self.params_before)

    def __str__(self) -> str:
        head = (
            f"{'layer':48s} {'shape':>12s} {'params':>19s} {'w.err':>7s} {'out.err':>7s} {'s':>6s}"
        )
        lines = [f"convert to {self.kind}" + (f" ({self.allocation})" if self.allocation else ""),
                 head, "-" * len(head)]  # fmt: skip
        for r in self.layers:
            err = "" if r.weight_error is None else f"{r.weight_error:7.4f}"
            out = "" if r.output_error is None else f"{r.output_error:7.4f}"
            shape = f"{r.shape[0]}x{r.shape[1]}"
            params = f"{r.params_before}->{r.params_after}"
            lines.append(f"{r.name[-48:]:48s} {shape:>12s} {params:>19s} {err:>7s} {out:>7s} "
                         f"{r.seconds:6.2f} {r.note}")  # fmt: skip
        for r in self.skipped:
            lines.append(f"{r.name[-48:]:48s} skipped: {r.note}")
        lines.append(
            f"total: {self.params_before} -> {self.params_after} parameters "
            f"({100 * self.ratio:.1f}%) in {len(self.layers)} layers, "
            f"{self.seconds:.1f} s (calibration {self.calibration_seconds:.1f} s)"
        )
        return "\n".join(lines)


def _layer_dict(layer: LayerReport) -> dict[str, Any]:
    d = dataclasses.asdict(layer)
    d["shape"] = list(layer.shape)
    return d


# ---- which layers -------------------------------------------------------------------------------


def _matches(name: str, module: nn.Module, filter) -> bool:
    if filter is None:
        return True
    if callable(filter):
        return bool(filter(name, module))
    if isinstance(filter, str):  # PEFT: a string is a regular expression on the full name
        return re.fullmatch(filter, name) is not None
    return any(name == t or name.endswith("." + t) for t in filter)  # PEFT's list semantics


def _check_filter(filter) -> None:
    if filter is None or callable(filter) or isinstance(filter, str):
        return
    if isinstance(filter, Sequence) and all(isinstance(t, str) for t in filter):
        return
    raise TypeError("filter must be a callable (name, module) -> bool, a regular expression or "
                    f"a list of module names, got {type(filter).__name__}")  # fmt: skip


def _own_forward(module: nn.Module) -> bool:
    """A subclass of ``nn.Linear`` whose forward is not ``nn.Linear``'s (quantized layers
    such as bitsandbytes' ``Linear8bitLt``): its weight alone does not say what it computes."""
    return type(module).forward is not nn.Linear.forward


def _targets(model: nn.Module, filter, report: ConversionReport, kind: Kind):
    """``[(names, linear)]``: each targeted linear once, with every name it is reachable by
    (a module shared by two parents is converted once and stays shared). Skipped with the
    reason: a linear whose weight is tied to another module (converting it would untie the
    two), one whose weight ``nn.MultiheadAttention`` reads directly, and for the kinds that
    replace the layer one with a forward of its own or a weight that is not floating point.
    The layers inside lowrank's own modules (an adapter's frozen base) are never targets."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    # nn.MultiheadAttention reads its out_proj's weight directly instead of calling it.
    read_directly = {id(m.out_proj) for m in model.modules()
                     if isinstance(m, nn.MultiheadAttention)}  # fmt: skip
    inside = {id(sub) for m in model.modules() if isinstance(m, _layer_classes())
              for sub in m.modules() if sub is not m}  # fmt: skip
    groups: dict[int, tuple[list[str], nn.Linear]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, nn.Linear) or not name or id(module) in inside:
            continue
        if not _matches(name, module, filter):
            continue
        note = ""
        if id(module) in read_directly:
            note = "nn.MultiheadAttention uses its weight, not its forward"
        elif not kind.adapter and _own_forward(module):
            note = f"{type(module).__name__} has a forward of its own"
        elif not kind.adapter and not module.weight.is_floating_point():
            note = f"its weight is {module.weight.dtype}, not floating point"
        if note:
            count = _count(module)
            report.skipped.append(LayerReport(name, report.kind, tuple(module.weight.shape),
                                              count, count, note=note))  # fmt: skip
            continue
        groups.setdefault(id(module), ([], module))[0].append(name)
    targets = []
    for names, linear in groups.values():
        own = {f"{n}.weight" for n in names}
        sharers = [o for o in owners.get(id(linear.weight), []) if o not in own]
        if sharers:
            out, inp = linear.weight.shape
            count = _count(linear)
            note = f"weight tied to {sharers[0]}"
            report.skipped.append(LayerReport(names[0], report.kind, (out, inp), count, count,
                                              note=note))  # fmt: skip
            continue
        targets.append((names, linear))
    return targets


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


# ---- the conversion -----------------------------------------------------------------------------


def convert(
    model: nn.Module,
    kind: str | KindConfig,
    *,
    filter: Callable[[str, nn.Module], bool] | str | Sequence[str] | None = None,
    inplace: bool = True,
    progress: bool = True,
    calibration: Any = None,
    params: float | None = None,
    allocation: str = "global",
    freeze: bool | None = None,
    **options,
) -> ConversionReport:
    """Converts the targeted ``nn.Linear`` layers of ``model`` to ``kind``.

    Args:
        model: any module; only ``nn.Linear`` (and subclasses) are touched.
        kind: the name of a registered kind (:func:`lowrank.nn.kinds`) with its options as
            keyword arguments, or a configuration instance (e.g.
            ``lowrank.nn.LoRAConfig(rank=16)``). Built in: ``"lowrank"``, ``"monarch"``,
            ``"sltrain"``, ``"kron"`` (each from the dense weight by the layer's
            ``from_dense``), or an adapter around the frozen layer: ``"kron_adapter"``,
            ``"lora"``.
        filter: which layers: a callable ``(name, module) -> bool``, a regular expression
            matched against the full name, or a list of names matched as PEFT's
            ``target_modules`` (equal to, or ending in ``"." + name``). Default: all.
        inplace: convert ``model`` itself, else a deep copy (``report.model`` either way).
        progress: a progress bar over layers (and calibration batches).
        calibration: batches to fit the layers' outputs on (module docstring): each is
            passed as ``model(**batch)``, ``model(*batch)`` or ``model(batch)``.
        params: keep this fraction of the targeted layers' weight parameters (structured
            kinds); with ``allocation`` ``"global"`` (lowrank: across layers, see the
            module docstring), ``"uniform"`` or ``"welore"`` (lowrank: WeLore's threshold
            on the normalised spectra, which also leaves the layers that are not low-rank
            components dense; :class:`LowRankConfig`).
        freeze: afterwards only the new layers train: every other parameter of the model
            gets ``requires_grad=False``. Default: True for the adapters (as PEFT's
            ``get_peft_model`` does; their base layers are frozen either way), False for
            the structured kinds.
        options: the kind's own, the fields of its configuration dataclass
            (:class:`LowRankConfig`, :class:`MonarchConfig`, :class:`SLTrainConfig`,
            :class:`KronConfig`, :class:`KronAdapterConfig`, :class:`LoRAConfig`, whose
            docstrings give the defaults). An unknown option raises ``ValueError`` naming
            the valid ones.

    Returns:
        A :class:`ConversionReport`: per layer its shape, parameters before and after,
        relative errors and time; tied or skipped layers with the reason; totals.

    Raises:
        ValueError: for an unknown kind or option, a bad budget, or when nothing would be
            converted (no layer matches the filter, or every match is skipped: the reasons
            are in the message).
    """
    spec = get_kind(kind)
    if isinstance(kind, KindConfig):
        if options:
            raise ValueError(f"give the options of {spec.name} in its configuration or as "
                             f"keywords, not both (got {sorted(options)})")  # fmt: skip
        config = kind
    else:
        config = spec.config.from_options(spec.name, options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_filter(filter)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if params is not None:
        params = check.real("params", params, 0.0, 1.0)
        if params == 0.0:
            raise ValueError("params must be a fraction in (0, 1]")
        if not spec.budget:
            raise ValueError(f"params= is for the structured kinds; {spec.name} adds an adapter")
    start = time.perf_counter()
    model = model if inplace else copy.deepcopy(model)
    report = ConversionReport(spec.name, model)
    targets = _targets(model, filter, report, spec)
    if not targets:
        raise ValueError(_nothing_to_convert(model, filter, report))
    batches = None if calibration is None else _materialise(calibration)
    linears = {names[0]: linear for names, linear in targets}
    context = ConversionContext(
        model,
        linears,
        batches=batches,
        params=params,
        allocation=allocation,
        report=report,
        progress=progress,
    )
    if batches is not None and spec.uses_calibration(config):
        t0 = time.perf_counter()
        context.stats = calib.input_statistics(model, batches, linears, progress=progress)
        report.calibration_seconds = time.perf_counter() - t0
    make = spec.plan(context, config)
    new_layers = []
    for names, linear in _bar(targets, progress, f"convert to {spec.name}"):
        t0 = time.perf_counter()
        new, note = make(names[0], linear)
        if new is None:  # the plan leaves this layer as it is
            count = _count(linear)
            report.skipped.append(LayerReport(names[0], spec.name, tuple(linear.weight.shape),
                                              count, count, note=note))  # fmt: skip
            continue
        mark(new, spec, config)
        new_layers.append(new)
        for name in names:
            _set(model, name, new)
        gram = context.stats[names[0]].gram if names[0] in context.stats else None
        report.layers.append(_layer_report(names, linear, new, spec, gram,
                                           time.perf_counter() - t0, note))  # fmt: skip
    if freeze is None:
        freeze = spec.adapter
    if freeze:
        _freeze_all_but(model, new_layers)
    report.seconds = time.perf_counter() - start
    return report


def _nothing_to_convert(model: nn.Module, filter, report: ConversionReport) -> str:
    head = f"nothing to convert to {report.kind}: "
    if isinstance(model, nn.Linear):
        return head + ("the model is itself an nn.Linear: convert a module that holds it "
                       "(e.g. nn.Sequential(linear)), or use the layer's from_dense")  # fmt: skip
    own = " (lowrank's own layers and the bases of adapters are never targets)"
    if report.skipped:
        reasons = "; ".join(f"{r.name}: {r.note}" for r in report.skipped[:5])
        return head + f"every match was skipped ({reasons}){own}"
    if filter is not None:
        return head + f"no nn.Linear of the model matches filter={filter!r}{own}"
    return head + f"the model has no nn.Linear{own}"


def _freeze_all_but(model: nn.Module, layers: list[nn.Module]) -> None:
    keep = set()
    for layer in layers:
        own = layer.named_parameters()
        keep |= {id(p) for name, p in own if not name.startswith("base.")}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def _materialise(calibration) -> list:
    """The calibration batches as a list: a tensor or a mapping is one batch, any other
    iterable holds batches. A tuple of tensors is refused: it reads as one batch for
    ``model(*batch)`` as readily as several batches, and the wrong reading would collect
    wrong statistics without a sign."""
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [calibration]  # one batch
    if (isinstance(calibration, tuple) and calibration
            and all(isinstance(b, torch.Tensor) for b in calibration)):  # fmt: skip
        raise ValueError(f"calibration is a tuple of {len(calibration)} tensors: one batch for "
                         "model(*batch), or that many batches? Pass a list: [batch] for one "
                         "batch, or list(batches)")  # fmt: skip
    try:
        batches = list(calibration)
    except TypeError:
        raise TypeError("calibration must be an iterable of batches (or one batch), got "
                        f"{type(calibration).__name__}") from None  # fmt: skip
    if not batches:
        raise ValueError("calibration holds no batches")
    return batches


def _layer_report(names, linear, new, kind: Kind, gram, seconds, note) -> LayerReport:
    out, inp = linear.weight.shape
    report = LayerReport(names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} tied)",
                         kind.name, (out, inp), _count(linear), _count(new), seconds=seconds,
                         note=note)  # fmt: skip
    if kind.adapter:  # the base stays and the adapter adds to it
        return report
    with torch.no_grad():
        w, dense = linear.weight.detach().double(), new.to_dense().detach().double()
        report.weight_error = relative_residual(w, dense)
        if gram is not None:
            factor = cholesky_damped(gram)
            report.output_error = relative_residual(w @ factor, dense @ factor)
    return report


def _bar(items, progress, desc):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


# ---- back to dense ------------------------------------------------------------------------------


def unconvert(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Every lowrank layer back to an ``nn.Linear`` with its dense equivalent, so the model
    runs and exports without lowrank. An adapter is merged into its base layer, which takes
    its place (the base's own class and forward stay, as PEFT's ``merge_and_unload`` does);
    merging must be exact, so an adapter whose base cannot hold the change raises
    (``AdapterLinear.merge``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    classes = _layer_classes()
    done: dict[int, nn.Module] = {}
    # Innermost first, so an adapter's base is a plain layer again before the adapter merges.
    for name, module in reversed(list(model.named_modules(remove_duplicate=False))):
        if not name or not isinstance(module, classes):
            continue
        if id(module) not in done:
            done[id(module)] = _dense_module(module)
        _set(model, name, done[id(module)])
    return model


def _dense_module(module: nn.Module) -> nn.Module:
    if isinstance(module, AdapterLinear):
        if not module.merged:
            module.merge()
        return module.base
    with torch.no_grad():
        weight, bias = module.to_dense().detach(), getattr(module, "bias", None)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None,
                           device=weight.device, dtype=weight.dtype)  # fmt: skip
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear
