"""Plain numpy twins of ``llamba.kernels.quants_k`` (slow, written for clarity; docs/numerics.md).

* ``dequant_<t>(raw)``: ``raw`` uint8 (rows, row_bytes) -> float32 (rows, ncols), with the float
  operation order of gguf-py (``(d*scale)*q`` and, for types with mins, ``- dmin*min``).
* ``act_q8_K(x)`` -> (qs int8, d float32, bsums int32): llama.cpp ``quantize_row_q8_K``.
* ``matmul_<t>(w, qs, d, bsums)`` -> float32 (T, rows): per super-block the exact integer sums
  ``isum = sum_g scale_g * sum_{l in g} q_w*q_a`` and ``msum = sum_g min_g * bsums_g``, then in float32,
  super-blocks in order, ``acc = acc + d_a*(d_w*isum - dmin_w*msum)`` (Q2_K, Q4_K, Q5_K) or
  ``acc = acc + (d_a*d_w)*isum`` (Q3_K, Q6_K, IQ4_XS) -- the same operations as the Numba kernels.

Every super-block is first unpacked into a common integer form: ``q`` (rows, nb, 256) the signed
weight values, ``sc`` (rows, nb, 16) the scale of each group of 16 values, ``mn`` (rows, nb, 16) the
min of each group (None without mins), ``d`` and ``dmin`` (rows, nb) float32.
"""
from __future__ import annotations

import numpy as np

from llamba.kernels.traits import KVALUES_IQ4NL as _KV

QK_K = 256
KVALUES_IQ4NL = _KV.astype(np.int64)  # the registry's table (llamba.kernels.traits), widened


def _blocks(raw, block_bytes):
    raw = np.asarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    return raw.reshape(rows, -1, block_bytes)


def _f16(b2):
    """(..., 2) little-endian bytes -> float32 (exact)."""
    return np.ascontiguousarray(b2).view(np.float16)[..., 0].astype(np.float32)


def _k4_scale_min(s):
    """Q4_K/Q5_K: the 12 packed bytes (..., 12) -> six-bit scales and mins (..., 8)."""
    s = s.astype(np.int64)
    sc = np.empty(s.shape[:-1] + (8,), np.int64)
    mn = np.empty_like(sc)
    for k in range(8):
        if k < 4:
            sc[..., k] = s[..., k] & 63
            mn[..., k] = s[..., k + 4] & 63
        else:
            sc[..., k] = (s[..., k + 4] & 0xF) | ((s[..., k - 4] >> 6) << 4)
            mn[..., k] = (s[..., k + 4] >> 4) | ((s[..., k] >> 6) << 4)
    return sc, mn


def _unpack_q2_k(raw):
    blk = _blocks(raw, 84)
    scales, qs = blk[..., :16].astype(np.int64), blk[..., 16:80].astype(np.int64)
    q = np.empty(blk.shape[:2] + (QK_K,), np.int64)
    for e in range(QK_K):
        n, r = divmod(e, 128)
        j, l = divmod(r, 32)
        q[..., e] = (qs[..., 32 * n + l] >> (2 * j)) & 3
    return dict(q=q, sc=scales & 0xF, mn=scales >> 4, d=_f16(blk[..., 80:82]), dmin=_f16(blk[..., 82:84]))


def _unpack_q3_k(raw):
    blk = _blocks(raw, 110)
    hmask, qs, s = (blk[..., :32].astype(np.int64), blk[..., 32:96].astype(np.int64),
                    blk[..., 96:108].astype(np.int64))
    q = np.empty(blk.shape[:2] + (QK_K,), np.int64)
    for e in range(QK_K):
        n, r = divmod(e, 128)
        j, l = divmod(r, 32)
        low = (qs[..., 32 * n + l] >> (2 * j)) & 3
        high = (hmask[..., l] >> (4 * n + j)) & 1
        q[..., e] = low - np.where(high == 1, 0, 4)
    sc = np.empty(blk.shape[:2] + (16,), np.int64)
    for k in range(16):
        low4 = s[..., k] & 0xF if k < 8 else s[..., k - 8] >> 4
        high2 = (s[..., 8 + k % 4] >> (2 * (k // 4))) & 3
        sc[..., k] = (low4 | (high2 << 4)) - 32
    return dict(q=q, sc=sc, mn=None, d=_f16(blk[..., 108:110]), dmin=None)


def _unpack_q4_k(raw):
    blk = _blocks(raw, 144)
    sc8, mn8 = _k4_scale_min(blk[..., 4:16])
    qs = blk[..., 16:144].astype(np.int64)
    q = np.empty(blk.shape[:2] + (QK_K,), np.int64)
    for e in range(QK_K):
        c, r = divmod(e, 64)
        q[..., e] = qs[..., 32 * c + r] & 0xF if r < 32 else qs[..., 32 * c + r - 32] >> 4
    return dict(q=q, sc=np.repeat(sc8, 2, axis=-1), mn=np.repeat(mn8, 2, axis=-1),
                d=_f16(blk[..., 0:2]), dmin=_f16(blk[..., 2:4]))


def _unpack_q5_k(raw):
    blk = _blocks(raw, 176)
    sc8, mn8 = _k4_scale_min(blk[..., 4:16])
    qh, qs = blk[..., 16:48].astype(np.int64), blk[..., 48:176].astype(np.int64)
    q = np.empty(blk.shape[:2] + (QK_K,), np.int64)
    for e in range(QK_K):
        c, r = divmod(e, 64)
        k = e // 32
        low = qs[..., 32 * c + r] & 0xF if r < 32 else qs[..., 32 * c + r - 32] >> 4
        q[..., e] = low + 16 * ((qh[..., r % 32] >> k) & 1)
    return dict(q=q, sc=np.repeat(sc8, 2, axis=-1), mn=np.repeat(mn8, 2, axis=-1),
                d=_f16(blk[..., 0:2]), dmin=_f16(blk[..., 2:4]))


def _unpack_q6_k(raw):
    blk = _blocks(raw, 210)
    ql, qh = blk[..., :128].astype(np.int64), blk[..., 128:192].astype(np.int64)
    q = np.empty(blk.shape[:2] + (QK_K,), np.int64)
    for e in range(QK_K):
        h, r = divmod(e, 128)
        g, l = divmod(r, 32)
        low = ql[..., 64 * h + 32 * (g % 2) + l]
        low = low & 0xF if g < 2 else low >> 4
        high = (qh[..., 32 * h + l] >> (2 * g)) & 3
        q[..., e] = (low | (high << 4)) - 32
    sc = blk[..., 192:208].view(np.int8).astype(np.int64)
    return dict(q=q, sc=sc, mn=None, d=_f16(blk[..., 208:210]), dmin=None)


def _unpack_iq4_xs(raw):
    blk = _blocks(raw, 136)
    scales_h = blk[..., 2].astype(np.int64) | (blk[..., 3].astype(np.int64) << 8)
    scales_l, qs = blk[..., 4:8].astype(np.int64), blk[..., 8:136].astype(np.int64)
    q = np.empty(blk.shape[:2] + (QK_K,), np.int64)
    sc = np.empty(blk.shape[:2] + (16,), np.int64)
    for ib in range(8):
        ls = ((scales_l[..., ib // 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
        sc[..., 2 * ib] = sc[..., 2 * ib + 1] = ls - 32
        for j in range(16):
            q[..., 32 * ib + j] = KVALUES_IQ4NL[qs[..., 16 * ib + j] & 0xF]
            q[..., 32 * ib + 16 + j] = KVALUES_IQ4NL[qs[..., 16 * ib + j] >> 4]
    return dict(q=q, sc=sc, mn=None, d=_f16(blk[..., 0:2]), dmin=None)


def _dequant(u):
    rows, nb, _ = u["q"].shape
    dl = u["d"][..., None] * u["sc"].astype(np.float32)  # (rows, nb, 16): d * scale
    y = dl[..., None] * u["q"].reshape(rows, nb, 16, 16).astype(np.float32)
    if u["mn"] is not None:
        y = y - (u["dmin"][..., None] * u["mn"].astype(np.float32))[..., None]
    return y.reshape(rows, nb * QK_K).astype(np.float32)


def act_q8_K(x):
    """x float32 (T, n) -> (qs int8 (T, n), d float32 (T, n//256), bsums int32 (T, n//16))."""
    x = np.asarray(x, dtype=np.float32)
    T, n = x.shape
    xb = x.reshape(T, n // QK_K, QK_K)
    qs = np.zeros(xb.shape, np.int8)
    d = np.zeros((T, n // QK_K), np.float32)
    for t in range(T):
        for b in range(n // QK_K):
            v = xb[t, b]
            i = int(np.argmax(np.abs(v)))  # first index of the largest |x|
            if np.abs(v[i]) == 0:
                continue
            iscale = np.float32(-127.0) / v[i]
            q = np.minimum(np.float32(127.0), np.rint(iscale * v))  # round half to even
            qs[t, b] = q.astype(np.int8)
            d[t, b] = np.float32(1.0) / iscale
    bsums = qs.reshape(T, n // 16, 16).astype(np.int32).sum(axis=-1, dtype=np.int32)
    return qs.reshape(T, n), d, bsums


def _matmul(u, qs, d, bsums):
    rows, nb, _ = u["q"].shape
    T = qs.shape[0]
    qa = qs.reshape(T, nb, 16, 16).astype(np.int64)
    qw = u["q"].reshape(rows, nb, 16, 16)
    gsum = np.einsum("rbgl,tbgl->rtbg", qw, qa)  # exact int64 sums per group of 16
    isum = np.einsum("rtbg,rbg->rtb", gsum, u["sc"])
    msum = None
    if u["mn"] is not None:
        msum = np.einsum("rbg,tbg->rtb", u["mn"], bsums.reshape(T, nb, 16).astype(np.int64))
    acc = np.zeros((rows, T), np.float32)
    for b in range(nb):
        da = d[:, b].astype(np.float32)[None, :]  # (1, T)
        dw = u["d"][:, b][:, None]  # (rows, 1)
        fi = isum[:, :, b].astype(np.float32)
        if msum is None:
            term = (da * dw) * fi
        else:
            term = da * (dw * fi - u["dmin"][:, b][:, None] * msum[:, :, b].astype(np.float32))
        acc = acc + term
    return np.ascontiguousarray(acc.T)


def _make(unpack, name):
    def dequant(raw):
        return _dequant(unpack(raw))

    def matmul(w, qs, d, bsums):
        return _matmul(unpack(w), np.asarray(qs), np.asarray(d, np.float32), np.asarray(bsums))
    dequant.__name__ = f"dequant_{name}"
    matmul.__name__ = f"matmul_{name}"
    return dequant, matmul


dequant_q2_k, matmul_q2_k = _make(_unpack_q2_k, "q2_k")
dequant_q3_k, matmul_q3_k = _make(_unpack_q3_k, "q3_k")
dequant_q4_k, matmul_q4_k = _make(_unpack_q4_k, "q4_k")
dequant_q5_k, matmul_q5_k = _make(_unpack_q5_k, "q5_k")
dequant_q6_k, matmul_q6_k = _make(_unpack_q6_k, "q6_k")
dequant_iq4_xs, matmul_iq4_xs = _make(_unpack_iq4_xs, "iq4_xs")
