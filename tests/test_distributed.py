"""Distributed rsvd and pca over gloo process groups on the CPU (spawned from the test)."""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

M, N, RANK = 150, 40, 6


def full_matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(M, N, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    return ((u * torch.exp(-torch.arange(N, dtype=torch.float64) / 6)) @ v.T) + 0.5


def bounds(world: int) -> list[tuple[int, int]]:
    """Uneven contiguous row blocks."""
    cuts = [0] + [M * (i + 1) // world + (7 if i < world - 1 else 0) for i in range(world)]
    cuts[-1] = M
    return list(zip(cuts[:-1], cuts[1:]))


def worker(rank: int, world: int, init_file: str, results: str) -> None:
    from lowrank import distributed as ldist
    from lowrank.linalg import pca, rsvd

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))  # fmt: skip
    try:
        a = full_matrix()
        lo, hi = bounds(world)[rank]
        u, s, vh = ldist.rsvd(a[lo:hi], RANK, seed=11)
        u0, s0, vh0 = rsvd(a, RANK, seed=11)
        errors = [float((s - s0).abs().max()), float((vh - vh0).abs().max()),
                  float((u - u0[lo:hi]).abs().max())]  # fmt: skip
        bytes_per_pass = ldist.rsvd_module.COMMUNICATED["bytes"]
        _, sp, vhp = ldist.pca(a[lo:hi], RANK, seed=11)
        _, sp0, vhp0 = pca(a, RANK, seed=11)
        errors += [float((sp - sp0).abs().max()), float((vhp - vhp0).abs().max())]
        torch.save({"errors": errors, "bytes": bytes_per_pass}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_equals_single_process(world):
    with tempfile.TemporaryDirectory() as folder:
        init_file, results = os.path.join(folder, "init"), os.path.join(folder, "out")
        mp.spawn(worker, args=(world, init_file, results), nprocs=world, join=True)
        outcomes = [torch.load(f"{results}.{r}") for r in range(world)]
    for outcome in outcomes:
        assert max(outcome["errors"]) <= 1e-10, outcome["errors"]
        # Communication does not grow with the rows: (n*l + a few l*l) numbers per pass.
        l = RANK + 10
        passes = 3
        assert outcome["bytes"] <= 8 * passes * (N * l + 4 * l * l) + 1024


def test_requires_an_initialised_group():
    from lowrank import distributed as ldist

    with pytest.raises(RuntimeError, match="not initialised"):
        ldist.rsvd(torch.randn(10, 4, dtype=torch.float64), 2)


def mismatch_worker(rank: int, world: int, init_file: str, results: str) -> None:
    from lowrank import distributed as ldist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))  # fmt: skip
    try:
        columns = 8 if rank == 0 else 9
        try:
            ldist.rsvd(torch.randn(20, columns, dtype=torch.float64), 2, seed=0)
            message = "no error"
        except ValueError as error:
            message = str(error)
        torch.save(message, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_mismatched_columns_raise_on_every_rank():
    with tempfile.TemporaryDirectory() as folder:
        init_file, results = os.path.join(folder, "init"), os.path.join(folder, "out")
        mp.spawn(mismatch_worker, args=(2, init_file, results), nprocs=2, join=True)
        messages = [torch.load(f"{results}.{r}") for r in range(2)]
    assert all("different column counts" in m for m in messages), messages


def dead_peer_worker(rank: int, world: int, init_file: str, results: str) -> None:
    from lowrank import distributed as ldist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=3))  # fmt: skip
    if rank == 1:
        os._exit(0)  # dies without taking part: rank 0's collectives must fail, not hang
    try:
        ldist.rsvd(torch.randn(20, 8, dtype=torch.float64), 2, seed=0)
        message = "no error"
    except Exception as error:  # a timeout or a closed connection, whichever comes first
        message = f"{type(error).__name__}: {error}"
    torch.save(message, f"{results}.{rank}")


def robust_worker(rank: int, world: int, init_file: str, results: str) -> None:
    """Every normaliser, half precision and degenerate matrices, against one process."""
    from lowrank import distributed as ldist
    from lowrank.linalg import rsvd

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))  # fmt: skip
    try:
        lo, hi = bounds(world)[rank]
        g = torch.Generator().manual_seed(1)
        cases = {
            "decaying": full_matrix(),
            "zero": torch.zeros(M, N, dtype=torch.float64),
            "rank1": torch.randn(M, 1, generator=g, dtype=torch.float64)
            @ torch.randn(1, N, generator=g, dtype=torch.float64),
        }
        errors = {}
        for name, a in cases.items():
            exact = torch.linalg.svdvals(a)[:RANK]
            for normalizer in ("auto", "cholqr2", "qr", "none"):
                u, s, vh = ldist.rsvd(a[lo:hi], RANK, seed=3, normalizer=normalizer)
                _, one_s, _ = rsvd(a, RANK, seed=3, normalizer=normalizer)
                finite = all(bool(torch.isfinite(t).all()) for t in (u, s, vh))
                errors[f"{name} {normalizer}"] = (
                    float((s - exact).abs().max()) if finite else float("inf"),
                    float((s - one_s).abs().max()),
                )
        a = full_matrix()
        u, s, vh = ldist.rsvd(a[lo:hi].bfloat16(), RANK, seed=3)
        errors["bfloat16"] = (float((s.double() - torch.linalg.svdvals(a)[:RANK]).abs().max()),
                              0.0 if s.dtype == torch.bfloat16 else float("inf"))  # fmt: skip
        try:
            ldist.rsvd(a[lo:hi], RANK, normalizer="lu")
            errors["lu"] = "no error"
        except ValueError as error:
            errors["lu"] = str(error)
        torch.save(errors, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_normalizer_half_precision_and_degenerate_input():
    with tempfile.TemporaryDirectory() as folder:
        init_file, results = os.path.join(folder, "init"), os.path.join(folder, "out")
        mp.spawn(robust_worker, args=(2, init_file, results), nprocs=2, join=True)
        outcomes = [torch.load(f"{results}.{r}") for r in range(2)]
    for outcome in outcomes:
        assert "pivoted LU across every rank" in outcome.pop("lu")
        for case, (to_exact, to_single) in outcome.items():
            # exact for zero and rank-1 input; decaying: the randomized method's own error
            tol = {"bfloat16": 2e-2}.get(case, 1e-6 if case.startswith("decaying") else 1e-8)
            assert to_exact <= tol, (case, to_exact)
            assert to_single <= 1e-8, (case, to_single)


def test_dead_peer_times_out():
    """Rank 0 must not hang: its collective fails (an error, or gloo aborting the process
    when the connection drops; either ends it) within the group's timeout."""
    with tempfile.TemporaryDirectory() as folder:
        init_file, results = os.path.join(folder, "init"), os.path.join(folder, "out")
        context = mp.spawn(dead_peer_worker, args=(2, init_file, results), nprocs=2, join=False)
        deadline = time.monotonic() + 60
        while not all(p.exitcode is not None for p in context.processes):
            assert time.monotonic() < deadline, "rank 0 hung on a dead peer"
            time.sleep(0.1)
        if os.path.exists(f"{results}.0"):
            assert torch.load(f"{results}.0") != "no error"
