"""Constrained decoding on the client (JSON mode, JSON schema, function calls) with llguidance, after un-permuting.

The server never learns that output is constrained: the client masks the logits it already holds in plain vocabulary
order. On the logits downlink the mask is exact. On the top-k downlink the client sees only the server's k best
tokens; it draws among those the grammar allows, and when none of the k is allowed (and more than one token is) it
asks for that step's full logits by replaying the context on a fresh session with the logits downlink (the same noisy
rows as before: `stip.client.replay`), then goes on with top-k. `Timing.full_logits_steps` counts those re-requests.
A step where the grammar allows a single token takes it without asking (unless its logprob is wanted).
"""

from __future__ import annotations

import json
import threading
import weakref

import numpy as np

from stip.common.arrays import to_numpy

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # bundle -> LLTokenizer (~1 s to build)
_LOCK = threading.Lock()


def ll_tokenizer(bundle):
    """The bundle's tokenizer as llguidance takes it, built once per bundle (the proxy's threads share it)."""
    from llguidance import LLTokenizer

    with _LOCK:
        tok = _TOKENIZERS.get(bundle)
        if tok is None:  # what llguidance.hf.from_tokenizer builds, from the tokenizers object (no transformers)
            eos = bundle.eos_token_ids or bundle.tokenizer.eos_token_id
            tok = LLTokenizer(bundle.tokenizer.backend_tokenizer.to_str(), n_vocab=bundle.vocab_size, eos_token=eos)
            _TOKENIZERS[bundle] = tok
        return tok


def json_grammar(schema: dict | None) -> str:
    """The llguidance grammar of JSON matching `schema`; None: any JSON object (OpenAI's JSON mode)."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"} if schema is None else schema))
    except ValueError as e:
        raise ValueError(f"the JSON schema cannot be used: {e}") from None


def check_grammar(bundle, grammar: str) -> None:
    """ValueError naming the problem if llguidance cannot build `grammar` (an unsupported schema feature)."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer(bundle))
    if is_error:
        raise ValueError(f"the JSON schema cannot be used for constrained decoding: {messages[0] if messages else ''}")


class Constraint:
    """One generation's grammar state: which plain token ids may come next, and the tokens taken so far."""

    def __init__(self, bundle, grammar: str):
        from llguidance import LLMatcher

        self.vocab_size = bundle.vocab_size
        self.matcher = LLMatcher(ll_tokenizer(bundle), grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {self.matcher.get_error()}")
        self._allowed: np.ndarray | None = None

    def allowed(self) -> np.ndarray:
        """bool [V]: the tokens the grammar allows next (EOS once it is complete)."""
        if self._allowed is None:
            mask = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8)
            allowed = np.zeros(self.vocab_size, dtype=bool)
            n = min(self.vocab_size, mask.size)
            allowed[:n] = mask[:n] > 0
            self._allowed = allowed
        return self._allowed

    def consume(self, token: int) -> None:
        self._allowed = None
        if not self.matcher.consume_token(int(token)):
            raise ValueError(f"constrained decoding failed: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and takes nothing more (the generation ends here, as at EOS)."""
        return self.matcher.is_stopped()


def pick_constrained(bundle, sampler, r, constraint: Constraint, exact: bool = False) -> int | None:
    """The next token among those the grammar allows, from a step's reply; None when the reply is top-k pairs of
    which none is allowed (the caller asks for full logits). `exact`: the token's own logprob is wanted, so a lone
    allowed token outside the k is not taken blind either."""
    allowed = constraint.allowed()
    if r.indices is None:  # all V logits: mask them, draw among the allowed
        ids = np.flatnonzero(allowed)
        return sampler.from_topk(ids, to_numpy(bundle.plain_logits(to_numpy(r.logits)[-1]))[ids])
    ids = to_numpy(bundle.plain_ids(to_numpy(r.indices)[-1]))
    keep = allowed[ids]
    if bool(keep.any()):
        return sampler.from_topk(ids[keep], to_numpy(r.values)[-1][keep])
    if not exact and int(allowed.sum()) == 1:
        return int(np.flatnonzero(allowed)[0])
    return None
