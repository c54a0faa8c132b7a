"""LoRA-Pro's adjusted gradients (against a brute-force least-squares solve and the paper's
equations), the LoRAPro optimizer (against a plain-torch reference, resume), and ALLoRA's
row-norm gradient scaling, merge, save/load and PEFT export."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import relative_error
from torch import nn

import lowrank
from lowrank.nn import ALLoRAAdapter, LoRAAdapter, convert
from lowrank.optim import LoRAPro
from lowrank.optim.lora_pro import equivalent_gradient, lora_pro_gradients


def factors(m=7, n=5, r=3, seed=0, b_rank=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, r, generator=g, dtype=torch.float64)
    if b_rank is not None:  # a B of lower rank (B = 0 at LoRA's init)
        b[:, b_rank:] = 0.0 if b_rank == 0 else b[:, :1] * 0.5
    full = torch.randn(m, n, generator=g, dtype=torch.float64)
    return a, b, full


def lora_grads(a, b, full, s):
    return s * b.T @ full, s * full @ a.T


def brute_force(a, b, full, s):
    """All least-squares minimisers of ||s (B xA + xB A) - g|| over (xA, xB) as a matrix
    problem on vec(xA), vec(xB) (row-major), and the one closest to LoRA's gradients."""
    r, n = a.shape
    m = b.shape[0]
    # vec(B xA) = (B kron I_n) vec(xA); vec(xB A) = (I_m kron A^T) vec(xB)
    eye_n, eye_m = torch.eye(n, dtype=a.dtype), torch.eye(m, dtype=a.dtype)
    op = s * torch.cat([torch.kron(b, eye_n), torch.kron(eye_m, a.T.contiguous())], dim=1)
    target = full.reshape(-1)
    z0 = torch.linalg.pinv(op) @ target
    _, sv, vh = torch.linalg.svd(op)
    null = vh[int((sv > sv.max() * 1e-10).sum()) :].T
    ga, gb = lora_grads(a, b, full, s)
    z_lora = torch.cat([ga.reshape(-1), gb.reshape(-1)])
    closest = z0 + null @ (null.T @ (z_lora - z0))
    split = lambda z: (z[: r * n].reshape(r, n), z[r * n :].reshape(m, r))  # noqa: E731
    return (op @ z0).reshape(m, n), split(closest)


@pytest.mark.parametrize("b_rank", [None, 0])
def test_adjusted_gradients_are_the_least_squares_solution_closest_to_lora(b_rank):
    s = 2.0
    a, b, full = factors(b_rank=b_rank)
    ga, gb = lora_grads(a, b, full, s)
    new_a, new_b = lora_pro_gradients(a, b, ga, gb, s)
    best_equivalent, (ref_a, ref_b) = brute_force(a, b, full, s)
    assert relative_error(equivalent_gradient(a, b, new_a, new_b, s), best_equivalent) <= 1e-10
    # X from the Sylvester equation: the minimiser closest to LoRA's own gradients
    if b_rank is None:
        assert relative_error(new_a, ref_a) <= 1e-9 and relative_error(new_b, ref_b) <= 1e-9
    else:  # B = 0: A's gradient is zero for LoRA and for LoRA-Pro
        assert torch.count_nonzero(new_a) == 0 and relative_error(new_b, ref_b) <= 1e-9


def test_rank_deficient_b_still_gives_the_closest_equivalent_gradient():
    s = 0.5
    a, b, full = factors(m=9, n=6, r=4, seed=3, b_rank=2)
    ga, gb = lora_grads(a, b, full, s)
    for x in ("sylvester", "zero"):
        new_a, new_b = lora_pro_gradients(a, b, ga, gb, s, x=x)
        equivalent = equivalent_gradient(a, b, new_a, new_b, s)
        assert relative_error(equivalent, brute_force(a, b, full, s)[0]) <= 1e-9


def test_matches_the_papers_equations():
    """Theorems 2.1 and 2.2 with explicit inverses and the Sylvester equation solved as a
    Kronecker system."""
    s = 1.5
    a, b, full = factors(m=8, n=6, r=3, seed=1)
    ga, gb = lora_grads(a, b, full, s)
    btb_inv, aat_inv = torch.linalg.inv(b.T @ b), torch.linalg.inv(a @ a.T)
    r = a.shape[0]
    eye = torch.eye(r, dtype=a.dtype)
    rhs = -(1 / s**2) * btb_inv @ ga @ a.T
    # B^T B X + X A A^T = C  <=>  (B^T B kron I + I kron (A A^T)^T) vec(X) = vec(C) (row-major)
    system = torch.kron(b.T @ b, eye) + torch.kron(eye, (a @ a.T).T.contiguous())
    x = torch.linalg.solve(system, rhs.reshape(-1)).reshape(r, r)
    ref_a = (1 / s**2) * btb_inv @ ga + x @ a
    ref_b = (1 / s**2) * (torch.eye(b.shape[0], dtype=a.dtype) - b @ btb_inv @ b.T) @ gb @ aat_inv
    ref_b = ref_b - b @ x
    new_a, new_b = lora_pro_gradients(a, b, ga, gb, s)
    assert relative_error(new_a, ref_a) <= 1e-10 and relative_error(new_b, ref_b) <= 1e-10
    zero_a, zero_b = lora_pro_gradients(a, b, ga, gb, s, x="zero")
    assert relative_error(zero_a, ref_a - x @ a) <= 1e-10
    assert relative_error(zero_b, ref_b + b @ x) <= 1e-10


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 10)
        self.b = nn.Linear(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x))))


def lora_model(dtype=torch.float64, init="pissa"):
    torch.manual_seed(0)
    model = Toy().to(dtype)
    convert(model, "lora", rank=3, alpha=6.0, init=init, filter=["a", "b"], freeze=False,
            progress=False)  # fmt: skip
    return model


def batch(step, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 12, generator=g, dtype=dtype), torch.randn(16, 3, generator=g,
                                                                     dtype=dtype)  # fmt: skip


def loss_of(model, step, dtype=torch.float64):
    x, y = batch(step, dtype)
    return (model(x) - y).square().mean()


def reference_lora_pro(model, steps, lr, betas=(0.9, 0.999), eps=1e-8, mode="adamw"):
    """The update rule of the module docstring, written out: AdamW moments of the
    equivalent gradient, the direction projected back with the paper's equations;
    torch.optim.AdamW on the other parameters."""
    adapters = [m for m in model.modules() if isinstance(m, LoRAAdapter)]
    others = [p for n, p in model.named_parameters() if n.startswith("head")]
    plain = torch.optim.AdamW(others, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    moments = {id(m): [0.0, 0.0] for m in adapters}
    for t in range(1, steps + 1):
        model.zero_grad()
        loss_of(model, t).backward()
        with torch.no_grad():
            for m in adapters:
                a, b, s = m.A, m.B, m.scale
                if mode == "sgd":
                    ga, gb = lora_pro_gradients(a, b, a.grad, b.grad, s)
                else:
                    pa, pb = lora_pro_gradients(a, b, a.grad, b.grad, s)
                    eq = s * (b @ pa + pb @ a)
                    mom = moments[id(m)]
                    mom[0] = betas[0] * mom[0] + (1 - betas[0]) * eq
                    mom[1] = betas[1] * mom[1] + (1 - betas[1]) * eq * eq
                    m_hat, v_hat = mom[0] / (1 - betas[0] ** t), mom[1] / (1 - betas[1] ** t)
                    d = m_hat / (v_hat.sqrt() + eps)
                    ga, gb = lora_pro_gradients(a, b, s * b.T @ d, s * d @ a.T, s)
                a -= lr * ga
                b -= lr * gb
        if mode == "sgd":
            with torch.no_grad():
                for p in others:
                    p -= lr * p.grad
        else:
            plain.step()


@pytest.mark.parametrize("mode", ["adamw", "sgd"])
def test_optimizer_matches_the_reference(mode):
    ours, ref = lora_model(), lora_model()
    opt = LoRAPro(ours, lr=1e-2, mode=mode)
    for t in range(1, 4):
        opt.zero_grad()
        loss_of(ours, t).backward()
        opt.step()
    reference_lora_pro(ref, 3, 1e-2, mode=mode)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        if p.requires_grad:
            assert relative_error(p, q) <= 1e-10, name


def test_closer_to_full_fine_tuning_than_lora():
    """From PiSSA's init, one SGD step of LoRA-Pro moves the weights closer to full
    fine-tuning's step than LoRA's does (the least-squares property, per layer)."""
    full = lora_model()
    for m in full.modules():
        if isinstance(m, LoRAAdapter):
            m.merge()
            m.base.weight.requires_grad_(True)
    loss_of(full, 1).backward()
    gaps = {}
    for mode in ("lora", "lora_pro"):
        model = lora_model()
        if mode == "lora":
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        else:
            opt = LoRAPro(model, lr=1e-3, mode="sgd")
        before = {n: m.weight.detach().clone() for n, m in model.named_modules()
                  if isinstance(m, LoRAAdapter)}  # fmt: skip
        loss_of(model, 1).backward()
        opt.step()
        gaps[mode] = 0.0
        for n, m in model.named_modules():
            if isinstance(m, LoRAAdapter):
                full_step = -1e-3 * full.get_submodule(n).base.weight.grad
                gaps[mode] += float((m.weight.detach() - before[n] - full_step).norm())
    assert gaps["lora_pro"] < 0.8 * gaps["lora"]


def test_resume_is_exact(tmp_path):
    def run(model, steps, opt):
        for t in steps:
            opt.zero_grad()
            loss_of(model, t, torch.float32).backward()
            opt.step()

    a = lora_model(torch.float32)
    opt_a = LoRAPro(a, lr=1e-2, weight_decay=0.01)
    run(a, range(1, 5), opt_a)
    b = lora_model(torch.float32)
    opt_b = LoRAPro(b, lr=1e-2, weight_decay=0.01)
    run(b, range(1, 3), opt_b)
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    c = lora_model(torch.float32)
    opt_c = LoRAPro(c, lr=1e-2, weight_decay=0.01)
    saved = torch.load(tmp_path / "ckpt.pt")
    c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    run(c, range(3, 5), opt_c)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


def test_optimizer_errors():
    with pytest.raises(ValueError, match="LoRAAdapter"):
        LoRAPro(Toy())
    model = lora_model()
    with pytest.raises(ValueError, match="mode"):
        LoRAPro(model, mode="adam")
    with pytest.raises(ValueError, match="x must"):
        LoRAPro(model, x="symmetric")
    with pytest.raises(ValueError, match="lr"):
        LoRAPro(model, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        LoRAPro(model, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="model"):
        LoRAPro([p for p in model.parameters()])


# ---- ALLoRA -------------------------------------------------------------------------------------


def test_allora_scales_each_rows_gradient_by_its_norm():
    torch.manual_seed(0)
    base = nn.Linear(9, 7).double()
    layer = ALLoRAAdapter(copy.deepcopy(base), 3, eta=2.0)
    with torch.no_grad():
        layer.B.normal_()
        layer.B[1] = 0.0  # a zero row: coefficient eta
    x = torch.randn(5, 9, dtype=torch.float64)
    layer(x).sin().sum().backward()
    # plain LoRA without scale or dropout, written out
    a = layer.A.detach().clone().requires_grad_()
    b = layer.B.detach().clone().requires_grad_()
    (base(x) + x @ a.T @ b.T).sin().sum().backward()
    for p, ref in ((layer.A, a), (layer.B, b)):
        coefficient = 1.0 / (ref.detach().square().sum(1, keepdim=True) + 1 / 2.0**2).sqrt()
        assert relative_error(p.grad, ref.grad * coefficient) <= 1e-12
    assert torch.allclose(layer.B.grad[1], 2.0 * b.grad[1], rtol=1e-12, atol=0)
    assert relative_error(layer(x), base(x) + x @ a.T @ b.T) <= 1e-12


def test_allora_convert_merge_save_load_and_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    original = Toy()
    model = copy.deepcopy(original)
    convert(model, "allora", rank=2, eta=3.0, filter=["a", "b"], progress=False)
    assert isinstance(model.a, ALLoRAAdapter) and model.a.scale == 1.0 and model.a.eta == 3.0
    with torch.no_grad():
        for m in (model.a, model.b):
            m.B.normal_()
    x = torch.randn(4, 12)
    y = model(x)
    model.a.merge()
    assert relative_error(model(x), y) <= 1e-6
    model.a.unmerge()
    assert relative_error(model(x), y) <= 1e-6
    lowrank.nn.save(model, tmp_path / "saved")
    loaded = lowrank.nn.load(copy.deepcopy(original), tmp_path / "saved")
    assert isinstance(loaded.b, ALLoRAAdapter) and loaded.b.eta == 3.0
    assert torch.equal(loaded(x), model(x))
    lowrank.nn.lora.save_peft(model, str(tmp_path / "peft"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "peft"))
    assert relative_error(theirs(x), y) <= 1e-6
    with pytest.raises(ValueError, match="eta"):
        convert(copy.deepcopy(original), "allora", eta=0.0, progress=False)
    with pytest.raises(ValueError, match="init"):
        convert(copy.deepcopy(original), "allora", init="eva", progress=False)


def test_adjusted_gradient_errors():
    a, b, full = factors()
    ga, gb = lora_grads(a, b, full, 1.0)
    with pytest.raises(ValueError, match="grad_b"):
        lora_pro_gradients(a, b, ga, gb.T, 1.0)
    with pytest.raises(ValueError, match=r"b\.shape"):
        lora_pro_gradients(a, b[:, :2], ga, gb[:, :2], 1.0)
    with pytest.raises(ValueError, match="scale"):
        lora_pro_gradients(a, b, ga, gb, 0.0)
    with pytest.raises(ValueError, match="x must"):
        lora_pro_gradients(a, b, ga, gb, 1.0, x="symmetric")
