"""TEE mode: the attested channel, simulated reports and their verifier, sealing; and (below) a real `stip serve
--tee-worker`, a real `stip enclave` and the TEE client end to end."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
import torch

from stip.client.tee import SimulatedVerifier, TeeError, verify_report
from stip.common.channel import Channel, new_keypair, public_bytes
from stip.enclave.attestation import SimulatedPlatform
from stip.enclave.sealing import seal_tensors, sealing_key, unseal_tensors

MEASUREMENT = "ab" * 32


def pair(nonce=b"n" * 32, measurement=MEASUREMENT):
    c, e = new_keypair(), new_keypair()
    kw = dict(client_public=public_bytes(c), enclave_public=public_bytes(e), nonce=nonce, measurement=measurement)
    return Channel.derive(c, public_bytes(e), role="client", **kw), Channel.derive(e, public_bytes(c), role="enclave", **kw)


def test_channel_round_trip_and_refusals():
    client, enclave = pair()
    m0, m1 = client.seal_json({"op": "generate", "ids": [1, 2]}), client.seal_json({"op": "close"})
    assert enclave.open_json(m0) == {"op": "generate", "ids": [1, 2]}
    with pytest.raises(TeeError, match="replayed"):
        enclave.open(m0)
    tampered = bytearray(m1)
    tampered[-1] ^= 1
    with pytest.raises(TeeError, match="failed authentication"):
        enclave.open(bytes(tampered))
    assert enclave.open_json(m1) == {"op": "close"}  # a refused message does not advance the sequence
    reply = enclave.seal_json({"token": 5})
    assert client.open_json(reply) == {"token": 5}
    other_client, _ = pair()  # another channel (other keys) cannot read this one's messages
    with pytest.raises(TeeError, match="failed authentication"):
        pair()[1].open(other_client.seal(b"x"))


def test_channel_keys_bound_to_transcript():
    """A different measurement (or nonce) on one side gives different keys: the first message fails."""
    c, e = new_keypair(), new_keypair()
    kw = dict(client_public=public_bytes(c), enclave_public=public_bytes(e), nonce=b"n" * 32)
    client = Channel.derive(c, public_bytes(e), role="client", measurement="a" * 64, **kw)
    enclave = Channel.derive(e, public_bytes(c), role="enclave", measurement="b" * 64, **kw)
    with pytest.raises(TeeError, match="failed authentication"):
        enclave.open(client.seal(b"hello"))


@pytest.fixture(scope="module")
def platform():
    return SimulatedPlatform.generate()


def check(report, platform, nonce, allow=True, measurement=MEASUREMENT, **kw):
    return verify_report(report, expected_measurement=measurement, nonce=nonce, allow_simulated=allow,
                         verifiers={"stip-simulated-v1": SimulatedVerifier(platform.pin())}, **kw)


def test_simulated_report_verifies(platform):
    key, nonce = new_keypair(), os.urandom(32)
    v = check(platform.report(MEASUREMENT, public_bytes(key), nonce), platform, nonce)
    assert v.public_key == public_bytes(key) and v.measurement == MEASUREMENT and v.simulated


def test_report_refusals(platform, tmp_path):
    key, nonce = public_bytes(new_keypair()), os.urandom(32)
    good = platform.report(MEASUREMENT, key, nonce)
    with pytest.raises(TeeError, match="SIMULATED"):
        check(good, platform, nonce, allow=False)
    with pytest.raises(TeeError, match="forged"):  # signed by another platform key
        check(SimulatedPlatform.generate().report(MEASUREMENT, key, nonce), platform, nonce)
    signed = json.loads(base64.b64decode(good["evidence"]))
    signed["report"]["channel_public_key"] = base64.b64encode(public_bytes(new_keypair())).decode()
    with pytest.raises(TeeError, match="forged"):  # a swapped channel key breaks the signature
        check({**good, "evidence": base64.b64encode(json.dumps(signed).encode()).decode()}, platform, nonce)
    with pytest.raises(TeeError, match="wrong measurement"):
        check(good, platform, nonce, measurement="cd" * 32)
    with pytest.raises(TeeError, match="replayed"):  # a report for another (earlier) nonce
        check(good, platform, os.urandom(32))
    with pytest.raises(TeeError, match="stale"):
        check(platform.report(MEASUREMENT, key, nonce, timestamp=time.time() - 3600), platform, nonce)
    with pytest.raises(TeeError, match="future"):
        check(platform.report(MEASUREMENT, key, nonce, timestamp=time.time() + 3600), platform, nonce)
    with pytest.raises(TeeError, match="no verifier"):
        check({"format": "aws-nitro-v1", "evidence": "AAAA"}, platform, nonce)
    platform.save(tmp_path / "platform.key")
    assert SimulatedPlatform.load(tmp_path / "platform.key").pin() == platform.pin()
    assert oct((tmp_path / "platform.key").stat().st_mode & 0o777) == "0o600"


def test_sealing_bound_to_code_and_platform(tmp_path):
    secret, code = os.urandom(32), "c" * 64
    tensors = {"p": torch.randperm(16), "embed": torch.randn(8, 16)}
    path = tmp_path / "enclave.sealed"
    seal_tensors(path, tensors, sealing_key(secret, code), bundle_id="b", code_measurement=code)
    assert tensors["embed"].numpy().tobytes() not in path.read_bytes()
    header, out = unseal_tensors(path, sealing_key(secret, code))
    assert header["bundle_id"] == "b" and all(torch.equal(out[k], tensors[k]) for k in tensors)
    for other in (sealing_key(os.urandom(32), code), sealing_key(secret, "d" * 64)):
        with pytest.raises(TeeError, match="cannot unseal"):
            unseal_tensors(path, other)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(TeeError, match="cannot unseal"):
        unseal_tensors(path, sealing_key(secret, code))
