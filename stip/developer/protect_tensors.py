"""The per-tensor rules of `stip protect`: where each checkpoint tensor goes (server, client or nowhere) in each mode,
and the secret transforms of the developer key applied on the way; plus the check, before anything is written, that
the server bundle these rules make is exactly what the server's model class loads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch

from stip.common.architectures import CLIENT, DROP, LM_HEAD, SERVER, TOKEN_EMBEDDING, Architecture, Placement
from stip.common.bundles.completeness import ROUND_TRIP, SERVER_DECODE, check_server_tensors
from stip.common.keys import DeveloperKey
from stip.common.layout import HEAD_CLIENT, HEAD_SERVER
from stip.developer.bundle_configs import server_config
from stip.developer.checkpoint import Checkpoint
from stip.developer.fold import LINEAR, NormFolder
from stip.errors import TensorSetError

MODES = (ROUND_TRIP, SERVER_DECODE)

# Server-decode mode: the server also gets the client's tensors (transformed by their own rule's axes), and a
# tensor with one of these roles gets its rows permuted into this space too (the token embedding: rows in `pc`).
SERVER_DECODE_ROWS = {TOKEN_EMBEDDING: "vocab"}
HEAD = "head"  # --head client: the party `protect_tensor` names for the LM head, protected as the server's would be


def _to_client_head(p: Placement, head: str) -> bool:
    """Whether a server placement is the LM head that --head client moves to the client bundle."""
    return head == HEAD_CLIENT and p.party == SERVER and p.rule.role == LM_HEAD


def placements(arch: Architecture, name: str, tied: bool, mode: str = ROUND_TRIP) -> list[Placement]:
    """Where checkpoint tensor `name` goes in `mode`. Round-trip: the architecture's own placements. Server-decode:
    the server gets every tensor, the client none; client tensors go to the server under their canonical names,
    transformed by their rule's axes plus `SERVER_DECODE_ROWS`; a tied LM head stays tied (the embedding is it)."""
    if mode == ROUND_TRIP:
        return arch.placements(name, tied)
    if mode != SERVER_DECODE:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    m = arch.match(name)
    rule = m.rule
    if rule.party == DROP or (tied and rule.role == LM_HEAD):
        return []
    if rule.party == SERVER:
        return [Placement(SERVER, m.canonical, rule, m.layer, expert=m.expert, expert_at=m.expert_at)]
    axes = dict(rule.axes)
    if rule.role in SERVER_DECODE_ROWS:
        axes[0] = (SERVER_DECODE_ROWS[rule.role], "out")
    return [Placement(SERVER, m.canonical, replace(rule, axes=axes, party=SERVER), m.layer)]


def protect_tensor(arch: Architecture, key: DeveloperKey, name: str, tensor: torch.Tensor,
                   tied: bool, mode: str = ROUND_TRIP, folder: NormFolder | None = None,
                   head: str = HEAD_SERVER) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield (party, name, tensor) for one checkpoint tensor, following its architecture's rule.

    Client tensors (the embedding module) are passed on unchanged: the client applies `p` to them when it loads its
    bundle. A tied embedding also yields the server's LM head, transformed as the LM head's own rule says. In
    server-decode mode everything goes to the server (see `placements`). `folder` (--harden mix): norms folded into
    their consumers first; a hardened key's dense transforms are computed in float64 and rounded once. `head`
    "client": the LM head is yielded to party HEAD instead of SERVER, transformed as the server's would be, in
    float16.
    """
    dense = folder is not None or key.harden
    for p in placements(arch, name, tied, mode):
        if _to_client_head(p, head):
            t = tensor.double() if dense else tensor
            if folder is not None:
                t = folder.fold(p.name, p.rule, t)[1]
            yield HEAD, p.name, _transform(p.rule.axes, key, p.layer, t).to(torch.float16)  # rounded once
            continue
        if p.party == SERVER and not p.zeros and p.expert is None and dense:
            t = tensor.double()
            kind = LINEAR
            if folder is not None:
                kind, t = folder.fold(p.name, p.rule, t)
            if kind == LINEAR:
                t = _transform(p.rule.axes, key, p.layer, t)
            yield SERVER, p.name, t.to(tensor.dtype).contiguous()
            continue
        if p.party == CLIENT:
            yield CLIENT, p.name, tensor
        elif p.zeros:
            yield SERVER, p.name, torch.zeros_like(tensor)
        elif p.expert is not None:  # an MoE expert: its own FFN permutation, written under its secret slot
            slot = int(key.space("expert", p.layer).inverse_perm[p.expert])
            yield SERVER, p.name_in_slot(slot), _transform(p.rule.axes, key, p.layer, tensor, p.expert)
        else:
            yield SERVER, p.name, _transform(p.rule.axes, key, p.layer, tensor)


def check_checkpoint(ck: Checkpoint, arch: Architecture, tied: bool, mode: str = ROUND_TRIP,
                     head: str = HEAD_SERVER) -> None:
    """Before anything is written: the server bundle this checkpoint makes (names and shapes, read from the
    checkpoint's headers) must be exactly what the server's model class loads, and the client must get the token
    embedding (and with `head` "client" the LM head). Otherwise transformers would fill the gap with random weights
    on the server, silently."""
    outputs: dict[tuple[str, str], str] = {}  # (party, output name) -> checkpoint name
    server: dict[str, tuple[int, ...]] = {}
    has_token = has_head = False
    for name, shape in ck.shapes():
        rule = arch.match(name).rule  # the client embeds the input: a token table or a client-side module
        has_token |= rule.role == TOKEN_EMBEDDING or rule.client_module is not None
        for p in placements(arch, name, tied, mode):
            party = HEAD if _to_client_head(p, head) else p.party
            if (party, p.name) in outputs:
                raise TensorSetError(f"{ck.path}: tensors {outputs[party, p.name]!r} and {name!r} are the same "
                                     f"tensor ({p.name!r}) named twice")
            outputs[party, p.name] = name
            has_head |= party == HEAD
            if party == SERVER:
                server[p.name] = shape
    if not has_token:
        raise TensorSetError(f"{ck.path} has no token embedding tensor (nor an input embeddings module)")
    if head == HEAD_CLIENT and not has_head:
        raise TensorSetError(f"{ck.path} has no LM head for --head client to give the client")
    check_server_tensors(server_config(ck, mode, head), server, f"checkpoint {ck.path}",
                         {out: src for (party, out), src in outputs.items() if party == SERVER}, mode=mode,
                         head=head)


def protect_state_dict(arch: Architecture, key: DeveloperKey, state: dict[str, torch.Tensor],
                       tied: bool, mode: str = ROUND_TRIP) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """In-memory protection of a whole state dict: (server tensors, client embedding tensors). For small models
    and tests; `protect` streams the same per-tensor function over files."""
    parts: dict[str, dict[str, torch.Tensor]] = {SERVER: {}, CLIENT: {}}
    folder = None
    if key.client.mixed:
        folder = NormFolder.build(arch, key.geometry.layers, state, lambda names: {n: state[n] for n in names})
    for name, tensor in state.items():
        for party, out_name, t in protect_tensor(arch, key, name, tensor, tied, mode, folder):
            parts[party][out_name] = t
    return parts[SERVER], parts[CLIENT]


def _transform(axes: dict, key: DeveloperKey, layer: int | None, t: torch.Tensor,
               expert: int | None = None) -> torch.Tensor:
    """Apply each axis's transform; `expert` (an original MoE expert index) selects that expert's own "ffn"."""
    for axis, (space, role) in axes.items():
        t = key.space(space, layer, expert if space == "ffn" else None).apply(t, axis, role)
    return t.contiguous()
