"""The quant-type registry: every ggml tensor type declared once (docs/quant_types.md).

One `TypeTraits` entry per type holds everything the rest of llamba needs to know about it:

* its ggml name and id, block geometry (elements, bytes per block) and, for the plain types, the numpy dtype
  a GGUF tensor of it is viewed as;
* ``vec_dot_type``: the activation format llama.cpp's CPU backend converts activations to before a quantized
  dot product (docs/numerics.md);
* ``kernels``: the module of ``llamba.kernels`` with its CPU kernels ``dequant_<key>`` and ``matmul_<key>``
  (``key`` = the lower-case name), None where llamba cannot compute with the type;
* ``ref``: the module of ``llamba.kernels.ref`` with its numpy twins of the same names;
* ``fused``: the family of fused small-batch kernels it joins (``"block32"``: one Q8_0/Q8_1 activation
  quantization; ``"kquants"``: one Q8_K quantization; None: not fused);
* ``device``: the suffix of its CUDA kernels (``mmv_<device>``, ``deqrows_<device>`` in
  ``llamba.kernels.cuda``) and of its xp dequantizer there, None where the type has no device kernel;
* ``layout``: for the block-32 types, the byte layout of a block (``Block32``) from which
  ``llamba.kernels.quants_simple`` generates its kernels;
* ``packed``: the kind id of the layout its weights are repacked to at load (Q8_0: ``Q8_0P``), else None.

Every dispatch table is generated from this registry: ``llamba.kernels.quant.ops_for``, the fused-kernel families
(``llamba.kernels.fused``), the CUDA kernel names (``llamba.kernels.cuda.CUDA_TYPES``), the per-type kernels
``quants_simple``/``quants_k`` build. The type ids are module constants here (``Q4_0``, ``IQ4_XS``, ...), made from
the entries; kernel modules import them from here and never spell an id.

Model code never branches on a quant type; `llamba.layers.Linear` looks the type up once (``ops_for``).
This module imports numpy only (``llamba.gguf`` and ``llamba.validate`` read it without the kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# IQ4_NL's (and IQ4_XS's) 16 non-linear 4-bit values (ggml-common.h kvalues_iq4nl)
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
KVALUES_IQ4NL.flags.writeable = False


@dataclass(frozen=True)
class Block32:
    """Byte layout of a 32-element block (quants_simple builds its unpack/dot/dequant kernels from it).

    Element j's integer value q_j comes from 4-bit codes at byte ``qs`` (16 bytes: low nibbles are elements
    0..15, high nibbles 16..31) -- with ``qh`` the byte offset of a little-endian u32 whose bit j is bit 4 of
    code j, with ``values`` a table the codes index -- or, with ``bits`` == 8, from 32 signed bytes at ``qs``.
    The value is ``d * (q - bias)`` (+ ``m``): ``bias`` is the offset that makes q non-negative (unsigned code
    = q + bias for the signed formats), ``d``/``m`` the byte offsets of the fp16 scale and min (m: None)."""
    qs: int
    bias: int
    d: int = 0
    m: int | None = None
    qh: int | None = None
    bits: int = 4
    values: tuple | None = None

    @property
    def has_min(self) -> bool:
        return self.m is not None


@dataclass(frozen=True)
class TypeTraits:
    name: str
    type_id: int
    block_elems: int
    block_bytes: int
    vec_dot_type: str | None = None  # activation format ("q8_0", "q8_1", "q8_K", "f32", "f16", "bf16")
    kernels: str | None = None  # llamba.kernels.<kernels> has dequant_<key>, matmul_<key>; None: unsupported
    ref: str | None = None  # llamba.kernels.ref.<ref> has the numpy twins dequant_<key> (and matmul_<key>)
    fused: str | None = None  # fused-kernel family: "block32" / "kquants" / None
    device: str | None = None  # CUDA kernel suffix (mmv_<device>, deqrows_<device>) / None
    layout: Block32 | None = None  # block-32 types: the block layout quants_simple generates kernels from
    packed: int | None = None  # kind id of the layout the weights are repacked to at load (Q8_0 -> Q8_0P)
    np_dtype: str | None = None  # plain (non-block) types: numpy dtype a GGUF tensor is viewed as

    @property
    def key(self) -> str:
        """Lower-case name: the suffix of the type's kernels (dequant_q4_k, matmul_q4_k, ...)."""
        return self.name.lower()

    @property
    def supported(self) -> bool:
        """llamba can compute with it (it has CPU kernels)."""
        return self.kernels is not None


Q8_0P = 1008  # not a ggml type: the kind id of repacked Q8_0 weights (quants_simple.repack_q8_0)

_T = TypeTraits
_S, _K = "quants_simple", "quants_k"
_KV = tuple(int(v) for v in KVALUES_IQ4NL)
_ENTRIES = [
    #  name       id  block  bytes vec_dot  kernels  ref  fused     device    layout / extras
    _T("F32", 0, 1, 4, "f32", _S, _S, None, "f32", np_dtype="float32"),
    _T("F16", 1, 1, 2, "f16", _S, _S, None, "f16", np_dtype="float16"),
    _T("Q4_0", 2, 32, 18, "q8_0", _S, _S, "block32", "q4_0", Block32(qs=2, bias=8)),
    _T("Q4_1", 3, 32, 20, "q8_1", _S, _S, "block32", "q4_1", Block32(qs=4, bias=0, m=2)),
    _T("Q5_0", 6, 32, 22, "q8_0", _S, _S, "block32", "q5_0", Block32(qs=6, bias=16, qh=2)),
    _T("Q5_1", 7, 32, 24, "q8_1", _S, _S, "block32", "q5_1", Block32(qs=8, bias=0, m=2, qh=4)),
    _T("Q8_0", 8, 32, 34, "q8_0", _S, _S, "block32", "q8_0", Block32(qs=2, bias=128, bits=8), packed=Q8_0P),
    _T("Q8_1", 9, 32, 36),
    _T("Q2_K", 10, 256, 84, "q8_K", _K, _K, "kquants", "q2_k"),
    _T("Q3_K", 11, 256, 110, "q8_K", _K, _K, "kquants", "q3_k"),
    _T("Q4_K", 12, 256, 144, "q8_K", _K, _K, "kquants", "q4_k"),
    _T("Q5_K", 13, 256, 176, "q8_K", _K, _K, "kquants", "q5_k"),
    _T("Q6_K", 14, 256, 210, "q8_K", _K, _K, "kquants", "q6_k"),
    _T("Q8_K", 15, 256, 292),
    _T("IQ2_XXS", 16, 256, 66),
    _T("IQ2_XS", 17, 256, 74),
    _T("IQ3_XXS", 18, 256, 98),
    _T("IQ1_S", 19, 256, 50),
    _T("IQ4_NL", 20, 32, 18, "q8_0", _S, _S, "block32", "iq4_nl", Block32(qs=2, bias=128, values=_KV)),
    _T("IQ3_S", 21, 256, 110),
    _T("IQ2_S", 22, 256, 82),
    _T("IQ4_XS", 23, 256, 136, "q8_K", _K, _K, "kquants", "iq4_xs"),
    _T("I8", 24, 1, 1, np_dtype="int8"),
    _T("I16", 25, 1, 2, np_dtype="int16"),
    _T("I32", 26, 1, 4, np_dtype="int32"),
    _T("I64", 27, 1, 8, np_dtype="int64"),
    _T("F64", 28, 1, 8, np_dtype="float64"),
    _T("IQ1_M", 29, 256, 56),
    _T("BF16", 30, 1, 2, "bf16", _S, _S, None, "bf16", np_dtype="uint16"),  # viewed as raw uint16 bits
    _T("TQ1_0", 34, 256, 54),
    _T("TQ2_0", 35, 256, 66),
    _T("MXFP4", 39, 32, 17),
    _T("NVFP4", 40, 64, 36),
    _T("Q1_0", 41, 128, 18),
]

TYPES: dict[int, TypeTraits] = {t.type_id: t for t in _ENTRIES}
BY_NAME: dict[str, TypeTraits] = {t.name: t for t in _ENTRIES}
assert len(TYPES) == len(BY_NAME) == len(_ENTRIES), "duplicate type id or name"
assert Q8_0P not in TYPES

# the type ids as module constants (F32, Q4_0, ..., IQ4_XS): plain ints, so that Numba kernels that import them
# compare a constant ``kind`` with them before typing
globals().update({t.name: t.type_id for t in _ENTRIES})


def family(name: str) -> tuple[int, ...]:
    """Type ids of a fused-kernel family ("block32", "kquants"), in id order."""
    return tuple(t.type_id for t in _ENTRIES if t.fused == name)


def in_module(module: str) -> tuple[TypeTraits, ...]:
    """The supported types whose CPU kernels live in ``llamba.kernels.<module>``, in id order."""
    return tuple(t for t in _ENTRIES if t.kernels == module)


# activation format (vec_dot_type) -> the kernel module whose ``ACT`` table holds its quantizer
ACT_MODULE: dict[str, str] = {"q8_0": _S, "q8_1": _S, "f32": _S, "f16": _S, "bf16": _S, "q8_K": _K}

FAMILIES: dict[str, tuple[int, ...]] = {f: family(f) for f in ("block32", "kquants")}
DEVICE: dict[int, str] = {t.type_id: t.device for t in _ENTRIES if t.device}
PLAIN_DTYPES: dict[int, np.dtype] = {t.type_id: np.dtype(t.np_dtype) for t in _ENTRIES if t.np_dtype}
