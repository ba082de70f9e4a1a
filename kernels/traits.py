"""One table of ggml tensor-type traits: block sizes, byte sizes, and the activation format
llama.cpp's CPU backend converts activations to before a quantized dot product (docs/numerics.md).

Model code never branches on a quant type; `llamba.layers.Linear` looks the type up here once.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TypeTraits:
    name: str
    type_id: int
    block_elems: int
    block_bytes: int
    vec_dot_type: str | None  # activation format for quantized matmuls ("q8_0", "q8_1", "q8_K", "f32", "f16", "bf16")
    supported: bool  # llamba can compute with it


_T = TypeTraits
TYPES: dict[int, TypeTraits] = {t.type_id: t for t in [
    _T("F32", 0, 1, 4, "f32", True),
    _T("F16", 1, 1, 2, "f16", True),
    _T("Q4_0", 2, 32, 18, "q8_0", True),
    _T("Q4_1", 3, 32, 20, "q8_1", True),
    _T("Q5_0", 6, 32, 22, "q8_0", True),
    _T("Q5_1", 7, 32, 24, "q8_1", True),
    _T("Q8_0", 8, 32, 34, "q8_0", True),
    _T("Q8_1", 9, 32, 36, None, False),
    _T("Q2_K", 10, 256, 84, "q8_K", True),
    _T("Q3_K", 11, 256, 110, "q8_K", True),
    _T("Q4_K", 12, 256, 144, "q8_K", True),
    _T("Q5_K", 13, 256, 176, "q8_K", True),
    _T("Q6_K", 14, 256, 210, "q8_K", True),
    _T("Q8_K", 15, 256, 292, None, False),
    _T("IQ2_XXS", 16, 256, 66, None, False),
    _T("IQ2_XS", 17, 256, 74, None, False),
    _T("IQ3_XXS", 18, 256, 98, None, False),
    _T("IQ1_S", 19, 256, 50, None, False),
    _T("IQ4_NL", 20, 32, 18, "q8_0", True),
    _T("IQ3_S", 21, 256, 110, None, False),
    _T("IQ2_S", 22, 256, 82, None, False),
    _T("IQ4_XS", 23, 256, 136, "q8_K", True),
    _T("I8", 24, 1, 1, None, False),
    _T("I16", 25, 1, 2, None, False),
    _T("I32", 26, 1, 4, None, False),
    _T("I64", 27, 1, 8, None, False),
    _T("F64", 28, 1, 8, None, False),
    _T("IQ1_M", 29, 256, 56, None, False),
    _T("BF16", 30, 1, 2, "bf16", True),
    _T("TQ1_0", 34, 256, 54, None, False),
    _T("TQ2_0", 35, 256, 66, None, False),
    _T("MXFP4", 39, 32, 17, None, False),
    _T("NVFP4", 40, 64, 36, None, False),
    _T("Q1_0", 41, 128, 18, None, False),
]}

BY_NAME: dict[str, TypeTraits] = {t.name: t for t in TYPES.values()}
