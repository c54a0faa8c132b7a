"""WeLore allocation: ``convert(model, "lowrank", allocation="welore", ...)`` against a
reference written from the paper's rule, the parameter budget, the classification into
low-rank components, fine-tuning only those, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lowrank.nn import LowRankLinear, convert
from lowrank.nn.allocation import welore_ranks


def spectrum_model(seed: int = 0) -> nn.Sequential:
    """Layers with different spectra: an exactly low-rank one with a little noise (heavy
    tail), a random one (Marchenko-Pastur, light tail), an orthogonal one (flat) and a
    decaying one."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 24), nn.Linear(24, 24),
                          nn.Linear(24, 32))  # fmt: skip
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(40, 3, generator=g) @ torch.randn(3, 24, generator=g)
                              + 0.01 * torch.randn(40, 24, generator=g))  # fmt: skip
        model[1].weight.copy_(torch.randn(24, 40, generator=g) / 40**0.5)
        model[2].weight.copy_(torch.linalg.qr(torch.randn(24, 24, generator=g))[0])
        u = torch.linalg.qr(torch.randn(32, 24, generator=g))[0]
        v = torch.linalg.qr(torch.randn(24, 24, generator=g))[0]
        model[3].weight.copy_((u * 0.8 ** torch.arange(24.0)) @ v.T)
    return model


def reference_rank(weight: torch.Tensor, tau: float) -> int:
    """The paper's rule, directly: min-max normalise the singular values, drop those below
    the threshold."""
    s = np.linalg.svd(weight.detach().double().numpy(), compute_uv=False)
    if s.max() - s.min() <= 1e-4 * s.max():
        return len(s)  # a flat spectrum (up to rounding) has no tail
    normalised = (s - s.min()) / (s.max() - s.min())
    return len(s) - int(np.sum(normalised < tau))


def reference_compressible(weight: torch.Tensor, rank: int, min_reduction: float) -> bool:
    out, inp = weight.shape
    return 1 - rank / min(out, inp) > min_reduction and rank * (out + inp) < out * inp


def layer_ranks(model: nn.Module) -> dict[str, int]:
    return {name: m.rank for name, m in model.named_children() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("tau", [0.02, 0.1, 0.3])
@pytest.mark.parametrize("min_reduction", [0.0, 0.6])
def test_threshold_matches_the_paper_rule(tau, min_reduction):
    model = spectrum_model()
    originals = {name: m.weight.detach().clone() for name, m in model.named_children()}
    report = convert(model, "lowrank", allocation="welore", welore_threshold=tau,
                     welore_min_reduction=min_reduction, progress=False)  # fmt: skip
    expected_ranks = {n: reference_rank(w, tau) for n, w in originals.items()}
    expected = {n: reference_compressible(w, expected_ranks[n], min_reduction)
                for n, w in originals.items()}  # fmt: skip
    assert report.compressible == expected
    assert layer_ranks(model) == {n: r for n, r in expected_ranks.items() if expected[n]}
    skipped = {r.name for r in report.skipped}
    assert skipped == {n for n, low_rank in expected.items() if not low_rank}
    for name, module in model.named_children():
        if expected[name]:  # the truncated SVD at the chosen rank
            s = torch.linalg.svdvals(originals[name].double())
            dense = module.to_dense().detach().double()
            error = float(torch.linalg.matrix_norm(dense - originals[name]))
            assert error == pytest.approx(float(s[module.rank :].norm()), rel=1e-4, abs=1e-6)
        else:  # dense and untouched
            assert type(module) is nn.Linear and torch.equal(module.weight, originals[name])
    # The orthogonal layer's flat spectrum is never low-rank; the heavy-tailed one is.
    assert not report.compressible["2"] and report.compressible["0"]


def test_calibration_factors_but_does_not_choose_the_ranks():
    """The rule reads the weights' own spectra with or without data; calibration batches
    only whiten the factorisation, which then has the lower output error on them."""
    tau = 0.1
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 24, generator=g) * torch.logspace(0, -1.5, 24)
    plain, whitened = spectrum_model(), spectrum_model()
    originals = {name: m.weight.detach().clone() for name, m in plain.named_children()}
    convert(plain, "lowrank", allocation="welore", welore_threshold=tau, progress=False)
    report = convert(whitened, "lowrank", allocation="welore", welore_threshold=tau,
                     calibration=[x], progress=False)  # fmt: skip
    expected = {n: reference_rank(w, tau) for n, w in originals.items()}
    assert layer_ranks(whitened) == layer_ranks(plain)
    assert layer_ranks(whitened) == {n: r for n, r in expected.items() if report.compressible[n]}
    # the first layer sees x itself: the whitened factors fit x better than the plain ones
    first = originals["0"]
    assert isinstance(whitened[0], LowRankLinear)
    errors = {k: float(((m[0].to_dense().detach() - first) @ x.T).norm())
              for k, m in (("plain", plain), ("whitened", whitened))}  # fmt: skip
    assert errors["whitened"] < errors["plain"]


def brute_force_threshold(weights: dict[str, torch.Tensor], fraction: float) -> float:
    """The smallest threshold, among all normalised singular values, whose parameters
    (low-rank components factored, the others dense) fit the budget: a linear scan."""
    total = sum(w.numel() for w in weights.values())
    candidates = set()
    for w in weights.values():
        s = np.linalg.svd(w.double().numpy(), compute_uv=False)
        flat = s.max() - s.min() <= 1e-4 * s.max()
        candidates |= {1.0} if flat else set(((s - s.min()) / (s.max() - s.min())).tolist())
    for tau in sorted(candidates):
        kept = 0
        for w in weights.values():
            out, inp = w.shape
            rank = reference_rank(w, tau)
            kept += rank * (out + inp) if reference_compressible(w, rank, 0.0) else out * inp
        if kept <= fraction * total:
            return tau
    raise AssertionError("no threshold fits")


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_budget_is_respected_with_the_least_threshold(fraction):
    model = spectrum_model(1)
    weights = {name: m.weight.detach().clone() for name, m in model.named_children()}
    total = sum(w.numel() for w in weights.values())
    report = convert(model, "lowrank", allocation="welore", params=fraction, progress=False)
    kept = sum(m.A.numel() + m.B.numel() if isinstance(m, LowRankLinear) else m.weight.numel()
               for m in model.children())  # fmt: skip
    assert kept <= fraction * total
    tau = brute_force_threshold(weights, fraction)
    assert layer_ranks(model) == {n: reference_rank(w, tau) for n, w in weights.items()
                                  if report.compressible[n]}  # fmt: skip
    assert "welore" in report.allocation and report.to_dict()["compressible"] == report.compressible


def test_welore_ranks_direct():
    shapes = {"a": (8, 6), "b": (6, 6)}
    spectra = {"a": torch.tensor([10.0, 5.0, 1.0, 0.9, 0.5, 0.0]), "b": torch.ones(6)}
    found = welore_ranks(spectra, shapes, threshold=0.095)  # a: normalised 1, .5, .1, .09, ...
    assert found.ranks == {"a": 3, "b": 6}
    assert found.compressible == {"a": True, "b": False}
    assert found.params == 3 * 14 + 36
    with pytest.raises(ValueError, match="exactly one of threshold and fraction"):
        welore_ranks(spectra, shapes)
    with pytest.raises(ValueError, match="spectra"):
        welore_ranks({"a": torch.ones(5), "b": torch.ones(6)}, shapes, threshold=0.5)


def test_freeze_trains_only_the_low_rank_components():
    model = nn.Sequential(spectrum_model(), nn.LayerNorm(32))
    report = convert(model, "lowrank", allocation="welore", params=0.5, freeze=True,
                     progress=False)  # fmt: skip
    low_rank = {n for n, yes in report.compressible.items() if yes}
    assert low_rank and len(low_rank) < len(report.compressible)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in low_rank for p in ("A", "B", "bias")}
    loss = model(torch.randn(5, 24)).square().sum()
    loss.backward()  # gradients reach the factors only
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_bad_input_raises_before_any_change():
    model = spectrum_model()
    before = [type(m) for m in model.children()]
    cases = [
        ({"allocation": "welore", "welore_threshold": 1.5}, "welore_threshold"),
        ({"allocation": "welore", "welore_threshold": -0.1}, "welore_threshold"),
        ({"allocation": "welore", "welore_threshold": 0.1, "welore_min_reduction": 1.0},
         "welore_min_reduction"),
        ({"allocation": "welore", "params": 0.5, "welore_threshold": 0.1}, "exactly one"),
        ({"allocation": "welore"}, "exactly one"),
        ({"allocation": "welore", "rank": 4}, "not rank= or tol="),
        ({"allocation": "global", "params": 0.5, "welore_threshold": 0.1}, "allocation='welore'"),
        ({"allocation": "welore", "params": 0.2, "welore_min_reduction": 0.99}, "cannot be met"),
        ({"allocation": "best", "params": 0.5}, r"one of \('global', 'uniform', 'welore'\)"),
    ]  # fmt: skip
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            convert(model, "lowrank", progress=False, **options)
        assert [type(m) for m in model.children()] == before
    with pytest.raises(TypeError, match="welore_threshold"):
        convert(model, "lowrank", allocation="welore", welore_threshold="high", progress=False)
