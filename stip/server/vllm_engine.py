"""`stip serve --engine vllm`: a protected bundle served by vLLM, in either bundle mode.

- server-decode (`stip protect --mode server-decode`): the bundle is a complete standard checkpoint in the permuted
  vocabulary, so stock vLLM runs it as it is, token ids in and out (no tokenizer). `VllmTokenEngine` streams
  vLLM's output as `GenerateChunk`s.
- round-trip: `stip.server.vllm_round_trip` re-submits each session's embeddings for one token a step, and returns
  `TopK` rows (the top-k raw logits and the row's log-sum-exp), never all V logits.

Both modes share `stip.server.vllm_base` (vLLM's loop thread, its scheduler counts, the prefix-cache salts per API
key), `stip.server.vllm_options` (--vllm-arg, vLLM's engine arguments) and `stip.server.vllm_bundle` (the bundle
verified before vLLM sees any file; `open_vllm_bundle`). Installing vLLM: docs/scale.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import torch

from stip.common.generate import GenerateChunk, GenerateRequest, TokenLogprobs
from stip.server.engine import TokenEngine
from stip.server.vllm_base import _VllmBase
from stip.server.vllm_bundle import open_vllm_bundle  # noqa: F401 - re-exported for stip.server.engines
from stip.server.vllm_options import parse_vllm_arg  # noqa: F401 - re-exported for stip.cli


class VllmTokenEngine(_VllmBase, TokenEngine):
    """Server-decode on vLLM: the bundle as it is, token ids in and out (stip.common.generate)."""

    mode = "server-decode"

    def __init__(self, bundle: Path, manifest: dict, config, dtype: torch.dtype, options: dict):
        self._start(bundle, manifest, config, bundle, dtype, options, {})
        self._end_observers: list = []

    def add_end_observer(self, observe) -> None:
        """`observe(tokens)` with what each generation's KV held at its end, counted from vLLM's own output (the
        prompt and every generated token but the last, which is sampled, not run): the server's
        `stip_generation_kv_tokens` histogram, as on our engine (`stip.server.decoding`)."""
        self._end_observers.append(observe)

    def sampling_params(self, request: GenerateRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # ignore_eos: the request's stop_ids are the whole stop list, as on our own engine. Otherwise vLLM would add
        # generation_config.json's EOS, and an empty stop_ids would still stop there on vLLM alone.
        return SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                              ignore_eos=True,
                              top_k=request.top_k, seed=request.seed, presence_penalty=request.presence_penalty,
                              frequency_penalty=request.frequency_penalty, stop_token_ids=list(request.stop_ids),
                              logprobs=request.logprobs or None, detokenize=False, skip_special_tokens=False,
                              output_kind=RequestOutputKind.DELTA)

    async def generate(self, request: GenerateRequest, request_id: str, client: str = ""):
        """vLLM's stream, relayed from its loop to the caller's; closing this iterator aborts the request. vLLM runs
        at most `request.max_tokens` new tokens (the route cut it to the KV reservation), and never past its own
        max_model_len. `client` (the API key's name) picks the request's prefix-cache salt (`CacheSalts`)."""
        from vllm.inputs import TokensPrompt

        if len(request.ids) + request.max_tokens > self.max_positions:
            request = request.model_copy(update={"max_tokens": max(1, self.max_positions - len(request.ids))})
        params = self.sampling_params(request)
        prompt = TokensPrompt(prompt_token_ids=list(request.ids), cache_salt=self.salts.for_client(client))
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump():
            try:
                first = True
                async for out in self._vllm.llm.generate(prompt, params, request_id):
                    if first:
                        self._cached(out)
                        first = False
                    caller.call_soon_threadsafe(queue.put_nowait, out)
                caller.call_soon_threadsafe(queue.put_nowait, end)
            except BaseException as e:  # noqa: BLE001 - handed to the caller (cancelled: vLLM aborted it)
                caller.call_soon_threadsafe(queue.put_nowait, e)

        self._count(1)
        task = self._vllm.submit(pump())
        completion = 0
        try:
            while True:
                item = await queue.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                out = item.outputs[0]
                ids = [int(t) for t in out.token_ids]
                completion += len(ids)
                done = out.finish_reason in ("stop", "length")
                yield GenerateChunk(ids=ids, logprobs=_logprobs(ids, out.logprobs, request.logprobs),
                                    finish_reason=out.finish_reason if done else None,
                                    prompt_tokens=len(request.ids) if done else None,
                                    completion_tokens=completion if done else None)
                if done:
                    return
        finally:
            self._count(-1)
            held = len(request.ids) + max(0, completion - 1)
            for observe in self._end_observers:
                observe(held)
            if not task.done():
                task.cancel()  # vLLM aborts a request whose generator is cancelled ...
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(self._vllm.submit(self._vllm.llm.abort(request_id)))  # ... and so do we


def _logprobs(ids: list[int], logprobs, k: int) -> list[TokenLogprobs] | None:
    """vLLM's per-token dicts {id: Logprob(logprob, rank)} -> the chosen token's log-probability and the top k."""
    if not k or logprobs is None:
        return None
    out = []
    for tok, d in zip(ids, logprobs):
        top = sorted((lp.rank, i, lp.logprob) for i, lp in d.items() if lp.rank is not None and lp.rank <= k)
        out.append(TokenLogprobs(logprob=float(d[tok].logprob), top_ids=[int(i) for _, i, _ in top[:k]],
                                 top_logprobs=[float(v) for _, _, v in top[:k]]))
    return out
