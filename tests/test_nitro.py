"""The AWS Nitro attestation verifier (stip.client.nitro), on evidence made here: a test root CA, an intermediate and
a leaf (EC P-384), documents signed COSE_Sign1 ES384 with real cryptography. A valid document yields the enclave's
channel key; each forgery or mismatch is refused with a TeeError naming the check."""

from __future__ import annotations

import base64
import datetime as dt
import os

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pycose.algorithms import Es256

from stip.client import tee
from stip.client.nitro import (AWS_NITRO_ROOT_SHA256, NITRO_FORMAT, AttestationError, NitroVerifier,
                               aws_nitro_root)
from stip.errors import TeeError
from tests.nitro_evidence import HOUR, NitroPKI, _cert, payload, random_pcrs, sign

MEASUREMENT = "5e" * 32


@pytest.fixture(scope="module")
def pki():
    return NitroPKI.generate("trusted")


@pytest.fixture(scope="module")
def pcrs():
    return random_pcrs()


@pytest.fixture(scope="module")
def verifier(pki, pcrs):
    return NitroVerifier({i: pcrs[i] for i in (0, 1, 2)}, root=pki.root)


@pytest.fixture()
def channel():
    return X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def document(pki, pcrs, channel, nonce, **kw):
    return sign(payload(pki, pcrs=pcrs, public_key=channel, nonce=nonce, measurement=MEASUREMENT, **kw), pki.leaf_key)


def refused(verifier, evidence, nonce, match, measurement=MEASUREMENT):
    with pytest.raises(AttestationError, match=match) as e:
        verifier.verify_document(evidence, measurement, nonce)
    assert isinstance(e.value, TeeError)
    return str(e.value)


@pytest.mark.parametrize("tag", [False, True], ids=["untagged", "tag18"])
def test_valid_document_yields_the_bound_channel_key(pki, pcrs, verifier, channel, tag):
    nonce = os.urandom(32)
    doc = sign(payload(pki, pcrs=pcrs, public_key=channel, nonce=nonce, measurement=MEASUREMENT), pki.leaf_key,
               tag=tag)
    v = verifier.verify_document(doc, MEASUREMENT, nonce)
    assert (v.format, v.public_key, v.measurement, v.nonce, v.simulated) == (NITRO_FORMAT, channel, MEASUREMENT,
                                                                              nonce, False)


def test_plugs_into_the_tee_client_report_check(pki, pcrs, verifier, channel):
    """The same document through stip.client.tee.verify_report, the path a TEE client takes; the verifier is also
    built from a client config's "nitro" section (PCRs in hex, the test root as PEM)."""
    nonce = os.urandom(32)
    report = {"format": NITRO_FORMAT, "evidence": base64.b64encode(document(pki, pcrs, channel, nonce)).decode()}
    config = {"tee": {"measurement": MEASUREMENT,
                      "nitro": {"pcrs": {"0": pcrs[0].hex(), "2": pcrs[2].hex()},
                                "root_pem": pki.root.public_bytes(Encoding.PEM).decode()}}}
    from_config = tee.VERIFIERS[NITRO_FORMAT](config)
    v = tee.verify_report(report, expected_measurement=MEASUREMENT, nonce=nonce,
                          verifiers={NITRO_FORMAT: from_config})
    assert v.public_key == channel
    with pytest.raises(TeeError, match="wrong measurement"):
        tee.verify_report(report, expected_measurement="00" * 32, nonce=nonce, verifiers={NITRO_FORMAT: from_config})
    with pytest.raises(TeeError, match="nonce"):
        tee.verify_report(report, expected_measurement=MEASUREMENT, nonce=os.urandom(32),
                          verifiers={NITRO_FORMAT: from_config})
    # a config that pins no Nitro PCRs (a simulated-mode bundle) still loads, and refuses Nitro evidence
    unpinned = tee.VERIFIERS[NITRO_FORMAT]({"tee": {"measurement": MEASUREMENT}})
    with pytest.raises(TeeError, match="pins no Nitro PCRs"):
        tee.verify_report(report, expected_measurement=MEASUREMENT, nonce=nonce, verifiers={NITRO_FORMAT: unpinned})


def test_untrusted_root_is_refused(pki, pcrs, verifier, channel):
    """A well-formed document whose whole chain comes from another CA (its cabundle even names that CA as root)."""
    nonce = os.urandom(32)
    rogue = NitroPKI.generate("rogue")
    refused(verifier, document(rogue, pcrs, channel, nonce), nonce, "does not verify up to the pinned root")


def test_test_root_is_not_the_aws_root(pki, pcrs, channel):
    """Production pins the AWS Nitro root (checked against its published fingerprint): test evidence is refused."""
    root = aws_nitro_root()
    assert root.fingerprint(hashes.SHA256()).hex() == AWS_NITRO_ROOT_SHA256
    assert root.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    nonce = os.urandom(32)
    refused(NitroVerifier({0: pcrs[0]}), document(pki, pcrs, channel, nonce), nonce, "pinned root")


def test_broken_chain_is_refused(pki, pcrs, verifier, channel):
    """The intermediate missing from the cabundle, or swapped for another CA's intermediate of the same name."""
    nonce = os.urandom(32)
    root_der = pki.root.public_bytes(Encoding.DER)
    refused(verifier, document(pki, pcrs, channel, nonce, cabundle=[root_der]), nonce, "certificate chain")
    other = NitroPKI.generate("trusted")  # same subject names, different keys
    swapped = [root_der, other.intermediate.public_bytes(Encoding.DER)]
    refused(verifier, document(pki, pcrs, channel, nonce, cabundle=swapped), nonce, "certificate chain")


def test_expired_leaf_is_refused(pki, pcrs, verifier, channel):
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP384R1())
    leaf = _cert("trusted enclave", key, pki.intermediate.subject, pki.intermediate_key, ca=False,
                 issuer_cert=pki.intermediate, not_before=now - 5 * HOUR, not_after=now - 2 * HOUR)
    expired = pki.with_leaf(leaf, key)
    nonce = os.urandom(32)
    msg = refused(verifier, document(expired, pcrs, channel, nonce), nonce, "certificate chain")
    assert "not valid at validation time" in msg


def test_tampered_payload_and_forged_signature_are_refused(pki, pcrs, verifier, channel):
    nonce = os.urandom(32)
    good = document(pki, pcrs, channel, nonce)
    # one bit flipped inside the channel key: the payload no longer matches the signature
    at = good.index(channel) + 3
    tampered = good[:at] + bytes([good[at] ^ 1]) + good[at + 1:]
    refused(verifier, tampered, nonce, "signature does not verify")
    # a payload signed by a key that is not the leaf's (the attacker keeps the genuine certificate chain)
    forged = sign(payload(pki, pcrs=pcrs, public_key=channel, nonce=nonce, measurement=MEASUREMENT),
                  ec.generate_private_key(ec.SECP384R1()))
    refused(verifier, forged, nonce, "signature does not verify")
    # ES256 (P-256) instead of ES384: refused by algorithm, before any key is tried
    weak = sign(payload(pki, pcrs=pcrs, public_key=channel, nonce=nonce, measurement=MEASUREMENT),
                ec.generate_private_key(ec.SECP256R1()), alg=Es256)
    refused(verifier, weak, nonce, "ES384")


def test_wrong_pcr_and_debug_mode_are_refused(pki, pcrs, verifier, channel):
    nonce = os.urandom(32)
    other = {**pcrs, 2: os.urandom(48)}
    refused(verifier, document(pki, other, channel, nonce), nonce, "PCR2 does not match the pinned value")
    debug = {i: bytes(48) for i in range(16)}
    refused(verifier, document(pki, debug, channel, nonce), nonce, "debug-mode enclave")
    with pytest.raises(AttestationError, match="pin PCR0"):
        NitroVerifier({1: pcrs[1]}, root=pki.root)


def test_wrong_measurement_is_refused(pki, pcrs, verifier, channel):
    nonce = os.urandom(32)
    refused(verifier, document(pki, pcrs, channel, nonce), nonce, "not the one pinned", measurement="ab" * 32)
    no_stip = sign(payload(pki, pcrs=pcrs, public_key=channel, nonce=nonce, measurement=None), pki.leaf_key)
    refused(verifier, no_stip, nonce, "does not carry a STIP measurement")


def test_wrong_nonce_and_stale_document_are_refused(pki, pcrs, verifier, channel):
    nonce = os.urandom(32)
    refused(verifier, document(pki, pcrs, channel, nonce), os.urandom(32), "nonce is not the one this client sent")
    refused(verifier, document(pki, pcrs, channel, None), nonce, "nonce")
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=30)
    refused(verifier, document(pki, pcrs, channel, nonce, timestamp=old), nonce, "stale")


def test_missing_or_malformed_public_key_is_refused(pki, pcrs, verifier):
    nonce = os.urandom(32)
    refused(verifier, document(pki, pcrs, None, nonce), nonce, "binds no public key")
    refused(verifier, document(pki, pcrs, os.urandom(65), nonce), nonce, "32-byte X25519")


def test_malformed_documents_are_refused(pki, pcrs, verifier, channel):
    nonce = os.urandom(32)
    refused(verifier, b"\xff\x00 not cbor", nonce, "not CBOR")
    refused(verifier, cbor2.dumps([1, 2, 3]), nonce, "not a COSE_Sign1 array")
    bad_digest = sign(payload(pki, pcrs=pcrs, public_key=channel, nonce=nonce, measurement=MEASUREMENT,
                              digest="SHA256"), pki.leaf_key)
    refused(verifier, bad_digest, nonce, "digest is invalid")
    extra = sign(payload(pki, pcrs=pcrs, public_key=channel, nonce=nonce, measurement=MEASUREMENT, rogue=b"x"),
                 pki.leaf_key)
    refused(verifier, extra, nonce, "rogue")
