"""Continuing a generation whose server session was lost: replay its context on a fresh session, a bounded number of
times, and never with fresh noise.

A replay re-sends the whole context. The server may lose a session for honest reasons (the TTL ran out under a slow
reader, a crash and restart), but a malicious one can force replays at will, so each generation gets at most
`Client.max_replays` of them (then `StipReplayLimitError`), and a replay re-embeds the context with a new
`noise_chain()`, which gives the same noisy rows as were sent before (`stip.client.noise`): nothing to average.
The replayed prefill's logits are those of the step that was lost, so the generation continues unchanged.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from stip.client.errors import (StipCertificateError, StipConnectionError, StipReplayLimitError, StipServerError)
from stip.errors import KeyMismatchError

MAX_REPLAYS = 8  # per generation: each re-sends the context
RECONNECT_SECONDS = 30.0  # default bound on reconnecting to a server that went away mid-generation


def embed_context(bundle, ids: list[int], features, noise) -> np.ndarray:
    """The context from position 0, in the secret basis, with `noise` (a `noise_chain()`, or None) advanced over
    it; image features (LLaVA: the full install) at the prompt's image tokens."""
    if features is None:
        return bundle.embed(np.asarray(ids, dtype=np.int64), start=0, noise=noise)
    from stip.client import vision

    return vision.embed(bundle, ids, features, noise)


class Replays:
    """The replays one generation (of `client`, its sessions on `stack`) may still make."""

    def __init__(self, client, stack: contextlib.ExitStack, features=None):
        self.client, self.stack, self.features = client, stack, features
        self.used = 0

    def after_expiry(self, context: list[int]):
        """(session, reply) once the server forgot the session (404): the context on a fresh session."""
        return self._resume(context)

    def after_loss(self, context: list[int], lost: StipConnectionError):
        """(session, reply) from a fresh session prefilled with `context`, once the server answers again with the
        same bundle; StipConnectionError naming the loss after the client's `reconnect_timeout` seconds."""
        client = self.client
        url = client.connection.url
        deadline = time.monotonic() + client.reconnect_timeout
        tries, delay, last = 0, 0.1, lost
        while tries == 0 or time.monotonic() < deadline:
            tries += 1
            try:
                served = client.connection.info().get("bundle_id")
                if served != client.bundle.bundle_id:
                    raise KeyMismatchError(f"the connection to {url} dropped mid-generation and the server came back "
                                           f"with bundle {served}, not {client.bundle.bundle_id}: not replaying")
                return self._resume(context)
            except (StipCertificateError, StipReplayLimitError):
                raise
            except StipConnectionError as e:
                last = e
            except StipServerError as e:
                if e.status < 500 and e.status not in (404, 409, 429):
                    raise
                last = e
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
        raise StipConnectionError(f"lost the connection to {url} after {len(context)} tokens of context and could "
                                  f"not resume within {client.reconnect_timeout:.0f} s ({tries} tries): {last}"
                                  ) from None

    def full_logits(self, context: list[int]):
        """(session, reply): the context on a fresh session, its last step's reply as all V logits. The client's own
        choice (constrained decoding found none of the top k allowed: `stip.client.constrained`), so it does not count
        against the replays a server may force; the rows re-sent are the same noisy rows as before."""
        from stip.client.transport import Downlink

        session = self.stack.enter_context(self.client.connection.open_session())
        x = embed_context(self.client.bundle, context, self.features, self.client.bundle.noise_chain())
        return session, session.prefill(x, positions="last", downlink=Downlink(kind="logits"))

    def _resume(self, context: list[int]):
        client = self.client
        if self.used >= client.max_replays:
            raise StipReplayLimitError(
                f"the server at {client.connection.url} lost this generation's session {self.used + 1} times; not "
                f"replaying its {len(context)} tokens of context again (each replay re-sends it; the bound is "
                f"Client.max_replays = {client.max_replays})")
        self.used += 1
        session = self.stack.enter_context(client.connection.open_session())
        x = embed_context(client.bundle, context, self.features, client.bundle.noise_chain())
        return session, session.prefill(x, positions="last", downlink=client.downlink)
