"""lowrank.dispatch: measured choice, overrides, the disk cache and when timing is off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lowrank import dispatch
from lowrank.ops import kron_matmul


@pytest.fixture
def clean(tmp_path, monkeypatch):
    """A fresh table and a private cache folder; the test's timer decides who is faster."""
    monkeypatch.setenv("LOWRANK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dispatch, "_ENV_MODE", "auto")
    monkeypatch.setattr(dispatch, "_warned", set())
    dispatch.clear()
    yield tmp_path
    dispatch.clear()


class FakeTimer:
    """Stands in for the clock: each implementation 'takes' the milliseconds given."""

    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def __call__(self, impl, sample, args):
        self.calls.append(impl.name)
        return self.ms[impl.name], impl.run(*args)


# The toy's implementations agree within the dispatch's tolerance (2**-16 apart), so the
# checked measurement keeps both, and still tell apart which one ran.
FAST, SLOW = 1.0, 1.0 + 2**-16


def toy(calls=None, nondeterministic=frozenset(), static="slow"):
    def make(name):
        def run(x):
            if calls is not None:
                calls.append(name)
            return x + (FAST if name == "fast" else SLOW)

        return run

    impls = (
        dispatch.Impl("slow", dispatch.NATIVE, make("slow")),
        dispatch.Impl("fast", dispatch.COMPOSITE, make("fast"), None, nondeterministic),
    )
    return dispatch.Dispatcher("toy", impls, lambda x, *args: static)


def test_picks_the_faster_and_returns_its_result(clean, monkeypatch):
    timer = FakeTimer({"slow": 13.0, "fast": 3.0})
    monkeypatch.setattr(dispatch, "_elapsed_ms", timer)
    op, x = toy(), torch.zeros(3)
    y = op(("k",), x, x)
    assert torch.equal(y, x + 1.0)  # the winner's output, not a second run
    # 16 ms spent: over budget after one round; the static choice ("slow") ran last.
    assert timer.calls == ["fast", "slow"]
    (row,) = dispatch.report()
    assert row["op"] == "toy" and row["choice"] == "fast" and row["source"] == "measured"
    assert row["ms"] == {"slow": 13.0, "fast": 3.0}


def test_affordable_keys_get_a_second_round(clean, monkeypatch):
    times = iter([9.0, 1.0, 0.5, 1.2])  # fast, slow cold; then fast, slow warm

    def timer(impl, sample, args):
        return next(times), impl.run(*args)

    monkeypatch.setattr(dispatch, "_elapsed_ms", timer)
    x = torch.zeros(1)
    assert torch.equal(toy()(("k",), x, x), x + 1.0)  # warm "fast" (0.5) beats "slow" (1.0)
    assert dispatch.report()[0]["ms"] == {"fast": 0.5, "slow": 1.0}  # a third would not fit
    calls = []
    monkeypatch.setattr(dispatch, "_elapsed_ms", FakeTimer({"slow": 0.0, "fast": 9.0}))
    toy(calls)(("k",), x, x)
    assert calls == ["fast"]  # remembered: no second measurement


def test_cheap_candidates_are_repeated_within_the_budget(clean, monkeypatch):
    timer = FakeTimer({"slow": 0.5, "fast": 0.4})
    monkeypatch.setattr(dispatch, "_elapsed_ms", timer)
    x = torch.zeros(1)
    toy()(("k",), x, x)
    assert len(timer.calls) == 2 * dispatch.MAX_REPETITIONS


def test_keys_are_separate(clean, monkeypatch):
    monkeypatch.setattr(dispatch, "_elapsed_ms", FakeTimer({"slow": 1.0, "fast": 2.0}))
    x = torch.zeros(1)
    toy()(("a",), x, x)
    monkeypatch.setattr(dispatch, "_elapsed_ms", FakeTimer({"slow": 2.0, "fast": 1.0}))
    toy()(("b",), x, x)
    choices = {row["key"][0]: row["choice"] for row in dispatch.report()}
    assert choices == {"a": "slow", "b": "fast"}


@pytest.mark.parametrize("how", ["env", "context"])
def test_overrides(clean, monkeypatch, how):
    timer = FakeTimer({"slow": 5.0, "fast": 1.0})
    monkeypatch.setattr(dispatch, "_elapsed_ms", timer)
    x = torch.zeros(1)
    if how == "env":  # as read at import (the subprocess test below sets the variable itself)
        monkeypatch.setattr(dispatch, "_ENV_MODE", "native")
        y = toy()(("k",), x, x)
    else:
        with dispatch.force("native"):
            y = toy()(("k",), x, x)
        assert dispatch.mode() == "auto"
    assert torch.equal(y, x + SLOW) and timer.calls == []  # one candidate: nothing to time
    with dispatch.force("composite"):
        assert torch.equal(toy()(("k",), x, x), x + 1.0)


def test_bad_overrides_raise(clean, monkeypatch):
    with pytest.raises(ValueError, match="kind must be one of"), dispatch.force("fastest"):
        pass
    monkeypatch.setattr(dispatch, "_ENV_MODE", "gpu")
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="LOWRANK_DISPATCH must be one of"):
        toy()(("k",), x, x)


@pytest.mark.parametrize("value, expected", [("native", "native"), ("composite", "composite"),
                                             ("", "auto")])  # fmt: skip
def test_environment_variable(value, expected):
    code = (
        "import torch, lowrank\n"
        "from lowrank.ops import kron_matmul\n"
        "kron_matmul(torch.randn(64, 16), torch.randn(4, 4), torch.randn(4, 4))\n"
        "print(lowrank.dispatch.mode(), [r['choice'] for r in lowrank.dispatch.report()])\n"
    )
    env = {**os.environ, "LOWRANK_DISPATCH": value, "LOWRANK_CACHE_DIR": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    assert out[0] == expected
    if expected != "auto":  # one candidate left: nothing measured, nothing in the table
        assert out[1:] == ["[]"]


def test_cache_is_written_and_read_back(clean, monkeypatch):
    monkeypatch.setattr(dispatch, "_elapsed_ms", FakeTimer({"slow": 3.0, "fast": 1.0}))
    x = torch.zeros(1)
    toy()(("k",), x, x)
    (path,) = clean.glob("dispatch-*.json")
    data = json.loads(path.read_text())
    assert data["torch"] == torch.__version__ and data["device"] == dispatch.device_name(x.device)
    (entry,) = data["choices"].values()
    assert entry["choice"] == "fast"
    dispatch.clear()  # a new process: memory empty, the file stays

    def no_timing(*args):
        raise AssertionError("a cached key must not be measured again")

    monkeypatch.setattr(dispatch, "_elapsed_ms", no_timing)
    assert torch.equal(toy()(("k",), x, x), x + 1.0)
    assert dispatch.report()[0]["source"] == "cache"


def test_a_measured_choice_is_confirmed_once_in_the_steady_state(clean, monkeypatch):
    """The first measurement decides for CONFIRM_AFTER calls; a second one then decides
    for good (and is what the cache keeps): the first call of a key can mislead."""
    timer = FakeTimer({"slow": 1.0, "fast": 2.0})  # at the first call "slow" looks faster
    monkeypatch.setattr(dispatch, "_elapsed_ms", timer)
    calls = []
    op, x = toy(calls), torch.zeros(1)
    op(("k",), x, x)
    assert [(r["choice"], r["source"]) for r in dispatch.report()] == [("slow", "measured")]
    assert [op_name for op_name, _ in dispatch.provisional()] == ["toy"]
    timer.ms = {"slow": 2.0, "fast": 1.0}  # the steady state is the other way round
    timer.calls.clear()
    calls.clear()
    for _ in range(dispatch.CONFIRM_AFTER - 1):
        op(("k",), x, x)
    assert timer.calls == [] and calls == ["slow"] * (dispatch.CONFIRM_AFTER - 1)
    assert torch.equal(op(("k",), x, x), x + 1.0)  # measured again; the winner's output
    assert set(timer.calls) == {"slow", "fast"}
    assert [(r["choice"], r["source"]) for r in dispatch.report()] == [("fast", "confirmed")]
    assert dispatch.provisional() == set()
    timer.calls.clear()
    calls.clear()
    for _ in range(3 * dispatch.CONFIRM_AFTER):
        op(("k",), x, x)
    assert timer.calls == [] and set(calls) == {"fast"}  # final: never measured again
    (path,) = clean.glob("dispatch-*.json")
    (entry,) = json.loads(path.read_text())["choices"].values()
    assert entry["choice"] == "fast" and entry["confirmed"] is True


def test_an_unconfirmed_cached_choice_is_confirmed(clean, monkeypatch):
    timer = FakeTimer({"slow": 1.0, "fast": 2.0})
    monkeypatch.setattr(dispatch, "_elapsed_ms", timer)
    x = torch.zeros(1)
    toy()(("k",), x, x)  # measured once, then the process ends
    dispatch.clear()
    timer.ms = {"slow": 2.0, "fast": 1.0}
    timer.calls.clear()
    op = toy()
    for _ in range(dispatch.CONFIRM_AFTER):  # the call that reads the cache, and the wait
        op(("k",), x, x)
    assert timer.calls == [] and dispatch.report()[0]["source"] == "cache"
    op(("k",), x, x)
    assert [(r["choice"], r["source"]) for r in dispatch.report()] == [("fast", "confirmed")]


@pytest.mark.parametrize("content", ["{not json", '{"choices": 3}', '{"choices": {"k": 1}}'])
def test_corrupt_cache_is_ignored_with_one_warning(clean, monkeypatch, content):
    monkeypatch.setattr(dispatch, "_elapsed_ms", FakeTimer({"slow": 3.0, "fast": 1.0}))
    x = torch.zeros(1)
    toy()(("k",), x, x)
    (path,) = clean.glob("dispatch-*.json")
    path.write_text(content)
    dispatch.clear()
    with pytest.warns(RuntimeWarning, match="ignoring the unreadable cache"):
        assert torch.equal(toy()(("k",), x, x), x + 1.0)
    assert json.loads(path.read_text())["choices"]  # rewritten with the new measurement


def test_unwritable_cache_warns_once_and_keeps_working(clean, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("LOWRANK_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(dispatch, "_elapsed_ms", FakeTimer({"slow": 3.0, "fast": 1.0}))
    x = torch.zeros(1)
    with pytest.warns(RuntimeWarning, match="cannot write the cache"):
        toy()(("k",), x, x)
    toy()(("other",), x, x)  # no second warning (pytest would not fail, so count below)
    assert sum("cannot write" in message for message in dispatch._warned) == 1


def test_empty_cache_dir_keeps_choices_in_memory(clean, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE_DIR", "")
    monkeypatch.setattr(dispatch, "_elapsed_ms", FakeTimer({"slow": 3.0, "fast": 1.0}))
    x = torch.zeros(1)
    toy()(("k",), x, x)
    assert list(clean.iterdir()) == []


def test_deterministic_mode_never_times_and_skips_nondeterministic(clean, monkeypatch):
    def no_timing(*args):
        raise AssertionError("timed under deterministic algorithms")

    monkeypatch.setattr(dispatch, "_elapsed_ms", no_timing)
    x = torch.zeros(1)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(toy(static="fast")(("k",), x, x), x + 1.0)  # the static choice
        assert dispatch.report()[0]["source"] == "static"
        # A candidate that is not deterministic here is never chosen ...
        op = toy(nondeterministic=frozenset({"cpu"}), static="fast")
        assert torch.equal(op(("k2",), x, x), x + SLOW)
        # ... and when it is the only one allowed, the op raises as torch does.
        with dispatch.force("composite"), pytest.raises(RuntimeError, match="not deterministic"):
            op(("k3",), x, x)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_no_timing_while_compiling(clean, monkeypatch):
    seen = []

    def timer(impl, sample, args):
        seen.append(torch.compiler.is_compiling())
        return dispatch._elapsed_ms.__wrapped__(impl, sample, args)

    timer.__wrapped__ = dispatch._elapsed_ms
    monkeypatch.setattr(dispatch, "_elapsed_ms", timer)
    x, a, b = torch.randn(5, 12), torch.randn(3, 3), torch.randn(2, 4)
    compiled = torch.compile(lambda x: kron_matmul(x, a, b) * 2, fullgraph=True, backend="eager")
    y = compiled(x)
    assert torch.allclose(y, 2 * kron_matmul(x, a, b))
    assert seen and not any(seen)  # measured when the graph ran, never while tracing


def test_no_timing_during_cuda_graph_capture(monkeypatch):
    class CudaLike:
        is_cuda, is_cpu = True, False
        device = torch.device("cuda", 0)

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not dispatch.may_time(CudaLike())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert dispatch.may_time(CudaLike())
    assert not dispatch.may_time(torch.empty(1, device="meta"))


def in_threads(call, threads: int = 8) -> list:
    """Runs ``call`` in ``threads`` threads at once; their results (any exception raised)."""
    results = []

    def work():
        try:
            results.append(call())
        except Exception as error:  # pragma: no cover - the caller checks
            results.append(error)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results


def test_concurrent_first_calls_measure_once(clean, monkeypatch):
    timer = FakeTimer({"slow": 14.0, "fast": 2.0})  # over the budget: one round
    monkeypatch.setattr(dispatch, "_elapsed_ms", timer)
    x = torch.zeros(1)
    op = toy()
    results = in_threads(lambda: op(("k",), x, x))
    assert len(results) == 8 and all(isinstance(r, torch.Tensor) for r in results)
    assert timer.calls.count("fast") == 1  # one measurement; the others used a choice
    # Threads that found the measurement under way ran the composite path: the native
    # static choice ("slow") was not checked yet.
    assert all(torch.equal(r, x + FAST) for r in results)


def test_concurrent_calls_confirm_without_errors(clean, monkeypatch):
    monkeypatch.setattr(dispatch, "_elapsed_ms", FakeTimer({"slow": 14.0, "fast": 2.0}))
    x = torch.zeros(1)
    op = toy()
    results = in_threads(lambda: [op(("k",), x, x) for _ in range(2 * dispatch.CONFIRM_AFTER)])
    assert not [r for r in results if isinstance(r, Exception)]
    assert dispatch.provisional() == set()
    assert [(r["choice"], r["source"]) for r in dispatch.report()] == [("fast", "confirmed")]


def test_unavailable_native_is_skipped_with_one_warning(clean, monkeypatch):
    op = dispatch.Dispatcher("toy", (
        dispatch.Impl("native", dispatch.NATIVE, lambda x: x, lambda x: "not built here"),
        dispatch.Impl("composite", dispatch.COMPOSITE, lambda x: x + 1),
    ), dispatch.default_kind)  # fmt: skip
    x = torch.zeros(1)
    with pytest.warns(RuntimeWarning, match="not built here; the native implementation"):
        assert torch.equal(op(("k",), x, x), x + 1)
    with dispatch.force("native"), pytest.raises(RuntimeError, match="no native implementation"):
        op(("k",), x, x)


def test_real_ops_choose_and_report(clean):
    x, a, b = torch.randn(64, 16), torch.randn(4, 4), torch.randn(4, 4)
    y = kron_matmul(x, a, b)
    rows = [row for row in dispatch.report() if row["op"] == "kron_matmul"]
    assert len(rows) == 1 and rows[0]["choice"] in ("native", "composite")
    assert set(rows[0]["ms"]) == {"native", "composite"}
    assert rows[0]["key"][1] == 64  # the token bucket
    assert torch.allclose(y, x @ torch.kron(a, b).T, atol=1e-5)
    assert "kron_matmul" in dispatch.format_report()


def test_bucket():
    assert [dispatch.bucket(n) for n in (0, 1, 2, 3, 4, 5, 4096, 4097)] == [
        0, 1, 2, 4, 4, 8, 4096, 8192,
    ]  # fmt: skip


# ---- checked dispatch: a wrong, silent or raising native kernel never changes a result -------


def _silent(*args):
    """Launches nothing: the output keeps whatever its memory held."""


def _raising(*args):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _wrong_forward(real):
    def run(code, x, a, b, base, scale, out, *rest):
        real(code, x, a, b, base, 1.5 * scale, out, *rest)  # a wrong scale: wrong values

    return run


@pytest.mark.parametrize("fault", ["silent", "wrong", "raises"])
def test_a_faulty_native_kernel_never_changes_results(clean, monkeypatch, fault):
    from lowrank import _native

    monkeypatch.setattr(_native, "POISON_OUTPUTS", False)  # outputs hold stale memory
    real = _native._C.kron_matmul
    faulty = {"silent": _silent, "wrong": _wrong_forward(real), "raises": _raising}[fault]
    monkeypatch.setattr(_native._C, "kron_matmul", faulty)
    x, a, b = torch.randn(256, 48), torch.randn(8, 6), torch.randn(5, 8)
    expected = x @ torch.kron(a, b).T
    with pytest.warns(RuntimeWarning, match="kron_matmul: the native implementation on cpu"):
        results = [kron_matmul(x, a, b) for _ in range(2 * dispatch.CONFIRM_AFTER + 2)]
    for y in results:
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    (row,) = [r for r in dispatch.report() if r["op"] == "kron_matmul"]
    assert row["choice"] == "composite" and dispatch.provisional() == set()
    assert list(row["excluded"]) == ["native"] and "native" not in row["ms"]
    reason = row["excluded"]["native"]
    assert ("raised RuntimeError" in reason) if fault == "raises" else ("composite" in reason)
    assert "excluded native" in dispatch.format_report()
    # For good: a new process reads the exclusion from the cache and never runs the kernel.
    dispatch.clear()
    monkeypatch.setattr(_native._C, "kron_matmul", _raising)
    torch.testing.assert_close(kron_matmul(x, a, b), expected, rtol=1e-4, atol=1e-4)
    assert dispatch.report()[0]["excluded"] == {"native": reason}


def test_a_faulty_backward_kernel_never_changes_gradients(clean, monkeypatch):
    from lowrank import _native

    monkeypatch.setattr(_native, "POISON_OUTPUTS", False)
    monkeypatch.setattr(_native._C, "kron_matmul_backward", _silent)
    x, a, b = torch.randn(128, 30), torch.randn(4, 5), torch.randn(3, 6)
    grads = []
    with pytest.warns(RuntimeWarning, match="kron_matmul_backward: the native"):
        for _ in range(dispatch.CONFIRM_AFTER + 2):
            leaves = [t.clone().requires_grad_() for t in (x, a, b)]
            kron_matmul(*leaves).square().sum().backward()
            grads.append([t.grad for t in leaves])
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    (leaves[0] @ torch.kron(leaves[1], leaves[2]).T).square().sum().backward()
    for got in grads:
        for g, t in zip(got, leaves):
            torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)
    rows = {r["op"]: r for r in dispatch.report()}
    assert "native" in rows["kron_matmul_backward"]["excluded"]
    assert rows["kron_matmul"]["excluded"] == {}  # the forward kernel is fine


def test_the_confirming_measurement_checks_too(clean, monkeypatch):
    """A kernel that agrees at the first measurement and not at the confirming one is
    excluded then, and that call returns the composite's result."""
    broken = []

    def native(x):
        return x + (3.0 if broken else SLOW)

    op = dispatch.Dispatcher("toy", (
        dispatch.Impl("native", dispatch.NATIVE, native),
        dispatch.Impl("composite", dispatch.COMPOSITE, lambda x: x + FAST),
    ), lambda x, *args: "composite")  # fmt: skip
    monkeypatch.setattr(dispatch, "_elapsed_ms", FakeTimer({"native": 1.0, "composite": 2.0}))
    x = torch.zeros(4)
    for _ in range(dispatch.CONFIRM_AFTER):
        assert torch.equal(op(("k",), x, x), x + SLOW)  # measured, checked, provisional
    broken.append(True)
    with pytest.warns(RuntimeWarning, match="toy: the native implementation"):
        assert torch.equal(op(("k",), x, x), x + FAST)  # the confirmation
    (row,) = dispatch.report()
    assert (row["choice"], row["source"]) == ("composite", "confirmed")
    assert "differs from the composite path" in row["excluded"]["native"]


def test_an_output_buffer_a_kernel_leaves_alone_is_caught(clean, monkeypatch):
    """With ``out_args``, the buffer every implementation overwrites is NaN before each
    checked run: a kernel that writes nothing cannot pass on the composite's values, and
    the buffer ends holding checked values even when the excluded kernel ran last."""
    op = dispatch.Dispatcher("toy", (
        dispatch.Impl("native", dispatch.NATIVE, lambda x, out: out),
        dispatch.Impl("composite", dispatch.COMPOSITE, lambda x, out: torch.add(x, 1, out=out)),
    ), lambda x, *args: "native", out_args=(1,))  # fmt: skip
    monkeypatch.setattr(dispatch, "_elapsed_ms", FakeTimer({"native": 1.0, "composite": 2.0}))
    x, out = torch.randn(16), torch.empty(16)
    with pytest.warns(RuntimeWarning, match="non-finite values"):
        op(("k",), x, x, out)
    assert torch.equal(out, x + 1)
    assert list(dispatch.report()[0]["excluded"]) == ["native"]


def test_discarded_outputs_are_overwritten(clean, monkeypatch):
    """A measurement releases no memory holding a correct result: outputs it discards are
    NaN first, so a kernel that writes nothing into a fresh output cannot pass a later round
    on what the allocator hands back."""
    outputs = []

    def record(value):
        def run(x):
            outputs.append(x + value)
            return outputs[-1]

        return run

    op = dispatch.Dispatcher("toy", (
        dispatch.Impl("native", dispatch.NATIVE, record(SLOW)),
        dispatch.Impl("composite", dispatch.COMPOSITE, record(FAST)),
    ), lambda x, *args: "composite")  # fmt: skip
    monkeypatch.setattr(dispatch, "_elapsed_ms", FakeTimer({"native": 0.1, "composite": 0.2}))
    x = torch.randn(8)
    y = op(("k",), x, x)
    assert len(outputs) == 2 * dispatch.MAX_REPETITIONS
    assert y is outputs[0] and torch.equal(y, x + SLOW)  # the fastest run, returned
    assert [i for i, t in enumerate(outputs) if not torch.isnan(t).all()] == [0]


def test_deterministic_mode_checks_a_native_static_choice(clean, monkeypatch):
    op = dispatch.Dispatcher("toy", (
        dispatch.Impl("native", dispatch.NATIVE, lambda x: x + 3.0),
        dispatch.Impl("composite", dispatch.COMPOSITE, lambda x: x + FAST),
    ), dispatch.default_kind)  # fmt: skip
    x = torch.zeros(2)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.warns(RuntimeWarning, match="toy: the native implementation"):
            assert torch.equal(op(("k",), x, x), x + FAST)
        assert torch.equal(op(("k",), x, x), x + FAST)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert list(dispatch.report()[0]["excluded"]) == ["native"]


def test_forced_modes_run_what_was_asked(clean):
    op = dispatch.Dispatcher("toy", (
        dispatch.Impl("native", dispatch.NATIVE, _raising),
        dispatch.Impl("composite", dispatch.COMPOSITE, lambda x: x + FAST),
    ), dispatch.default_kind)  # fmt: skip
    x = torch.zeros(2)
    with dispatch.force("native"), pytest.raises(RuntimeError, match="illegal memory"):
        op(("k",), x, x)
    assert dispatch.report() == []  # nothing measured, nothing excluded


def test_the_tolerance_separates_rounding_from_wrong_values():
    torch.manual_seed(0)
    a, b = torch.randn(64, 512), torch.randn(512, 96)
    exact = a.double() @ b.double()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ref = (a.to(dtype) @ b.to(dtype)).to(dtype)
        other = (a.to(dtype).double() @ b.to(dtype).double()).to(dtype)  # rounded once
        size = a.numel()
        assert dispatch._disagreement(other, ref, size) is None, dtype
        assert dispatch._disagreement((other, other), (ref, ref), size) is None
        wrong = other.clone()
        wrong[17, 5] = -wrong[17, 5] + ref.abs().mean()  # one misplaced element
        assert "times the tolerance" in dispatch._disagreement(wrong, ref, size), dtype
        stale = other.clone()
        stale[3, 3] = float("nan")
        assert "1 non-finite" in dispatch._disagreement(stale, ref, size)
        both = ref.clone()
        both[3, 3] = float("inf")
        assert dispatch._disagreement(stale, both, size) is None  # non-finite in both
    ref = exact.float()
    assert "(output 1)" in dispatch._disagreement((ref, ref * 1.01), (ref, ref), size)
    assert "instead of" in dispatch._disagreement(ref[:3], ref, size)
    zeros = torch.zeros(5)
    assert dispatch._disagreement(zeros, zeros, 1) is None
    assert dispatch.tolerance(torch.float32, 10**6) > dispatch.tolerance(torch.float32)
    assert dispatch.tolerance(torch.float16) > dispatch.tolerance(torch.float32)


# ---- native CUDA kernels only on a GPU model whose test suite passed ----------------------------


class FakeCuda:
    """A CUDA-looking sample (the device is all dispatch reads) for CPU tests."""

    is_cuda, is_cpu = True, False
    device = torch.device("cuda", 0)


@pytest.fixture
def fake_gpus(monkeypatch):
    names = {0: "NVIDIA Fake H100", 1: "NVIDIA Other Model"}
    monkeypatch.setattr(dispatch, "_device_names", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: names[device.index])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return names


def test_a_pass_is_recorded_and_looked_up_per_model(clean, fake_gpus):
    assert not dispatch.cuda_verified("cuda:0") and not dispatch.cuda_verified(1)
    dispatch.record_cuda_pass("cuda:0", evidence="pytest -m cuda")
    assert dispatch.cuda_verified("cuda:0") and not dispatch.cuda_verified("cuda:1")
    (path,) = clean.glob("cuda-pass-*Fake-H100.json")
    record = json.loads(path.read_text())
    assert record["device"] == "NVIDIA Fake H100" and record["evidence"] == "pytest -m cuda"
    assert record["torch"] == torch.__version__
    dispatch.clear()  # a new process reads the record
    assert dispatch.cuda_verified(torch.device("cuda", 0))
    path.write_text("{broken")
    dispatch.clear()
    with pytest.warns(RuntimeWarning, match="unreadable record"):
        assert not dispatch.cuda_verified("cuda:0")
    with pytest.raises(ValueError, match="device must be a CUDA device"):
        dispatch.record_cuda_pass("cpu")
    with pytest.raises(TypeError, match="device must be"):
        dispatch.cuda_verified(1.5)


def test_unverified_gpus_measure_only_composites(clean, monkeypatch, fake_gpus):
    timer = FakeTimer({"slow": 1.0, "fast": 2.0})
    monkeypatch.setattr(dispatch, "_elapsed_ms", timer)
    x = torch.zeros(2)
    op = toy(static="slow")
    assert torch.equal(op(("k",), FakeCuda(), x), x + FAST)  # one candidate: composite
    assert timer.calls == [] and list(clean.glob("dispatch-*.json")) == []
    dispatch.record_cuda_pass("cuda:0")  # decisions made before are made again
    assert torch.equal(op(("k",), FakeCuda(), x), x + SLOW)
    assert set(timer.calls) == {"slow", "fast"}
    (row,) = dispatch.report()
    assert row["device"] == "NVIDIA Fake H100" and row["choice"] == "slow"
    with dispatch.force("native"):  # forced: runs what was asked on any GPU
        dispatch.clear()
        assert torch.equal(op(("k",), FakeCuda(), x), x + SLOW)


def test_verify_cuda(clean, monkeypatch, fake_gpus):
    import lowrank
    from lowrank import _native

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        lowrank.verify_cuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_native, "_cuda", object())
    commands = []

    def run(command, cwd, exit_status):
        commands.append(command)
        return subprocess.CompletedProcess(command, exit_status)

    # this suite's folder, given explicitly: an installed (non-editable) package has none
    # next to it
    suite = Path(__file__).resolve().parent
    monkeypatch.setattr(subprocess, "run", lambda c, cwd: run(c, cwd, 1))
    with pytest.raises(RuntimeError, match="did not pass on NVIDIA Fake H100"):
        lowrank.verify_cuda(suite)
    assert not dispatch.cuda_verified("cuda:0")
    monkeypatch.setattr(subprocess, "run", lambda c, cwd: run(c, cwd, 0))
    lowrank.verify_cuda(suite, "-k", "kron")
    assert dispatch.cuda_verified("cuda:0") and not dispatch.cuda_verified("cuda:1")
    assert commands[-1][1:5] == ["-m", "pytest", "-m", "cuda"] and commands[-1][-2:] == [
        "-k", "kron",
    ]  # fmt: skip
    assert commands[-1][-3].endswith("tests")
    with pytest.raises(ValueError, match="tests must be the folder"):
        lowrank.verify_cuda(clean / "missing")
