"""The repacked-weight cache (llamba.layers.repacked, LLAMBA_REPACK_CACHE): a hit gives the same packed bytes and
the same logits as repacking; a corrupted, truncated, mismatched or stale file is never used (the weight is repacked
and the file rewritten); an unwritable directory or a full disk only means no cache; the directory stays under its
size limit without touching files it did not write."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from llamba import Llama
from llamba import layers as L
from llamba.gguf import GGUFFile
from llamba.kernels.quant import ops_for
from llamba.layers import Linear
from tiny_models import write_model

NAMES = ["token_embd.weight", "blk.0.ffn_down.weight", "blk.1.ffn_up.weight"]


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory):
    p = tmp_path_factory.mktemp("repack_cache") / "llama-q8_0.gguf"
    # n_vocab 301: token_embd (tied output) ends in a partial group of 8 rows
    write_model(p, "llama", qtype=QT.Q8_0, n_vocab=301, n_embd=64, n_ff=160, n_head=4, n_head_kv=2, seed=5)
    return p


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache directory of its own, every tensor of the tiny model large enough to be cached."""
    d = tmp_path / "repacked"
    monkeypatch.setenv("LLAMBA_REPACK_CACHE", str(d))
    monkeypatch.delenv("LLAMBA_REPACK", raising=False)
    monkeypatch.setattr(L, "REPACK_CACHE_MIN_BYTES", 0)
    return d


def _fresh(path, name):
    """(raw view, packed array repacked in memory) of a tensor."""
    gf = GGUFFile(path)
    info = gf.info(name)
    w = gf.tensor(name).reshape(info.ne[1], -1)
    return w, ops_for(info.type_id).repack(np.ascontiguousarray(w))


def _packed(path, name):
    return Linear(GGUFFile(path), name).wp


def _files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".npy") and not f.startswith(".")) if d.exists() else []


def _is_mapped(a):
    while a is not None and not isinstance(a, np.memmap):
        a = a.base
    return a is not None


def test_repack_into_equals_repack():
    rng = np.random.default_rng(3)
    ops = ops_for(QT.Q8_0)
    for rows, nb in ((301, 3), (64, 2), (9, 1), (1, 1)):
        w = rng.integers(0, 256, (rows, nb * 34), dtype=np.uint8)
        w.reshape(rows, nb, 34)[:, :, 1] &= 0x3B
        out = np.full(ops.packed_shape(rows, nb * 34), 0xAA, np.uint8)
        seen = []
        ops.repack_into(w, out, 34 * nb * 16, seen.append)
        assert np.array_equal(out, ops.repack(w)) and seen[-1] == rows
        assert L._packed_rows_match(w, out)  # the numpy twin of the layout used to check cache files
        with pytest.raises(ValueError):
            ops.repack_into(w, np.empty((out.shape[0] + 1, out.shape[1]), np.uint8))


def test_hit_gives_identical_arrays_and_logits(q8_model, cache, monkeypatch):
    first = {n: _packed(q8_model, n) for n in NAMES}
    files = _files(cache)
    assert len(files) == len(NAMES)
    assert len({f.split("-")[0] for f in files}) == 1  # one model key
    for n in NAMES:
        w, ref = _fresh(q8_model, n)
        again = _packed(q8_model, n)
        assert _is_mapped(again) and not again.flags.writeable
        assert again.dtype == np.uint8 and again.ctypes.data % 64 == 0
        assert np.array_equal(first[n], ref) and np.array_equal(again, ref), n
    assert _files(cache) == files
    with_cache = Llama(str(q8_model), n_ctx=32, verbose=False)
    assert _is_mapped(with_cache.model.output.wp)
    monkeypatch.setenv("LLAMBA_REPACK_CACHE", "off")
    without = Llama(str(q8_model), n_ctx=32, verbose=False)
    assert not _is_mapped(without.model.output.wp)
    toks = [3, 17, 250, 300]
    assert np.array_equal(with_cache.eval_logits(toks), without.eval_logits(toks))


def test_disabled_writes_nothing(q8_model, cache, monkeypatch):
    monkeypatch.setenv("LLAMBA_REPACK_CACHE", "0")
    w, ref = _fresh(q8_model, NAMES[0])
    assert np.array_equal(_packed(q8_model, NAMES[0]), ref)
    assert not cache.exists()


def test_small_tensors_not_cached(q8_model, cache, monkeypatch):
    monkeypatch.setattr(L, "REPACK_CACHE_MIN_BYTES", 1 << 40)
    _packed(q8_model, NAMES[0])
    assert _files(cache) == []


@pytest.mark.parametrize("damage", ["first_row", "last_row", "scale", "truncated", "shape", "dtype", "garbage",
                                    "empty", "fortran"])
def test_bad_file_is_not_used_and_is_rewritten(q8_model, cache, damage):
    name = NAMES[0]
    w, ref = _fresh(q8_model, name)
    _packed(q8_model, name)
    (f,) = _files(cache)
    p = cache / f
    data = bytearray(p.read_bytes())
    off = len(data) - ref.nbytes  # the .npy header's length
    if damage == "first_row":
        data[off + 5] ^= 1
    elif damage == "last_row":
        data[off + (ref.shape[0] - 1) * ref.shape[1] + 7] ^= 0x40
    elif damage == "scale":  # a scale byte of a row the check samples (it does not read every row: see
        g = ref.shape[0] * 3 // 16  # layers._packed_rows_match)
        data[off + g * ref.shape[1] + ref.shape[1] - 3] ^= 0x11
    elif damage == "truncated":
        data = data[:len(data) - 1000]
    elif damage == "garbage":
        data = bytearray(b"not an npy file at all" * 10)
    elif damage == "empty":
        data = bytearray()
    if damage in ("shape", "dtype", "fortran"):
        bad = {"shape": np.zeros((ref.shape[0] + 1, ref.shape[1]), np.uint8),
               "dtype": np.zeros(ref.shape, np.int8),
               "fortran": np.asfortranarray(ref)}[damage]
        np.save(p, bad)
    else:
        p.write_bytes(bytes(data))
    got = _packed(q8_model, name)
    assert np.array_equal(got, ref)
    assert _files(cache) == [f]
    again = _packed(q8_model, name)  # the rewritten file is used
    assert _is_mapped(again) and np.array_equal(again, ref)


def test_changed_model_file_gets_a_new_key(q8_model, cache, tmp_path):
    import shutil
    p = tmp_path / "copy.gguf"
    shutil.copy(q8_model, p)
    _packed(p, NAMES[0])
    (f1,) = _files(cache)
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: another version of the file for the cache
    _packed(p, NAMES[0])
    fs = _files(cache)
    assert len(fs) == 2 and f1 in fs and fs[0].split("-")[0] != fs[1].split("-")[0]


def test_unwritable_directory_does_not_fail(q8_model, cache, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("LLAMBA_REPACK_CACHE", str(blocker / "sub"))  # cannot be created: a file is in the way
    w, ref = _fresh(q8_model, NAMES[0])
    assert np.array_equal(_packed(q8_model, NAMES[0]), ref)
    if os.geteuid() != 0:  # root writes anywhere: a read-only directory only stops other users
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            monkeypatch.setenv("LLAMBA_REPACK_CACHE", str(ro))
            assert np.array_equal(_packed(q8_model, NAMES[0]), ref)
            assert os.listdir(ro) == []
        finally:
            ro.chmod(0o700)


def test_full_disk_does_not_fail_and_leaves_no_temporary_file(q8_model, cache, monkeypatch):
    def no_space(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    w, ref = _fresh(q8_model, NAMES[0])
    assert np.array_equal(_packed(q8_model, NAMES[0]), ref)
    assert os.listdir(cache) == []


def test_failure_while_writing_falls_back(q8_model, cache, monkeypatch):
    ops = ops_for(QT.Q8_0)

    def broken(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(L, "_write_cached", lambda *a, **k: False)
    w, ref = _fresh(q8_model, NAMES[0])
    assert np.array_equal(_packed(q8_model, NAMES[0]), ref)
    monkeypatch.undo()
    monkeypatch.setenv("LLAMBA_REPACK_CACHE", str(cache))
    monkeypatch.setattr(L, "REPACK_CACHE_MIN_BYTES", 0)
    import dataclasses
    bad_ops = dataclasses.replace(ops, repack_into=broken)
    gf = GGUFFile(q8_model)
    got = L.repacked(gf, NAMES[0], np.asarray(w), bad_ops)
    assert np.array_equal(got, ref) and os.listdir(cache) == []


def test_size_limit_evicts_other_models_least_recent_first(q8_model, cache, tmp_path, monkeypatch):
    import shutil
    copies = []
    for i in range(3):
        p = tmp_path / f"m{i}.gguf"
        shutil.copy(q8_model, p)
        copies.append(p)
    one = len(_packed(copies[0], NAMES[0]).data)  # bytes of one file's data (+ a header)
    (f0,) = _files(cache)
    size0 = os.path.getsize(cache / f0)
    _packed(copies[1], NAMES[0])
    (cache / "keep-me.npy").write_bytes(b"x" * 10)  # not a name the cache writes: never deleted
    os.utime(cache / f0, (1, 1))  # m0's file is the least recently used
    f1 = [f for f in _files(cache) if f not in (f0, "keep-me.npy")][0]
    monkeypatch.setattr(L, "REPACK_CACHE_MAX_BYTES", 2 * size0 + 4096 + one)
    _packed(copies[2], NAMES[0])  # needs room: m0's file goes, m1's (more recent) stays
    fs = _files(cache)
    assert f0 not in fs and f1 in fs and "keep-me.npy" in fs and len(fs) == 3
    # a model whose tensor does not fit even after evicting everything else is not cached (and evicts nothing
    # it cannot use)
    monkeypatch.setattr(L, "REPACK_CACHE_MAX_BYTES", 10)
    w, ref = _fresh(copies[0], NAMES[0])
    assert np.array_equal(_packed(copies[0], NAMES[0]), ref)
    assert _files(cache) == fs
    assert not [f for f in os.listdir(cache) if f.startswith(".")]


def test_abandoned_temporary_files_are_removed(q8_model, cache):
    cache.mkdir(parents=True)
    old = cache / (L._TMP_PREFIX + "abandoned.npy")
    old.write_bytes(b"x" * 100)
    os.utime(old, (1, 1))
    recent = cache / (L._TMP_PREFIX + "in-progress.npy")
    recent.write_bytes(b"x" * 100)
    _packed(q8_model, NAMES[0])
    assert not old.exists() and recent.exists()
