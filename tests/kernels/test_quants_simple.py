"""Block-32 and plain float tensor types: Numba kernels vs numpy twins vs gguf-py.

* dequantization: Numba == twin == ``gguf.quants.dequantize``, bit for bit (NaN/inf/subnormal scales too);
* activation quantizers: Numba == twin bit for bit, plus a stated round-trip error bound;
* matmul: Numba == twin bit for bit (both reproduce llama.cpp's operation order: exact integer block
  sums, then float32 ``acc += (d_w*d_a)*isum [+ m_w*s_a]`` blocks in order), and within a derived
  bound of the float64 product ``dequant(W) @ x``;
* row-exactness: every row of a batch equals the same row computed alone (T = 1..9), bitwise.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf.quants import dequantize as gguf_dequantize

import llamba.kernels.quants_simple as K
import llamba.kernels.ref.quants_simple as R
from llamba.kernels.traits import TYPES

# name -> (type id, block bytes, gguf type, offsets of the fp16 fields (d [, m]))
QUANT = {
    "q4_0": (2, 18, G.Q4_0, (0,)),
    "q4_1": (3, 20, G.Q4_1, (0, 2)),
    "q5_0": (6, 22, G.Q5_0, (0,)),
    "q5_1": (7, 24, G.Q5_1, (0, 2)),
    "q8_0": (8, 34, G.Q8_0, (0,)),
    "iq4_nl": (20, 18, G.IQ4_NL, (0,)),
}
FLOAT = {"f32": 0, "f16": 1, "bf16": 30}
ALL = list(QUANT) + list(FLOAT)
ROWS = (1, 3, 7, 33)


def _readonly(a):
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def quant_weights(name, rows, nb, rng, wild=False):
    """Random raw blocks (rows, nb*block_bytes); fp16 scales from a sane range unless ``wild``
    (then the scale bytes stay random: NaN, inf, subnormals and huge values all occur)."""
    _, bb, _, fields = QUANT[name]
    raw = rng.integers(0, 256, (rows, nb, bb), dtype=np.uint8)
    if not wild:
        for off in fields:
            v = rng.uniform(-0.1, 0.1, (rows, nb)).astype(np.float16)
            raw[:, :, off:off + 2] = v.view(np.uint8).reshape(rows, nb, 2)
    return _readonly(raw.reshape(rows, nb * bb))


def float_weights(name, rows, n, rng):
    w = rng.standard_normal((rows, n)).astype(np.float32)
    if name == "f16":
        return _readonly(w.astype(np.float16))
    if name == "bf16":
        return _readonly((w.view(np.uint32) >> 16).astype(np.uint16))
    return _readonly(w)


def activations(T, n, rng):
    x = rng.standard_normal((T, n)).astype(np.float32)
    x *= np.exp(rng.uniform(-4, 4, (T, n // 32, 1))).astype(np.float32).repeat(32, axis=2).reshape(T, -1) \
        if n % 32 == 0 else np.float32(1)
    if n % 32 == 0 and n >= 64:
        x[0, 32:64] = 0.0                       # an all-zero block: d = 0, id = 0
    return np.ascontiguousarray(x)


def vec_dot(name):
    tid = QUANT[name][0] if name in QUANT else FLOAT[name]
    return TYPES[tid].vec_dot_type


def kernels(name):
    tid = QUANT[name][0] if name in QUANT else FLOAT[name]
    return K.KERNELS[tid]


def bits_equal(a, b):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ------------------------------------------------------------------ registries

def test_registries_cover_the_types_and_their_vec_dot_types():
    assert set(K.KERNELS) == {0, 1, 30, 2, 3, 6, 7, 8, 20}
    assert set(K.ACT) == {"q8_0", "q8_1", "f32", "f16", "bf16"}
    for tid in K.KERNELS:
        assert TYPES[tid].vec_dot_type in K.ACT
        assert TYPES[tid].block_bytes == K.BLOCK_BYTES.get(tid, TYPES[tid].block_bytes)


# ------------------------------------------------------------------ dequantization

@pytest.mark.parametrize("name", list(QUANT))
@pytest.mark.parametrize("rows", ROWS)
def test_dequant_quant_exact(name, rows):
    rng = np.random.default_rng(rows * 100 + QUANT[name][0])
    tid, _, gtype, _ = QUANT[name]
    for nb in (1, 3, 8):
        for wild in (False, True):
            raw = quant_weights(name, rows, nb, rng, wild=wild)
            with np.errstate(all="ignore"):   # inf*0 and friends in the wild-scale case
                ref = gguf_dequantize(raw, gtype).reshape(rows, nb * 32)
                twin = getattr(R, f"dequant_{name}")(raw)
            out = np.empty((rows, nb * 32), np.float32)
            kernels(name)[0](raw, out)
            assert bits_equal(twin, ref), (name, nb, wild)
            assert bits_equal(out, ref), (name, nb, wild)


def test_dequant_float_types_exact():
    every_half = np.arange(65536, dtype=np.uint16).reshape(256, 256)     # all fp16 / bf16 bit patterns
    out = np.empty((256, 256), np.float32)
    K.dequant_f16(_readonly(every_half.view(np.float16)), out)
    ref = gguf_dequantize(every_half.view(np.uint8), G.F16).reshape(256, 256)
    assert bits_equal(out, ref) and bits_equal(R.dequant_f16(every_half), ref)
    K.dequant_bf16(_readonly(every_half), out)
    ref = gguf_dequantize(every_half.view(np.uint8), G.BF16).reshape(256, 256)
    assert bits_equal(out, ref) and bits_equal(R.dequant_bf16(every_half), ref)
    w = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    out = np.empty_like(w)
    K.dequant_f32(_readonly(w), out)
    assert bits_equal(out, gguf_dequantize(w.view(np.uint8), G.F32).reshape(3, 40))


# ------------------------------------------------------------------ activation quantizers

def _act_cases(rng):
    x = activations(5, 256, rng)
    x[1, :32] = np.arange(32, dtype=np.float32) - 15.5        # amax 15.5
    x[1, 32:64] = 0.0
    x[1, 64] = 127.0                                           # id = 1: x*id = x, ties go to even
    x[1, 65:96] = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5] * 3
                           + [126.5, -126.5, 4.5, 5.5, 6.5, 7.5, 8.5], np.float32)
    x[2, :32] = np.float32(1e-30) * np.arange(32)              # tiny inputs (d is an fp16 subnormal/zero)
    x[3, :32] = np.float32(6e4) * rng.standard_normal(32)      # fp16-overflowing magnitudes in f16/bf16 rounding
    return x


@pytest.mark.parametrize("kind", ["q8_0", "q8_1"])
def test_act_q8_exact_and_bounded(kind):
    rng = np.random.default_rng(7)
    x = _act_cases(rng)
    got = K.ACT[kind](x)
    want = getattr(R, f"act_{kind}")(x)
    assert len(got) == len(want) == (2 if kind == "q8_0" else 3)
    assert got[0].dtype == np.int8 and got[0].shape == x.shape
    for g, w in zip(got, want):
        assert np.array_equal(g, w) and g.dtype == w.dtype
    qs, d = got[0], got[1]
    assert bits_equal(d, d.astype(np.float16).astype(np.float32))   # d is an fp16 value
    # round trip: |q*d16 - x| <= d/2 (rounding) + 127*|d16 - d| (fp16 scale) <= amax*(0.5 + 127*2^-11)/127
    amax = np.abs(x.reshape(x.shape[0], -1, 32)).max(-1)
    err = np.abs(qs.reshape(amax.shape + (32,)) * d[..., None] - x.reshape(amax.shape + (32,))).max(-1)
    normal = amax > 1e-3                                              # fp16 subnormal d loses relative precision
    assert np.all(err[normal] <= amax[normal] * 0.0045)
    assert np.all(qs[1, 65:72] == [0, 2, 2, 0, -2, -2, 4])            # round half to even, like _mm256_round_ps
    if kind == "q8_1":
        s = got[2]
        d32 = amax / np.float32(127)                                  # s = fp16(d_unrounded * sum(q))
        want_s = (d32 * qs.reshape(amax.shape + (32,)).astype(np.int32).sum(-1).astype(np.float32))
        with np.errstate(over="ignore"):  # |s| beyond the fp16 range is inf, as in ggml
            assert bits_equal(s, want_s.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16"])
def test_act_float_exact(kind):
    rng = np.random.default_rng(3)
    x = _act_cases(rng)[:, :250].copy()
    x[4, :8] = [np.inf, -np.inf, np.nan, 0.0, -0.0, 65519.0, 65520.0, 1e-8]
    x[4, 8:12] = np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00000001], np.uint32).view(np.float32)  # bf16 ties
    (got,) = K.ACT[kind](x)
    (want,) = getattr(R, f"act_{kind}")(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert bits_equal(got[~nan], want[~nan])
    fin = np.isfinite(x) & (np.abs(x) < 6e4) & (np.abs(x) > 1e-4)
    rel = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8}[kind]
    assert np.all(np.abs(got[fin] - x[fin]) <= rel * np.abs(x[fin]))


# ------------------------------------------------------------------ matmul

def _run_matmul(name, w, x):
    act = K.ACT[vec_dot(name)](x)
    out = np.full((x.shape[0], w.shape[0]), np.nan, np.float32)
    res = kernels(name)[1](w, *act, out)
    assert res is None or res is out
    return out, act


@pytest.mark.parametrize("name", list(QUANT))
def test_matmul_quant_matches_twin_exactly(name):
    rng = np.random.default_rng(QUANT[name][0])
    for rows in ROWS:
        for nb in (1, 4, 5, 11):          # nb % 4 != 0 exercises the single-block tail
            w = quant_weights(name, rows, nb, rng)
            for T in (1, 3):              # T == 1 reads packed blocks directly, T > 1 unpacks once
                x = activations(T, nb * 32, rng)
                out, _ = _run_matmul(name, w, x)
                twin = getattr(R, f"matmul_{name}")(w, *getattr(R, f"act_{vec_dot(name)}")(x))
                assert bits_equal(out, twin), (name, rows, nb, T)


@pytest.mark.parametrize("name", list(FLOAT))
def test_matmul_float_matches_twin_exactly(name):
    rng = np.random.default_rng(FLOAT[name])
    for rows in ROWS:
        for n in (1, 31, 32, 77, 160):    # lane tail (n % 32) and no full chunk at all
            w = float_weights(name, rows, n, rng)
            x = activations(3, n, rng)
            out, _ = _run_matmul(name, w, x)
            twin = getattr(R, f"matmul_{name}")(w, *getattr(R, f"act_{name}")(x))
            assert bits_equal(out, twin), (name, rows, n)


def _unpacked(name, w):
    q, d, m = getattr(R, f"unpack_{name}")(w)
    return q.astype(np.float64), d.astype(np.float64), None if m is None else m.astype(np.float64)


@pytest.mark.parametrize("name", list(QUANT))
def test_matmul_quant_vs_float_reference(name):
    """|out - dequant(W) @ x| within the activation-quantization bound.

    Per activation block with amax A: |q*d16 - x| <= A*(0.5 + 127*2^-11)/127 <= 0.0045*A, so the
    weight part errs by at most sum_j |W_j| * 0.0045*A_b(j).  For Q4_1/Q5_1 the kernel uses
    m_w*s16 with s16 = fp16(d*sum q) in place of m_w*d16*sum q: at most |m_w|*2^-10*32*A_b more.
    Float32 accumulation adds < 1e-5 of the sum of |terms| (nb <= 64 additions)."""
    rng = np.random.default_rng(11)
    rows, nb, T = 33, 64, 4
    w = quant_weights(name, rows, nb, rng)
    x = activations(T, nb * 32, rng)
    out, act = _run_matmul(name, w, x)
    wf = gguf_dequantize(w, QUANT[name][2]).reshape(rows, -1).astype(np.float64)
    ref = x.astype(np.float64) @ wf.T
    amax = np.abs(x.reshape(T, nb, 32)).max(-1).astype(np.float64)                  # (T, nb)
    absw_blocks = np.abs(wf).reshape(rows, nb, 32).sum(-1)                          # (rows, nb)
    bound = 0.0045 * amax @ absw_blocks.T
    _, _, m = _unpacked(name, w)
    if m is not None:
        bound += 2.0 ** -10 * 32 * amax @ np.abs(m).T
    bound += 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(wf).T) + 1e-30
    assert np.all(np.abs(out - ref) <= bound), np.max(np.abs(out - ref) / bound)
    # the typical error (random signs) is far below that worst case: ~0.3-1% relative, as in llama.cpp
    assert np.linalg.norm(out - ref) <= 1e-2 * np.linalg.norm(ref)


@pytest.mark.parametrize("name", list(FLOAT))
def test_matmul_float_vs_float_reference(name):
    """F32: only float32 rounding (< n*2^-24 of sum |w*x|); F16 / BF16 activations are rounded to
    2^-11 / 2^-8 relative first (llama.cpp converts them to the weight's type)."""
    rng = np.random.default_rng(5)
    rows, n, T = 33, 999, 3
    w = float_weights(name, rows, n, rng)
    x = rng.standard_normal((T, n)).astype(np.float32)
    out, _ = _run_matmul(name, w, x)
    wf = getattr(R, f"dequant_{name}")(w).astype(np.float64)
    mag = np.abs(x).astype(np.float64) @ np.abs(wf).T
    rel = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8}[name] + n * 2.0 ** -24
    assert np.all(np.abs(out - x.astype(np.float64) @ wf.T) <= rel * mag)


@pytest.mark.parametrize("name", ALL)
def test_row_exactness(name):
    """Row t of a T-row batch is bit-identical to computing x[t] alone, for every T in 1..9."""
    rng = np.random.default_rng(17)
    rows, n = 7, 9 * 32
    w = quant_weights(name, rows, n // 32, rng) if name in QUANT else float_weights(name, rows, n, rng)
    x = activations(9, n, rng)
    full, _ = _run_matmul(name, w, x)
    for T in range(1, 10):
        part, _ = _run_matmul(name, w, x[:T])
        assert bits_equal(part, full[:T]), (name, T)
    for t in range(9):
        single, _ = _run_matmul(name, w, x[t:t + 1])
        assert bits_equal(single[0], full[t]), (name, t)


def test_matmul_threads_do_not_change_results():
    import numba
    rng = np.random.default_rng(23)
    w = quant_weights("q4_1", 37, 6, rng)
    x = activations(2, 6 * 32, rng)
    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one, _ = _run_matmul("q4_1", w, x)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many, _ = _run_matmul("q4_1", w, x)
    finally:
        numba.set_num_threads(prev)
    assert bits_equal(one, many)


def test_software_fp16_rounding_matches_numpy():
    """The bitwise float32 -> fp16 rounding used on CPUs without hardware half conversion (and the
    hardware one in use here) both agree with numpy on a wide sample of bit patterns."""
    from numba import njit

    @njit(cache=True)
    def round_all(x, out_sw, out_hw):
        for i in range(x.shape[0]):
            out_sw[i] = K._round_f16_sw(x[i])
            out_hw[i] = K._round_f16(x[i])

    rng = np.random.default_rng(29)
    bits = np.concatenate([
        rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32),
        rng.integers(0x33000000, 0x47800000, 200_000, dtype=np.uint64).astype(np.uint32),   # fp16 range
        np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x477FEFFF, 0x477FF000,
                  0x33000000, 0x33000001, 0x387FC000, 0x387FE000, 0x38800000, 0x3F801000, 0x3F803000],
                 np.uint32)])
    x = bits.view(np.float32)
    sw, hw = np.empty_like(x), np.empty_like(x)
    round_all(x, sw, hw)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    nan = np.isnan(want)
    for got in (sw, hw):
        assert np.array_equal(np.isnan(got), nan)
        assert bits_equal(got[~nan], want[~nan])


# ------------------------------------------------------------------ repacked Q8_0 (Q8_0P)

def _repack_twin(w):
    """numpy: the packed layout of quants_simple.repack_q8_0 (rows padded to 8 by repeating the last)."""
    rows = w.shape[0]
    nb = w.shape[1] // 34
    G = (rows + 7) // 8
    idx = np.minimum(np.arange(G * 8), rows - 1)
    blk = w.reshape(rows, nb, 34)[idx].reshape(G, 8, nb, 34)
    u = (blk[..., 2:] ^ 0x80).view(np.uint32)                        # (G, 8 rows k, nb, 8 dwords s)
    v = u.transpose(0, 2, 3, 1).copy().view(np.uint8).reshape(G, nb * 256)   # (G, nb, s, k): dword k of vector s
    d = blk[..., :2].transpose(0, 2, 1, 3).reshape(G, nb * 16)       # (G, nb, 8 rows, 2 bytes)
    return np.concatenate([v, d], axis=1)


@pytest.mark.parametrize("rows", (1, 3, 7, 8, 13, 33, 64))
def test_repack_q8_0_layout(rows):
    rng = np.random.default_rng(rows)
    for nb in (1, 4, 5):
        w = quant_weights("q8_0", rows, nb, rng, wild=True)
        wp = K.repack_q8_0(w)
        assert wp.shape == ((rows + 7) // 8, nb * 272) and not wp.flags.writeable
        assert wp.ctypes.data % 64 == 0
        assert np.array_equal(wp, _repack_twin(w)), (rows, nb)


@pytest.mark.parametrize("rows", (1, 3, 7, 8, 13, 33))
def test_matmul_repacked_q8_0_matches_raw_and_twin(rows):
    """Repacked Q8_0: bit-identical to the raw kernels and the numpy twin for T = 1..9 (decode, verify, prefill
    tiles with a 1..3-row tail) and row counts that are not a multiple of 8."""
    rng = np.random.default_rng(100 + rows)
    for nb in (1, 4, 5, 11):
        w = quant_weights("q8_0", rows, nb, rng)
        wp = K.repack_q8_0(w)
        x = activations(9, nb * 32, rng)
        for T in range(1, 10):
            qs, d = K.act_q8_0(x[:T])
            raw = np.full((T, rows), np.nan, np.float32)
            K.matmul_q8_0(w, qs, d, raw)
            got = np.full((T, rows), np.nan, np.float32)
            assert K.matmul_q8_0p(wp, qs, d, got) is got
            assert bits_equal(got, raw), (rows, nb, T)
            assert bits_equal(got, R.matmul_q8_0(w, *R.act_q8_0(x[:T]))), (rows, nb, T)


def test_matmul_repacked_q8_0_wild_scales_and_threads():
    """NaN/inf/subnormal fp16 scales survive the repack (fp16 kept, widened exactly in registers); thread count
    does not change results."""
    import numba
    rng = np.random.default_rng(41)
    w = quant_weights("q8_0", 61, 7, rng, wild=True)
    wp = K.repack_q8_0(w)
    x = activations(5, 7 * 32, rng)
    qs, d = K.act_q8_0(x)
    raw = np.empty((5, 61), np.float32)
    K.matmul_q8_0(w, qs, d, raw)
    prev = numba.get_num_threads()
    try:
        for nt in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(nt)
            got = np.empty((5, 61), np.float32)
            K.matmul_q8_0p(wp, qs, d, got)
            assert bits_equal(got, raw), nt
    finally:
        numba.set_num_threads(prev)


def test_matmul_repacked_q8_0_rejects_mismatched_shapes():
    rng = np.random.default_rng(2)
    wp = K.repack_q8_0(quant_weights("q8_0", 9, 2, rng))
    qs, d = K.act_q8_0(activations(1, 64, rng))
    with pytest.raises(ValueError):
        K.matmul_q8_0p(wp, qs, d, np.empty((1, 17), np.float32))  # 17 rows need 3 groups, wp has 2
    with pytest.raises(ValueError):
        K.repack_q8_0(quant_weights("q4_0", 9, 2, rng))
