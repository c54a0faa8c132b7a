"""GaLoreAdamW's variants (Fira, FRUGAL, DCT and random-column projectors, quantized
projectors, Q-GaLore's lazy refresh) against references written here from the papers'
equations (dense, plain torch), compared update by update; memory; resumption; bad
input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import relative_error
from torch import nn

from lowrank.optim import GaLoreAdamW
from lowrank.optim.projector import dct, dequantize, quantize

# ---- the reference -------------------------------------------------------------------------


def dct_matrix(n):
    """The orthonormal DCT-II basis, one cosine per column (dense, n x n)."""
    j = torch.arange(n, dtype=torch.float64)
    q = torch.cos(math.pi * (2 * j[:, None] + 1) * j[None, :] / (2 * n)) * math.sqrt(2 / n)
    q[:, 0] = math.sqrt(1 / n)
    return q


def reference_quantize(p, bits, group):
    """Per group of ``group`` consecutive elements: min-max grid of 2^bits levels."""
    flat = p.reshape(-1).float()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), group):
        x = flat[start : start + group]
        lo, hi = x.min(), x.max()
        step = (hi - lo) / (2**bits - 1)
        q = torch.zeros_like(x) if step == 0 else torch.clamp(torch.round((x - lo) / step), 0,
                                                             2**bits - 1)  # fmt: skip
        out[start : start + group] = lo + q * step
    return out.view(p.shape)


class Reference:
    """GaLore's AdamW (the projector of the gradient at step % gap == 0, moments kept, or
    with ``reset`` zeroed at each new projector and bias-corrected from there, the
    bias-corrected step, back-projection times scale, weight decay after) with dense
    projector matrices ``L`` (m x r, or None) and ``Rt`` (n x r, or None): R = L^T G Rt.

    projector: "svd" (exact), "dct" (top-r columns of G Q by norm), "random" (the
    documented draw); bits: the projector quantized; residual: Fira (phi per row/column
    of the kept side, the norm-growth limiter) or FRUGAL (sign/plain SGD at residual_lr);
    lazy: Q-GaLore's growing intervals (similarity ||P_old^T P_new||^2 / r)."""

    def __init__(self, groups, lr, *, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 projector="svd", bits=None, group_size=256, residual=None, gamma=1.01,
                 residual_lr=None, lazy=None, reset=False):  # fmt: skip
        self.groups, self.lr, self.betas, self.eps, self.wd = groups, lr, betas, eps, weight_decay
        self.projector, self.bits, self.group_size = projector, bits, group_size
        self.residual, self.gamma, self.residual_lr, self.lazy = residual, gamma, residual_lr, lazy
        self.reset = reset
        self.state, self.seed, self.refreshes, self.limited = {}, 0, [], 0

    @staticmethod
    def side(shape, proj_type):
        m, n = shape
        return {"std": "right" if m >= n else "left",
                "reverse_std": "left" if m >= n else "right"}.get(proj_type, proj_type)  # fmt: skip

    def choose(self, g, side, r):
        m, n = g.shape
        left = right = None
        if self.projector == "svd":
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            left, right = u[:, :r], vh[:r].T
        elif self.projector == "dct":
            qm, qn = dct_matrix(m).to(g.dtype), dct_matrix(n).to(g.dtype)
            rows = torch.argsort((qm.T @ g).norm(dim=1), descending=True)[:r]
            cols = torch.argsort((g @ qn).norm(dim=0), descending=True)[:r]
            left, right = qm[:, rows], qn[:, cols]
        else:  # one batch per refresh here: seed + 1; the rows drawn first, then the columns
            self.seed += 1
            generator = torch.Generator().manual_seed(self.seed)
            if side in ("left", "full"):
                left = torch.eye(m, dtype=g.dtype)[:, torch.randperm(m, generator=generator)[:r]]
            if side in ("right", "full"):
                right = torch.eye(n, dtype=g.dtype)[:, torch.randperm(n, generator=generator)[:r]]
        if self.bits:  # groups run along GaLore's layouts: U_r (m x r) and V_r^T (r x n)
            left = reference_quantize(left, self.bits, self.group_size).to(g.dtype)
            right = reference_quantize(right.T, self.bits, self.group_size).T.to(g.dtype)
        if side == "full":
            return left, right
        return (left, None) if side == "left" else (None, right)

    @staticmethod
    def project(P, g):
        left, right = P
        if left is not None:
            g = left.T @ g
        return g @ right if right is not None else g

    @staticmethod
    def back(P, low):
        left, right = P
        if right is not None:
            low = low @ right.T
        return left @ low if left is not None else low

    @staticmethod
    def overlap(P, Q):
        factors = [(a, b) for a, b in zip(P, Q) if a is not None]
        r = factors[0][0].shape[1]
        inner = torch.eye(r, dtype=factors[0][0].dtype)
        for a, b in factors:  # ||L^T L' (R'^T R)||^2 / r for full, one factor otherwise
            inner = inner @ (a.T @ b) if a is factors[0][0] else (a.T @ b) @ inner.T
        return float((inner.square().sum()) / r)

    def due(self, st, gap):
        if "P" not in st:
            return True
        if self.lazy:
            return st["step"] >= st["at"]
        return st["step"] % gap == 0

    def refresh(self, st, g, side, group):
        gap = group["update_proj_gap"]
        new = self.choose(g, side, group["rank"])
        if self.lazy:
            threshold, queue, growth = self.lazy
            interval, similar = st.get("interval", gap), st.get("similar", 0)
            if "P" in st:
                if self.overlap(st["P"], new) >= threshold:
                    similar += 1
                    if similar >= queue:
                        interval, similar = int(interval * growth), 0
                else:
                    similar = 0
            st.update(interval=interval, similar=similar, at=st["step"] + interval)
        if self.reset and "P" in st:
            st.pop("m", None), st.pop("v", None)
            st["t0"] = st["step"]
        st["P"] = new
        self.refreshes.append(st["step"])

    def step(self):
        b1, b2 = self.betas
        for group in self.groups:
            for p in group["params"]:
                st = self.state.setdefault(id(p), {"step": 0})
                g = p.grad
                galore = "rank" in group and p.dim() == 2
                if galore:
                    side = self.side(p.shape, group["proj_type"])
                    if self.due(st, group["update_proj_gap"]):
                        self.refresh(st, g, side, group)
                    full, g = g, self.project(st["P"], g)
                if "m" not in st:
                    st["m"], st["v"] = torch.zeros_like(g), torch.zeros_like(g)
                st["step"] += 1
                t = st["step"] - st.get("t0", 0)
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                size = self.lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                psi = st["m"] / (st["v"].sqrt() + self.eps)
                update = psi
                if galore:
                    update = self.back(st["P"], psi) * group["scale"]
                    rest = full - self.back(st["P"], g)
                    if self.residual == "fira":
                        update = update + self.fira(st, side, rest, g, psi)
                with torch.no_grad():
                    p.sub_(size * update)
                    if galore and self.residual in ("sgd", "signsgd"):
                        rate = self.lr if self.residual_lr is None else self.residual_lr
                        p.sub_(rate * (torch.sign(rest) if self.residual == "signsgd" else rest))
                    if self.wd:
                        p.sub_(self.lr * self.wd * p)

    def fira(self, st, side, rest, R, psi):
        if side == "right":  # R is m x r: one factor per row
            phi = torch.diag(psi.norm(dim=1) / R.norm(dim=1))
            scaled = phi @ rest
        elif side == "left":  # R is r x n: one factor per column
            scaled = rest @ torch.diag(psi.norm(dim=0) / R.norm(dim=0))
        else:
            scaled = rest * (psi.norm() / R.norm())
        norm = scaled.norm()
        if "fira" in st and norm > self.gamma * st["fira"]:
            scaled = scaled * (self.gamma * st["fira"] / norm)
            norm = self.gamma * st["fira"]
            self.limited += 1
        st["fira"] = norm
        return scaled


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)  # weight 20 x 12: m >= n
        self.down = nn.Linear(20, 6)  # weight 6 x 20: m < n

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(64, 12, generator=g, dtype=dtype),
            torch.randn(64, 6, generator=g, dtype=dtype))  # fmt: skip


def groups_of(model, proj_type, rank=4, gap=5, which=("up", "down")):
    projected = [getattr(model, name).weight for name in which]
    plain = [p for n, p in model.named_parameters() if not any(n == w + ".weight" for w in which)]
    return [{"params": plain}, {"params": projected, "rank": rank, "update_proj_gap": gap,
                                "scale": 0.5, "proj_type": proj_type}]  # fmt: skip


def train(model, optimizer, steps, x, y):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def compare(options, reference_options, proj_type, steps=13, which=("up", "down"), tol=1e-9,
            dtype=torch.float64, **group):  # fmt: skip
    torch.manual_seed(0)
    ours = Net().to(dtype)
    theirs = copy.deepcopy(ours)
    optimizer = GaLoreAdamW(groups_of(ours, proj_type, which=which, **group), lr=1e-2,
                            weight_decay=0.1, **options)  # fmt: skip
    reference = Reference(groups_of(theirs, proj_type, which=which, **group), lr=1e-2,
                          weight_decay=0.1, **reference_options)  # fmt: skip
    x, y = data(dtype)
    for _ in range(steps):  # refreshes at steps 0, 5, 10
        for model in (ours, theirs):
            model.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        reference.step()
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert relative_error(a, b) <= tol, name
    return optimizer, reference


# ---- update by update -------------------------------------------------------------------------

PROJ_TYPES = ["std", "reverse_std", "full"]


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("gamma", [1.01, 1.5])
def test_fira_matches_the_reference(proj_type, gamma):
    optimizer, reference = compare({"svd": "exact", "residual": "fira", "limiter_gamma": gamma},
                                   {"residual": "fira", "gamma": gamma}, proj_type)  # fmt: skip
    if gamma == 1.01:
        assert reference.limited > 0  # the limiter acted
    assert all("fira_norm" in optimizer.state[p] for p in optimizer.param_groups[1]["params"])


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("residual", ["sgd", "signsgd"])
def test_frugal_matches_the_reference(proj_type, residual):
    compare({"svd": "exact", "residual": residual, "residual_lr": 3e-3},
            {"residual": residual, "residual_lr": 3e-3}, proj_type)  # fmt: skip


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_dct_projector_matches_the_reference(proj_type):
    optimizer, _ = compare({"projector": "dct"}, {"projector": "dct", "reset": True}, proj_type)
    state = optimizer.state[optimizer.param_groups[1]["params"][0]]
    assert state["projector_index"].dtype == torch.int32 and "projector" not in state


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_random_columns_with_signsgd_match_the_reference(proj_type):
    """FRUGAL's RandK: one projected weight, so each refresh is one batch (seed + 1)."""
    _, reference = compare({"projector": "random", "residual": "signsgd"},
                           {"projector": "random", "residual": "signsgd", "reset": True},
                           proj_type,
                           which=("up",))  # fmt: skip
    assert reference.refreshes == [0, 5, 10]


@pytest.mark.parametrize(("options", "reset"), [({"svd": "exact", "reset_moments": True}, True),
                                              ({"projector": "dct", "reset_moments": False}, False),
                                              ({"projector": "random", "reset_moments": False},
                                               False)])  # fmt: skip
def test_reset_moments_overrides_the_default(options, reset):
    """The SVD projector keeps its moments unless told; the index projections restart them
    unless told (the reference: moments zeroed at a new projector, bias correction from
    there)."""
    reference = {"projector": options.get("projector", "svd"), "reset": reset}
    optimizer, _ = compare(options, reference, "std", which=("up",))
    state = optimizer.state[optimizer.param_groups[1]["params"][0]]
    assert ("moments_from" in state) == reset and state.get("moments_from", 10) == 10


def test_random_columns_do_not_inherit_another_columns_moments():
    """A column drawn afresh starts from zero moments: its first update after a refresh is
    Adam's first step, -lr sign(g) at bias correction 1, whatever the previous columns saw."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    optimizer = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 3}], lr=0.1,
                            eps=1e-12, projector="random")  # fmt: skip
    for step in range(4):
        w.grad = torch.randn(8, 6, dtype=torch.float64)
        before = w.detach().clone()
        optimizer.step()
        if step == 3:  # the refresh at step 3 drew new columns
            index = optimizer.state[w]["projector_index"].long()
            change = (w.detach() - before)[:, index]
            torch.testing.assert_close(change, -0.1 * w.grad[:, index].sign(), rtol=1e-9,
                                       atol=1e-12)  # fmt: skip


def test_float64_weights_with_quantized_projectors_warm_start():
    """The randomized refresh warm-starts from the dequantized projector at the gradient's
    precision (float64 here), through several refreshes."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(20, 12, dtype=torch.float64))
    for options in ({"projector_bits": 8}, {"projector_bits": 4, "group_size": 16},
                    {"projector_bits": 4, "group_size": 16, "lazy_refresh": True,
                     "cos_threshold": 0.0, "queue_size": 1}):  # fmt: skip
        optimizer = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 2}], lr=1e-3,
                                **options)  # fmt: skip
        for _ in range(7):
            w.grad = torch.randn(20, 12, dtype=torch.float64)
            optimizer.step()
        assert len(optimizer.refresh_log) >= 3 and bool(torch.isfinite(w).all())


def test_weights_of_one_shape_and_two_dtypes_keep_their_own_state_dtype():
    a = nn.Parameter(torch.randn(20, 12))
    b = nn.Parameter(torch.randn(20, 12, dtype=torch.float64))
    optimizer = GaLoreAdamW([{"params": [a, b], "rank": 3}], lr=1e-3)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    optimizer.step()
    for p in (a, b):
        state = optimizer.state[p]
        assert {state[k].dtype for k in ("projector", "exp_avg", "exp_avg_sq")} == {p.dtype}


def test_dct_by_fft_is_the_dense_transform():
    x = torch.randn(3, 5, 17, dtype=torch.float64)
    for n in (17, 16):
        assert relative_error(dct(x[..., :n]), x[..., :n] @ dct_matrix(n)) <= 1e-13
    assert relative_error(dct(x, -2), (x.mT @ dct_matrix(5)).mT) <= 1e-13


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_projector_matches_the_reference(bits):
    """The projector quantized by groups (min-max grid), used dequantized."""
    compare({"svd": "exact", "projector_bits": bits, "group_size": 16},
            {"bits": bits, "group_size": 16}, "std")  # fmt: skip


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_round_trip(bits):
    torch.manual_seed(0)
    levels = 2**bits - 1
    perm = torch.randperm(levels + 1)
    positive = 0.5 + 0.25 * perm.float()  # one sign, on its own grid
    negative = -3.0 + 0.125 * perm.flip(0).float()
    constant = torch.full((levels + 1,), 0.7)
    x = torch.cat((positive, negative, constant)).view(3, -1)
    q = quantize(x, bits, levels + 1)
    assert q["codes"].dtype == torch.uint8 and q["codes"].numel() == x.numel() * bits // 8
    back = dequantize(q["codes"], q["low"], q["step"], q["shape"], bits)
    assert torch.equal(back, x)
    # any values: within half a step of the group's grid; a padded last group
    y = torch.randn(7, 9)
    q = quantize(y, bits, 16)
    back = dequantize(q["codes"], q["low"], q["step"], q["shape"], bits)
    step = q["step"].repeat_interleave(16)[: y.numel()].view(7, 9)
    assert ((back - y).abs() <= 0.5001 * step).all()


def test_lazy_refresh_matches_the_reference():
    """Q-GaLore's rule: intervals grow per layer after queue_size similar refreshes."""
    lazy = {"lazy_refresh": True, "cos_threshold": 0.5, "queue_size": 2, "refresh_growth": 2.0}
    optimizer, reference = compare({"svd": "exact", **lazy}, {"lazy": (0.5, 2, 2.0)}, "std",
                                   steps=40, gap=2)  # fmt: skip
    steps = sorted({r.step for r in optimizer.refresh_log})
    assert steps == sorted(set(reference.refreshes))
    assert sum(r.matrices for r in optimizer.refresh_log) == len(reference.refreshes)
    assert len(reference.refreshes) < 2 * 20  # fewer than the fixed schedule's
    last = {}
    for record in optimizer.refresh_log:
        last.update(record.intervals)
    assert set(last) == {"0 of its group (shape 20 x 12)", "1 of its group (shape 6 x 20)"}
    assert max(last.values()) > 2  # an interval grew
    params = optimizer.param_groups[1]["params"]
    for p, name in zip(params, sorted(last)):
        assert optimizer.state[p]["refresh_interval"] == last[name]


# ---- memory, state dicts ----------------------------------------------------------------------


def test_memory_report_counts_what_is_stored():
    torch.manual_seed(0)
    model = nn.Linear(32, 48, bias=False)  # weight 48 x 32: right side, projector 8 x 32
    x = torch.randn(16, 32)
    bytes_of = {}
    variants = {"svd": {}, "4-bit": {"projector_bits": 4},
                "8-bit": {"projector_bits": 8, "group_size": 64},
                "dct": {"projector": "dct"}, "fira": {"residual": "fira"}}  # fmt: skip
    for name, options in variants.items():
        optimizer = GaLoreAdamW([{"params": [model.weight], "rank": 8}], **options)
        model.weight.grad = None
        model(x).square().sum().backward()
        optimizer.step()
        (row,) = optimizer.memory_report()
        bytes_of[name] = row
    moments = 2 * 48 * 8 * 4
    assert bytes_of["svd"]["projector_bytes"] == 8 * 32 * 4
    assert bytes_of["svd"]["state_bytes"] == moments + 8 * 32 * 4
    assert bytes_of["4-bit"]["projector_bytes"] == 8 * 32 // 2 + 8  # one group of 256
    assert bytes_of["4-bit"]["projector_bytes"] <= bytes_of["svd"]["projector_bytes"] / 7
    assert bytes_of["8-bit"]["projector_bytes"] == 8 * 32 + 4 * 8
    assert bytes_of["dct"]["projector_bytes"] == 8 * 4  # eight int32 indices
    assert bytes_of["fira"]["state_bytes"] == bytes_of["svd"]["state_bytes"] + 4


VARIANTS = {
    "fira": {"residual": "fira"},
    "signsgd random": {"residual": "signsgd", "projector": "random"},
    "dct": {"projector": "dct"},
    "q-galore": {"projector_bits": 4, "group_size": 16, "lazy_refresh": True,
                 "cos_threshold": 0.0, "queue_size": 1},
}  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_a_saved_state_dict_is_exact(variant, dtype):
    x, y = data(dtype)

    def fresh(seed):
        torch.manual_seed(seed)
        model = Net().to(dtype)
        return model, GaLoreAdamW(groups_of(model, "std", gap=3), lr=1e-2, weight_decay=0.1,
                                  **VARIANTS[variant])  # fmt: skip

    model, optimizer = fresh(0)
    train(model, optimizer, 10, x, y)
    resumed, first = fresh(0)
    train(resumed, first, 4, x, y)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed, second = fresh(1)
    resumed.load_state_dict(saved["model"])
    second.load_state_dict(saved["optimizer"])
    train(resumed, second, 6, x, y)  # across refreshes
    assert second.refresh_log
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    stored = {k: v.dtype for k, v in optimizer.state[model.up.weight].items()
              if isinstance(v, torch.Tensor)}  # fmt: skip
    assert stored == {k: v.dtype for k, v in second.state[resumed.up.weight].items()
                      if isinstance(v, torch.Tensor)}  # fmt: skip


# ---- bad input --------------------------------------------------------------------------------


def test_bad_options_name_the_option_and_group():
    w = nn.Parameter(torch.randn(6, 4))
    named = [("w", w)]
    with pytest.raises(ValueError, match=r"param_groups\[0\]: rank = 5 .*'w'.*min\(m, n\) = 4"):
        GaLoreAdamW([{"params": named, "rank": 5}])
    plain = {"params": [("b", nn.Parameter(torch.randn(3)))]}
    with pytest.raises(ValueError, match=r"param_groups\[1\]: residual must be one of"):
        GaLoreAdamW([plain, {"params": named, "rank": 2, "residual": "adam"}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]: limiter_gamma"):
        GaLoreAdamW([{"params": named, "rank": 2, "residual": "fira", "limiter_gamma": 0.5}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]: residual_lr"):
        GaLoreAdamW([{"params": named, "rank": 2, "residual_lr": -1.0}])
    for options, message in [
        ({"projector": "qr"}, "projector must be one of"),
        ({"projector_bits": 3}, "projector_bits must be None, 8 or 4"),
        ({"projector_bits": 4, "group_size": 15}, "group_size must be even"),
        ({"projector_bits": 8, "group_size": 0}, "group_size must be a positive integer"),
        ({"projector": "dct", "projector_bits": 4}, "projector_bits quantizes dense"),
        ({"group_size": 64}, "group_size applies to quantized"),
        ({"projector": "dct", "svd": "exact"}, "svd, n_iter"),
        ({"queue_size": 2}, "lazy_refresh=True"),
        ({"lazy_refresh": True, "cos_threshold": 1.5}, "cos_threshold"),
        ({"lazy_refresh": True, "queue_size": 0}, "queue_size"),
        ({"lazy_refresh": True, "refresh_growth": 0.5}, "growth"),
    ]:
        with pytest.raises(ValueError, match=message):
            GaLoreAdamW([{"params": named, "rank": 2}], **options)
    # the projector serves every group: its options given to a group are refused, not ignored
    for key, value in (("projector", "dct"), ("projector_bits", 4), ("lazy_refresh", True)):
        with pytest.raises(ValueError, match=rf"param_groups\[0\]: {key}: the projector's"):
            GaLoreAdamW([{"params": named, "rank": 2, key: value}])
    optimizer = GaLoreAdamW([plain], residual="fira")
    with pytest.raises(ValueError, match=r"param_groups\[1\]: rank = 8"):
        optimizer.add_param_group({"params": named, "rank": 8})
    assert len(optimizer.param_groups) == 1 and not optimizer.state


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sparse_and_complex_gradients_are_refused_before_any_state(variant):
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = GaLoreAdamW([{"params": [("emb", embedding.weight)], "rank": 2}],
                            **VARIANTS[variant])  # fmt: skip
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"'emb' has a sparse \.grad"):
        optimizer.step()
    assert not optimizer.state[embedding.weight] and not optimizer.refresh_log
    with pytest.raises(TypeError, match=r"param_groups\[0\]: parameter 'z'.*complex"):
        GaLoreAdamW([{"params": [("z", nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat)))],
                      "rank": 2}], **VARIANTS[variant])  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nonfinite_gradients_leave_the_projector_intact(variant):
    """Between refreshes a NaN flows into the weights as in torch.optim.AdamW; at a refresh it
    raises naming the parameter, before anything changes."""
    torch.manual_seed(0)
    model = Net()
    named = dict(model.named_parameters())
    optimizer = GaLoreAdamW([{"params": [("up.weight", model.up.weight)], "rank": 2,
                              "update_proj_gap": 3}], lr=1e-2, **VARIANTS[variant])  # fmt: skip
    x, y = data(torch.float32)
    train(model, optimizer, 2, x, y)
    state = optimizer.state[named["up.weight"]]
    before = copy.deepcopy(state)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model.up.weight.grad[0, 1] = float("nan")
    optimizer.step()  # step 2: no refresh
    assert torch.isnan(model.up.weight).any()
    for key in optimizer.projector.projection.keys | {"side"}:
        if isinstance(before.get(key), torch.Tensor):
            assert torch.equal(state[key], before[key]), key
        else:
            assert state.get(key) == before.get(key), key
    twin = nn.Parameter(torch.ones(3))
    adamw = torch.optim.AdamW([twin])
    twin.grad = torch.tensor([1.0, float("nan"), 1.0])
    adamw.step()
    assert torch.isnan(twin).any()  # what torch's AdamW does too
    snapshot = copy.deepcopy(state)
    model.up.weight.grad = torch.full_like(model.up.weight, float("inf"))
    with pytest.raises(ValueError, match=r"'up\.weight' has a \.grad with NaN or infinity"):
        optimizer.step()  # step 3: a refresh
    assert state.keys() == snapshot.keys()
    for key, value in snapshot.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value) or torch.isnan(value).any(), key
        else:
            assert state[key] == value, key
