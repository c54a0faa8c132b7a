"""Randomized SVD beyond memory: a float32 memmap streamed under max_memory, and the
row-sharded distributed version over 2 gloo processes.

- out-of-core: the in-memory rsvd of the same matrix (loaded from the file) against the
  streamed one with ``max_memory`` 1/16 of the matrix; the file is in the page cache
  (written just before). Both return the same factors to rounding ("max_diff").
- distributed: 2 processes, each holding half the rows, against one process with
  all of them; bytes all-reduced per call against the ``O(n l)`` bound.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowrank.bench.harness import Result, time_ms
from lowrank.linalg import rsvd


def write_matrix(path: str, m: int, n: int) -> np.memmap:
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(m, n))
    g = torch.Generator().manual_seed(0)
    k = 256
    left = torch.randn(m, k, generator=g) * torch.exp(-torch.arange(k) / 30.0)
    right = torch.randn(k, n, generator=g) / n**0.5
    for i in range(0, m, 4096):
        block = left[i : i + 4096] @ right
        block += 1e-3 * torch.randn(block.shape, generator=g)
        mm[i : i + 4096] = block.numpy()
    mm.flush()
    return np.memmap(path, dtype=np.float32, mode="r", shape=(m, n))


def out_of_core(device, quick):
    side = 8192 if quick else 32768  # 256 MiB or 4 GiB of float32
    budget = side * side * 4 // 16
    with tempfile.TemporaryDirectory() as folder:
        mm = write_matrix(os.path.join(folder, "a.bin"), side, side)
        in_memory = torch.from_numpy(np.array(mm))
        label = f"{side}x{side} f32 ({side * side * 4 >> 20} MiB) k=64"
        streamed_ms = time_ms(lambda i: rsvd(mm, 64, seed=0, max_memory=budget, progress=False),
                              "cpu", min_run_time=0.1, warmup=1)  # fmt: skip
        memory_ms = time_ms(lambda i: rsvd(in_memory, 64, seed=0), "cpu", min_run_time=0.1,
                            warmup=1)  # fmt: skip
        streamed = rsvd(mm, 64, seed=0, max_memory=budget, progress=False)
        reference = rsvd(in_memory, 64, seed=0)
        diff = max(float((x - y).abs().max()) for x, y in zip(streamed, reference))
    extra = {"max_memory_MiB": budget >> 20, "max_diff": diff}
    return [Result("out_of_core", label, "lowrank", streamed_ms, extra),
            Result("out_of_core", label, "in-memory rsvd", memory_ms, {})]  # fmt: skip


def _worker(rank, world, init_file, out, m, n):
    from lowrank import distributed as ldist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))  # fmt: skip
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(m // world, n, generator=g)
    ldist.rsvd(a, 64, seed=0)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(3):
        ldist.rsvd(a, 64, seed=0)
    elapsed = (time.perf_counter() - start) / 3
    if rank == 0:
        torch.save({"ms": elapsed * 1e3, "bytes": ldist.rsvd_module.COMMUNICATED["bytes"]}, out)
    dist.destroy_process_group()


def distributed(quick):
    m, n = (8192, 1024) if quick else (32768, 2048)
    results = []
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "out")
            mp.spawn(_worker, args=(world, os.path.join(folder, "init"), out, m, n),
                     nprocs=world, join=True)  # fmt: skip
            outcome = torch.load(out)
        l = 74
        bound = 4 * 3 * (n * l + 4 * l * l)  # float32, n_iter + 1 all-reduces of n x l + Grams
        impl = "lowrank" if world == 2 else "1 process"
        extra = {"bytes_per_call": outcome["bytes"], "bound_bytes": bound}
        label = f"{m}x{n} k=64 gloo, 1 thread per process"
        results.append(Result("distributed", label, impl, outcome["ms"], extra))
    return results


def run(device: torch.device, quick: bool) -> list[Result]:
    if device.type != "cpu":
        return []
    return out_of_core(device, quick) + distributed(quick)
