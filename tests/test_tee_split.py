"""TEE mode's split (stip.enclave.compute + `stip serve --tee-worker`): lossless, fresh pads, nothing secret sent.

The enclave side runs in this process (EnclaveModel over the bundles' tensors); the worker is a real
`stip serve DIR/server --tee-worker` subprocess given only the server bundle. A `sent` hook on the WebSocket link
records every frame header and tensor the worker receives, and the checks run on those.
"""

from __future__ import annotations

import pytest
import torch

from stip.common import wire
from stip.common.sampling import SamplingParams
from stip.enclave.compute import (POSITION_EMBEDDING, TOKEN_EMBEDDING, EnclaveModel, enclave_tensors_from_bundles)
from stip.enclave.worker_link import WebSocketWorkerLink, WorkerError
from stip.server.tee_worker import LocalWorkerLink, TeeWorker
from tests.models import build_tiny
from tests.parties import serve

MODELS = ("gpt2", "llama-gqa-untied")  # Conv1D + learned positions + LayerNorm; RoPE + GQA + RMSNorm
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8]
NEW = 8


@pytest.fixture(scope="module", params=MODELS)
def party(request, tiny_protected):
    """(name, plain model, enclave tensors, config, the worker process), one worker per model."""
    plain_dir, out = tiny_protected(request.param)
    config, tensors = enclave_tensors_from_bundles(out)
    with serve(out, "--tee-worker", token="tee-t", threads=1) as worker:
        yield request.param, build_tiny(request.param), config, tensors, worker


def recording_link(worker):
    frames: list[tuple[dict, torch.Tensor | None]] = []
    link = WebSocketWorkerLink(worker.url, token=worker.token,
                               sent=lambda h, x: frames.append((h, None if x is None else x.clone())))
    return link, frames


@torch.no_grad()
def plain_greedy(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    out, first = list(ids), None
    for _ in range(n):
        logits = model(torch.tensor([out])).logits[0, -1]
        first = logits if first is None else first
        out.append(int(logits.argmax()))
    return out[len(ids):], first


def test_greedy_equals_plain_through_the_worker(party):
    name, plain, config, tensors, worker = party
    link, frames = recording_link(worker)
    enclave = EnclaveModel.from_tensors(config, tensors, link)
    want, want_logits = plain_greedy(plain, PROMPT, NEW)
    s = enclave.new_session()
    got_logits = enclave.prefill(s, PROMPT)
    enclave.close(s)
    diff = float((got_logits - want_logits).abs().max())
    print(f"{name}: max-abs logit difference TEE vs plain {diff:.2e}")
    assert diff < 1e-4
    got = [t for t, _ in enclave.generate(PROMPT, SamplingParams(max_tokens=NEW))]
    assert got == want
    ops = {h["op"] for h, _ in frames}
    assert ops == {"linear", "body", "close"}
    link.shutdown()


def test_interleaved_sessions_keep_their_caches(party):
    """Two conversations stepped in turn: block 0's caches (enclave) and the body's (worker) stay apart."""
    name, plain, config, tensors, worker = party
    link = WebSocketWorkerLink(worker.url, token=worker.token)
    enclave = EnclaveModel.from_tensors(config, tensors, link)
    prompts = [PROMPT, [40, 2, 17, 60]]
    sessions = [enclave.new_session() for _ in prompts]
    got = [[int(enclave.prefill(s, p).argmax())] for s, p in zip(sessions, prompts)]
    for _ in range(3):
        for s, out in zip(sessions, got):
            out.append(int(enclave.decode(s, out[-1]).argmax()))
    assert got == [plain_greedy(plain, p, 4)[0] for p in prompts]
    for s in sessions:
        enclave.close(s)
    link.shutdown()


def _received(frames, op):
    return [(h, x) for h, x in frames if h["op"] == op]


def test_fresh_pads_and_nothing_secret_reaches_the_worker(party):
    name, plain, config, tensors, worker = party
    link, frames = recording_link(worker)
    enclave = EnclaveModel.from_tensors(config, tensors, link)
    runs = []
    for _ in range(2):  # the same prompt twice
        frames.clear()
        s = enclave.new_session()
        enclave.prefill(s, PROMPT)
        enclave.decode(s, 7)
        enclave.close(s)
        runs.append(list(frames))
    a, b = (_received(r, "linear") for r in runs)
    assert [h["name"] for h, _ in a] == [h["name"] for h, _ in b] and "lm_head" in {h["name"] for h, _ in a}
    if name.startswith("llama"):  # q/k/v and gate/up go in one request each, with one pad
        assert {"self_attn.q_proj+self_attn.k_proj+self_attn.v_proj", "mlp.gate_proj+mlp.up_proj"} <= \
            {h["name"] for h, _ in a}
    for (h, x), (_, y) in zip(a, b):  # every padded input is fresh per query
        assert x.shape == y.shape and float((x - y).abs().min()) > 0, h["name"]
    # h1 p (the body's input) is a deterministic function of the prompt: the same both times, up to the rounding
    # the pads leave in the last bits (docs/tee.md)
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-5)
               for (_, x), (_, y) in zip(_received(runs[0], "body"), _received(runs[1], "body")))

    enc = enclave
    table = tensors[TOKEN_EMBEDDING].float()
    ids = torch.tensor(PROMPT + [7])
    xp = enc.token_embedding[ids]  # the permuted embeddings x p of the prompt (GPT-2: + positions p)
    if POSITION_EMBEDDING in tensors:
        xp = xp + enc.resid.apply(tensors[POSITION_EMBEDDING].float(), 1, "out")[torch.arange(len(ids))]
    forbidden = torch.cat([table, enc.token_embedding, xp, enc.resid.invert(xp, 1)])  # rows, plain and permuted
    secrets = [wire.tensor_bytes(t) for t in (tensors["resid.perm"], tensors["vocab.perm"], table,
                                              enc.token_embedding)]
    rows_bytes = [wire.tensor_bytes(r) for r in forbidden]
    for header, x in runs[0] + runs[1]:
        if x is None:
            continue
        rows = x.reshape(-1, x.shape[-1]).float()
        if rows.shape[-1] == forbidden.shape[-1]:  # no row equals (or nearly equals) a row of x, x p or the table
            gap = torch.cdist(rows.double(), forbidden.double()).min()
            assert float(gap) > 1e-3 * float(forbidden.norm(dim=-1).min()), (header, float(gap))
        raw = wire.tensor_bytes(x)
        assert not any(sec in raw for sec in secrets)
        assert not any(r in raw for r in rows_bytes)
        assert header["op"] != "linear" or header["dtype"] == "float64"
    link.shutdown()


def test_worker_refuses_bad_requests_and_keeps_serving(party):
    name, plain, config, tensors, worker = party
    link = WebSocketWorkerLink(worker.url, token=worker.token)
    with pytest.raises(WorkerError, match="unknown linear 'embed_tokens'"):
        link.linear("embed_tokens", torch.zeros(1, 4, dtype=torch.float64))
    d = tensors[TOKEN_EMBEDDING].shape[1]
    with pytest.raises(WorkerError, match="404 unknown linear 'lm_head\\+lm_head'"):
        link.linear("lm_head+lm_head", torch.zeros(1, d, dtype=torch.float64))
    assert link.body("s1", torch.zeros(2, d), 0).shape == (2, d)
    with pytest.raises(WorkerError, match="409 session 's1' holds 2 tokens, but the step starts at 5"):
        link.body("s1", torch.zeros(1, d), 5)
    with pytest.raises(WorkerError, match="404 unknown or expired session"):
        link.body("nope", torch.zeros(1, d), 3)
    with pytest.raises(WorkerError, match="NaN"):
        link.linear("lm_head", torch.full((1, d), float("nan"), dtype=torch.float64))
    assert link.body("s2", torch.ones(1, d), 0).shape == (1, d)  # still serving
    link.shutdown()
    with pytest.raises(WorkerError, match="cannot open the TEE worker socket"):
        WebSocketWorkerLink(worker.url, token="wrong")


def test_in_process_worker_matches(tiny_protected):
    """The same split with the worker in this process (LocalWorkerLink): the benchmark's and the enclave's path."""
    plain_dir, out = tiny_protected("llama-gqa-untied")
    config, tensors = enclave_tensors_from_bundles(out)
    enclave = EnclaveModel.from_tensors(config, tensors, LocalWorkerLink(TeeWorker.from_bundle(out / "server")))
    want, _ = plain_greedy(build_tiny("llama-gqa-untied"), PROMPT, 4)
    assert [t for t, _ in enclave.generate(PROMPT, SamplingParams(max_tokens=4), top_logprobs=3)] == want
    top = next(enclave.generate(PROMPT, SamplingParams(max_tokens=1), top_logprobs=3))[1]
    assert len(top) == 3 and top[0][0] == want[0] and top[0][1] <= 0


def test_worker_limits(tiny_protected):
    """The worker's KV budget and session limit hold for blocks 1..L-1's caches: a 503 to retry, nothing run."""
    from stip.server.tee_worker import TeeWorkerError

    _, out = tiny_protected("gpt2")
    worker = TeeWorker.from_bundle(out / "server", max_sessions=1, kv_budget_tokens=10)
    d = worker.hidden_size
    assert worker.body("a", torch.ones(8, d), 0).shape == (8, d)
    with pytest.raises(TeeWorkerError, match="KV budget of 10 tokens"):
        worker.body("a", torch.ones(3, d), 8)
    with pytest.raises(TeeWorkerError, match="all 1 sessions are in use"):
        worker.body("b", torch.ones(1, d), 0)
    worker.close("a")
    assert worker.body("b", torch.ones(1, d), 0).shape == (1, d)
