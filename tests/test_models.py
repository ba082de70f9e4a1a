"""Forward passes of llama / gemma3 / qwen3 on tiny random GGUFs against an independent float64 numpy
implementation (tests/ref_forward.py: gguf-py reader + dequantize, written from ENGINE_BRIEF §3)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from llamba import Llama
from llamba.errors import ContextOverflowError
from ref_forward import RefModel
from tiny_models import write_model

ARCHS = ["llama", "gemma3", "qwen3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ARCHS:
        for qt in (QT.F32, QT.Q8_0, QT.Q4_K):
            p = d / f"{arch}-{qt.name}.gguf"
            kw = dict(n_embd=256, n_ff=512, head_dim=64) if qt == QT.Q4_K else {}
            write_model(p, arch, qtype=qt, seed=hash(arch) % 1000, **kw)
            out[arch, qt] = p
    return out


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_forward_matches_reference(models, arch):
    p = models[arch, QT.F32]
    toks = list(np.random.default_rng(1).integers(0, 300, 40))  # 40 > sliding window 8 (gemma3)
    ref = RefModel(p).forward(toks)
    llm = Llama(str(p), n_ctx=64, verbose=False)
    # The KV cache holds fp16-rounded K/V and Q is rounded to fp16 (llama.cpp's numerics): ~1e-4 relative.
    got = llm.eval_logits(toks)  # 40 tokens: the dequantize+BLAS prefill path
    assert got.shape == (40, llm.n_vocab()) and got.dtype == np.float32
    assert _rel(got, ref) < 2e-3
    llm.reset()
    step = np.stack([llm.eval([t])[-1] for t in toks])  # row-exact decode path, one token at a time
    assert _rel(step, ref) < 2e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_K])
def test_quantized_forward_matches_reference(models, arch, qt):
    p = models[arch, qt]
    toks = list(np.random.default_rng(2).integers(0, 300, 12))
    ref = RefModel(p).forward(toks)  # float64 with the same dequantized weights
    llm = Llama(str(p), n_ctx=64, verbose=False)
    got = llm.eval_logits(toks)
    # only the int8 activation quantization of llama.cpp's dot products differs: ~1 % relative per matmul
    assert _rel(got, ref) < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_K])
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_is_row_exact(models, arch, qt):
    """A batch through the exact path gives bit-identical logits to one token at a time (lossless speculation):
    verify-sized batches (2..4 rows, the fused small-batch kernels) and a longer one (the prefill kernels)."""
    llm = Llama(str(models[arch, qt]), n_ctx=64, verbose=False)
    toks = list(np.random.default_rng(3).integers(0, 300, 9))
    llm.reset()
    llm.eval(toks[:3])
    single = np.stack([llm.session.eval([t], logits="last", gemm=False)[-1] for t in toks[3:]])
    for n in (2, 4, 6):
        llm.reset()
        llm.eval(toks[:3])
        batch = llm.session.eval(toks[3:3 + n], logits="all", gemm=False)
        assert np.array_equal(batch, single[:n]), n


def test_truncate_and_prefix_reuse(models):
    llm = Llama(str(models["llama", QT.F32]), n_ctx=64, verbose=False)
    toks = [5, 6, 7, 8, 9, 10]
    full = llm.eval_logits(toks)
    llm.session.rollback(3)
    again = llm.session.eval(toks[3:], logits="all", gemm=False)
    assert np.allclose(again, full[3:], rtol=0, atol=1e-5)
    # generate() reuses the cached prefix
    list(llm.generate(toks, temp=0, max_tokens=2))
    assert llm.last_stats.n_reused == len(toks) - 1


def test_eval_logits_all_and_scores_like_llama_cpp_python(models):
    """eval() computes every row only with logits_all=True (llama-cpp-python's contract); `scores[i]` holds the
    logits after cache position i; n_tokens / input_ids follow the cache."""
    toks = [5, 6, 7, 8, 9, 10]
    full = Llama(str(models["llama", QT.F32]), n_ctx=32, verbose=False).eval_logits(toks)
    a = Llama(str(models["llama", QT.F32]), n_ctx=32, logits_all=True, verbose=False)
    rows = a.eval(toks[:4])
    assert rows.shape == (4, a.n_vocab()) and a.n_tokens == 4
    a.eval(toks[4:])
    assert np.allclose(a.scores[:6], full, rtol=0, atol=1e-4)
    assert list(a.input_ids) == toks
    b = Llama(str(models["llama", QT.F32]), n_ctx=32, verbose=False)
    last = b.eval(toks[:4])
    assert last.shape == (1, b.n_vocab())
    assert np.allclose(last[0], full[3], rtol=0, atol=1e-4) and np.array_equal(b.scores[3], last[0])
    b.eval(toks[4:5])
    assert int(np.argmax(b.scores[b.n_tokens - 1])) == int(np.argmax(full[4]))
    assert b.eval([]).shape == (0, b.n_vocab())


def test_context_overflow_is_a_clear_error(models):
    llm = Llama(str(models["llama", QT.F32]), n_ctx=16, verbose=False)
    with pytest.raises(ContextOverflowError, match="do not fit the context of 16"):
        llm.eval_logits(list(range(20)))
    with pytest.raises(ContextOverflowError, match="context holds 16"):
        llm.create_completion(list(range(20)), max_tokens=4)


def test_completion_api_shapes(models):
    llm = Llama(str(models["gemma3", QT.F32]), n_ctx=64, verbose=False, seed=1)
    out = llm("ab", max_tokens=5, temperature=0)
    assert out["object"] == "text_completion" and out["choices"][0]["finish_reason"] in ("length", "stop")
    assert out["usage"]["completion_tokens"] <= 5
    chunks = list(llm("ab", max_tokens=5, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]
    # greedy is deterministic and equals the argmax chain of eval_logits
    toks = llm.tokenize(b"ab")
    gen = list(llm.generate(toks, temp=0, max_tokens=4))
    seq = list(toks)
    for g in gen:
        assert int(np.argmax(llm.eval_logits(seq)[-1])) == g
        seq.append(g)
