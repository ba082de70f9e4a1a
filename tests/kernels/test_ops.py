"""llamba.kernels.ops (Numba) against its numpy twins in llamba.kernels.ref.ops, plus numpy float32
emulations of llama.cpp's operation order where the kernel is meant to match it bit for bit."""
import numba
import numpy as np
import pytest
from numba import njit

from llamba.kernels import ops
from llamba.kernels.ref import ops as ref

f32 = np.float32


def rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------
# fp16 rounding
# ------------------------------------------------------------------------------------------------

@njit(cache=True)
def _f16_bits_array(x, out):
    for i in range(x.size):
        out[i] = ops.f16_bits(x[i])


def _edge_values():
    e = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.996, 65520.0, 65536.0, 1e9, 2.0 ** -14, 2.0 ** -24, 2.0 ** -25,
         1.5 * 2.0 ** -25, 2.0 ** -26, 3 * 2.0 ** -25, 5 * 2.0 ** -25, 2.0 ** -14 - 2.0 ** -25, 1.0 + 2.0 ** -11,
         1.0 + 3 * 2.0 ** -11, 2049.0, 2051.0, np.inf, -np.inf, 1e-30, 6.1e-5, 6.0e-5]
    e = np.array(e, np.float32)
    return np.concatenate([e, -e])


def test_f16_round_matches_numpy():
    bits = rng(1).integers(0, 2 ** 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits.view(np.float32), _edge_values()])
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        want16 = x.astype(np.float16)
    out = np.empty_like(x)
    ops.round_f16(x, out)
    np.testing.assert_array_equal(out.view(np.uint32), want16.astype(np.float32).view(np.uint32))
    hb = np.empty(x.size, np.int64)
    _f16_bits_array(x, hb)
    np.testing.assert_array_equal(hb, want16.view(np.uint16).astype(np.int64))
    nan_out = np.empty(1, np.float32)
    ops.round_f16(np.array([np.nan], np.float32), nan_out)
    assert np.isnan(nan_out[0])


def test_store_kv_rounds_and_writes_only_its_rows():
    r = rng(2)
    T, H, dk, dv, n_ctx, pos0 = 3, 2, 16, 8, 10, 4
    k = r.standard_normal((T, H, dk)).astype(f32) * 100
    v = r.standard_normal((T, H, dv)).astype(f32)
    kc = np.full((H, n_ctx, dk), 7.0, f32)
    vc = np.full((H, n_ctx, dv), 7.0, f32)
    ops.store_kv(k, v, kc, vc, pos0)
    np.testing.assert_array_equal(kc[:, pos0:pos0 + T], ref.round_f16(k).transpose(1, 0, 2))
    np.testing.assert_array_equal(vc[:, pos0:pos0 + T], ref.round_f16(v).transpose(1, 0, 2))
    assert (kc[:, :pos0] == 7).all() and (kc[:, pos0 + T:] == 7).all() and (vc[:, pos0 + T:] == 7).all()


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------

def _rms_llamacpp(x, w, eps):
    """ggml_rms_norm + ggml_mul in numpy float32: f32 squares summed in order in f64, mean and scale in f32."""
    out = np.empty_like(x)
    for r_ in range(x.shape[0]):
        s = np.cumsum((x[r_] * x[r_]).astype(np.float64))[-1]
        mean = f32(s / x.shape[1])
        scale = f32(1.0) / np.sqrt(mean + f32(eps))
        out[r_] = (x[r_] * scale) * w if w is not None else x[r_] * scale
    return out


@pytest.mark.parametrize("R,n", [(1, 576), (7, 2048), (40, 1024), (3 * 4, 64)])
def test_rms_norm(R, n):
    r = rng(3)
    x = (r.standard_normal((R, n)) * r.uniform(0.01, 30, size=(R, 1))).astype(f32)
    w = r.standard_normal(n).astype(f32)
    out = np.empty_like(x)
    ops.rms_norm(x, w, 1e-6, out)
    np.testing.assert_allclose(out, ref.rms_norm(x, w, 1e-6), rtol=1e-6, atol=1e-6 * np.abs(out).max())
    np.testing.assert_array_equal(out, _rms_llamacpp(x, w, 1e-6))  # llama.cpp's order, bit for bit
    y = x.copy()
    ops.rms_norm(y, w, 1e-6, y)  # in place
    np.testing.assert_array_equal(y, out)


def test_rms_norm_per_head_reshape():
    r = rng(4)
    T, H, hd = 5, 4, 256
    q = r.standard_normal((T, H, hd)).astype(f32)
    w = r.standard_normal(hd).astype(f32)
    out = np.empty_like(q)
    ops.rms_norm(q.reshape(T * H, hd), w, 1e-6, out.reshape(T * H, hd))
    want = ref.rms_norm(q.reshape(T * H, hd), w, 1e-6).reshape(T, H, hd)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------

ROPE_DEFAULT = dict(freq_scale=1.0, ext_factor=0.0, attn_factor=1.0, beta_fast=32.0, beta_slow=1.0, n_ctx_orig=0)


def _rope_kernel(x, pos, n_rot, base, neox, ff=None, **kw):
    p = {**ROPE_DEFAULT, **kw}
    y = x.copy()
    if ff is None:
        ff = np.ones(n_rot // 2, f32)
    ops.rope(y, pos, n_rot, base, p["freq_scale"], neox, ff, p["ext_factor"], p["attn_factor"],
             p["beta_fast"], p["beta_slow"], p["n_ctx_orig"])
    return y


def _rope_ref(x, pos, n_rot, base, neox, ff=None, **kw):
    p = {**ROPE_DEFAULT, **kw}
    return ref.rope(x, pos, n_rot, base, p["freq_scale"], neox, ff, p["ext_factor"], p["attn_factor"],
                    p["beta_fast"], p["beta_slow"], p["n_ctx_orig"])


def _rope_tol(x, pos):
    # float32 theta ~ p carries a relative rounding error of a few 2^-24 (iterated products too), so the
    # absolute angle error grows like p * 1e-7; |x| scales it.
    return (2.5e-7 * (float(np.max(pos)) + 1) + 2e-6) * float(np.abs(x).max())


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("hd,n_rot", [(64, 64), (128, 128), (256, 256), (128, 64), (80, 32)])
def test_rope_vs_float64_twin(neox, hd, n_rot):
    r = rng(5)
    T, H = 9, 3
    x = r.standard_normal((T, H, hd)).astype(f32)
    pos = np.array([0, 1, 2, 7, 100, 511, 1000, 2047, 4095], np.int32)
    got = _rope_kernel(x, pos, n_rot, 10000.0, neox)
    want = _rope_ref(x, pos, n_rot, 10000.0, neox)
    np.testing.assert_allclose(got, want, rtol=0, atol=_rope_tol(x, pos))
    np.testing.assert_array_equal(got[..., n_rot:], x[..., n_rot:])  # partial rotary: the rest untouched
    # small positions are tight
    np.testing.assert_allclose(got[:3], want[:3], rtol=0, atol=2e-6 * np.abs(x).max())


def _rope_ggml_f32(x, pos, n_rot, base, neox, ff, freq_scale=1.0, ext_factor=0.0, attn_factor=1.0,
                   beta_fast=32.0, beta_slow=1.0, n_ctx_orig=0):
    """ggml_rope_cache_init + rotate_pairs in numpy float32 scalars (numpy's cosf/sinf/powf)."""
    y = x.copy()
    theta_scale = f32(base) ** (f32(-2.0) / f32(n_rot))
    low, high = ops.rope_corr_dims(n_rot, n_ctx_orig, base, beta_fast, beta_slow)
    fs, ef, af = f32(freq_scale), f32(ext_factor), f32(attn_factor)
    for t, p in enumerate(pos):
        theta = f32(p)
        for i in range(n_rot // 2):
            te = theta / ff[i]
            ti = fs * te
            th, ms = ti, af
            if ef != 0:
                ramp = f32(1) - min(f32(1), max(f32(0), (f32(i) - low) / max(f32(0.001), high - low)))
                mix = ramp * ef
                th = ti * (f32(1) - mix) + te * mix
                ms = af * (f32(1) + f32(0.1) * np.log(f32(1) / fs))
            c, s = np.cos(th) * ms, np.sin(th) * ms
            a, b = (i, i + n_rot // 2) if neox else (2 * i, 2 * i + 1)
            x0, x1 = x[t, :, a], x[t, :, b]
            y[t, :, a] = x0 * c - x1 * s
            y[t, :, b] = x0 * s + x1 * c
            theta = theta * theta_scale
    return y


@pytest.mark.parametrize("neox", [False, True])
def test_rope_matches_ggml_float32_order(neox):
    r = rng(6)
    x = r.standard_normal((6, 2, 64)).astype(f32)
    pos = np.array([0, 3, 64, 999, 3000, 4095], np.int64)
    ff = r.uniform(1.0, 8.0, 32).astype(f32)
    got = _rope_kernel(x, pos, 64, 500000.0, neox, ff)
    want = _rope_ggml_f32(x, pos, 64, 500000.0, neox, ff)
    # same float32 thetas; only cosf/sinf implementations (libm vs numpy) may differ by an ulp
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(x).max())
    np.testing.assert_allclose(got, _rope_ref(x, pos, 64, 500000.0, neox, ff), rtol=0, atol=_rope_tol(x, pos))


def test_rope_yarn_branch():
    r = rng(7)
    kw = dict(freq_scale=0.25, ext_factor=1.0, attn_factor=1.0, beta_fast=32.0, beta_slow=1.0, n_ctx_orig=4096)
    low, high = ops.rope_corr_dims(128, 4096, 10000.0, 32.0, 1.0)
    assert (float(low), float(high)) == ref.rope_corr_dims(128, 4096, 10000.0, 32.0, 1.0) == (20.0, 46.0)
    x = r.standard_normal((5, 2, 128)).astype(f32)
    pos = np.array([0, 5, 1000, 8000, 16383], np.int32)
    for neox in (False, True):
        got = _rope_kernel(x, pos, 128, 10000.0, neox, **kw)
        np.testing.assert_allclose(got, _rope_ref(x, pos, 128, 10000.0, neox, **kw), rtol=0,
                                   atol=_rope_tol(x, pos))  # low pairs extrapolate: theta ~ pos
        np.testing.assert_allclose(got, _rope_ggml_f32(x, pos, 128, 10000.0, neox, np.ones(64, f32), **kw),
                                   rtol=0, atol=2e-6 * np.abs(x).max())
        # mscale = 1 + 0.1 ln 4 scales the norm of each rotated pair
        n0 = np.linalg.norm(x[:, :, :2].astype(np.float64), axis=-1)
        n1 = np.linalg.norm(got[:, :, :2].astype(np.float64), axis=-1) if not neox else \
            np.hypot(got[:, :, 0].astype(np.float64), got[:, :, 64].astype(np.float64))
        if neox:
            n0 = np.hypot(x[:, :, 0].astype(np.float64), x[:, :, 64].astype(np.float64))
        np.testing.assert_allclose(n1, n0 * (1 + 0.1 * np.log(4.0)), rtol=1e-5)
    # linear scaling (no YaRN): freq_scale alone
    got = _rope_kernel(x, pos, 128, 1e6, True, freq_scale=0.125)
    np.testing.assert_allclose(got, _rope_ref(x, pos, 128, 1e6, True, freq_scale=0.125), rtol=0,
                               atol=_rope_tol(x, pos))


def test_rope_cache_apply_equals_rope():
    r = rng(8)
    T, hd, n_rot = 7, 96, 64
    pos = np.array([3, 4, 5, 6, 100, 101, 4000], np.int32)
    ff = r.uniform(1.0, 4.0, n_rot // 2).astype(f32)
    q = r.standard_normal((T, 8, hd)).astype(f32)
    k = r.standard_normal((T, 2, hd)).astype(f32)
    for neox in (False, True):
        cos = np.empty((T, n_rot // 2), f32)
        sin = np.empty((T, n_rot // 2), f32)
        ops.rope_cache(pos, n_rot, 10000.0, 0.5, ff, 1.0, 1.2, 32.0, 1.0, 2048, cos, sin)
        for x in (q, k):
            y = x.copy()
            ops.rope_apply(y, cos, sin, n_rot, neox)
            z = x.copy()
            ops.rope(z, pos, n_rot, 10000.0, 0.5, neox, ff, 1.0, 1.2, 32.0, 1.0, 2048)
            np.testing.assert_array_equal(y, z)
            z64 = x.copy()
            ops.rope(z64, pos.astype(np.int64), n_rot, 10000.0, 0.5, neox, ff, 1.0, 1.2, 32.0, 1.0, 2048)
            np.testing.assert_array_equal(z64, z)
    # the cache is the twin's cos/sin
    c64, s64 = ref.rope_angles(pos, n_rot, 10000.0, 0.5, ff, 1.0, 1.2, 32.0, 1.0, 2048)
    np.testing.assert_allclose(cos, c64, rtol=0, atol=_rope_tol(np.ones(1), pos) * 1.2)
    np.testing.assert_allclose(sin, s64, rtol=0, atol=_rope_tol(np.ones(1), pos) * 1.2)


def test_rope_is_row_exact():
    r = rng(9)
    x = r.standard_normal((6, 4, 64)).astype(f32)
    pos = np.arange(50, 56, dtype=np.int32)
    full = _rope_kernel(x, pos, 64, 10000.0, True)
    for t in range(6):
        one = _rope_kernel(x[t:t + 1], pos[t:t + 1], 64, 10000.0, True)
        np.testing.assert_array_equal(one[0], full[t])


# ------------------------------------------------------------------------------------------------
# softmax and activations
# ------------------------------------------------------------------------------------------------

def test_softmax_rows():
    r = rng(10)
    x = (r.standard_normal((33, 1000)) * 5).astype(f32)
    x[3, 10:] = -np.inf  # masked tail
    x[4, :] = -np.inf  # fully masked row -> zeros
    out = np.empty_like(x)
    ops.softmax_rows(x, out)
    want = ref.softmax_rows(np.where(np.isinf(x[:, :1]), 0, x))
    want[4] = 0
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-12)
    assert (out[3, 10:] == 0).all() and (out[4] == 0).all()
    np.testing.assert_allclose(out[[0, 1, 2, 3, 5]].sum(axis=1, dtype=np.float64), 1.0, rtol=1e-6)
    big = (r.standard_normal((2, 40000)) * 3).astype(f32)  # the parallel path
    ob = np.empty_like(big)
    ops.softmax_rows(big, ob)
    np.testing.assert_allclose(ob, ref.softmax_rows(big), rtol=2e-6, atol=1e-14)


def _swiglu_f32(g, u):
    """ggml_silu_f32(g) * u in float32, with a correctly rounded expf (numpy's own float32 exp is not)."""
    e = np.exp(-g.astype(np.float64)).astype(f32)
    return (g / (f32(1) + e)) * u


@pytest.mark.parametrize("shape", [(1, 2048), (7, 1536), (16, 6144)])
def test_swiglu_silu_sigmoid(shape):
    r = rng(11)
    g = (r.standard_normal(shape) * 4).astype(f32)
    u = r.standard_normal(shape).astype(f32)
    out = np.empty_like(g)
    ops.swiglu(g, u, out)
    np.testing.assert_allclose(out, ref.swiglu(g, u), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(out, _swiglu_f32(g, u), rtol=2.5e-7, atol=1e-30)  # llama.cpp's scalar formula
    ops.silu(g, out)
    np.testing.assert_allclose(out, ref.silu(g), rtol=1e-6, atol=1e-30)
    ops.sigmoid(g, out)
    np.testing.assert_allclose(out, ref.sigmoid(g), rtol=1e-6, atol=1e-30)
    y = g.copy()
    ops.swiglu(y, u, y)  # in place
    ops.swiglu(g, u, out)
    np.testing.assert_array_equal(y, out)


def _geglu_llamacpp(g, u):
    idx = g.astype(np.float16).view(np.uint16)
    gl = np.where(g <= -10, f32(0), np.where(g >= 10, g, ops.GELU_F16_TABLE[idx]))
    return (gl * u).astype(f32)


def test_gelu_table():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    ok = np.isfinite(h) & (np.abs(h) < 10)
    exact = ref.gelu_tanh(h[ok]).astype(np.float64)
    # each entry is fp16 of ggml's float32 gelu at the fp16 value x: half an fp16 ulp (2^-11 relative, 2^-25
    # for subnormals) plus the float32 cancellation in 1 + tanhf(z) for negative x (about |x| * 2^-24)
    err = np.abs(ops.GELU_F16_TABLE[ok] - exact)
    assert (err <= np.abs(exact) * 2.0 ** -11 * 1.01 + np.abs(h[ok]) * 2.0 ** -23 + 2.0 ** -25).all()
    pos = ok & (h > 0)
    assert (np.abs(ops.GELU_F16_TABLE[pos] - ref.gelu_tanh(h[pos])) <= ref.gelu_tanh(h[pos]) * 2.0 ** -11 * 1.01 +
            2.0 ** -25).all()


@pytest.mark.parametrize("shape", [(1, 2048), (5, 6912), (3, 20000)])
def test_geglu_tanh(shape):
    r = rng(12)
    g = (r.standard_normal(shape) * 4).astype(f32)
    g.ravel()[:8] = [-10, -9.999, 10, 9.999, -12, 12, 0, -0.0]
    u = r.standard_normal(shape).astype(f32)
    out = np.empty_like(g)
    ops.geglu_tanh(g, u, out)
    np.testing.assert_array_equal(out, _geglu_llamacpp(g, u))
    want = ref.geglu_tanh(g, u).astype(np.float64)
    # fp16 input rounding (2^-11 relative, |gelu'| <= 1.13) + fp16 table rounding (2^-11 of the value)
    gl = ref.gelu_tanh(g).astype(np.float64)
    bound = (1.13 * np.abs(g) + np.abs(gl)) * 2.0 ** -11 * np.abs(u) + 1e-7
    assert (np.abs(out - want) <= bound).all()
    flat_o, flat_u = out.ravel(), u.ravel()
    assert flat_o[0] == 0 and flat_o[2] == 10 * flat_u[2] and flat_o[4] == 0 and flat_o[5] == 12 * flat_u[5]
    o2 = np.empty_like(g)
    ops.gelu_tanh(g, o2)
    np.testing.assert_array_equal(o2, _geglu_llamacpp(g, np.ones_like(g)))


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------

@njit(cache=True)
def _dot16_rows(a, m, out):
    n = a.shape[0]
    for j in range(m.shape[0]):
        out[j] = ops.dot16(a, 0, m, j * n, n)


@pytest.mark.parametrize("n", [1, 7, 16, 17, 31, 32, 48, 64, 72, 80, 128, 200, 256])
def test_dot16_order(n):
    r = rng(13)
    a = r.standard_normal(n).astype(f32)
    m = r.standard_normal((50, n)).astype(f32)
    got = np.empty(50, f32)
    _dot16_rows(a, m, got)
    want = np.array([ops.dot16_scalar(a, m[j]) for j in range(50)], f32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, m.astype(np.float64) @ a, rtol=0, atol=1e-6 * np.sqrt(n) * 4)


def _cache(r, Hkv, n_ctx, n_fill, dk, dv=None):
    dv = dk if dv is None else dv
    kc = np.zeros((Hkv, n_ctx, dk), f32)
    vc = np.zeros((Hkv, n_ctx, dv), f32)
    k = r.standard_normal((n_fill, Hkv, dk)).astype(f32)
    v = r.standard_normal((n_fill, Hkv, dv)).astype(f32)
    ops.store_kv(k, v, kc, vc, 0)
    return kc, vc


def _attn(q, kc, vc, pos, n_kv, scale, n_swa):
    out = np.full((q.shape[0], q.shape[1], vc.shape[2]), np.nan, f32)
    ops.attention(q, kc, vc, np.asarray(pos), n_kv, scale, n_swa, out)
    return out


CASES = [  # T, Hq, Hkv, dk, dv, p0, n_swa
    (1, 4, 4, 64, 64, 0, 0),
    (5, 8, 2, 64, 64, 20, 0),  # GQA 4
    (7, 4, 1, 128, 128, 3, 0),  # MQA
    (16, 9, 3, 64, 64, 100, 0),
    (12, 4, 1, 256, 256, 30, 8),  # gemma3 local layer: sliding window
    (9, 6, 2, 72, 72, 50, 1),  # window of 1 (only itself), head dim with a tail
    (6, 4, 2, 64, 32, 10, 0),  # dv != dk
    (64, 2, 1, 64, 64, 0, 0),  # prefill from empty
]


@pytest.mark.parametrize("T,Hq,Hkv,dk,dv,p0,n_swa", CASES)
def test_attention_vs_twin(T, Hq, Hkv, dk, dv, p0, n_swa):
    r = rng(14)
    n_ctx = p0 + T + 5
    kc, vc = _cache(r, Hkv, n_ctx, p0 + T, dk, dv)
    q = r.standard_normal((T, Hq, dk)).astype(f32)
    pos = np.arange(p0, p0 + T, dtype=np.int32)
    scale = 1.0 / np.sqrt(dk)
    out = _attn(q, kc, vc, pos, p0 + T, scale, n_swa)
    # same fp16 rounding of Q as the kernel: only float32 accumulation differs
    want = ref.attention(q, kc, vc, pos, p0 + T, scale, n_swa, round_q=True)
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-6)
    # against exact f32 Q: the fp16 Q rounding (2^-11 relative) is the difference
    exact = ref.attention(q, kc, vc, pos, p0 + T, scale, n_swa, round_q=False)
    np.testing.assert_allclose(out, exact, rtol=0, atol=2e-3)


@pytest.mark.parametrize("T,Hq,Hkv,dk,dv,p0,n_swa", [(1, 4, 2, 64, 64, 30, 0), (40, 8, 4, 256, 256, 10, 16),
                                                    (70, 4, 2, 64, 64, 0, 0)])
def test_attention_softcap_vs_twin(T, Hq, Hkv, dk, dv, p0, n_swa):
    """gemma2's attention logit soft-capping: scores cap * tanh(scores / cap), serial and parallel paths, with a
    sliding window; large scores (q scaled up) so that the cap bites; row-exact in the batch."""
    r = rng(15)
    n_ctx = p0 + T + 5
    kc, vc = _cache(r, Hkv, n_ctx, p0 + T, dk, dv)
    q = (8 * r.standard_normal((T, Hq, dk))).astype(f32)
    pos = np.arange(p0, p0 + T, dtype=np.int32)
    scale, cap = 1.0 / np.sqrt(dk), 5.0
    out = np.full((T, Hq, dv), np.nan, f32)
    ops.attention(q, kc, vc, pos, p0 + T, scale, n_swa, out, cap)
    want = ref.attention(q, kc, vc, pos, p0 + T, scale, n_swa, round_q=True, softcap=cap)
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5)
    plain = ref.attention(q, kc, vc, pos, p0 + T, scale, n_swa, round_q=True)
    assert np.abs(plain - want).max() > 1e-2  # the cap changes the result here
    one = np.full((1, Hq, dv), np.nan, f32)
    ops.attention(q[-1:], kc, vc, pos[-1:], p0 + T, scale, n_swa, one, cap)
    assert np.array_equal(one[0], out[-1])


def test_attention_masks_explicitly():
    """Key j is visible iff j <= pos and pos - j < n_swa: perturbing an invisible key changes nothing,
    perturbing a visible one changes the row."""
    r = rng(15)
    T, Hq, Hkv, dk, n_swa, n_kv = 4, 2, 1, 16, 3, 12
    kc, vc = _cache(r, Hkv, 16, n_kv, dk)
    q = r.standard_normal((T, Hq, dk)).astype(f32)
    pos = np.array([2, 5, 9, 11], np.int32)
    base = _attn(q, kc, vc, pos, n_kv, 0.25, n_swa)
    mask = ref.attention_mask(pos, n_kv, n_swa)
    for j in range(n_kv):
        vc2 = vc.copy()
        vc2[:, j] += 1.0
        o = _attn(q, kc, vc2, pos, n_kv, 0.25, n_swa)
        for t in range(T):
            assert (not np.array_equal(o[t], base[t])) == mask[t, j], (t, j)
    # keys at or beyond n_kv are never read
    kc3, vc3 = kc.copy(), vc.copy()
    kc3[:, n_kv:] = np.nan
    vc3[:, n_kv:] = np.nan
    np.testing.assert_array_equal(_attn(q, kc3, vc3, pos, n_kv, 0.25, n_swa), base)


def test_attention_gqa_grouping():
    """Query head h reads kv head h // (Hq/Hkv): equal to MHA with the kv heads repeated."""
    r = rng(16)
    T, Hq, Hkv, dk = 3, 8, 2, 32
    kc, vc = _cache(r, Hkv, 10, 10, dk)
    q = r.standard_normal((T, Hq, dk)).astype(f32)
    pos = np.array([7, 8, 9], np.int32)
    got = _attn(q, kc, vc, pos, 10, 0.2, 0)
    rep = np.ascontiguousarray(np.repeat(kc, Hq // Hkv, axis=0)), np.ascontiguousarray(np.repeat(vc, Hq // Hkv, axis=0))
    np.testing.assert_array_equal(got, _attn(q, rep[0], rep[1], pos, 10, 0.2, 0))


def test_attention_empty_rows_are_zero():
    r = rng(17)
    kc, vc = _cache(r, 1, 8, 8, 16)
    q = r.standard_normal((2, 1, 16)).astype(f32)
    out = _attn(q, kc, vc, np.array([3, 4], np.int32), 0, 1.0, 0)  # n_kv = 0: nothing visible
    assert (out == 0).all()


@pytest.mark.parametrize("Hq,Hkv,dk,n_swa", [(9, 3, 64, 0), (4, 1, 256, 6), (8, 2, 72, 0)])
def test_attention_row_exact(Hq, Hkv, dk, n_swa):
    """A row's result is bit-identical in a batch of T = 1..6 rows or alone, and for any thread count."""
    r = rng(18)
    p0, n_ctx = 37, 64
    kc, vc = _cache(r, Hkv, n_ctx, p0 + 6, dk)
    q = r.standard_normal((6, Hq, dk)).astype(f32)
    pos = np.arange(p0, p0 + 6, dtype=np.int32)
    alone = np.stack([_attn(q[t:t + 1], kc, vc, pos[t:t + 1], int(pos[t]) + 1, 0.125, n_swa)[0]
                      for t in range(6)])
    for T in range(1, 7):
        batch = _attn(q[:T], kc, vc, pos[:T], p0 + T, 0.125, n_swa)
        np.testing.assert_array_equal(batch, alone[:T])
        # the full cache length as n_kv (rows see only j <= pos anyway)
        np.testing.assert_array_equal(_attn(q[:T], kc, vc, pos[:T], n_ctx, 0.125, n_swa), alone[:T])
    # a long batch uses every worker; rows at arbitrary positions, in any order
    perm = np.array([5, 0, 3, 1, 4, 2])
    np.testing.assert_array_equal(_attn(q[perm], kc, vc, pos[perm], p0 + 6, 0.125, n_swa), alone[perm])
    nt = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        np.testing.assert_array_equal(_attn(q, kc, vc, pos, p0 + 6, 0.125, n_swa), alone)
    finally:
        numba.set_num_threads(nt)
    # long prefill batch (many work items) vs single rows
    T = 80
    kc2, vc2 = _cache(r, Hkv, T, T, dk)
    q2 = r.standard_normal((T, Hq, dk)).astype(f32)
    pos2 = np.arange(T, dtype=np.int64)
    full = _attn(q2, kc2, vc2, pos2, T, 0.125, n_swa)
    for t in (0, 1, 17, 63, 79):
        np.testing.assert_array_equal(_attn(q2[t:t + 1], kc2, vc2, pos2[t:t + 1], t + 1, 0.125, n_swa)[0], full[t])


def test_expf_is_float64_exp_rounded_once():
    """ops._expf (the vectorizable exp of SiLU, sigmoid and the attention softmax) == exp evaluated in float64 and
    rounded to float32 (an exhaustive run over all 2^32 inputs found 2 one-ulp differences), incl. overflow,
    underflow into subnormals, +-inf and nan."""
    @njit
    def run(x, out):
        for i in range(x.size):
            out[i] = ops._expf(x[i])

    r = rng(5)
    x = np.concatenate([r.uniform(-110, 95, 1 << 20).astype(f32), r.standard_normal(1 << 16).astype(f32),
                        np.array([0, -0.0, 1e-30, -1e-30, 88.72283, 88.72284, 89, -87.33655, -103.97, -104,
                                  -149, -160, -1e4, 1e4, np.inf, -np.inf, np.nan], f32)])
    out = np.empty_like(x)
    run(x, out)
    with np.errstate(over="ignore", under="ignore"):
        ref = np.exp(x.astype(np.float64)).astype(f32)
    assert np.array_equal(out, ref, equal_nan=True)


@pytest.mark.parametrize("T,Hq,Hkv,dk,dv,n_kv,n_swa", [(1, 4, 2, 64, 64, 37, 0), (5, 8, 1, 256, 256, 100, 0),
                                                     (3, 4, 4, 80, 48, 19, 8), (1, 2, 1, 17, 9, 5, 0)])
def test_fp16_bits_kv_cache_equals_float32_cache(T, Hq, Hkv, dk, dv, n_kv, n_swa):
    """store_kv into uint16 caches (ops.KV_DTYPE: fp16 bits, llama.cpp's F16 cache) writes numpy's float16 bits of
    the values, the float32 caches hold the same values, and attention over either gives identical outputs
    (incl. head dims that are not multiples of 16, for dot16's uint16 tail)."""
    r = rng(9)
    k = (r.standard_normal((n_kv, Hkv, dk)) * 3).astype(f32)
    k[0, 0, :3] = [70000.0, -1e-8, 3e-5]  # overflow to inf is avoided in attention below: set after the check
    v = r.standard_normal((n_kv, Hkv, dv)).astype(f32)
    kc32, vc32 = np.zeros((Hkv, 128, dk), f32), np.zeros((Hkv, 128, dv), f32)
    kc16, vc16 = np.zeros((Hkv, 128, dk), np.uint16), np.zeros((Hkv, 128, dv), np.uint16)
    ops.store_kv(k, v, kc16, vc16, 0)
    with np.errstate(over="ignore"):
        assert np.array_equal(kc16[:, :n_kv], k.transpose(1, 0, 2).astype(np.float16).view(np.uint16))
    assert np.array_equal(vc16[:, :n_kv], v.transpose(1, 0, 2).astype(np.float16).view(np.uint16))
    k[0, 0, 0] = 7.0
    ops.store_kv(k, v, kc16, vc16, 0)
    ops.store_kv(k, v, kc32, vc32, 0)
    assert np.array_equal(kc16.view(np.float16).astype(f32), kc32)
    q = r.standard_normal((T, Hq, dk)).astype(f32)
    pos = np.arange(n_kv - T, n_kv)
    o32, o16 = np.empty((T, Hq, dv), f32), np.empty((T, Hq, dv), f32)
    ops.attention(q, kc32, vc32, pos, n_kv, 0.125, n_swa, o32)
    ops.attention(q, kc16, vc16, pos, n_kv, 0.125, n_swa, o16)
    assert np.array_equal(o16, o32)
