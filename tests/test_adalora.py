"""AdaLoRA: the budget schedule, importance and masking against a plain-torch reference
written from the paper's equations, the schedule running from the optimizer alone, the
allocation's edge cases, errors before any change, merge, save/load, resume and PEFT's
AdaLoRA format loaded by PEFT."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import relative_error
from torch import nn

import lowrank
from lowrank.nn import AdaLoRAAdapter, convert
from lowrank.nn.adalora import attach, save_peft


class Toy(nn.Module):
    def __init__(self, silent_b=False):
        super().__init__()
        self.a = nn.Linear(12, 10)
        self.b = nn.Linear(10, 3)  # min(in, out) = 3: its rank is clipped
        self.c = nn.Linear(10, 4)
        self.silent_b = silent_b

    def forward(self, x):
        h = torch.tanh(self.a(x))
        b = self.b(h).sum(-1, keepdim=True)
        return self.c(h) + (0.0 if self.silent_b else 1.0) * b


def toy(silent_b=False, dtype=torch.float64):
    torch.manual_seed(0)
    return Toy(silent_b).to(dtype)


def batch(step, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 12, generator=g, dtype=dtype), torch.randn(16, 4, generator=g,
                                                                     dtype=dtype)  # fmt: skip


def loss_of(model, step, dtype=torch.float64):
    x, y = batch(step, dtype)
    return (model(x) - y).square().mean()


SCHEDULE = {"rank": 4, "target_rank": 2, "total_steps": 12, "t_init": 2, "t_final": 3,
            "delta_t": 2, "beta1": 0.8, "beta2": 0.7, "orth_reg_weight": 0.1}  # fmt: skip


def adalora_model(silent_b=False, **options):
    model = toy(silent_b)
    convert(model, "adalora", progress=False, **{**SCHEDULE, **options})
    # the identity change at init would hide the masking from the outputs: start elsewhere
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, AdaLoRAAdapter)):
            m.C.copy_(torch.linspace(0.5, 1.0, m.rank, dtype=m.C.dtype) * (1 + i))
    return model


def paper_budget(t, b0, bT, T, ti, tf):
    """Eq. 12."""
    if t < ti:
        return b0
    if t >= T - tf:
        return bT
    return int(bT + (b0 - bT) * (1 - (t - ti) / (T - ti - tf)) ** 3)


def reference_run(model, steps, lr, s):
    """The paper's Algorithm 1 written out with SGD: sensitivity, the two moving averages,
    the triplet scores, the cubic budget and the masking, plus the orthogonality term."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRAAdapter)}
    b0 = sum(m.rank for m in layers.values())
    bT = min(s["target_rank"] * len(layers), b0)
    T, ti, tf, dt = s["total_steps"], s["t_init"], s["t_final"], s["delta_t"]
    ibar = {(n, k): 0.0 for n in layers for k in "BCA"}
    ubar = dict(ibar)
    masks, final, trace = {}, False, []
    for t in range(1, steps + 1):
        model.zero_grad()
        loss_of(model, t).backward()
        with torch.no_grad():
            if not final:
                for n, m in layers.items():
                    for k in "BCA":
                        p = getattr(m, k)
                        i = (p * p.grad).abs()
                        b1, b2 = s["beta1"], s["beta2"]
                        ibar[n, k] = b1 * ibar[n, k] + (1 - b1) * i
                        ubar[n, k] = b2 * ubar[n, k] + (1 - b2) * (i - ibar[n, k]).abs()
        penalty = sum(((m.B.T @ m.B - torch.eye(m.rank, dtype=m.B.dtype)).square().sum()
                       + (m.A @ m.A.T - torch.eye(m.rank, dtype=m.A.dtype)).square().sum())
                      for m in layers.values())  # fmt: skip
        (s["orth_reg_weight"] * penalty).backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
            budget = None
            if final:
                pass
            elif t >= T - tf:
                budget, final = bT, True
            elif t >= ti and (t - ti) % dt == 0:
                budget = paper_budget(t, b0, bT, T, ti, tf)
            if budget is not None:
                scores = []
                for n, m in layers.items():
                    sc = {k: ibar[n, k] * ubar[n, k] for k in "BCA"}
                    scores.append(sc["C"] + sc["B"].sum(0) / m.out_features
                                  + sc["A"].sum(1) / m.in_features)  # fmt: skip
                flat = torch.cat(scores)
                order = torch.argsort(flat, descending=True)
                keep = torch.zeros_like(flat, dtype=torch.bool)
                keep[order[:budget]] = True
                start = 0
                for n, m in layers.items():
                    masks[n] = keep[start : start + m.rank]
                    start += m.rank
                trace.append((t, budget))
            for n, m in layers.items():
                if n in masks and (budget is not None or final):
                    m.C[~masks[n]] = 0.0
    return masks, trace


def train(model, steps, lr=0.05, start=1, allocator_state=None, **schedule):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    allocator = attach(model, opt, **schedule)
    if allocator_state is not None:
        allocator.load_state_dict(allocator_state)
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()
    return allocator


def test_budget_is_the_papers_cubic_schedule():
    model = adalora_model()
    allocator = attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    b0 = 4 + 3 + 4
    assert allocator.initial_budget == b0 and allocator.target_budget == 6
    for t in range(0, 13):
        assert allocator.budget(t) == paper_budget(t, b0, 6, 12, 2, 3), t
    assert [allocator.budget(t) for t in (0, 2, 3, 8, 9, 12)] == [11, 11, 9, 6, 6, 6]


def test_importance_masking_and_regulariser_match_the_reference():
    ours, ref = adalora_model(), adalora_model()
    allocator = train(ours, 12)
    masks, trace = reference_run(ref, 12, 0.05, SCHEDULE)
    assert allocator.history == trace  # allocations at t = 2, 4, 6, 8 (cubic), 9 (final)
    assert [t for t, _ in trace] == [2, 4, 6, 8, 9]
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert relative_error(p, q) <= 1e-10, name
    for name, m in ours.named_modules():
        if isinstance(m, AdaLoRAAdapter):
            assert torch.equal(m.mask, masks[name])
            assert torch.count_nonzero(m.C[~m.mask]) == 0
    assert sum(allocator.ranks().values()) == 6


def test_ranks_change_by_themselves_and_differ_between_layers():
    model = adalora_model(silent_b=True)
    allocator = train(model, 12)
    ranks = allocator.ranks()
    assert ranks["b"] == 0  # no gradient reaches it: its triplets are the least important
    assert sum(ranks.values()) == 6 and len(set(ranks.values())) > 1
    h = torch.tanh(model.a(batch(0)[0]))
    assert torch.equal(model.b(h), model.b.base(h))


@pytest.mark.parametrize("case", ["everything", "nothing", "single"])
def test_allocation_edge_cases(case):
    if case == "single":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 4)).double()
        convert(model, "adalora", progress=False, **{**SCHEDULE, "target_rank": 1})
        loss = lambda t: model(batch(t)[0]).square().mean()  # noqa: E731
    else:
        model = adalora_model(target_rank=4 if case == "everything" else 0)
        loss = lambda t: loss_of(model, t)  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    allocator = attach(model, opt)
    for t in range(1, 13):
        opt.zero_grad()
        loss(t).backward()
        opt.step()
    ranks = allocator.ranks()
    expected = {"everything": 11, "nothing": 0, "single": 1}[case]
    assert sum(ranks.values()) == expected and allocator.history[-1][1] == expected
    if case == "nothing":
        x = batch(0)[0]
        assert torch.equal(model(x), toy()(x))  # every singular value pruned: the base model
        assert all(torch.count_nonzero(m.C) == 0 for m in model.modules()
                   if isinstance(m, AdaLoRAAdapter))  # fmt: skip


@pytest.mark.parametrize(
    "options, match",
    [
        ({"rank": 4, "target_rank": 5, "total_steps": 10}, "target_rank"),
        ({"rank": 4, "target_rank": 2, "total_steps": 9, "t_init": 5, "t_final": 4}, "total_steps"),
        ({"rank": 4, "target_rank": 2}, "total_steps"),
        ({"rank": 4, "target_rank": 2, "total_steps": 10, "tinit": 2}, "unknown options"),
        ({"rank": 4, "target_rank": 2, "total_steps": 10, "beta1": 1.0}, "beta1"),
    ],
)
def test_errors_before_any_change(options, match):
    model = toy()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        convert(model, "adalora", progress=False, **options)
    assert type(model.a) is nn.Linear and all(torch.equal(v, before[k])
                                              for k, v in model.state_dict().items())  # fmt: skip


def test_merge_save_load_and_resume(tmp_path):
    original = toy()
    model = adalora_model()
    allocator = train(model, 6)
    x = batch(0)[0]
    y = model(x)
    for m in model.modules():
        if isinstance(m, AdaLoRAAdapter):
            m.merge()
    assert relative_error(model(x), y) <= 1e-12
    for m in model.modules():
        if isinstance(m, AdaLoRAAdapter):
            m.unmerge()
    assert relative_error(model(x), y) <= 1e-12
    lowrank.nn.save(model, tmp_path / "saved")
    loaded = lowrank.nn.load(copy.deepcopy(original), tmp_path / "saved")
    assert torch.equal(loaded(x), model(x))
    assert {n: m.current_rank for n, m in loaded.named_modules()
            if isinstance(m, AdaLoRAAdapter)} == allocator.ranks()  # fmt: skip
    # resume: 6 more steps from the saved model and the allocator's state = 12 steps at once
    train(loaded, 6, start=7, allocator_state=allocator.state_dict())
    straight = adalora_model()
    train(straight, 12)
    for p, q in zip(loaded.parameters(), straight.parameters()):
        assert relative_error(p, q) <= 1e-10


# PEFT warns that AdaLoRA's rank_pattern keys match no LoRA layer for its own saved adapters
# too; the pattern is applied by AdaLoRA's resize, which the shapes below check.
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")
def test_peft_export_loads_in_peft_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    original = toy(silent_b=True, dtype=torch.float32)
    model = copy.deepcopy(original)
    convert(model, "adalora", progress=False, **SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    allocator = attach(model, opt)
    for t in range(1, 13):
        opt.zero_grad()
        loss_of(model, t, torch.float32).backward()
        opt.step()
    assert allocator.ranks()["b"] == 0  # a layer with no triplets left
    save_peft(model, str(tmp_path))
    config = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, peft.AdaLoraConfig) and config.init_r == 4
    assert sum(config.rank_pattern["a.lora_E"]) == allocator.ranks()["a"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path))
    x = batch(0, torch.float32)[0]
    assert relative_error(theirs(x), model(x)) <= 1e-6
    assert theirs.base_model.model.a.lora_E["default"].shape[0] == allocator.ranks()["a"]


def masked_reference(m, x):
    """An AdaLoRA layer written out: ``base(x) + s x Q^T diag(Lambda * mask) P^T``."""
    core = torch.where(m.mask, m.C, torch.zeros_like(m.C))
    return m.base(x) + m.scale * ((x @ m.A.T) * core) @ m.B.T


# PEFT's rank_pattern warning: see test_peft_export_loads_in_peft_with_the_same_outputs.
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")
def test_pruned_values_never_act_after_the_final_allocation(tmp_path):
    """After the final allocation the mask is part of the layer's function: with the
    allocator detached, more steps and pruned values set by hand, the forward is the
    masked core's, and the merge, current_rank, save/load and both PEFT exports agree with
    it."""
    peft = pytest.importorskip("peft")
    original = toy(dtype=torch.float32)
    model = copy.deepcopy(original)
    convert(model, "adalora", progress=False, **SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    allocator = attach(model, opt)
    layers = allocator.layers
    x = batch(0, torch.float32)[0]
    for t in range(1, 16):
        if t == 13:  # the final allocation was at t = 9
            allocator.detach()
        opt.zero_grad()
        loss_of(model, t, torch.float32).backward()
        opt.step()
        assert all(m.mask_final == (t >= 9) for m in layers.values())
    assert allocator.final and sum(allocator.ranks().values()) == 6
    with torch.no_grad():  # pruned values moved by hand: they still do not act
        for m in layers.values():
            m.C[~m.mask] = torch.randn(int((~m.mask).sum()))
        assert all(torch.count_nonzero(m.C[~m.mask]) > 0 for m in layers.values() if m.rank > 2)
        h = torch.tanh(model.a(x))
        for m, inputs in ((model.a, x), (model.b, h), (model.c, h)):
            assert relative_error(m(inputs), masked_reference(m, inputs)) <= 1e-6
    assert all(m.current_rank == int(m.mask.sum()) for m in layers.values())
    with torch.no_grad():
        y = model(x)
        for m in layers.values():
            m.merge()
        assert relative_error(model(x), y) <= 1e-6
        for m in layers.values():
            m.unmerge()
        y = model(x)  # the base weights as merging and unmerging rounded them
    lowrank.nn.save(model, tmp_path / "saved")
    loaded = lowrank.nn.load(copy.deepcopy(original), tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    for folder, export in (("adalora", save_peft), ("lora", lowrank.nn.lora.save_peft)):
        export(model, str(tmp_path / folder))
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / folder))
        with torch.no_grad():
            assert relative_error(theirs(x), y) <= 1e-6, folder
    theirs_e = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "adalora"))
    assert theirs_e.base_model.model.a.lora_E["default"].shape[0] == model.a.current_rank


def test_export_between_allocations_warns_of_moved_pruned_values(tmp_path):
    """Before the final allocation pruned values train again between allocations (as in
    PEFT) and act; PEFT's AdaLoRA format keeps the allocation's triplets only, so an export
    then says what it drops. The plain-LoRA export keeps every value: the same function."""
    pytest.importorskip("peft")
    model = toy(dtype=torch.float32)
    convert(model, "adalora", progress=False, **SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    attach(model, opt)
    for t in range(1, 8):  # allocations at t = 2, 4, 6; the final one at t = 9
        opt.zero_grad()
        loss_of(model, t, torch.float32).backward()
        opt.step()
    assert any(bool((m.C[~m.mask] != 0).any()) for m in model.modules()
               if isinstance(m, AdaLoRAAdapter))  # fmt: skip
    assert not model.a.mask_final
    with pytest.warns(UserWarning, match="pruned singular values have moved"):
        save_peft(model, str(tmp_path / "adalora"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.nn.lora.save_peft(model, str(tmp_path / "lora"))


def test_allocating_needs_unmerged_layers():
    model = adalora_model()
    allocator = attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model.a.merge()
    masks = [m.mask.clone() for m in allocator.layers.values()]
    with pytest.raises(RuntimeError, match=r"unmerge the layers \['a'\]"):
        allocator.allocate(2)
    assert all(torch.equal(m.mask, k) for m, k in zip(allocator.layers.values(), masks))


@pytest.mark.parametrize("init", ["orthogonal", "gaussian"])
def test_inits_start_as_the_identity_change(init):
    torch.manual_seed(0)
    base = nn.Linear(40, 24).double()
    layer = AdaLoRAAdapter(copy.deepcopy(base), 6, init=init)
    x = torch.randn(5, 40, dtype=torch.float64)
    assert torch.equal(layer(x), base(x)) and torch.count_nonzero(layer.C) == 0
    if init == "orthogonal":  # where the orthogonality regulariser is zero
        assert float(layer.orthogonality_penalty().detach()) <= 1e-24
    else:  # the paper's and PEFT's N(0, 0.02^2)
        stds = [float(p.detach().std()) for p in (layer.A, layer.B)]
        assert all(abs(s - 0.02) < 0.003 for s in stds)
    with pytest.raises(ValueError, match="init"):
        AdaLoRAAdapter(copy.deepcopy(base), 6, init="pissa")
