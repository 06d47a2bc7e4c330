"""The protection modes `python -m bench.audit_table` names, and what each costs through the real server and client.

A mode is `+`-joined parts:
- `paper`: the default scheme (nothing else);
- a `stip protect --harden` option (`mix`, `all`, ...) and `noise=SIGMA`;
- `aloepri` or `aloepri:KEY=VALUE,...`: `stip protect --harden aloepri --aloepri KEY=VALUE,...` (AloePri, a
  server-decode bundle; docs/aloepri.md), e.g. `aloepri:alpha_e=0.25,alpha_h=0`;
- `head=client`: the LM head on the client (`stip protect --head client`), handed to `stip.protect` as `head=`;
  a `stip protect` without that option skips the mode, saying so.

In a `--modes` list the modes are separated by commas, and an AloePri mode's own commas stay inside it: a piece that
is only `KEY=VALUE` (not a mode part such as `noise=`) continues the AloePri mode before it. `;` separates modes too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

ALOEPRI = "aloepri"
_PARTS = ("noise=", "head=")  # KEY=VALUE mode parts that are not AloePri knobs


@dataclass(frozen=True)
class Mode:
    """One parsed mode: what `stip protect` is asked for."""

    harden: tuple[str, ...] = ()
    noise: float = 0.0
    aloepri: str | None = None  # AloePri's knobs ("" for the paper's defaults); None: not AloePri
    head: str | None = None  # "client": the LM head on the client; None: stip protect's default


def split_modes(text: str) -> list[str]:
    """"paper,aloepri:alpha_e=0.25,alpha_h=0,all" -> ["paper", "aloepri:alpha_e=0.25,alpha_h=0", "all"]."""
    if ";" in text:
        return [m.strip() for m in text.split(";") if m.strip()]
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        first = piece.split("+", 1)[0]  # "alpha_h=0+head=client": a knob, then the mode's next part
        knob = "=" in first and ":" not in first and not first.startswith(_PARTS)
        if knob and out and ":" in out[-1].rsplit("+", 1)[-1] and out[-1].rsplit("+", 1)[-1].startswith(ALOEPRI):
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def parse_mode(mode: str) -> Mode:
    """"paper" -> Mode(); "all+noise=0.01" -> Mode(("all",), 0.01); "aloepri:h=64" -> Mode(aloepri="h=64")."""
    harden, noise, aloepri, head = [], 0.0, None, None
    for part in mode.split("+"):
        part = part.strip()
        if not part or part == "paper":
            continue
        if part.startswith("noise="):
            try:
                noise = float(part.split("=", 1)[1])
            except ValueError:
                raise SystemExit(f"error: mode {mode!r}: {part!r} is not noise=SIGMA") from None
        elif part.startswith("head="):
            head = part.split("=", 1)[1].strip()
        elif part == ALOEPRI or part.startswith(ALOEPRI + ":"):
            aloepri = part.partition(":")[2].strip()
        else:
            harden.append(part)
    return Mode(tuple(harden), noise, aloepri, head)


def slug(mode: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+_-]+", "-", mode)


def protect_mode(model: str, out: Path, mode: str) -> str | None:
    """Protect `model` in `mode` into `out`; None, or why the mode cannot be made here."""
    import stip
    from stip.models import resolve_model

    m = parse_mode(mode)
    if m.aloepri is not None:
        return _protect_aloepri(resolve_model(model), out, m)
    kw: dict = {}
    if m.harden:
        kw["harden"] = m.harden
    if m.noise:
        kw["noise"] = m.noise
    if m.head is not None:
        kw["head"] = m.head
    try:
        stip.protect(resolve_model(model), out, progress=False, **kw)
    except TypeError as e:
        for name in ("harden", "noise", "head"):
            if name in str(e):
                return f"stip protect has no {name} option here ({e})"
        raise
    except ValueError as e:
        return f"stip protect refused it: {e}"
    return None


def _protect_aloepri(model, out: Path, m: Mode) -> str | None:
    from stip.developer.aloepri import protect_aloepri
    from stip.developer.harden_options import HardenOptionError
    from stip.errors import StipError

    if m.harden or m.noise:
        return "AloePri takes its own keys and noise: no other --harden option or noise= beside it"
    try:
        protect_aloepri(model, out, options=m.aloepri or None, progress=False,
                        **({"head": m.head} if m.head is not None else {}))
    except (HardenOptionError, StipError, ValueError) as e:
        return f"stip protect --harden aloepri refused it: {e}"
    return None


def scored_by_client(bundle) -> bool:
    """Whether audit_table measures this client bundle's accuracy through `stip.Client.score` (`score_quality`):
    a server-decode bundle (the server scores the ids) or one whose LM head is on the client."""
    return bundle.mode == "server-decode" or getattr(bundle, "head_placement", "server") == "client"


def score_quality(client_dir: Path, url: str, token: str, plain, ids: torch.Tensor, window: int) -> dict:
    """Top-1 agreement and perplexity through the real server and client, each held-out window scored as a user
    scores a prompt (`stip.Client.score`: a server-decode server's prompt log-probabilities, or the client's own LM
    head on the hidden states a `--head client` server returns; ids mapped back by the client), against `plain`'s
    own logits. Per window, the T - 1 positions that predict a token inside it."""
    from stip.client.sdk import Client

    client = Client(client_dir, url, token=token)
    agree = positions = 0
    nll_plain = nll_prot = 0.0
    max_diff = 0.0
    for start in range(0, ids.numel() - 1, window):
        w = ids[start:start + window]
        if w.numel() < 2:
            break
        scores = client.score(ids=w.tolist(), top=1)[1:]
        with torch.no_grad():
            ref = torch.log_softmax(plain(input_ids=w[None]).logits[0, :-1].float(), -1)
        top = torch.tensor([s.top[0][0] for s in scores])
        prot = torch.tensor([s.logprob for s in scores], dtype=torch.float64)
        plain_lp = ref.gather(1, w[1:, None])[:, 0].double()
        agree += int((top == ref.argmax(-1)).sum())
        positions += int(w.numel()) - 1
        nll_prot -= float(prot.sum())
        nll_plain -= float(plain_lp.sum())
        max_diff = max(max_diff, float((prot - plain_lp).abs().max()))
    ppl_plain, ppl_prot = math.exp(nll_plain / positions), math.exp(nll_prot / positions)
    return {"top1_agreement": agree / positions, "positions": positions, "ppl_plain": ppl_plain,
            "ppl_protected": ppl_prot, "ppl_change": ppl_prot / ppl_plain - 1, "max_logit_diff": None,
            "max_logprob_diff": max_diff,
            "path": "real stip serve + client (stip.Client.score, one request per window: a server-decode "
                    "server's prompt log-probabilities, or the client's LM head under --head client)"}
