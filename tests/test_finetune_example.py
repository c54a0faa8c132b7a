"""examples/finetune.py in its --quick mode: every method runs, the results and the cached
base model are written, and the accounting is right."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load():
    """The example as a module (registered in ``sys.modules``: its dataclasses need it)."""
    name = "finetune_example"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_finetune_quick(tmp_path):
    example = load()
    result = example.main(["--quick", "--out", str(tmp_path)])
    rows = {row["method"]: row for row in result["rows"]}
    written = json.loads((tmp_path / "finetune.json").read_text())
    assert written["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "finetune.png").stat().st_size > 0
    assert [m.name for m in example.METHODS] == list(rows)
    assert not result["base"]["cached"]

    full = rows["Full fine-tuning"]
    base_params = full["trainable_params"]
    for name, row in rows.items():
        for key in ("val_loss_finetune", "val_loss_pretrain"):
            assert 0 < row[key] < 6, (name, key, row[key])  # below ln 256 + a margin
        assert row["ms_per_step"] > 0 and row["init_seconds"] >= 0
        assert row["optimizer_state_bytes"] > 0 and row["weight_bytes"] >= 4 * base_params
        if name != "Full fine-tuning":
            # adapters: the base frozen, few parameters train, the merge is exact
            assert 0 < row["trainable_params"] < base_params / 2, name
            assert row["adapted_layers"] == 2 * 7, name
            assert row["merge_error"] < 1e-5, name
            if name != "LoRA-Pro r=4":  # its AdamW keeps full-size moments per layer
                assert row["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 2, name
    lora = rows["LoRA r=4"]
    assert rows["LoRA-Pro r=4"]["optimizer_state_bytes"] > 2 * lora["optimizer_state_bytes"]
    # RandLoRA's bases are not parameters or buffers, yet held: counted
    assert rows["RandLoRA r=32"]["weight_bytes"] > 4 * base_params + 4 * 896
    targets = result["targets"]
    assert set(targets) == {"lora_sb", "sorsa", "adalora", "lora_pro",
                            "init_faster_than_svd_per_layer"}  # fmt: skip
    assert targets["sorsa"]["orthonormality_error"] >= 0
    adalora = rows["AdaLoRA r=8->4"]
    assert len(adalora["final_ranks"]) == 14 and adalora["rank_changes"]
    assert sum(adalora["final_ranks"].values()) == 4 * 14
    for family, choice in result["learning_rates"].items():
        assert choice["lr"] in [trial["lr"] for trial in choice["sweep"]], family
    assert result["svd_reference_seconds"] > 0

    # A rerun finds the pretrained base model in the output folder.
    again = example.main(["--quick", "--out", str(tmp_path), "--methods", "Full"])
    assert again["base"]["cached"] and [r["method"] for r in again["rows"]] == ["Full fine-tuning"]
    assert again["base"]["val_loss_finetune"] == result["base"]["val_loss_finetune"]


def test_held_bytes_counts_each_storage_once():
    example = load()
    weight = torch.zeros(4, 8)
    assert example.held_bytes([weight, weight[1:], weight.T]) == 4 * 8 * 4
    model = nn.Linear(8, 4, bias=False)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 8)).sum().backward()
    optimizer.step()
    # exp_avg and exp_avg_sq (4 x 8 float32 each) and the step count
    assert example.optimizer_bytes(optimizer) == 2 * 4 * 8 * 4 + 4
