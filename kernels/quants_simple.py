"""Numba kernels for the block-32 quant types and the plain float types (formats and arithmetic: docs/numerics.md).

Types: those of the type registry (``llamba.kernels.traits``) with ``kernels="quants_simple"``: F32, F16, BF16 and
the block-32 types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL), whose kernels are all generated from their entry's block
layout (``traits.Block32``: byte offsets of d, m, the codes and the fifth bits, the bias, a value table).

Public API (every name below is a plain Python function; the work happens in ``@njit`` kernels):

* ``dequant_<t>(w, out)``: ``w`` is the raw weight view (quant types: ``uint8 (rows, row_bytes)``;
  F32: ``float32 (rows, ncols)``; F16: ``float16 (rows, ncols)``; BF16: ``uint16 (rows, ncols)`` raw bits),
  ``out`` a preallocated ``float32 (rows, ncols)``.  Bit-exact against ``gguf.quants.dequantize``.
* ``act_q8_0(x) -> (qs, d)``, ``act_q8_1(x) -> (qs, d, s)``, ``act_f32(x) -> (x,)``,
  ``act_f16(x) -> (x16,)``, ``act_bf16(x) -> (xbf,)``: activation conversion to a weight type's
  ``vec_dot_type`` (traits.py), ``x`` float32 ``(T, n)``.
* ``matmul_<t>(w, *act, out)``: ``out[t, r] = dot(W[r], x[t])`` computed like llama.cpp's CPU vec_dot:
  per 32-block an exact integer sum, then ``acc += (d_w*d_a)*isum`` (``+ m_w*s_a`` for Q4_1/Q5_1) in
  float32, blocks in order, no FMA.  Float types: 32 lane partial sums ``acc[j] += w[32k+j]*x[32k+j]``
  in order of k, then the fixed tree ``acc[:16]+acc[16:]``, ... down to one lane.
* ``KERNELS = {type_id: (dequant_fn, matmul_fn)}``, ``ACT = {vec_dot_type: act_fn}``.
* Per-type kernels are built in loops over the registry's block-32 entries and reached through compile-time
  dispatchers (``llamba.kernels.dispatch.by_kind``: ``_rows8(kind, ...)``, ``_pack8``, ``_rows8t``, ``_tile4_any``,
  ``_unpack``), ``kind`` being a closure constant of the per-type kernels.
* ``repack_q8_0(w) -> wp``, ``matmul_q8_0p(wp, qs, d, out)``: Q8_0 weights stored once in the transposed 8-row
  layout the T > 1 kernels otherwise build on every call (kind id ``Q8_0P``; 272 bytes per 8 rows and block, the
  raw size), bit-identical to ``matmul_q8_0``.  ``llamba.layers.Linear`` repacks its Q8_0 weights at load unless
  the environment sets LLAMBA_REPACK=0 (then every path reads the raw GGUF blocks, as before).

Row-exactness: ``out[t]`` depends only on ``W`` and ``x[t]`` (no fastmath, no FMA, the same float
operations for every T), so a batch gives bit-identical rows to one-row calls.
``llamba.kernels.ref.quants_simple`` holds the numpy twins, which reproduce these operation orders
exactly (the tests compare bit for bit).

Implementation notes:

* LLVM (as driven by Numba, which leaves SLP vectorization off) fully unrolls 16/32-trip inner loops of
  block formats and then scalarizes or gathers the block loop.  The per-block work is therefore written
  as small LLVM-IR intrinsics on explicit vector types; the loops around them are ordinary Numba code.
* Weight blocks are unpacked to unsigned bytes ``u = q + BIAS`` (Q4_0: 8, Q5_0: 16, Q8_0/IQ4_NL: 128,
  Q4_1/Q5_1: 0), and ``sum q*a = sum u*a - BIAS*sum a`` exactly, so one u8 x s8 dot serves every type:
  ``vpdpbusd`` where the CPU has AVX512-VNNI or AVX-VNNI, otherwise a generic IR pattern that x86
  lowers to ``vpmaddwd``.  IQ4_NL's table lookup is ``pshufb`` (x86) / ``tbl`` (AArch64), else selects.
* Quantized matmul: weight rows 8 at a time, whose 8 float32 chains are the lanes of one vector.
  T == 1 (decode): per block the 8 rows' dots straight from the packed weights, reduced by one
  transposed integer add tree.  T > 1: the 8 rows' unpacked blocks are transposed (dword k of vector s =
  dword s of row k), so 8 ``vpdpbusd`` with broadcast activation dwords leave row k's exact block sum in
  lane k -- no horizontal reduction per row.  2..4 rows (speculative verify) do that in registers; longer
  batches transpose each 8-row group once into a buffer and stream the activations 4 rows at a time.
* Repacked Q8_0 (``Q8_0P``): the transposed blocks and the 8 rows' fp16 scales of each 8-row group are one
  contiguous run, so every T (decode included) is the T > 1 scheme without the unpack/transpose: per block
  8 vector loads, then per activation row 8 ``vpdpbusd`` and one scale multiply (``_make_tilep``).
* The 8 rows of a group are 8 interleaved streams too short for the hardware prefetchers once a matrix
  is out of cache, so the decode/verify kernels prefetch the group _PF_GROUPS ahead in software.
* fp16 fields use ``fpext half`` (F16C on x86, native on AArch64); ``dequant_f16`` uses an exact bitwise
  conversion instead, which keeps signalling-NaN payloads the way numpy does.
* Target-specific instructions follow Numba's target CPU (``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``
  are honoured; with ``NUMBA_CPU_NAME=generic`` only target-independent IR is emitted).
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

from llamba.kernels.dispatch import by_kind
from llamba.kernels.traits import (BF16, F16, F32, IQ4_NL, KVALUES_IQ4NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,  # noqa: F401
                                   Q8_0P, TYPES, in_module)

# the types handled here (traits registry entries with kernels="quants_simple"); the block-32 ones are those with a
# block layout, from which every per-type kernel below is generated
_TYPES = in_module("quants_simple")

__all__ = [f"{op}_{t.key}" for op in ("dequant", "matmul") for t in _TYPES] + [
    "act_q8_0", "act_q8_1", "act_f32", "act_f16", "act_bf16",
    "repack_q8_0", "matmul_q8_0p", "dequant_rows_q8_0p", "Q8_0P",
    "KERNELS", "ACT", "KVALUES_IQ4NL",
]
_B32 = {t.type_id: t.layout for t in _TYPES if t.layout is not None}
QK = 32
BLOCK_BYTES = {k: TYPES[k].block_bytes for k in _B32}

_ACT_PAR_MIN = 1 << 16  # activation quantization: values below which it runs on one thread
_PF_GROUPS = 4  # decode matmul: prefetch the weight rows this many 8-row groups ahead
_PF_LOC = 2  # llvm.prefetch locality 2: prefetcht1 (into L2)

# --------------------------------------------------------------------------------------------------
# LLVM-IR building blocks
# --------------------------------------------------------------------------------------------------
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32T = ir.FloatType()


_FEATURES = _jit.target_features()
_TRIPLE = _llb.get_process_triple()
_X86 = _TRIPLE.startswith(("x86_64", "i686", "i386"))
_USE_PSHUFB = _X86 and _FEATURES.get("ssse3", False)
_USE_TBL = _TRIPLE.startswith(("aarch64", "arm64")) and _jit.target_is_host()
_USE_VNNI = _X86 and (_FEATURES.get("avxvnni", False)
                      or (_FEATURES.get("avx512vnni", False) and _FEATURES.get("avx512vl", False)))


# hardware fp16 <-> fp32 conversion (``fpext``/``fptrunc half``); without it LLVM would emit libcalls
# that Numba's JIT cannot resolve, so the bitwise versions below are used instead
_HW_F16 = (_X86 and _FEATURES.get("f16c", False)) or _USE_TBL


def _vt(t, n):
    return ir.VectorType(t, n)


def _splat(t, n, v):
    return ir.Constant(_vt(t, n), [ir.Constant(t, v)] * n)


def _idx(*vals):
    return ir.Constant(_vt(_I32, len(vals)), list(vals))


def _ptr(context, builder, arrty, arr, off, offty, elty):
    """Pointer (typed ``elty*``) to element ``off`` of a contiguous array."""
    ary = context.make_array(arrty)(context, builder, arr)
    off = context.cast(builder, off, offty, types.intp)
    return builder.bitcast(builder.gep(ary.data, [off]), elty.as_pointer())


def _like(ty, v):
    """Constant ``v`` of integer type ``ty`` (scalar or splat vector)."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [ir.Constant(ty.element, v)] * ty.count)
    return ir.Constant(ty, v)


def _h2f_ir(builder, h):
    """fp16 bits (i16 or <N x i16>) -> float32 (float or <N x float>), exact for every value."""
    vec = isinstance(h.type, ir.VectorType)
    fty = _vt(_F32T, h.type.count) if vec else _F32T
    if _HW_F16:
        return builder.fpext(builder.bitcast(h, _vt(ir.HalfType(), h.type.count) if vec else ir.HalfType()), fty)
    ity = _vt(_I32, h.type.count) if vec else _I32
    w = builder.zext(h, ity)
    sign = builder.shl(builder.and_(w, _like(ity, 0x8000)), _like(ity, 16))
    em = builder.and_(w, _like(ity, 0x7FFF))
    c = ir.Constant(_F32T, 2.0 ** -24)
    two_m24 = ir.Constant(fty, [c] * h.type.count) if vec else c
    sub = builder.bitcast(builder.fmul(builder.uitofp(em, fty), two_m24), ity)   # subnormal: em * 2^-24
    sh = builder.shl(em, _like(ity, 13))
    nrm = builder.add(sh, _like(ity, 0x38000000))
    inf = builder.add(sh, _like(ity, 0x70000000))                                   # inf / NaN (payload kept)
    bits = builder.select(builder.icmp_unsigned("<", em, _like(ity, 0x400)), sub,
                          builder.select(builder.icmp_unsigned(">=", em, _like(ity, 0x7C00)), inf, nrm))
    return builder.bitcast(builder.or_(bits, sign), fty)


def _load(builder, p, align=1):
    return builder.load(p, align=align)


def _nibbles(builder, qs16):
    """<16 x i8> packed bytes -> <32 x i8>: low nibbles (elements 0..15) then high nibbles (16..31)."""
    lo = builder.and_(qs16, _splat(_I8, 16, 15))
    hi = builder.lshr(qs16, _splat(_I8, 16, 4))
    return builder.shuffle_vector(lo, hi, _idx(*range(32)))


def _high_bits(builder, qh32):
    """i32 qh -> <32 x i8> holding bit j of qh at bit 4 (value 16 or 0) for element j.

    Byte-wise: element j tests bit j % 8 of byte j // 8 (little-endian), which is bit j of qh."""
    qb = builder.bitcast(qh32, _vt(_I8, 4))
    rep = builder.shuffle_vector(qb, ir.Constant(_vt(_I8, 4), None), _idx(*[j // 8 for j in range(32)]))
    bit = builder.and_(rep, ir.Constant(_vt(_I8, 32), [ir.Constant(_I8, 1 << (j % 8)) for j in range(32)]))
    return builder.select(builder.icmp_unsigned("!=", bit, _splat(_I8, 32, 0)), _splat(_I8, 32, 16), _splat(_I8, 32, 0))


def _lut16(builder, idx16, table):
    """Per-lane table lookup ``table[idx]`` (table: 16 byte values) for a <16 x i8> of indices 0..15."""
    tab = ir.Constant(_vt(_I8, 16), [ir.Constant(_I8, int(v) & 0xFF) for v in table])
    vt = _vt(_I8, 16)
    if _USE_PSHUFB:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt]),
                                            "llvm.x86.ssse3.pshuf.b.128")
        return builder.call(fn, [tab, idx16])
    if _USE_TBL:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt]),
                                            "llvm.aarch64.neon.tbl1.v16i8")
        return builder.call(fn, [tab, idx16])
    res = _splat(_I8, 16, int(table[0]) & 0xFF)
    for k in range(1, 16):
        eq = builder.icmp_unsigned("==", idx16, _splat(_I8, 16, k))
        res = builder.select(eq, _splat(_I8, 16, int(table[k]) & 0xFF), res)
    return res


# Unpacked weights are stored as unsigned bytes u = q + BIAS[kind] (u in 0..255), so that one
# u8 x s8 dot product (VNNI vpdpbusd where available) serves every type:
#   sum_j q_j a_j = sum_j u_j a_j - BIAS * sum_j a_j      (exact in int32)
BIAS = {k: lay.bias for k, lay in _B32.items()}


def _block_u(kind, builder, p):
    """IR: the 32 unsigned values u = q + BIAS[kind] of the block whose first byte is at i8* ``p``, read as the
    type's block layout (``traits.Block32``) says."""
    lay = _B32[kind]

    def at(off, ty):
        return builder.bitcast(builder.gep(p, [ir.Constant(_I64, off)]), ty.as_pointer())
    if lay.bits == 8:  # signed bytes: u = q + 128 = q ^ 0x80
        if lay.bias != 128:
            raise ValueError(f"8-bit block layout of type {kind} needs bias 128")
        return builder.xor(_load(builder, at(lay.qs, _vt(_I8, 32))), _splat(_I8, 32, 0x80))
    if lay.values is not None:  # 4-bit codes into a value table: u = table[code] + bias
        table = [int(v) + lay.bias for v in lay.values]
        qs = _load(builder, at(lay.qs, _vt(_I8, 16)))
        lo = builder.and_(qs, _splat(_I8, 16, 15))
        hi = builder.lshr(qs, _splat(_I8, 16, 4))
        return builder.shuffle_vector(_lut16(builder, lo, table), _lut16(builder, hi, table), _idx(*range(32)))
    q = _nibbles(builder, _load(builder, at(lay.qs, _vt(_I8, 16))))
    if lay.qh is not None:  # fifth bit of each code
        q = builder.or_(q, _high_bits(builder, _load(builder, at(lay.qh, _I32))))
    return q


def _make_unpack(kind):
    """intrinsic(src_u8, src_off, dst_u8, dst_off): u = q + BIAS of the block at src[src_off:] -> dst."""
    @intrinsic
    def unpack(typingctx, src, src_off, dst, dst_off):
        def codegen(context, builder, sig, args):
            p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _I8)
            u = _block_u(kind, builder, p)
            dp = _ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3], _vt(_I8, 32))
            builder.store(u, dp, align=1)
            return context.get_dummy_value()
        return types.none(src, src_off, dst, dst_off), codegen
    return unpack


_unpack = by_kind({k: _make_unpack(k) for k in _B32}, name="_unpack")  # _unpack(kind, src, src_off, dst, dst_off)


def _udot(builder, uv, av):
    """<32 x i8> u (unsigned), a (signed) -> vector of int32 partial sums of u*a (8 or 16 lanes)."""
    if _USE_VNNI:
        v8 = _vt(_I32, 8)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8, v8]),
                                            "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(fn, [ir.Constant(v8, [ir.Constant(_I32, 0)] * 8),
                                 builder.bitcast(uv, v8), builder.bitcast(av, v8)])
    # i32 multiply then even/odd lane add: LLVM's x86 backend emits vpmaddwd for this
    p = builder.mul(builder.zext(uv, _vt(_I32, 32)), builder.sext(av, _vt(_I32, 32)))
    return builder.add(builder.shuffle_vector(p, p, _idx(*range(0, 32, 2))),
                       builder.shuffle_vector(p, p, _idx(*range(1, 32, 2))))


def _add_shuf(builder, x, y, sel_a, sel_b):
    return builder.add(builder.shuffle_vector(x, y, _idx(*sel_a)), builder.shuffle_vector(x, y, _idx(*sel_b)))


def _reduce8(builder, ps):
    """Eight <8 x i32> vectors -> <8 x i32> of their lane sums (in-lane pairwise adds first, then across
    the two 128-bit halves; integer, exact)."""
    def hadd(a, b):  # [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]
        return _add_shuf(builder, a, b, (0, 2, 8, 10, 4, 6, 12, 14), (1, 3, 9, 11, 5, 7, 13, 15))
    h0 = hadd(hadd(ps[0], ps[1]), hadd(ps[2], ps[3]))  # [s0..s3 of the low halves | s0..s3 of the high halves]
    h1 = hadd(hadd(ps[4], ps[5]), hadd(ps[6], ps[7]))
    return _add_shuf(builder, h0, h1, (0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15))


def _row_ptrs8(builder, wp, r0v, nrv, rb):
    """i8* of rows r0 .. r0+7 of a weight with rb bytes per row, rows past the nrv valid ones clamped to the last
    valid row (a partial 8-row group reads real memory; its extra results are never stored)."""
    last = builder.sub(nrv, ir.Constant(_I64, 1))
    rps = []
    for k in range(8):
        kk = ir.Constant(_I64, k)
        rk = builder.select(builder.icmp_signed("<", kk, last), kk, last)
        rps.append(builder.gep(wp, [builder.mul(builder.add(r0v, rk), rb)]))
    return rps


def _store8(builder, acc, base, full, nrv):
    """Store the <8 x float> acc at float* base: all eight lanes with one vector store when `full` (i1), else
    only the first nrv lanes (the last, partial 8-row group of a matrix)."""
    v8f = acc.type
    with builder.if_else(full) as (then, otherwise):
        with then:
            builder.store(acc, builder.bitcast(base, v8f.as_pointer()), align=4)
        with otherwise:
            for k in range(8):
                with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, k), nrv)):
                    builder.store(builder.extract_element(acc, ir.Constant(_I32, k)),
                                  builder.gep(base, [ir.Constant(_I64, k)]), align=4)


def _prefetch_step(builder, pfbase, b, bb):
    """Software prefetch for the 8-row group kernels: the rows 8 at a time are 8 interleaved streams too short
    for the hardware prefetchers, so block step b prefetches bytes [8*bb*b, 8*bb*(b+1)) of the group
    _PF_GROUPS ahead (pfbase: its first byte); over the nb steps that covers the whole group."""
    pf = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]),
                                        "llvm.prefetch.p0i8")
    pb = builder.gep(pfbase, [builder.mul(b, ir.Constant(_I64, 8 * bb))])
    for j in range((8 * bb + 63) // 64):
        builder.call(pf, [builder.gep(pb, [ir.Constant(_I64, 64 * j)]), ir.Constant(_I32, 0),
                          ir.Constant(_I32, _PF_LOC), ir.Constant(_I32, 1)])


def _make_rows8(kind):
    """intrinsic(w, r0, nr, aq, asum, ad, as_, nb, res): the T == 1 (decode) dot products of 8 weight rows
    r0 .. r0+7 (rows past r0+nr-1 repeat row r0+nr-1) with one activation row, all in registers:
    per block b, in order, isum_k = exact int dot (u*a - bias*asum[b]) and, lane k = row k,
    acc_k = acc_k + ((d_k*ad[b])*float(isum_k) [+ m_k*as_[b]]).  res[0:8] = acc.
    The same float32 operations per row as the T > 1 paths (``_make_tile4``, ``_make_rows8t``) and the
    numpy twin."""
    bb = BLOCK_BYTES[kind]
    lay = _B32[kind]
    has_min = lay.has_min
    bias = lay.bias

    @intrinsic
    def rows8(typingctx, w, r0, nr, aq, asum, ad, as_, nb, res):
        def codegen(context, builder, sig, args):
            zero = ir.Constant(_I64, 0)
            v8f = _vt(_F32T, 8)
            wp = _ptr(context, builder, sig.args[0], args[0], zero, types.int64, _I8)
            r0v = context.cast(builder, args[1], sig.args[1], types.int64)
            nrv = context.cast(builder, args[2], sig.args[2], types.int64)
            n = context.cast(builder, args[7], sig.args[7], types.int64)
            rb = builder.mul(n, ir.Constant(_I64, bb))
            rps = _row_ptrs8(builder, wp, r0v, nrv, rb)
            ap = _ptr(context, builder, sig.args[3], args[3], zero, types.int64, _vt(_I8, 32))
            sp = _ptr(context, builder, sig.args[4], args[4], zero, types.int64, _I32)
            dap = _ptr(context, builder, sig.args[5], args[5], zero, types.int64, _F32T)
            sap = _ptr(context, builder, sig.args[6], args[6], zero, types.int64, _F32T)
            slot = cgutils.alloca_once_value(builder, ir.Constant(v8f, [ir.Constant(_F32T, 0.0)] * 8))

            def splat8(v):
                x = builder.insert_element(ir.Constant(_vt(v.type, 8), None), v, ir.Constant(_I32, 0))
                return builder.shuffle_vector(x, ir.Constant(_vt(v.type, 8), None), _idx(*([0] * 8)))

            def field(off, bo):
                h = ir.Constant(_vt(_I16, 8), None)
                for k in range(8):
                    p = builder.bitcast(builder.gep(rps[k], [builder.add(bo, ir.Constant(_I64, off))]),
                                        _I16.as_pointer())
                    h = builder.insert_element(h, builder.load(p, align=1), ir.Constant(_I32, k))
                return _h2f_ir(builder, h)

            pfbase = builder.gep(wp, [builder.mul(builder.add(r0v, ir.Constant(_I64, 8 * _PF_GROUPS)), rb)])
            with cgutils.for_range(builder, n) as loop:
                b = loop.index
                bo = builder.mul(b, ir.Constant(_I64, bb))
                _prefetch_step(builder, pfbase, b, bb)
                av = _load(builder, builder.gep(ap, [b]))
                ps = []
                for k in range(8):
                    p = _udot(builder, _block_u(kind, builder, builder.gep(rps[k], [bo])), av)
                    if p.type.count == 16:
                        p = builder.add(builder.shuffle_vector(p, p, _idx(*range(8))),
                                        builder.shuffle_vector(p, p, _idx(*range(8, 16))))
                    ps.append(p)
                isum = _reduce8(builder, ps)
                if bias:
                    bs = builder.mul(builder.load(builder.gep(sp, [b]), align=4), ir.Constant(_I32, bias))
                    isum = builder.sub(isum, splat8(bs))
                term = builder.fmul(builder.fmul(field(lay.d, bo), splat8(builder.load(builder.gep(dap, [b]), align=4))),
                                    builder.sitofp(isum, v8f))
                if has_min:
                    term = builder.fadd(term, builder.fmul(field(lay.m, bo),
                                                           splat8(builder.load(builder.gep(sap, [b]), align=4))))
                builder.store(builder.fadd(builder.load(slot), term), slot)
            builder.store(builder.load(slot), _ptr(context, builder, sig.args[8], args[8], zero, types.int64, v8f),
                          align=4)
            return context.get_dummy_value()
        return types.none(w, r0, nr, aq, asum, ad, as_, nb, res), codegen
    return rows8


# _rows8(kind, w, r0, nr, aq, asum, ad, as_, nb, res)
_rows8 = by_kind({k: _make_rows8(k) for k in _B32}, name="_rows8")


# --- T > 1: 8 weight rows x up to 4 activation rows per step, weights transposed once per 8-row group ---

def _dpbusd(builder, acc, uv, av):
    """<8 x i32> acc + per-dword dots: lane k += sum_i u[4k+i]*a[4k+i] (u unsigned, a signed bytes)."""
    v8 = _vt(_I32, 8)
    if _USE_VNNI:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8, v8]),
                                            "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(fn, [acc, builder.bitcast(uv, v8), builder.bitcast(av, v8)])
    p = builder.mul(builder.zext(uv, _vt(_I32, 32)), builder.sext(av, _vt(_I32, 32)))
    p = _add_shuf(builder, p, p, range(0, 32, 2), range(1, 32, 2))
    return builder.add(acc, _add_shuf(builder, p, p, range(0, 16, 2), range(1, 16, 2)))


def _dot8x8(builder, acc, vs, pa, splat8):
    """acc + sum_j dpbusd(V_j, broadcast(dword j of the activation block at i8* pa)), j < 8: lane k gets the exact
    dot of row k's block.  Two accumulation chains (even / odd j; integer, so exact in any grouping): one chain
    of 8 dependent vpdpbusd would bound the loop by their latency."""
    chains = [acc, ir.Constant(_vt(_I32, 8), [ir.Constant(_I32, 0)] * 8)]
    for j in range(8):
        a4 = builder.load(builder.bitcast(builder.gep(pa, [ir.Constant(_I64, 4 * j)]), _I32.as_pointer()), align=1)
        chains[j % 2] = _dpbusd(builder, chains[j % 2], vs[j], builder.bitcast(splat8(a4), _vt(_I8, 32)))
    return builder.add(chains[0], chains[1])


def _transpose8(builder, us):
    """Eight <32 x i8> rows -> eight <32 x i8> V_s with dword k of V_s = dword s of row k."""
    d = [builder.bitcast(u, _vt(_I32, 8)) for u in us]

    def sh(a, b, sel):
        return builder.shuffle_vector(a, b, _idx(*sel))
    lo32, hi32 = (0, 8, 1, 9, 4, 12, 5, 13), (2, 10, 3, 11, 6, 14, 7, 15)
    lo64, hi64 = (0, 1, 8, 9, 4, 5, 12, 13), (2, 3, 10, 11, 6, 7, 14, 15)
    a = [sh(d[i], d[i + 1], sel) for i in (0, 2, 4, 6) for sel in (lo32, hi32)]   # a0=lo01 a1=hi01 a2=lo23 ..
    b = []
    for base in (0, 4):   # rows 0-3, rows 4-7
        lo_a, hi_a, lo_b, hi_b = a[base], a[base + 1], a[base + 2], a[base + 3]
        b += [sh(lo_a, lo_b, lo64), sh(lo_a, lo_b, hi64), sh(hi_a, hi_b, lo64), sh(hi_a, hi_b, hi64)]
    # b[0..3]: rows 0-3, dwords (0,4), (1,5), (2,6), (3,7) in the two 128-bit halves; b[4..7]: rows 4-7
    out = [None] * 8
    for j in range(4):
        out[j] = sh(b[j], b[4 + j], (0, 1, 2, 3, 8, 9, 10, 11))
        out[j + 4] = sh(b[j], b[4 + j], (4, 5, 6, 7, 12, 13, 14, 15))
    return [builder.bitcast(v, _vt(_I8, 32)) for v in out]


def _make_pack8(kind):
    """intrinsic(w, r0, nr, nb, vbuf, dbuf, mbuf): for the 8 weight rows r0.. (rows past r0+nr-1 repeat the
    last), every block b: the unpacked bytes u = q + BIAS transposed so that dword k of
    vbuf[256b + 32s : +32] is dword s of row k's block, and the scales d (mins m) of the 8 rows as
    dbuf[8b : 8b+8] (mbuf) float32."""
    bb = BLOCK_BYTES[kind]
    lay = _B32[kind]
    has_min = lay.has_min

    @intrinsic
    def pack8(typingctx, w, r0, nr, nb, vbuf, dbuf, mbuf):
        def codegen(context, builder, sig, args):
            zero = ir.Constant(_I64, 0)
            wp = _ptr(context, builder, sig.args[0], args[0], zero, types.int64, _I8)
            r0v = context.cast(builder, args[1], sig.args[1], types.int64)
            nrv = context.cast(builder, args[2], sig.args[2], types.int64)
            n = context.cast(builder, args[3], sig.args[3], types.int64)
            rb = builder.mul(n, ir.Constant(_I64, bb))
            rps = _row_ptrs8(builder, wp, r0v, nrv, rb)
            vp = _ptr(context, builder, sig.args[4], args[4], zero, types.int64, _vt(_I8, 32))
            dp = _ptr(context, builder, sig.args[5], args[5], zero, types.int64, _vt(_F32T, 8))
            mp = _ptr(context, builder, sig.args[6], args[6], zero, types.int64, _vt(_F32T, 8))

            def field(off, bo):
                h = ir.Constant(_vt(_I16, 8), None)
                for k in range(8):
                    p = builder.bitcast(builder.gep(rps[k], [builder.add(bo, ir.Constant(_I64, off))]),
                                        _I16.as_pointer())
                    h = builder.insert_element(h, builder.load(p, align=1), ir.Constant(_I32, k))
                return _h2f_ir(builder, h)

            pfbase = builder.gep(wp, [builder.mul(builder.add(r0v, ir.Constant(_I64, 8 * _PF_GROUPS)), rb)])
            with cgutils.for_range(builder, n) as loop:
                b = loop.index
                bo = builder.mul(b, ir.Constant(_I64, bb))
                _prefetch_step(builder, pfbase, b, bb)
                us = [_block_u(kind, builder, builder.gep(rps[k], [bo])) for k in range(8)]
                vs = _transpose8(builder, us)
                vb = builder.mul(b, ir.Constant(_I64, 8))
                for j in range(8):
                    builder.store(vs[j], builder.gep(vp, [builder.add(vb, ir.Constant(_I64, j))]), align=1)
                builder.store(field(lay.d, bo), builder.gep(dp, [b]), align=4)
                if has_min:
                    builder.store(field(lay.m, bo), builder.gep(mp, [b]), align=4)
            return context.get_dummy_value()
        return types.none(w, r0, nr, nb, vbuf, dbuf, mbuf), codegen
    return pack8


# _pack8(kind, w, r0, nr, nb, vbuf, dbuf, mbuf)
_pack8 = by_kind({k: _make_pack8(k) for k in _B32}, name="_pack8")


def _make_tile4(has_min, bias):
    """intrinsic(vbuf, dbuf, mbuf, aq, t0, nt, n, asum, ad, as_, nb, out, r0, nr): activation rows t0..t0+nt-1
    (nt <= 4) against the 8 packed weight rows of vbuf/dbuf/mbuf (``_make_pack8``).  Per row pair (t, k), blocks
    in order: isum = -bias*asum[t, b] + sum of 8 dword dots (exact int32), acc = acc + ((d_k*ad[t,b])*float(isum)
    [+ m_k*as_[t,b]]) -- lane-wise the operations of the T == 1 path.  out[t, r0+k] = acc for k < nr.
    aq, asum, ad, as_ and out are addressed flat: aq[t*n + j], asum[t*nb + b], out[t*rows + r] (rows = out row
    length, passed as out's second dimension)."""
    @intrinsic
    def tile4(typingctx, vbuf, dbuf, mbuf, aq, t0, nt, n, asum, ad, as_, nb, out, r0, nr, rows):
        def codegen(context, builder, sig, args):
            zero = ir.Constant(_I64, 0)
            v8f = _vt(_F32T, 8)
            v8i = _vt(_I32, 8)
            vp = _ptr(context, builder, sig.args[0], args[0], zero, types.int64, _vt(_I8, 32))
            dp = _ptr(context, builder, sig.args[1], args[1], zero, types.int64, v8f)
            mp = _ptr(context, builder, sig.args[2], args[2], zero, types.int64, v8f)
            ap = _ptr(context, builder, sig.args[3], args[3], zero, types.int64, _I8)
            t0v = context.cast(builder, args[4], sig.args[4], types.int64)
            ntv = context.cast(builder, args[5], sig.args[5], types.int64)
            nn = context.cast(builder, args[6], sig.args[6], types.int64)
            sp = _ptr(context, builder, sig.args[7], args[7], zero, types.int64, _I32)
            dap = _ptr(context, builder, sig.args[8], args[8], zero, types.int64, _F32T)
            sap = _ptr(context, builder, sig.args[9], args[9], zero, types.int64, _F32T)
            nbv = context.cast(builder, args[10], sig.args[10], types.int64)
            op = _ptr(context, builder, sig.args[11], args[11], zero, types.int64, _F32T)
            r0v = context.cast(builder, args[12], sig.args[12], types.int64)
            nrv = context.cast(builder, args[13], sig.args[13], types.int64)
            rowsv = context.cast(builder, args[14], sig.args[14], types.int64)
            last = builder.sub(ntv, ir.Constant(_I64, 1))
            ts = []
            for i in range(4):
                ii = ir.Constant(_I64, i)
                ts.append(builder.add(t0v, builder.select(builder.icmp_signed("<", ii, last), ii, last)))
            aps = [builder.gep(ap, [builder.mul(t, nn)]) for t in ts]           # activation row t
            sofs = [builder.mul(t, nbv) for t in ts]                           # row t of (T, nb) arrays
            slots = [cgutils.alloca_once_value(builder, ir.Constant(v8f, [ir.Constant(_F32T, 0.0)] * 8))
                     for _ in range(4)]

            def splat8(v):
                x = builder.insert_element(ir.Constant(_vt(v.type, 8), None), v, ir.Constant(_I32, 0))
                return builder.shuffle_vector(x, ir.Constant(_vt(v.type, 8), None), _idx(*([0] * 8)))

            with cgutils.for_range(builder, nbv) as loop:
                b = loop.index
                vb = builder.mul(b, ir.Constant(_I64, 8))
                vs = [_load(builder, builder.gep(vp, [builder.add(vb, ir.Constant(_I64, j))]), 32) for j in range(8)]
                dv = _load(builder, builder.gep(dp, [b]), 32)
                mv = _load(builder, builder.gep(mp, [b]), 32) if has_min else None
                ab = builder.mul(b, ir.Constant(_I64, 32))
                for i in range(4):
                    si = builder.add(sofs[i], b)
                    if bias:
                        acc = splat8(builder.mul(builder.load(builder.gep(sp, [si]), align=4), ir.Constant(_I32, -bias)))
                    else:
                        acc = ir.Constant(v8i, [ir.Constant(_I32, 0)] * 8)
                    pa = builder.gep(aps[i], [ab])
                    acc = _dot8x8(builder, acc, vs, pa, splat8)
                    term = builder.fmul(builder.fmul(dv, splat8(builder.load(builder.gep(dap, [si]), align=4))),
                                        builder.sitofp(acc, v8f))
                    if has_min:
                        term = builder.fadd(term, builder.fmul(mv, splat8(builder.load(builder.gep(sap, [si]),
                                                                                        align=4))))
                    builder.store(builder.fadd(builder.load(slots[i]), term), slots[i])
            # stores: rows t0 .. t0+nt-1, columns r0 .. r0+nr-1
            full = builder.icmp_signed("==", nrv, ir.Constant(_I64, 8))
            for i in range(4):
                valid = builder.icmp_signed("<", ir.Constant(_I64, i), ntv)
                with builder.if_then(valid):
                    base = builder.gep(op, [builder.add(builder.mul(ts[i], rowsv), r0v)])
                    _store8(builder, builder.load(slots[i]), base, full, nrv)
            return context.get_dummy_value()
        return types.none(vbuf, dbuf, mbuf, aq, t0, nt, n, asum, ad, as_, nb, out, r0, nr, rows), codegen
    return tile4


def _make_rows8t(kind, nt):
    """intrinsic(w, r0, nr, aq, n, asum, ad, as_, nb, out, rows): nt (2..4) activation rows 0..nt-1 against the 8
    weight rows r0.. (``_make_pack8`` + ``_make_tile4`` fused for a small batch: each block of the 8 rows is
    unpacked and transposed in registers and used at once for the nt rows; no buffer).  Same operations per
    (t, r) as the other paths.  out[t, r0+k] for t < nt, k < nr (out addressed flat, row length rows)."""
    bb = BLOCK_BYTES[kind]
    lay = _B32[kind]
    has_min = lay.has_min
    bias = lay.bias

    @intrinsic
    def rows8t(typingctx, w, r0, nr, aq, n, asum, ad, as_, nb, out, rows):
        def codegen(context, builder, sig, args):
            zero = ir.Constant(_I64, 0)
            v8f = _vt(_F32T, 8)
            v8i = _vt(_I32, 8)
            wp = _ptr(context, builder, sig.args[0], args[0], zero, types.int64, _I8)
            r0v = context.cast(builder, args[1], sig.args[1], types.int64)
            nrv = context.cast(builder, args[2], sig.args[2], types.int64)
            ap = _ptr(context, builder, sig.args[3], args[3], zero, types.int64, _I8)
            nn = context.cast(builder, args[4], sig.args[4], types.int64)
            sp = _ptr(context, builder, sig.args[5], args[5], zero, types.int64, _I32)
            dap = _ptr(context, builder, sig.args[6], args[6], zero, types.int64, _F32T)
            sap = _ptr(context, builder, sig.args[7], args[7], zero, types.int64, _F32T)
            nbv = context.cast(builder, args[8], sig.args[8], types.int64)
            op = _ptr(context, builder, sig.args[9], args[9], zero, types.int64, _F32T)
            rowsv = context.cast(builder, args[10], sig.args[10], types.int64)
            rb = builder.mul(nbv, ir.Constant(_I64, bb))
            rps = _row_ptrs8(builder, wp, r0v, nrv, rb)
            slots = [cgutils.alloca_once_value(builder, ir.Constant(v8f, [ir.Constant(_F32T, 0.0)] * 8))
                     for _ in range(nt)]

            def splat8(v):
                x = builder.insert_element(ir.Constant(_vt(v.type, 8), None), v, ir.Constant(_I32, 0))
                return builder.shuffle_vector(x, ir.Constant(_vt(v.type, 8), None), _idx(*([0] * 8)))

            def field(off, bo):
                h = ir.Constant(_vt(_I16, 8), None)
                for k in range(8):
                    p = builder.bitcast(builder.gep(rps[k], [builder.add(bo, ir.Constant(_I64, off))]),
                                        _I16.as_pointer())
                    h = builder.insert_element(h, builder.load(p, align=1), ir.Constant(_I32, k))
                return _h2f_ir(builder, h)

            pfbase = builder.gep(wp, [builder.mul(builder.add(r0v, ir.Constant(_I64, 8 * _PF_GROUPS)), rb)])
            with cgutils.for_range(builder, nbv) as loop:
                b = loop.index
                bo = builder.mul(b, ir.Constant(_I64, bb))
                _prefetch_step(builder, pfbase, b, bb)
                vs = _transpose8(builder, [_block_u(kind, builder, builder.gep(rps[k], [bo])) for k in range(8)])
                dv = field(lay.d, bo)
                mv = field(lay.m, bo) if has_min else None
                ab = builder.mul(b, ir.Constant(_I64, 32))
                for i in range(nt):
                    si = builder.add(builder.mul(ir.Constant(_I64, i), nbv), b)
                    if bias:
                        acc = splat8(builder.mul(builder.load(builder.gep(sp, [si]), align=4), ir.Constant(_I32, -bias)))
                    else:
                        acc = ir.Constant(v8i, [ir.Constant(_I32, 0)] * 8)
                    pa = builder.gep(ap, [builder.add(builder.mul(ir.Constant(_I64, i), nn), ab)])
                    acc = _dot8x8(builder, acc, vs, pa, splat8)
                    term = builder.fmul(builder.fmul(dv, splat8(builder.load(builder.gep(dap, [si]), align=4))),
                                        builder.sitofp(acc, v8f))
                    if has_min:
                        term = builder.fadd(term, builder.fmul(mv, splat8(builder.load(builder.gep(sap, [si]),
                                                                                        align=4))))
                    builder.store(builder.fadd(builder.load(slots[i]), term), slots[i])
            full = builder.icmp_signed("==", nrv, ir.Constant(_I64, 8))
            for i in range(nt):
                base = builder.gep(op, [builder.add(builder.mul(ir.Constant(_I64, i), rowsv), r0v)])
                _store8(builder, builder.load(slots[i]), base, full, nrv)
            return context.get_dummy_value()
        return types.none(w, r0, nr, aq, n, asum, ad, as_, nb, out, rows), codegen
    return rows8t


# _rows8t(kind, nt, w, r0, nr, aq, n, asum, ad, as_, nb, out, rows), nt in 2..4
_rows8t = by_kind({(k, nt): _make_rows8t(k, nt) for k in _B32 for nt in (2, 3, 4)}, keys=2, name="_rows8t")

# _tile4(kind, vbuf, dbuf, mbuf, aq, t0, nt, n, asum, ad, as_, nb, out, r0, nr, rows): one tile kernel per
# (has_min, bias), shared by the types with the same pair
_TILE4_BY_FORMAT = {}
for _lay in _B32.values():
    if (_lay.has_min, _lay.bias) not in _TILE4_BY_FORMAT:
        _TILE4_BY_FORMAT[(_lay.has_min, _lay.bias)] = _make_tile4(_lay.has_min, _lay.bias)
_tile4_any = by_kind({k: _TILE4_BY_FORMAT[(lay.has_min, lay.bias)] for k, lay in _B32.items()}, name="_tile4_any")


# --- Q8_0 repacked at load (``repack_q8_0``): the transposed 8-row layout stored once, no per-call unpacking ---
#
# Packed array: uint8 (G, nb * 272), G = ceil(rows / 8).  Row g holds weight rows 8g .. 8g+7 (rows past the
# last repeat it): bytes [256 b, 256 b + 256) = block b's unpacked bytes u = q + 128 transposed as ``_pack8``
# writes them (dword k of the 32-byte vector s = dword s of row k's block), then bytes [256 nb + 16 b, +16) =
# the 8 rows' fp16 scales of block b (converted to float32 exactly, in registers).  272 bytes per 8 rows and
# block: the size of the raw Q8_0 blocks.

PACK_BB = 272  # packed bytes per (8-row group, block)


@intrinsic
def _repack8_q8_0(typingctx, w, r0, nr, nb, dst, g):
    """Packed row g of ``dst`` from the raw Q8_0 rows r0 .. r0+nr-1 of ``w`` (see above)."""
    def codegen(context, builder, sig, args):
        zero = ir.Constant(_I64, 0)
        wp = _ptr(context, builder, sig.args[0], args[0], zero, types.int64, _I8)
        r0v = context.cast(builder, args[1], sig.args[1], types.int64)
        nrv = context.cast(builder, args[2], sig.args[2], types.int64)
        n = context.cast(builder, args[3], sig.args[3], types.int64)
        gv = context.cast(builder, args[5], sig.args[5], types.int64)
        rb = builder.mul(n, ir.Constant(_I64, BLOCK_BYTES[Q8_0]))
        rps = _row_ptrs8(builder, wp, r0v, nrv, rb)
        base = builder.gep(_ptr(context, builder, sig.args[4], args[4], zero, types.int64, _I8),
                           [builder.mul(gv, builder.mul(n, ir.Constant(_I64, PACK_BB)))])
        vp = builder.bitcast(base, _vt(_I8, 32).as_pointer())
        dp = builder.bitcast(builder.gep(base, [builder.mul(n, ir.Constant(_I64, 256))]), _vt(_I16, 8).as_pointer())
        with cgutils.for_range(builder, n) as loop:
            b = loop.index
            bo = builder.mul(b, ir.Constant(_I64, BLOCK_BYTES[Q8_0]))
            vs = _transpose8(builder, [_block_u(Q8_0, builder, builder.gep(rps[k], [bo])) for k in range(8)])
            vb = builder.mul(b, ir.Constant(_I64, 8))
            for j in range(8):
                builder.store(vs[j], builder.gep(vp, [builder.add(vb, ir.Constant(_I64, j))]), align=1)
            h = ir.Constant(_vt(_I16, 8), None)
            for k in range(8):
                p = builder.bitcast(builder.gep(rps[k], [bo]), _I16.as_pointer())
                h = builder.insert_element(h, builder.load(p, align=1), ir.Constant(_I32, k))
            builder.store(h, builder.gep(dp, [b]), align=1)
        return context.get_dummy_value()
    return types.none(w, r0, nr, nb, dst, g), codegen


# packed kernels: software prefetch this many bytes ahead in the (contiguous) packed stream, for 2..4 activation
# rows only.  Measured on the 117 MiB padded fixture (one thread): T = 1 is fastest with the hardware prefetchers
# alone (a software prefetch at any distance cost it ~8 %), T = 2..4 gain 10-25 % from it, most at 16 KiB
# (1, 4, 16 and 64 KiB tried).
_PF_PACKED_BYTES = 16384


def _make_tilep(nt):
    """intrinsic(wp, g, nb, aq, t0, n, asum, ad, out, r0, nr, rows): activation rows t0 .. t0+nt-1 (nt = 1..4, fixed
    at compile time) against packed row g of a repacked Q8_0 weight (weight rows r0 = 8g .. r0+nr-1).  Per (t, k),
    blocks in order: isum = -128*asum[t, b] + sum of 8 dword dots (exact int32), acc = acc + ((d_k*ad[t, b]) *
    float(isum)) -- the operations of ``_make_rows8`` / ``_make_rows8t`` / ``_make_tile4``.  aq, asum, ad and out
    are addressed flat as in ``_make_tile4``."""
    @intrinsic
    def tilep(typingctx, wp, g, nb, aq, t0, n, asum, ad, out, r0, nr, rows):
        def codegen(context, builder, sig, args):
            zero = ir.Constant(_I64, 0)
            v8f = _vt(_F32T, 8)
            gv = context.cast(builder, args[1], sig.args[1], types.int64)
            nbv = context.cast(builder, args[2], sig.args[2], types.int64)
            ap = _ptr(context, builder, sig.args[3], args[3], zero, types.int64, _I8)
            t0v = context.cast(builder, args[4], sig.args[4], types.int64)
            nn = context.cast(builder, args[5], sig.args[5], types.int64)
            sp = _ptr(context, builder, sig.args[6], args[6], zero, types.int64, _I32)
            dap = _ptr(context, builder, sig.args[7], args[7], zero, types.int64, _F32T)
            op = _ptr(context, builder, sig.args[8], args[8], zero, types.int64, _F32T)
            r0v = context.cast(builder, args[9], sig.args[9], types.int64)
            nrv = context.cast(builder, args[10], sig.args[10], types.int64)
            rowsv = context.cast(builder, args[11], sig.args[11], types.int64)
            gbytes = builder.mul(nbv, ir.Constant(_I64, PACK_BB))
            w0 = _ptr(context, builder, sig.args[0], args[0], zero, types.int64, _I8)
            base = builder.gep(w0, [builder.mul(gv, gbytes)])
            vp = builder.bitcast(base, _vt(_I8, 32).as_pointer())
            dp = builder.bitcast(builder.gep(base, [builder.mul(nbv, ir.Constant(_I64, 256))]),
                                 _vt(_I16, 8).as_pointer())
            ts = [builder.add(t0v, ir.Constant(_I64, i)) for i in range(nt)]
            aps = [builder.gep(ap, [builder.mul(t, nn)]) for t in ts]
            sofs = [builder.mul(t, nbv) for t in ts]
            slots = [cgutils.alloca_once_value(builder, ir.Constant(v8f, [ir.Constant(_F32T, 0.0)] * 8))
                     for _ in range(nt)]

            def splat8(v):
                x = builder.insert_element(ir.Constant(_vt(v.type, 8), None), v, ir.Constant(_I32, 0))
                return builder.shuffle_vector(x, ir.Constant(_vt(v.type, 8), None), _idx(*([0] * 8)))

            pfbase = builder.gep(base, [ir.Constant(_I64, _PF_PACKED_BYTES)])
            pf = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0i8")
            with cgutils.for_range(builder, nbv) as loop:
                b = loop.index
                if nt > 1:  # step b prefetches bytes [272 b, 272 b + 272) + _PF_PACKED_BYTES of the stream
                    pb = builder.gep(pfbase, [builder.mul(b, ir.Constant(_I64, PACK_BB))])
                    for j in range((PACK_BB + 63) // 64):
                        builder.call(pf, [builder.gep(pb, [ir.Constant(_I64, 64 * j)]), ir.Constant(_I32, 0),
                                          ir.Constant(_I32, _PF_LOC), ir.Constant(_I32, 1)])
                vb = builder.mul(b, ir.Constant(_I64, 8))
                vs = [_load(builder, builder.gep(vp, [builder.add(vb, ir.Constant(_I64, j))]), 1) for j in range(8)]
                dv = _h2f_ir(builder, _load(builder, builder.gep(dp, [b]), 1))
                ab = builder.mul(b, ir.Constant(_I64, 32))
                for i in range(nt):
                    si = builder.add(sofs[i], b)
                    acc = splat8(builder.mul(builder.load(builder.gep(sp, [si]), align=4), ir.Constant(_I32, -128)))
                    acc = _dot8x8(builder, acc, vs, builder.gep(aps[i], [ab]), splat8)
                    term = builder.fmul(builder.fmul(dv, splat8(builder.load(builder.gep(dap, [si]), align=4))),
                                        builder.sitofp(acc, v8f))
                    builder.store(builder.fadd(builder.load(slots[i]), term), slots[i])
            full = builder.icmp_signed("==", nrv, ir.Constant(_I64, 8))
            for i in range(nt):
                obase = builder.gep(op, [builder.add(builder.mul(ts[i], rowsv), r0v)])
                _store8(builder, builder.load(slots[i]), obase, full, nrv)
            return context.get_dummy_value()
        return types.none(wp, g, nb, aq, t0, n, asum, ad, out, r0, nr, rows), codegen
    return tilep


_tilep1, _tilep2, _tilep3, _tilep4 = (_make_tilep(1), _make_tilep(2), _make_tilep(3), _make_tilep(4))


@intrinsic
def _dequant_block(typingctx, wu, woff, bias, d, m, has_min, out, ooff):
    """out[ooff+j] = d*float(wu[woff+j] - bias) (+ m if has_min) for j < 32, float32, unfused."""
    def codegen(context, builder, sig, args):
        uv = _load(builder, _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _vt(_I8, 32)))
        b = context.cast(builder, args[2], sig.args[2], types.int32)
        bv = builder.shuffle_vector(builder.insert_element(ir.Constant(_vt(_I32, 32), None), b, ir.Constant(_I32, 0)),
                                    ir.Constant(_vt(_I32, 32), None), _idx(*([0] * 32)))
        q = builder.sub(builder.zext(uv, _vt(_I32, 32)), bv)
        f = builder.sitofp(q, _vt(_F32T, 32))

        def fsplat(v):
            x = builder.insert_element(ir.Constant(_vt(_F32T, 32), None), v, ir.Constant(_I32, 0))
            return builder.shuffle_vector(x, ir.Constant(_vt(_F32T, 32), None), _idx(*([0] * 32)))
        y = builder.fmul(fsplat(args[3]), f)
        y_min = builder.fadd(y, fsplat(args[4]))
        y = builder.select(context.cast(builder, args[5], sig.args[5], types.boolean), y_min, y)
        op = _ptr(context, builder, sig.args[6], args[6], args[7], sig.args[7], _vt(_F32T, 32))
        builder.store(y, op, align=4)
        return context.get_dummy_value()
    return types.none(wu, woff, bias, types.float32, types.float32, has_min, out, ooff), codegen


@intrinsic
def _f16_at(typingctx, src, off):
    """fp16 (little-endian, at byte/element offset ``off`` of a uint8/uint16 array) -> float32."""
    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _I16)
        h = builder.load(p, align=1)
        return _h2f_ir(builder, h)
    return types.float32(src, off), codegen


@intrinsic
def _absmax32(typingctx, x, off):
    """max_j |x[off+j]| for j < 32 (float32; exact, order-independent for non-NaN inputs)."""
    def codegen(context, builder, sig, args):
        v = _load(builder, _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _vt(_F32T, 32)), 4)
        a = builder.bitcast(builder.and_(builder.bitcast(v, _vt(_I32, 32)), _splat(_I32, 32, 0x7FFFFFFF)),
                            _vt(_F32T, 32))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32T, [a.type]),
                                            "llvm.vector.reduce.fmax.v32f32")
        return builder.call(fn, [a])
    return types.float32(x, off), codegen


@intrinsic
def _quant32(typingctx, x, off, idv, qs, qoff):
    """qs[qoff+j] = int8(round_half_even(x[off+j]*id)) for j < 32; returns sum_j qs[qoff+j] (int32)."""
    def codegen(context, builder, sig, args):
        v = _load(builder, _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _vt(_F32T, 32)), 4)
        i = builder.insert_element(ir.Constant(_vt(_F32T, 32), None), args[2], ir.Constant(_I32, 0))
        i = builder.shuffle_vector(i, ir.Constant(_vt(_F32T, 32), None), _idx(*([0] * 32)))
        rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v.type, [v.type]), "llvm.rint.v32f32")
        q = builder.fptosi(builder.call(rint, [builder.fmul(v, i)]), _vt(_I32, 32))
        builder.store(builder.trunc(q, _vt(_I8, 32)),
                      _ptr(context, builder, sig.args[3], args[3], args[4], sig.args[4], _vt(_I8, 32)), align=1)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [q.type]),
                                            "llvm.vector.reduce.add.v32i32")
        return builder.call(fn, [q])
    return types.int32(x, off, types.float32, qs, qoff), codegen


@intrinsic
def _round_f16_hw(typingctx, x):
    """float32 -> nearest fp16 (round to nearest even) -> float32, hardware conversion."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), _F32T)
    return types.float32(types.float32), codegen


def _make_fdot(wkind, nt):
    """intrinsic(w, woff, x, o_1..o_nt, n, res): res[k] = dot(w[woff:woff+n], x[o_k:o_k+n]) for k < nt.

    ``w`` is float32 (F32), uint16 fp16 bits (F16) or uint16 bf16 bits (BF16); ``x`` float32 (flat
    offsets).  Per dot: 32 lane sums acc[j] += w[32i+j]*x[32i+j] for i in order, the n % 32 tail
    added to lanes 0..n%32-1, then the tree acc[:16]+acc[16:], ..., down to one lane.  Each weight
    chunk is loaded and converted once for the ``nt`` activation rows."""
    v32f = _vt(_F32T, 32)

    def widen(builder, wv):
        if wkind == F16:
            return _h2f_ir(builder, wv)
        if wkind == BF16:
            return builder.bitcast(builder.shl(builder.zext(wv, _vt(_I32, wv.type.count)),
                                               _splat(_I32, wv.type.count, 16)), _vt(_F32T, wv.type.count))
        return wv

    def codegen(context, builder, sig, args):
        welt = _F32T if wkind == F32 else _I16
        wp = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], welt)
        xps = [_ptr(context, builder, sig.args[2], args[2], args[3 + k], sig.args[3 + k], _F32T) for k in range(nt)]
        n = context.cast(builder, args[3 + nt], sig.args[3 + nt], types.intp)
        full = builder.udiv(n, ir.Constant(_I64, 32))
        rem = builder.urem(n, ir.Constant(_I64, 32))
        slots = [cgutils.alloca_once_value(builder, ir.Constant(v32f, [ir.Constant(_F32T, 0.0)] * 32))
                 for _ in range(nt)]

        def vec_at(p, i, ty):
            return builder.bitcast(builder.gep(p, [builder.mul(i, ir.Constant(_I64, 32))]), ty.as_pointer())
        with cgutils.for_range(builder, full) as loop:
            wv = widen(builder, _load(builder, vec_at(wp, loop.index, _vt(welt, 32)), align=2))
            for k in range(nt):
                xv = _load(builder, vec_at(xps[k], loop.index, v32f), align=4)
                builder.store(builder.fadd(builder.load(slots[k]), builder.fmul(wv, xv)), slots[k])
        base = builder.mul(full, ir.Constant(_I64, 32))
        with cgutils.for_range(builder, rem) as loop:  # tail: lane j gets element base + j
            j = loop.index
            e = builder.add(base, j)
            wv = builder.load(builder.gep(wp, [e]), align=2)
            if wkind != F32:
                wv = builder.extract_element(widen(builder, builder.insert_element(
                    ir.Constant(_vt(_I16, 1), None), wv, ir.Constant(_I32, 0))), ir.Constant(_I32, 0))
            lane = builder.trunc(j, _I32)
            for k in range(nt):
                acc = builder.load(slots[k])
                v = builder.fadd(builder.extract_element(acc, lane),
                                 builder.fmul(wv, builder.load(builder.gep(xps[k], [e]), align=4)))
                builder.store(builder.insert_element(acc, v, lane), slots[k])
        resp = _ptr(context, builder, sig.args[4 + nt], args[4 + nt], ir.Constant(_I64, 0), types.int64, _F32T)
        for k in range(nt):
            v = builder.load(slots[k])
            h = 16
            while h >= 1:
                v = builder.fadd(builder.shuffle_vector(v, v, _idx(*range(h))),
                                 builder.shuffle_vector(v, v, _idx(*range(h, 2 * h))))
                h //= 2
            builder.store(builder.extract_element(v, ir.Constant(_I32, 0)),
                          builder.gep(resp, [ir.Constant(_I64, k)]), align=4)
        return context.get_dummy_value()

    if nt == 1:
        @intrinsic
        def fdot(typingctx, w, woff, x, o0, n, res):
            return types.none(w, woff, x, o0, n, res), codegen
    else:
        @intrinsic
        def fdot(typingctx, w, woff, x, o0, o1, o2, o3, n, res):
            return types.none(w, woff, x, o0, o1, o2, o3, n, res), codegen
    return fdot


# _fdot1(wkind, w, woff, x, o0, n, res), _fdot4(wkind, w, woff, x, o0, o1, o2, o3, n, res) for the float types
_fdot1 = by_kind({k: _make_fdot(k, 1) for k in (F32, F16, BF16)}, name="_fdot1")
_fdot4 = by_kind({k: _make_fdot(k, 4) for k in (F32, F16, BF16)}, name="_fdot4")

# --------------------------------------------------------------------------------------------------
# scalar helpers
# --------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _h2f_exact(h):
    """fp16 bits -> float32, bitwise (keeps NaN payloads unquieted, as numpy does)."""
    h = np.uint32(h)
    s = np.uint32((h & np.uint32(0x8000)) << np.uint32(16))
    em = np.uint32(h & np.uint32(0x7FFF))
    sub = np.float32(np.float32(em) * np.float32(5.9604644775390625e-08)).view(np.uint32)  # em * 2^-24
    nrm = np.uint32((em << np.uint32(13)) + np.uint32(0x38000000))
    inf = np.uint32((em << np.uint32(13)) + np.uint32(0x70000000))
    b = sub if em < np.uint32(0x400) else (inf if em >= np.uint32(0x7C00) else nrm)
    return np.uint32(b | s).view(np.float32)


@njit(cache=True, nogil=True)
def _round_f16_sw(x):
    """float32 -> nearest fp16 (round to nearest even, as numpy's npy_floatbits_to_halfbits) -> float32."""
    f = np.float32(x).view(np.uint32)
    hs = np.uint32((f & np.uint32(0x80000000)) >> np.uint32(16))
    fe = np.uint32(f & np.uint32(0x7F800000))
    fm = np.uint32(f & np.uint32(0x007FFFFF))
    if fe >= np.uint32(0x47800000):            # overflow to inf, or inf / NaN
        if fe == np.uint32(0x7F800000) and fm != np.uint32(0):
            hb = np.uint32(np.uint32(0x7C00) + (fm >> np.uint32(13)))
            if hb == np.uint32(0x7C00):
                hb = np.uint32(0x7C01)
        else:
            hb = np.uint32(0x7C00)
    elif fe <= np.uint32(0x38000000):          # half subnormal or zero
        if fe < np.uint32(0x33000000):
            hb = np.uint32(0)
        else:
            e = np.uint32(fe >> np.uint32(23))
            sig = np.uint32(np.uint32(0x00800000) + fm)
            sig = np.uint32(sig >> np.uint32(np.uint32(113) - e))
            tie = np.uint32(sig & np.uint32(0x3FFF)) == np.uint32(0x1000)
            if not tie or np.uint32(f & np.uint32(0x7FF)) != np.uint32(0):
                sig = np.uint32(sig + np.uint32(0x1000))
            hb = np.uint32(sig >> np.uint32(13))
    else:
        he = np.uint32((fe - np.uint32(0x38000000)) >> np.uint32(13))
        if np.uint32(fm & np.uint32(0x3FFF)) != np.uint32(0x1000):
            fm = np.uint32(fm + np.uint32(0x1000))
        hb = np.uint32(he + (fm >> np.uint32(13)))
    return _h2f_exact(np.uint32(hs | hb))


_round_f16 = _round_f16_hw if _HW_F16 else _round_f16_sw


@njit(cache=True, nogil=True, inline="always")
def _round_bf16(x):
    """float32 -> bf16 (round to nearest even, NaN forced quiet; ggml_compute_fp32_to_bf16) -> float32."""
    u = np.float32(x).view(np.uint32)
    nan = np.uint32(u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    qnan = np.uint32(np.uint32(u & np.uint32(0xFFFF0000)) | np.uint32(0x00400000))
    rne = np.uint32(np.uint32(u + np.uint32(np.uint32(0x7FFF) + np.uint32((u >> np.uint32(16)) & np.uint32(1))))
                    & np.uint32(0xFFFF0000))
    return np.uint32(qnan if nan else rne).view(np.float32)


@njit(cache=True, nogil=True)
def _chunks(n_items, nthreads):
    return max(1, min(n_items, nthreads))


# --------------------------------------------------------------------------------------------------
# block unpacking (one weight row at a time)
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# dequantization
# --------------------------------------------------------------------------------------------------


def _make_dequant_kernel(kind):
    """The dequantization kernel of one block-32 type (its layout's byte offsets and bias closure constants)."""
    lay = _B32[kind]
    bb = BLOCK_BYTES[kind]
    d_off = lay.d
    m_off = lay.m if lay.has_min else 0
    has_min = lay.has_min
    bias = lay.bias

    def dq(w, out, nthreads):
        rows, ncols = out.shape
        nb = ncols // QK
        nch = _chunks(rows, 4 * nthreads)
        for c in prange(nch):
            u = np.empty(ncols, np.uint8)
            dw = np.empty(nb, np.float32)
            mw = np.zeros(nb, np.float32)
            for r in range(c * rows // nch, (c + 1) * rows // nch):
                wr = w[r]
                for b in range(nb):  # d (and m) of every block, as float32
                    dw[b] = _f16_at(wr, b * bb + d_off)
                    if has_min:
                        mw[b] = _f16_at(wr, b * bb + m_off)
                for b in range(nb):  # u[32b + j] = q + BIAS (uint8)
                    _unpack(kind, wr, b * bb, u, b * QK)
                orow = out[r]
                for b in range(nb):
                    _dequant_block(u, b * QK, bias, dw[b], mw[b], has_min, orow, b * QK)
    dq.__name__ = dq.__qualname__ = f"dequant_quant_{kind}"  # its own cache index file (see fused._make)
    return njit(cache=True, nogil=True, parallel=True)(dq)


@njit(cache=True, nogil=True, parallel=True)
def _dequant_f16_kernel(w, out):
    rows, ncols = out.shape
    for r in prange(rows):
        for i in range(ncols):
            out[r, i] = _h2f_exact(w[r, i])


@njit(cache=True, nogil=True, parallel=True)
def _dequant_bf16_kernel(w, out):
    rows, ncols = out.shape
    for r in prange(rows):
        for i in range(ncols):
            out[r, i] = np.uint32(np.uint32(w[r, i]) << np.uint32(16)).view(np.float32)


def _check_quant(w, out, kind):
    rows, ncols = out.shape
    if ncols % QK or w.shape != (rows, ncols // QK * BLOCK_BYTES[kind]) or w.dtype != np.uint8:
        raise ValueError(f"weight {w.dtype}{w.shape} does not match output {out.shape} for type {kind}")
    if out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array")
    return np.ascontiguousarray(w)


def _make_dequant(kind, name):
    kern = _make_dequant_kernel(kind)

    def dequant(w, out):
        kern(_check_quant(w, out, kind), out, numba.get_num_threads())
        return out
    dequant.__name__ = dequant.__qualname__ = f"dequant_{name}"
    dequant.__doc__ = f"Dequantize a {name.upper()} weight (uint8 (rows, row_bytes)) into out float32 (rows, ncols)."
    return dequant


# dequant_<key> for every block-32 type of the registry (dequant_q4_0, ..., dequant_iq4_nl)
for _k in _B32:
    globals()[f"dequant_{TYPES[_k].key}"] = _make_dequant(_k, TYPES[_k].key)


def dequant_f32(w, out):
    """F32 weight float32 (rows, ncols) -> out (a copy)."""
    out[...] = w
    return out


def dequant_f16(w, out):
    """F16 weight float16 (rows, ncols) -> out float32 (exact, NaN payloads kept as numpy does)."""
    _dequant_f16_kernel(np.ascontiguousarray(w).view(np.uint16), out)
    return out


def dequant_bf16(w, out):
    """BF16 weight as raw uint16 bits (rows, ncols) -> out float32 (exact)."""
    _dequant_bf16_kernel(np.ascontiguousarray(w).view(np.uint16), out)
    return out


# --------------------------------------------------------------------------------------------------
# activation quantizers
# --------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, parallel=True)
def _act_q8_kernel(x, qs, d, s, with_sum):
    """llama.cpp quantize_row_q8_0/q8_1 (x86 SIMD path): per block amax, d = amax/127, id = 127/amax,
    q = round_half_even(x*id); d stored as fp16; s = fp16(d * sum(q)) with the unrounded d.
    Serial below _ACT_PAR_MIN values (a parallel start costs more than the work)."""
    T, n = x.shape
    if T * n < _ACT_PAR_MIN:
        for t in range(T):
            _act_q8_row(x, qs, d, s, with_sum, t)
        return
    for t in prange(T):
        _act_q8_row(x, qs, d, s, with_sum, t)


@njit(cache=True, nogil=True, inline="always")
def _act_q8_row(x, qs, d, s, with_sum, t):
    xr = x[t]
    qr = qs[t]
    for b in range(x.shape[1] // QK):
        _act_q8_block(xr, qr, b, d, s, with_sum, t)


@njit(cache=True, nogil=True, inline="always")
def _act_q8_block(xr, qr, b, d, s, with_sum, t):
    """Activation block b of row t (xr = x[t], qr = qs[t]): llama.cpp's quantize_row_q8_1 (Q8_0: its first two
    arrays) -> qr[32b:32b+32], d[t, b] (and s[t, b] = d * sum q with with_sum); returns the exact sum of q."""
    c127 = np.float32(127.0)
    amax = _absmax32(xr, b * QK)
    db = amax / c127
    idb = c127 / amax if amax != np.float32(0.0) else np.float32(0.0)
    isum = _quant32(xr, b * QK, idb, qr, b * QK)
    d[t, b] = _round_f16(db)
    if with_sum:
        s[t, b] = _round_f16(db * np.float32(isum))
    return isum


def _act_input(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"activations must be 2-D (T, n), got shape {x.shape}")
    return x


def act_q8_0(x):
    """x float32 (T, n), n % 32 == 0 -> (qs int8 (T, n), d float32 (T, n//32), d fp16-rounded)."""
    x = _act_input(x)
    T, n = x.shape
    if n % QK:
        raise ValueError(f"q8_0 activations need n % 32 == 0, got n={n}")
    qs = np.empty((T, n), np.int8)
    d = np.empty((T, n // QK), np.float32)
    _act_q8_kernel(x, qs, d, d, False)
    return qs, d


def act_q8_1(x):
    """x float32 (T, n) -> (qs int8 (T, n), d float32 (T, n//32), s float32 (T, n//32)), d and s fp16-rounded."""
    x = _act_input(x)
    T, n = x.shape
    if n % QK:
        raise ValueError(f"q8_1 activations need n % 32 == 0, got n={n}")
    qs = np.empty((T, n), np.int8)
    d = np.empty((T, n // QK), np.float32)
    s = np.empty((T, n // QK), np.float32)
    _act_q8_kernel(x, qs, d, s, True)
    return qs, d, s


@njit(cache=True, nogil=True, parallel=True)
def _act_f16_kernel(x, out):
    T, n = x.shape
    for t in prange(T):
        for i in range(n):
            out[t, i] = _round_f16(x[t, i])


@njit(cache=True, nogil=True, parallel=True)
def _act_bf16_kernel(x, out):
    T, n = x.shape
    for t in prange(T):
        for i in range(n):
            out[t, i] = _round_bf16(x[t, i])


def act_f32(x):
    """x float32 (T, n) -> (x,) (C-contiguous float32)."""
    return (_act_input(x),)


def act_f16(x):
    """x float32 (T, n) -> (x rounded to fp16 (nearest even), as float32,)."""
    x = _act_input(x)
    out = np.empty_like(x)
    _act_f16_kernel(x, out)
    return (out,)


def act_bf16(x):
    """x float32 (T, n) -> (x rounded to bf16 (nearest even, ggml_compute_fp32_to_bf16), as float32,)."""
    x = _act_input(x)
    out = np.empty_like(x)
    _act_bf16_kernel(x, out)
    return (out,)


# --------------------------------------------------------------------------------------------------
# quantized matmul
# --------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _block_sums(aq, t, asum):
    for b in range(asum.shape[0]):
        s = 0
        for j in range(QK):
            s += aq[t, b * QK + j]
        asum[b] = s


def _make_mm_quant(kind):
    """The quantized matmul kernel for one type (``kind`` a closure constant: Numba prunes the other types' code
    before typing, so a first run compiles only the types a model has; the disk-cache entry is keyed on it)."""
    def mm(w, aq, ad, as_, out, nthreads):
        """out[t, r] = sum over blocks b, in order, of (dw*da)*isum (+ mw*sa for Q4_1/Q5_1), float32.

        Weight rows go 8 at a time (the 8 float chains are the lanes of one vector), split over threads:
        T == 1 (decode): dots straight from the packed blocks, one transposed integer reduction per block
        (``_make_rows8``).  2 <= T <= 4 (speculative verify): each block of the 8 rows unpacked and transposed
        in registers, then one broadcast-activation dot chain per row t (``_make_rows8t``).  T > 4 (prefill):
        the 8 rows unpacked and transposed once into a small buffer, then activation rows 4 at a time
        (``_make_pack8``, ``_make_tile4``).  kind == Q8_0P (``repack_q8_0``; rows = out.shape[1]): every T reads
        the packed groups, activation rows 1..4 at a time (``_make_tilep``).  The integer sums are exact and the
        float operations per (t, r) are the same in every path."""
        T, n = aq.shape
        nb = n // QK
        if kind == Q8_0P:  # repacked Q8_0 (``repack_q8_0``): no unpacking or transposing, any T
            rows = out.shape[1]
            asum = np.empty((T, nb), np.int32)
            for t in range(T):
                _block_sums(aq, t, asum[t])
            aqf = aq.reshape(T * n)
            sf = asum.reshape(T * nb)
            adf = ad.reshape(T * nb)
            of = out.reshape(T * rows)
            ngroups = w.shape[0]
            nch = _chunks(ngroups, nthreads)
            for c in prange(nch):
                for g in range(c * ngroups // nch, (c + 1) * ngroups // nch):
                    r0 = g * 8
                    nr = min(8, rows - r0)
                    for t0 in range(0, T, 4):
                        _tilep_any(min(4, T - t0), w, g, nb, aqf, t0, n, sf, adf, of, r0, nr, rows)
            return
        rows = w.shape[0]
        if T == 1:
            asum1 = np.empty(nb, np.int32)
            _block_sums(aq, 0, asum1)
            a0 = aq[0]
            d0 = ad[0]
            s0 = as_[0]
            ngroups = (rows + 7) // 8
            nch = _chunks(ngroups, nthreads)
            for c in prange(nch):
                res = np.empty(8, np.float32)
                for g in range(c * ngroups // nch, (c + 1) * ngroups // nch):
                    r0 = g * 8
                    nr = min(8, rows - r0)
                    _rows8(kind, w, r0, nr, a0, asum1, d0, s0, nb, res)
                    for k in range(nr):
                        out[0, r0 + k] = res[k]
            return
        asum = np.empty((T, nb), np.int32)
        for t in range(T):
            _block_sums(aq, t, asum[t])
        ngroups = (rows + 7) // 8
        nch = _chunks(ngroups, nthreads)
        if T <= 4:  # verify-sized batches: unpack, transpose and use each block of 8 rows at once
            aq1 = aq.reshape(T * n)
            s1 = asum.reshape(T * nb)
            ad1 = ad.reshape(T * nb)
            as1 = as_.reshape(T * nb)
            o1 = out.reshape(T * rows)
            for c in prange(nch):
                for g in range(c * ngroups // nch, (c + 1) * ngroups // nch):
                    _rows8t_any(kind, T, w, g * 8, min(8, rows - g * 8), aq1, n, s1, ad1, as1, nb, o1, rows)
            return
        aqf = aq.reshape(T * n)
        sf = asum.reshape(T * nb)
        adf = ad.reshape(T * nb)
        asf = as_.reshape(T * nb)
        of = out.reshape(T * rows)
        for c in prange(nch):
            vbuf = np.empty(nb * 256, np.uint8)
            dbuf = np.empty(nb * 8, np.float32)
            mbuf = np.empty(nb * 8, np.float32)
            for g in range(c * ngroups // nch, (c + 1) * ngroups // nch):
                r0 = g * 8
                nr = min(8, rows - r0)
                _pack8(kind, w, r0, nr, nb, vbuf, dbuf, mbuf)
                for t0 in range(0, T, 4):
                    _tile4_any(kind, vbuf, dbuf, mbuf, aqf, t0, min(4, T - t0), n, sf, adf, asf, nb, of, r0, nr, rows)
    mm.__name__ = mm.__qualname__ = f"mm_quant_{kind}"  # its own cache index file (see fused._make)
    return njit(cache=True, nogil=True, parallel=True)(mm)


_MM_QUANT = {}


def _mm_quant(w, kind, aq, ad, as_, out, nthreads):
    """The matmul kernel of type ``kind`` (built on first use) on these arguments."""
    kern = _MM_QUANT.get(kind)
    if kern is None:
        kern = _MM_QUANT[kind] = _make_mm_quant(kind)
    kern(w, aq, ad, as_, out, nthreads)


@njit(cache=True, nogil=True, inline="always")
def _rows8t_any(kind, nt, w, r0, nr, aq, n, asum, ad, as_, nb, out, rows):
    if nt == 2:
        _rows8t(kind, 2, w, r0, nr, aq, n, asum, ad, as_, nb, out, rows)
    elif nt == 3:
        _rows8t(kind, 3, w, r0, nr, aq, n, asum, ad, as_, nb, out, rows)
    else:
        _rows8t(kind, 4, w, r0, nr, aq, n, asum, ad, as_, nb, out, rows)


@njit(cache=True, nogil=True, inline="always")
def _tilep_any(nt, wp, g, nb, aq, t0, n, asum, ad, out, r0, nr, rows):
    if nt == 1:
        _tilep1(wp, g, nb, aq, t0, n, asum, ad, out, r0, nr, rows)
    elif nt == 2:
        _tilep2(wp, g, nb, aq, t0, n, asum, ad, out, r0, nr, rows)
    elif nt == 3:
        _tilep3(wp, g, nb, aq, t0, n, asum, ad, out, r0, nr, rows)
    else:
        _tilep4(wp, g, nb, aq, t0, n, asum, ad, out, r0, nr, rows)


@njit(cache=True, nogil=True, parallel=True)
def _repack_q8_0_kernel(w, rows, nb, out):
    for g in prange(out.shape[0]):
        _repack8_q8_0(w, g * 8, min(8, rows - g * 8), nb, out, g)


def repack_q8_0(w, chunk_bytes: int = 0, done=None):
    """Raw Q8_0 weight uint8 (rows, nb*34) -> the packed layout (``Q8_0P``, see above): read-only uint8
    (ceil(rows/8), nb*272), 64-byte aligned.  ``matmul_q8_0p`` / ``fused`` compute with it exactly what the raw
    kernels compute with ``w``.

    With chunk_bytes > 0 the rows are repacked in chunks of about that many raw bytes (whole 8-row groups) and
    ``done(r1)`` is called after each chunk with the number of rows repacked so far, so that the caller can drop
    the raw pages already copied (a large tensor, e.g. a 170 MiB embedding, then never sits in memory twice)."""
    rows, rb = w.shape
    if w.dtype != np.uint8 or rb % BLOCK_BYTES[Q8_0]:
        raise ValueError(f"not a Q8_0 weight: {w.dtype}{w.shape}")
    nb = rb // BLOCK_BYTES[Q8_0]
    G = (rows + 7) // 8
    size = G * nb * PACK_BB
    buf = np.empty(size + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    out = buf[off:off + size].reshape(G, nb * PACK_BB)
    if size:
        repack_rows(_repack_q8_0_kernel, w, nb, out, chunk_bytes, done)
    out.flags.writeable = False
    return out


def repack_rows(kernel, w, nb, out, chunk_bytes: int = 0, done=None):
    """Run a repack kernel over the rows of w into out (8 rows per packed row): all at once, or with chunk_bytes > 0
    in chunks of about that many raw bytes (whole 8-row groups), calling done(rows repacked so far) after each."""
    rows, rb = w.shape
    w = np.ascontiguousarray(w)
    step = rows if chunk_bytes <= 0 else max(8, chunk_bytes // max(rb, 1) // 8 * 8)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        kernel(w[r0:r1], r1 - r0, nb, out[r0 // 8:(r1 + 7) // 8])
        if done is not None:
            done(r1)


@njit(cache=True, nogil=True, parallel=True)
def _dequant_rows_q8_0p_kernel(wp, ids, nb, out):
    for i in prange(ids.shape[0]):
        r = ids[i]
        k = r % 8
        row = wp[r // 8]
        o = out[i]
        for b in range(nb):
            sb = 256 * nb + 16 * b + 2 * k
            d = _h2f_exact(np.uint32(row[sb]) | (np.uint32(row[sb + 1]) << np.uint32(8)))
            base = 256 * b + 4 * k
            for s in range(8):
                for j in range(4):
                    o[32 * b + 4 * s + j] = d * np.float32(np.int32(row[base + 32 * s + j]) - np.int32(128))


def dequant_rows_q8_0p(wp, ids, out):
    """out[i] = row ids[i] of the Q8_0 weight that ``wp = repack_q8_0(W)`` holds, dequantized (d * q, float32):
    bit-identical to dequantizing those rows of W (token-embedding lookups of a tied, repacked output matrix,
    without touching the raw pages again).  ids int64 (n,) in range; out float32 (n, cols)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, cols = out.shape
    nb = cols // QK
    if cols % QK or wp.dtype != np.uint8 or wp.shape[1] != nb * PACK_BB or ids.shape != (n,):
        raise ValueError(f"packed weight {wp.dtype}{wp.shape} does not match out {out.shape} / ids {ids.shape}")
    if n and (ids.min() < 0 or ids.max() >= 8 * wp.shape[0]):
        raise ValueError("row id out of range")
    if out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous float32")
    _dequant_rows_q8_0p_kernel(wp, ids, nb, out)
    return out


def matmul_q8_0p(wp, qs, d, out):
    """out[t, r] = W[r] . x[t] for a repacked Q8_0 weight ``wp = repack_q8_0(W)`` and act_q8_0 activations
    (qs, d); out float32 (T, rows), rows = out.shape[1].  Bit-identical to ``matmul_q8_0(W, qs, d, out)``."""
    T, n = qs.shape
    rows = out.shape[1]
    if n % QK or wp.dtype != np.uint8 or wp.shape != ((rows + 7) // 8, n // QK * PACK_BB):
        raise ValueError(f"packed weight {wp.dtype}{wp.shape} does not match activations {qs.shape} and "
                         f"{rows} output rows")
    if qs.dtype != np.int8 or d.shape != (T, n // QK):
        raise ValueError("activations must be (qs int8 (T, n), d float32 (T, n//32))")
    if out.shape != (T, rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {(T, rows)}, got {out.dtype}{out.shape}")
    d = np.ascontiguousarray(d, dtype=np.float32)
    _mm_quant(np.ascontiguousarray(wp), Q8_0P, np.ascontiguousarray(qs), d, d, out, numba.get_num_threads())
    return out


def _check_mm(w, kind, qs, d, out):
    T, n = qs.shape
    rows = w.shape[0]
    if n % QK or w.dtype != np.uint8 or w.shape != (rows, n // QK * BLOCK_BYTES[kind]):
        raise ValueError(f"weight {w.dtype}{w.shape} does not match activations {qs.shape} for type {kind}")
    if qs.dtype != np.int8 or d.shape != (T, n // QK):
        raise ValueError("activations must be (qs int8 (T, n), d float32 (T, n//32), ...)")
    if out.shape != (T, rows) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {(T, rows)}, got {out.dtype}{out.shape}")
    return np.ascontiguousarray(w), np.ascontiguousarray(qs), np.ascontiguousarray(d, dtype=np.float32)


def _make_mm_q8_0(kind, name):
    def matmul(w, qs, d, out):
        w, qs, d = _check_mm(w, kind, qs, d, out)
        _mm_quant(w, kind, qs, d, d, out, numba.get_num_threads())
        return out
    matmul.__name__ = matmul.__qualname__ = f"matmul_{name}"
    matmul.__doc__ = (f"out[t, r] = W[r] . x[t] for a {name.upper()} weight and act_q8_0 activations "
                      "(qs, d); out float32 (T, rows).")
    return matmul


def _make_mm_q8_1(kind, name):
    def matmul(w, qs, d, s, out):
        w, qs, d = _check_mm(w, kind, qs, d, out)
        _mm_quant(w, kind, qs, d, np.ascontiguousarray(s, dtype=np.float32), out, numba.get_num_threads())
        return out
    matmul.__name__ = matmul.__qualname__ = f"matmul_{name}"
    matmul.__doc__ = (f"out[t, r] = W[r] . x[t] for a {name.upper()} weight and act_q8_1 activations "
                      "(qs, d, s); out float32 (T, rows).")
    return matmul


# matmul_<key> for every block-32 type of the registry, by its activation format (q8_0: (qs, d), q8_1: (qs, d, s))
_MM_BY_ACT = {"q8_0": _make_mm_q8_0, "q8_1": _make_mm_q8_1}
for _k in _B32:
    globals()[f"matmul_{TYPES[_k].key}"] = _MM_BY_ACT[TYPES[_k].vec_dot_type](_k, TYPES[_k].key)

# --------------------------------------------------------------------------------------------------
# float matmul (F32 / F16 / BF16 weights)
# --------------------------------------------------------------------------------------------------


def _make_mm_float(wkind):
    """The float matmul kernel of one float type (``wkind`` a closure constant)."""
    def mm(w, x, out, nthreads):
        """out[t, r] = dot(w[r], x[t]) (see ``_make_fdot`` for the fixed order); activation rows in groups
        of 4 per weight-row pass (the last group repeats row T-1), T == 1 on its own."""
        rows, n = w.shape
        T = x.shape[0]
        nch = _chunks(rows, nthreads)
        for c in prange(nch):
            res = np.zeros(4, np.float32)
            for r in range(c * rows // nch, (c + 1) * rows // nch):
                wo = r * n
                if T == 1:
                    _fdot1(wkind, w, wo, x, 0, n, res)
                    out[0, r] = res[0]
                    continue
                for t0 in range(0, T, 4):
                    o0 = t0 * n
                    o1 = min(t0 + 1, T - 1) * n
                    o2 = min(t0 + 2, T - 1) * n
                    o3 = min(t0 + 3, T - 1) * n
                    _fdot4(wkind, w, wo, x, o0, o1, o2, o3, n, res)
                    for k in range(min(4, T - t0)):
                        out[t0 + k, r] = res[k]
    mm.__name__ = mm.__qualname__ = f"mm_float_{wkind}"  # its own cache index file (see fused._make)
    return njit(cache=True, nogil=True, parallel=True)(mm)


_MM_FLOAT = {k: _make_mm_float(k) for k in (F32, F16, BF16)}


def _check_float_mm(w, x, out):
    rows, n = w.shape
    if x.ndim != 2 or x.shape[1] != n or x.dtype != np.float32:
        raise ValueError(f"activations must be float32 (T, {n}), got {x.dtype}{x.shape}")
    if out.shape != (x.shape[0], rows) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {(x.shape[0], rows)}, got {out.dtype}{out.shape}")
    return np.ascontiguousarray(x)


def matmul_f32(w, x, out):
    """out[t, r] = W[r] . x[t] for an F32 weight (rows, n) and act_f32 activations; float32, fixed order."""
    x = _check_float_mm(w, x, out)
    _MM_FLOAT[F32](np.ascontiguousarray(w, dtype=np.float32), x, out, numba.get_num_threads())
    return out


def matmul_f16(w, x, out):
    """out[t, r] = W[r] . x[t] for an F16 weight (float16 (rows, n)) and act_f16 activations."""
    x = _check_float_mm(w, x, out)
    _MM_FLOAT[F16](np.ascontiguousarray(w).view(np.uint16), x, out, numba.get_num_threads())
    return out


def matmul_bf16(w, x, out):
    """out[t, r] = W[r] . x[t] for a BF16 weight (uint16 bits (rows, n)) and act_bf16 activations."""
    x = _check_float_mm(w, x, out)
    _MM_FLOAT[BF16](np.ascontiguousarray(w).view(np.uint16), x, out, numba.get_num_threads())
    return out


# --------------------------------------------------------------------------------------------------
# registries
# --------------------------------------------------------------------------------------------------

# {type_id: (dequant_fn, matmul_fn)} of the registry's types with kernels here (llamba.kernels.quant.ops_for reads
# the same names through the registry)
KERNELS = {t.type_id: (globals()[f"dequant_{t.key}"], globals()[f"matmul_{t.key}"]) for t in _TYPES}

ACT = {"q8_0": act_q8_0, "q8_1": act_q8_1, "f32": act_f32, "f16": act_f16, "bf16": act_bf16}
