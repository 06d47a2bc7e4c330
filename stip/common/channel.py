"""The attested channel between a TEE client and the enclave: X25519, HKDF-SHA256, ChaCha20-Poly1305.

Both sides derive two keys (client->enclave, enclave->client) from the X25519 shared secret, with HKDF's info bound to
the whole transcript: both public keys, the client's nonce and the enclave's measurement. So a channel opens only with
the enclave whose fresh key the verified report named, for this nonce. Each message carries an 8-byte sequence number
that is also its AEAD nonce and associated data; a receiver accepts exactly the next number, so a replayed, reordered,
dropped or tampered message is refused with `TeeError`.
"""

from __future__ import annotations

import hashlib
import json
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from stip.errors import TeeError

PROTOCOL = b"stip-tee-channel-v1"
NONCE_BYTES = 32  # the client's attestation nonce
SEQ = struct.Struct(">Q")
TO_ENCLAVE, TO_CLIENT = b"c2e", b"e2c"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def new_keypair() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def transcript(client_public: bytes, enclave_public: bytes, nonce: bytes, measurement: str) -> bytes:
    """What both keys are bound to: the protocol, both public keys, the client's nonce and the measurement."""
    h = hashlib.sha256(PROTOCOL)
    for part in (client_public, enclave_public, nonce, measurement.encode()):
        h.update(SEQ.pack(len(part)) + part)
    return h.digest()


class Channel:
    """One side of an open channel: `seal` what this side sends, `open` what it receives, each in strict order."""

    def __init__(self, send_key: bytes, recv_key: bytes, send_label: bytes, recv_label: bytes):
        self._send, self._recv = ChaCha20Poly1305(send_key), ChaCha20Poly1305(recv_key)
        self._send_label, self._recv_label = send_label, recv_label
        self._send_seq = self._recv_seq = 0

    @classmethod
    def derive(cls, own: X25519PrivateKey, peer_public: bytes, *, client_public: bytes, enclave_public: bytes,
               nonce: bytes, measurement: str, role: str) -> "Channel":
        """Both sides call this with the same transcript; `role` is "client" or "enclave"."""
        try:
            shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as e:
            raise TeeError(f"channel: the peer's X25519 public key is invalid ({e})") from None
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=None,
                   info=transcript(client_public, enclave_public, nonce, measurement)).derive(shared)
        c2e, e2c = okm[:32], okm[32:]
        if role == "client":
            return cls(c2e, e2c, TO_ENCLAVE, TO_CLIENT)
        if role == "enclave":
            return cls(e2c, c2e, TO_CLIENT, TO_ENCLAVE)
        raise ValueError(f"role must be 'client' or 'enclave', got {role!r}")

    @staticmethod
    def _nonce(seq: int) -> bytes:
        return b"\0\0\0\0" + SEQ.pack(seq)

    def seal(self, plaintext: bytes) -> bytes:
        seq = self._send_seq
        self._send_seq += 1
        head = SEQ.pack(seq)
        return head + self._send.encrypt(self._nonce(seq), plaintext, self._send_label + head)

    def open(self, message: bytes) -> bytes:
        if len(message) < SEQ.size + 16:
            raise TeeError("channel: message too short to be a sealed frame")
        if len(message) > MAX_MESSAGE_BYTES:
            raise TeeError(f"channel: message of {len(message)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
        (seq,) = SEQ.unpack_from(message)
        if seq != self._recv_seq:
            what = "replayed or reordered" if seq < self._recv_seq else "out of order (a message was dropped)"
            raise TeeError(f"channel: message number {seq} is {what}; expected {self._recv_seq}")
        try:
            plain = self._recv.decrypt(self._nonce(seq), bytes(message[SEQ.size:]),
                                       self._recv_label + bytes(message[:SEQ.size]))
        except InvalidTag:
            raise TeeError(f"channel: message {seq} failed authentication (tampered, or not from the peer "
                           "this channel was opened with)") from None
        self._recv_seq += 1
        return plain

    def seal_json(self, obj) -> bytes:
        return self.seal(json.dumps(obj, separators=(",", ":")).encode())

    def open_json(self, message: bytes):
        plain = self.open(message)
        try:
            return json.loads(plain)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TeeError("channel: a message decrypted but is not JSON") from None
