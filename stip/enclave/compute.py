"""What the enclave computes in TEE mode: the embedding in `p`, block 0, the final norm, the LM head and `pc`.

The split (docs/tee.md, "The split"): in a pre-LN block a worker that computed the first attention output `a1` and
then received `h1 = x p + a1` would recover `x p = h1 - a1`. So block 0 runs here, as the model's own decoder-layer
module (a 1-layer model built from the config: RoPE, GQA and GPT-2's Conv1D work unchanged): its norms, attention
core, activations, residual adds and KV cache stay in the enclave. Only its linear maps go to the worker, each with a
fresh pad (Slalom; pads and `W r` precomputed in a pool, stip.enclave.pads): the enclave sends `A (x + r)`, the
worker returns `W' A (x + r) + B b` with its copy `W' = B W A^-1` (`stip protect --tee` stores block 0 in secret
monomial bases `A`, `B`, so the worker's copy of block 0 is not in the basis of `h1 p`); the enclave applies
`B^-1` and subtracts `W r`. The worker runs blocks 1..L-1 on `h1 p` and returns the last hidden state; the final
norm runs here. The LM head: a tied model's (its embedding table) is computed here, an untied one is offloaded with
a pad and an input mask `A`; `pc` is undone here. Concurrent sessions' steps run as one batched step
(`step_batch`, stip.enclave.batch). The padded products are computed in float64 on both sides and the masks are
signs times powers of two (exact in floating point), so the result is `W x` to float64 accuracy and greedy
generation equals plain generation. Block 0's KV cache is preallocated per session (stip.enclave.kv_cache).

The offload of each linear (pads, masks, the link to the worker) is stip.enclave.offload's; the bundle's tensor
names and the model's parts are shared rules (stip.common.tee).
"""

from __future__ import annotations

import copy
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from stip.common.tee.blocks import POSITION_ATTRS, base_parts, config_of, input_groups, trimmed_config
from stip.common.tee.layout import (BLOCK_PREFIX, EMBEDDING_SCALE, FINAL_NORM_PREFIX, LM_HEAD, LM_HEAD_IN_ENCLAVE,
                                    LM_HEAD_PREFIX, MASK_PREFIX, POSITION_EMBEDDING, RESID, TOKEN_EMBEDDING, VOCAB)
from stip.common.tee.linalg import Monomial, weight_of
from stip.enclave.offload import CURRENT, LocalLinear, OffloadedLinear, PerThread, TimedLink, WorkerLink
from stip.enclave.batch import MAX_BATCH
from stip.enclave.pads import POOL_BYTES, Pads

CALIBRATION_MARGIN = 4.0  # B = this x the largest calibration RMS: rows up to 4x beyond it keep >= 2^18 x their RMS


@dataclass
class EnclaveSession:
    """One conversation: block 0's KV cache (here, never at the worker) and how many tokens it holds."""

    id: str
    cache: object
    position: int = 0
    timings: dict = field(default_factory=lambda: {"enclave_s": 0.0, "worker_s": 0.0, "pad_hits": 0,
                                                   "pad_misses": 0})


def _perm_from(tensors: dict[str, torch.Tensor], name: str):
    from stip.common.transforms import SignedPermutation

    return SignedPermutation(tensors[f"{name}.perm"].long(), tensors.get(f"{name}.sign"))


class EnclaveModel:
    """Block 0, the embedding in `p`, the final norm and the un-permuting of the logits; everything else through a
    `WorkerLink`. `prefill(session, ids)` / `decode(session, id)` return plain float32 logits of the last position."""

    def __init__(self, config, tensors: dict[str, torch.Tensor], link: WorkerLink, pool_bytes: int = POOL_BYTES):
        from transformers import AutoModel

        self.config = config_of(config)
        self.link = TimedLink(link)
        self.pads = Pads()
        self.resid, self.vocab = _perm_from(tensors, RESID), _perm_from(tensors, VOCAB)
        scale = float(tensors.get(EMBEDDING_SCALE, torch.tensor(1.0)))
        self.token_embedding = self.resid.apply(tensors[TOKEN_EMBEDDING].float() * scale, 1, "out").contiguous()
        self.vocab_size = self.token_embedding.shape[0]
        one = trimmed_config(self.config, 0, 1)
        base = AutoModel.from_config(one).eval()
        self.base, layers_attr, norm_attr = base, *base_parts(base)[1:]
        emb = base.get_input_embeddings()
        emb.weight = nn.Parameter(torch.empty(0, emb.embedding_dim), requires_grad=False)  # the table lives above
        pos_attr = next((a for a in POSITION_ATTRS if hasattr(base, a)), None)
        if pos_attr is not None:
            pos = self.resid.apply(tensors[POSITION_EMBEDDING].float(), 1, "out")
            getattr(base, pos_attr).weight = nn.Parameter(pos.contiguous(), requires_grad=False)
        block = getattr(base, layers_attr)[0]
        _load(block, tensors, BLOCK_PREFIX, "block 0")
        self.final_norm = copy.deepcopy(getattr(base, norm_attr))
        _load(self.final_norm, tensors, FINAL_NORM_PREFIX, "the final norm")
        setattr(base, norm_attr, nn.Identity())  # the base model's output is h1 p, before any norm
        self.waiting = PerThread()
        groups = input_groups(block)
        weights = {name: weight_of(block.get_submodule(name)) for g in groups for name in g}  # (W, b)
        masks = {name: (_mask(tensors, name, "in"), _mask(tensors, name, "out")) for name in weights}
        for group in groups:
            a, b = masks[group[0]][0], Monomial.concat([masks[g][1] for g in group])
            for name in group:
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, leaf,
                        OffloadedLinear(name, weights[name][0], self.link, self.pads,
                                        [(g, *weights[g]) for g in group], self.waiting, a=a, b=b))
        head = tensors[LM_HEAD_PREFIX + "weight"]
        self.lm_head_local = bool(tensors.get(LM_HEAD_IN_ENCLAVE, torch.tensor(0)).item())
        # a tied head's rows are put in plain vocabulary order once (`pc` undone on the weight, exact: a signed
        # permutation), so its logits come out plain (and the rows are then the embedding table's, shared where
        # equal); an offloaded head's logits come back in `pc` order
        if self.lm_head_local:
            self.lm_head = LocalLinear(self.vocab.invert(head.float(), 0), self.token_embedding)
        else:
            self.lm_head = OffloadedLinear(LM_HEAD, head, self.link, self.pads, a=_mask(tensors, LM_HEAD, "in"),
                                           bias=tensors.get(LM_HEAD_PREFIX + "bias"))
        inv = self.vocab.inverse_perm  # logits[:, i] = sign[inv[i]] * logits_pc[:, inv[i]], gathered per step
        self._vocab_inv = (inv, None if self.vocab.sign is None else self.vocab.sign.float()[inv])
        self.max_positions = getattr(self.config, "max_position_embeddings", None)
        self._lock = threading.Lock()  # one step at a time: the pads and block 0 are shared by all sessions
        self._threads, self._thread_count = ThreadPoolExecutor(MAX_BATCH, "stip-block0"), MAX_BATCH
        self.calibrate()
        self.pads.start_pools([(m.key, m.weight64, m.bound) for m in self.offloaded()], pool_bytes)

    def offloaded(self) -> list[OffloadedLinear]:
        """One OffloadedLinear per worker request kind: each group's first member, and an untied LM head."""
        out = [m for m in self.base.modules() if isinstance(m, OffloadedLinear) and m.name == m.names[0]]
        return out + ([self.lm_head] if isinstance(self.lm_head, OffloadedLinear) else [])

    @torch.no_grad()
    def calibrate(self, sequences: int = 4, length: int = 64) -> None:
        """Each group's pad bound B: CALIBRATION_MARGIN x the largest input RMS seen when block 0 runs here, exactly
        and without the worker, on fixed token sequences spread over the vocabulary (an untied LM head: the final
        norm of those block-0 outputs and of each scaled unit vector). A function of the model alone, computed
        once: the pads' scale then says nothing about any user's rows (docs/tee.md, "Pads")."""
        length = min(length, self.max_positions or length)
        ids = (torch.arange(sequences * length) * 7919 % self.vocab_size).reshape(sequences, length)
        groups = self.offloaded()
        for m in groups:
            m.calibrating = []
        try:
            positions = torch.arange(length)[None].expand(sequences, -1)
            h1 = self.base(inputs_embeds=self.token_embedding[ids], position_ids=positions,
                           use_cache=False).last_hidden_state
            d = h1.shape[-1]
            self.lm_head(self.final_norm(torch.cat([h1.reshape(-1, d), torch.eye(d) * d ** 0.5]).float()))
            for m in groups:
                m.bound = CALIBRATION_MARGIN * max(max(m.calibrating), 1e-6)
        finally:
            for m in groups:
                m.calibrating = None
            self.waiting.clear()

    @classmethod
    def from_tensors(cls, config, tensors: dict[str, torch.Tensor], link: WorkerLink, **kw) -> "EnclaveModel":
        return cls(config, tensors, link, **kw)

    def shutdown(self) -> None:
        """Stop the pad filler (the pools' rows go with the model) and the block-0 threads."""
        self.pads.close()
        self._threads.shutdown(wait=False)

    # ------------------------------------------------------------ sessions

    def new_session(self) -> EnclaveSession:
        from stip.enclave.kv_cache import new_cache

        return EnclaveSession(os.urandom(12).hex(), new_cache(self.base.config, self.max_positions))

    def close(self, s: EnclaveSession) -> None:
        self.link.close(s.id)

    def _step(self, s: EnclaveSession, ids: torch.Tensor) -> torch.Tensor:
        out = self.step_batch([(s, ids)])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def _check(self, s: EnclaveSession, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("no tokens to run")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        if self.max_positions and s.position + ids.numel() > self.max_positions:
            raise ValueError(f"sequence would reach {s.position + ids.numel()} tokens; the model has "
                             f"{self.max_positions} positions")
        return ids

    def _block0(self, s: EnclaveSession, ids: torch.Tensor) -> torch.Tensor:
        """h1 p [T, d]: the embedding in `p` and block 0, here (its linears through the worker, padded)."""
        self.waiting.clear()
        positions = torch.arange(s.position, s.position + ids.numel())
        x = self.token_embedding[ids].unsqueeze(0)  # x p
        return self.base(inputs_embeds=x, past_key_values=s.cache, use_cache=True, position_ids=positions[None],
                         cache_position=positions).last_hidden_state[0].contiguous()

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The plain logits [B, V] of last hidden states [B, d]: final norm, LM head, un-permuting `pc` (a tied
        head's weight is in plain order already; softcapping is odd and elementwise, so it commutes with `pc`)."""
        logits = self.lm_head(self.final_norm(h.float())).float()
        cap = getattr(self.config, "final_logit_softcapping", None)  # Gemma 2/3: as their ForCausalLM does
        if cap:
            logits = torch.tanh(logits / cap) * cap
        if self.lm_head_local:
            return logits
        inv, sign = self._vocab_inv
        logits = logits.index_select(1, inv)
        return logits if sign is None else logits * sign

    @torch.no_grad()
    def step_batch(self, items: list[tuple[EnclaveSession, torch.Tensor]]) -> list:
        """Several sessions' steps as one: per item the plain logits [V] of its last position, or the exception that
        failed it alone. Two or more run their block 0 on threads of their own, meeting at each offloaded group
        (stip.enclave.batch.Tick), and their bodies in one request."""
        from stip.enclave.batch import Tick

        results: list = [None] * len(items)
        good = []
        with self._lock:  # one step at a time: block 0's modules and the worker link are shared
            for i, (s, ids) in enumerate(items):
                try:
                    if any(s is items[j][0] for j, _ in good):
                        raise ValueError("a session may have only one step in a batch")
                    good.append((i, self._check(s, ids)))
                except ValueError as e:
                    results[i] = e
            if not good:
                return results
            t0, w0, pads0 = time.perf_counter(), self.link.seconds, self.pads.stats()
            self.pads.fresh()  # new pads for every query
            self.pads.hold()  # the pad filler waits for the worker's body (stip.enclave.pads.PadFiller)
            try:
                if len(good) == 1:
                    (i, ids), = good
                    h1s = [_result_of(self._block0, items[i][0], ids)]
                else:
                    if len(good) > self._thread_count:  # a tick's sessions need a thread each: they wait for each other
                        self._threads.shutdown(wait=False)
                        self._threads, self._thread_count = ThreadPoolExecutor(len(good), "stip-block0"), len(good)
                    tick = Tick(len(good))
                    runs = [self._threads.submit(self._tick_block0, tick, items[i][0], ids) for i, ids in good]
                    h1s = [_result(f) for f in runs]
                self._bodies_and_heads(items, good, h1s, results)
            finally:
                self.pads.release()
            self._account(items, good, time.perf_counter() - t0, self.link.seconds - w0, pads0)
        return results

    def _tick_block0(self, tick, s: EnclaveSession, ids: torch.Tensor) -> torch.Tensor:
        CURRENT.tick = tick
        try:
            with torch.no_grad():
                return self._block0(s, ids)
        finally:
            CURRENT.tick = None
            tick.leave()

    def _bodies_and_heads(self, items, good, h1s, results) -> None:
        """Blocks 1..L-1 at the worker for every session whose block 0 ran (one request), then the heads here."""
        live = [(i, ids, h1) for (i, ids), h1 in zip(good, h1s) if not _failed(h1, results, i)]
        if not live:
            return
        spans = [(items[i][0].id, h1, items[i][0].position) for i, _, h1 in live]
        self.pads.release()  # the enclave idles until the body's answer: the pad filler's time
        try:
            if len(spans) == 1:
                outs = [self.link.body(*spans[0])[-1:]]
            else:
                outs = self.link.bodies(spans)
        except Exception as e:  # noqa: BLE001 - the link failed: every session of the step with it
            outs = [e] * len(spans)
        finally:
            self.pads.hold()
        done = [(i, ids, h) for (i, ids, _), h in zip(live, outs) if not _failed(h, results, i)]
        if not done:
            return
        for i, ids, _ in done:
            items[i][0].position += ids.numel()
        plain = self._head(torch.cat([h[-1:] for _, _, h in done]))
        for (i, _, _), row in zip(done, plain):
            results[i] = row

    def _account(self, items, good, total: float, worker: float, pads0: dict) -> None:
        """Each session of the step gets the step's time (it waited for all of it) and its pad counts."""
        pads = self.pads.stats()
        for i, _ in good:
            t = items[i][0].timings
            t["worker_s"] += worker
            t["enclave_s"] += total - worker
            t["pad_hits"] += pads["hits"] - pads0["hits"]
            t["pad_misses"] += pads["misses"] - pads0["misses"]

    def prefill(self, s: EnclaveSession, ids) -> torch.Tensor:
        """Run the prompt; the plain logits [V] of its last position."""
        return self._step(s, ids)

    def decode(self, s: EnclaveSession, token: int) -> torch.Tensor:
        return self._step(s, torch.tensor([int(token)]))

    def generate(self, ids, params=None, top_logprobs: int = 0):
        """Yield (token, top [(id, logprob)] or None) until max_tokens, sampling with stip.common.sampling."""
        from stip.common.sampling import Sampler, SamplingParams

        params = params or SamplingParams()
        sampler = Sampler(params, history=list(map(int, ids)))
        s = self.new_session()
        try:
            logits = self.prefill(s, ids)
            for i in range(params.max_tokens):
                token = sampler.from_logits(logits)
                top = None
                if top_logprobs:
                    lp = torch.log_softmax(logits.float(), -1)
                    v, k = torch.topk(lp, min(top_logprobs, lp.numel()))
                    top = list(zip(k.tolist(), v.tolist()))
                sampler.observe(token)
                yield token, top
                if i + 1 < params.max_tokens:
                    logits = self.decode(s, token)
        finally:
            self.close(s)


def _mask(tensors: dict[str, torch.Tensor], linear: str, side: str) -> Monomial:
    """The secret basis of one side of one offloaded linear; an enclave bundle without it predates them."""
    m = Monomial.from_tensors(tensors, f"{MASK_PREFIX}{linear}.{side}")
    if m is None:
        raise ValueError(f"the enclave tensors hold no {side}put mask for {linear!r}: this enclave bundle was "
                         "written by an older STIP; protect the model again with --tee")
    return m


def _load(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, what: str) -> None:
    """Load `prefix`-named tensors into `module`; every parameter must be given (buffers may be derived)."""
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    params = {n for n, _ in module.named_parameters()}
    missing = [m for m in missing if m in params]
    if missing or unexpected:
        raise ValueError(f"enclave tensors for {what}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _result_of(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - this session alone fails
        return e


def _result(future):
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001 - this session alone fails
        return e


def _failed(out, results: list, i: int) -> bool:
    """Whether a session's part failed (an exception in its place), recorded in `results`."""
    if isinstance(out, BaseException):
        results[i] = out
        return True
    return False
