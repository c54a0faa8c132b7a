"""Calls lowrank's functions with malformed arguments; run in a subprocess by test_fuzz.py.

Each target starts from a valid call and hypothesis replaces one or two of its arguments
by something malformed: wrong types and dtypes, wrong ranks and sizes, zero sizes,
NaN/Inf, out-of-range, negative, unsorted or repeated indices, non-contiguous views and
outputs that overlap inputs. A call must either succeed or raise ValueError, TypeError,
IndexError or NotImplementedError with a message that names one of its arguments.
Before each call the case is written (and flushed) to the log, so when the process dies
of a signal the parent knows which call killed it. Findings go to a JSON file.

    python tests/fuzz_worker.py LOG RESULTS [EXAMPLES]
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank import compat, linalg, nn, ops, optim
from lowrank import sklearn as sk
from lowrank.ops import sketch, sltrain

ALLOWED = (ValueError, TypeError, IndexError, NotImplementedError)
# Asking for a size no machine has fails in torch's allocator, naming the bytes asked for.
OUT_OF_MEMORY = re.compile(
    r"can't allocate memory|out of memory|Storage size calculation overflowed"
)
# torch's own argument parser for torch.ops.lowrank.* raises RuntimeError naming the argument.
TORCH_PARSER = re.compile(r"Expected a value of type|expected at most|missing value for argument")


@dataclass
class Target:
    name: str
    fn: Callable[..., Any]
    kinds: dict[str, str]  # argument -> kind of malformed values to try
    valid: Callable[[], dict[str, Any]]
    through_torch_ops: bool = False
    aliases: tuple[str, ...] = ()  # other names its messages may use for its arguments


def f32(*shape):
    return torch.randn(*shape)


def support(out, inp, nnz, dtype=torch.int64):
    return torch.sort(torch.randperm(out * inp)[:nnz]).values.to(dtype)


def linear(i=6, o=4):
    return torch.nn.Linear(i, o)


def targets() -> list[Target]:
    t = []
    kron = {"x": f32(3, 12), "a": f32(3, 3), "b": f32(2, 4)}
    t.append(
        Target(
            "ops.kron_matmul",
            ops.kron_matmul,
            {"x": "tensor", "a": "tensor", "b": "tensor"},
            lambda: dict(kron),
        )
    )
    t.append(
        Target(
            "ops.kron_matmul_add",
            ops.kron_matmul_add,
            {"base": "tensor", "x": "tensor", "a": "tensor", "b": "tensor", "scale": "float"},
            lambda: {"base": f32(3, 6), **kron, "scale": 0.5},
        )
    )
    t.append(
        Target(
            "ops.kron_matmul_add_",
            ops.kron_matmul_add_,
            {"base": "out", "x": "tensor", "a": "tensor", "b": "tensor", "scale": "float"},
            lambda: {"base": f32(3, 6), **kron, "scale": 0.5},
        )
    )
    monarch = {"x": f32(5, 12), "w1": f32(4, 3, 3), "w2": f32(2, 5, 6)}
    t.append(
        Target(
            "ops.monarch_matmul",
            ops.monarch_matmul,
            {"x": "tensor", "w1": "tensor", "w2": "tensor"},
            lambda: dict(monarch),
        )
    )

    def sl_valid():
        return {
            "x": f32(4, 8),
            "B": f32(6, 2),
            "A": f32(2, 8),
            "values": f32(10),
            "indices": support(6, 8, 10),
            "scale": 0.5,
            "bias": f32(6),
            "path": "auto",
        }

    sl_kinds = {
        "x": "tensor",
        "B": "tensor",
        "A": "tensor",
        "values": "tensor",
        "indices": "index",
        "scale": "float",
        "bias": "tensor",
    }
    sl_matmul_kinds = {**sl_kinds, "path": "str"}
    t.append(Target("ops.sltrain_matmul", ops.sltrain_matmul, sl_matmul_kinds, sl_valid))
    t.append(
        Target(
            "ops.sltrain.sltrain_rebuild",
            sltrain.sltrain_rebuild,
            {
                "B": "tensor",
                "A": "tensor",
                "values": "tensor",
                "indices": "index",
                "scale": "float",
            },
            lambda: {
                k: v for k, v in sl_valid().items() if k in ("B", "A", "values", "indices", "scale")
            },
        )
    )
    t.append(
        Target(
            "ops.sltrain.sparse_matmul",
            sltrain.sparse_matmul,
            {
                "x": "tensor",
                "values": "tensor",
                "indices": "index",
                "rows": "int",
                "cols": "int",
                "transpose": "bool",
            },
            lambda: {
                "x": f32(4, 8),
                "values": f32(10),
                "indices": support(6, 8, 10),
                "rows": 6,
                "cols": 8,
                "transpose": False,
            },
        )
    )
    t.append(
        Target(
            "ops.sltrain.sampled_dot",
            sltrain.sampled_dot,
            {"dy": "tensor", "x": "tensor", "indices": "index"},
            lambda: {"dy": f32(4, 6), "x": f32(4, 8), "indices": support(6, 8, 10)},
        )
    )
    t.append(
        Target(
            "ops.sketch.philox_fill_",
            sketch.philox_fill_,
            {"out": "out", "kind": "int", "seed": "int", "stream": "int"},
            lambda: {"out": f32(7), "kind": 0, "seed": 3, "stream": 1},
        )
    )
    t.append(
        Target(
            "ops.sketch.srht_rows",
            sketch.srht_rows,
            {"a": "tensor", "signs": "tensor", "cols": "index", "n2": "int", "scale": "float"},
            lambda: {
                "a": f32(3, 5),
                "signs": f32(5).sign(),
                "cols": support(1, 8, 4),
                "n2": 8,
                "scale": 0.5,
            },
        )
    )
    t.append(
        Target(
            "ops.sketch.sparse_sign_rows",
            sketch.sparse_sign_rows,
            {"a": "tensor", "cols": "index", "signs": "tensor", "l": "int"},
            lambda: {
                "a": f32(3, 5),
                "cols": torch.stack([torch.randperm(4)[:2] for _ in range(5)]).int(),
                "signs": f32(5, 2).sign(),
                "l": 4,
            },
        )
    )
    # torch.ops.lowrank.*, the same ops reached without the Python wrappers
    t.append(
        Target(
            "torch.ops.lowrank.kron_matmul_backward",
            torch.ops.lowrank.kron_matmul_backward,
            {
                "grad": "tensor",
                "x": "tensor",
                "a": "tensor",
                "b": "tensor",
                "need_x": "bool",
                "need_factors": "bool",
            },
            lambda: {"grad": f32(3, 6), **kron, "need_x": True, "need_factors": True},
            through_torch_ops=True,
        )
    )
    t.append(
        Target(
            "torch.ops.lowrank.monarch_matmul_backward",
            torch.ops.lowrank.monarch_matmul_backward,
            {
                "grad": "tensor",
                "x": "tensor",
                "w1": "tensor",
                "w2": "tensor",
                "need_x": "bool",
                "need_w1": "bool",
                "need_w2": "bool",
                "h": "tensor",
            },
            lambda: {
                "grad": f32(5, 10),
                **monarch,
                "need_x": True,
                "need_w1": True,
                "need_w2": True,
                "h": f32(5, 12),
            },
            through_torch_ops=True,
        )
    )
    t.append(
        Target(
            "torch.ops.lowrank.monarch_matmul_with_h",
            torch.ops.lowrank.monarch_matmul_with_h,
            {"x": "tensor", "w1": "tensor", "w2": "tensor"},
            lambda: dict(monarch),
            through_torch_ops=True,
        )
    )

    def sl_backward_valid():
        v = sl_valid()
        return {
            "grad": f32(4, 6),
            "x": v["x"],
            "B": v["B"],
            "A": v["A"],
            "values": v["values"],
            "indices": v["indices"],
            "scale": 0.5,
            "path": 0,
            "need_x": True,
            "need_B": True,
            "need_A": True,
            "need_values": True,
            "w": f32(6, 8),
        }

    t.append(
        Target(
            "torch.ops.lowrank.sltrain_matmul_backward",
            torch.ops.lowrank.sltrain_matmul_backward,
            {
                "grad": "tensor",
                "x": "tensor",
                "B": "tensor",
                "A": "tensor",
                "values": "tensor",
                "indices": "index",
                "scale": "float",
                "path": "int",
                "w": "tensor",
            },
            sl_backward_valid,
            through_torch_ops=True,
        )
    )
    t.append(
        Target(
            "torch.ops.lowrank.sltrain_matmul_with_w",
            torch.ops.lowrank.sltrain_matmul_with_w,
            dict(sl_kinds),
            lambda: {k: v for k, v in sl_valid().items() if k != "path"},
            through_torch_ops=True,
        )
    )
    t.append(
        Target(
            "torch.ops.lowrank.sparse_matmul",
            torch.ops.lowrank.sparse_matmul,
            {"x": "tensor", "values": "tensor", "indices": "index", "rows": "int", "cols": "int"},
            lambda: {
                "x": f32(4, 8),
                "values": f32(10),
                "indices": support(6, 8, 10),
                "rows": 6,
                "cols": 8,
                "transpose": False,
            },
            through_torch_ops=True,
        )
    )
    t.append(
        Target(
            "torch.ops.lowrank.srht_rows",
            torch.ops.lowrank.srht_rows,
            {"a": "tensor", "cols": "index", "n2": "int"},
            lambda: {
                "a": f32(3, 5),
                "signs": f32(5).sign(),
                "cols": support(1, 8, 4),
                "n2": 8,
                "scale": 0.5,
            },
            through_torch_ops=True,
        )
    )
    # randomized SVD family
    t.append(
        Target(
            "linalg.rsvd",
            linalg.rsvd,
            {
                "A": "tensor",
                "rank": "int",
                "oversample": "int",
                "n_iter": "int",
                "normalizer": "str",
                "sketch": "str",
                "tol": "float",
                "seed": "int",
                "init": "tensor",
            },
            lambda: {
                "A": f32(12, 9),
                "rank": 3,
                "oversample": 2,
                "n_iter": 1,
                "normalizer": "auto",
                "sketch": "gaussian",
                "tol": None,
                "seed": 0,
                "init": None,
            },
        )
    )
    t.append(
        Target(
            "linalg.rsvd out-of-core",
            linalg.rsvd,
            {"A": "array", "rank": "int", "max_memory": "int", "n_iter": "int"},
            lambda: {
                "A": np.random.default_rng(0).standard_normal((12, 9)),
                "rank": 3,
                "max_memory": 4 * 9 * 8,
                "n_iter": 1,
                "progress": False,
            },
        )
    )
    t.append(
        Target(
            "linalg.pca",
            linalg.pca,
            {"A": "tensor", "rank": "int", "center": "bool", "tol": "float"},
            lambda: {"A": f32(12, 9), "rank": 3, "center": True, "tol": None, "seed": 0},
        )
    )
    t.append(
        Target(
            "linalg.nystrom_eigh",
            linalg.nystrom_eigh,
            {"A": "tensor", "rank": "int", "oversample": "int"},
            lambda: {"A": (lambda g: g @ g.T)(f32(8, 8)), "rank": 2, "oversample": 2, "seed": 0},
        )
    )

    def err_valid():
        a = f32(10, 7)
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return {
            "A": a,
            "U": u[:, :3],
            "S": s[:3],
            "Vh": vh[:3],
            "norm": "fro",
            "probes": 4,
            "seed": 0,
        }

    t.append(
        Target(
            "linalg.svd_error",
            linalg.svd_error,
            {
                "A": "tensor",
                "U": "tensor",
                "S": "tensor",
                "Vh": "tensor",
                "norm": "str",
                "probes": "int",
            },
            err_valid,
        )
    )
    t.append(
        Target(
            "linalg.nearest_kronecker",
            linalg.nearest_kronecker,
            {"w": "tensor", "a_shape": "pair", "b_shape": "pair", "terms": "int"},
            lambda: {"w": f32(6, 8), "a_shape": (3, 2), "b_shape": (2, 4), "terms": 1},
        )
    )
    t.append(
        Target(
            "linalg.monarch_project",
            linalg.monarch_project,
            {"w": "tensor", "nblocks": "int", "rank": "int"},
            lambda: {"w": f32(8, 8), "nblocks": 2, "rank": 1},
        )
    )

    def streaming(shape, rank, block, rows):
        sketch_ = linalg.StreamingSVD(shape, rank, seed=0)
        sketch_.update(block, rows=rows)
        return sketch_.result()

    t.append(
        Target(
            "linalg.StreamingSVD",
            streaming,
            {"shape": "pair", "rank": "int", "block": "tensor", "rows": "slice"},
            lambda: {"shape": (6, 5), "rank": 2, "block": f32(6, 5), "rows": slice(0, 6)},
        )
    )
    # layers
    layer_size = {"in_features": "int", "out_features": "int", "input": "tensor"}
    t.append(
        Target(
            "nn.KronLinear",
            lambda in_features, out_features, input: nn.KronLinear(in_features, out_features)(
                input
            ),
            layer_size,
            lambda: {"in_features": 6, "out_features": 4, "input": f32(3, 6)},
        )
    )
    t.append(
        Target(
            "nn.MonarchLinear",
            lambda in_features, out_features, nblocks, input: nn.MonarchLinear(
                in_features, out_features, nblocks
            )(input),
            {**layer_size, "nblocks": "int"},
            lambda: {"in_features": 8, "out_features": 6, "nblocks": 2, "input": f32(3, 8)},
        )
    )
    t.append(
        Target(
            "nn.SLTrainLinear",
            lambda in_features, out_features, rank, sparsity, input: nn.SLTrainLinear(
                in_features, out_features, rank, sparsity, seed=0
            )(input),
            {**layer_size, "rank": "int", "sparsity": "float"},
            lambda: {
                "in_features": 8,
                "out_features": 6,
                "rank": 2,
                "sparsity": 0.2,
                "input": f32(3, 8),
            },
        )
    )
    t.append(
        Target(
            "nn.KronAdapter",
            lambda base, rank, factor, input: nn.KronAdapter(base, rank=rank, factor=factor)(input),
            {"base": "module", "rank": "int", "factor": "int", "input": "tensor"},
            lambda: {"base": linear(), "rank": 2, "factor": -1, "input": f32(3, 6)},
        )
    )
    t.append(
        Target(
            "nn.SLTrainLinear.from_dense",
            nn.SLTrainLinear.from_dense,
            {"weight": "tensor", "rank": "int", "sparsity": "float"},
            lambda: {"weight": f32(6, 8), "rank": 2, "sparsity": 0.1, "seed": 0},
        )
    )
    t.append(
        Target(
            "nn.MonarchLinear.from_dense",
            nn.MonarchLinear.from_dense,
            {"linear_or_weight": "tensor", "nblocks": "int", "rank": "int"},
            lambda: {"linear_or_weight": f32(6, 8), "nblocks": 2, "rank": 1},
            aliases=("weight",),
        )
    )
    t.append(
        Target(
            "nn.KronLinear.from_dense",
            nn.KronLinear.from_dense,
            {"linear_or_weight": "tensor", "terms": "int"},
            lambda: {"linear_or_weight": f32(6, 8), "terms": 1},
            aliases=("weight",),
        )
    )
    t.append(
        Target(
            "nn.lokr_factorization",
            nn.kron_adapter.lokr_factorization,
            {"dimension": "int", "factor": "int"},
            lambda: {"dimension": 12, "factor": -1},
        )
    )
    targets_of_conversion(t)
    targets_of_optimizers_and_estimators(t)
    return t


def small_model():
    return torch.nn.Sequential(linear(6, 8), torch.nn.ReLU(), linear(8, 4))


# The SVD-parameterised kinds: each one's valid options and how to malform them (the shared
# ones: dropout, seed, and for the SVD-based inits svd and n_iter). Their configurations are
# fuzzed through convert, which builds them from these options.
_SVD = ({"svd": "randomized", "n_iter": 1, "seed": 0, "dropout": 0.1},
        {"svd": "str", "n_iter": "int", "seed": "int", "dropout": "float"})  # fmt: skip
SVD_KIND_OPTIONS = {
    "lora_xs": ({**_SVD[0], "alpha": 4.0, "sigma": 1e-3},
                {**_SVD[1], "alpha": "float", "sigma": "float"}),
    "lora_sb": ({**_SVD[0], "lr": 1e-2, "update": "sign"},
                {**_SVD[1], "lr": "float", "update": "str"}),
    "sorsa": _SVD,
    "svfit": _SVD,
    "loldu": ({"alpha": 2.0, "init_diagonal": "normal", "train_scale": True, "seed": 0,
               "dropout": 0.1},
              {"alpha": "float", "init_diagonal": "str", "train_scale": "bool", "seed": "int",
               "dropout": "float"}),
}  # fmt: skip


def squared_output(_batch, output):
    return output.square().mean()


def svd_kind_conversion(kind: str) -> Target:
    """``convert`` of a small model to an SVD-parameterised kind with a malformed rank or
    option; LoRA-SB gets calibration batches and a loss."""
    valid, kinds = SVD_KIND_OPTIONS[kind]
    extra = {}
    if kind == "lora_sb":
        g = torch.Generator().manual_seed(0)
        batches = [torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)]
        extra = {"calibration": batches, "loss": squared_output}

    def call(model, rank, **options):
        return nn.convert(model, kind, rank=rank, progress=False, **extra, **options)

    return Target(f"nn.convert[{kind}]", call, {"rank": "int", **kinds},
                  lambda: {"model": small_model(), "rank": 2, **valid})  # fmt: skip


def targets_of_conversion(t: list[Target]) -> None:
    """Whole-model conversion, the kinds' configurations, and loading a saved model."""
    t.append(
        Target(
            "nn.convert",
            lambda model, kind, rank, params, filter, allocation: nn.convert(
                model, kind, rank=rank, params=params, filter=filter, allocation=allocation,
                progress=False,
            ),
            {"model": "module", "kind": "str", "rank": "int", "params": "float", "filter": "str",
             "allocation": "str"},
            lambda: {"model": small_model(), "kind": "lowrank", "rank": 2, "params": None,
                     "filter": None, "allocation": "global"},
        )
    )  # fmt: skip
    configs = (
        (nn.LoRAConfig, {"rank": 2, "alpha": 4.0, "init": "pissa", "rho": 2.0},
         {"rank": "int", "alpha": "float", "init": "str", "rho": "float"}),
        (nn.MonarchConfig, {"nblocks": 2, "rank": 1}, {"nblocks": "int", "rank": "int"}),
        (nn.SLTrainConfig, {"rank": 2, "sparsity": 0.1, "alpha": 8.0},
         {"rank": "int", "sparsity": "float", "alpha": "float"}),
        (nn.KronConfig, {"factors": ((2, 2), (4, 3)), "terms": 1},
         {"factors": "pair", "terms": "int"}),
        (nn.LowRankConfig, {"rank": 2, "tol": 0.1}, {"rank": "int", "tol": "float"}),
        (nn.AdaLoRAConfig, {"rank": 4, "target_rank": 2, "total_steps": 10, "t_init": 2,
                            "t_final": 2, "delta_t": 1, "beta1": 0.85, "orth_reg_weight": 0.1},
         {"rank": "int", "target_rank": "int", "total_steps": "int", "t_init": "int",
          "t_final": "int", "delta_t": "int", "beta1": "float", "orth_reg_weight": "float"}),
        (nn.ALLoRAConfig, {"rank": 2, "eta": 1.0}, {"rank": "int", "eta": "float"}),
    )  # fmt: skip
    for config, valid, kinds in configs:
        t.append(Target(f"nn.{config.__name__}", config, kinds, lambda v=valid: dict(v)))
    for kind in SVD_KIND_OPTIONS:
        t.append(svd_kind_conversion(kind))
    saved = tempfile.mkdtemp()
    model = small_model()
    nn.convert(model, "lowrank", rank=2, progress=False)
    nn.save(model, saved)
    t.append(
        Target(
            "nn.load",
            nn.load,
            {"model": "module"},
            lambda: {"model": small_model(), "directory": saved},
        )
    )


def galore_step(lr, rank, update_proj_gap, scale, proj_type, grad):
    # A gradient of another shape or dtype cannot be attached (torch refuses): the parameter
    # takes the gradient's shape and dtype, so what reaches the optimizer is the malformed part.
    like = isinstance(grad, torch.Tensor) and grad.is_floating_point()
    weight = torch.nn.Parameter(torch.zeros_like(grad) if like else torch.zeros(8, 6))
    group = {"params": [weight], "rank": rank, "update_proj_gap": update_proj_gap,
             "scale": scale, "proj_type": proj_type}  # fmt: skip
    optimizer = optim.GaLoreAdamW([group], lr=lr)
    weight.grad = grad if like else None
    optimizer.step()


def pca_fit(X, n_components, svd_solver, iterated_power):
    sk.PCA(n_components, svd_solver=svd_solver, iterated_power=iterated_power,
           random_state=0).fit(X)  # fmt: skip


def targets_of_optimizers_and_estimators(t: list[Target]) -> None:
    """GaLore, the scikit-learn estimators and the torch / scikit-learn drop-ins."""
    t.append(
        Target(
            "optim.GaLoreAdamW.step",
            galore_step,
            {"lr": "float", "rank": "int", "update_proj_gap": "int", "scale": "float",
             "proj_type": "str", "grad": "tensor"},
            lambda: {"lr": 1e-3, "rank": 2, "update_proj_gap": 10, "scale": 0.25,
                     "proj_type": "std", "grad": f32(8, 6)},
        )
    )  # fmt: skip
    t.append(
        Target(
            "sklearn.PCA.fit",
            pca_fit,
            {"X": "array", "n_components": "int", "svd_solver": "str", "iterated_power": "int"},
            lambda: {"X": np.random.default_rng(0).standard_normal((20, 6)), "n_components": 2,
                     "svd_solver": "randomized", "iterated_power": 2},
            # scikit-learn's own wording for a malformed X, which the estimator keeps
            aliases=("array", "n_samples"),
        )
    )  # fmt: skip
    t.append(
        Target(
            "compat.svd_lowrank",
            compat.svd_lowrank,
            {"A": "tensor", "q": "int", "niter": "int"},
            lambda: {"A": f32(10, 7), "q": 3, "niter": 2},
        )
    )
    t.append(
        Target(
            "compat.randomized_svd",
            compat.randomized_svd,
            {"M": "array", "n_components": "int", "n_iter": "int"},
            lambda: {"M": np.random.default_rng(0).standard_normal((12, 7)), "n_components": 3,
                     "n_iter": 2},
        )
    )  # fmt: skip


# ---- malformed values ----------------------------------------------------------------------


@st.composite
def bad_tensor(draw, valid: Any):
    shape = tuple(valid.shape) if isinstance(valid, torch.Tensor) else (3,)
    base = valid if isinstance(valid, torch.Tensor) else torch.randn(shape)
    how = draw(st.sampled_from(["object", "rank", "size", "dtype", "special", "strided", "empty"]))
    if how == "object":
        return draw(
            st.sampled_from([None, 3, 2.5, "x", [1.0, 2.0], np.ones(shape, dtype=np.float32)])
        )
    if how == "rank":
        return torch.randn([2] * draw(st.integers(0, 4)))
    if how == "size":
        dims = list(shape) or [1]
        i = draw(st.integers(0, len(dims) - 1))
        dims[i] = draw(st.sampled_from([0, max(0, dims[i] - 1), dims[i] + 1, 1]))
        return torch.randn(*dims)
    if how == "dtype":
        dtype = draw(
            st.sampled_from(
                [
                    torch.int64,
                    torch.int32,
                    torch.bool,
                    torch.complex64,
                    torch.float16,
                    torch.bfloat16,
                    torch.float64,
                    torch.uint8,
                ]
            )
        )
        return base.to(dtype)
    if how == "special":
        out = base.clone().contiguous()
        if out.numel():
            value = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, 0.0]))
            out.view(-1)[draw(st.integers(0, out.numel() - 1))] = value
        return out
    if how == "strided":
        if base.dim() >= 2:
            return base.mT.contiguous().mT
        return torch.randn(base.numel() * 2)[::2].reshape(base.shape) if base.dim() else base
    return torch.empty(0)


def bad_index(valid: Any):
    v = valid if isinstance(valid, torch.Tensor) else torch.arange(3)
    return st.sampled_from(
        [
            v + 10_000,
            v - 10_000,
            v.flip(0),
            torch.cat((v, v)) if v.dim() == 1 else v.repeat(2, 1),
            v.float(),
            v.to(torch.int16),
            v.reshape(1, -1),
            torch.tensor(-1),
            torch.empty(0, dtype=v.dtype),
            torch.full_like(v, 2**31 - 1),
            None,
            [0, 1],
            v.to(torch.int64) * -1,
            v.double().sqrt(),
        ]
    )


KINDS = {
    "int": st.sampled_from([-1, 0, -(2**40), 2**40, True, 1.5, "3", None, np.int64(2), 10**30]),
    "float": st.sampled_from([math.nan, math.inf, -math.inf, -1.0, "x", None, True, 1e300]),
    "bool": st.sampled_from([2, "yes", None, 1.0]),
    "str": st.sampled_from(["bogus", None, 3, "", "AUTO"]),
    "pair": st.sampled_from([(0, 2), (-1, 3), (2,), (1, 2, 3), None, "ab", (2.5, 1), (10**12, 2)]),
    "slice": st.sampled_from(
        [slice(0, 100), slice(5, 2), slice(0, 6, 2), 3, None, slice(-2, None)]
    ),
    "module": st.sampled_from([None, torch.nn.ReLU(), torch.nn.Linear(7, 4), 3]),
    "array": st.sampled_from(
        [
            np.ones((3,)),
            np.ones((4, 3), dtype=np.int32),
            np.full((5, 4), np.nan),
            np.ones((0, 4)),
            np.ones((3, 4, 2)),
            np.ones((4, 3), dtype=np.complex64),
            [[1.0]],
        ]
    ),
}


def malformed(kind: str, valid: Any, everything: dict) -> st.SearchStrategy:
    if kind == "tensor":
        return bad_tensor(valid)
    if kind == "index":
        return bad_index(valid)
    if kind == "out":  # overlaps another tensor argument, or is malformed
        others = [
            v for k, v in everything.items() if isinstance(v, torch.Tensor) and v is not valid
        ]
        views = [
            o.view(-1)[: valid.numel()].view(valid.shape)
            for o in others
            if o.is_contiguous() and o.numel() >= valid.numel() and o.dtype == valid.dtype
        ]
        return st.one_of(bad_tensor(valid), st.sampled_from(views)) if views else bad_tensor(valid)
    return KINDS[kind]


# ---- the run -------------------------------------------------------------------------------


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}:{value.dtype}:{'c' if value.is_contiguous() else 'nc'}"
    if isinstance(value, np.ndarray):
        return f"ndarray{value.shape}:{value.dtype}"
    return repr(value)[:40]


def main(log_path: str, results_path: str, examples: int) -> None:
    warnings.simplefilter("ignore")
    findings: list[dict] = []
    with open(log_path, "w", buffering=1) as log:
        for target in targets():
            fuzz(target, examples, log, findings)
    with open(results_path, "w") as out:
        json.dump(findings, out, indent=1)


def fuzz(target: Target, examples: int, log, findings: list) -> None:
    """``examples`` hypothesis cases of ``target``; findings are appended."""

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data):
        args = target.valid()
        names = data.draw(
            st.lists(st.sampled_from(sorted(target.kinds)), min_size=1, max_size=2, unique=True)
        )
        for name in names:
            args[name] = data.draw(malformed(target.kinds[name], args.get(name), args))
        case = f"{target.name}({', '.join(f'{k}={describe(v)}' for k, v in args.items())})"
        log.write(case + "\n")
        try:
            target.fn(**args)
        except ALLOWED as error:
            message = str(error)
            names = [*args, *target.kinds, *target.aliases]
            if not any(re.search(rf"\b{re.escape(k)}\b", message) for k in names):
                error = f"{type(error).__name__}: {message}"
                findings.append({"case": case, "kind": "message names no argument", "error": error})
        except RuntimeError as error:
            parser = target.through_torch_ops and TORCH_PARSER.search(str(error))
            if not (parser or OUT_OF_MEMORY.search(str(error))):
                findings.append({"case": case, "kind": "RuntimeError", "error": str(error)[:300]})
        except Exception as error:  # every other type is a finding
            findings.append({"case": case, "kind": type(error).__name__, "error": str(error)[:300]})

    run()
    log.write(f"done {target.name}\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 25)
