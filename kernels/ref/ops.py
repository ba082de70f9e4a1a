"""Numpy twins of llamba.kernels.ops: straightforward float64 formulas, no attempt at llama.cpp's rounding
order. They return new arrays (float32) instead of writing into outputs."""
from __future__ import annotations

import numpy as np


def round_f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def rms_norm(x, w=None, eps=1e-6):  # x (R, n), w (n,) -> (R, n)
    x = np.asarray(x, np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    if w is not None:
        y = y * np.asarray(w, np.float64)
    return y.astype(np.float32)


def rope_corr_dims(n_rot, n_ctx_orig, freq_base, beta_fast, beta_slow):
    def corr(beta):
        return n_rot * np.log(n_ctx_orig / (beta * 2 * np.pi)) / (2 * np.log(freq_base))
    return max(0.0, np.floor(corr(beta_fast))), min(n_rot - 1.0, np.ceil(corr(beta_slow)))


def rope_angles(pos, n_rot, freq_base, freq_scale=1.0, freq_factors=None, ext_factor=0.0, attn_factor=1.0,
                beta_fast=32.0, beta_slow=1.0, n_ctx_orig=0):
    """(cos, sin) (T, n_rot//2) in float64, theta = p * base^(-2i/n_rot) / ff_i with numpy pow."""
    half = n_rot // 2
    i = np.arange(half, dtype=np.float64)
    ff = np.ones(half) if freq_factors is None else np.asarray(freq_factors, np.float64)[:half]
    theta_extrap = np.asarray(pos, np.float64)[:, None] * np.power(float(freq_base), -2.0 * i / n_rot) / ff
    theta = freq_scale * theta_extrap
    mscale = attn_factor
    if ext_factor != 0.0:
        low, high = rope_corr_dims(n_rot, n_ctx_orig, freq_base, beta_fast, beta_slow)
        ramp = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)
        mix = ramp * ext_factor
        theta = theta * (1 - mix) + theta_extrap * mix
        mscale = attn_factor * (1.0 + 0.1 * np.log(1.0 / freq_scale))
    return np.cos(theta) * mscale, np.sin(theta) * mscale


def rope(x, pos, n_rot, freq_base, freq_scale=1.0, neox=False, freq_factors=None, ext_factor=0.0,
         attn_factor=1.0, beta_fast=32.0, beta_slow=1.0, n_ctx_orig=0):  # x (T, H, hd) -> (T, H, hd)
    x = np.asarray(x, np.float64)
    c, s = rope_angles(pos, n_rot, freq_base, freq_scale, freq_factors, ext_factor, attn_factor,
                       beta_fast, beta_slow, n_ctx_orig)
    c = c[:, None, :]
    s = s[:, None, :]
    y = x.copy()
    half = n_rot // 2
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]
        y[..., :half] = a * c - b * s
        y[..., half:n_rot] = a * s + b * c
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        y[..., 0:n_rot:2] = a * c - b * s
        y[..., 1:n_rot:2] = a * s + b * c
    return y.astype(np.float32)


def softmax_rows(x):  # x (R, n) -> (R, n)
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def silu(x):
    x = np.asarray(x, np.float64)
    return (x / (1.0 + np.exp(-x))).astype(np.float32)


def sigmoid(x):
    x = np.asarray(x, np.float64)
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def gelu_tanh(x):
    x = np.asarray(x, np.float64)
    return (0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))).astype(np.float32)


def swiglu(gate, up):
    return (np.asarray(silu(gate), np.float64) * np.asarray(up, np.float64)).astype(np.float32)


def geglu_tanh(gate, up):
    return (np.asarray(gelu_tanh(gate), np.float64) * np.asarray(up, np.float64)).astype(np.float32)


def attention_mask(q_pos, n_kv, n_swa=0):  # -> (T, n_kv) bool, True = visible
    p = np.asarray(q_pos, np.int64)[:, None]
    j = np.arange(n_kv)[None, :]
    m = j <= p
    if n_swa > 0:
        m &= (p - j) < n_swa
    return m


def attention(q, k_cache, v_cache, q_pos, n_kv, scale, n_swa=0, round_q=False, softcap=0.0):
    """q (T, Hq, dk), k_cache (Hkv, n_ctx, dk), v_cache (Hkv, n_ctx, dv) -> (T, Hq, dv), in float64 with
    an explicit mask. round_q=True rounds Q to fp16 first, as the kernel (and llama.cpp) does. softcap > 0:
    scores softcap * tanh(scores / softcap) (gemma2)."""
    q = round_f16(q) if round_q else np.asarray(q, np.float32)
    q = q.astype(np.float64)
    T, Hq, dk = q.shape
    Hkv = k_cache.shape[0]
    grp = Hq // Hkv
    mask = attention_mask(q_pos, n_kv, n_swa)
    out = np.zeros((T, Hq, v_cache.shape[2]))
    for h in range(Hq):
        K = np.asarray(k_cache[h // grp, :n_kv], np.float64)
        V = np.asarray(v_cache[h // grp, :n_kv], np.float64)
        s = scale * (q[:, h, :] @ K.T)
        if softcap > 0:
            s = softcap * np.tanh(s / softcap)
        s = np.where(mask, s, -np.inf)
        mx = s.max(axis=1, keepdims=True)
        mx = np.where(np.isfinite(mx), mx, 0.0)
        e = np.where(mask, np.exp(s - mx), 0.0)
        tot = e.sum(axis=1, keepdims=True)
        out[:, h, :] = np.where(tot > 0, (e @ V) / np.where(tot > 0, tot, 1.0), 0.0)
    return out.astype(np.float32)
