"""The batching engine (llamba.scheduler, llamba.kv_cache): several sequences in one forward, paged KV, chunked
prefill, speculative decoding inside the batch, prefix reuse, cancellation. The promise checked throughout is
batch invariance: a request's tokens are exactly the tokens it gets alone (greedy and seeded sampling)."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from llamba import Llama
from llamba.errors import TokenIdError
from llamba.kernels import ops as K
from llamba.kv_cache import KVPool, SeqCache
from llamba.scheduler import Engine
from tiny_models import QT, write_model

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "models", "tiny-qwen35-mtp-q8_0.gguf")


def _params(llm, temp, seed):
    return llm.make_sampler(temp, 40, 0.95, 0.05, 1.0, 1.0, 0.0, 0.0, seed, None).params


def _alone(llm, prompts, temps, seeds, maxt):
    out = []
    for p, t, s, m in zip(prompts, temps, seeds, maxt):
        out.append(list(llm.generate(p, temp=t, seed=s, max_tokens=m)))
        llm.reset()
    return out


def _cases(n_vocab, n=16, seed=0, max_len=60):
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, n_vocab - 1, size=int(rng.integers(1, max_len)))] for _ in range(n)]
    temps = [0.0 if i % 2 == 0 else 0.9 for i in range(n)]
    seeds = [None if i % 2 == 0 else 100 + i for i in range(n)]
    maxt = [int(rng.integers(1, 40)) for _ in range(n)]
    return prompts, temps, seeds, maxt


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eng") / "llama-q8.gguf")
    write_model(path, "llama", qtype=QT.Q8_0, n_ctx=512)
    return path


@pytest.mark.parametrize("arch,qtype", [("llama", QT.Q8_0), ("gemma2", QT.Q4_K), ("qwen3moe", QT.F32),
                                        ("phi3", QT.Q8_0)])
def test_batch_invariance_16_requests(tmp_path, arch, qtype):
    path = str(tmp_path / f"{arch}.gguf")
    kw = dict(n_embd=256, n_ff=512, head_dim=64) if qtype == QT.Q4_K else {}
    write_model(path, arch, qtype=qtype, n_ctx=512, n_vocab=320, **kw)
    llm = Llama(path, n_ctx=512, verbose=False, seed=1)
    prompts, temps, seeds, maxt = _cases(320)
    alone = _alone(llm, prompts, temps, seeds, maxt)
    eng = Engine(llm.model, n_ctx=4096, n_parallel=16, block_size=16, step_tokens=64, lock=llm.session.lock)
    reqs = [eng.submit(p, _params(llm, t, s), m) for p, t, s, m in zip(prompts, temps, seeds, maxt)]
    eng.run_until_done()
    assert [r.tokens() for r in reqs] == alone
    assert eng.stats["steps"] < sum(maxt)  # several sequences per step, not one after another
    for s in list(eng.idle.values()):
        s.release()
    assert eng.pool.n_free == eng.pool.n_blocks


@pytest.mark.parametrize("spec", ["none", "mtp", pytest.param("ngram", marks=pytest.mark.slow), "mtp@0.5"])
def test_batch_invariance_qwen35_with_speculation(spec):
    llm = Llama(FIXTURE, n_ctx=1024, verbose=False, seed=1)
    texts = ["def main():", "import numpy as np\n", "class Foo:\n    def __init__(self", "for i in range(10):",
             "# compute the sum", "x = [", "if __name__ ==", "def fib(n):\n"] * 2
    prompts = [llm.tokenize(t.encode(), add_bos=True) for t in texts]
    temps = [0.0 if i % 2 == 0 else 0.8 for i in range(16)]
    seeds = [None if i % 2 == 0 else 100 + i for i in range(16)]
    maxt = [20 + (i * 7) % 30 for i in range(16)]
    alone = _alone(llm, prompts, temps, seeds, maxt)
    spec, _, busy_p = spec.partition("@")  # mtp@P: spec_rows 4 (no drafts beyond 3 sequences) + busy drafts >= P
    eng = Engine(llm.model, n_ctx=8192, n_parallel=16, spec=spec, draft_max=3, spec_rows=4 if busy_p else 64,
                 busy_draft_p=float(busy_p) if busy_p else None, lock=llm.session.lock)
    reqs = [eng.submit(p, _params(llm, t, s), m) for p, t, s, m in zip(prompts, temps, seeds, maxt)]
    eng.run_until_done()
    assert [r.tokens() for r in reqs] == alone
    if spec != "none":
        assert eng.stats["drafted"] > 0 and eng.stats["accepted"] > 0


def test_mtp_drafts_evict_idle_sequences_when_the_pool_is_full():
    """The MTP head's rows need KV slots too (a draft can cross into a block the sequence does not hold yet): with
    the pool full of idle prefix-cache sequences, the head's reservations evict them like the trunk's do, and no
    request fails with "the KV cache is full" (one did through `llamba serve` on the padded fixture)."""
    llm = Llama(FIXTURE, n_ctx=1024, verbose=False, seed=1)
    texts = ["def main():", "import numpy as np\n", "class Foo:\n    def __init__(self", "for i in range(10):",
             "# compute the sum", "x = [", "if __name__ ==", "def fib(n):\n", "while True:", "print("]
    prompts = [llm.tokenize(t.encode(), add_bos=True) for t in texts]
    alone = _alone(llm, prompts, [0.0] * len(prompts), [None] * len(prompts), [40] * len(prompts))
    eng = Engine(llm.model, n_ctx=160, n_parallel=1, block_size=16, spec="mtp", draft_max=3, spec_rows=64,
                 lock=llm.session.lock)
    for rnd in range(3):
        for p, want in zip(prompts, alone):
            r = eng.submit(p, _params(llm, 0, None), 40)
            eng.run_until_done()
            assert r.error is None and r.tokens() == want
    assert eng.stats["drafted"] > 0 and eng.stats["errors"] == 0


def test_paged_attention_equals_contiguous():
    rng = np.random.default_rng(3)
    Hq, Hkv, d, bs = 4, 2, 32, 8
    lens = [5, 23, 40]
    pool = KVPool({0: (Hkv, d, d)}, 128, bs)
    seqs = [SeqCache(pool, 64) for _ in lens]
    order = rng.permutation(len(lens) * 5)  # interleave the sequences' block allocations
    for i in order:
        s = seqs[i % len(lens)]
        if len(s.blocks) * bs < lens[i % len(lens)]:
            s.reserve(len(s.blocks) * bs + bs)
    qs, poss, outs_ref = [], [], []
    for s, n in zip(seqs, lens):
        k = rng.standard_normal((n, Hkv, d)).astype(np.float32)
        v = rng.standard_normal((n, Hkv, d)).astype(np.float32)
        K.store_kv_slots(k, v, pool.k[0], pool.v[0], s.slots(0, n))
        kc = np.zeros((Hkv, 64, d), K.KV_DTYPE)
        vc = np.zeros_like(kc)
        K.store_kv(k, v, kc, vc, 0)
        T = min(n, 4)
        q = rng.standard_normal((T, Hq, d)).astype(np.float32)
        pos = np.arange(n - T, n, dtype=np.int64)
        o = np.empty((T, Hq, d), np.float32)
        K.attention(q, kc, vc, pos, n, 0.2, 0, o)
        qs.append(q), poss.append(pos), outs_ref.append(o)
        s.n_past = n
    q = np.concatenate(qs)
    pos = np.concatenate(poss)
    row_seq = np.repeat(np.arange(len(lens)), [len(p) for p in poss]).astype(np.int64)
    tables = np.stack([s.table for s in seqs])
    o = np.empty_like(q.reshape(-1, Hq, d))
    K.attention_paged(q, pool.k[0], pool.v[0], pos, row_seq, tables, bs, np.array(lens, np.int64), 0.2, 0, o)
    np.testing.assert_array_equal(o, np.concatenate(outs_ref))


def test_cancel_prefix_reuse_and_blocks_free(tiny_llama):
    llm = Llama(tiny_llama, n_ctx=512, verbose=False, seed=1)
    eng = Engine(llm.model, n_ctx=1024, n_parallel=2, block_size=16, lock=llm.session.lock)
    p = list(range(5, 105))
    want = list(llm.generate(p, temp=0, max_tokens=12))
    r1 = eng.submit(p, _params(llm, 0, None), 12)
    eng.run_until_done()
    assert r1.tokens() == want and r1.n_cached == 0
    r2 = eng.submit(p, _params(llm, 0, None), 12)  # same prompt: all but its last token come from the cache
    eng.run_until_done()
    assert r2.tokens() == want and r2.n_cached == len(p) - 1
    r3 = eng.submit(p[:50] + [7, 8, 9], _params(llm, 0, None), 400)
    eng.step()
    eng.step()
    r3.cancel()
    eng.run_until_done()
    assert r3.finish_reason == "cancelled" and r3.n_cached == 50
    eng._evict(eng.pool.n_blocks)
    assert eng.pool.n_free == eng.pool.n_blocks and not eng.running


def test_fork_shares_full_blocks_and_copies_on_write():
    """SeqCache.fork: the full blocks of the prefix are shared (counted references), the partial one copied; what
    either sequence writes later never shows in the other; truncating into the shared part gives private copies;
    every block comes back once both are released."""
    pool = KVPool({0: (2, 4, 4)}, n_slots=64, block_size=4)
    rng = np.random.default_rng(0)
    a = SeqCache(pool, 64)
    a.reserve(10)
    a.n_past, a.tokens = 10, list(range(10))
    sa = a.slots(0, 10)
    pool.k[0][:, sa] = rng.integers(0, 60000, size=(2, 10, 4)).astype(pool.dtype)
    pool.v[0][:, sa] = rng.integers(0, 60000, size=(2, 10, 4)).astype(pool.dtype)
    k_a, v_a = a.kv_rows(0, 10)
    b = a.fork(7)  # blocks 0 (positions 0-3) shared, positions 4-6 copied into a block of b's own
    assert b.n_past == 7 and b.tokens == list(range(7))
    assert b.blocks[0] == a.blocks[0] and pool.refs(a.blocks[0]) == 2
    assert b.blocks[1] != a.blocks[1] and pool.refs(a.blocks[1]) == 1
    k_b, v_b = b.kv_rows(0, 7)
    np.testing.assert_array_equal(k_b, k_a[:, :7])
    np.testing.assert_array_equal(v_b, v_a[:, :7])
    # b writes its own positions 7..9: a's positions 7..9 are unchanged
    b.reserve(10)
    pool.k[0][:, b.slots(7, 3)] = 1
    np.testing.assert_array_equal(a.kv_rows(0, 10)[0], k_a)
    # a goes back into the shared block and writes there: b's prefix is unchanged
    a.truncate(2)
    assert pool.refs(b.blocks[0]) == 1 and a.blocks[0] != b.blocks[0]
    np.testing.assert_array_equal(a.kv_rows(0, 2)[0], k_a[:, :2])
    a.reserve(4)
    pool.k[0][:, a.slots(2, 2)] = 2
    np.testing.assert_array_equal(b.kv_rows(0, 7)[0], k_a[:, :7])
    a.release()
    b.release()
    assert pool.n_free == pool.n_blocks and all(pool.refs(i) == 0 for i in range(pool.n_blocks))
    with pytest.raises(ValueError):
        a.fork(1)  # a holds nothing now


def test_idle_sequences_survive_a_short_shared_prefix(tiny_llama):
    """Prompts that share only a short prefix (a BOS token, a system prompt) fork the idle sequence instead of
    truncating it: every earlier prompt still finds its whole prefix cached, and every output equals the
    request's output alone."""
    llm = Llama(tiny_llama, n_ctx=512, verbose=False, seed=1)
    eng = Engine(llm.model, n_ctx=1024, n_parallel=2, block_size=16, lock=llm.session.lock)
    prompts = [[1] + list(range(10 + 7 * i, 50 + 7 * i)) for i in range(3)]  # the same first token, then apart
    want = [list(llm.generate(p, temp=0, max_tokens=6)) for p in prompts]
    for rnd in range(2):
        for p, w in zip(prompts, want):
            r = eng.submit(p, _params(llm, 0, None), 6)
            eng.run_until_done()
            assert r.tokens() == w
            assert r.n_cached == (len(p) - 1 if rnd else (1 if p is not prompts[0] else 0))
    assert len(eng.idle) == 6
    eng._evict(eng.pool.n_blocks)
    assert eng.pool.n_free == eng.pool.n_blocks and not eng.idle


def test_bad_token_id_is_refused_at_submit(tiny_llama):
    llm = Llama(tiny_llama, n_ctx=512, verbose=False, seed=1)
    eng = Engine(llm.model, n_ctx=1024, n_parallel=2, lock=llm.session.lock)
    good = eng.submit([5, 6, 7], _params(llm, 0, None), 4)
    with pytest.raises(TokenIdError):
        eng.submit([5, 10**6], _params(llm, 0, None), 4)
    eng.run_until_done()
    assert good.finish_reason == "length" and len(good.tokens()) == 4  # the other request is unaffected


def test_small_pool_never_stalls(tiny_llama):
    llm = Llama(tiny_llama, n_ctx=512, verbose=False, seed=1)
    eng = Engine(llm.model, n_ctx=128, n_parallel=4, block_size=16, lock=llm.session.lock)
    reqs = [eng.submit(list(range(3, 40)), _params(llm, 0, None), 200) for _ in range(6)]
    for _ in range(2000):
        if not eng.step():
            break
    assert all(r.finish_reason in ("length", "stop") for r in reqs)
    assert all(r.n_gen >= 1 for r in reqs)


def test_llama_n_parallel_threads_equal_single(tiny_llama):
    single = Llama(tiny_llama, n_ctx=512, verbose=False, seed=1)
    llm = Llama(tiny_llama, n_ctx=2048, verbose=False, seed=1, n_parallel=4)
    try:
        prompts = ["hello world", "the quick brown fox", "a b c d e f", "once upon a time there was"] * 2
        want = [single(p, max_tokens=16, temperature=0)["choices"][0]["text"] for p in prompts]
        out = [None] * len(prompts)

        def work(i):
            out[i] = llm(prompts[i], max_tokens=16, temperature=0)

        ths = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        assert [o["choices"][0]["text"] for o in out] == want
        again = llm(prompts[-1], max_tokens=16, temperature=0)  # (the threads' order is the OS's: ask once more)
        assert again["choices"][0]["text"] == want[-1]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # its twins ran before: cached
        it = llm("hello world", max_tokens=200, temperature=0, stream=True)
        next(iter(it))
        it.close()  # a consumer that stops cancels its request
        assert llm.generate_batch(["hello", [5, 6, 7]], max_tokens=5, temperature=0) == \
            single.generate_batch(["hello", [5, 6, 7]], max_tokens=5, temperature=0)
    finally:
        llm.close()


def test_draft_length_adapts_to_load():
    llm = Llama(FIXTURE, n_ctx=256, verbose=False)
    eng = Engine(llm.model, n_ctx=1024, n_parallel=8, spec="mtp", draft_max=3, spec_rows=4, lock=llm.session.lock)
    assert [eng.draft_len(n) for n in (1, 2, 3, 4, 8)] == [3, 1, 0, 0, 0]
    assert [eng.draft_plan(n) for n in (1, 2, 4)] == [(3, 0.0), (1, 0.0), (0, 0.0)]
    eng = Engine(llm.model, n_ctx=1024, n_parallel=8, spec="mtp", draft_max=3, spec_rows=4, busy_draft_p=0.7,
                 busy_draft_seqs=6, lock=llm.session.lock)
    assert [eng.draft_plan(n) for n in (1, 2, 4, 6, 7)] == [(3, 0.0), (1, 0.0), (1, 0.7), (1, 0.7), (0, 0.0)]
    eng = Engine(llm.model, n_ctx=1024, n_parallel=8, spec="none", busy_draft_p=0.7)
    assert eng.draft_len(1) == 0 and eng.draft_plan(4) == (0, 0.0)


def test_short_prompt_step_carries_no_slice_of_a_long_prefill(tiny_llama):
    """A request arriving while a long prompt is being prefilled gets a step of its own prompt only: its first
    token does not wait on rows of the long prompt (which resumes at the next step), and both outputs are still
    exactly what they are alone."""
    llm = Llama(tiny_llama, n_ctx=512, verbose=False, seed=1)
    long_p, short_p = [int(t) for t in np.arange(300) % 250 + 3], [9, 10, 11, 12, 13]
    want_long = list(llm.generate(long_p, temp=0, max_tokens=4))
    llm.reset()
    want_short = list(llm.generate(short_p, temp=0, max_tokens=4))
    llm.reset()
    eng = Engine(llm.model, n_ctx=1024, n_parallel=2, block_size=16, step_tokens=32, busy_step_tokens=16,
                 lock=llm.session.lock)
    rows = []
    fb = llm.model.forward_batch

    def spy(seqs, toks, *a, **kw):
        rows.append([len(t) for t in toks])
        return fb(seqs, toks, *a, **kw)

    llm.model.forward_batch = spy
    try:
        r_long = eng.submit(long_p, _params(llm, 0, None), 4)
        eng.step()
        eng.step()
        assert rows == [[32], [32]]
        r_short = eng.submit(short_p, _params(llm, 0, None), 4)
        eng.step()
        assert rows[-1] == [len(short_p)]  # the short prompt alone, though 11 more rows of budget were left
        eng.step()
        assert sorted(rows[-1]) == [1, 15]  # then its decode row beside the long prompt's next chunk
        eng.run_until_done()
    finally:
        del llm.model.forward_batch
    assert r_long.tokens() == want_long and r_short.tokens() == want_short


def _run_forever_in_thread(eng, mode: str = "thread") -> threading.Thread:
    """Start the engine's stepping loop in a thread named engine-main (as `llamba serve` runs it on its main thread)
    and wait until it steps there. mode "thread": Engine.run_forever; "event-loop": Engine.run_async as a task of an
    asyncio loop on that thread (how `llamba serve` runs it, beside the HTTP server), with a ticker task beside it
    whose count (`runner.ticks`) shows the loop is not held up while the engine waits."""
    runner = threading.Thread(target=eng.run_forever, name="engine-main")
    runner.ticks = [0]
    if mode == "event-loop":
        import asyncio

        async def main():
            async def ticker():
                while True:
                    await asyncio.sleep(0.005)
                    runner.ticks[0] += 1
            t = asyncio.create_task(ticker())
            try:
                await eng.run_async()
            finally:
                t.cancel()

        runner = threading.Thread(target=lambda: asyncio.run(main()), name="engine-main")
        runner.ticks = [0]
    runner.start()
    for _ in range(200):
        if eng.elsewhere():
            break
        threading.Event().wait(0.01)
    return runner


LOOP_MODES = pytest.mark.parametrize("mode", ["thread", "event-loop"])


@LOOP_MODES
def test_spawned_consumers_run_on_the_engine_thread(tiny_llama, mode):
    """Engine.spawn: consumers of requests (what `llamba serve` runs per generation) run on the engine's own thread
    as greenlets that hand the thread back while they wait for tokens: several at once, streamed and whole, with
    prompt scoring (a model call from the engine's thread), each with the output a single caller gets; a consumer
    may also park on its own condition (a slow reader) and is resumed after `wake()`; errors reach on_done; when
    the engine stops, parked consumers see their requests' errors and end."""
    single = Llama(tiny_llama, n_ctx=512, verbose=False, seed=1)
    prompts = ["hello world", "the quick brown fox", "once upon a time", "a b c d e f"]
    want = [single(p, max_tokens=10, temperature=0 if i % 2 == 0 else 0.9, seed=7 + i)["choices"][0]["text"]
            for i, p in enumerate(prompts)]
    want_lp = single.prompt_logprobs(single.tokenize(b"the quick brown fox"), 2)
    llm = Llama(tiny_llama, n_ctx=1024, verbose=False, seed=1, n_parallel=4)
    eng = llm.engine
    runner = _run_forever_in_thread(eng, mode)
    out, done, gate = {}, {}, threading.Event()
    finished = threading.Event()

    def consumer(i, p):
        assert eng.hosting() and threading.current_thread() is runner
        kw = dict(max_tokens=10, temperature=0 if i % 2 == 0 else 0.9, seed=7 + i)
        if i % 2 == 0:
            out[i] = "".join(c["choices"][0]["text"] for c in llm.create_completion(p, stream=True, **kw))
        else:
            out[i] = llm(p, **kw)["choices"][0]["text"]

    def scorer():
        out["lp"] = llm.prompt_logprobs(llm.tokenize(b"the quick brown fox"), 2)
        eng.park(gate.is_set)  # parked on its own condition until another thread sets it and wakes the engine
        out["after_gate"] = threading.current_thread().name

    def failing():
        raise ValueError("boom")

    def on_done(key):
        def f(err):
            done[key] = err
            if len(done) == len(prompts) + 2:
                finished.set()
        return f

    try:
        assert eng.can_host()
        for i, p in enumerate(prompts):
            eng.spawn(consumer, i, p, on_done=on_done(i))
        eng.spawn(scorer, on_done=on_done("scorer"))
        eng.spawn(failing, on_done=on_done("failing"))
        for _ in range(6000):
            if len(done) == len(prompts) + 1 and "scorer" not in done:
                break
            threading.Event().wait(0.01)
        assert "scorer" not in done and out.get("lp") == want_lp  # parked, not finished
        gate.set()
        eng.wake()
        assert finished.wait(600)
        assert [out[i] for i in range(len(prompts))] == want
        assert out["after_gate"] == "engine-main"
        assert isinstance(done["failing"], ValueError)
        assert all(done[k] is None for k in done if k != "failing")
        # a consumer waiting for a request when the engine stops: the request's error ends it
        req = eng.submit(llm.tokenize(b"hello"), max_tokens=10_000)
        ended = threading.Event()
        got = {}

        def waiter():
            try:
                req.tokens()
            except Exception as e:  # noqa: BLE001
                got["err"] = e
        eng.spawn(waiter, on_done=lambda err: ended.set())
        threading.Event().wait(0.2)
    finally:
        eng.stop()
        runner.join(timeout=30)
    assert ended.wait(10) and ("err" in got or req.finish_reason is not None)
    assert not runner.is_alive()
    llm.close()


@LOOP_MODES
def test_hosted_consumer_parks_for_a_lock_whose_holder_needs_the_engine(tiny_llama, mode):
    """A thread that holds the model lock lends it to the engine's thread for its model calls (Engine.call); a
    consumer hosted on that thread (Engine.spawn) that wants the lock meanwhile (prompt scoring) must park, not
    block the thread: blocking would leave the holder's call unrun forever (a deadlock)."""
    single = Llama(tiny_llama, n_ctx=512, verbose=False, seed=1)
    want_lp = single.prompt_logprobs(single.tokenize(b"the quick brown fox"), 2)
    single.session.reset()
    want_rows = single.session.eval(single.tokenize(b"abc"), logits="all")
    llm = Llama(tiny_llama, n_ctx=1024, verbose=False, seed=1, n_parallel=2)
    eng = llm.engine
    runner = _run_forever_in_thread(eng, mode)
    out, holding, release, done = {}, threading.Event(), threading.Event(), threading.Event()

    def holder():
        with llm.session.lock:
            holding.set()
            release.wait(60)
            llm.session.reset()
            out["rows"] = llm.session.eval(llm.tokenize(b"abc"), logits="all")  # runs on the engine's thread

    def scorer():
        out["lp"] = llm.prompt_logprobs(llm.tokenize(b"the quick brown fox"), 2)

    try:
        h = threading.Thread(target=holder)
        h.start()
        assert holding.wait(60)
        eng.spawn(scorer, on_done=lambda err: (out.__setitem__("err", err), done.set()))
        ticks = runner.ticks[0]
        threading.Event().wait(0.3)
        assert "lp" not in out  # parked while the lock is held
        if mode == "event-loop":  # and the event loop runs meanwhile (the engine polls for the lock)
            assert runner.ticks[0] > ticks
        release.set()
        h.join(120)
        assert not h.is_alive() and done.wait(120)
        assert out["err"] is None and out["lp"] == want_lp
        assert np.array_equal(out["rows"], want_rows)
    finally:
        release.set()
        eng.stop()
        runner.join(timeout=30)
    llm.close()


@LOOP_MODES
def test_run_forever_steps_and_runs_model_calls_on_its_own_thread(tiny_llama, mode):
    """`llamba serve` runs the engine on the main thread (Engine.run_forever) so that kernels run on one thread:
    requests from other threads only wait for their tokens, and other model work from those threads (embeddings,
    prompt log-probabilities: Session.eval) runs on the engine's thread through Engine.call, also when the caller
    holds the model lock; the results equal a plain single-caller run."""
    single = Llama(tiny_llama, n_ctx=512, verbose=False, seed=1)
    want = single("hello world", max_tokens=8, temperature=0)["choices"][0]["text"]
    want_lp = single.prompt_logprobs(single.tokenize(b"the quick brown fox"), 2)
    llm = Llama(tiny_llama, n_ctx=1024, verbose=False, seed=1, n_parallel=2)
    eng = llm.engine
    threads = set()
    fb, fwd = llm.model.forward_batch, llm.model.forward

    def spy_batch(*a, **kw):
        threads.add(threading.current_thread().name)
        return fb(*a, **kw)

    def spy_fwd(*a, **kw):
        threads.add(threading.current_thread().name)
        return fwd(*a, **kw)

    llm.model.forward_batch, llm.model.forward = spy_batch, spy_fwd
    runner = _run_forever_in_thread(eng, mode)
    try:
        assert eng.elsewhere()
        out = {}

        def work():
            out["text"] = llm("hello world", max_tokens=8, temperature=0)["choices"][0]["text"]
            out["lp"] = llm.prompt_logprobs(llm.tokenize(b"the quick brown fox"), 2)
            with llm.session.lock:  # a caller holding the lock lends it to the engine's thread (no deadlock)
                out["rows"] = llm.session.eval(llm.tokenize(b"abc"), logits="all")
            out["call"] = eng.call(lambda: threading.current_thread().name)

        w = threading.Thread(target=work, name="client")
        w.start()
        w.join(timeout=600)  # (a few seconds on a quiet machine; generous for a loaded one)
        assert not w.is_alive()
        assert out["text"] == want and out["lp"] == want_lp and out["call"] == "engine-main"
        assert out["rows"].shape[0] == len(llm.tokenize(b"abc"))
        assert threads == {"engine-main"}
    finally:
        eng.stop()
        runner.join(timeout=30)
        del llm.model.forward_batch, llm.model.forward
    assert not runner.is_alive() and not eng.elsewhere()
    # stopped: the callers step it themselves again
    assert llm("hello world", max_tokens=8, temperature=0)["choices"][0]["text"] == want
    llm.close()
