"""Out-of-core randomized SVD: memmaps and arrays streamed in row panels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import relative_error

from lowrank.linalg import out_of_core as ooc
from lowrank.linalg import rsvd


def decaying(m, n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return ((u * torch.exp(-torch.arange(n, dtype=torch.float64) / 15)) @ v.T).to(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_iter", [0, 2])
def test_memmap_equals_in_memory(tmp_path, dtype, n_iter):
    a = decaying(700, 120).numpy().astype(dtype)
    path = tmp_path / "a.bin"
    mm = np.memmap(path, dtype=dtype, mode="w+", shape=a.shape)
    mm[:] = a
    mm.flush()
    readonly = np.memmap(path, dtype=dtype, mode="r", shape=a.shape)
    row_bytes = 120 * np.dtype(dtype).itemsize
    panels = ooc.RowPanels(readonly, "cpu", 64 * row_bytes, None, False)
    assert panels.rows == 64  # eleven panels
    u, s, vh = rsvd(readonly, 10, n_iter=n_iter, seed=5, max_memory=64 * row_bytes,
                    progress=False)  # fmt: skip
    u0, s0, vh0 = rsvd(torch.from_numpy(a), 10, n_iter=n_iter, seed=5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert relative_error(s, s0) <= tol
    assert relative_error(u, u0) <= 10 * tol and relative_error(vh, vh0) <= 10 * tol


def test_pass_count_is_n_iter_plus_one():
    a = decaying(300, 60).numpy()
    panels = ooc.RowPanels(a, "cpu", 10 * 60 * 8, None, False)
    ooc.streamed_range(panels, 12, 3, "cholqr2", "gaussian", 0)
    assert panels.passes == 4


def test_progress_bar_runs(capsys):
    a = decaying(100, 30).numpy()
    rsvd(a, 4, seed=0, max_memory=20 * 30 * 8, progress=True)
    assert "rsvd pass" in capsys.readouterr().err


def test_in_memory_arrays_are_tensors_and_streaming_is_explicit(tmp_path, capsys):
    a = np.random.default_rng(0).standard_normal((40, 12))
    u, s, vh = rsvd(a, 3, seed=1)  # no max_memory: the tensor path, tensors out
    expected = rsvd(torch.from_numpy(a), 3, seed=1)
    for got, want in zip((u, s, vh), expected):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    batched = rsvd(np.stack([a, 2 * a]), 3, seed=1)[1]  # batched, as a 3-D tensor would be
    assert torch.allclose(batched[1], 2 * batched[0])
    path = tmp_path / "a.npy"
    mm = np.memmap(path, dtype=np.float64, mode="w+", shape=a.shape)
    mm[:] = a
    streamed = rsvd(mm, 3, seed=1)  # a memmap streams; small: no progress bar by default
    assert torch.allclose(streamed[1], expected[1], rtol=1e-10)
    assert "rsvd pass" not in capsys.readouterr().err
    assert rsvd(a, np.int64(3), n_iter="auto", seed=1)[1].shape == (3,)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="smaller than one row panel"):
        rsvd(np.ones((10, 100)), 2, max_memory=100)
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        rsvd(np.ones((10, 10), dtype=np.int32), 2, max_memory=1 << 20)
    with pytest.raises(TypeError, match="floating"):  # in memory: as the tensor would
        rsvd(np.ones((10, 10), dtype=np.int32), 2)
    with pytest.raises(ValueError, match="2-D"):
        rsvd(np.ones((2, 10, 10)), 2, max_memory=1 << 20)
    bad = np.ones((20, 10))
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rsvd(bad, 2, max_memory=800, progress=False)
