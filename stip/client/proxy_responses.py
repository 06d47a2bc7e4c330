"""OpenAI response bodies from STIP generations: chat completions and legacy completions, whole or as SSE chunks,
with logprobs in each endpoint's own format.

A token is shown as its text, with its exact bytes (byte-level BPE tokenizers: a token may hold part of a UTF-8
character, shown as U+FFFD in `token` but exact in `bytes`); a bundle without a tokenizer shows `token_id:ID`, as
vLLM does. The token that ended a generation (EOS) is not listed, as OpenAI does not list it.
"""

from __future__ import annotations

import json

from stip.client.logprobs import TokenLogprob


def bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's byte -> printable character map (GPT-2's, as transformers and tokenizers' ByteLevel use):
    printable Latin-1 bytes stand for themselves, the others for the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


class TokenText:
    """Token id -> (text, bytes), cached."""

    def __init__(self, bundle):
        self.tok = bundle.tokenizer if bundle.has_tokenizer else None
        self.byte_decoder = None
        self.cache: dict[int, tuple[str, list[int] | None]] = {}
        if self.tok is not None:
            try:
                decoder = json.loads(self.tok.backend_tokenizer.to_str()).get("decoder") or {}
            except Exception:  # a slow (Python) tokenizer: no backend
                decoder = {}
            if decoder.get("type") == "ByteLevel":
                self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
            self.special = set(self.tok.all_special_ids)

    def __call__(self, token_id: int) -> tuple[str, list[int] | None]:
        out = self.cache.get(token_id)
        if out is None:
            out = self.cache[token_id] = self._compute(token_id)
        return out

    def _compute(self, token_id: int) -> tuple[str, list[int] | None]:
        if self.tok is None:
            return f"token_id:{token_id}", None
        piece = self.tok.convert_ids_to_tokens(token_id)
        if self.byte_decoder is not None and token_id not in self.special and isinstance(piece, str) \
                and all(c in self.byte_decoder for c in piece):
            raw = bytes(self.byte_decoder[c] for c in piece)
        else:
            raw = self.tok.decode([token_id], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False).encode()
        return raw.decode("utf-8", errors="replace"), list(raw)


def reported(lps: list[TokenLogprob] | None, eos: set[int]) -> list[TokenLogprob]:
    """The logprobs OpenAI would list: all but an EOS (only ever the last token: it ends the generation)."""
    return [lp for lp in lps or () if lp.token_id not in eos]


def usage(gens: list, n: int = 0) -> dict:
    """Summed over the choices; each prompt's tokens counted once (choice i*n + j is prompt i's j-th; n=0: one
    prompt for all)."""
    prompt = sum(g.usage["prompt_tokens"] for g in gens[::n or len(gens)])
    completion = sum(g.usage["completion_tokens"] for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ChatFormat:
    """`chat.completion` and `chat.completion.chunk` bodies."""

    def __init__(self, base: dict, text: TokenText, top: int | None):
        self.base, self.text, self.top = base, text, top

    def _entry(self, token_id: int, logprob: float) -> dict:
        token, raw = self.text(token_id)
        return {"token": token, "logprob": logprob, "bytes": raw}

    def logprobs(self, lps: list[TokenLogprob]) -> dict | None:
        if self.top is None:
            return None
        return {"content": [{**self._entry(lp.token_id, lp.logprob),
                             "top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in lps],
                "refusal": None}

    def full(self, gens: list, eos: set[int]) -> dict:
        return {**self.base, "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": g.text, "refusal": None},
                             "finish_reason": g.finish_reason, "logprobs": self.logprobs(reported(g.logprobs, eos))}
                            for i, g in enumerate(gens)],
                "usage": usage(gens)}

    def chunk(self, i: int, delta: dict, finish=None, lps: list[TokenLogprob] | None = None) -> dict:
        return {**self.base, "object": "chat.completion.chunk",
                "choices": [{"index": i, "delta": delta, "finish_reason": finish,
                             "logprobs": self.logprobs(lps) if lps else None}]}

    def first(self, i: int) -> dict | None:
        return self.chunk(i, {"role": "assistant", "content": ""})

    def piece(self, i: int, text: str, lps: list[TokenLogprob]) -> dict:
        return self.chunk(i, {"content": text}, lps=lps)

    def last(self, i: int, finish: str, lps: list[TokenLogprob]) -> dict:
        return self.chunk(i, {}, finish, lps)

    def usage_chunk(self, gens: list) -> dict:
        return {**self.base, "object": "chat.completion.chunk", "choices": [], "usage": usage(gens)}


class CompletionFormat:
    """`text_completion` bodies (whole and streamed), logprobs in the legacy format. `echo`: per prompt, the text
    its choices start with; `n`: choices per prompt (choice i*n + j is prompt i's j-th)."""

    def __init__(self, base: dict, text: TokenText, top: int | None, echo: list[str], n: int = 1,
                 prompt_logprobs: list | None = None):
        """`prompt_logprobs` (echo with logprobs): per prompt, (its token ids, `Client.score` of them)."""
        self.base, self.text, self.top, self.echoes, self.n = base, text, top, echo, n
        self.prompt_logprobs = prompt_logprobs
        self.offsets: dict[int, int] = {}  # per streamed choice: where its next token's text starts

    def _prompt_part(self, i: int) -> dict:
        """The echoed prompt's tokens, from offset 0: the first has no logprob (null, as OpenAI and vLLM send)."""
        ids, scores = self.prompt_logprobs[i // self.n]
        tokens, offsets, offset = [], [], 0
        for t in ids:
            tokens.append(self.text(t)[0])
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for lp in scores],
                "top_logprobs": [None if lp is None else {self.text(t)[0]: v for t, v in lp.top} for lp in scores],
                "text_offset": offsets}

    def logprobs(self, lps: list[TokenLogprob], offset: int, i: int | None = None) -> dict | None:
        """`offset`: where the first token's text starts in the choice's text; `i`: the choice, whose echoed
        prompt's logprobs come first (where asked for)."""
        if self.top is None:
            return None
        tokens, offsets = [], []
        for lp in lps:
            token = self.text(lp.token_id)[0]
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
        out = {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
               "top_logprobs": [{self.text(t)[0]: v for t, v in lp.top} for lp in lps], "text_offset": offsets}
        if i is None or self.prompt_logprobs is None:
            return out
        head = self._prompt_part(i)
        return {name: head[name] + out[name] for name in out}

    def echo(self, i: int) -> str:
        return self.echoes[i // self.n]

    def full(self, gens: list, eos: set[int]) -> dict:
        return {**self.base, "choices": [{"index": i, "text": self.echo(i) + g.text, "finish_reason": g.finish_reason,
                                          "logprobs": self.logprobs(reported(g.logprobs, eos), len(self.echo(i)),
                                                                    i)}
                                         for i, g in enumerate(gens)],
                "usage": usage(gens, self.n)}

    def chunk(self, i: int, text: str, finish=None, lps: dict | None = None) -> dict:
        return {**self.base, "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": lps}]}

    def first(self, i: int) -> dict | None:
        return self.chunk(i, self.echo(i)) if self.echo(i) else None

    def _streamed(self, i: int, lps: list[TokenLogprob]) -> dict | None:
        if not lps:
            return None
        out = self.logprobs(lps, self.offsets.get(i, len(self.echo(i))))
        if out is not None:
            self.offsets[i] = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def piece(self, i: int, text: str, lps: list[TokenLogprob]) -> dict:
        return self.chunk(i, text, lps=self._streamed(i, lps))

    def last(self, i: int, finish: str, lps: list[TokenLogprob]) -> dict:
        return self.chunk(i, "", finish, self._streamed(i, lps))

    def usage_chunk(self, gens: list) -> dict:
        return {**self.base, "choices": [], "usage": usage(gens, self.n)}
