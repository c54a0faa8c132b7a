"""Fuzzing: every public function and torch.ops.lowrank.* op with malformed arguments.

tests/fuzz_worker.py runs the cases in a subprocess, so a crash (a signal, an abort in
native code) fails this test with the call that caused it instead of taking pytest down.
Allowed outcomes: success, or ValueError / TypeError / IndexError / NotImplementedError
whose message names an argument (and, for direct torch.ops calls, torch's own argument
parser errors). Bounded: a fixed number of hypothesis examples per target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "fuzz_worker.py"
EXAMPLES = int(os.environ.get("LOWRANK_FUZZ_EXAMPLES", "80"))


@pytest.mark.parametrize("mode", ["auto", "native"])
def test_malformed_arguments_never_crash(tmp_path, mode):
    log, results = tmp_path / "cases.log", tmp_path / "findings.json"
    env = {**os.environ, "LOWRANK_DISPATCH": mode, "LOWRANK_CACHE_DIR": ""}
    python = [sys.executable, "-S"] if sys.flags.no_site else [sys.executable]  # as this run
    run = subprocess.run([*python, str(WORKER), str(log), str(results), str(EXAMPLES)], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    if run.returncode != 0:
        last = log.read_text().splitlines()[-1:] if log.exists() else ["(no case started)"]
        pytest.fail(f"the fuzz worker died (exit {run.returncode}) in {last[0]}\n"
                    f"{run.stderr[-3000:]}")  # fmt: skip
    findings = json.loads(results.read_text())
    report = "\n".join(f"{f['kind']}: {f['case']}\n    {f['error'][:300]}" for f in findings[:20])
    assert not findings, f"{len(findings)} calls failed badly:\n{report}"
