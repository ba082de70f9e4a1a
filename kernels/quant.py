"""Dispatch over tensor types: one place that maps a ggml type id to its dequantizer, its activation
quantizer (the type's vec_dot_type, docs/numerics.md) and its quantized matmul kernel.

Model code never branches on a quant type; `llamba.layers.Linear` calls `ops_for(type_id)` once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from llamba.errors import UnsupportedError
from llamba.kernels.traits import TYPES


@dataclass(frozen=True)
class QuantOps:
    type_id: int
    dequant: Callable  # (w, out (rows, ncols) f32) -> None
    matmul: Callable  # (w, *act, out (T, rows) f32) -> None
    act: Callable  # x (T, n) f32 -> tuple of activation arrays in the vec_dot_type format
    block_elems: int


_REGISTRY: dict[int, QuantOps] | None = None
_MODULES = ("quants_simple", "quants_k")


def _build() -> dict[int, QuantOps]:
    import importlib
    mods = [importlib.import_module(f"llamba.kernels.{m}") for m in _MODULES]
    acts = {k: v for mod in mods for k, v in mod.ACT.items()}
    reg = {}
    for mod in mods:
        for tid, (deq, mm) in mod.KERNELS.items():
            t = TYPES[tid]
            reg[tid] = QuantOps(tid, deq, mm, acts[t.vec_dot_type], t.block_elems)
    return reg


def ops_for(type_id: int, what: str = "tensor") -> QuantOps:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _build()
    ops = _REGISTRY.get(type_id)
    if ops is None:
        t = TYPES.get(type_id)
        name = t.name if t else f"id {type_id}"
        have = ", ".join(sorted(TYPES[i].name for i in _REGISTRY))
        raise UnsupportedError(f"{what} uses tensor type {name}, which llamba does not support "
                               f"(supported: {have}); use a GGUF quantized to one of those")
    return ops


def dequantize(w: np.ndarray, type_id: int) -> np.ndarray:
    """Dequantize a whole (rows, row_bytes) view to float32 (rows, ncols). For tests and small tensors."""
    ops = ops_for(type_id)
    if w.ndim == 1:
        w = w.reshape(1, -1)
    if TYPES[type_id].block_elems == 1:
        ncols = w.shape[1]
    else:
        t = TYPES[type_id]
        ncols = w.shape[1] // t.block_bytes * t.block_elems
    out = np.empty((w.shape[0], ncols), dtype=np.float32)
    ops.dequant(w, out)
    return out
