"""`stip rekey` and several contexts in one server: a fresh key for the same model, and one real `stip serve` holding
the old and the rekeyed bundle side by side, each client routed to its own context by bundle id."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import stip

from stip.client.bundle import ClientBundle
from stip.client.sdk import Client
from stip.client.transport import Connection, StipServerError
from stip.common import wire
from stip.common.keys import DeveloperKey
from stip.developer.rekey import rekey
from stip.reference import plain_greedy
from stip.errors import BundleError, KeyMismatchError
from stip.server.launch import local_server, server_env
from tests.models import save_tiny
from tests.parties import isolated_server_bundle, stopped_in_background

MODEL = "llama-gqa-untied"
TOKEN = "rekey-test-token"
PROMPT = [5, 17, 3, 88, 42, 9, 61, 23]


@pytest.fixture(scope="module")
def bundles(tiny_protected, tmp_path_factory):
    """(plain model folder, old protected folder, rekeyed folder)."""
    plain, old = tiny_protected(MODEL)
    new = tmp_path_factory.mktemp("rekey") / "new"
    rekey(plain, old, new, progress=False)
    return plain, old, new


@pytest.fixture(scope="module")
def plain_model(bundles):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundles[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def decode_bundle(bundles, tmp_path_factory):
    """A server-decode protection of the same model, rekeyed (rekey repeats the mode)."""
    root = tmp_path_factory.mktemp("rekey-sd")
    stip.protect(bundles[0], root / "sd", mode="server-decode", progress=False)
    rekey(bundles[0], root / "sd", root / "sd2", progress=False)
    return root / "sd2"


@pytest.fixture(scope="module")
def two_contexts(bundles, decode_bundle):
    """One real `stip serve OLD/server NEW/server SD2/server` (each on an isolated copy: no client files): the old and
    the rekeyed round-trip context, and a rekeyed server-decode one."""
    _, old, new = bundles
    stack = contextlib.ExitStack()
    dirs = [stack.enter_context(isolated_server_bundle(d)) for d in (old, new, decode_bundle)]
    with stopped_in_background(stack):
        yield stack.enter_context(local_server(*dirs, "--threads", "1", token=TOKEN))


def test_rekey_draws_a_new_key_with_the_old_options(bundles):
    _, old, new = bundles
    k_old = DeveloperKey.load(old / "developer" / "developer.stipkey")
    k_new = DeveloperKey.load(new / "developer" / "developer.stipkey")
    assert k_new.client.bundle_id != k_old.client.bundle_id
    assert not torch.equal(k_new.client.resid.perm, k_old.client.resid.perm)
    assert not torch.equal(k_new.client.vocab.perm, k_old.client.vocab.perm)
    assert len(k_new.layers) == len(k_old.layers)
    for i in range(len(k_old.layers)):
        before, after = k_old.layers[i].spaces(k_old.geometry), k_new.layers[i].spaces(k_new.geometry)
        assert any(not torch.equal(before[s].perm, after[s].perm) for s in before), f"layer {i} kept its key"
    m_old, m_new = (json.loads((d / "developer" / "stip-manifest.json").read_text()) for d in (old, new))
    assert m_new["mode"] == m_old["mode"] and m_new["signer"] == m_old["signer"]  # same signer: pins still hold


def test_rekey_repeats_the_hardening(bundles, tmp_path):
    import inspect

    from stip.developer.protect import protect

    if "harden" not in inspect.signature(protect).parameters:
        pytest.skip("this protect has no hardened modes")
    plain = bundles[0]
    protect(plain, tmp_path / "old", progress=False, harden="all", noise=0.01)
    rekey(plain, tmp_path / "old", tmp_path / "new", progress=False)
    old, new = (json.loads((tmp_path / d / "developer" / "stip-manifest.json").read_text()) for d in ("old", "new"))
    assert new["bundle_id"] != old["bundle_id"]
    assert (new["harden"], new["noise"]) == (old["harden"], old["noise"]) and old["harden"] and old["noise"] == 0.01
    k_old, k_new = (DeveloperKey.load(tmp_path / d / "developer" / "developer.stipkey") for d in ("old", "new"))
    r_old, r_new = k_old.client.residual_matrix(), k_new.client.residual_matrix()
    assert r_old.shape == r_new.shape and not torch.allclose(r_old, r_new)


def test_old_key_does_not_fit_the_new_bundle(bundles, tmp_path):
    _, old, new = bundles
    swapped = tmp_path / "client"
    shutil.copytree(new / "client", swapped)
    shutil.copy(old / "client" / "client.stipkey", swapped / "client.stipkey")
    with pytest.raises(BundleError, match="client.stipkey"):
        ClientBundle.load(swapped)


def test_rekey_refuses_another_model(bundles, tmp_path):
    _, old, _ = bundles
    other = save_tiny(MODEL, tmp_path / "same-shapes-other-weights", seed=1)
    with pytest.raises(KeyMismatchError, match="token embedding differs"):
        rekey(other, old, tmp_path / "out1", progress=False)
    assert not (tmp_path / "out1").exists()  # nothing half-written
    shaped = save_tiny("llama-mqa-tied", tmp_path / "other-shapes")
    with pytest.raises(KeyMismatchError, match="not the model"):
        rekey(shaped, old, tmp_path / "out2", progress=False)


def test_rekey_errors_name_the_problem(bundles, tmp_path):
    plain, old, _ = bundles
    with pytest.raises(BundleError, match="no developer bundle"):
        rekey(plain, old / "client", tmp_path / "out", progress=False)
    with pytest.raises(Exception, match="rekey writes a new one"):
        rekey(plain, old, old, progress=False)
    tee = tmp_path / "tee"
    shutil.copytree(old, tee)
    (tee / "enclave").mkdir()
    with pytest.raises(Exception, match="TEE deployment"):
        rekey(plain, tee, tmp_path / "out", progress=False)
    r = subprocess.run([sys.executable, "-m", "stip.cli", "rekey", str(tmp_path / "missing"), "--from", str(old),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, env=server_env(None),
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_contexts_serve_their_own_clients_concurrently(bundles, decode_bundle, plain_model, two_contexts):
    _, old, new = bundles
    expected = plain_greedy(plain_model, PROMPT, 24)

    def generate(folder):
        return Client(folder / "client", two_contexts.url, token=TOKEN).generate(ids=PROMPT, max_tokens=24).token_ids

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(generate, [old, new, decode_bundle, old, new]))
    assert outs == [expected] * 5
    listed = json.loads(two_contexts._get("/v1/contexts"))["contexts"]
    assert [c["bundle_id"] for c in listed] == [ClientBundle.load(d / "client").bundle_id
                                                for d in (old, new, decode_bundle)]
    assert [c["mode"] for c in listed] == ["round-trip", "round-trip", "server-decode"]
    assert two_contexts.health()["contexts"] == 3


def test_unknown_or_missing_bundle_gets_a_clear_4xx(bundles, plain_model, tmp_path, two_contexts):
    _, old, new = bundles
    with pytest.raises(StipServerError, match="does not serve bundle 'nope'") as e:
        Connection(two_contexts.url, token=TOKEN, bundle_id="nope").info()
    assert e.value.status == 404
    with pytest.raises(StipServerError, match="refused the session \\(404\\)"):
        Connection(two_contexts.url, token=TOKEN, bundle_id="nope").open_session()
    with pytest.raises(urllib.error.HTTPError) as e:  # no header: which context is ambiguous
        two_contexts.info()
    assert e.value.code == 400 and wire.BUNDLE_HEADER in json.loads(e.value.read())["error"]
    # a client bundle of another protection run: stip.Client refuses it with the server's reason
    stip.protect(bundles[0], tmp_path / "third", progress=False)
    with pytest.raises(KeyMismatchError, match="does not serve bundle"):
        Client(tmp_path / "third" / "client", two_contexts.url, token=TOKEN)
    # and the server keeps serving
    g = Client(new / "client", two_contexts.url, token=TOKEN).generate(ids=PROMPT, max_tokens=8)
    assert g.token_ids == plain_greedy(plain_model, PROMPT, 8)
    assert two_contexts.alive


def test_sessions_and_limits_are_per_server_not_per_context(bundles, two_contexts):
    _, old, new = bundles
    a, b = (Connection(two_contexts.url, token=TOKEN, bundle_id=ClientBundle.load(d / "client").bundle_id)
            for d in (old, new))
    session = a.open_session()
    try:
        assert a.info()["sessions"] == b.info()["sessions"] == 1  # one client's quota spans the contexts
        assert a.info()["kv_budget_tokens"] == b.info()["kv_budget_tokens"]
        sid = session.id
        session.detach()
        with pytest.raises(StipServerError, match="unknown or expired session"):
            b.open_session(resume=sid)  # a session lives in the context that opened it
        session = a.open_session(resume=sid)
    finally:
        session.close()
    assert a.info()["sessions"] == 0
