"""What several commands' options share: the --trust help and value, sizes such as 512MB, and counts such as 1M."""

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


def parse_count(text: str, what: str = "count") -> int:
    """A positive whole number as people write it: 250000, 1e6, 1_000_000, 100k, 1.5M, 2G (decimal: k = 1000,
    M = 10^6, G = 10^9); a bad one is a StipError naming `what`, shown as one line."""
    units = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}
    t = text.strip().lower().replace("_", "")
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise StipError(f"{what}: not a number: {text!r} (expected e.g. 250000, 1e6, 100k or 1M)") from None
    if not 1 <= value <= 1e18 or value != int(value):
        raise StipError(f"{what} must be a whole number of at least 1, got {text!r}")
    return int(value)
