"""Q8_0 weights repacked at load (llamba.layers.Linear.wp, quants_simple.repack_q8_0) against the raw path
(LLAMBA_REPACK=0): the same bits from Linear, LinearGroup and whole forward passes (decode, verify-sized batches,
prefill), the raw GGUF view still readable after its pages were released, and the opt-out honoured."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from llamba import Llama
from llamba.gguf import GGUFFile
from llamba.kernels import quants_simple as QS
from llamba.layers import SWIGLU, Linear, LinearGroup
from tiny_models import write_model


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory):
    p = tmp_path_factory.mktemp("repack") / "llama-q8_0.gguf"
    # n_vocab 301: the output matrix (tied to token_embd) ends in a partial group of 8 rows
    write_model(p, "llama", qtype=QT.Q8_0, n_vocab=301, n_embd=64, n_ff=160, n_head=4, n_head_kv=2, seed=5)
    return p


def _linears(path, names):
    gf = GGUFFile(path)
    return gf, [Linear(gf, n) for n in names]


def test_linear_repacked_by_default_and_opt_out(q8_model, monkeypatch):
    names = ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "output.weight"
             if GGUFFile(q8_model).has("output.weight") else "token_embd.weight"]
    monkeypatch.delenv("LLAMBA_REPACK", raising=False)
    gf, packed = _linears(q8_model, names)
    monkeypatch.setenv("LLAMBA_REPACK", "0")
    gf0, raw = _linears(q8_model, names)
    assert all(lin.wp is not None for lin in packed) and all(lin.wp is None for lin in raw)
    rng = np.random.default_rng(0)
    for lp, lr in zip(packed, raw):
        assert lp.type_id == QS.Q8_0 and lp.wp.shape == ((lp.rows + 7) // 8, lp.cols // 32 * 272)
        assert np.array_equal(lp.w, lr.w)  # the released raw view reads back (faulted in from the file)
        assert np.array_equal(lp.dequantize(), lr.dequantize())
        for T in range(1, 7):
            x = rng.standard_normal((T, lp.cols)).astype(np.float32)
            assert np.array_equal(lp(x), lr(x)), (lp.name, T)
            assert np.array_equal(lp.gemm(x), lr.gemm(x)), (lp.name, T)
    gu_p, gu_r = LinearGroup(packed[:2]), LinearGroup(raw[:2])
    assert list(gu_p.calls[0][2][:2]) == [QS.Q8_0P, QS.Q8_0P] and list(gu_r.calls[0][2][:2]) == [QS.Q8_0] * 2
    for T in range(1, 7):
        x = rng.standard_normal((T, 64)).astype(np.float32)
        x2 = rng.standard_normal((T, 64)).astype(np.float32)
        for a, b in zip(gu_p(x, SWIGLU, x2), gu_r(x, SWIGLU, x2)):
            assert np.array_equal(a, b), T


def test_linears_over_one_tensor_share_the_packed_copy(q8_model, monkeypatch):
    monkeypatch.delenv("LLAMBA_REPACK", raising=False)
    gf = GGUFFile(q8_model)
    a = Linear(gf, "blk.1.ffn_up.weight")
    b = Linear(gf, "blk.1.ffn_up.weight")
    assert a.wp is b.wp
    assert gf.release("blk.1.ffn_up.weight")  # madvise works here (Linux); the view still reads the file's bytes
    assert np.array_equal(a.w, np.fromfile(q8_model, np.uint8, a.w.size, offset=gf.info(a.name).offset).reshape(
        a.w.shape))


@pytest.mark.parametrize("repack", ["1", "0"])
def test_forward_identical_with_and_without_repack(q8_model, monkeypatch, repack):
    """Logits of decode steps, verify-sized batches (2..4: fused kernels) and longer exact batches (prefill
    kernels) with repacked weights are bit-identical to the raw path's, and batches are row-exact."""
    toks = [int(t) for t in np.random.default_rng(3).integers(0, 300, 10)]

    def run(env):
        monkeypatch.setenv("LLAMBA_REPACK", env)
        llm = Llama(str(q8_model), n_ctx=64, verbose=False)
        out = {}
        for n in (1, 2, 3, 4, 6):
            llm.reset()
            llm.eval(toks[:3])
            out[n] = llm.session.eval(toks[3:3 + n], logits="all", gemm=False)
        return llm, out

    llm, got = run(repack)
    lins = [m for m in vars(llm.model.blocks[0].ffn).values() if isinstance(m, Linear)] \
        if hasattr(llm.model, "blocks") else []
    if lins:
        assert all((lin.wp is not None) == (repack == "1") for lin in lins)
    _, ref = run("0")
    for n in got:
        assert np.array_equal(got[n], ref[n]), n
        assert np.array_equal(got[n], got[6][:n]), n  # row-exact


def test_chunked_repack_equals_whole_and_reports_progress():
    """repack_q8_0 in chunks (what Linear does, dropping the raw pages of each chunk) == in one go, for row counts
    that are and are not multiples of 8 and chunk sizes smaller than one 8-row group."""
    rng = np.random.default_rng(7)
    for rows, nb in ((301, 3), (64, 2), (9, 1)):
        w = rng.integers(0, 256, (rows, nb * 34), dtype=np.uint8)
        w.reshape(rows, nb, 34)[:, :, 1] &= 0x3B  # finite fp16 scales
        whole = QS.repack_q8_0(w)
        for chunk in (1, 34 * nb * 16, 34 * nb * 40):
            seen = []
            got = QS.repack_q8_0(w, chunk, seen.append)
            assert np.array_equal(got, whole), (rows, chunk)
            assert seen[-1] == rows and seen == sorted(seen) and all(r % 8 == 0 for r in seen[:-1])


def test_linear_release_keeps_raw_view_readable(q8_model, monkeypatch):
    monkeypatch.delenv("LLAMBA_REPACK", raising=False)
    gf = GGUFFile(q8_model)
    before = np.array(gf.tensor("token_embd.weight"))
    lin = Linear(gf, "token_embd.weight")
    assert lin.wp is not None and np.array_equal(np.asarray(lin.w).reshape(before.shape), before)


def test_embedding_rows_from_the_packed_copy():
    """dequant_rows_q8_0p == its numpy twin == the raw rows dequantized (gguf-py / the raw kernel), bit for bit."""
    from gguf.quants import dequantize
    from llamba.kernels.ref import quants_simple as R
    rng = np.random.default_rng(11)
    rows, nb = 77, 3
    w = rng.integers(0, 256, (rows, nb * 34), dtype=np.uint8)
    w.reshape(rows, nb, 34)[:, :, 1] &= 0x3B
    wp = QS.repack_q8_0(w)
    ids = np.array([0, 76, 8, 7, 15, 33, 33, 64], np.int64)
    out = np.empty((len(ids), nb * 32), np.float32)
    QS.dequant_rows_q8_0p(wp, ids, out)
    ref = dequantize(w[ids], QT.Q8_0).astype(np.float32)
    assert np.array_equal(out, R.dequant_rows_q8_0p(wp, ids, nb * 32)) and np.array_equal(out, ref)
    with pytest.raises(ValueError):
        QS.dequant_rows_q8_0p(wp, np.array([80]), np.empty((1, nb * 32), np.float32))


def test_tied_embedding_lookup_uses_packed_copy(q8_model, monkeypatch):
    """The tied token_embd (Q8_0) is repacked for the output head; embedding lookups read the packed copy and give
    the same rows and logits as the raw path."""
    monkeypatch.delenv("LLAMBA_REPACK", raising=False)
    a = Llama(str(q8_model), n_ctx=32, verbose=False)
    monkeypatch.setenv("LLAMBA_REPACK", "0")
    b = Llama(str(q8_model), n_ctx=32, verbose=False)
    ea, eb = a.model.token_embd, b.model.token_embd
    assert ea._derived.get(("q8_0p", "token_embd.weight")) is not None
    assert eb._derived.get(("q8_0p", "token_embd.weight")) is None
    ids = np.arange(301)
    assert np.array_equal(ea(ids), eb(ids))
    toks = [3, 17, 250, 300]
    assert np.array_equal(a.eval_logits(toks), b.eval_logits(toks))


def test_packed_copy_shared_while_used_and_freed_after(q8_model, monkeypatch):
    """Two Linears over one tensor share one packed array; once no layer uses it (e.g. the CPU layers that GPU
    offload replaced), the GGUFFile no longer keeps it."""
    import gc
    monkeypatch.delenv("LLAMBA_REPACK", raising=False)
    gf = GGUFFile(q8_model)
    a = Linear(gf, "blk.0.ffn_up.weight")
    b = Linear(gf, "blk.0.ffn_up.weight")
    assert a.wp is b.wp and ("q8_0p", "blk.0.ffn_up.weight") in gf.derived
    del a, b
    gc.collect()
    assert ("q8_0p", "blk.0.ffn_up.weight") not in gf.derived


def test_release_since_covers_every_page_once(q8_model, monkeypatch):
    """Releasing growing prefixes with `since` = the previous `upto` madvises contiguous page ranges that together
    equal one release of the whole prefix (no page left between two chunks)."""
    import mmap as _mmap
    gf = GGUFFile(q8_model)
    calls = []

    class Spy:
        def __init__(self, mm):
            self.mm = mm

        def madvise(self, adv, a, n):
            calls.append((a, a + n))

    name = "token_embd.weight"
    info = gf.info(name)
    part = gf.parts[info.part]
    real = part.mm
    part.mm = Spy(real)
    try:
        prev = 0
        for upto in range(1000, info.nbytes, 1777):
            gf.release(name, upto, since=prev)
            prev = upto
        gf.release(name, info.nbytes, since=prev)
        pieces = [c for c in calls if c[1] > c[0]]
        calls.clear()
        gf.release(name)
        (whole,) = calls
    finally:
        part.mm = real
    ps = _mmap.PAGESIZE
    assert all(a % ps == 0 and b % ps == 0 for a, b in pieces)
    assert pieces[0][0] == whole[0] and pieces[-1][1] == whole[1]
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
