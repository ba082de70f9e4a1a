"""Numba kernels for the 256-element super-block quant types (K-quants and IQ4_XS), formats and arithmetic: docs/numerics.md.

Types: the registry entries (``llamba.kernels.traits``) with ``kernels="quants_k"``: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
IQ4_XS; activation format Q8_K.

Public API (plain Python functions validating shapes; the work happens in ``@njit`` kernels):

* ``dequant_<t>(w, out)``: ``w`` the raw weight view ``uint8 (rows, row_bytes)`` (read-only is fine),
  ``out`` a preallocated ``float32 (rows, ncols)``.  Bit-exact against ``gguf.quants.dequantize``
  (same float operation order: e.g. Q4_K ``(d*sc)*q - dmin*m``).
* ``act_q8_K(x) -> (qs int8 (T, n), d float32 (T, n//256), bsums int32 (T, n//16))``: llama.cpp's
  ``quantize_row_q8_K``.  ``qs`` is always in [-127, 127] (the matmuls rely on that).
* ``matmul_<t>(w, qs, d, bsums, out)``: ``out[t, r] = dot(W[r], x[t])`` like llama.cpp's
  ``ggml_vec_dot_<t>_q8_K``: per super-block an exact int32 ``isum = sum_sub scale_sub * sum(q_w*q_a)``
  (and ``msum = sum_g min_g * bsums_g`` for Q2_K/Q4_K/Q5_K), then in float32, super-blocks in order:
  ``acc += d_a * (d_w*isum - dmin_w*msum)`` (types with mins) or ``acc += (d_a*d_w) * isum``.
* ``KERNELS = {type_id: (dequant_fn, matmul_fn)}``, ``ACT = {"q8_K": act_q8_K}``.

Row-exactness: ``out[t, r]`` is computed by the same sequence of float32 operations whatever T is (the
integer parts are exact however they are grouped, no fastmath, no FMA contraction), so a batch gives
rows bit-identical to one-row calls.  ``llamba.kernels.ref.quants_k`` holds numpy twins with the same
operations; the tests require bit equality with them.

How the matmul is organised (decode, T = 1, is memory-bound; prefill reuses each unpacked block):

* Each thread takes one contiguous range of weight rows and streams every row front to back (several
  rows interleaved defeat the hardware prefetchers once the matrix is out of cache).
* Activation rows come in tiles of ``_TT``.  Per weight super-block, one LLVM-IR intrinsic unpacks the
  block into registers (256 values as bytes, 16 group scales, 16 "min" coefficients, d, dmin), takes the
  integer dot products with the tile's first Q8_K row directly, and stores the unpacked block in small
  buffers that serve the tile's other activation rows, four at a time.
* Integer dot of one super-block: per 32 values ``pmaddubsw(w_u8, a_i8)`` (pairs -> int16; never
  saturates since |w| <= 63, or <= 127 for IQ4_XS, and |a| <= 127), then ``pmaddwd`` with the group
  scales (-> int32), summed over the block and reduced once.  On x86 with AVX2 the ``llvm.x86.*``
  intrinsics are called directly (from generic IR LLVM reshuffles the reduction badly); elsewhere the
  same arithmetic is emitted as generic vector IR.
* Signed formats are stored with an offset (Q3_K ``q+4``, Q6_K ``q+32``) that is taken back exactly with
  the bsums, ``isum -= sum_g (off*scale_g) * bsums_g``; IQ4_XS keeps signed values and uses
  ``|w| * (sign(w)*a)``.
* The driver (``_rows``) is written once and inlined into one small function per type, so ``kind`` is
  a constant and LLVM specialises every type-dependent branch away.  Integer indices on hot paths are
  cast to unsigned (``_U``) so Numba emits no negative-index wraparound selects.
"""
from __future__ import annotations

from llamba.kernels import _jit  # noqa: F401  (Numba set-up: before the first kernel)
import numba
import numpy as np
from llvmlite import binding as _llb
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from llamba.kernels.dispatch import by_kind, call_by_kind
from llamba.kernels.traits import IQ4_XS, KVALUES_IQ4NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, TYPES, in_module

# the types handled here: the registry entries with kernels="quants_k"; the per-type parts of the kernels are the
# branches on ``kind`` in _emit_vals/_emit_scales/_D_OFF/_block_term/_make_dequant_k (IR-building or constant-folded)
_TYPES = in_module("quants_k")
QK_K = 256
BLOCK_BYTES = {t.type_id: t.block_bytes for t in _TYPES}

__all__ = [f"{op}_{t.key}" for op in ("dequant", "matmul") for t in _TYPES] + [
    "act_q8_K", "KERNELS", "ACT", "QK_K", "BLOCK_BYTES", "KVALUES_IQ4NL",
]

_U = np.uint64  # index cast: unsigned indices carry no wraparound check
_NACC = 2  # independent int32 vector accumulators in a super-block dot product
_TT = 16  # activation rows per tile in the matmul (a tile of Q8_K rows stays in L1/L2)

# 2**(e-25) for the fp16 exponent field e (e = 0, subnormal, uses the e = 1 scale without implicit bit)
_EXP2_F16 = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], dtype=np.float32)

# --------------------------------------------------------------------------------------------------
# LLVM-IR building blocks for the integer super-block dot product
# --------------------------------------------------------------------------------------------------
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_TRIPLE = _llb.get_process_triple()
_FEATURES = _jit.target_features()  # honours NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, as every kernel module
_X86_AVX2 = _TRIPLE.startswith(("x86_64", "i686", "i386")) and bool(_FEATURES.get("avx2", False))
_X86_VNNI = _X86_AVX2 and bool(_FEATURES.get("avx512vnni", False)) and bool(_FEATURES.get("avx512vl", False))
# hardware half -> float conversion (vcvtph2ps / fcvt); elsewhere an exact bitwise version
_HW_F16 = ((_TRIPLE.startswith(("x86_64", "i686", "i386")) and bool(_FEATURES.get("f16c", False)))
           or (_TRIPLE.startswith(("aarch64", "arm64")) and _jit.target_is_host()))


def _vt(t, n):
    return ir.VectorType(t, n)


def _idx(*vals):
    return ir.Constant(_vt(_I32, len(vals)), list(vals))


def _splat(t, n, v):
    return ir.Constant(_vt(t, n), [ir.Constant(t, v)] * n)


def _ptr(context, builder, arrty, arr, off, offty, elty):
    """``elty*`` pointer to flat element ``off`` of a C-contiguous array."""
    ary = context.make_array(arrty)(context, builder, arr)
    off = context.cast(builder, off, offty, types.intp)
    return builder.bitcast(builder.gep(ary.data, [off]), elty.as_pointer())


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _maddubs(b, u8v, s8v):
    """<32 x i8> unsigned u, signed s -> <16 x i16> u[2i]*s[2i] + u[2i+1]*s[2i+1] (pmaddubsw; the
    callers guarantee no saturation)."""
    if _X86_AVX2:
        return _call(b, "llvm.x86.avx2.pmadd.ub.sw", _vt(_I16, 16), [u8v, s8v])
    ev, od = _idx(*range(0, 32, 2)), _idx(*range(1, 32, 2))
    und = ir.Constant(_vt(_I8, 32), None)
    ue = b.zext(b.shuffle_vector(u8v, und, ev), _vt(_I16, 16))
    uo = b.zext(b.shuffle_vector(u8v, und, od), _vt(_I16, 16))
    se = b.sext(b.shuffle_vector(s8v, und, ev), _vt(_I16, 16))
    so = b.sext(b.shuffle_vector(s8v, und, od), _vt(_I16, 16))
    return b.add(b.mul(ue, se), b.mul(uo, so))


def _maddwd(b, x, y):
    """<16 x i16> x, y -> <8 x i32> x[2i]*y[2i] + x[2i+1]*y[2i+1] (pmaddwd)."""
    if _X86_AVX2:
        return _call(b, "llvm.x86.avx2.pmadd.wd", _vt(_I32, 8), [x, y])
    ev, od = _idx(*range(0, 16, 2)), _idx(*range(1, 16, 2))
    und = ir.Constant(_vt(_I16, 16), None)

    def half(v, sel):
        return b.sext(b.shuffle_vector(v, und, sel), _vt(_I32, 8))
    return b.add(b.mul(half(x, ev), half(y, ev)), b.mul(half(x, od), half(y, od)))


def _maddwd_acc(b, acc, x, y):
    """acc + pmaddwd(x, y) (acc None: 0).  With AVX512-VNNI this is one vpdpwssd, called through its
    intrinsic so LLVM keeps the caller's independent accumulators (it would otherwise fuse the adds
    into a single dependent vpdpwssd chain)."""
    if _X86_VNNI:
        v8 = _vt(_I32, 8)
        acc = ir.Constant(v8, [ir.Constant(_I32, 0)] * 8) if acc is None else acc
        return _call(b, "llvm.x86.avx512.vpdpwssd.256", v8, [acc, b.bitcast(x, v8), b.bitcast(y, v8)])
    p = _maddwd(b, x, y)
    return p if acc is None else b.add(acc, p)


def _emit_scale_vecs(b, scv):
    """<16 x i16> group scales -> 8 <16 x i16>: for chunk c (values 32c..32c+31, i.e. 16-lane pmaddwd
    input where lanes 0-7 hold pairs of group 2c and lanes 8-15 pairs of group 2c+1)."""
    if not _X86_AVX2:
        return [b.shuffle_vector(scv, scv, _idx(*([2 * c] * 8 + [2 * c + 1] * 8))) for c in range(8)]
    # one vpshufb per chunk (LLVM's own lowering of the shuffles is 2-3 instructions each): lane 0 holds
    # the even-group scales, lane 1 the odd ones, and chunk c takes word c of each lane
    src = b.bitcast(b.shuffle_vector(scv, scv, _idx(*range(0, 16, 2), *range(1, 16, 2))), _vt(_I8, 32))
    out = []
    for c in range(8):
        mask = ir.Constant(_vt(_I8, 32), [ir.Constant(_I8, 2 * c + (i & 1)) for i in range(32)])
        out.append(b.bitcast(_call(b, "llvm.x86.avx2.pshuf.b", _vt(_I8, 32), [src, mask]), _vt(_I16, 16)))
    return out


def _emit_dot(b, wvecs, svecs, ap, signed):
    """IR: ``sum_{c<8, j<32} svecs[c][j//2] * w_c[j] * a[32c + j]`` as i32 (exact), ``wvecs`` the 8
    <32 x i8> weight chunks (unsigned <= 63, or signed |w| <= 127 with ``signed``), ``svecs`` the 8
    <16 x i16> chunk scale vectors (_emit_scale_vecs), ``ap`` a <32 x i8>* to the 256 activations
    (int8 in [-127, 127])."""
    accs = [None] * _NACC  # independent accumulators: one chain of 8 dependent pmaddwd adds would
    for c in range(8):     # make the block latency-bound
        w = wvecs[c]
        a = b.load(b.gep(ap, [ir.Constant(_I64, c)]), align=1)
        if signed:  # |w| * (sign(w) * a)
            neg = b.icmp_signed("<", w, _splat(_I8, 32, 0))
            a = b.select(neg, b.sub(_splat(_I8, 32, 0), a), a)
            w = b.select(neg, b.sub(_splat(_I8, 32, 0), w), w)
        k = c % _NACC
        accs[k] = _maddwd_acc(b, accs[k], _maddubs(b, w, a), svecs[c])
    while len(accs) > 1:
        accs = [b.add(accs[i], accs[i + 1]) for i in range(0, len(accs), 2)]
    return _call(b, "llvm.vector.reduce.add.v8i32", _I32, [accs[0]])


def _emit_mdot(b, mcv, bp):
    """IR: sum_k mcv[k] * bsums[k] (i32) for <16 x i32> ``mcv`` and a <16 x i32>* ``bp``."""
    return _call(b, "llvm.vector.reduce.add.v16i32", _I32, [b.mul(mcv, b.load(bp, align=4))])


def _load_unpacked(context, b, sig, args):
    """The 8 weight chunks and 8 chunk scale vectors stored by _unpack_dot in vals and sc."""
    zero = ir.Constant(_I64, 0)
    wp = _ptr(context, b, sig.args[0], args[0], zero, types.int64, _vt(_I8, 32))
    sp = _ptr(context, b, sig.args[1], args[1], zero, types.int64, _vt(_I16, 16))
    wvecs = [b.load(b.gep(wp, [ir.Constant(_I64, c)]), align=1) for c in range(8)]
    svecs = [b.load(b.gep(sp, [ir.Constant(_I64, c)]), align=2) for c in range(8)]
    return wvecs, svecs


def _make_kdot(signed):
    """intrinsic(vals, sc, aq, aoff) -> int32: the integer super-block dot product of the unpacked
    buffers (vals 256 uint8, sc 8x16 int16 chunk scales) with aq[aoff:aoff+256] (see _emit_dot)."""
    @intrinsic
    def kdot(typingctx, vals, sc, aq, aoff):
        def codegen(context, builder, sig, args):
            wvecs, svecs = _load_unpacked(context, builder, sig, args)
            ap = _ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3], _vt(_I8, 32))
            return _emit_dot(builder, wvecs, svecs, ap, signed)
        return types.int32(vals, sc, aq, aoff), codegen
    return kdot


def _make_kdot4(signed):
    """intrinsic(vals, sc, aq, aoff, stride) -> 4 x int32: _make_kdot for the four activation blocks at
    aoff + i*stride (weights and scales stay in registers across them)."""
    @intrinsic
    def kdot4(typingctx, vals, sc, aq, aoff, stride):
        def codegen(context, builder, sig, args):
            b = builder
            wvecs, svecs = _load_unpacked(context, b, sig, args)
            off = context.cast(b, args[3], sig.args[3], types.intp)
            st = context.cast(b, args[4], sig.args[4], types.intp)
            res = []
            for i in range(4):
                oi = b.add(off, b.mul(st, ir.Constant(_I64, i)))
                ap = _ptr(context, b, sig.args[2], args[2], oi, types.intp, _vt(_I8, 32))
                res.append(_emit_dot(b, wvecs, svecs, ap, signed))
            return context.make_tuple(b, sig.return_type, res)
        return types.UniTuple(types.int32, 4)(vals, sc, aq, aoff, stride), codegen
    return kdot4


_kdot_u = _make_kdot(False)
_kdot_s = _make_kdot(True)
_kdot4_u = _make_kdot4(False)
_kdot4_s = _make_kdot4(True)


@intrinsic
def _idot16(typingctx, a, aoff, b, boff):
    """sum_{k<16} a[aoff + k] * b[boff + k] for int32 arrays (exact when it fits int32)."""
    def codegen(context, builder, sig, args):
        v = _vt(_I32, 16)
        ap = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], v)
        bp = _ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3], v)
        p = builder.mul(builder.load(ap, align=4), builder.load(bp, align=4))
        return _call(builder, "llvm.vector.reduce.add.v16i32", _I32, [p])
    return types.int32(a, aoff, b, boff), codegen


def _lut16(b, ix):
    """Per-lane ``KVALUES_IQ4NL[ix]`` for a <16 x i8> of indices 0..15."""
    tab = ir.Constant(_vt(_I8, 16), [ir.Constant(_I8, int(v) & 0xFF) for v in KVALUES_IQ4NL])
    if _X86_AVX2:
        return _call(b, "llvm.x86.ssse3.pshuf.b.128", _vt(_I8, 16), [tab, ix])
    r = _splat(_I8, 16, int(KVALUES_IQ4NL[0]) & 0xFF)
    for k in range(1, 16):
        r = b.select(b.icmp_unsigned("==", ix, _splat(_I8, 16, k)), _splat(_I8, 16, int(KVALUES_IQ4NL[k]) & 0xFF), r)
    return r


def _emit_vals(kind, b, src):
    """IR for the 256 weight values of the super-block at i8* ``src``, as 8 <32 x i8> chunks (elements
    32c..32c+31): Q2_K q, Q3_K q+4, Q4_K q, Q5_K q, Q6_K q+32 (all unsigned), IQ4_XS kvalues (signed)."""
    v32 = _vt(_I8, 32)
    chunks = {}

    def ld(off, ty=v32):
        return b.load(b.bitcast(b.gep(src, [ir.Constant(_I64, off)]), ty.as_pointer()), align=1)

    def put(e, v):  # v holds elements e..e+31
        chunks[e // 32] = v

    def shr(v, k):
        return b.lshr(v, _splat(_I8, 32, k)) if k else v

    def band(v, m):
        return b.and_(v, _splat(_I8, 32, m))

    def shl(v, k):
        return b.shl(v, _splat(_I8, 32, k)) if k else v

    if kind == Q2_K:
        for h in range(2):
            q = ld(16 + 32 * h)
            for j in range(4):
                put(128 * h + 32 * j, band(shr(q, 2 * j), 3))
    elif kind == Q3_K:
        hm = ld(0)
        for h in range(2):
            q = ld(32 + 32 * h)
            for j in range(4):
                put(128 * h + 32 * j, b.or_(band(shr(q, 2 * j), 3), shl(band(shr(hm, 4 * h + j), 1), 2)))
    elif kind == Q4_K:
        for c in range(4):
            q = ld(16 + 32 * c)
            put(64 * c, band(q, 15))
            put(64 * c + 32, shr(q, 4))
    elif kind == Q5_K:
        qh = ld(16)
        for c in range(4):
            q = ld(48 + 32 * c)
            put(64 * c, b.or_(band(q, 15), shl(band(shr(qh, 2 * c), 1), 4)))
            put(64 * c + 32, b.or_(shr(q, 4), shl(band(shr(qh, 2 * c + 1), 1), 4)))
    elif kind == Q6_K:
        for h in range(2):
            lo, hi, qh = ld(64 * h), ld(64 * h + 32), ld(128 + 32 * h)
            put(128 * h, b.or_(band(lo, 15), shl(band(qh, 3), 4)))
            put(128 * h + 32, b.or_(band(hi, 15), shl(band(shr(qh, 2), 3), 4)))
            put(128 * h + 64, b.or_(shr(lo, 4), shl(band(shr(qh, 4), 3), 4)))
            put(128 * h + 96, b.or_(shr(hi, 4), shl(shr(qh, 6), 4)))
    elif kind == IQ4_XS:
        v16 = _vt(_I8, 16)
        for ib in range(8):
            q = ld(8 + 16 * ib, v16)
            lo = _lut16(b, b.and_(q, _splat(_I8, 16, 15)))
            hi = _lut16(b, b.lshr(q, _splat(_I8, 16, 4)))
            put(32 * ib, b.shuffle_vector(lo, hi, _idx(*range(32))))
    else:
        raise ValueError(kind)
    return [chunks[c] for c in range(8)]


def _h2f(b, h16):
    """i16 IEEE half bits -> float, exact (a half -> float conversion is; NaNs stay NaN)."""
    if _HW_F16:
        return b.fpext(b.bitcast(h16, ir.HalfType()), ir.FloatType())
    h = b.zext(h16, _I32)
    sign = b.shl(b.and_(h, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
    em = b.and_(h, ir.Constant(_I32, 0x7FFF))
    nrm = b.add(b.shl(em, ir.Constant(_I32, 13)), ir.Constant(_I32, 0x38000000))
    inf = b.add(b.shl(em, ir.Constant(_I32, 13)), ir.Constant(_I32, 0x70000000))
    sub = b.bitcast(b.fmul(b.sitofp(em, ir.FloatType()), ir.Constant(ir.FloatType(), 2.0 ** -24)), _I32)
    bits = b.select(b.icmp_unsigned("<", em, ir.Constant(_I32, 0x400)), sub,
                    b.select(b.icmp_unsigned(">=", em, ir.Constant(_I32, 0x7C00)), inf, nrm))
    return b.bitcast(b.or_(bits, sign), ir.FloatType())


def _emit_scales(kind, b, src):
    """IR for the 16 per-16-element group scales of a super-block (<16 x i16>) and the 16 int32
    coefficients of its bsums term (<16 x i32>: mins for Q2_K/Q4_K/Q5_K, offset*scale for Q3_K/Q6_K)."""
    v16 = _vt(_I8, 16)

    def ld(off, ty):
        return b.load(b.bitcast(b.gep(src, [ir.Constant(_I64, off)]), ty.as_pointer()), align=1)

    dup = _idx(*[k // 2 for k in range(16)])  # 8 sub-block values -> 16 group values
    if kind == Q2_K:
        q = ld(0, v16)
        sc = b.zext(b.and_(q, _splat(_I8, 16, 15)), _vt(_I16, 16))
        mc = b.zext(b.lshr(q, _splat(_I8, 16, 4)), _vt(_I32, 16))
    elif kind == Q3_K:
        lo = ld(96, _vt(_I8, 8))
        hi = ld(104, _vt(_I8, 4))
        lo16 = b.shuffle_vector(b.and_(lo, _splat(_I8, 8, 15)), b.lshr(lo, _splat(_I8, 8, 4)), _idx(*range(16)))
        hi16 = b.shuffle_vector(hi, hi, _idx(*[k % 4 for k in range(16)]))
        hi16 = b.and_(b.lshr(hi16, ir.Constant(v16, [ir.Constant(_I8, 2 * (k // 4)) for k in range(16)])),
                      _splat(_I8, 16, 3))
        s8 = b.sub(b.or_(lo16, b.shl(hi16, _splat(_I8, 16, 4))), _splat(_I8, 16, 32))
        sc = b.sext(s8, _vt(_I16, 16))
        mc = b.mul(b.sext(s8, _vt(_I32, 16)), _splat(_I32, 16, 4))
    elif kind in (Q4_K, Q5_K):
        u = [ld(4 + 4 * i, _I32) for i in range(3)]
        k1, k2, k3 = (ir.Constant(_I32, m) for m in (0x3F3F3F3F, 0x0F0F0F0F, 0x03030303))
        c4, c6 = ir.Constant(_I32, 4), ir.Constant(_I32, 6)
        s_lo = b.and_(u[0], k1)
        s_hi = b.or_(b.and_(u[2], k2), b.shl(b.and_(b.lshr(u[0], c6), k3), c4))
        m_lo = b.and_(u[1], k1)
        m_hi = b.or_(b.and_(b.lshr(u[2], c4), k2), b.shl(b.and_(b.lshr(u[1], c6), k3), c4))
        v = ir.Constant(_vt(_I32, 4), None)
        for i, x in enumerate((s_lo, s_hi, m_lo, m_hi)):
            v = b.insert_element(v, x, ir.Constant(_I32, i))
        v = b.bitcast(v, v16)  # bytes: sc[0..7], mn[0..7]
        sc = b.zext(b.shuffle_vector(v, v, dup), _vt(_I16, 16))
        mc = b.zext(b.shuffle_vector(v, v, _idx(*[8 + k // 2 for k in range(16)])), _vt(_I32, 16))
    elif kind == Q6_K:
        s8 = ld(192, v16)
        sc = b.sext(s8, _vt(_I16, 16))
        mc = b.mul(b.sext(s8, _vt(_I32, 16)), _splat(_I32, 16, 32))
    elif kind == IQ4_XS:
        sh = b.zext(ld(2, _I16), _I32)
        sl = ld(4, _vt(_I8, 4))
        sl8 = b.shuffle_vector(sl, sl, _idx(*[ib // 2 for ib in range(8)]))
        sl8 = b.and_(b.lshr(sl8, ir.Constant(_vt(_I8, 8), [ir.Constant(_I8, 4 * (ib % 2)) for ib in range(8)])),
                     _splat(_I8, 8, 15))
        shv = b.shuffle_vector(b.insert_element(ir.Constant(_vt(_I32, 8), None), sh, ir.Constant(_I32, 0)),
                               ir.Constant(_vt(_I32, 8), None), _idx(*([0] * 8)))
        shv = b.and_(b.lshr(shv, _idx(*[2 * ib for ib in range(8)])), _splat(_I32, 8, 3))
        ls = b.or_(b.zext(sl8, _vt(_I32, 8)), b.shl(shv, _splat(_I32, 8, 4)))
        ls = b.trunc(b.sub(ls, _splat(_I32, 8, 32)), _vt(_I16, 8))
        sc = b.shuffle_vector(ls, ls, dup)
        mc = None
    else:
        raise ValueError(kind)
    return sc, mc


_D_OFF = {Q2_K: (80, 82), Q3_K: (108, None), Q4_K: (0, 2), Q5_K: (0, 2), Q6_K: (208, None), IQ4_XS: (0, None)}


def _make_unpack_dot(kind):
    """intrinsic(w, o, vals, sc, mc, aq, aoff, bsums, boff) -> (d, dmin, isum, msum).

    Unpacks the super-block at flat byte offset o of w into the buffers vals (256 uint8, see
    _emit_vals), sc (8x16 int16 chunk scale vectors, see _emit_scale_vecs) and mc (16 int32 bsums
    coefficients; untouched for IQ4_XS), and returns its fp16 d and dmin (0 without mins) with the
    integer dot products against one Q8_K block, computed from registers: ``isum`` (_emit_dot with
    aq[aoff:]) and ``msum = sum_k mc[k] * bsums[boff + k]`` (0 for IQ4_XS).  Further activation rows
    reuse the buffers through _kdot*_u/_kdot*_s and _idot16."""
    @intrinsic
    def unpack_dot(typingctx, w, o, vals, sc, mc, aq, aoff, bsums, boff):
        def codegen(context, builder, sig, args):
            b = builder
            zero = ir.Constant(_I64, 0)
            src = _ptr(context, b, sig.args[0], args[0], args[1], sig.args[1], _I8)
            wvecs = _emit_vals(kind, b, src)
            vp = _ptr(context, b, sig.args[2], args[2], zero, types.int64, _vt(_I8, 32))
            for c in range(8):
                b.store(wvecs[c], b.gep(vp, [ir.Constant(_I64, c)]), align=1)
            scv, mcv = _emit_scales(kind, b, src)
            svecs = _emit_scale_vecs(b, scv)
            sp = _ptr(context, b, sig.args[3], args[3], zero, types.int64, _vt(_I16, 16))
            for c in range(8):
                b.store(svecs[c], b.gep(sp, [ir.Constant(_I64, c)]), align=2)
            ap = _ptr(context, b, sig.args[5], args[5], args[6], sig.args[6], _vt(_I8, 32))
            isum = _emit_dot(b, wvecs, svecs, ap, kind == IQ4_XS)
            if mcv is not None:
                b.store(mcv, _ptr(context, b, sig.args[4], args[4], zero, types.int64, mcv.type), align=4)
                msum = _emit_mdot(b, mcv, _ptr(context, b, sig.args[7], args[7], args[8], sig.args[8], mcv.type))
            else:
                msum = ir.Constant(_I32, 0)

            def f16(off):
                if off is None:
                    return ir.Constant(ir.FloatType(), 0.0)
                p = b.bitcast(b.gep(src, [ir.Constant(_I64, off)]), _I16.as_pointer())
                return _h2f(b, b.load(p, align=1))
            dd, dm = _D_OFF[kind]
            return context.make_tuple(b, sig.return_type, [f16(dd), f16(dm), isum, msum])
        rt = types.Tuple((types.float32, types.float32, types.int32, types.int32))
        return rt(w, o, vals, sc, mc, aq, aoff, bsums, boff), codegen
    return unpack_dot


# _unpack_dot(kind, w, o, vals, sc, mc, aq, aoff, bsums, boff)
_unpack_dot = by_kind({t.type_id: _make_unpack_dot(t.type_id) for t in _TYPES}, name="_unpack_dot")


# --------------------------------------------------------------------------------------------------
# scalar helpers
# --------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _f16(w, o):
    """Exact IEEE half -> float32 of the little-endian fp16 at flat byte offset o of a uint8 array."""
    h = np.int32(w[_U(o)]) | (np.int32(w[_U(o + 1)]) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    elif e == 0:
        v = np.float32(m) * _EXP2_F16[0]
    else:
        v = np.float32(m | 1024) * _EXP2_F16[e]
    return -v if h & 0x8000 else v


@njit(cache=True, nogil=True, inline="always")
def _u32(w, o):
    return (np.uint32(w[_U(o)]) | (np.uint32(w[_U(o + 1)]) << np.uint32(8))
            | (np.uint32(w[_U(o + 2)]) << np.uint32(16)) | (np.uint32(w[_U(o + 3)]) << np.uint32(24)))


@njit(cache=True, nogil=True, inline="always")
def _scale_min_k4(w, o, sc, mn):
    """Q4_K/Q5_K: the 12 packed bytes at w[o:] -> 8 six-bit scales sc[0:8] and mins mn[0:8]
    (llama.cpp's kmask trick on three little-endian u32 words)."""
    u0 = _u32(w, o)
    u1 = _u32(w, o + 4)
    u2 = _u32(w, o + 8)
    k1, k2, k3 = np.uint32(0x3F3F3F3F), np.uint32(0x0F0F0F0F), np.uint32(0x03030303)
    s_lo = u0 & k1
    s_hi = (u2 & k2) | (((u0 >> np.uint32(6)) & k3) << np.uint32(4))
    m_lo = u1 & k1
    m_hi = ((u2 >> np.uint32(4)) & k2) | (((u1 >> np.uint32(6)) & k3) << np.uint32(4))
    for k in range(4):
        sh = np.uint32(8 * k)
        sc[k] = np.int32((s_lo >> sh) & np.uint32(0xFF))
        sc[k + 4] = np.int32((s_hi >> sh) & np.uint32(0xFF))
        mn[k] = np.int32((m_lo >> sh) & np.uint32(0xFF))
        mn[k + 4] = np.int32((m_hi >> sh) & np.uint32(0xFF))


# --------------------------------------------------------------------------------------------------
# quantized matmul
# --------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _block_term(kind, da, dw, dm, isum, m):
    """The float32 contribution of one super-block (see module doc); m = msum (mins) or the offset term."""
    if kind == Q2_K or kind == Q4_K or kind == Q5_K:
        return da * (dw * np.float32(isum) - dm * np.float32(m))
    return (da * dw) * np.float32(np.int32(isum - m))


@njit(cache=True, nogil=True, inline="always")
def _rows(kind, w, rb, qs, d, bsums, out, r_start, r_end):
    """out[:, r] for rows r_start..r_end-1 (``w`` the flat weight bytes, ``rb`` bytes per row).

    Activation rows are taken in tiles of ``_TT``; for each tile every weight row is
    streamed front to back, each super-block unpacked once, its dot product with the tile's first
    activation row taken straight from registers, and the unpacked buffers then serve the other rows of
    the tile (four at a time).  The integer sums are exact whichever way they are grouped, and each
    out[t, r] accumulates the same float32 terms in block order, so rows are independent of T.
    Inlined into one function per type (``kind`` a constant there) so LLVM specialises everything."""
    T, n = qs.shape
    nb = n // QK_K
    ns = n // 16
    bb = rb // nb
    tt = _TT
    is_signed = kind == IQ4_XS
    vals = np.empty(QK_K, np.uint8)
    sc = np.empty(8 * 16, np.int16)
    mc = np.zeros(16, np.int32)
    for t0 in range(0, T, tt):
        t1 = min(T, t0 + tt)
        for r in range(r_start, r_end):
            for t in range(t0, t1):
                out[_U(t), _U(r)] = np.float32(0.0)
            for b in range(nb):
                o = r * rb + b * bb
                ao = t0 * n + b * QK_K
                bo = t0 * ns + b * 16
                dw, dm, isum, m = _unpack_dot(kind, w, o, vals, sc, mc, qs, ao, bsums, bo)
                out[_U(t0), _U(r)] += _block_term(kind, d[_U(t0), _U(b)], dw, dm, isum, m)
                t = t0 + 1
                while t + 4 <= t1:
                    ao = t * n + b * QK_K
                    bo = t * ns + b * 16
                    if is_signed:
                        i0, i1, i2, i3 = _kdot4_s(vals, sc, qs, ao, n)
                        m0 = m1 = m2 = m3 = np.int32(0)
                    else:
                        i0, i1, i2, i3 = _kdot4_u(vals, sc, qs, ao, n)
                        m0 = _idot16(mc, 0, bsums, bo)
                        m1 = _idot16(mc, 0, bsums, bo + ns)
                        m2 = _idot16(mc, 0, bsums, bo + 2 * ns)
                        m3 = _idot16(mc, 0, bsums, bo + 3 * ns)
                    out[_U(t), _U(r)] += _block_term(kind, d[_U(t), _U(b)], dw, dm, i0, m0)
                    out[_U(t + 1), _U(r)] += _block_term(kind, d[_U(t + 1), _U(b)], dw, dm, i1, m1)
                    out[_U(t + 2), _U(r)] += _block_term(kind, d[_U(t + 2), _U(b)], dw, dm, i2, m2)
                    out[_U(t + 3), _U(r)] += _block_term(kind, d[_U(t + 3), _U(b)], dw, dm, i3, m3)
                    t += 4
                while t < t1:
                    ao = t * n + b * QK_K
                    if is_signed:
                        isum = _kdot_s(vals, sc, qs, ao)
                        m = np.int32(0)
                    else:
                        isum = _kdot_u(vals, sc, qs, ao)
                        m = _idot16(mc, 0, bsums, t * ns + b * 16)
                    out[_U(t), _U(r)] += _block_term(kind, d[_U(t), _U(b)], dw, dm, isum, m)
                    t += 1


def _make_rows(kind):
    """``_rows`` for one type as a function of its own (``kind`` a closure constant): called by the matmul driver
    and by the fused kernels (``rows_k``)."""
    def rows(w, rb, qs, d, bsums, out, r_start, r_end):
        _rows(kind, w, rb, qs, d, bsums, out, r_start, r_end)
    rows.__name__ = rows.__qualname__ = f"rows_{TYPES[kind].key}"  # its own cache index file (see fused._make)
    return njit(cache=True, nogil=True)(rows)


# rows_k(kind, w, rb, qs, d, bsums, out, r_start, r_end): the row function of type ``kind`` (a constant)
ROWS = {t.type_id: _make_rows(t.type_id) for t in _TYPES}
rows_k = call_by_kind(ROWS, name="rows_k")


def _make_mm_kernel(kind):
    """The parallel matmul driver for one type: ``kind`` is a closure constant, so the kernel holds (and a first run
    compiles) only that type's row function, and its disk-cache entry is keyed on it."""
    def mm(w2, qs, d, bsums, out, nthreads):
        """Split the rows into one contiguous range per thread (rows are independent)."""
        rows, rb = w2.shape
        w = w2.reshape(w2.size)  # flat view (C-contiguous): blocks are addressed by byte offset
        nch = max(1, min(rows, nthreads))
        for c in prange(nch):
            r0 = c * rows // nch
            r1 = (c + 1) * rows // nch
            rows_k(kind, w, rb, qs, d, bsums, out, r0, r1)
    mm.__name__ = mm.__qualname__ = f"mm_k_{kind}"  # its own cache index file (see fused._make)
    return njit(cache=True, nogil=True, parallel=True)(mm)


def _check_mm(w, kind, qs, d, bsums, out):
    if qs.ndim != 2 or qs.dtype != np.int8:
        raise ValueError(f"qs must be int8 (T, n), got {qs.dtype}{qs.shape}")
    T, n = qs.shape
    rows = w.shape[0] if w.ndim == 2 else -1
    if n % QK_K or w.dtype != np.uint8 or w.shape != (rows, n // QK_K * BLOCK_BYTES[kind]):
        raise ValueError(f"weight {w.dtype}{w.shape} does not match activations {qs.shape} for type {kind}")
    if d.shape != (T, n // QK_K) or bsums.shape != (T, n // 16):
        raise ValueError(f"q8_K activations need d (T, n//256) and bsums (T, n//16), got {d.shape}, {bsums.shape}")
    if out.shape != (T, rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {(T, rows)}, got {out.dtype}{out.shape}")
    return (np.ascontiguousarray(w), np.ascontiguousarray(qs), np.ascontiguousarray(d, dtype=np.float32),
            np.ascontiguousarray(bsums, dtype=np.int32))


def _make_mm(kind, name):
    kern = _make_mm_kernel(kind)

    def matmul(w, qs, d, bsums, out):
        w, qs, d, bsums = _check_mm(w, kind, qs, d, bsums, out)
        if out.size:
            kern(w, qs, d, bsums, out, numba.get_num_threads())
        return out
    matmul.__name__ = matmul.__qualname__ = f"matmul_{name}"
    matmul.__doc__ = (f"out[t, r] = W[r] . x[t] for a {name.upper()} weight w uint8 (rows, row_bytes) and "
                      "act_q8_K activations (qs, d, bsums); out float32 (T, rows), preallocated.")
    return matmul


for _t in _TYPES:  # matmul_q2_k, ..., matmul_iq4_xs
    globals()[f"matmul_{_t.key}"] = _make_mm(_t.type_id, _t.key)

# --------------------------------------------------------------------------------------------------
# dequantization (float operation order of gguf-py's dequantize_blocks, for bit-exactness)
# --------------------------------------------------------------------------------------------------


def _make_dequant_k(kind):
    """The dequantization kernel of one type (``kind`` a closure constant: only its branch is compiled)."""
    def dequant_k(w2, out):
        rows, ncols = out.shape
        nb = ncols // QK_K
        rb = w2.shape[1]
        w = w2.reshape(w2.size)
        bb = rb // nb
        for r in prange(rows):
            sc = np.empty(16, np.int32)
            mn = np.empty(16, np.int32)
            for b in range(nb):
                o = r * rb + b * bb
                y0 = b * QK_K
                if kind == Q2_K:
                    d = _f16(w, o + 80)
                    dmin = _f16(w, o + 82)
                    for g in range(16):
                        s = w[_U(o + g)]
                        dl = d * np.float32(s & np.uint8(15))
                        ml = dmin * np.float32(s >> np.uint8(4))
                        h = g >> 3
                        j = (g >> 1) & 3
                        l0 = 16 * (g & 1)
                        for l in range(16):
                            q = (w[_U(o + 16 + 32 * h + l0 + l)] >> np.uint8(2 * j)) & np.uint8(3)
                            out[r, _U(y0 + 16 * g + l)] = dl * np.float32(q) - ml
                elif kind == Q3_K:
                    d = _f16(w, o + 108)
                    for g in range(16):
                        lo4 = (w[_U(o + 96 + (g & 7))] >> np.uint8(4 * (g >> 3))) & np.uint8(15)
                        hi2 = (w[_U(o + 104 + (g & 3))] >> np.uint8(2 * (g >> 2))) & np.uint8(3)
                        dl = d * np.float32(np.int32(lo4 | (hi2 << np.uint8(4))) - 32)
                        h = g >> 3
                        j = (g >> 1) & 3
                        l0 = 16 * (g & 1)
                        for l in range(16):
                            low = np.int32((w[_U(o + 32 + 32 * h + l0 + l)] >> np.uint8(2 * j)) & np.uint8(3))
                            hb = np.int32((w[_U(o + l0 + l)] >> np.uint8(4 * h + j)) & np.uint8(1))
                            out[r, _U(y0 + 16 * g + l)] = dl * np.float32(low - 4 + 4 * hb)
                elif kind == Q4_K or kind == Q5_K:
                    d = _f16(w, o)
                    dmin = _f16(w, o + 2)
                    _scale_min_k4(w, o + 4, sc, mn)
                    qo = o + 16 if kind == Q4_K else o + 48
                    for k in range(8):
                        dl = d * np.float32(sc[k])
                        ml = dmin * np.float32(mn[k])
                        sh = np.uint8(4 * (k & 1))
                        for l in range(32):
                            q = (w[_U(qo + 32 * (k >> 1) + l)] >> sh) & np.uint8(15)
                            if kind == Q5_K:
                                q |= ((w[_U(o + 16 + l)] >> np.uint8(k)) & np.uint8(1)) << np.uint8(4)
                            out[r, _U(y0 + 32 * k + l)] = dl * np.float32(q) - ml
                elif kind == Q6_K:
                    d = _f16(w, o + 208)
                    for g in range(16):
                        dl = d * np.float32(np.int8(w[_U(o + 192 + g)]))
                        h = g >> 3
                        k = (g >> 1) & 3
                        l0 = 16 * (g & 1)
                        for l in range(16):
                            ql = w[_U(o + 64 * h + 32 * (k & 1) + l0 + l)] >> np.uint8(4 * (k >> 1))
                            qh = (w[_U(o + 128 + 32 * h + l0 + l)] >> np.uint8(2 * k)) & np.uint8(3)
                            q = np.int32((ql & np.uint8(15)) | (qh << np.uint8(4))) - 32
                            out[r, _U(y0 + 16 * g + l)] = dl * np.float32(q)
                else:  # IQ4_XS
                    d = _f16(w, o)
                    sh = np.int32(w[_U(o + 2)]) | (np.int32(w[_U(o + 3)]) << 8)
                    for ib in range(8):
                        ls = np.int32((w[_U(o + 4 + (ib >> 1))] >> np.uint8(4 * (ib & 1))) & np.uint8(15))
                        ls |= ((sh >> (2 * ib)) & 3) << 4
                        dl = d * np.float32(ls - 32)
                        for j in range(16):
                            q = w[_U(o + 8 + 16 * ib + j)]
                            out[r, _U(y0 + 32 * ib + j)] = dl * np.float32(KVALUES_IQ4NL[q & np.uint8(15)])
                            out[r, _U(y0 + 32 * ib + 16 + j)] = dl * np.float32(KVALUES_IQ4NL[q >> np.uint8(4)])
    dequant_k.__name__ = dequant_k.__qualname__ = f"dequant_k_{kind}"  # its own cache index file (see fused._make)
    return njit(cache=True, nogil=True, parallel=True)(dequant_k)


def _make_dequant(kind, name):
    kern = _make_dequant_k(kind)

    def dequant(w, out):
        rows, ncols = out.shape
        if ncols % QK_K or w.dtype != np.uint8 or w.shape != (rows, ncols // QK_K * BLOCK_BYTES[kind]):
            raise ValueError(f"weight {w.dtype}{w.shape} does not match output {out.shape} for type {kind}")
        if out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError("out must be a C-contiguous float32 array")
        if out.size:
            kern(np.ascontiguousarray(w), out)
        return out
    dequant.__name__ = dequant.__qualname__ = f"dequant_{name}"
    dequant.__doc__ = (f"Dequantize a {name.upper()} weight w uint8 (rows, row_bytes) into out float32 "
                       "(rows, ncols), bit-exact with gguf.quants.dequantize.")
    return dequant


for _t in _TYPES:  # dequant_q2_k, ..., dequant_iq4_xs
    globals()[f"dequant_{_t.key}"] = _make_dequant(_t.type_id, _t.key)

# --------------------------------------------------------------------------------------------------
# Q8_K activation quantizer (llama.cpp quantize_row_q8_K)
# --------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _q8k_block(x, xb, t, b, qs, d, bsums):
    """One Q8_K block; ``xb`` is ``x`` viewed as uint32: for non-NaN floats ``bits & 0x7fffffff``
    orders like |x|, and an integer max reduction vectorises (a float one may not be reordered)."""
    o = b * QK_K
    amax = np.uint32(0)
    for j in range(QK_K):
        amax = max(amax, xb[_U(t), _U(o + j)] & np.uint32(0x7FFFFFFF))
    if amax == np.uint32(0):
        d[t, b] = np.float32(0.0)
        for j in range(QK_K):
            qs[_U(t), _U(o + j)] = 0
        for g in range(16):
            bsums[_U(t), _U(b * 16 + g)] = 0
        return
    j = 0
    while xb[_U(t), _U(o + j)] & np.uint32(0x7FFFFFFF) != amax:  # xmax: first value of largest |x|
        j += 1
    iscale = np.float32(-127.0) / x[_U(t), _U(o + j)]
    for j in range(QK_K):
        # nearest_int: round half to even (the 1.5*2^23 magic-number trick); |iscale*x| <= 127(1+eps)
        qs[_U(t), _U(o + j)] = np.int8(min(np.float32(127.0), np.rint(iscale * x[_U(t), _U(o + j)])))
    for g in range(16):
        s = np.int32(0)
        for j in range(16):
            s = np.int32(s + np.int32(qs[_U(t), _U(o + 16 * g + j)]))
        bsums[_U(t), _U(b * 16 + g)] = s
    d[t, b] = np.float32(1.0) / iscale


@njit(cache=True, nogil=True)
def _act_q8k_serial(x, qs, d, bsums):
    T, n = x.shape
    xb = x.view(np.uint32)
    for t in range(T):
        for b in range(n // QK_K):
            _q8k_block(x, xb, t, b, qs, d, bsums)


@njit(cache=True, nogil=True, parallel=True)
def _act_q8k_parallel(x, qs, d, bsums):
    T, n = x.shape
    nb = n // QK_K
    xb = x.view(np.uint32)
    for i in prange(T * nb):
        _q8k_block(x, xb, i // nb, i % nb, qs, d, bsums)


_ACT_PARALLEL_MIN = 1 << 16  # elements; below this a parallel launch costs more than it saves


def act_q8_K(x):
    """x float32 (T, n), n % 256 == 0 -> (qs int8 (T, n), d float32 (T, n//256), bsums int32 (T, n//16)).

    Per 256 values: xmax = first value of largest |x| (signed), iscale = -127/xmax,
    q = min(127, round_half_even(iscale*x)), d = 1/iscale, bsums = sums of 16 consecutive q.
    An all-zero block gives d = 0, q = 0.  Every block is computed by the same code whatever T is.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ValueError(f"q8_K activations need x float32 (T, n) with n % 256 == 0, got {x.shape}")
    T, n = x.shape
    qs = np.empty((T, n), np.int8)
    d = np.empty((T, n // QK_K), np.float32)
    bsums = np.empty((T, n // 16), np.int32)
    if x.size >= _ACT_PARALLEL_MIN:
        _act_q8k_parallel(x, qs, d, bsums)
    elif x.size:
        _act_q8k_serial(x, qs, d, bsums)
    return qs, d, bsums


KERNELS = {t.type_id: (globals()[f"dequant_{t.key}"], globals()[f"matmul_{t.key}"]) for t in _TYPES}
ACT = {"q8_K": act_q8_K}
