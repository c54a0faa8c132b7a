"""The one dispatch policy: which implementation of an op runs, decided by measurement.

Ops with more than one implementation (``kron_matmul``, ``monarch_matmul``,
``sltrain_matmul``, the row sketches) offer a *native* kernel (``lowrank._C`` on
the CPU, ``lowrank._cuda`` on NVIDIA GPUs) and a *composite* path written with
torch ops, which run on the vendor GEMM libraries (MKL / oneDNN, cuBLAS and its
tensor cores). Neither wins everywhere, so nothing is assumed:

- ``auto`` (the default): the first call for a key -- (op, device name, dtype, the
  token count rounded up to a power of two, the op's fixed sizes, CPU threads) --
  times every candidate on the real inputs (CUDA events on the current stream, or
  the wall clock on the CPU), keeps the fastest, returns its result, and remembers
  the choice in memory and in a small JSON file (see *Cache*). Later calls with the
  same key cost one dictionary lookup. Timing is bounded: each candidate runs once,
  and again only while the candidates' total stays under ``TIME_BUDGET_S``.
  ``CONFIRM_AFTER`` calls later the key is measured once more, in the steady state,
  and that choice is final (and the one cached).
- No timing happens while a CUDA graph is being captured, while ``torch.compile``
  traces, or under ``torch.use_deterministic_algorithms(True)``; then the cached
  choice runs if there is one, else the static default: on the CPU the op's cost
  model, on CUDA the composite path (no GPU result committed under
  ``bench/results/`` shows a native kernel faster yet).
- Under ``torch.use_deterministic_algorithms(True)`` a candidate that is not
  deterministic on the device (float atomics) is never chosen; if no deterministic
  candidate remains, the op raises as torch's own non-deterministic ops do.
- Overrides: ``LOWRANK_DISPATCH=auto|native|composite`` in the environment, or the
  context manager :func:`force` (it wins over the environment). Forcing a kind
  restricts the candidates to it; where an op has several of that kind (the two
  SLTrain paths) the same policy picks among them.

Cache: ``$LOWRANK_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lowrank`` or
``~/.cache/lowrank``) holds one JSON file per (lowrank version, torch version,
device name); set ``LOWRANK_CACHE_DIR=""`` to keep choices in memory only. A file
that cannot be read or written is ignored after one warning, never an error.

:func:`report` lists every choice made in this process, with the times measured.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import platform
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

AUTO, NATIVE, COMPOSITE = "auto", "native", "composite"
PROVISIONAL = "provisional"  # a decision measured once, to be confirmed
MODES = (AUTO, NATIVE, COMPOSITE)
# Measuring a key runs every candidate once; a second round when the first took at most
# TIME_BUDGET_S (first runs pay one-time costs: page faults of fresh buffers, library set-up,
# caches such as a sparse structure), and more (up to MAX_REPETITIONS) while another round
# fits in the budget. The fastest run of each candidate counts.
TIME_BUDGET_S = 0.015
MAX_REPETITIONS = 5
# A key measured once (in this process, or read from a cache that has only that) is
# measured again CONFIRM_AFTER calls later, and that measurement decides for good: the
# first call of a key meets the machine in a state that later calls do not (caches holding
# freshly created weights, thread pools, the allocator), and close calls could go either
# way there.
CONFIRM_AFTER = 32

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lowrank_dispatch", default=None
)


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    ``run(*args)`` computes the op. ``kind`` is ``"native"`` or ``"composite"``.
    ``unavailable(*args)``, when given, returns why the implementation cannot run on
    these arguments (module not built, dtype, shared memory) or None; the reason is
    warned about once. ``applies(*args)``, when given, says whether the implementation is
    meant for these arguments at all (a CUDA-only kernel on a CPU tensor): when it is
    not, it is left out silently.
    ``nondeterministic_on`` names the device types where results may vary run to run.
    """

    name: str
    kind: str
    run: Callable[..., Any]
    unavailable: Callable[..., str | None] | None = None
    nondeterministic_on: frozenset[str] = frozenset()
    applies: Callable[..., bool] | None = None


# Read once, when lowrank is imported (the hot path reads no environment); force() changes
# the mode at run time.
_ENV_MODE = os.environ.get("LOWRANK_DISPATCH") or AUTO


def mode() -> str:
    """The override in force: :func:`force`'s, else ``$LOWRANK_DISPATCH`` (as it was when
    lowrank was imported), else ``"auto"``."""
    forced = _forced.get()
    if forced is not None:
        return forced
    if _ENV_MODE not in MODES:
        raise ValueError(f"LOWRANK_DISPATCH must be one of {MODES}, got {_ENV_MODE!r}")
    return _ENV_MODE


@contextlib.contextmanager
def force(kind: str) -> Iterator[None]:
    """Within the block, ops run only implementations of ``kind`` (``"native"`` or
    ``"composite"``; ``"auto"`` restores measured choice). For tests and benchmarks."""
    if kind not in MODES:
        raise ValueError(f"kind must be one of {MODES}, got {kind!r}")
    token = _forced.set(kind)
    try:
        yield
    finally:
        _forced.reset(token)


def default_kind(sample: torch.Tensor, *args) -> str:
    """The static default without a cost model: native on the CPU, composite elsewhere."""
    return NATIVE if sample.is_cpu else COMPOSITE


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0): the token dimension of a key."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


# ---- the table of choices ----------------------------------------------------------------------


@dataclass
class Choice:
    name: str
    source: str  # "measured", "confirmed" (measured twice), "cache", "static"
    ms: dict[str, float] | None = None


_lock = threading.RLock()
_measuring = threading.Lock()  # one measurement at a time: concurrent ones would disturb it
_table: dict[tuple, Choice] = {}
_dispatchers: list[Dispatcher] = []
_disk: dict[str, _DiskCache] = {}
_device_names: dict[tuple[str, int | None], str] = {}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def device_name(device: torch.device) -> str:
    """A stable name of the device: the GPU's product name, or the CPU's model."""
    key = (device.type, device.index)
    name = _device_names.get(key)
    if name is None:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        elif device.type == "cpu":
            name = _cpu_model()
        else:
            name = device.type
        _device_names[key] = name
    return name


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return "cpu " + line.split(":", 1)[1].strip()
    return "cpu " + (platform.processor() or platform.machine())


def report() -> list[dict[str, Any]]:
    """Every choice made in this process: op, device, key, chosen implementation, where the
    choice came from (measured, cache, static) and the milliseconds measured per candidate."""
    with _lock:
        rows = []
        for (op, device, *key), choice in _table.items():
            key = [k if isinstance(k, (int, float, str, bool)) else _text(k) for k in key]
            rows.append({"op": op, "device": device, "key": tuple(key), "choice": choice.name,
                         "source": choice.source, "ms": dict(choice.ms or {})})  # fmt: skip
        return rows


def provisional() -> set[tuple]:
    """The keys whose choice has been measured once and awaits its confirming measurement
    (``CONFIRM_AFTER`` calls later), as ``(op, key)`` pairs; empty once all are settled."""
    with _lock:
        return {(d.op, key) for d in _dispatchers for key in list(d.provisional)}


def format_report(rows: list[dict[str, Any]] | None = None) -> str:
    """:func:`report` as a readable table."""
    rows = report() if rows is None else rows
    lines = [f"{'op':24s} {'choice':20s} {'source':9s} key / ms per candidate"]
    for row in rows:
        times = ", ".join(f"{k} {v:.3g}" for k, v in row["ms"].items())
        key = "x".join(str(k) for k in row["key"])
        lines.append(f"{row['op']:24s} {row['choice']:20s} {row['source']:9s} {key}  {times}")
    return "\n".join(lines)


def clear(memory: bool = True, disk: bool = False) -> None:
    """Forgets the choices made (and, with ``disk``, the cache files of the devices seen)."""
    with _lock:
        if disk:
            for cache in _disk.values():
                cache.remove()
        if memory:
            _table.clear()
            _disk.clear()
            for dispatcher in _dispatchers:
                dispatcher.decided.clear()
                dispatcher.provisional.clear()


# ---- the disk cache ------------------------------------------------------------------------------


def cache_dir() -> Path | None:
    """Folder of the dispatch cache, or None when disabled (``LOWRANK_CACHE_DIR=""``)."""
    value = os.environ.get("LOWRANK_CACHE_DIR")
    if value is not None:
        return Path(value).expanduser() if value else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowrank"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:80]


class _DiskCache:
    """The JSON file of one device: ``{"choices": {key: {"choice", "ms"}}}`` plus versions."""

    def __init__(self, device: str):
        from lowrank import __version__

        folder = cache_dir()
        self.header = {"lowrank": __version__, "torch": torch.__version__, "device": device}
        self.path = None
        if folder is not None:
            name = f"dispatch-lowrank{__version__}-torch{torch.__version__}-{_slug(device)}.json"
            self.path = folder / name
        self.choices: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            choices = data["choices"]
            if not isinstance(choices, dict) or any(
                not isinstance(v, dict) or not isinstance(v.get("choice"), str)
                for v in choices.values()
            ):
                raise ValueError("malformed choices")
            self.choices = choices
        except (OSError, ValueError, KeyError, TypeError) as error:
            _warn_once(f"lowrank.dispatch: ignoring the unreadable cache {self.path} ({error})")

    def get(self, key: str) -> dict[str, Any] | None:
        return self.choices.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.choices[key] = entry
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({**self.header, "choices": self.choices}, indent=1, sort_keys=True)
            handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".dispatch-")
            with os.fdopen(handle, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except OSError as error:
            _warn_once(f"lowrank.dispatch: cannot write the cache {self.path} ({error}); "
                       "choices are kept in memory only")  # fmt: skip
            self.path = None

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


def _disk_cache(device: str) -> _DiskCache:
    cache = _disk.get(device)
    if cache is None:
        cache = _disk[device] = _DiskCache(device)
    return cache


# ---- when timing is allowed ----------------------------------------------------------------------


def may_time(sample: torch.Tensor) -> bool:
    """True when measuring candidates on these inputs is safe and meaningful."""
    if sample.device.type not in ("cpu", "cuda"):
        return False
    if torch.are_deterministic_algorithms_enabled() or torch.compiler.is_compiling():
        return False
    return not (sample.is_cuda and torch.cuda.is_current_stream_capturing())


def _elapsed_ms(impl: Impl, sample: torch.Tensor, args: tuple) -> tuple[float, Any]:
    if sample.is_cuda:
        stream = torch.cuda.current_stream(sample.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        out = impl.run(*args)
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end), out
    start_s = time.perf_counter()
    out = impl.run(*args)
    return (time.perf_counter() - start_s) * 1e3, out


# ---- the policy ----------------------------------------------------------------------------------


class Dispatcher:
    """Runs one of ``impls`` for each call of the op ``op`` (see the module docstring).

    ``static(sample, *args)`` returns the name of the implementation to run when none
    was measured or cached (the CPU cost model; composite on CUDA). ``token_args`` are the
    positions of the arguments whose leading dimensions are tokens: before a key is
    measured, each candidate runs once on their first token, which settles one-time costs
    (library set-up, structures cached on an index tensor) for next to nothing.
    """

    def __init__(self, op: str, impls: Sequence[Impl], static: Callable[..., str],
                 token_args: tuple[int, ...] = ()):  # fmt: skip
        self.op = op
        self.token_args = token_args
        self.impls = tuple(impls)
        self.by_name = {impl.name: impl for impl in self.impls}
        self.static = static
        # Settled decisions by (key, device, threads, mode, deterministic, names): the hot path.
        self.decided: dict[tuple, Impl] = {}
        # measured once: [choice, calls until the confirming measurement]
        self.provisional: dict[tuple, list] = {}
        _dispatchers.append(self)

    def candidates(self, sample: torch.Tensor, args: tuple, names=None, kind=None) -> list[Impl]:
        """The implementations allowed for these arguments under the current mode."""
        kind = mode() if kind is None else kind
        deterministic = torch.are_deterministic_algorithms_enabled()
        out, rejected = [], []
        for impl in self.impls:
            if names is not None and impl.name not in names:
                continue
            if kind != AUTO and impl.kind != kind:
                continue
            if impl.applies is not None and not impl.applies(*args):
                continue
            if deterministic and sample.device.type in impl.nondeterministic_on:
                rejected.append(impl.name)
                continue
            why = impl.unavailable(*args) if impl.unavailable is not None else None
            if why is not None:
                _warn_once(f"lowrank.{self.op}: {why}; the {impl.name} implementation is "
                           "skipped")  # fmt: skip
                continue
            out.append(impl)
        if not out:
            if rejected:
                raise RuntimeError(
                    f"lowrank.{self.op}: the {'/'.join(rejected)} implementation on "
                    f"{sample.device.type} is not deterministic, and "
                    "torch.use_deterministic_algorithms(True) is set"
                    + ("" if kind == AUTO else f" (with the {kind} implementations forced)")
                )
            raise RuntimeError(f"lowrank.{self.op}: no {kind} implementation can run here")
        return out

    def choose(self, key: tuple, sample: torch.Tensor, *args, names=None) -> Impl:
        """The implementation that would run (measuring now if needed, discarding outputs)."""
        return self._decide(key, sample, args, names, keep_output=False)[0]

    def __call__(self, key: tuple, sample: torch.Tensor, *args, names=None) -> Any:
        """Runs the op: ``key`` holds the op's sizes (see :func:`bucket`), ``sample`` is an
        input tensor that gives the device, ``args`` go to the implementation."""
        impl, out = self._decide(key, sample, args, names, keep_output=True)
        return impl.run(*args) if out is _NOT_RUN else out

    def _decide(self, key, sample, args, names, keep_output):
        kind = mode()
        deterministic = torch.are_deterministic_algorithms_enabled()
        device = sample.device
        threads = torch.get_num_threads() if device.type == "cpu" else 0
        settled = (key, device, threads, kind, deterministic, names)
        impl = self.decided.get(settled)
        if impl is not None:
            return impl, _NOT_RUN
        pending = self.provisional.get(settled)
        if pending is not None:
            pending[1] -= 1
            if pending[1] > 0 or not may_time(sample):
                return pending[0], _NOT_RUN
            impl, out = self._confirm(key, sample, args, names, keep_output, kind, pending)
            if impl is None:  # another measurement is running: try again next call
                return pending[0], _NOT_RUN
            self.provisional.pop(settled, None)  # another thread may have confirmed it too
            self.decided[settled] = impl
            return impl, out
        impl, out, final = self._decide_slowly(key, sample, args, names, keep_output, kind)
        if final == PROVISIONAL:
            self.provisional[settled] = [impl, CONFIRM_AFTER]
        elif final or deterministic:  # deterministic mode never measures: static is final
            self.decided[settled] = impl
        return impl, out

    def _full_key(self, key, sample, options, names, kind) -> tuple[tuple, bool]:
        """The key of the shared choice table, and whether the candidates are a restricted
        (forced) set, which gets its own entry and is never written to disk."""
        full = (self.op, device_name(sample.device), *key)
        if sample.is_cpu:
            full = (*full, torch.get_num_threads())
        forced = kind != AUTO or names is not None
        if forced:
            full = (*full, kind, tuple(sorted(i.name for i in options)))
        return full, forced

    def _confirm(self, key, sample, args, names, keep_output, kind, pending):
        """The second measurement of a key: ``(impl, output or _NOT_RUN)``, or
        ``(None, _NOT_RUN)`` when another measurement is running."""
        if not _measuring.acquire(blocking=False):
            pending[1] = 1
            return None, _NOT_RUN
        try:
            options = self.candidates(sample, args, names, kind)
            if len(options) == 1:
                return options[0], _NOT_RUN
            full, forced = self._full_key(key, sample, options, names, kind)
            return self._measure(full, options, sample, args, keep_output, not forced,
                                 confirmed=True)  # fmt: skip
        finally:
            _measuring.release()

    def _decide_slowly(self, key, sample, args, names, keep_output, kind):
        """``(impl, output or _NOT_RUN, final)``; final decisions are remembered."""
        options = self.candidates(sample, args, names, kind)
        if len(options) == 1:
            return options[0], _NOT_RUN, True
        full, forced = self._full_key(key, sample, options, names, kind)
        choice = _table.get(full)
        allowed = {impl.name for impl in options}
        if choice is not None and choice.name in allowed and choice.source != "static":
            # measured only once so far (from another settled entry): confirmed here too
            final = PROVISIONAL if choice.source == "measured" else True
            return self.by_name[choice.name], _NOT_RUN, final
        cached = None if forced else self._from_disk(full, allowed)
        if cached is not None:
            return cached[0], _NOT_RUN, True if cached[1] else PROVISIONAL
        name = self.static(sample, *args)
        impl = self.by_name[name] if name in allowed else options[0]
        if may_time(sample) and _measuring.acquire(blocking=False):
            try:
                done = _table.get(full)  # another thread may have measured meanwhile
                if done is not None and done.name in allowed and done.source != "static":
                    return self.by_name[done.name], _NOT_RUN, True
                # The static choice runs last: a first run pays one-time costs (page faults
                # of fresh buffers, library set-up), so a close call stays with the default.
                options = [i for i in options if i is not impl] + [impl]
                return (*self._measure(full, options, sample, args, keep_output, not forced),
                        PROVISIONAL)  # fmt: skip
            finally:
                _measuring.release()
        if choice is None:
            with _lock:
                _table.setdefault(full, Choice(impl.name, "static"))
        return impl, _NOT_RUN, False

    def _from_disk(self, full: tuple, allowed: set[str]) -> tuple[Impl, bool] | None:
        with _lock:
            entry = _disk_cache(full[1]).get(_key_text(full))
            if entry is None or entry["choice"] not in allowed:
                return None
            _table[full] = Choice(entry["choice"], "cache", entry.get("ms"))
            return self.by_name[entry["choice"]], bool(entry.get("confirmed", False))

    def _warm_up(self, options, args) -> None:
        if not self.token_args:
            return
        small = list(args)
        for i in self.token_args:
            t = args[i]
            if t is not None:
                if t.dim() == 0 or t.numel() == 0:
                    return
                small[i] = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])[:1]
        for impl in options:
            impl.run(*small)

    def _measure(self, full, options, sample, args, keep_output, persist, confirmed=False):
        self._warm_up(options, args)
        times: dict[str, list[float]] = {impl.name: [] for impl in options}
        best_name, best_ms, best_out = None, float("inf"), _NOT_RUN
        spent = 0.0
        budget = TIME_BUDGET_S * 1e3
        for repetition in range(MAX_REPETITIONS):
            if repetition == 1 and spent > budget:
                break  # one round of large calls is enough
            if repetition > 1 and spent * (repetition + 1) / repetition > budget:
                break  # another round would not fit
            for impl in options:
                ms, out = _elapsed_ms(impl, sample, args)
                spent += ms
                times[impl.name].append(ms)
                if ms < best_ms:
                    best_name, best_ms = impl.name, ms
                    best_out = out if keep_output else _NOT_RUN
                del out
        fastest = min(times, key=lambda name: min(times[name]))
        ms = {name: round(min(values), 5) for name, values in times.items()}
        with _lock:
            _table[full] = Choice(fastest, "confirmed" if confirmed else "measured", ms)
            if persist:
                entry = {"choice": fastest, "ms": ms, "confirmed": confirmed}
                _disk_cache(full[1]).put(_key_text(full), entry)
        return self.by_name[fastest], (best_out if best_name == fastest else _NOT_RUN)


def _text(value: Any) -> str:
    return str(value).replace("torch.", "")


def _key_text(full: tuple) -> str:
    op, _device, *rest = full
    return "|".join([op, *(_text(v) for v in rest)])


class _NotRun:
    def __repr__(self) -> str:
        return "<not run>"


_NOT_RUN = _NotRun()
