"""TLS end to end: a real `stip serve --ssl-certfile` on loopback with a throwaway CA made here, and the client's
rules: verify the certificate (pinned CA or system store), and never send a token in clear text off loopback."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from transformers import AutoModelForCausalLM

from stip.client.sdk import Client
from stip.client.transport import Connection, StipCertificateError
from stip.reference import plain_greedy
from stip.errors import StipError
from stip.server.launch import local_server, server_env
from tests.parties import isolated_server_bundle

TOKEN = "tls-token"
PROMPT = [5, 17, 3, 88, 42, 9]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(folder: Path, cn: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    path = folder / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(folder: Path, ca_key, ca_cert) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_key, ca_cert = make_ca(folder, "stip-test-ca")
    other_ca, _, _ = make_ca(folder, "someone-else-ca")
    cert, key = make_server_cert(folder, ca_key, ca_cert)
    return {"ca": ca, "other_ca": other_ca, "cert": cert, "key": key}


@pytest.fixture(scope="module")
def tls_party(tiny_protected, pki):
    plain_dir, protected = tiny_protected("llama-gqa-untied")
    with isolated_server_bundle(protected) as only_server, \
            local_server(only_server, "--ssl-certfile", pki["cert"], "--ssl-keyfile", pki["key"], "--threads", "1",
                         token=TOKEN, timeout=120, ca_file=pki["ca"]) as server:
        plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
        yield server, protected, plain


def test_pinned_ca_generates_the_plain_greedy_tokens(tls_party, pki):
    server, protected, plain = tls_party
    assert server.url.startswith("https://127.0.0.1:")
    for downlink in ("topk", "logits"):
        client = Client(protected / "client", server.url, token=TOKEN, ca_file=pki["ca"], downlink=downlink, k=8)
        g = client.generate(ids=PROMPT, max_tokens=12)
        assert g.token_ids == plain_greedy(plain, PROMPT, 12), downlink
    # wss:// and https:// name the same server
    conn = Connection(server.url.replace("https://", "wss://"), token=TOKEN, ca_file=pki["ca"])
    with conn.open_session() as s:
        assert s.id and conn.info()["bundle_id"]


def test_unverifiable_certificate_is_refused(tls_party, pki):
    server, protected, _ = tls_party
    # no CA given: the system trust store does not know the throwaway CA (HTTP path, via the SDK)
    with pytest.raises(StipCertificateError, match="did not verify against the system trust store"):
        Client(protected / "client", server.url, token=TOKEN)
    # the WebSocket path, and a different CA pinned
    with pytest.raises(StipCertificateError, match="certificate"):
        Connection(server.url, token=TOKEN).open_session()
    with pytest.raises(StipCertificateError, match="pinned CA file"):
        Connection(server.url, token=TOKEN, ca_file=pki["other_ca"]).open_session()
    # the server keeps serving verified clients
    assert Connection(server.url, token=TOKEN, ca_file=pki["ca"]).health()["status"] == "ok"


def test_plain_http_to_the_tls_server_fails_clearly(tls_party):
    server, _, _ = tls_party
    with pytest.raises(StipError):
        Connection(server.url.replace("https://", "http://"), token=TOKEN, timeout=5).open_session()


# ------------------------------------------------------------------ client-side rules, no server


class _Connects:
    """Records every socket connect and name lookup this process attempts (a Python audit hook: it observes, it
    changes nothing)."""

    hooked = False
    seen: list = []

    @classmethod
    def watch(cls) -> list:
        if not cls.hooked:
            sys.addaudithook(lambda event, args: cls.seen.append((event, args))
                             if event in ("socket.connect", "socket.getaddrinfo") else None)
            cls.hooked = True
        cls.seen.clear()
        return cls.seen


@pytest.mark.parametrize("url", ["http://10.0.0.1:1", "ws://10.0.0.1:1/api", "example.invalid:8000",
                                 "http://[2001:db8::1]:1", "http://127.0.0.1.nip.io:1"])
def test_token_never_goes_in_clear_text_off_loopback(url, tiny_protected):
    seen = _Connects.watch()
    with pytest.raises(StipError, match="refusing to send the token in clear text"):
        Connection(url, token=TOKEN, timeout=30)
    _, protected = tiny_protected("llama-gqa-untied")
    with pytest.raises(StipError, match="--insecure"):
        Client(protected / "client", url, token=TOKEN, timeout=30)
    assert seen == []  # refused before any name lookup or connection was attempted


def test_what_insecure_and_ca_file_allow(tmp_path, pki):
    seen = _Connects.watch()
    # --insecure allows exactly the clear-text token (nothing is contacted until a call is made)
    assert Connection("http://10.0.0.1:1", token=TOKEN, insecure=True).token == TOKEN
    # no token: nothing secret to protect; loopback: never leaves the machine
    Connection("http://10.0.0.1:1")
    Connection("http://localhost:1", token=TOKEN)
    Connection("http://[::1]:1", token=TOKEN)
    # insecure never turns certificate checks off: https still gets a verifying context
    c = Connection("https://10.0.0.1:1", token=TOKEN, insecure=True)
    assert c.ssl is not None and c.ssl.verify_mode.name == "CERT_REQUIRED" and c.ssl.check_hostname
    # a CA file with a plain URL would verify nothing: refused, as is a missing CA file
    with pytest.raises(StipError, match="not https"):
        Connection("http://127.0.0.1:1", ca_file=pki["ca"])
    with pytest.raises(StipError, match="does not exist"):
        Connection("https://127.0.0.1:1", ca_file=tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(StipError, match="cannot load the CA file"):
        Connection("https://127.0.0.1:1", ca_file=garbage)
    assert seen == []


def test_chat_cli_refuses_clear_text_token_without_traceback(tiny_protected):
    _, protected = tiny_protected("llama-gqa-untied")
    r = subprocess.run([sys.executable, "-m", "stip.cli", "chat", str(protected / "client"), "--server",
                        "http://10.0.0.1:1", "--prompt", "hi"], capture_output=True, text=True, timeout=120,
                       env=server_env(TOKEN))
    assert r.returncode == 2, r.stderr
    assert "refusing to send the token in clear text to 10.0.0.1" in r.stderr and "Traceback" not in r.stderr
