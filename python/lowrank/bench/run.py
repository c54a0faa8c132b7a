"""The benchmark suite: every op against its baselines, as a table, JSON and a PNG.

    python -m lowrank bench                 # all suites on the GPU if there is one, else the CPU
    python -m lowrank bench --suite kron    # one suite
    python -m lowrank bench --quick         # fewer cases
    python -m lowrank bench --save          # also write bench/results/<device>-<date>.{json,png}

``python bench/run.py`` in a source checkout is the same program with the same options.
For every case the table lists each implementation's median time and the speed-up of
lowrank over it, all measured in one run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path

import torch

import lowrank
from lowrank.bench import checkout_path, harness

# One line per suite: name -> module in lowrank.bench exposing run(device, quick) -> list[Result].
SUITES = {
    "dispatch": "bench_dispatch",
    "kron": "bench_kron",
    "galore": "bench_galore",
    "layerwise": "bench_layerwise",
    "kron_adapter": "bench_kron_adapter",
    "lora": "bench_lora",
    "monarch": "bench_monarch",
    "rsvd": "bench_rsvd",
    "sltrain": "bench_sltrain",
    "spectral": "bench_spectral",
    "out_of_core": "bench_out_of_core",
}


def git_commit() -> str | None:
    """The source checkout's commit, or None when running from an installed wheel."""
    root = checkout_path()
    if root is None:
        return None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def speedups(results: list[dict]) -> None:
    """Adds speedup = impl time / lowrank time to each row (lowrank's own is 1)."""
    by_case = defaultdict(dict)
    for r in results:
        by_case[(r["suite"], r["case"])][r["impl"]] = r["ms"]
    for r in results:
        ours = by_case[(r["suite"], r["case"])].get("lowrank")
        r["lowrank_speedup"] = (r["ms"] / ours) if ours else None


def add_rates(results: list[dict]) -> None:
    """Achieved GB/s and TFLOP/s for rows whose case states its minimum bytes and FLOPs."""
    for r in results:
        extra = r["extra"]
        if "flop" in extra and r["ms"] > 0:
            extra["TFLOP/s"] = extra["flop"] / (r["ms"] * 1e-3) / 1e12
            extra["GB/s"] = extra["bytes"] / (r["ms"] * 1e-3) / 1e9


def device_peaks(device: torch.device) -> dict:
    """What the device does through torch: copy bandwidth and a large GEMM's rate."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {
        "copy_GB/s": harness.measure_bandwidth_gbs(device),
        f"matmul_TFLOP/s ({str(dtype).replace('torch.', '')})": harness.measure_matmul_gflops(
            device, dtype
        )
        / 1e3,
    }


def print_table(results: list[dict]) -> None:
    header = f"{'suite':10s} {'case':44s} {'impl':22s} {'ms':>10s} {'lowrank x':>10s}"
    print(header)
    print("-" * len(header))
    for r in results:
        sp = r["lowrank_speedup"]
        sp_text = "" if sp is None or r["impl"] == "lowrank" else f"{sp:.2f}"
        extra = "  " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}: {v}"
            for k, v in skip_work_counts(r["extra"]).items()
            if v is not None
        )
        print(
            f"{r['suite']:10s} {r['case'][:44]:44s} {r['impl'][:22]:22s} "
            f"{r['ms']:10.4f} {sp_text:>10s}{extra if r['extra'] else ''}"
        )


def skip_work_counts(extra: dict) -> dict:
    return {k: v for k, v in extra.items() if k not in ("flop", "bytes")}


def plot(results: list[dict], path: Path, title: str) -> bool:
    """Draws lowrank's speed-ups as a bar chart; False when there is nothing to draw or
    matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["impl"] != "lowrank" and r["lowrank_speedup"]]
    if not rows:
        return False
    labels = [f"{r['suite']}: {r['case']}\nvs {r['impl']}" for r in rows]
    values = [r["lowrank_speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    ax.barh(range(len(rows)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("lowrank speed-up (baseline time / lowrank time)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def default_out() -> Path:
    """``bench/out`` of the source checkout, else ``bench-out`` in the working directory."""
    bench = checkout_path("bench")
    return bench / "out" if bench is not None else Path("bench-out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bench/run.py`` and ``python -m lowrank bench``."""
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), help="repeatable")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for JSON and PNG (default: bench/out in a source checkout, else ./bench-out)",
    )
    parser.add_argument(
        "--save", action="store_true", help="also write into bench/results/ (source checkout only)"
    )
    parser.add_argument(
        "--cpu-peak",
        action="store_true",
        help="measure peak memory on the CPU too (pins glibc's mmap threshold for the whole "
        "run, which slows allocation-heavy code alike)",
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``) and runs the suites; returns the exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.save and checkout_path("bench", "results") is None:
        parser.error("--save writes into bench/results/ of a source checkout; use --out here")
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Runs the suites ``args`` (from :func:`add_arguments`) names; returns the exit code."""
    # Every run measures the dispatch choices afresh (none are read from or written to disk).
    os.environ["LOWRANK_CACHE_DIR"] = ""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cpu_peak:
        harness.CPU_PEAKS = True
        harness.mmap_large_allocations()
    torch.manual_seed(0)
    results = []
    lowrank.dispatch.clear()
    for name in args.suite or list(SUITES):
        module = importlib.import_module(f"lowrank.bench.{SUITES[name]}")
        print(f"running suite {name} on {device} ...", flush=True)
        results.extend(r.as_dict() for r in module.run(device, args.quick))
    speedups(results)
    add_rates(results)
    peaks = device_peaks(device) if any("flop" in r["extra"] for r in results) else {}

    stamp = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "lowrank": lowrank.__version__,
        "lowrank_info": lowrank.info(),
        "commit": git_commit(),
        "date": stamp.isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "cpu_peak": args.cpu_peak,
        "peaks": peaks,
        "results": results,
        "dispatch": lowrank.dispatch.report(),
    }
    print()
    if peaks:
        print("device peaks: " + ", ".join(f"{k} {v:.4g}" for k, v in peaks.items()))
    print_table(results)
    print()
    print("dispatch choices (lowrank.dispatch.report()):")
    print(lowrank.dispatch.format_report())
    slug = f"{device.type}-{stamp:%Y-%m-%d}" + ("-cpu-peak" if args.cpu_peak else "")
    title = f"lowrank {lowrank.__version__} on {report['device']}, torch {torch.__version__}"
    folders = [args.out or default_out()]
    if args.save:
        folders.append(checkout_path("bench", "results"))
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{slug}.json").write_text(json.dumps(report, indent=1))
        plotted = plot(results, folder / f"{slug}.png", title)
        print(f"wrote {folder / slug}.json" + (" and .png" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
