"""Train a small byte-level language model with dense and low-rank methods, and compare.

A LLaMA-style decoder (RMSNorm, SwiGLU MLP, causal attention; 4 layers of width 256,
context 128 by default) learns the bytes of the Python standard library's source files
(some files for training, others for validation), for a fixed number of steps on the
CPU, with:

- dense AdamW;
- LoRA adapters (lowrank.nn.LoRAAdapter) on every linear layer of the dense model;
- GaLore (lowrank.optim.GaLoreAdamW) on every linear weight, and its variants at the
  same rank: Fira (the residual, scaled, with its norm-growth limiter), FRUGAL (a signSGD
  step with the residual), Q-GaLore (4-bit projectors, lazy per-layer refresh) and the
  DCT projector;
- structured layers from scratch in place of every linear layer of the blocks:
  LowRankLinear, SLTrainLinear, MonarchLinear, KronLinear.

For each: trainable parameters, bytes of weights plus optimizer state, the validation
loss at the end (nats per byte), and the time per step.

    python examples/train_small_lm.py            # the comparison (tens of minutes)
    python examples/train_small_lm.py --quick    # a few steps of each (CI)

Writes ``<out>/small-lm-training.json`` and ``.png`` (default ``--out bench/out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from lowrank.nn import KronLinear, LowRankLinear, MonarchLinear, SLTrainLinear, convert
from lowrank.optim import GaLore, GaLoreAdamW, galore_groups

# ---- data ---------------------------------------------------------------------------------------


def corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the standard library's ``.py`` files (sorted by path): every tenth file
    goes to validation, the others to training, until ``max_bytes`` are read."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and p.is_file())
    train, val, total = [], [], 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        (val if i % 10 == 0 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train).long(), as_tensor(val).long()


def batch(data: torch.Tensor, size: int, context: int, generator: torch.Generator):
    starts = torch.randint(0, len(data) - context - 1, (size,), generator=generator)
    rows = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


# ---- the model -----------------------------------------------------------------------------------

Linear = Callable[[int, int], nn.Module]


class RMSNorm(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, linear: Linear):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(width), RMSNorm(width)
        self.q, self.k, self.v, self.o = (linear(width, width) for _ in range(4))
        self.gate, self.up, self.down = linear(width, mlp), linear(width, mlp), linear(mlp, width)

    def forward(self, x):
        b, t, d = x.shape
        h = self.attn_norm(x)

        def split(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)),
                                             split(self.v(h)), is_causal=True)  # fmt: skip
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLM(nn.Module):
    """A LLaMA-style decoder; ``linear(in, out)`` builds every linear layer of the blocks."""

    def __init__(self, vocab=256, width=256, layers=4, heads=4, mlp=688, context=128,
                 linear: Linear | None = None):  # fmt: skip
        super().__init__()
        linear = linear or (lambda i, o: nn.Linear(i, o, bias=False))
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp, linear) for _ in range(layers))
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def loss_of(model, tokens, targets):
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---- the methods ----------------------------------------------------------------------------


def structured(kind: str) -> Linear:
    def make(i, o):
        if kind == "lowrank":
            return LowRankLinear(i, o, min(64, i, o), bias=False)
        if kind == "sltrain":
            return SLTrainLinear(i, o, min(64, i, o), sparsity=0.03, bias=False, seed=i * 7919 + o)
        if kind == "monarch":
            return MonarchLinear(i, o, 4, bias=False)
        return KronLinear(i, o, bias=False, terms=4)

    return make


def methods(lr: float) -> dict[str, Callable[[], tuple[nn.Module, torch.optim.Optimizer]]]:
    def dense():
        model = TinyLM()
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lora():
        model = TinyLM()
        convert(model, "lora", rank=32, alpha=64, filter=lambda n, m: n.startswith("blocks"),
                freeze=False, progress=False)  # fmt: skip
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)

    def galore_with(make: Callable[[list[dict]], torch.optim.Optimizer]):
        """A GaLore-style row: the model, and an optimizer ``make(groups)`` builds from
        GaLore's parameter groups (rank 64, gap 50, scale 0.25 on every linear weight of
        the blocks, 4x the rate there)."""

        def build():
            model = TinyLM()
            targets = ["q", "k", "v", "o", "gate", "up", "down"]
            groups = galore_groups(model, rank=64, update_proj_gap=50, scale=0.25,
                                   target_modules=targets)  # fmt: skip
            for group in groups:  # the projected step is scaled by 0.25: a larger rate there
                group["lr"] = 4 * lr if "rank" in group else lr
            return model, make(groups)

        return build

    def galore(**options):
        return galore_with(lambda groups: GaLoreAdamW(groups, lr=lr, **options))

    def galore_adafactor(groups):
        # Adafactor's rate is relative (a step of about lr x the parameter's RMS): its own
        # default, 1e-2, with the same 4x on the projected weights
        for group in groups:
            group["lr"] = 4e-2 if "rank" in group else 1e-2
        return GaLore(groups, torch.optim.Adafactor, weight_decay=0.0)

    def from_scratch(kind):
        def build():
            model = TinyLM(linear=structured(kind))
            return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

        return build

    return {
        "dense AdamW": dense,
        "LoRA r=32 (dense base frozen)": lora,
        "GaLore r=64": galore(),
        "Fira r=64": galore(residual="fira"),
        "FRUGAL r=64 (signSGD residual)": galore(residual="signsgd", residual_lr=lr),
        "Q-GaLore r=64 (4-bit, lazy refresh)": galore(
            projector_bits=4, group_size=256, lazy_refresh=True, **QGALORE_LAZY
        ),
        "GaLore r=64, DCT projector": galore(projector="dct"),
        # rows with another optimizer on GaLore's groups: galore_with(make_optimizer)
        "GaLore r=64 + Adafactor": galore_with(galore_adafactor),
        "LowRankLinear r=64": from_scratch("lowrank"),
        "SLTrainLinear r=64 + 3%": from_scratch("sltrain"),
        "MonarchLinear 4 blocks": from_scratch("monarch"),
        "KronLinear 4 terms": from_scratch("kron"),
    }


# Q-GaLore's lazy refresh in the comparison: an interval doubles after two consecutive
# refreshes whose subspace kept at least this similarity to the previous one
QGALORE_LAZY = {"cos_threshold": 0.4, "queue_size": 2, "refresh_growth": 2.0}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, projectors, steps)."""
    if isinstance(optimizer, (GaLoreAdamW, GaLore)):
        return optimizer.state_bytes()
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if isinstance(v, torch.Tensor))  # fmt: skip


def weight_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def evaluate(model, val, batches, size, context) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)  # the same validation batches for every method
    losses = [float(loss_of(model, *batch(val, size, context, g))) for _ in range(batches)]
    model.train()
    return statistics.fmean(losses)


def train(name, build, data, args) -> dict:
    train_data, val = data
    torch.manual_seed(0)
    model, optimizer = build()
    g = torch.Generator().manual_seed(0)  # the same training batches for every method
    curve, times = [], []
    for step in range(1, args.steps + 1):
        tokens, targets = batch(train_data, args.batch, args.context, g)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, tokens, targets)
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val, args.eval_batches, args.batch, args.context)))
            print(f"  {name:32s} step {step:5d}  train {loss.item():.3f}  val {curve[-1][1]:.3f}",
                  flush=True)  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {
        "method": name,
        "trainable_params": trainable,
        "weight_bytes": weight_bytes(model),
        "optimizer_state_bytes": state_bytes(optimizer),
        "val_loss": curve[-1][1],
        "ms_per_step": 1e3 * statistics.median(times[1:] or times),
        "curve": curve,
    }
    if isinstance(optimizer, (GaLoreAdamW, GaLore)) and optimizer.refresh_log:
        row["galore_refresh_ms"] = [1e3 * r.seconds for r in optimizer.refresh_log]
        row["refreshed_matrices"] = sum(r.matrices for r in optimizer.refresh_log)
        row["projector_bytes"] = sum(r["projector_bytes"] for r in optimizer.memory_report())
    if not math.isfinite(row["val_loss"]):
        raise RuntimeError(f"{name}: the validation loss is not finite")
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of each method")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4,
                        help="AdamW's rate (GaLore: 4x on the projected weights)")  # fmt: skip
    parser.add_argument("--methods", nargs="*", default=None, help="a subset, by name prefix")
    parser.add_argument("--out", default=os.path.join("bench", "out"))
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 400)
    args.batch = args.batch or (4 if args.quick else 16)
    args.eval_every = max(1, args.steps // 10)
    args.eval_batches = 2 if args.quick else 16
    data = corpus(1 << 20 if args.quick else 16 << 20)
    print(f"corpus: {len(data[0])} training bytes, {len(data[1])} validation bytes; "
          f"{args.steps} steps of {args.batch} x {args.context} tokens")  # fmt: skip
    rows = []
    for name, build in methods(args.lr).items():
        if args.methods and not any(name.startswith(m) for m in args.methods):
            continue
        rows.append(train(name, build, data, args))
    result = {
        "model": "TinyLM: 4 layers, width 256, 4 heads, SwiGLU 688, context 128, bytes",
        "steps": args.steps, "batch": args.batch, "context": args.context, "lr": args.lr,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "python": sys.version.split()[0], "torch": torch.__version__,
                    "lowrank": lowrank.__version__},
        "rows": rows,
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "small-lm-training.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(table(rows))
    plot(rows, os.path.join(args.out, "small-lm-training.png"))
    print(f"wrote {path}")
    return result


def table(rows: list[dict]) -> str:
    lines = ["| method | trainable params | weights + optimizer state | val loss | ms/step |",
             "|:---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        memory = (r["weight_bytes"] + r["optimizer_state_bytes"]) / 2**20
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {memory:.1f} MiB "
                     f"(state {r['optimizer_state_bytes'] / 2**20:.1f}) | {r['val_loss']:.3f} | "
                     f"{r['ms_per_step']:.0f} |")  # fmt: skip
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
    for r in rows:
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, marker=".", label=r["method"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("byte-level LM on the Python standard library")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
