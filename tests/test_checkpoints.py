"""State dicts in the original Monarch and SLTrain formats, into lowrank's layers and back.

The ``original_*`` functions below compute each original layer's function from its state
dict alone, written from the published layouts (Monarch: ``blkdiag1`` ``(k, q, p)`` on
zero-padded input blocks, a stride permutation, ``blkdiag2`` ``(l, s, r)``, outputs
interleaved by block and cut; SLTrain: ``(alpha / r) lora_B lora_A`` plus ``sparse_value``
scattered at flat ``sparse_index`` positions), independently of lowrank's code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from torch import nn

from lowrank.nn import MonarchLinear, SLTrainLinear, checkpoints

# ---- the original layers' functions -------------------------------------------------------------


def original_monarch(state: dict, prefix: str, x: torch.Tensor, in_f: int, out_f: int):
    w1, w2 = state[prefix + "blkdiag1"], state[prefix + "blkdiag2"]
    k, q, p = w1.shape
    l, s, r = w2.shape
    tokens = x.shape[0]
    x = F.pad(x, (0, k * p - in_f))
    h = torch.einsum("kqp,tkp->tkq", w1, x.view(tokens, k, p)).reshape(tokens, k * q)
    z = h.view(tokens, r, l).transpose(1, 2)  # block ll, position rr holds h[rr * l + ll]
    u = torch.einsum("lsr,tlr->tls", w2, z)
    y = u.transpose(1, 2).reshape(tokens, s * l)  # output ss * l + ll holds u[ll, ss]
    y = y[:, :out_f]
    bias = state.get(prefix + "bias")
    return y if bias is None else y + bias


def original_monarch_shapes(in_f: int, out_f: int, nblocks: int):
    b_in, b_out = math.ceil(in_f / nblocks), math.ceil(out_f / nblocks)
    if b_in * nblocks < b_out * nblocks:
        return (nblocks, b_in, b_in), (nblocks, b_out, b_in)
    return (nblocks, b_out, b_in), (nblocks, b_out, b_out)


def original_sltrain(state: dict, prefix: str, x: torch.Tensor, alpha: float | None):
    a, b = state[prefix + "lora_A"], state[prefix + "lora_B"]
    scaling = state.get(prefix + "scaling")
    scale = torch.tanh(scaling) if scaling is not None else alpha / a.shape[0]
    w = b @ (a * scale)
    w.view(-1).scatter_add_(0, state[prefix + "sparse_index"], state[prefix + "sparse_value"])
    bias = state.get(prefix + "bias")
    return F.linear(x, w, bias)


def monarch_state(in_f, out_f, nblocks, bias=True, prefix=""):
    g = torch.Generator().manual_seed(in_f * 1000 + out_f)
    s1, s2 = original_monarch_shapes(in_f, out_f, nblocks)
    state = {}
    if bias:
        state[prefix + "bias"] = torch.randn(out_f, generator=g, dtype=torch.float64)
    state[prefix + "blkdiag1"] = torch.randn(s1, generator=g, dtype=torch.float64)
    state[prefix + "blkdiag2"] = torch.randn(s2, generator=g, dtype=torch.float64)
    return state


def sltrain_state(in_f, out_f, r, sp_ratio, bias=True, scaling=None, prefix=""):
    g = torch.Generator().manual_seed(in_f * 1000 + out_f)
    total = in_f * out_f
    nnz = int(sp_ratio * total)
    index, _ = torch.sort(torch.randperm(total, generator=g)[:nnz])
    state = {}
    if bias:
        state[prefix + "bias"] = torch.randn(out_f, generator=g, dtype=torch.float64)
    state[prefix + "lora_A"] = torch.randn(r, in_f, generator=g, dtype=torch.float64)
    state[prefix + "lora_B"] = torch.randn(out_f, r, generator=g, dtype=torch.float64)
    if scaling is not None:
        state[prefix + "scaling"] = torch.tensor([scaling], dtype=torch.float64)
    state[prefix + "sparse_value"] = torch.randn(nnz, generator=g, dtype=torch.float64)
    state[prefix + "sparse_index"] = index  # int64, as randperm gives
    return state


# ---- Monarch ----------------------------------------------------------------------------------


@pytest.mark.parametrize("in_f, out_f, nblocks, bias", [
    (48, 192, 4, True),   # an MLP's first layer (in < out)
    (192, 48, 4, True),   # and its second
    (100, 37, 3, False),  # sizes not divisible by the blocks: padding and cutting
    (37, 100, 3, True),
    (64, 64, 8, True),
])  # fmt: skip
def test_monarch_original_checkpoint_loads_and_exports(in_f, out_f, nblocks, bias):
    prefix = "layers.0.mlp.fc1."
    state = monarch_state(in_f, out_f, nblocks, bias, prefix)
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].mlp = nn.Module()
    model.layers[0].mlp.fc1 = MonarchLinear(in_f, out_f, nblocks, bias, dtype=torch.float64)
    model.load_state_dict(checkpoints.from_original(state, "monarch"), strict=True)
    x = torch.randn(7, in_f, dtype=torch.float64)
    expected = original_monarch(state, prefix, x, in_f, out_f)
    assert relative_error(model.layers[0].mlp.fc1(x), expected) <= 1e-12
    exported = checkpoints.to_original(model.state_dict(), "monarch")
    assert set(exported) == set(state)
    for key, value in state.items():
        assert exported[key].shape == value.shape and torch.equal(exported[key], value), key


def test_monarch_export_of_a_trained_layer_runs_in_the_original_layout():
    layer = MonarchLinear.from_dense(torch.randn(40, 24, dtype=torch.float64), 4, 2)
    exported = checkpoints.to_original(layer.state_dict(), "monarch")
    x = torch.randn(5, 24, dtype=torch.float64)
    assert relative_error(original_monarch(exported, "", x, 24, 40), layer(x)) <= 1e-12


# ---- SLTrain -----------------------------------------------------------------------------------


@pytest.mark.parametrize("in_f, out_f, r, sp_ratio, bias", [
    (64, 48, 8, 0.03, False),  # the reference LLaMA layers have no bias
    (48, 64, 4, 0.1, True),
    (37, 23, 5, 0.05, True),
])  # fmt: skip
def test_sltrain_original_checkpoint_loads_and_exports(in_f, out_f, r, sp_ratio, bias):
    prefix = "model.layers.0.self_attn.q_proj."
    alpha = 32.0
    state = sltrain_state(in_f, out_f, r, sp_ratio, bias, prefix=prefix)
    layer = SLTrainLinear(in_f, out_f, r, sp_ratio, alpha=1.0, bias=bias, seed=5,
                          dtype=torch.float64)  # fmt: skip
    values = layer.values
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Module()])
    model.model.layers[0].self_attn = nn.Module()
    model.model.layers[0].self_attn.q_proj = layer
    model.load_state_dict(checkpoints.from_original(state, "sltrain", alpha=alpha), strict=True)
    assert layer.values is values  # the same nonzero count: the Parameter is kept
    assert layer.scale == alpha / r
    x = torch.randn(6, in_f, dtype=torch.float64)
    assert relative_error(layer(x), original_sltrain(state, prefix, x, alpha)) <= 1e-12
    exported = checkpoints.to_original(model.state_dict(), "sltrain")
    assert set(exported) == set(state)
    assert exported[prefix + "sparse_index"].dtype == torch.int64
    for key, value in state.items():
        assert torch.equal(exported[key], value), key
    assert checkpoints.original_alpha(model.state_dict()) == {prefix[:-1]: alpha}


def test_sltrain_trainable_scaling_checkpoint():
    state = sltrain_state(32, 24, 4, 0.05, scaling=0.7)
    layer = SLTrainLinear(32, 24, 4, 0.05, seed=0, dtype=torch.float64)
    layer.load_state_dict(checkpoints.from_original(state, "sltrain"), strict=True)
    x = torch.randn(5, 32, dtype=torch.float64)
    assert relative_error(layer(x), original_sltrain(state, "", x, None)) <= 1e-12


def test_sltrain_export_of_a_converted_layer_runs_in_the_original_layout():
    layer = SLTrainLinear.from_dense(torch.randn(30, 20, dtype=torch.float64), 4, 0.1, 8.0, 0)
    exported = checkpoints.to_original(layer.state_dict(), "sltrain")
    alpha = checkpoints.original_alpha({"layer._extra_state": layer.get_extra_state()})["layer"]
    assert alpha == 8.0
    x = torch.randn(5, 20, dtype=torch.float64)
    assert relative_error(original_sltrain(exported, "", x, alpha), layer(x)) <= 1e-12


def test_checkpoint_errors():
    with pytest.raises(ValueError, match="format"):
        checkpoints.from_original({}, "butterfly")
    with pytest.raises(TypeError, match="dict"):
        checkpoints.from_original([], "monarch")
    with pytest.raises(ValueError, match="alpha"):
        checkpoints.from_original(sltrain_state(8, 8, 2, 0.1), "sltrain")
    layer = SLTrainLinear(8, 8, 2, 0.1, seed=0)
    bad = checkpoints.from_original(sltrain_state(8, 8, 2, 0.1), "sltrain", alpha=2.0)
    bad["indices"] = torch.tensor([70, 3, 200])  # unsorted and out of range
    with pytest.raises(ValueError, match="indices must lie in"):
        layer.load_state_dict(bad)
