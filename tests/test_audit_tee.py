"""The TEE worker, measured: `stip serve --tee-worker --capture` records what the worker receives (checked, auditor
side, against block 0's output in the developer's key), stip.audit.tee_capture plays users through the real TEE
path, and bench/audit_tee.py --quick runs every attack on it end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.models import build_tiny, save_tiny

NAME = "llama-gqa-untied"  # untied: the LM head is offloaded too, so every kind of padded row is recorded
PROMPTS = [[5, 17, 3, 42, 8, 11, 20, 30], [1, 2, 3, 4, 5, 6]]
GENERATE = 2


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    import stip
    from stip.audit.tee_capture import capture_tee_traffic

    root = tmp_path_factory.mktemp("audit-tee")
    plain = save_tiny(NAME, root / "plain")
    stip.protect(plain, root / "protected", progress=False, tee=True)
    traffic = capture_tee_traffic(root / "protected", PROMPTS, generate=GENERATE, capture_layers="0,1,2",
                                  keep_capture=root / "capture")
    return root, traffic


def plain_states(model, ids: list[int]) -> dict[int, torch.Tensor]:
    """The plain model's residual stream after each block (before the final norm), [T, d] per layer."""
    out = {}
    hooks = [block.register_forward_hook(lambda _m, _a, o, i=i: out.__setitem__(i, (o[0] if isinstance(o, tuple)
                                                                                    else o)[0].detach()))
             for i, block in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return out


def test_capture_records_h1p_and_the_body_states(captured):
    """Each session's steps (prefill, then one per decode) hold h1 p: block 0's output on the plain model, in the
    basis of the developer's key (auditor side); layer 0 is h1 p itself and the deeper layers are the body's states;
    the truth ids are the tokens sent; the generation through the capturing worker is still plain greedy."""
    from stip.audit.attacks.common import developer_key, residual_matrix

    root, traffic = captured
    r = residual_matrix(developer_key(root / "protected").client)
    model = build_tiny(NAME)
    assert len(traffic.observations) == len(PROMPTS) * (1 + GENERATE)
    for session, (prompt, context) in enumerate(zip(PROMPTS, traffic.contexts)):
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=GENERATE + 1, do_sample=False)[0]
        assert context == greedy.tolist()
        steps = [(o, ids) for o, ids in zip(traffic.observations, traffic.truth_ids) if o.meta["session"] == session]
        assert [(o.meta["kind"], o.meta["start"], o.meta["source"]) for o, _ in steps] == \
            [("prefill", 0, "tee-worker")] + [("decode", len(prompt) + i, "tee-worker") for i in range(GENERATE)]
        got = torch.cat([o.inputs for o, _ in steps])
        assert torch.cat([ids for _, ids in steps]).tolist() == context[:got.shape[0]]
        states = plain_states(model, context[:got.shape[0]])
        assert torch.allclose(got, states[0] @ r, atol=1e-4), float((got - states[0] @ r).abs().max())
        for layer in (0, 1, 2):
            h = torch.cat([o.hidden[layer] for o, _ in steps])
            assert torch.allclose(h, states[layer] @ r, atol=1e-4), (layer, float((h - states[layer] @ r).abs().max()))


def test_capture_records_the_padded_rows(captured):
    """Every step carries the padded rows of each offloaded linear (float64, as received): one row per token for
    block 0's groups, one for the untied LM head; none equals h1 p's rows or x p's, and each is about 2^20 times
    the scale of what it hides."""
    root, traffic = captured
    groups = {"self_attn.q_proj+self_attn.k_proj+self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj+mlp.up_proj",
              "mlp.down_proj", "lm_head"}
    for o, off in zip(traffic.observations, traffic.offload):
        assert set(off) == groups
        assert all(t.dtype == torch.float64 for t in off.values())
        assert off["lm_head"].shape[0] == 1
        assert all(off[g].shape[0] == o.inputs.shape[0] for g in groups - {"lm_head"})
        ratio = off["self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"].norm(dim=1) / o.inputs.norm(dim=1)
        assert bool((ratio > 2 ** 14).all())
    lines = [json.loads(line) for line in (root / "capture" / "index.jsonl").read_text().splitlines()]
    assert all(line["source"] == "tee-worker" and set(line["offload"]) == {f"offload.{g}" for g in groups}
               for line in lines)
    assert all(oct(os.stat(root / "capture" / line["file"]).st_mode & 0o777) == "0o600" for line in lines)


def test_reader_is_backward_compatible(tmp_path):
    """A round-trip capture (no offload, no source) reads as before; read_offload gives an empty dict per step."""
    from stip.audit.capture import read_capture, read_offload
    from stip.server.capture import CaptureWriter

    writer = CaptureWriter(tmp_path / "cap")
    state = object()
    writer.write(state, "prefill", 0, torch.randn(3, 8), {0: torch.randn(3, 8)})
    writer.write(state, "decode", 3, torch.randn(1, 8), {0: torch.randn(1, 8)})
    obs = read_capture(tmp_path / "cap")
    assert [o.meta for o in obs] == [{"seq": 0, "session": 0, "kind": "prefill", "start": 0},
                                     {"seq": 1, "session": 0, "kind": "decode", "start": 3}]
    assert read_offload(tmp_path / "cap") == [{}, {}]


def test_capture_is_accepted_with_the_tee_worker(tmp_path):
    """--capture runs with --tee-worker now; still refused with --engine vllm or several bundles."""
    from stip.errors import StipError
    from stip.server.app import _check_modes

    assert _check_modes(["b"], "transformers", True, tmp_path / "cap", "0,1") == [0, 1]
    with pytest.raises(StipError, match="--engine vllm"):
        _check_modes(["b"], "vllm", False, tmp_path / "cap", None)
    with pytest.raises(StipError, match="several contexts"):
        _check_modes(["a", "b"], "transformers", False, tmp_path / "cap", None)


def test_bench_quick_end_to_end(tmp_path):
    """python -m bench.audit_tee --quick: one row per attack per level, with the command, commit and machine; the
    strongest attacker (the model's own weights) decodes h1 p at layer 0 by vocabulary matching; without weights
    the attacks that need them say so; the padded rows are attacked too."""
    from bench import audit_tee
    from stip.audit.attacks import ATTACKS

    results = audit_tee.main(["--quick", "--prompts", "2", "--out", str(tmp_path)])  # 2 x 17 rows: enough to show it
    assert {p.name for p in tmp_path.iterdir()} == {"tee_worker.json", "tee_worker.md"}
    assert json.loads((tmp_path / "tee_worker.json").read_text())["levels"] == ["exact", "base", "none"]
    prov = results["provenance"]
    assert prov["command"].startswith("python -m bench.audit_tee --quick") and prov["commit"]
    assert prov["machine"]["cores"] >= 1
    md = (tmp_path / "tee_worker.md").read_text()
    for name in ATTACKS:
        for level in ("exact", "base", "none"):
            assert f"| {name} | {level} |" in md
    exact = {a["name"]: a for a in results["results"]["exact"]["attacks"]}
    vm = exact["vocab_matching"]["details"]["per_layer"]["layer 0"]
    assert vm["positions"] > 0 and vm["recovery"] > 0.5
    tv = exact["tee_vocab_matching"]
    assert tv["recovery"] > 0.25 and tv["details"]["key_share"] > 0.5 and "| tee_vocab_matching | exact |" in md
    assert {"key", "sorted"} <= set(tv["details"]["per_pruning"])
    none = {a["name"]: a for a in results["results"]["none"]["attacks"]}
    assert none["vocab_matching"]["skipped"] and "weights" in none["vocab_matching"]["skipped"]
    assert exact["finetune"]["skipped"].startswith("cannot apply") if exact["finetune"]["skipped"] else True
    assert results["traffic"]["rows"] == 2 * 17 and results["offload_view"]["level"] == "exact"
    assert results["offload_view"]["attacks"]
