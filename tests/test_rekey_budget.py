"""The rekey budget (`stip serve --rekey-after`, issue 20): each context counts the tokens its key served; at 80% the
server warns once, past 100% it refuses new sessions and generations on that context (403 naming the context, the
count, the budget and `stip rekey`) while open sessions finish and other contexts keep serving.

One real `stip serve` on loopback serves three tiny contexts: "rt" (round-trip gpt2), "other" (round-trip llama) and
"sd" (server-decode llama), with --rekey-after 40 and a --usage-file; the real `stip.Client` drives them. A second
server then starts from the same usage file and refuses "rt" at once.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

import stip
from stip.cli.options import parse_count
from stip.client.transport import Connection
from stip.errors import StipError
from stip.server.budget import AdmissionError
from stip.server.key_usage import KeyUsage, read_usage_file, write_usage_file
from tests.models import save_tiny
from tests.parties import isolated_server_bundle, run_serve_expect_exit, serve

TOKEN = "rekey-budget-token"
BUDGET = 40
PROMPT = [5, 17, 42, 8, 66, 3]
NEW_TOKENS = 6


def bundle_id(protected: Path) -> str:
    return json.loads((protected / "server" / "stip-manifest.json").read_text())["bundle_id"]


def served(server, bundle: str) -> float:
    """stip_context_tokens_served_total of one context, from the server's /metrics."""
    match = re.search(rf'^stip_context_tokens_served_total{{bundle="{bundle}"}} (\S+)$', server.metrics(), re.M)
    assert match, f"no token count for context {bundle} in /metrics"
    return float(match.group(1))


def wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


# ------------------------------------------------------------------ without a server


def test_parse_count_takes_the_ways_people_write_token_counts():
    assert [parse_count(x) for x in ("40", "1e6", "1M", "100k", "2.5k", "1_000_000", " 3G ")] == [
        40, 10 ** 6, 10 ** 6, 10 ** 5, 2500, 10 ** 6, 3 * 10 ** 9]
    for bad in ("0", "-5", "1.5", "abc", "", "k", "nan", "inf"):
        with pytest.raises(StipError):
            parse_count(bad, "--rekey-after")


def test_key_usage_warns_once_then_refuses_and_persists(tmp_path, caplog):
    path = tmp_path / "usage.json"
    usage = KeyUsage(10, path)
    assert usage.register("ctx-a") == 0 and read_usage_file(path) == {}  # written at start: the folder takes it
    with caplog.at_level("WARNING", logger="stip.server"):
        usage.add("ctx-a", 7)
        assert not caplog.records
        usage.add("ctx-a", 1)  # 8 of 10: the warning, once
        usage.add("ctx-a", 1)
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "ctx-a" in warnings[0] and "stip rekey" in warnings[0]
        usage.check_open("ctx-a")  # 9 < 10: still open
        usage.add("ctx-a", 1)
    assert read_usage_file(path) == {"ctx-a": 10}  # crossing a threshold writes at once
    with pytest.raises(AdmissionError) as refusal:
        usage.check_open("ctx-a")
    assert refusal.value.status == 403 and refusal.value.reason == "rekey_budget"
    assert all(s in str(refusal.value) for s in ("ctx-a", "10 tokens", "budget of 10", "stip rekey"))
    usage.check_open("ctx-b")  # another context is not affected
    again = KeyUsage(10, path)  # a restart with the same file
    assert again.register("ctx-a") == 10 and again.spent("ctx-a")


def test_a_bad_usage_file_is_refused(tmp_path):
    bad = tmp_path / "usage.json"
    for text in ("not json", json.dumps({"contexts": {"a": 1}}),
                 json.dumps({"format": "stip-key-usage", "contexts": {"a": -1}})):
        bad.write_text(text)
        with pytest.raises(StipError, match="not a STIP usage file"):
            KeyUsage(10, bad)
    write_usage_file(bad, {"a": 3})
    assert KeyUsage(None, bad).served == {"a": 3}


def test_serve_refuses_a_bad_budget_before_loading(tiny_protected):
    protected = tiny_protected("gpt2")[1]
    r = run_serve_expect_exit(protected, "--rekey-after", "lots")
    assert r.returncode != 0 and "--rekey-after: not a number: 'lots'" in r.stderr + r.stdout, r.stderr


# ------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def contexts(tiny_protected, tmp_path_factory) -> dict[str, Path]:
    """name -> protected folder: two round-trip bundles and a server-decode one."""
    root = tmp_path_factory.mktemp("rekey-budget")
    stip.protect(save_tiny("llama-mqa-tied", root / "plain"), root / "sd", progress=False, mode="server-decode")
    return {"rt": tiny_protected("gpt2")[1], "other": tiny_protected("llama-gqa-untied")[1], "sd": root / "sd"}


def _client(contexts, name: str, server) -> stip.Client:
    return stip.Client(contexts[name] / "client", server.url, token=TOKEN)


def test_a_context_past_its_budget_refuses_new_sessions_while_others_serve(contexts, tmp_path):
    usage_file = tmp_path / "usage.json"
    ids = {name: bundle_id(folder) for name, folder in contexts.items()}
    with isolated_server_bundle(contexts["other"]) as other, isolated_server_bundle(contexts["sd"]) as sd, \
            serve(contexts["rt"], str(other), str(sd), "--rekey-after", str(BUDGET), "--usage-file", str(usage_file),
                  token=TOKEN, threads=1) as server:
        rt = _client(contexts, "rt", server)
        assert rt.connection.info()["rekey_after"] == BUDGET
        early = Connection(server.url, token=TOKEN, bundle_id=ids["rt"]).open_session()  # open before the budget
        early.prefill(torch.randn(2, 48))
        warning = f"context {ids['rt']}"
        before_warning = 0
        while warning not in server.log():
            assert served(server, ids["rt"]) < BUDGET, "no warning before the budget was reached"
            rt.generate(ids=PROMPT, max_tokens=NEW_TOKENS)
            before_warning += 1
        assert "stip rekey" in server.log() and before_warning >= 2
        count = served(server, ids["rt"])
        assert 0.8 * BUDGET <= count and count >= before_warning * len(PROMPT)
        last = None
        while served(server, ids["rt"]) < BUDGET:  # a generation that crosses the budget still finishes
            last = rt.generate(ids=PROMPT, max_tokens=NEW_TOKENS)
        assert last is None or last.token_ids
        with pytest.raises(StipError) as refusal:
            rt.generate(ids=PROMPT, max_tokens=NEW_TOKENS)
        count = served(server, ids["rt"])
        message = str(refusal.value)
        assert getattr(refusal.value, "status", None) == 403
        for part in (ids["rt"], f"served {int(count)} tokens", f"budget of {BUDGET}", "stip rekey"):
            assert part in message, message
        assert server.log().count(f"context {ids['rt']}") == 2  # the 80% warning and the refusal notice, once each
        early.decode(torch.randn(48))  # the session opened before the budget keeps running
        early.close()

        other = _client(contexts, "other", server).generate(ids=PROMPT, max_tokens=NEW_TOKENS)  # keeps serving
        assert other.token_ids and served(server, ids["other"]) > 0

        sd = _client(contexts, "sd", server)  # server-decode: POST /v1/generate counts prompt and output
        while served(server, ids["sd"]) < BUDGET:
            sd.generate(ids=PROMPT, max_tokens=NEW_TOKENS)
        with pytest.raises(StipError) as refusal:
            sd.generate(ids=PROMPT, max_tokens=NEW_TOKENS)
        assert getattr(refusal.value, "status", None) == 403 and ids["sd"] in str(refusal.value)

        metrics = server.metrics()
        assert f"stip_rekey_after_tokens {float(BUDGET)}" in metrics
        assert 'stip_admission_refused_total{reason="rekey_budget"} 2.0' in metrics
        listed = {c["bundle_id"]: c for c in json.loads(server._get("/v1/contexts"))["contexts"]}
        assert listed[ids["rt"]]["tokens_served"] == served(server, ids["rt"])
        final = {name: int(served(server, ids[name])) for name in ids}
        wait_for(lambda: read_usage_file(usage_file) == {ids[n]: final[n] for n in ids}, "the usage file")

    with serve(contexts["rt"], "--rekey-after", str(BUDGET), "--usage-file", str(usage_file), token=TOKEN,
               threads=1) as again:  # the count survives the restart: refused at once
        assert served(again, ids["rt"]) == final["rt"]
        with pytest.raises(StipError, match="stip rekey"):
            _client(contexts, "rt", again).generate(ids=PROMPT, max_tokens=NEW_TOKENS)


def test_one_shot_encode_requests_count_and_are_refused_past_the_budget(tmp_path):
    """POST /v1/encode counts B x T rows against its context's key and is refused (403, no retry headers) past it;
    in process (the same routes `stip serve` runs)."""
    from fastapi.testclient import TestClient

    from stip.common import wire
    from stip.server.app import create_app
    from stip.server.engines import load_engine
    from stip.server.service import Settings
    from tests.test_encoders import tiny_encoder

    tiny_encoder("bert-model", tmp_path / "plain")
    stip.protect(tmp_path / "plain", tmp_path / "p", progress=False)
    engine = load_engine("transformers", tmp_path / "p" / "server", dtype=torch.float32, device="cpu")
    bundle = engine.manifest["bundle_id"]
    frame = wire.encode_frame({"op": "encode", "dtype": "float32", "shape": [2, 3, engine.hidden_size]},
                              wire.tensor_bytes(torch.randn(2, 3, engine.hidden_size)))
    with TestClient(create_app(engine, Settings(rekey_after=10), bundle)) as http:
        assert http.post(wire.ENCODE_PATH, content=frame).status_code == 200  # 6 rows
        assert http.post(wire.ENCODE_PATH, content=frame).status_code == 200  # 12: past 10, but admitted at 6
        refused = http.post(wire.ENCODE_PATH, content=frame)
        assert refused.status_code == 403 and f"context {bundle} has served 12 tokens" in refused.json()["error"]
        assert "retry-after" not in refused.headers and "www-authenticate" not in refused.headers
        assert f'stip_context_tokens_served_total{{bundle="{bundle}"}} 12.0' in http.get("/metrics").text
