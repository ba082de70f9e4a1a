"""Numpy twins of llamba.kernels.deltanet: literal per-token loops in float64, same signatures, layouts
(state[h, value, key]) and in-place outputs as the Numba kernels."""
from __future__ import annotations

import numpy as np

CHUNK = 64


def _silu(x):
    return x / (1.0 + np.exp(-x))


def conv1d_silu(m, conv_state, w, out, snapshots):
    """m (T, C), conv_state (C, D-1), w (C, D), out (T, C); snapshots[t] = conv state after token t."""
    T = m.shape[0]
    D = w.shape[1]
    X = np.concatenate([conv_state.astype(np.float64), m.T.astype(np.float64)], axis=1)  # (C, D-1+T)
    w64 = w.astype(np.float64)
    for t in range(T):
        out[t] = _silu((X[:, t:t + D] * w64).sum(axis=1))
    for t in range(min(T, snapshots.shape[0])):
        snapshots[t] = X[:, t + 1:t + D]
    conv_state[:] = X[:, T:]


def l2_norm_heads(x, eps, out):
    """x (T, H, S) -> out = x / max(||x||, eps) per head (ggml_l2_norm)."""
    x64 = x.astype(np.float64)
    out[:] = x64 / np.maximum(np.sqrt((x64 * x64).sum(axis=-1, keepdims=True)), eps)


def gated_delta_rule(q, k, v, g, beta, state, out, snapshots):
    """Token loop; state (Hv, S, S) holds M[a][b] at [h, b, a]; value head h uses key head h % Hk."""
    T, Hk, S = q.shape
    Hv = v.shape[1]
    Mt = state.astype(np.float64)  # Mt[h] = M_h^T
    for t in range(T):
        for h in range(Hv):
            kh = h % Hk
            kk = k[t, kh].astype(np.float64)
            qq = q[t, kh].astype(np.float64) / np.sqrt(S)
            Mt[h] *= np.exp(np.float64(g[t, h]))
            delta = beta[t, h] * (v[t, h].astype(np.float64) - Mt[h] @ kk)
            Mt[h] += np.outer(delta, kk)
            out[t, h] = Mt[h] @ qq
        if t < snapshots.shape[0]:
            snapshots[t] = Mt
    state[:] = Mt


def gated_delta_rule_chunked(q, k, v, g, beta, state, out):
    """Chunked (WY) form as llama.cpp's graph fallback computes it (docs/architectures.md): zero-pad to a
    multiple of 64, then per chunk T = (I + L)^-1, U = T(beta V) - T(beta e^G K) M, O = (e^G Q^) M + A U,
    M <- e^G_last M + sum_j ..."""
    T, Hk, S = q.shape
    Hv = v.shape[1]
    Tp = -(-T // CHUNK) * CHUNK
    for h in range(Hv):
        kh = h % Hk
        Kp, Qp, Vp = np.zeros((Tp, S)), np.zeros((Tp, S)), np.zeros((Tp, S))
        gp, bp = np.zeros(Tp), np.zeros(Tp)
        Kp[:T], Qp[:T], Vp[:T] = k[:, kh], q[:, kh] / np.sqrt(S), v[:, h]
        gp[:T], bp[:T] = g[:, h], beta[:, h]
        M = state[h].astype(np.float64).T  # (key, value)
        for c0 in range(0, Tp, CHUNK):
            K, Q, V = Kp[c0:c0 + CHUNK], Qp[c0:c0 + CHUNK], Vp[c0:c0 + CHUNK]
            G = np.cumsum(gp[c0:c0 + CHUNK])
            b = bp[c0:c0 + CHUNK, None]
            decay = np.exp(np.minimum(G[:, None] - G[None, :], 0.0))  # only j <= i is used
            L = np.tril(b * decay * (K @ K.T), -1)
            Tinv = np.eye(CHUNK)
            for i in range(1, CHUNK):  # forward substitution for (I + L)^-1
                Tinv[i] -= L[i, :i] @ Tinv[:i]
            U = Tinv @ (b * V) - Tinv @ (b * np.exp(G)[:, None] * K) @ M
            A = np.tril(decay * (Q @ K.T))
            O = (np.exp(G)[:, None] * Q) @ M + A @ U
            M = np.exp(G[-1]) * M + (np.exp(G[-1] - G)[:, None] * K).T @ U
            n = min(CHUNK, T - c0)
            out[c0:c0 + n, h] = O[:n]
        state[h] = M.T


def gated_rms_norm(o, z, w, eps, out):
    """out = o / sqrt(mean(o^2) + eps) * w * silu(z), per (token, head) over S."""
    o64 = o.astype(np.float64)
    r = 1.0 / np.sqrt((o64 * o64).mean(axis=-1, keepdims=True) + eps)
    out[:] = o64 * r * w.astype(np.float64) * _silu(z.astype(np.float64))


def gdn_gates(alpha, beta_raw, dt_bias, ssm_a, g_out, beta_out):
    """beta = sigmoid(beta_raw); g = softplus(alpha + dt_bias) * ssm_a, softplus(x) = x if x > 20."""
    x = alpha.astype(np.float64) + dt_bias.astype(np.float64)
    sp = np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))
    g_out[:] = sp * ssm_a.astype(np.float64)
    beta_out[:] = 1.0 / (1.0 + np.exp(-beta_raw.astype(np.float64)))
