"""The benchmark suite: every op against its baselines, as a table, JSON and a PNG.

    python bench/run.py                 # all suites on the GPU if there is one, else the CPU
    python bench/run.py --suite kron    # one suite
    python bench/run.py --quick         # fewer cases
    python bench/run.py --save          # also write bench/results/<device>-<date>.{json,png}

The suites live in the package (``lowrank.bench``), so that ``python -m lowrank bench``
runs them from an installed wheel too; this file is the same program.
"""

from lowrank.bench.run import main

if __name__ == "__main__":
    raise SystemExit(main(prog="bench/run.py"))
