"""llamba perplexity (llama-perplexity's windows, BOS and second-half scoring) against an independent numpy
recomputation, and the KL-divergence mode."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from llamba import Llama
from llamba.perplexity import kl_divergence, kld_topk, perplexity
from tiny_models import write_model


def _ref_ppl(ref, tokens, n_ctx, bos):
    """Windows of n_ctx, first token -> BOS, positions n_ctx/2 .. n_ctx-2 scored (numpy float64 forward)."""
    first = n_ctx // 2
    nll = []
    for i in range(len(tokens) // n_ctx):
        win = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            win[0] = bos
        lg = np.asarray(ref.forward(win), dtype=np.float64)
        for p in range(first, n_ctx - 1):
            x = lg[p] - lg[p].max()
            nll.append(-(x[tokens[i * n_ctx + p + 1]] - math.log(np.exp(x).sum())))
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    return ppl, ppl * math.sqrt(max(0.0, (nll ** 2).mean() - nll.mean() ** 2) / (nll.size - 1)), nll.size


@pytest.mark.slow
@pytest.mark.parametrize("bos", [None, 7])
def test_perplexity_matches_numpy(tmp_path, bos):
    from ref_forward import RefModel
    path = write_model(tmp_path / "m.gguf", "llama", seed=3, n_ctx=128)
    rng = np.random.default_rng(5)
    n_ctx = 32
    tokens = [int(t) for t in rng.integers(0, 320, size=3 * n_ctx + 7)]
    llm = Llama(str(path), n_ctx=n_ctx, verbose=False)
    res, _ = perplexity(llm.model, tokens, n_ctx, 12, bos, out=open("/dev/null", "w"), progress=False)
    ppl, err, count = _ref_ppl(RefModel(path), tokens, n_ctx, bos)
    assert res.count == count == 3 * (n_ctx - 1 - n_ctx // 2)
    assert res.ppl == pytest.approx(ppl, rel=1e-4)
    assert res.error == pytest.approx(err, rel=1e-3)
    assert len(res.running) == 3 and res.running[-1] == res.ppl


def test_kld_topk_formula():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 50)) * 3
    b = a + 0.3 * rng.standard_normal((4, 50))
    lp = a - np.log(np.exp(a).sum(1, keepdims=True))
    lq = b - np.log(np.exp(b).sum(1, keepdims=True))
    full = (np.exp(lp) * (lp - lq)).sum(1)
    ids = np.argsort(-lp, axis=1)
    exact = kld_topk(ids, np.take_along_axis(lp, ids, 1), lq)  # k = whole vocabulary: the exact KLD
    assert np.allclose(exact, full, atol=1e-9)
    part = kld_topk(ids[:, :8], np.take_along_axis(lp, ids[:, :8], 1), lq)  # a lower bound (log-sum inequality)
    assert np.all(part <= full + 1e-12) and np.all(part > 0)
    assert np.allclose(kld_topk(ids[:, :8], np.take_along_axis(lp, ids[:, :8], 1), lp), 0, atol=1e-9)


def test_kl_divergence_self_and_other(tmp_path):
    n_ctx = 32
    rng = np.random.default_rng(1)
    tokens = [int(t) for t in rng.integers(0, 320, size=2 * n_ctx + 3)]
    base_m = Llama(str(write_model(tmp_path / "a.gguf", "llama", seed=3)), n_ctx=n_ctx, verbose=False)
    null = open("/dev/null", "w")
    res, saved = perplexity(base_m.model, tokens, n_ctx, 32, None, save_top_k=16, out=null, progress=False)
    assert saved["ids"].shape == (2 * (n_ctx - 1 - n_ctx // 2), 16)
    base = dict(tokens=np.asarray(tokens[:2 * n_ctx]), n_ctx=n_ctx, n_chunk=2, n_vocab=320, bos=-1, **saved)
    same = kl_divergence(base_m.model, base, 32, out=null)
    assert same["kld_mean"] < 1e-6 and same["top1"] == 1.0
    assert same["ppl"] == pytest.approx(res.ppl, rel=1e-6)
    other = Llama(str(write_model(tmp_path / "b.gguf", "llama", seed=4)), n_ctx=n_ctx, verbose=False)
    diff = kl_divergence(other.model, base, 32, out=null)
    assert diff["kld_mean"] > 0.01 and diff["top1"] < 1.0


def test_perplexity_cli(tmp_path):
    path = write_model(tmp_path / "m.gguf", "llama", seed=3)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    base = tmp_path / "base.npz"
    r = subprocess.run([sys.executable, "-m", "llamba.cli", "perplexity", "-m", str(path), "-f", str(text), "-c",
                        "64", "-b", "16", "--kl-divergence-base", str(base)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "[1]" in r.stdout and "Final estimate: PPL = " in r.stdout and base.exists()
    r2 = subprocess.run([sys.executable, "-m", "llamba.cli", "perplexity", "-m", str(path), "--kl-divergence",
                         "--kl-divergence-base", str(base)], capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr
    assert "Mean    KLD:   0.000000" in r2.stdout and "Same top p: 100.000" in r2.stdout
    short = tmp_path / "s.txt"
    short.write_text("too short")
    r3 = subprocess.run([sys.executable, "-m", "llamba.cli", "perplexity", "-m", str(path), "-f", str(short), "-c",
                         "64"], capture_output=True, text=True)
    assert r3.returncode == 1 and r3.stderr.strip().splitlines()[-1].startswith("llamba: error: the text tokenizes")
