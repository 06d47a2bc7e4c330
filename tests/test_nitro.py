"""The AWS Nitro attestation verifier (stip.client.nitro), on evidence made here: a test root CA, an intermediate and
a leaf (EC P-384), documents signed COSE_Sign1 ES384 with real cryptography. A valid document yields the enclave's
channel key; each forgery or mismatch is refused with a TeeError naming the check. Below: the committed recorded
document (tests/fixtures/nitro, made under a test root: no AWS here) through the production verifier, and
`stip protect --tee --attestation nitro` pinning PCRs that a TEE client then checks."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pycose.algorithms import Es256

from stip.client import tee
from stip.client.nitro import (AWS_NITRO_ROOT_SHA256, NITRO_FORMAT, AttestationError, NitroVerifier,
                               aws_nitro_root)
from stip.errors import StipError, TeeError
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


# ---------------------------------------------------------------------------------------------- the recorded fixture

FIXTURE = Path(__file__).parent / "fixtures" / "nitro"


@pytest.fixture(scope="module")
def recorded():
    """tests/fixtures/nitro: a committed document (made by its make_fixture.py under a TEST root, as AWS cannot be
    reached here), what it pins, and the time it was made (its leaf certificate lives three hours from then)."""
    record = json.loads((FIXTURE / "document.json").read_text())
    record["document"] = (FIXTURE / "document.cbor").read_bytes()
    record["root"] = x509.load_pem_x509_certificate(record["root_pem"].encode())
    record["at"] = dt.datetime.fromisoformat(record["recorded_at"]) + dt.timedelta(seconds=10)
    record["pcr_bytes"] = {int(i): bytes.fromhex(v) for i, v in record["pcrs"].items()}
    return record


def test_recorded_document_verifies_through_the_production_path(recorded):
    """The committed document through `NitroVerifier.verify_document`, the production code; only the pinned root is
    the fixture's (the `root` parameter). The WebPKI chain policy, the COSE signature, the PCRs, the measurement and
    the nonce all check out, and the bound channel key comes back."""
    nonce = bytes.fromhex(recorded["nonce"])
    verifier = NitroVerifier.from_config({"tee": {"nitro": {"pcrs": recorded["pcrs"]}}}, root=recorded["root"])
    v = verifier.verify_document(recorded["document"], recorded["measurement"], nonce, now=recorded["at"])
    assert (v.format, v.public_key.hex(), v.nonce, v.measurement) == (NITRO_FORMAT, recorded["public_key"], nonce,
                                                                       recorded["measurement"])


def test_recorded_document_refusals(recorded):
    """The same document against the built-in AWS root (the default: refused at the chain, it is not AWS's), with a
    different pinned PCR0 (refused, naming PCR0), and after its leaf certificate expired (the WebPKI validity
    check)."""
    doc, nonce, at = recorded["document"], bytes.fromhex(recorded["nonce"]), recorded["at"]
    pcrs = recorded["pcr_bytes"]
    with pytest.raises(AttestationError, match="does not verify up to the pinned root"):
        NitroVerifier.from_config({"tee": {"nitro": {"pcrs": recorded["pcrs"]}}}).verify_document(
            doc, recorded["measurement"], nonce, now=at)
    with pytest.raises(AttestationError, match="PCR0 does not match the pinned value"):
        NitroVerifier({**pcrs, 0: os.urandom(48)}, root=recorded["root"]).verify(doc, now=at)
    with pytest.raises(AttestationError, match="not valid at validation time"):
        NitroVerifier(pcrs, root=recorded["root"]).verify(doc, now=at + dt.timedelta(hours=4))


def test_fixture_script_makes_a_verifying_document(tmp_path):
    """tests/fixtures/nitro/make_fixture.py still makes what the committed files are (so they can be remade)."""
    from tests.fixtures.nitro.make_fixture import DOCUMENT, make

    record = make(tmp_path)
    root = x509.load_pem_x509_certificate(record["root_pem"].encode())
    v = NitroVerifier({int(i): bytes.fromhex(h) for i, h in record["pcrs"].items()}, root=root).verify_document(
        (tmp_path / DOCUMENT).read_bytes(), record["measurement"], bytes.fromhex(record["nonce"]))
    assert v.public_key.hex() == record["public_key"]


# ---------------------------------------------------------------------------------------------- stip protect --tee

class NitroEnclave:
    """An enclave's /v1/attest on a real loopback socket that answers each client's nonce with a Nitro document
    signed under `pki`, with the PCRs in `pcrs` (or, `simulated`, a simulated report)."""

    def __init__(self, pki, pcrs, measurement):
        self.pki, self.pcrs, self.measurement, self.simulated = pki, pcrs, measurement, None
        enclave = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                nonce = base64.b64decode(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["nonce"])
                channel = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
                body = json.dumps(enclave.simulated.report(enclave.measurement, channel, nonce) if enclave.simulated
                                  else {"format": NITRO_FORMAT, "evidence": base64.b64encode(sign(payload(
                                      enclave.pki, pcrs=enclave.pcrs, public_key=channel, nonce=nonce,
                                      measurement=enclave.measurement), enclave.pki.leaf_key)).decode()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_protect_pins_nitro_pcrs_and_the_tee_client_checks_them(tmp_path, pki):
    """`stip protect --tee --attestation nitro --pcr0 .. --pcr2 ..` writes the PCRs into the signed TEE client
    config (no simulated platform key); a TEE client of that bundle accepts a Nitro document with those PCRs, refuses
    one with another PCR0, naming it, and refuses a simulated report even with --allow-simulated."""
    from typer.testing import CliRunner

    from stip.cli import app
    from stip.client.tee import TeeBundle, TeeClient
    from stip.common.tee.platform import SimulatedPlatform
    from tests.models import save_tiny

    pcrs, out = random_pcrs(), tmp_path / "protected"
    r = CliRunner().invoke(app, ["protect", str(save_tiny("gpt2", tmp_path / "plain")), "--out", str(out), "-q",
                                 "--tee", "--attestation", "nitro", "--pcr0", pcrs[0].hex().upper(),
                                 "--pcr2", pcrs[2].hex()])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "the TEE client pins PCR0, PCR2" in r.output
    bundle = TeeBundle(out / "tee-client")  # the signed manifest covers the config
    assert bundle.tee["format"] == NITRO_FORMAT and "platform_key" not in bundle.tee
    assert bundle.tee["nitro"] == {"pcrs": {"0": pcrs[0].hex(), "2": pcrs[2].hex()}}
    enclave = NitroEnclave(pki, pcrs, bundle.measurement)
    try:
        client = TeeClient(bundle, enclave.url, verifiers={
            NITRO_FORMAT: NitroVerifier.from_config(bundle.config, root=pki.root)})
        v, _ = client.attest()
        assert v.format == NITRO_FORMAT and v.measurement == bundle.measurement and not v.simulated
        enclave.pcrs = {**pcrs, 0: os.urandom(48)}
        with pytest.raises(TeeError, match="PCR0 does not match the pinned value"):
            client.attest()
        enclave.simulated = SimulatedPlatform.generate()
        with pytest.raises(TeeError, match="no verifier configured"):
            TeeClient(bundle, enclave.url, allow_simulated=True).attest()
    finally:
        enclave.server.shutdown()


@pytest.mark.parametrize("args, message", [
    (["--pcr0", "ab" * 32], "--pcr0 must be a SHA-384 value, 96 hex digits"),
    (["--pcr0", "zz" * 48], "--pcr0 must be a SHA-384 value"),
    (["--pcr2", "ab" * 48], "needs PCR0"),
    (["--pcr0", "00" * 48], "all zeros"),
    (["--pcrs", "missing.json"], "does not exist"),
], ids=["short", "not-hex", "no-pcr0", "debug", "no-file"])
def test_protect_refuses_bad_nitro_pins(tmp_path, args, message):
    """Each bad pin is a CLI error naming it, before anything is protected."""
    from typer.testing import CliRunner

    from stip.cli import app

    r = CliRunner().invoke(app, ["protect", "no-such-model", "--out", str(tmp_path / "x"), "--tee",
                                 "--attestation", "nitro", *args])
    assert isinstance(r.exception, StipError) and message in str(r.exception), r.exception
    r = CliRunner().invoke(app, ["protect", "no-such-model", "--out", str(tmp_path / "x"), "--pcr0", "ab" * 48])
    assert isinstance(r.exception, StipError) and "need --tee" in str(r.exception)


def test_pcr_file_as_nitro_cli_prints_it(tmp_path, pcrs):
    from stip.developer.tee import nitro_pcrs

    path = tmp_path / "pcrs.json"
    path.write_text(json.dumps({"EnclaveImage": "x.eif", "Measurements": {
        "HashAlgorithm": "Sha384 { ... }", **{f"PCR{i}": pcrs[i].hex() for i in (0, 1, 2)}}}))
    assert nitro_pcrs({8: pcrs[8].hex()}, path) == {"0": pcrs[0].hex(), "1": pcrs[1].hex(), "2": pcrs[2].hex(),
                                                    "8": pcrs[8].hex()}
    with pytest.raises(StipError, match="PCR1 is given twice with different values"):
        nitro_pcrs({1: pcrs[3].hex()}, path)
    path.write_text(json.dumps({"PCR0": pcrs[0].hex(), "PCR5": pcrs[1].hex()}))
    with pytest.raises(StipError, match="'PCR5' is not a Nitro PCR"):
        nitro_pcrs({}, path)
