"""Audit attacks, weight pairs (issue 20, part 3): gram_congruence, key_invariants, ridge_inversion and arrowmatch,
on a tiny untied LLaMA with GQA protected in process by the real `stip.protect`, in the paper's scheme and with
`--harden all`. The reference is the exact plaintext model (level "exact"), or, for ArrowMatch, the public base a
"fine-tune" (every tensor plus 1% noise) was made from (level "base"). What the server receives is made as in
tests/test_audit_keys.py: the client bundle embeds English characters (mod the tiny vocabulary)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stip.audit.attacks import ATTACKS, load
from tests.models import VOCAB, build_tiny
from tests.test_audit_keys import _char_ids, _context

MODEL = "llama-gqa-untied"
MODES = {"paper": (), "all": ("all",)}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """(mode, fine-tune noise) -> protected dir, protected on first use."""
    import stip

    cache = {}

    def get(mode: str, finetune: float = 0.0, head: str = "server"):
        if (mode, finetune, head) not in cache:
            root = tmp_path_factory.mktemp(f"weight-pairs-{mode}-{finetune}")
            model = build_tiny(MODEL)
            if finetune:
                g = torch.Generator().manual_seed(1)
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(finetune * p.std() * torch.randn(p.shape, generator=g))
            model.save_pretrained(root / "plain")
            stip.protect(root / "plain", root / "protected", progress=False, harden=MODES[mode], head=head)
            cache[mode, finetune, head] = root / "protected"
        return cache[mode, finetune, head]

    return get


def _run(name: str, out, requests: int = 4, reference=True, **settings):
    prompts = _char_ids("prompts", requests * 48).view(requests, 48)
    ctx = _context(build_tiny(MODEL) if reference else None, out, prompts, **({name: settings} if settings else {}))
    return load(name).run(ctx)


def test_the_four_attacks_follow_bundle_mixing_in_the_registry():
    i = ATTACKS.index("bundle_mixing")
    assert ATTACKS[i + 1:i + 5] == ("gram_congruence", "key_invariants", "ridge_inversion", "arrowmatch")


@pytest.mark.parametrize("mode", MODES)
def test_gram_congruence_recovers_t_and_every_token(bundles, mode):
    """The Gram matrices of every reading linear, solved jointly, give T to float precision; under `all` the pairs
    V (`vo`) and up (`ffn`) break are found and dropped."""
    result = _run("gram_congruence", bundles(mode))
    d = result.details
    assert result.recovery >= 0.99 and d["key_columns_within_5pct"] == 1.0 and d["key_relative_error"] < 1e-4, d
    assert d["form"] == "folded"
    assert d["dropped_kinds"] == ([] if mode == "paper" else ["up_proj", "v_proj"]), d


@pytest.mark.parametrize("kind", ["orthogonal", "orthogonal x diagonal", "dense"])
def test_congruence_solver_recovers_any_invertible_t(kind):
    """The solver on the tiny model's own Gram matrices, congruent under a T the protection could not make (AloePri's
    keys are invertible, not orthogonal): recovered to float precision, the global sign from the column sums."""
    from stip.audit.attacks.congruence import select, solve
    from stip.audit.attacks.weight_pairs import column_sums, paired_linears, reference_tensors

    ref = reference_tensors(build_tiny(MODEL))
    linears = list(paired_linears(ref, ref, "folded"))
    rng = np.random.default_rng(5)
    o = np.linalg.qr(rng.standard_normal((48, 48)))[0]
    t = {"orthogonal": o, "orthogonal x diagonal": o * np.exp(rng.uniform(-1, 1, 48)) * rng.choice([-1, 1], 48),
         "dense": o @ np.diag(np.exp(rng.uniform(-1, 1, 48))) @ np.linalg.qr(rng.standard_normal((48, 48)))[0]}[kind]
    pairs = [((w.T @ w).numpy(), t.T @ (w.T @ w).numpy() @ t) for _, w, _ in linears]
    sums = [(pub, pub @ t) for pub, _ in column_sums(linears)]
    keep, _ = select(pairs, 0.05)
    est, stats = solve([pairs[k] for k in keep], sums)
    assert len(keep) == len(pairs) and np.linalg.norm(est - t) / np.linalg.norm(t) < 1e-8, stats
    assert stats["refined"] == (kind == "orthogonal"), stats


@pytest.mark.parametrize("mode", MODES)
def test_key_invariants_decode_the_traffic_and_the_vocabulary_order(bundles, mode):
    """(a) sorted logit profiles of embedding x LM head decode every token and give pc; (b) the path products keep
    every pair consistent even under `all` (where Gram matrices lose V and up), and give T."""
    result = _run("key_invariants", bundles(mode))
    a, b = result.details["profiles"], result.details["products"]
    assert result.recovery >= 0.99 and a["recovery"] >= 0.99 and a["pc_share"] == 1.0, a
    assert b["kept"] == b["products"] == 15 and b["recovery"] >= 0.99 and b["key_relative_error"] < 1e-4, b


@pytest.mark.parametrize("mode, noise", [("paper", 0.0), ("all", 0.0), ("all", 0.01)])
def test_ridge_inversion_needs_about_d_leaked_tokens(bundles, tmp_path, mode, noise):
    """8 requests of random tokens: 288 leaked rows at most, 96 scored. Once the leak holds d = 48 distinct tokens,
    every scored row decodes (noise 0.01 included), those of tokens never leaked too; fewer decode less."""
    out = bundles(mode)
    if noise:
        import stip

        stip.protect(out.parent / "plain", tmp_path / "noisy", progress=False, harden=MODES[mode], noise=noise)
        out = tmp_path / "noisy"
    prompts = torch.randint(0, VOCAB, (8, 48), generator=torch.Generator().manual_seed(0))
    result = load("ridge_inversion").run(_context(build_tiny(MODEL), out, prompts))
    d, curve = result.details, result.curves["tokens vs leaked pairs"]
    assert curve["x"] == [16, 32, 64, 128, 256, 288] and d["scored_rows"] == 96
    spanning = [i for i, n in enumerate(d["distinct_leaked_tokens"]) if n >= 48]
    assert spanning and spanning[0] <= 3, d
    assert all(curve["y"][i] >= 0.99 and d["recovery_unseen_tokens"][i] in (None, 1.0) for i in spanning), d
    assert curve["y"][0] < 0.9 and result.recovery >= 0.99, d


@pytest.mark.parametrize("mode", MODES)
def test_arrowmatch_matches_every_arrow_at_level_exact(bundles, mode):
    result = _run("arrowmatch", bundles(mode))
    d = result.details
    assert d["rows_matched"] == 1.0 and d["rows"] == 97 + 3 * 72 and result.recovery >= 0.99, d
    assert d["key_relative_error"] < 1e-4, d


@pytest.mark.parametrize("mode", MODES)
def test_arrowmatch_matches_a_fine_tune_to_its_public_base(bundles, mode):
    """Level base: the protected model is the reference plus 1% noise per tensor, so no Gram or product is exactly
    congruent any more; directions still match one to one, and the refitted T decodes the traffic."""
    result = _run("arrowmatch", bundles(mode, 0.01))
    d = result.details
    assert d["rows_matched"] >= 0.95 and result.recovery >= 0.95, d
    assert d["mean_matched_cosine"][-1] > 0.99 and d["key_columns_within_5pct"] == 1.0, d
    gram = _run("gram_congruence", bundles(mode, 0.01)).details  # its start: the refit on the arrows does better
    assert d["key_relative_error"] < gram["key_relative_error"] / 2, (d, gram)


def test_arrowmatch_without_a_head_on_the_server_matches_the_blocks(bundles):
    """`--head client`: the server bundle has no LM head, so only the blocks' arrows are matched (was a KeyError),
    and they alone still give T and every token at level exact."""
    result = _run("arrowmatch", bundles("paper", head="client"))
    d = result.details
    assert d["rows_matched"] == 1.0 and d["rows"] == 3 * 72 and result.recovery >= 0.99, d


@pytest.mark.parametrize("name", ["gram_congruence", "key_invariants", "ridge_inversion", "arrowmatch"])
def test_weight_pair_attacks_are_skipped_without_reference_weights(bundles, name):
    result = _run(name, bundles("paper"), requests=1, reference=False)
    assert result.recovery is None and result.skipped, result
