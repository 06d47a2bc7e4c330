"""Client-side verifier for AWS Nitro Enclaves attestation documents: the real-hardware evidence for TEE mode.

A Nitro document is a COSE_Sign1 (ES384) over a CBOR map {module_id, digest, timestamp, pcrs, certificate, cabundle,
public_key, user_data, nonce}, signed by a per-enclave leaf certificate that chains to the AWS Nitro root. We accept
it only if: the chain (cabundle -> leaf) verifies up to the root we pin (never the one the document carries), every
certificate valid now; the COSE signature verifies with the leaf's key; the pinned PCRs match (PCR0, the image, must
be pinned; a debug-mode enclave, PCR0 all zeros, is refused); `user_data` carries the STIP measurement (the image's
own code writes it, so the pinned PCR0 vouches for the bundle it loaded); the nonce is the one the client just sent;
the document is fresh; and `public_key` holds a 32-byte X25519 key, the enclave's channel key, which we return.
docs/tee.md ("Backends") says what to pin.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError
from pycose.algorithms import Es384
from pycose.headers import Algorithm
from pycose.keys import EC2Key
from pycose.messages import Sign1Message
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from stip.client.attestation import CLOCK_SKEW_S, MAX_AGE_S, Verified, register_verifier
from stip.errors import TeeError

NITRO_FORMAT = "aws-nitro-v1"
# AWS_NitroEnclaves_Root-G1 (https://aws-nitro-enclaves.amazonaws.com/AWS_NitroEnclaves_Root-G1.zip), valid to 2049.
# Pinned twice: the PEM, and its SHA-256 fingerprint as AWS publishes it; the module refuses to load if they differ.
AWS_NITRO_ROOT_PEM = b"""-----BEGIN CERTIFICATE-----
MIICETCCAZagAwIBAgIRAPkxdWgbkK/hHUbMtOTn+FYwCgYIKoZIzj0EAwMwSTEL
MAkGA1UEBhMCVVMxDzANBgNVBAoMBkFtYXpvbjEMMAoGA1UECwwDQVdTMRswGQYD
VQQDDBJhd3Mubml0cm8tZW5jbGF2ZXMwHhcNMTkxMDI4MTMyODA1WhcNNDkxMDI4
MTQyODA1WjBJMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGQW1hem9uMQwwCgYDVQQL
DANBV1MxGzAZBgNVBAMMEmF3cy5uaXRyby1lbmNsYXZlczB2MBAGByqGSM49AgEG
BSuBBAAiA2IABPwCVOumCMHzaHDimtqQvkY4MpJzbolL//Zy2YlES1BR5TSksfbb
48C8WBoyt7F2Bw7eEtaaP+ohG2bnUs990d0JX28TcPQXCEPZ3BABIeTPYwEoCWZE
h8l5YoQwTcU/9KNCMEAwDwYDVR0TAQH/BAUwAwEB/zAdBgNVHQ4EFgQUkCW1DdkF
R+eWw5b6cp3PmanfS5YwDgYDVR0PAQH/BAQDAgGGMAoGCCqGSM49BAMDA2kAMGYC
MQCjfy+Rocm9Xue4YnwWmNJVA44fA0P5W2OpYow9OYCVRaEevL8uO1XYru5xtMPW
rfMCMQCi85sWBbJwKKXdS6BptQFuZbT73o/gBh1qUxl/nNr12UO8Yfwr6wPLb+6N
IwLz3/Y=
-----END CERTIFICATE-----
"""
AWS_NITRO_ROOT_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
MEASUREMENT_PREFIX = b"stip-measurement-v1:"  # user_data = this + the measurement in hex (ascii)
IMAGE_PCR = 0                 # the enclave image file (EIF) hash: a verifier that does not pin it trusts any image
PCR_SIZES = {32, 48, 64}      # SHA256, SHA384, SHA512 banks (Nitro uses SHA384)
CHANNEL_KEY_SIZE = 32         # raw X25519


class AttestationError(TeeError):
    """A Nitro attestation document was refused; the message names the check that failed."""


def aws_nitro_root() -> x509.Certificate:
    """The AWS Nitro root, after checking the PEM in this file against the published fingerprint."""
    root = x509.load_pem_x509_certificate(AWS_NITRO_ROOT_PEM)
    if root.fingerprint(hashes.SHA256()).hex() != AWS_NITRO_ROOT_SHA256:
        raise AttestationError("the pinned AWS Nitro root does not match its pinned fingerprint")
    return root


def measurement_user_data(measurement: str) -> bytes:
    """What the enclave puts in the document's user_data: the STIP measurement (hex sha256), tagged."""
    if not (isinstance(measurement, str) and len(measurement) == 64
            and all(c in "0123456789abcdef" for c in measurement)):
        raise AttestationError(f"the expected measurement {measurement!r:.80} is not a lowercase hex sha256")
    return MEASUREMENT_PREFIX + measurement.encode("ascii")


class NitroPayload(BaseModel):
    """The attestation document's payload, as the Nitro Secure Module writes it (field types as AWS specifies)."""
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    module_id: str
    digest: str
    timestamp: int
    pcrs: dict[int, bytes]
    certificate: bytes
    cabundle: list[bytes]
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None

    @field_validator("module_id")
    @classmethod
    def _module_id(cls, v: str) -> str:
        if not v:
            raise ValueError("is empty")
        return v

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        if v != "SHA384":
            raise ValueError(f"must be SHA384, got {v!r}")
        return v

    @field_validator("timestamp")
    @classmethod
    def _timestamp(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive (ms since the epoch)")
        return v

    @field_validator("pcrs")
    @classmethod
    def _pcrs(cls, v: dict[int, bytes]) -> dict[int, bytes]:
        if not v:
            raise ValueError("is empty")
        for index, value in v.items():
            if not 0 <= index < 32 or len(value) not in PCR_SIZES:
                raise ValueError(f"PCR{index} is out of range or {len(value)} bytes long")
        return v

    @field_validator("cabundle")
    @classmethod
    def _cabundle(cls, v: list[bytes]) -> list[bytes]:
        if not v:
            raise ValueError("is empty")
        return v


def _certificate(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise AttestationError(f"{what} is not a DER certificate ({e})") from None


def _cose(document: bytes) -> tuple[Sign1Message, NitroPayload]:
    """Decode the COSE_Sign1 envelope (tag 18 or untagged, as the NSM writes it) and its CBOR payload."""
    try:
        obj = cbor2.loads(document)
    except Exception as e:  # cbor2 raises several types on garbage
        raise AttestationError(f"the attestation document is not CBOR ({e})") from None
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != Sign1Message.cbor_tag:
            raise AttestationError(f"the attestation document has CBOR tag {obj.tag}, not COSE_Sign1 (18)")
        obj = obj.value
    if not (isinstance(obj, (list, tuple)) and len(obj) == 4 and all(isinstance(x, bytes) for x in obj[::2])
            and isinstance(obj[1], Mapping)):  # inside a tag, cbor2 decodes arrays as tuples, maps as frozendicts
        raise AttestationError("the attestation document is not a COSE_Sign1 array [protected, unprotected, "
                               "payload, signature]")
    try:
        message = Sign1Message.from_cose_obj([obj[0], dict(obj[1]), *obj[2:]], allow_unknown_attributes=True)
    except Exception as e:
        raise AttestationError(f"the attestation document's COSE headers are malformed ({e})") from None
    if message.phdr.get(Algorithm) is not Es384:
        raise AttestationError(f"the attestation document must be signed with ES384, not "
                               f"{message.phdr.get(Algorithm)!r}")
    try:
        raw = cbor2.loads(message.payload)
        payload = NitroPayload.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise AttestationError(f"the attestation document's {where} is invalid: {first['msg']}") from None
    except Exception as e:
        raise AttestationError(f"the attestation document's payload is not a CBOR map ({e})") from None
    return message, payload


def measurement_of(user_data: bytes | None) -> str:
    """The STIP measurement a document's user_data carries (see `measurement_user_data`)."""
    if user_data is None or not user_data.startswith(MEASUREMENT_PREFIX):
        raise AttestationError(f"the attestation document's user_data does not carry a STIP measurement (expected "
                               f"{MEASUREMENT_PREFIX.decode()}HEX, got {user_data!r:.80})")
    text = user_data[len(MEASUREMENT_PREFIX):].decode("ascii", errors="replace")
    measurement_user_data(text)  # the same validation as the pinned side
    return text


@dataclass(frozen=True)
class NitroVerifier:
    """Verifies Nitro documents against pinned values. `root`: the CA to trust (default: the AWS Nitro root; tests
    pin a CA they generate). `pcrs`: the PCRs to require, by index (PCR0, the image, must be among them).

    `verify(evidence)` is the `stip.client.attestation.EvidenceVerifier` step (chain, signature, PCRs, a bound key; the
    caller then checks measurement, nonce and age); `verify_document` does every check by itself."""
    pcrs: Mapping[int, bytes]
    root: x509.Certificate = field(default_factory=aws_nitro_root)
    max_age_s: float = MAX_AGE_S
    max_skew_s: float = CLOCK_SKEW_S
    format: str = NITRO_FORMAT

    def __post_init__(self):
        if IMAGE_PCR not in self.pcrs:
            raise AttestationError(f"pin PCR{IMAGE_PCR} (the enclave image): without it any image could claim the "
                                   "measurement")
        if not any(self.pcrs[IMAGE_PCR]):
            raise AttestationError(f"the pinned PCR{IMAGE_PCR} is all zeros: that is a debug-mode enclave, whose "
                                   "memory the host can read")

    @classmethod
    def from_config(cls, config: Mapping, root: x509.Certificate | None = None) -> "NitroVerifier | UnpinnedNitro":
        """From a TEE client config (stip_client.json, as `stip protect --tee --attestation nitro` writes it): its
        "nitro" section, under "tee" or at the top, {"pcrs": {"0": HEX, ...}, "root_pem": PEM (optional)}. Without
        one, a verifier that refuses every Nitro document (the config pins nothing to check it against).

        `root`: the CA to trust instead of the AWS Nitro root (tests: the recorded fixture's test root, docs/tee.md);
        the checks are the same. Default: the config's "root_pem" if any, else the built-in AWS Nitro root."""
        config = config if isinstance(config, Mapping) else {}
        tee = config.get("tee") if isinstance(config.get("tee"), Mapping) else {}
        section = tee.get("nitro", config.get("nitro"))
        if section is None:
            return UnpinnedNitro()
        if not isinstance(section, Mapping) or not isinstance(section.get("pcrs"), Mapping):
            raise AttestationError('the client config\'s "nitro" section must be {"pcrs": {"0": HEX, ...}}')
        try:
            pcrs = {int(k): bytes.fromhex(v) for k, v in section["pcrs"].items()}
        except (ValueError, TypeError):
            raise AttestationError('the client config\'s nitro.pcrs must map PCR indexes to hex values') from None
        if root is not None:
            return cls(pcrs, root)
        if section.get("root_pem") is None:
            return cls(pcrs)
        try:
            root = x509.load_pem_x509_certificate(str(section["root_pem"]).encode())
        except ValueError:
            raise AttestationError("the client config's nitro.root_pem is not a PEM certificate") from None
        return cls(pcrs, root)

    def verify(self, evidence: bytes, now: dt.datetime | None = None) -> Verified:
        """Chain to the pinned root, COSE signature, pinned PCRs, a bound channel key: what the document vouches for.
        `now` (validity of the certificates) is for tests with recorded documents; by default the current time."""
        now = now or dt.datetime.now(dt.timezone.utc)
        message, doc = _cose(evidence)
        self._signature(message, self._chain(doc, now))
        self._pcrs(doc)
        if doc.public_key is None:
            raise AttestationError("the attestation document binds no public key: no channel can be opened")
        if len(doc.public_key) != CHANNEL_KEY_SIZE:
            raise AttestationError(f"the attestation document's public_key must be a raw {CHANNEL_KEY_SIZE}-byte "
                                   f"X25519 key, got {len(doc.public_key)} bytes")
        X25519PublicKey.from_public_bytes(doc.public_key)
        return Verified(NITRO_FORMAT, measurement_of(doc.user_data), doc.public_key, doc.nonce or b"",
                        doc.timestamp / 1000)

    def verify_document(self, evidence: bytes, expected_measurement: str, nonce: bytes,
                        now: dt.datetime | None = None) -> Verified:
        """Every check: `verify`, then the measurement pinned in the client config, the nonce this client just sent,
        and freshness (the document's own timestamp against `now`)."""
        now = now or dt.datetime.now(dt.timezone.utc)
        expected = measurement_user_data(expected_measurement)
        v = self.verify(evidence, now)
        if not hmac.compare_digest(measurement_user_data(v.measurement), expected):
            raise AttestationError(f"the enclave's measurement {v.measurement[:16]}... is not the one pinned in the "
                                   f"client config ({expected_measurement[:16]}...): a different enclave code or "
                                   "bundle")
        if not v.nonce or not hmac.compare_digest(v.nonce, nonce):
            raise AttestationError("the attestation document's nonce is not the one this client sent (a replayed "
                                   "or foreign document)")
        age = now.timestamp() - v.timestamp
        if age > self.max_age_s:
            raise AttestationError(f"the attestation document is stale: issued {age:.0f} s ago "
                                   f"(limit {self.max_age_s:.0f} s)")
        if age < -self.max_skew_s:
            raise AttestationError(f"the attestation document is dated {-age:.0f} s in the future")
        return v

    def _chain(self, doc: NitroPayload, now: dt.datetime) -> x509.Certificate:
        """cabundle[0] is the root as the document claims it; we trust only our pinned root, and build the path
        from the leaf through cabundle[1:] (the intermediates, root-first) to it, with validity checked at `now`."""
        leaf = _certificate(doc.certificate, "the leaf certificate")
        intermediates = [_certificate(der, f"cabundle[{i}]") for i, der in enumerate(doc.cabundle)][1:]
        verifier = (PolicyBuilder().store(Store([self.root])).time(now)
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                        ee_policy=ExtensionPolicy.permit_all())
                    .build_client_verifier())
        try:
            verifier.verify(leaf, intermediates)
        except VerificationError as e:
            raise AttestationError(f"the attestation document's certificate chain does not verify up to the pinned "
                                   f"root ({e})") from None
        key = leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            raise AttestationError("the attestation document's leaf key is not EC P-384")
        return leaf

    @staticmethod
    def _signature(message: Sign1Message, leaf: x509.Certificate) -> None:
        pem = leaf.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
        message.key = EC2Key.from_pem_public_key(pem)
        try:
            ok = message.verify_signature()
        except Exception as e:
            raise AttestationError(f"the attestation document's signature is malformed ({e})") from None
        if not ok:
            raise AttestationError("the attestation document's signature does not verify with its leaf certificate "
                                   "(tampered or forged)")

    def _pcrs(self, doc: NitroPayload) -> None:
        if not any(doc.pcrs.get(IMAGE_PCR, b"")):
            raise AttestationError(f"the attestation document comes from a debug-mode enclave (PCR{IMAGE_PCR} all "
                                   "zeros): the host can read its memory")
        for index, value in sorted(self.pcrs.items()):
            got = doc.pcrs.get(index)
            if got is None or not hmac.compare_digest(got, value):
                raise AttestationError(f"PCR{index} does not match the pinned value: got "
                                       f"{got.hex() if got else 'none'}, expected {value.hex()}")


class UnpinnedNitro:
    """The Nitro verifier of a client config that pins no PCRs: it refuses every document, saying what to pin."""
    format = NITRO_FORMAT

    def verify(self, evidence: bytes, now: dt.datetime | None = None) -> Verified:
        raise AttestationError('the enclave sent an AWS Nitro attestation document, but the client config pins no '
                               'Nitro PCRs: add "nitro": {"pcrs": {"0": HEX, ...}} to its "tee" section')


register_verifier(NITRO_FORMAT, NitroVerifier.from_config)
