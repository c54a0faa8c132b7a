"""``SVDAdapter``: the one parameterisation of the SVD-based adapters, ``delta W = s B C A``.

Around a frozen ``nn.Linear`` with weight ``W`` (``out x in``)::

    y = base(x) + s * x A^T C^T B^T          B: (out, r)   C: (r, r) or its diagonal (r,)
                                             A: (r, in)    s: the scale

Each of ``B``, ``C``, ``A`` and ``s`` is either trainable (an ``nn.Parameter``) or frozen (a
buffer, saved in the state dict under the same name); the methods built on it (LoRA-XS,
LoRA-SB, SORSA, SVFit, LoLDU in :mod:`lowrank.nn.svd_methods`) differ only in which parts
train, how they start and what they add to training. The forward never forms the
``out x in`` change: ``x`` meets ``A`` first (``r`` columns), then ``C`` (an ``r x r``
product or a scaling of the columns), then ``B``.

Contract for code built on the core (its public API):

- ``SVDAdapter(base, rank, *, diagonal=False, trainable=("C",), scale=1.0, dropout=0.0,
  dtype=None)`` builds the structure with zero factors; :meth:`SVDAdapter.set_factors`
  gives them values. ``set_factors(..., residual=True)`` makes the base weight the
  residual ``W - s B C A`` (so the layer's function is unchanged) and keeps the initial
  values the export needs (``C0 = s C`` at init, and ``B0``/``A0`` for a ``B``/``A``
  trainable then or made trainable later by :meth:`SVDAdapter.set_trainable`).
- :meth:`SVDAdapter.core` is the ``C`` the function uses (``C`` itself); a subclass
  overrides it to mask or transform the core (e.g. pruned singular values), and
  :meth:`forward`, :meth:`delta_weight` and :meth:`peft_factors` follow.
- :meth:`SVDAdapter.set_trainable` switches factors between parameter and buffer.
- :meth:`SVDAdapter.peft_factors` gives the plain LoRA factors ``(lora_A, lora_B, r,
  lora_alpha)`` of the same function on the *original* base weight (``lora_B = B C``,
  ``lora_A = A``; rank ``2r`` when ``B`` or ``A`` trained after a residual init), which
  :func:`lowrank.nn.lora.save_peft` writes.
- :func:`top_singular_triplets` computes the top-``r`` SVDs of many weights at once with
  :func:`lowrank.linalg.rsvd`, one batched call per shape; :func:`register_svd_kind`
  registers a conversion kind for a subclass with the shared ``describe``/``rebuild``.

``merge()``/``unmerge()`` add and subtract :meth:`delta_weight` (``AdapterLinear``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowrank import _validate as check
from lowrank.linalg.rsvd import rsvd
from lowrank.nn._base import AdapterLinear, check_base, check_dropout
from lowrank.nn.registry import ConversionContext, KindConfig, register_kind

FACTORS = ("B", "C", "A")
TRAINABLE = ("B", "C", "A", "scale")
SVDS = ("randomized", "exact")


def _trainable_set(trainable: Any) -> tuple[str, ...]:
    """The canonical tuple of trainable parts, in :data:`TRAINABLE` order."""
    if isinstance(trainable, str):
        trainable = (trainable,)
    try:
        names = set(trainable)
    except TypeError:
        raise TypeError(f"trainable must be a collection of {TRAINABLE}, got "
                        f"{type(trainable).__name__}") from None  # fmt: skip
    unknown = sorted(str(n) for n in names - set(TRAINABLE))
    if unknown:
        raise ValueError(f"trainable must name parts among {TRAINABLE}, got {unknown}")
    return tuple(n for n in TRAINABLE if n in names)


class SVDAdapter(AdapterLinear):
    """``delta W = s B C A`` around a frozen ``nn.Linear`` (module docstring).

    Args:
        base: the layer to adapt; its parameters are frozen.
        rank: ``r``, at most ``min(in_features, out_features)``.
        diagonal: ``C`` is diagonal, stored as its ``r`` diagonal entries.
        trainable: which of ``"B"``, ``"C"``, ``"A"``, ``"scale"`` train (parameters);
            the others are buffers.
        scale: the initial ``s``.
        dropout: dropout on the adapter's input.
        dtype: the adapter's dtype (default the base's). Inputs are cast to it and the
            change back to the base's output dtype.

    The factors start as zeros (the identity change); :meth:`set_factors` sets them.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        *,
        diagonal: bool = False,
        trainable: Iterable[str] = ("C",),
        scale: float = 1.0,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_features, in_features = check_base(base)
        rank = check.positive_int("rank", rank)
        if rank > min(in_features, out_features):
            raise ValueError(f"rank must be at most min(in, out) = "
                             f"{min(in_features, out_features)}, got {rank}")  # fmt: skip
        trainable = _trainable_set(trainable)
        scale = check.real("scale", scale)
        dropout = check_dropout(dropout)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self._attach_base(base, dropout)
        self.rank = rank
        self.diagonal = bool(diagonal)
        kw = self._factory_kwargs(dtype)
        shapes = {"B": (out_features, rank), "C": (rank,) if diagonal else (rank, rank),
                  "A": (rank, in_features)}  # fmt: skip
        self.trainable = ()
        for name in FACTORS:
            self._put(name, torch.zeros(shapes[name], **kw), False)
        # the scale in float32 at least, so a low-precision adapter keeps it exactly
        scale_dtype = torch.float64 if kw["dtype"] == torch.float64 else torch.float32
        self._put("scale", torch.tensor(scale, device=kw["device"], dtype=scale_dtype), False)
        for name in ("B0", "C0", "A0"):
            self.register_buffer(name, None)
        self.set_trainable(trainable)

    # ---- the parts -----------------------------------------------------------------------------

    def _put(self, name: str, value: torch.Tensor, as_parameter: bool) -> None:
        """Stores ``value`` under ``name`` as a parameter or a (saved) buffer."""
        if name in self._parameters:
            del self._parameters[name]
        if name in self._buffers:
            del self._buffers[name]
        if as_parameter:
            self.register_parameter(name, nn.Parameter(value.detach()))
        else:
            self.register_buffer(name, value.detach())

    def set_trainable(self, trainable: Iterable[str]) -> None:
        """Makes exactly the parts in ``trainable`` (among ``"B"``, ``"C"``, ``"A"``,
        ``"scale"``) parameters and the others buffers, keeping their values. Build the
        optimizer after this call (the parameter objects change).

        After a residual init, a ``B`` or ``A`` made trainable here for the first time has
        its current value kept as ``B0``/``A0`` first, as the init keeps those of a
        trainable one: :meth:`original_weight` and :meth:`peft_factors` need it once it
        trains. A frozen factor still holds the init's value (merging writes the base
        weight only, :meth:`set_factors` keeps new initial values, a state dict loads both
        together), so a copy of it is exact."""
        trainable = _trainable_set(trainable)
        if self.C0 is not None:
            for name in ("B", "A"):
                if name in trainable and getattr(self, name + "0") is None:
                    setattr(self, name + "0", getattr(self, name).detach().clone())
        for name in TRAINABLE:
            current = getattr(self, name)
            if (name in trainable) != isinstance(current, nn.Parameter):
                self._put(name, current, name in trainable)
        self.trainable = trainable

    def core(self) -> torch.Tensor:
        """The core ``C`` the function uses: ``(r, r)``, or ``(r,)`` when diagonal. A
        subclass may override it (a mask, a transform); everything else follows."""
        return self.C

    def _core_matrix(self, core: torch.Tensor) -> torch.Tensor:
        return torch.diag(core) if self.diagonal else core

    @torch.no_grad()
    def set_factors(
        self,
        B: torch.Tensor,
        C: torch.Tensor,
        A: torch.Tensor,
        *,
        scale: float | None = None,
        residual: bool = False,
    ) -> None:
        """Sets the factors (and optionally the scale). With ``residual`` the base weight
        becomes ``W - s B C A`` computed from the factors as stored (so the layer's
        function is unchanged to rounding), and the initial ``C0 = s C`` (the scale folded in,
        so a trainable scale is covered; plus ``B0``/``A0`` for trainable ``B``/``A``) are
        kept for the PEFT export. On the meta device only the structure changes."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.set_factors: unmerge the adapter first")
        for name, value in (("B", B), ("C", C), ("A", A)):
            check.tensor(name, value)
            expected = tuple(getattr(self, name).shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
        if self.A.is_meta:
            if residual:
                self._keep_initial()
            return
        for name, value in (("B", B), ("C", C), ("A", A)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} contains NaN or Inf")
        for name, value in (("B", B), ("C", C), ("A", A)):
            getattr(self, name).copy_(value)
        if scale is not None:
            self.scale.fill_(check.real("scale", scale))
        if residual:
            w = self.base.weight
            work = w.double() if w.dtype == torch.float64 else w.float()
            delta = self._delta(work.dtype)
            self.base.weight.copy_(work - delta)
            self._keep_initial()
        else:
            self.B0 = self.C0 = self.A0 = None

    def _keep_initial(self) -> None:
        self.C0 = (self.scale * self.C).detach().to(self.C.dtype)
        self.B0 = self.B.detach().clone() if "B" in self.trainable else None
        self.A0 = self.A.detach().clone() if "A" in self.trainable else None

    # ---- the function --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = F.linear(self.dropout(x).to(self.A.dtype), self.A)
        core = self.core()
        h = h * core if self.diagonal else F.linear(h, core)
        return y + F.linear(h * self.scale, self.B).to(y.dtype)

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        b, a = self.B.to(dtype), self.A.to(dtype)
        core = self.core().to(dtype)
        bc = b * core if self.diagonal else b @ core
        return self.scale.to(dtype) * (bc @ a)

    def delta_weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight change ``s B C A`` (formed: for merging)."""
        return self._delta(self.A.dtype)

    def original_weight(self) -> torch.Tensor:
        """The base weight before a residual init rewrote it, unmerged."""
        w = self.base.weight.detach()
        if self.merged:
            w = w - self.delta_weight().detach().to(w.dtype)
        if self.C0 is not None:
            b = self.B if self.B0 is None else self.B0
            a = self.A if self.A0 is None else self.A0
            bc = b * self.C0 if self.diagonal else b @ self.C0
            w = w + (bc @ a).detach().to(w.dtype)
        return w

    # ---- PEFT ----------------------------------------------------------------------------------

    @torch.no_grad()
    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """``(lora_A, lora_B, r, lora_alpha)`` of the plain LoRA adapter with this layer's
        function on the *original* base weight: ``(A, B C, r, s r)`` (PEFT's scale
        ``lora_alpha / r`` is ``s``); after a residual init, with the scale folded into
        ``lora_B`` (``lora_alpha = r``), ``(A, B (s C - C0), r, r)`` when ``B`` and ``A``
        are frozen, else ``([A; A0], [s B C, -B0 C0], 2r, 2r)``."""
        core = self._core_matrix(self.core().detach())
        b, a, s = self.B.detach(), self.A.detach(), float(self.scale)
        if self.C0 is None:
            return a, b @ core, self.rank, s * self.rank
        core0 = self._core_matrix(self.C0.to(core.dtype))
        if self.B0 is None and self.A0 is None:
            return a, b @ (s * core - core0), self.rank, float(self.rank)
        b0 = b if self.B0 is None else self.B0.to(b.dtype)
        a0 = a if self.A0 is None else self.A0.to(a.dtype)
        lora_a = torch.cat([a, a0], dim=0)
        lora_b = torch.cat([s * (b @ core), -(b0 @ core0)], dim=1)
        return lora_a, lora_b, 2 * self.rank, float(2 * self.rank)

    # ---- state ---------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"merged": self.merged}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict):
            self.merged = bool(state.get("merged", False))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The initial factors exist only after a residual init: make room for them (or drop
        # them) as the checkpoint says.
        for name in ("B0", "C0", "A0"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                like = getattr(self, name[0])
                setattr(self, name, torch.empty_like(state_dict[key], device=like.device,
                                                     dtype=like.dtype))  # fmt: skip
            elif key not in state_dict and getattr(self, name) is not None:
                setattr(self, name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def empty(cls, base: nn.Linear, structure: Mapping[str, Any]) -> SVDAdapter:
        """An adapter of ``cls`` with the structure ``structure`` (what :func:`describe`
        gives) and zero values, without running ``cls``'s initialisation: for loading."""
        self = cls.__new__(cls)
        SVDAdapter.__init__(self, base, structure["rank"], diagonal=structure["diagonal"],
                            trainable=structure["trainable"], dropout=structure["dropout"],
                            dtype=getattr(torch, structure["dtype"]))  # fmt: skip
        for name in structure.get("initial", ()):
            like = getattr(self, name[0])
            setattr(self, name, torch.empty_like(like))
        return self

    def extra_repr(self) -> str:
        core = "diagonal" if self.diagonal else f"{self.rank}x{self.rank}"
        scale = float(self.scale) if not self.scale.is_meta else float("nan")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, core={core}, trainable={','.join(self.trainable)}, "
                f"scale={scale:g}, merged={self.merged}")  # fmt: skip


# ---- shared by the kinds ------------------------------------------------------------------------


def top_singular_triplets(
    weights: Mapping[str, torch.Tensor],
    ranks: int | Mapping[str, int],
    *,
    svd: str = "randomized",
    n_iter: int = 2,
    seed: int | None = 0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{name: (U_r, S_r, Vh_r)}``, the top-``r`` singular triplets of each weight, in
    float32 (float64 weights stay float64).

    Weights of the same shape, dtype, device and rank are stacked and decomposed by one
    batched call: :func:`lowrank.linalg.rsvd` (``svd="randomized"``, ``n_iter`` power
    iterations, ``max(10, r // 2)`` oversampling, ``seed``) or ``torch.linalg.svd``
    (``"exact"``)."""
    if svd not in SVDS:
        raise ValueError(f"svd must be one of {SVDS}, got {svd!r}")
    n_iter = check.iterations("n_iter", n_iter)
    groups: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        r = ranks if isinstance(ranks, int) else ranks[name]
        work_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        groups.setdefault((tuple(w.shape), work_dtype, w.device, r), []).append(name)
    result = {}
    for (_, dtype, _, r), names in groups.items():
        stack = torch.stack([weights[n].detach().to(dtype) for n in names])
        if svd == "exact":
            u, s, vh = torch.linalg.svd(stack, full_matrices=False)
            u, s, vh = u[..., :r], s[..., :r], vh[..., :r, :]
        else:
            u, s, vh = rsvd(stack, r, n_iter=n_iter, oversample=max(10, r // 2),
                            seed=seed or 0)  # fmt: skip
        for i, name in enumerate(names):
            result[name] = (u[i], s[i], vh[i])
    return result


def describe(adapter: SVDAdapter) -> dict:
    """The structure of an :class:`SVDAdapter` as JSON (for :func:`lowrank.nn.save`)."""
    dropout = adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0
    initial = [n for n in ("B0", "C0", "A0") if getattr(adapter, n) is not None]
    return {"rank": adapter.rank, "diagonal": adapter.diagonal,
            "trainable": list(adapter.trainable), "dropout": dropout,
            "dtype": str(adapter.A.dtype).removeprefix("torch."), "initial": initial}  # fmt: skip


def register_svd_kind(
    name: str,
    *,
    config: type[KindConfig],
    layer: type[SVDAdapter],
    plan: Callable[[ConversionContext, KindConfig], Any],
    calibration: str | Callable[[KindConfig], bool] = "none",
):
    """Registers the conversion kind ``name`` producing ``layer`` (an :class:`SVDAdapter`
    subclass), with the shared :func:`describe` and a ``rebuild`` by
    :meth:`SVDAdapter.empty` (values come from the saved state)."""
    return register_kind(name, config=config, layers=layer, plan=plan, describe=describe,
                         rebuild=lambda linear, d: layer.empty(linear, d), adapter=True,
                         calibration=calibration)  # fmt: skip
