"""The sampler every party uses (`Sampler.from_logits` / `from_topk`: the client SDK, the server-decode engine, the
enclave) against transformers' own logits processors, on random logits: the candidates those methods draw from
(`Sampler.candidates`, which they call) are exactly what transformers leaves finite, from full logits and from top-k
pairs alike, and their draws follow its distribution."""

from __future__ import annotations

import pytest
import torch
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from stip.common.sampling import Sampler, SamplingParams

V = 500


def _as_vector(ids, values, size=V):
    """Candidates (ids, processed scores) as transformers returns them: a [V] vector, -inf where removed."""
    out = torch.full((size,), float("-inf"))
    out[ids] = values
    return out


def _reference(logits, history, temperature, top_k, top_p, penalty):
    procs = LogitsProcessorList()
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=penalty))
    procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=top_p))
    return procs(torch.tensor([history]), logits[None].clone())[0]


CASES = [(1.0, 0, 1.0, 1.0), (0.7, 0, 0.9, 1.0), (1.3, 40, 1.0, 1.0), (0.8, 50, 0.8, 1.3), (1.0, 0, 0.5, 0.7),
         (2.0, 10, 0.95, 1.2), (0.5, 0, 0.3, 1.0)]


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", CASES)
def test_processed_scores_match_transformers(temperature, top_k, top_p, penalty):
    g = torch.Generator().manual_seed(hash((temperature, top_k, top_p, penalty)) % 1000)
    for trial in range(5):
        logits = torch.randn(V, generator=g) * 3
        history = torch.randint(0, V, (30,), generator=g).tolist()
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
        ref = _reference(logits, history, temperature, top_k, top_p, penalty)
        finite = ~torch.isinf(ref)
        ours = [_as_vector(*Sampler(params, history).candidates(logits))]  # full logits
        if 0 < top_k <= 64:  # the top-k downlink: the 64 largest as (id, value) pairs, in the server's order
            perm = torch.randperm(V, generator=g)
            top_values, top_idx = torch.topk(logits[perm], 64)
            ours.append(_as_vector(*Sampler(params, history).candidates(top_values, perm[top_idx])))
        for vector in ours:
            assert torch.equal(torch.isinf(vector), torch.isinf(ref))
            torch.testing.assert_close(vector[finite], ref[finite])


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", CASES)
def test_draws_stay_in_kept_set_and_follow_the_distribution(temperature, top_k, top_p, penalty):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(40, generator=g) * 2
    history = [1, 2, 3, 5, 8, 13]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=3)
    sampler = Sampler(params, history)
    probs = _reference(logits, history, temperature, top_k, top_p, penalty).softmax(-1)
    n = 4000
    counts = torch.bincount(torch.tensor([sampler.from_logits(logits) for _ in range(n)]), minlength=40).float()
    assert bool((counts[probs == 0] == 0).all())
    # every token's frequency within 5 standard deviations of its probability
    sd = (probs * (1 - probs) / n).sqrt()
    assert bool(((counts / n - probs).abs() <= 5 * sd + 1e-3).all())


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([1.0, 5.0, 4.9, -2.0])
    assert Sampler(SamplingParams()).from_logits(logits) == 1
    # 5.0 / 1.1 < 4.9: a seen token loses its lead
    assert Sampler(SamplingParams(repetition_penalty=1.1), [1]).from_logits(logits) == 2
    ids, vals = torch.tensor([7, 3]), torch.tensor([5.0, 4.9])
    assert Sampler(SamplingParams(repetition_penalty=1.1), [7]).from_topk(ids, vals) == 3


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [(1.0, 20, 1.0, 1.0), (0.7, 64, 0.9, 1.2),
                                                             (1.2, 8, 0.5, 1.0)])
def test_topk_pairs_and_full_logits_sample_the_same_tokens(temperature, top_k, top_p, penalty):
    """With top_k <= the downlink's k, both inputs give the same seeded sequence of tokens."""
    g = torch.Generator().manual_seed(11)
    perm = torch.randperm(V, generator=g)  # stand-in for the vocabulary permutation
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=5)
    a, b = Sampler(params, [4, 9]), Sampler(params, [4, 9])
    for _ in range(50):
        logits = torch.randn(V, generator=g) * 3
        permuted = logits[perm]
        values, indices = torch.topk(permuted, 64)
        x, y = a.from_logits(logits), b.from_topk(perm[indices], values)
        assert x == y
        a.observe(x)
        b.observe(y)


def test_seed_reproducible():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=42)
    draws = [Sampler(params).from_logits(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    s = Sampler(params)
    seq = [s.from_logits(logits) for _ in range(20)]
    assert len(set(seq)) > 1


def test_invalid_params():
    for bad in [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(max_tokens=0),
                dict(repetition_penalty=0), dict(presence_penalty=2.5), dict(frequency_penalty=-3),
                dict(logprobs=21), dict(logprobs=-1)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ["x"]


# ------------------------------------------------------------------ OpenAI's presence and frequency penalties


def _direct_penalties(logits, generated, presence, frequency):
    """OpenAI's definition, token by token: mu[j] -= presence * [c[j] > 0] + frequency * c[j]."""
    out = logits.clone()
    for j in range(out.numel()):
        c = generated.count(j)
        out[j] -= presence * (1.0 if c > 0 else 0.0) + frequency * c
    return out


@pytest.mark.parametrize("presence,frequency,penalty", [(0.5, 0.0, 1.0), (0.0, 0.8, 1.0), (1.5, -0.4, 1.0),
                                                        (-2.0, 2.0, 1.0), (0.6, 0.3, 1.3)])
def test_presence_and_frequency_penalties_match_the_direct_computation(presence, frequency, penalty):
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        logits = torch.randn(V, generator=g) * 3
        prompt = torch.randint(0, V, (20,), generator=g).tolist()
        generated = torch.randint(0, 40, (25,), generator=g).tolist()  # repeats, so counts above 1
        params = SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=presence, frequency_penalty=frequency,
                                repetition_penalty=penalty)
        s = Sampler(params, prompt)
        for t in generated:
            s.observe(t)
        # the repetition penalty (transformers', over prompt and output) first, then OpenAI's (output only)
        rep = _reference(logits, prompt + generated, 1.0, 0, 1.0, penalty) if penalty != 1.0 else logits
        direct = _direct_penalties(rep, generated, presence, frequency)
        ref = TopPLogitsWarper(top_p=0.9)(None, (direct / 0.8)[None])[0]
        ours = _as_vector(*s.candidates(logits))
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        torch.testing.assert_close(ours[~torch.isinf(ref)], ref[~torch.isinf(ref)])
        # greedy: the argmax of the penalised logits, from full logits and from top-k pairs alike
        greedy = Sampler(SamplingParams(presence_penalty=presence, frequency_penalty=frequency,
                                        repetition_penalty=penalty), prompt)
        for t in generated:
            greedy.observe(t)
        assert greedy.from_logits(logits) == int(direct.argmax())
        ids = torch.randperm(V, generator=g)[:64]
        assert greedy.from_topk(ids, logits[ids]) == int(ids[direct[ids].argmax()])


def test_penalties_count_generated_tokens_not_the_prompt():
    logits = torch.tensor([0.0, 3.0, 2.5, 1.0])
    s = Sampler(SamplingParams(presence_penalty=1.0), [1, 1, 1])  # the prompt repeats 1: no penalty
    assert s.from_logits(logits) == 1
    s.observe(1)
    assert s.from_logits(logits) == 2  # 3.0 - 1.0 < 2.5
    s = Sampler(SamplingParams(frequency_penalty=0.3))
    for _ in range(2):
        s.observe(1)
    assert s.from_logits(logits) == 2  # 3.0 - 2 * 0.3 = 2.4 < 2.5


# ------------------------------------------------------------------ through real servers on our own engine

ENGINE_PARAMS = {
    "repetition_penalty": SamplingParams(max_tokens=12, repetition_penalty=1.3),
    "presence_penalty": SamplingParams(max_tokens=12, presence_penalty=1.5),
    "frequency_penalty": SamplingParams(max_tokens=12, frequency_penalty=1.0),
    "temperature": SamplingParams(max_tokens=12, temperature=0.8, seed=3),
    "top_k": SamplingParams(max_tokens=12, temperature=1.0, top_k=10, seed=4),
    "top_p": SamplingParams(max_tokens=12, temperature=1.0, top_p=0.8, seed=5),
}
PROMPT = [5, 17, 42, 8, 66, 3, 21]


@pytest.fixture(scope="module")
def engine_servers(tiny_protected, tmp_path_factory):
    """A tiny LLaMA on `stip serve` (transformers engine), protected in round-trip and in server-decode mode."""
    import stip
    from tests.parties import serve, side_by_side

    plain, round_trip = tiny_protected("llama-gqa-untied")
    server_decode = tmp_path_factory.mktemp("sd") / "protected"
    stip.protect(plain, server_decode, progress=False, mode="server-decode")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with side_by_side({"rt": serve(round_trip, threads=1), "sd": serve(server_decode, threads=1)}) as up:
        yield {"plain": model, "round-trip": (round_trip, up["rt"]), "server-decode": (server_decode, up["sd"])}


@pytest.mark.parametrize("name", ENGINE_PARAMS)
@pytest.mark.parametrize("way", ["round-trip topk", "round-trip logits", "server-decode"])
def test_each_parameter_on_our_engine_follows_the_plain_model(engine_servers, name, way):
    """The production path end to end (stip.Client; in server-decode mode the server's own sampler): the tokens a
    seeded sampler draws from the plain model's logits (top-k pairs or all of them), and for the repetition
    penalty, transformers' own greedy `generate`."""
    from stip.client.sdk import Client
    from tests.sampling_reference import reference_tokens

    params = ENGINE_PARAMS[name]
    if way == "server-decode" and name == "repetition_penalty":
        pytest.skip("server-decode offers OpenAI's penalties only (the client refuses repetition_penalty)")
    bundle, server = engine_servers[way.split()[0]]
    client = Client(bundle / "client", server.url, downlink="logits" if way.endswith("logits") else "topk")
    got = client.generate(ids=PROMPT, params=params).token_ids
    model = engine_servers["plain"]
    assert len(got) >= 4  # long enough to say something (a random model may sample its EOS)
    assert got == reference_tokens(model, PROMPT, params, len(got), k=64 if way.endswith("topk") else None)
    if name == "repetition_penalty":
        out = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                             max_new_tokens=len(got), do_sample=False, repetition_penalty=1.3, eos_token_id=None,
                             pad_token_id=0)
        assert got == out[0, len(PROMPT):].tolist()
