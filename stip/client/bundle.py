"""The data owner's half of a protected model: key, embedding module, tokenizer, and the two local transforms.

`embed` turns token ids into embeddings in the server's secret basis (`x[..., p]`); `plain_logits` and `plain_ids`
undo the vocabulary permutation on what the server returns. These are all the client ever computes besides
tokenizing and sampling. A server-decode bundle (`mode`) has no embedding table: the client only maps token ids
to the server's permuted ids (`server_ids`) and back (`plain_ids`).

Hardened bundles (docs/hardened.md): the key's residual transform may be a dense orthogonal `Q` instead of `p` (the
same `apply`), and with `noise` in the client config every embedding row sent gets Gaussian noise, the same for the
same context (`stip.client.noise`).

numpy only (the light client): the key is read as numpy arrays (`stip.client.key`), the tables are read row by row
in their own dtype as `embed` needs them (`stip.client.tables`: resident memory grows with the rows touched, not
with the vocabulary) and each row is put into the secret basis as it is gathered, and the tokenizer is
`tokenizers` + jinja2 (`stip.client.tokenizer`). The transformers-side pieces of encoders and vision models are in
`stip.client.hf`. Callers that pass torch tensors get torch tensors back.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from stip.client.key import LightClientKey
from stip.client.noise import NoiseChain, new_secret
from stip.client.tables import mean_square, open_rows, rows_float32
from stip.common.arrays import like, to_numpy
from stip.common.bundles.manifest import listed_files, listed_view, read_manifest
from stip.common.signing import Trusted
from stip.common.layout import (CLIENT_CONFIG_FILE, CLIENT_KEY_FILE, CLIENT_MODULE_DIR, EMBEDDING_FILE, HEAD_CLIENT,
                                HEAD_FILE, HEAD_SERVER, MODEL_CONFIG_FILE, TOKENIZER_CONFIG_FILE)
from stip.common.tasks import TEXT_GENERATION
from stip.errors import BundleError, KeyMismatchError


ROUND_TRIP, SERVER_DECODE = "round-trip", "server-decode"


class ModelConfig(dict):
    """The model's config (model_config.json: shapes, no weights) with attribute access; `stip.client.hf` builds
    the transformers config from it where a client-side module needs one."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ClientBundle:
    def __init__(self, path: Path, manifest: dict, key: LightClientKey, config: dict,
                 tables: dict[str, tuple[np.ndarray, str]]):
        """`tables`: name ("token", "position") -> (the matrix in its own dtype, read row by row (`tables.RowFile`) or
        an array; its safetensors dtype)."""
        self.path, self.manifest, self.key, self.config = path, manifest, key, config
        self._token, self._position = tables.get("token"), tables.get("position")
        # The scale the model's own embedding module applies (Gemma: sqrt(hidden)), in float32 as it does.
        self.embedding_scale = np.float32(config.get("embedding_scale", 1.0))
        # --noise SIGMA: N(0, (SIGMA * rms(E))^2) per coordinate, a function of the context (stip.client.noise), so
        # no replay or repeat sends fresh noise to average. Isotropic Gaussian noise is invariant under the
        # orthogonal transform, so adding it after the transform equals adding it before.
        self.noise = float(config.get("noise") or 0.0)
        self.noise_std = 0.0 if self._token is None or not self.noise else \
            self.noise * float(self.embedding_scale) * float(np.sqrt(mean_square(*self._token)))
        self._noise_secret = new_secret()

    def _rows(self, table: tuple[np.ndarray, str], index, scale: np.float32 | None = None) -> np.ndarray:
        """Rows of a table, float32, in the server's basis (`p` or `Q` applied to each row as gathered)."""
        x = rows_float32(*table, index)
        if scale is not None and scale != 1:
            x = x * scale
        return self.key.resid.apply(x, -1, "out")

    @property
    def token_embedding(self) -> np.ndarray:
        """The whole token table in the server's basis, float32 (reads every row: for tests and audits; `embed`
        gathers only the rows it needs)."""
        return None if self._token is None else self._rows(self._token, slice(None), self.embedding_scale)

    @property
    def position_embedding(self) -> np.ndarray | None:
        return None if self._position is None else self._rows(self._position, slice(None))

    @classmethod
    def load(cls, path: str | Path, key: str | Path | None = None, trusted: Trusted = None) -> "ClientBundle":
        """Verify the bundle's signed manifest, then load it. `key` overrides the bundle's own key file (it must be
        the key the manifest names). `trusted`: the developer's pinned signer(s), see `stip.common.signing`."""
        path = Path(path)
        manifest = read_manifest(path, role="client", trusted=trusted)
        key_path = Path(key) if key else path / CLIENT_KEY_FILE
        client_key = LightClientKey.load(key_path)
        client_key.check_belongs_to(manifest["bundle_id"], f"client bundle {path}")
        if client_key.fingerprint != manifest.get("client_key_fingerprint"):
            raise KeyMismatchError(f"client key {key_path} has fingerprint {client_key.fingerprint}, but the signed "
                                   f"manifest of {path} names {manifest.get('client_key_fingerprint')}: the key "
                                   f"file was swapped")
        config = json.loads((path / CLIENT_CONFIG_FILE).read_text())
        tables = {name: open_rows(path / f) for name in ("token", "position")
                  if (f := EMBEDDING_FILE.format(name)) in manifest["files"]}
        if "token" not in tables and manifest.get("mode", ROUND_TRIP) == ROUND_TRIP \
                and not listed_files(manifest, CLIENT_MODULE_DIR + "/"):  # encoders, ViT embed with a module
            raise BundleError(f"client bundle {path} holds no token embedding")
        return cls(path, manifest, client_key, config, tables)

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
    def model_config(self) -> ModelConfig:
        """The model's config (shapes, no weights), with attribute access."""
        return ModelConfig(json.loads((self.path / MODEL_CONFIG_FILE).read_text()))

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"]) if self._token is None else int(self._token[0].shape[1])

    @property
    def vocab_size(self) -> int:
        return len(self.key.vocab)

    @property
    def has_tokenizer(self) -> bool:
        """Bundles of models shipped without a tokenizer take token ids only."""
        return self.has_file(TOKENIZER_CONFIG_FILE)

    @cached_property
    def tokenizer(self):
        """The bundle's tokenizer (`stip.client.tokenizer.LightTokenizer`: tokenizers and jinja2, no transformers),
        read from its signed files only."""
        from stip.client.tokenizer import LightTokenizer

        if not self.has_tokenizer:
            raise BundleError(f"client bundle {self.path} has no tokenizer; pass token ids instead of text")
        return LightTokenizer.load(self.path, self.has_file)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.config.get("eos_token_ids") or [])

    def noise_chain(self) -> NoiseChain | None:
        """A new context's noise (None without --noise): pass it to every `embed` of that context, in order."""
        if not self.noise_std:
            return None
        return NoiseChain(self._noise_secret, self.noise_std, self.hidden_size)

    def embed(self, ids, start: int = 0, noise: NoiseChain | None = None):
        """Embeddings of `ids` ([T]) at positions start.., already in the server's basis, float32. With --noise,
        `noise` is the context's `noise_chain()`, advanced to `start`; a context from position 0 may leave it out (a
        new chain: the same ids always get the same noise). Answers in the type of `ids` (numpy, or torch)."""
        if self._token is None:
            raise BundleError(f"client bundle {self.path} is a {self.mode} bundle: it has no embedding table")
        index = to_numpy(ids).astype(np.int64)
        if index.size and (int(index.min()) < 0 or int(index.max()) >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        x = self._rows(self._token, index, self.embedding_scale)
        if self._position is not None:
            positions = np.arange(start, start + index.shape[-1])
            if positions.size and int(positions[-1]) >= self._position[0].shape[0]:
                raise ValueError(f"position {int(positions[-1])} beyond the model's "
                                 f"{self._position[0].shape[0]} learned positions")
            x = x + self._rows(self._position, positions)
        if self.noise_std:
            noise = noise if noise is not None else self.noise_chain() if start == 0 else None
            if noise is None or noise.position != start or index.ndim != 1:
                raise ValueError(f"client bundle {self.path} adds noise (--noise): embed one context's ids [T] in "
                                 f"order, with its noise_chain() (at position {start})")
            x = x + noise.next(index).astype(x.dtype)
        return like(x, ids)

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

    def plain_logits(self, logits):
        """Logits in vocabulary order, from the server's permuted order (last axis)."""
        return self.key.vocab.invert(logits, -1)

    def plain_ids(self, permuted_ids):
        """Token ids from indices into the server's permuted vocabulary (what a top-k downlink returns)."""
        return like(self.key.vocab.perm[to_numpy(permuted_ids).astype(np.int64)], permuted_ids)

    def server_ids(self, ids):
        """The server's permuted ids of original token ids (server-decode prompts and stop ids): t -> pc^-1[t]."""
        index = to_numpy(ids).astype(np.int64)
        if index.size and (int(index.min()) < 0 or int(index.max()) >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        return like(self.key.vocab.inverse_perm[index], ids)
