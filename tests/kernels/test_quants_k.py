"""llamba.kernels.quants_k (Numba) against its numpy twins (llamba.kernels.ref.quants_k), gguf-py's
dequantizer and float64 references: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS weights, Q8_K activations."""
import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from llamba.kernels import quants_k as K
from llamba.kernels.ref import quants_k as R
from llamba.kernels.traits import TYPES

NAMES = {10: "q2_k", 11: "q3_k", 12: "q4_k", 13: "q5_k", 14: "q6_k", 23: "iq4_xs"}
# byte offsets of the fp16 d (and dmin) fields inside one super-block
D_FIELDS = {10: (80, 82), 11: (108,), 12: (0, 2), 13: (0, 2), 14: (208,), 23: (0,)}
ALL = list(NAMES)


def rand_weight(tid, rows, ncols, seed):
    """Random super-blocks (every bit pattern of the packed fields occurs) with sane fp16 d/dmin:
    mostly |d| in [1e-3, 2e-2] of either sign, plus some zeros and fp16 subnormals.  Read-only, like the
    GGUF mmap views the engine passes."""
    rng = np.random.default_rng(seed)
    bb = TYPES[tid].block_bytes
    nb = ncols // 256
    raw = rng.integers(0, 256, size=(rows, nb, bb), dtype=np.uint8)
    for off in D_FIELDS[tid]:
        v = rng.uniform(1e-3, 2e-2, size=(rows, nb)) * rng.choice([-1.0, 1.0], size=(rows, nb))
        special = rng.random((rows, nb))
        v[special < 0.05] = 0.0
        v[(special >= 0.05) & (special < 0.1)] = 3e-6  # subnormal in fp16
        raw[:, :, off:off + 2] = v.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    raw = raw.reshape(rows, nb * bb)
    return np.frombuffer(raw.tobytes(), np.uint8).reshape(raw.shape)  # read-only


def kernel(prefix, tid):
    return getattr(K, f"{prefix}_{NAMES[tid]}")


def twin(prefix, tid):
    return getattr(R, f"{prefix}_{NAMES[tid]}")


def matmul(tid, w, act):
    out = np.empty((act[0].shape[0], w.shape[0]), np.float32)
    kernel("matmul", tid)(w, *act, out)
    return out


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------

def test_registry():
    assert set(K.KERNELS) == set(NAMES)
    for tid in NAMES:
        assert K.KERNELS[tid] == (kernel("dequant", tid), kernel("matmul", tid))
        assert TYPES[tid].vec_dot_type == "q8_K"
        assert K.BLOCK_BYTES[tid] == TYPES[tid].block_bytes
    assert K.ACT == {"q8_K": K.act_q8_K}


# ------------------------------------------------------------------------------------------------
# dequantization: bit-exact against gguf-py
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tid", ALL, ids=NAMES.get)
def test_dequant_bit_exact(tid):
    for i, (rows, ncols) in enumerate([(1, 256), (3, 512), (7, 768), (33, 256), (33, 768)]):
        w = rand_weight(tid, rows, ncols, seed=100 * tid + i)
        assert not w.flags.writeable
        ref = gguf_dequantize(w, GGMLQuantizationType(tid))
        out = np.full((rows, ncols), np.nan, np.float32)
        assert kernel("dequant", tid)(w, out) is out
        np.testing.assert_array_equal(bits(out), bits(ref))
        np.testing.assert_array_equal(bits(twin("dequant", tid)(w)), bits(ref))


@pytest.mark.parametrize("tid", ALL, ids=NAMES.get)
def test_shape_checks(tid):
    w = rand_weight(tid, 2, 512, seed=1)
    with pytest.raises(ValueError):
        kernel("dequant", tid)(w, np.empty((2, 256), np.float32))
    act = K.act_q8_K(np.ones((1, 256), np.float32))
    with pytest.raises(ValueError):
        kernel("matmul", tid)(w, *act, np.empty((1, 2), np.float32))


# ------------------------------------------------------------------------------------------------
# Q8_K activations
# ------------------------------------------------------------------------------------------------

def _act_inputs():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 1024)).astype(np.float32) * np.float32(3.0)
    x[1, 256:512] = 0.0  # all-zero block -> d = 0, q = 0
    x[2, :256] = np.abs(x[2, :256])
    x[2, 17] = -50.0  # largest |x| negative
    x[3, 512:768] = 0.0
    x[3, 600], x[3, 700] = 2.0, -2.0  # tie in |x|: the first one (positive) is xmax
    x[4, 768:] = (np.arange(256, dtype=np.float32) - 128) * np.float32(0.25)  # iscale*x hits every half
    x[4, 768] = -63.5  # first of the largest |x| -> iscale = -127/-63.5 = 2 exactly
    return x


def test_act_q8_K_matches_twin_and_llama_rules():
    x = _act_inputs()
    qs, d, bsums = K.act_q8_K(x)
    rqs, rd, rbs = R.act_q8_K(x)
    assert qs.dtype == np.int8 and d.dtype == np.float32 and bsums.dtype == np.int32
    assert qs.shape == x.shape and d.shape == (5, 4) and bsums.shape == (5, 64)
    np.testing.assert_array_equal(qs, rqs)
    np.testing.assert_array_equal(bits(d), bits(rd))
    np.testing.assert_array_equal(bsums, rbs)
    np.testing.assert_array_equal(bsums, qs.reshape(5, 64, 16).astype(np.int32).sum(-1))
    assert qs.min() >= -127 and qs.max() <= 127
    assert d[1, 1] == 0 and not qs[1, 256:512].any()
    assert d[2, 0] > 0 and qs[2, 17] == -127  # d = xmax/-127 keeps the sign trick: q(xmax) = -127
    assert d[3, 2] < 0 and qs[3, 600] == -127 and qs[3, 700] == 127
    # iscale = 2: iscale*x = k/2 exactly, so half of them are ties -> round half to even
    assert d[4, 3] == np.float32(0.5)
    assert {0.25, 0.75, -1.25} <= set(x[4, 768:].tolist())  # 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    np.testing.assert_array_equal(qs[4, 768:], np.rint(np.float64(2.0) * x[4, 768:]).astype(np.int8))


def test_act_q8_K_roundtrip_bound():
    """|x - d*q| <= |d|/2 * (1 + 1e-4): half a quantization step, plus float32 rounding of iscale*x,
    1/iscale and d*q (each <= 2^-24 relative of values <= 127|d|)."""
    x = np.random.default_rng(3).standard_normal((4, 2048)).astype(np.float32)
    x[0] *= np.float32(1e-20)
    x[1] *= np.float32(1e20)
    qs, d, _ = K.act_q8_K(x)
    xq = qs.astype(np.float64).reshape(4, 8, 256) * d.astype(np.float64)[..., None]
    err = np.abs(x.astype(np.float64).reshape(4, 8, 256) - xq)
    assert np.all(err <= 0.5 * np.abs(d.astype(np.float64))[..., None] * (1 + 1e-4))


def test_act_q8_K_parallel_path_row_independent():
    """Large inputs take the parallel path; every row must equal its single-row quantization."""
    x = np.random.default_rng(4).standard_normal((70, 1024)).astype(np.float32)
    assert x.size >= K._ACT_PARALLEL_MIN
    qs, d, bsums = K.act_q8_K(x)
    for t in (0, 33, 69):
        q1, d1, b1 = K.act_q8_K(x[t:t + 1])
        np.testing.assert_array_equal(qs[t:t + 1], q1)
        np.testing.assert_array_equal(bits(d[t:t + 1]), bits(d1))
        np.testing.assert_array_equal(bsums[t:t + 1], b1)
    rqs, rd, _ = R.act_q8_K(x[:8])
    np.testing.assert_array_equal(qs[:8], rqs)
    np.testing.assert_array_equal(bits(d[:8]), bits(rd))


# ------------------------------------------------------------------------------------------------
# quantized matmul
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tid", ALL, ids=NAMES.get)
@pytest.mark.parametrize("rows,ncols,T", [(1, 256, 1), (3, 512, 4), (37, 768, 3)])
def test_matmul_matches_twin_exactly(tid, rows, ncols, T):
    """Integer parts are exact and the float32 operations (and their order) are the same as the
    twin's, so the tolerance is zero: bit-identical outputs."""
    w = rand_weight(tid, rows, ncols, seed=tid * 7 + rows)
    x = np.random.default_rng(rows + T).standard_normal((T, ncols)).astype(np.float32)
    act = K.act_q8_K(x)
    out = matmul(tid, w, act)
    ref = twin("matmul", tid)(w, *act)
    np.testing.assert_array_equal(bits(out), bits(ref))


@pytest.mark.parametrize("tid", ALL, ids=NAMES.get)
def test_matmul_vs_float64_dequant(tid):
    """Against float64 ``dequant(W) @ x``.

    1. With the quantized activations xq = d_a*q: only float32 rounding separates the kernel from the
       exact value (the block integer sums are exact); each of the ~nb+4 roundings is <= 2^-24 relative
       of M = sum_j (|W_j| + |dmin*min_j|) * |xq_j|, which bounds every partial term (for types with
       mins d*scale*q = W + dmin*min).  Tolerance 1e-5 * M (> 20x the bound for nb <= 4).
    2. With the exact activations: additionally |x_j - xq_j| <= |d_a|/2 (1 + 1e-4) (see the act
       round-trip test), so |W.x - W.xq| <= sum_j |W_j| |d_a(j)| / 2 (1 + 1e-4).
    """
    rows, ncols, T = 29, 1024, 3
    w = rand_weight(tid, rows, ncols, seed=11 * tid)
    x = np.random.default_rng(tid).standard_normal((T, ncols)).astype(np.float32)
    act = K.act_q8_K(x)
    qs, d, _ = act
    out = matmul(tid, w, act).astype(np.float64)

    W = twin("dequant", tid)(w).astype(np.float64)
    u = getattr(R, f"_unpack_{NAMES[tid]}")(w)
    mterm = np.zeros_like(W)
    if u["mn"] is not None:
        mterm = np.repeat(np.abs(u["dmin"][..., None] * u["mn"]), 16, axis=-1).reshape(rows, ncols)
    da = np.repeat(d.astype(np.float64), 256, axis=1)  # (T, ncols) activation scale per element
    xq = qs.astype(np.float64) * da
    M = (np.abs(W) + mterm) @ np.abs(xq).T  # (rows, T)

    err_q = np.abs(out - (W @ xq.T).T)
    assert np.all(err_q <= 1e-5 * M.T)

    act_bound = 0.5 * (1 + 1e-4) * (np.abs(W) @ np.abs(da).T).T
    err_x = np.abs(out - (W @ x.astype(np.float64).T).T)
    assert np.all(err_x <= act_bound + 1e-5 * M.T)
    # the bound is meaningful: a few percent of sum |W||x| at most
    assert np.all(act_bound <= 0.05 * (np.abs(W) @ np.abs(x.astype(np.float64)).T).T)


@pytest.mark.parametrize("tid", ALL, ids=NAMES.get)
def test_matmul_row_exact(tid):
    """out[t] is bit-identical whatever T is (speculative decoding relies on it)."""
    rows, ncols = 23, 512
    w = rand_weight(tid, rows, ncols, seed=3 * tid)
    x = np.random.default_rng(99).standard_normal((9, ncols)).astype(np.float32)
    full = matmul(tid, w, K.act_q8_K(x))
    for T in range(1, 10):
        np.testing.assert_array_equal(bits(matmul(tid, w, K.act_q8_K(x[:T]))), bits(full[:T]))
    for t in range(9):
        np.testing.assert_array_equal(bits(matmul(tid, w, K.act_q8_K(x[t:t + 1]))), bits(full[t:t + 1]))


def test_matmul_thread_count_independent():
    tid = 12
    w = rand_weight(tid, 101, 768, seed=5)
    act = K.act_q8_K(np.random.default_rng(5).standard_normal((3, 768)).astype(np.float32))
    n0 = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = matmul(tid, w, act)
        numba.set_num_threads(n0)
        many = matmul(tid, w, act)
    finally:
        numba.set_num_threads(n0)
    np.testing.assert_array_equal(bits(one), bits(many))


def test_matmul_zero_activation_and_empty():
    tid = 14
    w = rand_weight(tid, 5, 512, seed=8)
    act = K.act_q8_K(np.zeros((2, 512), np.float32))
    assert not matmul(tid, w, act).any()
    act0 = K.act_q8_K(np.zeros((0, 512), np.float32))
    assert matmul(tid, w, act0).shape == (0, 5)
