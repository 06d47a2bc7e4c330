"""Which engine `stip serve` runs: the factory that picks and builds one of the engines beside it.

The engines import their base (`stip.server.engine`); only this module imports the engines, so the base never
imports what implements it and the engines form no import cycle (issue 19).
"""

from __future__ import annotations

import torch

from stip.server.engine import Engine, TokenEngine, TransformersEngine
from stip.server.serve_checks import ALIASES, ENGINES


def load_engine(kind: str, bundle, dtype: torch.dtype = torch.float32, device: str = "cpu",
                chunk_tokens: int | None = None, batching: bool = True, vllm_options: dict | None = None,
                **load_kw) -> Engine:
    """The engine `stip serve --engine KIND` runs.

    "transformers": our own engine on the stock transformers model. With `batching` (the default) concurrent sessions'
    steps merge into one forward per tick and long prefills are cut into `chunk_tokens` chunks (docs/batching.md);
    without it, or for a family the packed decoder does not cover, one forward per step in arrival order.
    "vllm": the bundle on vLLM (`stip.server.vllm_engine`, needs the `vllm` extra); `vllm_options` pass through.
    A server-decode bundle gives a `TokenEngine` (`stip.server.decoding` for "transformers").
    "serial" and "batched" are the older names of transformers without and with batching."""
    import logging

    from stip.errors import StipError

    if kind in ALIASES:
        kind, batching = ALIASES[kind]
    if kind not in ENGINES:
        raise StipError(f"unknown engine {kind!r}; expected one of {', '.join(ENGINES)}")
    log = logging.getLogger("stip.server")
    from stip.server.encoder import EncoderEngine, is_one_shot

    if is_one_shot(bundle):  # encoders and classifiers: one forward per request, no sessions
        if kind == "vllm":
            raise StipError("encoder and classifier bundles run on the transformers engine only (--engine "
                            "transformers)")
        log.info("engine transformers (one-shot): one forward per request")
        return EncoderEngine.from_bundle(bundle, dtype=dtype, device=device, **load_kw)
    if kind == "vllm":
        return load_vllm_engine(bundle, dtype=dtype, device=device, options=vllm_options or {}, **load_kw)
    chunk = None
    if batching:
        from stip.server.scheduler import DEFAULT_CHUNK_TOKENS

        chunk = DEFAULT_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
        if chunk < 1:
            raise StipError(f"the prefill chunk must be at least 1 token, got {chunk}")
    serial = TransformersEngine.from_bundle(bundle, dtype=dtype, device=device, **load_kw)
    if batching:
        from stip.server.batching import BatchedEngine
        from stip.server.decoder import FAMILIES
        from stip.server.scheduler import Scheduler

        if serial.model_type in FAMILIES:
            try:
                engine = Scheduler(BatchedEngine(serial.model, serial.manifest), chunk_tokens=chunk)
            except StipError as e:  # a variant the packed decoder refuses (e.g. length-dependent RoPE)
                log.warning("engine transformers: no batching for this model (%s); one forward per step", e)
            else:
                log.info("engine transformers (batched): continuous batching, prefill chunks of %d tokens", chunk)
                return _for_mode(engine, serial)
        else:
            log.warning("engine transformers: the batched decoder does not cover %r; one forward per step",
                        serial.model_type)
    log.info("engine transformers (serial): one forward per session step")
    return _for_mode(serial, serial)


def _for_mode(engine: Engine, serial: TransformersEngine) -> Engine | TokenEngine:
    """A server-decode bundle (manifest "mode") is served as a `TokenEngine` over the same engine."""
    if serial.manifest.get("mode", "round-trip") == "round-trip":
        return engine
    from stip.server.decoding import DecodingEngine

    return DecodingEngine(engine, serial.model)


def load_vllm_engine(bundle, dtype: torch.dtype = torch.float32, device: str = "cpu", options: dict | None = None,
                     trusted=None) -> Engine | TokenEngine:
    """The engine for `stip serve --engine vllm`: the bundle verified and vLLM's options settled
    (`stip.server.vllm_engine.open_vllm_bundle`), then vLLM started in the manifest's mode."""
    from stip.server.vllm_engine import VllmTokenEngine, open_vllm_bundle

    path, manifest, config, shapes, options, server_decode = open_vllm_bundle(bundle, device, options, trusted)
    if server_decode:
        return VllmTokenEngine(path, manifest, config, dtype, options)
    from stip.server.vllm_round_trip import VllmRoundTripEngine

    return VllmRoundTripEngine(path, manifest, config, shapes, dtype, options)
