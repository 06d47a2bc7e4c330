"""The proxy's `POST /v1/embeddings`: OpenAI's embeddings API for a protected encoder (a feature-extraction bundle).

Retrieval apps written for OpenAI work unchanged: the proxy tokenizes each input here, the client module embeds and
permutes it, the server runs the encoder on permuted embeddings (`/v1/encode`, one shot), and the client un-permutes
the hidden states and pools them as the model's sentence-transformers config says (`stip.Client.embed`). Inputs go
to the server in padded batches of bounded size, sorted by length so a batch wastes little padding; the vectors come
back in the request's order. `encoding_format="base64"` is OpenAI's: the little-endian float32 bytes, base64-coded.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Optional, Union

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from stip.client.encoder import Pooling
from stip.client.proxy_generation import upstream_error
from stip.client.proxy_requests import ApiError, _Strict
from stip.common.arrays import to_numpy
from stip.common.tasks import FEATURE_EXTRACTION
from stip.errors import StipError

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
BATCH_INPUTS = 32  # inputs per server request
BATCH_TOKENS = 8192  # padded tokens per server request (inputs x the longest), so one request stays small


class EmbeddingRequest(_Strict):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: str = "stip"
    encoding_format: Optional[str] = None
    dimensions: Optional[int] = None
    user: Optional[str] = None  # accepted, not used: nothing is logged or tagged

    def texts(self) -> list[str]:
        """The inputs as a list of non-empty strings (OpenAI refuses empty ones too); token ids are refused."""
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts:
            raise ApiError(400, "input is empty: send a string or a list of strings", "input")
        if not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "token-id input is not supported by this proxy: send text (a string or a list of "
                                "strings)", "input")
        if len(texts) > MAX_INPUTS:
            raise ApiError(400, f"{len(texts)} inputs in one request; at most {MAX_INPUTS}", "input")
        for i, t in enumerate(texts):
            if not t:
                raise ApiError(400, f"input[{i}] is an empty string", "input")
        return texts


def batches(lengths: list[int], max_inputs: int = BATCH_INPUTS, max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Input indices in padded batches: shortest first, each batch at most `max_inputs` inputs and `max_tokens`
    padded tokens (a single input longer than that travels alone)."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if out and len(out[-1]) < max_inputs and (len(out[-1]) + 1) * lengths[i] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _vector(v: np.ndarray, fmt: str):
    return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if fmt == "base64" else v.tolist()


def embeddings_router(client, model_name: str) -> APIRouter:
    """`POST /embeddings` (mounted under /v1) for `client`'s bundle; a 400 naming the task for any other bundle."""
    router = APIRouter()
    task = client.bundle.task

    def limit() -> int:
        """The most tokens one input may have: the model's positions, the server's cap, the tokenizer's maximum."""
        config = client.bundle.model_config
        known = [client.max_positions, getattr(config, "max_position_embeddings", 0),
                 getattr(client.tokenizer, "model_max_length", 0)]
        known = [int(x) for x in known if x and int(x) < 10 ** 9]  # tokenizers without a maximum say ~1e30
        return min(known) if known else 0

    def dimensions() -> int:
        """The size of one sentence embedding: the hidden size per pooling mode (sentence-transformers concatenates
        the modes it is configured with)."""
        return int(client.bundle.model_config.hidden_size) * len(Pooling.from_bundle(client.bundle).modes)

    def embed(texts: list[str], lengths: list[int]) -> np.ndarray:
        out = None
        for idx in batches(lengths):
            vectors = to_numpy(client.embed([texts[i] for i in idx]), np.float32)
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[idx] = vectors
        return out

    @router.post("/embeddings")
    async def embeddings(req: EmbeddingRequest):
        if task != FEATURE_EXTRACTION:
            raise ApiError(400, f"this proxy serves a {task} model ({model_name}); /v1/embeddings needs a "
                                f"{FEATURE_EXTRACTION} (sentence-embedding) bundle")
        fmt = req.encoding_format or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"encoding_format must be 'float' or 'base64', not {fmt!r}", "encoding_format")
        try:
            d = dimensions()
        except StipError as e:  # a sentence-transformers pipeline the client cannot run (a Dense layer, say)
            raise ApiError(500, f"the proxy's client bundle cannot make sentence embeddings: {e}",
                           kind="server_error") from None
        if req.dimensions is not None and req.dimensions != d:
            raise ApiError(400, f"this model's embeddings have {d} dimensions; dimensions={req.dimensions} is not "
                                f"supported (shortened embeddings are not offered)", "dimensions")
        texts = req.texts()
        lengths = [len(ids) for ids in client.tokenizer(texts)["input_ids"]]
        most = limit()
        for i, n in enumerate(lengths):
            if most and n > most:
                raise ApiError(400, f"input[{i}] has {n} tokens; this model takes at most {most}", "input",
                               "context_length_exceeded")
        try:
            vectors = await asyncio.to_thread(embed, texts, lengths)
        except ApiError:
            raise
        except Exception as e:
            raise upstream_error(e) from None
        data = [{"object": "embedding", "index": i, "embedding": _vector(v, fmt)} for i, v in enumerate(vectors)]
        tokens = sum(lengths)
        return JSONResponse({"object": "list", "data": data, "model": req.model or model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    return router
