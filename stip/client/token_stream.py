"""Text deltas from token ids: incremental detokenization (`Detokenizer`), stop strings (`StopMatcher`), and, where
the server (server-decode mode) or the enclave (TEE mode) samples, `TokenStream`: the client only detokenizes, ends
at EOS or a stop string, and hands out each delta with its logprobs."""

from __future__ import annotations

from stip.client.logprobs import TokenLogprob

_CONTEXT_TOKENS = 5  # prompt tokens decoded with each delta, so tokenizers that strip a leading space stay right


class Delta(str):
    """A streamed text delta; with `logprobs=` set, `.logprobs` holds the tokens that produced it (those whose text
    was held back, e.g. an incomplete character, arrive with a later delta or only in `Generation.logprobs`)."""

    logprobs: list[TokenLogprob] = []


class Detokenizer:
    """Incremental detokenization: each new token decodes only a short window, and a delta is released only once it
    no longer ends in an incomplete multi-byte character."""

    def __init__(self, tokenizer, context: list[int]):
        self.tok = tokenizer
        self.ids = list(context[-_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)
        self._before: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """What is held back, at the end: an incomplete character the generation ends in (max_tokens cut it between
        its bytes) stays held back for good rather than show as U+FFFD, as it is held back mid-stream."""
        return self._delta(final=True).rstrip("\ufffd")

    def _delta(self, final: bool) -> str:
        if self._before is None:  # the released window's text changes only when a delta is released
            self._before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(self._before) and (final or not now.endswith("\ufffd")):
            delta = now[len(self._before):]
            self.prefix, self.read, self._before = self.read, len(self.ids), None
            return delta
        return ""


class StopMatcher:
    """Holds back text that could begin a stop string; cuts the output before the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        if not self.stops:
            self.text += delta
            self.emitted = len(self.text)
            return delta
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            return self._release(len(self.text))
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out



class TokenStream:
    """Accumulates one generation's tokens; `push` takes one chunk and returns its text delta (a `Delta` carrying
    the new logprobs when they were asked for) and sets `finish` when the generation is over."""

    def __init__(self, tokenizer, prompt_ids: list[int], eos, stop: list[str] | None, logprobs: int | None):
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
        for (None: this chunk carries none); `finish_reason`: the sender's, used when neither EOS nor a stop string
        ended the generation first."""
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
