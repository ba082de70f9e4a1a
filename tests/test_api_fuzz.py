"""Hostile arguments to the public Llama API (issue 11): one error type per failure class (a bad token id is a
TokenIdError everywhere, a bad argument a ParameterError, what does not fit memory a ResourceLimitError with the
numbers), and a seeded fuzz over ~2,000 calls: a clean one-line error or a normal return, never another exception
type, never a hang. bench/fuzz_api.py runs the same fuzzer for longer."""
import copy
import time

import numpy as np
import pytest

from api_fuzz import constructor_cases, run
from llamba import Llama
from llamba.chat import BUILTIN_TEMPLATES
from llamba.errors import (LlambaError, ParameterError, ParameterTypeError, ResourceLimitError,
                           TokenIdError)
from llamba.sampling import SamplingError
from tiny_models import write_model

N_VOCAB = 320


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("api_fuzz")
    return str(write_model(d / "m.gguf", "llama", seed=4, n_vocab=N_VOCAB,
                           chat_template=BUILTIN_TEMPLATES["chatml"][0]))


@pytest.fixture(scope="module")
def llm(model_path):
    return Llama(model_path, n_ctx=128, n_threads=1, verbose=False, logits_all=True, embedding=True)


BAD_IDS = [-1, N_VOCAB, 10**9, 2**64, -2**70, 1.5, "a", None, True, np.float32(3)]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_a_bad_token_id_is_a_token_id_error_everywhere(llm, bad):
    calls = {
        "detokenize": lambda: llm.detokenize([1, bad]),
        "eval": lambda: llm.eval([1, bad]),
        "eval_logits": lambda: llm.eval_logits([bad]),
        "generate": lambda: next(llm.generate([1, bad])),
        "create_completion": lambda: llm.create_completion([1, bad], max_tokens=2),
        "logit_bias": lambda: llm.create_completion("hi", max_tokens=2, logit_bias={bad: 1.0}),
        "generate logit_bias": lambda: next(llm.generate([1], logit_bias={bad: 1.0})),
    }
    if isinstance(bad, int) and not isinstance(bad, bool):
        calls["token_to_piece"] = lambda: llm.tokenizer.token_to_piece(bad)
    for name, call in calls.items():
        if name.endswith("logit_bias") and bad is None:
            continue  # None is not a dict key here
        llm.reset()
        with pytest.raises(TokenIdError) as e:
            call()
        assert isinstance(e.value, ValueError) and isinstance(e.value, LlambaError), name
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 200, (name, msg)
    # nothing was evaluated by a refused call
    assert llm.n_tokens == 0
    llm.eval([1, 2])
    assert llm.n_tokens == 2


def test_numpy_ids_and_json_style_logit_bias_are_accepted(llm):
    ids = np.array([1, 2, 3], dtype=np.int32)
    assert llm.detokenize(ids) == llm.detokenize([1, 2, 3])
    llm.reset()
    out = llm.create_completion(ids, max_tokens=3, temperature=0, logit_bias={"7": 100.0})
    assert out["usage"]["completion_tokens"] == 3
    assert set(llm.input_ids[3:].tolist()) <= {7}  # the bias (a JSON object's str key) took effect


def test_tokenize_takes_bytes_or_str_only(llm):
    assert llm.tokenize("héllo") == llm.tokenize("héllo".encode())
    assert llm.tokenize(bytearray(b"hi")) == llm.tokenize(b"hi")
    for bad in (5, None, [104, 105], 1.5):
        with pytest.raises(ParameterTypeError, match="tokenize expects bytes or str") as e:
            llm.tokenize(bad)
        assert isinstance(e.value, TypeError)
    # lone surrogates (e.g. from a JSON "\ud800") tokenize instead of raising UnicodeEncodeError
    assert llm.tokenize("\ud800", add_bos=False)
    out = llm.create_completion("\ud800 x", max_tokens=1, echo=True)
    text = out["choices"][0]["text"]
    assert text.startswith("\ufffd") and " x" in text and "\ud800" not in text
    text.encode("utf-8")  # prints and serializes


def test_huge_context_is_refused_before_allocating(model_path):
    t0 = time.perf_counter()
    with pytest.raises(ResourceLimitError, match=r"n_ctx 1000000000 needs \d+ bytes .* lower n_ctx") as e:
        Llama(model_path, n_ctx=10**9, verbose=False)
    assert time.perf_counter() - t0 < 5 and "\n" not in str(e.value)
    with pytest.raises(ResourceLimitError, match=r"n_ctx 4294967296"):
        Llama(model_path, n_ctx=2**32, verbose=False, vocab_only=True)
    # beyond the trained context (256) is allowed, as in llama.cpp
    big = Llama(model_path, n_ctx=1024, n_threads=1, verbose=False)
    assert big.n_ctx() == 1024 and big.eval_logits([1, 2]).shape == (2, N_VOCAB)


@pytest.mark.parametrize("kw, err", [
    (dict(n_ctx="512"), ParameterTypeError), (dict(n_ctx=1.5), ParameterTypeError),
    (dict(n_batch=-1), ParameterError), (dict(n_batch=None), ParameterTypeError),
    (dict(n_threads="2"), ParameterTypeError), (dict(seed=-7), ParameterError), (dict(seed="x"), ParameterError),
])
def test_constructor_arguments_are_checked(model_path, kw, err):
    with pytest.raises(err) as e:
        Llama(model_path, verbose=False, **kw)
    assert "\n" not in str(e.value) and next(iter(kw)) in str(e.value)


def test_generation_arguments_are_checked(llm):
    m = [{"role": "user", "content": "hi"}]
    cases = [
        (lambda: llm.create_completion("hi", max_tokens="8"), ParameterTypeError, "max_tokens"),
        (lambda: llm.create_completion("hi", max_tokens=2.5), ParameterTypeError, "max_tokens"),
        (lambda: next(llm.generate([1], max_tokens=[3])), ParameterTypeError, "max_tokens"),
        (lambda: llm.create_completion("hi", stop=5), ParameterTypeError, "stop"),
        (lambda: llm.create_completion("hi", stop=["x" * 5000]), ParameterError, "stop"),
        (lambda: llm.create_completion("hi", logprobs=10**9), ParameterError, "logprobs"),
        (lambda: llm.create_chat_completion(m, logprobs=True, top_logprobs=10**9), ParameterError, "top_logprobs"),
        (lambda: llm.create_chat_completion(m, chat_template_kwargs=5), ParameterTypeError, "chat_template_kwargs"),
        (lambda: llm.create_completion(None), ParameterTypeError, "prompt"),
        (lambda: llm.create_completion(5), ParameterTypeError, "prompt"),
        (lambda: llm.create_completion("hi", logit_bias=[1, 2]), ParameterTypeError, "logit_bias"),
        (lambda: llm.create_completion("hi", logit_bias={1: float("nan")}), ParameterError, "logit_bias"),
        (lambda: llm.create_completion("hi", logit_bias={1: "x"}), ParameterError, "logit_bias"),
        (lambda: next(llm.generate([])), ParameterError, "empty"),
        (lambda: llm.embed(5), ParameterTypeError, "embed"),
    ]
    for call, err, needle in cases:
        with pytest.raises(err) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw, ok", [
    (dict(temperature=float("nan")), False), (dict(top_p=float("nan")), False), (dict(repeat_penalty=0), False),
    (dict(repeat_penalty=-1.0), False), (dict(top_k=float("inf")), False), (dict(seed=float("inf")), False),
    (dict(seed=float("nan")), False), (dict(temperature=10**400), False), (dict(seed=-2), False),
    (dict(temperature="warm"), False),
    # llama.cpp's clamping: these run
    (dict(temperature=float("inf")), True), (dict(temperature=-1.0), True), (dict(top_p=5.0), True),
    (dict(top_p=-1.0), True), (dict(top_k=-3), True), (dict(top_k=10**30), True), (dict(min_p=2.0), True),
    (dict(seed=2**70), True), (dict(seed=2**64 - 1), True), (dict(typical_p=-0.5), True),
    (dict(frequency_penalty=1e30, presence_penalty=-1e30), True), (dict(repeat_penalty=1e-30), True),
])
def test_sampling_parameters_clean_error_or_clamped(llm, kw, ok):
    if ok:
        out = llm.create_completion("hi", max_tokens=3, **kw)
        assert out["usage"]["completion_tokens"] >= 1
        gen_kw = {("temp" if k == "temperature" else k): v for k, v in kw.items()}
        assert len(list(llm.generate([1, 2], max_tokens=2, **gen_kw))) == 2
    else:
        with pytest.raises(SamplingError) as e:
            llm.create_completion("hi", max_tokens=3, **kw)
        assert isinstance(e.value, ParameterError) and "\n" not in str(e.value)


def test_deeply_nested_messages_are_a_clean_error(llm):
    deep = "x"
    for _ in range(5000):
        deep = [deep]
    msgs = [{"role": "user", "content": "hi", "meta": deep}]
    deep_schema = {"type": "string"}
    for _ in range(5000):  # a well-formed tool whose parameter schema nests too deep
        deep_schema = {"type": "object", "properties": {"a": deep_schema}}
    for call in (lambda: llm.apply_chat_template(msgs), lambda: llm.create_chat_completion(msgs, max_tokens=2),
                 lambda: llm.apply_chat_template([{"role": "user", "content": "hi"}], extra=deep),
                 lambda: llm.create_chat_completion([{"role": "user", "content": "hi"}], tools=[deep]),
                 lambda: llm.create_chat_completion([{"role": "user", "content": "hi"}], tools=[
                     {"type": "function", "function": {"name": "f", "parameters": deep_schema}}])):
        with pytest.raises(ParameterError, match="nested more than 100 levels"):
            call()
    loop: list = []
    loop.append(loop)  # a list that contains itself
    with pytest.raises(ParameterError, match="nested"):
        llm.apply_chat_template([{"role": "user", "content": "hi", "meta": loop}])
    # moderately nested structures (tool schemas) still render
    ok = "x"
    for _ in range(50):
        ok = {"k": ok}
    assert "<|im_start|>user" in llm.apply_chat_template([{"role": "user", "content": "hi", "meta": ok}])


def test_load_state_rejects_malformed_states_and_keeps_the_cache(llm):
    llm.reset()
    llm.eval([1, 2, 3, 4, 5])
    good = llm.save_state()
    ref = llm.eval_logits([1, 2, 3, 4, 5, 6])[-1]

    def mutated(f):
        st = copy.deepcopy(good)
        f(st)
        return st

    bad = [
        mutated(lambda s: s.llama_state.update(kv={il: (k[:, :1], v[:, :1])
                                                   for il, (k, v) in s.llama_state["kv"].items()})),
        mutated(lambda s: s.llama_state.update(kv={il: (k[:, :2], v) for il, (k, v) in s.llama_state["kv"].items()})),
        mutated(lambda s: s.llama_state.update(kv={il: (k, v.astype(np.float64))
                                                   for il, (k, v) in s.llama_state["kv"].items()})),
        mutated(lambda s: setattr(s, "n_tokens", 10**9)),
        mutated(lambda s: setattr(s, "n_tokens", 3)),
        mutated(lambda s: s.llama_state.update(n_past="5")),
        mutated(lambda s: setattr(s, "input_ids", np.array([1, 2], dtype=np.intc))),
        mutated(lambda s: setattr(s, "input_ids", np.array([1, 2, 3, 4, 10**6]))),
        mutated(lambda s: setattr(s, "scores", np.zeros((5, 7), dtype=np.float32))),
        mutated(lambda s: setattr(s, "llama_state", None)),
        mutated(lambda s: s.llama_state.update(kv=[1, 2])),
    ]
    for st in bad:
        with pytest.raises(LlambaError) as e:
            llm.load_state(st)
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    llm.load_state(good)
    assert llm.n_tokens == 5
    row = llm.eval([6])[-1]
    np.testing.assert_array_equal(row, ref)


FUZZ_SEEDS = range(20)
FUZZ_CASES = 95  # per seed; plus 60 constructor cases: ~1,960 calls


def test_api_fuzz(llm, model_path):
    """~2,000 seeded hostile calls: every one returns or raises a one-line LlambaError / TypeError / ValueError."""
    t0 = time.perf_counter()
    total, problems, slowest = 0, [], 0.0
    for seed in FUZZ_SEEDS:
        counts, probs, slow = run(llm, seed, FUZZ_CASES)
        total += sum(counts.values())
        problems += probs
        slowest = max(slowest, slow)
    counts, probs = constructor_cases(model_path, 0, 60)
    total += sum(counts.values())
    problems += probs
    assert total >= 1000
    assert not problems, problems[:10]
    assert slowest < 10 and time.perf_counter() - t0 < 120
    # the model still answers as before after all of that
    llm.reset()
    a = llm.create_completion([1, 2, 3], max_tokens=5, temperature=0)["choices"][0]["text"]
    fresh = Llama(model_path, n_ctx=128, n_threads=1, verbose=False)
    assert a == fresh.create_completion([1, 2, 3], max_tokens=5, temperature=0)["choices"][0]["text"]
