"""The benchmark suites: every op against its baselines, timed by one harness.

``python -m lowrank bench`` (or ``lowrank bench``) runs them from an installed package;
``python bench/run.py`` in a source checkout is the same program. Each ``bench_<name>``
module exposes ``run(device, quick) -> list[Result]`` and is listed in
:data:`lowrank.bench.run.SUITES`.
"""

from __future__ import annotations

from pathlib import Path


def checkout_path(*parts: str) -> Path | None:
    """``<source checkout>/<parts>`` when this package runs from a checkout and it exists.

    From a checkout (an editable install or ``bench/run.py``) the package lives in
    ``<root>/python/lowrank/bench``; from a wheel there is no such root and this is None.
    """
    root = Path(__file__).resolve().parents[3]
    path = root.joinpath(*parts)
    return path if (root / "pyproject.toml").is_file() and path.exists() else None
