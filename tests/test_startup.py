"""Start-up pieces on the time to first token: the deferred release of LLVM's pages (llamba.kernels._jit) and the
tokenizer's index of a GGUF vocabulary hashed from its bytes (llamba.tokenizer.StrIndex over a StringArray)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from llamba.gguf import StringArray
from llamba.kernels import _jit
from llamba.tokenizer import StrIndex, _bytes_hash, _bytes_hashes


def _string_array(texts):
    raw = [t.encode() for t in texts]
    return StringArray(b"".join(raw), np.concatenate([[0], np.cumsum([len(r) for r in raw])]).astype(np.int64))


def test_release_later_runs_once_after_the_last_request(monkeypatch):
    if not _jit.sys.platform.startswith("linux"):
        pytest.skip("the release is Linux-only")
    monkeypatch.delenv("LLAMBA_KEEP_JIT_PAGES", raising=False)
    calls = []
    done = threading.Event()

    def fake():
        calls.append(time.monotonic())
        done.set()
        return 0
    monkeypatch.setattr(_jit, "release_llvm_pages", fake)
    t0 = time.monotonic()
    for _ in range(5):  # a burst of requests: one release, after the last one's delay
        _jit.release_llvm_pages_later(0.2)
        time.sleep(0.05)
    assert not calls  # not on the caller's time
    assert done.wait(5)
    time.sleep(0.3)
    assert len(calls) == 1 and calls[0] - t0 >= 0.2 + 4 * 0.05 - 0.01


def test_release_later_honours_keep_jit_pages(monkeypatch):
    monkeypatch.setenv("LLAMBA_KEEP_JIT_PAGES", "1")
    calls = []
    monkeypatch.setattr(_jit, "release_llvm_pages", lambda: calls.append(1))
    _jit.release_llvm_pages_later(0.0)
    time.sleep(0.2)
    assert calls == []


def test_bytes_hashes_equal_the_lookup_hash():
    rng = np.random.default_rng(1)
    alphabet = ["a", "é", "日", "🙂", " ", "\n", "▁", "\x00"]
    texts = ["".join(rng.choice(alphabet, int(rng.integers(0, 12)))) for _ in range(2000)]
    texts += ["x" * 70000, "", "y" * 300000, "z"]  # strings longer than a chunk, empty ones between
    sa = _string_array(texts)
    got = _bytes_hashes(sa._blob, sa._offsets(), chunk=4096)
    assert got.dtype == np.uint64 and got.tolist() == [_bytes_hash(t.encode()) for t in texts]
    assert _bytes_hashes(b"", np.zeros(1, np.int64)).shape == (0,)
    assert _bytes_hashes(b"", np.zeros(3, np.int64)).tolist() == [0, 0]


@pytest.mark.parametrize("last_wins", [True, False])
def test_string_array_index_equals_list_index(last_wins):
    rng = np.random.default_rng(2)
    alphabet = ["a", "b", "é", "日", "🙂", "Ġ"]
    texts = ["".join(rng.choice(alphabet, int(rng.integers(1, 4)))) for _ in range(5000)]  # many duplicates
    a, b = StrIndex(_string_array(texts), last_wins), StrIndex(list(texts), last_wins)
    for t in set(texts) | {"zz", "a" * 9, "\udc80", "a\udcff", "日本"}:
        assert a.get(t) == b.get(t), t
        assert a.get(t) == a.get(t)  # again, from the hits cache
    assert a.get("\udc80", -1) == -1  # a lone surrogate (byte fallback lookups) matches nothing


def test_elf_symbols_are_the_bitcode_modules_definitions():
    """Kernels loaded from Numba's cache list their symbols from the object code's ELF symbol table instead of
    parsing their bitcode (llamba.kernels._jit): the two give the same names, and a cached kernel loaded that way
    runs."""
    import struct
    import sys
    import llvmlite.binding as ll
    from numba import njit
    from llamba.kernels.text import gather_strings
    data = np.frombuffer(struct.pack("<Q", 2) + b"hi" + struct.pack("<Q", 1) + b"!", np.uint8)
    blob, offs, end = gather_strings(data, 0, 2, 100)  # (from the cache, or compiled)
    assert blob.tobytes() == b"hi!" and offs.tolist() == [0, 2, 3] and end == len(data)

    @njit(cache=False)
    def f(x, n):
        out = np.zeros(n, np.float64)
        for i in range(n):
            out[i] = np.sqrt(x[i % x.shape[0]]) + i
        return out.sum()
    assert f(np.arange(4.0), 10) == sum(np.sqrt(i % 4) + i for i in range(10))
    _name, kind, (obj, bitcode) = next(iter(f.overloads.values())).library.serialize_using_object_code()
    mod = ll.parse_bitcode(bitcode)
    want = {g.name for gs in (mod.functions, mod.global_variables) for g in gs if not g.is_declaration}
    got = _jit.elf_defined_symbols(obj)
    if not sys.platform.startswith("linux"):
        assert got is None or got == want
    else:
        assert got == want and len(want) > 2
    assert _jit.elf_defined_symbols(b"not an object file" * 10) is None
    assert _jit.elf_defined_symbols(obj[:100]) is None


def test_contains_and_utf8_of_a_string_array_equal_the_list_versions():
    from llamba.tokenizer import _contains, _utf8_of
    texts = ["<unused0>", "un", "used", "xunusedx", "unuse", "▁unused日", "", "unused", "日unused", "a"]
    sa = _string_array(texts)
    ids = np.arange(len(texts))
    want = np.array(["unused" in t for t in texts])
    assert _contains(sa, ids, "unused").tolist() == want.tolist() == _contains(list(texts), ids, "unused").tolist()
    sub = np.array([8, 1, 0])
    assert _contains(sa, sub, "unused").tolist() == want[sub].tolist()
    assert _utf8_of(sa, [0, 5, 6]) == _utf8_of(list(texts), [0, 5, 6]) == {0: b"<unused0>", 5: "▁unused日".encode(),
                                                                            6: b""}
