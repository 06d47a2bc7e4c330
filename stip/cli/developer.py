"""The model developer's commands: protect a model, inspect and verify bundles, rekey."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from stip.cli.app import app
from stip.cli.options import TRUST_HELP, parse_size, trusted_signers
from stip.errors import StipError


@app.command()
def protect(
    model: str = typer.Argument(..., help="Hugging Face model folder, a .gguf file, or a packaged model: "
                                "'smollm2', 'all-minilm-l6-v2'"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: gets server/, client/ and developer/"),
    key: Optional[Path] = typer.Option(None, help="reuse this developer key instead of drawing a fresh one"),
    signing_key: Optional[Path] = typer.Option(None, help="sign with this Ed25519 key (a developer/signing.key "
                                               "from an earlier run) instead of a new one, so users pin it once"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    shard_size: str = typer.Option("512MB", help="largest server shard (bounds memory)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    mode: str = typer.Option("round-trip", help="round-trip: clients embed and sample, the server gets no embedding "
                             "table; server-decode: the server bundle is a complete checkpoint in the permuted "
                             "vocabulary that samples by itself (docs/server-decode.md)"),
    tee: bool = typer.Option(False, "--tee", help="also write DIR/enclave/ (sealed) and the key-less "
                             "DIR/tee-client/ for TEE mode (docs/tee.md)"),
    platform_key: Optional[Path] = typer.Option(None, help="--tee: the (simulated) platform key file the enclave "
                                                "bundle is sealed for; created if absent (default "
                                                "DIR/tee-platform/platform.key)"),
    harden: str = typer.Option("", help="hardened modes, comma-separated: mix (dense orthogonal mixing of the "
                               "residual stream, norms folded), rope (Q/K in-head rotations), vo (V/O in-head mixing), "
                               "ffn (exact power-of-two FFN scalings), or all (docs/hardened.md)"),
    noise: float = typer.Option(0.0, help="the client adds Gaussian noise of NOISE times the embedding table's RMS "
                                "to every row it sends (lossy; e.g. 0.01; docs/hardened.md)"),
    aloepri: str = typer.Option("", help="--harden aloepri (AloePri's covariant obfuscation; server-decode bundles, "
                                "round-trip ones with --head client; "
                                "lossy): its knobs as KEY=VALUE,... e.g. h=128,lambda=0.3,alpha_e=1.0,alpha_h=0.2 "
                                "(also beta, gamma, scale, calibration_tokens; defaults: the paper's; docs/aloepri.md)"),
    head: str = typer.Option("server", help="where the LM head is: server, or client (the server bundle holds "
                             "neither the embedding nor the LM head and returns the final hidden state; the client "
                             "bundle holds the head in float16 and computes the logits; round-trip mode, no --tee; "
                             "docs/head-client.md)"),
    attestation: str = typer.Option("simulated", help="--tee: the enclave report the TEE client accepts: simulated "
                                    "(pins the platform key) or nitro (AWS Nitro Enclaves: pins the image's PCRs)"),
    pcr0: Optional[str] = typer.Option(None, help="--attestation nitro: the enclave image's PCR0 (96 hex digits, "
                                       "from `nitro-cli build-enclave`); required, here or in --pcrs"),
    pcr1: Optional[str] = typer.Option(None, help="--attestation nitro: PCR1 (kernel and boot) to pin"),
    pcr2: Optional[str] = typer.Option(None, help="--attestation nitro: PCR2 (application) to pin"),
    pcr3: Optional[str] = typer.Option(None, help="--attestation nitro: PCR3 (parent instance's IAM role) to pin"),
    pcr4: Optional[str] = typer.Option(None, help="--attestation nitro: PCR4 (parent instance id) to pin"),
    pcr8: Optional[str] = typer.Option(None, help="--attestation nitro: PCR8 (image signing certificate) to pin"),
    pcrs: Optional[Path] = typer.Option(None, help="--attestation nitro: a JSON file of PCRs to pin, as "
                                        "`nitro-cli build-enclave` prints them ({\"Measurements\": {\"PCR0\": ...}})"),
):
    """Protect MODEL: a server bundle for the cloud, a client bundle for data owners, a developer key to keep."""
    pinned_pcrs = _pinned_pcrs(attestation, tee, pcrs, {0: pcr0, 1: pcr1, 2: pcr2, 3: pcr3, 4: pcr4, 8: pcr8})
    _check_paths(model, out, overwrite)
    from stip.developer.protect import MODES, protect as run_protect

    if mode not in MODES:
        raise typer.BadParameter(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}", param_hint="--mode")
    if aloepri or "aloepri" in [o.strip() for o in harden.split(",")]:
        return _protect_aloepri(model, out, harden, aloepri, tee=tee, key=key, noise=noise, quiet=quiet,
                                signing_key=signing_key, overwrite=overwrite, shard_size=shard_size, head=head)
    from stip.models import resolve_model

    from stip.common.signing import pin

    r = run_protect(resolve_model(model), out, key=key, overwrite=overwrite, max_shard_bytes=parse_size(shard_size),
                    progress=not quiet, signing_key=signing_key, mode=mode, tee=tee, platform_key=platform_key,
                    harden=harden, noise=noise, attestation=attestation, pcrs=pinned_pcrs, head=head)
    hardened = f", harden {','.join(r.harden)}" if r.harden else ""
    hardened += f", noise {noise:g}" if noise else ""
    hardened += ", LM head on the client" if r.head == "client" else ""
    typer.echo(f"protected {model} -> {out} ({mode}{hardened})\n"
               f"  server bundle    {r.server}  ({r.server_bytes / 1e6:.1f} MB; give to the model server)\n"
               f"  client bundle    {r.client}  (client key {r.client_fingerprint}; give to data owners)\n"
               f"  developer key    {r.developer_key}  ({r.developer_fingerprint}; keep secret)\n"
               f"  signing key      {r.signing_key}  ({'new' if r.new_signing_key else 'reused'}; keep secret; "
               f"reuse with --signing-key)\n"
               f"  signer           {pin(r.signer)}  (publish it: users and servers pin it with --trust)\n"
               f"  bundle id        {r.bundle_id}")
    if r.tee:
        typer.echo(f"  enclave bundle   {r.out / 'enclave'}  (sealed; for `stip enclave` on the TEE host)\n"
                   f"  TEE client       {r.out / 'tee-client'}  (no key, no embedding; give to data owners)\n"
                   f"  measurement      {r.tee['measurement']}")
        if r.tee["attestation"] == "nitro":
            typer.echo(f"  attestation      AWS Nitro; the TEE client pins PCR{', PCR'.join(r.tee['pcrs'])}\n"
                       f"  sealed for       the SIMULATED platform {r.tee['platform_pin']} (docs/tee.md, Backends)")
        else:
            typer.echo(f"  platform key     {r.tee['platform_pin']}  (SIMULATED platform)")


def _check_paths(model: str, out: Path, overwrite: bool) -> None:
    """The model's files and the output folder, checked before the slow imports (torch, transformers: seconds), so
    a wrong path answers at once; protect checks both again."""
    from stip.common.files import check_output
    from stip.developer.model_files import check_model_path
    from stip.models import resolve_model

    check_model_path(resolve_model(model))
    check_output(out, overwrite)


def _pinned_pcrs(attestation: str, tee: bool, pcrs: Optional[Path], pinned: dict) -> Optional[dict]:
    """The Nitro PCRs the TEE client pins (None without --attestation nitro), checked before the slow part."""
    if attestation == "simulated" and pcrs is None and all(v is None for v in pinned.values()):
        return None
    from stip.developer.tee import check_attestation, nitro_pcrs

    if not tee:
        raise StipError("--attestation and the PCR options pin the TEE client's verifier: they need --tee")
    if attestation != "nitro":
        check_attestation(attestation, None)  # an unknown one is named
        raise StipError("--pcrN and --pcrs pin an AWS Nitro enclave image: they need --attestation nitro")
    return nitro_pcrs(pinned, pcrs)


def _protect_aloepri(model: str, out: Path, harden: str, aloepri: str, *, tee: bool, key, noise: float,
                     quiet: bool, signing_key, overwrite: bool, shard_size: str, head: str = "server") -> None:
    """--harden aloepri: its own pipeline (stip.developer.aloepri), server-decode bundles (round-trip ones with
    --head client); options it cannot take are refused by name."""
    from stip.common.signing import pin
    from stip.developer.aloepri import protect_aloepri
    from stip.models import resolve_model

    asked = [o.strip() for o in harden.split(",") if o.strip()]
    if "aloepri" not in asked:
        raise StipError("--aloepri sets the knobs of --harden aloepri: add --harden aloepri")
    refused = ([f"--harden {','.join(o for o in asked if o != 'aloepri')}"] if len(asked) > 1 else []) \
        + (["--tee"] if tee else []) + (["--key"] if key else []) + (["--noise"] if noise else [])
    if refused:
        raise StipError(f"--harden aloepri draws its own keys and noise; it does not combine with "
                        f"{', '.join(refused)}")
    r = protect_aloepri(resolve_model(model), out, options=aloepri, overwrite=overwrite, progress=not quiet,
                        max_shard_bytes=parse_size(shard_size), signing_key=signing_key, head=head)
    layout = "round-trip, harden aloepri, LM head on the client" if r.head == "client" else \
        "server-decode, harden aloepri"
    typer.echo(f"protected {model} -> {out} ({layout})\n"
               f"  server bundle    {r.server}  ({r.server_bytes / 1e6:.1f} MB; give to the model server)\n"
               f"  client bundle    {r.client}  (client key {r.client_fingerprint}; give to data owners)\n"
               f"  developer key    {r.developer_key}  ({r.developer_fingerprint}; keep secret: holds the seed)\n"
               f"  signing key      {r.signing_key}  ({'new' if r.new_signing_key else 'reused'}; keep secret; "
               f"reuse with --signing-key)\n"
               f"  signer           {pin(r.signer)}  (publish it: users and servers pin it with --trust)\n"
               f"  bundle id        {r.bundle_id}")


@app.command()
def inspect(path: Path = typer.Argument(..., help="a bundle folder, a .stipkey file or a signing.key")):
    """Show what a bundle or key file is: role, bundle id, format version, fingerprint, and the signer's public key
    (compare it with the developer's out of band before pinning it with --trust)."""
    from stip.common.inspect import describe

    typer.echo(json.dumps(describe(path), indent=2))


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="a bundle folder"),
    key: Optional[Path] = typer.Option(None, help="also check that this key file belongs to the bundle"),
    trust: list[str] = typer.Option([], help=TRUST_HELP),
):
    """Check a bundle's signed manifest (signature, every file present, every sha256 matching) and, optionally, a
    key against it."""
    from stip.common.inspect import verify_bundle

    typer.echo(verify_bundle(bundle, key, trusted=trusted_signers(trust)))


@app.command()
def rekey(
    model: str = typer.Argument(..., help="the model the old bundle was protected from (folder, .gguf or 'smollm2')"),
    from_dir: Path = typer.Option(..., "--from", help="the old protected folder (its developer/ gives the options "
                                  "and the signing key)"),
    out: Path = typer.Option(..., "--out", "-o", help="the new protected folder"),
    signing_key: Optional[Path] = typer.Option(None, help="sign with this key instead of the old folder's"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    trust: list[str] = typer.Option([], help=TRUST_HELP),
):
    """Issue a fresh key and bundle for MODEL with the old folder's options; serve both while clients move
    (docs/contexts.md)."""
    from stip.common.signing import pin
    from stip.developer.rekey import rekey as run_rekey
    from stip.models import resolve_model

    r = run_rekey(resolve_model(model), from_dir, out, overwrite=overwrite, progress=not quiet,
                  signing_key=signing_key, trusted=trusted_signers(trust))
    typer.echo(f"rekeyed {model}: {from_dir} -> {out}\n"
               f"  server bundle    {r.server}  ({r.server_bytes / 1e6:.1f} MB)\n"
               f"  client bundle    {r.client}  (client key {r.client_fingerprint})\n"
               f"  developer key    {r.developer_key}  ({r.developer_fingerprint}; keep secret)\n"
               f"  signer           {pin(r.signer)}  ({'new' if r.new_signing_key else 'unchanged'})\n"
               f"  bundle id        {r.bundle_id}  (new)\n"
               f"serve both: stip serve {from_dir / 'server'} {r.server}")
