"""A bundle loads exactly its signed file set (issue 18, bundles 1).

The attack: with the developer's signer pinned, add a file the signed manifest does not list to a bundle folder (an
extra `model.safetensors` that transformers would prefer to the indexed shards, a `chat_template.jinja` the
tokenizer would pick up, a client module shard, learned positions for a LLaMA), and hand the bundle to the party
that loads it. Every bundle kind is tried: server (round-trip, server-decode, hardened, TEE worker: real
`stip serve` processes), enclave (a real `stip enclave`), client (round-trip, hardened, server-decode, encoder),
TEE client and developer (their Python entry points). Each must refuse, naming the added file. Tiny models only;
the party processes start together, so the module costs about one process start.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import stip
from stip.common import signing
from stip.common.bundles.manifest import read_manifest, unlisted_paths
from stip.errors import BundleError
from stip.server.launch import free_port, serve_command, server_env
from tests.models import save_tiny
from tests.test_encoders import tiny_encoder
from tests.test_server_decode import tiny_tokenizer

REFUSED = "does not list"  # read_manifest's refusal, with the file's name

# party processes: case -> (protected output, bundle folder, added file, how its pin is given, extra arguments)
PROCESS_CASES = {
    "server": ("gpt2", "server", "model.safetensors", "--trust", ()),
    "server-decode": ("sd", "server", "model.safetensors", "env", ()),
    "hardened": ("hard", "server", "model.safetensors", "--trust", ()),
    "tee-worker": ("tee", "server", "model.safetensors", "--trust", ("--tee-worker",)),
    "enclave": ("tee", "enclave", "__pycache__/compute.cpython-312.pyc", "env", ()),
}


def _client(out: Path, folder: str, pin: str):
    return stip.Client(out / folder, "http://127.0.0.1:9", trusted=pin)  # refused before any connection


def _tee_client(out: Path, folder: str, pin: str):
    from stip.client.tee import TeeClient

    return TeeClient(out / folder, "http://127.0.0.1:9", allow_simulated=True, trusted=pin)


def _rekey(out: Path, folder: str, pin: str):
    from stip.developer.rekey import rekey

    return rekey(out.parent / "plain", out, out.parent / "rekeyed", trusted=pin)


# loaders in the user's process: case -> (protected output, bundle folder, added file, entry point)
LOADER_CASES = {
    "client-chat-template": ("tee", "client", "chat_template.jinja", _client),
    "client-module": ("encoder", "client", "module/x.safetensors", _client),
    "hardened-client-position": ("hard", "client", "embedding-position.safetensors", _client),
    "server-decode-client-hidden-tmp": ("sd", "client", ".tokenizer.json.k2j9.tmp", _client),
    "tee-client": ("tee", "tee-client", "chat_template.jinja", _tee_client),
    "developer": ("hard", "developer", "developer.stipkey.old", _rekey),
}


def _pin(out: Path) -> str:
    """The signer, as `stip inspect developer/signing.key` shows it (what a user gets out of band)."""
    return signing.pin(signing.signer_info(signing.load_signing_key(out / "developer" / "signing.key")))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_protected):
    """kind -> protected output folder: a tiny LLaMA with a tokenizer (no chat template) protected with --tee,
    in server-decode mode and with --harden all; a tiny BERT encoder; the shared tiny GPT-2."""
    root = tmp_path_factory.mktemp("bundle-files")
    plain = save_tiny("llama-gqa-untied", root / "plain")
    tok = tiny_tokenizer()
    tok.chat_template = None  # so that an added chat_template.jinja would be the one the tokenizer uses
    tok.save_pretrained(plain)
    outs = {"gpt2": tiny_protected("gpt2")[1]}
    for kind, options in (("tee", {"tee": True}), ("sd", {"mode": "server-decode"}), ("hard", {"harden": "all"})):
        stip.protect(plain, root / kind / "protected", progress=False, **options)
        outs[kind] = root / kind / "protected"
    tiny_encoder("bert-model", root / "bert")
    stip.protect(root / "bert", root / "encoder" / "protected", progress=False)
    outs["encoder"] = root / "encoder" / "protected"
    return outs


def attacked_copy(built, tmp: Path, kind: str, folder: str, added: str) -> Path:
    """A copy of protected output `kind`, whose bundle `folder` verifies, with the unlisted file `added` put in it
    (for weights: a copy of a real shard, which transformers would load)."""
    out = tmp / kind / "protected"
    shutil.copytree(built[kind], out, symlinks=True)
    bundle = out / folder
    read_manifest(bundle, trusted=_pin(out))  # the unmodified copy verifies
    target = bundle / added
    target.parent.mkdir(parents=True, exist_ok=True)
    shards = sorted(bundle.glob("*.safetensors")) + sorted(bundle.glob("module/*.safetensors"))
    if added.endswith(".safetensors") and shards:
        shutil.copy(shards[0], target)
    else:
        target.write_text("{{ 'not signed by the developer' }}")
    return out


@pytest.fixture(scope="module", autouse=True)
def party_processes(built, tmp_path_factory):
    """case -> (exit status, output) of the `stip serve` / `stip enclave` process on its attacked bundle, waited
    for on first use. All start when the module does, so they overlap each other and the in-process tests."""
    running = {}
    for case, (kind, folder, added, via, extra) in PROCESS_CASES.items():
        tmp = tmp_path_factory.mktemp(case)
        out = attacked_copy(built, tmp, kind, folder, added)
        pin = _pin(out)
        trust = ["--trust", pin] if via == "--trust" else []
        env = server_env("t", {signing.TRUST_ENV: pin} if via == "env" else {})
        if folder == "enclave":
            cmd = [sys.executable, "-m", "stip.cli", "enclave", str(out / folder), "--worker",
                   f"ws://127.0.0.1:{free_port()}", "--port", str(free_port()), *trust]
        else:
            cmd = serve_command(out / folder, *extra, *trust, port=free_port())
        log = open(tmp / "output.txt", "w+")
        running[case] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env), log)

    def result(case: str) -> tuple[int, str]:
        proc, log = running[case]
        proc.wait(timeout=180)
        log.seek(0)
        return proc.returncode, log.read()

    try:
        yield result
    finally:
        for proc, log in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


@pytest.mark.parametrize("case", list(LOADER_CASES))
def test_loader_refuses_unlisted_file(built, tmp_path, case):
    kind, folder, added, load = LOADER_CASES[case]
    out = attacked_copy(built, tmp_path, kind, folder, added)
    with pytest.raises(BundleError, match=rf"{REFUSED}: {re.escape(added)}"):
        load(out, folder, _pin(out))


def test_loaders_read_signed_files_only(built, tmp_path):
    """Files planted after the manifest was checked (before a lazy load) are not read either: the tokenizer loads
    from a view of the signed files, the module shards and embeddings come from the manifest's list."""
    from safetensors.torch import load_file

    from stip.client import hf
    from stip.client.bundle import ClientBundle

    out = tmp_path / "protected"
    shutil.copytree(built["encoder"], out)
    bundle = ClientBundle.load(out / "client", trusted=_pin(out))
    shards = sorted((out / "client" / "module").glob("*.safetensors"))
    shutil.copy(shards[0], out / "client" / "module" / "planted.safetensors")
    (out / "client" / "chat_template.jinja").write_text("planted {{ messages }}")
    assert set(hf.module_state(bundle)) == set(load_file(str(shards[0])))  # the one signed shard's tensors
    assert len(shards) == 1 and bundle.tokenizer.chat_template is None


def test_unlisted_paths_names_hidden_links_and_folders(tmp_path):
    for name in ("a.json", "sub/b.bin", "stip-manifest.json", ".a.json.x1.tmp", "sub/.hidden",
                 "__pycache__/m.pyc"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link.json").symlink_to(tmp_path / "a.json")
    assert unlisted_paths(tmp_path, ["a.json", "sub/b.bin"]) == [
        ".a.json.x1.tmp", "__pycache__/", "empty/", "link.json", "sub/.hidden"]


@pytest.mark.parametrize("case", list(PROCESS_CASES))
def test_party_process_refuses_unlisted_file(party_processes, case):
    added = PROCESS_CASES[case][2]
    named = added.split("/")[0] + ("/" if "/" in added else "")  # an unlisted folder is named, not entered
    returncode, output = party_processes(case)
    assert returncode != 0, output
    assert re.search(rf"{REFUSED}: {re.escape(named)}", output), output
