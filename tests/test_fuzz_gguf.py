"""Model files can never crash llamba: a fuzz test over mutated tiny GGUF models (each case run in a worker
subprocess, so a signal is a failure) and targeted tests for each defect class of issue 11 (files that passed
the reader but crashed, divided by zero or indexed out of bounds later; unbounded allocations and messages)."""
from __future__ import annotations

import importlib.util
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llamba.errors import GGUFError, LlambaError, TokenIdError
from llamba.gguf import GGUFFile
from tiny_models import write_model, write_qwen35

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fuzz_gguf", REPO / "bench" / "fuzz_gguf.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

SEED = 20251203
N_CASES = 100


@pytest.fixture(scope="module")
def fuzz_models(tmp_path_factory):
    return fuzz.default_models(tmp_path_factory.mktemp("fuzz-models"))


@pytest.mark.slow  # a 120 s fuzzing budget
def test_fuzz_mutated_models_clean_error_or_run(fuzz_models):
    """~100 fixed mutants (metadata values, types, arrays, added/dropped keys, tensor infos, counts, byte flips,
    truncation, data): every one is a correct run or a one-line LlambaError; never a signal, a traceback, a
    MemoryError, an out-of-bounds access, a hang or a long message. LLAMBA_FUZZ_BOUNDSCHECK=1 runs the workers
    with NUMBA_BOUNDSCHECK=1 (own Numba cache: the first run compiles every kernel)."""
    t0 = time.time()
    bc = os.environ.get("LLAMBA_FUZZ_BOUNDSCHECK") == "1"
    counts, failures = fuzz.run_cases(fuzz_models, list(range(N_CASES)), SEED, jobs=2, timeout=60,
                                      boundscheck=bc, warmup_timeout=1800 if bc else 300)
    report = "\n".join(f"case {c} [{m}] {d}: {k}: {det[-800:]}" for c, m, d, k, det in failures)
    assert not failures, report
    assert sum(counts.values()) == N_CASES and counts["ok"] > 10 and counts["error"] > 10, counts
    if not bc:
        assert time.time() - t0 < 120


def test_mutations_are_deterministic(fuzz_models):
    raw = fuzz_models[0].read_bytes()
    assert fuzz.Parsed(raw).serialize() == raw  # the structure round-trips
    for c in range(20):
        assert fuzz.mutate(raw, SEED, c) == fuzz.mutate(raw, SEED, c)


# ---------------------------------------------------------------- targeted cases

def _edit(src: Path, dst: Path, set_kv=None, drop=(), add_tensors=None, patch=None) -> Path:
    """A copy of GGUF `src` with metadata keys set ({key: (type code, value)}), dropped, tensors added
    ({name: float32 array}) and raw byte patches (callable(bytearray, fields))."""
    p = fuzz.Parsed(src.read_bytes())
    for k in drop:
        p.kvs = [e for e in p.kvs if e[0] != k]
    for k, (vt, v) in (set_kv or {}).items():
        e = p.kv(k)
        if e:
            e[1], e[2] = vt, v
        else:
            p.kvs.append([k, vt, v])
    data = bytearray(p.data)
    for name, arr in (add_tensors or {}).items():
        data += b"\0" * ((-len(data)) % p.align)
        p.tensors.append([name, list(reversed(arr.shape)), 0, len(data)])
        data += np.ascontiguousarray(arr, dtype=np.float32).tobytes()
    p.data = bytes(data)
    f = {}
    out = bytearray(p.serialize(f))
    if patch:
        patch(out, f)
    dst.write_bytes(bytes(out))
    return dst


def _load(path, n_ctx=64):
    from llamba.models import load_model
    return load_model(GGUFFile(path), n_ctx)


def _llm(path):
    from llamba.llama import Llama
    return Llama(str(path), n_ctx=64, verbose=False, n_threads=1, seed=0)


def _one_line(e, limit=300) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < limit + 200, msg
    return msg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {"llama": write_model(d / "llama.gguf", "llama", n_layer=2),
            "gemma3": write_model(d / "gemma3.gguf", "gemma3", n_layer=2, head_dim=32),
            "qwen35": write_qwen35(d / "qwen35.gguf", n_layer=2, interval=2, mtp=False)}


@pytest.mark.parametrize("arch, n_rot", [("gemma3", 512), ("gemma3", 4096), ("gemma3", 66), ("gemma3", 258),
                                         ("qwen35", 128), ("qwen35", 66), ("qwen35", 0), ("qwen35", 7),
                                         ("llama", 0)])
def test_rope_dimension_count_checked_for_every_arch(tiny, tmp_path, arch, n_rot):
    p = _edit(tiny[arch], tmp_path / "m.gguf", {f"{arch}.rope.dimension_count": (4, n_rot)})
    with pytest.raises(GGUFError) as e:
        _load(p)
    assert "rope.dimension_count" in _one_line(e) and str(n_rot) in str(e.value)


def test_rope_freqs_shorter_than_half_n_rot(tiny, tmp_path):
    hd = 64 // 4
    ok = _edit(tiny["llama"], tmp_path / "ok.gguf", add_tensors={"rope_freqs.weight": np.ones(hd // 2)})
    assert _load(ok).forward([1, 2]).shape == (1, 320)
    for bad in (np.ones(hd // 2 - 1), np.zeros(hd // 2)):  # too few factors; a factor RoPE would divide by 0
        p = _edit(tiny["llama"], tmp_path / "short.gguf", add_tensors={"rope_freqs.weight": bad})
        with pytest.raises(GGUFError) as e:
            _load(p)
        assert "rope_freqs.weight" in _one_line(e)


@pytest.mark.parametrize("key, vt, value", [
    ("rope.dimension_count", 4, 0), ("attention.layer_norm_rms_epsilon", 6, 0.0),
    ("attention.layer_norm_rms_epsilon", 6, float("nan")), ("block_count", 4, 0), ("block_count", 4, 2**31 - 1),
    ("block_count", 4, 1), ("block_count", 4, 3), ("rope.freq_base", 6, 0.0), ("rope.freq_base", 6, 1.0),
    ("attention.head_count", 4, 0), ("attention.head_count_kv", 4, 3), ("attention.key_length", 4, 0),
    ("embedding_length", 4, 0), ("embedding_length", 8, "64"), ("context_length", 4, 0),
    ("nextn_predict_layers", 4, 2), ("vocab_size", 4, 400), ("vocab_size", 4, 300),
    ("attention.sliding_window_pattern", 9, (7, [True])), ("attention.sliding_window_pattern", 9, (7, [])),
    ("attention.head_count_kv", 9, (4, [2])), ("feed_forward_length", 9, (4, [128, 128, 128])),
    ("final_logit_softcapping", 6, float("inf")), ("rope.scaling.factor", 6, float("inf")),
])
def test_absurd_hyperparameters_are_clean_errors(tiny, tmp_path, key, vt, value):
    arch = "gemma3"
    p = _edit(tiny[arch], tmp_path / "m.gguf", {f"{arch}.{key}": (vt, value)})
    with pytest.raises(GGUFError) as e:
        _load(p)
    _one_line(e)


@pytest.mark.parametrize("beta", ["yarn_beta_fast", "yarn_beta_slow"])
def test_yarn_beta_zero(tiny, tmp_path, beta):
    p = _edit(tiny["llama"], tmp_path / "m.gguf", {"llama.rope.scaling.type": (8, "yarn"),
                                                   "llama.rope.scaling.factor": (6, 4.0),
                                                   f"llama.rope.scaling.{beta}": (6, 0.0)})
    with pytest.raises(GGUFError) as e:
        _load(p)
    assert beta in _one_line(e)
    ok = _edit(tiny["llama"], tmp_path / "ok.gguf", {"llama.rope.scaling.type": (8, "yarn"),
                                                     "llama.rope.scaling.factor": (6, 4.0)})
    assert np.isfinite(_load(ok).forward([1, 2, 3])).all()


def test_tensor_shapes_checked_before_use(tiny, tmp_path):
    """Shapes the construction did not check (the embedding's width, biases) are checked by the validator."""
    def dim(name, d, v):
        def patch(buf, f):
            j = [t[0] for t in fuzz.Parsed(tiny["llama"].read_bytes()).tensors].index(name)
            struct.pack_into("<q", buf, f[("dim", j, d)], v)
        return patch
    # token_embd narrower than n_embd (the other tensors' data stays in place: the offsets are unchanged)
    p = _edit(tiny["llama"], tmp_path / "m.gguf", patch=dim("token_embd.weight", 0, 32))
    with pytest.raises(GGUFError) as e:
        _load(p)
    assert "token_embd.weight" in _one_line(e)
    p = _edit(tiny["llama"], tmp_path / "b.gguf", add_tensors={"blk.0.attn_q.bias": np.zeros(7)})
    with pytest.raises(GGUFError, match="attn_q.bias"):
        _load(p)
    p = _edit(tiny["llama"], tmp_path / "x.gguf", add_tensors={"blk.5.attn_norm.weight": np.ones(64)})
    with pytest.raises(GGUFError, match="block 5"):
        _load(p)


def test_vocabulary_smaller_than_output_rows(tiny, tmp_path):
    """A vocabulary with fewer tokens than output rows: ids past it could be sampled and never printed."""
    p = fuzz.Parsed(tiny["llama"].read_bytes())
    e = p.kv("tokenizer.ggml.tokens")
    tt = p.kv("tokenizer.ggml.token_type")
    kv = {"tokenizer.ggml.tokens": (9, (e[2][0], e[2][1][:300])),
          "tokenizer.ggml.token_type": (9, (tt[2][0], tt[2][1][:300])), "tokenizer.ggml.eos_token_id": (4, 1)}
    with pytest.raises(GGUFError) as ei:  # the vocabulary size taken from the tokens: the tensors disagree
        _llm(_edit(tiny["llama"], tmp_path / "v.gguf", kv))
    assert "token_embd.weight" in _one_line(ei)
    kv["llama.vocab_size"] = (4, 320)  # the size the output rows have, but only 300 tokens
    with pytest.raises(GGUFError) as ei:
        _llm(_edit(tiny["llama"], tmp_path / "w.gguf", kv))
    assert "300 tokens" in _one_line(ei) and "320" in str(ei.value)


def test_byte_token_type_on_a_normal_token_prints(tiny, tmp_path):
    p = fuzz.Parsed(tiny["llama"].read_bytes())
    tt = p.kv("tokenizer.ggml.token_type")
    types = list(tt[2][1])
    for i in (5, 100, 260, 319):
        types[i] = 6  # BYTE, on tokens that do not read <0xXX>
    path = _edit(tiny["llama"], tmp_path / "b.gguf", {"tokenizer.ggml.token_type": (9, (tt[2][0], types))})
    llm = _llm(path)
    toks = llm.tokenizer.tokens
    assert llm.detokenize([5]) == llm.tokenizer._bpe_decode_text(toks[5])  # kept as the normal text it is
    llm.detokenize(list(range(320)))
    llm.create_completion("the", max_tokens=3, temperature=0.0)


def test_string_array_count_2_pow_32_fails_before_allocating(tiny, tmp_path):
    p = fuzz.Parsed(tiny["llama"].read_bytes())
    i = [e[0] for e in p.kvs].index("tokenizer.ggml.tokens")

    def patch(buf, f):
        struct.pack_into("<Q", buf, f[("count", i)], 2**32)
    path = _edit(tiny["llama"], tmp_path / "c.gguf", patch=patch)
    import resource
    t0 = time.time()
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    assert "4294967296" in _one_line(e) and time.time() - t0 < 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 8 * 2**20  # KiB: nowhere near 32 GiB


@pytest.mark.parametrize("nd", [0, 5, 255, 2**31])
def test_changed_n_dims_byte_gives_a_short_message(tiny, tmp_path, nd):
    def patch(buf, f):
        struct.pack_into("<I", buf, f[("ndims", 3)], nd)
    path = _edit(tiny["llama"], tmp_path / "n.gguf", patch=patch)
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    _one_line(e)


def test_huge_names_and_values_are_quoted_short(tiny, tmp_path):
    from llamba.gguf import short
    assert len(short("x" * 10**7)) < 120 and "\n" not in short("a\nb") and len(short(list(range(10**6)))) < 150
    path = _edit(tiny["llama"], tmp_path / "k.gguf", {"llama.embedding_length": (8, "6" * 100000)})
    with pytest.raises(GGUFError) as e:
        _load(path)
    assert "llama.embedding_length" in _one_line(e)


def test_non_string_chat_template(tiny, tmp_path, capsys):
    from llamba.cli import main
    path = _edit(tiny["llama"], tmp_path / "t.gguf", {"tokenizer.chat_template": (9, (4, [1, 2, 3]))})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr()
    assert "chat template:  no" in out.out and "ignoring metadata key 'tokenizer.chat_template'" in out.err
    llm = _llm(path)
    with pytest.raises(LlambaError, match="no chat template"):
        llm.get_chat_template()


def test_token_id_out_of_range_is_one_value_error_everywhere(tiny):
    from llamba.layers import Embedding
    from llamba.tokenizer import Tokenizer
    gf = GGUFFile(tiny["llama"])
    tok = Tokenizer.from_metadata(gf.metadata)
    emb = Embedding(gf, "token_embd.weight")
    for bad in (320, -1, 10**9, 2**64):
        for call in (lambda: tok.token_to_piece(bad), lambda: tok.decode([1, bad]), lambda: tok.is_control(bad),
                     lambda: emb(np.array([bad if bad < 2**63 else -5]))):
            with pytest.raises(TokenIdError) as e:
                call()
            assert isinstance(e.value, ValueError) and "320" in str(e.value)
