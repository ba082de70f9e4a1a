"""Fuzz llamba's model-file handling: mutate small GGUF models, load each mutant and generate a few tokens in a
worker subprocess, and count what happened.

    python bench/fuzz_gguf.py -n 500                       # 500 fresh mutants over three model files
    python bench/fuzz_gguf.py -n 500 --boundscheck         # the same with NUMBA_BOUNDSCHECK=1 (own Numba cache)
    python bench/fuzz_gguf.py -n 50 --seed 7 --keep DIR    # keep the failing mutants in DIR

Mutations (a fixed function of (seed, case number)): metadata values (zero, negative, huge, NaN/inf, wrong type,
arrays shorter/longer or with bad entries, keys dropped or added: rope/yarn/sliding-window/vocab/expert keys, a
non-string chat template, BYTE token types), tensor infos (dims, n_dims, type, offset, names), array counts and
string lengths, byte flips in the header/metadata/tensor-info region, truncation, and tensor data (NaN/inf).

Each case: `llamba info`, `Llama(...)`, the chat template, a sampled completion of a few tokens, and the
detokenization of every token id. Outcomes: ok (a run), error (a clean one-line LlambaError), and the failures:
signal (the worker died), traceback (any other exception), oob (an index out of bounds under
NUMBA_BOUNDSCHECK=1), memory (MemoryError), hang (no answer within --timeout), long (a LlambaError message that
is not one short line). The worker runs many cases (a crash or hang restarts it at the next case).

Model files: a tiny random llama (with a chat template) and a tiny gemma3 (tests/tiny_models.py), and the
qwen35 fixture tests/data/models/tiny-qwen35-mtp-q8_0.gguf (else SmolLM2 from the test cache), or --models.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAILURES = ("signal", "traceback", "oob", "memory", "hang", "long")
MAX_MSG = 300  # a clean error: one line of at most this many characters besides the file path

# ================================================================= GGUF structure (independent of llamba's reader)

_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STR, _ARR = 8, 9


class Parsed:
    """header (version), kvs [(key, vtype, value)], tensors [[name, dims, type, offset]], alignment, data bytes.
    Array values are (elem_type, [items]); nested arrays (elem_type 9) are kept as raw tail-free lists."""

    def __init__(self, raw: bytes):
        self.raw = raw
        pos = 4
        self.version, n_t, n_kv = struct.unpack_from("<IQQ", raw, pos)
        pos += 20
        self.kvs = []
        for _ in range(n_kv):
            key, pos = _rstr(raw, pos)
            vt = struct.unpack_from("<I", raw, pos)[0]
            pos += 4
            val, pos = _rval(raw, pos, vt)
            self.kvs.append([key, vt, val])
        self.tensors = []
        for _ in range(n_t):
            name, pos = _rstr(raw, pos)
            nd = struct.unpack_from("<I", raw, pos)[0]
            pos += 4
            dims = list(struct.unpack_from(f"<{nd}q", raw, pos))
            pos += 8 * nd
            tid, off = struct.unpack_from("<IQ", raw, pos)
            pos += 12
            self.tensors.append([name, dims, tid, off])
        self.align = 32
        for k, vt, v in self.kvs:
            if k == "general.alignment" and isinstance(v, int):
                self.align = v
        self.data_start = (pos + self.align - 1) // self.align * self.align
        self.data = raw[self.data_start:]
        self.meta_end = pos

    def kv(self, key):
        for e in self.kvs:
            if e[0] == key:
                return e
        return None

    @property
    def arch(self) -> str:
        e = self.kv("general.architecture")
        return e[2] if e else "llama"

    def serialize(self, fields: dict | None = None) -> bytes:
        """The file; `fields` (if given) receives byte offsets: ('count', i) of kv i's array count / string
        length, ('ndims', j), ('dim', j, d), ('type', j), ('offset', j) of tensor info j, 'data_start'."""
        f = fields if fields is not None else {}
        out = bytearray(b"GGUF" + struct.pack("<IQQ", self.version, len(self.tensors), len(self.kvs)))
        for i, (k, vt, v) in enumerate(self.kvs):
            out += _wstr(k) + struct.pack("<I", vt)
            f[("count", i)] = len(out) + (4 if vt == _ARR else 0)
            out += _wval(vt, v)
        for j, (name, dims, tid, off) in enumerate(self.tensors):
            out += _wstr(name)
            f[("ndims", j)] = len(out)
            out += struct.pack("<I", len(dims))
            for d, x in enumerate(dims):
                f[("dim", j, d)] = len(out)
                out += struct.pack("<q", x)
            f[("type", j)] = len(out)
            out += struct.pack("<I", tid & 0xFFFFFFFF)
            f[("offset", j)] = len(out)
            out += struct.pack("<Q", off & 0xFFFFFFFFFFFFFFFF)
        f["meta_end"] = len(out)
        align = self.align if isinstance(self.align, int) and self.align > 0 else 32
        out += b"\0" * ((-len(out)) % align)
        f["data_start"] = len(out)
        return bytes(out) + self.data


def _rstr(raw, pos):
    n = struct.unpack_from("<Q", raw, pos)[0]
    pos += 8
    return raw[pos:pos + n].decode("utf-8", "surrogateescape"), pos + n


def _rval(raw, pos, vt):
    if vt in _FMT:
        fmt = _FMT[vt]
        return struct.unpack_from(fmt, raw, pos)[0], pos + struct.calcsize(fmt)
    if vt == _STR:
        return _rstr(raw, pos)
    et, n = struct.unpack_from("<IQ", raw, pos)
    pos += 12
    items = []
    for _ in range(n):
        v, pos = _rval(raw, pos, et)
        items.append(v)
    return (et, items), pos


def _wstr(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _wval(vt, v) -> bytes:
    if vt in _FMT:
        fmt = _FMT[vt]
        if fmt in ("<f", "<d"):
            try:
                return struct.pack(fmt, float(v))
            except OverflowError:  # too large for float32: its infinity
                return struct.pack(fmt, math.copysign(math.inf, float(v)))
        if fmt == "<?":
            return struct.pack(fmt, bool(v))
        bits = struct.calcsize(fmt) * 8
        v = int(v)
        if fmt[1].islower():  # signed: wrap into range
            v = (v + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))
        else:
            v %= 1 << bits
        return struct.pack(fmt, v)
    if vt == _STR:
        return _wstr(v)
    et, items = v
    return struct.pack("<IQ", et, len(items)) + b"".join(_wval(et, x) for x in items)


# ================================================================= mutations

_INTS = [0, 1, -1, 2, 3, 7, 64, 66, 128, 258, 512, 4096, 4097, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
         2**63 - 1, -2**31]
_FLOATS = [0.0, -0.0, -1.0, 1.0, float("nan"), float("inf"), -float("inf"), 1e30, 1e-45, 1e-300, 1e300, 0.5]


def _pick_key(p: Parsed, rng: random.Random) -> int:
    arch = p.arch + "."
    idx = list(range(len(p.kvs)))
    hot = [i for i in idx if p.kvs[i][0].startswith((arch, "tokenizer."))]
    return rng.choice(hot if hot and rng.random() < 0.85 else idx)


def _int_values(v, rng):
    vals = _INTS + ([v * 2, v + 1, v - 1, v // 2, v * 1000] if isinstance(v, int) else [])
    return rng.choice(vals)


def _wrong_type(rng):
    return rng.choice([(4, 12), (5, -1), (6, 12.5), (6, float("nan")), (8, "12"), (8, ""), (7, True),
                       (_ARR, (4, [1, 2, 3])), (_ARR, (8, ["a", "b"])), (_ARR, (6, [])), (10, 2**40), (12, 1e300),
                       (_ARR, (_ARR, [(4, [1]), (4, [2])]))])


def _mutate_array(et, items, key, rng, n_layer):
    items = list(items)
    r = rng.random()
    if r < 0.3 and items:  # shorter
        k = rng.choice([0, 1, len(items) // 2, len(items) - 1, n_layer - 1, n_layer + 1])
        return (et, items[:max(0, k)]), f"length {len(items)} -> {max(0, min(k, len(items)))}"
    if r < 0.4:  # longer
        extra = items[:rng.choice([1, 5, 64])] or ([0] if et not in (_STR, _ARR) else ["x"])
        return (et, items + extra), f"length {len(items)} -> {len(items) + len(extra)}"
    if r < 0.85 and items:  # bad entries
        n = rng.choice([1, 1, 3, 16])
        for _ in range(n):
            i = rng.randrange(len(items))
            if et == _STR:
                items[i] = rng.choice(["", "<0xZZ>", "<0x41>", "x" * 300, "\udcff\udcfe", "a b c", " ", "<|im_end|>"])
            elif et in (6, 12):
                items[i] = rng.choice(_FLOATS)
            elif et == 7:
                items[i] = not items[i]
            elif et in _FMT:
                items[i] = rng.choice(_INTS + [0, 1, 2, 3, 4, 5, 6, 6, 6, 7, 8])
        return (et, items), f"{n} entries changed"
    # element type changed
    if et == _STR:
        return (4, list(range(len(items)))), "string array -> u32 array"
    return (_STR, [str(x) for x in items]), "numeric array -> string array"


def _arch_add_keys(arch, n_layer, hd, n_vocab):
    p = arch + "."
    return [
        (p + "rope.dimension_count", 4, [0, 1, 3, hd - 2, hd + 2, 2 * hd, 66, 128, 258, 512, 4096]),
        (p + "rope.scaling.type", 8, ["yarn", "linear", "none", "bogus", ""]),
        (p + "rope.scaling.yarn_beta_fast", 6, [0.0, float("nan"), -1.0, 1e-45]),
        (p + "rope.scaling.yarn_beta_slow", 6, [0.0, float("inf"), 1e-45]),
        (p + "rope.scaling.factor", 6, [0.0, -1.0, 1e-40, float("inf"), 4.0, 1e38]),
        (p + "rope.scaling.attn_factor", 6, [0.0, float("nan"), 1e38]),
        (p + "rope.scaling.original_context_length", 4, [0, 1, 2**31]),
        (p + "rope.freq_base", 6, [0.0, 1.0, -1.0, float("nan"), 1e-30]),
        (p + "rope.freq_base_swa", 6, [0.0, 1.0]),
        (p + "attention.layer_norm_rms_epsilon", 6, [0.0, -1e-6, float("nan"), 1e-45]),
        (p + "attention.sliding_window", 4, [0, 1, 2**31 - 1]),
        (p + "attention.sliding_window_pattern", _ARR,
         [(7, [True] * k) for k in (0, 1, n_layer - 1, n_layer + 1)] + [(4, [2] * n_layer)]),
        (p + "attention.sliding_window_pattern", 5, [0, 1, -1, 2**31 - 1]),
        (p + "vocab_size", 4, [0, 1, n_vocab - 5, n_vocab + 5, 2**32 - 1]),
        (p + "nextn_predict_layers", 4, [1, n_layer, n_layer + 1, 2**31]),
        (p + "expert_count", 4, [0, 1, 8, 2**20]),
        (p + "expert_used_count", 4, [0, 1, 9, 2**20]),
        (p + "attention.key_length", 4, [0, 1, hd + 1, 2 * hd, 2**20]),
        (p + "attention.value_length", 4, [0, 1, hd + 1, 2 * hd]),
        (p + "attention.head_count_kv", _ARR, [(4, [1] * k) for k in (1, n_layer - 1, n_layer + 1)] +
         [(4, [0] * n_layer), (4, [3] * n_layer)]),
        (p + "feed_forward_length", _ARR, [(4, [8] * n_layer), (4, [0] * n_layer), (4, [1] * (n_layer + 1))]),
        (p + "context_length", 4, [0, 1, 2**31 - 1]),
        (p + "final_logit_softcapping", 6, [float("nan"), -1.0, 0.0, 1e-45]),
        (p + "attn_logit_softcapping", 6, [float("nan"), -1.0, 1e-45]),
        (p + "full_attention_interval", 4, [0, 1, 2**31]),
        (p + "rope.dimension_sections", _ARR, [(5, [0, 0, 0, 0]), (5, [-1, 2, 2, 0]), (5, [1] * 9), (4, [])]),
        ("tokenizer.chat_template", _ARR, [(4, [1, 2]), (8, ["{{ x }}", "y"]), (4, [])]),
        ("tokenizer.chat_template", 4, [0, 1]),
        ("tokenizer.chat_template", 8, ["{% for %}", "{{ raise_exception('x') }}", "{{ messages[0]['content'] }}"]),
        ("tokenizer.ggml.bos_token_id", 5, [-1, n_vocab, 2**31 - 1]),
        ("tokenizer.ggml.eos_token_id", 4, [n_vocab, 2**32 - 1, 0]),
        ("tokenizer.ggml.add_bos_token", 7, [True]),
        ("tokenizer.ggml.model", 8, ["llama", "bert", "", "gpt2"]),
        ("tokenizer.ggml.model", _ARR, [(4, [1])]),
        ("tokenizer.ggml.pre", 8, ["bogus", "llama3", "default"]),
        ("tokenizer.ggml.scores", _ARR, [(6, [0.0] * 3), (6, [float("nan")] * n_vocab), (8, ["a"] * n_vocab)]),
        ("general.alignment", 4, [0, 3, 1, 64, 1 << 20]),
    ]


def _model_dims(p: Parsed):
    a = p.arch + "."

    def g(k, d):
        e = p.kv(a + k)
        return e[2] if e and isinstance(e[2], int) else d
    n_layer = g("block_count", 2)
    E = g("embedding_length", 64)
    H = g("attention.head_count", 4)
    hd = g("attention.key_length", E // max(1, H) if isinstance(H, int) else 16)
    toks = p.kv("tokenizer.ggml.tokens")
    n_vocab = len(toks[2][1]) if toks and isinstance(toks[2], tuple) else 320
    return n_layer, hd, n_vocab


def mutate(raw: bytes, seed: int, case: int) -> tuple[bytes, str]:
    """One mutant of the GGUF bytes `raw` (a fixed function of seed and case) and what was done."""
    rng = random.Random(seed * 1_000_003 + case)
    p = Parsed(raw)
    n_layer, hd, n_vocab = _model_dims(p)
    kind = rng.choices(["value", "wrong_type", "array", "add", "drop", "tensor", "count", "flip", "truncate",
                        "data", "token_type"],
                       weights=[14, 8, 10, 22, 4, 14, 6, 10, 5, 3, 4])[0]
    if kind in ("value", "wrong_type", "array"):
        i = _pick_key(p, rng)
        if kind == "array":
            arrays = [j for j, e in enumerate(p.kvs) if e[1] == _ARR]
            i = rng.choice(arrays) if arrays else i
        key, vt, v = p.kvs[i]
        if kind == "wrong_type":
            nvt, nv = _wrong_type(rng)
            p.kvs[i] = [key, nvt, nv]
            return p.serialize(), f"{key}: {vt} -> type {nvt} {nv!r:.40}"
        if vt == _ARR:
            nv, what = _mutate_array(v[0], v[1], key, rng, n_layer)
            p.kvs[i][2] = nv
            return p.serialize(), f"{key}: array {what}"
        if vt in (6, 12):
            nv = rng.choice(_FLOATS + [v * 1000, -v])
        elif vt == 7:
            nv = not v
        elif vt == _STR:
            nv = rng.choice(["", "x" * 5000, "\udcff", v[:len(v) // 2], "yarn", "llama", v + "\n"])
        else:
            nv = _int_values(v, rng)
            if nv < 0 and vt in (0, 2, 4, 10):
                vt = rng.choice([5, 11])
                p.kvs[i][1] = vt
        p.kvs[i][2] = nv
        return p.serialize(), f"{key} = {nv!r:.60}"
    if kind == "add":
        key, vt, vals = rng.choice(_arch_add_keys(p.arch, n_layer, hd, n_vocab))
        nv = rng.choice(vals)
        e = p.kv(key)
        if e:
            e[1], e[2] = vt, nv
        else:
            p.kvs.append([key, vt, nv])
        return p.serialize(), f"set {key} = {str(nv)[:60]}"
    if kind == "drop":
        i = _pick_key(p, rng)
        key = p.kvs.pop(i)[0]
        return p.serialize(), f"dropped {key}"
    if kind == "token_type":
        e = p.kv("tokenizer.ggml.token_type")
        if e and e[1] == _ARR:
            items = list(e[2][1])
            ids = [rng.randrange(len(items)) for _ in range(rng.choice([1, 5, 50]))]
            val = rng.choice([6, 6, 6, 2, 3, 4, 5, 0, 99, -1])
            for t in ids:
                items[t] = val
            e[2] = (e[2][0] if val >= 0 else 5, items)
            return p.serialize(), f"token_type of {len(ids)} tokens = {val}"
        kind = "flip"
    if kind == "tensor":
        j = rng.randrange(len(p.tensors))
        t = p.tensors[j]
        what = rng.choice(["dim", "dim", "ndims", "type", "offset", "name", "raw_ndims"])
        if what == "dim":
            d = rng.randrange(len(t[1]))
            old = t[1][d]
            t[1][d] = rng.choice([old * 2, max(1, old // 2), old + 1, old + 32, 1, 0, -1, 2**40, 2**62, 256])
            return p.serialize(), f"tensor {t[0]} dim {d}: {old} -> {t[1][d]}"
        if what == "ndims":
            t[1] = t[1] + [1] if rng.random() < 0.5 else (t[1][:-1] or [1])
            return p.serialize(), f"tensor {t[0]} dims -> {t[1]}"
        if what == "type":
            old = t[2]
            t[2] = rng.choice([0, 1, 2, 8, 12, 14, 16, 20, 24, 30, 39, 40, 2**31])
            return p.serialize(), f"tensor {t[0]} type {old} -> {t[2]}"
        if what == "offset":
            old = t[3]
            t[3] = rng.choice([old + p.align, old + 1, 0, 2**63, old * 2, rng.choice(p.tensors)[3]])
            return p.serialize(), f"tensor {t[0]} offset {old} -> {t[3]}"
        if what == "name":
            old = t[0]
            t[0] = rng.choice([old.replace("blk.0", f"blk.{n_layer + 3}"), old.replace("weight", "wieght"),
                               "blk.1.attn_q.weight", "rope_freqs.weight", "output.weight", old + "\n" * 3, ""])
            return p.serialize(), f"tensor {old} renamed {t[0]!r}"
        f = {}
        buf = bytearray(p.serialize(f))
        nd = rng.choice([0, 2, 3, 5, 255, 2**16, 2**31])
        struct.pack_into("<I", buf, f[("ndims", j)], nd)
        return bytes(buf), f"tensor {t[0]} n_dims field = {nd} (rest unchanged)"
    if kind == "count":
        f = {}
        buf = bytearray(p.serialize(f))
        if rng.random() < 0.7:
            cands = [i for i, e in enumerate(p.kvs) if e[1] in (_STR, _ARR)]
            i = rng.choice(cands)
            key, vt, v = p.kvs[i]
            n = len(v[1]) if vt == _ARR else len(v.encode("utf-8", "surrogateescape"))
            nv = rng.choice([2**32, 2**63, 2**64 - 1, n + 1, max(0, n - 1), 2**34, 2**30])
            struct.pack_into("<Q", buf, f[("count", i)], nv)
            return bytes(buf), f"{key}: {'count' if vt == _ARR else 'string length'} {n} -> {nv}"
        which = rng.choice([8, 16])
        nv = rng.choice([0, 1, 2**24, 2**32, 2**64 - 1, len(p.kvs) + 1, len(p.tensors) + 1])
        struct.pack_into("<Q", buf, which, nv)
        return bytes(buf), f"header {'tensor' if which == 8 else 'kv'} count -> {nv}"
    if kind == "flip":
        buf = bytearray(raw)
        end = p.meta_end
        desc = []
        for _ in range(rng.choice([1, 1, 2, 4])):
            pos = rng.randrange(0, 24) if rng.random() < 0.15 else rng.randrange(0, end)
            old = buf[pos]
            buf[pos] = rng.choice([old ^ (1 << rng.randrange(8)), 0, 0xFF, rng.randrange(256)])
            desc.append(f"{pos}:{old:02x}->{buf[pos]:02x}")
        return bytes(buf), "byte flips " + " ".join(desc)
    if kind == "truncate":
        cut = rng.randrange(0, p.meta_end) if rng.random() < 0.6 else rng.randrange(p.meta_end, len(raw))
        return raw[:cut], f"truncated to {cut} of {len(raw)} bytes"
    # data: NaN / inf / huge values over part of a float tensor (norms, F32 weights)
    f = {}
    buf = bytearray(p.serialize(f))
    f32 = [t for t in p.tensors if t[2] == 0]
    t = rng.choice(f32 or p.tensors)
    n = 1
    for d in t[1]:
        n *= d
    start = f["data_start"] + t[3]
    val = rng.choice([float("nan"), float("inf"), 1e38, 0.0])
    k = rng.choice([1, n])
    for e in range(min(k, n, 4096)):
        struct.pack_into("<f", buf, start + 4 * e, val)
    return bytes(buf), f"tensor {t[0]} data: {min(k, n)} values = {val}"


# ================================================================= worker (one process, many cases)

def _worker_case(path: str, n_tokens: int) -> tuple[str, str]:
    import contextlib
    import io
    import traceback
    from llamba.errors import LlambaError
    try:
        from llamba.cli import build_parser, cmd_info
        with contextlib.redirect_stdout(io.StringIO()):
            cmd_info(build_parser().parse_args(["info", path]))
        from llamba.llama import Llama
        llm = Llama(path, n_ctx=64, verbose=False, n_threads=1, seed=0)
        try:
            try:
                llm.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
            except LlambaError:
                pass  # no (usable) template: a clean error is all that is asked
            llm.create_completion("Hello the", max_tokens=n_tokens, temperature=1.5, top_k=0, top_p=1.0,
                                  min_p=0.0, seed=3)
            llm.reset()
            llm.create_completion("in the", max_tokens=2, temperature=0.0)
            llm.detokenize(list(range(llm.n_vocab())))
        finally:
            llm.close()
        return "ok", ""
    except LlambaError as e:
        msg = str(e).replace(path, "<file>")
        if "\n" in msg or len(msg) > MAX_MSG:
            return "long", msg[:500] + f"... ({len(msg)} chars)"
        return "error", msg
    except MemoryError:
        return "memory", traceback.format_exc()[-1500:]
    except IndexError as e:
        tb = traceback.format_exc()
        kind = "oob" if "out of bounds" in str(e) else "traceback"
        return kind, tb[-1500:]
    except BaseException:
        return "traceback", traceback.format_exc()[-1500:]


def worker_main(n_tokens: int, mem_gb: float):
    import resource
    if mem_gb > 0:
        lim = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    if os.environ.get("LLAMBA_FUZZ_NO_VALIDATE") == "1":  # measure what llamba.validate catches: skip its checks
        import llamba.validate as V
        V.check_metadata = V.check_config = lambda *a, **k: None
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        out.write(json.dumps({"start": req["id"]}) + "\n")
        out.flush()
        kind, detail = _worker_case(req["path"], n_tokens)
        out.write(json.dumps({"id": req["id"], "kind": kind, "detail": detail}) + "\n")
        out.flush()


# ================================================================= runner

class Worker:
    def __init__(self, env: dict, n_tokens: int, mem_gb: float):
        self.env, self.n_tokens, self.mem_gb = env, n_tokens, mem_gb
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "--tokens", str(self.n_tokens),
                                      "--mem-gb", str(self.mem_gb)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
                                     bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        self.err: list = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.err), daemon=True).start()

    @staticmethod
    def _pump(f, q):
        for line in f:
            q.put(line)
        q.put(None)

    @staticmethod
    def _drain(f, acc):
        for line in f:
            acc.append(line)
            del acc[:-40]

    def run(self, cid, path: str, timeout: float) -> tuple[str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.err.clear()
        self.proc.stdin.write(json.dumps({"id": cid, "path": path}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                return "hang", f"no answer within {timeout:.0f} s"
            if line is None:  # the worker died
                rc = self.proc.wait()
                time.sleep(0.05)
                tail = "".join(self.err)[-1500:]
                self.proc = None
                if rc < 0:
                    return "signal", f"signal {-rc}: {tail}"
                return "traceback", f"worker exited {rc}: {tail}"
            msg = json.loads(line)
            if msg.get("id") == cid:
                return msg["kind"], msg["detail"]

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


def fuzz_env(boundscheck: bool, threads: int = 1) -> dict:
    env = dict(os.environ)
    env["NUMBA_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if boundscheck:
        env["NUMBA_BOUNDSCHECK"] = "1"
        env["NUMBA_CACHE_DIR"] = env.get("LLAMBA_BOUNDSCHECK_CACHE", "/tmp/nbc_bc")
    return env


def run_cases(models: list[Path], cases: list[int], seed: int, *, jobs: int = 2, timeout: float = 60.0,
              boundscheck: bool = False, keep: Path | None = None, n_tokens: int = 4, mem_gb: float = 6.0,
              warmup_timeout: float = 1200.0, progress=None) -> tuple[dict, list]:
    """Run mutant `case` of models[case % len(models)] for every case; returns (counts by outcome, [failures as
    (case, model, mutation, kind, detail)]). The unmutated models run first on each worker (warm-up: kernel
    compilation or cache loading), with warmup_timeout; they must run cleanly."""
    env = fuzz_env(boundscheck)
    raws = [m.read_bytes() for m in models]
    tmp = Path(tempfile.mkdtemp(prefix="llamba-fuzz-"))
    todo: queue.Queue = queue.Queue()
    for c in cases:
        todo.put(c)
    counts = {k: 0 for k in ("ok", "error") + FAILURES}
    failures, lock = [], threading.Lock()

    def job(w_index):
        w = Worker(env, n_tokens, mem_gb)
        try:
            for mi, m in enumerate(models):  # warm-up on the originals
                kind, detail = w.run(f"warm{mi}", str(m), warmup_timeout)
                if kind != "ok":  # the unmutated model must run: otherwise the counts would mean nothing
                    with lock:
                        failures.append((-1, m.name, "unmutated", kind, detail))
                        counts["broken_baseline"] = counts.get("broken_baseline", 0) + 1
                        if progress:
                            progress(-1, m.name, "unmutated", kind, detail)
                    return
            while True:
                try:
                    c = todo.get_nowait()
                except queue.Empty:
                    return
                mi = c % len(models)
                data, desc = mutate(raws[mi], seed, c)
                path = tmp / f"s{seed}-c{c}-{models[mi].stem}.gguf"
                path.write_bytes(data)
                kind, detail = w.run(c, str(path), timeout)
                with lock:
                    counts[kind] += 1
                    if kind in FAILURES:
                        failures.append((c, models[mi].name, desc, kind, detail))
                        if keep is not None:
                            keep.mkdir(parents=True, exist_ok=True)
                            (keep / path.name).write_bytes(data)
                    if progress:
                        progress(c, models[mi].name, desc, kind, detail)
                path.unlink()
        finally:
            w.close()

    threads = [threading.Thread(target=job, args=(i,)) for i in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        tmp.rmdir()
    except OSError:
        pass
    return counts, failures


def default_models(out_dir: Path) -> list[Path]:
    """Two tiny random models (llama with a chat template, gemma3) and the qwen35 fixture (else SmolLM2)."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import write_model
    out_dir.mkdir(parents=True, exist_ok=True)
    a = out_dir / "tiny-llama.gguf"
    b = out_dir / "tiny-gemma3.gguf"
    if not a.exists():
        write_model(a, "llama", n_layer=2, tied=False,
                    chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                                  "{% endif %}")
    if not b.exists():
        write_model(b, "gemma3", n_layer=3, head_dim=32)
    third = REPO / "tests" / "data" / "models" / "tiny-qwen35-mtp-q8_0.gguf"
    if not third.exists():
        cache = Path(os.environ.get("LLAMBA_TEST_CACHE", Path.home() / ".cache" / "llamba-test"))
        third = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return [a, b] + ([third] if third.exists() else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--cases", type=int, default=500)
    ap.add_argument("--first", type=int, default=0, help="first case number")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--boundscheck", action="store_true", help="NUMBA_BOUNDSCHECK=1 (separate cache /tmp/nbc_bc)")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--models", nargs="*", type=Path)
    ap.add_argument("--keep", type=Path, help="write failing mutants here")
    ap.add_argument("--no-validate", action="store_true",
                    help="skip llamba.validate in the workers (to see what it catches)")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--mem-gb", type=float, default=6.0, help="address-space limit of a worker (0: none)")
    a = ap.parse_args(argv)
    if a.worker:
        worker_main(a.tokens, a.mem_gb)
        return 0
    if a.no_validate:
        os.environ["LLAMBA_FUZZ_NO_VALIDATE"] = "1"
    models = a.models or default_models(Path(tempfile.gettempdir()) / "llamba-fuzz-models")
    print(f"fuzz_gguf: seed {a.seed}, cases {a.first}..{a.first + a.cases - 1}, models "
          f"{', '.join(m.name for m in models)}, boundscheck {'on' if a.boundscheck else 'off'}", flush=True)
    t0 = time.time()

    def progress(c, model, desc, kind, detail):
        if a.verbose or kind in FAILURES:
            print(f"  case {c} [{model}] {desc}: {kind}" + (f"\n    {detail[-600:]}" if kind in FAILURES else
                                                              f" {detail[:160]}"), flush=True)

    counts, failures = run_cases(models, list(range(a.first, a.first + a.cases)), a.seed, jobs=a.jobs,
                                 timeout=a.timeout, boundscheck=a.boundscheck, keep=a.keep, mem_gb=a.mem_gb,
                                 progress=progress)
    if counts.get("broken_baseline"):
        print("fuzz_gguf: an unmutated model does not run (see above): no mutants were judged", flush=True)
    print(f"fuzz_gguf: {sum(counts.values())} runs in {time.time() - t0:.0f} s: " +
          ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
