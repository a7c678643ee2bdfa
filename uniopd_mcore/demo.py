"""`uniopd-mcore demo`: runs the embedded CPU example that lives in ``examples/arithmetic``.

The example is part of the repository checkout (not of the installed package), so it is found
next to this package; the demo is meant to be run from a clone (`make demo`).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_demo(run_dir: str = "runs/demo", fast: bool = False) -> dict:
    if not (REPO / "examples" / "arithmetic" / "demo.py").exists():
        raise FileNotFoundError(
            f"{REPO / 'examples/arithmetic/demo.py'} not found: run the demo from a clone of the repository")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from examples.arithmetic.demo import run_demo as _run

    return _run(run_dir, fast=fast)
