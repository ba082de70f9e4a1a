"""The quant-type registry (llamba.kernels.traits) is consistent with gguf-py, the kernels, the numpy twins and the
CUDA source, and nothing else in the package spells a type's table or id (docs/quant_types.md)."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from llamba.kernels import traits
from llamba.kernels.quant import kernel_module, ops_for, ref_module
from llamba.kernels.traits import TYPES

ROOT = Path(__file__).resolve().parents[2]
SUPPORTED = [t for t in TYPES.values() if t.supported]
QUANTIZED = [t for t in SUPPORTED if t.block_elems > 1]


@pytest.mark.parametrize("t", list(TYPES.values()), ids=lambda t: t.name)
def test_matches_gguf(t):
    """Name, id and block geometry as gguf-py declares them."""
    try:
        g = GGMLQuantizationType(t.type_id)
    except ValueError:
        pytest.skip(f"gguf-py {t.name}: not in this gguf-py version")
    assert g.name == t.name
    if t.name == "Q8_1":  # gguf-py still lists ggml's old float d/s (4 + 4 + 32); block_q8_1 is 2 + 2 + 32 bytes
        assert GGML_QUANT_SIZES[g] == (32, 40) and t.block_bytes == 36
    else:
        assert GGML_QUANT_SIZES[g] == (t.block_elems, t.block_bytes)
    if t.np_dtype is not None:
        assert t.block_elems == 1 and np.dtype(t.np_dtype).itemsize == t.block_bytes


def test_constants_and_tables():
    for t in TYPES.values():
        assert getattr(traits, t.name) == t.type_id
    assert set(traits.FAMILIES["block32"]) == {t.type_id for t in TYPES.values() if t.fused == "block32"}
    assert traits.Q8_0P not in TYPES and TYPES[traits.Q8_0].packed == traits.Q8_0P
    assert {t.vec_dot_type for t in SUPPORTED} <= set(traits.ACT_MODULE)


@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
def test_supported_type_is_complete(t):
    """Every supported type has CPU kernels, an activation quantizer, a numpy twin and a consistent fused family and
    block layout."""
    mod, ref = kernel_module(t), ref_module(t)
    ops = ops_for(t.type_id)
    assert ops.dequant is getattr(mod, f"dequant_{t.key}")
    assert ops.matmul is getattr(mod, f"matmul_{t.key}")
    assert mod.KERNELS[t.type_id] == (ops.dequant, ops.matmul)
    assert callable(getattr(ref, f"dequant_{t.key}"))
    assert callable(getattr(ref, f"matmul_{t.key}"))
    act_mod = importlib.import_module(f"llamba.kernels.{traits.ACT_MODULE[t.vec_dot_type]}")
    assert ops.act is act_mod.ACT[t.vec_dot_type]
    if t.fused == "block32":
        lay = t.layout
        assert t.block_elems == 32 and t.vec_dot_type == ("q8_1" if lay.has_min else "q8_0")
        assert lay.qs + (16 if lay.bits == 4 else 32) == t.block_bytes
        for off in (lay.d, lay.m, lay.qh):
            assert off is None or 0 <= off < lay.qs
        assert lay.values is None or (len(lay.values) == 16 and lay.bits == 4)
        assert 0 <= lay.bias <= 128
    elif t.fused == "kquants":
        assert t.block_elems == 256 and t.vec_dot_type == "q8_K" and t.layout is None
    else:
        assert t.layout is None and t.block_elems == 1
    if t.packed is not None:
        assert ops.packed_kind == t.packed and ops.repack and ops.matmul_packed and ops.dequant_rows_packed


@pytest.mark.parametrize("t", QUANTIZED, ids=lambda t: t.name)
def test_dequant_kernel_twin_gguf(t):
    """Registry-driven: the kernel, the twin and gguf-py dequantize random blocks identically (every supported
    quantized type, so a new type is checked as soon as it has an entry)."""
    rng = np.random.default_rng(t.type_id)
    raw = rng.integers(0, 256, (5, 3 * t.block_bytes), dtype=np.uint8)
    raw.flags.writeable = False
    want = gguf_dequantize(raw, GGMLQuantizationType(t.type_id))
    got = np.empty(want.shape, np.float32)
    ops_for(t.type_id).dequant(raw, got)
    twin = np.asarray(getattr(ref_module(t), f"dequant_{t.key}")(raw), np.float32).reshape(want.shape)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(twin, want)


@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
def test_twin_test_covers_type(t):
    """Each supported type is exercised by its module's twin test (tests/kernels/test_<kernels>.py)."""
    src = (ROOT / "tests" / "kernels" / f"test_{t.kernels}.py").read_text()
    assert re.search(rf"\b{t.key}\b", src), f"tests/kernels/test_{t.kernels}.py does not test {t.name}"


def test_device_names_exist():
    """Types that claim a device kernel have it in the CUDA source (mmv_, deqrows_, deq_) and an xp twin."""
    from llamba.kernels import cuda
    assert cuda.CUDA_TYPES == {t.type_id: t.device for t in TYPES.values() if t.device}
    for t in TYPES.values():
        if t.device is None:
            continue
        assert t.supported
        for name in (f"mmv_{t.device}", f"deqrows_{t.device}"):
            assert re.search(rf"__global__ void {name}\(", cuda.CUDA_SOURCE), name
        assert re.search(rf"float deq_{t.device}\(", cuda.CUDA_SOURCE), f"deq_{t.device}"
        assert callable(getattr(cuda, f"_xp_{t.device}"))


def test_no_duplicated_type_tables():
    """The IQ4_NL value table and the type-id tables live in traits.py only."""
    kv = re.compile(r"-127,\s*-104,\s*-83")
    names = "|".join(t.name for t in TYPES.values())
    ids = re.compile(rf"^\s*_?(?:{names})(?:\s*,\s*_?\w+)*\s*=\s*\d", re.M)  # Q4_0 = 2 / Q4_0, Q4_1 = 2, 3
    for p in sorted((ROOT / "kernels").rglob("*.py")) + sorted((ROOT / "engine").rglob("*.py")):
        if p.name == "traits.py" and p.parent.name == "kernels":
            continue
        src = p.read_text()
        rel = p.relative_to(ROOT)
        assert not kv.search(src), f"{rel} repeats the IQ4_NL table"
        assert not ids.search(src), f"{rel} redefines a type id"
