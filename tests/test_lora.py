"""LoRAAdapter: the function, every init (against its definition and against PEFT's own
init where PEFT has it), merging, state dicts, convert(..., "lora") with EVA's rank
redistribution, and the PEFT export round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import RecordShapes, Toy, relative_error, toy
from torch import nn

from lowrank.nn import LoRAAdapter, convert, unconvert
from lowrank.nn.calibration import InputStats, input_statistics
from lowrank.nn.lora import INITS, eva_ranks, peft_state, save_peft

peft = pytest.importorskip("peft")


def inputs(n=64, width=16, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) * torch.logspace(-1, 0.5, width)
    return (torch.randn(n, width, generator=g) @ mix + 0.3).to(dtype)


def stats_of(x: torch.Tensor) -> InputStats:
    x = x.double().reshape(-1, x.shape[-1])
    return InputStats(x.T @ x, x.sum(0), x.shape[0])


def adapter(init, dtype=torch.float64, rank=4, alpha=8.0, **kw):
    base = toy(dtype).a
    x = inputs(dtype=dtype)
    return LoRAAdapter(copy.deepcopy(base), rank, alpha, init=init, stats=stats_of(x), **kw), base


@pytest.mark.parametrize("init", INITS)
def test_every_init_preserves_the_function(init):
    layer, base = adapter(init)
    x = inputs(dtype=torch.float64, seed=5)
    assert relative_error(layer(x), base(x)) <= 1e-12
    assert relative_error(layer.weight, base.weight) <= 1e-12
    assert not layer.base.weight.requires_grad and layer.A.requires_grad and layer.B.requires_grad
    assert (layer.A0 is not None) == (init in ("pissa", "olora", "corda"))
    assert relative_error(layer.original_weight(), base.weight) <= 1e-12


def test_identity_inits_follow_peft():
    gaussian, _ = adapter("gaussian", rank=8, seed=0)
    assert torch.count_nonzero(gaussian.B) == 0
    layer = LoRAAdapter(nn.Linear(512, 512), 8, init="gaussian", seed=0)
    assert abs(float(layer.A.detach().std()) - 1 / 8) < 0.01  # PEFT's "gaussian": std 1/r
    layer = LoRAAdapter(nn.Linear(512, 512), 8, init="kaiming", seed=0)
    assert float(layer.A.detach().abs().max()) <= 1 / 512**0.5 and torch.count_nonzero(layer.B) == 0


def test_no_dense_product_forward_or_backward():
    layer = LoRAAdapter(nn.Linear(40, 48), 3, init="pissa")
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(7, 40, requires_grad=True)
    with RecordShapes() as seen:
        layer(x).square().sum().backward()
    assert (48, 40) not in seen.shapes and (40, 48) not in seen.shapes


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_pissa_is_the_principal_part(svd):
    layer, base = adapter("pissa", svd=svd, n_iter=6)
    w = base.weight.detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    principal = (u[:, :4] * s[:4]) @ vh[:4]
    tol = 1e-10 if svd == "exact" else 1e-6
    assert relative_error(layer.scale * layer.B @ layer.A, principal) <= tol
    # balanced: B^T B = A A^T = diag(S / scale)
    assert relative_error(layer.B.T @ layer.B, layer.A @ layer.A.T) <= 1e-6


@pytest.mark.parametrize("init", ["pissa", "corda", "olora"])
def test_negative_alpha_keeps_the_function(init):
    """A negative alpha flips the adapter's output; the inits that split the principal part
    between A and B put the sign on A, so W_res + scale B A is still W (no square root of
    a negative number)."""
    layer, base = adapter(init, alpha=-8.0)
    assert layer.scale == -2.0
    assert bool(torch.isfinite(layer.A).all()) and bool(torch.isfinite(layer.base.weight).all())
    x = inputs(dtype=torch.float64, seed=5)
    assert relative_error(layer(x), base(x)) <= 1e-12
    if init == "olora":  # A = R, B = Q whatever the scale: its product changes sign
        return
    positive, _ = adapter(init, alpha=8.0)
    assert relative_error(layer.scale * layer.B @ layer.A,
                          positive.scale * positive.B @ positive.A) <= 1e-10  # fmt: skip


def test_zero_alpha_is_refused():
    with pytest.raises(ValueError, match="alpha must be non-zero"):
        LoRAAdapter(nn.Linear(16, 8), 4, 0.0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_matches_peft_init(init):
    model = toy()
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=["a"])
    theirs = peft.get_peft_model(copy.deepcopy(model), config).base_model.model.a
    ours = LoRAAdapter(copy.deepcopy(model.a), 4, 8, init=init, svd="exact")
    their_a, their_b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    assert relative_error(ours.B @ ours.A, their_b @ their_a) <= 1e-5
    assert relative_error(ours.base.weight, theirs.base_layer.weight) <= 1e-5
    if init == "olora":  # QR is unique up to signs LAPACK fixes the same way
        assert relative_error(ours.A, their_a) <= 1e-5 and relative_error(ours.B, their_b) <= 1e-5


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(method):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model = toy()
    x = inputs().unsqueeze(0)  # CorDA's hooks expect one sequence per call
    theirs = copy.deepcopy(model)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="corda", target_modules=["a"],
                             corda_config=CordaConfig(corda_method=method))  # fmt: skip
    preprocess_corda(theirs, config, run_model=lambda: theirs(x))
    layer = peft.get_peft_model(theirs, config).base_model.model.a
    ours = LoRAAdapter(copy.deepcopy(model.a), 4, 8, init="corda", stats=stats_of(x),
                       corda_method=method)  # fmt: skip
    theirs_delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    # float32 through C^{-1}: the inputs' second moment has a condition number near 1e3
    assert relative_error(ours.B @ ours.A, theirs_delta) <= 3e-4
    assert relative_error(ours.base.weight, layer.base_layer.weight) <= 3e-4


def test_eva_takes_the_principal_directions_of_the_inputs():
    layer, _ = adapter("eva", rank=5)
    x = inputs(dtype=torch.float64)
    centred = x - x.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    top = vh[:5]
    # the same subspace, orthonormal rows, B zero
    assert relative_error(layer.A @ layer.A.T, torch.eye(5, dtype=torch.float64)) <= 1e-10
    assert relative_error(layer.A.T @ layer.A, top.T @ top) <= 1e-8
    assert torch.count_nonzero(layer.B) == 0


def test_eva_rank_redistribution():
    spectra = {"a": torch.tensor([0.5, 0.3, 0.1, 0.05]), "b": torch.tensor([0.9, 0.05, 0.01]),
               "c": torch.tensor([0.2, 0.2, 0.2, 0.2])}  # fmt: skip
    ranks = eva_ranks(spectra, rank=2, rho=2.0)  # budget 6, at most 4 per layer
    assert ranks == {"a": 2, "b": 1, "c": 3}
    assert eva_ranks(spectra, rank=2, rho=1.0) == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(ValueError, match="rho"):
        eva_ranks(spectra, 2, 0.5)


def test_merge_unmerge_and_state_dict():
    layer, base = adapter("pissa")
    with torch.no_grad():
        layer.A.add_(0.1)
    x = inputs(dtype=torch.float64)
    expected = layer(x)
    layer.merge()
    assert relative_error(layer(x), expected) <= 1e-12
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    state = layer.state_dict()
    fresh = LoRAAdapter(copy.deepcopy(base), 4, 1.0, init="gaussian")  # no A0/B0 yet
    fresh.load_state_dict(state)
    assert fresh.merged and fresh.scale == layer.scale and fresh.A0 is not None
    assert relative_error(fresh(x), expected) <= 1e-12
    fresh.unmerge()
    layer.unmerge()
    assert relative_error(fresh(x), expected) <= 1e-12
    assert relative_error(fresh.original_weight(), base.weight) <= 1e-12
    back = LoRAAdapter(copy.deepcopy(base), 4, init="gaussian")
    back.load_state_dict(LoRAAdapter(copy.deepcopy(base), 4, init="kaiming").state_dict())
    assert back.A0 is None


def test_bfloat16_base_with_float32_adapter():
    base = nn.Linear(16, 8).bfloat16()
    layer = LoRAAdapter(base, 4, init="gaussian", dtype=torch.float32)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 16).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.A.dtype == torch.float32
    y.float().sum().backward()
    assert layer.A.grad.dtype == torch.float32


def test_bad_input():
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        LoRAAdapter(nn.Conv1d(3, 3, 1), 2)
    with pytest.raises(ValueError, match="at most"):
        LoRAAdapter(nn.Linear(4, 6), 5)
    with pytest.raises(ValueError, match="init"):
        LoRAAdapter(nn.Linear(4, 6), 2, init="svd")
    with pytest.raises(ValueError, match="stats"):
        LoRAAdapter(nn.Linear(4, 6), 2, init="eva")
    with pytest.raises(ValueError, match="4 inputs"):
        LoRAAdapter(nn.Linear(4, 6), 2, init="corda", stats=stats_of(torch.randn(9, 5)))
    with pytest.raises(ValueError, match="dropout"):
        LoRAAdapter(nn.Linear(4, 6), 2, dropout=1.0)
    overflowed = stats_of(torch.tensor([[1e200, 0.0, 0.0, 1.0]] * 3))
    for init in ("eva", "corda"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            LoRAAdapter(nn.Linear(4, 6), 2, init=init, stats=overflowed)
    with pytest.raises(ValueError, match="svd"):
        LoRAAdapter(nn.Linear(4, 6), 2, init="pissa", svd="fast")


# ---- whole models -------------------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
def test_convert_to_lora_and_save_for_peft(init, tmp_path):
    """Train the adapters a few steps, save for PEFT, load onto the *original* model with
    PEFT: the same outputs, also for the inits that rewrote the base weights."""
    original = toy()
    x = inputs()
    model = copy.deepcopy(original)
    report = convert(model, "lora", rank=4, alpha=8, init=init, calibration=[x[:32], x[32:]],
                     progress=False)  # fmt: skip
    assert {r.name for r in report.layers} | {r.name for r in report.skipped} == {"a", "b"}
    with torch.no_grad():
        assert relative_error(model(x), original(x)) <= 1e-5
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    save_peft(model, str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path))
    with torch.no_grad():
        expected = model(x)
        assert relative_error(expected, original(x)) > 1e-4  # training changed the function
        assert relative_error(loaded(x), expected) <= 1e-5
    tensors, config = peft_state(model)
    assert len(tensors) == 2 * len(report.layers)
    doubled = init in ("pissa", "olora", "corda")
    assert config["r"] == (8 if doubled else 4) or config["rank_pattern"]
    assert config["init_lora_weights"] is True
    dense = unconvert(copy.deepcopy(model))
    assert all(type(m) is nn.Linear for m in (dense.a, dense.b))
    with torch.no_grad():
        assert relative_error(dense(x), expected) <= 1e-5


def test_convert_eva_redistributes_and_keeps_the_scale():
    model = toy()
    x = inputs()
    report = convert(model, "lora", rank=4, alpha=8, init="eva", rho=2.0, calibration=[x],
                     progress=False)  # fmt: skip
    ranks = {r.name: model.get_submodule(r.name).rank for r in report.layers}
    assert sum(ranks.values()) == 8 and max(ranks.values()) <= 8
    for name in ranks:
        assert model.get_submodule(name).scale == 2.0
    assert "EVA" in report.allocation


def test_convert_lora_errors():
    with pytest.raises(ValueError, match="calibration"):
        convert(toy(), "lora", rank=2, init="eva", progress=False)
    with pytest.raises(ValueError, match="adapter"):
        convert(toy(), "lora", params=0.5, progress=False)
    with pytest.raises(ValueError, match="unmerge"):
        model = convert(toy(), "lora", rank=2, progress=False).model
        model.a.merge()
        peft_state(model)
    with pytest.raises(ValueError, match="no adapter with plain LoRA factors"):
        peft_state(toy())


class Nested(nn.Module):
    """Layers whose names are suffixes of each other: ``q`` and ``blk.q``, ``k`` and
    ``blk.k``, as PEFT matches ``target_modules`` and its patterns."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.blk = nn.ModuleDict({"q": nn.Linear(16, 16), "k": nn.Linear(16, 16)})
        self.k = nn.Linear(16, 8)

    def forward(self, x):
        h = torch.tanh(self.q(x))
        h = torch.tanh(self.blk.q(h)) + self.blk.k(h)
        return self.k(h)


def nested() -> Nested:
    torch.manual_seed(0)
    return Nested()


def peft_round_trip(model, original, folder):
    """Saves ``model``'s adapters for PEFT and loads them onto ``original``: the loaded
    model and its LoRA layers by name."""
    save_peft(model, str(folder))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(folder))
    layers = {name: m for name, m in loaded.base_model.model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}  # fmt: skip
    return loaded, layers


# name -> (rank, alpha, init); blk.k stays a plain nn.Linear
SUFFIX_CASES = {
    "alphas": {"q": (4, 16.0, "gaussian"), "blk.q": (4, 4.0, "gaussian"), "k": (4, 4.0, "kaiming")},
    "ranks": {"q": (2, 16.0, "pissa"), "blk.q": (1, 2.0, "olora"), "k": (2, 4.0, "kaiming")},
}


@pytest.mark.parametrize("case", SUFFIX_CASES)
def test_save_peft_with_names_that_are_suffixes_of_each_other(case, tmp_path):
    original = nested()
    model = copy.deepcopy(original)
    g = torch.Generator().manual_seed(3)
    for name, (rank, alpha, init) in SUFFIX_CASES[case].items():
        layer = LoRAAdapter(model.get_submodule(name), rank, alpha, init=init, svd="exact")
        with torch.no_grad():  # as if trained
            for p in (layer.A, layer.B):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        model.set_submodule(name, layer)
    loaded, layers = peft_round_trip(model, original, tmp_path)
    x = inputs()
    with torch.no_grad():
        expected = model(x)
        assert relative_error(expected, original(x)) > 1e-3
        assert relative_error(loaded(x), expected) <= 1e-5
    assert sorted(layers) == sorted(SUFFIX_CASES[case])  # blk.k is not wrapped
    for name, theirs in layers.items():
        _, _, r, alpha = model.get_submodule(name).peft_factors()
        assert theirs.r["default"] == r and theirs.scaling["default"] == alpha / r


def test_save_peft_after_eva_redistribution_with_nested_names(tmp_path):
    original = nested()
    x = inputs() * torch.logspace(-2, 1, 16)  # spectra that give the layers different ranks
    model = copy.deepcopy(original)
    report = convert(model, "lora", rank=4, alpha=8, init="eva", rho=2.0, calibration=[x],
                     filter=lambda name, _: name != "blk.k", progress=False)  # fmt: skip
    ranks = {r.name: model.get_submodule(r.name).rank for r in report.layers}
    assert len(ranks) == 3 and len(set(ranks.values())) == 3  # a rank_pattern is needed
    with torch.no_grad():
        for name in ranks:
            model.get_submodule(name).B.normal_(0.0, 0.3)
    loaded, layers = peft_round_trip(model, original, tmp_path)
    assert {n: m.r["default"] for n, m in layers.items()} == ranks
    with torch.no_grad():
        expected = model(x)
        assert relative_error(expected, original(x)) > 1e-3
        assert relative_error(loaded(x), expected) <= 1e-5


def test_save_peft_writes_the_dropout(tmp_path):
    original = toy()
    model = copy.deepcopy(original)
    model.a = LoRAAdapter(model.a, 4, dropout=0.25)
    model.b = LoRAAdapter(model.b, 4, dropout=0.25)
    _, layers = peft_round_trip(model, original, tmp_path)
    assert all(m.lora_dropout["default"].p == 0.25 for m in layers.values())
    model.b = LoRAAdapter(model.b.base, 4, dropout=0.1)
    model.c = LoRAAdapter(nn.Linear(4, 4), 2, dropout=0.25)  # the most common dropout wins
    with pytest.warns(UserWarning, match=r"lora_dropout.*0\.25.*\['b'\]"):
        _, config = peft_state(model)
    assert config["lora_dropout"] == 0.25


@pytest.mark.parametrize("init", INITS)
def test_adapter_on_the_meta_device(init):
    base = nn.Linear(16, 24, device="meta")
    stats = InputStats(torch.empty(16, 16, device="meta"), torch.empty(16, device="meta"), 8)
    layer = LoRAAdapter(base, 4, 8.0, init=init, stats=stats)
    assert layer.A.is_meta and layer.B.is_meta and layer.A.shape == (4, 16)
    assert (layer.A0 is not None) == (init in ("pissa", "olora", "corda"))
    assert layer(torch.empty(3, 16, device="meta")).shape == (3, 24)
    if init in ("eva", "corda"):
        with pytest.raises(ValueError, match="16 inputs"):
            LoRAAdapter(base, 4, init=init, stats=stats_of(torch.randn(9, 5)))


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_convert_on_the_meta_device_then_load(init):
    """A model built on the meta device takes the adapters' structure, then a trained
    adapter's state dict."""
    trained = convert(toy(), "lora", rank=4, alpha=8, init=init, progress=False).model
    with torch.no_grad():
        trained.a.B.normal_()
    with torch.device("meta"):
        skeleton = Toy()
    report = convert(skeleton, "lora", rank=4, alpha=8, init=init, progress=False)
    assert len(report.layers) == 2 and skeleton.a.A.is_meta
    skeleton.to_empty(device="cpu")
    skeleton.load_state_dict(trained.state_dict())
    x = inputs()
    with torch.no_grad():
        assert relative_error(skeleton(x), trained(x)) <= 1e-6


# ---- calibration --------------------------------------------------------------------------------


class Scaled(nn.Module):
    """``b(gain * a(x))``: a large ``gain`` makes ``b``'s inputs overflow."""

    def __init__(self, gain):
        super().__init__()
        self.gain = gain
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 8)

    def forward(self, x):
        return self.b(self.gain * self.a(x))


def test_calibration_skips_empty_batches():
    model = toy()
    x = inputs()
    layers = {"a": model.a, "b": model.b}
    stats = input_statistics(model, [x[:0], x, x[:0]], layers, progress=False)
    expected = stats_of(x)
    assert stats["a"].count == 64
    assert relative_error(stats["a"].gram, expected.gram) <= 1e-6
    with pytest.raises(ValueError, match=r"\['a', 'b'\] no tokens"):
        input_statistics(model, [x[:0], x[:0]], layers, progress=False)


@pytest.mark.parametrize(("gain", "message"), [(float("inf"), "NaN or Inf"),
                                               (1e20, "overflow float32")])  # fmt: skip
def test_calibration_names_the_layer_with_non_finite_inputs(gain, message):
    model = Scaled(gain)
    x = inputs()
    layers = {"a": model.a, "b": model.b}
    with pytest.raises(ValueError, match=f"layer 'b'.*{message}"):
        input_statistics(model, [x], layers, progress=False)
    with pytest.raises(ValueError, match="layer 'b'"):
        convert(model, "lora", rank=2, init="eva", calibration=[x], progress=False)
