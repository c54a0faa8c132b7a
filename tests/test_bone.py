"""BoneAdapter (Bone / MiSS): each variant against the paper's block equations, gradients,
merging (bat's inverse), state dicts, pickling, autocast, torch.compile, convert/save/load,
and the export to PEFT's MiSS format loading to the same outputs."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import RecordShapes, relative_error
from torch import nn

import lowrank.nn as lnn
from lowrank.nn import BoneAdapter, convert, unconvert
from lowrank.nn.bone import VARIANTS, peft_state, save_peft

# (variant, in, out, rank, mini_rank): in not a multiple of the rank for balance and mini.
CASES = [("balance", 20, 12, 6, 1), ("balance", 16, 12, 4, 1), ("mini", 18, 12, 4, 3),
         ("bat", 16, 12, 4, 1)]  # fmt: skip


def reference_weight(w, variant, block, rank, mini_rank=1):
    """``W + delta W`` from the paper's block equations, one block at a time."""
    out_f, in_f = w.shape
    adapted = w.clone()
    if variant == "bat":  # W'_ab = W_ab + W_ab M_a + M_a
        for a in range(out_f // rank):
            rows = slice(a * rank, (a + 1) * rank)
            for b in range(in_f // rank):
                cols = slice(b * rank, (b + 1) * rank)
                adapted[rows, cols] = w[rows, cols] @ (torch.eye(rank, dtype=w.dtype)
                                                       + block[a]) + block[a]  # fmt: skip
        return adapted
    d = block if variant == "balance" else block.repeat(1, out_f // mini_rank)  # (r, out)
    for j in range(0, in_f, rank):  # every column block gets D^T (the last one cut)
        width = min(rank, in_f - j)
        adapted[:, j : j + width] += d[:width].T
    return adapted


def layer_for(variant, in_f, out_f, rank, mini_rank, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f).to(dtype)
    layer = BoneAdapter(copy.deepcopy(base), rank, variant, mini_rank=mini_rank)
    with torch.no_grad():
        layer.block.normal_(0, 0.3)
    return layer, base


@pytest.mark.parametrize("case", CASES)
def test_forward_gradients_and_merge_follow_the_equations(case):
    variant, in_f, _, rank, mini_rank = case
    layer, base = layer_for(*case)
    assert not layer.base.weight.requires_grad and layer.block.requires_grad
    x = torch.randn(2, 5, in_f, dtype=torch.float64)
    block = layer.block.detach().clone().requires_grad_(True)
    ref_w = reference_weight(base.weight, variant, block, rank, mini_rank)
    expected = torch.nn.functional.linear(x, ref_w, base.bias)
    y = layer(x)
    assert relative_error(y, expected) <= 1e-12
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    (expected * grad).sum().backward()
    assert relative_error(layer.block.grad, block.grad) <= 1e-12
    assert relative_error(layer.weight, ref_w) <= 1e-12
    layer.merge()
    assert relative_error(layer(x), expected) <= 1e-12
    assert relative_error(layer.base.weight, ref_w) <= 1e-12
    layer.unmerge()
    assert relative_error(layer.base.weight, base.weight) <= 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_init_is_the_identity_change_and_counts_peft_parameters(variant):
    base = nn.Linear(16, 12)
    layer = BoneAdapter(copy.deepcopy(base), 4, variant, mini_rank=6)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))
    assert layer.block.numel() == {"balance": 4 * 12, "bat": 4 * 12, "mini": 4 * 6}[variant]


def test_balance_never_forms_the_weight_change():
    layer, _ = layer_for("balance", 40, 48, 8, 1, dtype=torch.float32)
    x = torch.randn(7, 40, requires_grad=True)
    with RecordShapes() as seen:
        layer(x).square().sum().backward()
    assert (48, 40) not in seen.shapes and (40, 48) not in seen.shapes


def test_state_dict_pickle_autocast_and_compile():
    layer, base = layer_for("balance", 16, 12, 4, 1, dtype=torch.float32)
    x = torch.randn(4, 16)
    expected = layer(x)
    layer.merge()
    fresh = BoneAdapter(copy.deepcopy(base), 4)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged and relative_error(fresh(x), expected) <= 1e-6
    fresh.unmerge()
    assert relative_error(fresh(x), expected) <= 1e-6
    clone = pickle.loads(pickle.dumps(fresh))
    assert torch.equal(clone(x), fresh(x))
    compiled = torch.compile(fresh, fullgraph=True, backend="aot_eager")
    assert relative_error(compiled(x), expected) <= 1e-6
    for variant in ("balance", "bat"):
        layer, _ = layer_for(variant, 16, 12, 4, 1, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16 and relative_error(y, layer(x)) <= 2e-2


def test_bad_input():
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        BoneAdapter(nn.Conv1d(3, 3, 1), 2)
    with pytest.raises(ValueError, match="rank must be at most in_features"):
        BoneAdapter(nn.Linear(4, 6), 5)
    with pytest.raises(ValueError, match="rank must divide"):
        BoneAdapter(nn.Linear(12, 8), 3, "bat")
    with pytest.raises(ValueError, match="mini_rank must divide"):
        BoneAdapter(nn.Linear(12, 8), 4, "mini", mini_rank=3)
    with pytest.raises(ValueError, match="variant"):
        BoneAdapter(nn.Linear(12, 8), 4, "bone")
    with pytest.raises(ValueError, match="dropout"):
        BoneAdapter(nn.Linear(12, 8), 4, "bat", dropout=0.1)
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 10))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"1: rank must divide"):
        convert(model, "bone", rank=4, variant="bat", progress=False)
    with pytest.raises(ValueError, match="unknown options"):
        convert(model, "bone", rank=4, block_size=2, progress=False)
    assert all(type(m) is nn.Linear for m in model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- whole models -------------------------------------------------------------------------------


def toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))


def trained(variant, mini_rank=1):
    original, x = toy(), torch.randn(32, 16)
    model = copy.deepcopy(original)
    report = convert(model, "bone", rank=4, variant=variant, mini_rank=mini_rank,
                     progress=False)  # fmt: skip
    assert len(report.layers) == 2
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return original, model, x


@pytest.mark.parametrize("variant", VARIANTS)
def test_convert_save_load_and_peft_export(variant, tmp_path):
    peft = pytest.importorskip("peft")
    original, model, x = trained(variant, mini_rank=2)
    with torch.no_grad():
        expected = model(x)
        assert relative_error(expected, original(x)) > 1e-3  # training changed the function
    lnn.save(model, str(tmp_path / "lowrank"))
    loaded = lnn.load(copy.deepcopy(original), str(tmp_path / "lowrank"))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    save_peft(model, str(tmp_path / "peft"))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "peft"))
    with torch.no_grad():
        assert relative_error(peft_model(x), expected) <= 1e-6
    dense = unconvert(copy.deepcopy(model))
    assert all(type(m) is nn.Linear for m in (dense[0], dense[2]))
    with torch.no_grad():
        assert relative_error(dense(x), expected) <= 1e-6


def test_peft_export_needs_one_setting():
    model = toy()
    model[0] = BoneAdapter(model[0], 4)
    model[2] = BoneAdapter(model[2], 8)
    with pytest.raises(ValueError, match="one \\(rank"):
        peft_state(model)
