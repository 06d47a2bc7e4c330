"""TEE mode's client <-> enclave messages. Both sides import this; nothing here touches the model.

    POST /v1/attest {"nonce": base64 of 32 bytes}
        -> {"format", "evidence": base64, "measurement"}: a report binding a fresh channel key to the nonce
    WebSocket /v1/tee/session: first a text message {"client_public_key": b64, "nonce": b64} (the nonce of the report
    the client verified; single use), then binary frames sealed with stip.common.channel:
        client: {"op": "generate", ...TeeGenerateRequest}; the enclave answers a stream of GenerateChunk JSON, one
                per token, the last one with "finish_reason" (and "timing": enclave_ms, worker_ms, pad_hits, pad_misses);
                {"op": "close"} ends the session.
        a refused request: {"error": message, "status": 4xx}; the session stays open. A channel failure (tampered,
        replayed or reordered frame) closes the socket with code 1008 and the reason.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from stip.common.generate import GenerateRequest

ATTEST_PATH = "/v1/attest"
SESSION_PATH = "/v1/tee/session"
POLICY_VIOLATION = 1008  # WebSocket close code for a refused channel


class TeeGenerateRequest(GenerateRequest):
    """One generation in PLAIN token ids (the enclave holds `pc`); `stop_ids`: the EOS ids that end it."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["generate"] = "generate"
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
