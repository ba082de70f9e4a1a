"""llamba.kernels.fused (one call for several matrices reading the same input, T <= 4) against the unfused path:
the input transform of llamba.kernels.ops, then the numpy twins of the activation quantizers and matmuls
(llamba.kernels.ref.quants_simple / quants_k), bit for bit; and LinearGroup against plain Linears."""
import numba
import numpy as np
import pytest

from llamba.kernels import fused as F
from llamba.kernels import ops as K
from llamba.kernels.ref import quants_k as RK
from llamba.kernels.ref import quants_simple as RS
from llamba.kernels.traits import TYPES

from .test_quants_k import NAMES as KNAMES
from .test_quants_k import rand_weight
from .test_quants_simple import QUANT, activations, quant_weights

SIMPLE = {v[0]: k for k, v in QUANT.items()}  # type id -> name


def weight(tid, rows, n, seed):
    if tid in KNAMES:
        return rand_weight(tid, rows, n, seed)
    return quant_weights(SIMPLE[tid], rows, n // 32, np.random.default_rng(seed))


def twin(tid, w, x):
    """Reference: the numpy twins of the activation quantizer and the matmul of type tid."""
    if tid in KNAMES:
        return getattr(RK, f"matmul_{KNAMES[tid]}")(w, *RK.act_q8_K(x))
    name = SIMPLE[tid]
    act = getattr(RS, f"act_{TYPES[tid].vec_dot_type}")(x)
    return getattr(RS, f"matmul_{name}")(w, *act)


def transform(mode, x, x2, norm_w, eps):
    out = np.empty_like(x)
    if mode == 0:
        return x
    if mode == 1:
        K.rms_norm(x, norm_w, eps, out)
    elif mode == 2:
        K.swiglu(x, x2, out)
    else:
        K.geglu_tanh(x, x2, out)
    return out


def run_fused(mode, x, x2, norm_w, eps, ws, tids):
    """One fused call per weight family (as LinearGroup does), at most F.SLOTS matrices each."""
    outs = [np.full((x.shape[0], w.shape[0]), np.nan, np.float32) for w in ws]
    for fam in (F.BLOCK32, F.KQUANTS):
        idx = [i for i, t in enumerate(tids) if t in fam]
        for j in range(0, len(idx), F.SLOTS):
            part = idx[j:j + F.SLOTS]
            F.run(mode, x, x2, norm_w, eps, [ws[i] for i in part], [tids[i] for i in part],
                  [outs[i] for i in part])
    return outs


GROUPS = [
    (3,), (3, 3, 3), (6, 6, 8, 2), (2, 7, 20), (12,), (14,), (12, 14), (6, 12, 14), (8, 13, 10, 11, 23),
    (2, 3, 6, 7, 8, 20),  # more than F.SLOTS matrices of one family: two calls
]
# each type set compiles a fused kernel of its own (seconds each from an empty cache): the fast tier keeps one
# block-32 set of several types and the K-quant pair of the default model, the rest run with the slow tests
_FAST_GROUPS = {(6, 6, 8, 2), (12, 14)}
GROUPS = [g if g in _FAST_GROUPS else pytest.param(g, marks=pytest.mark.slow) for g in GROUPS]


@pytest.mark.parametrize("tids", GROUPS, ids=lambda g: "+".join(TYPES[t].name for t in g if isinstance(t, int)))
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_fused_matches_twins_bitwise(tids, mode):
    rng = np.random.default_rng(sum(tids) + mode)
    n = 512 if any(t in KNAMES for t in tids) else 160
    ws = [weight(t, rows, n, seed=i + 7 * mode) for i, (t, rows) in enumerate(zip(tids, (13, 8, 21, 1, 40, 5)))]
    norm_w = rng.uniform(0.5, 1.5, n).astype(np.float32)
    for T in range(1, F.MAX_T + 1):
        x = activations(T, n, rng)
        x2 = rng.standard_normal((T, n)).astype(np.float32)
        outs = run_fused(mode, x, x2, norm_w, 1e-5, ws, tids)
        h = transform(mode, x, x2, norm_w, 1e-5)
        for t, w, o in zip(tids, ws, outs):
            ref = twin(t, w, h)
            assert np.array_equal(o.view(np.uint32), ref.view(np.uint32)), (TYPES[t].name, mode, T)


def test_fused_rows_do_not_depend_on_batch_or_threads():
    rng = np.random.default_rng(3)
    tids = (6, 8, 12)
    ws = [weight(t, r, 512, seed=i) for i, (t, r) in enumerate(zip(tids, (37, 9, 64)))]
    x = activations(4, 512, rng)
    full = run_fused(1, x, x, np.ones(512, np.float32), 1e-6, ws, tids)
    prev = numba.get_num_threads()
    try:
        for nt in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(nt)
            for t in range(4):
                one = run_fused(1, x[t:t + 1], x[t:t + 1], np.ones(512, np.float32), 1e-6, ws, tids)
                for a, b in zip(one, full):
                    assert np.array_equal(a[0].view(np.uint32), b[t].view(np.uint32))
    finally:
        numba.set_num_threads(prev)


def test_linear_group_matches_linears(tmp_path):
    """LinearGroup (fused for T <= 4, per-Linear above) == each Linear on the transformed input."""
    from llamba.layers import GEGLU, RMS_NORM, SWIGLU, LinearGroup

    class _Lin:  # the parts of llamba.layers.Linear that LinearGroup uses
        def __init__(self, tid, w):
            from llamba.kernels.quant import ops_for
            self.type_id, self.w, self.rows, self.bias = tid, w, w.shape[0], None
            self.cols = w.shape[1] // TYPES[tid].block_bytes * TYPES[tid].block_elems
            self.ops = ops_for(tid)

        def __call__(self, x):
            from llamba.layers import Linear
            return Linear.__call__(self, x)

    rng = np.random.default_rng(9)
    lins = [_Lin(t, weight(t, r, 512, seed=r)) for t, r in ((6, 24), (8, 8), (12, 16))]
    g = LinearGroup(lins)
    assert g.fused and not g.other_idx
    nw = rng.uniform(0.5, 1.5, 512).astype(np.float32)
    for mode in (0, RMS_NORM, SWIGLU, GEGLU):
        for T in (1, 3, 4, 5, 9):
            x = activations(T, 512, rng)
            x2 = rng.standard_normal((T, 512)).astype(np.float32)
            got = g(x, mode, x2, nw, 1e-5)
            h = transform(mode, x, x2, nw, 1e-5)
            for lin, o in zip(lins, got):
                assert np.array_equal(o.view(np.uint32), lin(h).view(np.uint32)), (mode, T)


@pytest.mark.parametrize("mode", [2, 3])
def test_fused_wide_input_parallel_transform(mode):
    """Inputs of >= 4096 values are transformed and quantized in parallel chunks: same bits as the twins."""
    rng = np.random.default_rng(mode)
    n = 4608  # 18 Q8_K blocks, 144 Q8_0 blocks
    tids = (8, 14, 3)
    ws = [weight(t, r, n, seed=i) for i, (t, r) in enumerate(zip(tids, (11, 16, 3)))]
    for T in range(1, F.MAX_T + 1):
        x = activations(T, n, rng)
        x2 = rng.standard_normal((T, n)).astype(np.float32)
        outs = run_fused(mode, x, x2, np.ones(n, np.float32), 1e-5, ws, tids)
        h = transform(mode, x, x2, None, 1e-5)
        for t, w, o in zip(tids, ws, outs):
            assert np.array_equal(o.view(np.uint32), twin(t, w, h).view(np.uint32)), (TYPES[t].name, mode, T)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_fused_repacked_q8_0_mixed_with_raw(mode):
    """Repacked Q8_0 weights (kind Q8_0P) in one fused call with raw block-32 weights (LinearGroup mixes them when
    a group holds Q8_0 and other block-32 types): bit-identical to the twins, T = 1..4, rows not multiples of 8."""
    from llamba.kernels import quants_simple as QS
    rng = np.random.default_rng(50 + mode)
    n = 160
    tids = (8, 2, 8, 8)
    rows = (13, 21, 8, 3)
    ws = [weight(t, r, n, seed=i) for i, (t, r) in enumerate(zip(tids, rows))]
    packed = [True, False, False, True]
    fw = [QS.repack_q8_0(w) if p else w for w, p in zip(ws, packed)]
    kinds = [QS.Q8_0P if p else t for t, p in zip(tids, packed)]
    norm_w = rng.uniform(0.5, 1.5, n).astype(np.float32)
    for T in range(1, F.MAX_T + 1):
        x = activations(T, n, rng)
        x2 = rng.standard_normal((T, n)).astype(np.float32)
        outs = [np.full((T, r), np.nan, np.float32) for r in rows]
        F.run(mode, x, x2, norm_w, 1e-5, fw, kinds, outs)
        h = transform(mode, x, x2, norm_w, 1e-5)
        for t, w, o in zip(tids, ws, outs):
            assert np.array_equal(o.view(np.uint32), twin(t, w, h).view(np.uint32)), (mode, T)
        # only packed matrices in a call, and a thread count that splits them unevenly
        outs2 = [np.full((T, r), np.nan, np.float32) for r in (13, 3)]
        F.run(mode, x, x2, norm_w, 1e-5, [fw[0], fw[3]], [QS.Q8_0P, QS.Q8_0P], outs2)
        assert np.array_equal(outs2[0], outs[0]) and np.array_equal(outs2[1], outs[3])
