"""Layer-wise updates (:func:`lowrank.optim.layerwise`) against the standard step: peak
memory during ``backward`` + step, and time.

The model is a stack of square ``nn.Linear`` layers with GELUs, trained on a small batch
(the regime where the weights' gradients, not the activations, dominate ``backward``),
with :class:`lowrank.optim.GaLore` around ``torch.optim.AdamW`` (rank a quarter of the
width). After two warm-up steps (so the optimizer state exists in both), one step is
measured with the forward pass already done:

- ``standard step``: ``loss.backward()`` then ``optimizer.step()``;
- ``lowrank`` (layer-wise): ``loss.backward()``, each weight updated in its hook and its
  gradient freed there.

Memory is measured with the profiler's memory events (``profile_memory=True``): every
allocation and free torch's CPU allocator makes during the step, in order; ``peak_MiB`` is
the highest total of the bytes allocated since the step began, so it counts gradients,
activation gradients and the optimizer's temporaries alike. ``live_grads_MiB`` is the
largest sum of the ``.grad`` tensors alive at once (read at every gradient's completion,
and before the standard step). The target is ``saving_MiB >= grads_MiB -
largest_grad_MiB``: the layer-wise peak lower by at least every gradient but the largest.
``ms`` is the median of three unprofiled steps (backward + step).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from lowrank.bench.harness import Result
from lowrank.optim import GaLore, galore_groups, layerwise

MiB = 2**20


def allocation_peak(prepare, measured) -> int | None:
    """The peak of the bytes allocated (net of frees) while ``measured(prepare())`` runs,
    above what was allocated when it began, from the profiler's CPU memory events; None
    when the profiler gives none.

    ``prepare`` (the forward pass) runs under the profiler too, so the tensors it makes,
    which ``measured`` frees, are counted when they go.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = prepare()
        with record_function("measured"):
            measured(value)
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = list(results.events())
    region = next(e for e in events if e.name() == "measured")
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    total = baseline = peak = 0
    for event in memory:
        if event.start_ns() > region.end_ns():
            break
        if event.start_ns() < region.start_ns():
            baseline = total = total + event.nbytes()
            continue
        total += event.nbytes()
        peak = max(peak, total - baseline)
    return peak


def build(width: int, layers: int, rank: int):
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*blocks)
    groups = galore_groups(model, rank=rank, update_proj_gap=50, scale=0.25)
    return model, GaLore(groups, torch.optim.AdamW, lr=1e-3, weight_decay=0.0)


def measure(width: int, layers: int, batch: int) -> list[Result]:
    rank = width // 4
    model, optimizer = build(width, layers, rank)
    twin = copy.deepcopy(model)
    twin_optimizer = GaLore(galore_groups(twin, rank=rank, update_proj_gap=50, scale=0.25),
                            torch.optim.AdamW, lr=1e-3, weight_decay=0.0)  # fmt: skip
    params = list(twin.parameters())
    live = [0]

    def count(_):  # registered before layerwise's hooks: runs before the update frees it
        live[0] = max(live[0], sum(p.grad.nbytes for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    layerwise(twin_optimizer)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)

    def standard(loss):
        loss.backward()
        live[0] = max(live[0], sum(p.grad.nbytes for p in model.parameters()))
        optimizer.step()

    rows = {}
    cases = (
        ("standard step", model, optimizer, standard),
        ("lowrank", twin, twin_optimizer, torch.Tensor.backward),
    )
    for name, net, opt, step in cases:
        times = []
        for i in range(5):  # 2 warm-up steps, 3 timed ones
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(net(x), y)  # the forward is not timed
            start = time.perf_counter()
            step(loss)
            if i >= 2:
                times.append(time.perf_counter() - start)
        opt.zero_grad(set_to_none=True)
        live[0] = 0
        peak = allocation_peak(lambda: nn.functional.mse_loss(net(x), y), step)  # noqa: B023
        rows[name] = (statistics.median(times), peak, live[0])
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    saving = None
    if rows["standard step"][1] is not None and rows["lowrank"][1] is not None:
        saving = rows["standard step"][1] - rows["lowrank"][1]
    case = f"{layers} x Linear({width}, {width}), batch {batch}, GaLore(AdamW) rank {rank}"
    results = []
    for name, (seconds, peak, live_bytes) in rows.items():
        extra = {"peak_MiB": None if peak is None else peak / MiB,
                 "live_grads_MiB": live_bytes / MiB, "grads_MiB": grads / MiB,
                 "largest_grad_MiB": largest / MiB}  # fmt: skip
        if name == "lowrank" and saving is not None:
            extra["saving_MiB"] = saving / MiB
            extra["target_met"] = "yes" if saving >= grads - largest else "no"
        results.append(Result("layerwise", case, name, 1e3 * seconds, extra))
    return results


def run(device: torch.device, quick: bool) -> list[Result]:
    if device.type != "cpu":
        return []  # the allocation peak is read from the CPU allocator's events
    if quick:
        return measure(width=256, layers=4, batch=8)
    return measure(width=1024, layers=8, batch=16)
