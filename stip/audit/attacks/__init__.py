"""One module per attack; each exposes `NAME`, `TITLE` and `run(ctx: AuditContext) -> AttackResult`.

The registry is data: the order here is the report's order. A module is imported on use, so one attack's optional
dependency never stops the others.
"""

from __future__ import annotations

import importlib

ATTACKS: tuple[str, ...] = (
    "known_plaintext",  # (x, x p) pairs -> p
    "bundle_keys",  # server bundle alone vs public weights -> p, pc, per-layer keys
    "bundle_mixing",  # the LM head vs the public one -> the dense residual mixing R -> the traffic decoded
    "gram_congruence",  # W'^T W' = T^T (W^T W) T over every layer, solved jointly -> T -> the traffic decoded
    "key_invariants",  # products where the keys cancel: embedding x LM head profiles, Wq^T Wk / Wo Wv / Wdown Wup
    "ridge_inversion",  # k leaked (token, row) pairs -> a ridge inverter -> the other rows decoded
    "arrowmatch",  # ArrowMatch: weight rows matched by direction (Hungarian) to the public base's -> T -> traffic
    "vocab_matching",  # Hidden No More: sorted-L1 decoding with plaintext weights
    "invariants",  # norms and pairwise inner products vs the embedding table / candidate hidden states
    "lm_head_matching",  # tied models: input rows vs the server's own LM head rows
    "frequency",  # substitution deciphering of per-token codes over N requests
    "lm_decipher",  # the same codes deciphered with a public bigram model and one-to-one matching
    "distance_correlation",  # Szekely's dCor, with a random-projection reference
    "finetune",  # train a new embedding + LM head on the protected body vs from scratch
)


def load(name: str):
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    return importlib.import_module(f"stip.audit.attacks.{name}")
