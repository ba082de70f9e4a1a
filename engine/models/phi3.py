"""`phi3` (Phi-3 / Phi-3.5 / Phi-4-mini): llama-like blocks with a fused Q|K|V (`attn_qkv`) and a fused gate|up
(`ffn_up`, 2 n_ff rows, SwiGLU over its halves), NEOX RoPE on `rope.dimension_count` dims, as llama.cpp's
LLM_ARCH_PHI3. LongRoPE models carry `rope_factors_short` / `rope_factors_long` (frequency divisors) and
`rope.scaling.attn_factor`: like llama.cpp, the long factors are used when the context (n_ctx) is larger than
`rope.scaling.original_context_length`, the short ones otherwise. Like llama.cpp, the sliding window some Phi-3
files record is not applied (llama.cpp disabled it: the converters do not record the layer pattern)."""
from __future__ import annotations

import numpy as np

from llamba.config import ModelConfig, base_config
from llamba.models.base import RopeTable, Transformer


def config_from_gguf(gf) -> ModelConfig:
    return ModelConfig(**base_config(gf, "phi3", rope_neox=True))


class Phi3(Transformer):
    activation = "silu"
    post_norms = False

    def __init__(self, gf, cfg, n_ctx: int):
        super().__init__(gf, cfg, n_ctx)
        name = "rope_factors_long.weight" if n_ctx > cfg.n_ctx_orig else "rope_factors_short.weight"
        if gf.has(name):
            ff = np.ascontiguousarray(gf.tensor(name), dtype=np.float32).reshape(-1)
            if ff.shape[0] != cfg.n_rot // 2:
                from llamba.errors import GGUFError
                raise GGUFError(f"{gf.path}: tensor '{name}' has {ff.shape[0]} factors, expected {cfg.n_rot // 2}")
            self.rope = RopeTable(cfg, cfg.n_rot, ff)


def build(gf, n_ctx: int, **opts):
    return Phi3(gf, config_from_gguf(gf), n_ctx)
