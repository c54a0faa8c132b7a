"""Compensating a compressed model with low-rank adapters computed without training.

A layer ``y = W x`` compressed to ``W_c`` (quantized, pruned, ...) errs by ``E = W - W_c``.
:func:`compensate` adds to each compressed layer a :class:`~lowrank.nn.LoRAAdapter` whose
change ``D`` (rank ``r``) removes as much of that error as rank ``r`` allows:

- ``method="lorc"`` (LoRC, from ZeroQuant-V2, Yao et al. 2023): the truncated SVD of ``E``,
  the best rank-``r`` ``D`` for the weight, ``min ||E - D||_F``; needs no data.
- ``method="eora"`` (EoRA, Liu et al. 2024): the best rank-``r`` ``D`` for the layer's
  *outputs* on calibration inputs ``X`` (tokens as columns), ``min ||(E - D) X||_F``. With
  the eigendecomposition of the input statistics ``X X^T = Q Lambda Q^T`` the objective is
  ``||(E - D) Q Lambda^{1/2}||_F``, minimised by the truncated SVD of
  ``E Q Lambda^{1/2}`` mapped back by ``Lambda^{-1/2} Q^T``.

Both are computed here as ``D = U_r U_r^T E``, the error projected onto an
``r``-dimensional output subspace: ``U_r`` holds the top left singular vectors of ``E``
(LoRC; then ``D`` is ``E``'s truncated SVD) or of ``E Q Lambda^{1/2}`` (EoRA). For EoRA
this is EoRA's minimiser, since ``U_r U_r^T E Q Lambda^{1/2}`` is the truncated SVD of
``E Q Lambda^{1/2}``, but nothing is divided by ``Lambda^{1/2}``: tiny or zero eigenvalues
(dead features, fewer calibration tokens than inputs) need no threshold, and on input
directions the calibration never excited, where the map back leaves the error as it is,
the adapter still removes the error's part in ``U_r``. So ``||(E - D) x|| <= ||E x||`` for
every input ``x``, seen in calibration or not. ``U_r`` is computed on the smaller side:
from the eigendecomposition of ``E X X^T E^T`` (``out x out``) when ``out <= in``, else of
the ``in x in`` Gram matrix of ``E Q Lambda^{1/2}``, mapped to the outputs (randomized, by
:func:`lowrank.linalg.truncated_svd`, for layers whose smaller side exceeds 1024).

The adapter's factors are ``B = U_r C`` and ``A = C^{-1} U_r^T E / s`` with ``s`` the
adapter's scale and ``C`` diagonal making each column of ``B`` as long as the matching row
of ``A`` (balanced, as for a trained adapter). The adapters then train, merge, unmerge,
save and export to PEFT (against the compressed model) like any ``LoRAAdapter``.

A budget ``params=f`` spends ``f`` times the targeted layers' weight parameters on the
adapters, rank-one components taken across all layers by error removed per parameter
(:func:`lowrank.nn.allocation.greedy_ranks`): the squared singular values above, which for
EoRA are the squared output errors they remove on the calibration tokens, weighted by the
sensitivity of the model's output to each layer's output
(:func:`lowrank.nn.calibration.output_sensitivity`, a few backward passes of random probes
on the first calibration batch, as :func:`lowrank.nn.convert` allocates with data).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.linalg.whitening import EXACT_SVD_MAX, truncated_svd
from lowrank.nn import allocation
from lowrank.nn import calibration as calib
from lowrank.nn.convert import (
    ConversionReport,
    _check_filter,
    _freeze_all_but,
    _matches,
    _materialise,
    _set,
    _targets,
)
from lowrank.nn.lora import LoRAAdapter
from lowrank.nn.registry import get_kind, layer_classes

METHODS = ("eora", "lorc")

__all__ = ["METHODS", "CompensatedLayer", "CompensationReport", "compensate", "dense_weight"]


@dataclass
class CompensatedLayer:
    """One compensated layer. Errors are relative to the original layer: ``||E||_F /
    ||W||_F`` before and ``||E - D||_F / ||W||_F`` after for the weight, and the same for
    the outputs on the calibration inputs (``||E X||_F / ||W X||_F``; ``None`` without
    calibration)."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    rank: int
    params: int  # the adapter's parameters, rank * (out + in)
    weight_error_before: float
    weight_error_after: float
    output_error_before: float | None = None
    output_error_after: float | None = None
    seconds: float = 0.0


@dataclass
class CompensationReport:
    """What :func:`compensate` did: the ``layers`` given an adapter, the ``skipped`` ones
    ``(name, reason)``, the compensated ``model`` and the totals; ``print(report)`` gives a
    table."""

    method: str
    model: nn.Module
    layers: list[CompensatedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    allocation: str = ""
    calibration_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def adapter_params(self) -> int:
        """The parameters of all adapters added."""
        return sum(layer.params for layer in self.layers)

    @property
    def weight_params(self) -> int:
        """The weight parameters of the compensated layers (``out * in`` each)."""
        return sum(o * i for o, i in (layer.shape for layer in self.layers))

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON values (without the model)."""
        return {
            "method": self.method,
            "allocation": self.allocation,
            "adapter_params": self.adapter_params,
            "weight_params": self.weight_params,
            "seconds": self.seconds,
            "calibration_seconds": self.calibration_seconds,
            "layers": [dict(vars(layer), shape=list(layer.shape)) for layer in self.layers],
            "skipped": [{"name": name, "note": note} for name, note in self.skipped],
        }

    def __str__(self) -> str:
        head = (f"{'layer':48s} {'shape':>10s} {'rank':>5s} {'w.err before':>12s} {'after':>7s} "
                f"{'out.err before':>14s} {'after':>7s}")  # fmt: skip
        lines = [f"compensate by {self.method} ({self.allocation})", head, "-" * len(head)]
        for r in self.layers:
            out = ("" if r.output_error_before is None else
                   f"{r.output_error_before:14.4f} {r.output_error_after:7.4f}")  # fmt: skip
            shape = f"{r.shape[0]}x{r.shape[1]}"
            errors = f"{r.weight_error_before:12.4f} {r.weight_error_after:7.4f} {out}"
            lines.append(f"{r.name[-48:]:48s} {shape:>10s} {r.rank:5d} {errors}")
        for name, note in self.skipped:
            lines.append(f"{name[-48:]:48s} skipped: {note}")
        lines.append(f"total: {self.adapter_params} adapter parameters "
                     f"({100 * self.adapter_params / max(1, self.weight_params):.2f}% of the "
                     f"weights) in {len(self.layers)} layers, {self.seconds:.1f} s (calibration "
                     f"{self.calibration_seconds:.1f} s)")  # fmt: skip
        return "\n".join(lines)


# ---- reading compressed weights -----------------------------------------------------------------


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a (compressed) linear layer as a plain dense ``(out, in)`` tensor.

    Reads ``module.weight``: a floating tensor as it is; a quantized tensor or a tensor
    subclass with ``dequantize()`` (torchao's quantized weights) dequantized; a method
    (``torch.ao``'s quantized ``Linear``, whose ``weight()`` returns its quantized weight)
    called first. Raises ``ValueError`` saying why when no dense floating matrix results.
    """
    what = type(module).__name__
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        weight = weight()
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{what} has no weight tensor (module.weight is "
                         f"{type(weight).__name__})")  # fmt: skip
    if weight.is_quantized or type(weight) not in (torch.Tensor, nn.Parameter):
        if not callable(getattr(weight, "dequantize", None)):
            raise ValueError(f"{what}'s weight is a {type(weight).__name__} without "
                             "dequantize()")  # fmt: skip
        weight = weight.dequantize()
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"{what}'s weight.dequantize() gave a {type(weight).__name__}, "
                             "not a tensor")  # fmt: skip
    weight = weight.detach()
    if weight.dtype not in check.FLOATING:
        raise ValueError(f"{what}'s weight is {weight.dtype}, neither floating point nor "
                         "dequantizable")  # fmt: skip
    if weight.dim() != 2:
        raise ValueError(f"{what}'s weight has shape {tuple(weight.shape)}, not (out, in)")
    if weight.is_meta:
        raise ValueError(f"{what}'s weight is on the meta device (it holds no values)")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{what}'s weight contains NaN or Inf")
    return weight


# ---- the low-rank corrections -------------------------------------------------------------------


class _Roots:
    """EoRA's square root ``Q Lambda^{1/2}`` of input statistics ``X X^T = Q Lambda Q^T``
    (negative rounding noise in ``Lambda`` clamped to 0); the last one is kept, as layers
    reading the same input (attention's query, key and value) follow each other."""

    def __init__(self):
        self.gram: torch.Tensor | None = None
        self.root: torch.Tensor | None = None

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        if self.gram is None or self.gram.shape != gram.shape or not torch.equal(self.gram, gram):
            values, vectors = torch.linalg.eigh(gram)
            self.gram, self.root = gram, vectors * values.clamp_min(0.0).sqrt()
        return self.root


def _output_basis(e, eg, gram, rank, seed, roots):
    """``(U, power)``: orthonormal columns ``U`` (``out x k``) spanning the output subspace
    the correction keeps, and ``power`` (``k``), the squared error each column removes,
    descending: the left singular vectors and squared singular values of ``E`` (``gram``
    None) or of ``E Q Lambda^{1/2}`` (``gram = X X^T``, ``eg = E X X^T``). ``k = rank``,
    or every component for ``rank=None``.

    Computed on the smaller side: the eigenvectors of ``E E^T`` or ``E X X^T E^T`` when
    ``out <= in``, else those of ``a^T a`` for ``a = E`` or ``E Q Lambda^{1/2}`` (``in x
    in``), mapped to the outputs by ``a`` and orthonormalised. Above ``EXACT_SVD_MAX`` a
    given rank comes from :func:`lowrank.linalg.truncated_svd` (randomized)."""
    out, inp = e.shape
    small = min(out, inp)
    k = small if rank is None else rank
    randomized = rank is not None and small > EXACT_SVD_MAX
    if out <= inp:
        m = e @ e.T if gram is None else eg @ e.T
        m = (m + m.T) / 2
        if randomized:  # a positive semi-definite m: its left singular vectors
            u, s, _ = truncated_svd(m, rank, seed=seed)
            return u, s
        values, vectors = torch.linalg.eigh(m)
        return vectors.flip(1)[:, :k], values.flip(0)[:k].clamp_min(0.0)
    a = e if gram is None else e @ roots(gram)
    if randomized:
        u, s, _ = truncated_svd(a, rank, seed=seed)
        return u, s.square()
    values, vectors = torch.linalg.eigh(a.T @ a)
    u = torch.linalg.qr(a @ vectors.flip(1)[:, :k]).Q
    return u, values.flip(0)[:k].clamp_min(0.0)


def _factors(e: torch.Tensor, u: torch.Tensor, scale: float):
    """``(A, B)`` with ``scale * B A = U U^T E``, each column of ``B`` as long as the
    matching row of ``A`` (a negative ``scale`` flips ``A``'s sign)."""
    m = u.T @ e
    norms = m.norm(dim=1)
    c = torch.where(norms > 0, (norms / abs(scale)).sqrt(), torch.ones_like(norms))
    return m / (scale * c)[:, None], u * c


def _relative(num: float, den: float) -> float:
    """``sqrt(num / den)`` for squared norms (0 when both are 0, inf when only ``den``)."""
    num = max(num, 0.0)
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def _adapter(base: nn.Module, a: torch.Tensor, b: torch.Tensor, alpha: float, method: str):
    """A :class:`LoRAAdapter` around ``base`` with the factors ``a``, ``b``.

    ``LoRAAdapter`` reads its base's weight as a floating ``nn.Linear`` weight when it
    initialises; a compressed base may hold a quantized weight, or be another module. So
    the adapter is built around a placeholder of the same shape on the meta device (no
    values), then given the factors and the base."""
    rank, in_features = a.shape
    shell = nn.Linear(in_features, b.shape[0], bias=False, device="meta", dtype=a.dtype)
    adapter = LoRAAdapter(shell, rank, alpha)
    adapter.A = nn.Parameter(a)
    adapter.B = nn.Parameter(b)
    adapter.base = base
    adapter.init = method
    return adapter


# ---- the whole model ----------------------------------------------------------------------------


def compensate(
    original: nn.Module,
    compressed: nn.Module,
    rank: int | None = None,
    *,
    calibration: Any = None,
    method: str = "eora",
    filter: Callable[[str, nn.Module], bool] | str | Sequence[str] | None = None,
    params: float | None = None,
    alpha: float | None = None,
    freeze: bool = False,
    progress: bool = False,
    seed: int = 0,
) -> CompensationReport:
    """Adds to ``compressed`` low-rank adapters that undo its compression error (module
    docstring).

    Args:
        original: the model before compression (left unchanged).
        compressed: the same model compressed; changed in place: each targeted layer is
            replaced by a :class:`LoRAAdapter` around it. Its layers keep their names and
            shapes; each weight must read densely (:func:`dense_weight`): an ``nn.Linear``,
            a quantized or dequantizable weight, a module exposing ``.weight`` (one that
            is not an ``nn.Linear`` needs ``in_features`` and ``out_features``).
        rank: the rank of every adapter (at most each layer's smaller side); or
        params: a budget: the adapters together get this fraction of the targeted layers'
            weight parameters, ranks spread across layers by error removed per parameter.
        calibration: batches for ``"eora"`` (as for :func:`lowrank.nn.convert`: each is
            passed as ``model(**batch)``, ``model(*batch)`` or ``model(batch)``), run
            through ``original`` to collect every targeted layer's inputs. With ``"lorc"``
            they only give the report's output errors.
        method: ``"eora"`` (the best correction for the outputs on the calibration inputs)
            or ``"lorc"`` (for the weight; no data).
        filter: which layers, as for :func:`lowrank.nn.convert` (a callable
            ``(name, module) -> bool``, a regular expression on the full name, or a list of
            names as PEFT's ``target_modules``), applied to the layers of both models.
            Default: every ``nn.Linear`` of ``original``.
        alpha: each adapter's LoRA ``alpha`` (default its rank: scale 1). The factors are
            computed for the resulting scale, so the change is the same either way.
        freeze: afterwards only the adapters train: every other parameter of ``compressed``
            gets ``requires_grad=False`` (the adapters' bases are frozen either way).
        progress: progress bars over calibration batches and layers.
        seed: for the randomized SVD of layers above ``EXACT_SVD_MAX``.

    Returns:
        A :class:`CompensationReport` (per layer its rank, adapter parameters and relative
        weight and output errors before and after; totals).

    Raises:
        TypeError, ValueError: for bad arguments, and before any layer changes for models
            whose targeted layers differ in name or shape (the layers are listed), a rank
            above a layer's smaller side, calibration batches ``original`` cannot take, a
            compressed weight that cannot be read densely, or a compressed layer that
            already holds an adapter or is shared with ``original``.
    """
    for arg, value in (("original", original), ("compressed", compressed)):
        if not isinstance(value, nn.Module):
            raise TypeError(f"{arg} must be an nn.Module, got {type(value).__name__}")
    if compressed is original:
        raise ValueError("compressed is original: pass the compressed copy of the model")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if (rank is None) == (params is None):
        raise ValueError("give exactly one of rank= and params=")
    if rank is not None:
        rank = check.positive_int("rank", rank)
    if params is not None:
        params = check.real("params", params, 0.0, 1.0)
        if params == 0.0:
            raise ValueError("params must be a fraction in (0, 1]")
    if alpha is not None:
        alpha = check.real("alpha", alpha)
        if alpha == 0.0:
            raise ValueError("alpha must be non-zero")
    seed = check.integer("seed", seed, 0)
    _check_filter(filter)
    if method == "eora" and calibration is None:
        raise ValueError("method='eora' needs calibration batches (calibration=); "
                         "method='lorc' needs none")  # fmt: skip
    batches = None if calibration is None else _materialise(calibration)

    start = time.perf_counter()
    report = CompensationReport(method, compressed)
    layers = _match(original, compressed, filter, report)
    weights = {}
    problems = []
    for name, (linear, module, _) in layers.items():
        out, inp = linear.weight.shape
        try:
            weights[name] = dense_weight(module)
        except ValueError as error:
            problems.append(f"{name}: {error}")
            continue
        if tuple(weights[name].shape) != (out, inp):
            problems.append(f"{name}: shape {tuple(weights[name].shape)} in compressed, "
                            f"{(out, inp)} in original")  # fmt: skip
        elif not isinstance(module, nn.Linear) and (
            getattr(module, "in_features", None) != inp
            or getattr(module, "out_features", None) != out
        ):
            problems.append(f"{name}: {type(module).__name__} is not an nn.Linear and has no "
                            f"in_features = {inp} and out_features = {out}")  # fmt: skip
        elif rank is not None and rank > min(out, inp):
            problems.append(f"{name}: rank {rank} is above min(out, in) = {min(out, inp)}")
    if problems:
        raise ValueError(f"compensate: {len(problems)} of the {len(layers)} targeted layers "
                         "cannot be compensated:\n  " + "\n  ".join(problems))  # fmt: skip

    stats = {}
    if batches is not None:
        t0 = time.perf_counter()
        stats = _statistics(original, batches, {n: lin for n, (lin, _, _) in layers.items()},
                            progress)  # fmt: skip
        report.calibration_seconds = time.perf_counter() - t0

    roots = _Roots()

    def prepare(name):
        """``(W, E, G, E G)`` of a layer in float64 (``G``, ``E G`` None without stats)."""
        w = layers[name][0].weight.detach().double()
        e = w - weights[name].to(device=w.device, dtype=torch.float64)
        if name not in stats:
            return w, e, None, None
        gram = stats[name].gram.to(w.device)
        gram = (gram + gram.T) / 2
        return w, e, gram, e @ gram

    def basis(e, eg, gram, r):
        if method == "lorc":
            return _output_basis(e, None, None, r, seed, roots)
        return _output_basis(e, eg, gram, r, seed, roots)

    shapes = {name: tuple(lin.weight.shape) for name, (lin, _, _) in layers.items()}
    bases: dict[str, torch.Tensor] = {}
    if params is not None:
        allocation.check_budget(shapes, params)
        worth = {}
        for name in calib._bar(layers, progress, f"compensate ({method}): spectra"):
            _, e, gram, eg = prepare(name)
            u, worth[name] = basis(e, eg, gram, None)
            bases[name] = u[:, : allocation.max_rank(*shapes[name])]
        if method == "eora":
            # Squared output errors weighted by how much the model's output moves per unit
            # change of each layer's output, as convert's global allocation does.
            linears = {n: lin for n, (lin, _, _) in layers.items()}
            gains = calib.output_sensitivity(original, batches[0], linears)
            worth = {n: gains[n] * power for n, power in worth.items()}
            what = "output error removed, weighted by the model's sensitivity to the layer,"
        else:
            what = "weight error removed"
        ranks = allocation.greedy_ranks(worth, shapes, params)
        report.allocation = (f"global for {params:g} of the weights: components by squared "
                             f"{what} per parameter")  # fmt: skip
    else:
        ranks = dict.fromkeys(layers, rank)
        report.allocation = f"rank {rank}"

    adapters = {}
    for name in calib._bar(layers, progress, f"compensate ({method})"):
        t0 = time.perf_counter()
        w, e, gram, eg = prepare(name)
        r = ranks[name]
        u = bases.pop(name)[:, :r] if name in bases else basis(e, eg, gram, r)[0]
        scale = 1.0 if alpha is None else alpha / r
        a, b = _factors(e, u, scale)
        dtype = weights[name].dtype
        device = weights[name].device  # the compressed model's
        adapters[name] = _adapter(layers[name][1], a.to(device, dtype), b.to(device, dtype),
                                  float(r if alpha is None else alpha), method)  # fmt: skip
        total = float(w.square().sum())
        after = float((e - scale * (b @ a)).square().sum())
        entry = CompensatedLayer(name, shapes[name], r, r * sum(shapes[name]),
                                 _relative(float(e.square().sum()), total),
                                 _relative(after, total))  # fmt: skip
        if gram is not None:
            # ||R X||_F^2 = tr(R G R^T); the correction U U^T E removes tr(M G M^T), M = U^T E.
            m = u.T @ e
            before, total = float((eg * e).sum()), float(((w @ gram) * w).sum())
            entry.output_error_before = _relative(before, total)
            entry.output_error_after = _relative(before - float(((m @ gram) * m).sum()), total)
        entry.seconds = time.perf_counter() - t0
        report.layers.append(entry)

    # Every check passed and every adapter is built: only now does the model change.
    for name, adapter in adapters.items():
        adapter.base.requires_grad_(False)
        for alias in layers[name][2]:
            _set(compressed, alias, adapter)
    if freeze:
        _freeze_all_but(compressed, list(adapters.values()))
    report.seconds = time.perf_counter() - start
    return report


def _match(original: nn.Module, compressed: nn.Module, filter, report: CompensationReport):
    """``{name: (original linear, compressed module, all its names)}`` for the targeted
    layers; raises ``ValueError`` listing every name that does not match."""
    scratch = ConversionReport("lora", original)
    targets = _targets(original, filter, scratch, get_kind("lora"))
    report.skipped = [(r.name, r.note) for r in scratch.skipped]
    if not targets:
        raise ValueError("compensate: no nn.Linear of original matches "
                         + ("the model" if filter is None else f"filter={filter!r}"))  # fmt: skip
    in_original = {n for n, m in original.named_modules() if isinstance(m, nn.Linear)}
    own = layer_classes()
    inside = {id(sub) for m in compressed.modules() if isinstance(m, own)
              for sub in m.modules() if sub is not m}  # fmt: skip
    only_compressed = [n for n, m in compressed.named_modules()
                       if n and isinstance(m, nn.Linear) and id(m) not in inside
                       and n not in in_original and _matches(n, m, filter)]  # fmt: skip
    original_ids = {id(m) for m in original.modules()}
    missing, adapted, shared = [], [], []
    layers = {}
    for names, linear in targets:
        found = []
        for name in names:
            try:
                found.append(compressed.get_submodule(name))
            except AttributeError:
                missing.append(name)
        if len(found) != len(names):
            continue
        module = found[0]
        parents = [compressed.get_submodule(n.rpartition(".")[0]) for n in names]
        if isinstance(module, own):
            adapted.append(f"{names[0]} ({type(module).__name__})")
        elif any(m is not module for m in found) or any(
            id(m) in original_ids for m in [module, *parents]
        ):
            shared.append(names[0])
        layers[names[0]] = (linear, module, names)
    problems = []
    if missing:
        problems.append(f"layers of original missing from compressed: {missing}")
    if only_compressed:
        problems.append(f"linear layers of compressed not in original: {only_compressed}")
    if adapted:
        problems.append(f"compressed layers that are already lowrank layers or adapters: "
                        f"{adapted}")  # fmt: skip
    if shared:
        problems.append(f"layers whose module (or parent) compressed shares with original, or "
                        f"that are tied in original but not in compressed: {shared} "
                        "(compensate a copy)")  # fmt: skip
    if problems:
        raise ValueError("compensate: the models do not match:\n  " + "\n  ".join(problems))
    return layers


def _statistics(original: nn.Module, batches: list, layers: dict, progress: bool):
    """The targeted layers' input statistics over the batches, run through ``original``;
    an error of the model on a batch is raised as ``ValueError`` naming the batch."""
    current = [0]

    def counted():
        for index, batch in enumerate(batches):
            current[0] = index
            yield batch

    try:
        return calib.input_statistics(original, counted(), layers, progress=progress)
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"calibration batch {current[0]}: original cannot run on it "
                         f"({type(error).__name__}: {error})") from error  # fmt: skip
