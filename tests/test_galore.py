"""GaLoreAdamW against a reference of the algorithm (Zhao et al. 2024) written here, the
batched warm-started refresh, fallbacks, memory, state dicts and exact resumption, bad
gradients and options, and the projector on its own."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import relative_error
from torch import nn

from lowrank.optim import GaLoreAdamW, GaLoreProjector, Projection, galore_groups
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


# ---- resuming from a state dict ---------------------------------------------------------------


def train(model, optimizer, steps, x, y):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_a_saved_state_dict_is_exact(dtype):
    """N steps in one run equal k steps, torch.save/torch.load of model and optimizer, a
    fresh model and optimizer, and N - k more steps: the randomized refresh continues its
    seeds and the float32 projectors and projected moments stay float32 for bfloat16."""
    x, y = (t.to(dtype) for t in data())

    def fresh(seed):
        torch.manual_seed(seed)
        model = Net().to(dtype)
        return model, GaLoreAdamW(groups_of(model, "std", gap=3), lr=1e-2, weight_decay=0.1)

    model, optimizer = fresh(0)
    train(model, optimizer, 8, x, y)  # refreshes at steps 0, 3, 6
    resumed, first = fresh(0)
    train(resumed, first, 4, x, y)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed, second = fresh(1)
    resumed.load_state_dict(saved["model"])
    second.load_state_dict(saved["optimizer"])
    projected = [resumed.up.weight, resumed.down.weight]
    assert all(second.state[p]["projector"].dtype == torch.float32 for p in projected)
    assert all(second.state[p]["exp_avg"].dtype == torch.float32 for p in projected)
    assert second.state[resumed.up.bias]["exp_avg"].dtype == dtype
    train(resumed, second, 4, x, y)  # crosses the refresh at step 6
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert [r.step for r in second.refresh_log] == [6]


# ---- groups, options and bad gradients --------------------------------------------------------


def test_added_param_group_gets_the_defaults_and_checks():
    torch.manual_seed(0)
    model = Net().double()
    twin = copy.deepcopy(model)
    groups = groups_of(model, "std")
    optimizer = GaLoreAdamW(groups[:1], lr=1e-2)
    added = dict(groups[1])
    del added["proj_type"], added["scale"]
    optimizer.add_param_group(added)
    assert optimizer.param_groups[1]["proj_type"] == "std"
    reference = groups_of(twin, "std")
    reference[1].update(scale=1.0)
    other = GaLoreAdamW(reference, lr=1e-2)
    x, y = data()
    train(model, optimizer, 7, x, y)
    train(twin, other, 7, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="proj_type"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "rank": 2,
                                   "proj_type": "diagonal"})  # fmt: skip
    with pytest.raises(ValueError, match="lr"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(4))], "lr": -1.0})
    assert len(optimizer.param_groups) == 2


def test_complex_parameters_as_torch_adamw():
    """Plain complex parameters are pairs of reals, as in torch.optim.AdamW; a complex
    weight in a projected group is refused at once, naming it."""
    torch.manual_seed(0)
    z = nn.Parameter(torch.randn(5, 3, dtype=torch.complex128))
    twin = nn.Parameter(z.detach().clone())
    ours = GaLoreAdamW([z], lr=1e-2, eps=1e-14)
    theirs = torch.optim.AdamW([twin], lr=1e-2, eps=1e-14, weight_decay=0.0)
    target = torch.randn(5, 3, dtype=torch.complex128)
    for _ in range(3):
        for p, opt in ((z, ours), (twin, theirs)):
            opt.zero_grad()
            (p - target).abs().square().sum().backward()
            opt.step()
    assert (z - twin).abs().max() <= 1e-10
    with pytest.raises(TypeError, match=r"parameter 'w'.*complex"):
        GaLoreAdamW([{"params": [("w", nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat)))],
                      "rank": 2}])  # fmt: skip


@pytest.mark.parametrize("grouped", ["projected", "plain"])
def test_sparse_gradient_is_refused_before_the_refresh(grouped):
    embedding = nn.Embedding(10, 4, sparse=True)
    group = {"params": [("emb.weight", embedding.weight)]}
    if grouped == "projected":
        group["rank"] = 2
    optimizer = GaLoreAdamW([group])
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"'emb\.weight' has a sparse \.grad"):
        optimizer.step()
    assert not optimizer.state[embedding.weight] and not optimizer.refresh_log


def test_nonfinite_gradient_at_a_refresh_names_the_parameter():
    torch.manual_seed(0)
    model = Net()
    named = dict(model.named_parameters())
    projected = ["up.weight", "down.weight"]
    optimizer = GaLoreAdamW([{"params": [(n, named[n]) for n in projected], "rank": 2,
                              "update_proj_gap": 2}], lr=1e-2)  # fmt: skip
    x, y = (t.float() for t in data())
    train(model, optimizer, 2, x, y)
    before = {n: optimizer.state[named[n]]["projector"].clone() for n in projected}
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model.down.weight.grad[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'down\.weight' has a \.grad with NaN or infinity"):
        optimizer.step()
    for n in projected:  # no projector changed
        assert torch.equal(optimizer.state[named[n]]["projector"], before[n])


def test_tensor_learning_rate():
    torch.manual_seed(0)
    model = Net().double()
    twin = copy.deepcopy(model)
    optimizer = GaLoreAdamW(groups_of(model, "std"), lr=torch.tensor(1e-2, dtype=torch.float64),
                            svd="exact")  # fmt: skip
    other = GaLoreAdamW(groups_of(twin, "std"), lr=1e-2, svd="exact")
    x, y = data()
    train(model, optimizer, 3, x, y)
    train(twin, other, 3, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lr"):
        GaLoreAdamW(model.parameters(), lr=torch.tensor([1e-2]))


# ---- the projector on its own -----------------------------------------------------------------


class LeadingRows(Projection):
    """A test projection: the first ``rank`` coordinates of the projected side."""

    def compute(self, grads, side, rank, previous, seed):
        m, n = grads.shape[-2:]
        eye = torch.eye(m if side == "left" else n, dtype=grads.dtype)
        proj = eye[:, :rank] if side == "left" else eye[:rank]
        return [{"projector": proj.clone()} for _ in grads]


def test_a_projection_of_ones_own():
    """GaLoreAdamW with another kind of projector: only the coordinates it keeps move."""
    torch.manual_seed(0)
    model = Net()
    start = model.up.weight.detach().clone()  # 20 x 12: right side, rank 4
    optimizer = GaLoreAdamW(groups_of(model, "std"), lr=1e-2, projection=LeadingRows())
    x, y = (t.float() for t in data())
    train(model, optimizer, 3, x, y)
    moved = (model.up.weight - start).abs().amax(0)
    assert (moved[:4] > 0).all() and (moved[4:] == 0).all()
    with pytest.raises(ValueError, match="svd"):
        GaLoreAdamW(model.parameters(), svd="exact", projection=LeadingRows())


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_projector_round_trip_and_schedule(proj_type):
    """project_back(project(G)) = G for gradients in one rank-3 subspace, between refreshes
    too; a refresh happens at the first step and every update_proj_gap steps, all due
    matrices in one, each with a fresh seed."""
    torch.manual_seed(0)
    left, right = torch.randn(30, 3), torch.randn(3, 20)
    weights = [nn.Parameter(torch.randn(30, 20)) for _ in range(3)]
    group = {"params": weights, "rank": 3, "update_proj_gap": 2, "proj_type": proj_type}
    projector = GaLoreProjector(seed=5)
    projector.configure(group)
    states = [{"step": 0} for _ in weights]
    for _ in range(5):
        for w in weights:
            w.grad = left @ torch.randn(3, 3) @ right
        projector.refresh(zip(weights, states, [group] * 3))
        for w, state in zip(weights, states):
            back = projector.project_back(state, projector.project(state, w.grad))
            assert relative_error(back, w.grad) <= 1e-5
            state["step"] += 1
    assert [(r.step, r.matrices) for r in projector.refresh_log] == [(0, 3), (2, 3), (4, 3)]
    assert projector.seed == 8 and all(s["refresh_seed"] == 8 for s in states)


def test_learning_rate_beyond_the_dtype_range_is_refused_before_any_update():
    first, second = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3, dtype=torch.half))
    optimizer = GaLoreAdamW([first, second], lr=1e5)  # beyond float16's 65504
    first.grad, second.grad = torch.ones(3), torch.ones(3, dtype=torch.half)
    with pytest.raises(ValueError, match=r"lr = 100000 .* torch\.float16"):
        optimizer.step()
    assert torch.equal(first, torch.ones(3)) and not optimizer.state
