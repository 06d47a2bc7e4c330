"""`stip bench`: runs the benchmark suite, `python -m bench`, in the git checkout this package sits in.

The suite lives wholly in the repository's `bench/` folder (bench/suite.py says why): a benchmark run is a developer's
job on a checkout, it records the tree's git state and writes the committed results. This module never imports
that folder; it starts `python -m bench` in a child process with the checkout on PYTHONPATH, and refuses, naming
the reason, where there is no checkout (an installed wheel).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stip.errors import StipError


def bench_root() -> Path:
    """The repository folder holding `bench/`, next to this stip package."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "bench" / "__init__.py").is_file():
        raise StipError(f"stip bench needs the benchmark scripts in the repository's bench/ folder, which is not "
                        f"next to this stip package ({repo}): run it from a git checkout of STIP "
                        f"(pip install -e .), not from an installed wheel")
    return repo


def run_bench(args: list[str]) -> int:
    """`python -m bench ARGS` in the current folder (so a relative --out means what it says), the checkout on
    PYTHONPATH; its exit status."""
    repo = bench_root()
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), *[p for p in paths if p != str(repo)]])}
    return subprocess.run([sys.executable, "-m", "bench", *args], env=env).returncode
