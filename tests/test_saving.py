"""The registry of conversion kinds (a kind from user code included) and lowrank.nn.save /
load: every kind, models converted in parts, tied and shared layers, and every way a
directory can fail to match a model (the model must stay as it was)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from test_convert import Toy, ids
from torch import nn

import lowrank.nn as lnn
from lowrank.nn import KindConfig, convert, kinds, load, register_kind, save, unconvert
from lowrank.nn._base import AdapterLinear


def next_token_loss(batch, logits):
    """The language-model loss of the toy model's logits on its input ids."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


BUILT_IN = {
    "lowrank": {"rank": 4},
    "monarch": {"nblocks": 4},
    "sltrain": {"rank": 3},
    "kron": {},
    "kron_adapter": {"rank": 2},
    "lora": {"rank": 2, "init": "pissa"},
    "adalora": {"rank": 2, "target_rank": 1, "total_steps": 10},
    "allora": {"rank": 2},
    "bone": {"rank": 2},
    "randlora": {"rank": 2},
    "lora_xs": {"rank": 2},
    # LoRA-SB's init is the SVD of the first update full fine-tuning would make: gradients of
    # a loss on calibration batches
    "lora_sb": {"rank": 2, "loss": next_token_loss, "calibration": [ids(seed=7), ids(seed=8)]},
    "sorsa": {"rank": 2},
    "svfit": {"rank": 2},
    "loldu": {"rank": 2, "init_diagonal": "normal"},
}


def _perturb(model):
    """A converted model that has trained a little: values no conversion would give."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_built_in_kinds_are_registered():
    assert set(BUILT_IN) <= set(kinds())


@pytest.mark.parametrize("kind", list(BUILT_IN))
def test_save_load_round_trip(tmp_path, kind):
    model = Toy()
    report = convert(model, kind, progress=False, **BUILT_IN[kind])
    _perturb(model)
    save(model, tmp_path, report)
    fresh = Toy()
    assert load(fresh, tmp_path) is fresh
    x = ids(seed=5)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == {
        n: p.requires_grad for n, p in model.named_parameters()
    }
    assert fresh.head.weight is fresh.embed.weight  # still tied
    description = json.loads((tmp_path / "lowrank.json").read_text())
    assert description["reports"][0]["kind"] == kind
    assert all(m["kind"] == kind for m in description["modules"])
    # a loaded model saves and unconverts like the one converted here
    save(fresh, tmp_path / "again")
    torch.testing.assert_close(unconvert(fresh)(x), unconvert(model)(x))


def test_weights_file_holds_no_dense_copy(tmp_path):
    model = Toy()
    convert(model, "lowrank", rank=2, progress=False)
    save(model, tmp_path)
    unique = {p.data_ptr(): p for p in model.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in unique.values())
    assert (tmp_path / "model.safetensors").stat().st_size <= 1.02 * param_bytes + 4096


def test_model_converted_in_parts(tmp_path):
    model = Toy()
    convert(model, "lowrank", rank=3, filter=["fc1", "fc2"], progress=False)
    convert(model, "lora", rank=2, filter=["q", "v"], init="olora", freeze=False, progress=False)
    convert(model, "monarch", filter=r"blocks\.1\.o", progress=False)
    _perturb(model)
    save(model, tmp_path)
    fresh = load(Toy(), tmp_path)
    x = ids(seed=3)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    kinds_saved = {
        m["kind"] for m in json.loads((tmp_path / "lowrank.json").read_text())["modules"]
    }
    assert kinds_saved == {"lowrank", "lora", "monarch"}


def test_shared_layer_stays_shared(tmp_path):
    model = Toy()
    model.blocks[1].fc1 = model.blocks[0].fc1  # one layer, two names
    convert(model, "lowrank", rank=2, progress=False)
    save(model, tmp_path)
    fresh = Toy()
    fresh.blocks[1].fc1 = fresh.blocks[0].fc1
    load(fresh, tmp_path)
    assert fresh.blocks[1].fc1 is fresh.blocks[0].fc1
    torch.testing.assert_close(fresh(ids()), model(ids()), rtol=0, atol=0)


# ---- mismatches: a clear error naming the module, and the model unchanged ----------------------


@pytest.fixture
def saved(tmp_path):
    model = Toy()
    convert(model, "lowrank", rank=2, progress=False)
    save(model, tmp_path)
    return tmp_path


def _edit_description(directory, edit):
    path = directory / "lowrank.json"
    description = json.loads(path.read_text())
    edit(description)
    path.write_text(json.dumps(description))


def _unchanged_after_error(model, directory, match):
    before, types = _state(model), [type(m) for m in model.modules()]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load(model, directory)
    assert [type(m) for m in model.modules()] == types
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_missing_module(saved):
    model = Toy()
    del model.blocks[1].fc2
    _unchanged_after_error(model, saved, r"module blocks\.1\.fc2: the model has no such module")


def test_other_shape(saved):
    model = Toy()
    model.blocks[0].fc1 = nn.Linear(32, 48)
    _unchanged_after_error(model, saved, r"module blocks\.0\.fc1: saved for an nn\.Linear of shape")


def test_other_dtype(saved):
    _unchanged_after_error(Toy().double(), saved, "saved in float32, the model's layer is float64")


def test_already_converted(saved):
    model = Toy()
    convert(model, "lora", rank=2, progress=False)
    _unchanged_after_error(model, saved, "already converted")


def test_other_kind_of_module(saved):
    model = Toy()
    model.blocks[0].q = nn.Identity()
    _unchanged_after_error(model, saved, r"module blocks\.0\.q: .* not an nn\.Linear")


def test_unknown_kind_and_version(saved):
    _edit_description(saved, lambda d: d["modules"][0].update(kind="dense"))
    _unchanged_after_error(Toy(), saved, "'dense', which is not registered")
    _edit_description(saved, lambda d: d.update(version=99))
    _unchanged_after_error(Toy(), saved, "format version 99")


def test_truncated_weights(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _unchanged_after_error(Toy(), saved, "truncated or not safetensors")


def test_wrong_structure_fails_before_any_change(saved):
    # a rank that does not match the stored factors: found by the state check, and the
    # modules already swapped in are put back
    _edit_description(saved, lambda d: d["modules"][-1]["structure"].update(rank=1))
    _unchanged_after_error(Toy(), saved, r"is \(\d+, \d+\) in the saved state")


def test_not_a_saved_model(tmp_path):
    _unchanged_after_error(Toy(), tmp_path, "holds no lowrank.json")
    _unchanged_after_error(Toy(), tmp_path / "absent", "no such directory")
    (tmp_path / "lowrank.json").write_text("{not json")
    _unchanged_after_error(Toy(), tmp_path, "not valid JSON")


def test_save_needs_a_converted_model(tmp_path):
    with pytest.raises(ValueError, match="no converted module"):
        save(Toy(), tmp_path)
    with pytest.raises(TypeError, match="ConversionReport"):
        model = Toy()
        convert(model, "lowrank", rank=2, progress=False)
        save(model, tmp_path, report="report")


# ---- a kind from user code ----------------------------------------------------------------------


class ScaledLinear(AdapterLinear):
    """A frozen base times a learned per-output scale: ``y = base(x) * (1 + s)``."""

    def __init__(self, base: nn.Linear, init: float = 0.0):
        super().__init__()
        base.requires_grad_(False)
        self.base, self.merged = base, False
        self.s = nn.Parameter(torch.full((base.out_features,), float(init)))

    def delta_weight(self):
        return self.s[:, None] * self.base.weight

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        bias = 0.0 if self.base.bias is None else self.base.bias
        return y + self.s * (y - bias)


@dataclass
class ScaledConfig(KindConfig):
    init: float = 0.0


@pytest.fixture
def scaled_kind():
    kind = register_kind(
        "scaled_for_test",
        config=ScaledConfig,
        layers=ScaledLinear,
        plan=lambda context, config: lambda name, linear: (ScaledLinear(linear, config.init), ""),
        describe=lambda module: {},
        rebuild=lambda linear, description: ScaledLinear(linear),
        adapter=True,
    )
    yield kind
    lnn.registry._KINDS.pop("scaled_for_test")


def test_user_kind_converts_saves_loads_and_unconverts(tmp_path, scaled_kind):
    assert "scaled_for_test" in kinds()
    model = Toy()
    report = convert(model, "scaled_for_test", init=0.1, filter=["fc1"], progress=False)
    assert len(report.layers) == 2 and isinstance(model.blocks[0].fc1, ScaledLinear)
    assert not model.blocks[0].q.weight.requires_grad  # an adapter: the rest is frozen
    convert(Toy(), ScaledConfig(init=0.2), filter=["fc2"], progress=False)  # a config instance
    save(model, tmp_path, report)
    fresh = load(Toy(), tmp_path)
    x = ids(seed=2)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    dense = unconvert(fresh)
    assert type(dense.blocks[0].fc1) is nn.Linear
    torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-5)


def test_user_kind_options_and_registration_are_checked(scaled_kind):
    with pytest.raises(ValueError, match=r"unknown options \['rank'\].*\['init'\]"):
        convert(Toy(), "scaled_for_test", rank=3, progress=False)
    with pytest.raises(ValueError, match="params= is for the structured kinds"):
        convert(Toy(), "scaled_for_test", params=0.5, progress=False)
    with pytest.raises(ValueError, match="already registered"):
        register_kind("scaled_for_test", config=ScaledConfig, layers=ScaledLinear,
                      plan=print, describe=print, rebuild=print)  # fmt: skip
    with pytest.raises(TypeError, match="KindConfig"):
        register_kind("other_for_test", config=dict, layers=ScaledLinear, plan=print,
                      describe=print, rebuild=print)  # fmt: skip
    with pytest.raises(ValueError, match="both"):
        convert(Toy(), ScaledConfig(), init=0.3, progress=False)
