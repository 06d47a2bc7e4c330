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
from pathlib import Path

import numpy as np

from stip.client.bundle import ClientBundle
from stip.client.constrained import Constraint, check_grammar, pick_constrained
from stip.client.errors import TaskError
from stip.client.head import check_placement
from stip.client.image_parts import check_vision, has_images, require_vision
from stip.common.arrays import to_numpy
from stip.common.tasks import ONE_SHOT_TASKS
from stip.client.logprobs import TokenLogprob, step_logprob
from stip.common.sampling import Sampler, SamplingParams
from stip.client.replay import MAX_REPLAYS, RECONNECT_SECONDS, Replays, embed_context
from stip.client.token_stream import Delta, Detokenizer, StopMatcher  # noqa: F401 - re-exported
from stip.client.types import Generation, GenerationStream, Timing  # noqa: F401 - re-exported
from stip.client.transport import StipConnectionError, StipServerError
from stip.common.signing import Trusted, check_pinned
from stip.errors import KeyMismatchError, StipError


def pick_token(bundle: ClientBundle, sampler: Sampler, r) -> int:
    """The next real token id from a step's reply: top-k pairs (k ids mapped through the key) or all logits."""
    if r.indices is not None:
        return sampler.from_topk(bundle.plain_ids(r.indices[-1]), r.values[-1])
    return sampler.from_logits(bundle.plain_logits(r.logits[-1]))


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
        check_placement(server_url, health.get("head"), self.bundle.head, self.bundle.path)
        self.connection.head = self.bundle.head  # --head client: sessions get hidden states, the head makes logits
        limits = [int(x) for x in (self.bundle.config.get("max_positions"), health.get("max_seq_len")) if x]
        self.max_positions = min(limits) if limits else 0  # the model's positions or the server's cap
        self.max_all_logits = int(health.get("max_all_logits") or 0)  # T x V one all-positions prefill may compute
        # A connection lost mid-generation is retried (same bundle only) for this long, then it is an error.
        self.reconnect_timeout = min(float(timeout), RECONNECT_SECONDS)
        self.max_replays = MAX_REPLAYS  # and at most this many times per generation (each re-sends the context)

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

    def embed(self, texts: list[str]):
        """Sentence embeddings [B, d] (a float32 numpy array) of a feature-extraction model, pooled (and normalized)
        as its sentence-transformers config says; mean pooling by default."""
        return self._text.embed(texts)

    def hidden_states(self, texts: list[str]):
        """(last hidden states [B, T, d], attention mask [B, T]; numpy) of a feature-extraction model, texts
        padded."""
        return self._text.hidden_states(texts)

    def classify(self, texts: list[str] | None = None, images: list | None = None,
                 top_k: int = 1) -> list[list[dict]]:
        """Per input, the top_k {"label", "score"} of a text- or image-classification model, best first."""
        if (texts is None) == (images is None):
            raise ValueError("pass texts= or images=, one of them")
        if images is not None:
            require_vision("image classification")  # the image processor and patch embedding: stip[vision]
            from stip.client.images import classify_images

            return classify_images(self.bundle, self.connection, images, top_k=top_k)
        return self._text.classify(texts, top_k=top_k)

    def fill_mask(self, text: str, top_k: int = 5) -> list[dict]:
        """The top_k fillers of the mask token in `text` ({"score", "token", "token_str", "sequence"})."""
        return self._text.fill_mask(text, top_k=top_k)

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
               ids=None) -> list[int]:
        """Prompt token ids from exactly one of: raw text, chat messages (chat template + generation prompt), ids."""
        if sum(x is not None for x in (prompt, messages, ids)) != 1:
            raise ValueError("pass exactly one of prompt=, messages= or ids=")
        if ids is not None:
            out = to_numpy(ids).astype(np.int64).reshape(-1).tolist()
        elif messages is not None:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            out = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            out = self.tokenizer(prompt)["input_ids"]
        if not out:
            raise ValueError("the prompt is empty")
        return list(out)

    def score(self, prompt: str | None = None, ids=None, top: int = 0, method: str | None = None
              ) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given those before it (None for the first) and the `top` most likely
        tokens there: OpenAI's echo + logprobs (`stip.client.scoring`; `method` "targets" or "logits")."""
        from stip.client.scoring import score

        return score(self, self.encode(prompt=prompt, ids=ids), top, method)

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None, ids=None,
                 images: list | None = None, **sampling) -> Generation:
        stream = self.stream(prompt=prompt, messages=messages, ids=ids, images=images, **sampling)
        for _ in stream:
            pass
        return stream.generation

    def stream(self, prompt: str | None = None, messages: list[dict] | None = None, ids=None,
               params: SamplingParams | None = None, images: list | None = None,
               image_features=None, **sampling) -> GenerationStream:
        """`images` (LLaVA-style models): one per image token in the prompt, or given as image content parts of
        `messages`; the client runs the vision tower and sends the image features in the secret basis.
        `image_features`: those of a prompt already expanded by `stip.client.vision.prepare` (one vision pass
        shared by several generations)."""
        if self.bundle.task in ONE_SHOT_TASKS:
            raise TaskError(f"client bundle {self.bundle.path} holds a {self.bundle.task} model, which does not "
                            f"generate text; use {ONE_SHOT_METHODS[self.bundle.task]}")
        params = params or SamplingParams(**sampling)
        features = image_features
        if features is not None or images or has_images(messages):
            check_vision(self.bundle)  # a model that takes images, in round-trip mode; stip[vision] installed
            from stip.client import vision
        if images or has_images(messages):
            if images and has_images(messages):
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
        if params.logit_bias and max(params.logit_bias) >= self.bundle.vocab_size:
            raise ValueError(f"logit_bias names token {max(params.logit_bias)}; the vocabulary has "
                             f"{self.bundle.vocab_size} tokens")
        if params.grammar is not None:
            check_grammar(self.bundle, params.grammar)
        prompt_ids = self.encode(prompt, messages, ids)
        if features is not None:
            vision.image_slots(self.bundle, prompt_ids, features)
        return GenerationStream(self._run(prompt_ids, params, features))

    # ------------------------------------------------------------------ the loop

    def _downlink(self, params: SamplingParams):
        """The downlink of this generation: all logits where a positive logit_bias may lift a token outside the k."""
        from stip.client.transport import Downlink

        if self.downlink.kind == "topk" and any(b > 0 for b in params.logit_bias.values()):
            return Downlink(kind="logits")
        return self.downlink

    def _run(self, prompt_ids: list[int], params: SamplingParams, features=None):
        bundle, dl = self.bundle, self._downlink(params)
        constraint = Constraint(bundle, params.grammar) if params.grammar is not None else None
        eos = set(bundle.eos_token_ids)
        tm, t_start = Timing(), time.perf_counter()
        sampler = Sampler(params, prompt_ids)
        detok = Detokenizer(self.tokenizer, prompt_ids) if bundle.has_tokenizer else None
        stops = StopMatcher(params.stop)
        out: list[int] = []
        logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        sent = 0  # logprobs already attached to a yielded delta
        finish, pos = "length", len(prompt_ids)
        if self.max_positions and pos > self.max_positions:
            raise StipError(f"the prompt has {pos} tokens; this model and server take at most {self.max_positions}")
        with contextlib.ExitStack() as stack:
            session = stack.enter_context(self.connection.open_session())
            replays = Replays(self, stack, features)
            c0 = time.perf_counter()
            noise = bundle.noise_chain()  # this context's noise; a replay re-creates the same rows
            x = embed_context(bundle, prompt_ids, features, noise)
            tm.client_ms += (time.perf_counter() - c0) * 1e3
            r = session.prefill(x, positions="last", downlink=dl)
            self._account(tm, r, decode=False)
            glimpse = self._glimpse(x, r)
            tm.prefill_ms = (time.perf_counter() - t_start) * 1e3
            while True:
                c0 = time.perf_counter()
                token, session, r = self._choose(sampler, r, constraint, session, replays, (prompt_ids, out), tm,
                                                 exact=logprobs is not None)
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
                finish = "stop" if constraint is not None and constraint.done else finish  # the JSON is complete
                last = finish == "stop" or len(out) >= params.max_tokens or \
                    bool(self.max_positions and pos >= self.max_positions)
                if last and detok is not None and not stops.stopped:
                    delta += stops.push(detok.flush())
                    if stops.stopped:
                        finish = "stop"
                    else:
                        delta += stops.flush()
                if not last:
                    x = bundle.embed(np.array([token], dtype=np.int64), start=pos, noise=noise)
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
                    # the context on a fresh session (bounded; the same noisy rows). The generation does not change.
                    session, r = replays.after_expiry(prompt_ids + out)
                except StipConnectionError as e:
                    # The server went away (crashed, restarted): replay the context on a fresh session of the same
                    # bundle once it is back, within a bounded time; otherwise the error says what happened.
                    session, r = replays.after_loss(prompt_ids + out, e)
                pos += 1
                self._account(tm, r, decode=True)
        tm.total_ms = (time.perf_counter() - t_start) * 1e3
        text = stops.text if detok is not None else ""
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(out),
                 "total_tokens": len(prompt_ids) + len(out)}
        return Generation(text, out, finish, usage, tm, prompt_ids, glimpse, logprobs)

    def _choose(self, sampler, r, constraint, session, replays, context, tm: Timing, exact: bool):
        """(token, session, reply): the next token, under the grammar if any; where the top-k reply holds no allowed
        token, the step is re-requested as all logits on a fresh session (`stip.client.constrained`)."""
        if constraint is None:
            return pick_token(self.bundle, sampler, r), session, r
        token = pick_constrained(self.bundle, sampler, r, constraint, exact=exact)
        if token is None:
            session.close()
            session, r = replays.full_logits(context[0] + context[1])
            self._account(tm, r, decode=False)
            tm.full_logits_steps += 1
            token = pick_constrained(self.bundle, sampler, r, constraint)
        constraint.consume(token)
        return token, session, r

    @staticmethod
    def _account(tm: Timing, r, decode: bool) -> None:
        tm.rtt_ms += r.rtt_ms
        tm.client_ms += r.head_ms  # --head client: the LM head's matmul is the client's compute
        tm.bytes_sent += r.bytes_sent
        tm.bytes_received += r.bytes_received
        reported = r.server_ms is not None  # the server's own time, only where its operator exposes it
        if reported:
            wire = max(0.0, r.rtt_ms - r.server_ms)
            tm.server_ms = (tm.server_ms or 0.0) + r.server_ms
            tm.wire_ms = (tm.wire_ms or 0.0) + wire
        if decode:
            tm.steps += 1
            tm.decode_client_ms += r.head_ms
            tm.decode_rtt_ms += r.rtt_ms
            if reported:
                tm.decode_server_ms = (tm.decode_server_ms or 0.0) + r.server_ms
                tm.decode_wire_ms = (tm.decode_wire_ms or 0.0) + wire
            tm.decode_bytes_sent += r.bytes_sent
            tm.decode_bytes_received += r.bytes_received

    def _glimpse(self, x, r) -> dict:
        if r.indices is not None:
            idx, vals = r.indices[-1, :5], r.values[-1, :5]
        else:
            idx = np.argsort(-r.logits[-1], kind="stable")[:5]
            vals = r.logits[-1][idx]
        return {"embedding": x[0, :6].tolist(), "permuted_top": idx.tolist(), "top_values": vals.tolist(),
                "real_top": self.bundle.plain_ids(idx).tolist()}
