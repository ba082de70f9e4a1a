"""Numpy twins of llamba.kernels.deltanet: literal per-token loops in float64, same signatures, layouts
(state[h, value, key]) and in-place outputs as the Numba kernels."""
from __future__ import annotations

import numpy as np


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
