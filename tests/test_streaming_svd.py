"""Single-pass StreamingSVD against two-pass rsvd and against sketching the whole matrix."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error

from lowrank.linalg import StreamingSVD, rsvd


def low_rank_plus_noise(m, n, r, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, n, generator=g, dtype=torch.float64)  # fmt: skip
    return a + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


def error(a, u, s, vh):
    return float((a - (u * s) @ vh).norm())


def test_row_blocks_match_two_pass_within_estimate():
    a = low_rank_plus_noise(120, 80, 6, 1e-3)
    sketch = StreamingSVD(a.shape, 6, seed=1)
    for i in range(0, 120, 25):
        sketch.update(a[i : i + 25], rows=slice(i, min(i + 25, 120)))
    u, s, vh, estimate, _ = sketch.result()
    err = error(a, u, s, vh)
    two_pass = error(a, *rsvd(a, 6, seed=1))
    assert err <= 2.0 * two_pass
    assert 0.3 * err <= estimate <= 3.0 * err


def test_column_blocks_equal_row_blocks():
    a = low_rank_plus_noise(60, 90, 4, 1e-4)
    by_rows, by_cols = StreamingSVD(a.shape, 4, seed=2), StreamingSVD(a.shape, 4, seed=2)
    by_rows.update(a, rows=slice(0, 60))
    for j in range(0, 90, 40):
        by_cols.update(a[:, j : j + 40], cols=slice(j, min(j + 40, 90)))
    for x, y in zip(by_rows.result()[:3], by_cols.result()[:3]):
        assert relative_error(x, y) <= 1e-10


def test_linear_updates_equal_sketching_the_updated_matrix():
    a = low_rank_plus_noise(50, 40, 3, 1e-3, seed=3)
    f, g = torch.randn(50, 2, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64)
    h = torch.randn(50, 40, dtype=torch.float64)
    streamed = StreamingSVD(a.shape, 5, seed=4)
    streamed.update(a, rows=slice(0, 50))
    streamed.linear_update(0.5, 2.0, factors=(f, g))
    streamed.linear_update(1.5, -0.25, h)
    final = 1.5 * (0.5 * a + 2.0 * f @ g) - 0.25 * h
    direct = StreamingSVD(a.shape, 5, seed=4)
    direct.update(final, rows=slice(0, 50))
    for x, y in zip((streamed.y, streamed.w, streamed.z), (direct.y, direct.w, direct.z)):
        assert relative_error(x, y) <= 1e-12


def test_memory_is_linear_in_the_sides():
    sketch = StreamingSVD((100_000, 50_000), 8, seed=0, dtype=torch.float32)
    held = sum(t.numel() for t in (sketch.y, sketch.w, sketch.z, sketch.omega, sketch.psi,
                                   sketch.gamma))  # fmt: skip
    m, n, k, l = 100_000, 50_000, sketch.k, sketch.l
    assert (k, l) == (33, 67)  # the recommended sizes for rank 8
    assert held == (m + n) * (k + l + 10)  # O((m + n) k), against m n = 5e9


def test_bad_updates():
    sketch = StreamingSVD((10, 8), 2, seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        sketch.update(torch.ones(10, 8))
    with pytest.raises(ValueError, match="does not fill rows"):
        sketch.update(torch.ones(3, 8), rows=slice(0, 4))
    with pytest.raises(ValueError, match="h must have shape"):
        sketch.linear_update(1.0, 1.0, torch.ones(3, 3))
