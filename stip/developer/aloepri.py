"""`stip protect --harden aloepri`: AloePri's covariant obfuscation (Lin et al., arXiv 2603.01499) as a
server-decode bundle (docs/aloepri.md).

The bundles have server-decode mode's layout, so `stip serve` (either engine) and `stip.Client` run them unchanged:
the server bundle is a standard checkpoint (hidden size d + 2h, untied, in the secret vocabulary order, special ids
remapped); the client bundle holds the tokenizer and a client key whose vocabulary permutation maps ids both ways
(its residual part is the identity: the client never embeds); the developer keeps a key file with the same
permutation and the 32-byte seed every other secret is drawn from (stip.developer.aloepri_keys). Every manifest
records `"harden": ["aloepri"]` and the options (`"aloepri"`).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

import stip
from stip.common import signing
from safetensors.torch import save_file

from stip.common.bundles.completeness import ROUND_TRIP, SERVER_DECODE, check_server_tensors
from stip.common.files import staged_directory
from stip.common.keys import ClientKey
from stip.common.keys.file_format import write_key_file
from stip.common.layout import (CLIENT_DIR, CLIENT_KEY_FILE, DEVELOPER_DIR, DEVELOPER_KEY_FILE, EMBEDDING_FILE,
                                HEAD_CLIENT, HEAD_SERVER, SERVER_DIR)
from stip.common.transforms import SignedPermutation
from stip.developer.aloepri_model import AloepriModel, check_family
from stip.developer.aloepri_options import ALOEPRI, AloepriOptions, parse_aloepri
from stip.developer.aloepri_transform import EMBEDDING, LM_HEAD
from stip.developer.bundle_configs import server_config, write_client_configs, write_server_config
from stip.developer.checkpoint import Checkpoint
from stip.developer.harden_options import check_head
from stip.developer.protect import ProtectResult, _set_modes, _write_head, _write_manifests
from stip.developer.shards import DEFAULT_SHARD_BYTES, ShardWriter

SEED_TENSOR = "aloepri.seed"  # the developer key's 32-byte seed (uint8)


def protect_aloepri(model: str | Path, out: str | Path, *, options: str | dict | AloepriOptions | None = None,
                    overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
                    seed: bytes | None = None,
                    signing_key: str | Path | signing.Ed25519PrivateKey | None = None,
                    calibration: torch.Tensor | None = None, head: str = HEAD_SERVER) -> ProtectResult:
    """Protect the LLaMA-family `model` (HF folder or .gguf file) with AloePri into `out/{server,client,developer}`.

    `options`: "h=128,lambda=0.3,..." or AloepriOptions (defaults: the paper's). `seed`: 32 bytes instead of
    os.urandom, for reproducible tests only. `signing_key`: as `stip.protect`. `calibration`: token ids ([n, T])
    to estimate each norm's kappa on; by default random ids drawn from the seed. `head` "client": round-trip
    bundles instead (docs/head-client.md): the client holds the obfuscated embedding (rows in token order) and LM
    head (float16) and embeds itself; the server holds neither and returns the final hidden state.
    """
    options = parse_aloepri(options)
    mode = ROUND_TRIP if check_head(head, ROUND_TRIP, False, "text-generation") == HEAD_CLIENT else SERVER_DECODE
    ck = Checkpoint.open(model)
    check_family(ck.config)
    seed = os.urandom(32) if seed is None else seed
    new_signer = signing_key is None
    if isinstance(signing_key, (str, Path)):
        signing_key = signing.load_signing_key(signing_key)
    signing_key = signing_key or signing.generate_signing_key()
    tokenizer = ck.load_tokenizer()
    obfuscated = AloepriModel.from_checkpoint(ck, options, seed, calibration)
    bundle_id = uuid.uuid4().hex
    client_key = ClientKey(bundle_id, SignedPermutation(torch.arange(obfuscated.key.width)),
                           SignedPermutation(obfuscated.key.vocab))
    server_ck = replace(ck, config=obfuscated.config())  # the shapes the server sees; ids remapped when written
    with staged_directory(Path(out), overwrite=overwrite) as stage:
        server, client, developer = (stage / d for d in (SERVER_DIR, CLIENT_DIR, DEVELOPER_DIR))
        for d in (server, client, developer):
            d.mkdir()
        server_bytes, embedding = _write_server(obfuscated, server_ck, server, max_shard_bytes, progress, head, client)
        write_server_config(server_ck, server, mode, SimpleNamespace(client=client_key), head)
        client_fp = client_key.save(client / CLIENT_KEY_FILE)
        write_client_configs(server_ck, client, embedding, bundle_id, mode, (ALOEPRI,), 0.0, tokenizer, head)
        developer_fp = write_key_file(developer / DEVELOPER_KEY_FILE, "developer", bundle_id,
                                      {**client_key.tensors(), SEED_TENSOR: torch.frombuffer(bytearray(seed),
                                                                                            dtype=torch.uint8)},
                                      {"scheme": ALOEPRI, "aloepri": json.dumps(obfuscated.options.as_dict()),
                                       "kappa": json.dumps(obfuscated.kappa)})
        signing.save_signing_key(signing_key, developer / signing.SIGNING_KEY_FILE)
        _set_modes(stage, client, developer)
        common = {"stip_version": stip.__version__, "model_type": ck.config.model_type, "mode": mode,
                  "harden": [ALOEPRI], "noise": 0.0, "head": head, ALOEPRI: obfuscated.options.as_dict()}
        _write_manifests(stage, bundle_id, common, signing_key, client_fp, developer_fp)
    return ProtectResult(Path(out), bundle_id, client_fp, developer_fp, server_bytes,
                         signing.signer_info(signing_key), new_signer, None, (ALOEPRI,), 0.0, head)


def _write_server(obfuscated: AloepriModel, server_ck: Checkpoint, server: Path, max_shard_bytes: int,
                  progress: bool, head: str = HEAD_SERVER, client: Path | None = None
                  ) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Every server tensor into standard shards; then (before the staged folder is renamed into place) a check
    that the names and shapes are exactly what the server's model class loads for the obfuscated config. With
    `head` "client", the embedding (its rows back in token order) and the LM head go to the `client` bundle instead.
    Returns the bytes written and the client's embedding shapes (`write_client_configs`)."""
    writer = ShardWriter(server, max_shard_bytes)
    shapes, embedding = {}, {}
    mode = ROUND_TRIP if head == HEAD_CLIENT else SERVER_DECODE
    for name in tqdm(obfuscated.names(), unit="tensor", desc="aloepri", disable=not progress):
        t = obfuscated.tensor(name)
        if mode == ROUND_TRIP and name == EMBEDDING:  # server row s is token tau[s]: row t is server row tau^-1[t]
            t = t[SignedPermutation(obfuscated.key.vocab).inverse_perm].contiguous()
            save_file({"weight": t}, str(client / EMBEDDING_FILE.format("token")))
            embedding["token"] = tuple(t.shape)
            continue
        if mode == ROUND_TRIP and name == LM_HEAD:
            _write_head(client, t.to(torch.float16))
            continue
        shapes[name] = tuple(t.shape)
        writer.add(name, t)
    writer.close()
    check_server_tensors(server_config(server_ck, mode, head), shapes, "the AloePri server bundle", mode=mode,
                         head=head)
    return writer.total, embedding
