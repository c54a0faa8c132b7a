"""Spectral diagnostics of weights: what fine-tuning did to a matrix, and how low-rank it is.

- :func:`intruder_dimensions` (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An
  Illusion of Equivalence"): among the top ``k`` left singular vectors ``y_j`` of the tuned
  weight, those whose largest cosine similarity with *every* left singular vector ``x_i`` of
  the original weight is below ``epsilon``: ``max_i |cos(y_j, x_i)| < epsilon``. The paper
  looks at ``k = 10`` and sweeps ``epsilon``; 0.5 is the default here. Cosines are taken in
  absolute value (a singular vector's sign is arbitrary).
- :func:`effective_rank` (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_i = s_i / sum_j s_j``
  and ``H`` the Shannon entropy.
- :func:`stable_rank`: ``||W||_F^2 / ||W||_2^2``.
- :func:`heavy_tail_exponent`: the power-law exponent ``alpha`` of the tail of the empirical
  spectral density of ``W^T W`` (HT-SR, Martin & Mahoney; WeightWatchers' ``alpha``).
- :func:`spectral_table`: all of them, per linear layer, for two whole models.

What is computed, and why not two full SVDs:

- The tuned weight enters intruder dimensions through its top ``k`` singular vectors only:
  a truncated randomized SVD (:func:`lowrank.linalg.rsvd`), ``O(m n k)``.
- The definition compares them with *all* of the original's left singular vectors: an
  intruder is a direction spread thinly over the original's whole basis, so no truncated
  decomposition of the original decides it (the top singular vectors can prove a direction
  is *not* an intruder, but not that it is). The basis is the eigenvector matrix of the
  smaller Gram matrix ``W W^T`` (for a tall ``W = Q R``, of ``R R^T``, mapped by ``Q``),
  computed in float64 by a symmetric eigensolver: several times faster than an SVD, and
  exact to ``eps(float64) ||W||^2 / gap`` where two singular vectors' squared singular values
  are ``gap`` apart (float64 keeps that far below any cosine threshold; in float32 the
  vectors of the smallest singular values would not be resolved).
- Effective rank and the heavy-tail fit need the whole spectrum; the singular values come
  from the eigenvalues alone of the smaller Gram matrix (no vectors), again much cheaper
  than ``torch.linalg.svdvals``. Singular values below about ``sqrt(eps(float64))`` times
  the largest lose relative accuracy this way; neither quantity depends on them noticeably.
- Stable rank needs only ``||W||_2``: the top singular value of a rank-1 randomized SVD with
  oversampling and power iterations, which converges to it from below (a slight
  overestimate of the stable rank, of relative size ``(s_{l+1} / s_1)^(4 q + 2)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lowrank import _validate as check
from lowrank.linalg.rsvd import rsvd

__all__ = [
    "IntruderDimensions",
    "PowerLawFit",
    "effective_rank",
    "fit_power_law",
    "heavy_tail_exponent",
    "intruder_dimensions",
    "intruder_dimensions_reference",
    "singular_values",
    "spectral_table",
    "stable_rank",
]


def _matrix(name: str, value) -> torch.Tensor:
    """A finite floating 2-D tensor with no zero side, detached."""
    return check.weight(name, value).detach()


# ---- spectra from the Gram matrix ---------------------------------------------------------------


def _gram(w: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of ``w`` in float64: ``w w^T`` or ``w^T w``."""
    w = w.double()
    return w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w


def _squared_singular_values(w: torch.Tensor) -> torch.Tensor:
    """All ``min(m, n)`` squared singular values, descending, float64 (negatives from
    rounding clamped to zero)."""
    return torch.linalg.eigvalsh(_gram(w)).flip(0).clamp_min(0.0)


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """All ``min(m, n)`` singular values of ``weight``, descending, in float64, from the
    eigenvalues of its smaller Gram matrix (module docstring: accurate to about
    ``sqrt(eps(float64)) s_1`` in absolute terms)."""
    return _squared_singular_values(_matrix("weight", weight)).sqrt()


def _effective_rank(s: torch.Tensor) -> float:
    total = s.sum()
    if not bool(total > 0):
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def effective_rank(weight: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: ``exp(-sum_i p_i log p_i)``, ``p_i = s_i / sum_j s_j``
    over all singular values (between 1 and ``min(m, n)``; 0 for a zero matrix). It needs the
    whole spectrum, taken from the Gram matrix's eigenvalues (:func:`singular_values`)."""
    return _effective_rank(singular_values(weight))


def stable_rank(weight: torch.Tensor, *, n_iter: int = 4, seed: int = 0) -> float:
    """``||W||_F^2 / ||W||_2^2`` (between 1 and the rank; 0 for a zero matrix). The spectral
    norm is the top singular value of a rank-1 randomized SVD (oversampling 10, ``n_iter``
    power iterations): no full decomposition."""
    w = _matrix("weight", weight).double()
    n_iter = check.iterations("n_iter", n_iter)
    frobenius = float(w.square().sum())
    if frobenius == 0.0:
        return 0.0
    top = float(rsvd(w, 1, n_iter=n_iter, seed=seed)[1][0])
    return frobenius / top**2


# ---- heavy-tail exponent ------------------------------------------------------------------------


@dataclass
class PowerLawFit:
    """A power law ``p(x) ~ x^-alpha`` fitted to the tail ``x >= xmin`` of a spectrum.

    Attributes:
        alpha: the exponent (NaN when the spectrum has fewer than ``min_tail`` positive,
            distinct values).
        xmin: where the tail starts.
        ks_distance: the Kolmogorov-Smirnov distance between the tail and the fitted law.
        tail_size: how many eigenvalues the tail holds.
    """

    alpha: float
    xmin: float
    ks_distance: float
    tail_size: int


def fit_power_law(eigenvalues: torch.Tensor, *, min_tail: int = 10) -> PowerLawFit:
    """Clauset, Shalizi & Newman's (2009) continuous power-law fit, as WeightWatchers uses.

    For every candidate ``xmin`` (each eigenvalue leaving at least ``min_tail`` in the
    tail), ``alpha`` is the maximum-likelihood estimate ``1 + n / sum_i ln(x_i / xmin)``
    over the ``n`` tail values, and the fit kept is the one whose Kolmogorov-Smirnov
    distance between the tail's empirical CDF and ``1 - (x / xmin)^(1 - alpha)`` is least.
    Non-positive values (and those below ``1e-12`` of the largest, rounding) are left out.
    """
    check.tensor("eigenvalues", eigenvalues)
    min_tail = check.integer("min_tail", min_tail, 2)
    x = eigenvalues.detach().double().flatten()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("eigenvalues contains NaN or Inf")
    x = x[x > 1e-12 * x.max().clamp_min(0.0)] if x.numel() else x
    x = x.sort().values
    n = x.numel()
    nan = PowerLawFit(math.nan, math.nan, math.nan, 0)
    if n < min_tail:
        return nan
    logs = x.log()
    suffix = logs.flip(0).cumsum(0).flip(0)  # sum of logs from j on
    count = torch.arange(n, 0, -1, dtype=torch.float64)  # tail sizes n - j
    best = nan
    chunk = max(1, 2**22 // n)  # candidates per block, bounding the block to 4M entries
    positions = torch.arange(n)
    for start in range(0, n - min_tail + 1, chunk):
        j = torch.arange(start, min(start + chunk, n - min_tail + 1))
        spread = suffix[j] - count[j] * logs[j]
        alpha = 1.0 + count[j] / spread
        offset = positions[None, :] - j[:, None]  # index within the tail
        inside = offset >= 0
        fitted = 1.0 - torch.exp((1.0 - alpha[:, None]) * (logs[None, :] - logs[j][:, None]))
        upper = (offset + 1).double() / count[j][:, None]  # the empirical CDF after x_i
        lower = upper - 1.0 / count[j][:, None]  # and before
        gap = torch.maximum((upper - fitted).abs(), (lower - fitted).abs())
        ks = torch.where(inside, gap, torch.zeros((), dtype=gap.dtype)).amax(1)
        ks = torch.where(spread > 0, ks, torch.full_like(ks, math.inf))  # a tail of equal values
        i = int(ks.argmin())
        if math.isfinite(float(ks[i])) and (best.tail_size == 0 or ks[i] < best.ks_distance):
            jj = int(j[i])
            best = PowerLawFit(float(alpha[i]), float(x[jj]), float(ks[i]), n - jj)
    return best


def heavy_tail_exponent(weight: torch.Tensor, *, min_tail: int = 10) -> PowerLawFit:
    """The power-law exponent of the tail of ``W^T W``'s eigenvalues (its empirical spectral
    density), by :func:`fit_power_law`: HT-SR's ``alpha`` (Martin & Mahoney 2021;
    WeightWatchers), about 2-4 for well-trained layers and larger for random-like ones. The
    fit looks at the whole spectrum, taken from the Gram matrix's eigenvalues."""
    return fit_power_law(_squared_singular_values(_matrix("weight", weight)), min_tail=min_tail)


# ---- intruder dimensions ------------------------------------------------------------------------


@dataclass
class IntruderDimensions:
    """The intruder dimensions of a tuned weight against its original.

    Attributes:
        indices: the positions (0-based, among the top ``k``) of the tuned weight's left
            singular vectors that are intruders.
        max_cosine: ``(k,)`` float64: for each of the top ``k``, its largest absolute cosine
            with any left singular vector of the original.
        singular_values: ``(k,)``: the tuned weight's top ``k`` singular values.
        k, epsilon: the definition's parameters.
    """

    indices: list[int]
    max_cosine: torch.Tensor
    singular_values: torch.Tensor
    k: int
    epsilon: float

    @property
    def count(self) -> int:
        return len(self.indices)


def _check_pair(original, tuned, k, epsilon) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    original = _matrix("original", original)
    tuned = _matrix("tuned", tuned)
    if original.shape != tuned.shape:
        raise ValueError(f"tuned must have original's shape {tuple(original.shape)}, got "
                         f"{tuple(tuned.shape)}")  # fmt: skip
    k = check.positive_int("k", k)
    if k > min(original.shape):
        raise ValueError(f"k must be at most min(out, in) = {min(original.shape)}, got {k}")
    epsilon = check.real("epsilon", epsilon, 0.0, 1.0)
    return original, tuned, k, epsilon


def _original_coefficients(original: torch.Tensor, vectors: torch.Tensor):
    """``(coefficients, squared singular values)``: the coordinates ``U_0^T vectors`` of
    ``vectors`` (``(m, k)``) in the original's left singular basis ``U_0``, from the
    eigendecomposition of its smaller Gram matrix (module docstring)."""
    w = original.double()
    if w.shape[0] <= w.shape[1]:
        values, basis = torch.linalg.eigh(w @ w.T)
        return basis.T @ vectors, values.flip(0).clamp_min(0.0)
    q, r = torch.linalg.qr(w)  # W = Q R: the left singular vectors are Q U_R
    values, basis = torch.linalg.eigh(r @ r.T)
    return basis.T @ (q.T @ vectors), values.flip(0).clamp_min(0.0)


def _intruders(coefficients, s, k, epsilon) -> IntruderDimensions:
    best = coefficients.abs().amax(0)
    indices = [j for j in range(k) if float(best[j]) < epsilon]
    return IntruderDimensions(indices, best, s, k, epsilon)


def intruder_dimensions(
    original: torch.Tensor,
    tuned: torch.Tensor,
    k: int = 10,
    epsilon: float = 0.5,
    *,
    oversample: int = 20,
    n_iter: int = 6,
    seed: int = 0,
) -> IntruderDimensions:
    """The tuned weight's intruder dimensions (module docstring; Shuttleworth et al. 2024).

    Args:
        original, tuned: ``(out, in)`` weights of the same shape.
        k: how many of the tuned weight's top left singular vectors to examine (10).
        epsilon: the cosine threshold in ``[0, 1]``; a vector is an intruder when its best
            absolute cosine with every left singular vector of the original is below it.
        oversample, n_iter, seed: the randomized SVD of the tuned weight's top ``k``
            (:func:`lowrank.linalg.rsvd`). The error of its ``j``-th vector shrinks like
            ``(s_{k + oversample + 1} / s_j)^(2 n_iter + 1)``; the defaults are generous
            because the top ``k`` cost little next to the original's basis. Where two
            singular values are nearly equal only their span is defined, by any method.

    The original's basis is complete (eigendecomposition of its Gram matrix; the definition
    leaves no truncation there), the tuned weight's is truncated. Computed in float64.
    """
    original, tuned, k, epsilon = _check_pair(original, tuned, k, epsilon)
    u, s, _ = rsvd(tuned.double(), k, oversample=oversample, n_iter=n_iter, seed=seed)
    coefficients, _ = _original_coefficients(original, u)
    return _intruders(coefficients, s, k, epsilon)


def intruder_dimensions_reference(
    original: torch.Tensor, tuned: torch.Tensor, k: int = 10, epsilon: float = 0.5
) -> IntruderDimensions:
    """The definition taken literally: full SVDs of both weights in float64, the top ``k``
    left singular vectors of ``tuned`` against all of ``original``'s."""
    original, tuned, k, epsilon = _check_pair(original, tuned, k, epsilon)
    u0 = torch.linalg.svd(original.double(), full_matrices=False)[0]
    u, s, _ = torch.linalg.svd(tuned.double(), full_matrices=False)
    return _intruders(u0.T @ u[:, :k], s[:k], k, epsilon)


# ---- whole models -------------------------------------------------------------------------------


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` by name, skipping the layers inside lowrank's own modules (an
    adapter's base): those are read through the module that holds them."""
    from lowrank.nn.registry import layer_classes

    inside = {id(sub) for m in model.modules() if isinstance(m, layer_classes())
              for sub in m.modules() if sub is not m}  # fmt: skip
    found = {}
    for name, module in model.named_modules():
        own = isinstance(module, (nn.Linear, *layer_classes()))
        if name and own and id(module) not in inside:
            found[name] = module
    return found


def spectral_table(
    original: nn.Module,
    tuned: nn.Module,
    *,
    k: int = 10,
    epsilon: float = 0.5,
    filter=None,
    min_tail: int = 10,
    seed: int = 0,
) -> list[dict]:
    """Per linear layer of two models (matched by name): intruder dimensions of the tuned
    weight against the original, and both weights' effective rank, stable rank and
    heavy-tail exponent, as a list of dicts (one row per layer, JSON values).

    Args:
        original, tuned: two models with the same linear layers. A tuned layer may be an
            ``nn.Linear`` or a lowrank layer or adapter: its dense weight is read (an adapter
            unmerged counts its change). The original's layers must be plain dense weights.
        k, epsilon: of :func:`intruder_dimensions`.
        filter: which layers: a callable ``(name, module) -> bool`` on the original's
            layers, or a list of names (default: all).
        min_tail: of :func:`fit_power_law`.
        seed: of the randomized SVD.

    Each row has ``name``, ``shape``, ``intruders`` (the count), ``intruder_indices``,
    ``max_cosine`` (a list of ``k``), and ``effective_rank``, ``stable_rank`` and ``alpha``
    with suffixes ``_original`` and ``_tuned``. Per layer the original's Gram matrix is
    decomposed once (basis and spectrum), the tuned one's eigenvalues computed once (stable
    rank then comes exactly from the spectrum) and its top ``k`` by rsvd.

    Raises:
        TypeError: for arguments of the wrong type.
        ValueError: naming every layer missing from ``tuned`` or of another shape, before
            any computation; for ``k`` above a selected layer's dimensions.
    """
    for name, model in (("original", original), ("tuned", tuned)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
    if filter is not None and not callable(filter):
        names = filter
        if isinstance(names, str) or not all(isinstance(t, str) for t in names):
            raise TypeError("filter must be a callable (name, module) -> bool or a list of "
                            "layer names")  # fmt: skip
        filter = lambda name, module: name in names  # noqa: E731
    k = check.positive_int("k", k)
    epsilon = check.real("epsilon", epsilon, 0.0, 1.0)
    layers = {n: m for n, m in _linear_layers(original).items()
              if filter is None or filter(n, m)}  # fmt: skip
    if not layers:
        raise ValueError("original has no linear layer to compare (after filter)")
    theirs = _linear_layers(tuned)
    missing = [n for n in layers if n not in theirs]
    wrong = [f"{n} {tuple(layers[n].weight.shape)} vs {tuple(theirs[n].weight.shape)}"
             for n in layers if n in theirs
             and layers[n].weight.shape != theirs[n].weight.shape]  # fmt: skip
    if missing or wrong:
        parts = ([f"missing from tuned: {', '.join(missing)}"] if missing else []) + \
                ([f"shapes differ: {'; '.join(wrong)}"] if wrong else [])  # fmt: skip
        raise ValueError("the models' linear layers do not match: " + "; ".join(parts))
    small = [n for n, m in layers.items() if k > min(m.weight.shape)]
    if small:
        raise ValueError(f"k={k} exceeds min(out, in) of layers {', '.join(small)}")
    rows = []
    with torch.no_grad():
        for name, layer in layers.items():
            w0 = _matrix(f"{name}.weight", layer.weight)
            w1 = _matrix(f"{name}.weight (tuned)", theirs[name].weight)
            u, s, _ = rsvd(w1.double(), k, oversample=20, n_iter=6, seed=seed)
            coefficients, values0 = _original_coefficients(w0, u)
            found = _intruders(coefficients, s, k, epsilon)
            values1 = _squared_singular_values(w1)
            row = {"name": name, "shape": list(w0.shape), "intruders": found.count,
                   "intruder_indices": found.indices,
                   "max_cosine": [float(c) for c in found.max_cosine]}  # fmt: skip
            for suffix, values in (("original", values0), ("tuned", values1)):
                top = float(values[0])
                row[f"effective_rank_{suffix}"] = _effective_rank(values.sqrt())
                row[f"stable_rank_{suffix}"] = float(values.sum()) / top if top > 0 else 0.0
                row[f"alpha_{suffix}"] = fit_power_law(values, min_tail=min_tail).alpha
            rows.append(row)
    return rows
