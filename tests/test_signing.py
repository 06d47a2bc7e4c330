"""Signed bundles: a swapped file or key is refused; a re-signed bundle is refused where the developer is pinned and
accepted with a warning (self-consistency only) where not, exactly as the README says. Real files, real CLI."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

import stip
from stip.client.bundle import ClientBundle
from stip.common import signing
from stip.common.bundles.manifest import resign
from stip.common.files import sha256_file
from stip.common.keys import ClientKey
from stip.common.transforms import SignedPermutation
from stip.errors import BundleError, KeyMismatchError
from stip.server.model import load_protected_model
from tests.parties import run_serve_expect_exit, serve

UNPINNED = "NOT an attacker who re-signs it"


def stip_cli(*args, env=None):
    """The CLI as a user runs it; no signer pinned through the environment unless `env` pins one."""
    full_env = {k: v for k, v in os.environ.items() if k != signing.TRUST_ENV} | (env or {})
    return subprocess.run([sys.executable, "-m", "stip.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=full_env)


@pytest.fixture(autouse=True)
def no_env_pin(monkeypatch):
    monkeypatch.delenv(signing.TRUST_ENV, raising=False)


@pytest.fixture()
def bundle(tiny_protected, tmp_path):
    """A private copy of a protected tiny model (untied llama, GQA) that the test may damage."""
    _, out = tiny_protected("llama-gqa-untied")
    shutil.copytree(out, tmp_path / "protected")
    return tmp_path / "protected"


def developer_pin(bundle) -> str:
    return signing.pin(signing.signer_info(signing.load_signing_key(bundle / "developer" / "signing.key")))


def swap_in_identity_key(client) -> str:
    """The naive attack: an identity client key (no permutation at all) with a valid key fingerprint, and the
    manifest's sha256s and key fingerprint recomputed; the signature is left as it was."""
    real = ClientKey.load(client / "client.stipkey")
    ident = ClientKey(real.bundle_id, SignedPermutation(torch.arange(len(real.resid))),
                      SignedPermutation(torch.arange(len(real.vocab))))
    fp = ident.save(client / "client.stipkey")
    path = client / "stip-manifest.json"
    m = json.loads(path.read_text())
    m["files"] = {name: sha256_file(client / name) for name in m["files"]}
    m["client_key_fingerprint"] = fp
    path.write_text(json.dumps(m))
    return fp


def test_identity_key_bundle_is_refused(bundle):
    swap_in_identity_key(bundle / "client")
    with pytest.raises(BundleError, match="signature does not match"):
        ClientBundle.load(bundle / "client")
    r = stip_cli("verify", bundle / "client")
    assert r.returncode == 2 and "signature does not match" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_swapped_key_file_is_refused(tiny_protected, tmp_path):
    _, out = tiny_protected("llama-gqa-untied")
    shutil.copytree(out, tmp_path / "p")
    client = tmp_path / "p" / "client"
    real = ClientKey.load(client / "client.stipkey")
    ident = ClientKey(real.bundle_id, SignedPermutation(torch.arange(len(real.resid))),
                      SignedPermutation(torch.arange(len(real.vocab))))
    ident.save(tmp_path / "identity.stipkey")
    # as an override: the bundle is intact, but the key is not the one its signed manifest names
    with pytest.raises(KeyMismatchError, match="the key file was swapped"):
        ClientBundle.load(client, key=tmp_path / "identity.stipkey")
    # in place of the bundle's own key file: its sha256 no longer matches the signed manifest
    shutil.copy(tmp_path / "identity.stipkey", client / "client.stipkey")
    with pytest.raises(BundleError, match="sha256 of client.stipkey does not match"):
        ClientBundle.load(client)


def test_resigned_bundle_refused_when_pinned_accepted_with_warning_when_not(bundle, tmp_path, caplog, monkeypatch):
    client = bundle / "client"
    pinned = developer_pin(bundle)
    swap_in_identity_key(client)
    attacker = signing.generate_signing_key()
    resign(client, attacker)
    evil = signing.pin(signing.signer_info(attacker))

    with pytest.raises(BundleError, match="not a trusted signer"):
        ClientBundle.load(client, trusted=pinned)
    monkeypatch.setenv(signing.TRUST_ENV, pinned)  # the env pin works the same
    with pytest.raises(BundleError, match="not a trusted signer"):
        ClientBundle.load(client)
    r = stip_cli("verify", client, "--trust", pinned)
    assert r.returncode == 2 and "not a trusted signer" in r.stderr and evil in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = stip_cli("verify", client, env={signing.TRUST_ENV: f"ed25519:{'0' * 32}, {pinned}"})
    assert r.returncode == 2 and "not a trusted signer" in r.stderr, r.stderr
    monkeypatch.delenv(signing.TRUST_ENV)

    # unpinned: the README's claim, tested: only self-consistency, and the loader says so
    with caplog.at_level(logging.WARNING, logger="stip.signing"):
        loaded = ClientBundle.load(client)
    assert loaded.signer == signing.signer_info(attacker)["fingerprint"]
    assert UNPINNED in caplog.text and evil in caplog.text
    assert bool((loaded.key.resid.perm == torch.arange(len(loaded.key.resid))).all())  # the attacker's identity key
    r = stip_cli("verify", client)
    assert r.returncode == 0 and UNPINNED in r.stderr and "NOT pinned" in r.stdout, r.stderr


def test_pinned_bundle_loads_and_tampered_manifest_is_named(bundle):
    pinned = developer_pin(bundle)
    assert ClientBundle.load(bundle / "client", trusted=[pinned]).signer in pinned
    _, manifest = load_protected_model(bundle / "server", trusted=pinned.split(":", 1)[1].replace(":", ""))
    assert stip_cli("verify", bundle / "server", "--trust", pinned).returncode == 0
    # a base64 public key pins the same signer
    pub = stip.inspect(bundle / "server")["signer_public_key"]
    assert signing.parse_trusted(pub) == manifest["signer"]["fingerprint"]

    path = bundle / "server" / "stip-manifest.json"
    m = json.loads(path.read_text())
    del m["signature"]
    path.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="is not signed"):
        load_protected_model(bundle / "server")
    m["signature"] = "AAAA"
    path.write_text(json.dumps(m))
    r = stip_cli("verify", bundle / "server")
    assert r.returncode == 2 and "malformed signature" in r.stderr, r.stderr
    r = stip_cli("verify", bundle / "client", "--trust", "ed25519:nothex")
    assert r.returncode == 2 and "neither an ed25519 fingerprint" in r.stderr, r.stderr


def test_serve_refuses_server_bundle_resigned_by_another_key(bundle):
    pinned = developer_pin(bundle)
    resign(bundle / "server", signing.generate_signing_key())
    r = run_serve_expect_exit(bundle, "--trust", pinned)
    assert r.returncode == 2, r.stderr
    assert "not a trusted signer" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_inspect_shows_the_signer(bundle):
    shown = json.loads(stip_cli("inspect", bundle / "client").stdout)
    key = json.loads(stip_cli("inspect", bundle / "developer" / "signing.key").stdout)
    server = json.loads(stip_cli("inspect", bundle / "server").stdout)
    assert shown["signer"] == key["signer"] == server["signer"] == developer_pin(bundle)
    assert shown["signer_public_key"] == key["signer_public_key"]
    assert shown["trust"] == f"--trust {key['signer']}"
    assert "PRIVATE" not in json.dumps(key)  # the public half only


def test_protect_reuses_signing_key_and_checks_developer_key(bundle, tiny_protected, tmp_path):
    plain, _ = tiny_protected("llama-gqa-untied")
    signing_key = bundle / "developer" / "signing.key"
    r = stip_cli("protect", plain, "--out", tmp_path / "second", "-q", "--signing-key", signing_key)
    assert r.returncode == 0 and "reused" in r.stdout, r.stderr
    assert stip.inspect(tmp_path / "second" / "server")["signer"] == developer_pin(bundle)
    assert ((tmp_path / "second" / "developer" / "signing.key").stat().st_mode & 0o777) == 0o600
    # a developer key file swapped inside a signed developer bundle is refused before it protects anything
    shutil.copy(tmp_path / "second" / "developer" / "developer.stipkey", bundle / "developer" / "developer.stipkey")
    r = stip_cli("protect", plain, "--out", tmp_path / "third", "--key", bundle / "developer" / "developer.stipkey")
    assert r.returncode == 2 and "the key file was swapped" in r.stderr, r.stderr
    assert not (tmp_path / "third").exists()


def test_client_refuses_server_of_another_signer(tiny_protected, tmp_path):
    """Same developer key (so the same bundle id), different signing key: the client notices the server's bundle
    is not from its signer."""
    plain, out = tiny_protected("gpt2")
    r = stip_cli("protect", plain, "--out", tmp_path / "other", "-q", "--key", out / "developer" / "developer.stipkey")
    assert r.returncode == 0, r.stderr
    other = tmp_path / "other"
    assert stip.inspect(other / "client")["bundle_id"] == stip.inspect(out / "client")["bundle_id"]
    with serve(out) as server:
        with pytest.raises(KeyMismatchError, match="signed by"):
            stip.Client(other / "client", server.url, token=server.token)
        with pytest.raises(BundleError, match="not a trusted signer"):  # a bundle object loaded earlier, too
            stip.Client(ClientBundle.load(other / "client"), server.url, token=server.token,
                        trusted=developer_pin(out))
        ok = stip.Client(out / "client", server.url, token=server.token, trusted=developer_pin(out))
        assert len(ok.generate(ids=[1, 2, 3], max_tokens=2).token_ids) == 2
