"""What every structured layer shares with nn.Linear: features, a read-only weight, dtype
and device moves, copies, pickling, state dicts, autocast, torch.compile and DDP."""

from __future__ import annotations

import copy
import io
import os
import pickle
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import relative_error
from torch import nn

from lowrank.nn import (
    KronAdapter,
    KronLinear,
    LowRankLinear,
    MonarchLinear,
    SLTrainLinear,
    convert,
)

IN, OUT = 12, 10


def _randomise(layer: nn.Module, seed: int) -> nn.Module:
    """Every trainable tensor random (SLTrain's B and the adapters' w1 start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return layer


def make(kind: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    layer = {
        "lowrank": lambda: LowRankLinear(IN, OUT, 3, dtype=dtype),
        "monarch": lambda: MonarchLinear(IN, OUT, 2, dtype=dtype),
        "sltrain": lambda: SLTrainLinear(IN, OUT, 3, sparsity=0.2, seed=seed, dtype=dtype),
        "kron": lambda: KronLinear(IN, OUT, dtype=dtype),
        "kron_terms": lambda: KronLinear(IN, OUT, terms=3, dtype=dtype),
        "kron_adapter": lambda: KronAdapter(nn.Linear(IN, OUT, dtype=dtype), rank=2, init="random"),
    }[kind]()
    return _randomise(layer, seed)


KINDS = ["lowrank", "monarch", "sltrain", "kron", "kron_terms", "kron_adapter"]


def outputs(layer: nn.Module, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(4, 3, IN, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return layer(x.to(dtype))


def same_function(one: nn.Module, other: nn.Module) -> bool:
    """Equal parameters give equal outputs, up to the rounding of whichever implementation
    the dispatch runs for each call (they may differ in the last bits)."""
    return relative_error(outputs(one), outputs(other)) <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_behaves_like_linear(kind):
    layer = make(kind, dtype=torch.float64)
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    w = layer.weight
    assert w.shape == (OUT, IN) and torch.equal(w, layer.to_dense())
    bias = layer.base.bias if kind == "kron_adapter" else layer.bias
    x = torch.randn(5, IN, dtype=torch.float64)
    assert relative_error(layer(x), F.linear(x, w, bias)) <= 1e-12
    # Computed on access, not a parameter: it is not in the state dict, and assigning fails.
    own = [n for n, _ in layer.named_parameters(recurse=False)]
    assert "weight" not in own and "weight" not in layer.state_dict()
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = nn.Parameter(torch.zeros(OUT, IN, dtype=torch.float64))
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = torch.zeros(OUT, IN, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    layer, other = make(kind, 0), make(kind, 1)
    layer.projection_error = 0.125
    other.load_state_dict(layer.state_dict())
    assert same_function(other, layer)
    if kind != "kron_adapter":
        assert other.projection_error == 0.125


def test_state_dict_without_extra_state_loads_strictly():
    """Checkpoints written without lowrank's small extra state still load with strict=True."""
    layer = make("lowrank")
    state = {k: v for k, v in layer.state_dict().items() if not k.endswith("_extra_state")}
    fresh = make("lowrank", 1)
    fresh.load_state_dict(state, strict=True)
    assert same_function(fresh, layer)


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_and_deepcopy(kind):
    layer = make(kind)
    layer.projection_error = 0.25
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copies = [loaded, pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)]
    for twin in copies:
        assert same_function(twin, layer)
        assert twin.projection_error == 0.25 or kind == "kron_adapter"
        assert all(p is not q for p, q in zip(twin.parameters(), layer.parameters()))


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_moves(kind):
    layer = make(kind)
    reference = outputs(layer).double()
    double = copy.deepcopy(layer).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in double.parameters())
    assert relative_error(outputs(double, torch.float64), reference) <= 1e-5
    half = copy.deepcopy(layer).half()
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert relative_error(outputs(half, torch.float16), reference) <= 2e-2
    for module in (double, half):
        for name, buffer in module.named_buffers():
            assert not buffer.is_floating_point(), name  # the SLTrain support stays integer


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_cpu_bfloat16(kind):
    """float32 master weights meet bfloat16 activations, as F.linear does under autocast."""
    layer = make(kind)
    x = torch.randn(6, IN, requires_grad=True)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        z = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and z.dtype == torch.bfloat16
    assert relative_error(y, reference) <= 3e-2
    y.float().square().sum().backward()
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), name
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_autocast_converted_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(5, 16)
    for kind, options in [("lowrank", {"rank": 4}), ("monarch", {}), ("kron_adapter", {})]:
        converted = convert(copy.deepcopy(model), kind, progress=False, **options).model
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = converted(x)
        assert y.dtype == torch.bfloat16
        assert relative_error(y, converted(x)) <= 3e-2, kind


def test_sltrain_load_keeps_the_values_parameter():
    layer, saved = make("sltrain", 0), make("sltrain", 1)
    values = layer.values
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.load_state_dict(saved.state_dict())
    assert layer.values is values  # the optimizer still holds it
    assert torch.equal(layer.indices, saved.indices) and torch.equal(layer.values, saved.values)
    before = layer.values.detach().clone()
    outputs(layer).square().sum().backward()
    optimizer.step()
    assert not torch.equal(layer.values, before)


def test_sltrain_load_of_another_count_replaces_values():
    layer = make("sltrain")
    other = SLTrainLinear(IN, OUT, 3, sparsity=0.5, seed=3)
    layer.load_state_dict(other.state_dict())
    assert layer.values.numel() == other.values.numel()
    assert torch.equal(layer.to_dense(), other.to_dense())


def test_sltrain_alpha_travels_with_the_state_dict():
    layer = SLTrainLinear(IN, OUT, 3, alpha=6.0, seed=0)
    _randomise(layer, 0)
    other = SLTrainLinear(IN, OUT, 3, alpha=32.0, seed=0)
    other.load_state_dict(layer.state_dict())
    assert other.scale == layer.scale == 2.0
    assert torch.equal(other.to_dense(), layer.to_dense())


def test_kron_adapter_merged_state_round_trip():
    adapter = make("kron_adapter")
    expected = outputs(adapter)
    adapter.merge()
    state = adapter.state_dict()
    fresh = make("kron_adapter", 1)
    fresh.load_state_dict(state)
    assert fresh.merged
    assert relative_error(outputs(fresh), expected) <= 1e-6
    fresh.unmerge()  # the factors came with it, so unmerging restores the base layer
    assert relative_error(fresh.base.weight, make("kron_adapter").base.weight) <= 1e-6


# ---- torch.compile (inductor) -------------------------------------------------------------------


def _all_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        _randomise(LowRankLinear(16, 24, 4), 1),
        _randomise(MonarchLinear(24, 32, 4), 2),
        nn.GELU(),
        _randomise(SLTrainLinear(32, 16, 4, sparsity=0.1, seed=0), 3),
        _randomise(KronLinear(16, 16, terms=2), 4),
        _randomise(KronAdapter(nn.Linear(16, 12), rank=2, init="random"), 5),
    )


def test_compile_every_layer_inductor():
    torch._dynamo.reset()
    model = _all_layers()
    x = torch.randn(6, 16)
    eager = model(x)
    eager.square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model)  # the default backend, inductor
    y = compiled(x)
    assert relative_error(y, eager) <= 1e-5
    y.square().sum().backward()
    for name, grad in expected.items():
        assert relative_error(dict(model.named_parameters())[name].grad, grad) <= 1e-4, name


def test_compile_converted_model_inductor():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.Linear(32, 8))
    converted = convert(model, "lowrank", params=0.5, progress=False).model
    x = torch.randn(8, 32)
    with torch.no_grad():
        eager = converted(x)
        y = torch.compile(converted)(x)
    assert relative_error(y, eager) <= 1e-5


# ---- DistributedDataParallel ---------------------------------------------------------------------


def _ddp_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    F.mse_loss(model(x), target).backward()
    optimizer.step()


def _ddp_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 12, generator=g)


def _ddp_worker(rank: int, world: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))  # fmt: skip
    try:
        torch.set_num_threads(1)
        model = _all_layers()
        ddp = nn.parallel.DistributedDataParallel(model)
        x, target = _ddp_data()
        rows = x.shape[0] // world
        part = slice(rank * rows, (rank + 1) * rows)
        _ddp_step(ddp, x[part], target[part])
        torch.save({k: v.detach() for k, v in model.state_dict().items()
                    if isinstance(v, torch.Tensor)}, f"{results}.{rank}")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_two_processes_equal_one_process():
    world = 2
    with tempfile.TemporaryDirectory() as folder:
        init_file, results = os.path.join(folder, "init"), os.path.join(folder, "out")
        mp.spawn(_ddp_worker, args=(world, init_file, results), nprocs=world, join=True)
        states = [torch.load(f"{results}.{r}") for r in range(world)]
    single = _all_layers()
    before = {k: v.clone() for k, v in single.state_dict().items() if isinstance(v, torch.Tensor)}
    _ddp_step(single, *_ddp_data())
    expected = single.state_dict()
    changed = 0
    for name, value in states[0].items():
        assert torch.allclose(value, states[1][name], rtol=0, atol=0), name  # replicas agree
        assert torch.allclose(value, expected[name], rtol=1e-5, atol=1e-6), name
        changed += not torch.equal(value, before[name])
    assert changed >= 10  # the step moved the trainable parameters of every layer
