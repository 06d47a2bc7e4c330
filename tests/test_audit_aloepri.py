"""`stip audit` and the privacy frontier on AloePri's server-decode bundles (issue 21, items 3-4), on a tiny random
LLaMA (3 layers, d = 48, vocab 97, no tokenizer: one id per character):

- bench.audit_table with AloePri modes in its mode list: the capture of a server-decode bundle through a real
  `stip serve --capture` (the server's own embedding rows of the ids it got), the attacks on it, and the accuracy
  cost through the real server and client (`stip.Client.score`, the server's prompt log-probabilities). With the
  exact knobs (no expansion, orthogonal key, no noise) the attacks that solve for an orthogonal transform get
  every token, as on the paper's scheme, and the quality is the plain model's; with the d + 2h expansion they report
  that they do not apply (never a silent 0%), and the key-invariant product (the keys cancel in embedding x LM
  head) still gets every token without noise;
- POST /v1/generate's prompt_logprobs against the checkpoint run in-process, and its refusal over max_all_logits;
- bench.frontier on that table: x, y, the goal check, the published points, the files.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.models import save_tiny

NAME = "llama-gqa-untied"
EXACT = "aloepri:h=0,lambda=0,alpha_e=0,alpha_h=0,beta=1"
WIDE = "aloepri:alpha_e=0,alpha_h=0"  # the paper's expansion and key, no noise
ATTACKS = "known_plaintext,bundle_keys,gram_congruence,key_invariants,ridge_inversion,vocab_matching"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from bench import audit_table

    root = tmp_path_factory.mktemp("aloepri-audit")
    plain = save_tiny(NAME, root / "plain")
    out = root / "table"
    t = audit_table.main(["--model", str(plain), "--modes", f"{EXACT},{WIDE}", "--quick", "--attacks", ATTACKS,
                          "--prompts", "3", "--prompt-tokens", "12", "--heldout-tokens", "48", "--window", "24",
                          "--out", str(out)])
    return t, out, plain


def _attacks(row) -> dict:
    return {a["name"]: a for a in row["report"]["attacks"]}


def test_modes_parse_with_their_knobs():
    from bench.audit_modes import Mode, parse_mode, split_modes

    assert split_modes(f"paper,{EXACT},all+noise=0.01,aloepri") == ["paper", EXACT, "all+noise=0.01", "aloepri"]
    assert split_modes("aloepri:h=0;mix") == ["aloepri:h=0", "mix"]
    assert split_modes(f"{WIDE}+head=client,head=client") == [f"{WIDE}+head=client", "head=client"]
    assert parse_mode(WIDE) == Mode(aloepri="alpha_e=0,alpha_h=0")
    assert parse_mode("all+noise=0.3+head=client") == Mode(("all",), 0.3, None, "client")


def test_aloepri_rows(table):
    t, out, _ = table
    exact, wide = t["rows"]
    assert exact["mode"] == EXACT and wide["mode"] == WIDE
    assert exact["report"]["mode"] == "aloepri:alpha_e=0,alpha_h=0,beta=1,h=0,lambda=0"
    assert wide["report"]["mode"] == "aloepri:alpha_e=0,alpha_h=0"  # h fitted to the heads is the default's
    assert exact["report"]["traffic"]["rows"] == 3 * 13  # prompt + the one token fed back, per request

    a = _attacks(exact)  # an orthogonal d x d key: the transform-solving attacks get every token
    assert a["gram_congruence"]["recovery"] == 1.0 and a["key_invariants"]["recovery"] == 1.0
    assert a["known_plaintext"]["skipped"].startswith("server-decode bundle")
    assert a["bundle_keys"]["skipped"].startswith("AloePri's residual key is a dense")
    assert exact["quality"]["top1_agreement"] == 1.0 and abs(exact["quality"]["ppl_change"]) < 1e-3
    assert exact["quality"]["max_logprob_diff"] < 1e-3 and "Client.score" in exact["quality"]["path"]

    a = _attacks(wide)
    for name in ("gram_congruence", "vocab_matching"):
        assert "d + 2h" in a[name]["skipped"] and a[name]["recovery"] is None, a[name]
    assert a["key_invariants"]["recovery"] >= 0.95  # P Q = I: embedding x head is the public product, permuted
    assert a["key_invariants"]["details"]["profiles"]["form"] == "public folded"
    assert a["ridge_inversion"]["recovery"] is not None and a["ridge_inversion"]["details"]["hidden"] > 48
    assert wide["quality"]["top1_agreement"] < 1.0  # kappa's approximation costs accuracy

    text = (out / "table.md").read_text()
    assert f"| {WIDE} | n/a | n/a | n/a |" in text


def test_prompt_logprobs_through_the_server(table, tmp_path):
    """Client.score on a server-decode bundle: the server checkpoint's own log_softmax; too long: 413."""
    from transformers import AutoModelForCausalLM

    from bench.audit_modes import protect_mode
    from stip.client.errors import StipServerError
    from stip.client.sdk import Client
    from tests.parties import serve

    _, _, plain = table
    assert protect_mode(str(plain), tmp_path / "b", WIDE) is None
    server_model = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "server", dtype=torch.float32).eval()
    ids = [5, 17, 3, 88, 42, 9, 61, 23]
    with serve(tmp_path / "b", "--max-all-logits", str(10 * 97), token="t") as server:
        client = Client(tmp_path / "b" / "client", server.url, token="t")
        scores = client.score(ids=ids, top=2)
        with pytest.raises(StipServerError, match="max_all_logits") as e:
            client.score(ids=list(range(12)), top=1)
        assert e.value.status == 413
    sent = torch.as_tensor(client.bundle.server_ids(ids))  # the light client answers in numpy
    with torch.no_grad():
        ref = torch.log_softmax(server_model(sent[None]).logits[0].float(), -1)
    assert scores[0] is None
    for p, s in enumerate(scores[1:]):
        assert s.token_id == ids[p + 1] and abs(s.logprob - float(ref[p, sent[p + 1]])) < 1e-4
        assert [t for t, _ in s.top] == client.bundle.plain_ids(ref[p].topk(2).indices).tolist()


def test_frontier(table, tmp_path):
    from bench import frontier

    _, out, _ = table
    result = frontier.main([str(out / "table.json"), "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {"frontier.md", "frontier.json", "frontier.png"}
    exact, wide = result["points"]
    assert exact["levels"]["exact"]["max_recovery"] == 1.0 and exact["top1_disagreement"] == 0.0
    assert exact["compute"]["ratio"] == 1.0
    assert wide["compute"]["ratio"] == pytest.approx((48 + 2 * 129) / 48)  # h 128 fitted to 6 heads: 129
    assert "gram_congruence" in wide["levels"]["exact"]["not_applicable"]
    assert wide["goal"]["met"] is False and exact["goal"]["recovery"] is None  # no level base in this table
    assert result["verdict"].startswith("**Goal not checked**")
    md = (tmp_path / "frontier.md").read_text()
    assert "AloePri, Llama3-8B | 2.6%" in md and "public reproduction | 97.7%" in md
    assert json.loads((tmp_path / "frontier.json").read_text())["inputs"][0]["commit"] == result["inputs"][0]["commit"]
