"""`qwen2` (Qwen2 / Qwen2.5 dense): llama's block with biases on Q, K and V, NEOX RoPE (the converter does not
permute Q/K for Qwen2), no QK-norm, SwiGLU FFN, tied or separate output. As llama.cpp's LLM_ARCH_QWEN2."""
from __future__ import annotations

from llamba.config import ModelConfig, base_config
from llamba.models.base import Transformer


def config_from_gguf(gf) -> ModelConfig:
    return ModelConfig(**base_config(gf, "qwen2", rope_neox=True))


class Qwen2(Transformer):
    activation = "silu"
    post_norms = False


def build(gf, n_ctx: int, **opts):
    return Qwen2(gf, config_from_gguf(gf), n_ctx)
