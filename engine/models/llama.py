"""`llama` (Llama 2/3, Mistral, SmolLM2, ...): ENGINE_BRIEF §3.1. NORM (adjacent-pair) RoPE because the
converter permuted Q/K rows; no QK-norm, no embedding scale, SwiGLU FFN, optional tied output."""
from __future__ import annotations

from llamba.config import ModelConfig, base_config
from llamba.errors import GGUFError
from llamba.models.base import Transformer


def config_from_gguf(gf) -> ModelConfig:
    cfg = ModelConfig(**base_config(gf, "llama", rope_neox=False))
    if cfg.n_rot != cfg.head_dim:
        raise GGUFError(f"{gf.path}: llama.rope.dimension_count {cfg.n_rot} must equal the head size {cfg.head_dim}")
    if gf.get("llama.expert_count", 0):
        from llamba.errors import UnsupportedError
        raise UnsupportedError(f"{gf.path}: llama MoE (Mixtral-style experts) is not supported yet")
    return cfg


class Llama(Transformer):
    activation = "silu"
    post_norms = False


def build(gf, n_ctx: int, **opts):
    return Llama(gf, config_from_gguf(gf), n_ctx)
