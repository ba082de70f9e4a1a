"""Forward passes of llama / gemma3 / qwen3 on tiny random GGUFs against an independent float64 numpy
implementation (tests/ref_forward.py: gguf-py reader + dequantize, written from docs/architectures.md)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from llamba import Llama
from llamba.errors import ContextOverflowError, LlambaError
from ref_forward import RefModel
from tiny_models import write_model

ARCHS = ["llama", "gemma2", "gemma3", "phi3", "qwen2", "qwen3", "qwen3moe"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ARCHS:
        for qt in (QT.F32, QT.Q8_0, QT.Q4_K):
            p = d / f"{arch}-{qt.name}.gguf"
            kw = dict(n_embd=256, n_ff=512, head_dim=64, n_ff_exp=256) if qt == QT.Q4_K else {}
            # a seed stable across processes (str hash() is salted per process)
            write_model(p, arch, qtype=qt, seed=sum(map(ord, arch)), **kw)
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


# ----------------------------------------------------------------------------------------------------
# qwen35moe (Qwen3.5 MoE): row-exactness of the MoE FFN and the errors for broken files. Forward-pass parity
# with transformers is in tests/test_hf_parity.py.
# ----------------------------------------------------------------------------------------------------

MOE_VARIANTS = {  # name: (tensor type, write_qwen35 options)
    "f32-8x2": (QT.F32, dict(n_expert=8, n_expert_used=2)),
    "q8_0-8x3-fused": (QT.Q8_0, dict(n_expert=8, n_expert_used=3, fused_exps=True)),
    "q4_0-4x2": (QT.Q4_0, dict(n_expert=4, n_expert_used=2)),  # few experts: groups of > 4 rows
}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    from tiny_models import write_qwen35
    d = tmp_path_factory.mktemp("moe")
    return {name: write_qwen35(d / f"{name}.gguf", qtype=qt, seed=21, **kw)
            for name, (qt, kw) in MOE_VARIANTS.items()}


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_qwen35moe_batch_is_row_exact(moe_models, variant):
    """A batch of 2..9 tokens through the exact path gives bit-identical logits to one token at a time, although
    the tokens are grouped by expert (groups of different sizes take the fused small-batch kernels or not)."""
    llm = Llama(str(moe_models[variant]), n_ctx=64, verbose=False)
    assert llm.model.config.arch == "qwen35moe"
    toks = list(np.random.default_rng(3).integers(0, 300, 12))
    llm.reset()
    llm.eval(toks[:3])
    single = np.stack([llm.session.eval([t], logits="last", gemm=False)[-1] for t in toks[3:]])
    for n in (2, 3, 4, 6, 9):
        llm.reset()
        llm.eval(toks[:3])
        batch = llm.session.eval(toks[3:3 + n], logits="all", gemm=False)
        assert np.array_equal(batch, single[:n]), n
    # the MTP head (MoE FFN too) on a batch vs row by row
    m = llm.model
    h = np.random.default_rng(4).standard_normal((6, m.config.n_embd)).astype(np.float32)
    m.mtp.truncate(0)
    rows = np.concatenate([m.mtp.forward([t], h[i:i + 1], logits="last", gemm=False) for i, t in enumerate(toks[:6])])
    m.mtp.truncate(0)
    assert np.array_equal(m.mtp.forward(toks[:6], h, logits="all", gemm=False), rows)


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_qwen35moe_gemm_prefill_path(moe_models, variant, monkeypatch):
    """The dequantize+BLAS path (gemm=True) runs the experts through Linear.gemm and agrees with the exact path
    (float32 weights: to rounding; quantized: up to the exact path's int8 activations)."""
    from llamba.models.moe import ExpertLinear
    gemm, calls = ExpertLinear.gemm, []
    monkeypatch.setattr(ExpertLinear, "gemm", lambda self, *a, **k: calls.append(1) or gemm(self, *a, **k))
    llm = Llama(str(moe_models[variant]), n_ctx=64, verbose=False)
    toks = list(np.random.default_rng(5).integers(0, 300, 40))
    a = llm.model.forward(toks, logits="all", gemm=True)
    assert calls
    llm.reset()
    b = llm.model.forward(toks, logits="all", gemm=False)
    tol = 1e-4 if MOE_VARIANTS[variant][0] == QT.F32 else 0.2
    assert np.isfinite(a).all() and _rel(a, b) < tol and (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_moe_route_matches_numpy_and_breaks_ties_by_index():
    from llamba.models.moe import route
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 16)).astype(np.float32)
    logits[0, [3, 9, 12]] = 5.0  # a three-way tie: experts 3 and 9 win top-2, lower index first
    logits[1, :] = 0.0  # all tied: experts 0, 1
    idx, w = route(logits, 2)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.argsort(-p, axis=1, kind="stable")[:, :2]
    assert (idx == want).all() and list(idx[0]) == [3, 9] and list(idx[1]) == [0, 1]
    top = np.take_along_axis(p, want, 1)
    assert np.allclose(w, top / top.sum(1, keepdims=True), rtol=1e-6, atol=0)
    # each row alone gives the same bits as in the batch
    for r in (0, 1, 7, 49):
        i1, w1 = route(logits[r:r + 1], 2)
        assert (i1 == idx[r]).all() and np.array_equal(w1[0], w[r])


@pytest.mark.parametrize("broken, match", [
    (dict(omit=("blk.1.ffn_down_exps.weight",)), "missing required tensor 'blk.1.ffn_down_exps.weight'"),
    (dict(omit=("blk.0.ffn_gate_inp.weight",)), "no MoE router 'blk.0.ffn_gate_inp.weight'"),
    (dict(omit=("blk.2.ffn_gate_exps.weight",)), "neither 'blk.2.ffn_gate_up_exps.weight' nor"),
    (dict(omit=("blk.4.ffn_up_shexp.weight",)), "missing required tensor 'blk.4.ffn_up_shexp.weight'"),  # MTP
    (dict(n_expert_used=9), "expert_used_count 9 must be between 1 and"),
])
def test_qwen35moe_broken_files_are_one_line_errors(tmp_path, broken, match):
    from llamba.errors import GGUFError
    from tiny_models import write_qwen35
    p = write_qwen35(tmp_path / "bad.gguf", **{"n_expert": 8, **broken})
    with pytest.raises(GGUFError, match=match) as e:
        Llama(str(p), n_ctx=32, verbose=False)
    assert "\n" not in str(e.value)


def test_qwen35moe_missing_experts_through_cli(tmp_path):
    import subprocess
    import sys
    from tiny_models import write_qwen35
    p = write_qwen35(tmp_path / "bad.gguf", n_expert=8, omit=("blk.0.ffn_down_exps.weight",))
    r = subprocess.run([sys.executable, "-m", "llamba.cli", "run", "-m", str(p), "-p", "hi", "-n", "2"],
                       capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "ffn_down_exps" in lines[0] and "Traceback" not in r.stderr


def test_completion_logprobs_like_llama_cpp_python(models):
    """logprobs needs logits_all=True (llama-cpp-python's rule and message); the object has llama-cpp-python's
    layout: one entry per completion token (the last sampled token is not evaluated, as in llama.cpp), text
    offsets into prompt + text, log-softmax values of the rows sampled from, the token itself in its top dict,
    and with echo the prompt tokens first with a null first entry."""
    from llamba.errors import LlambaError
    p = str(models["llama", QT.F32])
    with pytest.raises(ValueError, match="logits_all=False"):
        Llama(p, n_ctx=64, verbose=False).create_completion([5, 6, 7], max_tokens=2, logprobs=3)
    llm = Llama(p, n_ctx=64, logits_all=True, verbose=False)
    with pytest.raises(LlambaError, match="non-negative integer"):
        llm.create_completion([5, 6, 7], max_tokens=2, logprobs=-1)
    prompt = [5, 6, 7, 8]
    out = llm.create_completion(prompt, max_tokens=5, temperature=0, logprobs=3)
    lp, text = out["choices"][0]["logprobs"], out["choices"][0]["text"]
    gen = list(llm.generate(prompt, temp=0, max_tokens=5))
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert "".join(lp["tokens"]) == text
    assert lp["text_offset"][0] == len(prompt) and lp["text_offset"] == sorted(lp["text_offset"])
    rows = Llama.logits_to_logprobs(llm.eval_logits(prompt + gen)[len(prompt) - 1:len(prompt) + 4])
    for k, (tok, row) in enumerate(zip(gen, rows)):
        assert lp["token_logprobs"][k] == pytest.approx(float(row[tok]), abs=1e-6)
        assert lp["token_logprobs"][k] == pytest.approx(float(row.max()), abs=1e-6)  # greedy: the top token
        assert lp["tokens"][k] in lp["top_logprobs"][k] and 1 <= len(lp["top_logprobs"][k]) <= 4  # keys: decoded strings (may collide)
    # streamed: each chunk carries the entries of the tokens whose text it starts; together the same object
    chunks = list(llm.create_completion(prompt, max_tokens=5, temperature=0, logprobs=3, stream=True))
    slp = {k: [x for c in chunks if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"][k]]
           for k in lp}
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert slp["tokens"] == lp["tokens"] and slp["text_offset"] == lp["text_offset"]
    assert slp["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-6)
    assert [list(t) for t in slp["top_logprobs"]] == [list(t) for t in lp["top_logprobs"]]
    echo = llm.create_completion(prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)["choices"][0]
    elp = echo["logprobs"]
    assert elp["token_logprobs"][0] is None and elp["top_logprobs"][0] is None
    assert elp["text_offset"][0] == 0 and "".join(elp["tokens"]) == echo["text"][:len("".join(elp["tokens"]))]
    assert llm.create_completion(prompt, max_tokens=2, temperature=0)["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("kind", ["llama", "qwen35"])
def test_long_prompt_goes_through_in_n_batch_chunks_with_the_same_numbers(models, tmp_path, kind):
    """A prompt longer than n_batch is processed n_batch rows per forward call (bounded activation memory, as
    llama.cpp's n_batch/n_ubatch): every logit row, the cached state and the following decode are bit-identical
    to one call over the whole prompt (the quantized kernels are row-exact)."""
    from tiny_models import write_qwen35
    p = str(models["llama", QT.Q8_0]) if kind == "llama" else str(write_qwen35(tmp_path / "q35.gguf", seed=5))
    toks = [int(t) for t in np.random.default_rng(7).integers(3, 300, 45)]
    whole = Llama(p, n_ctx=64, n_batch=512, logits_all=True, verbose=False)
    chunked = Llama(p, n_ctx=64, n_batch=8, logits_all=True, verbose=False)
    calls = []
    fwd = chunked.model.forward
    chunked.model.forward = lambda t, **kw: (calls.append(len(t)), fwd(t, **kw))[1]
    a, b = whole.eval(toks), chunked.eval(toks)
    assert calls == [8, 8, 8, 8, 8, 5] and np.array_equal(a, b)
    assert np.array_equal(whole.eval([5])[-1], chunked.eval([5])[-1])  # same cache after the chunks
    # logits of the last row only / with the hidden rows kept (MTP prefill): the same rows as one call
    for llm in (whole, chunked):
        llm.reset()
    la = whole.session.eval(toks, logits="last", gemm=False, keep_hidden=True)
    ha = whole.model.hidden.copy()
    lb = chunked.session.eval(toks, logits="last", gemm=False, keep_hidden=True)
    assert lb.shape == (1, chunked.n_vocab()) and np.array_equal(la, lb)
    assert np.array_equal(ha, chunked.model.hidden)
    # all or nothing: a batch that does not fit fails before the first chunk and leaves the cache as it was
    n = chunked.n_tokens
    with pytest.raises(ContextOverflowError):
        chunked.eval(toks)
    assert chunked.n_tokens == n == chunked.model.n_past


def test_embed_and_create_embedding_like_llama_cpp_python(models):
    """embed(): per-token post-norm hidden states (pooling none), their mean / first / last row, L2 normalize,
    truncation to n_batch; create_embedding's OpenAI layout; embedding=True required; the cache is left empty."""
    p = str(models["qwen3", QT.Q8_0])
    with pytest.raises(RuntimeError, match="embedding=True"):
        Llama(p, n_ctx=64, verbose=False).embed("hi")
    texts = ["the cat sat", "on the mat and more"]
    llm = Llama(p, n_ctx=64, n_batch=16, embedding=True, verbose=False)
    assert llm.pooling_type() == 0 and llm.n_embd() == 64
    rows = llm.embed(texts)
    for t, r in zip(texts, rows):
        toks = llm.tokenize(t.encode())
        llm.model.reset()
        llm.model.forward(toks, logits="none", keep_hidden=True)
        assert np.array_equal(np.asarray(r, np.float32), llm.model.hidden)  # the output-norm hidden rows
    llm.model.reset()
    assert llm.n_tokens == 0
    one = llm.embed(texts[0])
    assert one == rows[0]
    for pt, pick in ((1, lambda r: r.mean(0, dtype=np.float32)), (2, lambda r: r[0]), (3, lambda r: r[-1])):
        pooled = Llama(p, n_ctx=64, embedding=True, pooling_type=pt, verbose=False)
        got = pooled.embed(texts)
        for g, r in zip(got, rows):
            assert np.allclose(g, pick(np.asarray(r, np.float32)), atol=1e-6)
        unit = pooled.embed(texts[1], normalize=True)
        assert abs(np.linalg.norm(unit) - 1.0) < 1e-6
    long = "the cat " * 40
    assert len(llm.embed(long)) == 16  # cut to n_batch tokens
    with pytest.raises(ValueError, match="exceed batch size"):
        llm.embed(long, truncate=False)
    resp = llm.create_embedding(["a b", "c"])
    assert resp["object"] == "list" and [d["index"] for d in resp["data"]] == [0, 1]
    assert resp["usage"]["prompt_tokens"] == sum(len(llm.tokenize(t.encode())) for t in ("a b", "c"))
    with pytest.raises(LlambaError):
        Llama(p, n_ctx=64, embedding=True, pooling_type=7, verbose=False)


@pytest.mark.parametrize("kind", ["llama", "qwen35"])
def test_save_state_and_load_state(models, tmp_path, kind):
    """save_state / load_state (llama-cpp-python): the cache of a prompt restored later -- in the same Llama after
    other work, or in a second instance, through pickle -- continues exactly as the original (greedy tokens and
    logits); a state of another model or too long for the context is a clear error."""
    import pickle
    from tiny_models import write_qwen35
    p = str(models["llama", QT.Q8_0]) if kind == "llama" else str(write_qwen35(tmp_path / "q35.gguf", seed=6))
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 300, 20)]
    a = Llama(p, n_ctx=64, verbose=False)
    a.eval(prompt)
    st = a.save_state()
    assert st.n_tokens == 20 and list(st.input_ids) == prompt and st.llama_state_size > 0
    after = a.eval([7])[-1].copy()  # the next token's logits right after the prompt
    ref = list(Llama(p, n_ctx=64, verbose=False).generate(prompt, temp=0, max_tokens=8))
    a.reset()
    a.eval([9, 9, 9, 9])  # other work in between
    a.load_state(st)
    assert a.n_tokens == 20
    assert np.array_equal(a.eval([7])[-1], after)  # the cache is back: same logits for the next token
    a.load_state(st)
    assert list(a.generate(prompt, temp=0, max_tokens=8)) == ref
    b = Llama(p, n_ctx=64, verbose=False)
    b.load_state(pickle.loads(pickle.dumps(st)))
    assert np.array_equal(b.eval([7])[-1], after)
    other = Llama(str(models["gemma3", QT.Q8_0]), n_ctx=64, verbose=False)
    with pytest.raises(LlambaError, match="different model"):
        other.load_state(st)
    small = Llama(p, n_ctx=16, verbose=False)
    with pytest.raises(LlambaError, match="context"):
        small.load_state(st)
