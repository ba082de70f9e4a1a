"""Gated DeltaNet kernels for qwen35 linear-attention layers (docs/architectures.md: "Gated DeltaNet",
"Rolling back recurrent (DeltaNet) state").

All arrays are float32; outputs, state and snapshot buffers are passed in and written in place.
Numerics follow llama.cpp's CPU ops (checked against libggml from llama-cpp-python 0.3.36):

* `l2_norm_heads` is ggml_l2_norm: `x * 1/max(sqrt(sum x^2), eps)`. That is an eps *floor* on the norm,
  not `1/sqrt(sum + eps)`.
* `gated_delta_rule` is GGML_OP_GATED_DELTA_NET. The state is stored the way llama.cpp stores it,
  transposed: `state[h, b, a] = M_h[a][b]` (b = value index outer, a = key index inner, contiguous). Each
  value row b then decays, updates and reads out on its own, in one pass over S contiguous floats.
  The 1/sqrt(S) query scale is applied to the output (`o = scale * sum_a M[a][b] q[a]`), as llama.cpp does.
* Value head h uses key head `h % Hk` (the GGUF's tiled order, not HF's `h // (Hv/Hk)`).

Snapshot order: `snapshots[t]` is the state after token t, oldest first. llama.cpp's own slots run the other
way (slot s = s tokens before the end).
"""
from __future__ import annotations

import numpy as np
from llamba.kernels import _jit  # noqa: F401  (Numba set-up: before the first kernel)
from numba import njit, prange

# Reassociation lets LLVM vectorize the dot products. Each value depends only on the compiled code,
# never on T, so splitting a batch into T=1 calls gives bit-identical results.
_FM = {"reassoc", "contract"}


@njit(cache=True, nogil=True)
def _silu(x):
    return x / (np.float32(1.0) + np.exp(-x))


@njit(cache=True, nogil=True, parallel=True, fastmath={"contract"})  # FMA, fixed order: as ggml_ssm_conv
def conv1d_silu(m, conv_state, w, out, snapshots):
    """Causal depthwise conv over [conv_state | m] per channel, then SiLU; conv_state advances in place.

    m (T, C), conv_state (C, D-1) oldest column first, w (C, D), out (T, C).
    snapshots (S, C, D-1): snapshots[t] = conv state after token t for t < min(T, S); pass a
    (0, C, D-1) array when none are wanted. Sums run i = 0..D-1 (oldest first) with float32 FMAs, as ggml_ssm_conv.
    """
    T, C = m.shape
    D = w.shape[1]
    dm1 = D - 1
    wt = np.empty((D, C), np.float32)  # w.T, so every inner loop below runs over contiguous channels
    for i in range(D):
        for c in range(C):
            wt[i, c] = w[c, i]
    nblk = (T + 15) // 16
    for blk in prange(nblk):  # blocks of 16 tokens
        acc = np.empty(C, np.float32)
        for t in range(blk * 16, min(T, blk * 16 + 16)):
            acc[:] = 0.0
            for i in range(D):
                j = t + i - dm1  # column t + i of X; j < 0 lies in conv_state
                wi = wt[i]
                if j >= 0:
                    src = m[j]
                    for c in range(C):
                        acc[c] += src[c] * wi[c]
                else:
                    for c in range(C):
                        acc[c] += conv_state[c, j + dm1] * wi[c]
            dst = out[t]
            for c in range(C):
                dst[c] = _silu(acc[c])
    for t in range(min(T, snapshots.shape[0])):
        for i in range(dm1):
            j = t + 1 + i - dm1
            for c in range(C):
                snapshots[t, c, i] = m[j, c] if j >= 0 else conv_state[c, j + dm1]
    for i in range(dm1):  # reads column T + i >= i of X, so updating in place is safe
        j = T + i - dm1
        for c in range(C):
            conv_state[c, i] = m[j, c] if j >= 0 else conv_state[c, j + dm1]


@njit(cache=True, nogil=True, parallel=True)
def l2_norm_heads(x, eps, out):
    """ggml_l2_norm per head: out = x * (1 / max(sqrt(sum x^2), eps)), with the sum in float64.

    x (T, H, S), out (T, H, S); out may be x.
    """
    T, H, S = x.shape
    epsf = np.float32(eps)
    for t in prange(T):
        for h in range(H):
            s = 0.0
            for i in range(S):
                s += np.float64(x[t, h, i] * x[t, h, i])
            scale = np.float32(1.0) / max(np.sqrt(np.float32(s)), epsf)
            for i in range(S):
                out[t, h, i] = x[t, h, i] * scale


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM)
def gated_delta_rule(q, k, v, g, beta, state, out, snapshots):
    """Gated delta rule, one token at a time (llama.cpp's GATED_DELTA_NET op, decode and prefill alike).

    q, k (T, Hk, S) L2-normalized; v (T, Hv, S); g, beta (T, Hv); state (Hv, S, S) as [h, value, key];
    out (T, Hv, S). snapshots (N, Hv, S, S): snapshots[t] = state after token t for t < min(T, N);
    pass a (0, Hv, S, S) array when none are wanted. Per value row b of head h, key head kh = h % Hk:
    row *= exp(g); d = (v[b] - row.k) * beta; row += d * k; out[b] = (row.q) / sqrt(S).
    """
    T, Hk, S = q.shape
    Hv = v.shape[1]
    scale = np.float32(1.0 / np.sqrt(S))
    n_snap = min(T, snapshots.shape[0])
    for h in prange(Hv):
        kh = h % Hk
        st = state[h]
        kt = np.empty(S, np.float32)  # contiguous copies: q/k may be strided views of the conv output
        qt = np.empty(S, np.float32)
        for t in range(T):
            for a in range(S):
                kt[a] = k[t, kh, a]
                qt[a] = q[t, kh, a]
            decay = np.float32(np.exp(g[t, h]))
            bt = beta[t, h]
            for b in range(S):
                sk = np.float32(0.0)
                for a in range(S):
                    x = st[b, a] * decay
                    st[b, a] = x
                    sk += x * kt[a]
                d = (v[t, h, b] - sk) * bt
                sq = np.float32(0.0)
                for a in range(S):
                    x = st[b, a] + kt[a] * d
                    st[b, a] = x
                    sq += x * qt[a]
                out[t, h, b] = sq * scale
            if t < n_snap:
                snapshots[t, h] = st


@njit(cache=True, nogil=True, parallel=True)
def gated_rms_norm(o, z, w, eps, out):
    """out = RMSNorm(o_head) * w * silu(z_head), per (token, head) over S; llama.cpp's rms_norm, mul, mul.

    o, z, out (T, Hv, S); w (S,). Sum of squares in float64, mean + eps in float32; out may be o.
    """
    T, H, S = o.shape
    epsf = np.float32(eps)
    for t in prange(T):
        for h in range(H):
            s = 0.0
            for i in range(S):
                s += np.float64(o[t, h, i] * o[t, h, i])
            mean = np.float32(s / S)
            scale = np.float32(1.0) / np.sqrt(mean + epsf)
            for i in range(S):
                out[t, h, i] = ((o[t, h, i] * scale) * w[i]) * _silu(z[t, h, i])


@njit(cache=True, nogil=True)
def gdn_gates(alpha, beta_raw, dt_bias, ssm_a, g_out, beta_out):
    """beta = sigmoid(beta_raw); g = softplus(alpha + dt_bias) * ssm_a (ssm_a already holds -exp(A_log)).

    alpha, beta_raw, g_out, beta_out (T, Hv); dt_bias, ssm_a (Hv,). softplus(x) = x if x > 20 else log(1 + e^x),
    in float32 as ggml's softplus op.
    """
    T, H = alpha.shape
    one = np.float32(1.0)
    for t in range(T):
        for h in range(H):
            x = alpha[t, h] + dt_bias[h]
            sp = x if x > np.float32(20.0) else np.log(one + np.exp(x))
            g_out[t, h] = sp * ssm_a[h]
            beta_out[t, h] = one / (one + np.exp(-beta_raw[t, h]))
