"""Plain numpy twins of ``llamba.kernels.quants_simple`` (slow, obviously correct).

They follow docs/numerics.md (dequantization, llama.cpp's activation quantization and block dot
products) literally, with the same float32 operation order as the Numba kernels, so the
kernels are expected to match them bit for bit:

* quantized matmul: per 32-block an exact integer dot, then ``acc += (d_w*d_a)*isum`` (Q4_1/Q5_1:
  ``acc += (d_w*d_a)*isum + m_w*s_a``) in float32, blocks in order;
* activations (llama.cpp's x86 quantize_row_q8_0/q8_1): per 32 values amax = max|x|, d = amax/127,
  q = round_half_even(x * (127/amax)) (0 if amax == 0), d stored fp16; Q8_1 also s = fp16(d * sum q)
  with the unrounded d.  F16/BF16 activations: x rounded to nearest even in that format;
* float matmul: lane partial sums ``acc[j] += w[32k+j]*x[32k+j]`` for k in order (the last, partial
  chunk only touches its first ``n % 32`` lanes), then the tree ``acc[:16] + acc[16:]``, ... to 1 lane.

Numpy float32 element-wise multiply/add are correctly rounded and never fused, hence bit-exact twins.
"""
from __future__ import annotations

import numpy as np

from llamba.kernels.traits import KVALUES_IQ4NL  # noqa: F401  (the registry's table: one copy)

QK = 32


# ------------------------------------------------------------------ helpers

def _blocks(raw, block_bytes):
    raw = np.asarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    assert raw.shape[1] % block_bytes == 0
    return raw.reshape(rows, raw.shape[1] // block_bytes, block_bytes)


def _f16(b, off):
    """fp16 field at byte ``off`` of every block -> float32 (rows, nb)."""
    return np.ascontiguousarray(b[:, :, off:off + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs):
    """(rows, nb, 16) bytes -> (rows, nb, 32): low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bit(qh_bytes):
    """(rows, nb, 4) qh bytes -> (rows, nb, 32) bit j of the little-endian u32, for element j."""
    qh = np.ascontiguousarray(qh_bytes).view("<u4")  # (rows, nb, 1)
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


# ------------------------------------------------------------------ integer block values + scales

def unpack_q4_0(raw):
    """-> (q int8 (rows, nb, 32), d f32 (rows, nb), m None)."""
    b = _blocks(raw, 18)
    return _nibbles(b[:, :, 2:18]).astype(np.int8) - 8, _f16(b, 0), None


def unpack_q4_1(raw):
    b = _blocks(raw, 20)
    return _nibbles(b[:, :, 4:20]).astype(np.int8), _f16(b, 0), _f16(b, 2)


def unpack_q5_0(raw):
    b = _blocks(raw, 22)
    q = _nibbles(b[:, :, 6:22]) | (_high_bit(b[:, :, 2:6]) << 4)
    return q.astype(np.int8) - 16, _f16(b, 0), None


def unpack_q5_1(raw):
    b = _blocks(raw, 24)
    q = _nibbles(b[:, :, 8:24]) | (_high_bit(b[:, :, 4:8]) << 4)
    return q.astype(np.int8), _f16(b, 0), _f16(b, 2)


def unpack_q8_0(raw):
    b = _blocks(raw, 34)
    return np.ascontiguousarray(b[:, :, 2:34]).view(np.int8), _f16(b, 0), None


def unpack_iq4_nl(raw):
    b = _blocks(raw, 18)
    return KVALUES_IQ4NL[_nibbles(b[:, :, 2:18])], _f16(b, 0), None


# ------------------------------------------------------------------ dequantization

def _dequant(unpack, raw):
    q, d, m = unpack(raw)
    y = d[:, :, None] * q.astype(np.float32)
    if m is not None:
        y = y + m[:, :, None]
    return y.reshape(q.shape[0], -1)


def dequant_q4_0(raw):
    return _dequant(unpack_q4_0, raw)


def dequant_q4_1(raw):
    return _dequant(unpack_q4_1, raw)


def dequant_q5_0(raw):
    return _dequant(unpack_q5_0, raw)


def dequant_q5_1(raw):
    return _dequant(unpack_q5_1, raw)


def dequant_q8_0(raw):
    return _dequant(unpack_q8_0, raw)


def dequant_iq4_nl(raw):
    return _dequant(unpack_iq4_nl, raw)


def dequant_f32(w):
    """float32 (rows, n), or its raw bytes uint8 (rows, 4n)."""
    w = np.asarray(w)
    return np.ascontiguousarray(w).view(np.float32).astype(np.float32) if w.dtype == np.uint8 else w.astype(np.float32)


def dequant_f16(w):
    """float16 (rows, n), or raw bytes uint8 (rows, 2n)."""
    return np.ascontiguousarray(w).view(np.float16).astype(np.float32)


def dequant_bf16(w):
    """bf16 bits as uint16 (rows, n), or raw bytes uint8 (rows, 2n)."""
    return (np.ascontiguousarray(w).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# ------------------------------------------------------------------ activations

def _fp16_round(v):
    with np.errstate(over="ignore"):  # values beyond fp16 range become inf, as in ggml
        return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)


def _q8(x):
    x = np.asarray(x, np.float32)
    T, n = x.shape
    xb = x.reshape(T, n // QK, QK)
    amax = np.abs(xb).max(axis=-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        idv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * idv[:, :, None]).astype(np.int8)  # rint: round half to even, like _mm256_round_ps
    return q, d


def act_q8_0(x):
    q, d = _q8(x)
    return q.reshape(q.shape[0], -1), _fp16_round(d)


def act_q8_1(x):
    q, d = _q8(x)
    s = d * q.astype(np.int32).sum(axis=-1).astype(np.float32)  # unrounded d, as llama.cpp
    return q.reshape(q.shape[0], -1), _fp16_round(d), _fp16_round(s)


def act_f32(x):
    return (np.asarray(x, np.float32),)


def act_f16(x):
    return (_fp16_round(x),)


def act_bf16(x):
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = np.where(nan, (u & 0xFFFF0000) | 0x00400000, (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000)
    return (r.astype(np.uint32).view(np.float32),)


# ------------------------------------------------------------------ matmul

def _mm_quant(unpack, w, qs, d, s=None):
    q, dw, mw = unpack(w)                                   # (R, nb, 32), (R, nb)
    T = qs.shape[0]
    R, nb, _ = q.shape
    a = np.asarray(qs).reshape(T, nb, QK).astype(np.int32)
    isum = np.einsum("rbj,tbj->trb", q.astype(np.int32), a)  # exact int products summed per block
    out = np.zeros((T, R), np.float32)
    for b in range(nb):                                      # blocks in order, float32
        term = (dw[None, :, b] * d[:, b, None]) * isum[:, :, b].astype(np.float32)
        if mw is not None:
            term = term + mw[None, :, b] * s[:, b, None]
        out = out + term
    return out


def matmul_q4_0(w, qs, d):
    return _mm_quant(unpack_q4_0, w, qs, d)


def matmul_q5_0(w, qs, d):
    return _mm_quant(unpack_q5_0, w, qs, d)


def matmul_q8_0(w, qs, d):
    return _mm_quant(unpack_q8_0, w, qs, d)


def matmul_iq4_nl(w, qs, d):
    return _mm_quant(unpack_iq4_nl, w, qs, d)


def matmul_q4_1(w, qs, d, s):
    return _mm_quant(unpack_q4_1, w, qs, d, s)


def matmul_q5_1(w, qs, d, s):
    return _mm_quant(unpack_q5_1, w, qs, d, s)


def _mm_float(wf, x):
    """wf float32 (R, n) (already converted weights), x float32 (T, n)."""
    R, n = wf.shape
    T = x.shape[0]
    acc = np.zeros((T, R, 32), np.float32)
    full = n // 32
    for k in range(full):
        acc = acc + x[:, None, 32 * k:32 * k + 32] * wf[None, :, 32 * k:32 * k + 32]
    rem = n - 32 * full
    if rem:
        acc[:, :, :rem] = acc[:, :, :rem] + x[:, None, 32 * full:] * wf[None, :, 32 * full:]
    h = 16
    while h >= 1:
        acc = acc[:, :, :h] + acc[:, :, h:2 * h]
        h //= 2
    return acc[:, :, 0]


def matmul_f32(w, x):
    return _mm_float(dequant_f32(w), np.asarray(x, np.float32))


def matmul_f16(w, x):
    return _mm_float(dequant_f16(w), np.asarray(x, np.float32))


def matmul_bf16(w, x):
    return _mm_float(dequant_bf16(w), np.asarray(x, np.float32))


def dequant_rows_q8_0p(wp, ids, cols):
    """Rows `ids` of the Q8_0 weight held in the repacked layout of ``quants_simple.repack_q8_0`` (per 8-row group g
    and block b: 256 bytes u = q + 128 with dword k of 32-byte vector s = dword s of row k's block, then after all
    blocks the 8 rows' fp16 scales per block), dequantized d * q -> float32 (len(ids), cols)."""
    ids = np.asarray(ids, dtype=np.int64)
    n, nb = len(ids), cols // 32
    rows = np.asarray(wp)[ids // 8]
    k = ids % 8
    sel = np.arange(n)
    u = rows[:, :256 * nb].reshape(n, nb, 8, 8, 4)[sel, :, :, k, :]  # (n, nb, s, byte)
    q = (u.astype(np.int32) - 128).reshape(n, nb, 32).astype(np.float32)
    d = np.ascontiguousarray(rows[:, 256 * nb:].reshape(n, nb, 8, 2)[sel, :, k, :]).view(np.float16)[..., 0]
    return (d.astype(np.float32)[:, :, None] * q).reshape(n, cols)
