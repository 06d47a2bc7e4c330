"""`stip demo` end to end, as a user runs it: protect into an empty cache, serve, chat, check against plain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stip.server.launch import server_env

pytestmark = pytest.mark.slow


def _demo(cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stip.cli", "demo", "--cache", str(cache), "--max-tokens", "16"],
                          capture_output=True, text=True, timeout=600, env={**server_env(None), "COLUMNS": "200"},
                          cwd=Path(__file__).parent.parent)


def test_demo_from_an_empty_cache_matches_plain(tmp_path):
    r = _demo(tmp_path / "cache")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "protecting SmolLM2" in out
    assert "MATCH" in out and "MISMATCH" not in out
    assert "Paris" in out
    for row in ("tokens/s, plain", "tokens/s, STIP", "client compute", "bytes sent / received", "top permuted"):
        assert row in out, out
    assert (tmp_path / "cache" / "smollm2" / "server" / "stip-manifest.json").is_file()
    # the pin is the signer `stip protect` printed (echoed in the output), passed on as is, and noted for reuse
    from stip.demo import printed_signer

    printed = printed_signer(out.replace("   | ", ""))
    assert f"pinned signer {printed}:" in out, out
    assert (tmp_path / "cache" / "smollm2.signer").read_text().strip() == printed


def test_cached_bundle_is_checked_before_reuse(smollm2_protected, tmp_path):
    import shutil

    from stip.common.bundles.manifest import resign
    from stip.common.signing import generate_signing_key, load_signing_key, pin, signer_info
    from stip.demo import _cached_bundle as cached_bundle

    cached = tmp_path / "smollm2"
    for part in ("server", "client"):
        shutil.copytree(smollm2_protected / part, cached / part)
    # the pin the demo noted when `stip protect` printed it (as `stip inspect developer/signing.key` shows it)
    printed = pin(signer_info(load_signing_key(smollm2_protected / "developer" / "signing.key")))

    def _cached_bundle(folder):
        return cached_bundle(folder, printed)

    assert _cached_bundle(cached) is not None
    assert cached_bundle(cached, None) is None  # no noted pin: protect again
    assert cached_bundle(cached, pin(signer_info(generate_signing_key()))) is None  # another signer's pin
    extra = cached / "client" / "chat_template.jinja.bak"
    extra.write_text("{{ messages }}")  # an unlisted file
    assert _cached_bundle(cached) is None
    extra.unlink()

    original_manifest = (cached / "client" / "stip-manifest.json").read_text()
    resign(cached / "client", generate_signing_key())  # re-signed by someone else: not the pinned signer
    assert _cached_bundle(cached) is None
    (cached / "client" / "stip-manifest.json").write_text(original_manifest)
    assert _cached_bundle(cached) is not None
    index = cached / "server" / "model.safetensors.index.json"
    original = index.read_text()
    index.write_text(original.replace("{", "{ ", 1))
    assert _cached_bundle(cached) is None
    index.write_text(original)
    cfg = cached / "client" / "stip_client.json"
    cfg.write_text(cfg.read_text().replace("bundle_id", "bundle_id "))
    assert _cached_bundle(cached) is None
    shutil.rmtree(cached / "client")
    assert _cached_bundle(cached) is None
