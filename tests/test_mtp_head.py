"""Sidecar MTP heads (llamba.mtp_head): greedy output with a head equals output without it (the verifier makes
drafting lossless), on every trunk kind, single-sequence and batched; the head file is tied to its trunk."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from llamba import Llama
from llamba.errors import LlambaError
from llamba.gguf import GGUFFile
from llamba.models import build_config
from llamba.mtp_head import MTPHeadError, init_head_tensors, write_head
from tiny_models import write_model

PROMPT = [1, 5, 9, 12, 40, 7]


def _head(tmp_path, model_path, name="head.gguf", copy_last=True, draft_vocab=None, quant="q8_0", seed=1):
    gf = GGUFFile(str(model_path))
    cfg = build_config(gf)
    t = init_head_tensors(gf, cfg, np.random.default_rng(seed), copy_last=copy_last, std=0.05)
    out = tmp_path / name
    write_head(str(out), gf, cfg, t, draft_vocab=draft_vocab, quant=quant)
    return out


@pytest.fixture(scope="module")
def trunks(tmp_path_factory):
    d = tmp_path_factory.mktemp("trunks")
    return {a: write_model(d / f"{a}.gguf", a, seed=7) for a in
            ("llama", "gemma2", "gemma3", "phi3", "qwen2", "qwen3", "qwen3moe")}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "phi3", "qwen2", "qwen3", "qwen3moe"])
def test_greedy_identical_with_random_head(tmp_path, trunks, arch):
    m = trunks[arch]
    head = _head(tmp_path, m, copy_last=arch != "llama", draft_vocab=list(range(0, 320, 3)) if arch == "gemma3"
                 else None)
    plain = Llama(str(m), n_ctx=160, verbose=False, spec="none")
    want = list(plain.generate(PROMPT, temp=0, max_tokens=60))
    for dm in (1, 3, 5):
        llm = Llama(str(m), n_ctx=160, verbose=False, spec="auto", mtp_head=str(head), draft_max=dm)
        assert llm.model.mtp is not None
        got = list(llm.generate(PROMPT, temp=0, max_tokens=60))
        assert got == want
        st = llm.spec_stats
        assert st is not None and st.kind == "mtp" and st.n_drafted > 0


def test_seeded_sampling_and_reuse_identical(tmp_path, trunks):
    m = trunks["llama"]
    head = _head(tmp_path, m, copy_last=False)
    plain = Llama(str(m), n_ctx=200, verbose=False, spec="none", seed=3)
    llm = Llama(str(m), n_ctx=200, verbose=False, spec="mtp", mtp_head=str(head), draft_max=3, seed=3)
    for p in (PROMPT, PROMPT + [9, 9, 2], [3, 4]):  # the second prompt reuses the first one's cache
        a = list(plain.generate(p, temp=0.9, seed=11, max_tokens=30))
        b = list(llm.generate(p, temp=0.9, seed=11, max_tokens=30))
        assert a == b


def test_batched_engine_identical(tmp_path, trunks):
    m = trunks["gemma3"]
    head = _head(tmp_path, m, draft_vocab=list(range(200)))
    prompts = [PROMPT, [2, 3, 4], [7] * 5, [11, 12]]
    plain = Llama(str(m), n_ctx=512, verbose=False, spec="none")
    want = [list(plain.generate(p, temp=0, max_tokens=25)) for p in prompts]
    llm = Llama(str(m), n_ctx=512, verbose=False, spec="mtp", mtp_head=str(head), draft_max=2)
    llm.start_engine(4)
    llm.engine.spec_rows = 12  # (4 rows by default: no drafts with 4 sequences decoding) 12 // 4 - 1 = 2 drafts
    got = llm.generate_batch(prompts, max_tokens=25, temperature=0, stop_at_eog=False)
    assert got == want
    assert llm.engine.stats["drafted"] > 0


def test_draft_vocab_restricts_drafts(tmp_path, trunks):
    m = trunks["llama"]
    dv = list(range(10, 330, 4))[:60]
    head = _head(tmp_path, m, draft_vocab=dv)
    llm = Llama(str(m), n_ctx=64, verbose=False, mtp_head=str(head))
    mtp = llm.model.mtp
    assert list(mtp.draft_vocab) == dv
    llm.model.forward(PROMPT, keep_hidden=True)
    lg = mtp.forward(PROMPT, np.zeros((len(PROMPT), llm.n_embd()), np.float32), logits="all")
    assert lg.shape == (len(PROMPT), 320)
    assert np.all(np.isfinite(lg[:, dv])) and np.all(np.isneginf(np.delete(lg, dv, axis=1)))


def test_head_for_another_model_is_refused(tmp_path, trunks):
    other = write_model(tmp_path / "other.gguf", "llama", seed=99)  # same shapes, other weights
    head = _head(tmp_path, trunks["llama"])
    with pytest.raises(MTPHeadError, match="another model"):
        Llama(str(other), n_ctx=64, verbose=False, mtp_head=str(head))
    with pytest.raises(MTPHeadError, match="another model"):  # another architecture
        Llama(str(trunks["qwen3"]), n_ctx=64, verbose=False, mtp_head=str(head))
    with pytest.raises(MTPHeadError, match="not an MTP head"):
        Llama(str(other), n_ctx=64, verbose=False, mtp_head=str(other))
    with pytest.raises(LlambaError, match="not found"):
        Llama(str(other), n_ctx=64, verbose=False, mtp_head=str(tmp_path / "nope.gguf"))
    r = subprocess.run([sys.executable, "-m", "llamba.cli", "run", "-m", str(other), "-p", "hi", "-n", "4",
                        "--mtp-head", str(head)], capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamba: error: ") and "another model" in lines[0]


def test_cli_run_with_head(tmp_path, trunks):
    m = trunks["qwen2"]
    head = _head(tmp_path, m)
    args = [sys.executable, "-m", "llamba.cli", "run", "-m", str(m), "-p", "hello", "-n", "12", "--temp", "0"]
    a = subprocess.run(args + ["--spec", "none"], capture_output=True, text=True)
    b = subprocess.run(args + ["--mtp-head", str(head)], capture_output=True, text=True)
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert a.stdout == b.stdout
    assert "speculative (mtp" in b.stderr


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_model_greedy_identical(tmp_path, request, which):
    """An untrained head (the trunk's last block copied), or a trained one named by LLAMBA_MTP_HEAD_SMOLLM2 /
    LLAMBA_MTP_HEAD_GEMMA3: whatever it drafts, greedy output is unchanged."""
    m = request.getfixturevalue(which)
    dv = list(range(0, 8192)) if which == "gemma3" else None
    trained = os.environ.get(f"LLAMBA_MTP_HEAD_{which.upper()}")  # a head from llamba mtp-train, when given
    head = trained or _head(tmp_path, m, draft_vocab=dv)
    plain = Llama(str(m), n_ctx=256, verbose=False, spec="none")
    p = plain.tokenize(b"The capital of France is", add_bos=True)
    want = list(plain.generate(p, temp=0, max_tokens=40))
    llm = Llama(str(m), n_ctx=256, verbose=False, mtp_head=str(head), spec="auto", draft_max=3)
    assert list(llm.generate(p, temp=0, max_tokens=40)) == want
    assert llm.spec_stats.n_drafted > 0


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "phi3", "qwen2"])
def test_training_block_matches_runtime(tmp_path, trunks, arch):
    """mtp-train's torch head computes what the runtime head computes (same rows, same logits up to the runtime's
    8-bit activations and fp16 KV), so what is trained is what drafts."""
    torch = pytest.importorskip("torch")
    from llamba.train.trainer import TorchHead
    m = trunks[arch]
    gf = GGUFFile(str(m))
    cfg = build_config(gf)
    rng = np.random.default_rng(1)
    t = init_head_tensors(gf, cfg, rng, copy_last=True, std=0.1)
    t = {k: v if v.any() else rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in t.items()}  # zeroed outs
    hp = tmp_path / "h.gguf"
    write_head(str(hp), gf, cfg, t, quant="f32")
    llm = Llama(str(m), n_ctx=128, verbose=False, mtp_head=str(hp))
    model = llm.model
    toks = [int(x) for x in np.random.default_rng(2).integers(0, 320, 40)]
    model.forward(toks, logits="all", keep_hidden=True)
    hprev = np.concatenate([np.zeros((1, cfg.n_embd), np.float32), model.hidden[:-1]])
    want = model.mtp.forward(toks, hprev, logits="all")
    L = cfg.n_layer
    cos, sin = model.rope.get(np.arange(64, dtype=np.int64), cfg.rope_base, cfg.freq_scale)
    th = TorchHead(t, cfg, cfg.n_head[L - 1], cfg.n_head_kv[L - 1], getattr(model, "activation", "silu"),
                   model.output_norm, model.output.dequantize(), cos.copy(), sin.copy())
    with torch.no_grad():
        got, hid = th(torch.from_numpy(model.token_embd(np.array(toks)))[None], torch.from_numpy(hprev)[None])
    got = got[0].numpy()
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    assert np.abs(hid[0].numpy() - model.mtp.hidden).max() < 2e-2


@pytest.mark.slow
def test_mtp_train_end_to_end(tmp_path, trunks):
    """llamba mtp-train on a tiny model (one CPU-minute budget): data, training with the feature loss and a draft
    vocabulary, the head written and checked; the head loads and greedy output with it is unchanged."""
    pytest.importorskip("torch")
    m = trunks["llama"]
    out = tmp_path / "trained.gguf"
    r = subprocess.run([sys.executable, "-m", "llamba.cli", "mtp-train", "-m", str(m), "-o", str(out),
                        "--minutes", "1", "--clock", "cpu", "-t", "1", "--draft-vocab", "100", "--n-parallel", "4"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out acceptance@1" in r.stderr and "held-out greedy decoding with the head" in r.stderr
    plain = Llama(str(m), n_ctx=160, verbose=False, spec="none")
    want = list(plain.generate(PROMPT, temp=0, max_tokens=40))
    llm = Llama(str(m), n_ctx=160, verbose=False, mtp_head=str(out), spec="auto", draft_max=3)
    assert len(llm.model.mtp.draft_vocab) == 100
    assert list(llm.generate(PROMPT, temp=0, max_tokens=40)) == want
