"""The server-decode wire format: token ids in, token ids out, all in the server's permuted vocabulary.

In server-decode mode (`stip protect --mode server-decode`) the server holds a complete standard checkpoint whose
embedding and LM-head rows are in the secret vocabulary order `pc`; it samples and continues by itself. The client
maps each original token id `t` to `pc^-1[t]` before sending, and each returned id `j` back to `pc[j]`
(`ClientBundle.server_ids` / `plain_ids`). Stop strings need detokenization, so they stay on the client, which ends
a generation by closing the stream.

    POST /v1/generate   (Authorization: Bearer ...)   body: GenerateRequest as JSON
    200: a stream of NDJSON lines, each a GenerateChunk; the last one has "finish_reason".
    4xx/5xx before the stream starts: {"error": message}. A failure after it started: a last line {"error": ...,
    "status": ...}.

Nothing here imports the model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GENERATE_PATH = "/v1/generate"
FINISH_REASONS = ("stop", "length")


class GenerateRequest(BaseModel):
    """One generation. Every id is in the server's permuted vocabulary."""

    model_config = ConfigDict(extra="forbid")

    ids: list[int] = Field(min_length=1, description="the prompt, permuted ids")
    max_tokens: int = Field(ge=1, description="new tokens at most")
    stop_ids: list[int] = Field(default_factory=list, description="permuted ids that end the generation: the whole "
                                "stop list (the client sends the EOS ids; no engine adds its own)")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0: off")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    logprobs: int = Field(0, ge=0, le=20, description="top log-probabilities per generated token (0: none)")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="with it, the first chunk carries every "
                                        "prompt token's log-probability given the ones before it and its N most "
                                        "likely alternatives (vLLM's prompt_logprobs; scoring, perplexity)")


class TokenLogprobs(BaseModel):
    """One generated token's log-probability and the `logprobs` most likely alternatives (permuted ids)."""

    logprob: float
    top_ids: list[int] = Field(default_factory=list)
    top_logprobs: list[float] = Field(default_factory=list)


class GenerateChunk(BaseModel):
    """New tokens since the previous chunk; the last chunk carries `finish_reason` and the token counts."""

    ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first chunk only, when asked: None for the first
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
