"""Test-side AWS Nitro evidence: a root CA, an intermediate and a leaf (EC P-384) made here, and attestation documents
(COSE_Sign1 ES384 over the CBOR payload the Nitro Secure Module writes) signed with the leaf. Not shipped: production
clients pin the AWS root, which only AWS can chain to."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pycose.algorithms import Es384
from pycose.headers import Algorithm
from pycose.keys import EC2Key
from pycose.messages import Sign1Message

from stip.client.nitro import measurement_user_data

HOUR = dt.timedelta(hours=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "STIP tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool, not_before: dt.datetime,
          not_after: dt.datetime, issuer_cert: x509.Certificate | None = None) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer_cert is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA384())


@dataclass
class NitroPKI:
    """root -> intermediate -> leaf, as AWS's chain is root -> (regional, zonal, instance) -> enclave leaf."""
    root: x509.Certificate
    intermediate: x509.Certificate
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    intermediate_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def generate(cls, name: str = "test", now: dt.datetime | None = None,
                 leaf_valid: tuple[dt.timedelta, dt.timedelta] = (-HOUR, 3 * HOUR)) -> "NitroPKI":
        now = now or dt.datetime.now(dt.timezone.utc)
        keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]
        root = _cert(f"{name} root", keys[0], _name(f"{name} root"), keys[0], ca=True,
                     not_before=now - 24 * HOUR, not_after=now + 24 * 365 * HOUR)
        inter = _cert(f"{name} intermediate", keys[1], root.subject, keys[0], ca=True, issuer_cert=root,
                      not_before=now - 24 * HOUR, not_after=now + 24 * 30 * HOUR)
        leaf = _cert(f"{name} enclave", keys[2], inter.subject, keys[1], ca=False, issuer_cert=inter,
                     not_before=now + leaf_valid[0], not_after=now + leaf_valid[1])
        return cls(root, inter, leaf, keys[2], keys[1])

    def with_leaf(self, leaf: x509.Certificate, leaf_key) -> "NitroPKI":
        return NitroPKI(self.root, self.intermediate, leaf, leaf_key, self.intermediate_key)


def payload(pki: NitroPKI, *, pcrs: dict[int, bytes], public_key: bytes | None, nonce: bytes | None,
            measurement: str | None, timestamp: dt.datetime | None = None, cabundle: list[bytes] | None = None,
            **overrides) -> dict:
    """The NSM's payload map, field for field; `overrides` replace or (value None) drop fields."""
    when = timestamp or dt.datetime.now(dt.timezone.utc)
    der = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731
    doc = {"module_id": "i-0123456789abcdef0-enc0123456789abcdef", "digest": "SHA384",
           "timestamp": int(when.timestamp() * 1000), "pcrs": pcrs, "certificate": der(pki.leaf),
           "cabundle": cabundle if cabundle is not None else [der(pki.root), der(pki.intermediate)],
           "public_key": public_key, "user_data": measurement_user_data(measurement) if measurement else None,
           "nonce": nonce}
    doc.update(overrides)
    return doc


def sign(doc: dict, key: ec.EllipticCurvePrivateKey, *, tag: bool = False, alg=Es384) -> bytes:
    """COSE_Sign1 over the CBOR payload; untagged by default, as the NSM writes it."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    msg = Sign1Message(phdr={Algorithm: alg}, payload=cbor2.dumps(doc))
    msg.key = EC2Key.from_pem_private_key(pem)
    return msg.encode(tag=tag)


def random_pcrs() -> dict[int, bytes]:
    """PCR0-4 and 8 as a real enclave has them (SHA384), the rest zero."""
    return {i: (os.urandom(48) if i in (0, 1, 2, 3, 4, 8) else bytes(48)) for i in range(16)}
