"""`llama` (Llama 2/3, Mistral, SmolLM2, ...): ENGINE_BRIEF §3.1. NORM (adjacent-pair) RoPE because the
converter permuted Q/K rows; no QK-norm, no embedding scale, SwiGLU FFN, optional tied output. With
`llama.expert_count` (Mixtral): every FFN a mixture of experts (llamba.models.moe.MoEFFN, no shared expert), as
llama.cpp's llama graph builds it (softmax gating, top-k weights renormalized)."""
from __future__ import annotations

import dataclasses

from llamba.config import ModelConfig, base_config
from llamba.errors import GGUFError
from llamba.models.base import Transformer


def config_from_gguf(gf) -> ModelConfig:
    cfg = ModelConfig(**base_config(gf, "llama", rope_neox=False))
    if cfg.n_rot != cfg.head_dim:
        raise GGUFError(f"{gf.path}: llama.rope.dimension_count {cfg.n_rot} must equal the head size {cfg.head_dim}")
    n_expert = int(gf.get("llama.expert_count", 0) or 0)
    if n_expert:  # Mixtral-style MoE: softmax router, top-k renormalized, no shared expert
        n_used = int(gf.require("llama.expert_used_count"))
        if not 0 < n_used <= n_expert:
            raise GGUFError(f"{gf.path}: llama.expert_used_count {n_used} must be between 1 and llama.expert_count "
                            f"{n_expert}")
        n_ff_exp = int(gf.get("llama.expert_feed_forward_length", 0) or 0) or max(cfg.n_ff)
        cfg = dataclasses.replace(cfg, n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp, n_ff_shexp=0)
    return cfg


class Llama(Transformer):
    activation = "silu"
    post_norms = False

    def make_ffn(self, gf, cfg, il: int):
        if cfg.n_expert and gf.has(f"blk.{il}.ffn_gate_inp.weight"):
            from llamba.models.moe import MoEFFN
            return MoEFFN(gf, cfg, il, shared=False)
        return None


def build(gf, n_ctx: int, **opts):
    return Llama(gf, config_from_gguf(gf), n_ctx)
