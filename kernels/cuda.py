"""Device kernels for GPU offload: one interface, two implementations.

* `XpKernels(xp)`: every op written with array-module calls only, so it runs with `xp = numpy` (the CPU
  stand-in the offload tests use) and with `xp = cupy` (a slow but complete GPU fallback). It is also the
  reference twin the CUDA kernels are tested against.
* `CudaKernels(xp, module)`: the same interface with the hot ops as CUDA C (`CUDA_SOURCE`, compiled by NVRTC
  through `cupy.RawModule`): quantized matvec with the weights kept in their GGUF block bytes (dequantized
  in-kernel, float activations), dequantize-to-tile + cuBLAS for prefill, RMSNorm, RoPE, attention over an
  fp16 KV cache, SwiGLU/GeGLU and the Gated DeltaNet recurrence. The light DeltaNet ops (gates, conv1d,
  L2 norm, gated norm) stay as xp (CuPy elementwise) code.

This module never imports CuPy itself: the caller passes the array module (and, for CUDA, a compiled
module), so the stand-in runs without CuPy and llamba imports CuPy only in `llamba.backend`.

The interface (all arrays float32 and C-contiguous unless noted; outputs are new arrays):
  kv_dtype                                  dtype of the KV cache arrays (fp16 values)
  upload(lin) -> QWeight                    raw block bytes (+ bias) of a `llamba.layers.Linear`
  matmul(W, x (T, in), gemm) -> (T, out)    gemm=False: row-exact (row t depends on x[t] only)
  rms_norm(x (R, n), w (n,), eps) -> (R, n)
  rope(x (T, H, hd), cos, sin (T, n_rot/2), n_rot, neox)            in place
  store_kv(k (T, Hkv, dk), v, kc (Hkv, n_ctx, dk), vc, pos0)        in place, rounded to fp16
  attention(q (T, H, dk), kc, vc, pos (T,) int64, n_kv, scale, n_swa) -> (T, H, dv)
  store_kv_slots(k, v, kc (Hkv, n_slots, dk), vc, slots (T,) int64)  paged cache (llamba.kv_cache), in place
  attention_paged(q, kc, vc, pos (T,) int64, row_seq (T,) int64, tables (n_seq, max_blocks) int32, bs,
                  n_kv (n_seq,) int64, scale, n_swa) -> (T, H, dv)   row t over sequence row_seq[t]'s blocks
  swiglu(g, u) / geglu(g, u) / sigmoid(x) -> same shape
  gdn_gates(alpha, beta_raw (T, Hv), dt_bias, ssm_a) -> (g, beta)
  conv1d_silu(m (T, C), conv_state (C, D-1), w (C, D), n_snap) -> (out (T, C), snaps (n_snap, C, D-1) | None)
  l2_norm_heads(x (T, H, S), eps) -> (T, H, S)
  delta_rule(q, k (T, Hk, S), v (T, Hv, S), g, beta (T, Hv), state (Hv, S, S), n_snap) -> (o, snaps | None)
  gated_rms_norm(o, z (T, Hv, S), w (S,), eps) -> (T, Hv, S)
Semantics are those of the CPU kernels in `llamba.kernels.ops` / `deltanet` (see their docstrings). Index and
metadata arrays (slots, positions, tables, n_kv) may be host (numpy) or device arrays. The model blocks reach this
interface through `llamba.compute.DeviceCompute`.
"""
from __future__ import annotations

import numpy as np

from llamba.kernels.traits import DEVICE, KVALUES_IQ4NL, TYPES

QK_K = 256

# ggml type id -> the name used in the CUDA kernel names (mmv_<name>, deqrows_<name>, the device function
# deq_<name>) and in the xp dequantizer _xp_<name> below: the registry's `device` field (llamba.kernels.traits)
CUDA_TYPES = DEVICE

MMV_NT = 8  # tokens per matvec pass (the weights are read once per MMV_NT tokens)
MMV_WARPS = 4  # output rows per 128-thread block (one warp per row)
ATT_THREADS = 128
ATT_MAXD = 256  # largest head size of the CUDA attention kernel (larger: the xp fallback)
GDN_MAXS = 256  # largest DeltaNet state size of the CUDA recurrence kernel
TILE_BYTES = 64 << 20  # float32 bytes of one dequantized weight tile (prefill GEMM path)

# ----------------------------------------------------------------------------------------------------
# CUDA C source. No #include: NVRTC compiles it as is. Multi-byte fields are read bytewise (blocks of
# 18/22/34/... bytes leave them unaligned). Products whose result is then added use __fmul_rn so that the
# compiler cannot fuse them into an FMA: dequantized values are bit-identical to the CPU's (gguf-py order).
# ----------------------------------------------------------------------------------------------------
_CUDA_HEADER = r"""
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ u32 rd16(const u8* p) { return (u32)p[0] | ((u32)p[1] << 8); }
__device__ __forceinline__ u32 rd32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

// fp16 bits -> float (exact)
__device__ __forceinline__ float h2f(u32 h) {
    const u32 s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        const float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24 (exact)
        return s ? -v : v;
    }
    if (e == 31) return __uint_as_float(s | 0x7f800000u | (m << 13));
    return __uint_as_float(s | ((e + 112u) << 23) | (m << 13));
}

// float -> fp16 bits, round to nearest even (ggml's FP32_TO_FP16, llamba.kernels.ops.f16_bits)
__device__ __forceinline__ u32 f2h_bits(float x) {
    const u32 u = __float_as_uint(x);
    const u32 sign = (u >> 16) & 0x8000u;
    u32 a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return a > 0x7f800000u ? (sign | 0x7e00u) : (sign | 0x7c00u);
    if (a >= 0x477ff000u) return sign | 0x7c00u;
    if (a >= 0x38800000u) {
        a = a + 0xfffu + ((a >> 13) & 1u);
        return sign | ((a - 0x38000000u) >> 13);
    }
    if (a <= 0x33000000u) return sign;
    const u32 e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126u - e;
    u32 q = m >> shift;
    const u32 rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q += 1u;
    return sign | q;
}

__device__ __forceinline__ float f16_round(float x) { return h2f(f2h_bits(x)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// block-wide reductions; every thread of the block must call them; red holds one value per warp
__device__ __forceinline__ float block_max(float v, float* red) {
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = red[0];
    for (int i = 1; i < (int)(blockDim.x >> 5); ++i) r = fmaxf(r, red[i]);
    return r;
}
__device__ __forceinline__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = red[0];
    for (int i = 1; i < (int)(blockDim.x >> 5); ++i) r += red[i];
    return r;
}

__constant__ signed char KV_IQ4NL[16] = {@KVALUES_IQ4NL@};  // traits.KVALUES_IQ4NL

// ---- element j of one GGUF block at b (docs/numerics.md), float operation order of gguf-py
__device__ __forceinline__ float deq_f32(const u8* b, int j) { return __uint_as_float(rd32(b)); }
__device__ __forceinline__ float deq_f16(const u8* b, int j) { return h2f(rd16(b)); }
__device__ __forceinline__ float deq_bf16(const u8* b, int j) { return __uint_as_float(rd16(b) << 16); }

__device__ __forceinline__ float deq_q4_0(const u8* b, int j) {
    const int q = j < 16 ? (b[2 + j] & 15) : (b[2 + j - 16] >> 4);
    return h2f(rd16(b)) * (float)(q - 8);
}
__device__ __forceinline__ float deq_q4_1(const u8* b, int j) {
    const int q = j < 16 ? (b[4 + j] & 15) : (b[4 + j - 16] >> 4);
    return __fmul_rn(h2f(rd16(b)), (float)q) + h2f(rd16(b + 2));
}
__device__ __forceinline__ float deq_q5_0(const u8* b, int j) {
    const int lo = j < 16 ? (b[6 + j] & 15) : (b[6 + j - 16] >> 4);
    const int hb = (rd32(b + 2) >> j) & 1;
    return h2f(rd16(b)) * (float)((lo | (hb << 4)) - 16);
}
__device__ __forceinline__ float deq_q5_1(const u8* b, int j) {
    const int lo = j < 16 ? (b[8 + j] & 15) : (b[8 + j - 16] >> 4);
    const int hb = (rd32(b + 4) >> j) & 1;
    return __fmul_rn(h2f(rd16(b)), (float)(lo | (hb << 4))) + h2f(rd16(b + 2));
}
__device__ __forceinline__ float deq_q8_0(const u8* b, int j) {
    return h2f(rd16(b)) * (float)(signed char)b[2 + j];
}
__device__ __forceinline__ float deq_iq4_nl(const u8* b, int j) {
    const int q = j < 16 ? (b[2 + j] & 15) : (b[2 + j - 16] >> 4);
    return h2f(rd16(b)) * (float)KV_IQ4NL[q];
}
__device__ __forceinline__ float deq_q2_k(const u8* b, int e) {
    const int n = e >> 7, r = e & 127, jj = r >> 5, l = r & 31;
    const int q = (b[16 + 32 * n + l] >> (2 * jj)) & 3;
    const int sb = b[8 * n + 2 * jj + (l >> 4)];
    const float d = h2f(rd16(b + 80)), dmin = h2f(rd16(b + 82));
    return __fmul_rn(__fmul_rn(d, (float)(sb & 15)), (float)q) - __fmul_rn(dmin, (float)(sb >> 4));
}
__device__ __forceinline__ float deq_q3_k(const u8* b, int e) {
    const int n = e >> 7, r = e & 127, jj = r >> 5, l = r & 31;
    const int low = (b[32 + 32 * n + l] >> (2 * jj)) & 3;
    const int hb = (b[l] >> (4 * n + jj)) & 1;
    const int q = low - (hb ? 0 : 4);
    const int k = 8 * n + 2 * jj + (l >> 4);
    const u8* s = b + 96;
    const int low4 = k < 8 ? (s[k] & 15) : (s[k - 8] >> 4);
    const int high2 = (s[8 + (k & 3)] >> (2 * (k >> 2))) & 3;
    const int sc = (low4 | (high2 << 4)) - 32;
    return __fmul_rn(h2f(rd16(b + 108)), (float)sc) * (float)q;
}
__device__ __forceinline__ void scale_min_k4(const u8* q, int k, int* sc, int* mn) {
    if (k < 4) {
        *sc = q[k] & 63;
        *mn = q[k + 4] & 63;
    } else {
        *sc = (q[k + 4] & 15) | ((q[k - 4] >> 6) << 4);
        *mn = (q[k + 4] >> 4) | ((q[k] >> 6) << 4);
    }
}
__device__ __forceinline__ float deq_q4_k(const u8* b, int e) {
    const int c = e >> 6, r = e & 63, k = 2 * c + (r >> 5);
    const int byte = b[16 + 32 * c + (r & 31)];
    const int q = r < 32 ? (byte & 15) : (byte >> 4);
    int sc, mn;
    scale_min_k4(b + 4, k, &sc, &mn);
    const float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2));
    return __fmul_rn(__fmul_rn(d, (float)sc), (float)q) - __fmul_rn(dmin, (float)mn);
}
__device__ __forceinline__ float deq_q5_k(const u8* b, int e) {
    const int c = e >> 6, r = e & 63, k = 2 * c + (r >> 5);
    const int byte = b[48 + 32 * c + (r & 31)];
    const int hb = (b[16 + (r & 31)] >> k) & 1;
    const int q = (r < 32 ? (byte & 15) : (byte >> 4)) + 16 * hb;
    int sc, mn;
    scale_min_k4(b + 4, k, &sc, &mn);
    const float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2));
    return __fmul_rn(__fmul_rn(d, (float)sc), (float)q) - __fmul_rn(dmin, (float)mn);
}
__device__ __forceinline__ float deq_q6_k(const u8* b, int e) {
    const int h = e >> 7, r = e & 127, g = r >> 5, l = r & 31;
    const int qlb = b[64 * h + 32 * (g & 1) + l];
    const int low = g < 2 ? (qlb & 15) : (qlb >> 4);
    const int high = (b[128 + 32 * h + l] >> (2 * g)) & 3;
    const int q = (low | (high << 4)) - 32;
    const int sc = (signed char)b[192 + 8 * h + 2 * g + (l >> 4)];
    return __fmul_rn(h2f(rd16(b + 208)), (float)sc) * (float)q;
}
__device__ __forceinline__ float deq_iq4_xs(const u8* b, int e) {
    const int ib = e >> 5, j = e & 31;
    const u32 sh = rd16(b + 2);
    const int ls = ((b[4 + (ib >> 1)] >> (4 * (ib & 1))) & 15) | (int)(((sh >> (2 * ib)) & 3u) << 4);
    const float dl = __fmul_rn(h2f(rd16(b)), (float)(ls - 32));
    const int byte = b[8 + 16 * ib + (j & 15)];
    const int q = j < 16 ? (byte & 15) : (byte >> 4);
    return dl * (float)KV_IQ4NL[q];
}

// ---- quantized matvec: one warp per output row, lanes stride over the row's elements and dequantize
// in-kernel; MMV_NT tokens per pass share each weight read. Row-exact: a token's sum never depends on T.
#define MMV_NT 8
template <int QK, int BB, float (*DEQ)(const u8*, int)>
__device__ __forceinline__ void mmv_impl(const u8* __restrict__ W, const float* __restrict__ X,
                                         float* __restrict__ Y, int rows, int cols, int T, i64 rb) {
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int t0 = blockIdx.y * MMV_NT;
    if (r >= rows) return;  // whole warp
    const int nt = T - t0 < MMV_NT ? T - t0 : MMV_NT;
    const u8* w = W + (i64)r * rb;
    const float* x = X + (i64)t0 * cols;
    float acc[MMV_NT];
#pragma unroll
    for (int j = 0; j < MMV_NT; ++j) acc[j] = 0.0f;
    for (int c = lane; c < cols; c += 32) {
        const float wv = DEQ(w + (i64)(c / QK) * BB, c % QK);
#pragma unroll
        for (int j = 0; j < MMV_NT; ++j)
            if (j < nt) acc[j] += wv * x[(i64)j * cols + c];
    }
#pragma unroll
    for (int j = 0; j < MMV_NT; ++j) acc[j] = warp_sum(acc[j]);
    if (lane == 0)
        for (int j = 0; j < nt; ++j) Y[(i64)(t0 + j) * rows + r] = acc[j];
}

// ---- dequantize rows into a float32 tile (prefill: then cuBLAS)
template <int QK, int BB, float (*DEQ)(const u8*, int)>
__device__ __forceinline__ void deq_impl(const u8* __restrict__ W, float* __restrict__ Y, int rows, int cols, i64 rb) {
    const i64 n = (i64)rows * cols;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / cols;
        const int c = (int)(i - r * cols);
        Y[i] = DEQ(W + r * rb + (i64)(c / QK) * BB, c % QK);
    }
}
"""

_CUDA_PER_TYPE = r"""
extern "C" __global__ void mmv_{name}(const u8* __restrict__ W, const float* __restrict__ X, float* __restrict__ Y,
                                      int rows, int cols, int T, i64 rb) {{
    mmv_impl<{qk}, {bb}, deq_{name}>(W, X, Y, rows, cols, T, rb);
}}
extern "C" __global__ void deqrows_{name}(const u8* __restrict__ W, float* __restrict__ Y, int rows, int cols,
                                          i64 rb) {{
    deq_impl<{qk}, {bb}, deq_{name}>(W, Y, rows, cols, rb);
}}
"""

_CUDA_OPS = r"""
// ---- RMSNorm, one block per row: squares in float32 summed in double, then (x * scale) * w (CPU order)
extern "C" __global__ void rms_norm_f32(const float* __restrict__ X, const float* __restrict__ Wt,
    float* __restrict__ Y, int n, float eps) {
    __shared__ double red[32];
    const float* x = X + (i64)blockIdx.x * n;
    float* y = Y + (i64)blockIdx.x * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = x[i];
        s += (double)(v * v);
    }
    s = warp_sum_d(s);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
    __syncthreads();
    double tot = 0.0;
    for (int i = 0; i < (int)(blockDim.x >> 5); ++i) tot += red[i];
    const float mean = (float)(tot / n);
    const float sc = 1.0f / sqrtf(mean + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = (x[i] * sc) * Wt[i];
}

// ---- RoPE in place from a cos/sin table (T, n_rot/2); NORM pairs (2i, 2i+1), NEOX pairs (i, i + n_rot/2)
extern "C" __global__ void rope_f32(float* __restrict__ X, const float* __restrict__ C, const float* __restrict__ S,
    int T, int H, int hd, int n_rot, int neox) {
    const int half = n_rot / 2;
    const i64 n = (i64)T * H * half;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (i64)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const i64 th = idx / half;
        const int t = (int)(th / H);
        float* x = X + th * hd;
        const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float c = C[(i64)t * half + i], s = S[(i64)t * half + i];
        const float x0 = x[a], x1 = x[b];
        x[a] = __fmul_rn(x0, c) - __fmul_rn(x1, s);
        x[b] = __fmul_rn(x0, s) + __fmul_rn(x1, c);
    }
}

// ---- attention over an fp16 KV cache, one 128-thread block per (row t, head h) (attn_f16kv_paged below).
// Key j is visible iff j <= pos[t], j < n_kv and (n_swa == 0 or pos[t] - j < n_swa). Q rounded to fp16 as
// on the CPU; keys in chunks of 128 (a warp per key for q.k), online softmax across chunks.
#define ATT_THREADS 128
#define ATT_MAXD 256
// ---- paged KV cache (llamba.kv_cache): the caches are (Hkv, n_slots, d); position j of the sequence with block
// table tab is in slot tab[j / bs] * bs + j % bs. store_kv_f16 writes row t of X (T, H, d) into slot S[t], rounded to
// fp16 (one thread per element; slots of one batch are distinct).
extern "C" __global__ void store_kv_f16(const float* __restrict__ X, u16* __restrict__ C, const i64* __restrict__ S,
    int T, int H, int d, i64 n_slots) {
    const i64 n = (i64)T * H * d;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const int c = (int)(i % d);
        const i64 th = i / d;
        const int h = (int)(th % H), t = (int)(th / H);
        C[((i64)h * n_slots + S[t]) * d + c] = (u16)f2h_bits(X[i]);
    }
}

// attention over a paged cache: row t belongs to sequence Sq[t] (block table TAB[Sq[t]], n_kv NKV[Sq[t]]), its keys
// read from their slots (a chunk's slots in shared memory); a contiguous cache is the one-block case.
extern "C" __global__ void attn_f16kv_paged(const float* __restrict__ Q, const u16* __restrict__ Kc,
    const u16* __restrict__ Vc, const i64* __restrict__ P, const i64* __restrict__ Sq, const int* __restrict__ TAB,
    int max_blocks, int bs, const i64* __restrict__ NKV, float* __restrict__ O, int H, int Hkv, int dk, int dv,
    i64 n_slots, float scale, int n_swa) {
    __shared__ float qs[ATT_MAXD];
    __shared__ float ps[ATT_THREADS];
    __shared__ i64 sl[ATT_THREADS];
    __shared__ float red[ATT_THREADS / 32];
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, nw = ATT_THREADS / 32;
    const int t = blockIdx.x / H, h = blockIdx.x % H;
    const int g = h / (H / Hkv);
    const i64 p = P[t];
    const i64 sq = Sq[t];
    const i64 n_kv = NKV[sq];
    const int* tab = TAB + sq * max_blocks;
    const int hi = (int)(p + 1 < n_kv ? p + 1 : n_kv);
    int lo = 0;
    if (n_swa > 0) {
        const i64 l = p - n_swa + 1;
        lo = l > 0 ? (int)l : 0;
    }
    float* o = O + ((i64)t * H + h) * dv;
    if (hi - lo <= 0) {
        for (int d = tid; d < dv; d += ATT_THREADS) o[d] = 0.0f;
        return;  // whole block
    }
    const float* q = Q + ((i64)t * H + h) * dk;
    for (int d = tid; d < dk; d += ATT_THREADS) qs[d] = f16_round(q[d]);
    float acc[ATT_MAXD / ATT_THREADS];
#pragma unroll
    for (int i = 0; i < ATT_MAXD / ATT_THREADS; ++i) acc[i] = 0.0f;
    float M = NEG_INF, L = 0.0f;
    const u16* kb = Kc + (i64)g * n_slots * dk;
    const u16* vb = Vc + (i64)g * n_slots * dv;
    for (int j0 = lo; j0 < hi; j0 += ATT_THREADS) {
        const int nc = hi - j0 < ATT_THREADS ? hi - j0 : ATT_THREADS;
        if (tid < nc) {
            const int j = j0 + tid;
            sl[tid] = (i64)tab[j / bs] * bs + (j % bs);
        }
        __syncthreads();  // sl (and, on the first chunk, qs) written
        for (int jj = wid; jj < nc; jj += nw) {
            const u16* kr = kb + sl[jj] * dk;
            float s = 0.0f;
            for (int d = lane; d < dk; d += 32) s += qs[d] * h2f(kr[d]);
            s = warp_sum(s);
            if (lane == 0) ps[jj] = s * scale;
        }
        __syncthreads();
        const float sv = tid < nc ? ps[tid] : NEG_INF;
        const float Mn = fmaxf(M, block_max(sv, red));
        const float alpha = expf(M - Mn);  // 0 for the first chunk (M = -inf)
        const float e = tid < nc ? expf(sv - Mn) : 0.0f;
        if (tid < nc) ps[tid] = e;
        L = L * alpha + block_sum(e, red);  // its barriers also publish ps
#pragma unroll
        for (int i = 0; i < ATT_MAXD / ATT_THREADS; ++i) {
            const int d = tid + i * ATT_THREADS;
            if (d < dv) {
                float a = acc[i] * alpha;
                for (int jj = 0; jj < nc; ++jj) a += ps[jj] * h2f(vb[sl[jj] * dv + d]);
                acc[i] = a;
            }
        }
        M = Mn;
        __syncthreads();  // ps and sl are rewritten by the next chunk
    }
    const float inv = 1.0f / L;
#pragma unroll
    for (int i = 0; i < ATT_MAXD / ATT_THREADS; ++i) {
        const int d = tid + i * ATT_THREADS;
        if (d < dv) o[d] = acc[i] * inv;
    }
}

// ---- gated activations: out = silu(g) * u ; out = gelu_tanh(g) * u with ggml's fp16 GELU table
extern "C" __global__ void swiglu_f32(const float* __restrict__ G, const float* __restrict__ U,
    float* __restrict__ Y, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float g = G[i];
        Y[i] = (g / (1.0f + expf(-g))) * U[i];
    }
}
extern "C" __global__ void geglu_f32(const float* __restrict__ G, const float* __restrict__ U,
    const float* __restrict__ table, float* __restrict__ Y, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float g = G[i];
        float a;
        if (g <= -10.0f) a = 0.0f;
        else if (g >= 10.0f) a = g;
        else a = table[f2h_bits(g)];
        Y[i] = a * U[i];
    }
}

// ---- gated delta rule, one warp per (value head h, value row b), tokens in order inside the kernel.
// state[h, b, :] (key index contiguous) lives in registers; v-head h reads k-head h % Hk.
#define GDN_MAXS 256
extern "C" __global__ void gdn_rule(const float* __restrict__ Qm, const float* __restrict__ Km,
    const float* __restrict__ V, const float* __restrict__ G, const float* __restrict__ B,
    float* __restrict__ state, float* __restrict__ O, float* __restrict__ snaps, int T, int Hk, int Hv, int S,
    int n_snap, float scale) {
    const int lane = threadIdx.x & 31;
    const i64 wg = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (wg >= (i64)Hv * S) return;  // whole warp
    const int h = (int)(wg / S), b = (int)(wg % S), kh = h % Hk;
    float* st = state + ((i64)h * S + b) * S;
    float row[GDN_MAXS / 32];
#pragma unroll
    for (int i = 0; i < GDN_MAXS / 32; ++i) {
        const int a = lane + 32 * i;
        row[i] = a < S ? st[a] : 0.0f;
    }
    for (int t = 0; t < T; ++t) {
        const float decay = expf(G[(i64)t * Hv + h]);
        const float bt = B[(i64)t * Hv + h];
        const float* kt = Km + ((i64)t * Hk + kh) * S;
        const float* qt = Qm + ((i64)t * Hk + kh) * S;
        float sk = 0.0f;
#pragma unroll
        for (int i = 0; i < GDN_MAXS / 32; ++i) {
            const int a = lane + 32 * i;
            if (a < S) {
                row[i] *= decay;
                sk += row[i] * kt[a];
            }
        }
        sk = warp_sum(sk);
        const float d = (V[((i64)t * Hv + h) * S + b] - sk) * bt;
        float sq = 0.0f;
#pragma unroll
        for (int i = 0; i < GDN_MAXS / 32; ++i) {
            const int a = lane + 32 * i;
            if (a < S) {
                row[i] += kt[a] * d;
                sq += row[i] * qt[a];
            }
        }
        sq = warp_sum(sq);
        if (lane == 0) O[((i64)t * Hv + h) * S + b] = sq * scale;
        if (t < n_snap) {
            float* sn = snaps + (((i64)t * Hv + h) * S + b) * S;
#pragma unroll
            for (int i = 0; i < GDN_MAXS / 32; ++i) {
                const int a = lane + 32 * i;
                if (a < S) sn[a] = row[i];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < GDN_MAXS / 32; ++i) {
        const int a = lane + 32 * i;
        if (a < S) st[a] = row[i];
    }
}
"""


def _type_geometry(type_id: int) -> tuple[int, int]:
    """(elements, bytes) of one block; F32/F16/BF16 count one element per 'block'."""
    t = TYPES[type_id]
    return t.block_elems, t.block_bytes


CUDA_SOURCE = _CUDA_HEADER.replace("@KVALUES_IQ4NL@", ", ".join(str(int(v)) for v in KVALUES_IQ4NL)) + "".join(
    _CUDA_PER_TYPE.format(name=name, qk=_type_geometry(tid)[0], bb=_type_geometry(tid)[1])
    for tid, name in CUDA_TYPES.items()) + _CUDA_OPS


# ----------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------

class QWeight:
    """A matmul weight on a device: its GGUF block bytes `data` (rows, row_bytes) uint8, as in the file."""

    __slots__ = ("type_id", "rows", "cols", "data", "bias", "name")

    def __init__(self, type_id, rows, cols, data, bias, name=""):
        self.type_id, self.rows, self.cols, self.data, self.bias, self.name = type_id, rows, cols, data, bias, name

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes) + (int(self.bias.nbytes) if self.bias is not None else 0)


def raw_bytes(lin) -> np.ndarray:
    """The (rows, row_bytes) uint8 view of a Linear's weight (F32/F16/BF16 arrays viewed as bytes)."""
    w = np.ascontiguousarray(lin.w)
    return w.reshape(lin.rows, -1).view(np.uint8)


# ----------------------------------------------------------------------------------------------------
# xp reference implementation (numpy stand-in, CuPy fallback)
# ----------------------------------------------------------------------------------------------------

def _f16(xp, b):
    """(..., 2) little-endian bytes -> (...) float32 (exact)."""
    return xp.ascontiguousarray(b).view(xp.float16)[..., 0].astype(xp.float32)


def _nibbles(xp, qs):
    """(..., 16) bytes -> (..., 32) ints: the low nibbles are elements 0..15, the high ones 16..31."""
    return xp.concatenate([qs & 15, qs >> 4], axis=-1).astype(xp.int32)


def _high_bits(xp, qh4):
    """(..., 4) bytes of a little-endian u32 -> (..., 32) bits, bit j for element j."""
    qh = qh4.astype(xp.uint32)
    u = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
    return ((u[..., None] >> xp.arange(32, dtype=xp.uint32)) & 1).astype(xp.int32)


def _k4_scale_min(xp, s):
    """Q4_K/Q5_K packed (..., 12) bytes -> six-bit scales and mins (..., 8) as float32."""
    s = s.astype(xp.int32)
    lo_sc, lo_mn = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    hi_mn = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    sc = xp.concatenate([lo_sc, hi_sc], axis=-1).astype(xp.float32)
    mn = xp.concatenate([lo_mn, hi_mn], axis=-1).astype(xp.float32)
    return sc, mn


# xp dequantizers, one per device type: _xp_<name>(xp, b) with b the (R, blocks, block bytes) uint8 view -> float32
# values (R, blocks, ...) in element order (F32/F16/BF16: `b` is the (R, row bytes) view, see dequantize_xp)

def _xp_f32(xp, b):
    return xp.ascontiguousarray(b).view(xp.float32)


def _xp_f16(xp, b):
    return xp.ascontiguousarray(b).view(xp.float16).astype(xp.float32)


def _xp_bf16(xp, b):
    u = xp.ascontiguousarray(b).view(xp.uint16).astype(xp.uint32) << 16
    return u.view(xp.float32)


def _xp_q4_0(xp, b):
    d = _f16(xp, b[..., 0:2])[..., None]
    return d * (_nibbles(xp, b[..., 2:18]) - 8).astype(xp.float32)


def _xp_iq4_nl(xp, b):
    d = _f16(xp, b[..., 0:2])[..., None]
    return d * xp.asarray(KVALUES_IQ4NL.astype(np.float32))[_nibbles(xp, b[..., 2:18])]


def _xp_q4_1(xp, b):
    d, m = _f16(xp, b[..., 0:2])[..., None], _f16(xp, b[..., 2:4])[..., None]
    return d * _nibbles(xp, b[..., 4:20]).astype(xp.float32) + m


def _xp_q5_0(xp, b):
    d = _f16(xp, b[..., 0:2])[..., None]
    q = _nibbles(xp, b[..., 6:22]) | (_high_bits(xp, b[..., 2:6]) << 4)
    return d * (q - 16).astype(xp.float32)


def _xp_q5_1(xp, b):
    d, m = _f16(xp, b[..., 0:2])[..., None], _f16(xp, b[..., 2:4])[..., None]
    q = _nibbles(xp, b[..., 8:24]) | (_high_bits(xp, b[..., 4:8]) << 4)
    return d * q.astype(xp.float32) + m


def _xp_q8_0(xp, b):
    d = _f16(xp, b[..., 0:2])[..., None]
    return d * xp.ascontiguousarray(b[..., 2:34]).view(xp.int8).astype(xp.float32)


def _xp_q2_k(xp, b):  # scales[16], qs[64], d, dmin
    f32, R = xp.float32, b.shape[0]
    sc = b[..., 0:16].astype(xp.int32)
    qs = b[..., 16:80].astype(xp.int32).reshape(R, -1, 2, 1, 32)  # [n][l] -> shifted by 2j
    shifts = (2 * xp.arange(4, dtype=xp.int32)).reshape(1, 1, 1, 4, 1)
    q = ((qs >> shifts) & 3).reshape(R, -1, 16, 16).astype(f32)  # groups of 16 in element order
    d, dmin = _f16(xp, b[..., 80:82])[..., None], _f16(xp, b[..., 82:84])[..., None]
    dl = (d * (sc & 15).astype(f32))[..., None]
    ml = (dmin * (sc >> 4).astype(f32))[..., None]
    return dl * q - ml


def _xp_q3_k(xp, b):  # hmask[32], qs[64], scales[12], d
    f32, R = xp.float32, b.shape[0]
    hm = b[..., 0:32].astype(xp.int32)
    qs = b[..., 32:96].astype(xp.int32).reshape(R, -1, 2, 1, 32)
    shifts = (2 * xp.arange(4, dtype=xp.int32)).reshape(1, 1, 1, 4, 1)
    low = (qs >> shifts) & 3  # (R, nb, n, j, l)
    i32 = xp.int32
    hbit = (4 * xp.arange(2, dtype=i32)).reshape(1, 1, 2, 1, 1) + xp.arange(4, dtype=i32).reshape(1, 1, 1, 4, 1)
    hb = (hm.reshape(R, -1, 1, 1, 32) >> hbit) & 1
    q = (low - 4 * (1 - hb)).reshape(R, -1, 16, 16).astype(f32)
    s = b[..., 96:108].astype(xp.int32)
    k = xp.arange(16)
    low4 = xp.where(k < 8, s[..., k % 8] & 15, s[..., k % 8] >> 4)
    high2 = (s[..., 8 + (k % 4)] >> (2 * (k // 4))) & 3
    sc = ((low4 | (high2 << 4)) - 32).astype(f32)
    d = _f16(xp, b[..., 108:110])[..., None]
    return (d * sc)[..., None] * q


def _xp_q45_k(xp, b, five):  # Q4_K / Q5_K: d, dmin, scales[12], (qh[32],) qs[128]
    f32, R = xp.float32, b.shape[0]
    d, dmin = _f16(xp, b[..., 0:2])[..., None], _f16(xp, b[..., 2:4])[..., None]
    sc, mn = _k4_scale_min(xp, b[..., 4:16])
    qs_off = 48 if five else 16
    qs = b[..., qs_off:qs_off + 128].astype(xp.int32).reshape(R, -1, 4, 1, 32)
    q = (qs >> (4 * xp.arange(2, dtype=xp.int32)).reshape(1, 1, 1, 2, 1)) & 15  # (R, nb, c, half, l)
    if five:
        qh = b[..., 16:48].astype(xp.int32).reshape(R, -1, 1, 1, 32)
        i32 = xp.int32
        kk = (2 * xp.arange(4, dtype=i32)).reshape(1, 1, 4, 1, 1) + xp.arange(2, dtype=i32).reshape(1, 1, 1, 2, 1)
        q = q + 16 * ((qh >> kk) & 1)
    q = q.reshape(R, -1, 8, 32).astype(f32)
    return (d * sc)[..., None] * q - (dmin * mn)[..., None]


def _xp_q4_k(xp, b):
    return _xp_q45_k(xp, b, False)


def _xp_q5_k(xp, b):
    return _xp_q45_k(xp, b, True)


def _xp_q6_k(xp, b):  # ql[128], qh[64], scales[16] int8, d
    f32, R = xp.float32, b.shape[0]
    ql = b[..., 0:128].astype(xp.int32).reshape(R, -1, 2, 2, 32)  # [h][g&1][l]
    qh = b[..., 128:192].astype(xp.int32).reshape(R, -1, 2, 1, 32)  # [h][l]
    lo = xp.concatenate([ql & 15, ql >> 4], axis=2 + 1)  # (R, nb, h, 4: g=0,1 low nibbles, g=2,3 high)
    hi = (qh >> (2 * xp.arange(4, dtype=xp.int32)).reshape(1, 1, 1, 4, 1)) & 3
    q = ((lo | (hi << 4)) - 32).reshape(R, -1, 16, 16).astype(f32)
    sc = xp.ascontiguousarray(b[..., 192:208]).view(xp.int8).astype(f32)
    d = _f16(xp, b[..., 208:210])[..., None]
    return (d * sc)[..., None] * q


def _xp_iq4_xs(xp, b):  # d, scales_h u16, scales_l[4], qs[128]
    f32, R = xp.float32, b.shape[0]
    d = _f16(xp, b[..., 0:2])[..., None]
    sh = b[..., 2].astype(xp.int32) | (b[..., 3].astype(xp.int32) << 8)
    ib = xp.arange(8, dtype=xp.int32)
    sl = b[..., 4:8].astype(xp.int32)[..., ib // 2]
    ls = ((sl >> (4 * (ib % 2))) & 15) | (((sh[..., None] >> (2 * ib)) & 3) << 4)
    dl = (d * (ls - 32).astype(f32))[..., None]
    q = _nibbles(xp, b[..., 8:136].reshape(R, -1, 8, 16))
    return dl * xp.asarray(KVALUES_IQ4NL.astype(np.float32))[q]


def dequantize_xp(xp, type_id: int, raw, cols: int):
    """GGUF block bytes raw (R, row_bytes) uint8 -> float32 (R, cols), gguf-py's formulas and float order."""
    R = raw.shape[0]
    name = CUDA_TYPES.get(type_id)
    if name is None:
        raise NotImplementedError(f"no device dequantization for tensor type {TYPES[type_id].name}")
    qk, bb = _type_geometry(type_id)
    b = raw if qk == 1 else raw.reshape(R, cols // qk, bb)
    y = globals()[f"_xp_{name}"](xp, b)
    return y.astype(xp.float32, copy=False).reshape(R, cols)


class XpKernels:
    """The device-kernel interface written with array-module calls (numpy stand-in / CuPy fallback)."""

    name = "xp"

    def __init__(self, xp):
        self.xp = xp
        self.kv_dtype = xp.float16
        self._gelu = None

    # ---- weights and matmul
    def upload(self, lin) -> QWeight:
        xp = self.xp
        if lin.type_id not in CUDA_TYPES:
            raise NotImplementedError(f"tensor '{lin.name}' ({TYPES[lin.type_id].name}) has no device kernel")
        data = xp.asarray(raw_bytes(lin))
        bias = None if lin.bias is None else xp.asarray(np.ascontiguousarray(lin.bias, dtype=np.float32))
        return QWeight(lin.type_id, lin.rows, lin.cols, data, bias, lin.name)

    def dequant(self, W: QWeight, r0: int = 0, r1: int | None = None):
        r1 = W.rows if r1 is None else r1
        return dequantize_xp(self.xp, W.type_id, W.data[r0:r1], W.cols)

    def _tile_rows(self, W):
        return max(1, TILE_BYTES // (4 * W.cols))

    def matmul(self, W: QWeight, x, gemm: bool):
        xp = self.xp
        x = xp.ascontiguousarray(x, dtype=xp.float32)
        T = x.shape[0]
        out = xp.empty((T, W.rows), dtype=xp.float32)
        tile = self._tile_rows(W)
        for a in range(0, W.rows, tile):
            b = min(W.rows, a + tile)
            wt = self.dequant(W, a, b)
            if gemm:
                out[:, a:b] = x @ wt.T
            else:  # row-exact: one matrix-vector product per row
                for t in range(T):
                    out[t, a:b] = wt @ x[t]
        if W.bias is not None:
            out += W.bias
        return out

    # ---- norms, rope, attention, activations
    def rms_norm(self, x, w, eps):
        xp = self.xp
        x = xp.ascontiguousarray(x, dtype=xp.float32)
        s = (x * x).astype(xp.float64).sum(axis=-1, keepdims=True)
        mean = (s / x.shape[-1]).astype(xp.float32)
        sc = xp.float32(1.0) / xp.sqrt(mean + xp.float32(eps))
        return (x * sc) * w

    def rope(self, x, cos, sin, n_rot, neox):
        half = n_rot // 2
        if neox:
            a, b = x[..., :half], x[..., half:n_rot]
        else:
            a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        c, s = cos[:, None, :], sin[:, None, :]
        x0, x1 = a.copy(), b.copy()
        a[...] = x0 * c - x1 * s
        b[...] = x0 * s + x1 * c

    def store_kv(self, k, v, kc, vc, pos0):
        T = k.shape[0]
        f16 = self.xp.float16
        kc[:, pos0:pos0 + T] = k.transpose(1, 0, 2).astype(f16).astype(kc.dtype)
        vc[:, pos0:pos0 + T] = v.transpose(1, 0, 2).astype(f16).astype(vc.dtype)

    def attention(self, q, kc, vc, pos, n_kv, scale, n_swa):
        return self._attend(q, kc[:, :n_kv], vc[:, :n_kv], pos, scale, n_swa)

    def store_kv_slots(self, k, v, kc, vc, slots):
        xp = self.xp
        s = xp.asarray(slots)
        f16 = xp.float16
        kc[:, s] = k.transpose(1, 0, 2).astype(f16).astype(kc.dtype)
        vc[:, s] = v.transpose(1, 0, 2).astype(f16).astype(vc.dtype)

    def attention_paged(self, q, kc, vc, pos, row_seq, tables, bs, n_kv, scale, n_swa):
        """Per sequence of the batch: its keys gathered from their slots, then `attention`'s arithmetic."""
        xp = self.xp
        T, H, _ = q.shape
        out = xp.zeros((T, H, vc.shape[2]), dtype=xp.float32)
        seq, tab, nkv = _host(row_seq), _host(tables), _host(n_kv)
        pos = xp.asarray(pos)
        for s in np.unique(seq):
            rows = xp.asarray(np.nonzero(seq == s)[0])
            j = np.arange(int(nkv[s]), dtype=np.int64)
            sl = xp.asarray(tab[s, j // bs].astype(np.int64) * bs + j % bs)
            out[rows] = self._attend(q[rows], kc[:, sl], vc[:, sl], pos[rows], scale, n_swa)
        return out

    def _attend(self, q, kc, vc, pos, scale, n_swa):
        """q (T, H, dk) over keys 0..n-1 of kc/vc (Hkv, n, d) (fp16 values); pos (T,) the rows' positions."""
        xp = self.xp
        T, H, dk = q.shape
        Hkv, n_kv, dv = kc.shape[0], kc.shape[1], vc.shape[2]
        grp = H // Hkv
        if T == 0 or n_kv == 0:
            return xp.zeros((T, H, dv), dtype=xp.float32)
        qh = q.astype(xp.float16).astype(xp.float32).reshape(T, Hkv, grp, dk)
        Kf = kc.astype(xp.float32)
        Vf = vc.astype(xp.float32)
        s = xp.einsum("tgrd,gnd->grtn", qh, Kf) * xp.float32(scale)
        j = xp.arange(n_kv)[None, :]
        p = xp.asarray(pos).reshape(-1, 1)
        vis = j <= p
        if n_swa > 0:
            vis &= (p - j) < n_swa
        s = xp.where(vis, s, -xp.inf)
        m = s.max(axis=-1, keepdims=True)
        m = xp.where(xp.isfinite(m), m, xp.float32(0))
        e = xp.where(vis, xp.exp(s - m), xp.float32(0))
        tot = e.astype(xp.float64).sum(axis=-1, keepdims=True)
        inv = xp.where(tot > 0, 1.0 / xp.where(tot > 0, tot, 1.0), 0.0).astype(xp.float32)
        o = xp.einsum("grtn,gnd->grtd", e, Vf) * inv  # (Hkv, grp, T, dv)
        return xp.ascontiguousarray(o.transpose(2, 0, 1, 3)).reshape(T, H, dv)

    def swiglu(self, g, u):
        xp = self.xp
        return (g / (xp.float32(1) + xp.exp(-g))) * u

    def _gelu_table(self):
        if self._gelu is None:
            from llamba.kernels.ops import GELU_F16_TABLE
            self._gelu = self.xp.asarray(GELU_F16_TABLE)
        return self._gelu

    def geglu(self, g, u):
        xp = self.xp
        a = self._gelu_table()[xp.ascontiguousarray(g).astype(xp.float16).view(xp.uint16)]
        a = xp.where(g <= -10, xp.float32(0), xp.where(g >= 10, g, a))
        return a * u

    def sigmoid(self, x):
        xp = self.xp
        return xp.float32(1) / (xp.float32(1) + xp.exp(-x))

    # ---- Gated DeltaNet
    def gdn_gates(self, alpha, beta_raw, dt_bias, ssm_a):
        xp = self.xp
        x = alpha + dt_bias
        sp = xp.where(x > 20, x, xp.log(xp.float32(1) + xp.exp(xp.minimum(x, xp.float32(20)))))
        return sp * ssm_a, self.sigmoid(beta_raw)

    def conv1d_silu(self, m, conv_state, w, n_snap):
        xp = self.xp
        T, C = m.shape
        D = w.shape[1]
        X = xp.concatenate([conv_state.T, m], axis=0)  # (D-1+T, C): column j of [state | m]
        acc = xp.zeros((T, C), dtype=xp.float32)
        for i in range(D):
            acc += X[i:i + T] * w[:, i]
        out = acc / (xp.float32(1) + xp.exp(-acc))
        snaps = None
        if n_snap:
            snaps = xp.empty((n_snap, C, D - 1), dtype=xp.float32)
            for i in range(D - 1):
                snaps[:, :, i] = X[1 + i:1 + i + n_snap]
        conv_state[...] = X[T:].T
        return out, snaps

    def l2_norm_heads(self, x, eps):
        xp = self.xp
        s = (x * x).astype(xp.float64).sum(axis=-1, keepdims=True)
        return x * (xp.float32(1) / xp.maximum(xp.sqrt(s.astype(xp.float32)), xp.float32(eps)))

    def delta_rule(self, q, k, v, g, beta, state, n_snap):
        xp = self.xp
        T, Hk, S = q.shape
        Hv = v.shape[1]
        heads = xp.arange(Hv) % Hk
        scale = xp.float32(1.0 / np.sqrt(S))
        o = xp.empty((T, Hv, S), dtype=xp.float32)
        snaps = xp.empty((n_snap, Hv, S, S), dtype=xp.float32) if n_snap else None
        decay = xp.exp(g)
        for t in range(T):
            kt, qt = k[t][heads][:, None, :], q[t][heads][:, None, :]  # (Hv, 1, S)
            state *= decay[t][:, None, None]
            sk = (state * kt).sum(axis=-1)  # (Hv, S) over the key index
            d = (v[t] - sk) * beta[t][:, None]
            state += d[:, :, None] * kt
            o[t] = (state * qt).sum(axis=-1) * scale
            if t < n_snap:
                snaps[t] = state
        return o, snaps

    def gated_rms_norm(self, o, z, w, eps):
        xp = self.xp
        s = (o * o).astype(xp.float64).sum(axis=-1, keepdims=True)
        mean = (s / o.shape[-1]).astype(xp.float32)
        sc = xp.float32(1) / xp.sqrt(mean + xp.float32(eps))
        return ((o * sc) * w) * (z / (xp.float32(1) + xp.exp(-z)))


# ----------------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------------

def _host(a) -> np.ndarray:
    """A (small) index array on the host: numpy as is, a CuPy array copied back."""
    return a if isinstance(a, np.ndarray) else a.get()


def _grid(n: int, block: int, cap: int = 1 << 16) -> int:
    return max(1, min(cap, (n + block - 1) // block))


class CudaKernels(XpKernels):
    """The interface with CUDA kernels for the hot ops. `module` has `get_function(name)` returning a
    launchable `f(grid, block, args)` (a `cupy.RawModule` compiled from CUDA_SOURCE, or a test double)."""

    name = "cuda"

    def __init__(self, xp, module):
        super().__init__(xp)
        self.module = module
        self._fns: dict = {}

    @classmethod
    def for_cupy(cls, cupy):
        """Compile CUDA_SOURCE for the current CuPy device (NVRTC; CuPy caches the binary on disk)."""
        mod = cupy.RawModule(code=CUDA_SOURCE, options=("--std=c++14",))
        k = cls(cupy, mod)
        k._fn("rms_norm_f32")  # compile now: a broken toolchain fails at load, not mid-generation
        return k

    def _fn(self, name):
        f = self._fns.get(name)
        if f is None:
            f = self._fns[name] = self.module.get_function(name)
        return f

    def matmul(self, W: QWeight, x, gemm: bool):
        xp = self.xp
        x = xp.ascontiguousarray(x, dtype=xp.float32)
        T = x.shape[0]
        name = CUDA_TYPES[W.type_id]
        rb = W.data.shape[1]
        if gemm and T > 1:  # dequantize a tile of rows, then cuBLAS
            out = xp.empty((T, W.rows), dtype=xp.float32)
            tile = self._tile_rows(W)
            buf = xp.empty((min(tile, W.rows), W.cols), dtype=xp.float32)
            for a in range(0, W.rows, tile):
                b = min(W.rows, a + tile)
                wt = buf[:b - a]
                n = (b - a) * W.cols
                self._fn("deqrows_" + name)((_grid(n, 256),), (256,),
                                            (W.data[a:b], wt, np.int32(b - a), np.int32(W.cols), np.int64(rb)))
                out[:, a:b] = xp.matmul(x, wt.T)
        else:
            out = xp.empty((T, W.rows), dtype=xp.float32)
            if T:
                grid = ((W.rows + MMV_WARPS - 1) // MMV_WARPS, (T + MMV_NT - 1) // MMV_NT)
                self._fn("mmv_" + name)(grid, (32 * MMV_WARPS,),
                                        (W.data, x, out, np.int32(W.rows), np.int32(W.cols), np.int32(T), np.int64(rb)))
        if W.bias is not None:
            out += W.bias
        return out

    def dequant(self, W: QWeight, r0: int = 0, r1: int | None = None):
        xp = self.xp
        r1 = W.rows if r1 is None else r1
        out = xp.empty((r1 - r0, W.cols), dtype=xp.float32)
        n = (r1 - r0) * W.cols
        if n:
            self._fn("deqrows_" + CUDA_TYPES[W.type_id])(
                (_grid(n, 256),), (256,), (W.data[r0:r1], out, np.int32(r1 - r0), np.int32(W.cols),
                                           np.int64(W.data.shape[1])))
        return out

    def rms_norm(self, x, w, eps):
        xp = self.xp
        x = xp.ascontiguousarray(x, dtype=xp.float32)
        R, n = x.shape
        out = xp.empty_like(x)
        if R:
            self._fn("rms_norm_f32")((R,), (128,), (x, xp.ascontiguousarray(w), out, np.int32(n), np.float32(eps)))
        return out

    def rope(self, x, cos, sin, n_rot, neox):
        T, H, hd = x.shape
        n = T * H * (n_rot // 2)
        if not x.flags.c_contiguous:
            return super().rope(x, cos, sin, n_rot, neox)
        if n:
            self._fn("rope_f32")((_grid(n, 256),), (256,),
                                 (x, self.xp.ascontiguousarray(cos), self.xp.ascontiguousarray(sin), np.int32(T),
                                  np.int32(H), np.int32(hd), np.int32(n_rot), np.int32(1 if neox else 0)))

    def attention(self, q, kc, vc, pos, n_kv, scale, n_swa):
        """One sequence over a contiguous cache (Hkv, n_ctx, d): the paged kernel with a one-block table."""
        xp = self.xp
        T = q.shape[0]
        return self.attention_paged(q, kc, vc, pos, xp.zeros(T, dtype=xp.int64), xp.zeros((1, 1), dtype=xp.int32),
                                    max(1, int(kc.shape[1])), xp.asarray([n_kv], dtype=xp.int64), scale, n_swa)

    def store_kv_slots(self, k, v, kc, vc, slots):
        xp = self.xp
        if kc.dtype != xp.float16 or vc.dtype != xp.float16 or not (kc.flags.c_contiguous and vc.flags.c_contiguous):
            return super().store_kv_slots(k, v, kc, vc, slots)
        s = xp.ascontiguousarray(xp.asarray(slots), dtype=xp.int64)
        for x, c in ((k, kc), (v, vc)):
            x = xp.ascontiguousarray(x, dtype=xp.float32)
            T, H, d = x.shape
            n = T * H * d
            if n:
                self._fn("store_kv_f16")((_grid(n, 256),), (256,),
                                         (x, c, s, np.int32(T), np.int32(H), np.int32(d), np.int64(c.shape[1])))

    def attention_paged(self, q, kc, vc, pos, row_seq, tables, bs, n_kv, scale, n_swa):
        xp = self.xp
        T, H, dk = q.shape
        Hkv, n_slots, dv = vc.shape
        if dk > ATT_MAXD or dv > ATT_MAXD or kc.dtype != xp.float16 or vc.dtype != xp.float16 or \
                not (kc.flags.c_contiguous and vc.flags.c_contiguous):
            return super().attention_paged(q, kc, vc, pos, row_seq, tables, bs, n_kv, scale, n_swa)
        q = xp.ascontiguousarray(q, dtype=xp.float32)
        out = xp.empty((T, H, dv), dtype=xp.float32)
        if T:
            def c(a, dt):
                return xp.ascontiguousarray(xp.asarray(a), dtype=dt)
            tab = c(tables, xp.int32)
            self._fn("attn_f16kv_paged")((T * H,), (ATT_THREADS,),
                                         (q, kc, vc, c(pos, xp.int64), c(row_seq, xp.int64), tab,
                                          np.int32(tab.shape[1]), np.int32(bs), c(n_kv, xp.int64), out, np.int32(H),
                                          np.int32(Hkv), np.int32(dk), np.int32(dv), np.int64(n_slots),
                                          np.float32(scale), np.int32(n_swa)))
        return out

    def swiglu(self, g, u):
        xp = self.xp
        g, u = xp.ascontiguousarray(g, dtype=xp.float32), xp.ascontiguousarray(u, dtype=xp.float32)
        out = xp.empty_like(g)
        n = g.size
        if n:
            self._fn("swiglu_f32")((_grid(n, 256),), (256,), (g, u, out, np.int64(n)))
        return out

    def geglu(self, g, u):
        xp = self.xp
        g, u = xp.ascontiguousarray(g, dtype=xp.float32), xp.ascontiguousarray(u, dtype=xp.float32)
        out = xp.empty_like(g)
        n = g.size
        if n:
            self._fn("geglu_f32")((_grid(n, 256),), (256,), (g, u, self._gelu_table(), out, np.int64(n)))
        return out

    def delta_rule(self, q, k, v, g, beta, state, n_snap):
        xp = self.xp
        T, Hk, S = q.shape
        Hv = v.shape[1]
        if S > GDN_MAXS or not state.flags.c_contiguous:
            return super().delta_rule(q, k, v, g, beta, state, n_snap)
        c = xp.ascontiguousarray
        o = xp.empty((T, Hv, S), dtype=xp.float32)
        snaps = xp.empty((max(n_snap, 1), Hv, S, S), dtype=xp.float32)
        n_thr = Hv * S * 32
        self._fn("gdn_rule")((_grid(n_thr, 128, 1 << 30),), (128,),
                             (c(q, dtype=xp.float32), c(k, dtype=xp.float32), c(v, dtype=xp.float32),
                              c(g, dtype=xp.float32), c(beta, dtype=xp.float32), state, o, snaps, np.int32(T),
                              np.int32(Hk), np.int32(Hv), np.int32(S), np.int32(n_snap),
                              np.float32(1.0 / np.sqrt(S))))
        return o, (snaps if n_snap else None)
