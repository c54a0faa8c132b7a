"""``LoRAAdapter``: a low-rank adapter around a frozen ``nn.Linear``, with SVD-based inits.

``y = base(x) + (alpha / rank) * x A^T B^T`` with ``A`` (``rank x in``) and ``B``
(``out x rank``) trainable and the base frozen (Hu et al. 2021). ``B A`` is never formed
in forward or backward: the input meets ``A`` first (``rank`` columns), and the scale is
applied to those ``rank`` columns.

Initialisations (``init=``), with PEFT's conventions (the same init gives the same
adapter as PEFT's ``init_lora_weights``, up to the SVD's rounding):

- ``"gaussian"``: ``A ~ N(0, 1/rank^2)``, ``B = 0`` (PEFT's ``"gaussian"``);
  ``"kaiming"``: ``A`` Kaiming-uniform, ``B = 0`` (PEFT's default). Both start as the
  identity change.
- ``"pissa"`` (Meng et al. 2024): the principal singular triplets of the base weight,
  ``A = sqrt(S/s) V^T``, ``B = U sqrt(S/s)`` (``s = alpha/rank``), by
  :func:`lowrank.linalg.rsvd` (``svd="exact"`` for the full SVD); the base weight becomes
  the residual ``W - s B A``, so the layer's function is unchanged at init.
- ``"olora"`` (Büyükakyüz 2024): ``B = Q_r``, ``A = R_r`` from the QR factorisation of
  the base weight; the base becomes the residual likewise.
- ``"eva"`` (Paischer et al. 2024): ``A`` = the top right singular vectors of the layer's
  centred input activations on calibration data (the top eigenvectors of their
  covariance, from exact running sums, :class:`lowrank.nn.calibration.InputStats`),
  ``B = 0``. Through :func:`lowrank.nn.convert` the ranks are redistributed across layers
  by explained variance, as EVA does.
- ``"corda"`` (Yang et al. 2024): the SVD of ``W C`` with ``C`` the inputs' second moment
  on calibration data; ``A = sqrt(S/s) V^T C^{-1}``, ``B = U sqrt(S/s)``, taking the
  largest ``rank`` components (``corda_method="ipm"``, instruction-previewed) or the
  smallest (``"kpm"``, knowledge-preserved); the base becomes the residual.

The output-preserving inits that rewrite the base weight (PiSSA, OLoRA, CorDA) keep the
initial factors as buffers ``A0``/``B0``: a trained adapter is then exported against the
*unmodified* base as a plain LoRA adapter of rank ``2 rank``, ``[A; A0]`` and
``[B, -B0]`` (what PEFT does when it converts PiSSA to LoRA), see :func:`save_peft`.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank import _validate as check
from lowrank.linalg.rsvd import rsvd
from lowrank.nn import peft_export
from lowrank.nn._base import AdapterLinear, check_base, check_dropout, config_dtype
from lowrank.nn.calibration import InputStats
from lowrank.nn.registry import ConversionContext, KindConfig, register_kind

INITS = ("gaussian", "kaiming", "pissa", "olora", "eva", "corda")
MUTATING = ("pissa", "olora", "corda")  # inits that rewrite the base weight
DATA_DRIVEN = ("eva", "corda")


class LoRAAdapter(AdapterLinear):
    """LoRA around a frozen ``nn.Linear`` (module docstring).

    Args:
        base: the layer to adapt; its parameters are frozen.
        rank: the adapter's rank.
        alpha: the scale is ``alpha / rank`` (default ``alpha = rank``: scale 1).
        dropout: dropout on the adapter's input.
        init: one of :data:`INITS`.
        stats: the layer's input statistics on calibration data (``"eva"``, ``"corda"``).
        svd: ``"randomized"`` (default) or ``"exact"``, for ``"pissa"``.
        n_iter: power iterations of the randomized SVD (PiSSA; default 2, with
            ``max(10, rank // 2)`` oversampling: more accurate than PEFT's
            ``"pissa_niter_4"`` (``torch.svd_lowrank`` without oversampling) in less time,
            see ``lowrank/bench/bench_lora.py``).
        corda_method: ``"ipm"`` or ``"kpm"`` (CorDA).
        seed: for the random inits and the randomized SVD.
        dtype: the adapter's dtype (default the base's). Inputs are cast to it and the
            change back to the base's output dtype, so a float32 adapter trains on a
            bfloat16 base.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        init: str = "gaussian",
        *,
        stats: InputStats | None = None,
        svd: str = "randomized",
        n_iter: int = 2,
        corda_method: str = "ipm",
        seed: int | None = 0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_features, in_features = check_base(base)
        rank = check.positive_int("rank", rank)
        if rank > min(in_features, out_features):
            raise ValueError(f"rank must be at most min(in, out) = "
                             f"{min(in_features, out_features)}, got {rank}")  # fmt: skip
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if svd not in ("randomized", "exact"):
            raise ValueError(f"svd must be 'randomized' or 'exact', got {svd!r}")
        if corda_method not in ("ipm", "kpm"):
            raise ValueError(f"corda_method must be 'ipm' or 'kpm', got {corda_method!r}")
        dropout = check_dropout(dropout)
        if init in DATA_DRIVEN and stats is None:
            raise ValueError(f"init={init!r} needs the layer's input statistics (stats=), e.g. "
                             "through lowrank.nn.convert(..., calibration=batches)")  # fmt: skip
        self._attach_base(base, dropout)
        self.rank = rank
        self.alpha = float(rank if alpha is None else check.real("alpha", alpha))
        if self.alpha == 0.0:
            raise ValueError("alpha must be non-zero: the adapter's output is scaled by "
                             "alpha / rank")  # fmt: skip
        self.scale = self.alpha / rank
        self.init = init
        kw = self._factory_kwargs(dtype)
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.register_buffer("A0", None)
        self.register_buffer("B0", None)
        with torch.no_grad():
            self._initialise(stats, svd, n_iter, corda_method, seed)

    # ---- initialisation ---------------------------------------------------------------------

    def _initialise(self, stats, svd, n_iter, corda_method, seed) -> None:
        if self.A.is_meta:
            # Shapes only (e.g. a model built on the meta device, then loaded): no values to
            # compute, but the same parameters and buffers as a materialised adapter.
            if self.init in DATA_DRIVEN:
                _check_stats(stats, self.in_features)
            if self.init in MUTATING:
                self.A0, self.B0 = torch.empty_like(self.A), torch.empty_like(self.B)
            return
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.A.device).manual_seed(seed)
        if self.init in ("gaussian", "kaiming", "eva"):
            nn.init.zeros_(self.B)
            if self.init == "gaussian":
                self.A.normal_(0.0, 1.0 / self.rank, generator=generator)
            elif self.init == "kaiming":
                bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5))
                self.A.uniform_(-bound, bound, generator=generator)
            else:
                self.A.copy_(eva_components(stats, self.rank, self.in_features))
            return
        w = self.base.weight.detach()
        work = w.double() if w.dtype == torch.float64 else w.float()
        if self.init == "pissa":
            if svd == "exact":
                u, s, vh = torch.linalg.svd(work, full_matrices=False)
                u, s, vh = u[:, : self.rank], s[: self.rank], vh[: self.rank]
            else:
                oversample = max(10, self.rank // 2)
                u, s, vh = rsvd(work, self.rank, n_iter=n_iter, oversample=oversample,
                                seed=seed or 0)  # fmt: skip
            a, b = _split(u, s, vh, self.scale)
        elif self.init == "olora":
            q, r = torch.linalg.qr(work)
            a, b = r[: self.rank], q[:, : self.rank]
        else:
            a, b = corda_factors(work, stats, self.rank, self.scale, corda_method)
        self.A.copy_(a)
        self.B.copy_(b)
        # The residual from the factors as stored, so W_res + s B A = W to rounding.
        residual = work - self.scale * (self.B.to(work.dtype) @ self.A.to(work.dtype))
        self.base.weight.copy_(residual)
        self.A0 = self.A.detach().clone()
        self.B0 = self.B.detach().clone()

    # ---- the function ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = F.linear(self.dropout(x).to(self.A.dtype), self.A)
        return y + F.linear(h * self.scale, self.B).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight change ``scale * B A`` (formed: for merging)."""
        return self.scale * (self.B @ self.A)

    def original_weight(self) -> torch.Tensor:
        """The base weight before an output-preserving init rewrote it (``W_res + s B0 A0``;
        the base weight itself for the other inits), unmerged."""
        w = self.base.weight.detach()
        if self.merged:
            w = w - self.delta_weight().detach().to(w.dtype)
        if self.A0 is not None:
            w = w + (self.scale * (self.B0 @ self.A0)).to(w.dtype)
        return w

    # ---- PEFT --------------------------------------------------------------------------------

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """``(lora_A, lora_B, r, lora_alpha)`` of the plain LoRA adapter that gives this
        layer's function on the *original* base weight: the factors themselves, or for
        PiSSA/OLoRA/CorDA ``[A; A0]``, ``[B, -B0]`` with rank and alpha doubled (the scale
        is unchanged)."""
        a, b = self.A.detach(), self.B.detach()
        if self.A0 is None:
            return a, b, self.rank, self.alpha
        a2 = torch.cat([a, self.A0.to(a.dtype)], dim=0)
        b2 = torch.cat([b, -self.B0.to(b.dtype)], dim=1)
        return a2, b2, 2 * self.rank, 2 * self.alpha

    def get_extra_state(self) -> dict[str, Any]:
        return {"merged": self.merged, "init": self.init, "alpha": self.alpha}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict):
            self.merged = bool(state.get("merged", False))
            self.init = state.get("init", self.init)
            if state.get("alpha") is not None:
                self.alpha = float(state["alpha"])
                self.scale = self.alpha / self.rank

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A0/B0 exist only for the base-rewriting inits: make room for them (or drop them)
        # as the checkpoint says.
        for name in ("A0", "B0"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.A.device))
            elif key not in state_dict and getattr(self, name) is not None:
                setattr(self, name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scale={self.scale:g}, init={self.init}, merged={self.merged}"
        )


# ---- the data-driven inits ----------------------------------------------------------------------


def _sign_fixed(rows: torch.Tensor) -> torch.Tensor:
    """Each row with its largest-magnitude entry positive (a deterministic sign)."""
    index = rows.abs().argmax(dim=1, keepdim=True)
    return torch.where(rows.gather(1, index) < 0, -rows, rows)


def _check_stats(stats: Any, in_features: int) -> None:
    """``stats`` must be finite input statistics of a layer with ``in_features`` inputs."""
    if not isinstance(stats, InputStats) or stats.gram.shape != (in_features, in_features):
        raise ValueError(f"stats must be the InputStats of a layer with {in_features} inputs")
    if not stats.gram.is_meta and not bool(torch.isfinite(stats.gram).all()
                                           & torch.isfinite(stats.total).all()):  # fmt: skip
        raise ValueError("stats contain NaN or Inf (the layer's calibration inputs were not "
                         "finite, or overflowed)")  # fmt: skip


def eva_spectrum(stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """``(explained variance ratios, components)`` of the centred inputs, descending:
    eigenvalues of the covariance over its trace, and its eigenvectors as rows."""
    cov = stats.covariance(centred=True)
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    ratio = values / values.sum().clamp_min(1e-300)
    return ratio, _sign_fixed(vectors.T)


def eva_components(stats: InputStats, rank: int, in_features: int) -> torch.Tensor:
    """The top ``rank`` principal directions of the layer's inputs, ``(rank, in)``."""
    _check_stats(stats, in_features)
    if stats.count < 2:
        raise ValueError("EVA needs at least two calibration tokens")
    return eva_spectrum(stats)[1][:rank]


def corda_factors(w, stats, rank, scale, method):
    """CorDA's ``(A, B)``: the SVD of ``W C`` (``C`` the inputs' second moment, damped by
    ``0.01`` times its mean diagonal, doubled until positive definite, as CorDA does)."""
    in_f = w.shape[1]
    _check_stats(stats, in_f)
    c = stats.covariance(centred=False).to(w.dtype)
    c = (c + c.T) / 2
    eye = torch.eye(in_f, dtype=c.dtype, device=c.device)
    mean_diag = float(c.diagonal().mean())
    damping = 0.01
    for _ in range(30):
        fixed = c + damping * max(mean_diag, 1e-30) * eye
        factor, info = torch.linalg.cholesky_ex(fixed)
        if int(info) == 0:
            break
        damping *= 2
    else:
        raise ValueError("CorDA: the input statistics are not positive semi-definite")
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    keep = slice(0, rank) if method == "ipm" else slice(len(s) - rank, len(s))
    u, s, vh = u[:, keep], s[keep], vh[keep]
    v_c = torch.cholesky_solve(vh.T, factor).T  # V^T C^{-1}, (rank, in)
    return _split(u, s, v_c, scale)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scale: float):
    """``(A, B)`` with ``scale * B A = U diag(s) V^T`` and ``B``'s columns as long as
    ``A``'s rows: ``A = sign(scale) sqrt(s/|scale|) V^T``, ``B = U sqrt(s/|scale|)`` (a
    negative ``alpha`` flips ``A``)."""
    root = (s / abs(scale)).sqrt()
    return math.copysign(1.0, scale) * root[:, None] * vh, u * root


def eva_ranks(spectra: dict[str, torch.Tensor], rank: int, rho: float) -> dict[str, int]:
    """EVA's redistribution: the budget ``rank * layers`` goes to the components with the
    largest explained-variance ratios across all layers, at most ``round(rank * rho)``
    per layer (a layer may get none)."""
    if rho < 1.0:
        raise ValueError(f"rho must be at least 1, got {rho}")
    cap = max(1, round(rank * rho))
    pool = [(float(v), name) for name, ratio in spectra.items() for v in ratio[:cap]]
    pool.sort(key=lambda item: -item[0])
    counts = Counter(name for _, name in pool[: rank * len(spectra)])
    return {name: counts.get(name, 0) for name in spectra}


# ---- saving for PEFT ----------------------------------------------------------------------------


def peft_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    r"""``(tensors, adapter_config)`` of every adapter in ``model`` that gives plain LoRA
    factors (:class:`LoRAAdapter` and the other adapters with a ``peft_factors()`` method,
    e.g. :class:`lowrank.nn.svd_adapter.SVDAdapter`) as PEFT's LoRA format: keys
    ``base_model.model.<name>.lora_A.weight`` / ``.lora_B.weight``, against the original
    (unmodified) base weights.

    The config names exactly the adapted layers. PEFT matches a ``target_modules`` list and
    the keys of ``rank_pattern``/``alpha_pattern`` as name *suffixes* (``"q"`` also matches
    ``"blk.q"``), so ``target_modules`` is written as a regular expression PEFT matches
    against the whole name, and each pattern key as ``^<name>``: PEFT tries a key ``k`` as
    ``(.*\.)?(k)$`` from the start of the name, so the anchor lets it match only the name
    itself. ``r`` and ``lora_alpha`` are the most common values and the patterns list the
    layers that differ.

    PEFT has one ``lora_dropout`` for all layers: the adapters' dropout when they agree, else
    the most common one, with a warning naming the layers whose dropout differs (dropout acts
    only in training, so the loaded model's outputs are the same either way).
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts: dict[str, float] = {}
    layers = peft_export.adapters(
        model, lambda m: isinstance(m, AdapterLinear) and hasattr(m, "peft_factors"),
        "adapter with plain LoRA factors (a LoRAAdapter, or another adapter with a "
        "peft_factors() method such as an SVDAdapter)")  # fmt: skip
    for name, module in layers.items():
        a, b, r, alpha = module.peft_factors()
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
        ranks[name], alphas[name] = r, alpha
        dropouts[name] = float(getattr(getattr(module, "dropout", None), "p", 0.0))
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas[n] for n in ranks if ranks[n] == r).most_common(1)[0][0]
    dropout = Counter(dropouts.values()).most_common(1)[0][0]
    differ = [n for n, p in dropouts.items() if p != dropout]
    if differ:
        warnings.warn(f"PEFT has one lora_dropout for all layers: saved {dropout:g}, the most "
                      f"common; the layers {differ[:5]} use another dropout, which PEFT will "
                      "not apply if it trains them", stacklevel=3)  # fmt: skip
    names, key = sorted(ranks), peft_export.pattern_key
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        # a string is matched against each module's whole name (re.fullmatch)
        "target_modules": peft_export.target_regex(names),
        "init_lora_weights": True,  # never re-run a base-rewriting init on load
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "rank_pattern": {key(n): ranks[n] for n in names if ranks[n] != r},
        "alpha_pattern": {key(n): alphas[n] for n in names if alphas[n] != alpha},
        "inference_mode": True,
    }
    return tensors, config


def save_peft(model: nn.Module, folder: str, *, base_model_name_or_path: str | None = None):
    """Writes the model's LoRA adapters where ``peft.PeftModel.from_pretrained(original_model,
    folder)`` loads them: ``adapter_model.safetensors`` (``adapter_model.bin`` without the
    ``safetensors`` package) and ``adapter_config.json``. ``original_model`` is the model
    before conversion: adapters whose init rewrote the base weight are saved as the
    equivalent rank-``2r`` adapter on the original weight (module docstring)."""
    tensors, config = peft_state(model)
    peft_export.write_folder(folder, tensors, config,
                             base_model_name_or_path=base_model_name_or_path)  # fmt: skip


# ---- the conversion kind ------------------------------------------------------------------------


@dataclass
class LoRAConfig(KindConfig):
    """``convert(model, "lora", ...)``: :class:`LoRAAdapter`'s arguments (its docstring),
    the same for every layer, with ``rank`` 8 by default. For ``init="eva"`` the ranks are
    redistributed across layers: a layer gets at most ``round(rank * rho)`` components,
    the ``rank * layers`` components with the largest explained variance ratios across all
    layers are kept, and ``alpha`` follows each layer's rank so the scale stays
    ``alpha / rank``. ``"eva"`` and ``"corda"`` need calibration batches."""

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    init: str = "gaussian"
    svd: str = "randomized"
    n_iter: int = 2
    corda_method: str = "ipm"
    seed: int | None = 0
    dtype: torch.dtype | None = None
    rho: float = 2.0

    def __post_init__(self):
        self.rank = check.positive_int("rank", self.rank)
        if self.alpha is not None:
            self.alpha = check.real("alpha", self.alpha)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        self.rho = check.real("rho", self.rho)
        self.dtype = config_dtype(self.dtype)


def _plan(context: ConversionContext, config: LoRAConfig):
    if config.init in DATA_DRIVEN and context.batches is None:
        raise ValueError(f"init={config.init!r} needs calibration batches (calibration=)")
    shapes, stats = context.shapes, context.stats
    rank = config.rank
    alpha = float(rank if config.alpha is None else config.alpha)
    ranks = {n: min(rank, *shapes[n]) for n in shapes}
    if config.init == "eva":  # EVA's redistribution by explained variance across layers
        spectra = {n: eva_spectrum(stats[n])[0] for n in shapes}
        ranks = {n: min(r, *shapes[n]) for n, r in eva_ranks(spectra, rank, config.rho).items()}
        context.report.allocation = f"EVA: {rank * len(shapes)} components by explained variance"
    options = {"dropout": config.dropout, "init": config.init, "svd": config.svd,
               "n_iter": config.n_iter, "corda_method": config.corda_method,
               "seed": config.seed, "dtype": config.dtype}  # fmt: skip

    def make(name, linear):
        r = ranks[name]
        if r == 0:
            return None, "EVA gave it no components"
        layer = LoRAAdapter(linear, r, alpha * r / rank, stats=stats.get(name), **options)
        return layer, f"rank {r}, init {layer.init}"

    return make


def _describe(adapter: LoRAAdapter) -> dict:
    dropout = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
    return {"rank": adapter.rank, "alpha": adapter.alpha, "dropout": dropout,
            "dtype": str(adapter.A.dtype).removeprefix("torch."),
            "initial_factors": adapter.A0 is not None}  # fmt: skip


def _rebuild(linear: nn.Linear, d: dict) -> LoRAAdapter:
    """The factors, ``A0``/``B0`` and the init's name come from the saved state."""
    adapter = LoRAAdapter(linear, d["rank"], d["alpha"], d["dropout"], "gaussian",
                          dtype=getattr(torch, d["dtype"]))  # fmt: skip
    if d["initial_factors"]:
        adapter.A0, adapter.B0 = torch.empty_like(adapter.A), torch.empty_like(adapter.B)
    return adapter


register_kind("lora", config=LoRAConfig, layers=LoRAAdapter, plan=_plan, describe=_describe,
              rebuild=_rebuild, adapter=True,
              calibration=lambda config: config.init in DATA_DRIVEN)  # fmt: skip
