"""lowrank.nn.convert and unconvert on a small transformer-shaped model: which layers, every
kind, budgets and their allocation, calibration, the report, and the way back to dense."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from torch import nn

from lowrank.nn import (
    ConversionReport,
    KronAdapter,
    KronLinear,
    LowRankLinear,
    MonarchLinear,
    SLTrainLinear,
    convert,
    lora,
    unconvert,
)

D, HIDDEN, VOCAB = 32, 64, 50


def _spectrum_weight(out, inp, decay, g):
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g))
    k = min(out, inp)
    s = torch.exp(-decay * torch.arange(k, dtype=torch.float32))
    return (u[:, :k] * s) @ v[:, :k].T * (3.0 / (inp**0.5))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, h):
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1)
        h = self.norm(h + self.o(att @ v))
        return h + self.fc2(F.gelu(self.fc1(h)))


class Toy(nn.Module):
    """Embedding, two blocks, a head tied to the embedding. Layers have very different
    spectra (some nearly low rank, some flat), as in trained models."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied
        with torch.no_grad():
            decays = iter([0.02, 0.5, 0.05, 0.3, 0.01, 0.4, 0.2, 0.03, 0.6, 0.02, 0.1, 0.25])
            for block in self.blocks:
                for lin in (block.q, block.k, block.v, block.o, block.fc1, block.fc2):
                    lin.weight.copy_(_spectrum_weight(*lin.weight.shape, next(decays), g))
            self.embed.weight.copy_(torch.randn(VOCAB, D, generator=g))

    def forward(self, ids=None, scale=1.0):
        h = self.embed(ids) * scale
        for block in self.blocks:
            h = block(h)
        return self.head(h)


LINEARS = [f"blocks.{i}.{n}" for i in range(2) for n in ("q", "k", "v", "o", "fc1", "fc2")]


def ids(batch=4, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def output_error(model, reference, data):
    with torch.no_grad():
        return relative_error(model(data), reference(data))


# ---- which layers ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind, cls, options", [
    ("lowrank", LowRankLinear, {"rank": 4}),
    ("monarch", MonarchLinear, {"nblocks": 4}),
    ("sltrain", SLTrainLinear, {"rank": 4}),
    ("kron", KronLinear, {}),
    ("kron_adapter", KronAdapter, {"rank": 2}),
])  # fmt: skip
def test_every_kind_converts_every_linear_and_skips_the_tied_head(kind, cls, options):
    model = Toy()
    report = convert(model, kind, progress=False, **options)
    assert isinstance(report, ConversionReport) and report.model is model
    assert [r.name for r in report.layers] == LINEARS
    for name in LINEARS:
        assert isinstance(model.get_submodule(name), cls)
    assert isinstance(model.head, nn.Linear)
    assert [(r.name, "tied" in r.note) for r in report.skipped] == [("head", True)]
    assert model.head.weight is model.embed.weight
    assert torch.isfinite(model(ids())).all()
    text = str(report)
    assert "blocks.1.fc2" in text and "skipped" in text and "total" in text


def test_per_layer_errors_are_the_optimal_ones():
    """Through convert each layer still gets the best error its structure allows."""
    model = Toy()
    original = copy.deepcopy(model)
    report = convert(model, "lowrank", rank=5, progress=False)
    for layer in report.layers:
        w = original.get_submodule(layer.name).weight.detach().double()
        s = torch.linalg.svdvals(w)
        optimum = float(s[5:].square().sum().sqrt() / s.square().sum().sqrt())
        assert abs(layer.weight_error - optimum) <= 1e-5, layer.name
        assert layer.params_after == 5 * sum(layer.shape) + layer.shape[0]
    for kind, options in [("monarch", {}), ("sltrain", {"rank": 3}), ("kron", {"terms": 2})]:
        report = convert(copy.deepcopy(original), kind, progress=False, **options)
        for layer in report.layers:
            assert abs(layer.weight_error - report.model.get_submodule(layer.name)
                       .projection_error) <= 1e-5  # fmt: skip


@pytest.mark.parametrize("filter, expected", [
    (["q", "fc1"], ["blocks.0.q", "blocks.0.fc1", "blocks.1.q", "blocks.1.fc1"]),
    (["blocks.1.o"], ["blocks.1.o"]),
    (["o"], ["blocks.0.o", "blocks.1.o"]),  # a name matches whole components, not substrings
    (r"blocks\.0\..*", LINEARS[:6]),
    (lambda name, module: module.out_features == HIDDEN, ["blocks.0.fc1", "blocks.1.fc1"]),
])  # fmt: skip
def test_filter(filter, expected):
    model = Toy()
    report = convert(model, "lowrank", rank=2, filter=filter, progress=False)
    assert [r.name for r in report.layers] == expected
    for name in LINEARS:
        assert isinstance(model.get_submodule(name), LowRankLinear) == (name in expected)


def test_subclasses_shared_modules_and_multihead_attention():
    class MyLinear(nn.Linear):
        pass

    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": shared, "b": shared, "c": MyLinear(8, 4),
                           "mha": nn.MultiheadAttention(8, 2)})  # fmt: skip
    report = convert(model, "lowrank", rank=2, progress=False)
    assert isinstance(model["c"], LowRankLinear)
    assert model["a"] is model["b"] and isinstance(model["a"], LowRankLinear)  # still shared
    assert [r.name for r in report.layers] == ["a (+1 tied)", "c"]
    assert isinstance(model["mha"].out_proj, nn.Linear)
    assert any("MultiheadAttention" in r.note for r in report.skipped)


def test_not_inplace_leaves_the_model_alone():
    model = Toy()
    before = copy.deepcopy(model.state_dict())
    report = convert(model, "lowrank", rank=3, inplace=False, progress=False)
    assert report.model is not model
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in LINEARS)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_empty_selection_raises():
    with pytest.raises(ValueError, match="matches filter"):
        convert(Toy(), "lowrank", rank=2, filter=["nothing"], progress=False)


# ---- budgets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.25, 0.5])
@pytest.mark.parametrize("calibrated", [False, True])
def test_budget_is_kept_and_global_at_least_matches_uniform(fraction, calibrated):
    reference = Toy()
    data, held_out = [{"ids": ids(seed=s)} for s in (1, 2)], ids(seed=9)
    errors, sizes = {}, {}
    for allocation in ("global", "uniform"):
        report = convert(copy.deepcopy(reference), "lowrank", params=fraction,
                         allocation=allocation, calibration=data if calibrated else None,
                         progress=False)  # fmt: skip
        weights = sum(r.shape[0] * r.shape[1] for r in report.layers)
        kept = sum(r.params_after - r.shape[0] for r in report.layers)  # biases stay
        assert kept <= fraction * weights
        errors[allocation] = output_error(report.model, reference, held_out)
        sizes[allocation] = kept
        assert allocation in report.allocation or "global" in report.allocation
    # the same parameter count, within one rank-one component of the largest layer
    assert abs(sizes["global"] - sizes["uniform"]) <= 2 * (D + HIDDEN) * len(LINEARS)
    assert errors["global"] <= errors["uniform"], errors


def test_calibration_fits_the_outputs():
    """With activations far from isotropic, fitting the outputs beats fitting the weights."""
    reference = Toy()
    data = [{"ids": ids(seed=s)} for s in (1, 2, 3)]
    plain = convert(copy.deepcopy(reference), "lowrank", rank=6, progress=False)
    fitted = convert(copy.deepcopy(reference), "lowrank", rank=6, calibration=data,
                     progress=False)  # fmt: skip
    held_out = ids(seed=8)
    assert output_error(fitted.model, reference, held_out) < output_error(
        plain.model, reference, held_out
    )
    assert all(r.output_error is not None for r in fitted.layers)
    assert fitted.calibration_seconds > 0
    for r in fitted.layers:  # the calibrated fit trades weight error for output error
        plain_row = next(p for p in plain.layers if p.name == r.name)
        assert r.weight_error >= plain_row.weight_error - 1e-6


@pytest.mark.parametrize("make_batches", [
    lambda: [{"ids": ids(seed=1)}, {"ids": ids(seed=2), "scale": 0.5}],  # model(**batch)
    lambda: [(ids(seed=1),), (ids(seed=2), 0.5)],  # model(*batch)
    lambda: [ids(seed=1), ids(seed=2)],  # model(batch)
    lambda: ids(seed=1),  # one batch
    lambda: ({"ids": ids(seed=s)} for s in (1, 2)),  # a generator is read once
])  # fmt: skip
def test_calibration_batch_forms(make_batches):
    for kind in ("lowrank", "monarch", "sltrain"):
        options = {"rank": 3} if kind != "monarch" else {}
        report = convert(Toy(), kind, calibration=make_batches(), progress=False, **options)
        assert len(report.layers) == len(LINEARS)
        assert torch.isfinite(report.model(ids())).all()


def test_calibration_errors():
    with pytest.raises(ValueError, match="no batches"):
        convert(Toy(), "lowrank", rank=2, calibration=[], progress=False)
    with pytest.raises(TypeError, match="iterable"):
        convert(Toy(), "lowrank", rank=2, calibration=3, progress=False)
    # one batch for model(*batch), or two batches? refused, the model left as it was
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"tuple of 2 tensors.*Pass a list"):
        convert(model, "lowrank", rank=2, calibration=(ids(seed=1), ids(seed=2)), progress=False)
    assert all(isinstance(m, nn.Linear) for m in (model.get_submodule(n) for n in LINEARS))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = Toy()
    model.unused = nn.Linear(D, D)
    with pytest.raises(ValueError, match="never reached"):
        convert(model, "lowrank", rank=2, calibration=[ids()], progress=False)


def test_option_errors():
    with pytest.raises(ValueError, match="kind"):
        convert(Toy(), "butterfly")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        convert(torch.randn(3), "lowrank", rank=1)
    with pytest.raises(ValueError, match="exactly one"):
        convert(Toy(), "lowrank", progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        convert(Toy(), "lowrank", rank=2, params=0.5, progress=False)
    with pytest.raises(ValueError):
        convert(Toy(), "lowrank", params=0.0, progress=False)
    with pytest.raises(ValueError):
        convert(Toy(), "lowrank", params=1.5, progress=False)
    with pytest.raises(ValueError, match="allocation"):
        convert(Toy(), "lowrank", params=0.5, allocation="best", progress=False)
    with pytest.raises(ValueError, match=r"unknown options \['blocks'\].*nblocks"):
        convert(Toy(), "monarch", blocks=4, progress=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        convert(Toy(), "dense", progress=False)
    with pytest.raises(ValueError, match="adapter"):
        convert(Toy(), "kron_adapter", params=0.5, progress=False)
    with pytest.raises(TypeError, match="filter"):
        convert(Toy(), "lowrank", rank=2, filter=3, progress=False)


def test_tol_option():
    report = convert(Toy(), "lowrank", tol=0.3, progress=False)
    assert all(r.weight_error <= 0.3 + 1e-6 for r in report.layers)


def test_other_kinds_at_a_budget():
    for kind in ("monarch", "sltrain", "kron"):
        report = convert(Toy(), kind, params=0.5, progress=False)
        weights = sum(r.shape[0] * r.shape[1] for r in report.layers)
        kept = sum(r.params_after - r.shape[0] for r in report.layers)
        assert 0.3 * weights <= kept <= 0.55 * weights, (kind, kept / weights)


# ---- adapters and the way back ----------------------------------------------------------------


def test_kron_adapter_trains_only_the_adapters():
    model = Toy()
    reference = copy.deepcopy(model)
    convert(model, "kron_adapter", rank=2, progress=False)
    assert output_error(model, reference, ids()) <= 1e-6  # PEFT init: the identity change
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) >= len(LINEARS) and all(".w1" in n or ".w2" in n for n in trainable)
    other = convert(Toy(), "kron_adapter", rank=2, freeze=False, progress=False).model
    assert other.embed.weight.requires_grad and other.blocks[0].norm.weight.requires_grad
    assert not other.blocks[0].q.base.weight.requires_grad  # the base layers always are
    frozen = convert(Toy(), "lowrank", rank=2, freeze=True, progress=False).model
    trainable = {n.rsplit(".", 1)[-1] for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {"A", "B", "bias"} and not frozen.embed.weight.requires_grad


@pytest.mark.parametrize("kind, options", [
    ("lowrank", {"rank": 4}), ("monarch", {}), ("sltrain", {"rank": 3}), ("kron", {}),
    ("kron_adapter", {"rank": 2, "init": "random"}),
])  # fmt: skip
def test_unconvert_gives_plain_linears_with_the_same_function(kind, options):
    model = convert(Toy(), kind, progress=False, **options).model
    data = ids()
    with torch.no_grad():
        expected = model(data)
    dense = unconvert(model, inplace=False)
    assert all(type(dense.get_submodule(n)) is nn.Linear for n in LINEARS)
    with torch.no_grad():
        assert relative_error(dense(data), expected) <= 1e-5
    assert dense.head.weight is dense.embed.weight
    structured = (LowRankLinear, MonarchLinear, SLTrainLinear, KronLinear, KronAdapter)
    assert isinstance(model.get_submodule(LINEARS[0]), structured)
    unconvert(model)  # in place
    assert all(type(model.get_submodule(n)) is nn.Linear for n in LINEARS)


# ---- reliability: each of these failed before its fix -------------------------------------------


def test_converting_twice_never_wraps_an_adapters_base():
    model = Toy()
    convert(model, "lora", rank=2, progress=False)
    with pytest.raises(ValueError, match="nothing to convert to lora"):
        convert(model, "lora", rank=2, progress=False)
    with pytest.raises(ValueError, match="nothing to convert to lowrank"):
        convert(model, "lowrank", rank=2, progress=False)  # the base of an adapter stays
    x = ids()
    expected = model(x)
    dense = unconvert(model, inplace=False)
    assert all(type(m) is not lora.LoRAAdapter for m in dense.modules())
    assert dense.blocks[0].q.bias is not None  # the bias survives
    torch.testing.assert_close(dense(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_into_a_converted_base_raises_instead_of_losing_the_change():
    adapter = lora.LoRAAdapter(nn.Linear(16, 16), 2)
    with torch.no_grad():
        adapter.B.normal_()
    adapter.base = LowRankLinear.from_dense(adapter.base, 4)  # converted behind its back
    with pytest.raises(RuntimeError, match="floating-point parameter"):
        adapter.merge()
    assert not adapter.merged
    model = nn.Sequential(adapter)
    x = torch.randn(3, 16)
    expected = model(x)
    torch.testing.assert_close(unconvert(model)(x), expected, rtol=1e-5, atol=1e-5)


class OwnForwardLinear(nn.Linear):
    """Stands for quantized layers (bitsandbytes' Linear8bitLt): a Linear whose forward
    is its own (here it counts its calls)."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        return F.linear(x, self.weight, self.bias)


def test_linear_with_its_own_forward_is_skipped_or_kept():
    model = nn.Sequential(OwnForwardLinear(8, 8), nn.Linear(8, 8))
    report = convert(model, "lowrank", rank=2, progress=False)
    assert type(model[0]) is OwnForwardLinear and "forward of its own" in report.skipped[0].note
    model = nn.Sequential(OwnForwardLinear(8, 8))
    convert(model, "lora", rank=2, progress=False)
    with torch.no_grad():
        model[0].B.normal_()
    x = torch.randn(4, 8)
    expected = model(x)
    unconvert(model)
    assert type(model[0]) is OwnForwardLinear  # the base stays, with the change merged
    calls = model[0].calls
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert model[0].calls == calls + 1


@pytest.mark.parametrize(("kind", "size"), [("monarch", "rank"), ("kron", "terms")])
def test_size_and_budget_together_raise(kind, size):
    with pytest.raises(ValueError, match="not both"):
        convert(Toy(), kind, params=0.9, progress=False, **{size: 1})


def test_global_calibrated_allocation_with_a_frozen_integer_parameter():
    model = Toy()
    model.register_parameter("codes", nn.Parameter(torch.zeros(4, dtype=torch.int8),
                                                   requires_grad=False))  # fmt: skip
    report = convert(model, "lowrank", params=0.5, calibration=[ids()], progress=False)
    assert report.layers and not model.codes.requires_grad


class Overflowing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.a(x) * float("inf"))


@pytest.mark.parametrize("kind", ["lowrank", "monarch", "sltrain"])
def test_non_finite_calibration_names_the_layer(kind):
    options = {"monarch": {}, "sltrain": {"rank": 2}}.get(kind, {"rank": 2})
    with pytest.raises(ValueError, match=r"'b'.*(NaN|Inf)"):
        convert(Overflowing(), kind, calibration=[torch.randn(4, 8)], progress=False, **options)


def test_nothing_to_convert_raises():
    with pytest.raises(ValueError, match="itself an nn"):
        convert(nn.Linear(4, 4), "lowrank", rank=1, progress=False)
    with pytest.raises(ValueError, match="has no nn"):
        convert(nn.Sequential(nn.ReLU()), "lowrank", rank=1, progress=False)
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match=r"every match was skipped.*MultiheadAttention"):
        convert(mha, "lowrank", rank=1, progress=False)


def test_budget_below_one_rank_per_layer_raises():
    with pytest.raises(ValueError, match="below one rank per layer"):
        convert(Toy(), "lowrank", params=1e-9, progress=False)
    with pytest.raises(ValueError, match="nothing for the low-rank part"):
        convert(Toy(), "sltrain", params=0.01, progress=False)
