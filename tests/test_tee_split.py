"""TEE mode's split (stip.enclave.compute + `stip serve --tee-worker`): lossless, fresh pads, nothing secret sent,
and a worker bundle that holds block 0 only in secret bases and no tied LM head.

The enclave side runs in this process (EnclaveModel over the sealed enclave bundle's tensors); the worker is a real
`stip serve DIR/server --tee-worker` subprocess given only the TEE worker bundle. A `sent` hook on the WebSocket link
records every frame header and tensor the worker receives, and the checks run on those.
"""

from __future__ import annotations

import pytest
import torch

from stip.common import wire
from stip.common.sampling import SamplingParams
from stip.common.tee.layout import LM_HEAD_IN_ENCLAVE, MASK_PREFIX, POSITION_EMBEDDING, TOKEN_EMBEDDING
from stip.developer.tee import read_enclave_tensors
from stip.enclave.compute import EnclaveModel
from stip.enclave.worker_link import WebSocketWorkerLink, WorkerError
from stip.server.tee_worker import LocalWorkerLink, TeeWorker
from tests.models import build_tiny, save_tiny
from tests.parties import serve

# Conv1D + learned positions + LayerNorm, tied; RoPE + GQA + RMSNorm, untied (LM head offloaded)
MODELS = ("gpt2", "llama-gqa-untied")
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8]
NEW = 8


@pytest.fixture(scope="module")
def tee_protected(tmp_path_factory):
    """name -> a folder `stip protect --tee` wrote (its server bundle is the TEE worker's), protected on first use."""
    import stip

    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(f"tee-split-{name}")
            stip.protect(save_tiny(name, root / "plain"), root / "protected", progress=False, tee=True)
            cache[name] = root / "protected"
        return cache[name]

    return get


@pytest.fixture(scope="module", params=MODELS)
def party(request, tee_protected):
    """(name, plain model, enclave config, enclave tensors, the worker process), one worker per model."""
    out = tee_protected(request.param)
    config, tensors = read_enclave_tensors(out)
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


def test_batched_sessions_equal_plain_and_share_messages(party):
    """Issue 23 (5): three sessions stepped as one batch (their prompts of different lengths together, then their
    decode steps): each equals plain greedy, and a batched step costs the messages of one session's step, each
    carrying every session's rows (fresh pads for all), the bodies in one request."""
    name, plain, config, tensors, worker = party
    link, frames = recording_link(worker)
    enclave = EnclaveModel.from_tensors(config, tensors, link)
    prompts = [PROMPT, [40, 2, 17, 60], [9, 9, 33]]
    sessions = [enclave.new_session() for _ in prompts]
    out = enclave.step_batch([(s, p) for s, p in zip(sessions, prompts)])
    got = [[int(o.argmax())] for o in out]
    for _ in range(3):
        frames.clear()
        out = enclave.step_batch([(s, [g[-1]]) for s, g in zip(sessions, got)])
        for g, o in zip(got, out):
            g.append(int(o.argmax()))
        ops = [h["op"] for h, _ in frames]
        per_session = 5 if name == "gpt2" else 6  # four padded groups (+ an untied LM head), the body
        assert ops.count("bodies") == 1 and len(ops) == per_session, ops
        assert all(x.shape[0] == 3 for h, x in frames if h["op"] == "linear")
    assert got == [plain_greedy(plain, p, 4)[0] for p in prompts]
    bad = enclave.step_batch([(sessions[0], [got[0][-1]]), (sessions[1], [10 ** 6])])  # one bad row fails alone
    assert isinstance(bad[1], ValueError) and int(bad[0].argmax()) == plain_greedy(plain, PROMPT, 5)[0][-1]
    for s in sessions:
        enclave.close(s)
    link.shutdown()


def test_worker_bodies_fail_alone(party):
    """The worker's "bodies" op: several sessions' steps in one packed forward; a span the worker refuses (wrong
    start, an unknown session) fails alone with its status while the others run."""
    name, plain, config, tensors, worker = party
    link = WebSocketWorkerLink(worker.url, token=worker.token)
    d = tensors[TOKEN_EMBEDDING].shape[1]
    h = torch.randn(3, d)
    out = link.bodies([("b1", h, 0), ("b2", h[:2], 0), ("b3", h[:1], 4)])
    assert link.batched and out[0].shape == (1, d) and out[1].shape == (1, d)
    assert isinstance(out[2], WorkerError) and "404 unknown or expired session" in str(out[2])
    solo = link.body("b4", h, 0)  # the same rows alone: the packed forward's last state is the solo one
    assert torch.allclose(out[0], solo[-1:], atol=1e-5)
    out = link.bodies([("b1", h[:1], 3), ("b2", h[:1], 5)])
    assert out[0].shape == (1, d) and "409 session 'b2' holds 2 tokens" in str(out[1])
    for sid in ("b1", "b2", "b4"):
        link.close(sid)
    link.shutdown()


def test_step_batcher_gathers_concurrent_generations(party):
    """The enclave's batcher: four concurrent generations are stepped in shared batches (more than one session per
    batch on average) and each still equals plain greedy."""
    import threading

    from stip.enclave.batch import StepBatcher

    name, plain, config, tensors, worker = party
    link = WebSocketWorkerLink(worker.url, token=worker.token)
    enclave = EnclaveModel.from_tensors(config, tensors, link)
    batcher = StepBatcher(enclave, max_batch=4)
    prompts = [PROMPT, [40, 2, 17, 60], [9, 9, 33], [1, 2, 3, 4, 5]]
    got: dict[int, list[int]] = {}

    def generate(i):
        s = enclave.new_session()
        try:
            out = [int(batcher.step(s, prompts[i]).argmax())]
            for _ in range(5):
                out.append(int(batcher.step(s, [out[-1]]).argmax()))
            got[i] = out
        finally:
            batcher.close()
            enclave.close(s)

    for _ in prompts:
        batcher.open()
    threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stats = batcher.stats()
    batcher.shutdown()
    link.shutdown()
    assert [got[i] for i in range(len(prompts))] == [plain_greedy(plain, p, 6)[0] for p in prompts]
    assert stats["steps"] == 24 and stats["mean_batch"] > 1.5, stats


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
    assert [h["name"] for h, _ in a] == [h["name"] for h, _ in b]
    tied = bool(tensors[LM_HEAD_IN_ENCLAVE])  # GPT-2 is tied: its LM head (the embedding) never leaves the enclave
    assert ("lm_head" in {h["name"] for h, _ in a}) == (not tied) and tied == (name == "gpt2")
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
    masks = [t for k, t in tensors.items() if k.startswith(MASK_PREFIX) and k.endswith(".perm")]  # A's and B's
    secrets = [wire.tensor_bytes(t) for t in (tensors["resid.perm"], tensors["vocab.perm"], table,
                                              enc.token_embedding, *masks)]
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


def test_pad_scale_is_a_per_layer_constant(party):
    """No RMS leak (issue 23): rows whose RMS spans four orders of magnitude reach the worker as padded rows whose
    norms do not follow them (the pad is N(0, 1) x 2^20 x a per-group constant, not x the row's RMS), and the
    enclave still gets each row's exact product back."""
    name, plain, config, tensors, worker = party
    link, frames = recording_link(worker)
    enclave = EnclaveModel.from_tensors(config, tensors, link)
    groups = enclave.offloaded()
    assert all(m.bound > 0 for m in groups) and len({m.bound for m in groups}) > 1  # per group, calibrated
    m = groups[0]  # q/k/v (GPT-2: c_attn)
    g = torch.Generator().manual_seed(0)
    rms = torch.logspace(-3, 1, 64, dtype=torch.float64) * m.bound
    x = torch.randn(64, m.weight64.shape[1], generator=g, dtype=torch.float64)
    x = (x / x.pow(2).mean(-1, keepdim=True).sqrt() * rms[:, None]).float()
    got = m(x).double()
    ref = x.double() @ m.weight64[:m.sizes[0]].t() + m.bias64[:m.sizes[0]]
    assert float(((got - ref).abs().max(-1).values / ref.abs().max(-1).values).max()) < 1e-6
    sent = frames[-1][1].reshape(64, -1)
    norms = sent.norm(dim=-1)
    corr = float(torch.corrcoef(torch.stack([norms, rms]))[0, 1])
    print(f"{name}: padded-row norm vs row RMS over 1e-3..1e1 B: correlation {corr:.3f}, "
          f"norm spread {float(norms.std() / norms.mean()):.3f}")
    assert abs(corr) < 0.4 and float(norms.std() / norms.mean()) < 0.3
    link.shutdown()


def test_worker_refuses_bad_requests_and_keeps_serving(party, tee_protected):
    from stip.common.bundles.manifest import read_manifest

    name, plain, config, tensors, worker = party
    link = WebSocketWorkerLink(worker.url, token=worker.token)
    # the enclave checks at start that the worker serves its own run's bundle (secret bases, LM head placement)
    bundle_id = read_manifest(tee_protected(name) / "enclave", verify=False, trusted=[],
                              warn_unpinned=False)["bundle_id"]
    assert link.info() == {"bundle_id": bundle_id, "lm_head": "enclave" if name == "gpt2" else "worker"}
    link.expect_bundle(bundle_id, name == "gpt2")
    with pytest.raises(WorkerError, match="the TEE worker serves bundle .* this enclave's bundle is 00000000"):
        link.expect_bundle("0" * 32, name == "gpt2")
    with pytest.raises(WorkerError, match="unknown linear 'embed_tokens'"):
        link.linear("embed_tokens", torch.zeros(1, 4, dtype=torch.float64))
    d = tensors[TOKEN_EMBEDDING].shape[1]
    first = "attn.c_attn" if name == "gpt2" else "self_attn.q_proj"  # input width d
    with pytest.raises(WorkerError, match=f"404 unknown linear '{first}\\+{first}'"):
        link.linear(f"{first}+{first}", torch.zeros(1, d, dtype=torch.float64))
    assert link.body("s1", torch.zeros(2, d), 0).shape == (2, d)
    with pytest.raises(WorkerError, match="409 session 's1' holds 2 tokens, but the step starts at 5"):
        link.body("s1", torch.zeros(1, d), 5)
    with pytest.raises(WorkerError, match="404 unknown or expired session"):
        link.body("nope", torch.zeros(1, d), 3)
    with pytest.raises(WorkerError, match="NaN"):
        link.linear(first, torch.full((1, d), float("nan"), dtype=torch.float64))
    if name == "gpt2":  # tied: the worker has no LM head to offer
        with pytest.raises(WorkerError, match="404 unknown linear 'lm_head'"):
            link.linear("lm_head", torch.zeros(1, d, dtype=torch.float64))
    assert link.body("s2", torch.ones(1, d), 0).shape == (1, d)  # still serving
    link.shutdown()
    with pytest.raises(WorkerError, match="cannot open the TEE worker socket"):
        WebSocketWorkerLink(worker.url, token="wrong")


def test_in_process_worker_matches(tee_protected):
    """The same split with the worker in this process (LocalWorkerLink): the benchmark's path; on a TIED LLaMA (MQA),
    whose LM head the enclave computes itself."""
    out = tee_protected("llama-mqa-tied")
    config, tensors = read_enclave_tensors(out)
    worker = TeeWorker.from_bundle(out / "server")
    assert "lm_head" not in worker.linears and bool(tensors[LM_HEAD_IN_ENCLAVE])
    enclave = EnclaveModel.from_tensors(config, tensors, LocalWorkerLink(worker))
    plain = build_tiny("llama-mqa-tied")
    want, want_logits = plain_greedy(plain, PROMPT, 4)
    s = enclave.new_session()
    diff = float((enclave.prefill(s, PROMPT) - want_logits).abs().max())
    enclave.close(s)
    print(f"llama-mqa-tied: max-abs logit difference TEE vs plain {diff:.2e}")
    assert diff < 1e-4
    assert [t for t, _ in enclave.generate(PROMPT, SamplingParams(max_tokens=4), top_logprobs=3)] == want
    top = next(enclave.generate(PROMPT, SamplingParams(max_tokens=1), top_logprobs=3))[1]
    assert len(top) == 3 and top[0][0] == want[0] and top[0][1] <= 0
    head = enclave.lm_head  # in plain vocabulary order: its [V, d] layout is the embedding table itself
    assert head.weight is enclave.token_embedding
    x = torch.randn(5, head.weight_t.shape[0])
    assert torch.allclose(head(x), x @ head.weight_t, atol=1e-5)  # 5 rows: over W; 1 row: over W^T
    assert torch.allclose(head(x[:1]), x[:1] @ head.weight.t(), atol=1e-5)
    long = [(7 * i) % 90 + 3 for i in range(60)]  # its decode steps grow block 0's cache past its first 64 rows
    assert [t for t, _ in enclave.generate(long, SamplingParams(max_tokens=8))] == plain_greedy(plain, long, 8)[0]


def test_block0_cache_grows_in_place():
    """The enclave's block-0 KV cache (stip.enclave.kv_cache): rows written in place in a buffer that doubles (no
    copy of the whole cache per token), capped at the model's positions; the attention gets the same keys and
    values as from transformers' DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    from stip.enclave.kv_cache import GrowingLayer

    grown, ref, gen, caps = GrowingLayer(max_length=150), DynamicLayer(), torch.Generator().manual_seed(0), []
    for n in [40, 1, 1, 30, *[1] * 70, 8]:  # a prompt, decode steps, a chunk: two doublings, then the cap
        k, v = torch.randn(1, 2, n, 4, generator=gen), torch.randn(1, 2, n, 4, generator=gen)
        got, want = grown.update(k, v), ref.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want)) and grown.get_seq_length() == ref.get_seq_length()
        if not caps or caps[-1] != grown._k.shape[-2]:
            caps.append(grown._k.shape[-2])
    assert caps == [64, 128, 150]


def _wait_full(enclave, seconds=30.0):
    import time

    deadline = time.monotonic() + seconds
    while any(p.level < p.capacity for p in enclave.pads.pools.values()) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_pad_pool_serves_steps_and_counts_a_dry_pool(tee_protected):
    """Issue 23 (1): pads and their products come from pools filled in the background; every row is handed out
    once (zeroed in the pool as it leaves) and is a true pad/product pair. A full pool serves a generation without a
    miss; a pool too small for the prompt computes the rest inline and counts it. Greedy equals plain both ways."""
    out = tee_protected("llama-gqa-untied")
    config, tensors = read_enclave_tensors(out)
    worker = TeeWorker.from_bundle(out / "server")
    want, _ = plain_greedy(build_tiny("llama-gqa-untied"), PROMPT, 4)
    enclave = EnclaveModel.from_tensors(config, tensors, LocalWorkerLink(worker))
    try:
        _wait_full(enclave)
        assert enclave.pads.stats()["pools"] == 5  # q/k/v, o, gate/up, down, the untied LM head
        assert [t for t, _ in enclave.generate(PROMPT, SamplingParams(max_tokens=4))] == want
        st = enclave.pads.stats()
        assert st["misses"] == 0 and st["hits"] == 4 * (len(PROMPT) + 3) + 4 and st["hit_rate"] == 1.0
        _wait_full(enclave)
        pool = next(iter(enclave.pads.pools.values()))
        (r1, wr1, got1), (r2, wr2, got2) = pool.take(3, enclave.pads.gen), pool.take(3, enclave.pads.gen)
        assert got1 == got2 == 3 and float(torch.cdist(r1, r2).min()) > 0
        assert torch.allclose(wr1, r1 @ pool.weight64.t()) and torch.allclose(wr2, r2 @ pool.weight64.t())
        first = pool._chunks[0][0]
        assert not first[:pool._offset].any()  # handed out: destroyed in the pool
    finally:
        enclave.shutdown()
    dry = EnclaveModel.from_tensors(config, tensors, LocalWorkerLink(worker), pool_bytes=1)  # one row per pool
    try:
        _wait_full(dry)
        assert [t for t, _ in dry.generate(PROMPT, SamplingParams(max_tokens=4))] == want
        st = dry.pads.stats()
        assert st["misses"] >= 4 * (len(PROMPT) - 1) and 0 < st["hit_rate"] < 1, st
    finally:
        dry.shutdown()


def test_worker_limits(tee_protected):
    """The worker's KV budget and session limit hold for blocks 1..L-1's caches: a 503 to retry, nothing run."""
    from stip.server.tee_worker import TeeWorkerError

    out = tee_protected("gpt2")
    worker = TeeWorker.from_bundle(out / "server", max_sessions=1, kv_budget_tokens=10)
    d = worker.hidden_size
    assert worker.body("a", torch.ones(8, d), 0).shape == (8, d)
    with pytest.raises(TeeWorkerError, match="KV budget of 10 tokens"):
        worker.body("a", torch.ones(3, d), 8)
    with pytest.raises(TeeWorkerError, match="all 1 sessions are in use"):
        worker.body("b", torch.ones(1, d), 0)
    worker.close("a")
    assert worker.body("b", torch.ones(1, d), 0).shape == (1, d)


def _bundle_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _closest(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest distance between a line of `a` and a line of `b` (rows, then columns), each line's absolute
    values sorted: zero iff some line equals another up to signs and the order of its entries."""
    def lines(t):
        return [t.abs().sort(-1).values.double(), t.t().abs().sort(-1).values.double()]

    return min(float(torch.cdist(x, y).min()) for x in lines(a) for y in lines(b) if x.shape[-1] == y.shape[-1])


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied", "llama-mqa-tied"])
def test_worker_bundle_holds_block0_in_secret_bases(tee_protected, name):
    """The TEE worker bundle (DIR/server): signed and marked "tee-worker"; block 0's norms are ones (biases zeros);
    no row or column of its block-0 linears equals a row or column of the standard ones (the enclave's copy), even
    up to signs and reordering; a tied model's LM head is zeros and no line of any tensor in the bundle equals a
    line of the embedding table (plain or permuted) up to sign; an untied LM head is stored as `W A^-1`, no row
    of it equal to a row of the standard LM head."""
    from stip.common import signing
    from stip.common.bundles.manifest import read_manifest
    from stip.common.tee.blocks import block0_layout
    from stip.common.tee.layout import BLOCK_PREFIX, LM_HEAD_PREFIX

    out = tee_protected(name)
    signer = signing.signer_info(signing.load_signing_key(out / "developer" / "signing.key"))
    manifest = read_manifest(out / "server", role="server", trusted=[signing.pin(signer)])
    assert manifest["mode"] == "tee-worker" and manifest["tee_lm_head"] == ("enclave" if name != "llama-gqa-untied"
                                                                            else "worker")
    config, enclave = read_enclave_tensors(out)
    worker = _bundle_tensors(out / "server")
    prefix, _ = block0_layout(config)
    block0 = {k[len(prefix):]: v for k, v in worker.items() if k.startswith(prefix)}
    offloaded = {k[len(MASK_PREFIX):-len(".out.perm")] for k in enclave if k.endswith(".out.perm")}
    linears = {k for k in block0 if k.rpartition(".")[0] in offloaded}
    assert linears and set(block0) - linears, block0.keys()
    for k, w in block0.items():
        standard = enclave[BLOCK_PREFIX + k]
        assert w.shape == standard.shape
        if k not in linears:  # a norm: it runs in the enclave
            assert torch.equal(w, torch.ones_like(w) if k.endswith("weight") else torch.zeros_like(w)), k
        elif w.dim() == 2:
            assert _closest(w, standard) > 1e-4, k
        else:  # a bias: B b, exactly
            out = f"{MASK_PREFIX}{k.rpartition('.')[0]}.out"
            assert torch.equal(w.double(), standard.double()[enclave[out + ".perm"]] * enclave[out + ".scale"]), k
    head = worker["lm_head.weight"]
    if name == "llama-gqa-untied":  # W A^-1: each row reordered and rescaled entry by entry (its columns keep their
        # values up to one sign and power of two each: A acts on the input side only)
        rows = [t.abs().sort(-1).values.double() for t in (head, enclave[LM_HEAD_PREFIX + "weight"])]
        assert float(torch.cdist(*rows).min()) > 1e-4
        return
    assert not head.any()
    table = enclave[TOKEN_EMBEDDING].float()
    for k, t in worker.items():
        if t.dim() == 2 and t.any():
            assert _closest(t, table) > 1e-4 and _closest(t, enclave[LM_HEAD_PREFIX + "weight"]) > 1e-4, k


def test_round_trip_server_refuses_a_tee_worker_bundle(tee_protected, tiny_protected):
    """`stip serve DIR/server` (round trip: the batched engine, as the CLI runs it) refuses the TEE worker bundle
    before serving, naming --tee-worker (a BundleError: the CLI prints it and exits 2); --tee-worker refuses a
    standard server bundle."""
    from stip.errors import BundleError, StipError
    from stip.server.app import run_server
    from stip.server.model import load_protected_model

    out = tee_protected("gpt2")
    assert issubclass(BundleError, StipError)
    with pytest.raises(BundleError, match="written by `stip protect --tee`: serve it with --tee-worker"):
        load_protected_model(out / "server")
    with pytest.raises(BundleError, match="serve it with --tee-worker"):
        run_server(out / "server", host="127.0.0.1", port=1, token=None)
    with pytest.raises(BundleError, match="is not a TEE worker bundle"):
        TeeWorker.from_bundle(tiny_protected("gpt2")[1] / "server")
