"""Linear / Embedding / Norm: the only model-side code that calls the matmul kernels.

Dispatch on the tensor type happens once, here, at construction (kernels/quant.py `ops_for`).
Two compute paths for a Linear:
- `__call__(x)`: llama.cpp-style quantized dot products (activations quantized to the type's vec_dot_type).
  Row-exact: row t of a batch is bit-identical to computing row t alone. Decode and speculative verify use it.
- `gemm(x)`: weight tiles dequantized into a cache-sized float32 buffer and multiplied with BLAS. Prompt
  prefill uses it when the batch is large (it is faster there, and slightly more accurate than llama.cpp).

Q8_0 weights are repacked once at load (`quants_simple.repack_q8_0`: the 8-row transposed layout the matmul
kernels would otherwise build on every call; same size as the raw blocks) and the `__call__`/fused paths read the
packed copy (`Linear.wp`), bit-identically.  The raw GGUF view `Linear.w` stays valid (the GPU offload twin and
`gemm` read it), but its pages are dropped from the resident set after repacking (`GGUFFile.release`), so the
weights are not held twice; reading `w` faults them back in from the file.  The model's option `repack=False`
(llamba.options; default from LLAMBA_REPACK) keeps the raw path: no repacking, `wp` is None.
"""
from __future__ import annotations

import numba
import numpy as np

from llamba.errors import GGUFError, TokenIdError
from llamba.kernels.quant import ops_for
from llamba.kernels.traits import F32, TYPES
from llamba.options import options_of

GEMM_TILE_FLOATS = 1 << 19  # 2 MiB of float32 per dequantized weight tile
REPACK_CHUNK_BYTES = 8 << 20  # Q8_0 repacking: raw bytes per chunk (then those raw pages are dropped)
# LinearGroup: batches up to this size use the fused kernel (llamba.kernels.fused), by weight family. Measured on
# 2 threads (SmolLM2 Q4_1, the Qwen3.5 fixture's Q8_0, Gemma 3 Q4_K_M): block-32 weights stay faster fused up to
# ~32 rows (weights streamed once, rows in tiles of 4), K-quants up to ~8 (beyond, the per-matrix kernels win).
FUSED_MAX_T_BLOCK32 = 32
FUSED_MAX_T_KQUANTS = 8
FUSED_MAX_T = 4  # every group takes the fused path at least up to here

# LinearGroup input transforms (llamba.kernels.fused modes)
IDENTITY, RMS_NORM, SWIGLU, GEGLU = 0, 1, 2, 3


def repack_enabled(gf=None) -> bool:
    """Whether Q8_0 weights of GGUF file `gf` are repacked (its model's `Options.repack`, llamba.options); False:
    Linears keep only the raw GGUF weights. Without a file: the environment's default (LLAMBA_REPACK)."""
    return options_of(gf).repack


class Linear:
    """y = W @ x for a GGUF weight `name` with ne=[in, out] (numpy (out, in)); optional `.bias`.

    `w`: the raw GGUF view; `wp`: the repacked Q8_0 weight (`quants_simple.repack_q8_0`) or None."""

    wp = None  # subclasses that set up `w` themselves (MoE experts) keep the raw path

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
        self.model_types = model_types(gf)
        if self.ops.repack is not None and self.w.dtype == np.uint8 and repack_enabled(gf):
            key = ("q8_0p", name)
            self.wp = gf.derived.get(key) if hasattr(gf, "derived") else None
            if self.wp is None:
                if hasattr(gf, "derived"):
                    rb = self.w.shape[1]
                    done = [0]  # bytes released so far

                    def release(r1):  # chunk by chunk, dropping the raw pages just copied: never both copies
                        gf.release(name, r1 * rb, since=done[0])
                        done[0] = r1 * rb
                    self.wp = self.ops.repack(self.w, REPACK_CHUNK_BYTES, release)
                    gf.derived[key] = self.wp
                else:
                    self.wp = self.ops.repack(self.w)
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
        wp = getattr(self, "wp", None)
        if wp is not None:
            self.ops.matmul_packed(wp, *act, out)
        else:
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
        if self.type_id == F32:  # no dequantization needed
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


def model_types(gf) -> frozenset:
    """Type ids of a model's matrices as the matmul kernels see them (Q8_0 as repacked Q8_0P when repacking):
    LinearGroup compiles one fused kernel per weight family for all of them (llamba.kernels.fused.kernel_for)."""
    derived = getattr(gf, "derived", None)
    repack = repack_enabled(gf)
    if derived is not None and ("model_types", repack) in derived:
        return derived[("model_types", repack)]
    tensors = getattr(gf, "tensors", None) or {}
    ts = {int(i.type_id) for i in tensors.values() if len(getattr(i, "ne", ())) >= 2}
    if repack:  # repacked types as their packed kind (Q8_0 -> Q8_0P)
        ts = {TYPES[t].packed if t in TYPES and TYPES[t].packed is not None else t for t in ts}
    ts = frozenset(ts)
    if derived is not None:
        derived[("model_types", repack)] = ts
    return ts


def _readonly(a: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(a).view()
    v.flags.writeable = False
    return v


class LinearGroup:
    """Linears that read the same input (Q|K|V, gate|up, or one matrix), optionally after a transform of it:
    `group(x, mode, x2, norm_w, eps)` returns [lin(f(x)) for lin in lins] with f = identity, rms_norm(x, norm_w),
    silu(x)*x2 or gelu_tanh(x)*x2 (modes IDENTITY, RMS_NORM, SWIGLU, GEGLU).

    Small batches (T <= max_t: decode, speculative verify, batches of several sequences) of the quantized weights
    take one fused
    kernel call (llamba.kernels.fused: one shared activation quantization, one parallel region); other weights
    (float types), larger batches and the BLAS path run the transform and the Linears one by one. Both give
    bit-identical numbers."""

    def __init__(self, lins: list[Linear]):
        from llamba.kernels import fused as F
        self.lins = list(lins)
        cols = {lin.cols for lin in self.lins}
        if len(cols) != 1:
            raise ValueError("a LinearGroup's matrices must all read the same input width")
        # one fused call per weight family (block-32 / K-quants), at most F.SLOTS matrices each
        self.calls = []  # (kernel, padded weights, padded kinds, [index into lins], rows per slot)
        fused = set()
        for fam in (F.BLOCK32, F.KQUANTS):
            idx = [i for i, lin in enumerate(self.lins) if lin.type_id in fam and lin.w.dtype == np.uint8]
            for j in range(0, len(idx), F.SLOTS):
                part = idx[j:j + F.SLOTS]
                # repacked weights go in as their packed kind (Q8_0: Q8_0P; they may share a call with raw ones)
                wps = [getattr(self.lins[i], "wp", None) for i in part]
                ws, kinds = F.pad([_readonly(self.lins[i].w if wp is None else wp) for i, wp in zip(part, wps)],
                                  [self.lins[i].type_id if wp is None else self.lins[i].ops.packed_kind
                                   for i, wp in zip(part, wps)])
                rows = [self.lins[i].rows for i in part] + [0] * (F.SLOTS - len(part))
                among = set().union(*(getattr(lin, "model_types", ()) for lin in self.lins))
                self.calls.append((F.kernel_for(kinds, among), ws, kinds, part, rows))
                fused.update(part)
        self.other_idx = [i for i in range(len(self.lins)) if i not in fused]
        self.fused = bool(self.calls)
        kq = any(int(c[2][0]) in F.KQUANTS for c in self.calls)
        self.max_t = max(FUSED_MAX_T, FUSED_MAX_T_KQUANTS if kq else FUSED_MAX_T_BLOCK32)
        self._none = np.empty((1, 1), dtype=np.float32)
        self._none_ro = _readonly(self._none[0])  # norm weights go in read-only: one compiled signature

    @staticmethod
    def transform(x, mode=IDENTITY, x2=None, norm_w=None, eps=0.0):
        """f(x) with the unfused kernels (llamba.kernels.ops)."""
        from llamba.kernels import ops as K
        if mode == IDENTITY:
            return x
        out = np.empty_like(x)
        if mode == RMS_NORM:
            K.rms_norm(x, norm_w, eps, out)
        elif mode == SWIGLU:
            K.swiglu(x, x2, out)
        else:
            K.geglu_tanh(x, x2, out)
        return out

    def __call__(self, x, mode=IDENTITY, x2=None, norm_w=None, eps=0.0, gemm=False) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x2 is not None:
            x2 = np.ascontiguousarray(x2, dtype=np.float32)
        T = x.shape[0]
        if not (self.fused and not gemm and 0 < T <= self.max_t):
            h = self.transform(x, mode, x2, norm_w, eps)
            return [lin.gemm(h) if gemm else lin(h) for lin in self.lins]
        res = [None] * len(self.lins)
        x2 = self._none if x2 is None else x2
        nw = self._none_ro if norm_w is None else (norm_w if not norm_w.flags.writeable else _readonly(norm_w))
        nt = numba.get_num_threads()
        for fn, ws, kinds, part, rows in self.calls:
            outs = tuple(np.empty((T, r), dtype=np.float32) for r in rows)
            fn(mode, x, x2, nw, float(eps), ws, kinds, outs, nt)
            for i, o in zip(part, outs):
                if self.lins[i].bias is not None:
                    o += self.lins[i].bias
                res[i] = o
        if self.other_idx:
            h = self.transform(x, mode, x2, norm_w, eps)
            for i in self.other_idx:
                res[i] = self.lins[i](h)
        return res


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
        # a tied output Linear may have repacked this tensor (and dropped its raw pages): rows come from the packed
        # copy then, so lookups do not fault the raw pages (and the kernel's fault-around neighbours) back in
        self._derived = getattr(gf, "derived", None)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            bad = int(ids[(ids < 0) | (ids >= self.n)][0])
            raise TokenIdError(f"token id {bad} is out of range for a vocabulary of {self.n} tokens")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        wp = self._derived.get(("q8_0p", self.name)) if self._derived is not None else None
        if wp is not None:
            self.ops.dequant_rows_packed(wp, ids, out)
        else:
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
