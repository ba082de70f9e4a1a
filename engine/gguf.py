"""GGUF reader: header, metadata, tensor infos, and zero-copy tensor views on an mmap (docs/gguf.md).

Nothing is dequantized at load. Every problem with a file becomes a one-line `GGUFError` naming the file.
Split models (`name-00001-of-00003.gguf`) are opened as one: the tensors are the union over all parts.
"""
from __future__ import annotations

import mmap
import weakref
import os
import re
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llamba.errors import GGUFError
from llamba.kernels.traits import PLAIN_DTYPES, TYPES

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_STRING = 1 << 30  # sanity bounds: anything larger is a corrupt file
MAX_COUNT = 1 << 34
MAX_DIMS = 4

# metadata value type code -> (struct format, size) for scalars
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NP_DTYPES = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}
_STRING, _ARRAY = 8, 9

# plain (non-block) tensor types viewed with a numpy dtype (the registry's np_dtype; BF16 as raw uint16)
_PLAIN_DTYPES = PLAIN_DTYPES

_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# the fewest bytes each item can take in a file: a count larger than the bytes left divided by this is corrupt
# (checked before anything is allocated for the items)
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dimension, type, offset
_MIN_ITEM_BYTES = {_STRING: 8, _ARRAY: 4 + 8}  # string: its length; array: element type + count

SHORT_LIMIT = 80  # characters of a value quoted in an error message


def short(value, limit: int = SHORT_LIMIT) -> str:
    """A value as quoted in a one-line error message: printable (control characters, newlines and lone surrogates
    escaped) and at most about `limit` characters, whatever the value (a 24 MB string from a corrupt length, a
    262k-entry array): strings are cut with '... (N chars)', sequences show their first items and their length."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value[:limit + 1])
        s = repr(value[:limit]) + ("..." if len(value) > limit else "")
        return s
    if isinstance(value, str):
        n = len(value)
        s = value[:limit + 1]
    elif isinstance(value, (list, tuple, np.ndarray, StringArray)):
        n_items = len(value) if not isinstance(value, np.ndarray) or value.ndim else 1
        if isinstance(value, np.ndarray) and value.ndim != 1:
            return f"<array of shape {value.shape}, {value.dtype}>"
        head = ", ".join(short(value[i], limit // 4 + 4) for i in range(min(n_items, 4)))
        more = f", ... ({n_items} items)" if n_items > 4 else ""
        s = f"[{head}{more}]"
        return s if len(s) <= limit + 40 else s[:limit] + f"... ({n_items} items)]"
    else:
        s = repr(value)
        n = len(s)
        s = s[:limit + 1]
    if not s.isprintable():
        s = s.encode("unicode_escape", "backslashreplace").decode("ascii")
    if n > limit or len(s) > limit:
        s = s[:limit] + f"... ({n} chars)"
    return s


class StringArray(Sequence):
    """A large GGUF string array (a vocabulary, a merge list) kept as its UTF-8 bytes: one blob and n+1 offsets.

    It reads like a list of str (index, slice -> list, len, iteration, == with a list), decoding one item on
    access, so a 262k-entry vocabulary costs ~5 MiB instead of ~30 MiB of str objects. Only arrays whose every
    string is valid UTF-8 become a StringArray (the reader checks; others stay lists decoded with
    surrogateescape)."""

    __slots__ = ("_blob", "_offs")

    def __init__(self, blob: bytes, offsets):
        self._blob = bytes(blob)
        if not isinstance(offsets, array):
            offsets = np.asarray(offsets, np.int64)
            small = len(offsets) == 0 or offsets[-1] < 2**31
            offsets = array("i" if small else "q", offsets.astype(np.int32 if small else np.int64).tobytes())
        self._offs = offsets

    def __len__(self) -> int:
        return len(self._offs) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self._offs) - 1
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("StringArray index out of range")
        o = self._offs
        return self._blob[o[i]:o[i + 1]].decode("utf-8")

    def _offsets(self) -> np.ndarray:
        return np.frombuffer(self._offs, dtype=np.int32 if self._offs.typecode == "i" else np.int64)

    def byte_lengths(self) -> np.ndarray:
        return np.diff(self._offsets())

    def tolist(self) -> list[str]:
        """Every string, with one UTF-8 decode of the blob split at character offsets."""
        text = self._blob.decode("utf-8")
        b = np.frombuffer(self._blob, dtype=np.uint8)
        lead = np.empty(len(b) + 1, dtype=np.int64)
        lead[0] = 0
        np.cumsum((b & 0xC0) != 0x80, out=lead[1:])
        co = lead[self._offsets()].tolist()
        return [text[a:c] for a, c in zip(co[:-1], co[1:])]

    def __iter__(self):
        return iter(self.tolist())

    def __eq__(self, other):
        if isinstance(other, StringArray):
            return self._blob == other._blob and self._offs == other._offs
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # mutable-sequence-like equality, like a list

    def __repr__(self) -> str:
        n = len(self)
        head = ", ".join(repr(self[i]) for i in range(min(n, 3)))
        return f"StringArray([{head}{', ...' if n > 3 else ''}], {n} strings)"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order, ne[0] fastest
    type_id: int
    offset: int  # absolute byte offset in its file
    nbytes: int
    part: int  # which split file

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy shape (reverse of ne)."""
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        return TYPES[self.type_id].name

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reader over a buffer; errors name the file and what was being read."""

    def __init__(self, buf, path: str):
        self.buf = buf
        self.pos = 0
        self.path = path
        self.size = len(buf)

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str):
        if self.pos + n > self.size:
            raise self.fail(f"truncated file: it ends inside the {what} (offset {self.pos}, "
                            f"{n} bytes needed, file is {self.size} bytes); re-download or re-convert the model")

    def scalar(self, code: int, what: str):
        fmt, n = _SCALARS[code]
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what):
        return self.scalar(4, what)

    def u64(self, what):
        return self.scalar(10, what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > MAX_STRING:
            raise self.fail(f"corrupt {what}: string length {n} is absurd")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="surrogateescape")

    def value(self, code: int, what: str, depth: int = 0):
        if code in _SCALARS:
            v = self.scalar(code, what)
            return bool(v) if code == 7 else v
        if code == _STRING:
            return self.string(what)
        if code == _ARRAY:
            if depth > 2:
                raise self.fail(f"corrupt {what}: arrays nested too deep")
            et = self.u32(what)
            n = self.u64(what)
            if n > MAX_COUNT:
                raise self.fail(f"corrupt {what}: array length {n} is absurd")
            isz = np.dtype(_NP_DTYPES[et]).itemsize if et in _NP_DTYPES else _MIN_ITEM_BYTES.get(et, 1)
            if n * isz > self.size - self.pos:  # before allocating anything for the n items
                raise self.fail(f"truncated file or corrupt {what}: an array of {n} items needs at least {n * isz} "
                                f"bytes but only {self.size - self.pos} are left in the file (offset {self.pos})")
            if et in _NP_DTYPES:
                arr = np.frombuffer(self.buf, dtype=np.dtype(_NP_DTYPES[et]).newbyteorder("<"), count=n,
                                    offset=self.pos).copy()
                self.pos += n * isz
                return arr
            if et == _STRING:
                return self._string_array(n, what)
            if et == _ARRAY:
                return [self.value(_ARRAY, what, depth + 1) for _ in range(n)]
            raise self.fail(f"corrupt {what}: unknown array element type {et}")
        raise self.fail(f"corrupt {what}: unknown metadata value type {code}")

    def _string_array(self, n: int, what: str) -> "list[str] | StringArray":
        if n >= 256:  # large arrays (vocabularies): one compiled scan, kept as bytes (StringArray)
            fast = self._string_array_fast(n)
            if fast is not None:
                return fast
        return self._string_array_slow(n, what)

    def _string_array_fast(self, n: int):
        """The strings of the array via llamba.kernels.text.gather_strings, as a StringArray (bytes + offsets).
        None when the array is malformed or not valid UTF-8: the slow path then reports the error / decodes string
        by string with surrogateescape, exactly as before."""
        from llamba.kernels.text import gather_strings
        data = np.frombuffer(self.buf, dtype=np.uint8)
        blob, offs, end = gather_strings(data, self.pos, n, MAX_STRING)
        if end < 0:
            return None
        starts = offs[:-1][offs[1:] > offs[:-1]]
        if len(starts) and np.any((blob[starts] & 0xC0) == 0x80):
            return None  # a string starts with a continuation byte: it is invalid alone (or splits a character)
        raw = blob.tobytes()
        try:
            raw.decode("utf-8")  # valid as a whole, and every string starts at a character: each one is valid
        except UnicodeDecodeError:
            return None
        self.pos = int(end)
        return StringArray(raw, offs)

    def _string_array_slow(self, n: int, what: str) -> list[str]:
        out = []
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.unpack_from
        for _ in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, what)
            ln = unpack("<Q", buf, pos)[0]
            pos += 8
            if ln > MAX_STRING or pos + ln > size:
                self.pos = pos
                if ln > MAX_STRING:
                    raise self.fail(f"corrupt {what}: string length {ln} is absurd")
                self.need(ln, what)
            raw = bytes(buf[pos:pos + ln])
            pos += ln
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(raw.decode("utf-8", errors="surrogateescape"))
        self.pos = pos
        return out


class _Part:
    """One GGUF file: parsed header, metadata and tensor infos, plus its mmap."""

    def __init__(self, path: str, part_index: int):
        self.path = path
        try:
            f = open(path, "rb")
        except OSError as e:
            raise GGUFError(f"{path}: cannot open model file: {e.strerror}") from None
        with f:
            # the file's identity as opened (size, mtime, inode): keys derived data cached on disk (llamba.layers)
            self.stat = os.fstat(f.fileno())
            size = self.stat.st_size
            if size == 0:
                raise GGUFError(f"{path}: file is empty; not a GGUF model")
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        c = _Cursor(self.mm, path)
        if size < 4 or self.mm[:4] != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (bad magic {bytes(self.mm[:4])!r}, expected b'GGUF')")
        c.pos = 4
        self.version = c.u32("header")
        if self.version not in SUPPORTED_VERSIONS:
            raise GGUFError(f"{path}: unsupported GGUF version {self.version} (llamba reads versions 2 and 3)")
        n_tensors = c.u64("header")
        n_kv = c.u64("header")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise GGUFError(f"{path}: corrupt header: {n_tensors} tensors and {n_kv} metadata keys is absurd")
        left = size - c.pos
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > left:
            raise GGUFError(f"{path}: truncated file or corrupt header: {n_kv} metadata keys and {n_tensors} tensor "
                            f"infos cannot fit in the {left} bytes left in the file")
        meta: dict = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            q = short(key)
            code = c.u32(f"metadata value type of '{q}'")
            meta[key] = c.value(code, f"metadata value '{q}'")
        self.metadata = meta
        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{path}: corrupt general.alignment {short(align)}: must be a power of two")
        self.alignment = align
        raw_infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor info #{i} name")
            q = short(name)
            nd = c.u32(f"tensor info '{q}'")
            if nd == 0 or nd > MAX_DIMS:
                raise GGUFError(f"{path}: corrupt tensor info '{q}': {nd} dimensions (1 to 4 allowed)")
            ne = tuple(c.scalar(11, f"tensor info '{q}'") for _ in range(nd))
            if any(d <= 0 or d > MAX_COUNT for d in ne):
                raise GGUFError(f"{path}: corrupt tensor info '{q}': shape {list(ne)} is invalid")
            tid = c.u32(f"tensor info '{q}'")
            off = c.u64(f"tensor info '{q}'")
            raw_infos.append((name, ne, tid, off))
        data_start = (c.pos + align - 1) // align * align
        self.data_start = data_start
        infos = {}
        for name, ne, tid, off in raw_infos:
            q = short(name)
            t = TYPES.get(tid)
            if t is None:
                raise GGUFError(f"{path}: tensor '{q}' has unknown tensor type id {tid}; "
                                f"the file is corrupt or newer than this llamba")
            if ne[0] % t.block_elems:
                raise GGUFError(f"{path}: tensor '{q}': row length {ne[0]} is not a multiple of "
                                f"the {t.name} block size {t.block_elems}")
            nbytes = ne[0] // t.block_elems * t.block_bytes
            for d in ne[1:]:
                nbytes *= d
            if off % align:
                raise GGUFError(f"{path}: tensor '{q}' data offset {off} is misaligned "
                                f"(alignment {align}); the file is corrupt")
            start = data_start + off
            if start + nbytes > size:
                raise GGUFError(f"{path}: truncated file: tensor '{q}' needs bytes {start}..{start + nbytes} "
                                f"but the file has {size}; re-download the model")
            if name in infos:
                raise GGUFError(f"{path}: corrupt file: tensor '{q}' appears twice")
            infos[name] = TensorInfo(name, ne, tid, start, nbytes, part_index)
        self.tensors = infos


class GGUFFile:
    """A GGUF model (one file or all parts of a split model).

    `metadata`: key -> value (str, int, float, bool, numpy array for numeric arrays, list[str] for string arrays).
    `tensors`: name -> TensorInfo. `tensor(name)` returns a read-only zero-copy numpy view.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise GGUFError(f"{path}: model file not found")
        if os.path.isdir(path):
            raise GGUFError(f"{path}: is a directory, not a GGUF model file")
        self.path = path
        paths = _split_paths(path)
        self.parts = [_Part(p, i) for i, p in enumerate(paths)]
        self.metadata = dict(self.parts[0].metadata)
        _drop_mistyped_optional_keys(self.metadata, path)
        self.tensors: dict[str, TensorInfo] = {}
        for part in self.parts:
            for name, info in part.tensors.items():
                if name in self.tensors:
                    raise GGUFError(f"{part.path}: tensor '{short(name)}' appears in more than one split")
                self.tensors[name] = info
        # arrays computed from tensors at load (e.g. repacked weights, llamba.layers.Linear), so that two layers
        # over one tensor share one copy; weak values: an array goes when the last layer using it does (e.g. the
        # CPU layers that GPU offload replaces)
        self.derived = weakref.WeakValueDictionary()
        if len(self.parts) > 1:
            want = self.metadata.get("split.tensors.count")
            if isinstance(want, int) and want != len(self.tensors):
                raise GGUFError(f"{path}: split model has {len(self.tensors)} tensors over {len(self.parts)} files "
                                f"but split.tensors.count says {want}; a part is missing or corrupt")

    # ---- metadata helpers
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: missing required key general.architecture")
        return arch

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: missing required metadata key '{short(key)}'")
        return self.metadata[key]

    # ---- tensors
    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: missing required tensor '{short(name)}'") from None

    def tensor(self, name: str) -> np.ndarray:
        """Zero-copy view. Plain types get their dtype and numpy shape (BF16 as uint16); block-quantized
        types are uint8 of shape (..., rows, row_bytes)."""
        info = self.info(name)
        mm = self.parts[info.part].mm
        shape = info.shape
        if info.type_id in _PLAIN_DTYPES:
            dt = np.dtype(_PLAIN_DTYPES[info.type_id])
            arr = np.frombuffer(mm, dtype=dt, count=info.n_elements, offset=info.offset)
            return arr.reshape(shape)
        t = TYPES[info.type_id]
        rb = info.ne[0] // t.block_elems * t.block_bytes
        arr = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return arr.reshape(shape[:-1] + (rb,))

    def release(self, name: str, upto: int | None = None, since: int = 0) -> bool:
        """Drop the pages of tensor `name` from this process's resident memory (madvise MADV_DONTNEED on the whole
        pages inside its byte range), for a tensor whose bytes were copied into another layout.  The mapping is
        read-only and file-backed, so this loses nothing: views stay valid and fault their bytes back in from the
        file (the page cache) when read.  `upto`: only the tensor's first `upto` bytes (the pages wholly inside
        them).  `since`: the `upto` of an earlier call, whose pages are gone already: only the pages from there on
        (so successive calls over growing prefixes release each page once and leave no gap between them).
        Returns False where madvise is unavailable or the mapping is closed."""
        info = self.info(name)
        nbytes = info.nbytes if upto is None else min(int(upto), info.nbytes)
        mm = self.parts[info.part].mm
        adv = getattr(mmap, "MADV_DONTNEED", None)
        if adv is None or not hasattr(mm, "madvise"):
            return False
        ps = mmap.PAGESIZE
        a = -(-info.offset // ps) * ps
        if since > 0:  # the earlier call ended at this page boundary
            a = max(a, (info.offset + min(int(since), info.nbytes)) // ps * ps)
        b = (info.offset + nbytes) // ps * ps
        if b <= a:
            return True
        try:
            mm.madvise(adv, a, b - a)
        except (OSError, ValueError):
            return False
        return True

    def close(self):
        for p in self.parts:
            try:
                p.mm.close()
            except BufferError:
                pass  # views still alive; the mapping is released when they are

    @property
    def file_size(self) -> int:
        return sum(p.size for p in self.parts)


# optional string keys that only some features read: a value of another type is dropped with one warning line
# (the model still loads, as without the key) rather than failing later where a str is assumed
_OPTIONAL_STR_KEYS = ("tokenizer.chat_template", "general.name")


def _drop_mistyped_optional_keys(meta: dict, path: str):
    import sys
    for key in list(meta):
        if (key in _OPTIONAL_STR_KEYS or key.startswith("tokenizer.chat_template.")) and \
                not isinstance(meta[key], str):
            print(f"llamba: warning: {path}: ignoring metadata key '{short(key)}': expected a string, got "
                  f"{_type_name(meta[key])} {short(meta[key], 40)}", file=sys.stderr)
            del meta[key]


def _type_name(v) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of {len(v) if v.ndim else 1} {v.dtype}"
    if isinstance(v, (list, StringArray)):
        return f"an array of {len(v)} items"
    return {bool: "a bool", int: "an integer", float: "a float", str: "a string"}.get(type(v), type(v).__name__)


def _split_paths(path: str) -> list[str]:
    m = _SPLIT_RE.match(os.path.basename(path))
    if not m:
        return [path]
    count = int(m.group("count"))
    if count < 1:
        raise GGUFError(f"{path}: corrupt split file name (count 0)")
    d = os.path.dirname(path)
    paths = [os.path.join(d, f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise GGUFError(f"{path}: split model part missing: {missing[0]}; all {count} parts must be in one folder")
    return paths
