"""`qwen3moe` (Qwen3 MoE, e.g. Qwen3-30B-A3B): the qwen3 block (per-head Q/K RMSNorm, NEOX RoPE) with a
mixture-of-experts FFN (llamba.models.moe.MoEFFN without a shared expert: softmax router, top-k renormalized, as
llama.cpp's LLM_ARCH_QWEN3MOE; Transformer.make_ffn). A layer without a router (`ffn_gate_inp`) keeps the dense
gated FFN. Extra keys: expert_count, expert_used_count, expert_feed_forward_length (default feed_forward_length /
expert_used_count)."""
from __future__ import annotations

from llamba.config import ModelConfig, base_config
from llamba.models.base import Transformer
from llamba.models.moe import moe_config


def config_from_gguf(gf) -> ModelConfig:
    cfg = ModelConfig(**base_config(gf, "qwen3moe", rope_neox=True))
    return moe_config(gf, cfg, "qwen3moe", lambda n_used: max(cfg.n_ff) // n_used, shared=False)


class Qwen3Moe(Transformer):
    activation = "silu"
    post_norms = False


def build(gf, n_ctx: int, **opts):
    return Qwen3Moe(gf, config_from_gguf(gf), n_ctx)
