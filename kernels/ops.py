"""Non-matmul compute kernels (Numba): RMSNorm, RoPE (NORM/NEOX, partial rotary, YaRN), softmax,
SwiGLU/GeGLU and the other activations, fp16 rounding, the KV-cache store and causal/sliding-window
grouped-query attention (docs/numerics.md: "Other numerics", "Shared building blocks").

Conventions:

* Everything is float32. Every output and scratch array is allocated by the caller and passed in; kernels
  return nothing (the small per-worker scratch of `attention` is the one documented exception).
* Arithmetic is float32 in the order llama.cpp's CPU backend uses, without fastmath: no reassociation and
  no FMA contraction, so each output depends only on its own inputs and this compiled code. In particular
  no result depends on the batch size T or on the thread count (what makes speculative decoding lossless).
* Transcendentals are libm's (cosf, sinf, logf, tanhf as LLVM lowers them), except the exp of SiLU, sigmoid and
  the attention softmax: `_expf`, evaluated in float64 and rounded once (equal to numpy's float64 exp rounded to
  float32 for all but 2 of the 2^32 float32 inputs, which differ by one ulp), written without calls or branches
  so that those loops vectorize. llama.cpp's x86 SIMD paths use their own polynomial `ggml_v_expf` in SwiGLU
  and softmax, so those agree with llama.cpp to an ulp or two, not bitwise.

fp16: llama.cpp stores the KV cache as F16 and converts Q to F16 for the flash-attention K·Q products.
Here K/V are rounded to fp16 when stored (`store_kv`) but kept as float32 arrays holding fp16 values, and Q
is rounded inside `attention`; the products of two fp16 values are exact in float32, so only the
accumulation order differs from llama.cpp.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir as _llir
from llamba.kernels import _jit  # noqa: F401  (Numba set-up: before the first kernel)
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from llamba.kernels.quants_simple import _h2f_ir

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_TENTH = np.float32(0.1)
_TWO = np.float32(2.0)
_TEN = np.float32(10.0)
_EPS_RAMP = np.float32(0.001)
_PI_F32 = np.float32(np.pi)  # (float)M_PI
_NEG_INF = np.float32(-np.inf)
_GELU_COEF_A = np.float32(0.044715)
_SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)

_PAR_MIN = 1 << 15  # below this many elements, elementwise kernels run serially (no thread start-up)
_BLOCK = 4096  # elements per parallel block of the elementwise kernels
_ATTN_SERIAL = 2048  # attention with at most this many (row, head, key) triples runs on one thread
_ATTN_CHUNKS = 64  # attention work items: (head h, rows t = c, c+n, c+2n, ...), about 64 of them


# ----------------------------------------------------------------------------------------------------
# bit casts and fp16 rounding
# ----------------------------------------------------------------------------------------------------

@intrinsic
def _f32_bits(typingctx, x):
    """float32 -> its IEEE bit pattern, zero-extended to int64. Refuses float64 (catches promotions)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i = builder.bitcast(args[0], _llir.IntType(32))
        return builder.zext(i, _llir.IntType(64))
    return types.int64(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, i):
    """Low 32 bits of an integer -> the float32 with that bit pattern."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        w = sig.args[0].bitwidth
        if w > 32:
            v = builder.trunc(v, _llir.IntType(32))
        elif w < 32:
            v = builder.zext(v, _llir.IntType(32))
        return builder.bitcast(v, _llir.FloatType())
    return types.float32(i), codegen


@njit(cache=True, nogil=True, inline="always")
def f16_round(x):
    """float32 -> the nearest fp16 value (round to nearest even, overflow to inf), returned as float32.
    Same result as numpy's `x.astype(np.float16).astype(np.float32)` and ggml's FP32_TO_FP16."""
    u = _f32_bits(x)
    s = u & 0x80000000
    a = u & 0x7FFFFFFF
    if a >= 0x7F800000:  # inf, nan
        return x
    if a >= 0x477FF000:  # >= 65520: rounds to inf
        return _bits_f32(s | 0x7F800000)
    if a >= 0x38800000:  # fp16 normal range: keep 10 mantissa bits, ties to even
        a = (a + 0xFFF + ((a >> 13) & 1)) & 0xFFFFE000
        return _bits_f32(s | a)
    # fp16 subnormal range (|x| < 2^-14): multiples of 2^-24; adding 0.5 rounds there (ulp(0.5) = 2^-24)
    r = (_bits_f32(a) + _HALF) - _HALF
    return _bits_f32(s | _f32_bits(r))


@njit(cache=True, nogil=True, inline="always")
def f16_bits(x):
    """float32 -> fp16 bit pattern (0..65535) with round to nearest even, like GGML_CPU_FP32_TO_FP16."""
    u = _f32_bits(x)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x7F800000:
        if a > 0x7F800000:
            return sign | 0x7E00  # quiet nan
        return sign | 0x7C00
    if a >= 0x477FF000:
        return sign | 0x7C00
    if a >= 0x38800000:
        a = a + 0xFFF + ((a >> 13) & 1)
        return sign | ((a - 0x38000000) >> 13)
    if a <= 0x33000000:  # |x| <= 2^-25 rounds to zero (the tie goes to even 0)
        return sign
    e = a >> 23
    m = (a & 0x7FFFFF) | 0x800000
    shift = 126 - e  # 14..24
    q = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    return sign | q


@njit(cache=True, nogil=True, parallel=True)
def round_f16(x, out):
    """out = x rounded to fp16 values (kept as float32). out may be x."""
    # x, out: one shape, C-contiguous
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    n = xf.size
    if n < _PAR_MIN:
        for i in range(n):
            of[i] = f16_round(xf[i])
        return
    nb = (n + _BLOCK - 1) // _BLOCK
    for b in prange(nb):
        a0 = b * _BLOCK
        a1 = min(n, a0 + _BLOCK)
        ofb = of[a0:a1]  # slices from 0: no negative-index check, so the loop vectorizes
        xfb = xf[a0:a1]
        for i in range(a1 - a0):
            ofb[i] = f16_round(xfb[i])


def _build_f16_tables():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        # ggml_gelu_f32 in float32: 0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f + GELU_COEF_A*x*x)))
        inner = _SQRT_2_OVER_PI * h * (_ONE + _GELU_COEF_A * h * h)
        g = (_HALF * h) * (_ONE + np.tanh(inner))
        gelu = g.astype(np.float32).astype(np.float16).astype(np.float32)
    return h, gelu


# (65536,) float32 each, indexed by fp16 bit pattern: the fp16 value, and ggml_table_gelu_f16 (fp16 of ggml's
# float32 gelu formula at that value). numpy's tanhf/evaluation order may differ from the C build's by a float32
# ulp, which can flip an entry by one fp16 ulp in rare cases.
F16_TO_F32, GELU_F16_TABLE = _build_f16_tables()


# ----------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _rms_scale(x, r, n, eps):
    s = 0.0  # float64, like ggml_float
    for i in range(n):
        v = x[r, i]
        s += np.float64(v * v)  # square in f32, accumulate in f64, sequentially (llama.cpp order)
    mean = np.float32(s / n)
    return _ONE / np.sqrt(mean + eps)


@njit(cache=True, nogil=True, parallel=True)
def rms_norm(x, w, eps, out):
    """out = (x * 1/sqrt(mean(x^2) + eps)) * w, row by row, in llama.cpp's order (f32 squares summed in
    order in float64, mean and scale in float32). Per-head norms: pass x.reshape(T*H, hd). out may be x."""
    # x (R, n), w (n,), out (R, n)
    R, n = x.shape
    e = np.float32(eps)
    if R * n < _PAR_MIN:
        for r in range(R):
            sc = _rms_scale(x, r, n, e)
            for i in range(n):
                out[r, i] = (x[r, i] * sc) * w[i]
        return
    for r in prange(R):
        sc = _rms_scale(x, r, n, e)
        for i in range(n):
            out[r, i] = (x[r, i] * sc) * w[i]


# ----------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def rope_corr_dims(n_rot, n_ctx_orig, freq_base, beta_fast, beta_slow):
    """ggml_rope_yarn_corr_dims in float32: (low, high) pair indices of the YaRN ramp."""
    nd = np.float32(n_rot)
    base_log2 = _TWO * np.log(np.float32(freq_base))
    nc = np.float32(n_ctx_orig)
    bf = np.float32(beta_fast)
    bs = np.float32(beta_slow)
    # corr_dim(beta) = n_dims * logf(n_ctx_orig / (beta * 2 * (float)M_PI)) / (2 * logf(base))
    c_fast = (nd * np.log(nc / ((bf * _TWO) * _PI_F32))) / base_log2
    c_slow = (nd * np.log(nc / ((bs * _TWO) * _PI_F32))) / base_log2
    low = max(_ZERO, np.float32(np.floor(c_fast)))
    high = min(np.float32(n_rot - 1), np.float32(np.ceil(c_slow)))
    return low, high


@njit(cache=True, nogil=True, inline="always")
def _rope_cs(theta, i, ff_i, freq_scale, ext_factor, low, high, attn_factor, mscale_yarn):
    """rope_yarn() for pair i, given the running theta (= p * theta_scale^i in float32)."""
    theta_extrap = theta / ff_i
    theta_interp = freq_scale * theta_extrap
    th = theta_interp
    ms = attn_factor
    if ext_factor != _ZERO:
        y = (np.float32(i) - low) / max(_EPS_RAMP, high - low)
        ramp = _ONE - min(_ONE, max(_ZERO, y))
        ramp_mix = ramp * ext_factor
        th = theta_interp * (_ONE - ramp_mix) + theta_extrap * ramp_mix
        ms = mscale_yarn
    return np.cos(th) * ms, np.sin(th) * ms


@njit(cache=True, nogil=True, inline="always")
def _rope_consts(n_rot, freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow, n_ctx_orig):
    theta_scale = np.power(np.float32(freq_base), np.float32(-2.0) / np.float32(n_rot))  # powf
    low, high = rope_corr_dims(n_rot, n_ctx_orig, freq_base, beta_fast, beta_slow)
    fs = np.float32(freq_scale)
    af = np.float32(attn_factor)
    mscale_yarn = af * (_ONE + _TENTH * np.log(_ONE / fs))
    return theta_scale, low, high, fs, np.float32(ext_factor), af, mscale_yarn


@njit(cache=True, nogil=True, parallel=True)
def rope_cache(pos, n_rot, freq_base, freq_scale, freq_factors, ext_factor, attn_factor,
               beta_fast, beta_slow, n_ctx_orig, cos_out, sin_out):
    """cos/sin table of ggml_rope_cache_init for each position: theta starts at (float)p and is multiplied by
    powf(base, -2/n_rot) once per pair in float32; cos/sin include the YaRN/attn_factor mscale.
    Compute once per forward and base, reuse for Q, K and every layer with `rope_apply`."""
    # pos (T,) int, freq_factors (n_rot//2,) f32 (ones if absent), cos_out/sin_out (T, n_rot//2)
    T = pos.shape[0]
    half = n_rot // 2
    theta_scale, low, high, fs, ef, af, msy = _rope_consts(n_rot, freq_base, freq_scale, ext_factor,
                                                          attn_factor, beta_fast, beta_slow, n_ctx_orig)
    for t in prange(T):  # T * n_rot/2 cos/sin pairs: cheap, and computed once per forward
        theta = np.float32(pos[t])
        for i in range(half):
            c, s = _rope_cs(theta, i, freq_factors[i], fs, ef, low, high, af, msy)
            cos_out[t, i] = c
            sin_out[t, i] = s
            theta = theta * theta_scale


@njit(cache=True, nogil=True, inline="always")
def _rotate(x, t, h, i, n_rot, neox, c, s):
    if neox:
        a = i
        b = i + n_rot // 2
    else:
        a = 2 * i
        b = 2 * i + 1
    x0 = x[t, h, a]
    x1 = x[t, h, b]
    x[t, h, a] = x0 * c - x1 * s
    x[t, h, b] = x0 * s + x1 * c


@njit(cache=True, nogil=True, parallel=True)
def rope_apply(x, cos, sin, n_rot, neox):
    """Rotate the first n_rot dims of every head in place; dims >= n_rot are untouched.
    NORM (neox=False): pairs (2i, 2i+1). NEOX (neox=True): pairs (i, i + n_rot/2)."""
    # x (T, H, hd), cos/sin (T, n_rot//2) from rope_cache
    T, H, hd = x.shape
    half = n_rot // 2
    if T * H < 64:
        for t in range(T):
            for h in range(H):
                for i in range(half):
                    _rotate(x, t, h, i, n_rot, neox, cos[t, i], sin[t, i])
        return
    for th in prange(T * H):
        t = th // H
        h = th - t * H
        for i in range(half):
            _rotate(x, t, h, i, n_rot, neox, cos[t, i], sin[t, i])


@njit(cache=True, nogil=True, inline="always")
def _rope_row(x, t, p, half, n_rot, neox, freq_factors, theta_scale, low, high, fs, ef, af, msy):
    H = x.shape[1]
    theta = np.float32(p)
    for i in range(half):
        c, s = _rope_cs(theta, i, freq_factors[i], fs, ef, low, high, af, msy)
        for h in range(H):
            _rotate(x, t, h, i, n_rot, neox, c, s)
        theta = theta * theta_scale


@njit(cache=True, nogil=True, parallel=True)
def rope(x, pos, n_rot, freq_base, freq_scale, neox, freq_factors, ext_factor, attn_factor,
         beta_fast, beta_slow, n_ctx_orig):
    """ggml_rope_ext on float32, in place (same numbers as rope_cache + rope_apply, without a table)."""
    # x (T, H, hd), pos (T,) int, freq_factors (n_rot//2,) f32 (ones if absent)
    T, H, hd = x.shape
    half = n_rot // 2
    theta_scale, low, high, fs, ef, af, msy = _rope_consts(n_rot, freq_base, freq_scale, ext_factor,
                                                          attn_factor, beta_fast, beta_slow, n_ctx_orig)
    if T * H * half < _PAR_MIN:
        for t in range(T):
            _rope_row(x, t, pos[t], half, n_rot, neox, freq_factors, theta_scale, low, high, fs, ef, af, msy)
        return
    for t in prange(T):
        _rope_row(x, t, pos[t], half, n_rot, neox, freq_factors, theta_scale, low, high, fs, ef, af, msy)


# ----------------------------------------------------------------------------------------------------
# softmax and activations
# ----------------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _softmax_row(x, out, r, n):
    m = _NEG_INF
    for i in range(n):
        v = x[r, i]
        if v > m:
            m = v
    if m == _NEG_INF:  # fully masked row: zeros (llama.cpp asserts instead)
        for i in range(n):
            out[r, i] = _ZERO
        return
    s = 0.0  # ggml_float
    for i in range(n):
        e = np.exp(x[r, i] - m)
        out[r, i] = e
        s += np.float64(e)
    inv = np.float32(1.0 / s)
    for i in range(n):
        out[r, i] = out[r, i] * inv


@njit(cache=True, nogil=True, parallel=True)
def softmax_rows(x, out):
    """Row softmax: max-subtracted expf in float32, sum in float64, scale by (float)(1/sum). out may be x.
    A row that is all -inf gives zeros."""
    # x (R, n), out (R, n)
    R, n = x.shape
    if R * n < _PAR_MIN:
        for r in range(R):
            _softmax_row(x, out, r, n)
        return
    for r in prange(R):
        _softmax_row(x, out, r, n)


_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471787393093  # 0x1.62e42fe000000p-1: 28 significant bits, so k*_LN2_HI is exact for |k| < 2^25
_LN2_LO = 1.8206359985041462e-09  # log(2) - _LN2_HI
_EXP_C = (1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
          1.0 / 3628800, 1.0 / 39916800)


@njit(cache=True, nogil=True, inline="always")
def _expf(x):
    """float32 expf computed in float64 and rounded once: x = k*ln2 + r (|r| <= ln2/2), exp(r) by its degree-11
    Taylor polynomial (relative error < 1e-14), times 2^k. So the result is the correctly rounded expf except
    within ~1e-14 of a rounding tie (like glibc's expf, which is also evaluated in double). Branch-free and
    call-free, so loops over it vectorize (libm's expf does not). Overflow -> inf, underflow -> 0, nan -> nan."""
    xc = x if x > np.float32(-160.0) else np.float32(-160.0)  # exp < 2^-230: rounds to 0 (nan: fixed below)
    xc = xc if xc < np.float32(100.0) else np.float32(100.0)  # exp > 2^144: rounds to inf
    xd = np.float64(xc)
    kd = np.rint(xd * _LOG2E)
    r = (xd - kd * _LN2_HI) - kd * _LN2_LO
    p = _EXP_C[11]
    p = p * r + _EXP_C[10]
    p = p * r + _EXP_C[9]
    p = p * r + _EXP_C[8]
    p = p * r + _EXP_C[7]
    p = p * r + _EXP_C[6]
    p = p * r + _EXP_C[5]
    p = p * r + _EXP_C[4]
    p = p * r + _EXP_C[3]
    p = p * r + _EXP_C[2]
    p = p * r + _EXP_C[1]
    p = p * r + _EXP_C[0]
    scale = np.int64((np.int64(kd) + 1023) << 52)
    y = np.float32(p * _i64_f64(scale))
    return y if x == x else x


@intrinsic
def _i64_f64(typingctx, i):
    """int64 bit pattern -> float64."""
    if i != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _llir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _fdiv(typingctx, a, b):
    """a / b for float32, IEEE (no ZeroDivisionError check, whose branch would stop loops from vectorizing)."""
    if a != types.float32 or b != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.fdiv(args[0], args[1])
    return types.float32(types.float32, types.float32), codegen


@njit(cache=True, nogil=True, inline="always")
def _silu1(g):
    return _fdiv(g, _ONE + _expf(-g))


@njit(cache=True, nogil=True, inline="always")
def _sigmoid1(g):
    return _fdiv(_ONE, _ONE + _expf(-g))


@njit(cache=True, nogil=True, inline="always")
def _gelu1(g):
    if g <= -_TEN:
        return _ZERO
    if g >= _TEN:
        return g
    return GELU_F16_TABLE[f16_bits(g)]


@njit(cache=True, nogil=True, inline="always")
def _map1(x, out, f):
    """out = f(x) elementwise over flat C-contiguous arrays: one thread below _PAR_MIN values, else _BLOCK-sized
    blocks in parallel (the per-element function is the same either way)."""
    g = x.reshape(x.size)
    o = out.reshape(out.size)
    n = g.size
    if n < _PAR_MIN:
        for i in range(n):
            o[i] = f(g[i])
        return
    nb = (n + _BLOCK - 1) // _BLOCK
    for b in prange(nb):
        a0 = b * _BLOCK
        a1 = min(n, a0 + _BLOCK)
        ob = o[a0:a1]  # slices from 0: no negative-index check, so the loop vectorizes
        gb = g[a0:a1]
        for i in range(a1 - a0):
            ob[i] = f(gb[i])


@njit(cache=True, nogil=True, inline="always")
def _map2(x, y, out, f):
    """out = f(x) * y elementwise (see _map1)."""
    g = x.reshape(x.size)
    u = y.reshape(y.size)
    o = out.reshape(out.size)
    n = g.size
    if n < _PAR_MIN:
        for i in range(n):
            o[i] = f(g[i]) * u[i]
        return
    nb = (n + _BLOCK - 1) // _BLOCK
    for b in prange(nb):
        a0 = b * _BLOCK
        a1 = min(n, a0 + _BLOCK)
        ob = o[a0:a1]
        gb = g[a0:a1]
        ub = u[a0:a1]
        for i in range(a1 - a0):
            ob[i] = f(gb[i]) * ub[i]


@njit(cache=True, nogil=True, parallel=True)
def swiglu(gate, up, out):
    """out = silu(gate) * up, silu(g) = g/(1+expf(-g)). out may alias gate or up."""
    # gate, up, out: one shape, C-contiguous, e.g. (T, n_ff)
    _map2(gate, up, out, _silu1)


@njit(cache=True, nogil=True, parallel=True)
def geglu_tanh(gate, up, out):
    """out = gelu_tanh(gate) * up the way ggml_vec_geglu_f32 does it (GGML_GELU_FP16): gate <= -10 -> 0,
    gate >= 10 -> gate*up, else fp16 table[fp16(gate)] * up. out may alias gate or up."""
    # gate, up, out: one shape, C-contiguous, e.g. (T, n_ff)
    _map2(gate, up, out, _gelu1)


@njit(cache=True, nogil=True, parallel=True)
def gelu_tanh(x, out):
    """ggml_vec_gelu_f32 (fp16 table, same thresholds as geglu_tanh). out may be x."""
    _map1(x, out, _gelu1)


@njit(cache=True, nogil=True, parallel=True)
def silu(x, out):
    """out = x/(1+expf(-x)). out may be x."""
    _map1(x, out, _silu1)


@njit(cache=True, nogil=True, parallel=True)
def sigmoid(x, out):
    """out = 1/(1+expf(-x)). out may be x."""
    _map1(x, out, _sigmoid1)


# ----------------------------------------------------------------------------------------------------
# KV cache and attention
# ----------------------------------------------------------------------------------------------------

# The default KV cache element type: fp16 bit patterns in uint16 arrays (llama.cpp's F16 cache, half the memory of
# float32). A model whose options say kv_type 'f32' (llamba.options) allocates float32 arrays holding the same
# fp16-rounded values instead. The kernels take either (same numbers): the cache arrays passed in decide.
KV_DTYPE = np.uint16


@intrinsic
def _h2f(typingctx, h):
    """fp16 bits (uint16) -> float32, exact (F16C where the CPU has it)."""
    if h != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return _h2f_ir(builder, args[0])
    return types.float32(h), codegen


def kv_load(x):
    """A KV cache element as float32 (uint16: fp16 bits; float32: itself)."""
    raise NotImplementedError  # compiled only (see the overload)


def kv_enc(x, cache):
    """float32 x rounded to fp16, encoded for the cache array's dtype (uint16 bits or a float32 value)."""
    raise NotImplementedError


@overload(kv_load)
def _kv_load_ov(x):
    if x == types.uint16:
        return lambda x: _h2f(x)
    if x == types.float32:
        return lambda x: x
    return None


@overload(kv_enc)
def _kv_enc_ov(x, cache):
    if cache.dtype == types.uint16:
        return lambda x, cache: np.uint16(f16_bits(x))
    if cache.dtype == types.float32:
        return lambda x, cache: f16_round(x)
    return None


@njit(cache=True, nogil=True)
def store_kv_slots(k, v, k_cache, v_cache, slots):
    """Write row t of k/v into cache slot slots[t], rounded to fp16 like llama.cpp's F16 cache: as fp16 bits into
    uint16 caches (KV_DTYPE), or as fp16-rounded float32 values into float32 caches. k and v may have different
    head dims. A slot is a position of a sequence's block table (llamba.kv_cache): slot = block * bs + offset."""
    # k (T, Hkv, dk), v (T, Hkv, dv), k_cache (Hkv, n_slots, dk), v_cache (Hkv, n_slots, dv), slots (T,) int
    T, H, dk = k.shape
    dv = v.shape[2]
    for g in range(H):
        for t in range(T):
            s = slots[t]
            for d in range(dk):
                k_cache[g, s, d] = kv_enc(k[t, g, d], k_cache)
            for d in range(dv):
                v_cache[g, s, d] = kv_enc(v[t, g, d], v_cache)


def store_kv(k, v, k_cache, v_cache, pos0):
    """store_kv_slots into positions pos0 .. pos0+T-1 of one contiguous cache (Hkv, n_ctx, d)."""
    store_kv_slots(k, v, k_cache, v_cache, np.arange(pos0, pos0 + k.shape[0], dtype=np.int64))


_LANES = 16


@intrinsic
def dot16(typingctx, a, a_off, b, b_off, n):
    """float32 dot product of a[a_off : a_off+n] and b[b_off : b_off+n] (flat element offsets into
    C-contiguous float32 arrays of any rank) in a fixed order: 16-element chunk c is multiplied lane-wise and
    added to accumulator c % 2 (two <16 x float> vectors, two dependency chains); then acc0 + acc1; then
    the fixed tree ((l0+l8)+(l4+l12))+((l2+l10)+(l6+l14)) + the odd lanes alike; the n % 16 tail, summed in
    order, is added last. The same numbers as
    `dot16_scalar`, just vectorized (Numba's loop vectorizer cannot do this without reassociation, and
    its SLP vectorizer is off)."""
    if not (isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C"):
        return None
    if not (isinstance(b, types.Array) and b.dtype in (types.float32, types.uint16) and b.layout == "C"):
        return None
    b_half = b.dtype == types.uint16  # b holds fp16 bits (a KV cache): converted exactly to float32 on load
    for i in (a_off, b_off, n):
        if not isinstance(i, types.Integer):
            return None

    def codegen(context, builder, sig, args):
        aty, aoty, bty, boty, nty = sig.args
        av, ao, bv, bo, nv = args
        i32 = _llir.IntType(32)
        i64 = _llir.IntType(64)
        f32 = _llir.FloatType()
        vty = _llir.VectorType(f32, _LANES)
        ao = context.cast(builder, ao, aoty, types.int64)
        bo = context.cast(builder, bo, boty, types.int64)
        nv = context.cast(builder, nv, nty, types.int64)
        pa = builder.gep(context.make_array(aty)(context, builder, av).data, [ao])
        pb = builder.gep(context.make_array(bty)(context, builder, bv).data, [bo])
        hvty = _llir.VectorType(_llir.IntType(16), _LANES)

        def load_b(p, vector):
            if not b_half:
                return builder.load(builder.bitcast(p, vty.as_pointer()), align=4) if vector else builder.load(p)
            if vector:
                return _h2f_ir(builder, builder.load(builder.bitcast(p, hvty.as_pointer()), align=2))
            return _h2f_ir(builder, builder.load(p))
        nch = builder.sdiv(nv, _llir.Constant(i64, _LANES))
        npair = builder.sdiv(nch, _llir.Constant(i64, 2))
        zero = _llir.Constant(vty, None)
        acc0 = cgutils.alloca_once_value(builder, zero)
        acc1 = cgutils.alloca_once_value(builder, zero)

        def chunk(off):
            va = builder.load(builder.bitcast(builder.gep(pa, [off]), vty.as_pointer()), align=4)
            vb = load_b(builder.gep(pb, [off]), True)
            return builder.fmul(va, vb)

        with cgutils.for_range(builder, npair) as loop:  # chunks 2i -> acc0, 2i+1 -> acc1
            off = builder.mul(loop.index, _llir.Constant(i64, 2 * _LANES))
            builder.store(builder.fadd(builder.load(acc0), chunk(off)), acc0)
            off1 = builder.add(off, _llir.Constant(i64, _LANES))
            builder.store(builder.fadd(builder.load(acc1), chunk(off1)), acc1)
        odd = builder.icmp_signed("!=", builder.mul(npair, _llir.Constant(i64, 2)), nch)
        with builder.if_then(odd):  # a last even chunk goes to acc0
            off = builder.mul(npair, _llir.Constant(i64, 2 * _LANES))
            builder.store(builder.fadd(builder.load(acc0), chunk(off)), acc0)
        v = builder.fadd(builder.load(acc0), builder.load(acc1))
        for w in (8, 4, 2):  # lane l (+) lane l+w
            lo = builder.shuffle_vector(v, v, _llir.Constant(_llir.VectorType(i32, w), list(range(w))))
            hi = builder.shuffle_vector(v, v, _llir.Constant(_llir.VectorType(i32, w), list(range(w, 2 * w))))
            v = builder.fadd(lo, hi)
        res = builder.fadd(builder.extract_element(v, _llir.Constant(i32, 0)),
                           builder.extract_element(v, _llir.Constant(i32, 1)))
        r = cgutils.alloca_once_value(builder, _llir.Constant(f32, 0.0))
        start = builder.mul(nch, _llir.Constant(i64, _LANES))
        with cgutils.for_range(builder, builder.sub(nv, start)) as loop:
            k = builder.add(start, loop.index)
            x = builder.fmul(builder.load(builder.gep(pa, [k])), load_b(builder.gep(pb, [k]), False))
            builder.store(builder.fadd(builder.load(r), x), r)
        return builder.fadd(res, builder.load(r))
    return types.float32(a, a_off, b, b_off, n), codegen


@njit(cache=True, nogil=True)
def dot16_scalar(a, b):
    """Scalar statement of dot16's summation order (for tests)."""  # a (n,), b (n,) f32
    n = a.shape[0]
    s = np.zeros((2, _LANES), np.float32)
    nch = n // _LANES
    for c in range(nch):
        for l in range(_LANES):
            s[c % 2, l] += a[c * _LANES + l] * b[c * _LANES + l]
    r = _ZERO
    for d in range(nch * _LANES, n):
        r += a[d] * b[d]
    v = np.empty(_LANES, np.float32)
    for l in range(_LANES):
        v[l] = s[0, l] + s[1, l]
    x = ((v[0] + v[8]) + (v[4] + v[12])) + ((v[2] + v[10]) + (v[6] + v[14]))
    y = ((v[1] + v[9]) + (v[5] + v[13])) + ((v[3] + v[11]) + (v[7] + v[15]))
    return (x + y) + r


@njit(cache=True, nogil=True, inline="always")
def _slot(tab, bs, j):
    """Cache slot of position j of a sequence with block table tab (blocks of bs slots)."""
    b = j // bs
    return np.int64(tab[b]) * bs + (j - b * bs)


@njit(cache=True, nogil=True)
def _attn_row(q, kc, vc, t, h, g, p, n_kv, tab, bs, scale, n_swa, qh, pb, acc, out, softcap):
    """One (query row, head): two-pass softmax over the visible keys of kv head g, the keys of position j read
    from slot _slot(tab, bs, j). softcap > 0: each score becomes softcap * tanh(score) (with scale already
    divided by softcap, as ggml does)."""
    dk = q.shape[2]
    dv = vc.shape[2]
    S = kc.shape[1]
    hi = min(p + 1, n_kv)
    lo = 0
    if n_swa > 0:
        lo = max(0, p - n_swa + 1)
    n = hi - lo
    if n <= 0:
        for d in range(dv):
            out[t, h, d] = _ZERO
        return
    for d in range(dk):
        qh[d] = f16_round(q[t, h, d])
    m = _NEG_INF
    j = lo
    i = 0
    while j < hi:  # one run of contiguous slots per block
        blk = j // bs
        off = j - blk * bs
        seg = min(hi - j, bs - off)
        kbase = (g * S + np.int64(tab[blk]) * bs + off) * dk
        for u in range(seg):
            s = dot16(qh, 0, kc, kbase + u * dk, dk) * scale
            if softcap > 0:
                s = softcap * np.tanh(s)
            pb[i + u] = s
            if s > m:
                m = s
        i += seg
        j += seg
    pe = pb[:n]  # from 0: the exp loop vectorizes (_expf); the float64 sum then runs in order
    for j in range(n):
        pe[j] = _expf(pe[j] - m)
    tot = 0.0  # float64
    for j in range(n):
        tot += np.float64(pe[j])
    for d in range(dv):
        acc[d] = _ZERO
    # acc += p_j * v_j for j in order; four keys per pass over acc (same arithmetic as one at a time)
    j = 0
    while j + 4 <= n:
        p0 = pb[j]
        p1 = pb[j + 1]
        p2 = pb[j + 2]
        p3 = pb[j + 3]
        s0 = _slot(tab, bs, lo + j)
        s1 = _slot(tab, bs, lo + j + 1)
        s2 = _slot(tab, bs, lo + j + 2)
        s3 = _slot(tab, bs, lo + j + 3)
        for d in range(dv):
            a = acc[d]
            a += p0 * kv_load(vc[g, s0, d])
            a += p1 * kv_load(vc[g, s1, d])
            a += p2 * kv_load(vc[g, s2, d])
            a += p3 * kv_load(vc[g, s3, d])
            acc[d] = a
        j += 4
    while j < n:
        pj = pb[j]
        sj = _slot(tab, bs, lo + j)
        for d in range(dv):
            acc[d] += pj * kv_load(vc[g, sj, d])
        j += 1
    inv = np.float32(1.0 / tot)
    for d in range(dv):
        out[t, h, d] = acc[d] * inv


@njit(cache=True, nogil=True, parallel=True)
def attention_paged(q, k_cache, v_cache, q_pos, q_seq, tables, bs, n_kv, scale, n_swa, out, softcap=0.0):
    """Causal (optionally sliding-window) grouped-query attention of the rows of several sequences over one
    paged KV cache.

    Row t belongs to sequence q_seq[t], whose position j (0 <= j < n_kv[q_seq[t]]) is cached in slot
    tables[q_seq[t], j // bs] * bs + j % bs. Key j is visible to row t iff j <= q_pos[t] and (n_swa == 0 or
    q_pos[t] - j < n_swa). Query head h reads kv head h // (Hq // Hkv). o = softmax(scale * q·k_j) @ V; with
    softcap > 0 (gemma2's attention logit soft-capping) the scores are softcap * tanh(scale * q·k_j / softcap),
    computed as ggml's flash attention does: (float)(scale / softcap) times q·k, tanhf, times softcap. Left out,
    softcap is a compile-time 0 and costs nothing.

    Numerics (two-pass softmax per row): Q rounded to fp16 (the cache already holds fp16 values, see
    store_kv_slots); q·k in float32 (`dot16`: fixed partial sums, then a fixed tree) times scale; expf against
    the row max; their sum in float64; Σ p·v accumulated in float32 in key order, then scaled by (float)(1/sum).
    The block layout changes where a key is read from, never the order of the arithmetic: a contiguous cache is
    the one-block case (tables [[0]], bs = n_ctx) with the same numbers. llama.cpp's CPU flash attention differs
    slightly: its one-row path keeps an online softmax and accumulates Σ p·v in an fp16 vector (VKQ16), so it is
    a little *less* accurate than this; its tiled prefill path keeps Q in float32 instead of rounding it.

    Row-exact: each (t, h) row is computed by the same code from its own q row, q_pos[t] and its sequence's
    cache, so a row's output is bit-identical whether it is computed alone, in a batch of T rows, or next to
    rows of other sequences, and for any thread count (batch invariance). Parallel over work items of one head
    and every n-th row (n = max(1, min(T, 64 // Hq))). Each item allocates its own scratch (dk + dv + n_kv
    floats), the one allocation in this module.
    """
    # q (T, Hq, dk), k_cache (Hkv, n_slots, dk) C-contiguous, v_cache (Hkv, n_slots, dv), q_pos (T,) int,
    # q_seq (T,) int, tables (n_seq, max_blocks) int32, n_kv (n_seq,) int, out (T, Hq, dv)
    T, Hq, dk = q.shape
    Hkv = k_cache.shape[0]
    dv = v_cache.shape[2]
    grp = Hq // Hkv
    if T == 0 or Hq == 0:
        return
    nmax = 1
    for s in range(n_kv.shape[0]):
        nmax = max(nmax, np.int64(n_kv[s]))
    cap = np.float32(softcap)
    sc = np.float32(np.float32(scale) / cap) if softcap > 0 else np.float32(scale)
    if T * Hq * nmax <= _ATTN_SERIAL:  # small decode steps: skip the thread start-up
        qh = np.empty(dk, np.float32)
        pb = np.empty(nmax, np.float32)
        acc = np.empty(dv, np.float32)
        for h in range(Hq):
            for t in range(T):
                sq = q_seq[t]
                _attn_row(q, k_cache, v_cache, t, h, h // grp, np.int64(q_pos[t]), np.int64(n_kv[sq]),
                          tables[sq], bs, sc, n_swa, qh, pb, acc, out, cap)
        return
    n_tc = max(1, min(T, _ATTN_CHUNKS // Hq))
    for it in prange(Hq * n_tc):
        h = it // n_tc
        tc = it - h * n_tc
        qh = np.empty(dk, np.float32)
        pb = np.empty(nmax, np.float32)
        acc = np.empty(dv, np.float32)
        for t in range(tc, T, n_tc):
            sq = q_seq[t]
            _attn_row(q, k_cache, v_cache, t, h, h // grp, np.int64(q_pos[t]), np.int64(n_kv[sq]),
                      tables[sq], bs, sc, n_swa, qh, pb, acc, out, cap)


def attention(q, k_cache, v_cache, q_pos, n_kv, scale, n_swa, out, softcap=0.0):
    """attention_paged for the rows of one sequence over a contiguous cache (Hkv, n_ctx, d): key j at position
    j (0 <= j < n_kv). See attention_paged for the visibility rule and the numerics."""
    T = q.shape[0]
    tables = np.zeros((1, 1), dtype=np.int32)
    args = (q, k_cache, v_cache, np.asarray(q_pos, dtype=np.int64), np.zeros(T, dtype=np.int64), tables,
            max(1, int(k_cache.shape[1])), np.array([n_kv], dtype=np.int64), scale, n_swa, out)
    if softcap > 0:
        attention_paged(*args, softcap)
    else:
        attention_paged(*args)