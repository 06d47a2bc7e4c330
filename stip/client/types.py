"""The client's shared result types: `Timing`, `Generation` and `GenerationStream`, which every generation path
returns (the SDK's own loop, server-decode and TEE mode). They live here, apart from `stip.client.sdk`, so those paths
import them without importing the SDK, and the SDK imports them without an import cycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from stip.client.logprobs import TokenLogprob


@dataclass
class Timing:
    """Totals over a generation; the `*_per_token` figures are over decode steps (one round trip per token)."""

    prefill_ms: float = 0.0  # client-observed time to the first token, prompt embedding included
    total_ms: float = 0.0
    client_ms: float = 0.0  # client compute: embedding, un-permuting, sampling, detokenizing
    rtt_ms: float = 0.0  # client-measured round trips: network, serialization and server compute
    # Server compute as the server reports it, and the round trips less that. None where the server reports no time,
    # which is the default (its operator turns it on with `stip serve --expose-timing`).
    server_ms: float | None = None
    wire_ms: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    steps: int = 0  # decode round trips
    full_logits_steps: int = 0  # constrained steps re-requested as all logits (none of the top k allowed)
    decode_client_ms: float = 0.0
    decode_rtt_ms: float = 0.0
    decode_server_ms: float | None = None
    decode_wire_ms: float | None = None
    decode_bytes_sent: int = 0
    decode_bytes_received: int = 0

    def _per(self, x: float | None) -> float | None:
        if x is None:
            return None
        return x / self.steps if self.steps else 0.0

    @property
    def client_ms_per_token(self) -> float:
        return self._per(self.decode_client_ms)

    @property
    def rtt_ms_per_token(self) -> float:
        return self._per(self.decode_rtt_ms)

    @property
    def server_ms_per_token(self) -> float | None:
        """None where the server reports no compute time (see `server_ms`)."""
        return self._per(self.decode_server_ms)

    @property
    def wire_ms_per_token(self) -> float | None:
        return self._per(self.decode_wire_ms)

    def breakdown(self) -> str:
        """Per decode step, for people: the round trip the client measured, split into server and wire where the
        server reports its time; never a made-up 0 ms."""
        if self.server_ms_per_token is not None:
            wire = "" if self.wire_ms_per_token is None else f", wire {self.wire_ms_per_token:.1f} ms"
            return f"server {self.server_ms_per_token:.1f} ms{wire}"
        if self.decode_rtt_ms:
            return f"round trip {self.rtt_ms_per_token:.1f} ms (server time not reported)"
        return "server time not reported"

    @property
    def bytes_sent_per_token(self) -> float:
        return self._per(self.decode_bytes_sent)

    @property
    def bytes_received_per_token(self) -> float:
        return self._per(self.decode_bytes_received)

    @property
    def tokens_per_s(self) -> float:
        n = self.steps + 1
        return n / (self.total_ms / 1e3) if self.total_ms else 0.0


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated ids (an EOS id that ended the generation included; its text is not)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    usage: dict
    timing: Timing
    prompt_ids: list[int] = field(default_factory=list)
    glimpse: dict = field(default_factory=dict)  # a few values of what the server saw and sent, for the demo
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when SamplingParams.logprobs is set


class GenerationStream:
    """Iterate for text deltas as tokens arrive; `.generation` holds the result once the iteration has ended."""

    def __init__(self, it: Iterator[str]):
        self._it = it
        self.generation: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        self.generation = yield from self._it

    def text(self) -> str:
        return "".join(self)
