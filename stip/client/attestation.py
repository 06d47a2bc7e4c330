"""The attestation registry: one place where report formats' verifiers register, and the check every TEE client runs.

A format's verifier answers one question: evidence -> (measurement, channel public key, nonce, time). The simulated
format lives here; real formats (stip.client.nitro) call `register_verifier` when imported, and `verify_report` then
checks the measurement against the pinned one, the nonce against the one just sent, and the time against `max_age`.
Verifiers import this module, never stip.client.tee, so the TEE client and its verifiers form no import cycle.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stip.common.tee.platform import unb64
from stip.errors import TeeError

SIMULATED_FORMAT = "stip-simulated-v1"
MAX_AGE_S = 60.0  # a report older than this is stale
CLOCK_SKEW_S = 5.0  # and one from further in the future than this is refused too

__all__ = ["Verified", "EvidenceVerifier", "SimulatedVerifier", "VERIFIERS", "register_verifier", "verify_report"]


@dataclass(frozen=True)
class Verified:
    """What a format's verifier vouches for, once its signature (and chain) checked out."""
    format: str
    measurement: str
    public_key: bytes  # the enclave's X25519 channel key, bound by the evidence
    nonce: bytes
    timestamp: float  # seconds since the epoch
    simulated: bool = False


class EvidenceVerifier(Protocol):
    """One attestation format's client-side check: evidence bytes -> `Verified`, or `TeeError`."""
    format: str

    def verify(self, evidence: bytes) -> Verified: ...


def _unb64(text, what: str, size: int | None = None) -> bytes:
    return unb64(text, f"attestation report: {what}", size)


def parse_platform_pin(pin: str) -> bytes:
    """A pinned simulated platform key, "ed25519:BASE64" (the enclave host's `stip enclave` prints it)."""
    if not isinstance(pin, str) or not pin.startswith("ed25519:"):
        raise TeeError(f"a platform key pin must look like ed25519:BASE64, got {pin!r}")
    return _unb64(pin.split(":", 1)[1], "the pinned platform key", 32)


class SimulatedVerifier:
    """Checks a `stip-simulated-v1` report's Ed25519 signature against the pinned platform key."""
    format = SIMULATED_FORMAT

    def __init__(self, platform_pin: str):
        self._key = Ed25519PublicKey.from_public_bytes(parse_platform_pin(platform_pin))

    def verify(self, evidence: bytes) -> Verified:
        try:
            signed = json.loads(evidence)
            body, signature = signed["report"], signed["signature"]
            assert isinstance(body, dict)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
            raise TeeError("attestation report: a simulated report must be JSON {report, signature}") from None
        try:
            self._key.verify(_unb64(signature, "signature", 64),
                             json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
        except InvalidSignature:
            raise TeeError("attestation report: forged: its signature does not verify against the pinned "
                           "platform key") from None
        if body.get("format") != SIMULATED_FORMAT or body.get("simulated") is not True:
            raise TeeError("attestation report: a signed simulated report must say format "
                           f"{SIMULATED_FORMAT!r} and simulated: true")
        ts = body.get("timestamp")
        if not isinstance(ts, (int, float)) or not isinstance(body.get("measurement"), str):
            raise TeeError("attestation report: measurement or timestamp missing")
        return Verified(SIMULATED_FORMAT, body["measurement"], _unb64(body.get("channel_public_key"),
                        "channel_public_key", 32), _unb64(body.get("nonce"), "nonce"), float(ts), simulated=True)


# format name -> factory(client config) -> verifier: real formats register here (stip.client.nitro)
VERIFIERS: dict[str, Callable[[dict], EvidenceVerifier]] = {}


def register_verifier(format: str, factory: Callable[[dict], EvidenceVerifier]) -> None:
    VERIFIERS[format] = factory


def verify_report(report: dict, *, expected_measurement: str, nonce: bytes, verifiers: dict[str, EvidenceVerifier],
                  allow_simulated: bool = False, max_age: float = MAX_AGE_S, now: float | None = None) -> Verified:
    """Check an enclave's report {format, evidence}: its format's verifier, then the pinned measurement, the nonce
    just sent, and freshness. Returns what was verified (its `public_key` opens the channel)."""
    if not isinstance(report, dict) or not isinstance(report.get("format"), str):
        raise TeeError("attestation report: expected {format, evidence}")
    fmt = report["format"]
    if fmt == SIMULATED_FORMAT and not allow_simulated:
        raise TeeError("attestation report is SIMULATED (no hardware protects the enclave); refused. Opt in with "
                       "allow_simulated=True / --allow-simulated only for development and tests")
    if fmt not in verifiers:
        raise TeeError(f"attestation report of format {fmt!r}: no verifier configured for it "
                       f"(configured: {', '.join(sorted(verifiers)) or 'none'})")
    v = verifiers[fmt].verify(_unb64(report.get("evidence"), "evidence"))
    if v.simulated and not allow_simulated:
        raise TeeError("attestation report is SIMULATED; refused without allow_simulated=True / --allow-simulated")
    if v.measurement != expected_measurement:
        raise TeeError(f"attestation report: wrong measurement {v.measurement[:16]}...; the client config pins "
                       f"{expected_measurement[:16]}... (a different enclave code or bundle)")
    if v.nonce != nonce:
        raise TeeError("attestation report: its nonce is not the one this client just sent (a replayed report)")
    now = time.time() if now is None else now
    if v.timestamp < now - max_age:
        raise TeeError(f"attestation report: stale ({now - v.timestamp:.0f} s old; at most {max_age:.0f} s)")
    if v.timestamp > now + CLOCK_SKEW_S:
        raise TeeError("attestation report: its timestamp is in the future")
    return v
