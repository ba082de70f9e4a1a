"""`qwen3` (dense Qwen3, docs/architectures.md): llama plus per-head Q/K RMSNorm before NEOX RoPE."""
from __future__ import annotations

from llamba.config import ModelConfig, base_config
from llamba.models.base import Transformer


def config_from_gguf(gf) -> ModelConfig:
    return ModelConfig(**base_config(gf, "qwen3", rope_neox=True))


class Qwen3(Transformer):
    activation = "silu"
    post_norms = False


def build(gf, n_ctx: int, **opts):
    return Qwen3(gf, config_from_gguf(gf), n_ctx)
