"""Engine options, and the one module of llamba that reads environment variables.

`Options` is a frozen set of the settings that change a model's numerics or memory layout (KV cache element type,
Q8_0 repacking, the BLAS prefill threshold). `Llama(...)` builds one (its keyword arguments `kv_type`, `repack`,
`gemm_min_batch`, or a whole `options=`) and `llamba.models.load_model` hands it down with the GGUF file the
layers are built from (`gf.options`): the model (`model.options`), its `Linear`s and its KV pool follow their own
object, so two models in one process can use different settings.

The environment only gives the defaults: `Options.from_env()` reads `LLAMBA_KV_F32`, `LLAMBA_REPACK` and
`LLAMBA_GEMM_MIN_BATCH` when an object is made without explicit values. The other variables llamba reads are
process-level (they must apply before Numba loads kernels, or describe the machine) and are read here too,
through the accessors below. Every variable is listed in `VARIABLES` and documented in docs/environment.md; no
other module of the package touches `os.environ` (tests/test_options.py checks it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

import numpy as np

from llamba.errors import LlambaError

# Every environment variable the package reads (or, for the BLAS thread counts, sets for a cluster replica).
VARIABLES = {
    "LLAMBA_KV_F32": "default of Options.kv_type: 1/true/yes/on -> 'f32'",
    "LLAMBA_REPACK": "default of Options.repack: 0/false/no/off -> False",
    "LLAMBA_GEMM_MIN_BATCH": "default of Options.gemm_min_batch (an integer, 0 = never)",
    "LLAMBA_NUMBA_KEEP_IR": "process: keep Numba's parsed LLVM modules of cached kernels (llamba.kernels._jit)",
    "LLAMBA_KEEP_JIT_PAGES": "process: do not page libllvmlite's read-only pages out after a load",
    "LLAMBA_FAKE_DEVICES": "process: numpy stand-in GPUs for device discovery (llamba.backend)",
    "LLAMBA_FAKE_KERNELS": "process: kernels of the stand-in GPUs, xp (default) or host",
    "LLAMBA_CACHE": "directory the default (demo) model is assembled into (llamba.demo)",
    "LLAMBA_REPACK_CACHE": "directory of repacked Q8_0 weights kept between runs (llamba.layers); 0/off: none",
    "XDG_CACHE_HOME": "parent of the default LLAMBA_CACHE",
    "TERM": "llamba chat: 'dumb' or unset turns line editing off",
    "RAY_ADDRESS": "llamba cluster: the Ray cluster to join",
    "OMP_NUM_THREADS": "set (if unset) by a cluster replica to its thread count",
    "OPENBLAS_NUM_THREADS": "set (if unset) by a cluster replica to its thread count",
    "MKL_NUM_THREADS": "set (if unset) by a cluster replica to its thread count",
}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

NEVER = 1 << 62  # gemm threshold meaning "never": no batch is that long

# KV cache element types: 'f16' = fp16 bit patterns in uint16 arrays (llama.cpp's F16 cache), 'f32' = float32 arrays
# holding the same fp16-rounded values (twice the memory). The kernels take either and compute the same numbers.
KV_TYPES = {"f16": np.dtype(np.uint16), "f32": np.dtype(np.float32)}


def env(name: str, default: str | None = None) -> str | None:
    """The value of environment variable `name` (one of VARIABLES), or default when unset."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not an environment variable llamba documents (llamba.options.VARIABLES)")
    return os.environ.get(name, default)


def set_default_env(name: str, value: str) -> None:
    """Set environment variable `name` (one of VARIABLES) unless it is set already (for libraries that read it
    later, e.g. OpenBLAS's thread count in a cluster replica)."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not an environment variable llamba documents (llamba.options.VARIABLES)")
    os.environ.setdefault(name, value)


@dataclass(frozen=True)
class Options:
    """Per-model engine settings (frozen). `Options()` holds the built-in defaults, `Options.from_env()` the
    defaults the environment gives; `with_(**kw)` a copy with the non-None keywords changed.

    kv_type         'f16' (default) or 'f32': element type of the CPU KV cache arrays (same values; f32 takes twice
                    the memory).
    repack          True (default): Q8_0 weights are repacked at load into the 8-row layout of the packed kernels
                    (bit-identical results; load time, memory and speed only). False: every path reads the raw
                    GGUF blocks.
    gemm_min_batch  0 (default) = never; N > 0: one sequence's batches of N or more rows take the dequantize + BLAS
                    path (`Linear.gemm`), which changes prefill logits in the last bits.
    """

    kv_type: str = "f16"
    repack: bool = True
    gemm_min_batch: int = 0

    def __post_init__(self):
        if self.kv_type not in KV_TYPES:
            raise LlambaError(f"kv_type must be one of {sorted(KV_TYPES)}, got {self.kv_type!r}")
        if not isinstance(self.repack, (bool, np.bool_)):
            raise LlambaError(f"repack must be True or False, got {self.repack!r}")
        g = self.gemm_min_batch
        if isinstance(g, (bool, np.bool_)) or not isinstance(g, (int, np.integer)) or g < 0:
            raise LlambaError(f"gemm_min_batch must be an integer >= 0 (0 = never), got {g!r}")
        object.__setattr__(self, "repack", bool(self.repack))
        object.__setattr__(self, "gemm_min_batch", int(g))

    @property
    def kv_dtype(self) -> np.dtype:
        """numpy dtype of the CPU KV cache arrays."""
        return KV_TYPES[self.kv_type]

    @property
    def gemm_threshold(self) -> int:
        """Rows from which one sequence's batch takes the BLAS path (NEVER when gemm_min_batch is 0)."""
        return self.gemm_min_batch or NEVER

    def with_(self, **kw) -> "Options":
        """A copy with the keywords that are not None changed."""
        names = {f.name for f in fields(self)}
        bad = sorted(set(kw) - names)
        if bad:
            raise LlambaError(f"unknown option(s) {', '.join(bad)} (options: {', '.join(sorted(names))})")
        kw = {k: v for k, v in kw.items() if v is not None}
        return replace(self, **kw) if kw else self

    @classmethod
    def from_env(cls, environ=None) -> "Options":
        """The defaults the environment gives (`environ`: a mapping to read instead of os.environ)."""
        get = (lambda k, d: environ.get(k, d)) if environ is not None else env
        kv = get("LLAMBA_KV_F32", "0").strip().lower() in _TRUE
        repack = get("LLAMBA_REPACK", "1").strip().lower() not in _FALSE
        g = get("LLAMBA_GEMM_MIN_BATCH", "0").strip() or "0"
        try:
            gemm = int(g)
        except ValueError:
            raise LlambaError(f"LLAMBA_GEMM_MIN_BATCH must be an integer (0 = never), not '{g}'") from None
        return cls(kv_type="f32" if kv else "f16", repack=repack, gemm_min_batch=max(0, gemm))


def options_of(gf) -> Options:
    """The options a model read from GGUF file `gf` is built with (set by llamba.models.load_model); the
    environment's defaults for a file loaded without them (layers built directly, e.g. in tests)."""
    opts = getattr(gf, "options", None)
    return opts if isinstance(opts, Options) else Options.from_env()


# ---- process-level settings (read where they apply; they cannot differ between models of one process)

def keep_numba_ir() -> bool:
    """LLAMBA_NUMBA_KEEP_IR: keep the parsed LLVM module of every kernel loaded from Numba's cache."""
    return bool(env("LLAMBA_NUMBA_KEEP_IR"))


def keep_jit_pages() -> bool:
    """LLAMBA_KEEP_JIT_PAGES: leave libllvmlite's read-only pages resident after a model is loaded."""
    return bool(env("LLAMBA_KEEP_JIT_PAGES"))


def fake_devices() -> tuple[str, str] | None:
    """(LLAMBA_FAKE_DEVICES, LLAMBA_FAKE_KERNELS or 'xp') when stand-in devices are asked for, else None."""
    spec = env("LLAMBA_FAKE_DEVICES")
    return (spec, env("LLAMBA_FAKE_KERNELS", "xp")) if spec else None


def cache_home() -> str:
    """Where the default model is assembled: LLAMBA_CACHE, else $XDG_CACHE_HOME/llamba, else ~/.cache/llamba."""
    return env("LLAMBA_CACHE") or os.path.join(
        env("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llamba")


def repack_cache_dir() -> str | None:
    """Where repacked Q8_0 weights are kept between runs (llamba.layers): LLAMBA_REPACK_CACHE, else
    <cache_home()>/repacked; None when LLAMBA_REPACK_CACHE is 0/false/no/off (every load repacks)."""
    v = (env("LLAMBA_REPACK_CACHE") or "").strip()
    if v.lower() in _FALSE:
        return None
    return os.path.expanduser(v) if v else os.path.join(cache_home(), "repacked")


# ---- command line

def add_cli_args(p) -> None:
    """The Options flags of an argparse parser (defaults: None = the environment's / built-in default)."""
    p.add_argument("--kv-type", choices=sorted(KV_TYPES), default=None,
                   help="KV cache element type: f16 (default, fp16 bits) or f32 (same values, twice the memory)")
    p.add_argument("--no-repack", dest="repack", action="store_false", default=None,
                   help="keep Q8_0 weights in the GGUF layout (no repacking at load; same results)")
    p.add_argument("--gemm-min-batch", type=int, default=None, metavar="N",
                   help="prompt batches of N+ tokens use dequantize + BLAS (0 = never, the default)")


def cli_kwargs(a) -> dict:
    """Llama keyword arguments from the flags of `add_cli_args` (absent or None ones left out)."""
    kw = {k: getattr(a, k, None) for k in ("kv_type", "repack", "gemm_min_batch")}
    return {k: v for k, v in kw.items() if v is not None}
