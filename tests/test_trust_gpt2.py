"""GPT-2's attention flags on the batched engine (the default `stip serve` path), against transformers.

`scale_attn_by_inverse_layer_idx` divides layer i's attention scores by i + 1; `reorder_and_upcast_attn` computes
scores and softmax in float32 whatever the model's dtype (transformers' eager attention, where the flag acts). A
server that ignored either would serve another model than the checkpoint: the tiny model here is built so that the
first flag changes its greedy output, and each test compares the batched engine with transformers' own forward.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from stip.client.bundle import ClientBundle
from stip.client.transport import Connection, Downlink
from stip.server.batching import BatchedEngine
from stip.server.engine import Step
from tests.models import VOCAB, _randomise
from tests.parties import serve

PROMPT = [5, 17, 42, 8, 66, 3, 21, 9, 1]
NEW = 12
FLAGS = {"inverse-layer-idx": {"scale_attn_by_inverse_layer_idx": True},
         "upcast": {"reorder_and_upcast_attn": True},
         "both": {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}}


def tiny_gpt2(**flags) -> GPT2LMHeadModel:
    """A tiny random GPT-2 with sharp attention (weights x3), so that scaling the scores changes what it says."""
    config = GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=64, eos_token_id=None,
                        bos_token_id=None, attn_implementation="eager", **flags)  # eager: where the flags act
    torch.manual_seed(0)
    model = _randomise(GPT2LMHeadModel(config), 0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model


def reference(model: GPT2LMHeadModel, n: int = NEW) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens (full forward each step) and its logits over prompt and output."""
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    return ids[len(PROMPT):], logits


def batched(model: GPT2LMHeadModel, tokens: list[int]) -> tuple[list[int], torch.Tensor]:
    """The batched engine fed the prompt, then `tokens` one decode step each, beside a second session in every tick:
    its own greedy pick at each step and its logits over prompt and tokens (teacher-forced, so a bfloat16 near-tie
    cannot move the comparison onto another sequence)."""
    engine = BatchedEngine(model)
    mine, other = engine.new_state(), engine.new_state()
    emb = model.get_input_embeddings()
    embed = lambda ids: emb(torch.tensor(ids)).detach()  # noqa: E731
    rows = [engine.step_batch([Step(mine, embed(PROMPT), "all"), Step(other, embed([7, 7, 7]))])[0].float()]
    for t in tokens[:-1]:
        rows.append(engine.step_batch([Step(mine, embed([t]), "all"), Step(other, embed([1]))])[0].float())
    return [int(r[-1].argmax()) for r in rows], torch.cat(rows)


def test_the_inverse_layer_flag_changes_what_the_model_says():
    """The check below has teeth: a server ignoring the flag would give other tokens."""
    assert reference(tiny_gpt2(**FLAGS["inverse-layer-idx"]))[0] != reference(tiny_gpt2())[0]


# the upcast flag acts only below float32
CASES = {"inverse-layer-idx-float32": (FLAGS["inverse-layer-idx"], torch.float32),
         "upcast-bfloat16": (FLAGS["upcast"], torch.bfloat16), "both-float32": (FLAGS["both"], torch.float32)}


@pytest.mark.parametrize("flags,dtype", CASES.values(), ids=CASES.keys())
def test_batched_engine_follows_the_flags(flags, dtype):
    model = tiny_gpt2(**flags).to(dtype).eval()
    want_tokens, want = reference(model)
    got_tokens, got = batched(model, want_tokens)
    diff = float((got - want).abs().max())
    print(f"GPT-2 {flags} {dtype}: max |logit| difference batched vs transformers = {diff:.3g}")
    if dtype == torch.float32:
        assert got_tokens == want_tokens and diff < 1e-3
        return
    # bfloat16 with float32 attention on both sides: the rest rounds alike, far closer than bfloat16 attention
    without = tiny_gpt2(**{**flags, "reorder_and_upcast_attn": False}).to(dtype).eval()
    _, plain_attention = batched(without, want_tokens)
    print(f"  ... and with bfloat16 attention instead: {float((plain_attention - want).abs().max()):.3g}")
    assert got_tokens == want_tokens and diff < 0.25 * float((plain_attention - want).abs().max())


def test_upcast_attention_is_transformers_own():
    """In bfloat16, the batched engine's attention with the flag is transformers' `_upcast_and_reordered_attn`."""
    model = tiny_gpt2(**FLAGS["upcast"]).to(torch.bfloat16).eval()
    decoder = BatchedEngine(model).decoder
    assert decoder.upcast
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 6, 12, generator=g).mul(4).to(torch.bfloat16) for _ in range(3))
    from stip.server.decoder import Row

    row = Row(kv=torch.zeros(decoder.kv_shape(8), dtype=torch.bfloat16), start=0, t=6)
    got = decoder._attend(q, k, v, [row], 0, 12 ** -0.5, None, upcast=True)
    causal = torch.full((6, 6), torch.finfo(torch.float32).min).triu(1)
    want, _ = model.transformer.h[0].attn._upcast_and_reordered_attn(q, k, v, causal)
    assert torch.equal(got, want.reshape(1, 6, -1))


def test_a_served_checkpoint_with_both_flags_matches_transformers(tmp_path):
    """Real parties: `stip protect` the flagged model, `stip serve` it (batched, the default), greedy through a
    session equals transformers' greedy on the plain model."""
    import stip

    model = tiny_gpt2(**FLAGS["both"]).eval()
    want, _ = reference(model)
    model.save_pretrained(tmp_path / "plain")
    stip.protect(tmp_path / "plain", tmp_path / "protected", progress=False)
    client = ClientBundle.load(tmp_path / "protected" / "client")
    from stip.server.model import load_protected_model

    served, _ = load_protected_model(tmp_path / "protected" / "server")  # what --no-batching runs: transformers
    assert served.config._attn_implementation == "eager"  # where transformers applies reorder_and_upcast_attn
    with serve(tmp_path / "protected", threads=1) as server:
        assert server.health()["engine"].startswith("transformers")
        with Connection(server.url).open_session() as s:
            r = s.prefill(client.embed(torch.tensor(PROMPT)), downlink=Downlink("logits"))
            got = []
            while True:
                got.append(int(client.plain_logits(r.logits[-1]).argmax()))
                if len(got) == NEW:
                    break
                r = s.decode(client.embed(torch.tensor(got[-1:]), start=s.position)[0], downlink=Downlink("logits"))
    assert got == want
