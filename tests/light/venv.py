"""A virtual environment with the light client's dependencies and no torch or transformers, built from the files
of the distributions this environment already holds (no network, a few seconds): the base dependencies of
pyproject.toml and everything they require, as pip would install them, each copied by its installed RECORD.

Not `--system-site-packages` (the system site may hold torch), and stip itself is put on the path from this
checkout, not installed (`pip install --no-deps`), which would cost a build."""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# must not be pulled in by the base install (pillow: the vision extra, whose absence the light proxy's 400 names;
# uvloop, httptools, watchfiles: uvicorn[standard], the server extra's, 17 MB the proxy does without)
HEAVY = {"torch", "transformers", "accelerate", "gguf", "scipy", "pillow", "uvloop", "httptools", "watchfiles"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _extras(requirement: str) -> list[str]:
    m = re.match(r"[^\[;]*\[([^\]]*)\]", requirement)
    return [e.strip() for e in m.group(1).split(",")] if m else []


def closure(requirements: list[str]) -> set[str]:
    """The distributions pip installs for `requirements` here: each requirement whose marker holds (extras as
    asked), recursively, by what the installed distributions declare."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [(_name(r), _extras(r)) for r in requirements]
    while todo:
        name, extras = todo.pop()
        if name in seen and not extras:
            continue
        seen.add(name)
        for raw in md.requires(name) or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ["", *extras]):
                todo.append((req.name.lower().replace("_", "-"), sorted(req.extras)))
    return seen


def base_requirements() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def shared(tmp_path_factory) -> Path:
    """The session's light venv (its python): built by the first test module that asks (test_light_client,
    test_llava's light proxy), reused by the others."""
    return build(tmp_path_factory.getbasetemp() / "light-venv")


def build(where: Path) -> Path:
    """The light venv at `where` (made once, in a side folder renamed when complete; its python returned)."""
    if (where / "bin" / "python").exists():
        return where / "bin" / "python"
    final, where = where, where.with_name(where.name + ".partial")
    shutil.rmtree(where, ignore_errors=True)
    python = where / "bin" / "python"
    names = closure(base_requirements())
    heavy = names & HEAVY
    if heavy:
        raise AssertionError(f"the base install pulls {sorted(heavy)}")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    here = Path(sysconfig.get_paths()["purelib"])
    for name in sorted(names):
        dist = md.distribution(name)
        for f in dist.files or []:
            src = Path(dist.locate_file(f))
            if f.parts[0] in ("..", "bin") or not src.is_file() or here not in src.parents:
                continue
            dst = site / src.relative_to(here)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (site / "stip-checkout.pth").write_text(str(REPO) + "\n")
    where.rename(final)
    return final / "bin" / "python"
