"""`stip serve`'s checks of its options, with no torch, FastAPI or model import: the CLI runs them before it imports
the server, so a refused option answers in a fraction of a second instead of after the server's imports (seconds);
`stip.server.app.run_server` runs them again for callers of the API.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

from stip.common.hosts import is_loopback_host
from stip.errors import StipError
from stip.server.auth import load_key_file
from stip.server.key_usage import KeyUsage

log = logging.getLogger("stip.server")

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # stip.common.wire.DTYPES' names (tests/test_server.py checks)
ENGINES = ("transformers", "vllm")
ALIASES = {"batched": ("transformers", True), "serial": ("transformers", False)}  # the names of 0.2


def check_engine(kind: str) -> None:
    """A known engine; vLLM's installed where it is asked for (a broken install is caught when it is imported)."""
    if kind not in ENGINES and kind not in ALIASES:
        raise StipError(f"unknown engine {kind!r}; expected one of {', '.join(ENGINES)}")
    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        from stip.server.vllm_options import INSTALL_HINT

        raise StipError("--engine vllm needs vLLM, which this Python cannot import (ModuleNotFoundError: No module "
                        f"named 'vllm'); {INSTALL_HINT}")


def check_options(host: str, token: str | None, api_keys, ssl_certfile: str | None, dtype: str,
                  session_ttl: float, limits: dict[str, int], warn: bool = True) -> None:
    """Refuse what cannot be served, before any model loads: no token off loopback, limits below 1, a bad TTL or
    dtype, an unreadable key file. Warn (with `warn`) about what can be served but should not be."""
    if not token and not api_keys and not is_loopback_host(host):
        raise StipError(f"refusing to listen on {host} without a token: anyone who can reach it could use the "
                        f"model. Pass --token (or set STIP_TOKEN) or --api-keys FILE, or bind to 127.0.0.1")
    if warn and not token and not api_keys:
        log.warning("no token set: serving on loopback %s only, without authentication", host)
    elif warn and not ssl_certfile and not is_loopback_host(host):
        log.warning("serving on %s without TLS: put a TLS-terminating proxy in front, or pass --ssl-certfile", host)
    for name, value in limits.items():
        if value < 1:
            raise StipError(f"{name} must be at least 1, got {value}")
    if not (session_ttl > 0 and math.isfinite(session_ttl)):
        raise StipError(f"session_ttl must be a positive number of seconds, got {session_ttl}")
    if dtype not in DTYPE_NAMES:
        raise StipError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if api_keys:
        load_key_file(api_keys)  # a bad key file stops here, before the model loads


def key_usage(rekey_after: int | None, usage_file, tee_worker: bool) -> KeyUsage:
    """The tokens each context's key served (loaded from `usage_file` if given) and the rekey budget. The TEE worker
    serves the enclave, not client sessions, and counts nothing: both options are refused there."""
    if tee_worker and (rekey_after is not None or usage_file is not None):
        raise StipError("--rekey-after and --usage-file count client sessions; the TEE worker (--tee-worker) serves "
                        "the enclave and does not count tokens")
    return KeyUsage(rekey_after, usage_file)


def check_modes(bundles: list, engine_kind: str, tee_worker: bool, capture, capture_layers):
    """Refuse combinations the server does not run (several contexts only on transformers; capture of one bundle
    only, round-trip or TEE worker; the TEE worker only on transformers), before any model loads. Returns the
    capture layers, parsed."""
    if not bundles:
        raise StipError("no server bundle given")
    if len(bundles) > 1 and (tee_worker or engine_kind == "vllm"):
        raise StipError(f"several contexts in one server run on the transformers engine, not "
                        f"{'--tee-worker' if tee_worker else '--engine vllm'}: run one `stip serve` per bundle "
                        f"(docs/contexts.md)")
    if capture is None and capture_layers:
        raise StipError("--capture-layers needs --capture DIR")
    if capture is not None and (engine_kind != "transformers" or len(bundles) > 1):
        raise StipError("--capture records the sessions of one bundle on the transformers engine (not "
                        "--engine vllm or several contexts)")
    if capture is not None:  # refused before the model loads: bad layers, a folder in use
        from stip.server.capture import check_folder, parse_layers

        capture_layers = parse_layers(capture_layers) if isinstance(capture_layers, str) else capture_layers
        check_folder(capture)
    if tee_worker and engine_kind != "transformers":
        raise StipError("--tee-worker runs the transformers engine only")
    return capture_layers


def serve_limits(max_sessions: int, max_seq_len: int, kv_budget_bytes: int | None, kv_budget_tokens: int | None,
                 max_all_logits: int) -> dict[str, int]:
    """The limits `check_options` wants at least 1 (an unset KV budget passes)."""
    return {"max_sessions": max_sessions, "max_seq_len": max_seq_len,
            "kv_budget_bytes": 1 if kv_budget_bytes is None else kv_budget_bytes,
            "kv_budget_tokens": 1 if kv_budget_tokens is None else kv_budget_tokens, "max_all_logits": max_all_logits}


def preflight(bundles: list[str | Path], *, host: str, token: str | None, api_keys, ssl_certfile: str | None,
              dtype: str, session_ttl: float, limits: dict[str, int], engine_kind: str, tee_worker: bool, capture,
              capture_layers, rekey_after: int | None, usage_file, vllm_options: dict | None = None,
              warn: bool = True):
    """Every check above, in `run_server`'s order (combinations no install serves before the engine's install): (capture layers parsed, the key usage). `vllm_options` named
    but unknown to vLLM are refused here too (vLLM is imported for its list, as the engine would)."""
    check_options(host, token, api_keys, ssl_certfile, dtype, session_ttl, limits, warn)
    capture_layers = check_modes(bundles, engine_kind, tee_worker, capture, capture_layers)  # refused anywhere
    check_engine(engine_kind)
    if engine_kind == "vllm" and vllm_options:
        from stip.server.vllm_options import check_known

        check_known(vllm_options)
    return capture_layers, key_usage(rekey_after, usage_file, tee_worker)
