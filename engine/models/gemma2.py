"""`gemma2` (Gemma 2): gemma3's block without QK-norm, with attention-logit soft-capping
(`gemma2.attn_logit_softcapping`, scores cap * tanh(s / cap)) and final-logit soft-capping
(`gemma2.final_logit_softcapping`); every other layer (0, 2, ...) uses the sliding window; one RoPE base.
Embedding scale sqrt(n_embd), GeGLU(tanh), post-attention and post-FFN norms, Q pre-scaled by 1/sqrt(head size)
(27B, 46 layers: 1/sqrt(n_embd / n_head)), as llama.cpp's LLM_ARCH_GEMMA2. Norm weights carry Gemma's +1 (baked
in by the converter): used as stored."""
from __future__ import annotations

import math

from llamba.config import ModelConfig, base_config
from llamba.models.base import Transformer


def config_from_gguf(gf) -> ModelConfig:
    p = "gemma2."
    d = base_config(gf, "gemma2", rope_neox=True)
    n = d["n_layer_all"]
    n_swa = int(gf.get(p + "attention.sliding_window", 0) or 0)
    d.update(
        n_swa=n_swa, swa_layers=tuple(il % 2 == 0 for il in range(n)) if n_swa > 0 else (False,) * n,
        embd_scale=math.sqrt(d["n_embd"]),
        attn_scale=(1.0 / math.sqrt(d["n_embd"] / d["n_head"][0]) if n == 46 else 1.0 / math.sqrt(d["head_dim"])),
        attn_softcap=float(gf.get(p + "attn_logit_softcapping", 0.0) or 0.0),
    )
    return ModelConfig(**d)


class Gemma2(Transformer):
    activation = "gelu"
    post_norms = True


def build(gf, n_ctx: int, **opts):
    return Gemma2(gf, config_from_gguf(gf), n_ctx)
