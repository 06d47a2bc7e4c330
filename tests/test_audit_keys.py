"""Audit attacks, part 1, on a tiny tied LLaMA protected in process: key recovery from known plaintext and from the
server bundle, invariant features, LM-head matching and frequency deciphering.

What the server sees is made as the server makes it: the client bundle embeds the prompt in the secret basis and
the server bundle, loaded as the server loads it, runs it (a hook records each block's output). Text is English
character codes (mod the tiny vocabulary) from the audit's own corpus, so the statistics are real.
"""

from __future__ import annotations

import pytest
import torch

from stip.audit.attacks import load
from stip.audit.context import AuditContext, Observation, Truth
from stip.audit.corpus import split
from tests.models import VOCAB, build_tiny, save_tiny

TIED, UNTIED = "llama-mqa-tied", "llama-gqa-untied"
REQUESTS, LENGTH = 40, 48


def _char_ids(part: str, n: int) -> torch.Tensor:
    text = " ".join(split()[part])[:n]
    return torch.tensor([ord(c) % VOCAB for c in text], dtype=torch.int64)


def _block_outputs(model, x: torch.Tensor) -> dict[int, torch.Tensor]:
    from stip.audit.attacks.vocab_matching import blocks

    out, handles = {}, []
    for i, block in enumerate(blocks(model)):
        handles.append(block.register_forward_hook(
            lambda _m, _a, o, i=i: out.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0].detach())))
    try:
        with torch.no_grad():
            model(inputs_embeds=x[None])
    finally:
        for h in handles:
            h.remove()
    return out


def _protect(root, name: str, noise: float = 0.0):
    """Protect the tiny model (optionally a "fine-tune": every tensor plus noise at `noise` of its own scale)."""
    import stip

    model = build_tiny(name)
    if noise:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "plain")
    stip.protect(root / "plain", root / "protected", progress=False)
    return root / "protected"


def _context(reference, out, prompts, hidden_layers=(), **settings) -> AuditContext:
    from stip.client.bundle import ClientBundle
    from stip.server.model import load_protected_model

    client = ClientBundle.load(out / "client")
    server = load_protected_model(out / "server")[0] if hidden_layers else None
    observations = []
    for ids in prompts:
        x = client.embed(ids)
        hidden = {} if server is None else {k: v for k, v in _block_outputs(server, x).items() if k in hidden_layers}
        observations.append(Observation(x, hidden, {"session": len(observations), "start": 0}))
    return AuditContext(out / "server", observations, Truth([p.clone() for p in prompts], out), tokenizer=None,
                        reference=reference, public_ids=_char_ids("public", 60000),
                        heldout_ids=_char_ids("heldout", 800), settings={"quick": True, **settings})


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """(reference, protected dir, prompts): the tied tiny LLaMA in the paper's scheme; the reference is its own
    plaintext weights."""
    root = tmp_path_factory.mktemp("audit-keys")
    out = _protect(root, TIED)
    prompts = _char_ids("prompts", REQUESTS * LENGTH).view(REQUESTS, LENGTH)
    return build_tiny(TIED), out, prompts


def test_known_plaintext_recovers_p_from_one_pair(tied):
    result = load("known_plaintext").run(_context(*tied))
    assert result.skipped is None and result.recovery == 1.0
    assert result.details["share_from_one_pair"] == 1.0 and result.details["pairs_for_whole_key"] == 1
    curve = result.curves["key share vs known pairs"]
    assert curve["x"][0] == 1 and curve["y"][-1] == 1.0


def test_known_plaintext_noise_lowers_the_share(tied):
    """Gaussian noise added before the transform (a hardened mode's client): one pair no longer pins p."""
    ctx = _context(*tied)
    g = torch.Generator().manual_seed(2)
    for obs in ctx.observations:
        obs.inputs = obs.inputs + 0.05 * obs.inputs.pow(2).mean().sqrt() * torch.randn(obs.inputs.shape, generator=g)
    result = load("known_plaintext").run(ctx)
    assert result.details["share_from_one_pair"] < 0.9
    assert result.details["permutation_exact"][0] < result.details["permutation_exact"][-1]


def test_bundle_keys_recovers_every_key_from_the_same_weights(tied):
    result = load("bundle_keys").run(_context(*tied))
    d = result.details
    assert result.recovery == 1.0 and d["p_share_norms_only"] == 1.0 and d["pc_share"] == 1.0
    assert d["layers"]["share"] == 1.0, d["layers"]


def test_bundle_keys_beats_a_fine_tune(tmp_path):
    """The protected model is the reference plus 1% noise per tensor: the keys still fall."""
    out = _protect(tmp_path, UNTIED, noise=0.01)
    result = load("bundle_keys").run(_context(build_tiny(UNTIED), out, _char_ids("prompts", 96).view(2, 48)))
    d = result.details
    assert result.recovery >= 0.9 and d["pc_share"] >= 0.9 and d["layers"]["share"] >= 0.9, d
    assert load("bundle_keys").run(_context(None, out, _char_ids("prompts", 48).view(1, 48))).skipped


@pytest.mark.parametrize("name, harden, noise", [(TIED, (), 0.0), (TIED, ("all",), 0.01), (UNTIED, ("all",), 0.01),
                                                 ("gpt2", ("all",), 0.01)])
def test_bundle_mixing_recovers_the_residual_transform_and_the_tokens(tmp_path, name, harden, noise):
    """The paper's permutation and `--harden all --noise 0.01` alike, tied or untied, RMSNorm or LayerNorm (GPT-2,
    learned positions): the LM head, paired with the public one by row norms, gives R by Procrustes (no queries), and
    R^T decodes the traffic."""
    import stip

    save_tiny(name, tmp_path / "plain")
    stip.protect(tmp_path / "plain", tmp_path / "protected", progress=False, harden=harden, noise=noise)
    result = load("bundle_mixing").run(_context(build_tiny(name), tmp_path / "protected",
                                                _char_ids("prompts", 4 * LENGTH).view(4, LENGTH)))
    d = result.details
    assert d["key_columns_within_5pct"] == 1.0 and result.recovery >= 0.95, d


def test_lm_head_matching_gives_every_token_its_code(tied):
    result = load("lm_head_matching").run(_context(*tied))
    assert result.recovery == 1.0 and result.details["exact_match_share"] == 1.0


def test_lm_head_matching_is_skipped_on_untied_models(tmp_path):
    out = _protect(tmp_path, UNTIED)
    result = load("lm_head_matching").run(_context(build_tiny(UNTIED), out, _char_ids("prompts", 48).view(1, 48)))
    assert result.recovery is None and "untied" in result.skipped


def test_frequency_deciphers_the_codes_without_weights(tied):
    """40 requests of English characters: the codes (repeated rows, and the LM head's) fall to unigram and bigram
    statistics of the public text, far above the most-frequent-token baseline, and more requests help."""
    ctx = _context(None, *tied[1:])
    result = load("frequency").run(ctx)
    d = result.details
    assert d["distinct_codes"]["rows"] == d["distinct_tokens"]  # the same character, the same row
    assert result.recovery >= 0.5 > 2 * d["chance_most_frequent"], d
    ys = d["recovery_rows"]
    assert ys[-1] > ys[0], ys


def test_frequency_says_when_noise_stops_codes_repeating(tied):
    ctx = _context(None, *tied[1:])
    g = torch.Generator().manual_seed(3)
    for obs in ctx.observations:
        obs.inputs = obs.inputs + 0.01 * torch.randn(obs.inputs.shape, generator=g)
    d = load("frequency").run(ctx).details
    assert "do not repeat" in d["rows_note"] and d["recovery_rows"][-1] <= 0.2


def test_frequency_links_noisy_rows_of_a_noise_bundle(tmp_path):
    """A `--noise 0.01` bundle: no row repeats, but copies of a token stay each other's neighbours, so linking
    (threshold from the manifest's SIGMA) gives back one code per token and the deciphering works as before."""
    import stip

    save_tiny(TIED, tmp_path / "plain")
    stip.protect(tmp_path / "plain", tmp_path / "protected", progress=False, noise=0.01)
    ctx = _context(None, tmp_path / "protected", _char_ids("prompts", REQUESTS * LENGTH).view(REQUESTS, LENGTH))
    d = load("frequency").run(ctx).details
    assert d["link_purity"] == 1.0 and d["distinct_codes"]["rows"] == d["distinct_tokens"], d
    assert d["recovery_rows"][-1] >= 0.5, d


def test_invariants_match_norms_and_inner_products(tied):
    """(a) norms and the request's Gram matrix against the public table, (b) hidden states' norms and inner
    products at a captured block, with the reference weights: both far above chance (1/97)."""
    result = load("invariants").run(_context(*tied[:2], tied[2][:4], hidden_layers=(1,)))
    d = result.details
    assert d["recovery_norm_only"] >= 0.9 and d["recovery_norm_gram"] >= 0.9, d
    assert d["layer_b"] == 1 and d["positions_b"] == 3 * 16 and d["recovery_hidden"] >= 0.9, d


def test_invariants_survive_a_dense_orthogonal_mixing(tied):
    """Mix the observed rows and states with a random orthogonal matrix (what dense mixing does): the same
    recovery, since norms and inner products do not change."""
    ctx = _context(*tied[:2], tied[2][:4], hidden_layers=(1,))
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=torch.Generator().manual_seed(4)))
    for obs in ctx.observations:
        obs.inputs = obs.inputs @ q
        obs.hidden = {k: v @ q for k, v in obs.hidden.items()}
    d = load("invariants").run(ctx).details
    assert d["recovery_norm_gram"] >= 0.9 and d["recovery_hidden"] >= 0.9, d
