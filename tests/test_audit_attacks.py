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


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded machine its barriers cost 10-20x (finetune:
    1.9-2.4 s with one thread, 22-37 s with two, at load avg 8)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(plain model, protected dir, prompts): one tiny LLaMA, protected in process (the paper's scheme)."""
    import stip

    root = tmp_path_factory.mktemp("audit")
    plain = save_tiny(NAME, root / "plain")
    stip.protect(plain, root / "protected", progress=False)
    prompts = _char_ids("prompts", 3 * 24).view(3, 24)
    return build_tiny(NAME), root / "protected", prompts


# quick budgets, but steps and positions, not a loaded machine's clock, end each run
UNBOUNDED = {"seconds": 600.0, "scratch_seconds": 600.0}


def _context(tiny, protected: bool, vocab_matching=None, finetune=None) -> AuditContext:
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
                        reference=reference, public_ids=_char_ids("public", 6000),
                        heldout_ids=_char_ids("heldout", 800),
                        settings={"quick": True, "vocab_matching": UNBOUNDED | (vocab_matching or {}),
                                  "finetune": UNBOUNDED | (finetune or {})})


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


def test_distance_correlation_known_cases():
    """Szekely's dCor: 1 for identical samples and for any rotation of them; about 0 for independent samples (the
    bias-corrected estimate, at any dimension); clearly positive for y = x^2, where Pearson's correlation (the
    paper's misprint) is about 0."""
    from stip.audit.attacks.distance_correlation import dcor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    for unbiased in (False, True):
        assert dcor(x, x, unbiased) == pytest.approx(1.0, abs=1e-9)
        assert dcor(x, x @ rotation, unbiased) == pytest.approx(1.0, abs=1e-6)
        assert dcor(x, 3 * x[:, torch.randperm(48, generator=g)] + 1, unbiased) == pytest.approx(1.0, abs=1e-6)
    assert abs(dcor(x, torch.randn(300, 48, generator=g), unbiased=True)) < 0.15
    low = torch.randn(1000, 1, generator=g)
    assert dcor(low, torch.randn(1000, 1, generator=g)) < 0.1
    assert abs(float(torch.corrcoef(torch.cat([low, low ** 2], 1).T)[0, 1])) < 0.1
    assert dcor(low, low ** 2) > 0.4
    with pytest.raises(ValueError, match="length"):
        dcor(x, x[:10])


def test_distance_correlation_of_the_paper_scheme(tiny):
    """The paper's permutation is an isometry: the inputs the server receives have dCor 1 with the plaintext
    embeddings; the references sit beside them."""
    result = load("distance_correlation").run(_context(tiny, True))
    assert result.recovery is None and result.unit == "dCor" and result.skipped is None
    per_layer, ref = result.details["per_layer"], result.details["reference"]
    assert per_layer["inputs"]["dcor"] == pytest.approx(1.0, abs=1e-6)
    assert set(per_layer) == {"inputs", "layer 0", "layer 1", "layer 2"}
    assert all(0.0 < row["dcor"] <= 1.0 + 1e-9 for row in per_layer.values())
    assert ref["independent"]["dcor_bias_corrected"] < 0.2 < ref["random_projection"]["dcor"]


def test_finetune_attack_trains_both_rows_at_the_same_budget(tiny):
    """A new embedding and LM head learn English character statistics on the frozen protected body, and the same
    model trained from scratch gets the same steps; each row's test loss, accuracy and perplexity agree, and the
    paper's Table V is beside them."""
    import math

    result = load("finetune").run(_context(tiny, True))
    assert result.recovery is None and result.unit == "loss" and result.skipped is None
    rows, runs = result.details["rows"], result.details["runs"]
    assert set(rows) == {"protected body", "scratch", "original"}
    for row in rows.values():
        assert math.isfinite(row["loss"]) and 0.0 <= row["accuracy"] <= 1.0
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]))
    assert runs["protected body"]["steps"] == runs["scratch"]["steps"] == 40
    assert runs["protected body"]["trained_parameters"] < runs["scratch"]["trained_parameters"]
    curve = result.curves["training loss"]  # both rows on one plot: they trained the same steps
    assert len(curve["y"]) == 2
    for losses in curve["y"].values():
        assert len(losses) == len(curve["x"]) == 40 and sum(losses[-5:]) < sum(losses[:5])  # both learned
    # the untrained random reference knows nothing of English: both trained rows beat it
    assert max(rows["protected body"]["loss"], rows["scratch"]["loss"]) < rows["original"]["loss"]
    assert result.details["paper"]["scratch"]["perplexity"] == 538


def test_dense_mixing_hides_tokens_from_sorted_l1_but_not_from_dcor(tiny, tmp_path):
    """Under `--harden mix` (a dense orthogonal residual transform) sorting no longer undoes the transform: vocabulary
    matching falls to about chance, while distance correlation, which any isometry keeps, stays 1 at the inputs."""
    import stip

    reference, out, prompts = tiny
    mixed = tmp_path / "mixed"
    stip.protect(out.parent / "plain", mixed, progress=False, harden=("mix",))
    ctx = _context((reference, mixed, prompts), True, vocab_matching={"layers": [0], "k_max": 32})
    per_layer = load("vocab_matching").run(ctx).details["per_layer"]
    # a fresh CSPRNG key each run: 0.31 at the inputs was seen once on this tiny vocabulary; without mix it is 1.0
    assert per_layer["inputs"]["recovery"] <= 0.5 and per_layer["layer 0"]["recovery"] <= 0.3, per_layer
    assert load("distance_correlation").run(ctx).details["per_layer"]["inputs"]["dcor"] == pytest.approx(1.0, abs=1e-4)


def test_every_curve_plots(tiny, tmp_path):
    """The report draws one PNG per curve of these attacks (multi-series ones included)."""
    from stip.audit.report import plot_curves

    ctx = _context(tiny, True, vocab_matching={"layers": [0]}, finetune={"steps": 6})
    for name in ("vocab_matching", "distance_correlation", "finetune"):
        result = load(name).run(ctx).to_json()
        files = plot_curves(tmp_path, result)
        assert [curve for curve, _ in files] == list(result["curves"]), name
        assert all((tmp_path / file).stat().st_size > 1000 for _, file in files)
