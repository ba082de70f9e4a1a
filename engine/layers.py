"""Linear / Embedding / Norm: the only model-side code that calls the matmul kernels.

Dispatch on the tensor type happens once, here, at construction (kernels/quant.py `ops_for`).
Two compute paths for a Linear:
- `__call__(x)`: llama.cpp-style quantized dot products (activations quantized to the type's vec_dot_type).
  Row-exact: row t of a batch is bit-identical to computing row t alone. Decode and speculative verify use it.
- `gemm(x)`: weight tiles dequantized into a cache-sized float32 buffer and multiplied with BLAS. Prompt
  prefill uses it when the batch is large (it is faster there, and slightly more accurate than llama.cpp).
"""
from __future__ import annotations

import numpy as np

from llamba.errors import GGUFError
from llamba.kernels.quant import ops_for
from llamba.kernels.traits import TYPES

GEMM_TILE_FLOATS = 1 << 19  # 2 MiB of float32 per dequantized weight tile


class Linear:
    """y = W @ x for a GGUF weight `name` with ne=[in, out] (numpy (out, in)); optional `.bias`."""

    def __init__(self, gf, name: str, bias_name: str | None = None, shape: tuple[int, int] | None = None):
        info = gf.info(name)
        ne = info.ne
        if len(ne) > 2 and any(d != 1 for d in ne[2:]):
            raise GGUFError(f"{gf.path}: tensor '{name}' has shape {list(ne)}, expected a matrix")
        self.name = name
        self.type_id = info.type_id
        self.cols = ne[0]  # in features
        self.rows = ne[1] if len(ne) > 1 else 1  # out features
        if shape is not None and (self.rows, self.cols) != tuple(shape):
            raise GGUFError(f"{gf.path}: tensor '{name}' has shape (out={self.rows}, in={self.cols}), "
                            f"expected (out={shape[0]}, in={shape[1]})")
        w = gf.tensor(name)
        self.w = w.reshape(self.rows, w.shape[-1])
        self.ops = ops_for(self.type_id, f"tensor '{name}'")
        self.bias = None
        if bias_name and gf.has(bias_name):
            self.bias = np.ascontiguousarray(gf.tensor(bias_name), dtype=np.float32).reshape(-1)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        # x: (T, in) float32 C-contiguous -> (T, out)
        if out is None:
            out = np.empty((x.shape[0], self.rows), dtype=np.float32)
        act = self.ops.act(np.ascontiguousarray(x, dtype=np.float32))
        self.ops.matmul(self.w, *act, out)
        if self.bias is not None:
            out += self.bias
        return out

    def gemm(self, x: np.ndarray, out: np.ndarray | None = None, rows: slice | None = None) -> np.ndarray:
        """Prefill path: BLAS over dequantized weight tiles. `rows` restricts to a slice of output rows."""
        r0, r1 = (0, self.rows) if rows is None else (rows.start or 0, rows.stop or self.rows)
        T = x.shape[0]
        if out is None:
            out = np.empty((T, r1 - r0), dtype=np.float32)
        if self.type_id == 0:  # F32: no dequantization needed
            np.matmul(x, self.w[r0:r1].T, out=out)
        else:
            tile = max(1, GEMM_TILE_FLOATS // self.cols)
            buf = np.empty((min(tile, r1 - r0), self.cols), dtype=np.float32)
            for a in range(r0, r1, tile):
                b = min(a + tile, r1)
                wb = buf[: b - a]
                self.ops.dequant(self.w[a:b], wb)
                np.matmul(x, wb.T, out=out[:, a - r0:b - r0])
        if self.bias is not None:
            out += self.bias[r0:r1]
        return out

    def dequantize(self) -> np.ndarray:
        out = np.empty((self.rows, self.cols), dtype=np.float32)
        self.ops.dequant(self.w, out)
        return out


class Embedding:
    """Row lookup into `token_embd` (ne=[n_embd, n_vocab]); dequantizes only the rows asked for."""

    def __init__(self, gf, name: str):
        info = gf.info(name)
        self.name = name
        self.type_id = info.type_id
        self.dim = info.ne[0]
        self.n = info.ne[1]
        self.w = gf.tensor(name).reshape(self.n, -1)
        self.ops = ops_for(self.type_id, f"tensor '{name}'")

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            bad = int(ids[(ids < 0) | (ids >= self.n)][0])
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.n}")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        self.ops.dequant(np.ascontiguousarray(self.w[ids]), out)
        return out


def norm_weight(gf, name: str, n: int | None = None) -> np.ndarray:
    w = np.ascontiguousarray(gf.tensor(name), dtype=np.float32).reshape(-1)
    if n is not None and w.shape[0] != n:
        raise GGUFError(f"{gf.path}: tensor '{name}' has {w.shape[0]} elements, expected {n}")
    return w


def type_mix(gf) -> dict[str, int]:
    """{type name: number of tensors}, for `llamba info`."""
    mix: dict[str, int] = {}
    for info in gf.tensors.values():
        mix[TYPES[info.type_id].name] = mix.get(TYPES[info.type_id].name, 0) + 1
    return dict(sorted(mix.items(), key=lambda kv: -kv[1]))
