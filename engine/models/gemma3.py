"""`gemma3` (docs/architectures.md): NEOX RoPE with a separate base for sliding-window layers, QK-norm,
embedding scale sqrt(n_embd), GeGLU(tanh), post-attention and post-FFN norms, Q pre-scaled.
Norm weights already carry Gemma's +1 (baked in by the converter): used as stored."""
from __future__ import annotations

import math

import numpy as np

from llamba.config import ModelConfig, base_config
from llamba.models.base import Transformer


def config_from_gguf(gf) -> ModelConfig:
    p = "gemma3."
    d = base_config(gf, "gemma3", rope_neox=True)
    n = d["n_layer_all"]
    n_swa = int(gf.get(p + "attention.sliding_window", 0) or 0)
    pattern = gf.get(p + "attention.sliding_window_pattern", 6)
    if isinstance(pattern, (np.ndarray, list)):
        swa = tuple(bool(b) for b in pattern)
    else:
        P = int(pattern) if pattern else 6
        swa = tuple((il % P < P - 1) for il in range(n)) if n_swa > 0 else (False,) * n
    d.update(
        n_swa=n_swa, swa_layers=swa,
        rope_base_swa=float(gf.get(p + "rope.freq_base_swa", 10000.0)),
        embd_scale=math.sqrt(d["n_embd"]),
        # 27B (62 layers) scales by n_embd/n_head; the others by the head size (llama.cpp gemma3.cpp)
        attn_scale=(1.0 / math.sqrt(d["n_embd"] / d["n_head"][0]) if n == 62 else 1.0 / math.sqrt(d["head_dim"])),
    )
    return ModelConfig(**d)


class Gemma3(Transformer):
    activation = "gelu"
    post_norms = True


def build(gf, n_ctx: int, **opts):
    return Gemma3(gf, config_from_gguf(gf), n_ctx)
