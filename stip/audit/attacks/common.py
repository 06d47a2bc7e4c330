"""Helpers the key-recovery and matching attacks share: reading the server bundle's tensors (the attacker's), the
truth for scoring (the auditor's keys, never used to attack), the public reference's tables, and one-to-one
matching of signatures."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from stip.common.layout import (CLIENT_DIR, CLIENT_KEY_FILE, DEVELOPER_DIR, DEVELOPER_KEY_FILE, EMBEDDING_FILE,
                                MODEL_CONFIG_FILE)


# --- the attacker's view ---------------------------------------------------------------------------------------

def server_tensors(server_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the server bundle (its safetensors shards), as float32."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(server_dir).glob("*.safetensors")):
        out |= {k: v.float() for k, v in load_file(str(shard)).items()}
    return out


def server_config(server_dir: Path) -> dict:
    path = Path(server_dir) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_tied(ctx) -> bool:
    """Whether the protected model ties its LM head to its input embedding. The server bundle's own config says
    untied (its embedding is dropped), so this is the architecture's public fact: the reference's config, else the
    model's config as published with the client bundle (transformers' default is tied)."""
    if ctx.reference is not None:
        return bool(getattr(ctx.reference.config, "tie_word_embeddings", True))
    path = Path(ctx.truth.bundle_dir) / CLIENT_DIR / MODEL_CONFIG_FILE
    cfg = json.loads(path.read_text()) if path.is_file() else server_config(ctx.server_dir)
    cfg = cfg.get("text_config", cfg)
    return bool(cfg.get("tie_word_embeddings", True))


def lm_head(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The server bundle's LM head ([V, d], rows in the secret vocabulary order), if it holds one."""
    names = [n for n in tensors if n.endswith("lm_head.weight")]
    return tensors[names[0]] if names else None


def reference_embedding(ctx) -> torch.Tensor | None:
    """The public model's input embedding table [V, d] (float32), or None without a reference."""
    if ctx.reference is None:
        return None
    return ctx.reference.get_input_embeddings().weight.detach().float()


def observed(ctx) -> tuple[torch.Tensor, list[int]]:
    """All observed input rows stacked [N, d], and the request each row came from."""
    rows = [o.inputs.float() for o in ctx.observations]
    owner = [i for i, o in enumerate(ctx.observations) for _ in range(o.inputs.shape[0])]
    if not rows:
        return torch.empty(0, 0), []
    return torch.cat(rows), owner


def setting(ctx, attack: str, name: str, default, quick=None):
    """A knob: ctx.settings[attack][name] (a dict per attack), else the quick default in quick mode, else the
    default."""
    own = ctx.settings.get(attack) or {}
    if name in own:
        return own[name]
    return quick if quick is not None and ctx.settings.get("quick") else default


def nearest_rows(queries: torch.Tensor, table: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each query's nearest table row (L2) and its distance, in chunks so memory stays small."""
    sq = (table * table).sum(1)
    idx, dist = [], []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk]
        d2 = sq[None, :] - 2 * q @ table.T + (q * q).sum(1, keepdim=True)
        i = d2.argmin(1)
        idx.append(i)
        dist.append((q - table[i]).norm(dim=1))  # exact, not the expansion's rounding
    if not idx:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    return torch.cat(idx), torch.cat(dist)


def match(cost: torch.Tensor) -> torch.Tensor:
    """A one-to-one assignment minimising `cost` [n, n]: out[j] = the column matched to row j. Hungarian
    (scipy) where installed, else greedy mutual-nearest rounds (exact whenever each true pair is the clear
    minimum)."""
    cost = cost.float()
    try:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cost.numpy())
        out = torch.empty(cost.shape[0], dtype=torch.long)
        out[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        return out
    except ImportError:
        pass
    # Greedy in rounds: every unmatched row and column that are each other's nearest are paired; after
    # `rounds` rounds whatever is left takes its nearest free column (or, with none free, its nearest).
    n, m = cost.shape
    out = torch.full((n,), -1, dtype=torch.long)
    free_r = torch.ones(n, dtype=torch.bool)
    free_c = torch.ones(m, dtype=torch.bool)
    big = torch.finfo(cost.dtype).max
    for _ in range(64):
        if not free_r.any() or not free_c.any():
            break
        c = cost.masked_fill(~free_r[:, None], big).masked_fill(~free_c[None, :], big)
        best_c = c.argmin(1)
        best_r = c.argmin(0)
        rows = torch.nonzero(free_r).flatten()
        mutual = rows[best_r[best_c[rows]] == rows]
        if not mutual.numel():
            break
        out[mutual] = best_c[mutual]
        free_r[mutual] = False
        free_c[best_c[mutual]] = False
    rest = torch.nonzero(free_r).flatten()
    if rest.numel():
        c = cost[rest].masked_fill(~free_c[None, :], big) if free_c.any() else cost[rest]
        out[rest] = c.argmin(1)
    return out


def sketch(rows: torch.Tensor, points: int = 32, absolute: bool = False) -> torch.Tensor:
    """A signature of each row that no permutation of the row changes (nor sign flips, with `absolute`): the row
    sorted when short, else its `points` extreme values (largest, and smallest unless `absolute`), its mean and its
    RMS. Extremes by top-k rather than a full sort: sorting every row of every weight is what would make
    the bundle attack slow."""
    v = (rows.abs() if absolute else rows).contiguous()
    if v.shape[1] <= points:
        return v.sort(dim=1).values
    k = points // 2 if not absolute else points
    parts = [v.topk(k, dim=1).values]
    if not absolute:
        parts.append(v.topk(k, dim=1, largest=False).values)
    parts += [v.mean(1, keepdim=True), (v * v).mean(1, keepdim=True).sqrt()]
    return torch.cat(parts, 1)


# --- the auditor's truth (scoring only) ------------------------------------------------------------------------

def client_key(bundle_dir: Path):
    from stip.common.keys import ClientKey

    return ClientKey.load(Path(bundle_dir) / CLIENT_DIR / CLIENT_KEY_FILE)


def developer_key(bundle_dir: Path):
    from stip.common.keys import DeveloperKey

    return DeveloperKey.load(Path(bundle_dir) / DEVELOPER_DIR / DEVELOPER_KEY_FILE)


def residual_matrix(key) -> torch.Tensor:
    """The [d, d] matrix R with `client rows = embedding rows @ R`: the key's own `residual_matrix()` where it has
    one (hardened modes), else the signed permutation matrix of `p` (y[j] = sign[j] x[perm[j]])."""
    own = getattr(key, "residual_matrix", None)
    if callable(own):
        return own().float()
    resid = key.resid
    d = len(resid)
    r = torch.zeros(d, d)
    sign = torch.ones(d) if resid.sign is None else resid.sign.float()
    r[resid.perm, torch.arange(d)] = sign
    return r


def plain_embedding(bundle_dir: Path) -> torch.Tensor | None:
    """The protected model's own plaintext token embedding (client bundle): the known-plaintext pairs' `x`."""
    path = Path(bundle_dir) / CLIENT_DIR / EMBEDDING_FILE.format("token")
    return load_file(str(path))["weight"].float() if path.is_file() else None


def columns_recovered(estimate: torch.Tensor, truth: torch.Tensor, tol: float = 0.05) -> tuple[float, float]:
    """(exact, within tol): shares of the columns of R that an estimate reproduces, exactly (after rounding a
    signed permutation's entries) and within a relative L2 error of `tol`."""
    err = (estimate - truth).norm(dim=0) / truth.norm(dim=0).clamp_min(1e-12)
    exact = (estimate.round() == truth).all(0) if bool(((truth == 0) | (truth.abs() == 1)).all()) \
        else err < 1e-4
    return float(exact.float().mean()), float((err < tol).float().mean())


def perm_columns_recovered(perm: torch.Tensor, sign: torch.Tensor | None, truth: torch.Tensor) -> float:
    """Share of the columns j of R equal to sign[j] e_{perm[j]} (a recovered signed permutation, scored against
    any R: a dense one gives ~0)."""
    d = truth.shape[0]
    s = torch.ones(d) if sign is None else sign.float()
    est = torch.zeros_like(truth)
    est[perm, torch.arange(d)] = s
    return float(((est - truth).abs() < 1e-3).all(0).float().mean())


def aloepri_knobs(server_dir: Path) -> dict | None:
    """AloePri's options (`stip protect --harden aloepri`) as the server bundle's manifest records them, or None: its
    residual key is a dense, non-orthogonal d x (d + 2h) map per linear, drawn from the developer's seed, with no
    permutation `p` and no square transform for the client key to hold."""
    try:
        manifest = json.loads((Path(server_dir) / "stip-manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("aloepri") if "aloepri" in (manifest.get("harden") or []) else None


def widened(ctx) -> str | None:
    """Why an attack that maps the server's residual rows to the public model's by a square d x d transform (or
    compares rows of both by direction) does not apply, or None: AloePri widens the stream from d to d + 2h, and
    every linear reads it through its own d + 2h -> d map (docs/aloepri.md)."""
    width = server_config(ctx.server_dir).get("hidden_size")
    d = None if ctx.reference is None else int(ctx.reference.get_input_embeddings().weight.shape[1])
    if width is None or d is None or int(width) == d:
        return None
    return (f"the server's residual stream is {width} wide and the public model's {d} (AloePri's d + 2h "
            f"expansion, each linear reading it through its own map): no square residual transform to solve for "
            f"or rows of equal width to compare")


def truth_residual(bundle_dir: Path) -> torch.Tensor | None:
    """The true residual transform R for scoring key recovery (`residual_matrix` of the client key), or None where
    the client key does not hold it (AloePri: its client key's residual part is an unused identity)."""
    if aloepri_knobs(Path(bundle_dir) / "server") is not None:
        return None
    return residual_matrix(client_key(bundle_dir))


def mode_of(server_dir: Path) -> dict:
    """The protection mode as the bundle's manifest records it (hardened options, noise), for the report."""
    path = Path(server_dir) / "stip-manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: manifest[k] for k in ("mode", "harden", "noise") if k in manifest}


class _Stop(Exception):
    """Raised by the hook on the attacked block: nothing after it is needed."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def state_after(model, block, ids: torch.Tensor, cache) -> torch.Tensor:
    """The hidden state after `block` at the last position of `ids` [B, T], appended after `cache` (updated in
    place); the forward stops at that block."""
    def hook(_mod, _args, out):
        raise _Stop(out[0] if isinstance(out, tuple) else out)

    handle = block.register_forward_hook(hook)
    try:
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    except _Stop as stop:
        return stop.hidden[:, -1]
    finally:
        handle.remove()
    raise RuntimeError("the attacked block never ran")


def expanded_cache(cache, layers: int, n: int):
    """A copy of the first `layers` layers of a batch-1 KV cache, expanded to a batch of n candidates."""
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers[:layers] if cache is not None else []):
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            break
        out.update(layer.keys.expand(n, *layer.keys.shape[1:]).contiguous(),
                   layer.values.expand(n, *layer.values.shape[1:]).contiguous(), i)
    return out
