"""GaLore for any optimizer: gradient projection around a ``torch.optim.Optimizer`` class.

:class:`GaLore` gives GaLore's low-rank gradient projection (Zhao et al. 2024) to any
optimizer: SGD with momentum, Adam, AdamW, Adafactor, bitsandbytes' 8-bit AdamW, ...
The inner optimizer never sees a projected weight ``W`` (``m x n``); it gets a **stand-in**
parameter in the projected space instead, so its state (momenta, second moments,
Adafactor's factors, 8-bit blocks) has the projected shape (``m x r``, ``r x n`` or
``r x r``). At each step, for each projected weight:

1. the projector is refreshed when due (:class:`~lowrank.optim.projector.GaLoreProjector`:
   batched, warm-started, on the same schedule as :class:`~lowrank.optim.GaLoreAdamW`);
2. the stand-in holds the weight's coordinates in the subspace, ``x = project(W)``, and its
   ``.grad`` is the projected gradient ``project(G)`` (for an orthonormal projector, the
   gradient of the loss with respect to ``x`` along ``W + project_back(x - x0)``);
3. the inner optimizer steps the stand-in, and the change it made, ``dx = x' - x``, is the
   update: ``W += scale * project_back(dx)``;
4. weight decay, if the group has ``weight_decay``, is decoupled and applied to the full
   weight after the update, ``W -= lr * weight_decay * W``, as
   :class:`~lowrank.optim.GaLoreAdamW` does (the inner optimizer's own decay of the
   stand-in would shrink only the part of ``W`` inside the subspace, so the stand-ins'
   inner groups run with ``weight_decay = 0``).

Giving the stand-in the weight's coordinates (rather than zeros) keeps optimizers whose
step depends on the parameter's value meaningful: Adafactor's relative step size scales
with the parameter's RMS, and ``RMS(project(W))`` is ``RMS(W)`` for a generic ``W``.
``dx`` is a difference of two numbers of the weight's magnitude, so its rounding error is
that of adding the update to ``W`` itself. The stand-ins hold data only during a step.

With ``torch.optim.AdamW`` inside (``weight_decay`` given to the projected group), the
updates are :class:`~lowrank.optim.GaLoreAdamW`'s, except where the two Adams differ:
torch adds ``eps`` to ``sqrt(v)`` after bias correction, GaLoreAdamW before. Parameters
that are not projected (groups without ``rank``, parameters that are not 2-D) go to the
inner optimizer as they are, with its own rules (weight decay included).

Parameter groups are :class:`~lowrank.optim.GaLoreAdamW`'s (:func:`galore_groups` builds
them); a group's other options are the inner optimizer's (``lr``, ``momentum``, ...), and
changes to them (learning-rate schedulers) reach the inner optimizer at the next step.
The state dict holds the projectors (float32 for float16/bfloat16 weights), the inner
optimizer's state dict and the refresh log, and resumes a run exactly.
:func:`lowrank.optim.layerwise` applies the updates during ``backward``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from lowrank.optim.galore import check_svd_options_unused
from lowrank.optim.projector import (
    GROUP_DEFAULTS,
    GaLoreProjector,
    Projection,
    Refresh,
    SVDProjection,
    describe,
    restore_saved_dtypes,
)

__all__ = ["GaLore"]

# The group options GaLore reads (the inner optimizer never sees them).
GALORE_KEYS = frozenset(("rank", *GROUP_DEFAULTS))
# Group entries that are no options.
PARAM_KEYS = frozenset(("params", "param_names"))


class GaLore(torch.optim.Optimizer):
    """GaLore's gradient projection around any optimizer (module docstring).

    Args:
        params: parameters or groups, as for ``torch.optim.AdamW``; a group with ``rank``
            (and optionally ``update_proj_gap`` (200), ``scale`` (1.0), ``proj_type``
            (``"std"``), ``reset_moments``) is projected, as in
            :class:`~lowrank.optim.GaLoreAdamW`; its other options are the inner
            optimizer's. A stand-in whose projector is replaced with moments to reset (by
            default for the DCT and random-column projections) starts afresh in the inner
            optimizer (its state dropped).
        optimizer: the inner optimizer's class, a subclass of ``torch.optim.Optimizer``
            (``torch.optim.AdamW``, ``torch.optim.Adafactor``, ``bitsandbytes.optim.AdamW8bit``,
            ...).
        svd, n_iter, warm_iter, oversample, seed, projection: the projector, as for
            :class:`~lowrank.optim.GaLoreAdamW`.
        projector: a ready :class:`~lowrank.optim.GaLoreProjector` (another schedule, e.g.
            a lazy refresh) instead of the one the arguments above describe.
        **options: the inner optimizer's options (its defaults for every group), e.g.
            ``lr=1e-3, momentum=0.9``.

    Raises:
        TypeError: ``optimizer`` is not an optimizer class, an option it does not take,
            a complex weight in a projected group.
        ValueError: a group option neither GaLore nor the inner optimizer knows, a rank
            larger than a projected weight's smaller dimension, a bad GaLore option.
    """

    def __init__(
        self,
        params,
        optimizer: type[torch.optim.Optimizer],
        *,
        svd: str = "randomized",
        n_iter: int = 2,
        warm_iter: int = 0,
        oversample: int = 10,
        seed: int = 0,
        projection: Projection | None = None,
        projector: GaLoreProjector | None = None,
        **options: Any,
    ) -> None:
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            what = f"an instance of {type(optimizer).__name__}" if isinstance(
                optimizer, torch.optim.Optimizer) else repr(optimizer)  # fmt: skip
            raise TypeError(f"optimizer must be a torch.optim.Optimizer class (e.g. "
                            f"torch.optim.AdamW), got {what}")  # fmt: skip
        _check_options(optimizer, options)
        svd_options = (svd, n_iter, warm_iter, oversample, seed) != ("randomized", 2, 0, 10, 0)
        if projector is not None:
            if not isinstance(projector, GaLoreProjector):
                raise TypeError(f"projector must be a GaLoreProjector, got "
                                f"{type(projector).__name__}")  # fmt: skip
            if projection is not None or svd_options:
                raise ValueError("projector is given ready: leave svd, n_iter, warm_iter, "
                                 "oversample, seed and projection at their defaults")  # fmt: skip
        else:
            if projection is None:
                projection = SVDProjection(svd, n_iter=n_iter, warm_iter=warm_iter,
                                           oversample=oversample)  # fmt: skip
            else:
                check_svd_options_unused(svd, n_iter, warm_iter, oversample)
            projector = GaLoreProjector(projection, seed=seed)
        self.projector = projector
        self.optimizer_class = optimizer
        self.inner: torch.optim.Optimizer | None = None
        # per projected weight, its stand-in; per group, its inner groups (plain, projected)
        self._standins: dict[torch.Tensor, torch.nn.Parameter] = {}
        self._inner_groups: list[tuple[int | None, int | None]] = []
        super().__init__(params, dict(options))
        # The inner optimizer, built from every group at once (its constructor may want
        # them all); it fills in its defaults, which the groups here then show too.
        pending = [self._split(group) for group in self.param_groups]
        inner_groups = [g for pair in pending for g in pair if g is not None]
        self.inner = optimizer(inner_groups, **options)
        self.defaults = {**self.inner.defaults, **self.defaults}
        index = 0
        for group, pair in zip(self.param_groups, pending):
            indices = []
            for part in pair:
                indices.append(None if part is None else index)
                index += part is not None
            self._inner_groups.append(tuple(indices))
            self._complete(group, len(self._inner_groups) - 1)
        self._sync()

    # ---- groups ------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` with GaLore's defaults and checks; the
        group's parameters (or their stand-ins) join the inner optimizer. A group that
        fails the checks is added to neither."""
        super().add_param_group(param_group)
        group, index = self.param_groups[-1], len(self.param_groups) - 1
        inner_count = 0 if self.inner is None else len(self.inner.param_groups)
        try:
            self._configure(group, index)
            if self.inner is None:  # in __init__: the inner optimizer comes after
                return
            self._check_keys(group, index)
            indices = []
            for part in self._split(group):
                if part is not None:
                    self.inner.add_param_group(part)
                indices.append(None if part is None else len(self.inner.param_groups) - 1)
            self._inner_groups.append(tuple(indices))
            self._complete(group, index)
            self._sync()
        except (TypeError, ValueError):
            self.param_groups.pop()
            if self.inner is not None:
                del self.inner.param_groups[inner_count:]
                del self._inner_groups[index:]
            for p in group["params"]:
                self._standins.pop(p, None)
            raise

    def _configure(self, group: dict, index: int) -> None:
        """The projector's defaults and checks for group ``index``; an error names the group."""
        try:
            self.projector.configure(group)
        except (TypeError, ValueError) as error:
            raise type(error)(f"parameter group {index}: {error}") from None

    def _split(self, group: dict) -> tuple[dict | None, dict | None]:
        """The inner groups of ``group``: its plain parameters, and the stand-ins of its
        projected ones (each ``None`` when empty), with the group's inner options."""
        options = {k: v for k, v in group.items() if k not in GALORE_KEYS | PARAM_KEYS}
        plain, standins = [], []
        for p in group["params"]:
            if self.projector.projects(group, p):
                dtype = torch.promote_types(p.dtype, torch.float32)
                standin = torch.nn.Parameter(torch.empty(0, dtype=dtype, device=p.device))
                self._standins[p] = standin
                standins.append(standin)
            else:
                plain.append(p)
        projected = None
        if standins:
            projected = {**options, "params": standins}
            if "weight_decay" in projected:
                projected["weight_decay"] = 0.0
        return ({**options, "params": plain} if plain else None), projected

    def _complete(self, group: dict, index: int) -> None:
        """Fills in group ``index``'s inner options from its inner groups (the inner
        optimizer's defaults) and refuses options nobody knows."""
        for inner_index in self._inner_groups[index]:
            if inner_index is None:
                continue
            for key, value in self.inner.param_groups[inner_index].items():
                if key not in PARAM_KEYS and key != "weight_decay":
                    group.setdefault(key, value)
        if "weight_decay" in self.inner.defaults:
            group.setdefault("weight_decay", self.inner.defaults["weight_decay"])
        self._check_keys(group, index)

    def _check_keys(self, group: dict, index: int) -> None:
        known = GALORE_KEYS | PARAM_KEYS | set(self.inner.defaults)
        unknown = sorted(k for k in group if k not in known)
        if unknown:
            raise ValueError(f"parameter group {index}: option {unknown[0]!r} is neither "
                             f"GaLore's nor {self.optimizer_class.__name__}'s")  # fmt: skip

    def _sync(self) -> None:
        """Copies each group's inner options (changed by a scheduler, say) to its inner
        groups; the stand-ins' inner weight decay stays 0."""
        for group, indices in zip(self.param_groups, self._inner_groups):
            for which, inner_index in enumerate(indices):
                if inner_index is None:
                    continue
                inner = self.inner.param_groups[inner_index]
                for key in inner:
                    if key in PARAM_KEYS or key not in group:
                        continue
                    inner[key] = 0.0 if which == 1 and key == "weight_decay" else group[key]

    # ---- the step ----------------------------------------------------------------------------

    @property
    def refresh_log(self) -> list[Refresh]:
        """Every projector refresh: its step, matrices and seconds."""
        return self.projector.refresh_log

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter with a ``.grad``: refresh the projectors due, step
        the inner optimizer on the stand-ins and plain parameters, apply the updates."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        projected, plain = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.projector.projects(group, p):
                    if p.grad.is_sparse:
                        raise TypeError(f"{describe(p, group)} has a sparse .grad; GaLore "
                                        "projects dense gradients only")  # fmt: skip
                    projected.append((p, group))
                else:
                    plain.append(p)
        if not projected and not plain:
            return loss
        replaced = self.projector.refresh((p, self.state[p], group) for p, group in projected)
        for p, _, group in replaced:  # the inner optimizer starts the stand-in afresh
            if self.projector.resets(group):
                self.inner.state.pop(self._standins[p], None)
        before = []
        for p, _ in projected:
            state, standin = self.state[p], self._standins[p]
            x = self.projector.project(state, p)
            standin.data = x
            standin.grad = self.projector.project(state, p.grad)
            before.append(x.clone())
        self._sync()
        try:
            step_only(self.inner, [self._standins[p] for p, _ in projected] + plain)
            for (p, group), x in zip(projected, before):
                state, standin = self.state[p], self._standins[p]
                update = self.projector.project_back(state, standin.detach() - x)
                p.add_(update.to(p.dtype), alpha=group["scale"])
                decay = group.get("weight_decay", 0.0)
                if decay:
                    p.add_(p, alpha=-float(group["lr"]) * decay)
                state["step"] = state.get("step", 0) + 1
        finally:
            for p, _ in projected:
                standin = self._standins[p]
                standin.grad = None
                standin.data = standin.data.new_empty(0)
        return loss

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` (the projectors and steps) with the inner
        optimizer's state dict (``"inner"``) and the refresh log (``"refresh_log"``)."""
        state_dict = super().state_dict()
        state_dict["inner"] = self.inner.state_dict()
        state_dict["refresh_log"] = [dataclasses.asdict(r) for r in self.refresh_log]
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`: the projectors in the dtype they were saved in, the
        randomized refresh's seeds continued, the inner optimizer's state and the log."""
        if not isinstance(state_dict, dict) or "inner" not in state_dict:
            raise ValueError("state_dict must come from GaLore.state_dict() (it has no "
                             "'inner' entry, the inner optimizer's state)")  # fmt: skip
        outer = {k: v for k, v in state_dict.items() if k not in ("inner", "refresh_log")}
        super().load_state_dict(outer)
        for index, group in enumerate(self.param_groups):
            self._configure(group, index)
        restore_saved_dtypes(self, outer)
        self.projector.resume(self.state.values())
        self.inner.load_state_dict(state_dict["inner"])
        self.projector.refresh_log[:] = [Refresh(**r) for r in state_dict.get("refresh_log", [])]

    def memory_report(self) -> list[dict]:
        """Per parameter: its shape, whether it is projected, the bytes of its state (the
        inner optimizer's state of its stand-in, or of itself, and its projector) and of
        its projector alone."""
        rows = []
        for group in self.param_groups:
            for p in group["params"]:
                inner = _tensor_bytes(self.inner.state.get(self._standins.get(p, p), {}))
                projector = _tensor_bytes(self.state.get(p, {}))
                rows.append({"shape": tuple(p.shape), "projected": p in self._standins,
                             "state_bytes": inner + projector,
                             "projector_bytes": projector})  # fmt: skip
        return rows

    def state_bytes(self) -> int:
        """All optimizer state, in bytes."""
        return sum(row["state_bytes"] for row in self.memory_report())


def _tensor_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def step_only(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """``optimizer.step()`` for ``params`` only: its groups are cut down to them for the
    call (parameter names too), so parameters outside them are not touched even when
    they have a ``.grad``."""
    keep = {id(p) for p in params}
    saved = []
    for group in optimizer.param_groups:
        saved.append({k: group[k] for k in PARAM_KEYS if k in group})
        chosen = [i for i, p in enumerate(group["params"]) if id(p) in keep]
        for key in saved[-1]:
            group[key] = [group[key][i] for i in chosen]
    try:
        optimizer.step()
    finally:
        for group, lists in zip(optimizer.param_groups, saved):
            group.update(lists)


def _check_options(optimizer: type[torch.optim.Optimizer], options: dict) -> None:
    """Refuses options ``optimizer``'s constructor does not take (``TypeError`` naming it)."""
    try:
        signature = inspect.signature(optimizer.__init__)
    except (TypeError, ValueError):  # no signature to read: the constructor will say
        return
    parameters = list(signature.parameters.values())[2:]  # self, params
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return
    known = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for name in options:
        if name not in known:
            raise TypeError(f"{optimizer.__name__} has no option {name!r} (its options: "
                            f"{', '.join(sorted(known))})")  # fmt: skip
