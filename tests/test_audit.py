"""`stip serve --capture` and `stip audit` end to end, on a tiny LLaMA protected in code, with real server processes.

- the capture holds exactly the rows each client sent, per session, with two sessions batched and prompts cut into
  prefill chunks, and the last layer's captured state reproduces the logits the client got;
- a server without --capture writes nothing and says nothing about capture;
- run_audit through a real capturing server: the report files exist and parse, plots are linked, an attack that
  raises is reported as an error while the others run, a missing attack module is "not implemented";
- the CLI names a missing bundle, a folder that is not a protected one, and a non-empty report folder.
"""

from __future__ import annotations

import json
import sys
import threading
import types

import pytest
import torch

from stip.client.bundle import ClientBundle
from stip.client.transport import Connection, Downlink
from tests.models import build_tiny
from tests.parties import ServerPipeline, serve

NAME = "llama-gqa-untied"  # 3 layers, d = 48, vocab 97, no tokenizer
TOKEN = "audit-test"


@pytest.fixture(scope="module")
def protected(tiny_protected):
    return tiny_protected(NAME)


@pytest.fixture(scope="module")
def servers(protected, tmp_path_factory):
    """A capturing server (layers 0 and -1, prefill chunks of 8 tokens) and a plain one, started side by side."""
    root = tmp_path_factory.mktemp("capture")
    _, out = protected
    pipeline = ServerPipeline({
        "on": lambda: serve(out, "--capture", str(root / "cap"), "--capture-layers", "0,-1", "--prefill-chunk", "8",
                            token=TOKEN),
        "off": lambda: serve(out, token=TOKEN, env={"TMPDIR": str(root / "tmp")}),
    })
    (root / "tmp").mkdir()
    yield pipeline, root
    pipeline.close()


def _session(url: str, x: torch.Tensor, decode: torch.Tensor, out: dict, key: str) -> None:
    conn = Connection(url, token=TOKEN)
    with conn.open_session() as s:
        prefill = s.prefill(x, positions="all", downlink=Downlink("logits"))
        step = s.decode(decode, downlink=Downlink("logits"))
    out[key] = (prefill.logits, step.logits)


def test_capture_holds_what_each_client_sent(protected, servers):
    from stip.audit.capture import read_capture, read_index
    from stip.server.model import load_protected_model

    _, out = protected
    pipeline, root = servers
    client = ClientBundle.load(out / "client")
    prompts = {"a": torch.arange(3, 23) % 97, "b": torch.arange(40, 53) % 97}  # 20 and 13 tokens: 3 and 2 chunks
    rows = {k: client.embed(ids) for k, ids in prompts.items()}
    nxt = {k: client.embed(torch.tensor([t]), start=len(prompts[k])) for k, t in (("a", 7), ("b", 9))}
    got: dict = {}
    with pipeline.use("on") as server:
        threads = [threading.Thread(target=_session, args=(server.url, rows[k], nxt[k], got, k)) for k in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert "capture is ON" in server.log() and str(root / "cap") in server.log()
    assert set(got) == {"a", "b"}

    index = read_index(root / "cap")
    observations = read_capture(root / "cap")
    assert [e["seq"] for e in index] == list(range(4))
    assert sorted(e["kind"] for e in index) == ["decode", "decode", "prefill", "prefill"]
    assert len({e["session"] for e in index}) == 2
    model, _ = load_protected_model(out / "server")
    for obs in observations:
        assert set(obs.hidden) == {0, 2}  # -1 is the last of 3 layers
        key = "a" if any(torch.equal(obs.inputs, r) for r in (rows["a"], nxt["a"])) else "b"
        sent = rows[key] if obs.meta["kind"] == "prefill" else nxt[key]
        assert torch.equal(obs.inputs, sent), "the capture must hold exactly the rows the client sent"
        assert obs.meta["start"] == (0 if obs.meta["kind"] == "prefill" else len(prompts[key]))
        assert obs.hidden[2].shape == sent.shape
        with torch.no_grad():  # the server's own last state gives the logits the client received
            logits = model.lm_head(model.model.norm(obs.hidden[2]))
        received = got[key][0] if obs.meta["kind"] == "prefill" else got[key][1]
        torch.testing.assert_close(logits, received, atol=1e-4, rtol=1e-4)
    for f in (root / "cap").iterdir():
        assert f.stat().st_mode & 0o077 == 0, f"{f.name} must be owner-only"


def test_no_capture_writes_nothing(protected, servers):
    import stip

    _, out = protected
    pipeline, root = servers
    before = sorted(p.name for p in (out / "server").iterdir())
    with pipeline.use("off") as server:
        gen = stip.Client(out / "client", server.url, token=TOKEN).generate(ids=[5, 6, 7, 8], max_tokens=3)
        assert len(gen.token_ids) == 3
        assert "capture" not in server.log().lower()
    assert list((root / "tmp").iterdir()) == []
    assert sorted(p.name for p in (out / "server").iterdir()) == before


def test_serial_engine_capture(protected, tmp_path):
    """`stip serve --no-batching`'s engine records through layer hooks: the same rows and states; bad layers refused."""
    from stip.audit.capture import read_capture
    from stip.errors import StipError
    from stip.server.capture import enable_capture
    from stip.server.engines import load_engine

    _, out = protected
    client = ClientBundle.load(out / "client")
    engine = load_engine("transformers", out / "server", batching=False)
    with pytest.raises(StipError, match="out of range"):
        enable_capture(engine, tmp_path / "bad", [3])
    engine = enable_capture(engine, tmp_path / "cap", [-1])
    state = engine.new_state()
    x, nxt = client.embed(torch.arange(10, 19)), client.embed(torch.tensor([4]), start=9)
    logits = engine.prefill(state, x, all_positions=True)
    step = engine.decode(state, nxt)
    engine.free(state)
    first, second = read_capture(tmp_path / "cap")
    assert torch.equal(first.inputs, x) and torch.equal(second.inputs, nxt)
    assert (first.meta["kind"], second.meta["kind"], second.meta["start"]) == ("prefill", "decode", 9)
    model = engine.engine.model
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model.model.norm(first.hidden[2])), logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.lm_head(model.model.norm(second.hidden[2])), step, atol=1e-4, rtol=1e-4)


def test_capture_refusals(protected, tmp_path):
    """Refused before serving, naming the problem: layers without a folder, another engine, a non-empty folder."""
    from stip.errors import StipError
    from stip.server.app import run_server

    _, out = protected
    with pytest.raises(StipError, match="needs --capture"):
        run_server(out / "server", capture_layers="0")
    with pytest.raises(StipError, match="transformers engine"):
        run_server(out / "server", capture=tmp_path / "c", engine_kind="vllm")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "index.jsonl").write_text("")
    with pytest.raises(StipError, match="not empty"):
        run_server(out / "server", capture=tmp_path / "used")
    with pytest.raises(StipError, match="comma-separated"):
        run_server(out / "server", capture=tmp_path / "c2", capture_layers="first")


def _broken(ctx):
    raise RuntimeError("this attack is broken on purpose")


def test_run_audit_end_to_end(protected, tmp_path, monkeypatch):
    """The table command on the tiny model (a mode stip protect refuses is skipped, saying so); its paper row is
    run_audit through a real capturing server, whose report is checked here."""
    from bench import audit_table
    from stip.audit import attacks as registry
    from stip.audit import run as audit_run
    from stip.audit.capture import read_capture

    plain, out = protected
    names = registry.ATTACKS + ("broken", "ghost")
    monkeypatch.setattr(registry, "ATTACKS", names)
    monkeypatch.setattr(audit_run, "ATTACKS", names)
    monkeypatch.setitem(sys.modules, "stip.audit.attacks.broken",
                        types.SimpleNamespace(NAME="broken", TITLE="A broken attack", run=_broken))
    chosen = ["known_plaintext", "vocab_matching", "distance_correlation", "broken", "ghost"]
    table = audit_table.main(["--model", str(plain), "--modes", "paper,nonsense", "--quick", "--attacks",
                              ",".join(chosen), "--prompts", "3", "--prompt-tokens", "12", "--keep-capture",
                              "--out", str(tmp_path)])
    report_dir = tmp_path / "paper"
    on_disk = json.loads((report_dir / "report.json").read_text())
    assert on_disk["mode"] == table["rows"][0]["report"]["mode"] == "paper"
    by_name = {a["name"]: a for a in on_disk["attacks"]}
    assert list(by_name) == chosen
    assert by_name["known_plaintext"]["recovery"] == 1.0  # one (x, x p) pair gives the paper's p
    assert by_name["vocab_matching"]["recovery"] >= 0.95
    assert by_name["broken"]["skipped"].startswith("error: RuntimeError: this attack is broken on purpose")
    assert by_name["ghost"]["skipped"] == "not implemented"
    traffic = on_disk["traffic"]
    assert (traffic["prompts"], traffic["observations"], traffic["rows"]) == (3, 6, 3 * 13)

    md = (report_dir / "report.md").read_text()
    assert "error: RuntimeError" in md and "not implemented" in md
    pngs = sorted(p.name for p in report_dir.glob("*.png"))
    assert pngs and all(f"]({name})" in md for name in pngs)

    # the driver's truth: its prompts, whose rows the server got under a signed permutation (same sorted |values|)
    table_rows = build_tiny(NAME).get_input_embeddings().weight.detach()
    prompts = audit_run.prompt_ids(audit_run.CharTokenizer(table_rows.shape[0]), 3, 12)
    prefills = [o for o in read_capture(report_dir / "capture") if o.meta["kind"] == "prefill"][:3]
    assert [o.inputs.shape[0] for o in prefills] == [12, 12, 12]
    for obs, ids in zip(prefills, prompts):
        torch.testing.assert_close(obs.inputs.abs().sort(-1).values, table_rows[ids].abs().sort(-1).values)

    # the table: the paper row measured through the real server (lossless), the unknown mode skipped
    paper, nonsense = table["rows"]
    assert paper["quality"]["top1_agreement"] == 1.0 and abs(paper["quality"]["ppl_change"]) < 1e-4
    assert "unknown hardening option" in nonsense["skipped"] or "no hardened modes" in nonsense["skipped"]
    text = (tmp_path / "table.md").read_text()
    assert "| paper | 100.0% |" in text and "skipped:" in text and "Hidden No More" in text
    on_disk_table = json.loads((tmp_path / "table.json").read_text())
    assert on_disk_table["modes"] == ["paper", "nonsense"] and on_disk_table["complete"]
    assert on_disk_table["rows"][0]["run"]["commit"] == on_disk_table["commit"]

    # --resume keeps the audited mode (nothing re-run: the report on disk is untouched) and tries the other again;
    # a table from other settings is refused by name
    stamp = (report_dir / "report.json").stat().st_mtime_ns
    same = ["--model", str(plain), "--modes", "paper,nonsense", "--quick", "--attacks", ",".join(chosen),
            "--prompts", "3", "--prompt-tokens", "12", "--out", str(tmp_path), "--resume"]
    again = audit_table.main(same)
    assert again["rows"][0]["report"] == paper["report"] and "skipped" in again["rows"][1]
    assert (report_dir / "report.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="from another run"):
        audit_table.main([*same, "--budget", "7"])


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`stip audit ARGS` through the CLI's own entry point (in process: these fail before any server starts)."""
    from stip.cli import main

    monkeypatch.setattr(sys, "argv", ["stip", "audit", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


def test_cli_errors(protected, tmp_path, monkeypatch, capsys):
    _, out = protected
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.md").write_text("x")
    cases = {
        "missing": ((str(tmp_path / "nope"), "--out", str(tmp_path / "r1")), "does not exist"),
        "not protected": ((str(out / "server"), "--out", str(tmp_path / "r2")), "has no server bundle"),
        "non-empty out": ((str(out), "--out", str(full)), "pass --force"),
        "unknown attack": ((str(out), "--out", str(tmp_path / "r3"), "--attacks", "nope"), "unknown attack"),
    }
    for what, (args, message) in cases.items():
        code, stderr = _cli(monkeypatch, capsys, *args)
        assert code == 2, (what, stderr)
        assert message in stderr and "Traceback" not in stderr, (what, stderr)
    assert (full / "old.md").read_text() == "x"
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists()
