"""GaLore's projector refresh: lowrank's batched, warm-started rsvd against one
``torch.linalg.svd`` per matrix (the authors' projector), on real gradients.

The model is LLaMA-60M-shaped (hidden 512, intermediate 1376, 8 layers, 8 heads; a byte
vocabulary, so the embedding is small) from ``examples/train_small_lm.py``, trained on the
standard library's source bytes with :class:`lowrank.optim.GaLoreAdamW` (rank 128, scale
0.25) and a projector refresh every ``GAP`` steps. At each refresh, on the same gradients
of all 56 projected weights:

- ``lowrank`` -- the optimizer's own refresh (all matrices of one shape in one batched
  ``rsvd``; from the second refresh on, warm-started from the previous projectors), timed
  by the optimizer;
- ``torch.linalg.svd per matrix`` -- the reference projector, one full SVD per weight;
- ``DCT projector`` -- the DCT column selection of SVD-free low-rank optimisation
  (:class:`lowrank.optim.DCTProjection`: the DCT by FFT, the top-128 columns by norm), on
  the same gradients batched by shape as the optimizer batches them;
- ``captured`` -- the gradient energy the projector keeps, ``||P^T G||^2 / ||G||^2``,
  over the exact top-128 projector's, minimum over the matrices.

Training the model between refreshes is not timed.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time

import torch

from lowrank.bench import checkout_path
from lowrank.bench.harness import Result
from lowrank.optim import DCTProjection, GaLoreAdamW, galore_groups
from lowrank.optim.projector import SIDES, side_of

RANK = 128
GAP = 8
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def small_lm():
    """The model and corpus of ``examples/train_small_lm.py``; None outside a source checkout."""
    examples = checkout_path("examples", "train_small_lm.py")
    if examples is None:
        return None
    if str(examples.parent) not in sys.path:
        sys.path.insert(0, str(examples.parent))
    return importlib.import_module("train_small_lm")


def captured(grad: torch.Tensor, state: dict, exact_energy: float, projection=None) -> float:
    """``||P^T G||^2`` of the projector in ``state`` over ``exact_energy`` (the top-r
    singular values' squares); ``projection`` applies it (default: dense factors)."""
    side = SIDES[state["side"]]
    if projection is not None:
        low = projection.project(state, side, grad.double())
    else:
        g, p = grad.double(), state["projector"].double()
        low = g @ p.mT if side == "right" else p.mT @ g
    return float(low.double().square().sum()) / exact_energy


def dct_refresh(grads: list[torch.Tensor]) -> tuple[float, list[dict]]:
    """The DCT projectors of ``grads`` (batched by shape, as the optimizer batches them):
    seconds and one state per gradient."""
    dct = DCTProjection()
    shapes: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        shapes.setdefault(tuple(g.shape), []).append(i)
    states: list[dict] = [{} for _ in grads]
    start = time.perf_counter()
    for shape, members in shapes.items():
        side = side_of(shape, "std")
        new = dct.compute(torch.stack([grads[i] for i in members]), side, RANK, None, 0)
        for i, tensors in zip(members, new):
            states[i] = {**tensors, "side": SIDES.index(side)}
    return time.perf_counter() - start, states


def measure(layers: int, refreshes: int, batch: int) -> list[Result]:
    lm = small_lm()
    torch.manual_seed(0)
    model = lm.TinyLM(width=512, layers=layers, heads=8, mlp=1376, context=128)
    groups = galore_groups(model, rank=RANK, update_proj_gap=GAP, scale=0.25,
                           target_modules=TARGETS)  # fmt: skip
    optimizer = GaLoreAdamW(groups, lr=2e-3)
    projected = next(g for g in optimizer.param_groups if "rank" in g)["params"]
    train, _ = lm.corpus(4 << 20)
    generator = torch.Generator().manual_seed(0)
    label = f"{layers} layers (hidden 512, mlp 1376), {len(projected)} matrices, rank {RANK}"
    results = []
    step = 0
    for refresh in range(refreshes):
        while True:
            optimizer.zero_grad(set_to_none=True)
            lm.loss_of(model, *lm.batch(train, batch, 128, generator)).backward()
            due = step % GAP == 0
            if due:
                grads = [p.grad.detach().clone() for p in projected]
            optimizer.step()
            step += 1
            if due:
                break
        ours_ms = 1e3 * optimizer.refresh_log[-1].seconds
        start = time.perf_counter()
        exact = [torch.linalg.svd(g, full_matrices=False) for g in grads]
        svd_ms = 1e3 * (time.perf_counter() - start)
        dct_seconds, dct_states = dct_refresh(grads)
        ratios, dct_ratios = [], []
        for p, g, (_, s, _), dct_state in zip(projected, grads, exact, dct_states):
            top = float(s[:RANK].double().square().sum())
            ratios.append(captured(g, optimizer.state[p], top))
            dct_ratios.append(captured(g, dct_state, top, DCTProjection()))
        kind = "cold" if refresh == 0 else "warm"
        case = f"{label}, refresh {refresh} ({kind})"
        results.append(Result("galore", case, "lowrank", ours_ms,
                              {"captured_min": min(ratios),
                               "captured_mean": statistics.fmean(ratios)}))  # fmt: skip
        results.append(Result("galore", case, "torch.linalg.svd per matrix", svd_ms,
                              {"captured_min": 1.0}))  # fmt: skip
        results.append(Result("galore", case, "DCT projector", 1e3 * dct_seconds,
                              {"captured_min": min(dct_ratios),
                               "captured_mean": statistics.fmean(dct_ratios)}))  # fmt: skip
    return results


def run(device: torch.device, quick: bool) -> list[Result]:
    if device.type != "cpu":
        return []  # the comparison trains on the CPU; a GPU run would time the GPU's SVD
    if small_lm() is None:
        print("galore: skipped, it needs examples/train_small_lm.py from a source checkout")
        return []
    if quick:
        return measure(layers=1, refreshes=2, batch=4)
    return measure(layers=8, refreshes=4, batch=4)
