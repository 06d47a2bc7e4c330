"""The simulated TEE platform: its key file and its attestation reports.

The simulated platform: a file holding an Ed25519 "platform" key and a sealing secret, standing in for what a TEE's
hardware holds. A simulated report is JSON {format, simulated: true, measurement, channel_public_key, nonce,
timestamp} signed by the platform key; clients refuse it unless they opt in (docs/tee.md says what it does not
protect). A real backend (Nitro, TDX) produces its own evidence format, checked by its own client-side verifier.
The developer creates the key file (`stip protect --tee`) and seals for it; the enclave signs its reports with it.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stip.common import signing
from stip.common.files import write_json_atomic
from stip.errors import TeeError

SIMULATED_FORMAT = "stip-simulated-v1"
PLATFORM_FORMAT = "stip-simulated-platform-v1"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text, what: str, size: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise TeeError(f"{what} is not base64") from None
    if size is not None and len(raw) != size:
        raise TeeError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


@dataclass
class SimulatedPlatform:
    """What a TEE's hardware would hold: the key that signs reports and the secret sealing keys derive from."""
    signing_key: Ed25519PrivateKey
    sealing_secret: bytes

    @classmethod
    def generate(cls) -> "SimulatedPlatform":
        return cls(Ed25519PrivateKey.generate(), os.urandom(32))

    @property
    def public_key(self) -> bytes:
        return signing.public_raw(self.signing_key)

    def pin(self) -> str:
        """What a client pins for simulated reports: the platform key, as ed25519:base64."""
        return "ed25519:" + b64(self.public_key)

    def save(self, path: str | Path) -> None:
        from cryptography.hazmat.primitives import serialization
        raw = self.signing_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
        write_json_atomic(Path(path), {"format": PLATFORM_FORMAT, "signing_key": b64(raw),
                                       "sealing_secret": b64(self.sealing_secret)}, mode=0o600)

    @classmethod
    def load(cls, path: str | Path) -> "SimulatedPlatform":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TeeError(f"platform key file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TeeError(f"{path} is not a simulated platform key file (not JSON)") from None
        if not isinstance(data, dict) or data.get("format") != PLATFORM_FORMAT:
            raise TeeError(f"{path} is not a simulated platform key file (format {PLATFORM_FORMAT})")
        return cls(Ed25519PrivateKey.from_private_bytes(unb64(data.get("signing_key"), f"{path}: signing_key", 32)),
                   unb64(data.get("sealing_secret"), f"{path}: sealing_secret", 32))

    @classmethod
    def load_or_create(cls, path: str | Path) -> "SimulatedPlatform":
        if Path(path).exists():
            return cls.load(path)
        platform = cls.generate()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        platform.save(path)
        return platform

    def report(self, measurement: str, channel_public_key: bytes, nonce: bytes, timestamp: float | None = None) -> dict:
        """Evidence {format, evidence: base64 of the signed JSON report} binding the measurement, a fresh channel
        key and the client's nonce."""
        body = {"format": SIMULATED_FORMAT, "simulated": True, "measurement": measurement,
                "channel_public_key": b64(channel_public_key), "nonce": b64(nonce),
                "timestamp": time.time() if timestamp is None else timestamp}
        signed = {"report": body, "signature": b64(self.signing_key.sign(canonical(body)))}
        return {"format": SIMULATED_FORMAT, "evidence": b64(json.dumps(signed, sort_keys=True).encode())}


def canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
