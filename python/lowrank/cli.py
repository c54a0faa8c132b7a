"""The ``lowrank`` command line: ``python -m lowrank <command>`` (or the ``lowrank`` script).

Commands (each with ``--help``):

- ``info``: what was built and what can run here (also what ``python -m lowrank`` alone prints);
- ``compress MODEL_DIR OUT_DIR``: convert a local Hugging Face model's linear layers
  (:func:`lowrank.nn.convert`), optionally calibrated on sentences from a text file, and
  save it with :func:`lowrank.nn.save` next to its tokenizer and configuration;
- ``rsvd FILE --rank K``: truncated SVD of a matrix in a ``.npy``, ``.npz`` or raw binary
  file, streamed out of core when larger than ``--max-memory``;
- ``bench``: the benchmark suites (:mod:`lowrank.bench`).

Bad input (a missing file, a folder that is not a model, a malformed number) ends the
program with one line on stderr, ``lowrank <command>: error: ...``, and a non-zero exit
code: 2 for a malformed command line, 1 for input that cannot be used. ``--traceback``
shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import struct
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["main"]


class CliError(Exception):
    """Input the command cannot use; the message is shown as the one line on stderr."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- argument types: each raises ArgumentTypeError, which argparse reports in one line -----------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def _n_iter(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 0, got {text!r}")
    return value


# Size suffixes: KiB, MiB, GiB, TiB and the bare K, M, G, T are powers of 1024; kB ... TB of 1000.
_UNITS = {"": 1, "b": 1}
for _power, _prefix in enumerate("kmgt", 1):
    _UNITS[_prefix] = _UNITS[_prefix + "ib"] = 1 << (10 * _power)
    _UNITS[_prefix + "b"] = 1000**_power


def parse_bytes(text: str) -> int:
    """A size in bytes from ``"1GiB"``, ``"32MiB"``, ``"500MB"``, ``"1e9"`` or ``"4096"``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match and _UNITS.get(match.group(2).lower())
    if unit is None:
        raise argparse.ArgumentTypeError(
            f"must be a size such as 1GiB, 512MiB or 4096 (bytes), got {text!r}"
        )
    value = int(float(match.group(1)) * unit)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least one byte, got {text!r}")
    return value


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE a Python literal (number, string, tuple, bool) or a bare word."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


# ---- info ---------------------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    from lowrank import info

    for key, value in info().items():
        print(f"{key:20s} {value}")
    return 0


# ---- rsvd ---------------------------------------------------------------------------------------

_FLOATS = ("float16", "float32", "float64")


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise CliError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise CliError(f"{what} {str(path)!r} is not a file")


def _npz_member(path: Path, member: str | None) -> np.ndarray:
    """One array of a ``.npz``: memory-mapped when stored uncompressed (``np.savez``),
    read into memory when compressed (``np.savez_compressed``)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CliError(f"{str(path)!r} is not a .npz file (not a zip archive)") from None
    with archive:
        names = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
        if member is None:
            if len(names) != 1:
                raise CliError(
                    f"{str(path)!r} holds {len(names)} arrays ({', '.join(names)}); "
                    "choose one with --member"
                )
            member = names[0]
        if member not in names:
            raise CliError(
                f"{str(path)!r} has no array {member!r} (it holds {', '.join(names) or 'none'})"
            )
        entry = archive.getinfo(member + ".npy")
        if entry.compress_type != zipfile.ZIP_STORED:
            with archive.open(entry) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:
        # The member's bytes follow its local header: 30 bytes, then its name and extra field.
        f.seek(entry.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(entry.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # a header format without a public reader: read the member into memory
            with zipfile.ZipFile(path) as archive, archive.open(entry) as member_file:
                return np.lib.format.read_array(member_file, allow_pickle=False)
        offset = f.tell()
    if dtype.hasobject:
        raise CliError(f"array {member!r} of {str(path)!r} holds Python objects, not numbers")
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def open_matrix(
    path: Path,
    member: str | None = None,
    shape: tuple[int, int] | None = None,
    dtype: str = "float32",
) -> np.ndarray:
    """The matrix in ``path``, memory-mapped where the format allows: a ``.npy`` file, a
    member of a ``.npz`` archive, or (when ``shape`` is given) a raw row-major binary file
    of ``dtype``."""
    _check_file(path, "FILE")
    if shape is not None:
        itemsize = np.dtype(dtype).itemsize
        expected = shape[0] * shape[1] * itemsize
        actual = path.stat().st_size
        if actual != expected:
            raise CliError(
                f"{str(path)!r} has {actual} bytes; --shape {shape[0]} {shape[1]} "
                f"--dtype {dtype} needs {expected}"
            )
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"PK") or path.suffix == ".npz":
        a = _npz_member(path, member)
    elif magic == b"\x93NUMPY":
        if member is not None:
            raise CliError("--member is for .npz archives")
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise CliError(f"cannot read {str(path)!r} as a .npy file: {e}") from None
    else:
        raise CliError(
            f"{str(path)!r} is neither a .npy nor a .npz file; for a raw binary "
            "file give --shape ROWS COLS and --dtype"
        )
    if a.ndim != 2:
        raise CliError(f"{str(path)!r} holds an array of shape {a.shape}; rsvd needs a matrix")
    if a.dtype.name not in _FLOATS:
        raise CliError(f"{str(path)!r} holds {a.dtype}; rsvd needs float16, float32 or float64")
    return a


class StreamedMatrix:
    """A matrix in an array or memmap as a :class:`lowrank.linalg.LinearOperator` whose
    products read it in row panels of about ``max_memory / 2`` bytes (the other half is for
    a panel's temporaries); a product also measures ``||A||_F`` (:meth:`frobenius_norm`)."""

    def __init__(self, a: np.ndarray, dtype, device, max_memory: int, progress: bool | None):
        import torch

        self.a = a
        self.shape = (int(a.shape[0]), int(a.shape[1]))
        self.dtype = dtype
        self.device = torch.device(device)
        row_bytes = self.shape[1] * torch.finfo(dtype).bits // 8
        self.rows = max(1, max_memory // (2 * row_bytes))
        self.progress = progress if progress is not None else a.nbytes > (1 << 30)
        self._frobenius_sq: float | None = None

    def _panels(self, desc: str):
        import torch

        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.a.nbytes, unit="B", unit_scale=True, desc=desc)
        total = 0.0
        for i in range(0, self.shape[0], self.rows):
            block = np.ascontiguousarray(self.a[i : i + self.rows])
            with warnings.catch_warnings():  # a read-only mapping is only ever read
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                panel = torch.from_numpy(block).to(self.device, self.dtype)
            total += float(torch.linalg.vector_norm(panel)) ** 2  # no float64 copy
            yield i, panel
            if bar is not None:
                bar.update(block.nbytes)
        if bar is not None:
            bar.close()
        self._frobenius_sq = total

    def matmat(self, x):
        import torch

        out = torch.empty(self.shape[0], x.shape[1], dtype=self.dtype, device=self.device)
        for i, panel in self._panels("error estimate"):
            out[i : i + panel.shape[0]] = panel @ x
        return out

    def rmatmat(self, y):
        import torch

        out = torch.zeros(self.shape[1], y.shape[1], dtype=self.dtype, device=self.device)
        for i, panel in self._panels("error estimate"):
            out += panel.mT @ y[i : i + panel.shape[0]]
        return out

    def frobenius_norm(self) -> float:
        if self._frobenius_sq is None:
            for _ in self._panels("norm"):
                pass
        return math.sqrt(self._frobenius_sq)


def _rsvd(args: argparse.Namespace) -> int:
    import torch

    from lowrank.linalg import rsvd, svd_error

    if args.dtype is not None and args.shape is None:
        raise CliError("--dtype is for raw binary files and needs --shape ROWS COLS")
    a = open_matrix(
        args.file, args.member, args.shape and tuple(args.shape), args.dtype or "float32"
    )
    m, n = a.shape
    if args.rank > min(m, n):
        raise CliError(f"--rank must be at most min(rows, cols) = {min(m, n)}, got {args.rank}")
    device = torch.device(args.device)
    streamed = a.nbytes > args.max_memory
    how = (
        f"streamed in panels of at most {_format_bytes(args.max_memory)}"
        if streamed
        else "in memory"
    )
    print(f"{args.file}: {m} x {n} {a.dtype} ({_format_bytes(a.nbytes)}), rank {args.rank}, {how}")
    options = dict(oversample=args.oversample, n_iter=args.n_iter, seed=args.seed)
    start = time.perf_counter()
    if streamed:
        u, s, vh = rsvd(
            a,
            args.rank,
            device=device,
            max_memory=args.max_memory,
            progress=args.progress,
            **options,
        )
    else:
        matrix = torch.from_numpy(np.array(a)).to(device)
        u, s, vh = rsvd(matrix, args.rank, **options)
    seconds = time.perf_counter() - start
    compute = torch.float64 if a.dtype == np.float64 else torch.float32
    operator = StreamedMatrix(a, compute, device, args.max_memory, args.progress)
    error = svd_error(operator, u, s, vh, probes=args.probes, seed=args.seed + 1)
    norm = operator.frobenius_norm()
    out = args.out or args.file.with_suffix(".rsvd.npz")
    if out.suffix != ".npz":  # np.savez would add it
        out = out.with_name(out.name + ".npz")
    np.savez(out, U=u.cpu().numpy(), S=s.cpu().numpy(), Vh=vh.cpu().numpy())
    with np.printoptions(precision=6, linewidth=100, threshold=sys.maxsize):
        print(f"singular values ({len(s)}, {seconds:.2f} s):")
        print(s.cpu().double().numpy())
    relative = [float(x) / norm if norm > 0 else 0.0 for x in error]
    print(
        f"estimated error ||A - U diag(S) Vh||_F / ||A||_F = {relative[0]:.4e} "
        f"(95% interval {relative[1]:.3e} to {relative[2]:.3e}, {args.probes} probes)"
    )
    print(f"wrote U {tuple(u.shape)}, S {tuple(s.shape)}, Vh {tuple(vh.shape)} to {out}")
    return 0


# ---- compress -----------------------------------------------------------------------------------


def _sentences(path: Path) -> list[str]:
    _check_file(path, "--calibration file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CliError(f"--calibration file {str(path)!r} is not UTF-8 text") from None
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise CliError(f"--calibration file {str(path)!r} has no sentences")
    return sentences


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise CliError(f"MODEL_DIR {str(path)!r} does not exist")
    if not path.is_dir():
        raise CliError(f"MODEL_DIR {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise CliError(
            f"MODEL_DIR {str(path)!r} is not a Hugging Face model directory (no config.json)"
        )


def _check_out_dir(path: Path, model_dir: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise CliError(f"OUT_DIR {str(path)!r} exists and is not a directory")
    if path.exists() and path.resolve() == model_dir.resolve():
        raise CliError("OUT_DIR must differ from MODEL_DIR")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise CliError(f"OUT_DIR {str(path)!r} is not empty (--force writes into it anyway)")


def load_pretrained(model_dir: str | Path, dtype: str = "auto"):
    """``(model, tokenizer)`` from a local Hugging Face model directory, in evaluation mode.

    The model class is the first of ``config.architectures`` (so task heads are kept), else
    ``AutoModel``; ``dtype`` is a torch dtype name or ``"auto"`` (the checkpoint's). A
    directory written by ``lowrank compress`` (it holds ``lowrank.json``) gives the
    compressed model: built from its configuration, then :func:`lowrank.nn.load`.
    """
    import torch
    import transformers

    import lowrank.nn

    config = transformers.AutoConfig.from_pretrained(model_dir)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    cls = cls or transformers.AutoModel
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if (Path(model_dir) / "lowrank.json").is_file():
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        name = str(saved if dtype == "auto" else dtype).replace("torch.", "")
        model = (cls.from_config if cls is transformers.AutoModel else cls)(config)
        model = lowrank.nn.load(model.to(getattr(torch, name, torch.float32)), model_dir)
        return model.eval(), tokenizer
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    # transformers 4.56 renamed torch_dtype= to dtype=.
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = cls.from_pretrained(model_dir, **{key: torch_dtype})
    return model.eval(), tokenizer


def calibration_batches(
    tokenizer, sentences: list[str], batch_size: int, max_length: int
) -> list[dict]:
    """The sentences tokenised in batches of ``batch_size`` (padded, truncated)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only tokenizers pad with EOS
    return [
        dict(
            tokenizer(
                sentences[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(sentences), batch_size)
    ]


def _compress(args: argparse.Namespace) -> int:
    import json

    import lowrank.nn

    _check_model_dir(args.model_dir)
    _check_out_dir(args.out_dir, args.model_dir, args.force)
    sentences = _sentences(args.calibration) if args.calibration else None
    options = dict(args.option or [])
    if args.rank is not None:
        options["rank"] = args.rank
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise CliError("compress needs transformers (pip install transformers)") from None
    start = time.perf_counter()
    model, tokenizer = load_pretrained(args.model_dir, args.dtype)
    print(
        f"loaded {type(model).__name__} from {args.model_dir} "
        f"({time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    batches = None
    if sentences is not None:
        batches = calibration_batches(tokenizer, sentences, args.batch_size, args.max_length)
    target = args.filter_regex if args.filter_regex is not None else args.filter
    report = lowrank.nn.convert(
        model,
        args.kind,
        filter=target,
        calibration=batches,
        params=args.params,
        allocation=args.allocation,
        progress=True,
        **options,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lowrank.nn.save(model, args.out_dir, report=report)
    tokenizer.save_pretrained(args.out_dir)
    model.config.save_pretrained(args.out_dir)
    summary = report.to_dict()
    summary["source"] = str(args.model_dir)
    summary["calibration_sentences"] = 0 if sentences is None else len(sentences)
    (args.out_dir / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(report)
    print(
        f"wrote {args.out_dir} in {time.perf_counter() - start:.1f} s "
        "(lowrank.nn.load(model, OUT_DIR) converts the original model to it)"
    )
    return 0


# ---- bench --------------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    from lowrank.bench import checkout_path
    from lowrank.bench.run import run

    if args.save and checkout_path("bench", "results") is None:
        raise CliError("--save writes into bench/results/ of a source checkout; use --out")
    return run(args)


# ---- the parser ---------------------------------------------------------------------------------


def _kinds() -> list[str]:
    import lowrank.nn

    kinds = getattr(lowrank.nn, "kinds", None)
    if kinds is None:
        from lowrank.nn.registry import kinds
    return list(kinds())


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m lowrank`` and its subcommands."""
    parser = _Parser(
        prog="lowrank",
        description="Fast structured and low-rank linear algebra for PyTorch: the command line. "
        "Without a command, prints what was built and what can run here.",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback of an error"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    commands.add_parser(
        "info",
        help="what was built and what can run here (the default)",
        description="What lowrank was built with and what can run here.",
    )

    p = commands.add_parser(
        "compress",
        help="convert a local Hugging Face model and save it",
        description="Loads a local Hugging Face model directory with transformers, converts its "
        "linear layers (lowrank.nn.convert), and saves it with lowrank.nn.save, with the "
        "tokenizer, the configuration and the conversion report (report.json). "
        "lowrank.nn.load(model, OUT_DIR) turns a freshly loaded original model into it.",
    )
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="Hugging Face model folder")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write")
    p.add_argument("--kind", default="lowrank", choices=_kinds(), help="default: lowrank")
    p.add_argument(
        "--params",
        type=_fraction,
        default=None,
        help="fraction of the converted layers' parameters to keep, in (0, 1]",
    )
    p.add_argument(
        "--rank",
        type=_positive_int,
        default=None,
        help="one rank for every layer (instead of --params)",
    )
    p.add_argument(
        "--allocation",
        choices=("global", "uniform", "welore"),
        default="global",
        help="how --params is shared among layers (default: global; welore: WeLore's "
        "data-free rule, which also keeps some layers dense)",
    )
    p.add_argument(
        "--calibration", type=Path, metavar="FILE.txt", help="calibration sentences, one per line"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="calibration sentences per batch (default 32)",
    )
    p.add_argument(
        "--max-length",
        type=_positive_int,
        default=128,
        help="tokens per calibration sentence at most (default 128)",
    )
    p.add_argument(
        "--filter",
        nargs="+",
        metavar="NAME",
        help="convert only these layers: names equal to NAME or ending in .NAME "
        "(as PEFT's target_modules); default: every linear layer",
    )
    p.add_argument(
        "--filter-regex",
        metavar="REGEX",
        help="convert only the layers whose full name matches REGEX",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("auto", "float32", "float16", "bfloat16", "float64"),
        help="dtype to load and convert the model in (default float32; auto: the checkpoint's)",
    )
    p.add_argument(
        "--option",
        type=_option,
        action="append",
        metavar="KEY=VALUE",
        help="an option of the kind (see lowrank.nn.convert), repeatable",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")

    p = commands.add_parser(
        "rsvd",
        help="truncated SVD of a matrix in a file",
        description="Truncated SVD A ~ U diag(S) Vh of a matrix in a .npy file (memory-mapped), "
        "a .npz member or a raw binary file (--shape, --dtype), by lowrank.linalg.rsvd; "
        "streamed out of core in row panels when larger than --max-memory. Writes U, S and Vh "
        "to an .npz and prints the singular values and the estimated relative error.",
    )
    p.add_argument("file", type=Path, metavar="FILE", help=".npy, .npz or raw binary file")
    p.add_argument("--rank", type=_positive_int, required=True, help="singular triplets")
    p.add_argument(
        "--n-iter", type=_n_iter, default=2, help="power iterations, or auto (default 2)"
    )
    p.add_argument(
        "--oversample", type=_positive_int, default=10, help="extra sketch columns (default 10)"
    )
    p.add_argument(
        "--max-memory",
        type=parse_bytes,
        default=1 << 30,
        metavar="SIZE",
        help="stream when the matrix is larger, in panels this large (default 1GiB)",
    )
    p.add_argument("--member", help="the array of an .npz holding several")
    p.add_argument(
        "--shape",
        type=_positive_int,
        nargs=2,
        metavar=("ROWS", "COLS"),
        help="a raw binary file's shape (row-major)",
    )
    p.add_argument("--dtype", choices=_FLOATS, help="a raw binary file's dtype (with --shape)")
    p.add_argument(
        "--out",
        type=Path,
        metavar="OUT.npz",
        help="where to write U, S, Vh (default: FILE's name with .rsvd.npz)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--probes",
        type=_positive_int,
        default=10,
        help="random probes for the error estimate (default 10)",
    )
    p.add_argument("--device", default="cpu", help="where to compute (default cpu)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars over passes (default: when a pass reads over 1 GiB)",
    )

    from lowrank.bench import run as bench_run

    p = commands.add_parser(
        "bench", help="run the benchmark suites", description=bench_run.__doc__.split("\n\n")[0]
    )
    bench_run.add_arguments(p)
    return parser


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "info": _info,
    "compress": _compress,
    "rsvd": _rsvd,
    "bench": _bench,
}


def main(argv: list[str] | None = None) -> int:
    """Runs ``lowrank <command> ...`` (``argv`` defaults to ``sys.argv[1:]``); returns the
    exit code."""
    args = build_parser().parse_args(argv)
    command = args.command or "info"
    try:
        return _COMMANDS[command](args)
    except BrokenPipeError:  # the reader went away (``| head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"lowrank {command}: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, TypeError, OSError) as e:
        if args.traceback:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"lowrank {command}: error: {message}", file=sys.stderr)
        return 1
