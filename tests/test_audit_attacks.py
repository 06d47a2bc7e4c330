"""Audit attacks, part 2, on a tiny protected LLaMA built in code: vocabulary matching (Hidden No More), distance
correlation and the fine-tuning attack, each run on what a real protected model computes.

The observations are made as the server makes them: the client bundle embeds the prompt in the secret basis, the
server bundle (loaded as the server loads it) runs it, and a hook records each block's output. Text is English
character codes (mod the tiny vocabulary) from the audit's own corpus, so the statistics are real.
"""

from __future__ import annotations

import pytest
import torch

from stip.audit.attacks import load
from stip.audit.context import AuditContext, Observation, Truth
from stip.audit.corpus import split
from tests.models import VOCAB, build_tiny, save_tiny

NAME = "llama-gqa-untied"


def _char_ids(part: str, n: int) -> torch.Tensor:
    text = " ".join(split()[part])[:n]
    return torch.tensor([ord(c) % VOCAB for c in text], dtype=torch.int64)


def _block_outputs(model, **inputs) -> dict[int, torch.Tensor]:
    """Each decoder block's output ([T, d]) for one sequence: what `stip serve --capture` records."""
    from stip.audit.attacks.vocab_matching import blocks

    out, handles = {}, []
    for i, block in enumerate(blocks(model)):
        handles.append(block.register_forward_hook(
            lambda _m, _a, o, i=i: out.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0].detach())))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(plain model, protected dir, prompts): one tiny LLaMA, protected in process (the paper's scheme)."""
    import stip

    root = tmp_path_factory.mktemp("audit")
    plain = save_tiny(NAME, root / "plain")
    stip.protect(plain, root / "protected", progress=False)
    prompts = _char_ids("prompts", 3 * 24).view(3, 24)
    return build_tiny(NAME), root / "protected", prompts


def _context(tiny, protected: bool, **settings) -> AuditContext:
    from stip.client.bundle import ClientBundle
    from stip.server.model import load_protected_model

    reference, out, prompts = tiny
    observations = []
    if protected:
        client = ClientBundle.load(out / "client")
        server, _ = load_protected_model(out / "server")
    for ids in prompts:
        if protected:
            x = client.embed(ids)
            hidden = _block_outputs(server, inputs_embeds=x[None])
        else:  # the plain model's own rows and states: what an unprotected server would see
            x = reference.get_input_embeddings().weight[ids].detach()
            hidden = _block_outputs(reference, input_ids=ids[None])
        observations.append(Observation(x, hidden, {"session": len(observations), "start": 0}))
    return AuditContext(out / "server", observations, Truth([p.clone() for p in prompts], out), tokenizer=None,
                        reference=reference, public_ids=_char_ids("public", 6000), heldout_ids=_char_ids("heldout", 800),
                        settings={"quick": True, **settings})


@pytest.mark.parametrize("protected", [False, True], ids=["unprotected", "paper-scheme"])
def test_vocab_matching_recovers_the_prompt(tiny, protected):
    """Against the plain model's own states and against the paper's permutations alike, sorted-L1 decoding with the
    plaintext weights recovers (nearly) every token, at the inputs and at every block attacked."""
    result = load("vocab_matching").run(_context(tiny, protected, vocab_matching={"layers": [0, 2]}))
    assert result.skipped is None
    per_layer = result.details["per_layer"]
    assert set(per_layer) == {"inputs", "layer 0", "layer 2"}
    for name, row in per_layer.items():
        assert row["positions"] == 3 * 16, name  # quick: 16 positions of each of the 3 requests
        assert row["recovery"] >= 0.95, (name, row)
    assert result.recovery >= 0.95
    assert any(name.startswith("recovery by position") for name in result.curves)


def test_vocab_matching_is_skipped_without_reference_weights(tiny):
    ctx = _context(tiny, True)
    ctx.reference = None
    result = load("vocab_matching").run(ctx)
    assert result.recovery is None and "weights" in result.skipped


def test_vocab_matching_decodes_hidden_states_without_usable_inputs(tiny):
    """With the inputs replaced by noise the cheap ranking is useless: the decoder widens to the whole vocabulary
    and the hidden states alone (replayed on the decoded prefix's KV cache) give every token; a reference that is
    not the protected model's gives about chance."""
    ctx = _context(tiny, True, vocab_matching={"layers": [1], "k": 4, "k_max": VOCAB, "tol": 1e-4})
    for obs in ctx.observations:
        obs.inputs = torch.randn_like(obs.inputs)
    per_layer = load("vocab_matching").run(ctx).details["per_layer"]
    assert per_layer["inputs"]["recovery"] <= 0.1 and per_layer["layer 1"]["recovery"] >= 0.95
    ctx.reference = build_tiny(NAME, seed=5)
    assert load("vocab_matching").run(ctx).details["per_layer"]["layer 1"]["recovery"] <= 0.2
