"""Fine-tune a small pretrained byte-level language model with full fine-tuning and adapters.

A LLaMA-style decoder (RMSNorm, SwiGLU MLP, causal attention; 4 layers of width 128,
context 64) is pretrained on the bytes of the Python standard library's modules whose
names start with a-m, then fine-tuned for a fixed number of steps on the modules n-z
with each method of :data:`METHODS`: full fine-tuning, LoRA (gaussian and PiSSA inits)
and the SVD-parameterised adapters of ``lowrank.nn`` (every linear layer of the blocks
adapted). For each method:

- trainable parameters, and the bytes actually held by the weights (frozen ones
  included) plus the optimizer state;
- the validation loss (nats per byte) on held-out files of the fine-tuning domain and
  of the pretraining domain (how much it forgets);
- the time per step, and the time to initialise all adapted layers next to one
  ``torch.linalg.svd`` per layer, measured in the same run;
- what the method's own targets need (merge error, orthonormality error, final ranks).

Learning rates: one rate per family of methods (full fine-tuning; adapters with trainable
factors; adapters whose bases are frozen and only a small core trains), each chosen by a
short sweep of the family's reference method on held-out batches of the fine-tuning
domain that are not the reported ones; every choice and the sweep are in the output.

    python examples/finetune.py                  # the benchmark (about 12 minutes on 2 cores)
    python examples/finetune.py --quick          # a tiny model, a few steps of each (CI)
    python examples/finetune.py --methods LoRA   # a subset, by name prefix

Writes ``<out>/finetune.json`` and ``.png`` (default ``--out bench/out``). The pretrained
base model is cached in ``<out>`` under a name derived from its configuration, so a rerun
skips pretraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import lowrank
import lowrank.nn.adalora
import lowrank.nn.svd_methods
from lowrank import _validate as check
from lowrank.nn import convert
from lowrank.nn._base import AdapterLinear
from lowrank.optim import LoRAPro

# ---- data ---------------------------------------------------------------------------------------

SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def domain_of(relative: Path) -> str:
    """``"pretrain"`` for modules whose name starts with a-m (leading underscores
    ignored), ``"finetune"`` for n-z."""
    first = relative.parts[0].lstrip("_")[:1].lower()
    return "pretrain" if "a" <= first <= "m" else "finetune"


def corpus(max_bytes: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The standard library's ``.py`` files (tests excluded, sorted by path), split by
    :func:`domain_of`; in each domain every tenth file is held out for validation.
    ``{"pretrain": {"train": bytes, "val": bytes}, "finetune": {...}}``, each at most
    ``max_bytes`` long."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(root).parts)
    )
    chunks: dict[str, dict[str, list[bytes]]] = {
        d: {"train": [], "val": []} for d in ("pretrain", "finetune")
    }
    counts = {"pretrain": 0, "finetune": 0}
    for path in files:
        domain = domain_of(path.relative_to(root))
        split = "val" if counts[domain] % 10 == 0 else "train"
        counts[domain] += 1
        chunks[domain][split].append(path.read_bytes())

    def as_tensor(parts: list[bytes]) -> torch.Tensor:
        data = b"".join(parts)[:max_bytes]
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    return {d: {s: as_tensor(parts) for s, parts in splits.items()} for d, splits in chunks.items()}


def _small_lm_example():
    """``train_small_lm.py`` next to this file: its byte windows and its decoder."""
    path = Path(__file__).resolve().with_name("train_small_lm.py")
    spec = importlib.util.spec_from_file_location("train_small_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


small_lm = _small_lm_example()
#: ``size`` random windows of ``context + 1`` bytes: (inputs, next-byte targets)
batch = small_lm.batch


def fixed_batches(data, count, size, context, seed) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``count`` batches for every method (validation, calibration)."""
    g = torch.Generator().manual_seed(seed)
    return [batch(data, size, context, g) for _ in range(count)]


# ---- the model ----------------------------------------------------------------------------------


class TinyLM(small_lm.TinyLM):
    """The small-LM comparison's LLaMA-style byte-level decoder (pre-norm attention and a
    SwiGLU MLP per block; seven ``nn.Linear`` layers without bias)."""

    def __init__(self, width: int, layers: int, heads: int, mlp: int, context: int):
        super().__init__(256, width, layers, heads, mlp, context)

    def forward(self, tokens, targets=None):
        """The logits, or with ``targets`` the mean next-byte cross-entropy (nats per
        byte; so ``model(*batch)`` is the loss, as calibration-driven inits expect)."""
        logits = super().forward(tokens)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats per byte)."""
    return model(tokens, targets)


def is_adapted(name: str, module: nn.Module) -> bool:
    """The layers every adapter targets: all linear layers of the blocks."""
    return name.startswith("blocks.") and isinstance(module, nn.Linear)


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    was_training = model.training
    model.eval()
    loss = statistics.fmean(float(lm_loss(model, *b)) for b in batches)
    model.train(was_training)
    return loss


# ---- configurations -----------------------------------------------------------------------------


@dataclass
class Config:
    """Sizes and schedules of one benchmark run (``full()`` or ``quick()``)."""

    width: int
    layers: int
    heads: int
    mlp: int
    context: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    steps: int
    batch: int
    eval_batches: int
    eval_every: int
    calibration_batches: int
    max_bytes: int | None
    sweep: dict[str, list[float]]
    seed: int = 0  # fine-tuning's: the adapters' random init and the order of the batches

    def model_args(self) -> dict[str, int]:
        return {"width": self.width, "layers": self.layers, "heads": self.heads,
                "mlp": self.mlp, "context": self.context}  # fmt: skip

    def base_key(self) -> str:
        """Identifies the pretrained base model: everything pretraining depends on."""
        fields = {**self.model_args(), "steps": self.pretrain_steps, "lr": self.pretrain_lr,
                  "batch": self.pretrain_batch, "max_bytes": self.max_bytes,
                  "python": sys.version.split()[0], "torch": torch.__version__}  # fmt: skip
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def full_config() -> Config:
    return Config(width=128, layers=4, heads=4, mlp=344, context=64, pretrain_steps=800,
                  pretrain_batch=32, pretrain_lr=3e-3, steps=200, batch=16, eval_batches=24,
                  eval_every=40, calibration_batches=4, max_bytes=None,
                  sweep={"full": [1e-4, 3e-4, 1e-3], "lora": [1e-3, 3e-3, 1e-2],
                         "core": [3e-3, 1e-2, 3e-2]})  # fmt: skip


def quick_config() -> Config:
    return Config(width=32, layers=2, heads=2, mlp=86, context=32, pretrain_steps=20,
                  pretrain_batch=8, pretrain_lr=3e-3, steps=3, batch=4, eval_batches=2,
                  eval_every=3, calibration_batches=2, max_bytes=1 << 19,
                  sweep={"full": [3e-4], "lora": [3e-3], "core": [1e-2]})  # fmt: skip


# ---- the methods --------------------------------------------------------------------------------


@dataclass
class Setup:
    """What a method's conversion and optimizer may read."""

    config: Config
    steps: int
    calibration: list[tuple[torch.Tensor, torch.Tensor]]  # (tokens, targets) batches
    rates: dict[str, float]  # the learning rate of each family


def adamw(model: nn.Module, lr: float, setup: Setup) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)


def adapter(kind: str, **options) -> Callable[[nn.Module, Setup], Any]:
    """Every block linear layer converted to ``kind`` (an adapter: the rest frozen)."""

    def prepare(model: nn.Module, setup: Setup):
        return convert(model, kind, filter=is_adapted, progress=False, **options)

    return prepare


def lora_sb(rank: int) -> Callable[[nn.Module, Setup], Any]:
    """LoRA-SB: the first step of full fine-tuning (AdamW's, ``-lr sign(G)`` at full
    fine-tuning's rate) estimated on the calibration batches, its top-``rank`` SVD."""

    def prepare(model: nn.Module, setup: Setup):
        return convert(model, "lora_sb", filter=is_adapted, progress=False, rank=rank,
                       lr=setup.rates["full"], calibration=setup.calibration)  # fmt: skip

    return prepare


def adalora(rank: int, target_rank: int) -> Callable[[nn.Module, Setup], Any]:
    """AdaLoRA from ``rank`` to an average ``target_rank``: ranks fixed for the first tenth
    of the steps, pruned on the cubic schedule every 1/40 of them, final for the last 30%
    (the paper's proportions: t_init ~ 10%, t_final ~ 30% of the training)."""

    def prepare(model: nn.Module, setup: Setup):
        steps = setup.steps
        return convert(model, "adalora", filter=is_adapted, progress=False, rank=rank,
                       target_rank=target_rank, total_steps=steps, t_init=steps // 10,
                       t_final=3 * steps // 10, delta_t=max(1, steps // 40))  # fmt: skip

    return prepare


def adalora_optimizer(model: nn.Module, lr: float, setup: Setup) -> torch.optim.Optimizer:
    """AdamW with AdaLoRA's schedule on its hooks (importance, budget, masking)."""
    optimizer = adamw(model, lr, setup)
    optimizer.allocator = lowrank.nn.adalora.attach(model, optimizer)
    return optimizer


def adalora_measure(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    allocator = optimizer.allocator
    return {"final_ranks": allocator.ranks(), "initial_rank": allocator.config.rank,
            "rank_changes": [list(h) for h in allocator.history]}  # fmt: skip


# SORSA's orthonormality step size relative to the learning rate: the paper pairs
# gamma = 4e-4 with lr = 3e-5; the same ratio is kept at this benchmark's rate
SORSA_GAMMA_PER_LR = 4e-4 / 3e-5


def sorsa_optimizer(model: nn.Module, lr: float, setup: Setup) -> torch.optim.Optimizer:
    """AdamW plus SORSA's orthonormality step, taken at the same point as the loss's
    gradient (before each optimizer step), gamma = the paper's gamma / lr ratio times lr,
    following the rate's schedule."""
    optimizer = adamw(model, lr, setup)
    lowrank.nn.svd_methods.sorsa_hook(optimizer, model, gamma=SORSA_GAMMA_PER_LR * lr)
    return optimizer


def sorsa_measure(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"orthonormality_error": lowrank.nn.svd_methods.orthonormality_error(model)}


def lora_pro_optimizer(model: nn.Module, lr: float, setup: Setup) -> torch.optim.Optimizer:
    return LoRAPro(model, lr=lr, weight_decay=0.0)


@dataclass
class Method:
    """One row of the benchmark.

    ``prepare(model, setup)`` makes the pretrained model trainable (``None``: every
    parameter trains); ``optimizer(model, lr, setup)`` builds the optimizer over what
    trains, with the method's per-step hooks registered on it; ``measure(model,
    optimizer)`` adds the method's own end-of-run numbers to its row. ``family`` names the
    learning rate it shares, ``reads`` the other families whose rates it needs; ``note``
    documents the choices."""

    name: str
    family: str
    prepare: Callable[[nn.Module, Setup], Any] | None = None
    optimizer: Callable[[nn.Module, float, Setup], torch.optim.Optimizer] = adamw
    measure: Callable[[nn.Module, torch.optim.Optimizer], dict[str, Any]] | None = None
    note: str = ""
    reads: tuple[str, ...] = ()  # other families whose rates ``prepare`` reads


FAMILIES = {
    "full": ("Full fine-tuning",
             "AdamW on every parameter; LoRA-Pro shares it: with AdamW its step is the best "
             "low-rank approximation of full fine-tuning's AdamW step, at full fine-tuning's "
             "scale"),
    "lora": ("LoRA r=4",
             "adapters whose factors train as LoRA's do; their papers train at LoRA's rate"),
    "core": ("LoRA-XS r=16",
             "adapters whose bases are frozen and only a small core (r x r, or diagonals) "
             "trains: a step moves the weight only within the frozen bases, so they get their "
             "own, larger rate, swept on LoRA-XS"),
}  # fmt: skip
"""Per family: (the method whose sweep chooses the family's rate, why the family shares it).
The sweeps run in this order, so a method may read an earlier family's rate (LoRA-SB's
estimate of full fine-tuning's first step)."""

ADALORA = "AdaLoRA r=8->4"

METHODS: list[Method] = [
    Method("Full fine-tuning", "full", note="AdamW on every parameter, nothing frozen"),
    Method("LoRA r=4", "lora", adapter("lora", rank=4, init="gaussian"),
           note="gaussian init: A ~ N(0, 1/r^2), B = 0; alpha = rank (scale 1)"),
    Method("PiSSA r=4", "lora", adapter("lora", rank=4, init="pissa"),
           note="the top-4 singular triplets (lowrank's rsvd) train, the residual is frozen"),
    Method("LoRA-XS r=16", "core", adapter("lora_xs", rank=16),
           note="B = U_16, A = S_16 V_16^T frozen; the 16 x 16 core trains from N(0, (1e-5)^2)"),
    Method("LoRA-SB r=16", "core", lora_sb(16),
           note="the top-16 SVD of full fine-tuning's first AdamW step (-lr sign of the mean "
                "gradient over the calibration batches, lr = full fine-tuning's) gives the "
                "frozen bases and the initial 16 x 16 core", reads=("full",)),
    Method("SORSA r=4", "lora", adapter("sorsa", rank=4), sorsa_optimizer, sorsa_measure,
           note="PiSSA's split, U, S, V all train; orthonormality step with gamma / lr = 4e-4 / "
                "3e-5 (the paper's ratio), taken with each optimizer step, following the "
                "rate's schedule"),
    Method("SVFit r=16", "core", adapter("svfit", rank=16),
           note="only the top-16 singular values train; U, V and the residual are frozen"),
    Method("LoLDU r=16", "core", adapter("loldu", rank=16),
           note="frozen P L_16 and U_16 from W's LDU; the diagonal D_16 and the scale train"),
    Method(ADALORA, "lora", adalora(8, 4), adalora_optimizer, adalora_measure,
           note="P, Lambda, Q from rank 8 to an average of 4 on the cubic schedule (t_init "
                "10%, t_final 30%, every 1/40 of the steps), orthogonality weight 0.1, "
                "beta1 = beta2 = 0.85; runs from the optimizer's hooks"),
    Method("LoRA-Pro r=4", "full", adapter("lora", rank=4, init="gaussian"), lora_pro_optimizer,
           note="LoRA r=4's adapters; LoRA-Pro's AdamW: the gradients adjusted so that the "
                "step is the closest low-rank step to full fine-tuning's AdamW step "
                "(Sylvester X); full-size Adam moments per adapted layer, as in the paper"),
    Method("ALLoRA r=4", "lora", adapter("allora", rank=4),
           note="LoRA without scale or dropout, each row's gradient scaled by "
                "1 / sqrt(||row||^2 + 1/eta^2), eta = 1"),
    Method("Bone b=8", "lora", adapter("bone", rank=8),
           note="one 8 x out block D shared by every 8-column block of W (PEFT's default "
                "'balance' variant), from zero"),
    Method("RandLoRA r=32", "core", adapter("randlora", rank=32),
           note="shared random bases (dense, regenerated from the seed) with trainable "
                "diagonals Lambda_i, Gamma_i; alpha = 20 r (PEFT's default)"),
]  # fmt: skip
"""Every method, one entry each."""


# ---- accounting ---------------------------------------------------------------------------------


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type == "meta" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _attribute_tensors(module: nn.Module):
    """Tensors a module holds outside its parameters and buffers: plain attributes, and
    the tensors of objects it refers to (e.g. random bases regenerated from a seed and
    shared by the layers), one level down."""
    for value in vars(module).values():
        if isinstance(value, (torch.Tensor, dict, list, tuple)):
            yield from _tensors(value)
        elif hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
            yield from _tensors(vars(value))


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model holds: parameters and buffers (frozen ones included) and tensors
    kept as attributes, each storage once."""
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        tensors.extend(_attribute_tensors(module))
    return held_bytes(tensors)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer's state (moments, projectors, steps; an inner optimizer's too)."""
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    return held_bytes(_tensors(optimizer.state_dict()["state"]))


def adapters(model: nn.Module) -> list[AdapterLinear]:
    return [m for m in model.modules() if isinstance(m, AdapterLinear)]


@torch.no_grad()
def merge_error(model: nn.Module, tokens: torch.Tensor) -> float | None:
    """``max |logits merged - logits| / max |logits|`` with every adapter merged into its
    base weight (then unmerged again); ``None`` for a model without adapters."""
    layers = adapters(model)
    if not layers:
        return None
    model.eval()
    reference = model(tokens)
    for layer in layers:
        layer.merge()
    merged = model(tokens)
    for layer in layers:
        layer.unmerge()
    model.train()
    return float((merged - reference).abs().max() / reference.abs().max())


def svd_reference_seconds(model: nn.Module, repeats: int = 3) -> float:
    """One ``torch.linalg.svd`` (thin, float32) of each adapted layer's weight, summed;
    the best of ``repeats``."""
    weights = [m.weight.detach() for n, m in model.named_modules() if is_adapted(n, m)]
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            torch.linalg.svd(w, full_matrices=False)
        best = min(best, time.perf_counter() - start)
    return best


# ---- training -----------------------------------------------------------------------------------


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def pretrain(config: Config, data: dict, out: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The base model's state dict, pretrained on the a-m domain, or loaded from the cache
    in ``out`` when one with the same configuration exists."""
    path = os.path.join(out, f"finetune-base-{config.base_key()}.pt")
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        return saved["state"], {**saved["info"], "cached": True, "file": os.path.basename(path)}
    torch.manual_seed(0)
    model = TinyLM(**config.model_args())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    warmup = max(1, config.pretrain_steps // 20)
    for step in range(config.pretrain_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.pretrain_lr * schedule(step, config.pretrain_steps, warmup)
        tokens, targets = batch(data["pretrain"]["train"], config.pretrain_batch,
                                config.context, g)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % max(1, config.pretrain_steps // 8) == 0:
            print(f"  pretrain step {step + 1:5d}  train loss {loss.item():.3f}", flush=True)
    info = {"seconds": time.perf_counter() - start, "steps": config.pretrain_steps,
            "batch": config.pretrain_batch, "lr": config.pretrain_lr, "key": config.base_key(),
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    os.makedirs(out, exist_ok=True)
    torch.save({"state": state, "info": info}, path)
    return state, {**info, "cached": False, "file": os.path.basename(path)}


def finetune(method: Method, rates: dict[str, float], base: dict, data: dict, evals: dict,
             config: Config) -> dict:  # fmt: skip
    """Fine-tunes a copy of the base model with ``method`` at its family's rate in
    ``rates``; the row."""
    lr = rates[method.family]
    torch.manual_seed(config.seed)
    model = TinyLM(**config.model_args())
    model.load_state_dict(base)
    setup = Setup(config=config, steps=config.steps, calibration=evals["calibration"],
                  rates=rates)  # fmt: skip
    init_seconds = init_first = 0.0
    if method.prepare is not None:
        # Timed twice: on a scratch copy first (one-time costs: the dispatcher's first
        # measurement of a shape, lazy imports), then on the model that trains.
        scratch = TinyLM(**config.model_args())
        scratch.load_state_dict(base)
        start = time.perf_counter()
        method.prepare(scratch, setup)
        init_first = time.perf_counter() - start
        del scratch
        start = time.perf_counter()
        method.prepare(model, setup)
        init_seconds = time.perf_counter() - start
    optimizer = method.optimizer(model, lr, setup)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the same training batches for every method
    g = torch.Generator().manual_seed(1 + config.seed)
    curve, times = [], []
    warmup = max(1, config.steps // 10)
    for step in range(config.steps):
        tokens, targets = batch(data["finetune"]["train"], config.batch, config.context, g)
        begin = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * schedule(step, config.steps, warmup)
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        times.append(time.perf_counter() - begin)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{method.name} at lr {lr:g}: the training loss is not finite")
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            curve.append((done, evaluate(model, evals["finetune"])))
    row = {
        "method": method.name,
        "family": method.family,
        "lr": lr,
        "note": method.note,
        "trainable_params": sum(p.numel() for p in trainable),
        "weight_bytes": weight_bytes(model),
        "optimizer_state_bytes": optimizer_bytes(optimizer),
        "val_loss_finetune": curve[-1][1],
        "val_loss_pretrain": evaluate(model, evals["pretrain"]),
        "selection_loss": evaluate(model, evals["selection"]),
        "ms_per_step": 1e3 * statistics.median(times[1:] or times),
        "init_seconds": init_seconds,
        "init_seconds_first_call": init_first,
        "adapted_layers": len(adapters(model)),
        "merge_error": merge_error(model, evals["finetune"][0][0]),
        "curve": curve,
    }
    if method.measure is not None:
        row.update(method.measure(model, optimizer))
    print(f"  {method.name:28s} lr {lr:<7g} finetune {row['val_loss_finetune']:.4f}  pretrain "
          f"{row['val_loss_pretrain']:.4f}  {row['ms_per_step']:.0f} ms/step  init "
          f"{1e3 * init_seconds:.1f} ms", flush=True)  # fmt: skip
    return row


def sweep(family: str, rates: list[float], known: dict[str, float], base, data, evals,
          config) -> tuple[dict, list]:  # fmt: skip
    """The run of the family's reference method with the lowest loss on the selection
    batches, and every (rate, loss) tried: ``rates``, extended by the grid's ratio past
    whichever end wins (at most twice), so the choice is never at the edge of what was
    tried unless the extensions ran out. ``known``: the rates of the families already
    chosen."""
    reference = next(m for m in METHODS if m.name == FAMILIES[family][0])
    runs: dict[float, dict] = {}

    def trial(lr: float) -> None:
        runs[lr] = finetune(reference, {**known, family: lr}, base, data, evals, config)
        print(f"  sweep {family:5s} {reference.name:24s} lr {lr:<9.3g} selection loss "
              f"{runs[lr]['selection_loss']:.4f}", flush=True)  # fmt: skip

    def loss(lr: float) -> float:
        return runs[lr]["selection_loss"]

    for lr in rates:
        trial(lr)
    ratio = rates[1] / rates[0] if len(rates) > 1 else None
    for _ in range(2 if ratio else 0):
        tried = sorted(runs)
        best = min(tried, key=loss)
        if best == tried[0]:
            trial(best / ratio)
        elif best == tried[-1]:
            trial(best * ratio)
        else:
            break
    best = min(runs, key=loss)
    return runs[best], [{"lr": lr, "selection_loss": loss(lr)} for lr in sorted(runs)]


# ---- the run ------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few steps (CI)")
    parser.add_argument("--methods", nargs="*", default=None, help="a subset, by name prefix")
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tuning steps (default 200; --quick 3)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0,
                        help="fine-tuning's seed (adapter init, batch order); the "
                        "pretrained base is the same for every seed")  # fmt: skip
    parser.add_argument("--out", default=os.path.join("bench", "out"))
    args = parser.parse_args(argv)
    config = quick_config() if args.quick else full_config()
    config.seed = args.seed
    if args.steps is not None:
        config.steps = check.positive_int("--steps", args.steps)
        config.eval_every = max(1, config.steps // 5)
    data = corpus(config.max_bytes)
    print("corpus (bytes): " + ", ".join(f"{d} {s} {len(t)}" for d, splits in data.items()
                                         for s, t in splits.items()))  # fmt: skip
    ctx, size, n = config.context, config.batch, config.eval_batches
    evals = {
        "finetune": fixed_batches(data["finetune"]["val"], n, size, ctx, seed=1234),
        "selection": fixed_batches(data["finetune"]["val"], n, size, ctx, seed=4321),
        "pretrain": fixed_batches(data["pretrain"]["val"], n, size, ctx, seed=1234),
        "calibration": fixed_batches(data["finetune"]["train"], config.calibration_batches,
                                     size, ctx, seed=99),
    }  # fmt: skip
    base, base_info = pretrain(config, data, args.out)
    probe = TinyLM(**config.model_args())
    probe.load_state_dict(base)
    base_info["val_loss_finetune"] = evaluate(probe, evals["finetune"])
    base_info["val_loss_pretrain"] = evaluate(probe, evals["pretrain"])
    svd_seconds = svd_reference_seconds(probe)
    print(f"base model: finetune-domain loss {base_info['val_loss_finetune']:.4f}, "
          f"pretrain-domain loss {base_info['val_loss_pretrain']:.4f}; one torch.linalg.svd "
          f"per adapted layer: {1e3 * svd_seconds:.1f} ms", flush=True)  # fmt: skip

    chosen = [m for m in METHODS
              if not args.methods or any(m.name.startswith(p) for p in args.methods)]  # fmt: skip
    rates, sweeps, done = {}, {}, {}
    for family in FAMILIES:  # in order: a later family's methods may read an earlier rate
        if any(family == m.family or family in m.reads for m in chosen):
            best, sweeps[family] = sweep(family, config.sweep[family], rates, base, data,
                                         evals, config)  # fmt: skip
            rates[family], done[best["method"]] = best["lr"], best
    # the sweep's best run is the reference method's row
    rows = [done.get(m.name) or finetune(m, rates, base, data, evals, config) for m in chosen]
    for row in rows:
        row["init_vs_svd"] = row["init_seconds"] / svd_seconds
    result = {
        "model": {**config.model_args(), "vocab": 256, "adapted": "every linear layer of the "
                  "blocks (q, k, v, o, gate, up, down)"},
        "config": dataclasses.asdict(config),
        "corpus": {"pretrain": "stdlib modules a-m", "finetune": "stdlib modules n-z",
                   "validation": "every tenth file of each domain, held out",
                   "bytes": {f"{d}/{s}": len(t) for d, sp in data.items() for s, t in sp.items()}},
        "base": base_info,
        "svd_reference_seconds": svd_seconds,
        "learning_rates": {
            family: {"lr": rates[family], "chosen_by": FAMILIES[family][0],
                     "why": FAMILIES[family][1], "sweep": sweeps[family],
                     "selected_on": "held-out fine-tuning batches other than the reported ones"}
            for family in rates},
        "schedule": "linear warm-up over 10% of the steps, cosine decay to 0.1x; gradient "
                    "norm clipped to 1; the same training batches for every method",
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "python": sys.version.split()[0], "torch": torch.__version__,
                    "lowrank": lowrank.__version__},
        "rows": rows,
        "targets": targets(rows, svd_seconds),
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "finetune.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(table(rows, base_info))
    for name, verdict in result["targets"].items():
        print(f"target {name}: {verdict}")
    plot(rows, base_info, os.path.join(args.out, "finetune.png"))
    print(f"wrote {path}")
    return result


def targets(rows: list[dict], svd_seconds: float) -> dict[str, Any]:
    """What each target of the SVD-parameterised adapters is judged on, from ``rows``: the
    measured numbers and whether the target is met (a target whose methods did not run
    is left out)."""
    by = {r["method"]: r for r in rows}
    loss = {name: r["val_loss_finetune"] for name, r in by.items()}
    out: dict[str, Any] = {}
    if "LoRA-SB r=16" in by and {"LoRA r=4", "LoRA-XS r=16"} <= set(by):
        sb, lora, xs = loss["LoRA-SB r=16"], loss["LoRA r=4"], loss["LoRA-XS r=16"]
        out["lora_sb"] = {
            "loss": sb, "lora_r4_loss": lora, "lora_xs_r16_loss": xs,
            "params_ratio_lora_r4_over_sb": by["LoRA r=4"]["trainable_params"]
            / by["LoRA-SB r=16"]["trainable_params"],
            "met": sb <= lora and sb < xs,
        }  # fmt: skip
    if "SORSA r=4" in by and "PiSSA r=4" in by:
        sorsa = by["SORSA r=4"]
        orthonormality, merge = sorsa.get("orthonormality_error"), sorsa["merge_error"]
        out["sorsa"] = {
            "loss": loss["SORSA r=4"], "pissa_loss": loss["PiSSA r=4"],
            "orthonormality_error": orthonormality, "merge_error": merge,
            "met": loss["SORSA r=4"] < loss["PiSSA r=4"] and orthonormality is not None
            and orthonormality < 1e-3 and merge <= 1e-6,
        }  # fmt: skip
    if ADALORA in by and "LoRA r=4" in by:
        ranks = by[ADALORA].get("final_ranks", {})
        average = statistics.fmean(ranks.values()) if ranks else None
        out["adalora"] = {
            "loss": loss[ADALORA], "lora_r4_loss": loss["LoRA r=4"], "average_final_rank":
            average, "distinct_final_ranks": sorted(set(ranks.values())),
            "rank_changes_during_training": by[ADALORA].get("rank_changes"),
            "met": bool(ranks) and loss[ADALORA] <= loss["LoRA r=4"] and average <= 4
            and len(set(ranks.values())) > 1 and bool(by[ADALORA].get("rank_changes")),
        }  # fmt: skip
    if {"LoRA-Pro r=4", "LoRA r=4", "Full fine-tuning"} <= set(by):
        gap = loss["LoRA r=4"] - loss["Full fine-tuning"]
        closed = (loss["LoRA r=4"] - loss["LoRA-Pro r=4"]) / gap if gap > 0 else None
        out["lora_pro"] = {
            "loss": loss["LoRA-Pro r=4"], "lora_r4_loss": loss["LoRA r=4"],
            "full_loss": loss["Full fine-tuning"], "gap_closed": closed,
            "met": closed is not None and closed >= 0.3,
        }  # fmt: skip
    out["init_faster_than_svd_per_layer"] = {
        name: {"init_seconds": r["init_seconds"], "svd_seconds": svd_seconds,
               "met": r["init_seconds"] < svd_seconds}
        for name, r in by.items() if r["adapted_layers"]
    }  # fmt: skip
    return out


def table(rows: list[dict], base: dict) -> str:
    lines = ["| method | lr | trainable params | weights + optimizer state | val loss n-z "
             "(fine-tuned) | val loss a-m (forgetting) | ms/step | init ms |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|",
             f"| pretrained base | | | | {base['val_loss_finetune']:.4f} | "
             f"{base['val_loss_pretrain']:.4f} | | |"]  # fmt: skip
    for r in rows:
        memory = (r["weight_bytes"] + r["optimizer_state_bytes"]) / 2**20
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} | "
                     f"{memory:.2f} MiB (state {r['optimizer_state_bytes'] / 2**20:.2f}) | "
                     f"{r['val_loss_finetune']:.4f} | {r['val_loss_pretrain']:.4f} | "
                     f"{r['ms_per_step']:.0f} | {1e3 * r['init_seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], base: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in rows:
        steps, losses = zip(*r["curve"])
        (line,) = left.plot(steps, losses, marker=".", label=r["method"])
        right.scatter(r["val_loss_finetune"], r["val_loss_pretrain"], color=line.get_color(),
                      s=20 + 8 * math.log10(max(1, r["trainable_params"])) ** 2)  # fmt: skip
        right.annotate(f"{r['method']} ({r['trainable_params']:,})",
                       (r["val_loss_finetune"], r["val_loss_pretrain"]), fontsize=6,
                       xytext=(4, 3), textcoords="offset points")  # fmt: skip
    left.axhline(base["val_loss_finetune"], color="grey", ls=":", label="pretrained base")
    left.set(xlabel="fine-tuning step", ylabel="validation loss on modules n-z (nats/byte)",
             title="fine-tuning on the standard library's modules n-z")  # fmt: skip
    right.axhline(base["val_loss_pretrain"], color="grey", ls=":")
    right.set(xlabel="validation loss n-z (fine-tuned domain)",
              ylabel="validation loss a-m (pretraining domain)",
              title="learned vs forgotten (marker size: trainable parameters)")  # fmt: skip
    left.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
