"""Gated DeltaNet kernels (llamba.kernels.deltanet) against their numpy twins and against each other.

Optional: with LLAMBA_GGML_LIBDIR pointing at a directory holding libggml-base.so and libggml-cpu.so
(e.g. llama-cpp-python's llama_cpp/lib), the last tests run the same inputs through llama.cpp's own ops.
"""
from __future__ import annotations

import ctypes
import os

import numba
import numpy as np
import pytest

from llamba.kernels import deltanet as nb
from llamba.kernels.ref import deltanet as ref

f32 = np.float32


def _unit(rng, shape):
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(f32)


def _inputs(T, Hk, Hv, S, seed=0, strong_decay=False):
    """Realistic GDN inputs: unit q/k, beta in (0,1), g <= 0, a nonzero starting state."""
    rng = np.random.default_rng(seed)
    q, k = _unit(rng, (T, Hk, S)), _unit(rng, (T, Hk, S))
    v = rng.standard_normal((T, Hv, S)).astype(f32)
    hi = 4.0 if strong_decay else 1.0
    g = (-rng.uniform(0.0, hi, (T, Hv)) * rng.uniform(0.0, 1.0, (T, Hv))).astype(f32)
    beta = rng.uniform(0.05, 1.0, (T, Hv)).astype(f32)
    st = (0.1 * rng.standard_normal((Hv, S, S))).astype(f32)
    return q, k, v, g, beta, st


def _no_snap(Hv, S):
    return np.empty((0, Hv, S, S), f32)


def _run(fn, q, k, v, g, beta, st, snaps=None):
    st = st.copy()
    out = np.full(v.shape, np.nan, f32)
    fn(q, k, v, g, beta, st, out, _no_snap(v.shape[1], v.shape[2]) if snaps is None else snaps)
    return out, st


def _rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


# ---------------------------------------------------------------- conv1d_silu

def _conv_inputs(T, C=40, D=4, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((T, C)).astype(f32), rng.standard_normal((C, D - 1)).astype(f32),
            (0.5 * rng.standard_normal((C, D))).astype(f32))


def test_conv1d_silu_matches_twin():
    m, cs, w = _conv_inputs(9)
    C, D = w.shape
    outs, states, snaps = [], [], []
    for fn in (nb.conv1d_silu, ref.conv1d_silu):
        s, o, sn = cs.copy(), np.empty_like(m), np.zeros((9, C, D - 1), f32)
        fn(m, s, w, o, sn)
        outs.append(o), states.append(s), snaps.append(sn)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(states[0], states[1])  # copies, no arithmetic
    np.testing.assert_array_equal(snaps[0], snaps[1])
    np.testing.assert_array_equal(states[0], m[-(D - 1):].T)


def test_conv1d_silu_state_carry_3_plus_5_equals_8():
    m, cs, w = _conv_inputs(8)
    C, D = w.shape
    no = np.empty((0, C, D - 1), f32)
    s8, o8 = cs.copy(), np.empty_like(m)
    nb.conv1d_silu(m, s8, w, o8, no)
    s, o3, o5 = cs.copy(), np.empty((3, C), f32), np.empty((5, C), f32)
    nb.conv1d_silu(m[:3], s, w, o3, no)
    nb.conv1d_silu(m[3:], s, w, o5, no)
    np.testing.assert_array_equal(np.concatenate([o3, o5]), o8)
    np.testing.assert_array_equal(s, s8)


def test_conv1d_silu_short_batch_keeps_old_columns():
    m, cs, w = _conv_inputs(2, D=5)  # T < D-1: the new state still holds two old columns
    s, o = cs.copy(), np.empty_like(m)
    nb.conv1d_silu(m, s, w, o, np.empty((0, w.shape[0], 4), f32))
    np.testing.assert_array_equal(s, np.concatenate([cs[:, 2:], m.T], axis=1))


def test_conv1d_silu_snapshots_equal_prefix_states():
    m, cs, w = _conv_inputs(4)
    C, D = w.shape
    snaps = np.full((6, C, D - 1), -7.0, f32)  # more planes than tokens: planes 4, 5 stay untouched
    nb.conv1d_silu(m, cs.copy(), w, np.empty_like(m), snaps)
    for t in range(4):
        s = cs.copy()
        nb.conv1d_silu(m[:t + 1], s, w, np.empty((t + 1, C), f32), np.empty((0, C, D - 1), f32))
        np.testing.assert_array_equal(snaps[t], s)
    assert (snaps[4:] == -7.0).all()


# ---------------------------------------------------------------- l2 norm, gated norm, gates

def test_l2_norm_heads_matches_twin_and_eps_floor():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3, 64)).astype(f32)
    x[0, 0] = 0.0          # zero head stays zero
    x[1, 1] *= 1e-9        # norm below eps: divided by eps, not renormalized to 1
    o1, o2 = np.empty_like(x), np.empty_like(x)
    nb.l2_norm_heads(x, 1e-6, o1)
    ref.l2_norm_heads(x, 1e-6, o2)
    np.testing.assert_allclose(o1, o2, rtol=1e-6, atol=1e-12)
    assert (o1[0, 0] == 0).all()
    np.testing.assert_allclose(o1[1, 1], x[1, 1] / f32(1e-6), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(o1[2:], axis=-1), 1.0, rtol=1e-6)
    nb.l2_norm_heads(x, 1e-6, x)  # in place
    np.testing.assert_array_equal(x, o1)


def test_gated_rms_norm_matches_twin():
    rng = np.random.default_rng(3)
    o = rng.standard_normal((6, 4, 64)).astype(f32)
    z = (3 * rng.standard_normal((6, 4, 64))).astype(f32)
    w = rng.standard_normal(64).astype(f32)
    y1, y2 = np.empty_like(o), np.empty_like(o)
    nb.gated_rms_norm(o, z, w, 1e-6, y1)
    ref.gated_rms_norm(o, z, w, 1e-6, y2)
    np.testing.assert_allclose(y1, y2, rtol=2e-6, atol=1e-6)


def test_gdn_gates_matches_twin():
    rng = np.random.default_rng(4)
    T, H = 7, 5
    alpha = (8 * rng.standard_normal((T, H))).astype(f32)
    beta_raw = (4 * rng.standard_normal((T, H))).astype(f32)
    dt = rng.standard_normal(H).astype(f32)
    alpha[0] = np.array([25.0, 19.5, -30.0, 0.0, 20.5], f32) - dt  # both softplus branches
    a = (-np.exp(rng.standard_normal(H))).astype(f32)
    g1, b1, g2, b2 = (np.empty((T, H), f32) for _ in range(4))
    nb.gdn_gates(alpha, beta_raw, dt, a, g1, b1)
    ref.gdn_gates(alpha, beta_raw, dt, a, g2, b2)
    # log(1 + e^x) in float32 (as ggml) is off by up to an ulp of 1.0 where e^x is tiny: absolute tolerance
    np.testing.assert_allclose(g1, g2, rtol=2e-6, atol=2e-7 * np.abs(a).max())
    np.testing.assert_allclose(b1, b2, rtol=2e-6, atol=1e-12)
    assert g1[0, 0] == (alpha[0, 0] + dt[0]) * a[0] and (g1 <= 0).all()


# ---------------------------------------------------------------- gated delta rule (token loop)

def test_gated_delta_rule_matches_twin():
    args = _inputs(T=21, Hk=2, Hv=4, S=32)
    o1, s1 = _run(nb.gated_delta_rule, *args)
    o2, s2 = _run(ref.gated_delta_rule, *args)
    assert _rel(o1, o2) < 1e-5 and _rel(s1, s2) < 1e-5


def test_gated_delta_rule_tiled_head_mapping():
    """Value head j reads key head j % Hk: equal to repeating q/k tiled, not grouped (j // (Hv/Hk))."""
    q, k, v, g, beta, st = _inputs(T=6, Hk=2, Hv=4, S=16, seed=5)
    tiled = np.array([0, 1, 0, 1])
    grouped = np.array([0, 0, 1, 1])
    o, s = _run(nb.gated_delta_rule, q, k, v, g, beta, st)
    ot, stt = _run(ref.gated_delta_rule, q[:, tiled], k[:, tiled], v, g, beta, st)
    og, _ = _run(ref.gated_delta_rule, q[:, grouped], k[:, grouped], v, g, beta, st)
    assert _rel(o, ot) < 1e-5 and _rel(s, stt) < 1e-5
    assert _rel(o[:, 1:3], og[:, 1:3]) > 1e-2  # heads 1 and 2 are where the two mappings differ


def test_gated_delta_rule_one_token_calls_equal_batch_bitwise():
    q, k, v, g, beta, st0 = _inputs(T=9, Hk=2, Hv=4, S=64, seed=6)
    ob, sb = _run(nb.gated_delta_rule, q, k, v, g, beta, st0)
    st, o1 = st0.copy(), np.empty_like(v)
    for t in range(9):
        out = np.empty((1,) + v.shape[1:], f32)
        nb.gated_delta_rule(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1], beta[t:t + 1], st, out,
                            _no_snap(4, 64))
        o1[t] = out[0]
    np.testing.assert_array_equal(o1, ob)
    np.testing.assert_array_equal(st, sb)


def test_gated_delta_rule_snapshots_equal_prefix_states():
    q, k, v, g, beta, st0 = _inputs(T=4, Hk=2, Hv=4, S=32, seed=7)
    snaps = np.full((6, 4, 32, 32), -7.0, f32)
    _, s_end = _run(nb.gated_delta_rule, q, k, v, g, beta, st0, snaps)
    for t in range(4):
        _, s_t = _run(nb.gated_delta_rule, q[:t + 1], k[:t + 1], v[:t + 1], g[:t + 1], beta[:t + 1], st0)
        np.testing.assert_array_equal(snaps[t], s_t)
    np.testing.assert_array_equal(snaps[3], s_end)
    assert (snaps[4:] == -7.0).all()
    few = np.zeros((2, 4, 32, 32), f32)  # fewer planes than tokens: only the first two are written
    _run(nb.gated_delta_rule, q, k, v, g, beta, st0, few)
    np.testing.assert_array_equal(few, snaps[:2])


def test_gated_delta_rule_accepts_strided_views():
    """q/k/v are usually views into the conv output (T, 2*key_dim + value_dim)."""
    q, k, v, g, beta, st = _inputs(T=5, Hk=2, Hv=4, S=16, seed=8)
    T = q.shape[0]
    conv = np.concatenate([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], axis=1)
    qv, kv, vv = conv[:, :32].reshape(T, 2, 16), conv[:, 32:64].reshape(T, 2, 16), conv[:, 64:].reshape(T, 4, 16)
    o1, s1 = _run(nb.gated_delta_rule, q, k, v, g, beta, st)
    o2, s2 = _run(nb.gated_delta_rule, qv, kv, vv, g, beta, st)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(s1, s2)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_thread_count_does_not_change_bits():
    """Each head is one prange iteration, so results do not depend on how many threads run them."""
    args = _inputs(T=70, Hk=2, Hv=4, S=32, seed=13)
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        o1, s1 = _run(nb.gated_delta_rule, *args)
        numba.set_num_threads(2)
        o2, s2 = _run(nb.gated_delta_rule, *args)
    finally:
        numba.set_num_threads(n)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(s1, s2)


# ---------------------------------------------------------------- optional: llama.cpp's own ops

_GGML = os.environ.get("LLAMBA_GGML_LIBDIR")
ggml_only = pytest.mark.skipif(not _GGML, reason="set LLAMBA_GGML_LIBDIR to a dir with libggml-base/-cpu.so")


class _Ggml:
    """Run one ggml op on the CPU through ctypes (numpy shape (a, b, c) <-> ggml ne [c, b, a])."""

    class _Params(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    def __init__(self, libdir):
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        self.b = b = ctypes.CDLL(os.path.join(libdir, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        self.c = ctypes.CDLL(os.path.join(libdir, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        sigs = {"ggml_init": (vp, [self._Params]), "ggml_free": (None, [vp]),
                "ggml_new_tensor_4d": (vp, [vp, ctypes.c_int, i64, i64, i64, i64]),
                "ggml_get_data": (vp, [vp]), "ggml_nelements": (i64, [vp]), "ggml_new_graph": (vp, [vp]),
                "ggml_build_forward_expand": (None, [vp, vp]), "ggml_l2_norm": (vp, [vp, vp, ctypes.c_float]),
                "ggml_ssm_conv": (vp, [vp, vp, vp]), "ggml_gated_delta_net": (vp, [vp] * 7 + [i64])}
        for name, (res, args) in sigs.items():
            getattr(b, name).restype, getattr(b, name).argtypes = res, args
        self.c.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]

    def run(self, op, *arrays, extra=()):
        ctx = self.b.ggml_init(self._Params(1 << 27, None, False))
        try:
            ts = []
            for a in arrays:
                a = np.ascontiguousarray(a, f32)
                t = self.b.ggml_new_tensor_4d(ctx, 0, *(list(a.shape[::-1]) + [1] * (4 - a.ndim)))
                ctypes.memmove(self.b.ggml_get_data(t), a.ctypes.data, a.nbytes)
                ts.append(t)
            out = getattr(self.b, op)(ctx, *ts, *extra)
            gf = self.b.ggml_new_graph(ctx)
            self.b.ggml_build_forward_expand(gf, out)
            self.c.ggml_graph_compute_with_ctx(ctx, gf, 2)
            ptr = ctypes.cast(self.b.ggml_get_data(out), ctypes.POINTER(ctypes.c_float))
            return np.ctypeslib.as_array(ptr, (self.b.ggml_nelements(out),)).copy()
        finally:
            self.b.ggml_free(ctx)


@ggml_only
def test_against_ggml_l2_norm_and_ssm_conv():
    G = _Ggml(_GGML)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((7, 3, 128)).astype(f32)
    x[0, 0] *= 1e-8
    y = np.empty_like(x)
    nb.l2_norm_heads(x, 1e-6, y)
    np.testing.assert_array_equal(y, G.run("ggml_l2_norm", x, extra=(ctypes.c_float(1e-6),)).reshape(x.shape))
    m, cs, w = _conv_inputs(11)
    conv = G.run("ggml_ssm_conv", np.concatenate([cs, m.T], axis=1), w).reshape(m.shape)
    out = np.empty_like(m)
    nb.conv1d_silu(m, cs.copy(), w, out, np.empty((0,) + cs.shape, f32))
    np.testing.assert_array_equal(out, nb._silu(conv))  # the conv sums are bitwise; SiLU is ours on both


@ggml_only
def test_against_ggml_gated_delta_net():
    G = _Ggml(_GGML)
    T, Hk, Hv, S = 12, 2, 4, 128
    q, k, v, g, beta, st = _inputs(T=T, Hk=Hk, Hv=Hv, S=S, seed=12)
    packed = G.run("ggml_gated_delta_net", q, k, v, g[:, :, None], beta[:, :, None], st, extra=(3,))
    o_g = packed[:T * Hv * S].reshape(T, Hv, S)
    slots = packed[T * Hv * S:].reshape(3, Hv, S, S)  # slot s = state s tokens before the end
    snaps = np.empty((T, Hv, S, S), f32)
    o, s = _run(nb.gated_delta_rule, q, k, v, g, beta, st, snaps)
    assert _rel(o, o_g) < 1e-5  # same per-token operations; only the dot-product summation order differs
    for i in range(3):
        assert _rel(snaps[T - 1 - i], slots[i]) < 1e-5
