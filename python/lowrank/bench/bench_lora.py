"""LoRA initialisation: PiSSA's SVD of the base weight, by lowrank against PEFT's two paths.

PEFT's ``init_lora_weights="pissa"`` runs the full ``torch.linalg.svd`` of every weight;
``"pissa_niter_4"`` runs ``torch.svd_lowrank(W, q=rank, niter=4)`` (no oversampling).
``lowrank`` is the SVD :class:`lowrank.nn.LoRAAdapter` runs for ``init="pissa"``: the
randomized SVD with two power iterations and ``rank / 2`` oversampling. Every row reports
the relative error of the rank-``r`` approximation ``||W - U_r S_r V_r^T||_F / ||W||_F``
over the optimal (Eckart-Young) one. The SVDs are timed alike; the row "lowrank whole
init" adds what every PiSSA init does after its SVD (the factors, the residual weight
``W - s B A``, and here a copy of ``W`` back into the layer), measured on the same run.

The weights have power-law spectra ``s_i ~ (1 + i)^-p``, flat tails like those of
pretrained weights, where a randomized SVD without oversampling loses accuracy.
"""

from __future__ import annotations

import torch

from lowrank.bench.harness import Result, time_ms_many
from lowrank.linalg import rsvd
from lowrank.nn import LoRAAdapter


def power_law(n: int, power: float, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = (1.0 + torch.arange(n, dtype=torch.float32)) ** -power
    return ((u * s) @ v.T).to(device)


def error_vs_optimal(w: torch.Tensor, approx: torch.Tensor, optimal: float) -> float:
    difference = w.detach().double() - approx.detach().double()
    return float(torch.linalg.matrix_norm(difference) / optimal)


def measure(device, n: int, rank: int, power: float, quick: bool) -> list[Result]:
    w = power_law(n, power, device)
    linear = torch.nn.Linear(n, n, bias=False, device=device)
    with torch.no_grad():
        linear.weight.copy_(w)
    s = torch.linalg.svdvals(w.double())
    optimal = float(s[rank:].square().sum().sqrt())
    label = f"{n}x{n} rank {rank} power {power:g}"

    def init(_i=0):
        with torch.no_grad():
            linear.weight.copy_(w)  # the init rewrites the base weight: start afresh
        return LoRAAdapter(linear, rank, init="pissa", seed=0)

    def ours(_i=0):
        return rsvd(w, rank, n_iter=2, oversample=max(10, rank // 2), seed=0)

    def exact(_i=0):
        return torch.linalg.svd(w, full_matrices=False)

    def niter4(_i=0):
        return torch.svd_lowrank(w, q=rank, niter=4)

    fns = {"lowrank": ours, "lowrank whole init": init,
           "torch.svd_lowrank niter=4 (PEFT pissa_niter_4)": niter4}  # fmt: skip
    if not quick:
        fns["torch.linalg.svd (PEFT pissa)"] = exact
    times = time_ms_many(fns, device, min_run_time=0.5 if quick else 2.0, warmup=1)
    layer = init()
    uo, so, vho = ours()
    u, sv, vh = exact()
    u4, s4, v4 = niter4()
    errors = {
        "lowrank": error_vs_optimal(w, (uo * so) @ vho, optimal),
        "lowrank whole init": error_vs_optimal(w, layer.scale * layer.B @ layer.A, optimal),
        "torch.svd_lowrank niter=4 (PEFT pissa_niter_4)": error_vs_optimal(
            w, (u4 * s4) @ v4.T, optimal
        ),
        "torch.linalg.svd (PEFT pissa)": error_vs_optimal(
            w, (u[:, :rank] * sv[:rank]) @ vh[:rank], optimal
        ),
    }
    return [Result("lora", label, impl, ms, {"error_vs_optimal": errors[impl]})
            for impl, ms in times.items()]  # fmt: skip


def run(device: torch.device, quick: bool) -> list[Result]:
    if device.type != "cpu" and quick:
        return []
    results = []
    for power in (0.5, 1.0):
        results += measure(device, 1024 if quick else 2048, 64, power, quick)
    return results
