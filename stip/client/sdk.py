"""`stip.Client`: the data owner's SDK. Text in, text out; the server only ever sees permuted embeddings.

One generation = one server session: the client tokenizes, embeds (in the secret basis) and prefills the prompt,
then per token it picks the next id from what the server returned (top-k pairs or all logits, in permuted
vocabulary order, mapped back with the client key), embeds that token at its absolute position and sends it.

Per token the client does O(k) work on the top-k downlink (k ids mapped through the key, never a V-sized tensor),
one embedding row gather, and incremental detokenization of a few tokens.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from stip.client.bundle import ClientBundle
from stip.client.encoder import TaskError
from stip.common.tasks import ONE_SHOT_TASKS
from stip.client import vision
from stip.client.logprobs import TokenLogprob, step_logprob
from stip.common.sampling import Sampler, SamplingParams
from stip.client.transport import StipCertificateError, StipConnectionError, StipServerError
from stip.common.signing import Trusted, check_pinned
from stip.errors import KeyMismatchError, StipError

_CONTEXT_TOKENS = 5  # prompt tokens decoded with each delta, so tokenizers that strip a leading space stay right
RECONNECT_SECONDS = 30.0  # default bound on reconnecting to a server that went away mid-generation


@dataclass
class Timing:
    """Totals over a generation; the `*_per_token` figures are over decode steps (one round trip per token)."""

    prefill_ms: float = 0.0  # client-observed time to the first token, prompt embedding included
    total_ms: float = 0.0
    client_ms: float = 0.0  # client compute: embedding, un-permuting, sampling, detokenizing
    server_ms: float = 0.0  # server compute, as reported by the server
    wire_ms: float = 0.0  # round-trip time minus server compute: network, serialization
    bytes_sent: int = 0
    bytes_received: int = 0
    steps: int = 0  # decode round trips
    decode_client_ms: float = 0.0
    decode_server_ms: float = 0.0
    decode_wire_ms: float = 0.0
    decode_bytes_sent: int = 0
    decode_bytes_received: int = 0

    def _per(self, x: float) -> float:
        return x / self.steps if self.steps else 0.0

    @property
    def client_ms_per_token(self) -> float:
        return self._per(self.decode_client_ms)

    @property
    def server_ms_per_token(self) -> float:
        return self._per(self.decode_server_ms)

    @property
    def wire_ms_per_token(self) -> float:
        return self._per(self.decode_wire_ms)

    @property
    def bytes_sent_per_token(self) -> float:
        return self._per(self.decode_bytes_sent)

    @property
    def bytes_received_per_token(self) -> float:
        return self._per(self.decode_bytes_received)

    @property
    def tokens_per_s(self) -> float:
        n = self.steps + 1
        return n / (self.total_ms / 1e3) if self.total_ms else 0.0


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated ids (an EOS id that ended the generation included; its text is not)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    usage: dict
    timing: Timing
    prompt_ids: list[int] = field(default_factory=list)
    glimpse: dict = field(default_factory=dict)  # a few values of what the server saw and sent, for the demo
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when SamplingParams.logprobs is set


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
        return self._delta(final=True)

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


def pick_token(bundle: ClientBundle, sampler: Sampler, r) -> int:
    """The next real token id from a step's reply: top-k pairs (k ids mapped through the key) or all logits."""
    if r.indices is not None:
        return sampler.from_topk(bundle.plain_ids(r.indices[-1]), r.values[-1])
    return sampler.from_logits(bundle.plain_logits(r.logits[-1]))


class GenerationStream:
    """Iterate for text deltas as tokens arrive; `.generation` holds the result once the iteration has ended."""

    def __init__(self, it: Iterator[str]):
        self._it = it
        self.generation: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        self.generation = yield from self._it

    def text(self) -> str:
        return "".join(self)


ONE_SHOT_METHODS = {"feature-extraction": "Client.embed or Client.hidden_states",
                    "text-classification": "Client.classify", "image-classification": "Client.classify(images=...)",
                    "fill-mask": "Client.fill_mask"}


class Client:
    """`stip.Client(bundle_dir, server_url)`: generate text with a protected model served elsewhere."""

    def __init__(self, bundle: str | Path | ClientBundle, server_url: str, token: str | None = None,
                 downlink: str = "topk", k: int = 64, timeout: float = 60.0, trusted: Trusted = None,
                 ca_file: str | Path | None = None, insecure: bool = False):
        from stip.client.transport import Connection, Downlink

        if downlink not in ("topk", "logits"):
            raise ValueError(f"downlink must be 'topk' or 'logits', not {downlink!r}")
        self.bundle = bundle if isinstance(bundle, ClientBundle) else ClientBundle.load(bundle, trusted=trusted)
        if trusted is not None:  # a bundle loaded earlier must come from the pinned signer too
            check_pinned(self.bundle.signer, f"client bundle {self.bundle.path}", trusted)
        self.downlink = Downlink(kind=downlink, k=min(int(k), self.bundle.vocab_size))
        self.connection = Connection(server_url, token=token, timeout=timeout, ca_file=ca_file, insecure=insecure,
                                     bundle_id=self.bundle.bundle_id)  # the context a multi-bundle server routes to
        try:
            health = self.connection.info()  # GET /v1/info (needs the token): bundle id, signer, limits
        except StipServerError as e:
            if e.status != 404:
                raise
            raise KeyMismatchError(f"the server at {server_url} does not serve this client bundle ({self.bundle.path}, "
                                   f"bundle {self.bundle.bundle_id}): {e}") from None
        served = health.get("bundle_id")
        if served != self.bundle.bundle_id:
            raise KeyMismatchError(
                f"the server at {server_url} serves bundle {served}, but this client bundle ({self.bundle.path}) "
                f"belongs to bundle {self.bundle.bundle_id}: use the client bundle from the same `stip protect` run "
                f"as the server's bundle")
        if health.get("signer") != self.bundle.signer:  # the server's own claim: catches mix-ups, not a liar
            raise KeyMismatchError(
                f"the server at {server_url} serves a bundle signed by {health.get('signer') or 'an unknown key'}, "
                f"but this client bundle ({self.bundle.path}) is signed by {self.bundle.signer}: both bundles must "
                f"come from the same developer's `stip protect` run")
        served_mode = health.get("mode", "round-trip")
        if served_mode != self.bundle.mode:
            raise KeyMismatchError(f"the server at {server_url} runs in {served_mode} mode, but this client bundle "
                                   f"({self.bundle.path}) is a {self.bundle.mode} bundle")
        limits = [int(x) for x in (self.bundle.config.get("max_positions"), health.get("max_seq_len")) if x]
        self.max_positions = min(limits) if limits else 0  # the model's positions or the server's cap
        # A connection lost mid-generation is retried (same bundle only) for this long, then it is an error.
        self.reconnect_timeout = min(float(timeout), RECONNECT_SECONDS)

    @property
    def tokenizer(self):
        return self.bundle.tokenizer

    # ------------------------------------------------------------------ one-shot models (stip.client.encoder)

    @property
    def task(self) -> str:
        """The protected model's pipeline task: "text-generation", "feature-extraction", "text-classification",
        "fill-mask", "image-classification" or "image-text-to-text" (stip.common.tasks)."""
        return self.bundle.task

    @property
    def _text(self):
        from stip.client.encoder import TextEncoder

        if getattr(self, "_text_encoder", None) is None:
            self._text_encoder = TextEncoder(self.bundle, self.connection)
        return self._text_encoder

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Sentence embeddings [B, d] of a feature-extraction model, pooled (and normalized) as its
        sentence-transformers config says; mean pooling by default."""
        return self._text.embed(texts)

    def hidden_states(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states [B, T, d], attention mask [B, T]) of a feature-extraction model, texts padded."""
        return self._text.hidden_states(texts)

    def classify(self, texts: list[str] | None = None, images: list | None = None,
                 top_k: int = 1) -> list[list[dict]]:
        """Per input, the top_k {"label", "score"} of a text- or image-classification model, best first."""
        if (texts is None) == (images is None):
            raise ValueError("pass texts= or images=, one of them")
        if images is not None:
            from stip.client.images import classify_images

            return classify_images(self.bundle, self.connection, images, top_k=top_k)
        return self._text.classify(texts, top_k=top_k)

    def fill_mask(self, text: str, top_k: int = 5) -> list[dict]:
        """The top_k fillers of the mask token in `text` ({"score", "token", "token_str", "sequence"})."""
        return self._text.fill_mask(text, top_k=top_k)

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
               ids: list[int] | torch.Tensor | None = None) -> list[int]:
        """Prompt token ids from exactly one of: raw text, chat messages (chat template + generation prompt), ids."""
        if sum(x is not None for x in (prompt, messages, ids)) != 1:
            raise ValueError("pass exactly one of prompt=, messages= or ids=")
        if ids is not None:
            out = torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()
        elif messages is not None:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            out = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            out = self.tokenizer(prompt)["input_ids"]
        if not out:
            raise ValueError("the prompt is empty")
        return list(out)

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None, ids=None,
                 images: list | None = None, **sampling) -> Generation:
        stream = self.stream(prompt=prompt, messages=messages, ids=ids, images=images, **sampling)
        for _ in stream:
            pass
        return stream.generation

    def stream(self, prompt: str | None = None, messages: list[dict] | None = None, ids=None,
               params: SamplingParams | None = None, images: list | None = None,
               image_features: torch.Tensor | None = None, **sampling) -> GenerationStream:
        """`images` (LLaVA-style models): one per image token in the prompt, or given as image content parts of
        `messages`; the client runs the vision tower and sends the image features in the secret basis.
        `image_features`: those of a prompt already expanded by `stip.client.vision.prepare` (one vision pass
        shared by several generations)."""
        if self.bundle.task in ONE_SHOT_TASKS:
            raise TaskError(f"client bundle {self.bundle.path} holds a {self.bundle.task} model, which does not "
                            f"generate text; use {ONE_SHOT_METHODS[self.bundle.task]}")
        params = params or SamplingParams(**sampling)
        features = image_features
        if features is not None:
            vision.vision_tower(self.bundle)  # a model that takes images, in round-trip mode
        if images or vision.has_images(messages):
            if images and vision.has_images(messages):
                raise ValueError("pass images as content parts of messages or as images=, not both")
            messages, found = vision.extract_images(self.bundle, messages)
            vp = vision.prepare(self.bundle, self.encode(prompt, messages, ids), list(images or found))
            prompt, messages, ids, features = None, None, vp.ids, vp.features
        if self.bundle.mode == "server-decode":  # the server samples: one streamed request (no downlink)
            from stip.client import server_decode

            server_decode.check_params(params)
            return GenerationStream(server_decode.run(self, self.encode(prompt, messages, ids), params))
        if params.logprobs is not None and self.downlink.kind == "topk" and params.logprobs > self.downlink.k:
            raise ValueError(f"logprobs={params.logprobs} alternatives, but the top-k downlink carries only "
                             f"k={self.downlink.k} per token")
        prompt_ids = self.encode(prompt, messages, ids)
        if features is not None:
            vision.image_slots(self.bundle, prompt_ids, features)
        return GenerationStream(self._run(prompt_ids, params, features))

    # ------------------------------------------------------------------ the loop

    def _run(self, prompt_ids: list[int], params: SamplingParams, features: torch.Tensor | None = None):
        bundle, dl = self.bundle, self.downlink
        eos = set(bundle.eos_token_ids)
        tm = Timing()
        t_start = time.perf_counter()
        sampler = Sampler(params, prompt_ids)
        decode_text = bundle.has_tokenizer
        detok = Detokenizer(self.tokenizer, prompt_ids) if decode_text else None
        stops = StopMatcher(params.stop)
        out: list[int] = []
        logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        sent = 0  # logprobs already attached to a yielded delta
        finish = "length"
        pos = len(prompt_ids)
        if self.max_positions and pos > self.max_positions:
            raise StipError(f"the prompt has {pos} tokens; this model and server take at most {self.max_positions}")
        with contextlib.ExitStack() as stack:
            session = stack.enter_context(self.connection.open_session())
            c0 = time.perf_counter()
            x = self._embed_context(prompt_ids, features)
            tm.client_ms += (time.perf_counter() - c0) * 1e3
            r = session.prefill(x, positions="last", downlink=dl)
            self._account(tm, r, decode=False)
            glimpse = self._glimpse(x, r)
            tm.prefill_ms = (time.perf_counter() - t_start) * 1e3
            while True:
                c0 = time.perf_counter()
                token = pick_token(bundle, sampler, r)
                out.append(token)
                if logprobs is not None:
                    logprobs.append(step_logprob(bundle, r, token, params.logprobs))
                sampler.observe(token)
                delta = ""
                if token in eos:
                    finish = "stop"
                elif detok is not None:
                    delta = stops.push(detok.push(token))
                    if stops.stopped:
                        finish = "stop"
                last = finish == "stop" or len(out) >= params.max_tokens or \
                    bool(self.max_positions and pos >= self.max_positions)
                if last and detok is not None and not stops.stopped:
                    delta += stops.push(detok.flush())
                    if stops.stopped:
                        finish = "stop"
                    else:
                        delta += stops.flush()
                if not last:
                    x = bundle.embed(torch.tensor([token]), start=pos)
                dt = (time.perf_counter() - c0) * 1e3
                tm.client_ms += dt
                if delta and logprobs is not None:
                    delta = Delta(delta)
                    delta.logprobs, sent = logprobs[sent:], len(logprobs)
                if delta:
                    yield delta
                if last:
                    break
                tm.decode_client_ms += dt
                try:
                    r = session.decode(x, downlink=dl)
                except StipServerError as e:
                    if e.status != 404:
                        raise
                    # The server expired the session (idle past its TTL, e.g. a slow reader of the stream): replay
                    # the context on a fresh session. The logits are the same, so the generation does not change.
                    session, r = self._resume(stack, prompt_ids + out, features)
                except StipConnectionError as e:
                    # The server went away (crashed, restarted): replay the context on a fresh session of the same
                    # bundle once it is back, within a bounded time; otherwise the error says what happened.
                    session, r = self._replay(stack, prompt_ids + out, e, features)
                pos += 1
                self._account(tm, r, decode=True)
        tm.total_ms = (time.perf_counter() - t_start) * 1e3
        text = stops.text if detok is not None else ""
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(out),
                 "total_tokens": len(prompt_ids) + len(out)}
        return Generation(text, out, finish, usage, tm, prompt_ids, glimpse, logprobs)

    def _embed_context(self, ids: list[int], features: torch.Tensor | None) -> torch.Tensor:
        """The context from position 0, in the secret basis; image features (LLaVA) at the prompt's image tokens."""
        if features is None:
            return self.bundle.embed(torch.tensor(ids), start=0)
        return vision.embed(self.bundle, ids, features)

    def _resume(self, stack: contextlib.ExitStack, context: list[int], features: torch.Tensor | None = None):
        """(session, reply): a fresh session prefilled with the whole context; its logits are those of the step that
        was lost, so the generation continues unchanged."""
        session = stack.enter_context(self.connection.open_session())
        x = self._embed_context(context, features)
        return session, session.prefill(x, positions="last", downlink=self.downlink)

    def _replay(self, stack: contextlib.ExitStack, context: list[int], lost: StipConnectionError,
                features: torch.Tensor | None = None):
        """(session, reply) from a fresh session prefilled with `context`, once the server answers again with the
        same bundle; StipConnectionError naming the loss after `reconnect_timeout` seconds. The reply's logits are
        those of the decode step that was lost, so the generation continues unchanged."""
        url = self.connection.url
        deadline = time.monotonic() + self.reconnect_timeout
        tries, delay, last = 0, 0.1, lost
        while tries == 0 or time.monotonic() < deadline:
            tries += 1
            try:
                served = self.connection.info().get("bundle_id")
                if served != self.bundle.bundle_id:
                    raise KeyMismatchError(f"the connection to {url} dropped mid-generation and the server came back "
                                           f"with bundle {served}, not {self.bundle.bundle_id}: not replaying")
                return self._resume(stack, context, features)
            except StipCertificateError:
                raise
            except StipConnectionError as e:
                last = e
            except StipServerError as e:
                if e.status < 500 and e.status not in (404, 409, 429):
                    raise
                last = e
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
        raise StipConnectionError(f"lost the connection to {url} after {len(context)} tokens of context and could "
                                  f"not resume within {self.reconnect_timeout:.0f} s ({tries} tries): {last}") from None

    @staticmethod
    def _account(tm: Timing, r, decode: bool) -> None:
        wire = max(0.0, r.rtt_ms - r.server_ms)
        tm.server_ms += r.server_ms
        tm.wire_ms += wire
        tm.bytes_sent += r.bytes_sent
        tm.bytes_received += r.bytes_received
        if decode:
            tm.steps += 1
            tm.decode_server_ms += r.server_ms
            tm.decode_wire_ms += wire
            tm.decode_bytes_sent += r.bytes_sent
            tm.decode_bytes_received += r.bytes_received

    def _glimpse(self, x: torch.Tensor, r) -> dict:
        if r.indices is not None:
            idx, vals = r.indices[-1, :5], r.values[-1, :5]
        else:
            vals, idx = torch.topk(r.logits[-1], 5)
        return {"embedding": x[0, :6].tolist(), "permuted_top": idx.tolist(), "top_values": vals.tolist(),
                "real_top": self.bundle.plain_ids(idx).tolist()}
