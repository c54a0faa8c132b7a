"""The SVD-parameterised adapters (SVDAdapter and LoRA-XS, LoRA-SB, SORSA, SVFit, LoLDU):
each against a reference written from its paper's equations with a dense SVD / LU in plain
torch (init, forward, gradients of the trainable parts only), merging, state dicts, saving,
torch.compile, autocast, pickling, and the plain-LoRA PEFT export loaded by PEFT."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from conftest import RecordShapes, Toy, relative_error, toy
from torch import nn

from lowrank.nn import SVDAdapter, convert, load, save, unconvert
from lowrank.nn.lora import peft_state, save_peft
from lowrank.nn.svd_adapter import describe, top_singular_triplets
from lowrank.nn.svd_methods import (
    LoLDUAdapter,
    LoRASBAdapter,
    LoRAXSAdapter,
    SORSAAdapter,
    SVFitAdapter,
    first_update,
    orthonormality_error,
    sorsa_hook,
    sorsa_regularizer,
    sorsa_step,
)

peft = pytest.importorskip("peft")

KINDS = ("lora_xs", "lora_sb", "sorsa", "svfit", "loldu")
TRAINABLE = {"lora_xs": {"C"}, "lora_sb": {"C"}, "sorsa": {"B", "C", "A"}, "svfit": {"C"},
             "loldu": {"C", "scale"}}  # fmt: skip


def inputs(n=32, width=16, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g).to(dtype)


def square_loss(_batch, output):
    return output.square().mean()


def options(kind):
    return {"loss": square_loss} if kind == "lora_sb" else {}


def calibration(kind, dtype=torch.float32):
    return [inputs(dtype=dtype, seed=7), inputs(dtype=dtype, seed=8)] if kind == "lora_sb" else None


def perturb(model, scale=0.05, seed=3):
    """As if trained: every trainable part moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def aligned_svd(w, rank, like_u):
    """The dense top-``rank`` SVD of ``w`` with each singular pair's sign chosen to match
    ``like_u`` (singular vectors are unique up to a joint sign)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    signs = torch.sign((u * like_u.to(u.dtype)).sum(0))
    return u * signs, s, vh * signs[:, None]


# ---- the references, from the papers' equations -------------------------------------------------


def reference_weight(kind, w, layer, rank=4):
    """``(W_effective, trainable leaves)``: the adapted weight built in plain torch from the
    paper's decomposition of the original ``w`` and the layer's trainable values (as leaves
    that require grad, to compare gradients)."""
    leaves = {n: getattr(layer, n).detach().clone().requires_grad_(True)
              for n in TRAINABLE[kind]}  # fmt: skip
    if kind == "loldu":
        p, lower, upper = torch.linalg.lu(w)
        d = upper.diagonal()[:rank]
        big_l, big_u = (p @ lower)[:, :rank], upper[:rank] / d[:, None]
        residual = w - 1.0 * big_l @ torch.diag(d) @ big_u  # the initial scale is 1
        delta = leaves["scale"] * big_l @ torch.diag(leaves["C"]) @ big_u
        return residual + delta, leaves
    u, s, vh = aligned_svd(w, rank, layer.B.detach())
    if kind == "lora_xs":  # W + (alpha / r) U_r R S_r V_r^T
        return w + layer.scale * u @ leaves["C"] @ torch.diag(s) @ vh, leaves
    if kind == "svfit":  # W_res + U_r diag(s') V_r^T
        return w - u @ torch.diag(s) @ vh + u @ torch.diag(leaves["C"]) @ vh, leaves
    if kind == "sorsa":  # W_res + U_p diag(S_p) V_p^T, all trainable
        principal = leaves["B"] @ torch.diag(leaves["C"]) @ leaves["A"]
        return w - u @ torch.diag(s) @ vh + principal, leaves
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["lora_xs", "sorsa", "svfit", "loldu"])
def test_against_the_paper(kind):
    """Init, forward and gradients (trainable parts only) against the reference."""
    original = toy(torch.float64)
    model = copy.deepcopy(original)
    convert(model, kind, rank=4, svd="exact", progress=False)
    layer = model.a
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == TRAINABLE[kind]
    assert not layer.base.weight.requires_grad
    w = original.a.weight.detach()
    # init: the frozen factors are the paper's
    if kind == "loldu":
        p, lower, upper = torch.linalg.lu(w)
        assert relative_error(layer.B, (p @ lower)[:, :4]) <= 1e-12
        assert relative_error(layer.A, upper[:4] / upper.diagonal()[:4, None]) <= 1e-12
        assert relative_error(layer.C, upper.diagonal()[:4]) <= 1e-12
    else:
        u, s, vh = aligned_svd(w, 4, layer.B.detach())
        assert relative_error(layer.B, u) <= 1e-10
        if kind == "lora_xs":
            assert relative_error(layer.A, s[:, None] * vh) <= 1e-10
            assert 0 < float(layer.C.detach().abs().max()) < 1e-4  # N(0, 1e-10)
        else:
            assert relative_error(layer.A, vh) <= 1e-10
            assert relative_error(layer.C, s) <= 1e-10
    x = inputs(dtype=torch.float64, seed=5)
    if kind != "lora_xs":  # the function is unchanged at init
        assert relative_error(model(x), original(x)) <= 1e-12
    perturb(model)
    effective, leaves = reference_weight(kind, w, layer)
    assert relative_error(layer.weight, effective) <= 1e-12
    target = torch.tanh(x @ effective.T + original.a.bias)
    assert relative_error(layer(x), x @ effective.T + original.a.bias) <= 1e-12
    target.square().sum().backward()
    layer(x).tanh().square().sum().backward()
    for name, leaf in leaves.items():
        assert relative_error(getattr(layer, name).grad, leaf.grad) <= 1e-10, name
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


def test_lora_sb_starts_as_the_best_rank_r_first_update():
    """LoRA-SB's claims: the adapter starts as the best rank-r approximation of the first
    full fine-tuning update, and each step on the core moves W by the projection of the
    full gradient onto the frozen bases (the closest update the form allows)."""
    original = toy(torch.float64)
    batches = calibration("lora_sb", torch.float64)
    for update in ("gradient", "sign"):
        model = copy.deepcopy(original)
        convert(model, "lora_sb", rank=4, lr=0.1, update=update, loss=square_loss,
                calibration=batches, svd="exact", progress=False)  # fmt: skip
        # the reference: the mean gradient of the loss over the batches, in plain torch
        w = original.a.weight.detach().clone().requires_grad_(True)
        grad = torch.zeros_like(w)
        for x in batches:
            h = torch.tanh(x @ w.T + original.a.bias)
            loss = square_loss(x, original.b(h))
            grad += torch.autograd.grad(loss, w)[0] / len(batches)
        full = -0.1 * (grad if update == "gradient" else torch.sign(grad))
        u, s, vh = torch.linalg.svd(full)
        best = (u[:, :4] * s[:4]) @ vh[:4]  # Eckart-Young
        layer = model.a
        assert relative_error(layer.delta_weight(), best) <= 1e-10
        assert relative_error(layer.base.weight, original.a.weight) == 0  # base unchanged
    # one SGD step on C: the equivalent update is the projection of the full gradient
    x = batches[0]
    w_now = layer.weight.detach().clone().requires_grad_(True)
    g_full = torch.autograd.grad(model.b(torch.tanh(x @ w_now.T + layer.base.bias)).square()
                                 .mean(), w_now)[0]  # fmt: skip
    before = layer.weight.detach().clone()
    optimizer = torch.optim.SGD([layer.C], lr=0.5)
    model(x).square().mean().backward()
    optimizer.step()
    step = layer.weight.detach() - before
    b, a = layer.B.detach(), layer.A.detach()
    assert relative_error(b.T @ b, torch.eye(4, dtype=torch.float64)) <= 1e-10
    projected = -0.5 * b @ b.T @ g_full @ a.T @ a
    assert relative_error(step, projected) <= 1e-10


def test_first_update_errors_and_flags():
    model = toy()
    layers = {"a": model.a}
    model.a.weight.requires_grad_(False)
    updates = first_update(model, [inputs()], layers, loss=square_loss, update="gradient",
                           progress=False)  # fmt: skip
    assert updates["a"].shape == (24, 16)
    assert not model.a.weight.requires_grad and model.a.weight.grad is None
    with pytest.raises(ValueError, match="scalar loss"):
        first_update(model, [inputs()], layers, progress=False)
    with pytest.raises(ValueError, match="update"):
        first_update(model, [inputs()], layers, update="adam", progress=False)
    with pytest.raises(ValueError, match="calibration"):
        convert(toy(), "lora_sb", rank=2, loss=square_loss, progress=False)


# ---- SORSA's regulariser ------------------------------------------------------------------------


def reference_sorsa_regulariser(layers):
    """The paper's L_reg = ||U_p^T U_p - I||_F + ||V_p^T V_p - I||_F (norms, not squared),
    summed over the layers, in plain torch."""
    eye = torch.eye(4, dtype=torch.float64)
    return sum(torch.linalg.matrix_norm(m.B.T @ m.B - eye)
               + torch.linalg.matrix_norm(m.A @ m.A.T - eye) for m in layers)  # fmt: skip


def test_sorsa_regulariser_and_its_separate_step():
    model = convert(toy(torch.float64), "sorsa", rank=4, svd="exact", progress=False).model
    assert float(sorsa_regularizer(model).detach()) <= 1e-12
    assert orthonormality_error(model) <= 1e-12
    perturb(model, scale=0.1)
    layers = [model.a, model.b]
    params = [p for m in layers for p in (m.B, m.A)]
    value = sorsa_regularizer(model)
    expected = reference_sorsa_regulariser(layers)
    assert relative_error(value, expected) <= 1e-12
    grads = torch.autograd.grad(expected, params)
    before = [p.detach().clone() for p in params]
    sorsa_step(model, 1e-3)
    for b, a, g in zip(before, params, grads):
        assert relative_error(a.detach(), b - 1e-3 * g) <= 1e-12
    # exactly orthonormal factors do not move (the norm's subgradient there is 0)
    layer = SORSAAdapter(nn.Linear(6, 5).double(), 3, svd="exact")
    with torch.no_grad():
        layer.B.copy_(torch.eye(5, 3, dtype=torch.float64))
        layer.A.copy_(torch.eye(3, 6, dtype=torch.float64))
    sorsa_step(layer, 1.0)
    assert torch.equal(layer.B, torch.eye(5, 3, dtype=torch.float64))
    assert torch.equal(layer.A, torch.eye(3, 6, dtype=torch.float64))


def test_sorsa_hook_is_the_papers_update():
    """W_{t+1} = W_t - eta_t g(W_t) - gamma eta_t / eta_0 grad L_reg(W_t): with SGD, both
    gradients taken at W_t, and gamma following the learning-rate schedule (at half the
    initial rate, half of gamma)."""
    model = perturb(convert(toy(torch.float64), "sorsa", rank=4, svd="exact",
                            progress=False).model, scale=0.1)  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.25)
    optimizer.param_groups[0]["initial_lr"] = 0.5
    handle = sorsa_hook(optimizer, model, gamma=1e-2)
    x = inputs(dtype=torch.float64)
    model(x).square().mean().backward()
    layers = [model.a, model.b]
    params = [p for m in layers for p in (m.B, m.A)]
    reg_grads = torch.autograd.grad(reference_sorsa_regulariser(layers), params)
    expected = {id(p): p.detach() - 0.25 * p.grad for p in trainable}
    for p, g in zip(params, reg_grads):
        expected[id(p)] = expected[id(p)] - 0.5e-2 * g
    optimizer.step()
    for p in trainable:
        assert relative_error(p.detach(), expected[id(p)]) <= 1e-12
    handle.remove()
    # descending the regulariser with a decaying step (as gamma_t does under a decaying
    # schedule) drives the factors to orthonormal
    error = orthonormality_error(model)
    for t in range(40):
        sorsa_step(model, 0.05 * 0.85**t)
    assert orthonormality_error(model) < min(error / 100, 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sorsa_hook_warns_when_the_factors_round_its_step_away(dtype):
    """In float16/bfloat16 factors the regulariser's step is below their rounding:
    sorsa_hook says so once (not at every step) and names the adapters' dtype option, which
    keeps them in float32 on the low-precision base: no warning, and the step is kept."""
    model = convert(toy(dtype), "sorsa", rank=4, progress=False).model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.warns(UserWarning, match=r"B and A in .*dtype=torch\.float32") as record:
        handle = sorsa_hook(optimizer, model)
        for _ in range(3):
            optimizer.step()
    assert sum("SORSA" in str(w.message) for w in record) == 1
    assert str(dtype).removeprefix("torch.") in str(record[0].message)
    handle.remove()
    kept = perturb(convert(toy(dtype), "sorsa", rank=4, progress=False,
                           dtype=torch.float32).model)  # fmt: skip
    assert kept.a.B.dtype == torch.float32 and kept.a.base.weight.dtype == dtype
    optimizer = torch.optim.SGD([p for p in kept.parameters() if p.requires_grad], lr=0.1)
    before = kept.a.B.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sorsa_hook(optimizer, kept)
        optimizer.step()  # no gradients: the regulariser's step alone
    assert bool((before != kept.a.B).all())


# ---- the core -----------------------------------------------------------------------------------


def test_core_never_forms_the_dense_change():
    layer = SORSAAdapter(nn.Linear(40, 48), 3)
    x = torch.randn(7, 40, requires_grad=True)
    with RecordShapes() as seen:
        layer(x).square().sum().backward()
    assert (48, 40) not in seen.shapes and (40, 48) not in seen.shapes


def test_core_full_and_diagonal_and_set_trainable():
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    g = torch.Generator().manual_seed(0)
    b, c, a = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((10, 3), (3, 3), (3, 12)))
    full = SVDAdapter(copy.deepcopy(base), 3, trainable=("B", "A"), scale=0.5)
    full.set_factors(b, c, a)
    x = torch.randn(5, 12, dtype=torch.float64)
    assert relative_error(full(x), base(x) + 0.5 * x @ (b @ c @ a).T) <= 1e-12
    assert {n for n, _ in full.named_parameters()} == {"B", "A", "base.weight", "base.bias"}
    full.set_trainable({"C", "scale"})
    assert {n for n, p in full.named_parameters() if p.requires_grad} == {"C", "scale"}
    assert relative_error(full(x), base(x) + 0.5 * x @ (b @ c @ a).T) <= 1e-12
    diag = SVDAdapter(copy.deepcopy(base), 3, diagonal=True)
    diag.set_factors(b, c.diagonal(), a, residual=True)
    assert relative_error(diag(x), base(x)) <= 1e-12
    with pytest.raises(ValueError, match=r"C must have shape \(3,\)"):
        diag.set_factors(b, c, a)
    with pytest.raises(ValueError, match="trainable"):
        SVDAdapter(copy.deepcopy(base), 3, trainable=("D",))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_state_dict_and_pickle(kind):
    model = toy(torch.float64)
    convert(model, kind, rank=4, calibration=calibration(kind, torch.float64), progress=False,
            **options(kind))  # fmt: skip
    perturb(model)
    x = inputs(dtype=torch.float64, seed=5)
    expected = model(x)
    weight = model.a.base.weight.detach().clone()
    model.a.merge()
    assert relative_error(model(x), expected) <= 1e-12
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v
             for k, v in model.state_dict().items()}  # fmt: skip
    model.a.unmerge()
    assert relative_error(model.a.base.weight, weight) <= 1e-14
    assert relative_error(model(x), expected) <= 1e-12
    # a fresh structure (as loading builds it) takes the merged state
    fresh = toy(torch.float64)
    cls = type(model.a)
    for name in ("a", "b"):
        setattr(fresh, name, cls.empty(getattr(fresh, name), describe(getattr(model, name))))
    fresh.load_state_dict(state)
    assert fresh.a.merged and relative_error(fresh(x), expected) <= 1e-12
    again = pickle.loads(pickle.dumps(model))
    assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_and_peft_export(kind, tmp_path):
    """Through lowrank.nn.save/load, and as plain LoRA loaded by PEFT onto the original
    model: the same outputs after training."""
    original = toy()
    model = copy.deepcopy(original)
    report = convert(model, kind, rank=4, calibration=calibration(kind), progress=False,
                     **options(kind))  # fmt: skip
    x = inputs(seed=5)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        expected = model(x)
        assert relative_error(expected, original(x)) > 1e-4  # training changed the function
    save(model, tmp_path / "lowrank", report)
    loaded = load(toy(), tmp_path / "lowrank")
    with torch.no_grad():
        assert relative_error(loaded(x), expected) == 0
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {
        n: p.requires_grad for n, p in model.named_parameters()
    }
    save_peft(model, str(tmp_path / "peft"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "peft"))
    with torch.no_grad():
        assert relative_error(theirs(x), expected) <= 1e-5
    _, config = peft_state(model)
    assert config["r"] == (8 if kind == "sorsa" else 4)  # B and A trained: rank 2r
    assert relative_error(model.a.original_weight(), original.a.weight) <= 1e-6
    dense = unconvert(copy.deepcopy(model))
    assert all(type(m) is nn.Linear for m in (dense.a, dense.b))
    with torch.no_grad():
        assert relative_error(dense(x), expected) <= 1e-5


@pytest.mark.parametrize("kind", ["svfit", "loldu"])
def test_factors_made_trainable_after_a_residual_init(kind, tmp_path):
    """A residual init keeps B0/A0 only for a trainable B/A; B and A made trainable later by
    set_trainable (after a merge and unmerge, which leave them as they are) and trained:
    the original weight, the PEFT export and save/load still give the model."""
    original = toy()
    model = copy.deepcopy(original)
    report = convert(model, kind, rank=4, progress=False)
    x = inputs(seed=5)
    for layer in (model.a, model.b):
        assert layer.B0 is None and layer.A0 is None and layer.C0 is not None
        layer.merge()
        layer.unmerge()
        layer.set_trainable(("B", "C", "A"))
        assert layer.B0 is not None and layer.A0 is not None
        assert layer.B0.data_ptr() != layer.B.data_ptr()  # a copy, not the trained tensor
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(5):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        expected = model(x)
        assert relative_error(expected, original(x)) > 1e-2  # B and A trained too
    for name in ("a", "b"):
        layer, linear = getattr(model, name), getattr(original, name)
        assert relative_error(layer.original_weight(), linear.weight) <= 1e-6
    _, config = peft_state(model)
    assert config["r"] == 8  # [A; A0] and [s B C, -B0 C0]
    save_peft(model, str(tmp_path / "peft"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "peft"))
    with torch.no_grad():
        assert relative_error(theirs(x), expected) <= 1e-5
    save(model, tmp_path / "lowrank", report)
    loaded = load(toy(), tmp_path / "lowrank")
    assert loaded.a.B0 is not None and torch.equal(loaded.a.B0, model.a.B0)
    with torch.no_grad():
        assert relative_error(loaded(x), expected) == 0
    # made frozen again, B keeps its trained value and B0 the initial one
    model.a.set_trainable(("C",))
    model.a.set_trainable(("B", "C"))
    assert torch.equal(model.a.B0, loaded.a.B0)
    assert relative_error(model.a.original_weight(), original.a.weight) <= 1e-6


def test_peft_export_errors_name_what_is_exported(tmp_path):
    """The plain-LoRA export takes any adapter with peft_factors, and says so."""
    with pytest.raises(ValueError, match=r"no adapter with plain LoRA factors.*peft_factors"):
        save_peft(toy(), str(tmp_path))
    model = convert(toy(), "svfit", rank=2, progress=False).model
    model.b.merge()
    with pytest.raises(ValueError, match=r"^b: unmerge"):
        peft_state(model)
    assert not (tmp_path / "adapter_config.json").exists()


def test_compile_and_autocast():
    layer = SORSAAdapter(nn.Linear(16, 12), 4)
    perturb(layer)
    x = torch.randn(5, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert relative_error(compiled(x), layer(x)) <= 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and relative_error(y, layer(x)) <= 2e-2
    y.float().sum().backward()
    assert layer.C.grad is not None and layer.C.grad.dtype == torch.float32


def test_on_the_meta_device_then_load():
    trained = perturb(convert(toy(), "svfit", rank=4, progress=False).model)
    with torch.device("meta"):
        skeleton = Toy()
    convert(skeleton, "svfit", rank=4, progress=False)
    assert skeleton.a.C.is_meta and skeleton.a.C0 is not None
    skeleton.to_empty(device="cpu")
    skeleton.load_state_dict(trained.state_dict())
    x = inputs()
    with torch.no_grad():
        assert relative_error(skeleton(x), trained(x)) <= 1e-6


# ---- init: batched and seeded -------------------------------------------------------------------


def test_batched_triplets_match_one_by_one():
    g = torch.Generator().manual_seed(0)
    weights = {f"w{i}": torch.randn(24, 16, generator=g, dtype=torch.float64) for i in range(3)}
    weights["other"] = torch.randn(8, 24, generator=g, dtype=torch.float64)
    batched = top_singular_triplets(weights, 4, n_iter=6)
    for name, w in weights.items():
        u, s, vh = batched[name]
        _, s_ref, _ = torch.linalg.svd(w)
        assert relative_error(s, s_ref[:4]) <= 1e-6
        assert relative_error((u * s) @ vh, top_part(w, 4)) <= 1e-4
    again = top_singular_triplets(weights, 4, n_iter=6)
    assert all(torch.equal(again[n][0], batched[n][0]) for n in weights)  # seeded


def top_part(w, r):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("init", ["constant", "uniform", "normal"])
def test_loldu_diagonal_inits_keep_the_function(init):
    base = toy(torch.float64).a
    layer = LoLDUAdapter(copy.deepcopy(base), 4, init_diagonal=init)
    x = inputs(dtype=torch.float64)
    assert relative_error(layer(x), base(x)) <= 1e-12
    if init == "constant":
        assert torch.all(layer.C[0] == layer.C)


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_before_any_change(kind):
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"rank must be at most.*b is 8x24"):
        convert(model, kind, rank=9, calibration=calibration(kind), progress=False,
                **options(kind))  # fmt: skip
    with pytest.raises(ValueError, match="unknown options"):
        convert(model, kind, rank=2, init="pissa", progress=False)
    assert all(type(m) is nn.Linear for m in (model.a, model.b))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_overflowing_options_are_named_before_any_change():
    """Options whose values overflow the adapters' dtypes: an error naming the option, before
    any layer changes (not a non-finite factor found later, nor an infinite scale)."""
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sigma"):
        convert(model, "lora_xs", rank=2, sigma=1e300, progress=False)
    with pytest.raises(ValueError, match="sigma"):  # finite in float32, not in float16
        convert(toy(), "lora_xs", rank=2, sigma=1e4, dtype=torch.float16, progress=False)
    for kind in ("lora_xs", "loldu"):
        with pytest.raises(ValueError, match="alpha"):
            convert(model, kind, rank=2, alpha=1e300, progress=False)
    with pytest.raises(ValueError, match=r"lr = 1e\+300 makes the first update of a overflow"):
        convert(model, "lora_sb", rank=2, lr=1e300, calibration=calibration("lora_sb"),
                loss=square_loss, progress=False)  # fmt: skip
    assert all(type(m) is nn.Linear for m in (model.a, model.b))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a large but finite lr: the update's SVD does not overflow (the singular values scale)
    sb = {"svd": "exact", "loss": square_loss, "progress": False,
          "calibration": calibration("lora_sb", torch.float64)}  # fmt: skip
    big = convert(toy(torch.float64), "lora_sb", rank=2, lr=1e200, **sb).model
    unit = convert(toy(torch.float64), "lora_sb", rank=2, lr=1.0, **sb).model
    assert relative_error(big.a.C, 1e200 * unit.a.C) <= 1e-12
    layer = LoRASBAdapter(nn.Linear(6, 4), 2, torch.full((4, 6), 1e30))
    assert relative_error(layer.delta_weight(), torch.full((4, 6), 1e30)) <= 1e-5


def test_per_layer_bad_input():
    linear = nn.Linear(4, 6)
    for cls in (LoRAXSAdapter, SORSAAdapter, SVFitAdapter, LoLDUAdapter):
        with pytest.raises(ValueError, match="rank must be at most"):
            cls(linear, 5)
    with pytest.raises(ValueError, match="svd"):
        SVFitAdapter(linear, 2, svd="fast")
    with pytest.raises(ValueError, match="init_diagonal"):
        LoLDUAdapter(linear, 2, init_diagonal="ones")
    with pytest.raises(ValueError, match="update="):
        LoRASBAdapter(linear, 2)
    with pytest.raises(ValueError, match="update must have"):
        LoRASBAdapter(linear, 2, torch.zeros(4, 6))
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        SVFitAdapter(nn.Conv1d(3, 3, 1), 2)
    with pytest.raises(ValueError, match="gamma"):
        sorsa_step(toy(), -1.0)
    with pytest.raises(ValueError, match="no SORSAAdapter"):
        sorsa_hook(torch.optim.SGD(toy().parameters(), lr=0.1), toy())
