"""`qwen3moe` (Qwen3 MoE, e.g. Qwen3-30B-A3B): the qwen3 block (per-head Q/K RMSNorm, NEOX RoPE) with a
mixture-of-experts FFN (llamba.models.moe.MoEFFN without a shared expert: softmax router, top-k renormalized, as
llama.cpp's LLM_ARCH_QWEN3MOE). A layer without a router (`ffn_gate_inp`) keeps the dense gated FFN. Extra keys:
expert_count, expert_used_count, expert_feed_forward_length (default feed_forward_length / expert_used_count)."""
from __future__ import annotations

import dataclasses

from llamba.config import ModelConfig, base_config
from llamba.errors import GGUFError
from llamba.models.base import Transformer
from llamba.models.moe import MoEFFN


def config_from_gguf(gf) -> ModelConfig:
    p = "qwen3moe."
    cfg = ModelConfig(**base_config(gf, "qwen3moe", rope_neox=True))
    n_expert = int(gf.require(p + "expert_count"))
    n_used = int(gf.require(p + "expert_used_count"))
    if n_expert <= 0 or not 0 < n_used <= n_expert:
        raise GGUFError(f"{gf.path}: {p}expert_used_count {n_used} must be between 1 and {p}expert_count "
                        f"{n_expert}")
    n_ff_exp = int(gf.get(p + "expert_feed_forward_length", 0) or 0) or max(cfg.n_ff) // n_used
    if n_ff_exp <= 0:
        raise GGUFError(f"{gf.path}: cannot tell the expert FFN width: {p}expert_feed_forward_length is missing "
                        f"and {p}feed_forward_length is 0")
    return dataclasses.replace(cfg, n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp, n_ff_shexp=0)


class Qwen3Moe(Transformer):
    activation = "silu"
    post_norms = False

    def make_ffn(self, gf, cfg, il: int):
        if gf.has(f"blk.{il}.ffn_gate_inp.weight"):
            return MoEFFN(gf, cfg, il, shared=False)
        return None


def build(gf, n_ctx: int, **opts):
    return Qwen3Moe(gf, config_from_gguf(gf), n_ctx)
