"""What several commands' options share: the --trust help and value, and sizes such as 512MB."""

from __future__ import annotations

from stip.errors import StipError

TRUST_HELP = ("the developer's signing key to require, as `stip inspect` shows it (ed25519:FP); repeatable. "
              "Default: $STIP_TRUSTED_SIGNERS; without either the bundle's signature shows only self-consistency")


def trusted_signers(values: list[str]) -> list[str] | None:
    """None when no --trust was given, so the loaders fall back to $STIP_TRUSTED_SIGNERS."""
    return list(values) or None


def parse_size(text: str) -> int:
    """Bytes from a size as people write it (4096, 16MB, 2GB); a bad one is a StipError, shown as one line."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise StipError(f"not a size: {text!r} (expected e.g. 4096, 16MB or 2GB)") from None
    if n < 1:
        raise StipError(f"a size must be positive, got {text!r}")
    return n
