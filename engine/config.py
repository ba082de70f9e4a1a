"""A frozen model config built from GGUF metadata (`{arch}.*` keys); derived fields computed once."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llamba.errors import GGUFError


def _per_layer(value, n: int, key: str, path: str) -> tuple:
    """llama.cpp's get_key_or_arr: a scalar broadcasts to every layer, an array must have n entries."""
    if isinstance(value, (np.ndarray, list)):
        vals = [int(v) if not isinstance(v, (bool, np.bool_)) else bool(v) for v in value]
        if len(vals) != n:
            raise GGUFError(f"{path}: key '{key}' has {len(vals)} entries, expected {n} (one per layer)")
        return tuple(vals)
    return (value,) * n


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer_all: int  # includes MTP (nextn) layers
    n_nextn: int
    n_ctx_train: int
    n_head: tuple[int, ...]  # per layer (n_layer_all)
    n_head_kv: tuple[int, ...]
    n_ff: tuple[int, ...]
    head_dim: int  # key_length
    head_dim_v: int
    n_rot: int
    eps: float
    rope_neox: bool
    rope_base: float
    rope_base_swa: float
    freq_scale: float
    rope_ext_factor: float = 0.0
    rope_attn_factor: float = 1.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    n_ctx_orig: int = 0
    n_swa: int = 0
    swa_layers: tuple[bool, ...] = ()
    embd_scale: float = 0.0  # 0 = none
    attn_scale: float = 0.0  # applied to Q before attention when > 0 (gemma3); else 1/sqrt(hd) in attention
    final_logit_softcap: float = 0.0
    attn_softcap: float = 0.0  # gemma2: attention scores cap * tanh(s / cap)
    # qwen35 (Gated DeltaNet) fields
    recurrent: tuple[bool, ...] = ()
    ssm_d_conv: int = 0
    ssm_d_state: int = 0
    ssm_n_k: int = 0
    ssm_n_v: int = 0
    ssm_d_inner: int = 0
    # MoE fields (qwen35moe): experts per MoE FFN, experts used per token, expert / shared-expert FFN widths
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def n_layer(self) -> int:
        """trunk layers (MTP layers excluded)."""
        return self.n_layer_all - self.n_nextn


def base_config(gf, arch: str, **overrides) -> dict:
    """Keys shared by every architecture, as a dict for the arch file to adjust and freeze."""
    p = f"{arch}."
    path = gf.path

    def req(key):
        return gf.require(p + key)

    n_embd = int(req("embedding_length"))
    n_layer_all = int(req("block_count"))
    n_head = _per_layer(req("attention.head_count"), n_layer_all, p + "attention.head_count", path)
    n_head_kv = _per_layer(gf.get(p + "attention.head_count_kv", n_head[0]), n_layer_all,
                           p + "attention.head_count_kv", path)
    n_ff = _per_layer(gf.get(p + "feed_forward_length", 0), n_layer_all, p + "feed_forward_length", path)
    h0 = max(n_head) if max(n_head) > 0 else 1
    head_dim = int(gf.get(p + "attention.key_length", n_embd // h0))
    head_dim_v = int(gf.get(p + "attention.value_length", head_dim))
    n_rot = int(gf.get(p + "rope.dimension_count", head_dim))
    vocab = gf.get(p + "vocab_size")
    if vocab is None:
        toks = gf.get("tokenizer.ggml.tokens")
        if toks is not None:
            vocab = len(toks)
        elif gf.has("token_embd.weight"):
            vocab = gf.info("token_embd.weight").ne[1]
        else:
            raise GGUFError(f"{path}: cannot tell the vocabulary size (no {p}vocab_size, tokens or token_embd)")
    eps = float(gf.get(p + "attention.layer_norm_rms_epsilon", 1e-5))
    base = float(gf.get(p + "rope.freq_base", 10000.0))
    scaling_type = gf.get(p + "rope.scaling.type", "linear")
    factor = float(gf.get(p + "rope.scaling.factor", gf.get(p + "rope.scale_linear", 0.0)) or 0.0)
    freq_scale = 1.0 / factor if factor > 0 else 1.0
    if scaling_type == "none":
        freq_scale = 1.0
    ext_factor = 0.0
    attn_factor = float(gf.get(p + "rope.scaling.attn_factor", 1.0))
    n_ctx_train = int(gf.get(p + "context_length", 2048))
    n_ctx_orig = int(gf.get(p + "rope.scaling.original_context_length", n_ctx_train))
    if scaling_type == "yarn":
        ext_factor = float(gf.get(p + "rope.scaling.yarn_ext_factor", -1.0))
        if ext_factor < 0:
            ext_factor = 1.0  # llama.cpp: negative means "auto" = 1.0 for yarn
    elif scaling_type not in ("none", "linear", None):
        from llamba.errors import UnsupportedError
        raise UnsupportedError(f"{path}: rope scaling type '{scaling_type}' is not supported (none, linear, yarn)")
    cfg = dict(
        arch=arch, n_vocab=int(vocab), n_embd=n_embd, n_layer_all=n_layer_all,
        n_nextn=int(gf.get(p + "nextn_predict_layers", 0)), n_ctx_train=n_ctx_train,
        n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff, head_dim=head_dim, head_dim_v=head_dim_v,
        n_rot=n_rot, eps=eps, rope_neox=False, rope_base=base, rope_base_swa=base, freq_scale=freq_scale,
        rope_ext_factor=ext_factor, rope_attn_factor=attn_factor,
        rope_beta_fast=float(gf.get(p + "rope.scaling.yarn_beta_fast", 32.0)),
        rope_beta_slow=float(gf.get(p + "rope.scaling.yarn_beta_slow", 1.0)),
        n_ctx_orig=n_ctx_orig, swa_layers=(False,) * n_layer_all,
        final_logit_softcap=float(gf.get(p + "final_logit_softcapping", 0.0) or 0.0),
    )
    cfg.update(overrides)
    return cfg


