"""Text deltas from token ids chosen elsewhere: the server (server-decode mode) or the enclave (TEE mode) samples,
and the client only detokenizes, ends at EOS or a stop string, and hands out each delta with its logprobs."""

from __future__ import annotations

from stip.client.logprobs import TokenLogprob


class TokenStream:
    """Accumulates one generation's tokens; `push` takes one chunk and returns its text delta (a `Delta` carrying
    the new logprobs when they were asked for) and sets `finish` when the generation is over."""

    def __init__(self, tokenizer, prompt_ids: list[int], eos, stop: list[str] | None, logprobs: int | None):
        from stip.client.sdk import Detokenizer, StopMatcher

        self.eos = set(eos)
        self.detok = Detokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self.stops = StopMatcher(stop or [])
        self.out: list[int] = []
        self.top = logprobs
        self.logprobs: list[TokenLogprob] | None = None if logprobs is None else []
        self.finish: str | None = None
        self._sent = 0

    def push(self, tokens: list[int], entries: list | None, finish_reason: str | None) -> str:
        """`tokens`: plain ids; `entries`: per token (logprob, [(plain id, logprob), ...]) when logprobs were asked
        for (None: this chunk carries none); `finish_reason`: the sender's, used when neither EOS nor a stop string ended the generation first."""
        from stip.client.sdk import Delta

        delta = ""
        for j, token in enumerate(tokens):
            self.out.append(token)
            if self.logprobs is not None and entries is not None:
                logprob, top = entries[j]
                self.logprobs.append(TokenLogprob(token, logprob, list(top)[:self.top]))
            if token in self.eos:
                self.finish = "stop"
                break
            if self.detok is not None:
                delta += self.stops.push(self.detok.push(token))
                if self.stops.stopped:
                    self.finish = "stop"
                    break
        if self.finish is None and finish_reason is not None:
            self.finish = finish_reason
        if self.finish is not None and self.detok is not None and not self.stops.stopped:
            delta += self.stops.push(self.detok.flush())
            if self.stops.stopped:
                self.finish = "stop"
            else:
                delta += self.stops.flush()
        if delta and self.logprobs is not None:
            delta = Delta(delta)
            delta.logprobs, self._sent = self.logprobs[self._sent:], len(self.logprobs)
        return delta
