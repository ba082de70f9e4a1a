"""GGUF reader: metadata, zero-copy tensor views, split files, and one clear error for every kind of bad file."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter

from llamba.errors import GGUFError, UnsupportedError
from llamba.gguf import GGUFFile
from tiny_models import write_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_model(p, "llama", qtype=QT.Q8_0, n_embd=64, n_layer=1)
    return p


def test_metadata_and_views_match_gguf_py(model_file):
    f = GGUFFile(model_file)
    r = GGUFReader(str(model_file))
    assert f.architecture == "llama"
    assert f.metadata["llama.embedding_length"] == 64
    from collections.abc import Sequence
    toks = f.metadata["tokenizer.ggml.tokens"]
    assert isinstance(toks, Sequence) and not isinstance(toks, str)
    assert list(toks) == [str(x, "utf-8") for x in (bytes(r.fields["tokenizer.ggml.tokens"].parts[i])
                                                     for i in r.fields["tokenizer.ggml.tokens"].data)]
    assert set(f.tensors) == {t.name for t in r.tensors}
    for t in r.tensors:
        mine = f.tensor(t.name)
        assert np.array_equal(mine.reshape(-1).view(np.uint8), np.asarray(t.data).reshape(-1).view(np.uint8)), t.name
        assert not mine.flags.writeable  # a view on the read-only mmap, not a copy
        assert f.info(t.name).type_id == int(t.tensor_type)


def test_quantized_view_shape(model_file):
    f = GGUFFile(model_file)
    w = f.tensor("blk.0.attn_q.weight")  # Q8_0, ne=[64, 64]
    assert w.dtype == np.uint8 and w.shape == (64, 64 // 32 * 34)


def _write_raw(path, kv: list[tuple[str, int, bytes]], tensors: list[tuple[str, list[int], int, int]],
               data: bytes = b"", version: int = 3, magic: bytes = b"GGUF", align: int = 32,
               n_tensors=None, n_kv=None):
    """Hand-made GGUF bytes so every corruption can be produced exactly."""
    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    out = bytearray(magic + struct.pack("<I", version))
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors, len(kv) if n_kv is None else n_kv)
    for key, code, val in kv:
        out += s(key) + struct.pack("<I", code) + val
    for name, ne, tid, off in tensors:
        out += s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<q", d) for d in ne)
        out += struct.pack("<IQ", tid, off)
    pad = (-len(out)) % align
    out += b"\0" * pad + data
    path.write_bytes(bytes(out))
    return path


def _arch_kv(arch="llama"):
    b = arch.encode()
    return [("general.architecture", 8, struct.pack("<Q", len(b)) + b)]


def _one_f32(n=8):
    return [("w.weight", [n], 0, 0)], np.arange(n, dtype=np.float32).tobytes()


def test_good_handmade_file(tmp_path):
    t, d = _one_f32()
    f = GGUFFile(_write_raw(tmp_path / "ok.gguf", _arch_kv(), t, d))
    assert np.array_equal(f.tensor("w.weight"), np.arange(8, dtype=np.float32))


@pytest.mark.parametrize("case, needle", [
    ("bad_magic", "not a GGUF file"),
    ("version", "unsupported GGUF version"),
    ("trunc_header", "truncated"),
    ("trunc_meta", "truncated"),
    ("trunc_infos", "truncated"),
    ("data_beyond_eof", "truncated"),
    ("misaligned", "misaligned"),
    ("unknown_type", "unknown tensor type id"),
    ("absurd_counts", "absurd"),
    ("absurd_string", "absurd"),
    ("bad_dims", "dimensions"),
    ("empty", "empty"),
    ("missing", "not found"),
])
def test_corrupt_files_raise_one_line_gguf_error(tmp_path, case, needle):
    p = tmp_path / f"{case}.gguf"
    t, d = _one_f32()
    if case == "bad_magic":
        _write_raw(p, _arch_kv(), t, d, magic=b"GGML")
    elif case == "version":
        _write_raw(p, _arch_kv(), t, d, version=7)
    elif case == "trunc_header":
        p.write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    elif case == "trunc_meta":
        _write_raw(p, _arch_kv(), t, d)
        p.write_bytes(p.read_bytes()[:40])
    elif case == "trunc_infos":
        _write_raw(p, _arch_kv(), t, b"")
        raw = p.read_bytes()
        p.write_bytes(raw[: len(raw) - 40])
    elif case == "data_beyond_eof":
        _write_raw(p, _arch_kv(), t, d[:16])
    elif case == "misaligned":
        _write_raw(p, _arch_kv(), [("w.weight", [8], 0, 4)], d + b"\0" * 32)
    elif case == "unknown_type":
        _write_raw(p, _arch_kv(), [("w.weight", [8], 99, 0)], d)
    elif case == "absurd_counts":
        _write_raw(p, _arch_kv(), t, d, n_kv=1 << 40)
    elif case == "absurd_string":
        _write_raw(p, [("general.architecture", 8, struct.pack("<Q", 1 << 50))], t, d)
    elif case == "bad_dims":
        _write_raw(p, _arch_kv(), [("w.weight", [8, 1, 1, 1, 1], 0, 0)], d)
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "missing":
        p = tmp_path / "nope.gguf"
    with pytest.raises(GGUFError) as ei:
        GGUFFile(p)
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg and needle in msg, msg


def test_unknown_architecture_and_missing_pieces(tmp_path):
    from llamba.models import build_config, load_model
    t, d = _one_f32()
    f = GGUFFile(_write_raw(tmp_path / "arch.gguf", _arch_kv("mamba9"), t, d))
    with pytest.raises(UnsupportedError, match="architecture 'mamba9' is not supported"):
        build_config(f)
    f = GGUFFile(_write_raw(tmp_path / "nokey.gguf", _arch_kv("llama"), t, d))
    with pytest.raises(GGUFError, match="missing required metadata key 'llama.embedding_length'"):
        build_config(f)
    # a model whose metadata is complete but a tensor is missing
    p = tmp_path / "notensor.gguf"
    write_model(p, "llama", n_layer=1)
    raw = GGUFReader(str(p))
    w = GGUFWriter(str(tmp_path / "cut.gguf"), "llama")
    for k, fld in raw.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        w.add_key_value(k, fld.contents(), fld.types[0], fld.types[-1] if len(fld.types) > 1 else None)
    for t in raw.tensors:
        if t.name != "blk.0.ffn_up.weight":
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="missing required tensor 'blk.0.ffn_up.weight'"):
        load_model(GGUFFile(tmp_path / "cut.gguf"), 64)


def test_unsupported_tensor_type(tmp_path):
    from llamba.layers import Linear
    n = 256
    data = np.zeros(n // 256 * 66, dtype=np.uint8).tobytes()  # one IQ2_XXS block
    f = GGUFFile(_write_raw(tmp_path / "iq2.gguf", _arch_kv(), [("w.weight", [n, 1], 16, 0)], data))
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        Linear(f, "w.weight")


def test_split_files(tmp_path):
    a = np.arange(8, dtype=np.float32)
    b = np.arange(16, dtype=np.float32) * 2
    kv = _arch_kv() + [("split.count", 2, struct.pack("<H", 2)), ("split.tensors.count", 2, struct.pack("<H", 2))]
    _write_raw(tmp_path / "m-00001-of-00002.gguf", kv, [("a.weight", [8], 0, 0)], a.tobytes())
    _write_raw(tmp_path / "m-00002-of-00002.gguf", _arch_kv(), [("b.weight", [16], 0, 0)], b.tobytes())
    f = GGUFFile(tmp_path / "m-00001-of-00002.gguf")
    assert np.array_equal(f.tensor("a.weight"), a) and np.array_equal(f.tensor("b.weight"), b)
    (tmp_path / "m-00002-of-00002.gguf").unlink()
    with pytest.raises(GGUFError, match="split model part missing"):
        GGUFFile(tmp_path / "m-00001-of-00002.gguf")


def _string_array_buf(items: list[bytes], extra: bytes = b"") -> bytes:
    import struct
    return b"".join(struct.pack("<Q", len(x)) + x for x in items) + extra


@pytest.mark.parametrize("kind", ["ascii", "utf8", "invalid", "empty", "split"])
def test_string_array_fast_path_equals_slow_path(kind):
    """Vocabulary-sized string arrays go through llamba.kernels.text.gather_strings and one UTF-8 decode; they
    equal the per-string reference loop, including multibyte characters, empty strings, invalid UTF-8
    (surrogateescape, through the fallback) and characters split across two strings (valid only together)."""
    from llamba.gguf import _Cursor
    r = np.random.default_rng(3)
    pool = {"ascii": [b"a", b"hello", b"<0x0A>", b" the"], "utf8": ["é".encode(), "日本".encode(), "🙂x".encode(),
            "Ġ".encode(), b"z"], "invalid": [b"ok", b"\xff\xfe", "é".encode()[:1], b"x"],
            "empty": [b"", b"", b"q"], "split": [b"\xc3", b"\xa9", b"", "é".encode(), b"a\xe6\x97", b"\xa5"]}[kind]
    items = [pool[i] * int(r.integers(0, 3)) for i in r.integers(0, len(pool), 1000)]
    buf = _string_array_buf(items, b"TAIL")
    fast = _Cursor(buf, "mem")
    got = fast._string_array(len(items), "tokens")
    slow = _Cursor(buf, "mem")
    ref = slow._string_array_slow(len(items), "tokens")
    assert got == ref and fast.pos == slow.pos == len(buf) - 4
    # item by item (a StringArray decodes each on access), negative indices, slices, iteration
    assert [got[i] for i in range(len(got))] == ref and list(got) == ref
    assert [got[-i] for i in range(1, 6)] == [ref[-i] for i in range(1, 6)] and got[5:17:3] == ref[5:17:3]
    with pytest.raises(IndexError):
        got[len(got)]


def test_string_array_fast_path_reports_truncation_like_slow_path():
    from llamba.gguf import _Cursor
    items = [b"abc"] * 300
    buf = _string_array_buf(items)[:-2]
    with pytest.raises(GGUFError, match="truncated"):
        _Cursor(buf, "mem")._string_array(300, "tokens")


def test_string_array_character_split_across_strings_decodes_each_string_alone():
    """b"\\xc3" + b"\\xa9" is valid UTF-8 only together: each string still decodes alone (surrogateescape)."""
    from llamba.gguf import _Cursor
    items = [b"x"] * 300 + [b"\xc3", b"\xa9", "é".encode()]
    got = _Cursor(_string_array_buf(items), "mem")._string_array(len(items), "tokens")
    assert got[-3:] == ["\udcc3", "\udca9", "é"] and got[:300] == ["x"] * 300
