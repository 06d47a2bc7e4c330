"""Generations a test compares between the light venv (no torch) and the full one: run as
`python -m tests.light.run_client CLIENT_BUNDLE SERVER_URL` with either interpreter; prints one JSON object."""

from __future__ import annotations

import json
import sys
import time

N = 12
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


def main(bundle: str, url: str) -> None:
    t0 = time.perf_counter()
    import stip
    from stip.client.constrained import json_grammar

    topk = stip.Client(bundle, url)
    logits = stip.Client(bundle, url, downlink="logits")
    ready = time.perf_counter() - t0
    out: dict = {"ready_s": ready, "prompt_ids": topk.encode(messages=MESSAGES),
                 "chat_text": topk.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)}
    for name, client in (("topk", topk), ("logits", logits)):
        g = client.generate(messages=MESSAGES, max_tokens=N, logprobs=3)
        out[f"greedy_{name}"] = {"ids": g.token_ids, "text": g.text,
                                 "logprobs": [[lp.logprob, lp.top] for lp in g.logprobs]}
        s = client.generate(messages=MESSAGES, max_tokens=N, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
        out[f"seeded_{name}"] = s.token_ids
    out["json_mode"] = logits.generate(messages=MESSAGES, max_tokens=N, grammar=json_grammar(None)).token_ids
    out["score"] = [None if lp is None else [lp.logprob, lp.top] for lp in topk.score("The sky is blue.", top=2)]
    out["modules"] = sorted(m for m in ("torch", "transformers") if m in sys.modules)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
