"""GaLore around any optimizer: GaLoreAdamW's updates with torch's AdamW inside, SGD with
momentum against a reference written from the equations, the inner state in the projected
space for every optimizer, state dicts and exact resumption, schedulers and bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import relative_error
from torch import nn

from lowrank.optim import GaLore, GaLoreAdamW, LazyGaLoreProjector, galore_groups
from lowrank.optim.projector import SIDES


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)  # weight 20 x 12: m >= n
        self.down = nn.Linear(20, 6)  # weight 6 x 20: m < n
        self.extra = nn.Parameter(torch.randn(3, 4, 5))  # not 2-D: not projected

    def forward(self, x):
        return self.down(torch.tanh(self.up(x))) + self.extra.sum()


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(64, 12, generator=g).to(dtype), torch.randn(64, 6, generator=g).to(dtype)


def groups_of(model, proj_type="std", rank=4, gap=5, extra_projected=True, **projected_options):
    """A plain group and a projected one (which holds the 3-D ``extra`` by default: it
    stays unprojected there)."""
    plain = [model.up.bias, model.down.bias]
    projected = [model.up.weight, model.down.weight]
    (projected if extra_projected else plain).append(model.extra)
    options = {"rank": rank, "update_proj_gap": gap, "scale": 0.5, "proj_type": proj_type}
    return [{"params": plain}, {"params": projected, **options, **projected_options}]


def train(model, optimizer, steps, x, y):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


# ---- the updates ------------------------------------------------------------------------------


# "full" is left out: at a refresh U^T G V is diagonal, its other entries rounding noise,
# which Adam with a negligible eps normalises to steps of +-lr (chaotic in both optimizers).
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_adamw_inside_gives_galore_adamw(proj_type, svd):
    """torch.optim.AdamW inside gives GaLoreAdamW's updates over refreshes at steps 0, 5 and
    10, with weight decay on the projected weights (eps negligible: the two Adams add it at
    different places; the unprojected parameters do not decay: torch's AdamW decays before
    its step, GaLoreAdamW after)."""
    torch.manual_seed(0)
    ours = Net().double()
    theirs = copy.deepcopy(ours)
    groups = lambda model: groups_of(model, proj_type, extra_projected=False, weight_decay=0.1)  # noqa: E731
    wrapped = GaLore(groups(ours), torch.optim.AdamW, lr=1e-2, eps=1e-14, weight_decay=0.0,
                     svd=svd)  # fmt: skip
    galore = GaLoreAdamW(groups(theirs), lr=1e-2, eps=1e-14, svd=svd)
    x, y = data()
    train(ours, wrapped, 12, x, y)
    train(theirs, galore, 12, x, y)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert relative_error(a, b) <= 1e-10, name
    assert [r.step for r in wrapped.refresh_log] == [r.step for r in galore.refresh_log]
    assert [r.step for r in wrapped.refresh_log] == [0, 5, 10]
    # the inner AdamW's moments are in the projected shape
    shapes = {"std": [(20, 4), (4, 20)], "reverse_std": [(4, 12), (6, 4)]}[proj_type]
    for lin, shape in zip((ours.up, ours.down), shapes):
        assert wrapped.inner.state[wrapped._standins[lin.weight]]["exp_avg"].shape == shape


def test_random_columns_restart_the_inner_state_as_galore_adamw_does():
    """With random columns the inner AdamW's state of a stand-in is dropped at each new
    projector, as GaLoreAdamW restarts its moments: the same updates."""
    from lowrank.optim.projector import RandomProjection

    torch.manual_seed(0)
    ours = Net().double()
    theirs = copy.deepcopy(ours)
    groups = lambda model: groups_of(model, "std", extra_projected=False, weight_decay=0.1)  # noqa: E731
    wrapped = GaLore(groups(ours), torch.optim.AdamW, lr=1e-2, eps=1e-14, weight_decay=0.0,
                     projection=RandomProjection())  # fmt: skip
    galore = GaLoreAdamW(groups(theirs), lr=1e-2, eps=1e-14, projector="random")
    x, y = data()
    train(ours, wrapped, 12, x, y)
    train(theirs, galore, 12, x, y)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert relative_error(a, b) <= 1e-10, name
    # the stand-ins' inner step counts restarted at the refresh of step 10
    assert {int(wrapped.inner.state[wrapped._standins[lin.weight]]["step"])
            for lin in (ours.up, ours.down)} == {2}  # fmt: skip


def reference_galore_sgd(params, grads_of, steps, lr, momentum, rank, gap, scale):
    """GaLore with SGD and momentum, from the equations: every ``gap`` steps ``P`` is the
    top-``rank`` right singular vectors of the gradient (weights with m >= n); the momentum
    ``b <- momentum b + G P^T`` lives in the projected space, ``W <- W - lr scale b P``."""
    state = [{} for _ in params]
    for t in range(steps):
        grads = grads_of(params)
        for w, g, st in zip(params, grads, state):
            if t % gap == 0:
                st["P"] = torch.linalg.svd(g, full_matrices=False)[2][:rank]
            r = g @ st["P"].T
            st["b"] = r if "b" not in st else momentum * st["b"] + r
            w -= lr * scale * st["b"] @ st["P"]
    return params


def test_sgd_with_momentum_against_the_reference():
    torch.manual_seed(0)
    weights = [torch.randn(20, 8, dtype=torch.float64) for _ in range(2)]
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 20, dtype=torch.float64)

    def grads_of(ws):
        ws = [w.detach().requires_grad_() for w in ws]
        loss = sum(nn.functional.mse_loss(torch.tanh(x @ w.T), y) for w in ws)
        return torch.autograd.grad(loss, ws)

    expected = reference_galore_sgd([w.clone() for w in weights], grads_of, 9, 0.1, 0.9,
                                    rank=3, gap=4, scale=0.5)  # fmt: skip
    params = [nn.Parameter(w.clone()) for w in weights]
    optimizer = GaLore([{"params": params, "rank": 3, "update_proj_gap": 4, "scale": 0.5}],
                       torch.optim.SGD, lr=0.1, momentum=0.9, svd="exact")  # fmt: skip
    for _ in range(9):
        for p, g in zip(params, grads_of(params)):
            p.grad = g.clone()
        optimizer.step()
    for p, e in zip(params, expected):
        assert relative_error(p, e) <= 1e-10


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adafactor"])
def test_any_optimizer_keeps_its_state_in_the_projected_space(name):
    """Between refreshes a projected weight moves only within its projector's subspace
    (without weight decay, which shrinks the whole weight), the
    inner optimizer's tensors are no larger than the projected shape, and training
    lowers the loss."""
    cls = getattr(torch.optim, name)
    options = {"SGD": {"lr": 0.002, "momentum": 0.9}, "Adafactor": {"lr": 0.05}}
    options = options.get(name, {"lr": 1e-2})
    torch.manual_seed(0)
    model = Net()
    optimizer = GaLore(groups_of(model, gap=100, weight_decay=0.0), cls, **options)
    x, y = data(torch.float32)
    first = nn.functional.mse_loss(model(x), y).item()
    train(model, optimizer, 2, x, y)  # the projector of step 0 stays until step 100
    before = model.up.weight.detach().clone()
    train(model, optimizer, 5, x, y)
    state = optimizer.state[model.up.weight]
    assert SIDES[state["side"]] == "right"
    p = state["projector"]  # 4 x 12
    moved = model.up.weight.detach() - before
    assert moved.norm() > 0 and (moved - moved @ p.T @ p).norm() <= 1e-5 * moved.norm()
    for weight in (model.up.weight, model.down.weight):
        inner = optimizer.inner.state[optimizer._standins[weight]]
        tensors = [t for t in inner.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
        assert tensors and all(t.numel() <= 4 * max(weight.shape) for t in tensors), name
    assert nn.functional.mse_loss(model(x), y).item() < first
    projected = [r for r in optimizer.memory_report() if r["projected"]]
    # float32 projectors: 4 x 12 (up, right side) and 6 x 4 (down, left side)
    assert [r["projector_bytes"] for r in projected] == [4 * 4 * 12, 4 * 6 * 4]
    assert all(r["state_bytes"] > r["projector_bytes"] for r in projected)


def test_bitsandbytes_8bit_adamw():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64))
    optimizer = GaLore(galore_groups(model, rank=32, update_proj_gap=4), bnb.optim.AdamW8bit,
                       lr=1e-3)  # fmt: skip
    x, y = torch.randn(64, 128), torch.randn(64, 64)
    first = nn.functional.mse_loss(model(x), y).item()
    train(model, optimizer, 6, x, y)
    assert nn.functional.mse_loss(model(x), y).item() < first
    assert optimizer.state[model[0].weight]["step"] == 6


def test_full_rank_sgd_is_sgd():
    """With the rank of the whole weight the projector is a rotation, and SGD (rotation
    invariant) on the stand-in is SGD on the weight, the step scaled by ``scale``."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(10, 6, dtype=torch.float64))
    twin = nn.Parameter(w.detach().clone())
    ours = GaLore([{"params": [w], "rank": 6, "scale": 0.5, "update_proj_gap": 2}],
                  torch.optim.SGD, lr=0.2, momentum=0.0)  # fmt: skip
    plain = torch.optim.SGD([twin], lr=0.1)
    target = torch.randn(10, 6, dtype=torch.float64)
    for _ in range(5):
        for p, opt in ((w, ours), (twin, plain)):
            opt.zero_grad()
            (p - target).square().sum().backward()
            opt.step()
    assert relative_error(w, twin) <= 1e-12


# ---- groups, schedulers, state dicts -----------------------------------------------------------


def test_groups_show_and_pass_on_the_inner_options():
    torch.manual_seed(0)
    model = Net()
    optimizer = GaLore(groups_of(model), torch.optim.Adafactor, lr=0.01, weight_decay=0.01)
    projected = optimizer.param_groups[1]
    assert projected["beta2_decay"] == -0.8 and projected["weight_decay"] == 0.01
    # inner groups: the biases; extra (not 2-D, unprojected); the stand-ins, which decay
    # nothing (the decay is applied to the full weights)
    assert all("rank" not in g for g in optimizer.inner.param_groups)
    assert [g["weight_decay"] for g in optimizer.inner.param_groups] == [0.01, 0.01, 0.0]
    # a scheduler's change reaches the inner optimizer: lr 0 and no decay move nothing
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train(model, optimizer, 2, *data(torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert [g["lr"] for g in optimizer.inner.param_groups] == [0.0, 0.0, 0.0]


def test_added_param_group():
    torch.manual_seed(0)
    model = Net().double()
    twin = copy.deepcopy(model)
    groups = groups_of(model)
    optimizer = GaLore(groups[:1], torch.optim.AdamW, lr=1e-2, svd="exact")
    optimizer.add_param_group(groups[1])
    other = GaLore(groups_of(twin), torch.optim.AdamW, lr=1e-2, svd="exact")
    assert optimizer.param_groups[1]["betas"] == (0.9, 0.999)
    x, y = data()
    train(model, optimizer, 6, x, y)
    train(twin, other, 6, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="proj_type"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "rank": 2,
                                   "proj_type": "diagonal"})  # fmt: skip
    with pytest.raises(ValueError, match="parameter group 2: option 'momentum'"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "rank": 2,
                                   "momentum": 0.9})  # fmt: skip
    assert len(optimizer.param_groups) == 2 and len(optimizer.inner.param_groups) == 3


@pytest.mark.parametrize("name", ["AdamW", "Adafactor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_a_saved_state_dict_is_exact(name, dtype):
    """8 steps in one run equal 4 steps, torch.save/torch.load, a fresh model and
    optimizer, and 4 more steps, across the refresh at step 6: projectors stay float32 for
    bfloat16 weights, the inner state and the refresh log come back."""
    cls = getattr(torch.optim, name)
    x, y = data(dtype)

    def fresh(seed):
        torch.manual_seed(seed)
        model = Net().to(dtype)
        return model, GaLore(groups_of(model, gap=3, weight_decay=0.1), cls, lr=1e-2)

    model, optimizer = fresh(0)
    train(model, optimizer, 8, x, y)
    resumed, first = fresh(0)
    train(resumed, first, 4, x, y)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed, second = fresh(1)
    resumed.load_state_dict(saved["model"])
    second.load_state_dict(saved["optimizer"])
    assert [r.step for r in second.refresh_log] == [0, 3]
    weight = resumed.up.weight
    assert second.state[weight]["projector"].dtype == torch.float32
    inner = second.inner.state[second._standins[weight]]
    assert all(t.dtype == torch.float32 for t in inner.values() if t.is_floating_point()
               and t.dim() > 0)  # fmt: skip
    train(resumed, second, 4, x, y)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    assert [r.step for r in second.refresh_log] == [0, 3, 6]


def test_a_projector_of_ones_own():
    torch.manual_seed(0)
    model = Net()
    projector = LazyGaLoreProjector(queue_size=1, cos_threshold=0.0)
    optimizer = GaLore(groups_of(model, gap=2), torch.optim.SGD, lr=0.05, projector=projector)
    train(model, optimizer, 7, *data(torch.float32))
    # every comparison counts as similar: the interval doubles at each refresh (0, 2, 6)
    assert [r.step for r in optimizer.refresh_log] == [0, 2, 6]
    with pytest.raises(ValueError, match="projector is given ready"):
        GaLore(model.parameters(), torch.optim.SGD, lr=0.1, projector=projector, svd="exact")


# ---- bad input --------------------------------------------------------------------------------


def test_the_optimizer_must_be_an_optimizer_class():
    params = [nn.Parameter(torch.randn(4, 4))]
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer class"):
        GaLore(params, torch.optim.SGD(params, lr=0.1))
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer class"):
        GaLore(params, nn.Linear)
    with pytest.raises(TypeError, match="SGD has no option 'betas'"):
        GaLore(params, torch.optim.SGD, lr=0.1, betas=(0.9, 0.99))


def test_bad_group_options_name_the_group():
    model = Net()
    groups = groups_of(model)
    groups[1]["momentum"] = 0.9  # AdamW has none
    with pytest.raises(ValueError, match="parameter group 1: option 'momentum' is neither"):
        GaLore(groups, torch.optim.AdamW)
    too_large = r"parameter group 1: rank = 13 is larger than parameter 0 of its group \(shape 20"
    with pytest.raises(ValueError, match=too_large):
        GaLore(groups_of(model, rank=13), torch.optim.AdamW)
    with pytest.raises(ValueError, match="parameter group 1: rank must be a positive integer"):
        GaLore(groups_of(model, rank=0), torch.optim.AdamW)
    with pytest.raises(TypeError, match=r"parameter group 0: parameter 'w'.*complex"):
        GaLore([{"params": [("w", nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat)))],
                 "rank": 2}], torch.optim.AdamW)  # fmt: skip


def test_bad_gradients_are_refused_before_any_state():
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = GaLore([{"params": [("emb.weight", embedding.weight)], "rank": 2}],
                       torch.optim.SGD, lr=0.1)  # fmt: skip
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"'emb\.weight' has a sparse \.grad"):
        optimizer.step()
    assert not optimizer.state and not optimizer.inner.state and not optimizer.refresh_log
    model = Net()
    named = dict(model.named_parameters())
    optimizer = GaLore([{"params": [(n, named[n]) for n in ("up.weight", "down.weight")],
                         "rank": 2}], torch.optim.AdamW)  # fmt: skip
    nn.functional.mse_loss(model(data(torch.float32)[0]), data(torch.float32)[1]).backward()
    model.down.weight.grad[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"'down\.weight' has a \.grad with NaN or infinity"):
        optimizer.step()
    assert not optimizer.inner.state and not optimizer.refresh_log
    with pytest.raises(ValueError, match=r"GaLore\.state_dict"):
        optimizer.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
