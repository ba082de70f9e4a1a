"""Fused small-batch linear layers (decode, T = 1, speculative verify and batches of several sequences, T up to a few
dozen rows, taken in tiles of 4 per weight unit): one compiled call and one parallel region for several quantized
matrices that read the same input.

``fused_mm(mode, x, x2, norm_w, eps, ws, kinds, outs)`` computes, for every matrix i of the group,
``outs[i] = W_i @ f(x)`` with

* ``mode 0``: f(x) = x
* ``mode 1``: f(x) = rms_norm(x, norm_w, eps)                       (``ops.rms_norm``)
* ``mode 2``: f(x) = silu(x) * x2                                    (``ops.swiglu``)
* ``mode 3``: f(x) = gelu_tanh(x) * x2                               (``ops.geglu_tanh``)

and the matrices may mix types of one family (the registry's ``fused`` field, ``llamba.kernels.traits``): the
block-32 types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, and Q8_0 repacked at load: kind ``traits.Q8_0P``, weight
``repack_q8_0(W)`` of shape (8-row groups, group bytes); one Q8_0/Q8_1 activation quantization shared by all of
them) or the K-quants (Q2_K..Q6_K, IQ4_XS; one Q8_K quantization).
Every number is computed by the same float32 operations as the unfused path (``f`` as in ``llamba.kernels.ops``,
the activation quantizers and the matmul kernels of ``quants_simple``/``quants_k``), so the results are
bit-identical to ``Linear(f(x))`` for each matrix, row by row (the tests check this against the numpy twins).

What it saves over separate calls, per decode step and layer: the Python wrappers, one activation quantization
per matrix (Q, K and V share one; so do gate and up), and all but one parallel-region start per group.
The work is split over threads by weight bytes (8-row units, whichever matrix they belong to).
"""
from __future__ import annotations

from llamba.kernels import _jit  # noqa: F401  (Numba set-up: before the first kernel)
import numba
import numpy as np
from numba import njit, prange

from llamba.kernels import quants_k as QKm
from llamba.kernels import quants_simple as QS
from llamba.kernels.dispatch import call_by_kind
from llamba.kernels.ops import _gelu1, _rms_scale, _silu1
from llamba.kernels.traits import FAMILIES, Q8_0P


# the fused families, from the type registry (each type's ``fused`` field)
BLOCK32 = FAMILIES["block32"]
KQUANTS = FAMILIES["kquants"]
SUPPORTED = frozenset(BLOCK32 + KQUANTS)
# a plain module constant: Numba resolves a comparison of a constant `kind` with it before typing
_Q8_0P = Q8_0P
_QK = 32
_QK_K = 256
MAX_T = 9  # the tests check every batch size up to here (two whole tiles of 4 rows and a partial one)
_PREP_PAR_MIN = 4096  # SwiGLU/GeGLU inputs at least this many values are transformed in parallel


@njit(cache=True, nogil=True)
def _prep(mode, x, x2, norm_w, rsc, t, j0, j1, xin, need32, needk, qs, d, s, asum, qk, dk, bsk):
    """Elements j0..j1-1 of row t (whole activation blocks): xin = f(x) (the operations of ops.rms_norm -- with
    the row's scale rsc[t] -- swiglu or geglu_tanh), then their Q8_0/Q8_1 blocks (llama.cpp quantize_row_q8_1,
    q8_0 being its first two arrays, plus the block sums of q) and Q8_K blocks (quantize_row_q8_K)."""
    # slices indexed from 0: a loop over range(j0, j1) would keep Numba's negative-index check, and LLVM then
    # vectorizes it with gathers, or not at all
    xo = xin[t, j0:j1]
    xi = x[t, j0:j1]
    if mode == 1:
        sc = rsc[t]
        wi = norm_w[j0:j1]
        for i in range(j1 - j0):
            xo[i] = (xi[i] * sc) * wi[i]
    elif mode == 2:
        x2i = x2[t, j0:j1]
        for i in range(j1 - j0):
            xo[i] = _silu1(xi[i]) * x2i[i]
    elif mode == 3:
        x2i = x2[t, j0:j1]
        for i in range(j1 - j0):
            xo[i] = _gelu1(xi[i]) * x2i[i]
    else:
        for i in range(j1 - j0):
            xo[i] = xi[i]
    if need32:
        xr = xin[t]
        qr = qs[t]
        for b in range(j0 // _QK, j1 // _QK):
            asum[t, b] = QS._act_q8_block(xr, qr, b, d, s, True, t)
    if needk:
        xb = xin.view(np.uint32)
        for b in range(j0 // _QK_K, j1 // _QK_K):
            QKm._q8k_block(xin, xb, t, b, qk, dk, bsk)


@njit(cache=True, nogil=True, inline="always")
def _units(kind, w, o, rows_i, rb_i, g0, g1, T, n, nb, qs, d, s, asum, qk, dk, bsk, res):
    """8-row units g0..g1-1 of one block-32 matrix of type ``kind``: a compile-time constant here (see ``_make``),
    so only that type's dot-product code is compiled into the kernel."""
    if kind == _Q8_0P:
        qf = qs.reshape(T * n)
        sf = asum.reshape(T * nb)
        df = d.reshape(T * nb)
        of = o.reshape(T * rows_i)
        for g in range(g0, g1):
            for t0 in range(0, T, 4):
                QS._tilep_any(min(4, T - t0), w, g, nb, qf, t0, n, sf, df, of, g * 8, min(8, rows_i - g * 8),
                              rows_i)
    elif T == 1:
        # views made once per matrix: made inside the unit loop they cost as much as a small unit's dots
        q0 = qs[0]
        a0 = asum[0]
        d0 = d[0]
        s0 = s[0]
        for g in range(g0, g1):
            r0 = g * 8
            nr = min(8, rows_i - r0)
            QS._rows8(kind, w, r0, nr, q0, a0, d0, s0, nb, res)
            for k in range(nr):
                o[0, r0 + k] = res[k]
    else:
        of = o.reshape(T * rows_i)
        qf = qs.reshape(T * n)
        sf = asum.reshape(T * nb)
        df = d.reshape(T * nb)
        s1 = s.reshape(T * nb)
        for g in range(g0, g1):
            r0 = g * 8
            nr = min(8, rows_i - r0)
            # activation rows in tiles of <= 4 while the unit's weight rows stay in cache (a row's
            # numbers do not depend on its tile: the kernels are row-exact)
            for t0 in range(0, T, 4):
                nt = min(4, T - t0)
                if nt == 1:
                    QS._rows8(kind, w, r0, nr, qs[t0], asum[t0], d[t0], s[t0], nb, res)
                    for k in range(nr):
                        o[t0, r0 + k] = res[k]
                else:
                    QS._rows8t_any(kind, nt, w, r0, nr, qf[t0 * n:], n, sf[t0 * nb:], df[t0 * nb:],
                                   s1[t0 * nb:], nb, of[t0 * rows_i:], rows_i)


def _make_units(kind):
    """The units of one block-32 matrix of type ``kind`` as a kernel of its own (``kind`` a closure constant, so only
    that type's code is in it); the fused kernels call it once per matrix. Separate kernels keep Numba's inlining
    (which copies the inlined IR block by block, in time growing with the square of its size) small, and are cached
    and compiled on their own."""
    def units(w, o, rows_i, rb_i, g0, g1, T, n, nb, qs, d, s, asum, qk, dk, bsk, res):
        _units(kind, w, o, rows_i, rb_i, g0, g1, T, n, nb, qs, d, s, asum, qk, dk, bsk, res)
    units.__name__ = units.__qualname__ = f"units_{kind}"  # its own cache index file (see _make)
    return njit(cache=True, nogil=True)(units)


# units_b32(kind, w, o, ...): the unit kernel of a block-32 type (or repacked Q8_0), one per registry entry
_units_b32 = call_by_kind({k: _make_units(k) for k in BLOCK32 + (Q8_0P,)}, name="units_b32")


@njit(cache=True, nogil=True, inline="always")
def _units_any(kind, kfam, w, o, rows_i, rb_i, g0, g1, T, n, nb, qs, d, s, asum, qk, dk, bsk, res):
    """The units of one matrix of type ``kind`` (a constant where the fused kernels call this, as is the family
    ``kfam``): the block-32 types' unit kernel, the K-quants' row kernels in place."""
    if kfam:  # K-quants: their row kernels are separate already (a unit kernel measured slower)
        wf = w.reshape(w.size)
        for g in range(g0, g1):
            QKm.rows_k(kind, wf, rb_i, qk, dk, bsk, o, g * 8, min(rows_i, g * 8 + 8))
    else:
        _units_b32(kind, w, o, rows_i, rb_i, g0, g1, T, n, nb, qs, d, s, asum, qk, dk, bsk, res)


def _make(kfam, k0, k1, k2, k3):
    """A fused kernel for weights of the types k0..k3 (-1: unused) of one family (kfam True: K-quants). The types
    are closure constants: Numba prunes the other types' branches before typing, so the kernel calls only their unit
    kernels (compiling all twelve types' code into one kernel took most of a first run), and its disk-cache entry
    is keyed on them (Numba's cache index includes a closure's cell values)."""
    def fused(mode, x, x2, norm_w, eps, ws, kinds, outs, nthreads):
        T, n = x.shape
        nm = len(ws)
        need32 = not kfam
        needk = not need32  # plain bools, not literals: one _prep signature for both families
        nb = n // _QK
        nbk = n // _QK_K
        xin = np.empty((T, n), np.float32)
        if kfam:  # the other family's arrays: placeholders
            qs = np.empty((1, 1), np.int8)
            d = np.empty((1, 1), np.float32)
            s = np.empty((1, 1), np.float32)
            asum = np.empty((1, 1), np.int32)
            qk = np.empty((T, n), np.int8)
            dk = np.empty((T, nbk), np.float32)
            bsk = np.empty((T, n // 16), np.int32)
        else:
            qs = np.empty((T, n), np.int8)
            d = np.empty((T, nb), np.float32)
            s = np.empty((T, nb), np.float32)
            asum = np.empty((T, nb), np.int32)
            qk = np.empty((1, 1), np.int8)
            dk = np.empty((1, 1), np.float32)
            bsk = np.empty((1, 1), np.int32)
        rsc = np.empty(T, np.float32)
        if mode == 1:
            e = np.float32(eps)
            for t in range(T):
                rsc[t] = _rms_scale(x, t, n, e)
        # input transform + quantization: by whole blocks, in parallel when the input is wide (a SwiGLU over a wide
        # FFN costs as much as a small matmul)
        gran = _QK_K if kfam else _QK
        per_row = n // gran
        nblk = T * per_row
        npre = min(nthreads, nblk) if (T * n >= _PREP_PAR_MIN and mode >= 2) else 1
        if npre > 1:
            for c in prange(npre):
                u0 = c * nblk // npre
                u1 = (c + 1) * nblk // npre
                for t in range(u0 // per_row, (u1 + per_row - 1) // per_row):  # the rows this chunk touches
                    j0 = (max(u0, t * per_row) - t * per_row) * gran
                    j1 = (min(u1, (t + 1) * per_row) - t * per_row) * gran
                    _prep(mode, x, x2, norm_w, rsc, t, j0, j1, xin, need32, needk, qs, d, s, asum, qk, dk, bsk)
        else:
            j0 = n - n  # not a literal 0: the same _prep signature as the parallel branch (one compile, not two)
            for t in range(T):
                _prep(mode, x, x2, norm_w, rsc, t, j0, n, xin, need32, needk, qs, d, s, asum, qk, dk, bsk)
        # work units: 8 weight rows of one matrix; split over threads by weight bytes
        tot = 0
        nunits = 0
        for i in range(nm):
            # raw weights: (rows, row bytes), 8-row units; repacked Q8_0: (8-row groups, group bytes)
            units_i, ub_i = ws[i].shape
            if kinds[i] == _Q8_0P:
                ub_i //= 8  # per-unit cost in raw row bytes for both (272 packed bytes = 8 x 34 raw bytes)
            else:
                units_i = (units_i + 7) // 8
            tot += units_i * ub_i
            nunits += units_i
        nch = max(1, min(nthreads, nunits))
        for c in prange(nch):
            lo = c * tot // nch
            hi = (c + 1) * tot // nch
            res = np.empty(8, np.float32)
            acc = 0
            for i in range(nm):
                w = ws[i]
                kind = kinds[i]
                o = outs[i]
                rows_i = o.shape[1]
                G, rb_i = w.shape  # units and their cost, as in the loop above
                if kind == _Q8_0P:
                    rb_i //= 8
                else:
                    G = (G + 7) // 8
                if G == 0:
                    continue
                # units g with start cost acc + g*rb_i in [lo, hi)
                g0 = min(G, (max(lo - acc, 0) + rb_i - 1) // rb_i)
                g1 = min(G, (max(hi - acc, 0) + rb_i - 1) // rb_i)
                acc += G * rb_i
                if kind == k0:
                    _units_any(k0, kfam, w, o, rows_i, rb_i, g0, g1, T, n, nb, qs, d, s, asum, qk, dk, bsk, res)
                elif k1 >= 0 and kind == k1:
                    _units_any(k1, kfam, w, o, rows_i, rb_i, g0, g1, T, n, nb, qs, d, s, asum, qk, dk, bsk, res)
                elif k2 >= 0 and kind == k2:
                    _units_any(k2, kfam, w, o, rows_i, rb_i, g0, g1, T, n, nb, qs, d, s, asum, qk, dk, bsk, res)
                elif k3 >= 0 and kind == k3:
                    _units_any(k3, kfam, w, o, rows_i, rb_i, g0, g1, T, n, nb, qs, d, s, asum, qk, dk, bsk, res)

    # a name of its own, so a cache index file of its own: Numba names a kernel's index and data files after its
    # qualified name, and two processes saving different entries of one index at once may both number their data
    # file .1 -- then one index entry loads the other kernel (same signature, other types: wrong results)
    fused.__name__ = fused.__qualname__ = (f"fused_mm{'k' if kfam else '32'}_"
                                           + "_".join(str(k) for k in (k0, k1, k2, k3) if k >= 0))
    fused.__doc__ = ("outs[i] = W_i @ f(x) for weights ws[i] (see the module doc). x, x2: float32 (T, n) C-contiguous "
                     "(x2 read in modes 2/3 only); norm_w: read-only float32 (n,); ws: a 4-tuple of read-only uint8 "
                     "(rows_i, row_bytes_i) raw weights or repacked Q8_0 weights (kind Q8_0P; unused slots: 0 rows); "
                     "kinds: int64 type ids; outs: 4-tuple of float32 (T, rows_i) (rows_i is read from outs).")
    return njit(cache=True, nogil=True, parallel=True)(fused)


SLOTS = 4  # matrices per call (ws/outs are always 4-tuples: one compiled signature per family)
_KERNELS: dict = {}  # (family, types) -> kernel


def kernel_key(kinds, among=()) -> tuple:
    """(K-quant family?, sorted types) of the kernel ``kernel_for(kinds, among)`` returns."""
    kinds = {int(k) for k in kinds}
    fam = {k in KQUANTS for k in kinds}
    if len(fam) != 1:
        raise ValueError("a fused call takes block-32 weights or K-quant weights, not both")
    kfam = fam.pop()
    mine = KQUANTS if kfam else BLOCK32 + (Q8_0P,)
    bad = kinds - set(mine)
    if bad:
        raise ValueError(f"no fused kernel for type(s) {sorted(bad)}")
    wide = kinds | {int(k) for k in among if int(k) in mine}
    return kfam, tuple(sorted(wide if len(wide) <= SLOTS else kinds))


def kernel_for(kinds, among=()):
    """The fused kernel for weights of these type ids (all of one family). ``among``: other types of the same model;
    those of the family are compiled into the same kernel when at most SLOTS types in all, so that one kernel per
    family serves a whole model (each extra type costs compile time, each extra kernel more)."""
    key = kernel_key(kinds, among)
    fn = _KERNELS.get(key)
    if fn is None:
        ks = key[1] + (-1,) * (SLOTS - len(key[1]))
        fn = _KERNELS[key] = _make(key[0], *ks)
    return fn


def pad(ws, kinds):
    """ws, kinds padded to SLOTS entries (0-row read-only weights)."""
    k = len(ws)
    if k > SLOTS:
        raise ValueError(f"at most {SLOTS} matrices per fused call")
    dummy = np.empty((0, ws[0].shape[1]), np.uint8)
    dummy.flags.writeable = False
    return (tuple(ws) + (dummy,) * (SLOTS - k),
            np.concatenate([np.asarray(kinds, np.int64), np.full(SLOTS - k, int(kinds[0]), np.int64)]))


def run(mode, x, x2, norm_w, eps, ws, kinds, outs):
    """outs[i] = W_i @ f(x) for up to SLOTS weights of one family, with Numba's current thread count."""
    fn = kernel_for(kinds)
    ws4, kinds4 = pad(ws, kinds)
    outs4 = tuple(outs) + (np.empty((x.shape[0], 0), np.float32),) * (SLOTS - len(outs))
    fn(mode, x, x2, norm_w, eps, ws4, kinds4, outs4, numba.get_num_threads())
