"""Numba set-up shared by every kernel module (imported by each before its first ``@njit``).

Memory of kernels loaded from Numba's on-disk cache: for each cached function Numba keeps, besides the machine
code, the function's LLVM module parsed back from bitcode (``CPUCodeLibrary._shared_module``), only so that a
function compiled later in the same process could link it in. Parsed LLVM IR is several times larger than the
code: 5-6 MiB for one overload of the big matmul kernels, 10-15 MiB of a small model's peak RSS. We drop it right
after loading and keep the (compact) bitcode instead, parsing it again only if something does ask for the module
(``_get_module_for_linking``); the machine code that runs is the same.

Time of the same loads: Numba's loader parses that bitcode into a module only to list the symbols it defines (the
engine's ``_defined_symbols``, which ``get_pointer_to_function`` checks), ~4 ms a kernel, ~35 ms of a first
token. For an ELF object (Linux) we read those names from the object code's symbol table instead (every symbol
with a section, as the module's non-declarations: the same set) and parse nothing at load; any other object format
takes Numba's own path.

If this Numba's internals are not the ones expected, nothing is changed. ``LLAMBA_NUMBA_KEEP_IR=1`` also turns it
off.

``release_llvm_pages()``: LLVM's machine code and read-only data (libllvmlite.so, ~65 MiB resident once Numba has
initialised and loaded a few kernels) are only executed to compile or load a kernel, never to run one. After a
model is loaded, `Llama` hands those pages back to the kernel with ``madvise(MADV_PAGEOUT)``: they are clean
file-backed pages, so nothing is lost, and any later kernel load faults back the few it needs (~10 MiB for a
model's first forward pass). Only read-only mappings of that one library are advised; on systems without
``/proc/self/maps`` or ``MADV_PAGEOUT`` (Linux < 5.4) it does nothing; ``LLAMBA_KEEP_JIT_PAGES=1`` turns it off.
``release_llvm_pages_later()`` does it in a daemon thread once RELEASE_DELAY_S have passed without another such
request (what `Llama` and the first generated token ask for): paged out at once, the pages the first forward
pass's kernel loads need would be read back from the file on the time to the first token (~0.06 s of Gemma 3
270M's on 2 cores), and the release itself would delay that token (~0.02 s).

``target_features()``: the CPU features the kernels are compiled for, for every kernel module that emits
target-specific LLVM IR (x86 intrinsics, half-precision conversions): the host's, unless ``NUMBA_CPU_NAME`` /
``NUMBA_CPU_FEATURES`` say otherwise (e.g. ``NUMBA_CPU_NAME=generic`` for a cache that other machines can load:
then only target-independent IR is emitted; an intrinsic the target lacks would abort LLVM).
"""
from __future__ import annotations

import struct
import sys
import threading

from llamba.options import keep_jit_pages, keep_numba_ir

MADV_PAGEOUT = 21  # linux/mman.h


def target_features() -> dict:
    """{feature: enabled} Numba compiles for: the host CPU's, unless NUMBA_CPU_FEATURES gives them
    ("+avx2,-avx512f,...") or NUMBA_CPU_NAME names another CPU than the host (then none are assumed)."""
    import numba
    from llvmlite import binding as llb
    if numba.config.CPU_FEATURES is not None:
        return {f[1:]: f[0] == "+" for f in numba.config.CPU_FEATURES.split(",") if f and f[0] in "+-"}
    if numba.config.CPU_NAME is not None and numba.config.CPU_NAME != "host":
        return {}  # e.g. "generic" for portable caches: use only target-independent IR
    return dict(llb.get_host_cpu_features())


def target_is_host() -> bool:
    """True when Numba compiles for the host CPU itself (no NUMBA_CPU_NAME other than "host")."""
    import numba
    return numba.config.CPU_NAME is None or numba.config.CPU_NAME == "host"

PATCHED = False


def elf_defined_symbols(obj: bytes) -> set[str] | None:
    """Names of the symbols a 64-bit little-endian ELF object defines (those with a section, but section and file
    symbols), from its symbol table; None for anything else (or an ELF this reading does not cover)."""
    try:
        if len(obj) < 64 or obj[:4] != b"\x7fELF" or obj[4] != 2 or obj[5] != 1:
            return None
        shoff, = struct.unpack_from("<Q", obj, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
        if not shnum or shentsize < 64:
            return None
        secs = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
        out = set()
        tables = 0
        for _n, sh_type, _f, _a, off, size, link, _i, _al, entsize in secs:
            if sh_type != 2:  # SHT_SYMTAB
                continue
            tables += 1
            if entsize != 24 or size % 24 or off + size > len(obj) or link >= shnum:
                return None
            stroff, strsize = secs[link][4], secs[link][5]
            for st_name, st_info, _o, st_shndx, _v, _s in struct.iter_unpack("<IBBHQQ", obj[off:off + size]):
                if st_name and st_shndx != 0 and (st_info & 0xF) not in (3, 4):  # defined; not SECTION / FILE
                    if st_name >= strsize:
                        return None
                    end = obj.index(b"\0", stroff + st_name, stroff + strsize)
                    out.add(obj[stroff + st_name:end].decode("utf-8"))
        return out if tables == 1 else None
    except (struct.error, ValueError, IndexError, UnicodeDecodeError):
        return None


def _patch_cached_library_memory() -> bool:
    try:
        import llvmlite.binding as ll
        from numba.core import codegen as cg
    except Exception:  # noqa: BLE001 - no Numba internals as expected: leave it alone
        return False
    lib_cls = getattr(cg, "CPUCodeLibrary", None)
    unser = getattr(lib_cls, "_unserialize", None)
    gml = getattr(lib_cls, "_get_module_for_linking", None)
    if unser is None or gml is None or not hasattr(unser, "__func__") or getattr(lib_cls, "_llamba_patched", False):
        return False
    orig_unserialize = unser.__func__

    def _unserialize(cls, codegen, state):
        try:
            name, kind, data = state
            object_code, bitcode = data if kind == "object" else (None, None)
        except (TypeError, ValueError):
            return orig_unserialize(cls, codegen, state)
        engine = getattr(codegen, "_engine", None)
        syms = None
        if isinstance(object_code, bytes) and isinstance(getattr(engine, "_defined_symbols", None), set):
            syms = elf_defined_symbols(object_code)
        if syms is not None:  # Numba's 'object' path, without parsing the bitcode
            self = codegen.create_library(name)
            self.enable_object_caching()
            self._set_compiled_object(object_code)
            self._llamba_bitcode = bitcode
            self._shared_module = None
            self._finalize_final_module()
            engine._defined_symbols |= syms
            return self
        self = orig_unserialize(cls, codegen, state)
        if kind == "object" and getattr(self, "_shared_module", None) is not None:
            self._llamba_bitcode = data[1]
            self._shared_module = None
        return self

    def _get_module_for_linking(self):
        bc = getattr(self, "_llamba_bitcode", None)
        if bc is not None and self._shared_module is None:
            self._shared_module = ll.parse_bitcode(bc)
        return gml(self)

    lib_cls._unserialize = classmethod(_unserialize)
    lib_cls._get_module_for_linking = _get_module_for_linking
    lib_cls._llamba_patched = True
    return True


if not keep_numba_ir():
    PATCHED = _patch_cached_library_memory()


def release_llvm_pages() -> int:
    """Advise the kernel to reclaim libllvmlite's resident read-only pages; returns the bytes of address range
    advised (0 when nothing was done)."""
    if keep_jit_pages() or not sys.platform.startswith("linux"):
        return 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    ranges = []
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or not parts[5].endswith(".so") or "libllvmlite" not in parts[5] or "w" in parts[1]:
            continue
        a, b = (int(x, 16) for x in parts[0].split("-"))
        ranges.append((a, b))
    if not ranges:
        return 0
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        return 0
    done = 0
    for a, b in ranges:
        if madvise(a, b - a, MADV_PAGEOUT) != 0:
            break  # EINVAL: no MADV_PAGEOUT in this kernel; nothing else to try
        done += b - a
    return done


RELEASE_DELAY_S = 1.0  # release_llvm_pages_later: quiet time (no new request) before the pages are released
_release_lock = threading.Lock()
_release_timer = None


def _release_now():
    global _release_timer
    with _release_lock:
        _release_timer = None
    release_llvm_pages()


def release_llvm_pages_later(delay: float | None = None) -> None:
    """`release_llvm_pages()` in a daemon thread, `delay` (default RELEASE_DELAY_S) seconds from the last call: a
    call while one is pending starts its wait again (one release after a burst of kernel loads, off the caller's
    time). Does nothing where release_llvm_pages would do nothing (LLAMBA_KEEP_JIT_PAGES, not Linux)."""
    global _release_timer
    if keep_jit_pages() or not sys.platform.startswith("linux"):
        return
    with _release_lock:
        if _release_timer is not None:
            _release_timer.cancel()
        t = threading.Timer(RELEASE_DELAY_S if delay is None else delay, _release_now)
        t.daemon = True
        _release_timer = t
        t.start()


_AFTER_FIRST_TOKEN_DONE = False


def release_llvm_pages_after_first_token():
    """Once per process, after the first generated token: by then the kernels of a prompt batch are loaded (and,
    RELEASE_DELAY_S later, those of the decode steps), so the LLVM pages their loading faulted back (~10 MiB) can
    go too; released by `release_llvm_pages_later`, off the token's time."""
    global _AFTER_FIRST_TOKEN_DONE
    if not _AFTER_FIRST_TOKEN_DONE:
        _AFTER_FIRST_TOKEN_DONE = True
        release_llvm_pages_later()
