"""Dispatch over tensor types: maps a ggml type id to its dequantizer, its activation quantizer (the type's
vec_dot_type, docs/numerics.md) and its quantized matmul kernel -- read from the type registry
(``llamba.kernels.traits``: the entry names the module holding ``dequant_<key>``/``matmul_<key>``).

Model code never branches on a quant type; `llamba.layers.Linear` calls `ops_for(type_id)` once.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from llamba.errors import UnsupportedError
from llamba.kernels.traits import ACT_MODULE, TYPES, TypeTraits


@dataclass(frozen=True)
class QuantOps:
    type_id: int
    dequant: Callable  # (w, out (rows, ncols) f32) -> None
    matmul: Callable  # (w, *act, out (T, rows) f32) -> None
    act: Callable  # x (T, n) f32 -> tuple of activation arrays in the vec_dot_type format
    block_elems: int
    # weights repacked at load (traits `packed`): kind id of the packed layout, repack(w, chunk_bytes, done) -> wp,
    # matmul_packed(wp, *act, out) and dequant_rows_packed(wp, ids, out); None for the other types.
    # packed_shape(rows, row_bytes): the shape of wp; repack_into(w, out, chunk_bytes, done): repack into a given
    # C-contiguous uint8 array of that shape (e.g. a file mapping: llamba.layers' repacked-weight cache)
    packed_kind: int | None = None
    repack: Callable | None = None
    packed_shape: Callable | None = None
    repack_into: Callable | None = None
    matmul_packed: Callable | None = None
    dequant_rows_packed: Callable | None = None


_REGISTRY: dict[int, QuantOps] = {}


def kernel_module(t: TypeTraits):
    """The module of ``llamba.kernels`` holding the CPU kernels of type ``t``."""
    return importlib.import_module(f"llamba.kernels.{t.kernels}")


def ref_module(t: TypeTraits):
    """The module of ``llamba.kernels.ref`` holding the numpy twins of type ``t``."""
    return importlib.import_module(f"llamba.kernels.ref.{t.ref}")


def _build(t: TypeTraits) -> QuantOps:
    mod = kernel_module(t)
    act = importlib.import_module(f"llamba.kernels.{ACT_MODULE[t.vec_dot_type]}").ACT[t.vec_dot_type]
    extra = {}
    if t.packed is not None:
        extra = dict(packed_kind=t.packed, repack=getattr(mod, f"repack_{t.key}"),
                     packed_shape=_packed_shape(t, mod.PACK_BB), repack_into=_repack_into(t, mod),
                     matmul_packed=getattr(mod, f"matmul_{t.key}p"),
                     dequant_rows_packed=getattr(mod, f"dequant_rows_{t.key}p"))
    return QuantOps(t.type_id, getattr(mod, f"dequant_{t.key}"), getattr(mod, f"matmul_{t.key}"), act,
                    t.block_elems, **extra)


def _packed_shape(t: TypeTraits, pack_bb: int):
    def packed_shape(rows: int, row_bytes: int) -> tuple[int, int]:
        """Shape of the packed copy of a (rows, row_bytes) weight: one row per 8 weight rows, pack_bb bytes per
        block of them."""
        return ((rows + 7) // 8, row_bytes // t.block_bytes * pack_bb)
    return packed_shape


def _repack_into(t: TypeTraits, mod):
    kernel = getattr(mod, f"_repack_{t.key}_kernel")  # the kernel `repack_<key>` runs over its own fresh buffer
    shape_of = _packed_shape(t, mod.PACK_BB)

    def repack_into(w: np.ndarray, out: np.ndarray, chunk_bytes: int = 0, done=None) -> np.ndarray:
        """`repack_<key>(w, chunk_bytes, done)` written into `out` (uint8, C-contiguous, writable, of shape
        packed_shape(*w.shape)) instead of a new array; the same bytes. Returns out."""
        rows, rb = w.shape
        if w.dtype != np.uint8 or rb % t.block_bytes:
            raise ValueError(f"not a {t.name} weight: {w.dtype}{w.shape}")
        if (out.dtype != np.uint8 or out.shape != shape_of(rows, rb) or not out.flags.c_contiguous
                or not out.flags.writeable):
            raise ValueError(f"out must be a writable C-contiguous uint8 {shape_of(rows, rb)}, "
                             f"got {out.dtype}{out.shape}")
        if out.size:
            mod.repack_rows(kernel, w, rb // t.block_bytes, out, chunk_bytes, done)
        return out
    return repack_into


def ops_for(type_id: int, what: str = "tensor") -> QuantOps:
    ops = _REGISTRY.get(type_id)
    if ops is not None:
        return ops
    t = TYPES.get(type_id)
    if t is None or not t.supported:
        name = t.name if t else f"id {type_id}"
        have = ", ".join(sorted(u.name for u in TYPES.values() if u.supported))
        raise UnsupportedError(f"{what} uses tensor type {name}, which llamba does not support "
                               f"(supported: {have}); use a GGUF quantized to one of those")
    ops = _REGISTRY[type_id] = _build(t)
    return ops


def dequantize(w: np.ndarray, type_id: int) -> np.ndarray:
    """Dequantize a whole (rows, row_bytes) view to float32 (rows, ncols). For tests and small tensors."""
    ops = ops_for(type_id)
    if w.ndim == 1:
        w = w.reshape(1, -1)
    t = TYPES[type_id]
    ncols = w.shape[1] if t.block_elems == 1 else w.shape[1] // t.block_bytes * t.block_elems
    out = np.empty((w.shape[0], ncols), dtype=np.float32)
    ops.dequant(w, out)
    return out
