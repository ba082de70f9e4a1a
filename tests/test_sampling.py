"""Sampler chain (llamba.sampling) against hand-worked examples of llama.cpp's semantics (docs/sampling.md)."""
import math
import time

import numpy as np
import pytest

from llamba.sampling import (
    DEFAULT_SAMPLERS, Sampler, SamplingError, SamplingParams, draft_candidates, draft_top, make_sampler,
    samplers_from_chars, samplers_from_names,
)

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, temp=1.0)  # every filter off


def only(*stages, **kw):
    """A sampler running just `stages` (everything else at its off value)."""
    params = dict(OFF, seed=0)
    params.update(kw)
    return Sampler(SamplingParams(samplers=list(stages), **params))


def ln(ps):
    return np.log(np.asarray(ps, dtype=np.float64)).astype(np.float32)


class FixedU:
    """Stand-in RNG: returns the given uniforms in turn."""
    def __init__(self, *us):
        self.us = list(us)

    def random(self):
        return self.us.pop(0)


# ---------------------------------------------------------------------------------------------------- params

def test_defaults_match_llama_cpp():
    p = SamplingParams()
    assert (p.temp, p.top_k, p.top_p, p.min_p, p.typical_p) == (0.8, 40, 0.95, 0.05, 1.0)
    assert (p.repeat_penalty, p.frequency_penalty, p.presence_penalty, p.penalty_last_n) == (1.0, 0.0, 0.0, 64)
    assert p.min_keep == 0 and p.seed is None
    assert p.samplers == ["penalties", "top_k", "typical_p", "top_p", "min_p", "temperature"]
    assert tuple(p.samplers) == DEFAULT_SAMPLERS
    # with the defaults, the active stages are top_k, top_p, min_p, temperature (penalties and typical are off)
    assert Sampler(p).stages == ["top_k", "top_p", "min_p", "temperature"]


def test_sampler_names_aliases_and_chars():
    assert samplers_from_names("top-k;nucleus;typ;min-p;temp;penalties") == \
        ["top_k", "top_p", "typical_p", "min_p", "temperature", "penalties"]
    assert samplers_from_chars("ekypmt") == list(DEFAULT_SAMPLERS)
    with pytest.raises(SamplingError):
        samplers_from_names("top_k;bogus")
    assert samplers_from_names("top_k;bogus", strict=False) == ["top_k"]
    with pytest.raises(SamplingError):
        SamplingParams(samplers=["nope"])
    with pytest.raises(SamplingError):
        SamplingParams(repeat_penalty=0)
    with pytest.raises(SamplingError):
        SamplingParams(penalty_last_n=-2)
    # DRY / XTC / top-n-sigma are accepted in an order but are no-ops (off by default in llama.cpp too)
    assert Sampler(SamplingParams(samplers="dry;top_k;xtc;temperature")).stages == ["top_k", "temperature"]


def test_from_gguf_defaults():
    meta = {
        "general.architecture": "llama",
        "general.sampling.top_k": 20,
        "general.sampling.top_p": float(np.float32(0.8)),    # GGUF stores float32
        "general.sampling.min_p": 0.0,
        "general.sampling.temp": float(np.float32(0.6)),
        "general.sampling.penalty_last_n": 128,
        "general.sampling.penalty_repeat": float(np.float32(1.1)),
        "general.sampling.sequence": "penalties;top_k;top_p;temperature",
    }
    p = SamplingParams.from_gguf_defaults(meta)
    assert (p.top_k, p.top_p, p.min_p, p.temp) == (20, 0.8, 0.0, 0.6)
    assert (p.penalty_last_n, p.repeat_penalty) == (128, 1.1)
    assert p.samplers == ["penalties", "top_k", "top_p", "temperature"]
    assert p.typical_p == 1.0  # not in the model: llama.cpp default

    # the user's settings win; None means "not set"
    p = SamplingParams.from_gguf_defaults(meta, temp=0.3, top_k=None, samplers=["top_k", "temperature"], seed=7)
    assert (p.temp, p.top_k, p.top_p, p.seed) == (0.3, 20, 0.8, 7)
    assert p.samplers == ["top_k", "temperature"]

    # works on anything with .metadata (GGUFFile), and without sampling keys gives the defaults
    class Fake:
        metadata = {"general.architecture": "llama"}
    assert SamplingParams.from_gguf_defaults(Fake()) == SamplingParams()
    with pytest.raises(SamplingError):
        SamplingParams.from_gguf_defaults(meta, tempp=0.1)


# ---------------------------------------------------------------------------------------------------- stages

def test_penalties_hand_worked():
    # logits         2.0  -1.0  0.5  3.0  0.0     history (window 64): [0, 0, 1, 3, 4]
    # counts          2     1    0    1    1      repeat 2, freq 0.5, presence 0.25
    # tok0:  2.0 / 2 = 1.0;   - (2*0.5 + 0.25) = -0.25
    # tok1: -1.0 * 2 = -2.0;  - (1*0.5 + 0.25) = -2.75   (negative logits are multiplied)
    # tok2:  untouched 0.5
    # tok3:  3.0 / 2 = 1.5;   - 0.75 = 0.75
    # tok4:  0.0 * 2 = 0.0 (<= 0 multiplies); - 0.75 = -0.75
    s = only("penalties", repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    s.accept_many([0, 0, 1, 3, 4])
    ids, x = s.candidates(np.array([2.0, -1.0, 0.5, 3.0, 0.0], np.float32))
    assert ids.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(x, [-0.25, -2.75, 0.5, 0.75, -0.75], atol=1e-6)


def test_penalty_window_ring():
    s = only("penalties", repeat_penalty=2.0, penalty_last_n=3)
    s.accept_many([5, 5, 7, 8])  # window keeps the last 3: [5, 7, 8]
    assert s.history == [5, 7, 8]
    x = np.full(10, 4.0, np.float32)
    _, y = s.candidates(x)
    np.testing.assert_allclose(y, [4, 4, 4, 4, 4, 2, 4, 2, 2, 4])
    s.accept(9)  # pushes out 5
    _, y = s.candidates(x)
    np.testing.assert_allclose(y, [4, 4, 4, 4, 4, 4, 4, 2, 2, 2])
    # frequency counts within the window only
    s = only("penalties", frequency_penalty=1.0, penalty_last_n=4)
    s.accept_many([1, 1, 1, 1, 2, 1])  # window [1, 1, 2, 1]: count(1) = 3
    _, y = s.candidates(np.zeros(3, np.float32))
    np.testing.assert_allclose(y, [0, -3, -1])


def test_penalty_last_n_whole_context_and_off():
    s = Sampler(SamplingParams(penalty_last_n=-1, presence_penalty=1.0, samplers=["penalties"], **OFF), n_ctx=5)
    s.accept_many(range(8))  # n_ctx 5: window [3..7]
    assert s.history == [3, 4, 5, 6, 7]
    s = Sampler(SamplingParams(penalty_last_n=-1, presence_penalty=1.0, samplers=["penalties"], **OFF))
    s.accept_many(range(100))  # no n_ctx: unbounded
    assert len(s.history) == 100
    s = Sampler(SamplingParams(penalty_last_n=0, repeat_penalty=2.0, samplers=["penalties"], **OFF))
    s.accept(1)
    assert s.history == [] and s.stages == []
    _, y = s.candidates(np.ones(3, np.float32))
    np.testing.assert_allclose(y, [1, 1, 1])


def test_penalties_out_of_range_tokens_ignored():
    s = only("penalties", repeat_penalty=2.0)
    s.accept_many([1, 99])
    _, y = s.candidates(np.array([1.0, 1.0, 1.0], np.float32))
    np.testing.assert_allclose(y, [1.0, 0.5, 1.0])


def test_top_k_hand_worked_and_ties():
    s = only("top_k", top_k=3)
    ids, x = s.candidates(np.array([1, 5, 3, 5, 2, 4], np.float32))
    assert ids.tolist() == [1, 3, 5]       # sorted descending; tie 5/5: lower id first
    assert x.tolist() == [5, 5, 4]
    # ties across the cut: keep the lowest ids
    ids, _ = only("top_k", top_k=2).candidates(np.array([1, 2, 2, 2, 0], np.float32))
    assert ids.tolist() == [1, 2]
    # big vocab, all equal: the lowest ids (exercises the block prefilter + argpartition path)
    ids, _ = only("top_k", top_k=5).candidates(np.zeros(300_000, np.float32))
    assert ids.tolist() == [0, 1, 2, 3, 4]
    # big vocab with a tie at the k-th place far apart in id
    x = np.zeros(300_000, np.float32)
    x[[7, 200_000, 299_999]] = 5.0
    x[[150_000, 3]] = 4.0
    ids, _ = only("top_k", top_k=4).candidates(x)
    assert ids.tolist() == [7, 200_000, 299_999, 3]
    # k larger than the vocab: everything, sorted
    ids, _ = only("top_k", top_k=10).candidates(np.array([0.0, 2.0, 1.0], np.float32))
    assert ids.tolist() == [1, 2, 0]


def test_top_k_matches_full_sort_random():
    rng = np.random.default_rng(3)
    for n in (50, 5000, 70_000):
        x = (rng.standard_normal(n) * 3).astype(np.float32)
        x[rng.integers(0, n, 20)] = x.max()  # plant ties at the top
        for k in (1, 10, 40, 300):
            ids, _ = only("top_k", top_k=k).candidates(x)
            ref = np.lexsort((np.arange(n), -x))[:k]
            assert ids.tolist() == ref.tolist(), (n, k)


def test_top_p_hand_worked():
    # probabilities 0.5, 0.2, 0.15, 0.1, 0.05 placed at ids 3, 0, 4, 1, 2
    probs = np.array([0.2, 0.1, 0.05, 0.5, 0.15])
    x = ln(probs)
    # cumulative in sorted order: 0.5, 0.7, 0.85, 0.95, 1.0
    assert only("top_p", top_p=0.8).candidates(x)[0].tolist() == [3, 0, 4]   # 0.85 is the first >= 0.8
    assert only("top_p", top_p=0.6).candidates(x)[0].tolist() == [3, 0]     # 0.7 >= 0.6
    assert only("top_p", top_p=0.3).candidates(x)[0].tolist() == [3]        # at least one
    assert only("top_p", top_p=0.6, min_keep=4).candidates(x)[0].tolist() == [3, 0, 4, 1]
    assert only("top_p", top_p=0.99).candidates(x)[0].tolist() == [3, 0, 4, 1, 2]


def test_top_p_big_vocab_adaptive_matches_full_sort():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(100_000) * 2).astype(np.float32)
    for p in (0.1, 0.5, 0.9, 0.999):
        ids, _ = only("top_p", top_p=p).candidates(x)
        o = np.lexsort((np.arange(x.size), -x))
        e = np.exp(x[o].astype(np.float64) - x.max())
        cum = np.cumsum(e / e.sum())
        cut = int(np.flatnonzero(cum >= p)[0]) + 1
        assert ids.tolist() == o[:cut].tolist(), p


def test_min_p_hand_worked():
    # relative probabilities (to the max): 1, 0.5, 0.1, 0.04, 0.2
    x = ln([1.0, 0.5, 0.1, 0.04, 0.2]) + np.float32(3.0)
    ids, _ = only("min_p", min_p=0.05).candidates(x)
    assert sorted(ids.tolist()) == [0, 1, 2, 4]          # 0.04 < 0.05 dropped
    ids, _ = only("min_p", min_p=0.3).candidates(x)
    assert sorted(ids.tolist()) == [0, 1]
    ids, _ = only("min_p", min_p=0.3, min_keep=3).candidates(x)  # too few survivors: keep the top 3
    assert ids.tolist() == [0, 1, 4]
    ids, _ = only("min_p", min_p=0.99).candidates(x)
    assert ids.tolist() == [0]


def test_typical_hand_worked():
    # p = 0.5, 0.25, 0.125, 0.125: entropy H = 1.75 ln2; -ln p = 1, 2, 3, 3 (x ln2)
    # |-ln p - H| = 0.75, 0.25, 1.25, 1.25 (x ln2) -> order by typicality: 1, 0, 2, 3
    # cumulative in that order: 0.25, 0.75, 0.875, 1.0 ; keep up to the first cum > p
    x = ln([0.5, 0.25, 0.125, 0.125])
    assert only("typical_p", typical_p=0.5).candidates(x)[0].tolist() == [1, 0]
    assert only("typical_p", typical_p=0.2).candidates(x)[0].tolist() == [1]   # drops the most likely token
    assert only("typical_p", typical_p=0.8).candidates(x)[0].tolist() == [1, 0, 2]
    assert only("typical_p", typical_p=0.2, min_keep=2).candidates(x)[0].tolist() == [1, 0]
    # typical before greedy temperature: the arg-max is gone, so greedy picks token 1
    s = Sampler(SamplingParams(samplers=["typical_p", "temperature"], typical_p=0.2, temp=0.0,
                               top_k=0, top_p=1, min_p=0))
    assert s.sample(x) == 1


def test_temperature_and_greedy():
    x = np.array([1.0, 2.0, 3.0], np.float32)
    _, y = only("temperature", temp=0.5).candidates(x)
    np.testing.assert_allclose(y, [2.0, 4.0, 6.0])
    ids, _ = only("temperature", temp=0.0).candidates(x)
    assert ids.tolist() == [2]
    # greedy ties: lowest id, like numpy argmax
    s = Sampler(SamplingParams(temp=0.0))
    assert s.sample(np.array([1.0, 3.0, 3.0, 0.0], np.float32)) == 1
    assert s.sample(np.array([7.0, 7.0], np.float32)) == 0
    # negative temperature is greedy too
    assert Sampler(SamplingParams(temp=-1.0)).sample(np.array([0.0, 0.5, 0.1], np.float32)) == 1


def test_greedy_applies_bias_and_penalties():
    x = np.array([3.0, 2.9, 0.0, 1.0], np.float32)
    s = Sampler(SamplingParams(temp=0.0, repeat_penalty=1.5))
    assert s.sample(x) == 0
    s.accept(0)  # 3.0 / 1.5 = 2.0 < 2.9
    assert s.sample(x) == 1
    assert Sampler(SamplingParams(temp=0.0, logit_bias={3: 2.5})).sample(x) == 3      # 1.0 + 2.5 = 3.5
    assert Sampler(SamplingParams(temp=0.0, suppress_tokens=[0, 1])).sample(x) == 3
    assert Sampler(SamplingParams(temp=0.0, logit_bias={"2": 10})).sample(x) == 2     # JSON-style keys


def test_greedy_fast_path_matches_chain():
    rng = np.random.default_rng(11)
    for trial in range(30):
        x = np.round(rng.standard_normal(2000) * 2, 1).astype(np.float32)  # rounding makes ties
        p = SamplingParams(temp=0.0, repeat_penalty=1.3, frequency_penalty=0.1, top_k=int(rng.integers(0, 50)),
                           top_p=float(rng.uniform(0.5, 1.0)), min_p=float(rng.uniform(0, 0.2)))
        fast = Sampler(p)
        slow = Sampler(p)
        assert fast._greedy_fast
        slow._greedy_fast = False
        hist = rng.integers(0, 2000, 30)
        fast.accept_many(hist)
        slow.accept_many(hist)
        assert fast.sample(x) == slow.sample(x) == int(slow.candidates(x)[0][0])
    # penalties after top_k: the fast path would be wrong, so it is not taken
    s = Sampler(SamplingParams(temp=0.0, repeat_penalty=2.0, top_k=2, samplers=["top_k", "penalties", "temperature"]))
    assert not s._greedy_fast
    s.accept(0)
    # top_k keeps {0: 3.0, 1: 2.9}; penalty: 0 -> 1.5; greedy among them -> 1 (token 3 was cut before penalties)
    assert s.sample(np.array([3.0, 2.9, 0.0, 2.8], np.float32)) == 1
    # penalties after the greedy temperature stage see a single candidate: no effect
    s = Sampler(SamplingParams(temp=0.0, repeat_penalty=2.0, samplers=["top_k", "temperature", "penalties"]))
    assert s._greedy_fast
    s.accept(0)
    assert s.sample(np.array([3.0, 2.9], np.float32)) == 0


def test_chain_order_top_p_before_temperature():
    # logits 2, 1, 0. Untempered softmax: 0.665, 0.245, 0.090 -> top_p 0.8 keeps {0, 1} (0.665 < 0.8 <= 0.910).
    # Tempered first (t = 0.5 -> 4, 2, 0): 0.867, 0.117, 0.016 -> top_p 0.8 keeps {0} only.
    x = np.array([2.0, 1.0, 0.0], np.float32)
    kw = dict(temp=0.5, top_p=0.8, top_k=0, min_p=0.0)
    default = Sampler(SamplingParams(**kw))
    ids, y = default.candidates(x)
    assert ids.tolist() == [0, 1]
    np.testing.assert_allclose(y, [4.0, 2.0])  # temperature applied after the cut
    swapped = Sampler(SamplingParams(samplers=["temperature", "top_p"], **kw))
    assert swapped.candidates(x)[0].tolist() == [0]
    # and the sampled distributions differ accordingly
    draws = [default.sample(x) for _ in range(400)]
    assert 1 in draws
    assert all(swapped.sample(x) == 0 for _ in range(100))


def test_chain_order_min_p_vs_top_k():
    # probs 0.4, 0.3, 0.2, 0.1: top_k 3 then min_p 0.6 keeps the ones >= 0.6 * max; min_p then top_k 1 keeps one
    x = ln([0.4, 0.3, 0.2, 0.1])
    a = Sampler(SamplingParams(samplers=["top_k", "min_p"], top_k=3, min_p=0.6, top_p=1, temp=1))
    assert a.candidates(x)[0].tolist() == [0, 1]     # 0.3/0.4 = 0.75 >= 0.6; 0.2/0.4 = 0.5 < 0.6
    b = Sampler(SamplingParams(samplers=["min_p", "top_k"], top_k=1, min_p=0.6, top_p=1, temp=1))
    assert b.candidates(x)[0].tolist() == [0]


def test_dist_picks_first_cumulative_reaching_u():
    # sorted candidates (top_k makes them sorted) with probs 0.5, 0.3, 0.2
    x = ln([0.3, 0.5, 0.2])  # ids: 1 (0.5), 0 (0.3), 2 (0.2)
    p = SamplingParams(top_k=3, top_p=1.0, min_p=0.0, temp=1.0)
    assert Sampler(p, rng=FixedU(0.0)).sample(x) == 1
    assert Sampler(p, rng=FixedU(0.45)).sample(x) == 1
    assert Sampler(p, rng=FixedU(0.6)).sample(x) == 0      # cum 0.5, 0.8
    assert Sampler(p, rng=FixedU(0.79)).sample(x) == 0
    assert Sampler(p, rng=FixedU(0.85)).sample(x) == 2
    assert Sampler(p, rng=FixedU(0.999999)).sample(x) == 2
    # suppressed (-inf) tokens are never drawn, even at u = 0
    q = SamplingParams(**OFF, suppress_tokens=[0])
    assert Sampler(q, rng=FixedU(0.0)).sample(np.array([5.0, 0.0, 0.0], np.float32)) == 1


def test_seeding_reproducible():
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((60, 1000)) * 2).astype(np.float32)
    p = SamplingParams(temp=1.0, top_k=50, top_p=0.99, min_p=0.0, repeat_penalty=1.1, seed=1234)
    a = [Sampler(p).sample(r) for r in rows]
    s1, s2 = Sampler(p), Sampler(p)
    seq1 = [s1.sample_and_accept(r) for r in rows]
    seq2 = [s2.sample_and_accept(r) for r in rows]
    assert seq1 == seq2
    s3 = Sampler(SamplingParams(**{**p.__dict__, "seed": 4321}))
    seq3 = [s3.sample_and_accept(r) for r in rows]
    assert seq3 != seq1
    assert len(set(a)) > 1
    # reset() re-seeds with the same fixed seed and clears the history
    s1.reset()
    assert s1.history == []
    assert [s1.sample_and_accept(r) for r in rows] == seq1
    # random seeds: None / -1 / 0xFFFFFFFF draw a fresh one and report it
    seeds = {Sampler(SamplingParams(seed=sd)).seed for sd in (None, -1, 0xFFFFFFFF, None)}
    assert all(isinstance(sd, int) and 0 <= sd <= 0xFFFFFFFF for sd in seeds)
    assert len(seeds) > 1
    # the reported seed reproduces the stream
    r = Sampler(SamplingParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0))
    again = Sampler(SamplingParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=r.seed))
    assert [r.sample(row) for row in rows] == [again.sample(row) for row in rows]


def test_softmax_distribution_chi_square():
    """temp 1, filters off: draws follow softmax(logits). Pearson chi-square with 4 degrees of freedom, fixed seed,
    threshold 18.47 (the 0.999 quantile of chi2(4))."""
    logits = np.array([1.0, 0.5, 0.0, -0.5, -1.0], np.float32)
    want = np.exp(logits.astype(np.float64))
    want /= want.sum()
    n = 20_000
    s = Sampler(SamplingParams(**OFF, seed=20240601))
    assert s.stages == []
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=5)
    chi2 = float(((counts - n * want) ** 2 / (n * want)).sum())
    print(f"chi2(4) = {chi2:.2f}, counts {counts.tolist()}, expected {np.round(n * want).astype(int).tolist()}")
    assert chi2 < 18.47
    # through the top-k path (sorted candidates): top_k 3 renormalizes over the 3 largest
    s = Sampler(SamplingParams(**{**OFF, "top_k": 3}, seed=7))
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=5)
    w3 = want[:3] / want[:3].sum()
    assert counts[3:].sum() == 0
    chi2 = float(((counts[:3] - n * w3) ** 2 / (n * w3)).sum())
    print(f"top_k=3: chi2(2) = {chi2:.2f}")
    assert chi2 < 13.82  # 0.999 quantile of chi2(2)


def test_clone_and_state():
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((20, 300)) * 2).astype(np.float32)
    s = Sampler(SamplingParams(temp=1.0, repeat_penalty=1.5, seed=9))
    s.accept_many([1, 2, 3])
    c = s.clone()
    assert [s.sample_and_accept(r) for r in rows] == [c.sample_and_accept(r) for r in rows]
    assert s.history == c.history
    # clones are independent
    c.accept(299)
    assert s.history != c.history
    # state round trip
    st = s.get_state()
    a = [s.sample_and_accept(r) for r in rows]
    s.set_state(st)
    assert [s.sample_and_accept(r) for r in rows] == a


def test_sample_and_accept_n_speculative_verify():
    def rows_with_argmax(ids, n=16):
        r = np.zeros((len(ids), n), np.float32)
        for i, t in enumerate(ids):
            r[i, t] = 10.0
        return r

    s = Sampler(SamplingParams(temp=0.0))
    # row argmaxes 3, 5, 9 vs draft [3, 4]: accept 3, then sample 5 (mismatch) and stop
    assert s.sample_and_accept_n(rows_with_argmax([3, 5, 9]), [3, 4]) == [3, 5]
    assert s.history == [3, 5]
    # whole draft accepted: plus the bonus token from the last row
    assert s.sample_and_accept_n(rows_with_argmax([3, 4, 9]), [3, 4]) == [3, 4, 9]
    assert s.history == [3, 5, 3, 4, 9]
    with pytest.raises(SamplingError):
        s.sample_and_accept_n(rows_with_argmax([1]), [1, 2, 3])
    # penalties see the tokens accepted earlier in the same verify batch
    p = Sampler(SamplingParams(temp=0.0, repeat_penalty=4.0))
    rows = np.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]], np.float32)
    assert p.sample_and_accept_n(rows, [0]) == [0, 1]   # second row: token 0 penalized to 0.5 < 1.0


def test_draft_top():
    x = np.zeros(1000, np.float32)
    x[:10] = ln([0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025])
    x[10:] = -50.0
    x[:10] += 20  # top-10 softmax is exactly these probabilities; the other 990 are outside the top 10
    tok, p = draft_top(x)
    assert tok == 0 and p == pytest.approx(0.3, rel=1e-5)
    # the probability is within the top-k softmax, not the whole vocab
    y = np.zeros(1000, np.float32)
    y[5] = 1.0
    tok, p = draft_top(y, k=10)
    assert tok == 5
    assert p == pytest.approx(math.e / (math.e + 9), rel=1e-6)
    ids, probs = draft_candidates(y, k=3)
    assert ids.tolist() == [5, 0, 1] and probs.sum() == pytest.approx(1.0)
    # big vocab path
    z = np.full(262_144, -3.0, np.float32)
    z[123_456] = 4.0
    tok, p = draft_top(z)
    assert tok == 123_456 and p == pytest.approx(math.exp(7) / (math.exp(7) + 9), rel=1e-6)


def test_bad_logits_shape():
    s = Sampler(SamplingParams())
    with pytest.raises(SamplingError):
        s.sample(np.zeros((2, 5), np.float32))
    with pytest.raises(SamplingError):
        s.sample(np.zeros(0, np.float32))
    assert Sampler(SamplingParams(temp=0)).sample(np.array([[0.0, 1.0]])) == 1  # (1, n_vocab) and float64 are fine


def test_make_sampler():
    s = make_sampler(temp=0.0, top_k=5)
    assert s.params.temp == 0.0 and s.params.top_k == 5
    s = make_sampler(SamplingParams(seed=3), n_ctx=10, top_p=0.5)
    assert s.params.top_p == 0.5 and s.seed == 3


def test_speed_262k_vocab():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(262_144) * 3).astype(np.float32)
    cases = {
        "defaults (top_k 40)": SamplingParams(seed=1),
        "defaults + penalties": SamplingParams(seed=1, repeat_penalty=1.1, presence_penalty=0.5),
        "greedy": SamplingParams(temp=0.0),
        "top_p only (no top_k)": SamplingParams(top_k=0, seed=1),
    }
    for name, p in cases.items():
        s = Sampler(p)
        s.accept_many(range(0, 6400, 100))
        s.sample(x)  # warm-up
        n = 30
        t0 = time.perf_counter()
        for _ in range(n):
            s.sample(x)
        ms = (time.perf_counter() - t0) / n * 1e3
        print(f"sample, 262144 vocab, {name}: {ms:.2f} ms")
        assert ms < 200
    t0 = time.perf_counter()
    for _ in range(30):
        draft_top(x)
    print(f"draft_top, 262144 vocab: {(time.perf_counter() - t0) / 30 * 1e3:.2f} ms")


# ---------------------------------------------------------------------------------------------------- reference

def _reference_chain(x, p: SamplingParams, history):
    """Straightforward full-sort implementation of the chain (for cross-checking): returns (ids, logits)."""
    cand = [(i, float(v)) for i, v in enumerate(np.asarray(x, np.float32))]
    srt = False
    counts = {}
    window = history[-p.penalty_last_n:] if p.penalty_last_n > 0 else []
    for t in window:
        counts[t] = counts.get(t, 0) + 1

    def sort_desc(c):
        return sorted(c, key=lambda t: (-t[1], t[0]))

    def softmax(c):
        m = max(v for _, v in c)
        e = [math.exp(v - m) for _, v in c]
        s = sum(e)
        return [v / s for v in e]

    for st in p.samplers:
        if st == "penalties" and counts and (p.repeat_penalty != 1 or p.frequency_penalty or p.presence_penalty):
            out = []
            for i, v in cand:
                c = counts.get(i, 0)
                if c:
                    v32 = np.float32(v)
                    v32 = v32 * np.float32(p.repeat_penalty) if v32 <= 0 else v32 / np.float32(p.repeat_penalty)
                    v32 = v32 - (np.float32(c) * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty))
                    v = float(np.float32(v32))
                out.append((i, v))
            cand, srt = out, False
        elif st == "top_k" and p.top_k > 0:
            cand, srt = sort_desc(cand)[: p.top_k], True
        elif st == "typical_p" and p.typical_p < 1:
            cand = sort_desc(cand)
            pr = softmax(cand)
            ent = -sum(q * math.log(q) for q in pr if q > 0)
            sh = [abs(-math.log(q) - ent) if q > 0 else math.inf for q in pr]
            order = sorted(range(len(cand)), key=lambda j: sh[j])
            cum, last = 0.0, len(order)
            for n_, j in enumerate(order):
                cum += pr[j]
                if cum > p.typical_p and (p.min_keep == 0 or n_ >= p.min_keep - 1):
                    last = n_ + 1
                    break
            cand, srt = [cand[j] for j in order[:last]], False
        elif st == "top_p" and p.top_p < 1:
            cand = sort_desc(cand)
            pr = softmax(cand)
            cum, last = 0.0, len(cand)
            for n_, q in enumerate(pr):
                cum += q
                if cum >= p.top_p and n_ + 1 >= p.min_keep:
                    last = n_ + 1
                    break
            cand, srt = cand[:last], True
        elif st == "min_p" and p.min_p > 0:
            thr = np.float32(np.float32(max(v for _, v in cand)) + np.float32(math.log(p.min_p)))
            kept = [(i, v) for i, v in cand if np.float32(v) >= thr]
            if len(kept) >= max(1, p.min_keep):
                cand = kept
            else:
                cand, srt = sort_desc(cand)[: max(1, p.min_keep)], True
        elif st == "temperature" and p.temp != 1:
            if p.temp <= 0:
                cand, srt = sort_desc(cand)[:1], True
            else:
                cand = [(i, float(np.float32(v) / np.float32(p.temp))) for i, v in cand]
    return [i for i, _ in cand], [v for _, v in cand]


@pytest.mark.parametrize("n", [12, 300, 3000])
def test_chain_matches_reference_random(n):
    rng = np.random.default_rng(n)
    stages = list(DEFAULT_SAMPLERS)
    for trial in range(25):
        x = np.round(rng.standard_normal(n) * rng.uniform(0.5, 4), 1).astype(np.float32)  # ties on purpose
        order = list(rng.permutation(stages)) if trial % 2 else stages
        p = SamplingParams(
            samplers=order, temp=float(rng.choice([0.0, 0.7, 1.0, 1.5])), top_k=int(rng.choice([0, 1, 5, 40, 100])),
            top_p=float(rng.choice([1.0, 0.3, 0.9, 0.97])), min_p=float(rng.choice([0.0, 0.05, 0.2])),
            typical_p=float(rng.choice([1.0, 1.0, 0.5, 0.9])), repeat_penalty=float(rng.choice([1.0, 1.3])),
            frequency_penalty=float(rng.choice([0.0, 0.2])), presence_penalty=float(rng.choice([0.0, 0.5])),
            penalty_last_n=int(rng.choice([0, 8, 64])), min_keep=int(rng.choice([0, 0, 3])), seed=1)
        hist = [int(t) for t in rng.integers(0, n, 40)]
        s = Sampler(p)
        s.accept_many(hist)
        ids, y = s.candidates(x)
        ref_ids, ref_y = _reference_chain(x, p, hist)
        assert sorted(ids.tolist()) == sorted(ref_ids), (trial, order)
        last = [st for st in s.stages if st != "temperature"]
        if last and last[-1] in ("top_k", "top_p"):  # these leave the candidates sorted (temperature keeps order)
            assert ids.tolist() == ref_ids
        got = dict(zip(ids.tolist(), y.tolist()))
        np.testing.assert_allclose([got[i] for i in ref_ids], ref_y, rtol=1e-6, atol=1e-6)
        if p.temp <= 0 and "temperature" in p.samplers:
            assert s.sample(x) == ref_ids[0]
