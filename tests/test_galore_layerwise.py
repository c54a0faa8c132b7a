"""Layer-wise updates: the standard step's updates, applied during backward with one
gradient alive at a time; under DistributedDataParallel (two processes, gloo) the
standard DDP step's updates on every replica; the errors."""

from __future__ import annotations

import copy
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowrank.optim import GaLore, GaLoreAdamW, galore_groups, layerwise

STEPS = 7  # crosses the refreshes at steps 0, 3 and 6


def model_and_data(rank: int = 0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(),
                          nn.Linear(10, 4)).double()  # fmt: skip
    g = torch.Generator().manual_seed(10 + rank)  # each process its own batch
    x = torch.randn(32, 12, generator=g, dtype=torch.float64)
    return model, x, torch.randn(32, 4, generator=g, dtype=torch.float64)


OPTIMIZERS = {
    "GaLore(AdamW)": lambda m: GaLore(galore_groups(m, rank=3, update_proj_gap=3),
                                      torch.optim.AdamW, lr=1e-2, weight_decay=0.1, svd="exact"),
    "GaLore(SGD)": lambda m: GaLore(galore_groups(m, rank=3, update_proj_gap=3),
                                    torch.optim.SGD, lr=1e-2, momentum=0.9, svd="exact"),
    "GaLoreAdamW": lambda m: GaLoreAdamW(galore_groups(m, rank=3, update_proj_gap=3), lr=1e-2,
                                         svd="exact"),
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_layerwise_gives_the_standard_step(name):
    model, x, y = model_and_data()
    twin = copy.deepcopy(model)
    standard, hooked = OPTIMIZERS[name](model), OPTIMIZERS[name](twin)
    handle = layerwise(hooked)
    alive = []  # gradients alive when each parameter's update starts
    params = list(twin.parameters())

    def count(_):
        alive.append(sum(q.grad is not None for q in params))

    for p in params:  # registered after layerwise's hooks: they run after the update
        p.register_post_accumulate_grad_hook(count)
    for _ in range(STEPS):
        standard.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        standard.step()
        nn.functional.mse_loss(twin(x), y).backward()  # the whole step
        assert all(p.grad is None for p in params)
    assert alive == [0] * (STEPS * len(params))
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), n
    handle.remove()  # optimizer.step() is the step again
    nn.functional.mse_loss(twin(x), y).backward()
    assert all(p.grad is not None for p in params)


def test_each_update_sees_only_its_gradient():
    """The hook steps its own parameter even when others hold gradients."""
    model, x, y = model_and_data()
    optimizer = OPTIMIZERS["GaLore(SGD)"](model)
    layerwise(optimizer)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer.add_param_group({"params": [extra], "lr": 1.0})
    extra.grad = torch.ones(3, dtype=torch.float64)  # not part of this backward
    nn.functional.mse_loss(model(x), y).backward()
    assert torch.equal(extra, torch.ones(3, dtype=torch.float64))


def test_bad_arguments():
    model, _, _ = model_and_data()
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        layerwise(model)
    with pytest.raises(TypeError, match="ddp must be a DistributedDataParallel"):
        layerwise(torch.optim.SGD(model.parameters(), lr=0.1), ddp=model)


# ---- DistributedDataParallel -----------------------------------------------------------------


def ddp_worker(rank: int, world: int, init_file: str, results: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))  # fmt: skip
    try:
        out = {}
        for name in ("GaLore(AdamW)", "GaLoreAdamW"):
            model, x, y = model_and_data(rank)
            twin = copy.deepcopy(model)
            # small buckets: the hook updates several buckets, in DDP's order
            ddp, ddp_twin = DDP(model, bucket_cap_mb=0.001), DDP(twin, bucket_cap_mb=0.001)
            standard, hooked = OPTIMIZERS[name](model), OPTIMIZERS[name](twin)
            layerwise(hooked, ddp=ddp_twin)
            freed = True
            for _ in range(STEPS):
                standard.zero_grad()
                nn.functional.mse_loss(ddp(x), y).backward()
                standard.step()
                nn.functional.mse_loss(ddp_twin(x), y).backward()
                freed &= all(p.grad is None for p in twin.parameters())
            out[name] = {"standard": [p.detach() for p in model.parameters()], "freed": freed,
                         "layerwise": [p.detach() for p in twin.parameters()]}  # fmt: skip
        errors = []
        try:
            layerwise(torch.optim.SGD(model.parameters(), lr=0.1))
        except ValueError as error:
            errors.append(str(error))
        try:
            layerwise(torch.optim.SGD(model.parameters(), lr=0.1),
                      ddp=DDP(copy.deepcopy(model), find_unused_parameters=True))  # fmt: skip
        except ValueError as error:
            errors.append(str(error))
        out["errors"] = errors
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_layerwise_under_ddp_gives_the_standard_ddp_step():
    world = 2
    with tempfile.TemporaryDirectory() as folder:
        init_file, results = os.path.join(folder, "init"), os.path.join(folder, "out")
        mp.spawn(ddp_worker, args=(world, init_file, results), nprocs=world, join=True)
        outcomes = [torch.load(f"{results}.{r}") for r in range(world)]
    for name in ("GaLore(AdamW)", "GaLoreAdamW"):
        first = outcomes[0][name]["standard"]
        start = model_and_data()[0]
        assert any(not torch.equal(a, b) for a, b in zip(first, start.parameters()))
        for outcome in outcomes:
            assert outcome[name]["freed"], name
            # every replica has the standard DDP step's weights
            for a, b in zip(first, outcome[name]["standard"]):
                assert torch.equal(a, b), name
            for a, b in zip(first, outcome[name]["layerwise"]):
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), name
    for outcome in outcomes:
        assert "2 processes is initialised but no ddp is given" in outcome["errors"][0]
        assert "find_unused_parameters=True" in outcome["errors"][1]
