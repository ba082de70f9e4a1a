"""`llama` (Llama 2/3, Mistral, SmolLM2, ...): docs/architectures.md. NORM (adjacent-pair) RoPE because the
converter permuted Q/K rows; no QK-norm, no embedding scale, SwiGLU FFN, optional tied output. With
`llama.expert_count` (Mixtral): every FFN a mixture of experts (llamba.models.moe.MoEFFN, no shared expert), as
llama.cpp's llama graph builds it (softmax gating, top-k weights renormalized)."""
from __future__ import annotations

from llamba.config import ModelConfig, base_config
from llamba.errors import GGUFError
from llamba.models.base import Transformer
from llamba.models.moe import moe_config


def config_from_gguf(gf) -> ModelConfig:
    cfg = ModelConfig(**base_config(gf, "llama", rope_neox=False))
    if cfg.n_rot != cfg.head_dim:
        raise GGUFError(f"{gf.path}: llama.rope.dimension_count {cfg.n_rot} must equal the head size {cfg.head_dim}")
    if gf.get("llama.expert_count", 0):  # Mixtral-style MoE: softmax router, top-k renormalized, no shared expert
        cfg = moe_config(gf, cfg, "llama", lambda n_used: max(cfg.n_ff), shared=False)
    return cfg


class Llama(Transformer):
    activation = "silu"
    post_norms = False


def build(gf, n_ctx: int, **opts):
    return Llama(gf, config_from_gguf(gf), n_ctx)
