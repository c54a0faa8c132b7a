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

Checked: in ``auto`` mode no native result is returned unchecked. Measuring a key
(both times) compares every candidate's output -- for backward keys, the gradients --
with the composite path's (the reference: torch's own ops) on the same inputs, within
:func:`tolerance`; a candidate that disagrees, raises, or returns non-finite values
where the reference's are finite is excluded for that key for good (in memory and in
the cache, with the reason; :func:`report` lists exclusions), a one-time warning names
the op, device and candidate, and the call returns a checked result. A native static
choice that was never measured (deterministic mode) is checked the same way before it
runs, and where no check can run (another thread is measuring) the composite path runs.
Forced modes run what was asked, unchecked.

CUDA: an error that corrupts the CUDA context (an illegal address, a kernel trap) cannot
be recovered in-process: every later CUDA call of the process fails, the composite path's
included. Native CUDA kernels therefore take part in ``auto`` measurements only on a GPU
model whose CUDA test suite has passed with this lowrank and torch version:
:func:`lowrank.verify_cuda` (or ``scripts/gpu-check``) runs it and records the pass in
the cache (:func:`record_cuda_pass`, looked up by :func:`cuda_verified`). Until then
``auto`` runs only the composite paths on CUDA; ``LOWRANK_DISPATCH=native`` or
``force("native")`` still run the native kernels when asked.

Cache: ``$LOWRANK_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lowrank`` or
``~/.cache/lowrank``) holds one JSON file per (lowrank version, torch version,
device name) with the choices and exclusions, and one per verified GPU model; set
``LOWRANK_CACHE_DIR=""`` to keep them in memory only. A file that cannot be read or
written is ignored after one warning, never an error.

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
import subprocess
import sys
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
    base: tuple | None = None  # the unrestricted key, whose exclusions apply (None: the same)


_lock = threading.RLock()
_measuring = threading.Lock()  # one measurement at a time: concurrent ones would disturb it
_table: dict[tuple, Choice] = {}
_dispatchers: list[Dispatcher] = []
_disk: dict[str, _DiskCache] = {}
_device_names: dict[tuple[str, int | None], str] = {}
_warned: set[str] = set()
# Candidates excluded for a key (the unrestricted key: op, device name, sizes, threads):
# {key: {implementation: reason}}, read from the cache on first use.
_excluded: dict[tuple, dict[str, str]] = {}
# GPU models whose CUDA test suite passed (read from the cache on first use).
_verified: dict[str, bool] = {}


def _warn_once(message: str, once: Any = None) -> None:
    """Warns with ``message`` unless a warning with the same ``once`` (default: the same
    message) was given already."""
    token = message if once is None else once
    if token not in _warned:
        _warned.add(token)
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
    choice came from (measured, confirmed, cache, static), the milliseconds measured per
    candidate and the candidates excluded for the key (``{name: reason}``)."""
    with _lock:
        rows = []
        for full, choice in _table.items():
            op, device, *key = full
            key = [k if isinstance(k, (int, float, str, bool)) else _text(k) for k in key]
            excluded = _excluded.get(full if choice.base is None else choice.base, {})
            rows.append({"op": op, "device": device, "key": tuple(key), "choice": choice.name,
                         "source": choice.source, "ms": dict(choice.ms or {}),
                         "excluded": dict(excluded)})  # fmt: skip
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
        for name, reason in row.get("excluded", {}).items():
            lines.append(f"{'':24s} excluded {name}: {reason}")
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
            _excluded.clear()
            _verified.clear()
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
    """The JSON file of one device: ``{"choices": {key: {"choice", "ms", "confirmed",
    "checked"}}, "excluded": {key: {implementation: reason}}}`` plus versions."""

    def __init__(self, device: str):
        from lowrank import __version__

        folder = cache_dir()
        self.header = {"lowrank": __version__, "torch": torch.__version__, "device": device}
        self.path = None
        if folder is not None:
            name = f"dispatch-lowrank{__version__}-torch{torch.__version__}-{_slug(device)}.json"
            self.path = folder / name
        self.choices: dict[str, dict[str, Any]] = {}
        self.excluded: dict[str, dict[str, str]] = {}
        self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            choices, excluded = data["choices"], data.get("excluded", {})
            if not isinstance(choices, dict) or any(
                not isinstance(v, dict) or not isinstance(v.get("choice"), str)
                for v in choices.values()
            ):
                raise ValueError("malformed choices")
            if not isinstance(excluded, dict) or any(
                not isinstance(v, dict) or not all(isinstance(r, str) for r in v.values())
                for v in excluded.values()
            ):
                raise ValueError("malformed exclusions")
            self.choices, self.excluded = choices, excluded
        except (OSError, ValueError, KeyError, TypeError) as error:
            _warn_once(f"lowrank.dispatch: ignoring the unreadable cache {self.path} ({error})")

    def get(self, key: str) -> dict[str, Any] | None:
        return self.choices.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.choices[key] = entry
        self._write()

    def exclude(self, key: str, name: str, reason: str) -> None:
        self.excluded.setdefault(key, {})[name] = reason
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        data = {**self.header, "choices": self.choices, "excluded": self.excluded}
        if _write_json(self.path, data, ".dispatch-") is not None:
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


def _write_json(path: Path, data: dict[str, Any], prefix: str) -> OSError | None:
    """Writes ``data`` to ``path`` atomically; on failure warns once and returns the error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, indent=1, sort_keys=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as error:
        _warn_once(f"lowrank.dispatch: cannot write the cache {path} ({error}); "
                   "it is kept in memory only")  # fmt: skip
        return error
    return None


# ---- GPU models whose CUDA kernels passed the test suite ------------------------------------


def _cuda_device(device: Any) -> torch.device:
    """``device`` (None: the current CUDA device) as a ``torch.device`` of type cuda."""
    if device is None:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is available (torch.cuda.is_available() is "
                               "False)")  # fmt: skip
        return torch.device("cuda", torch.cuda.current_device())
    if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
        raise TypeError(f"device must be a torch.device, a string or an index, got "
                        f"{type(device).__name__}")  # fmt: skip
    try:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"device must name a CUDA device, got {device!r} ({error})") from None
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _pass_path(model: str) -> Path | None:
    from lowrank import __version__

    folder = cache_dir()
    if folder is None:
        return None
    return folder / f"cuda-pass-lowrank{__version__}-torch{torch.__version__}-{_slug(model)}.json"


def _read_pass(model: str) -> bool:
    path = _pass_path(model)
    if path is None or not path.exists():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        _warn_once(f"lowrank.dispatch: ignoring the unreadable record {path} ({error})")
        return False
    return isinstance(data, dict) and data.get("device") == model and bool(data.get("passed"))


def cuda_verified(device: torch.device | str | int | None = None) -> bool:
    """True when the CUDA test suite has passed on this GPU model with this lowrank and torch
    version (recorded by :func:`record_cuda_pass`): only then do native CUDA kernels take part
    in ``auto`` measurements. ``device`` defaults to the current CUDA device."""
    model = device_name(_cuda_device(device))
    with _lock:
        known = _verified.get(model)
        if known is None:
            known = _verified[model] = _read_pass(model)
        return known


def record_cuda_pass(device: torch.device | str | int | None = None, evidence: str = "") -> None:
    """Records that the CUDA test suite passed on ``device``'s GPU model (default: the current
    CUDA device), in the cache (one file per model, lowrank and torch version): from now on,
    in this process and later ones, ``auto`` measures the native CUDA kernels on that model
    too, and checks them. :func:`lowrank.verify_cuda` and ``scripts/gpu-check`` call this
    after a passing run; calling it directly trusts the kernels without running the suite.
    ``evidence`` is stored with the record."""
    if not isinstance(evidence, str):
        raise TypeError(f"evidence must be a str, got {type(evidence).__name__}")
    from lowrank import __version__

    model = device_name(_cuda_device(device))
    path = _pass_path(model)
    if path is not None:
        record = {"lowrank": __version__, "torch": torch.__version__, "device": model,
                  "passed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "evidence": evidence}  # fmt: skip
        _write_json(path, record, ".cuda-pass-")
    with _lock:
        _verified[model] = True
        # Decisions made while the model was unverified (composite only) are made again.
        for dispatcher in _dispatchers:
            for table in (dispatcher.decided, dispatcher.provisional):
                for settled in [s for s in table if s[1].type == "cuda"]:
                    if device_name(settled[1]) == model:
                        table.pop(settled, None)
        for full in [f for f in _table if f[1] == model]:
            del _table[full]


def _tests_folder() -> Path | None:
    """The test suite next to the package in a source checkout, or None."""
    folder = Path(__file__).resolve().parents[2] / "tests"
    return folder if (folder / "test_dispatch.py").is_file() else None


def verify_cuda(tests: str | os.PathLike | None = None, *pytest_args: str) -> None:
    """Runs lowrank's CUDA test suite (``pytest -m cuda``) in a subprocess on this machine's
    GPU and, when it passes, records the pass for the GPU model (:func:`record_cuda_pass`):
    native CUDA kernels then take part in ``auto`` dispatch on that model.

    The suite runs on CUDA device 0 as this process sees it (``CUDA_VISIBLE_DEVICES``
    selects the GPU). ``tests`` is the suite's folder (default: ``tests/`` of the source
    checkout lowrank is installed from); ``pytest_args`` are passed on. Raises RuntimeError
    without a GPU or CUDA build, or when the suite fails (nothing is recorded then).
    """
    from lowrank import _native

    if not torch.cuda.is_available():
        raise RuntimeError("lowrank.verify_cuda needs a CUDA GPU, and torch sees none "
                           "(torch.cuda.is_available() is False)")  # fmt: skip
    if _native._cuda is None:
        raise RuntimeError(f"lowrank.verify_cuda: lowrank was built without its CUDA kernels "
                           f"({_native._CUDA_ERROR}); there is nothing to verify")  # fmt: skip
    if tests is None:
        folder = _tests_folder()
        if folder is None:
            raise ValueError("tests must be given: no test suite was found next to the "
                             "installed package (pass the folder of lowrank's tests)")  # fmt: skip
    else:
        if not isinstance(tests, (str, os.PathLike)):
            raise TypeError(f"tests must be a path, got {type(tests).__name__}")
        folder = Path(tests)
        if not folder.is_dir():
            raise ValueError(f"tests must be the folder of lowrank's test suite, got {folder}")
    if not all(isinstance(arg, str) for arg in pytest_args):
        raise TypeError("pytest_args must be strings")
    device = torch.device("cuda", 0)
    model = device_name(device)
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               str(folder), *pytest_args]  # fmt: skip
    code = subprocess.run(command, cwd=folder.parent).returncode
    if code != 0:
        raise RuntimeError(f"lowrank.verify_cuda: the CUDA test suite did not pass on {model} "
                           f"(pytest exit status {code}); native CUDA kernels stay out of "
                           "automatic dispatch on it")  # fmt: skip
    record_cuda_pass(device, f"lowrank.verify_cuda: {' '.join(command[1:])}")


# ---- when timing is allowed ----------------------------------------------------------------------


def may_check(sample: torch.Tensor) -> bool:
    """True when candidates may run on these inputs and be compared (not while tracing or
    capturing a CUDA graph: the comparison reads results on the host)."""
    if sample.device.type not in ("cpu", "cuda") or torch.compiler.is_compiling():
        return False
    return not (sample.is_cuda and torch.cuda.is_current_stream_capturing())


def may_time(sample: torch.Tensor) -> bool:
    """True when measuring candidates on these inputs is safe and meaningful."""
    return not torch.are_deterministic_algorithms_enabled() and may_check(sample)


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


# ---- checking candidates against the composite path -----------------------------------------


def tolerance(dtype: torch.dtype, size: int = 1) -> float:
    """How far a correct implementation's output may stray from the reference's, relative to
    ``|reference| + rms(reference)`` elementwise, for outputs of ``dtype`` computed from
    inputs of at most ``size`` elements.

    Two correct implementations differ by rounding: the output and the intermediates stored
    in ``dtype`` (each within eps/2), which ``sqrt(eps)`` covers many times over (32
    roundings in float16, 11 in bfloat16, thousands in float32); and the sums behind each
    element, accumulated in float32 (float64 for float64), whose error grows like
    ``eps_acc * sqrt(n)`` with their length ``n``, at most the size of the largest input.
    A kernel that is wrong -- an element not written, stale memory, a wrong index or
    stride -- errs by the output's own magnitude, far beyond either term.
    """
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    eps = torch.finfo(dtype).eps
    return math.sqrt(eps) + torch.finfo(accumulate).eps * math.sqrt(max(size, 1))


def _tensors(out: Any) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _disagreement(out: Any, expected: Any, size: int) -> str | None:
    """Why ``out`` is not ``expected`` (the reference's output) within :func:`tolerance`, or
    None when it agrees."""
    outs, refs = _tensors(out), _tensors(expected)
    if len(outs) != len(refs):
        return f"returned {len(outs)} outputs instead of {len(refs)}"
    for index, (o, r) in enumerate(zip(outs, refs)):
        which = "" if len(refs) == 1 else f" (output {index})"
        if not isinstance(r, torch.Tensor) or not isinstance(o, torch.Tensor):
            if isinstance(r, torch.Tensor) or isinstance(o, torch.Tensor):
                return f"returned {type(o).__name__} instead of {type(r).__name__}{which}"
            continue
        if o.shape != r.shape or o.dtype != r.dtype or o.device != r.device:
            return (f"returned {o.dtype} {tuple(o.shape)} on {o.device} instead of "
                    f"{r.dtype} {tuple(r.shape)} on {r.device}{which}")  # fmt: skip
        if r.numel() == 0:
            continue
        if not r.is_floating_point():
            if not torch.equal(o, r):
                return f"returned different values{which}"
            continue
        why = _float_disagreement(o, r, tolerance(r.dtype, size))
        if why is not None:
            return why + which
    return None


def _float_disagreement(o: torch.Tensor, r: torch.Tensor, tol: float) -> str | None:
    """Elementwise ``|o - r| <= tol * (|r| + rms(r))`` where ``r`` is finite, and ``o``
    finite there; one host synchronisation."""
    work = torch.float64 if r.dtype == torch.float64 else torch.float32
    o, r = o.detach().to(work), r.detach().to(work)
    finite = r.isfinite()
    missing = (finite & ~o.isfinite()).sum()
    magnitude = torch.where(finite, r, 0.0).abs_()
    peak = magnitude.amax()
    rms = peak * torch.linalg.vector_norm(magnitude / peak.clamp_min(torch.finfo(work).tiny))
    rms = rms / finite.sum().clamp_min(1).sqrt()
    error = torch.where(finite, o - r, 0.0).abs_()
    bound = magnitude.add_(rms).mul_(tol).add_(torch.finfo(work).tiny)
    worst = (error / bound).amax()
    missing, worst = torch.stack([missing.to(work), worst]).tolist()
    if missing:
        return (f"returned {int(missing)} non-finite values where the composite path's are "
                "finite")  # fmt: skip
    if not worst <= 1.0:
        return f"differs from the composite path by {worst:.3g} times the tolerance ({tol:.2g})"
    return None


def _untimed(impl: Impl, sample: torch.Tensor, args: tuple) -> tuple[float, Any]:
    return 0.0, impl.run(*args)


class _Check:
    """The checks of one measurement (or of one static choice) of a key: each candidate's
    output against the reference's (a composite path, trusted). Every output it discards
    is overwritten with NaN, so that a later kernel which writes nothing cannot pass on
    the values its freshly allocated output happens to hold.

    With ``reference=None`` (forced modes) nothing is checked, exceptions propagate and
    outputs are left alone. An implementation's outputs are fresh tensors (the op returns
    them to the user), except those that alias an argument (an ``out_args`` buffer): those
    are compared through copies, and written here only to restore the checked result.
    """

    def __init__(self, dispatcher: Dispatcher, base: tuple, reference: Impl | None,
                 sample: torch.Tensor, args: tuple):  # fmt: skip
        self.dispatcher, self.base, self.sample = dispatcher, base, sample
        self.reference = reference
        self.failed: dict[str, str] = {}
        self.expected: Any = None  # the reference's first output, once it ran
        floating = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        self.size = max((a.numel() for a in floating), default=1)

    def round(self, options, args, timer, remember=True) -> tuple[list[tuple], float]:
        """Runs each candidate not failed once: the runs that passed, as ``(impl, ms, output,
        output for comparison)``, and the milliseconds spent. The reference's output of the
        first remembered round is what later ones are compared with."""
        runs, spent = [], 0.0
        aliases = self._aliases(args) if self.reference is not None else set()
        for impl in options:
            if impl.name in self.failed:
                continue
            if self.reference is None:
                ms, out = timer(impl, self.sample, args)
                runs.append((impl, ms, out, out))
                spent += ms
                continue
            if impl is not self.reference:
                self._clear_outputs(args)
            try:
                ms, out = timer(impl, self.sample, args)
            except Exception as error:
                if impl is self.reference:
                    raise
                self._fail(impl, error)
                continue
            spent += ms
            runs.append((impl, ms, out, self._saved(out, aliases)))
        if self.reference is None:
            return runs, spent
        expected = self.expected
        if expected is None or not remember:
            expected = next(run[3] for run in runs if run[0] is self.reference)
            if remember:
                self.expected = expected
        passed = []
        for run in runs:
            why = None
            if run[0] is not self.reference:
                why = _disagreement(run[3], expected, self.size)
            if why is None:
                passed.append(run)
            else:
                self._fail(run[0], why)
                self.discard(run[3], expected)
        return passed, spent

    def warm_up(self, options: list[Impl], args: tuple) -> list[Impl]:
        """One untimed, checked round on ``args`` (a token's worth): the candidates left."""
        passed, _ = self.round(options, args, _untimed, remember=False)
        for run in passed:
            self.discard(run[3])
        return [impl for impl in options if impl.name not in self.failed]

    def discard(self, saved: Any, *keep: Any) -> None:
        """Overwrites a discarded output with NaN (not the tensors of ``keep``, nor those
        of the remembered reference output)."""
        if self.reference is None:
            return
        kept = {_storage(t) for k in (*keep, self.expected) for t in _tensors(k)
                if isinstance(t, torch.Tensor) and t.numel()}  # fmt: skip
        with torch.no_grad():
            for t in _tensors(saved):
                if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()
                        and _storage(t) not in kept):  # fmt: skip
                    t.fill_(math.nan)

    def release(self, *keep: Any) -> None:
        """Discards the reference's output (not the tensors of ``keep``)."""
        expected, self.expected = self.expected, None
        self.discard(expected, *keep)

    def restore(self, out: Any, saved: Any) -> Any:
        """``out`` holding the values checked in ``saved`` (a buffer argument may have been
        overwritten by the candidates that ran after)."""
        with torch.no_grad():
            for o, s in zip(_tensors(out), _tensors(saved)):
                if isinstance(o, torch.Tensor) and o.numel() and _storage(o) != _storage(s):
                    o.copy_(s)
        return out

    def _aliases(self, args: tuple) -> set[int]:
        return {_storage(a) for a in args if isinstance(a, torch.Tensor) and a.numel()}

    def _saved(self, out: Any, aliases: set[int]) -> Any:
        """``out`` detached, with copies of the tensors that alias an argument."""
        saved = []
        for t in _tensors(out):
            if isinstance(t, torch.Tensor):
                t = t.detach()
                if t.numel() and _storage(t) in aliases:
                    t = t.clone()
            saved.append(t)
        return saved

    def _clear_outputs(self, args: tuple) -> None:
        """NaN into the output buffers a candidate must overwrite."""
        with torch.no_grad():
            for i in self.dispatcher.out_args:
                t = args[i]
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.fill_(math.nan)

    def _fail(self, impl: Impl, error: BaseException | str) -> None:
        if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
            self.failed[impl.name] = "ran out of memory"  # left out of this measurement only
            return
        if not isinstance(error, str):
            message = str(error).strip().splitlines()
            error = f"raised {type(error).__name__}" + (f": {message[0]}" if message else "")
        self.failed[impl.name] = error
        self.dispatcher._exclude(self.base, impl, error)


# ---- the policy ----------------------------------------------------------------------------------


class Dispatcher:
    """Runs one of ``impls`` for each call of the op ``op`` (see the module docstring).

    ``static(sample, *args)`` returns the name of the implementation to run when none
    was measured or cached (the CPU cost model; composite on CUDA). ``token_args`` are the
    positions of the arguments whose leading dimensions are tokens: before a key is
    measured, each candidate runs once on their first token, which settles one-time costs
    (library set-up, structures cached on an index tensor) for next to nothing.
    ``out_args`` are the positions of output buffers every implementation overwrites: a
    measurement fills them with NaN before each checked run.
    """

    def __init__(self, op: str, impls: Sequence[Impl], static: Callable[..., str],
                 token_args: tuple[int, ...] = (), out_args: tuple[int, ...] = ()):  # fmt: skip
        self.op = op
        self.token_args = token_args
        self.out_args = out_args
        self.impls = tuple(impls)
        self.by_name = {impl.name: impl for impl in self.impls}
        self.static = static
        # Settled decisions by (key, device, threads, mode, deterministic, names): the hot path.
        self.decided: dict[tuple, Impl] = {}
        # measured once: [choice, calls until the confirming measurement]
        self.provisional: dict[tuple, list] = {}
        _dispatchers.append(self)

    def candidates(self, sample: torch.Tensor, args: tuple, names=None, kind=None,
                   excluded=()) -> list[Impl]:  # fmt: skip
        """The implementations allowed for these arguments under the current mode. In
        ``auto`` mode that leaves out the names in ``excluded`` and, on a GPU model whose
        CUDA test suite has not passed (:func:`cuda_verified`), the native kernels."""
        kind = mode() if kind is None else kind
        deterministic = torch.are_deterministic_algorithms_enabled()
        unverified = kind == AUTO and sample.is_cuda and not cuda_verified(sample.device)
        out, rejected = [], []
        for impl in self.impls:
            if names is not None and impl.name not in names:
                continue
            if kind != AUTO and impl.kind != kind:
                continue
            if kind == AUTO and (impl.name in excluded or (unverified and impl.kind == NATIVE)):
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
            self._settle(settled, impl)
            return impl, out
        impl, out, final = self._decide_slowly(key, sample, args, names, keep_output, kind)
        if final == PROVISIONAL:
            with _lock:  # a thread that decided late must not undo another's settling
                if settled not in self.decided:
                    self.provisional.setdefault(settled, [impl, CONFIRM_AFTER])
        elif final or deterministic:  # deterministic mode never measures: static is final
            self._settle(settled, impl)
        return impl, out

    def _settle(self, settled: tuple, impl: Impl) -> None:
        """``impl`` is final for ``settled``: a key is never both decided and provisional
        (threads confirm, or read a confirmed cache entry, concurrently)."""
        with _lock:
            self.provisional.pop(settled, None)
            self.decided[settled] = impl

    def _base_key(self, key, sample) -> tuple:
        """The key of the unrestricted candidates: what exclusions and the cache refer to."""
        base = (self.op, device_name(sample.device), *key)
        return (*base, torch.get_num_threads()) if sample.is_cpu else base

    def _full_key(self, base, sample, options, names, kind) -> tuple[tuple, bool]:
        """The key of the shared choice table, and whether the candidates are a restricted
        set (forced, or composite only on an unverified GPU), which gets its own entry and
        is never written to disk."""
        forced = kind != AUTO or names is not None
        forced = forced or (sample.is_cuda and not cuda_verified(sample.device))
        if forced:
            return (*base, kind, tuple(sorted(i.name for i in options))), True
        return base, False

    def _exclusions(self, base: tuple, kind: str) -> dict[str, str]:
        """The candidates excluded for ``base`` (read from the cache the first time)."""
        if kind != AUTO:
            return {}
        with _lock:
            known = _excluded.get(base)
            if known is None:
                known = _excluded[base] = dict(
                    _disk_cache(base[1]).excluded.get(_key_text(base), {})
                )
            return known

    def _exclude(self, base: tuple, impl: Impl, reason: str) -> None:
        """Excludes ``impl`` for ``base`` for good, in memory and in the cache, and warns once
        per op, device and implementation."""
        with _lock:
            _excluded.setdefault(base, {})[impl.name] = reason
            _disk_cache(base[1]).exclude(_key_text(base), impl.name, reason)
        _warn_once(f"lowrank.{self.op}: the {impl.name} implementation on {base[1]} {reason}; "
                   "it is excluded for these sizes (lowrank.dispatch.report() lists "
                   "exclusions) and a checked result is returned",
                   once=("excluded", self.op, base[1], impl.name))  # fmt: skip

    def _reference(self, options: list[Impl], kind: str) -> Impl | None:
        """The composite path native candidates are checked against (``auto`` mode only), or
        None when there is nothing to check."""
        if kind != AUTO or all(impl.kind == COMPOSITE for impl in options):
            return None
        return next((impl for impl in options if impl.kind == COMPOSITE), None)

    def _confirm(self, key, sample, args, names, keep_output, kind, pending):
        """The second measurement of a key: ``(impl, output or _NOT_RUN)``, or
        ``(None, _NOT_RUN)`` when another measurement is running."""
        if not _measuring.acquire(blocking=False):
            pending[1] = 1
            return None, _NOT_RUN
        try:
            base = self._base_key(key, sample)
            options = self.candidates(sample, args, names, kind, self._exclusions(base, kind))
            if len(options) == 1:
                return options[0], _NOT_RUN
            full, forced = self._full_key(base, sample, options, names, kind)
            return self._measure(full, base, options, sample, args, keep_output, not forced,
                                 confirmed=True)  # fmt: skip
        finally:
            _measuring.release()

    def _decide_slowly(self, key, sample, args, names, keep_output, kind):
        """``(impl, output or _NOT_RUN, final)``; final decisions are remembered."""
        base = self._base_key(key, sample)
        excluded = self._exclusions(base, kind)
        options = self.candidates(sample, args, names, kind, excluded)
        full, forced = self._full_key(base, sample, options, names, kind)
        if len(options) == 1:
            if excluded:  # the one candidate left: listed in report() with the exclusions
                with _lock:
                    _table.setdefault(full, Choice(options[0].name, "static", base=base))
            return options[0], _NOT_RUN, True
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
                return (*self._measure(full, base, options, sample, args, keep_output,
                                       not forced), PROVISIONAL)  # fmt: skip
            finally:
                _measuring.release()
        out = _NOT_RUN
        reference = self._reference(options, kind)
        if reference is not None and impl.kind != COMPOSITE:
            # A native choice nobody checked for this key: checked now (deterministic mode),
            # else the composite path runs.
            if may_check(sample) and _measuring.acquire(blocking=False):
                try:
                    impl, out = self._check_static(base, impl, reference, sample, args,
                                                   keep_output)  # fmt: skip
                finally:
                    _measuring.release()
            else:
                impl = reference
        if choice is None:
            with _lock:
                _table.setdefault(full, Choice(impl.name, "static", base=base))
        return impl, out, False

    def _check_static(self, base, impl, reference, sample, args, keep_output):
        """Runs ``impl`` and the reference once, untimed: ``(impl, its output)`` when they
        agree, else the reference's (and ``impl`` is excluded)."""
        check = _Check(self, base, reference, sample, args)
        passed, _ = check.round([impl, reference], args, _untimed)
        chosen = impl if impl.name not in check.failed else reference
        out = _NOT_RUN
        for run in passed:
            if run[0] is chosen and keep_output:
                out = check.restore(run[2], run[3])
            else:
                check.discard(run[3])
        check.release(None if out is _NOT_RUN else out)
        return chosen, out

    def _from_disk(self, full: tuple, allowed: set[str]) -> tuple[Impl, bool] | None:
        with _lock:
            entry = _disk_cache(full[1]).get(_key_text(full))
            # Entries measured before candidates were checked are measured again.
            if entry is None or not entry.get("checked") or entry["choice"] not in allowed:
                return None
            known = _table.get(full)
            if known is None or known.source == "static":  # keep what this process measured
                _table[full] = Choice(entry["choice"], "cache", entry.get("ms"))
            return self.by_name[entry["choice"]], bool(entry.get("confirmed", False))

    def _warm_up(self, check: _Check, options: list[Impl], args: tuple) -> list[Impl]:
        """Each candidate once on the first token (checked): the candidates left."""
        if not self.token_args:
            return options
        small = list(args)
        for i in self.token_args:
            t = args[i]
            if t is not None:
                if t.dim() == 0 or t.numel() == 0:
                    return options
                small[i] = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])[:1]
        return check.warm_up(options, tuple(small))

    def _measure(self, full, base, options, sample, args, keep_output, persist,
                 confirmed=False):  # fmt: skip
        """Times ``options`` (checked in ``auto`` mode) and records the fastest: ``(impl,
        its checked output or _NOT_RUN)``."""
        check = _Check(self, base, self._reference(options, mode()), sample, args)
        options = self._warm_up(check, options, args)
        times: dict[str, list[float]] = {impl.name: [] for impl in options}
        best = None  # the fastest checked run: (impl, ms, output, output as compared)
        spent = 0.0
        budget = TIME_BUDGET_S * 1e3
        for repetition in range(MAX_REPETITIONS):
            if repetition == 1 and spent > budget:
                break  # one round of large calls is enough
            if repetition > 1 and spent * (repetition + 1) / repetition > budget:
                break  # another round would not fit
            runs, ms_spent = check.round(options, args, _elapsed_ms)
            spent += ms_spent
            for run in runs:
                times[run[0].name].append(run[1])
                if keep_output and (best is None or run[1] < best[1]):
                    if best is not None:
                        check.discard(best[3], run[3])
                    best = run
                else:
                    check.discard(run[3], None if best is None else best[3])
        times = {name: t for name, t in times.items() if t and name not in check.failed}
        fastest = min(times, key=lambda name: min(times[name]))
        ms = {name: round(min(values), 5) for name, values in times.items()}
        with _lock:
            source = "confirmed" if confirmed else "measured"
            _table[full] = Choice(fastest, source, ms, None if full == base else base)
            if persist:
                entry = {"choice": fastest, "ms": ms, "confirmed": confirmed, "checked": True}
                _disk_cache(full[1]).put(_key_text(full), entry)
        out = _NOT_RUN
        if keep_output and best is not None and best[0].name == fastest:
            out = check.restore(best[2], best[3])
        check.release(best[3] if out is not _NOT_RUN else None)
        return self.by_name[fastest], out


def _text(value: Any) -> str:
    return str(value).replace("torch.", "")


def _key_text(full: tuple) -> str:
    op, _device, *rest = full
    return "|".join([op, *(_text(v) for v in rest)])


class _NotRun:
    def __repr__(self) -> str:
        return "<not run>"


_NOT_RUN = _NotRun()
