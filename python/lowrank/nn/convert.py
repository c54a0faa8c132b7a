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
import heapq
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.linalg.error import relative_residual
from lowrank.nn import calibration as calib
from lowrank.nn import lora
from lowrank.nn.kron import KronLinear, near_square_factors
from lowrank.nn.kron_adapter import KronAdapter
from lowrank.nn.lowrank import LowRankLinear, cholesky_damped
from lowrank.nn.monarch import MonarchLinear
from lowrank.nn.sltrain import SLTrainLinear

KINDS = ("lowrank", "monarch", "sltrain", "kron", "kron_adapter", "lora")
_ADAPTERS = ("kron_adapter", "lora")
_CALIBRATED = ("lowrank", "monarch", "sltrain")


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


def _targets(model: nn.Module, filter, report: ConversionReport):
    """``[(names, linear)]``: each targeted linear once, with every name it is reachable by
    (a module shared by two parents is converted once and stays shared). A linear whose
    weight is tied to another module (an embedding, or another linear with its own bias)
    is skipped with the reason: converting it would untie the two."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    # nn.MultiheadAttention reads its out_proj's weight directly instead of calling it.
    read_directly = {id(m.out_proj) for m in model.modules()
                     if isinstance(m, nn.MultiheadAttention)}  # fmt: skip
    groups: dict[int, tuple[list[str], nn.Linear]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, nn.Linear) or not name:
            continue
        if not _matches(name, module, filter):
            continue
        if id(module) in read_directly:
            count = _count(module)
            report.skipped.append(LayerReport(name, report.kind, tuple(module.weight.shape), count,
                                              count, note="nn.MultiheadAttention uses its "
                                              "weight, not its forward"))  # fmt: skip
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


# ---- budgets ------------------------------------------------------------------------------------


def _max_rank(out: int, inp: int) -> int:
    """The largest rank that still saves parameters (at least 1)."""
    return max(1, min(out, inp, (out * inp) // (out + inp)))


def _uniform_ranks(shapes: Mapping[str, tuple[int, int]], fraction: float) -> dict[str, int]:
    """One rank ``r`` for every layer: the largest whose total stays within the budget."""
    budget = fraction * sum(o * i for o, i in shapes.values())

    def total(r):
        return sum(min(r, _max_rank(o, i)) * (o + i) for o, i in shapes.values())

    r = 1
    while r < max(min(s) for s in shapes.values()) and total(r + 1) <= budget:
        r += 1
    return {name: min(r, _max_rank(o, i)) for name, (o, i) in shapes.items()}


def _greedy_ranks(worth: Mapping[str, torch.Tensor], shapes, fraction: float) -> dict[str, int]:
    """Ranks maximising the total worth of the kept components within the budget: take
    components by worth per parameter (every layer keeps at least one)."""
    budget = fraction * sum(o * i for o, i in shapes.values())
    ranks = dict.fromkeys(shapes, 1)
    spent = sum(o + i for o, i in shapes.values())
    heap = [(-float(worth[n][1]) / sum(shapes[n]), n) for n in shapes
            if len(worth[n]) > 1 and _max_rank(*shapes[n]) > 1]  # fmt: skip
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        cost = sum(shapes[n])
        if spent + cost > budget:
            continue
        ranks[n] += 1
        spent += cost
        if ranks[n] < min(len(worth[n]), _max_rank(*shapes[n])):
            heapq.heappush(heap, (-float(worth[n][ranks[n]]) / cost, n))
    return ranks


def _spectrum(weight: torch.Tensor, whitening: torch.Tensor | None) -> torch.Tensor:
    """All singular values of the (whitened) weight, in float64."""
    w = weight.detach().double()
    if whitening is not None:
        w = w @ whitening
    return torch.linalg.svdvals(w)


# ---- the conversion -----------------------------------------------------------------------------


def convert(
    model: nn.Module,
    kind: str,
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
        kind: ``"lowrank"``, ``"monarch"``, ``"sltrain"``, ``"kron"`` (each from the dense
            weight by the layer's ``from_dense``), or an adapter around the frozen layer:
            ``"kron_adapter"``, ``"lora"``.
        filter: which layers: a callable ``(name, module) -> bool``, a regular expression
            matched against the full name, or a list of names matched as PEFT's
            ``target_modules`` (equal to, or ending in ``"." + name``). Default: all.
        inplace: convert ``model`` itself, else a deep copy (``report.model`` either way).
        progress: a progress bar over layers (and calibration batches).
        calibration: batches to fit the layers' outputs on (module docstring): each is
            passed as ``model(**batch)``, ``model(*batch)`` or ``model(batch)``.
        params: keep this fraction of the targeted layers' weight parameters (structured
            kinds); with ``allocation`` ``"global"`` (lowrank: across layers, see the
            module docstring) or ``"uniform"``.
        freeze: afterwards only the new layers train: every other parameter of the model
            gets ``requires_grad=False``. Default: True for the adapters (as PEFT's
            ``get_peft_model`` does; their base layers are frozen either way), False for
            the structured kinds.
        options: the kind's own: ``rank`` or ``tol`` (lowrank); ``nblocks`` (default 4) and
            ``rank`` (monarch); ``rank``, ``sparsity`` (default 0.03), ``alpha``, ``seed``
            (sltrain); ``factors``, ``terms`` (kron); the adapter's constructor arguments
            (kron_adapter; lora: ``rank`` (default 8), ``alpha``, ``dropout``, ``init``,
            ``svd``, ``n_iter``, ``corda_method``, ``seed``, ``dtype``, and for EVA ``rho``
            (default 2): a layer gets at most ``round(rank * rho)`` components, the
            ``rank * layers`` components with the largest explained variance ratios
            across all layers are kept, and ``alpha`` follows each layer's rank so the
            scale stays ``alpha / rank``).

    Returns:
        A :class:`ConversionReport`: per layer its shape, parameters before and after,
        relative errors and time; tied or skipped layers with the reason; totals.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_filter(filter)
    if allocation not in ("global", "uniform"):
        raise ValueError(f"allocation must be 'global' or 'uniform', got {allocation!r}")
    if params is not None:
        params = check.real("params", params, 0.0, 1.0)
        if params == 0.0:
            raise ValueError("params must be a fraction in (0, 1]")
        if kind in _ADAPTERS:
            raise ValueError(f"params= is for the structured kinds; {kind} adds an adapter")
    start = time.perf_counter()
    model = model if inplace else copy.deepcopy(model)
    report = ConversionReport(kind, model)
    targets = _targets(model, filter, report)
    if not targets:
        report.seconds = time.perf_counter() - start
        return report
    batches = None if calibration is None else _materialise(calibration)
    data_driven = kind == "lora" and options.get("init") in lora.DATA_DRIVEN
    if data_driven and batches is None:
        raise ValueError(f"init={options['init']!r} needs calibration batches (calibration=)")
    stats: dict[str, calib.InputStats] = {}
    if batches is not None and (kind in _CALIBRATED or data_driven):
        t0 = time.perf_counter()
        layers = {names[0]: linear for names, linear in targets}
        stats = calib.input_statistics(model, batches, layers, progress=progress)
        report.calibration_seconds = time.perf_counter() - t0
    grams = {name: st.gram for name, st in stats.items()} if kind in _CALIBRATED else {}
    plan = _plan(kind, model, targets, grams, stats, batches, params, allocation, options,
                 report)  # fmt: skip
    bar = _bar(targets, progress, f"convert to {kind}")
    new_layers = []
    for names, linear in bar:
        t0 = time.perf_counter()
        new, note = plan(names[0], linear)
        if new is None:  # the plan leaves this layer as it is
            count = _count(linear)
            report.skipped.append(LayerReport(names[0], kind, tuple(linear.weight.shape), count,
                                              count, note=note))  # fmt: skip
            continue
        new_layers.append(new)
        for name in names:
            _set(model, name, new)
        report.layers.append(_layer_report(names, linear, new, kind, grams.get(names[0]),
                                           time.perf_counter() - t0, note))  # fmt: skip
    if freeze is None:
        freeze = kind in _ADAPTERS
    if freeze:
        _freeze_all_but(model, new_layers)
    report.seconds = time.perf_counter() - start
    return report


def _freeze_all_but(model: nn.Module, layers: list[nn.Module]) -> None:
    keep = set()
    for layer in layers:
        own = layer.named_parameters()
        keep |= {id(p) for name, p in own if not name.startswith("base.")}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def _materialise(calibration) -> list:
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [calibration]  # one batch
    try:
        batches = list(calibration)
    except TypeError:
        raise TypeError("calibration must be an iterable of batches (or one batch), got "
                        f"{type(calibration).__name__}") from None  # fmt: skip
    if not batches:
        raise ValueError("calibration holds no batches")
    return batches


def _plan(kind, model, targets, grams, stats, batches, params, allocation, options, report):
    """``make(name, linear) -> (new module, note)`` for the kind and budget."""
    shapes = {names[0]: tuple(linear.weight.shape) for names, linear in targets}
    if kind == "lowrank":
        return _plan_lowrank(model, targets, shapes, grams, batches, params, allocation, options,
                             report)  # fmt: skip
    if kind == "monarch":
        nblocks = options.pop("nblocks", 4)
        rank = options.pop("rank", None)
        _no_more(kind, options)
        scales = {n: (g.diagonal() / max(1.0, float(g.diagonal().mean()))).sqrt().clamp_min(1e-6)
                  for n, g in grams.items()}  # fmt: skip

        def make_monarch(name, linear):
            k = _blocks(nblocks, *shapes[name])
            if rank is not None:
                r = rank
            elif params is not None:
                r = _monarch_rank(params, k, *shapes[name])
            else:
                r = _default_monarch_rank(k, *shapes[name])
            scale = scales.get(name)
            scale = None if scale is None else scale.to(linear.weight.dtype)
            layer = MonarchLinear.from_dense(linear, k, r, input_scale=scale)
            return layer, f"nblocks {k}, rank {r}"

        report.allocation = "uniform"
        return make_monarch
    if kind == "sltrain":
        sparsity = options.pop("sparsity", 0.03)
        rank = options.pop("rank", None)
        alpha = options.pop("alpha", 32.0)
        seed = options.pop("seed", 0)
        _no_more(kind, options)
        if (rank is None) == (params is None):
            raise ValueError("sltrain needs exactly one of rank= and params=")

        def make_sltrain(name, linear):
            out, inp = shapes[name]
            r = (
                rank
                if rank is not None
                else max(1, int((params - sparsity) * out * inp / (out + inp)))
            )
            r = min(r, out, inp)
            layer = SLTrainLinear.from_dense(linear, r, sparsity, alpha, seed, gram=grams.get(name))
            return layer, f"rank {r}"

        report.allocation = "uniform"
        return make_sltrain
    if kind == "kron":
        factors = options.pop("factors", None)
        terms = options.pop("terms", None)
        _no_more(kind, options)

        def make_kron(name, linear):
            out, inp = shapes[name]
            t = terms
            if t is None:
                (p, r), (q, s) = near_square_factors(out), near_square_factors(inp)
                t = 1 if params is None else max(1, min(int(params * out * inp / (p * q + r * s)),
                                                        p * q, r * s))  # fmt: skip
            layer = KronLinear.from_dense(linear, factors, t)
            return layer, f"terms {t}"

        report.allocation = "uniform"
        return make_kron
    if kind == "lora":
        return _plan_lora(shapes, stats, options, report)
    adapter_options = dict(options)

    def make_kron_adapter(name, linear):
        return KronAdapter(linear, **adapter_options), ""

    return make_kron_adapter


def _plan_lora(shapes, stats, options, report):
    rank = check.positive_int("rank", options.pop("rank", 8))
    alpha = float(options.pop("alpha", rank))
    rho = check.real("rho", options.pop("rho", 2.0))
    init = options.get("init", "gaussian")
    ranks = {n: min(rank, *shapes[n]) for n in shapes}
    if init == "eva":  # EVA's redistribution by explained variance across layers
        spectra = {n: lora.eva_spectrum(stats[n])[0] for n in shapes}
        ranks = {n: min(r, *shapes[n]) for n, r in lora.eva_ranks(spectra, rank, rho).items()}
        report.allocation = f"EVA: {rank * len(shapes)} components by explained variance"

    def make_lora(name, linear):
        r = ranks[name]
        if r == 0:
            return None, "EVA gave it no components"
        layer = lora.LoRAAdapter(linear, r, alpha * r / rank, stats=stats.get(name), **options)
        return layer, f"rank {r}, init {layer.init}"

    return make_lora


def _no_more(kind: str, options: dict) -> None:
    if options:
        raise TypeError(f"convert to {kind} got unexpected options {sorted(options)}")


def _blocks(nblocks: int, out: int, inp: int) -> int:
    return max(1, min(check.positive_int("nblocks", nblocks), out, inp))


def _default_monarch_rank(k, out, inp):
    """The rank of MonarchLinear's own square blocks for this size."""
    return max(1, min(math.ceil(inp / k), math.ceil(out / k)) // k)


def _monarch_rank(params, k, out, inp):
    """The rank whose Monarch factors hold ``params`` of the layer's parameters:
    ``k*l*r*(p + s)`` with ``l = k`` blocks of ``p = in/k`` inputs and ``s = out/k`` outputs."""
    p, s = math.ceil(inp / k), math.ceil(out / k)
    return max(1, min(int(params * out * inp / (k * k * (p + s))), p, s))


def _plan_lowrank(model, targets, shapes, grams, batches, params, allocation, options, report):
    rank = options.pop("rank", None)
    tol = options.pop("tol", None)
    seed = options.pop("seed", 0)
    _no_more("lowrank", options)
    if sum(x is not None for x in (rank, tol, params)) != 1:
        raise ValueError("convert to lowrank needs exactly one of rank=, tol= and params=")
    whitening = {n: cholesky_damped(g) for n, g in grams.items()}
    if rank is not None:
        rank = check.positive_int("rank", rank)
        ranks = {n: min(rank, *shapes[n]) for n in shapes}
        report.allocation = f"uniform rank {rank}"
    elif tol is not None:
        ranks = None
        report.allocation = f"tol {tol}"
    elif allocation == "uniform":
        ranks = _uniform_ranks(shapes, params)
        report.allocation = f"uniform rank for {params:g} of the parameters"
    else:
        linears = {names[0]: linear for names, linear in targets}
        spectra = {n: _spectrum(linears[n].weight, whitening.get(n)) for n in shapes}
        if batches is not None:
            gains = calib.output_sensitivity(model, batches[0], linears)
            worth = {n: gains[n] * spectra[n].square() for n in shapes}
            ranks = _greedy_ranks(worth, shapes, params)
            report.allocation = (f"global for {params:g} of the parameters: singular values "
                                 "weighted by the output's sensitivity")  # fmt: skip
        else:
            ranks = _greedy_ranks({n: spectra[n].square() for n in shapes}, shapes, params)
            report.allocation = (f"global for {params:g} of the parameters: least total "
                                 "squared weight error")  # fmt: skip

    def make_lowrank(name, linear):
        gram = grams.get(name)
        if ranks is None:
            layer = LowRankLinear.from_dense(linear, tol=tol, gram=gram, seed=seed)
        else:
            layer = LowRankLinear.from_dense(linear, ranks[name], gram=gram, seed=seed)
        return layer, f"rank {layer.rank}"

    return make_lowrank


def _layer_report(names, linear, new, kind, gram, seconds, note) -> LayerReport:
    out, inp = linear.weight.shape
    report = LayerReport(names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} tied)",
                         kind, (out, inp), _count(linear), _count(new), seconds=seconds,
                         note=note)  # fmt: skip
    if kind in _ADAPTERS:  # the base stays and the adapter adds to it
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
    """Every lowrank layer back to an ``nn.Linear`` with its dense equivalent (adapters
    merged into their base layer), so the model runs and exports without lowrank."""
    model = model if inplace else copy.deepcopy(model)
    structured = (LowRankLinear, MonarchLinear, SLTrainLinear, KronLinear, KronAdapter,
                  lora.LoRAAdapter)  # fmt: skip
    done: dict[int, nn.Linear] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not isinstance(module, structured):
            continue
        if id(module) not in done:
            done[id(module)] = _to_linear(module)
        _set(model, name, done[id(module)])
    return model


def _to_linear(module: nn.Module) -> nn.Linear:
    with torch.no_grad():
        if hasattr(module, "base") and isinstance(module.base, nn.Linear):  # adapters
            weight = module.weight.detach()
            bias = module.base.bias
        else:
            weight, bias = module.to_dense().detach(), getattr(module, "bias", None)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None,
                           device=weight.device, dtype=weight.dtype)  # fmt: skip
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear
