"""RandLoRAAdapter: the update against the paper's sum of scaled random bases, gradients,
merging, the bases regenerated from the seed (the same as PEFT's, in another process),
state dicts without the bases, pickling, autocast, torch.compile, convert/save/load and
the export to PEFT's RandLoRA format loading to the same outputs."""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import RecordShapes, relative_error
from torch import nn

import lowrank.nn as lnn
from lowrank.nn import RandLoRAAdapter, convert, unconvert
from lowrank.nn.randlora import BASES, peft_state, random_bases, save_peft


def reference_delta(layer: RandLoRAAdapter, lam, gamma) -> torch.Tensor:
    """``(alpha / r) sum_i B_i Lambda_i A Gamma_i`` (transposed when ``in > out``), with
    ``B_i`` the columns ``i, i + n, ...`` of the flattened basis (module docstring)."""
    a, b = layer.bases()
    n = layer.n_bases
    total = sum(b[:, i::n] @ torch.diag(lam[:, i]) @ a @ torch.diag(gamma[i]) for i in range(n))
    total = layer.alpha / layer.rank * total
    return total if layer.in_features <= layer.out_features else total.T


def trained_layer(in_f, out_f, rank=4, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).to(dtype)
    layer = RandLoRAAdapter(copy.deepcopy(base), rank, alpha=3.0, **kw)
    with torch.no_grad():
        layer.lam.normal_()
        layer.gamma.normal_()
    return layer, base


@pytest.mark.parametrize("shape", [(10, 14), (14, 10)])  # d = 10: n = 3 terms, the last partial
def test_forward_gradients_and_merge_follow_the_equations(shape):
    layer, base = trained_layer(*shape)
    assert layer.n_bases == 3 and not layer.base.weight.requires_grad
    lam = layer.lam.detach().clone().requires_grad_(True)
    gamma = layer.gamma.detach().clone().requires_grad_(True)
    delta = reference_delta(layer, lam, gamma)
    assert torch.linalg.matrix_rank(delta) == 10  # full rank, from rank-4 bases
    x = torch.randn(2, 3, shape[0], dtype=torch.float64)
    expected = base(x) + x @ delta.T
    y = layer(x)
    assert relative_error(y, expected) <= 1e-12
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    (expected * grad).sum().backward()
    assert relative_error(layer.lam.grad, lam.grad) <= 1e-12
    assert relative_error(layer.gamma.grad, gamma.grad) <= 1e-12
    assert relative_error(layer.delta_weight(), delta) <= 1e-12
    layer.merge()
    assert relative_error(layer(x), expected) <= 1e-12
    layer.unmerge()
    assert relative_error(layer.base.weight, base.weight) <= 1e-12
    xg = x.clone().requires_grad_(True)
    (layer(xg) * grad).sum().backward()
    assert relative_error(xg.grad, grad @ (base.weight + delta)) <= 1e-12


def test_init_is_peft_s_and_the_identity_change():
    base = nn.Linear(12, 20)
    layer = RandLoRAAdapter(copy.deepcopy(base), 5)
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), base(x))
    assert layer.n_bases == 3 and layer.lam.shape == (5, 3) and layer.gamma.shape == (3, 12)
    assert torch.count_nonzero(layer.lam) == 0 and torch.all(layer.gamma == 1 / 12)
    assert layer.scale == 20.0  # alpha = 20 r


def test_never_forms_the_weight_change():
    layer, _ = trained_layer(40, 48, rank=8, dtype=torch.float32)
    x = torch.randn(7, 40, requires_grad=True)
    with RecordShapes() as seen:
        layer(x).square().sum().backward()
    assert (48, 40) not in seen.shapes and (40, 48) not in seen.shapes


def test_bases_are_peft_s_and_the_same_in_another_process():
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    for basis in BASES:
        config = peft.RandLoraConfig(r=4, target_modules=["0", "2"], projection_prng_key=7,
                                     sparse=basis == "sparse",
                                     very_sparse=basis == "very_sparse")  # fmt: skip
        peft_model = peft.get_peft_model(copy.deepcopy(model), config)
        a, b = random_bases(7, 4, (24, 24), basis)
        assert torch.equal(peft_model.base_model.randlora_A["default"], a.float())
        assert torch.equal(peft_model.base_model.randlora_B["default"], b.float())
    code = ("import io, sys, torch; from lowrank.nn.randlora import random_bases; "
            "buf = io.BytesIO(); torch.save(random_bases(7, 4, (24, 24)), buf); "
            "sys.stdout.buffer.write(buf.getvalue())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    a2, b2 = torch.load(io.BytesIO(out))
    a, b = random_bases(7, 4, (24, 24))
    assert torch.equal(a, a2) and torch.equal(b, b2)


@pytest.mark.cuda
def test_bases_on_the_gpu_are_the_cpu_s():
    layer, _ = trained_layer(24, 40, dtype=torch.float32)
    a, b = layer.bases()
    layer.cuda()
    a2, b2 = layer.bases()
    assert a2.is_cuda and torch.equal(a2.cpu(), a) and torch.equal(b2.cpu(), b)


def test_state_holds_the_seed_not_the_bases_pickle_autocast_compile():
    layer, base = trained_layer(16, 24, dtype=torch.float32, seed=3)
    x = torch.randn(5, 16)
    expected = layer(x)
    state = layer.state_dict()
    assert set(state) == {"base.weight", "base.bias", "lam", "gamma", "_extra_state"}
    assert state["_extra_state"]["seed"] == 3
    fresh = RandLoRAAdapter(copy.deepcopy(base), 4)  # seed 0: the state brings seed 3
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), expected)
    layer.merge()
    merged = RandLoRAAdapter(copy.deepcopy(base), 4)
    merged.load_state_dict(layer.state_dict())
    assert merged.merged and relative_error(merged(x), expected) <= 1e-6
    blob = pickle.dumps(fresh)
    assert len(blob) < 8_000  # the parameters, not the bases
    assert torch.equal(pickle.loads(blob)(x), expected)
    assert torch.equal(copy.deepcopy(fresh)(x), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fresh(x)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and relative_error(y, expected) <= 2e-2
    assert fresh.lam.grad.dtype == torch.float32 and torch.isfinite(fresh.gamma.grad).all()
    compiled = torch.compile(fresh, fullgraph=True, backend="aot_eager")
    assert relative_error(compiled(x), expected) <= 1e-6


def test_bad_input():
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        RandLoRAAdapter(nn.Conv1d(3, 3, 1), 2)
    with pytest.raises(ValueError, match="rank must be at most"):
        RandLoRAAdapter(nn.Linear(4, 6), 5)
    with pytest.raises(ValueError, match="basis_shape"):
        RandLoRAAdapter(nn.Linear(4, 6), 2, basis_shape=(5, 4))
    with pytest.raises(ValueError, match="basis must be"):
        RandLoRAAdapter(nn.Linear(4, 6), 2, basis="gaussian")
    with pytest.raises(ValueError, match="seed"):
        RandLoRAAdapter(nn.Linear(4, 6), 2, seed=-1)
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"1: rank must be at most"):
        convert(model, "randlora", rank=4, progress=False)
    with pytest.raises(ValueError, match="unknown options"):
        convert(model, "randlora", rank=2, sparse=True, progress=False)
    assert all(type(m) is nn.Linear for m in model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- whole models -------------------------------------------------------------------------------


def test_convert_save_load_and_peft_export(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    x = torch.randn(32, 16)
    model = copy.deepcopy(original)
    report = convert(model, "randlora", rank=4, alpha=8, seed=5, progress=False)
    assert len(report.layers) == 2 and model[0].basis_shape == model[2].basis_shape == (24, 24)
    assert model[0].bases()[0].data_ptr() == model[2].bases()[0].data_ptr()  # shared
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        expected = model(x)
        assert relative_error(expected, original(x)) > 1e-3  # training changed the function
    lnn.save(model, str(tmp_path / "lowrank"))
    loaded = lnn.load(copy.deepcopy(original), str(tmp_path / "lowrank"))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    for save_projection in (True, False):
        folder = str(tmp_path / f"peft{save_projection}")
        save_peft(model, folder, save_projection=save_projection)
        regenerated = pytest.warns(UserWarning, match="projection_prng_key")  # PEFT's warning
        with regenerated if not save_projection else contextlib.nullcontext():
            peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(original), folder)
        with torch.no_grad():
            assert relative_error(peft_model(x), expected) <= 1e-6
    dense = unconvert(copy.deepcopy(model))
    assert all(type(m) is nn.Linear for m in (dense[0], dense[2]))
    with torch.no_grad():
        assert relative_error(dense(x), expected) <= 1e-6


def test_peft_export_needs_the_shared_basis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    model[0] = RandLoRAAdapter(model[0], 4)
    model[2] = RandLoRAAdapter(model[2], 4)  # each its own basis_shape
    with pytest.raises(ValueError, match="one \\(rank"):
        peft_state(model)
    model[0] = RandLoRAAdapter(model[0].base, 4, basis_shape=(40, 24))
    model[2] = RandLoRAAdapter(model[2].base, 4, basis_shape=(40, 24))
    with pytest.raises(ValueError, match="PEFT derives"):
        peft_state(model)
