"""Per-client API keys: the `stip apikey` commands, and a real `stip serve --api-keys` that picks up revocations,
new keys and a broken file without a restart."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from stip.client.bundle import ClientBundle
from stip.client.transport import Connection, StipAuthError, StipServerError
from stip.server.auth import create_key, hash_key, revoke_key
from tests.parties import run_serve_expect_exit, serve

TOKEN = "apikeys-token"


def stip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stip.cli", *args], capture_output=True, text=True, timeout=60)


def test_apikey_commands(tmp_path):
    f = tmp_path / "keys.json"
    r = stip("apikey", "create", str(f), "alice", "--max-sessions", "2", "--max-tokens", "500")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("stip_") and len(key) > 40 and "shown only now" in r.stderr
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    text = f.read_text()
    assert key not in text and hash_key(key) in text  # only the hash is stored
    assert stip("apikey", "create", str(f), "bob", "--metrics").returncode == 0
    r = stip("apikey", "list", str(f))
    assert r.returncode == 0 and key not in r.stdout and "sha256" not in r.stdout
    listed = {e["name"]: e for e in json.loads(r.stdout)}
    assert listed["alice"]["max_sessions"] == 2 and listed["alice"]["max_tokens"] == 500
    assert listed["bob"]["metrics"] is True and not listed["bob"]["revoked"]
    assert stip("apikey", "revoke", str(f), "alice").returncode == 0
    assert json.loads(stip("apikey", "list", str(f)).stdout)[0]["revoked"] is True
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    for args, words in ((("create", str(f), "bob"), "already has"), (("revoke", str(f), "carol"), "no client"),
                        (("create", str(f), "a b"), "name"), (("create", str(f), "x", "--max-sessions", "0"),
                                                              "max_sessions"),
                        (("list", str(tmp_path / "none.json")), "does not exist")):
        r = stip("apikey", *args)
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    (tmp_path / "bad.json").write_text('{"format": "stip-apikeys", "version": 1, "keys": [{"name": "x"}]}')
    r = stip("apikey", "list", str(tmp_path / "bad.json"))
    assert r.returncode != 0 and "malformed" in r.stderr and "Traceback" not in r.stderr


def test_bad_key_file_stops_serve_before_loading(tiny_protected, tmp_path):
    _, protected = tiny_protected("gpt2")
    bad = tmp_path / "keys.json"
    bad.write_text("{not json")
    r = run_serve_expect_exit(protected, "--api-keys", str(bad))
    assert r.returncode != 0 and "not readable JSON" in r.stderr and "Traceback" not in r.stderr, r.stderr
    for args, words in ((("--kv-budget", "lots"), "not a size"), (("--kv-budget-tokens", "0"), "at least 1"),
                        (("--max-all-logits", "0"), "at least 1")):
        r = run_serve_expect_exit(protected, *args)
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def wait_until(predicate, timeout: float = 60.0) -> None:
    """Poll until `predicate()` holds. `timeout` only guards against a hang (a loaded CI machine is slow): how fast
    the server reacts is not what the tests assert."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not reached in {timeout:.0f} s"
        time.sleep(0.1)


def refused_status(fn) -> int | None:
    try:
        fn()
    except StipServerError as e:
        return e.status
    return None


def test_keys_quotas_and_revocation_without_restart(tiny_protected, tmp_path):
    _, protected = tiny_protected("gpt2")
    client = ClientBundle.load(protected / "client")
    keys = tmp_path / "keys.json"
    alice = create_key(keys, "alice", max_sessions=1)
    bob = create_key(keys, "bob")
    with serve(protected, "--api-keys", str(keys), token=TOKEN, threads=1) as server:
        a, b = Connection(server.url, token=alice), Connection(server.url, token=bob)
        admin = Connection(server.url, token=TOKEN)  # the single --token keeps working beside the file
        info = a.info()
        assert info["client"] == "alice" and info["max_sessions"] == 1 and info["sessions"] == 0
        assert info["bundle_id"] == client.bundle_id and "signer" in info
        # a key that sets no quota gets a fair share (1/4 of the 64 slots), so no one key can take every slot
        assert b.info()["client"] == "bob" and b.info()["max_sessions"] == 16
        assert admin.info()["max_sessions"] == 64  # the single token: only the server's own limits
        with pytest.raises(StipAuthError) as e:  # server-wide counts need a key with the metrics right
            a.metrics()
        assert e.value.status == 403 and "metrics" in str(e.value)
        assert "stip_kv_budget_tokens" in admin.metrics()

        sa = a.open_session()
        sa.prefill(client.embed(torch.tensor([1, 2, 3])))
        assert a.info()["sessions"] == 1 and a.info()["kv_tokens"] == 3
        assert refused_status(a.open_session) == 429  # alice's quota of one session
        sb = b.open_session()
        sb.prefill(client.embed(torch.tensor([4, 5])))
        assert b.info()["sessions"] == 1  # counts are per client: bob does not see alice's
        idle = b.open_session()
        idle.prefill(client.embed(torch.tensor([6])))
        idle.detach()

        # revoke alice while her socket is open: her next step is refused (403), bob goes on
        revoke_key(keys, "alice")
        wait_until(lambda: refused_status(a.info) == 403)
        with pytest.raises(StipAuthError) as e:
            sa.decode(client.embed(torch.tensor([7]), start=3))
        assert e.value.status == 403 and "revoked" in str(e.value)
        with pytest.raises(StipAuthError):
            a.open_session()
        assert sb.decode(client.embed(torch.tensor([8]), start=2)).position == 3
        wait_until(lambda: "stip_sessions_closed_total{reason=\"revoked\"} 1.0" in admin.metrics())

        # a key added to the file works without a restart
        carol = create_key(keys, "carol", max_tokens=10)
        c = Connection(server.url, token=carol)
        wait_until(lambda: refused_status(c.info) is None)
        with c.open_session() as sc:
            assert refused_status(lambda: sc.prefill(torch.randn(11, client.hidden_size))) == 429
            assert sc.prefill(torch.randn(10, client.hidden_size)).position == 10

        # a broken file refuses every key from it (503), never the ones someone may just have revoked; the
        # single token is unaffected, and fixing the file restores the keys
        good = keys.read_text()
        keys.write_text("{oops")
        wait_until(lambda: refused_status(b.info) == 503)
        assert admin.info()["client"] == "token"
        keys.write_text(good)
        wait_until(lambda: refused_status(b.info) is None)
        with b.open_session(resume=idle.id) as again:  # bob's session outlived the broken moment
            assert again.position == 1
        sb.close()
        assert server.alive and "Traceback" not in server.log()
        log = server.log()
        for k in (alice, bob, carol, TOKEN):
            assert k not in log and hash_key(k) not in log
