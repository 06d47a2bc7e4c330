"""The data owner's half of a protected model: key, embedding module, tokenizer, and the two local transforms.

`embed` turns token ids into embeddings in the server's secret basis (`x[..., p]`); `plain_logits` and `plain_ids`
undo the vocabulary permutation on what the server returns. These are all the client ever computes besides
tokenizing and sampling. A server-decode bundle (`mode`) has no embedding table: the client only maps token ids
to the server's permuted ids (`server_ids`) and back (`plain_ids`).

Hardened bundles (docs/hardened.md): the key's residual transform may be a dense orthogonal `Q` instead of `p` (the
same `apply`), and with `noise` in the client config every embedding row sent gets Gaussian noise, the same for the
same context (`stip.client.noise`).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file

from stip.client.noise import NoiseChain, new_secret
from stip.common.bundles.manifest import listed_files, listed_view, read_manifest
from stip.common.signing import Trusted
from stip.common.keys import ClientKey
from stip.common.layout import (CLIENT_CONFIG_FILE, CLIENT_KEY_FILE, CLIENT_MODULE_DIR, EMBEDDING_FILE, HEAD_CLIENT,
                                HEAD_FILE, HEAD_SERVER, MODEL_CONFIG_FILE, TOKENIZER_CONFIG_FILE)
from stip.common.tasks import TEXT_GENERATION
from stip.errors import BundleError, KeyMismatchError


ROUND_TRIP, SERVER_DECODE = "round-trip", "server-decode"


class ClientBundle:
    def __init__(self, path: Path, manifest: dict, key: ClientKey, config: dict, embedding: dict[str, torch.Tensor]):
        self.path, self.manifest, self.key, self.config = path, manifest, key, config
        # Put the embedding module into the protected basis once, at load: per token the client then only gathers.
        token = embedding.get("token")
        if token is not None:  # the scale the model's own embedding module applies (Gemma: sqrt(hidden)), as it does
            token = token.float() * torch.tensor(float(config.get("embedding_scale", 1.0)), dtype=torch.float32)
        self.token_embedding = None if token is None else key.resid.apply(token.float(), 1, "out").contiguous()
        pos = embedding.get("position")
        self.position_embedding = None if pos is None else key.resid.apply(pos.float(), 1, "out").contiguous()
        # --noise SIGMA: N(0, (SIGMA * rms(E))^2) per coordinate, a function of the context (stip.client.noise), so
        # no replay or repeat sends fresh noise to average. Isotropic Gaussian noise is invariant under the
        # orthogonal transform, so adding it after the transform equals adding it before.
        self.noise = float(config.get("noise") or 0.0)
        self.noise_std = 0.0 if token is None or not self.noise else \
            self.noise * float(token.float().pow(2).mean().sqrt())
        self._noise_secret = new_secret()

    @classmethod
    def load(cls, path: str | Path, key: str | Path | None = None, trusted: Trusted = None) -> "ClientBundle":
        """Verify the bundle's signed manifest, then load it. `key` overrides the bundle's own key file (it must be
        the key the manifest names). `trusted`: the developer's pinned signer(s), see `stip.common.signing`."""
        path = Path(path)
        manifest = read_manifest(path, role="client", trusted=trusted)
        key_path = Path(key) if key else path / CLIENT_KEY_FILE
        client_key = ClientKey.load(key_path)
        client_key.check_belongs_to(manifest["bundle_id"], f"client bundle {path}")
        if client_key.fingerprint != manifest.get("client_key_fingerprint"):
            raise KeyMismatchError(f"client key {key_path} has fingerprint {client_key.fingerprint}, but the signed "
                                   f"manifest of {path} names {manifest.get('client_key_fingerprint')}: the key "
                                   f"file was swapped")
        config = json.loads((path / CLIENT_CONFIG_FILE).read_text())
        embedding = {name: load_file(str(path / f))["weight"] for name in ("token", "position")
                     if (f := EMBEDDING_FILE.format(name)) in manifest["files"]}
        if "token" not in embedding and manifest.get("mode", ROUND_TRIP) == ROUND_TRIP \
                and not listed_files(manifest, CLIENT_MODULE_DIR + "/"):  # encoders, ViT embed with a module
            raise BundleError(f"client bundle {path} holds no token embedding")
        return cls(path, manifest, client_key, config, embedding)

    def has_file(self, name: str) -> bool:
        """Whether the signed manifest lists `name` (a path inside the bundle): loaders read listed files only."""
        return name in self.manifest["files"]

    def signed_view(self):
        """A context manager: a temporary folder of the bundle's signed files except its key, for transformers'
        `from_pretrained` (tokenizer, image processor), which picks files by what a folder holds."""
        return listed_view(self.path, [n for n in self.manifest["files"] if n != CLIENT_KEY_FILE])

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def signer(self) -> str:
        """Fingerprint of the developer key that signed this bundle (the server's bundle must have the same)."""
        return self.manifest["signer"]["fingerprint"]

    @property
    def mode(self) -> str:
        """"round-trip" (the client embeds and samples) or "server-decode" (the server samples; ids are mapped)."""
        return self.manifest.get("mode", ROUND_TRIP)

    @property
    def task(self) -> str:
        """The Hugging Face pipeline task of the protected model (stip.common.tasks)."""
        return self.config.get("task", TEXT_GENERATION)

    @cached_property
    def model_config(self):
        """The model's transformers config (shapes, no weights): what builds a client-side module."""
        from transformers import AutoConfig

        d = json.loads((self.path / MODEL_CONFIG_FILE).read_text())
        return AutoConfig.for_model(d.pop("model_type"), **d)

    def module_state(self) -> dict[str, torch.Tensor]:
        """The plain tensors of the client-side module (BERT's embeddings, ViT's patch embedding, LLaVA's vision
        tower and projector), named inside that module; empty for decoders, whose client part is a table."""
        state: dict[str, torch.Tensor] = {}
        for shard in listed_files(self.manifest, CLIENT_MODULE_DIR + "/", ".safetensors"):
            state |= load_file(str(self.path / shard))
        return state

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"]) if self.token_embedding is None else self.token_embedding.shape[1]

    @property
    def vocab_size(self) -> int:
        return len(self.key.vocab)

    @property
    def has_tokenizer(self) -> bool:
        """Bundles of models shipped without a tokenizer take token ids only."""
        return self.has_file(TOKENIZER_CONFIG_FILE)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        if not self.has_tokenizer:
            raise BundleError(f"client bundle {self.path} has no tokenizer; pass token ids instead of text")
        with self.signed_view() as signed_only:
            return AutoTokenizer.from_pretrained(signed_only)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.config.get("eos_token_ids") or [])

    def noise_chain(self) -> NoiseChain | None:
        """A new context's noise (None without --noise): pass it to every `embed` of that context, in order."""
        if not self.noise_std:
            return None
        return NoiseChain(self._noise_secret, self.noise_std, self.token_embedding.shape[1])

    def embed(self, ids: torch.Tensor, start: int = 0, noise: NoiseChain | None = None) -> torch.Tensor:
        """Embeddings of `ids` ([T]) at positions start.., already in the server's basis. With --noise, `noise` is
        the context's `noise_chain()`, advanced to `start`; a context from position 0 may leave it out (a new
        chain: the same ids always get the same noise)."""
        if self.token_embedding is None:
            raise BundleError(f"client bundle {self.path} is a {self.mode} bundle: it has no embedding table")
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        x = self.token_embedding[ids]
        if self.position_embedding is not None:
            positions = torch.arange(start, start + ids.shape[-1])
            if int(positions[-1]) >= self.position_embedding.shape[0]:
                raise ValueError(f"position {int(positions[-1])} beyond the model's "
                                 f"{self.position_embedding.shape[0]} learned positions")
            x = x + self.position_embedding[positions]
        if self.noise_std:
            noise = noise if noise is not None else self.noise_chain() if start == 0 else None
            if noise is None or noise.position != start or ids.dim() != 1:
                raise ValueError(f"client bundle {self.path} adds noise (--noise): embed one context's ids [T] in "
                                 f"order, with its noise_chain() (at position {start})")
            x = x + noise.next(ids).to(x.dtype)
        return x

    @property
    def head_placement(self) -> str:
        """Where the LM head is: "server", or "client" (`stip protect --head client`: this bundle holds it)."""
        return self.manifest.get("head", HEAD_SERVER)

    @cached_property
    def head(self):
        """The LM head this bundle holds (`stip.client.head.ClientHead`, memory-mapped), or None where the server
        holds it."""
        if self.head_placement != HEAD_CLIENT:
            return None
        if not self.has_file(HEAD_FILE):
            raise BundleError(f"client bundle {self.path} says the LM head is on the client but holds no {HEAD_FILE}")
        from stip.client.head import ClientHead

        head = ClientHead(self.path / HEAD_FILE, self.config.get("final_logit_softcapping"))
        if head.vocab_size != self.vocab_size:
            raise BundleError(f"client bundle {self.path}: its LM head has {head.vocab_size} rows, its key "
                              f"{self.vocab_size} tokens")
        return head

    @property
    def harden(self) -> tuple[str, ...]:
        """The hardening options the bundle was protected with (empty: the paper's scheme)."""
        return tuple(self.config.get("harden") or ())

    def plain_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits in vocabulary order, from the server's permuted order (last axis)."""
        return self.key.vocab.invert(logits, logits.dim() - 1)

    def plain_ids(self, permuted_ids: torch.Tensor) -> torch.Tensor:
        """Token ids from indices into the server's permuted vocabulary (what a top-k downlink returns)."""
        return self.key.vocab.perm[torch.as_tensor(permuted_ids, dtype=torch.long)]

    @cached_property
    def _to_server(self) -> torch.Tensor:
        return self.key.vocab.inverse_perm

    def server_ids(self, ids) -> torch.Tensor:
        """The server's permuted ids of original token ids (server-decode prompts and stop ids): t -> pc^-1[t]."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        return self._to_server[ids]
