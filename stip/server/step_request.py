"""A session step's request frame, checked against the protocol and the session before anything runs: op, dtype,
shape, payload size, positions, downlink, and the server's limits (max_seq_len, max_all_logits, reply size). Header
checks only, on the event loop; a refusal is a `StepError` with its HTTP status. Then, once the step has run, the
reply's parts (`reply_parts`)."""

from __future__ import annotations

import torch

from stip.common import wire
from stip.common.layout import HEAD_CLIENT, HEAD_SERVER
from stip.server.engine import TopK
from stip.server.sessions import Session


class StepError(Exception):
    """A refused step: its HTTP status, and whether the session ends with it (`fatal`)."""

    def __init__(self, status: int, message: str, fatal: bool = False):
        super().__init__(message)
        self.status, self.fatal = status, fatal


def short_repr(value, limit: int = 80) -> str:
    """repr for error messages, cut short: a hostile header must not come back to its sender a thousand times."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_step(service, s: Session, data) -> tuple[str, dict, memoryview]:
    """Validate a frame against the protocol and the session (on the loop: header checks only). `service` is the
    `stip.server.service.StipService` of the session's context (its engine, limits and settings)."""
    if data is None:
        raise StepError(400, "expected binary frames: 4-byte length + JSON header + tensor bytes; got text")
    if len(data) > service.max_message_bytes:
        raise StepError(413, f"message of {len(data)} bytes exceeds the server's limit of "
                             f"{service.max_message_bytes} bytes; send the prompt in several prefill chunks")
    try:
        header, payload = wire.decode_frame(data)
    except wire.WireError as e:
        raise StepError(e.status, str(e)) from None
    op = header.get("op")
    if op not in wire.OPS:
        raise StepError(400, f"unknown op {short_repr(op)}; expected one of {', '.join(wire.OPS)}")
    if op == "close":
        return op, {}, payload
    dtype_name = header.get("dtype", "float32")
    if not isinstance(dtype_name, str) or dtype_name not in wire.DTYPES:
        raise StepError(422, f"unsupported dtype {short_repr(dtype_name)}; expected one of {', '.join(wire.DTYPES)}")
    dtype = wire.DTYPES[dtype_name]
    shape = header.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in shape):
        raise StepError(422, f"shape must be a list of non-negative integers, got {short_repr(shape)}")
    d = service.engine.hidden_size
    if op == "decode":
        if shape not in ([1, d], [d]):
            raise StepError(422, f"decode takes one embedding of shape [1, {d}] or [{d}], got {shape}")
        t = 1
    else:
        if len(shape) != 2:
            raise StepError(422, f"prefill takes embeddings of shape [T, {d}], got {shape}")
        if shape[1] != d:
            raise StepError(422, f"wrong hidden size {shape[1]}: this model's hidden size is {d}")
        t = shape[0]
        if t < 1:
            raise StepError(422, "prefill needs at least one embedding (T >= 1)")
    targets = header.get("targets", False)
    if targets not in (True, False):
        raise StepError(422, f"targets must be true or false, got {short_repr(targets)}")
    if targets and (op != "prefill" or header.get("positions") != "all"):
        raise StepError(422, "targets (each position's logit at a given index) need a prefill with positions='all'")
    expected = t * d * dtype.itemsize + (t * 4 if targets else 0)
    if len(payload) != expected:
        raise StepError(422, f"payload is {len(payload)} bytes but shape {shape} in {dtype_name}"
                             f"{' with int32 targets' if targets else ''} needs {expected} bytes")
    positions = header.get("positions", "last")
    if op == "prefill" and positions not in wire.POSITIONS:
        raise StepError(422, f"positions must be 'last' or 'all', got {short_repr(positions)}")
    k, hidden = parse_downlink(service, header.get("downlink", {"kind": "topk", "k": 64}), targets)
    top_limit = getattr(service.engine, "max_top_k", None)  # an engine that returns `TopK`, never all V logits
    if top_limit is not None and (k == 0 or k > top_limit):
        raise StepError(400, f"this server's engine returns the top {top_limit} logits per step only: use a "
                             f"top-k downlink with k <= {top_limit}" + ("" if k else ", not full logits"))
    if top_limit is not None and op == "prefill" and positions == "all":
        raise StepError(400, "this server's engine returns the last position's top-k only: use positions='last'")
    if op == "decode" and s.position == 0:
        raise StepError(409, "decode before prefill: the session's KV cache is empty; send a prefill first")
    if s.position + t > service.max_seq_len:
        raise StepError(413, f"sequence would reach {s.position + t} tokens; this server's max_seq_len is "
                             f"{service.max_seq_len}")
    n = t if (op == "prefill" and positions == "all") else 1
    check_reply_size(service, t, n, k, targets, hidden)
    return op, {"dtype": dtype, "shape": shape, "all": positions == "all", "k": k, "tokens": t,
                "targets": bool(targets), "hidden": hidden}, payload


def parse_downlink(service, downlink, targets: bool) -> tuple[int, torch.dtype | None]:
    """(k, hidden dtype) of a step's downlink: k = 0 for all logits; a hidden downlink (the final hidden state, in
    the dtype returned) only where the LM head is on the client, and only it there (`stip protect --head client`)."""
    if not isinstance(downlink, dict) or downlink.get("kind") not in wire.DOWNLINKS:
        raise StepError(422, f"downlink must be {{'kind': 'logits'}}, {{'kind': 'topk', 'k': K}} or "
                             f"{{'kind': 'hidden'}}, got {short_repr(downlink)}")
    kind = downlink["kind"]
    if getattr(service, "head", HEAD_SERVER) == HEAD_CLIENT:
        if kind != "hidden":
            raise StepError(400, f"this server holds no LM head (its bundle was protected with --head client): it "
                                 f"returns the final hidden state, not {kind}; request the hidden downlink, as a "
                                 f"client with that `stip protect` run's client bundle does")
        name = downlink.get("dtype", "float32")
        if name not in wire.HIDDEN_DTYPES:
            raise StepError(422, f"the hidden downlink's dtype must be one of {', '.join(wire.HIDDEN_DTYPES)}, got "
                                 f"{short_repr(name)}")
        if targets:
            raise StepError(422, "a hidden downlink takes no targets: the client computes each position's logits "
                                 "from the hidden state")
        return 0, wire.DTYPES[name]
    if kind == "hidden":
        raise StepError(400, "this server holds the LM head and returns logits or top-k, not hidden states; the "
                             "hidden downlink needs a bundle protected with --head client")
    if kind == "logits":
        return 0, None
    k = downlink.get("k", 64)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise StepError(422, f"top-k downlink needs an integer k >= 1, got {short_repr(k)}")
    return min(k, service.engine.vocab_size), None


def check_reply_size(service, t: int, n: int, k: int, targets: bool, hidden: torch.dtype | None = None) -> None:
    """What the step would compute and send back, against --max-all-logits (n x V logits: a client scoring a long
    prompt sends it in chunks) and the reply size limit. A hidden downlink computes no logits: n x d values."""
    if hidden is not None:
        reply = n * service.engine.hidden_size * hidden.itemsize
        if reply > service.settings.max_reply_bytes:
            raise StepError(413, f"the reply would be {reply} bytes (over {service.settings.max_reply_bytes}); "
                                 f"send fewer tokens per request or positions='last'")
        return
    if n * service.engine.vocab_size > service.settings.max_all_logits:
        limit = service.settings.max_all_logits // service.engine.vocab_size
        raise StepError(413, f"positions='all' over {t} tokens would compute {t} x {service.engine.vocab_size} "
                             f"logits, over this server's max_all_logits of {service.settings.max_all_logits} "
                             f"(at most {limit} tokens per all-positions prefill); send fewer tokens per "
                             f"request or positions='last'")
    reply = n * (service.engine.vocab_size * 4 if k == 0 else k * 8 + 4) + (n * 4 if targets else 0)
    if reply > service.settings.max_reply_bytes:
        raise StepError(413, f"the reply would be {reply} bytes (over {service.settings.max_reply_bytes}); use a "
                             f"top-k downlink or positions='last'")


def reply_parts(logits, req: dict, targets: torch.Tensor | None) -> tuple[str, list[int], str, list[bytes]]:
    """(kind, shape, dtype name, payload parts) of a step's reply from what the engine returned: all logits, their
    top k (with each row's logsumexp), an engine's own `TopK`, or (a hidden downlink, --head client) the final
    hidden state the engine's identity head returned; then, with targets, each row's logit at its target."""
    k = req["k"]
    if req.get("hidden") is not None:  # parse_step allowed it only where the engine's head is the identity
        return "hidden", [int(n) for n in logits.shape], wire.DTYPE_NAMES[req["hidden"]], \
            [wire.tensor_bytes(logits.to(req["hidden"]))]
    if isinstance(logits, TopK):  # parse_step allowed only top-k downlinks with k <= the engine's
        parts = [wire.tensor_bytes(logits.indices[:, :k].to(torch.int32)),
                 wire.tensor_bytes(logits.values[:, :k].contiguous()), wire.tensor_bytes(logits.logsumexp)]
        shape, kind = [int(logits.values.shape[0]), k], "topk"
    elif k:
        values, indices = torch.topk(logits, k, dim=-1)
        parts = [wire.tensor_bytes(indices.to(torch.int32)), wire.tensor_bytes(values),
                 wire.tensor_bytes(torch.logsumexp(logits.float(), dim=-1))]
        shape, kind = [int(logits.shape[0]), k], "topk"
    else:
        parts = [wire.tensor_bytes(logits)]
        shape, kind = [int(n) for n in logits.shape], "logits"
    if targets is not None:  # positions="all" on a full-logits engine (parse_step refused the others)
        at = targets.to(logits.device).long()
        picked = logits.float()[torch.arange(len(at), device=at.device), at.clamp(min=0)]
        parts.append(wire.tensor_bytes(torch.where(at >= 0, picked, torch.zeros_like(picked))))
    return kind, shape, "float32", parts
