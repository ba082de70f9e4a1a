"""Devices and layer placement for GPU offload (docs/offload.md). CuPy is imported here, lazily, and nowhere
else in llamba: without it (or without a working CUDA driver) `discover_devices()` returns no devices and a
reason, and offload falls back to the CPU with one warning line.

Placement is pure arithmetic over a device list (`plan_layers`), written after llama.cpp's
`llama_model::load_tensors`:

* `-ngl N` counts n_layer_all + 1 layers: every block (MTP blocks included) and then the output layer
  (index n_layer_all). The last N go to the GPUs; `token_embd` always stays on the CPU.
* N < 0 (`-ngl -1`, `auto`, `all`): as many as fit in the devices' free memory (all when it is unknown).
* split mode `layer`: offloaded layer il goes to the first device whose normalized cumulative share
  (of `--tensor-split`, default the free memory) exceeds f = (il - first_gpu_layer) / n_offloaded.
  `none`: every offloaded layer on `--main-gpu`. `row` is not supported.

`LLAMBA_FAKE_DEVICES=N[:free_MiB,...]` makes `discover_devices()` return N numpy stand-in devices (the device
code path run on the CPU, for tests and debugging); `LLAMBA_FAKE_KERNELS=host` makes them compute with the
CPU kernels themselves (bit-identical to the CPU path) instead of the xp reference kernels.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import numpy as np

from llamba.errors import LlambaError, UnsupportedError

SPLIT_MODES = ("none", "layer", "row")
NGL_AUTO = -1
NGL_ALL = -2
FIT_RESERVE = 512 << 20  # bytes left free per device by the -ngl -1 fit (activations, cuBLAS workspace)


# ----------------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------------

def parse_ngl(value) -> int:
    """'-ngl' value: an int, 'auto' (-1) or 'all' (-2)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    s = str(value).strip().lower()
    if s == "all":
        return NGL_ALL
    if s == "auto":
        return NGL_AUTO
    try:
        return int(s)
    except ValueError:
        raise LlambaError(f"-ngl takes a number of layers, -1, 'auto' or 'all', not '{value}'") from None


def parse_tensor_split(value) -> list[float] | None:
    """'3,1' (or '3/1', or a list) -> [3.0, 1.0]; None or '' -> None (split by free memory)."""
    if value is None or value == "":
        return None
    parts = list(value) if isinstance(value, (list, tuple)) else str(value).replace("/", ",").split(",")
    try:
        vals = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise LlambaError(f"--tensor-split takes comma-separated proportions such as 3,1, not '{value}'") from None
    if any(v < 0 or not np.isfinite(v) for v in vals):
        raise LlambaError(f"--tensor-split proportions must be finite and >= 0, not '{value}'")
    return vals


def parse_split_mode(value) -> str:
    """'none' | 'layer' | 'row', or llama-cpp-python's ints 0 | 1 | 2."""
    if isinstance(value, (int, np.integer)) and 0 <= int(value) < 3:
        return SPLIT_MODES[int(value)]
    s = str(value).strip().lower()
    if s not in SPLIT_MODES:
        raise LlambaError(f"--split-mode must be one of none, layer, row, not '{value}'")
    return s


# ----------------------------------------------------------------------------------------------------
# placement arithmetic (pure)
# ----------------------------------------------------------------------------------------------------

def split_points(weights) -> np.ndarray:
    """Normalized cumulative shares in float32, as llama.cpp computes them (last one exactly 1)."""
    w = np.asarray(weights, dtype=np.float32)
    cum = np.empty_like(w)
    s = np.float32(0)
    for i, v in enumerate(w):
        s = np.float32(s + v)
        cum[i] = s
    if s <= 0:
        raise LlambaError("the GPU split proportions add up to 0: give --tensor-split with a positive entry")
    return (cum / s).astype(np.float32)


def assign(n_layer_all: int, n_offload: int, points) -> list[int | None]:
    """Device index (into the split's device list) of each of the n_layer_all + 1 layers, None = CPU,
    when the last n_offload layers are offloaded."""
    n = n_layer_all + 1
    act = max(0, min(n_offload, n))
    start = n - act
    out: list[int | None] = []
    for il in range(n):
        if il < start:
            out.append(None)
            continue
        f = np.float32(il - start) / np.float32(act)
        out.append(int(np.searchsorted(points, f, side="right")))  # std::upper_bound
    return out


def plan_layers(n_layer_all: int, n_gpu_layers: int, free, *, tensor_split=None, split_mode: str = "layer",
                main_gpu: int = 0, layer_bytes=None, reserve: int = FIT_RESERVE) -> list[int | None]:
    """Device id (index into `free`, the devices' free bytes, None where unknown) of each of the
    n_layer_all + 1 layers (the last is the output layer); None = CPU.

    n_gpu_layers < 0 fits as many layers as the free memory allows (layer_bytes: bytes of each layer, weights
    plus KV cache and recurrent state); with unknown free memory or sizes it offloads everything."""
    split_mode = parse_split_mode(split_mode)
    n_dev = len(free)
    if n_dev == 0 or n_gpu_layers == 0:
        return [None] * (n_layer_all + 1)
    if split_mode == "row":
        raise UnsupportedError("--split-mode row is not supported by llamba; use layer (the default) or none")
    if split_mode == "none":
        if not 0 <= main_gpu < n_dev:
            raise LlambaError(f"--main-gpu {main_gpu} does not exist: there {'is' if n_dev == 1 else 'are'} "
                              f"{n_dev} device{'s' if n_dev != 1 else ''} (0..{n_dev - 1})")
        ids, weights = [main_gpu], [1.0]
    else:
        ids = list(range(n_dev))
        ts = list(tensor_split or [])[:n_dev]  # like llama.cpp: entries past the device count are ignored
        ts += [0.0] * (n_dev - len(ts))
        if not any(v > 0 for v in ts):  # default: proportional to free memory (equal when unknown)
            ts = [float(f) if f is not None else 1.0 for f in free] if all(f is not None for f in free) \
                else [1.0] * n_dev
        weights = ts
    points = split_points(weights)
    n_all = n_layer_all + 1
    if n_gpu_layers > 0:
        n = min(n_gpu_layers, n_all)
    else:
        n = n_all
        if layer_bytes is not None and all(free[i] is not None for i in ids):
            budget = [max(0, free[i] - reserve) for i in ids]
            while n > 0:
                used = [0] * len(ids)
                for il, d in enumerate(assign(n_layer_all, n, points)):
                    if d is not None:
                        used[d] += layer_bytes[il]
                if all(u <= b for u, b in zip(used, budget)):
                    break
                n -= 1
    return [None if d is None else ids[d] for d in assign(n_layer_all, n, points)]


# ----------------------------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------------------------

@dataclass
class Device:
    """One compute device: a CUDA GPU through CuPy, or a numpy stand-in (kind 'numpy') for tests."""

    index: int
    name: str
    kind: str  # "cuda" | "numpy"
    total: int | None = None
    free: int | None = None
    kernel_kind: str = "xp"  # numpy stand-ins: "xp" (reference kernels) or "host" (the CPU kernels)
    n_transfers: int = 0  # activations copied into this device
    _kernels: object = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return f"{'GPU' if self.kind == 'cuda' else 'fake'}{self.index}"

    @property
    def xp(self):
        if self.kind == "cuda":
            import cupy
            return cupy
        return np

    @property
    def kernels(self):
        """The device-kernel interface (see llamba.kernels.cuda), built on first use."""
        if self._kernels is None:
            if self.kind == "cuda":
                from llamba.kernels.cuda import CudaKernels
                with self.activate():
                    self._kernels = CudaKernels.for_cupy(self.xp)
            elif self.kernel_kind == "host":
                from llamba.offload import HostKernels
                self._kernels = HostKernels()
            else:
                from llamba.kernels.cuda import XpKernels
                self._kernels = XpKernels(np)
        return self._kernels

    def activate(self):
        """Context in which this device is CuPy's current device."""
        if self.kind == "cuda":
            import cupy
            return cupy.cuda.Device(self.index)
        return contextlib.nullcontext()

    def put(self, x):
        """Copy an activation array (host, or on another device) into this device. Called only where
        activations cross a split boundary; the numpy stand-in copies too, so the path is exercised."""
        self.n_transfers += 1
        if self.kind == "cuda":
            import cupy
            if isinstance(x, cupy.ndarray):
                cupy.cuda.Device(x.device.id).synchronize()  # the producer's work is done before the copy
                with self.activate():
                    return cupy.copy(x)  # allocated on the current device, copied over from x's device
            with self.activate():
                return cupy.asarray(x)
        return np.array(x, copy=True)

    def upload(self, a: np.ndarray):
        """A parameter (norm weight, table) onto this device."""
        if self.kind == "cuda":
            with self.activate():
                return self.xp.asarray(np.ascontiguousarray(a))
        return np.ascontiguousarray(a)

    def cached(self, a: np.ndarray):
        """`upload` memoized on the identity of a small per-forward host array (positions, RoPE tables)."""
        if self.kind != "cuda":
            return a
        hit = self._cache.get(id(a))
        if hit is not None and hit[0] is a:
            return hit[1]
        if len(self._cache) > 32:
            self._cache.clear()
        d = self.upload(a)
        self._cache[id(a)] = (a, d)
        return d

    def to_host(self, x) -> np.ndarray:
        if self.kind == "cuda":
            return x.get()
        return np.array(x, copy=True)

    def zeros(self, shape, dtype):
        with self.activate():
            return self.xp.zeros(shape, dtype=dtype)

    def synchronize(self):
        if self.kind == "cuda":
            import cupy
            cupy.cuda.Device(self.index).synchronize()

    def mem_info(self) -> tuple[int | None, int | None]:
        """(free, total) bytes now; (None, None) when unknown."""
        if self.kind == "cuda":
            import cupy
            with self.activate():
                free, total = cupy.cuda.runtime.memGetInfo()
            return int(free), int(total)
        return self.free, self.total


_DISCOVERED: tuple[list[Device], str | None] | None = None


def fake_devices(spec: str | int, kernel_kind: str = "xp") -> list[Device]:
    """numpy stand-in devices: spec 'N' or 'N:free_MiB,free_MiB,...' (free memory unknown when not given)."""
    s = str(spec)
    n_s, _, mem = s.partition(":")
    try:
        n = int(n_s)
        frees = [int(float(m) * 2**20) for m in mem.split(",")] if mem else []
    except ValueError:
        raise LlambaError(f"LLAMBA_FAKE_DEVICES must look like 2 or 2:4096,2048, not '{spec}'") from None
    frees += [None] * (n - len(frees))
    return [Device(i, f"numpy stand-in {i}", "numpy", total=frees[i], free=frees[i], kernel_kind=kernel_kind)
            for i in range(n)]


def discover_devices(refresh: bool = False) -> tuple[list[Device], str | None]:
    """(devices, None) or ([], why there are none). Never raises."""
    global _DISCOVERED
    if _DISCOVERED is not None and not refresh:
        return _DISCOVERED
    from llamba.options import fake_devices as fake_env
    fake = fake_env()  # (LLAMBA_FAKE_DEVICES, LLAMBA_FAKE_KERNELS) or None
    if fake:
        try:
            devs = fake_devices(*fake)
            _DISCOVERED = (devs, None if devs else "LLAMBA_FAKE_DEVICES=0")
        except LlambaError as e:
            _DISCOVERED = ([], str(e))
        return _DISCOVERED
    _DISCOVERED = _discover_cuda()
    return _DISCOVERED


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _discover_cuda() -> tuple[list[Device], str | None]:
    try:
        import cupy
    except ImportError:
        return [], "CuPy is not installed (pip install 'llamba[gpu]' for CUDA 12)"
    except Exception as e:  # a broken CuPy install
        return [], f"CuPy failed to import ({_one_line(e)})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return [], f"no usable CUDA driver ({_one_line(e)})"
    if n <= 0:
        return [], "the CUDA driver reports no GPU"
    devs = []
    for i in range(n):
        try:
            props = cupy.cuda.runtime.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            with cupy.cuda.Device(i):
                free, total = cupy.cuda.runtime.memGetInfo()
            devs.append(Device(i, name, "cuda", total=int(total), free=int(free)))
        except Exception as e:
            return [], f"GPU {i} is not usable ({_one_line(e)})"
    return devs, None


# ----------------------------------------------------------------------------------------------------
# the one warning
# ----------------------------------------------------------------------------------------------------

_WARNED = False


def warn_once(msg: str):
    """Print `llamba: warning: msg` to stderr the first time only (one line per process)."""
    global _WARNED
    if not _WARNED:
        _WARNED = True
        print(f"llamba: warning: {msg}", file=sys.stderr, flush=True)


def _reset_for_tests():
    global _WARNED, _DISCOVERED
    _WARNED = False
    _DISCOVERED = None


def describe_devices() -> list[str]:
    """Lines for `llamba info --devices`."""
    devs, why = discover_devices()
    if not devs:
        return [f"devices: none ({why})"]
    lines = [f"devices: {len(devs)}"]
    for d in devs:
        free, total = d.mem_info()
        mem = ("memory unknown" if total is None else
               f"{total / 2**30:.1f} GiB total, {free / 2**30:.1f} GiB free")
        lines.append(f"  {d.label}: {d.name}, {mem}")
    return lines
