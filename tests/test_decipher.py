"""Production-volume deciphering (issue 20): the offline code stream, the linking, the decipherer, the attack.

- the codes `bench.decipher_codes` computes offline from the key and the client's own `embed` equal those of what a
  real `stip serve --capture` received for the same token ids (row hashes; with `--noise`, the same linking);
- `StreamLinker` links noisy copies of a token into one code, and only them;
- the decipherer breaks a character-level substitution cipher over public English;
- the `lm_decipher` attack succeeds on a tiny model whose codes are deterministic and whose traffic is long enough;
- `python -m bench.decipher` runs end to end on the tiny model (small corpus), and the rekey budget interpolates.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stip.client.bundle import ClientBundle
from tests.parties import serve

NAME = "llama-gqa-untied"  # 3 layers, d = 48, vocab 97, no tokenizer, 128 positions
TOKEN = "decipher-test"


def _char_ids(part: str, vocab: int, n: int | None = None) -> np.ndarray:
    from stip.audit.corpus import token_ids
    from stip.audit.run import CharTokenizer

    return token_ids(CharTokenizer(vocab), part, n).numpy()


def _captured_codes(out, requests: list[np.ndarray], cap) -> list[torch.Tensor]:
    """Send each request's ids through the real client to a capturing server; the rows it received, per request."""
    import stip
    from stip.audit.capture import read_capture

    with serve(out, "--capture", str(cap), token=TOKEN) as server:
        client = stip.Client(out / "client", server.url, token=TOKEN)
        for ids in requests:
            client.generate(ids=[int(i) for i in ids], max_tokens=1)  # one prefill, no decode step
    observations = read_capture(cap)
    assert [o.meta["kind"] for o in observations] == ["prefill"] * len(requests)
    return [o.inputs for o in observations]


def test_offline_codes_equal_what_the_server_received(tiny_protected, tmp_path):
    """The offline code stream is the server's: equal row hashes in the paper's mode; with --noise (fresh noise
    per client process), the same linking: one code per token on both sides."""
    import stip
    from bench.decipher_codes import code_stream, purity, requests_of, row_codes
    from stip.audit.attacks.frequency import linked_codes
    from stip.audit.context import Observation
    from stip.audit.linking import StreamLinker, noisy_copy_distance

    plain, out = tiny_protected(NAME)
    requests = requests_of(_char_ids("prompts", 97, 300), 100)
    received = _captured_codes(out, requests, tmp_path / "cap")
    offline, details = code_stream(ClientBundle.load(out / "client"), requests)
    assert details["codes_from"].startswith("row bytes")
    for rows, codes in zip(received, offline):
        assert np.array_equal(row_codes(rows), codes)

    noisy = tmp_path / "noisy"
    stip.protect(plain, noisy, progress=False, noise=0.01)
    received = _captured_codes(noisy, requests, tmp_path / "cap-noisy")
    offline, details = code_stream(ClientBundle.load(noisy / "client"), requests)
    assert "linked" in details["codes_from"]
    linker = StreamLinker(received[0].shape[1], 2.0 * noisy_copy_distance(received[0], 0.01))
    server_side = [linker.add(rows) for rows in received]
    # the `frequency` attack's own linking (single linkage over all pairs) of what the server received
    all_pairs, _ = linked_codes(SimpleNamespace(observations=[Observation(r) for r in received]), 0.01, 2.0)
    assert not torch.equal(received[0], ClientBundle.load(noisy / "client").embed(torch.as_tensor(requests[0])))
    tokens = len(np.unique(np.concatenate(requests)))
    for codes in (server_side, offline, all_pairs):
        assert purity(codes, requests) == {"purity": 1.0, "codes": tokens, "tokens": tokens}


def test_stream_linker_links_noisy_copies_only():
    from bench.decipher_codes import purity
    from stip.audit.linking import StreamLinker, noisy_copy_distance

    g = torch.Generator().manual_seed(0)
    table = torch.randn(500, 64, generator=g)
    ids = torch.randint(0, 500, (6000,), generator=g)
    rows = table[ids] + 0.02 * torch.randn(6000, 64, generator=g)
    linker = StreamLinker(64, 2.0 * noisy_copy_distance(rows, 0.02))
    codes = [linker.add(rows[i:i + 700]) for i in range(0, 6000, 700)]
    truth = [ids[i:i + 700].numpy() for i in range(0, 6000, 700)]
    got = purity(codes, truth)
    assert got["purity"] == 1.0 and got["codes"] == got["tokens"]


def test_decipher_breaks_a_character_cipher():
    """Public English statistics decipher 20k characters under a secret one-to-one code: nearly all of it."""
    from stip.audit.decipher import LanguageStats, decipher, rank_map, recovery

    stats = LanguageStats(_char_ids("public", 97))
    users = _char_ids("prompts", 97, 20000)
    code = np.random.default_rng(1).permutation(97) + 1000
    streams, truth = [code[users[i:i + 256]] for i in range(0, len(users), 256)], \
        [users[i:i + 256] for i in range(0, len(users), 256)]
    got = recovery(decipher(streams, stats), streams, truth, stats.top(20))
    base = recovery(rank_map(streams, stats), streams, truth, stats.top(20))
    assert got["all"] > 0.95 and got["all"] > base["all"] + 0.3, (got, base)


def test_lm_decipher_attack_on_a_tiny_model(tiny_protected):
    """The attack on a tiny model's deterministic codes (the rows its client sends), 40 requests of 200 characters:
    it must decipher them."""
    from stip.audit.context import AuditContext, Observation, Truth
    from stip.audit.attacks import lm_decipher

    _, out = tiny_protected(NAME)
    client = ClientBundle.load(out / "client")
    users = torch.as_tensor(_char_ids("prompts", 97, 8000))
    requests = list(users.split(200))
    ctx = AuditContext(server_dir=out / "server", observations=[Observation(client.embed(r)) for r in requests],
                       truth=Truth(requests, out), tokenizer=None,
                       public_ids=torch.as_tensor(_char_ids("public", 97)), settings={"quick": True})
    result = lm_decipher.run(ctx)
    assert result.skipped is None and result.recovery > 0.9, result.details
    assert result.details["requests"][-1] == 40 and len(result.details["recovery_rows"]) == 7
    assert result.details["recovery_rows"][-1] == result.recovery


def test_rekey_budget_interpolates():
    from bench.decipher_report import budget

    pts = [{"tokens": 100, "all": 0.01}, {"tokens": 1000, "all": 0.03}, {"tokens": 10000, "all": 0.07}]
    assert budget(pts, "all") == {"tokens": 3162, "bound": None}  # halfway in log-traffic
    assert budget(pts[2:], "all")["bound"] == "below"
    assert budget(pts[:2], "all") == {"tokens": 1000, "bound": "above"}


def test_bench_decipher_end_to_end(tiny_protected, tmp_path):
    """Both modes on the tiny model: noise 0.01 links exactly, so its codes partition the traffic as the paper's
    do; it is recomputed up to --check (equal) and the larger size taken from the paper mode."""
    from bench import decipher

    plain, _ = tiny_protected(NAME)
    res = decipher.main(["--model", str(plain), "--modes", "paper,noise=0.01", "--corpus", "small", "--sizes",
                         "500,4000", "--request-tokens", "100", "--check", "500", "--out", str(tmp_path)])
    paper, noisy = res["modes"]
    assert [p["tokens"] for p in paper["points"]] == [500, 4000]
    assert paper["linking"]["purity"] == 1.0 and paper["points"][-1]["all"] > 0.8
    assert set(paper["budget"]) == {"all", "rare"}
    assert "linked" in noisy["codes_from"] and noisy["same_partition_as"] == "paper" and noisy["check_equal"]
    assert "copied_from" not in noisy["points"][0] and noisy["points"][1]["copied_from"] == "paper"
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["modes"][0]["points"] == paper["points"]
    md = (tmp_path / "results.md").read_text()
    assert "Rekey budget" in md and "| paper |" in md and "| 4,000 * |" in md
    if res["plot"]:
        assert (tmp_path / res["plot"]).is_file() and f"]({res['plot']})" in md


def test_lm_decipher_is_registered_after_frequency():
    from stip.audit.attacks import ATTACKS, load

    assert ATTACKS.index("lm_decipher") == ATTACKS.index("frequency") + 1
    assert load("lm_decipher").NAME == "lm_decipher"
