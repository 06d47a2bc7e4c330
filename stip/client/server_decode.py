"""The client's server-decode path: map ids to the server's permuted vocabulary, stream POST /v1/generate, map back.

In server-decode mode (`stip protect --mode server-decode`) the server samples by itself, so a generation is one HTTP
request (stip.common.generate): the prompt and the EOS ids go out as server ids (`ClientBundle.server_ids`), tokens
and their log-probabilities come back as server ids and are mapped back (`ClientBundle.plain_ids`). Stop strings
need text, so they are matched here, and a match ends the stream (closing it aborts the generation on the server).
Nothing from the server is trusted: every line must be a well-formed chunk with ids in range.

Uses the round-trip transport's URL, token and clear-text rule (`stip.client.transport.Connection`), and its HTTP
stack (`stip.client.http`: TLS, no redirects, every line capped).
"""

from __future__ import annotations

import json
import time

from pydantic import ValidationError

from stip.common.sampling import SamplingParams
from stip.client.errors import StipProtocolError, StipServerError, clip, is_int
from stip.common.generate import GENERATE_PATH, GenerateChunk, GenerateRequest
from stip.errors import StipError

MAX_LINE_BYTES = 1 << 20  # one chunk line: a token and at most 20 alternatives is far less


def check_params(params: SamplingParams) -> None:
    """Refuse, before anything is sent, what only client-side sampling supports."""
    if params.repetition_penalty != 1.0:
        raise ValueError("repetition_penalty is not supported in server-decode mode (the server samples); use "
                         "presence_penalty / frequency_penalty")
    if params.logit_bias or params.grammar:
        raise ValueError("logit_bias and structured output are not supported in server-decode mode (the server "
                         "samples, in its permuted vocabulary); use a round-trip bundle")


def build_request(bundle, prompt_ids: list[int], params: SamplingParams, max_tokens: int) -> GenerateRequest:
    """The wire request: every id mapped to the server's vocabulary."""
    check_params(params)
    return GenerateRequest(
        ids=bundle.server_ids(prompt_ids).tolist(), max_tokens=max_tokens,
        stop_ids=bundle.server_ids(bundle.eos_token_ids).tolist() if bundle.eos_token_ids else [],
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty, seed=params.seed,
        # logprobs=0 still wants each token's own logprob, which the server sends with its top alternatives
        logprobs=0 if params.logprobs is None else max(1, params.logprobs))


class GenerateStream:
    """One streaming POST /v1/generate; iterate for validated `GenerateChunk`s; `close()` ends it early."""

    def __init__(self, connection, request: GenerateRequest, vocab_size: int):
        self.conn, self.vocab_size = connection, vocab_size
        body = request.model_dump_json().encode()
        self.bytes_sent, self.bytes_received = len(body), 0
        self._response = connection.http.open_stream("POST", GENERATE_PATH, content=body,
                                                     headers={**connection._headers(),
                                                              "Content-Type": "application/json"})

    def __iter__(self):
        for line in self.conn.http.iter_lines(self._response, GENERATE_PATH, MAX_LINE_BYTES):
            self.bytes_received += len(line) + 1
            if line.strip():
                yield self._chunk(line)

    def _chunk(self, line: bytes) -> GenerateChunk:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise StipProtocolError(f"{GENERATE_PATH} sent a line that is not JSON") from None
        if isinstance(obj, dict) and "error" in obj:
            status = obj.get("status")
            raise StipServerError(f"server error during the generation: {clip(obj.get('error'), 2000)}",
                                  status if is_int(status) and 400 <= status < 600 else 500)
        try:
            chunk = GenerateChunk.model_validate(obj)
        except ValidationError as e:
            raise StipProtocolError(f"{GENERATE_PATH} sent a malformed chunk: {e.errors()[0].get('msg')}") from None
        ids = list(chunk.ids) + [i for lp in (chunk.logprobs or []) + (chunk.prompt_logprobs or []) if lp
                                 for i in lp.top_ids]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise StipProtocolError(f"{GENERATE_PATH} sent a token id outside [0, {self.vocab_size})")
        if chunk.logprobs is not None and len(chunk.logprobs) != len(chunk.ids):
            raise StipProtocolError(f"{GENERATE_PATH} sent {len(chunk.logprobs)} logprobs for {len(chunk.ids)} ids")
        return chunk

    def close(self) -> None:
        self._response.close()


def run(client, prompt_ids: list[int], params: SamplingParams):
    """The generator behind `stip.Client.stream` for a server-decode bundle: text deltas, then a `Generation`."""
    from stip.client.types import Generation, Timing
    from stip.client.token_stream import TokenStream

    bundle = client.bundle
    eos = set(bundle.eos_token_ids)
    tm = Timing()
    t_start = time.perf_counter()
    pos = len(prompt_ids)
    if client.max_positions and pos >= client.max_positions:
        raise StipError(f"the prompt has {pos} tokens; this model and server take at most {client.max_positions} "
                        f"(prompt and output together)")
    room = params.max_tokens if not client.max_positions else min(params.max_tokens, client.max_positions - pos)
    request = build_request(bundle, prompt_ids, params, room)
    ts = TokenStream(client.tokenizer if bundle.has_tokenizer else None, prompt_ids, eos, params.stop,
                     params.logprobs)
    stream = GenerateStream(client.connection, request, bundle.vocab_size)
    try:
        for chunk in stream:
            c0 = time.perf_counter()
            if not tm.prefill_ms:
                tm.prefill_ms = (c0 - t_start) * 1e3
            tokens = bundle.plain_ids(chunk.ids).tolist() if chunk.ids else []
            entries = None
            if ts.logprobs is not None and tokens:
                if len(chunk.logprobs or ()) < len(tokens):
                    raise StipProtocolError(f"{GENERATE_PATH} sent no logprobs, though they were asked for")
                entries = [(lp.logprob, zip(bundle.plain_ids(lp.top_ids).tolist() if lp.top_ids else [],
                                             lp.top_logprobs)) for lp in chunk.logprobs]
            delta = ts.push(tokens, entries, chunk.finish_reason)
            tm.client_ms += (time.perf_counter() - c0) * 1e3
            if delta:
                yield delta
            if ts.finish is not None:
                break
    finally:
        stream.close()  # ends the generation on the server if it was still running (a stop string matched)
    out, finish = ts.out, ts.finish
    if finish is None:
        raise StipProtocolError(f"{GENERATE_PATH} ended without a finish reason after {len(out)} tokens")
    tm.total_ms = (time.perf_counter() - t_start) * 1e3
    tm.steps = max(0, len(out) - 1)
    tm.bytes_sent, tm.bytes_received = stream.bytes_sent, stream.bytes_received
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(out),
             "total_tokens": len(prompt_ids) + len(out)}
    text = ts.stops.text if ts.detok is not None else ""
    return Generation(text, out, finish, usage, tm, prompt_ids, {}, ts.logprobs)


def score(client, ids: list[int], top: int = 0) -> list:
    """`Client.score` on a server-decode bundle: one POST /v1/generate with `prompt_logprobs` (the server scores
    every prompt position in one prefill and generates one token, which is dropped); ids mapped both ways. Per
    prompt token: None for the first, then a `TokenLogprob` (its logprob, the `top` most likely tokens)."""
    from stip.client.logprobs import TokenLogprob

    bundle = client.bundle
    if client.max_positions and len(ids) >= client.max_positions:
        raise StipError(f"the prompt has {len(ids)} tokens; this model and server score at most "
                        f"{client.max_positions - 1} in server-decode mode (one position is left to generate)")
    request = GenerateRequest(ids=bundle.server_ids(ids).tolist(), max_tokens=1, prompt_logprobs=top)
    stream = GenerateStream(client.connection, request, bundle.vocab_size)
    try:
        first = next(iter(stream), None)
    finally:
        stream.close()
    got = None if first is None else first.prompt_logprobs
    if got is None or len(got) != len(ids) or got[0] is not None or any(lp is None for lp in got[1:]):
        raise StipProtocolError(f"{GENERATE_PATH} sent no prompt log-probabilities for the {len(ids)} prompt tokens "
                                f"asked (or a wrong number of them)")
    out: list = [None]
    for t, lp in zip(ids[1:], got[1:]):
        if len(lp.top_ids) != len(lp.top_logprobs) or len(lp.top_ids) > top:
            raise StipProtocolError(f"{GENERATE_PATH} sent {len(lp.top_ids)} alternatives where {top} were asked")
        alternatives = bundle.plain_ids(lp.top_ids).tolist() if lp.top_ids else []
        out.append(TokenLogprob(int(t), float(lp.logprob), list(zip(alternatives, lp.top_logprobs))))
    return out
