"""The Python API mirrors the CLI: the same operations, the same errors."""

from __future__ import annotations

import pytest

import stip


def test_api_mirrors_cli(tiny_protected):
    _, out = tiny_protected("gpt2")
    info = stip.inspect(out / "client" / "client.stipkey")
    assert info["kind"] == "client" and info["version"] == 1 and len(info["fingerprint"]) == 39
    bundle = stip.inspect(out / "server")
    assert bundle["role"] == "server" and bundle["bundle_id"] == info["bundle_id"]
    assert "belongs to this bundle" in stip.verify(out / "client", out / "client" / "client.stipkey")
    assert stip.ClientKey.load(out / "client" / "client.stipkey").fingerprint == info["fingerprint"]
    for name in ("serve", "Client", "run_proxy", "run_demo", "DeveloperKey"):
        assert callable(getattr(stip, name))
    with pytest.raises(stip.BundleError, match="is not a STIP bundle"):
        stip.verify(out)
