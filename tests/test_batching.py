"""Continuous batching: the batched engine, the tick scheduler, and `stip serve` (batching by default).

Lossless as vLLM's model tests define it: under batching, greedy output equals plain `generate`; where a near-tie
flips a token, the plain token is in the batched top 5 (and the sequences are compared up to there). Each test also
reports the largest logit difference between the batched run and solo runs of the same tokens.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from stip.client.bundle import ClientBundle
from stip.client.transport import Connection, Downlink
from stip.reference import plain_greedy
from stip.server.batching import BatchedEngine
from stip.server.decoder import FAMILIES
from stip.server.engine import Step, TransformersEngine
from stip.server.scheduler import Scheduler
from tests.models import build_tiny, tiny_configs
from tests.parties import ServerPipeline, run_serve_expect_exit, serve

TOKEN = "batching-token-51c2"
TOP = 5


def tiny(name: str):
    """A tiny model whose `generate` never stops early (its config's eos id may be any token)."""
    model = build_tiny(name)
    model.generation_config.eos_token_id = None
    return model


def embed(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(torch.as_tensor(ids, dtype=torch.long)).float()


def run_schedule(engine, model, plan: list[tuple[list[int], int, int]]):
    """plan: (prompt ids, tick the session joins at, tokens to generate). Every tick is one `step_batch` over the
    sessions active in it: a session prefills when it joins, decodes one token per tick, and leaves (frees its
    state) once done, so the batch changes shape every few ticks. Returns per session (tokens, per-step logits)."""
    n = len(plan)
    states = [None] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    logits: list[list[torch.Tensor]] = [[] for _ in range(n)]
    tick = 0
    while any(len(tokens[i]) < plan[i][2] for i in range(n)):
        active = [i for i in range(n) if plan[i][1] <= tick and len(tokens[i]) < plan[i][2]]
        steps = []
        for i in active:
            if states[i] is None:
                states[i] = engine.new_state()
                steps.append(Step(states[i], embed(model, plan[i][0]), "last"))
            else:
                steps.append(Step(states[i], embed(model, tokens[i][-1:]), "last"))
        for i, out in zip(active, engine.step_batch(steps)):
            assert not isinstance(out, BaseException), out
            logits[i].append(out[-1])
            tokens[i].append(int(out[-1].argmax()))
            if len(tokens[i]) == plan[i][2]:
                engine.free(states[i])
        tick += 1
    return tokens, logits


def solo_logits(model, prompt: list[int], generated: list[int]) -> list[torch.Tensor]:
    """The serial reference engine, alone, fed the same tokens: logits at every step."""
    ref = TransformersEngine(model)
    s = ref.new_state()
    out = [ref.prefill(s, embed(model, prompt))[-1]]
    for t in generated[:-1]:
        out.append(ref.decode(s, embed(model, [t]))[-1])
    return out


def check_lossless(model, plan, tokens, logits, stop_ids=None) -> float:
    """Greedy equals plain `generate` (or the plain token is in the batched top 5 where they first differ);
    returns the largest |logit| difference between batched and solo runs of the same tokens."""
    worst = 0.0
    for (prompt, _, n), got, steps in zip(plan, tokens, logits):
        plain = plain_greedy(model, prompt, n, stop_ids)
        for k, (a, b) in enumerate(zip(got, plain)):
            if a != b:
                top = torch.topk(steps[k], TOP).indices.tolist()
                assert b in top, f"step {k}: plain token {b} not in the batched top {TOP} {top}"
                break
        solo = solo_logits(model, prompt, got)
        worst = max(worst, max(float((x - y).abs().max()) for x, y in zip(steps, solo)))
    return worst


# Sessions of different lengths joining at ticks 0, 0, 2, 3 and 5 and leaving after 4 to 10 tokens.
PLAN = [([5, 17, 42, 8, 66, 3, 21], 0, 10), ([90, 1, 2], 0, 4), ([33, 33, 12, 70, 4, 9, 15, 27, 60, 11, 2], 2, 8),
        ([7], 3, 6), ([40, 41, 42, 43], 5, 7)]


# the families the batched engine runs (stip serve serves the others one step at a time)
BATCHED = [name for name, (_, config) in tiny_configs().items() if config.model_type in FAMILIES]


@pytest.mark.parametrize("name", BATCHED)
def test_sessions_joining_and_leaving_match_plain_generate(name):
    model = tiny(name)
    engine = BatchedEngine(model)
    tokens, logits = run_schedule(engine, model, PLAN)
    worst = check_lossless(model, PLAN, tokens, logits)
    print(f"{name}: max |logit| difference batched vs solo = {worst:.3g}")
    assert worst < 1e-3, f"{name}: max |logit| difference batched vs solo = {worst:.3g}"


def test_prefill_chunks_and_all_positions_match_one_forward():
    model = tiny("llama-gqa-untied")
    ref, engine = TransformersEngine(model), BatchedEngine(model)
    x = embed(model, torch.arange(40) % 97)
    want = ref.prefill(ref.new_state(), x, all_positions=True)
    s = engine.new_state()
    got = [engine.step_batch([Step(s, x[i:i + 9], "all")])[0] for i in range(0, 40, 9)]
    assert engine.length(s) == 40
    diff = float((torch.cat(got) - want).abs().max())
    assert diff < 1e-4, diff


def test_bad_row_fails_alone():
    model = tiny("qwen2-bias-tied")
    engine = BatchedEngine(model)
    good, freed, full = engine.new_state(), engine.new_state(), engine.new_state()
    engine.free(freed)
    engine.prefill(full, embed(model, torch.arange(120) % 97))  # the model's limit is 128 positions
    x = embed(model, [1, 2, 3])
    out = engine.step_batch([Step(freed, x), Step(good, x), Step(engine.new_state(), torch.zeros(3, 5)),
                             Step(full, embed(model, torch.arange(9)))])
    assert isinstance(out[0], RuntimeError) and "freed" in str(out[0])
    assert isinstance(out[2], ValueError) and "[T >= 1, 48]" in str(out[2])
    assert isinstance(out[3], ValueError) and "limit is 128" in str(out[3])
    want = TransformersEngine(model).prefill(TransformersEngine(model).new_state(), x)
    assert float((out[1] - want).abs().max()) < 1e-4
    assert engine.length(good) == 3 and engine.length(full) == 120


@pytest.mark.parametrize("inner", ["batched", "serial"])
def test_scheduler_concurrent_threads_get_solo_results(inner):
    """Threads calling prefill/decode at once (as the server's step threads do) get what a solo run gives; the
    serial engine works under the scheduler through the default `step_batch`."""
    model = tiny("mistral-gqa")
    engine = BatchedEngine(model) if inner == "batched" else TransformersEngine(model)
    sched = Scheduler(engine, chunk_tokens=8)
    results, errors = {}, []

    def run(i, prompt):
        try:
            s = sched.new_state()
            out = [int(sched.prefill(s, embed(model, prompt))[-1].argmax())]
            for _ in range(7):
                out.append(int(sched.decode(s, embed(model, out[-1:]))[-1].argmax()))
            sched.free(s)
            results[i] = out
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=run, args=(i, p)) for i, (p, _, _) in enumerate(PLAN)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sched.close()
    assert not errors, errors
    for i, (prompt, _, _) in enumerate(PLAN):
        assert results[i] == plain_greedy(model, prompt, 8), f"session {i}"
    if inner == "batched":
        assert sched.ticks < len(PLAN) * 8, "steps of concurrent sessions should have shared ticks"


def test_long_prefill_does_not_stall_decodes():
    """A 120-token prefill with 8-token chunks takes 15 ticks; a decoding session keeps getting tokens meanwhile."""
    model = tiny("llama-mqa-tied")
    sched = Scheduler(BatchedEngine(model), chunk_tokens=8)
    try:
        dec = sched.new_state()
        tok = int(sched.prefill(dec, embed(model, [3, 1, 4]))[-1].argmax())
        long_x = embed(model, torch.arange(120) % 97)
        long_state = sched.new_state()
        fut = sched.submit(long_state, long_x, all_positions=True)
        decodes_during = 0
        while not fut.done():
            tok = int(sched.decode(dec, embed(model, [tok]))[-1].argmax())
            if not fut.done():
                decodes_during += 1
        logits = fut.result(timeout=60)
    finally:
        sched.close()
    assert decodes_during >= 3, f"only {decodes_during} decodes finished while the long prefill ran"
    ref = TransformersEngine(model)
    want = ref.prefill(ref.new_state(), long_x, all_positions=True)
    assert logits.shape == want.shape and float((logits - want).abs().max()) < 1e-4


def test_scheduler_gathers_the_sessions_of_the_last_tick():
    """Round-trip clients send their next step a moment after their reply (here 5-15 ms apart): the tick thread
    waits for the sessions of the last tick within its gather window, so 4 sessions share ticks instead of running
    a tick each; stats() counts what ran."""
    model = tiny("llama-gqa-untied")
    sched = Scheduler(BatchedEngine(model), gather=100.0, gather_max_s=0.2)  # window: 0.2 s, whatever the tick costs
    steps, rows = 6, []
    sched.add_tick_observer(rows.append)
    assert sched.stats() == {"engine": "transformers (batched)", "mode": "round-trip", "batch_size": 0, "queue": 0,
                             "running": 0, "ticks": 0, "rows_per_tick_avg": 0.0}

    def run(i):
        s = sched.new_state()
        tok = int(sched.prefill(s, embed(model, PLAN[i][0]))[-1].argmax())
        for _ in range(steps):
            time.sleep(0.005 * (i + 1))  # the client's round trip: each session comes back at its own time
            tok = int(sched.decode(s, embed(model, [tok]))[-1].argmax())
        sched.free(s)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = sched.stats()
    finally:
        sched.close()
    assert sum(rows) == 3 * (steps + 1) and stats["ticks"] == len(rows)
    assert len(rows) <= steps + 3, f"ticks of {rows} rows for 3 sessions x {steps + 1} steps: not gathered"
    assert stats["batch_size"] == rows[-1] and stats["queue"] == 0 and stats["running"] == 0
    assert 1 < stats["rows_per_tick_avg"] <= 3


def test_scheduler_failure_of_one_session_leaves_others():
    model = tiny("gpt2")
    sched = Scheduler(BatchedEngine(model))
    try:
        a, b = sched.new_state(), sched.new_state()
        sched.prefill(a, embed(model, [1, 2]))
        sched.free(b)
        bad = sched.submit(b, embed(model, [3]))
        good = sched.submit(a, embed(model, [3]))
        with pytest.raises(RuntimeError, match="freed"):
            bad.result(timeout=60)
        assert good.result(timeout=60).shape == (1, model.config.vocab_size)
        assert sched.length(a) == 3
    finally:
        sched.close()


# ------------------------------------------------------------------ a real server


def remote_greedy(conn, client: ClientBundle, prompt: list[int], n: int, downlink: Downlink) -> list[int]:
    with conn.open_session() as s:
        r = s.prefill(client.embed(torch.tensor(prompt)), downlink=downlink)
        out = []
        while True:
            ids = r.logits[-1] if r.logits is not None else None
            out.append(int(client.plain_logits(ids).argmax()) if ids is not None
                       else int(client.plain_ids(r.indices[-1, 0])))
            if len(out) == n:
                return out
            r = s.decode(client.embed(torch.tensor(out[-1:]), start=s.position), downlink=downlink)


def metric(text: str, name: str) -> float:
    """One sample's value from a Prometheus text page (the line that starts with `name`)."""
    return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])


BATCHED_SERVERS = ["llama-gqa-untied", "gpt2"]


@pytest.fixture(scope="module")
def servers(tiny_protected):
    """The module's servers (each test its own), the next starting while a test runs (ServerPipeline)."""
    bundle = lambda name: tiny_protected(name)[1]  # noqa: E731
    starts = {name: (lambda out=bundle(name): serve(out, token=TOKEN, threads=1)) for name in BATCHED_SERVERS}
    starts["gpt2 --no-batching"] = lambda out=bundle("gpt2"): serve(out, "--no-batching", token=TOKEN, threads=1)
    pipeline = ServerPipeline(starts)
    yield pipeline
    pipeline.close()


@pytest.mark.parametrize("name", BATCHED_SERVERS)
def test_server_batches_by_default_four_concurrent_clients(tiny_protected, servers, name):
    """The default `stip serve`: four concurrent clients get plain greedy; /health shows the engine and its load
    while they run, /metrics the rows per tick (more than one row in some tick), nothing per client."""
    plain_dir, protected_dir = tiny_protected(name)
    model = tiny(name)
    client = ClientBundle.load(protected_dir / "client")
    prompts = [p for p, _, _ in PLAN[:4]]
    results, errors, seen = {}, [], []
    with servers.use(name) as server:
        conn = Connection(server.url, token=TOKEN)
        idle = server.health()

        def run(i):
            try:
                dl = Downlink("topk", 3) if i % 2 else Downlink("logits")
                results[i] = remote_greedy(conn, client, prompts[i], 12, dl)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            seen.append(server.health())
            time.sleep(0.01)
        for t in threads:
            t.join(180)
        metrics, log = server.metrics(), server.log()
    assert not errors, f"{errors}\n{log[-2000:]}"
    assert "engine transformers (batched)" in log
    for i, prompt in enumerate(prompts):
        assert results[i] == plain_greedy(model, prompt, 12), f"client {i}"
    assert idle == {"status": "ok", "engine": "transformers (batched)", "mode": "round-trip", "batch_size": 0,
                    "queue": 0}
    assert all(set(h) == set(idle) and h["engine"] == idle["engine"] for h in seen)
    assert max(h["batch_size"] for h in seen) > 1, seen
    ticks, rows = metric(metrics, "stip_engine_tick_rows_count"), metric(metrics, "stip_engine_tick_rows_sum")
    assert rows == 4 * 12 and ticks < rows, f"{rows} rows in {ticks} ticks"
    assert metric(metrics, 'stip_engine_tick_rows_bucket{le="1.0"}') < ticks  # some tick ran more than one row
    assert 'stip_engine_info{engine="transformers (batched)",mode="round-trip"} 1.0' in metrics
    for gauge in ("stip_engine_batch_size", "stip_engine_queue", "stip_engine_running"):
        assert metric(metrics, gauge + " ") >= 0


def test_server_no_batching_is_serial(tiny_protected, servers):
    _, protected_dir = tiny_protected("gpt2")
    with servers.use("gpt2 --no-batching") as server:
        conn = Connection(server.url, token=TOKEN)
        client = ClientBundle.load(protected_dir / "client")
        assert remote_greedy(conn, client, PLAN[0][0], 3, Downlink("topk", 3)) == plain_greedy(tiny("gpt2"),
                                                                                              PLAN[0][0], 3)
        health, metrics = server.health(), server.metrics()
    assert health == {"status": "ok", "engine": "transformers (serial)", "mode": "round-trip", "batch_size": 1,
                      "queue": 0}
    assert 'stip_engine_info{engine="transformers (serial)",mode="round-trip"} 1.0' in metrics
    assert metric(metrics, "stip_engine_tick_rows_count") == 0  # no ticks: one forward per step


# ------------------------------------------------------------------ SmolLM2


@pytest.mark.slow
def test_smollm2_batched_matches_generate(smollm2_plain):
    """The figure docs/batching.md records: SmolLM2-135M-Instruct, fp32, five sessions joining and leaving."""
    model, tok = smollm2_plain
    texts = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain photosynthesis step by step.", "List three prime numbers.", "Hi!"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for t in texts]
    plan = [(p, join, n) for p, join, n in zip(prompts, (0, 0, 2, 3, 5), (24, 10, 20, 12, 16))]
    t0 = time.perf_counter()
    tokens, logits = run_schedule(BatchedEngine(model), model, plan)
    worst = check_lossless(model, plan, tokens, logits)
    print(f"SmolLM2: max |logit| difference batched vs solo = {worst:.3g} ({time.perf_counter() - t0:.1f} s)")
    assert worst < 1e-2, f"max |logit| difference batched vs solo = {worst:.3g}"


def test_unknown_engine_is_a_clear_cli_error(tiny_protected):
    _, protected_dir = tiny_protected("gpt2")
    r = run_serve_expect_exit(protected_dir, "--engine", "warp")
    assert r.returncode != 0
    assert "unknown engine 'warp'; expected one of transformers, vllm" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout
