"""Language-model deciphering of per-token codes, no weights: `frequency`'s substitution cipher, attacked with the
public text's bigram model instead of a hill-climb (`stip.audit.decipher`).

The codes are `frequency`'s (row hashes; rows linked by distance where the manifest records `--noise`; on tied
models also the LM-head codes). The decipherer seeds codes with public tokens by frequency rank, then re-places
codes in rounds by a one-to-one matching on the bigram log-likelihood of the decoded stream, bringing codes in from
the most frequent. It scales to millions of tokens (`python -m bench.decipher` runs it on production-volume
traffic and derives a rekey budget); here it runs on the audit's own traffic, a curve over N requests. Recovery is
the share of token occurrences decoded right, also over the rare ones (tokens outside the public text's 1,000 most
frequent: names, numbers).

Settings (`ctx.settings["lm_decipher"]`): `rounds` (at most, per doubling of the codes in play), `patience`
(rounds without a better likelihood before the next doubling), `k` (candidate tokens per code and round), `share`
(codes that may move per round), `max_tokens` (public text used), `link` (linking threshold for noisy rows, as
`frequency`'s), `seed`.
"""

from __future__ import annotations

import time

import numpy as np

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import mode_of, setting

NAME = "lm_decipher"
TITLE = "Bigram-LM deciphering of per-token codes (one-to-one matching) over N requests"


def code_sources(ctx, link: float) -> tuple[dict[str, list[np.ndarray]], dict]:
    """{"rows": codes per request, "lm_head": ... (tied models)} and how the row codes were made."""
    from stip.audit.attacks.frequency import head_codes, linked_codes, row_codes

    noise = float(mode_of(ctx.server_dir).get("noise") or 0.0)
    details = {}
    if noise:
        codes, threshold = linked_codes(ctx, noise, link)
        details["rows_linked_by"] = f"distance < {threshold:.4g} ({link:g} x the expected distance of two noisy " \
                                    f"copies at noise {noise:g})"
    else:
        codes = row_codes(ctx)
    sources = {"rows": codes}
    if (heads := head_codes(ctx)) is not None:
        sources["lm_head"] = heads
    return sources, details


def requests_curve(n: int) -> list[int]:
    """1, 2, 4, ... requests, and all n."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def run(ctx) -> AttackResult:
    t0 = time.perf_counter()
    if ctx.public_ids is None or not len(ctx.observations):
        return AttackResult(NAME, TITLE, None, skipped="needs public text statistics and observed requests",
                            seconds=time.perf_counter() - t0)
    from stip.audit.decipher import LanguageStats, decipher, recovery

    knobs = {"rounds": int(setting(ctx, NAME, "rounds", 40)), "k": int(setting(ctx, NAME, "k", 24)),
             "share": float(setting(ctx, NAME, "share", 0.5)), "patience": int(setting(ctx, NAME, "patience", 3)),
             "seed": int(setting(ctx, NAME, "seed", ctx.seed))}
    max_tokens = int(setting(ctx, NAME, "max_tokens", 300000))
    sources, details = code_sources(ctx, float(setting(ctx, NAME, "link", 2.0)))
    stats = LanguageStats(ctx.public_ids[:max_tokens].long().numpy())
    common = stats.top(1000)
    truth = [ids.long().numpy() for ids in ctx.truth.ids]
    ns = requests_curve(len(ctx.observations))
    details.update({"requests": ns, "rows": int(sum(len(t) for t in truth)), **knobs,
                    "public_tokens": int(min(max_tokens, len(ctx.public_ids))),
                    "coverage": stats.coverage(np.concatenate(truth)),
                    "distinct_codes": {k: int(len(np.unique(np.concatenate(v)))) for k, v in sources.items()},
                    "distinct_tokens": int(len(np.unique(np.concatenate(truth))))})
    curves, best = {}, 0.0
    for name, streams in sources.items():
        scores = [recovery(decipher(streams[:n], stats, **knobs), streams[:n], truth[:n], common) for n in ns]
        details[f"recovery_{name}"] = [s["all"] for s in scores]
        details[f"recovery_rare_{name}"] = [s["rare"] for s in scores]
        curves[f"recovery vs requests ({name} codes)"] = {"x": [float(v) for v in ns],
                                                          "y": [s["all"] for s in scores],
                                                          "xlabel": "requests N", "ylabel": "tokens decoded right"}
        best = max(best, scores[-1]["all"])
    details["rare_share"] = recovery({}, sources["rows"], truth, common)["rare_share"]
    details["chance_most_frequent"] = float((np.concatenate(truth) == stats.tokens[0]).mean())
    return AttackResult(NAME, TITLE, best, "tokens", details, curves, time.perf_counter() - t0)
