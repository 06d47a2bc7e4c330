"""Server-decode mode on our own engine: token ids in, token ids out, sampled on the server (stip.common.generate).

A `stip protect --mode server-decode` bundle is a complete checkpoint whose embedding and LM-head rows are in the
secret vocabulary order, so the server can continue a sequence by itself: it embeds ids with the model's own input
embedding, runs them through the same engines as round-trip sessions (the `Scheduler` over the `BatchedEngine` for
continuous batching, or the serial engine), and samples in the permuted id space. Ids are opaque codes here: nothing
on the server knows the key. Sampling uses the same `Sampler` as the client: greedy picks the same tokens as a
round-trip run; a seeded random draw is reproducible, but it is not the round-trip run's draw (the same
probabilities in another order).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import torch

from stip.common.sampling import Sampler, SamplingParams
from stip.common.generate import GenerateChunk, GenerateRequest, TokenLogprobs
from stip.server.engine import Engine, TokenEngine


def _retrieve(f: asyncio.Future) -> None:
    """Mark a step's outcome as seen: a step whose generation was abandoned may fail (its state freed) unheard."""
    if not f.cancelled():
        f.exception()


class DecodingEngine(TokenEngine):
    """A `TokenEngine` over one of our round-trip engines (`Scheduler`, or the serial `TransformersEngine`)."""

    prompt_logprobs = True  # GenerateRequest.prompt_logprobs: the first step's every position is scored

    def __init__(self, engine: Engine, model):
        self.engine = engine
        self.embedding = model.get_input_embeddings()
        self.manifest = getattr(engine, "manifest", None) or {}
        self.model_type, self.vocab_size = engine.model_type, engine.vocab_size
        self.hidden_size, self.max_positions = engine.hidden_size, engine.max_positions
        self.kv_bytes_per_token, self.dtype = engine.kv_bytes_per_token, engine.dtype
        # A batching engine takes steps from any thread (and returns futures); a serial one needs a thread of its own.
        self._submit = getattr(engine, "submit", None)
        self._serial = None if self._submit else ThreadPoolExecutor(1, thread_name_prefix="stip-decode")
        self.running = 0  # generations in progress
        self.last_batch = 0  # generations that ran a step in the last scheduler tick (serial: 1)
        self._end_observers: list = []

    # ------------------------------------------------------------ steps

    def _embed(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.embedding(torch.tensor(ids, dtype=torch.long, device=self.embedding.weight.device))

    async def _step(self, state, ids: list[int], all_positions: bool = False) -> torch.Tensor:
        """Append `ids` to the sequence; the next token's logits [V] (float32, permuted order), or with
        `all_positions` every position's [len(ids), V]."""
        if self._submit is not None:
            # Shielded: a generation cancelled mid-step must not cancel the scheduler's future under a running tick
            # (the tick would fail to hand over its result); the step finishes and the state is freed after it.
            step = asyncio.wrap_future(self._submit(state, self._embed(ids), all_positions))
            step.add_done_callback(_retrieve)
            logits = await asyncio.shield(step)
        else:
            logits = await asyncio.get_running_loop().run_in_executor(
                self._serial, lambda: self.engine.prefill(state, self._embed(ids), all_positions))
        return logits if all_positions else logits[-1]

    def wrap(self, wrapper) -> None:
        """Run every step through `wrapper(engine)` (`stip serve --capture`: stip.server.capture), one step at a
        time through its `prefill`, as the serial engine runs them."""
        self.engine = wrapper(self.engine)
        self._submit = None
        self._serial = self._serial or ThreadPoolExecutor(1, thread_name_prefix="stip-decode")

    def add_end_observer(self, observe) -> None:
        """`observe(tokens)` with what each generation's KV cache held at its end (the engine's own count, after any
        step still in flight): the server's `stip_generation_kv_tokens` histogram."""
        self._end_observers.append(observe)

    def _ended(self, state) -> None:
        held = self.engine.length(state)
        for observe in self._end_observers:
            observe(held)

    def _free(self, state) -> None:
        if self._serial is not None:  # after the step in flight, if any, on the engine's thread
            def free():
                try:
                    self._ended(state)
                finally:
                    self.engine.free(state)
            self._serial.submit(free)
        else:
            self.engine.free(state, before=lambda: self._ended(state))  # the scheduler frees between ticks

    # ------------------------------------------------------------ generation

    async def generate(self, request: GenerateRequest, request_id: str = "", client: str = ""
                       ) -> AsyncIterator[GenerateChunk]:
        """One chunk per generated token; the last carries the finish reason and the counts. A stop id that ends the
        generation is sent too (as vLLM does). Closing the iterator early frees the sequence's KV cache."""
        r = request
        params = SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty,
                                seed=r.seed)
        sampler = Sampler(params, r.ids)
        stops = set(r.stop_ids)
        limit = self.max_positions or 0
        state = self.engine.new_state()
        self.running += 1
        try:
            prompt = None
            if r.prompt_logprobs is None:
                logits = await self._step(state, r.ids)
            else:  # every position's logits: each prompt token scored by the rows before it
                rows = await self._step(state, r.ids, all_positions=True)
                prompt = [None] + [self._logprobs(rows[p], r.ids[p + 1], r.prompt_logprobs)
                                   for p in range(len(r.ids) - 1)]
                logits = rows[-1]
            length, n = len(r.ids), 0
            while True:
                token = sampler.from_logits(logits)
                sampler.observe(token)
                n += 1
                length += 1
                finish = "stop" if token in stops else \
                    "length" if n >= r.max_tokens or (limit and length >= limit) else None
                chunk = GenerateChunk(ids=[token], logprobs=[self._logprobs(logits, token, r.logprobs)]
                                      if r.logprobs else None, prompt_logprobs=prompt, finish_reason=finish)
                prompt = None
                if finish:
                    chunk.prompt_tokens, chunk.completion_tokens = len(r.ids), n
                yield chunk
                if finish:
                    return
                logits = await self._step(state, [token])
        finally:
            self.running -= 1
            self._free(state)

    @staticmethod
    def _logprobs(logits: torch.Tensor, token: int, k: int) -> TokenLogprobs:
        """The model's own log-probabilities (before penalties and temperature), as OpenAI and vLLM report them."""
        lp = torch.log_softmax(logits.float(), -1)
        values, ids = torch.topk(lp, min(k, lp.numel()))
        return TokenLogprobs(logprob=float(lp[token]), top_ids=ids.tolist(), top_logprobs=values.tolist())

    # ------------------------------------------------------------ stats and lifecycle

    def stats(self) -> dict:
        inner = self.engine.stats() if hasattr(self.engine, "stats") else {}
        name = inner.get("engine") or ("transformers (batched)" if self._submit else "transformers (serial)")
        return {**inner, "engine": name, "mode": "server-decode",
                "batch_size": inner.get("batch_size", getattr(self.engine, "last_tick_rows", 1 if self.running else 0)),
                "queue": inner.get("queue", 0), "running": self.running}

    def close(self) -> None:
        if self._serial is not None:
            self._serial.shutdown(wait=False, cancel_futures=True)
        self.engine.close()
