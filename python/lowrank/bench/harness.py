"""The one timing harness every benchmark suite uses.

- CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (median over blocks), with
  ``torch.get_num_threads()`` threads.
- CUDA: CUDA events around each call after warm-up, median of many calls, with
  several input sets rotated so repeated calls do not run from a warm L2.
- ``Result`` is one measured (suite, case, implementation) row; ``bench/run.py``
  gathers them into the table, the JSON and the plot.
- Warm-up: a few calls of each function, then more of those whose first call left a
  provisional dispatch choice, until it is confirmed (``dispatch.CONFIRM_AFTER``): the rows
  time the settled choice, as a long run would.
- ``LOWRANK_VARIANTS``: lowrank's rows come three times, as ``lowrank`` (the measured
  dispatch, ``auto``) and forced to its native kernels or its composite torch path, so
  every table shows what the dispatch chose and what it chose between.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from lowrank import dispatch


@dataclass
class Result:
    suite: str
    case: str
    impl: str
    ms: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Row name -> the dispatch override it runs under (None: auto, what users get).
LOWRANK_VARIANTS = {"lowrank": None, "lowrank native": "native", "lowrank composite": "composite"}


def under(kind: str | None, fn: Callable) -> Callable:
    """``fn`` run with lowrank.dispatch forced to ``kind`` (None: the measured choice)."""
    if kind is None:
        return fn

    def run(*args, **kwargs):
        with dispatch.force(kind):
            return fn(*args, **kwargs)

    return run


def dispatch_mark() -> int:
    """A mark in lowrank.dispatch's report: :func:`auto_choices` lists what came after it."""
    return len(dispatch.report())


def auto_choices(mark: int) -> str:
    """What the measured dispatch chose since ``mark``: ``op=choice`` per key."""
    rows = dispatch.report()[mark:]
    if not rows:
        return "(keys measured earlier in the run)"
    return " ".join(f"{row['op']}={row['choice']}" for row in rows)


def _warm_up(names, call: Callable[[str], Any], warmup: int) -> None:
    """``warmup`` calls of each ``call(name)``; then more of each whose first call left a
    provisional dispatch choice, until the choice is confirmed."""
    mine = {}
    for name in names:
        before = dispatch.provisional()
        call(name)
        mine[name] = dispatch.provisional() - before
    for _ in range(warmup - 1):
        for name in names:
            call(name)
    for name in names:
        for _ in range(dispatch.CONFIRM_AFTER + 1):
            if not mine[name] & dispatch.provisional():
                break
            call(name)


def time_ms(
    fn: Callable[[int], Any],
    device: torch.device | str,
    *,
    rotate: int = 1,
    min_run_time: float = 0.5,
    warmup: int = 3,
    cuda_reps: int = 50,
) -> float:
    """Median milliseconds of ``fn(i)``; ``i`` cycles over ``range(rotate)`` input sets."""
    device = torch.device(device)
    counter = iter(range(1 << 62))

    def call() -> Any:
        return fn(next(counter) % rotate)

    _warm_up([None], lambda _: call(), warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(cuda_reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    from torch.utils import benchmark

    # Timer defaults to one thread; measure with the threads torch (and lowrank) use.
    timer = benchmark.Timer(stmt="call()", globals={"call": call},
                            num_threads=torch.get_num_threads())  # fmt: skip
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def time_ms_many(
    fns: dict[str, Callable[[int], Any]],
    device: torch.device | str,
    *,
    rotate: int = 1,
    min_run_time: float = 0.5,
    warmup: int = 3,
    cuda_reps: int = 50,
    min_rounds: int = 5,
) -> dict[str, float]:
    """Median milliseconds of each ``fn(i)``, measured in interleaved rounds (one call of
    each per round, in a fresh random order each round), so drift of a shared machine and
    the state a heavy neighbour leaves behind (caches, freed memory) hit every
    implementation alike and the ratios of one case are comparable. CUDA: events around each
    call; CPU: the wall clock per call, rounds until each function has run ``min_run_time``
    seconds (at least ``min_rounds`` times)."""
    device = torch.device(device)
    names = list(fns)
    counters = {name: iter(range(1 << 62)) for name in names}

    def call(name: str) -> Any:
        return fns[name](next(counters[name]) % rotate)

    _warm_up(names, call, warmup)
    times: dict[str, list[float]] = {name: [] for name in names}
    shuffler = random.Random(0)

    def order(round_index: int) -> list[str]:
        return shuffler.sample(names, len(names))

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for round_index in range(cuda_reps):
            for name in order(round_index):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                call(name)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
        return {name: statistics.median(values) for name, values in times.items()}
    spent = dict.fromkeys(names, 0.0)
    round_index = 0
    while min(spent.values()) < min_run_time or min(len(v) for v in times.values()) < min_rounds:
        round_index += 1
        for name in order(round_index):
            start = time.perf_counter()
            call(name)
            elapsed = time.perf_counter() - start
            spent[name] += elapsed
            times[name].append(elapsed * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


# CPU peaks need the pinned mmap threshold below, which also changes how every later
# allocation is served; bench/run.py --cpu-peak turns it on for a whole run, so all
# implementations are timed under the same policy.
CPU_PEAKS = False


def mmap_large_allocations() -> None:
    """Pins glibc's mmap threshold at 64 KiB: large blocks are then mapped on allocation and
    unmapped on free (the default threshold grows after the first free and would keep
    freed tensors resident, hiding later peaks from the high-water mark)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int | None:
    """Peak resident memory above the current one while ``fn()`` runs (Linux).

    Resets the kernel's high-water mark (``/proc/self/clear_refs``), runs ``fn``, and
    reads ``VmHWM``. Tensors of any size are mmapped by the allocator and returned on
    free, so the mark follows the tensors' peak to within a page or so.
    """
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = _proc_status_bytes("VmRSS")
        fn()
        return max(0, _proc_status_bytes("VmHWM") - before)
    except OSError:
        return None


def peak_bytes(fn: Callable[[], Any], device: torch.device | str) -> int | None:
    """Peak memory while ``fn()`` runs above what was live before: CUDA allocator
    statistics on the GPU, the resident-set high-water mark on the CPU (Linux)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu_peak_bytes(fn) if CPU_PEAKS else None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def saved_bytes(fn: Callable[[], Any], kept: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs its forward, counting each
    storage once and leaving out those of ``kept`` (inputs and weights, alive anyway)."""
    seen = {t.untyped_storage().data_ptr() for t in kept}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def measure_bandwidth_gbs(device: torch.device | str) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda i: dst.copy_(src), device, min_run_time=0.3)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def measure_matmul_gflops(device: torch.device | str, dtype: torch.dtype) -> float:
    """Rate of a large square matrix product through torch (the practical compute ceiling)."""
    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda i: a @ b, device, min_run_time=0.5, cuda_reps=10)
    return 2 * n**3 / (ms * 1e-3) / 1e9
