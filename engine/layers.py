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

import hashlib
import mmap
import os
import re
import tempfile
import time

import numba
import numpy as np

from llamba.errors import GGUFError, TokenIdError
from llamba.kernels.quant import ops_for
from llamba.kernels.traits import F32, TYPES
from llamba.options import options_of, repack_cache_dir

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


# The repacked-weight cache (llamba.options.repack_cache_dir): a repacked Q8_0 tensor of at least
# REPACK_CACHE_MIN_BYTES is written once to <dir>/<model key>-<tensor key>.npy and memory-mapped read-only by later
# loads (its pages are the page cache's: no copy, no anonymous page faults, shared between processes).  The model key
# hashes the file's path, size, mtime and inode as opened (gguf `_Part.stat`) and REPACK_CACHE_FORMAT; the tensor
# key its offset, shape and type.  A file is used only when its dtype, shape, contiguity and alignment are those of
# `ops.packed_shape` and a few packed rows equal the raw rows they come from (`_packed_rows_match`); anything else
# (missing, truncated, stale, unreadable) repacks as without a cache.  Files are written to a temporary name (space
# reserved first: never a SIGBUS on a full disk) and renamed into place; the directory is kept under
# REPACK_CACHE_MAX_BYTES by deleting the least recently used files of other models (a model that does not fit is
# repacked at every load for its remaining tensors).  No failure of the cache (unwritable directory, full disk) is
# an error: the weight is repacked in memory instead.
REPACK_CACHE_FORMAT = 1  # bump when the packed layout (kernels.quants_simple, Q8_0P) changes
REPACK_CACHE_MIN_BYTES = 4 << 20  # smaller tensors repack in a few milliseconds: no file for them
REPACK_CACHE_MAX_BYTES = 4 << 30  # the directory's size limit
REPACK_CACHE_CHECK_GROUPS = 8  # packed rows (of 8 weight rows) compared with the raw weight before a file is used
_CACHE_NAME = re.compile(r"[0-9a-f]{20}-[0-9a-f]{20}\.npy")
_TMP_PREFIX = ".tmp-repack-"
_TMP_MAX_AGE = 3600.0  # seconds after which a temporary file is an abandoned write


def _h(*parts) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _cache_key(gf, info, ops, rows: int, rb: int) -> tuple[str, str] | None:
    """(directory, file name) of a tensor's cache file; None without a cache or a file identity."""
    d = repack_cache_dir()
    part = gf.parts[info.part]
    st = getattr(part, "stat", None)
    if d is None or st is None:
        return None
    model = _h(REPACK_CACHE_FORMAT, os.path.realpath(part.path), st.st_size, st.st_mtime_ns, st.st_ino)
    tensor = _h(ops.packed_kind, info.type_id, info.offset, info.nbytes, rows, rb)
    return d, f"{model}-{tensor}.npy"


def _packed_rows_match(w: np.ndarray, wp: np.ndarray) -> bool:
    """A few packed rows of `wp` (the first, the last, some between) equal the Q8_0P layout of the raw rows of `w`
    they hold (numpy, no kernel): catches a file of another tensor or model version, or one never fully written."""
    rows, rb = w.shape
    nb = rb // 34
    G = wp.shape[0]
    for g in sorted({0, G - 1, *(G * (2 * i + 1) // (2 * REPACK_CACHE_CHECK_GROUPS)
                                for i in range(REPACK_CACHE_CHECK_GROUPS - 2))}):
        raw = np.asarray(w[np.minimum(np.arange(8 * g, 8 * g + 8), rows - 1)]).reshape(8, nb, 34)
        u = (raw[:, :, 2:] ^ np.uint8(0x80)).reshape(8, nb, 8, 4).transpose(1, 2, 0, 3).reshape(-1)
        d = raw[:, :, :2].transpose(1, 0, 2).reshape(-1)
        if not (np.array_equal(wp[g, :256 * nb], u) and np.array_equal(wp[g, 256 * nb:], d)):
            return False
    return True


def _load_cached(path: str, w: np.ndarray, shape: tuple) -> np.ndarray | None:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # noqa: BLE001 - missing, truncated or not an .npy: repack
        return None
    if (not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.shape != shape or not a.flags.c_contiguous
            or a.ctypes.data % 64):
        return None
    a = a.view(np.ndarray)  # a plain read-only array over the mapping (which it keeps open)
    if not _packed_rows_match(w, a):
        return None
    try:
        os.utime(path)  # recently used: the last to be evicted
    except OSError:
        pass
    return a


def _make_room(d: str, need: int, own: str) -> bool:
    """Delete the least recently used cache files of other models (and abandoned temporary files) until `need`
    more bytes fit under REPACK_CACHE_MAX_BYTES; False (nothing deleted but abandoned temporary files) when they
    cannot. Only names this cache writes are touched; `own`: the model key of the files to keep."""
    total, others, now = 0, [], time.time()
    for e in os.scandir(d):
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if e.name.startswith(_TMP_PREFIX):
            if now - st.st_mtime > _TMP_MAX_AGE:
                try:
                    os.unlink(e.path)
                except OSError:
                    pass
            else:
                total += st.st_size  # another process writing
        elif _CACHE_NAME.fullmatch(e.name):
            total += st.st_size
            if not e.name.startswith(own):
                others.append((st.st_mtime, e.path, st.st_size))
    if total - sum(size for _mt, _p, size in others) + need > REPACK_CACHE_MAX_BYTES:
        return False  # does not fit even without the other models' files: keep them
    for _mt, p, size in sorted(others):
        if total + need <= REPACK_CACHE_MAX_BYTES:
            break
        try:
            os.unlink(p)
            total -= size
        except OSError:
            pass
    return total + need <= REPACK_CACHE_MAX_BYTES


def _write_cached(d: str, name: str, w: np.ndarray, ops, shape: tuple, done) -> bool:
    """Repack `w` straight into a new cache file (a shared mapping of it): True once it is in place."""
    size = shape[0] * shape[1]
    hdr = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    fd = tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        if not hasattr(os, "posix_fallocate") or not _make_room(d, size + 4096, name.split("-")[0]):
            return False
        fd, tmp = tempfile.mkstemp(dir=d, prefix=_TMP_PREFIX, suffix=".npy")
        with os.fdopen(os.dup(fd), "wb") as f:
            np.lib.format.write_array_header_1_0(f, hdr)  # padded to a multiple of 64 bytes
            off = f.tell()
        os.posix_fallocate(fd, off, size)  # the blocks exist before the mapping is written
        mm = mmap.mmap(fd, off + size)
        try:
            out = np.frombuffer(mm, np.uint8, size, off).reshape(shape)
            ops.repack_into(w, out, REPACK_CHUNK_BYTES, done)
            del out
        finally:
            mm.close()
        os.close(fd)
        fd = None
        os.replace(tmp, os.path.join(d, name))
        tmp = None
        return True
    except Exception:  # noqa: BLE001 - unwritable directory, full disk, ...: repack in memory
        return False
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def repacked(gf, name: str, w: np.ndarray, ops, done=None) -> np.ndarray:
    """The packed copy of GGUF tensor `name` (raw view `w`, (rows, row bytes)): from the repacked-weight cache
    when it holds a valid one, else repacked (`ops.repack`, chunk by chunk, `done(rows so far)` after each) and
    written to the cache for the next load when the tensor is large enough. Bit-identical either way."""
    rows, rb = w.shape
    key = None
    if (ops.repack_into is not None and w.nbytes >= REPACK_CACHE_MIN_BYTES and hasattr(gf, "parts")
            and hasattr(gf, "info")):
        try:
            key = _cache_key(gf, gf.info(name), ops, rows, rb)
        except Exception:  # noqa: BLE001 - no identity for this file: no cache
            key = None
    if key is not None:
        d, fname = key
        shape = ops.packed_shape(rows, rb)
        path = os.path.join(d, fname)
        wp = _load_cached(path, w, shape)
        if wp is not None:
            return wp
        if _write_cached(d, fname, w, ops, shape, done):
            wp = _load_cached(path, w, shape)
            if wp is not None:
                return wp
    return ops.repack(w, REPACK_CHUNK_BYTES, done)


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
                    self.wp = repacked(gf, name, self.w, self.ops, release)
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
