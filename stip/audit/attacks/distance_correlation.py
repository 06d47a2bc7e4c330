"""Distance correlation between the plaintext embeddings of the tokens sent and what the server received: a leakage
measure, not an attack, so `recovery` is None (unit "dCor") and the numbers are in `details["per_layer"]`.

Szekely's distance correlation (Szekely, Rizzo and Bakirov 2007) of samples X [n, p] and Y [n, q]: double-centre
each sample's pairwise Euclidean distance matrix, dCov^2 = mean(A * B), dCor^2 = dCov^2(X, Y) / sqrt(dCov^2(X, X)
dCov^2(Y, Y)). It is 0 only under independence (in the limit), 1 for Y an orthogonal transform of X (up to scale and
shift): so a permutation or a dense rotation of the residual stream gives 1 by construction, and only noise or a
non-isometric map lowers it. (The paper prints Pearson's correlation distance instead: a misprint.) The plain
(V-statistic) estimate is biased upwards when the dimension is large next to n, so the bias-corrected estimate
(U-centred, Szekely and Rizzo 2014; about 0 under independence at any dimension) is reported beside it.

References, as in the paper: the same statistic between the plaintext and a random Gaussian projection of it (the
paper's reference for "as related as a random linear map"), and between two independent random samples of the same
shapes (the floor).

The plaintext embeddings are the auditor's (the client bundle's table and the truth's token ids): this measures,
it does not attack. Settings (`ctx.settings["distance_correlation"]`): `max_rows` (rows sampled, default 1000).
"""

from __future__ import annotations

import time

import torch
from safetensors.torch import load_file

from stip.audit.attacks.base import AttackResult

NAME = "distance_correlation"
TITLE = "Distance correlation (Szekely) between plaintext embeddings and what the server received"

DEFAULTS = dict(max_rows=1000)
QUICK = dict(max_rows=200)


def settings(ctx) -> dict:
    out = dict(DEFAULTS)
    if ctx.settings.get("quick"):
        out |= QUICK
    return out | dict(ctx.settings.get(NAME, {}))


def _centred(x: torch.Tensor, unbiased: bool) -> torch.Tensor:
    a = torch.cdist(x, x).double()
    n = a.shape[0]
    if not unbiased:
        return a - a.mean(0, keepdim=True) - a.mean(1, keepdim=True) + a.mean()
    # U-centring: row/column sums over n - 2, grand sum over (n - 1)(n - 2), zero diagonal
    u = a - a.sum(0, keepdim=True) / (n - 2) - a.sum(1, keepdim=True) / (n - 2) + a.sum() / ((n - 1) * (n - 2))
    u.fill_diagonal_(0.0)
    return u


def dcor(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False) -> float:
    """Szekely's distance correlation of paired samples x [n, p], y [n, q] (n >= 4 when unbiased). The unbiased
    (bias-corrected) version can be slightly negative under independence; it is reported as computed."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    if len(x) != len(y):
        raise ValueError(f"paired samples differ in length: {len(x)} and {len(y)}")
    a, b = _centred(x, unbiased), _centred(y, unbiased)
    norm = 1.0 / (len(x) * (len(x) - 3)) if unbiased else 1.0 / len(x) ** 2
    xy, xx, yy = (float((u * v).sum()) * norm for u, v in ((a, b), (a, a), (b, b)))
    if xx <= 0 or yy <= 0:
        return 0.0
    r2 = xy / (xx * yy) ** 0.5
    return r2 ** 0.5 if r2 >= 0 else -((-r2) ** 0.5)


def _both(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {"dcor": dcor(x, y), "dcor_bias_corrected": dcor(x, y, unbiased=True)}


def _plain_table(ctx) -> torch.Tensor | None:
    """The plaintext token embedding (the client bundle's, as the auditor holds it), else the reference's."""
    from stip.common.layout import EMBEDDING_FILE

    f = ctx.truth.bundle_dir / "client" / EMBEDDING_FILE.format("token")
    if f.is_file():
        return load_file(str(f))["weight"].float()
    if ctx.reference is not None:
        return ctx.reference.get_input_embeddings().weight.detach().float()
    return None


def run(ctx) -> AttackResult:
    start = time.monotonic()
    opts = settings(ctx)
    table = _plain_table(ctx)
    if table is None:
        return AttackResult(NAME, TITLE, None, unit="dCor", skipped="no plaintext embedding table to compare with")
    if not ctx.observations:
        return AttackResult(NAME, TITLE, None, unit="dCor", skipped="nothing was observed")
    ids = torch.cat([t.view(-1).long() for t in ctx.truth.ids])
    g = torch.Generator().manual_seed(ctx.seed)
    keep = torch.randperm(len(ids), generator=g)[: opts["max_rows"]]
    plain = table[ids[keep]]
    observed = {"inputs": torch.cat([o.inputs for o in ctx.observations]).float()}
    layers = sorted(set.intersection(*(set(o.hidden) for o in ctx.observations)))
    for layer in layers:
        observed[f"layer {layer}"] = torch.cat([o.hidden[layer] for o in ctx.observations]).float()
    per_layer = {name: _both(plain, rows[keep]) for name, rows in observed.items()}
    d = plain.shape[1]
    projection = torch.randn(d, d, generator=g, dtype=torch.float32) / d ** 0.5
    reference = {"random_projection": _both(plain, plain @ projection),
                 "independent": _both(torch.randn(len(keep), d, generator=g), torch.randn(len(keep), d, generator=g))}
    names = list(per_layer)
    curves = {"distance correlation with the plaintext embeddings, by layer": dict(
        x=[-1] + layers, xlabel="layer (-1: the inputs)", ylabel="dCor", y={
            "dCor": [per_layer[n]["dcor"] for n in names],
            "dCor, bias-corrected": [per_layer[n]["dcor_bias_corrected"] for n in names],
            "random projection (reference)": [reference["random_projection"]["dcor"]] * len(names),
            "independent, bias-corrected (floor)": [reference["independent"]["dcor_bias_corrected"]] * len(names)})}
    return AttackResult(
        NAME, TITLE, None, unit="dCor",
        details=dict(per_layer=per_layer, reference=reference, rows=len(keep), layers=names,
                     note="1 = an isometry of the plaintext (any permutation or rotation); the random projection "
                          "is the paper's reference, the independent pair the floor"),
        curves=curves, seconds=time.monotonic() - start)
