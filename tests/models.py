"""Tiny random models of every supported architecture, built in code (equivalence holds for any weights).

Norm weights and biases are randomised too: left at their init (all ones / zeros) a permuted norm would equal the
original, and the leak tests could not tell protected from unprotected.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
                          Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Starcoder2Config, Starcoder2ForCausalLM)

VOCAB = 97


def _randomise(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_configs() -> dict[str, tuple[type, object]]:
    """name -> (model class, config). Covers GQA (3 query heads per KV head), MQA, RoPE, QKV bias, tied/untied."""
    rope = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                max_position_embeddings=128)
    return {
        "llama-gqa-untied": (LlamaForCausalLM, LlamaConfig(**rope, num_attention_heads=6, num_key_value_heads=2,
                                                           head_dim=8, tie_word_embeddings=False)),
        "llama-mqa-tied": (LlamaForCausalLM, LlamaConfig(**rope, num_attention_heads=4, num_key_value_heads=1,
                                                         tie_word_embeddings=True)),
        "mistral-gqa": (MistralForCausalLM, MistralConfig(**rope, num_attention_heads=4, num_key_value_heads=2,
                                                          head_dim=12, tie_word_embeddings=False)),
        "qwen2-bias-tied": (Qwen2ForCausalLM, Qwen2Config(**rope, num_attention_heads=6, num_key_value_heads=2,
                                                          tie_word_embeddings=True)),
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=64)),
        # Q/K norms over head dims, tied
        "qwen3-qknorm-tied": (Qwen3ForCausalLM, Qwen3Config(**rope, num_attention_heads=4, num_key_value_heads=2,
                                                            head_dim=8, tie_word_embeddings=True)),
        # fused qkv_proj (GQA) and gate_up_proj
        "phi3-fused": (Phi3ForCausalLM, Phi3Config(**rope, num_attention_heads=6, num_key_value_heads=2,
                                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        # embedding scale, (1 + w) norms, GeGLU, Q/K norms, 4 norms per layer, a 4-token sliding window beside a
        # full-attention layer, soft-capping; untied (tied, this random model's greedy output is one repeated token;
        # tests/test_decoders.py checks a tied one's logits)
        "gemma3-text": (Gemma3ForCausalLM, Gemma3TextConfig(
            **rope, num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
            sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=20.0, final_logit_softcapping=15.0, tie_word_embeddings=False, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)),
        # sparse MoE: 4 SwiGLU experts, top-2 routing, GQA
        "mixtral-moe": (MixtralForCausalLM, MixtralConfig(
            **{**rope, "num_hidden_layers": 2, "intermediate_size": 40}, num_attention_heads=6, num_key_value_heads=2,
            head_dim=8, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
        # Qwen3-MoE: Q/K norms, 4 experts top-2 without renormalizing the top-k weights, layer 1 dense and wider
        "qwen3-moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
            **{**rope, "num_hidden_layers": 2, "intermediate_size": 40}, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[1],
            tie_word_embeddings=False)),
        # Qwen2-MoE: QKV biases, 4 routed experts top-2 (renormalized) plus a wider, sigmoid-gated shared expert
        "qwen2-moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig(
            **{**rope, "num_hidden_layers": 2, "intermediate_size": 40}, num_attention_heads=6, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=40,
            norm_topk_prob=True, tie_word_embeddings=False)),
        # LayerNorm with biases, GELU MLP, biases on every projection, a 4-token sliding window
        "starcoder2": (Starcoder2ForCausalLM, Starcoder2Config(
            **rope, num_attention_heads=6, num_key_value_heads=2, sliding_window=4, bos_token_id=1, eos_token_id=2)),
    }


def build_tiny(name: str, seed: int = 0):
    cls, config = tiny_configs()[name]
    torch.manual_seed(seed)
    return _randomise(cls(config), seed)


def save_tiny(name: str, folder: Path, seed: int = 0, **save_kw) -> Path:
    model = build_tiny(name, seed)
    model.save_pretrained(folder, **save_kw)
    return Path(folder)
