"""Running a model over calibration batches with hooks on some of its layers.

The data-aware conversions and initialisations (``convert(..., calibration=...)``, the
LoRA inits that look at activations) all need the same thing: the inputs each targeted
layer sees on a few representative batches. :func:`run` calls the model on every batch
(``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, else
``model(batch)``) in eval mode without gradients, hands each hooked layer's input to an
observer, and restores the model's mode and hooks afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)``, ``model(*batch)`` or ``model(batch)``, by the batch's type."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def first_floating(output: Any) -> torch.Tensor | None:
    """The first floating tensor in a model's output (a tensor, tuple, list, mapping or
    ``ModelOutput``): the thing a sensitivity is measured on."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    values = output.values() if isinstance(output, Mapping) else output
    if isinstance(values, (tuple, list)) or isinstance(output, Mapping):
        for value in values:
            found = first_floating(value)
            if found is not None:
                return found
    return None


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def run(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Mapping[str, nn.Module],
    observe: Callable[[str, torch.Tensor], None],
    *,
    progress: bool = True,
    desc: str = "calibration",
) -> int:
    """Runs ``model`` over ``batches``; ``observe(name, x)`` gets the input ``x`` of each
    layer in ``layers`` at every call. Returns the number of batches."""
    handles = [
        module.register_forward_hook(lambda _m, inputs, _out, name=name: observe(name, inputs[0]))
        for name, module in layers.items()
    ]
    count = 0
    try:
        with _eval_mode(model), torch.no_grad():
            for batch in _bar(batches, progress, desc):
                call_model(model, batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("calibration holds no batches")
    return count


@dataclass
class InputStats:
    """What a layer saw on the calibration data: ``gram = sum_t x_t x_t^T`` (``in x in``),
    ``total = sum_t x_t`` and the token ``count``, all in float64. Sums combine exactly
    across batches (and processes), so no incremental factorisation is needed: the
    input covariance and its eigenvectors (the right singular vectors of the centred
    activations) follow from them at the end."""

    gram: torch.Tensor
    total: torch.Tensor
    count: int

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(1, self.count)

    def covariance(self, centred: bool = True) -> torch.Tensor:
        """``gram / count`` minus the mean's outer product when ``centred``."""
        second = self.gram / max(1, self.count)
        return second - torch.outer(self.mean, self.mean) if centred else second


def input_statistics(model, batches, layers, *, progress=True) -> dict[str, InputStats]:
    """:class:`InputStats` of each layer's inputs over all tokens of all batches: each
    batch's product in float32 (float64 inputs stay float64), summed in float64.

    A batch that reaches a layer with no tokens adds nothing to it. Raises ``ValueError``
    naming the layer when a layer's inputs hold NaN or Inf, when their float32 Gram matrix
    overflows, or when no batch brings a layer any token."""
    stats: dict[str, InputStats] = {}
    reached: set[str] = set()

    def observe(name, x):
        reached.add(name)
        rows = x.detach().reshape(-1, x.shape[-1])
        if rows.shape[0] == 0:
            return
        rows = rows if rows.dtype == torch.float64 else rows.float()
        gram = rows.T @ rows
        # x x^T's diagonal holds every squared entry: a finite Gram means finite inputs.
        if not bool(torch.isfinite(gram).all()):
            _raise_non_finite(name, rows)
        gram, total = gram.double(), rows.sum(0).double()
        if name in stats:
            seen = stats[name]
            stats[name] = InputStats(seen.gram + gram, seen.total + total, seen.count + len(rows))
        else:
            stats[name] = InputStats(gram, total, len(rows))

    run(model, batches, layers, observe, progress=progress, desc="calibration: input statistics")
    missing = [name for name in layers if name not in reached]
    if missing:
        raise ValueError(f"calibration never reached the layers {missing[:5]}: are they used "
                         "by the model's forward?")  # fmt: skip
    empty = [name for name in layers if name not in stats]
    if empty:
        raise ValueError(f"calibration gave the layers {empty[:5]} no tokens: every batch "
                         "reached them with an empty input")  # fmt: skip
    return stats


def _raise_non_finite(name: str, rows: torch.Tensor) -> None:
    """The error for a layer whose input Gram matrix is not finite: NaN/Inf in the inputs,
    or inputs so large that their products overflow."""
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"calibration: the inputs of layer {name!r} contain NaN or Inf (the "
                         "model's activations are not finite on the calibration data)")  # fmt: skip
    dtype = str(rows.dtype).removeprefix("torch.")
    largest = float(rows.abs().max())
    raise ValueError(f"calibration: the inputs of layer {name!r} overflow {dtype} in their "
                     f"Gram matrix (inputs up to {largest:.3g} in magnitude); run the model "
                     "in float64 or rescale its activations")  # fmt: skip


def output_sensitivity(model, batch, layers, *, probes: int = 4, seed: int = 0):
    """How much the model's output moves per unit of change in each layer's output.

    For Gaussian probes ``v`` on the model's output ``f`` (its first floating tensor), the
    gradient of ``<f, v>`` with respect to layer ``l``'s output ``y_l`` is ``J_l^T v`` and
    ``E ||J_l^T v||^2 = ||J_l||_F^2``: the mean of that over the layer's output elements is
    the expected squared change of the output per unit of squared change of ``y_l``. Layers
    that do not reach the output get 0. Costs ``probes`` backward passes on one batch.
    """
    outputs: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, out, name):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            outputs[name] = out

    handles = [module.register_forward_hook(lambda m, i, o, name=name: keep(m, i, o, name))
               for name, module in layers.items()]  # fmt: skip
    gains = dict.fromkeys(layers, 0.0)
    generator = torch.Generator().manual_seed(seed)
    # Layer outputs need a graph even where every weight is frozen; the gradients are taken
    # with respect to those outputs only, so no parameter's .grad is touched.
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with _eval_mode(model), torch.enable_grad():
            for _ in range(probes):
                outputs.clear()
                f = first_floating(call_model(model, batch))
                if f is None or not f.requires_grad:
                    raise ValueError("the model's output has no floating tensor to measure")
                v = torch.randn(f.shape, generator=generator).to(device=f.device, dtype=f.dtype)
                names = list(outputs)
                grads = torch.autograd.grad((f * v).sum(), [outputs[n] for n in names],
                                            allow_unused=True)  # fmt: skip
                for name, grad in zip(names, grads):
                    if grad is not None:
                        gains[name] += float(grad.double().square().mean()) / probes
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(False)
    return gains


def _bar(iterable, progress: bool, desc: str):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)
