"""The server's view of production traffic, computed offline: the code stream a STIP server would see for a
token stream, from the real client key and the client's own embedding step.

A round-trip server receives, per token, the row `ClientBundle.embed` computes (the embedding in the secret basis,
plus the context's noise with `--noise`), as float32 (the client's default wire dtype). Those rows are a function
of the key, the token ids and (with noise) the context, so the rows of a million tokens need no server:
`code_stream` calls the same `embed` the client SDK calls, one request at a time from position 0 with a fresh noise
chain, as `stip.Client.generate` sends a prompt. tests/test_decipher.py checks, on a sample, that these rows give
the same codes as what a real `stip serve --capture` received.

Codes are what the server can compute from rows alone: in a deterministic mode, a hash of the row's bytes (equal
rows, equal code); with noise, rows linked by distance (`stip.audit.linking.StreamLinker`, the `frequency`
attack's threshold: `link` times the expected distance of two noisy copies).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def requests_of(ids: np.ndarray, size: int) -> list[np.ndarray]:
    """A token stream cut into requests of `size` tokens (the last one shorter)."""
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def row_codes(rows: torch.Tensor) -> np.ndarray:
    """A 63-bit code per row: a hash of its float32 bytes (what any server can compute from what it receives)."""
    data = rows.detach().to(torch.float32).contiguous().numpy()
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") >> 1
                     for r in data], dtype=np.int64)


def client_rows(bundle, ids: np.ndarray) -> torch.Tensor:
    """The rows the client sends for one request's prompt `ids`: `embed` from position 0 with the context's noise
    (a new chain, as `stip.Client.generate` makes per request)."""
    return bundle.embed(torch.as_tensor(ids, dtype=torch.long), start=0, noise=bundle.noise_chain())


def code_stream(bundle, requests: list[np.ndarray], link: float = 2.0, progress=None) -> tuple[list[np.ndarray], dict]:
    """(codes per request, details) for the requests as `bundle`'s client sends them: row hashes, or linked rows
    where the bundle adds noise."""
    from stip.audit.linking import StreamLinker, noisy_copy_distance

    linker = None
    details: dict = {"codes_from": "row bytes (blake2b)"}
    out = []
    for i, ids in enumerate(requests):
        rows = client_rows(bundle, ids)
        if not bundle.noise_std:
            out.append(row_codes(rows))
        else:
            if linker is None:
                threshold = link * noisy_copy_distance(rows, bundle.noise)
                linker = StreamLinker(rows.shape[1], threshold)
                details = {"codes_from": f"rows linked within {threshold:.4g} ({link:g} x the expected distance of "
                                         f"two noisy copies at noise {bundle.noise:g})", "threshold": threshold}
            out.append(linker.add(rows))
        if progress is not None and (i + 1) % 200 == 0:
            progress(f"{i + 1}/{len(requests)} requests embedded")
    return out, details


def purity(codes: list[np.ndarray], truth: list[np.ndarray]) -> dict:
    """The auditor's check of a linking: the share of rows whose code's most common token is their own, and how
    many codes there are per distinct token (1.0: one code per token)."""
    flat_c, flat_t = np.concatenate(codes), np.concatenate(truth)
    pairs, counts = np.unique(np.stack([flat_c, flat_t]), axis=1, return_counts=True)
    order = np.lexsort((-counts, pairs[0]))
    first = np.unique(pairs[0][order], return_index=True)[1]
    right = int(counts[order][first].sum())
    return {"purity": right / len(flat_c), "codes": int(len(np.unique(flat_c))),
            "tokens": int(len(np.unique(flat_t)))}
