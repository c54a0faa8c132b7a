"""GaLoreAdamW against a reference of the algorithm (Zhao et al. 2024) written here, the
batched warm-started refresh, fallbacks, memory and state dicts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import relative_error
from torch import nn

from lowrank.optim import GaLoreAdamW, galore_groups
from lowrank.optim.galore import SIDES, leading_subspace

# ---- the reference: one parameter at a time, one full SVD per refresh --------------------------


class ReferenceGaLore:
    """GaLore's AdamW as published: the projector from the SVD of the current gradient when
    ``step % gap == 0``; moments in the projected shape, never reset; the bias-corrected
    step size; the update projected back and scaled; weight decay after the update."""

    def __init__(self, groups, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        self.groups, self.lr, self.betas, self.eps, self.wd = groups, lr, betas, eps, weight_decay
        self.state = {}

    @staticmethod
    def side(shape, proj_type):
        m, n = shape
        return {"std": "right" if m >= n else "left",
                "reverse_std": "left" if m >= n else "right"}.get(proj_type, proj_type)  # fmt: skip

    @staticmethod
    def project(side, P, g):
        if side == "right":
            return g @ P.T
        if side == "left":
            return P.T @ g
        return P[0].T @ g @ P[1].T

    @staticmethod
    def back(side, P, low):
        if side == "right":
            return low @ P
        if side == "left":
            return P @ low
        return P[0] @ low @ P[1]

    def step(self):
        b1, b2 = self.betas
        for group in self.groups:
            for p in group["params"]:
                st = self.state.setdefault(id(p), {"step": 0})
                g = p.grad
                galore = "rank" in group and p.dim() == 2
                if galore:
                    side = self.side(p.shape, group["proj_type"])
                    if "P" not in st or st["step"] % group["update_proj_gap"] == 0:
                        u, _, vh = torch.linalg.svd(g, full_matrices=False)
                        r = group["rank"]
                        st["P"] = {"right": vh[:r], "left": u[:, :r],
                                   "full": (u[:, :r], vh[:r])}[side]  # fmt: skip
                    g = self.project(side, st["P"], g)
                if "m" not in st:
                    st["m"], st["v"] = torch.zeros_like(g), torch.zeros_like(g)
                st["step"] += 1
                t = st["step"]
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                size = self.lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                update = st["m"] / (st["v"].sqrt() + self.eps)
                if galore:
                    update = self.back(side, st["P"], update) * group["scale"]
                with torch.no_grad():
                    p.sub_(size * update)
                    if self.wd:
                        p.sub_(self.lr * self.wd * p)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)  # weight 20 x 12: m >= n
        self.down = nn.Linear(20, 6)  # weight 6 x 20: m < n
        self.extra = nn.Parameter(torch.randn(3, 4, 5))  # not 2-D

    def forward(self, x):
        return self.down(torch.tanh(self.up(x))) + self.extra.sum()


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(64, 12, generator=g, dtype=torch.float64), torch.randn(
        64, 6, generator=g, dtype=torch.float64
    )


def groups_of(model, proj_type, rank=4, gap=5):
    projected = [model.up.weight, model.down.weight, model.extra]  # extra falls back
    plain = [model.up.bias, model.down.bias]
    return [{"params": plain}, {"params": projected, "rank": rank, "update_proj_gap": gap,
                                "scale": 0.5, "proj_type": proj_type}]  # fmt: skip


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_the_reference_algorithm(proj_type, weight_decay):
    torch.manual_seed(0)
    ours = Net().double()
    theirs = copy.deepcopy(ours)
    optimizer = GaLoreAdamW(groups_of(ours, proj_type), lr=1e-2, weight_decay=weight_decay,
                            svd="exact")  # fmt: skip
    reference = ReferenceGaLore(groups_of(theirs, proj_type), lr=1e-2, weight_decay=weight_decay)
    x, y = data()
    for _ in range(17):  # refreshes at steps 0, 5, 10, 15
        for model in (ours, theirs):
            model.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        reference.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert relative_error(a, b) <= 1e-9, name
    assert [r.step for r in optimizer.refresh_log] == [0, 5, 10, 15]


def test_randomized_refresh_captures_the_gradient_energy():
    """Warm-started refreshes keep at least 0.99 of the exact projector's captured energy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(),
                          nn.Linear(64, 32))  # fmt: skip
    optimizer = GaLoreAdamW(galore_groups(model, rank=8, update_proj_gap=4), lr=3e-3)
    x, y = torch.randn(512, 64), torch.randn(512, 32)
    ratios = []
    for step in range(24):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if step % 4 == 0 and step > 0:
            for lin in (model[0], model[2], model[4]):
                g = lin.weight.grad.double()
                state = optimizer.state[lin.weight]
                p = state["projector"].double()
                low = g @ p.T if SIDES[state["side"]] == "right" else p.T @ g
                s = torch.linalg.svdvals(g)
                ratios.append(float(low.square().sum() / s[:8].square().sum()))
    assert len(ratios) == 15 and min(ratios) >= 0.99, ratios


def test_batched_refresh_and_memory():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)], nn.Linear(32, 48))
    optimizer = GaLoreAdamW(galore_groups(model, rank=8), lr=1e-3)
    model(torch.randn(16, 32)).sum().backward()
    optimizer.step()
    assert len(optimizer.refresh_log) == 1 and optimizer.refresh_log[0].matrices == 5
    rows = optimizer.memory_report()
    by_shape = {r["shape"]: r for r in rows if r["projected"]}
    # 32 x 32, right side: moments 2 x (32 x 8) and the projector 8 x 32
    assert by_shape[(32, 32)]["state_bytes"] == 4 * (2 * 32 * 8 + 8 * 32)
    # 48 x 32 (m >= n): moments 2 x (48 x 8), projector 8 x 32
    assert by_shape[(48, 32)]["state_bytes"] == 4 * (2 * 48 * 8 + 8 * 32)
    plain = [r for r in rows if not r["projected"]]
    assert all(r["state_bytes"] == r["adamw_bytes"] for r in plain)
    assert optimizer.state_bytes() < sum(r["adamw_bytes"] for r in rows)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = Net()
    x, y = data()
    x, y = x.float(), y.float()
    optimizer = GaLoreAdamW(groups_of(model, "full"), lr=1e-2)
    for _ in range(3):
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    twin = copy.deepcopy(model)
    other = GaLoreAdamW(groups_of(twin, "full"), lr=1e-2)
    other.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as if saved and loaded
    for m, opt in ((model, optimizer), (twin, other)):
        m.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_galore_groups():
    model = Net()
    groups = galore_groups(model, rank=4, target_modules=["up"])
    projected = next(g for g in groups if "rank" in g)
    assert projected["params"] == [model.up.weight] and projected["scale"] == 0.25
    plain = next(g for g in groups if "rank" not in g)["params"]
    assert len(plain) == 4 and all(p is not model.up.weight for p in plain)


def test_bad_options():
    params = [nn.Parameter(torch.randn(4, 4))]
    with pytest.raises(ValueError, match="proj_type"):
        GaLoreAdamW([{"params": params, "rank": 2, "proj_type": "diagonal"}])
    with pytest.raises(ValueError, match="positive integer"):
        GaLoreAdamW([{"params": params, "rank": 0}])
    with pytest.raises(ValueError, match="svd"):
        GaLoreAdamW(params, svd="fast")
    with pytest.raises(ValueError, match="betas"):
        GaLoreAdamW(params, betas=(1.0, 0.9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warm_subspace_on_zero_and_rank_deficient_gradients(dtype):
    """The warm refresh returns an orthonormal projector, in descending order, capturing
    all of a low-rank gradient's energy; a zero gradient still gets an orthonormal one."""
    torch.manual_seed(0)
    previous = torch.linalg.qr(torch.randn(3, 40, 8, dtype=dtype)).Q
    eye = torch.eye(8, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    zero = leading_subspace(torch.zeros(3, 40, 30, dtype=dtype), previous)
    assert torch.isfinite(zero).all() and (zero.mT @ zero - eye).abs().max() <= tol
    g = torch.randn(3, 40, 2, dtype=dtype) @ torch.randn(3, 2, 30, dtype=dtype)  # rank 2
    u = leading_subspace(g, previous)
    assert (u.mT @ u - eye).abs().max() <= tol
    captured = (u.mT @ g).square().sum((-1, -2)) / g.square().sum((-1, -2))
    assert torch.allclose(captured, torch.ones(3, dtype=dtype), atol=tol)
    energy = (u.mT @ g).square().sum(-1)  # per direction: descending
    assert (energy[:, :-1] >= energy[:, 1:] - tol * energy[:, :1]).all()
