"""Speculative decoding is lossless: greedy output with any proposer equals plain greedy output, token for
token; with temperature the token stream is identical for the same seed (the verifier samples every row with
the target's own sampler, drawing one random number per emitted token, as plain decoding does).

The qwen35 fixture (tests/data/models/tiny-qwen35-mtp-q8_0.gguf, trained with an MTP head) is also checked against
llama.cpp's greedy ids and acceptance counts from tests/data/models/README.md."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamba import Llama
from tiny_models import write_model, write_qwen35

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "models" / "tiny-qwen35-mtp-q8_0.gguf"

# tests/data/models/README.md: llama.cpp's greedy continuation and MTP acceptance (accepted, drafted) per prompt,
# `llama-speculative-simple --spec-type draft-mtp --spec-draft-n-max N -n 64 --temp 0` (llama-cpp-python 0.3.36)
PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "    for i in range(len(self.data)):\n",
    "def read_file(path):\n    with open(path, 'r') as f:\n",
]
LLAMACPP_ACCEPT = {
    1: [(25, 40), (33, 33), (31, 34), (31, 35), (31, 35)],
    2: [(32, 65), (44, 45), (41, 50), (40, 50), (41, 51)],
    3: [(36, 85), (50, 52), (46, 63), (46, 66), (47, 63)],
}
FIB_PROMPT_IDS = [479, 286, 1511, 265, 596, 522, 1230, 307, 258, 381, 955, 290, 298, 12, 393, 456, 1511, 265, 596,
                  522, 964, 752]
FIB_GREEDY = [258, 310, 390, 864, 7, 85, 11, 888, 307, 261, 339, 288, 338, 69, 1713, 198]
MAIN_GREEDY = [258, 644, 704, 198, 258, 644, 704, 198]


@pytest.fixture(scope="module")
def fixture_llms():
    plain = Llama(str(FIXTURE), n_ctx=2048, verbose=False)
    return plain


def test_fixture_greedy_matches_llamacpp(fixture_llms):
    llm = fixture_llms
    ids = llm.tokenize(PROMPTS[0].encode())
    assert ids == FIB_PROMPT_IDS
    assert list(llm.generate(ids, temp=0, max_tokens=16)) == FIB_GREEDY
    assert list(llm.generate(llm.tokenize(PROMPTS[1].encode()), temp=0, max_tokens=8)) == MAIN_GREEDY


def llamacpp_counts(steps, n_predict=64):
    """llama-speculative-simple's tally: the loop runs until more than n_predict tokens were produced."""
    n, acc, dr = 0, 0, 0
    for nd, k in steps:
        n += k + 1
        dr += nd
        acc += k
        if n > n_predict:
            break
    return acc, dr


def llamacpp_draft_limit(draft_max, room, budget, n_gen, n_predict=64):
    """llama-speculative-simple's per-step draft limit: min(n_ctx - n_past - 2, n_predict - n_gen - 1); a limit
    <= 0 is not applied at all (common_speculative_draft truncates only when dp.n_max > 0)."""
    rem = min(room - 1, n_predict - n_gen - 1)
    return draft_max if rem <= 0 else min(draft_max, rem)


@pytest.mark.slow  # ~5 min on a busy 2-core machine: 5 prompts x 64 tokens x 3 draft sizes
@pytest.mark.parametrize("n_max", [1, 2, 3])
def test_fixture_mtp_lossless_and_acceptance_equal_to_llamacpp(fixture_llms, n_max, monkeypatch):
    import llamba.speculative.verifier as V
    plain = fixture_llms
    spec = Llama(str(FIXTURE), n_ctx=2048, verbose=False, spec="mtp", draft_max=n_max)
    ours = []
    for p in PROMPTS:
        ids = plain.tokenize(p.encode())
        a = list(plain.generate(ids, temp=0, max_tokens=96))
        b = list(spec.generate(ids, temp=0, max_tokens=96))
        assert a == b  # lossless
        with monkeypatch.context() as m:  # count the way llama-speculative-simple -n 64 does
            m.setattr(V, "draft_limit", llamacpp_draft_limit)
            c = list(spec.generate(ids, temp=0, max_tokens=96))
        assert c == b[:len(c)]
        ours.append(llamacpp_counts(spec.spec_stats.steps))
    print(f"n_max {n_max}: llamba {ours}, llama.cpp {LLAMACPP_ACCEPT[n_max]}")
    assert ours == LLAMACPP_ACCEPT[n_max]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    return {
        "qwen35": str(write_qwen35(d / "q35.gguf", seed=3)),
        "llama": str(write_model(d / "llama.gguf", "llama", seed=4)),
        "gemma3": str(write_model(d / "gemma3.gguf", "gemma3", seed=5)),
    }


def _pair(path, **spec):
    return Llama(path, n_ctx=256, verbose=False), Llama(path, n_ctx=256, verbose=False, **spec)


def test_greedy_lossless_random_models(tiny):
    """Random prompts, lengths, draft sizes, proposers and architectures (hypothesis, imported here rather than at
    collection: it costs ~2 s)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=25, deadline=None)
    @given(prompt=st.lists(st.integers(0, 300), min_size=1, max_size=24), n=st.integers(1, 40),
           draft_max=st.integers(1, 5), kind=st.sampled_from(["mtp", "ngram", "draft"]),
           arch=st.sampled_from(["qwen35", "llama", "gemma3"]))
    def check(prompt, n, draft_max, kind, arch):
        if kind == "mtp" and arch != "qwen35":
            kind = "ngram"
        path = tiny[arch]
        opts = dict(spec=kind, draft_max=draft_max)
        if kind == "draft":
            opts["draft_model"] = path  # draft = target: every draft is accepted
        plain, spec = _cached_pair(path, opts)
        a = list(plain.generate(prompt, temp=0, max_tokens=n))
        b = list(spec.generate(prompt, temp=0, max_tokens=n))
        assert a == b
        if kind == "draft":
            stats = spec.spec_stats
            assert stats.n_accepted == stats.n_drafted  # draft = target accepts everything

    check()


_PAIRS: dict = {}


def _cached_pair(path, opts):
    key = (path, tuple(sorted(opts.items())))
    if key not in _PAIRS:
        _PAIRS[key] = _pair(path, **opts)
    return _PAIRS[key]


def test_prefix_reuse_with_mtp(tiny):
    """A second call that extends the first reuses the cache (also the MTP's) and stays lossless."""
    plain, spec = _pair(tiny["qwen35"], spec="mtp", draft_max=3)
    p1 = [5, 6, 7, 8, 9]
    g1 = list(spec.generate(p1, temp=0, max_tokens=10))
    assert g1 == list(plain.generate(p1, temp=0, max_tokens=10))
    p2 = p1 + g1 + [11, 12]
    g2 = list(spec.generate(p2, temp=0, max_tokens=10))
    assert spec.last_stats.n_reused > 0
    plain.reset()
    assert g2 == list(plain.generate(p2, temp=0, max_tokens=10))


@pytest.mark.parametrize("kind", ["mtp", "ngram"])
def test_sampling_identical_stream_same_seed(tiny, kind):
    plain, spec = _pair(tiny["qwen35"], spec=kind, draft_max=3)
    for seed in range(5):
        kw = dict(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=12)
        assert list(plain.generate([1, 2, 3], **kw)) == list(spec.generate([1, 2, 3], **kw))


@pytest.mark.slow  # ~2 min on a busy 2-core machine
def test_sampling_distribution_agrees(tmp_path):
    """First generated tokens over many seeds: speculation does not change their distribution (chi-square
    two-sample test on a small vocabulary, fixed seeds, threshold at the 0.999 quantile)."""
    path = str(write_qwen35(tmp_path / "small.gguf", n_vocab=300, seed=11, embd_scale=0.05))
    plain, spec = _pair(path, spec="mtp", draft_max=2)
    kw = dict(temp=1.5, top_k=8, top_p=1.0, min_p=0.0, max_tokens=2)
    a = [tuple(plain.generate([7, 8], seed=s, **kw))[1] for s in range(400)]
    b = [tuple(spec.generate([7, 8], seed=10_000 + s, **kw))[1] for s in range(400)]
    cats = sorted(set(a) | set(b))
    ca = np.array([a.count(c) for c in cats], float)
    cb = np.array([b.count(c) for c in cats], float)
    keep = (ca + cb) >= 10
    ca, cb = np.append(ca[keep], ca[~keep].sum()), np.append(cb[keep], cb[~keep].sum())
    ca, cb = ca[(ca + cb) > 0], cb[(ca + cb) > 0]
    chi2 = float((((ca - cb) ** 2) / (ca + cb)).sum())
    from math import erf, sqrt
    dof = len(ca) - 1
    # Wilson-Hilferty approximation of the 0.999 quantile of chi2(dof)
    z = 3.090
    q999 = dof * (1 - 2 / (9 * dof) + z * sqrt(2 / (9 * dof))) ** 3
    assert dof >= 2 and chi2 < q999, (chi2, q999, dof)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """Random qwen35moe models (8 experts, top-2; Q8_0 with fused gate_up experts) whose MTP block, a MoE layer
    too, starts from the token embedding (mtp_echo): some drafts are accepted and some rejected, so verify
    batches are cut short and the DeltaNet state is rolled back to the middle of a batch."""
    from gguf import GGMLQuantizationType as QT
    d = tmp_path_factory.mktemp("spec_moe")
    return [str(write_qwen35(d / "moe-f32.gguf", seed=3, n_expert=8, n_expert_used=2, mtp_echo=True,
                             embd_scale=0.5)),
            str(write_qwen35(d / "moe-q8.gguf", seed=3, n_expert=8, n_expert_used=2, mtp_echo=True,
                             embd_scale=0.5, qtype=QT.Q8_0, fused_exps=True))]


@pytest.mark.parametrize("draft_max", [1, 3, 5])
@pytest.mark.parametrize("which", [0, 1])
def test_qwen35moe_mtp_greedy_lossless(tiny_moe, which, draft_max):
    plain, spec = _cached_pair(tiny_moe[which], dict(spec="mtp", draft_max=draft_max))
    assert spec.model.config.arch == "qwen35moe" and spec.model.mtp.block.ffn.n_expert == 8
    drafted = accepted = 0
    for prompt in ([5, 6, 7], list(range(20, 44)), [1], [100, 200, 33, 44]):
        a = list(plain.generate(prompt, temp=0, max_tokens=24))
        b = list(spec.generate(prompt, temp=0, max_tokens=24))
        assert a == b, prompt
        drafted += spec.spec_stats.n_drafted
        accepted += spec.spec_stats.n_accepted
    assert 0 < accepted < drafted  # both full and cut-short verify batches ran


def test_qwen35moe_mtp_sampling_identical_stream_same_seed(tiny_moe):
    plain, spec = _cached_pair(tiny_moe[0], dict(spec="mtp", draft_max=3))
    for seed in range(4):
        kw = dict(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=12)
        assert list(plain.generate([1, 2, 3], **kw)) == list(spec.generate([1, 2, 3], **kw))


def test_spec_mtp_without_nextn_is_one_clear_line(tiny):
    r = subprocess.run([sys.executable, "-m", "llamba.cli", "run", "-m", tiny["llama"], "-p", "hi", "-n", "2",
                        "--spec", "mtp"], capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no MTP (nextn) layers" in lines[0] and "Traceback" not in r.stderr


def test_streamed_logprobs_equal_with_and_without_mtp(tiny):
    """Logprobs recorded during generation come from the verify rows under speculation: the same tokens, values
    and alternatives as plain decoding (the verify batch is row-exact)."""
    path = tiny["qwen35"]
    plain = Llama(path, n_ctx=256, logits_all=True, verbose=False)
    spec = Llama(path, n_ctx=256, logits_all=True, verbose=False, spec="mtp", draft_max=3)
    prompt = [int(t) for t in np.random.default_rng(9).integers(3, 300, 12)]

    def streamed(llm):
        chunks = list(llm.create_completion(prompt, max_tokens=30, temperature=0, logprobs=3, stream=True))
        lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
        return [t for lp in lps for t in lp["tokens"]], [v for lp in lps for v in lp["token_logprobs"]], \
            [list(d.items()) for lp in lps for d in lp["top_logprobs"]]

    (ta, va, da), (tb, vb, db) = streamed(plain), streamed(spec)
    assert spec.spec_stats.n_drafted > 0 and ta == tb and len(ta) > 0
    assert va == pytest.approx(vb, abs=1e-6)
    assert [[k for k, _ in d] for d in da] == [[k for k, _ in d] for d in db]
