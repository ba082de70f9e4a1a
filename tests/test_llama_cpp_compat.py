"""llama-cpp-python compatibility of `llamba.Llama` (tiny random models): LlamaGrammar, logits processors and
stopping criteria, the prompt-state caches (set_cache), sample(), the llama-cpp-python sampling arguments llamba
does not implement (an error, never ignored), and the llama_chat_format / llama_types / llama_speculative
helpers."""
from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import llamba
from llamba import Llama
from llamba.errors import ParameterError, UnsupportedError
from tiny_models import write_model, write_qwen35

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("compat")
    from llamba.chat import BUILTIN_TEMPLATES
    plain = write_model(d / "llama.gguf", "llama", qtype=QT.F32, seed=3, n_ctx=512,
                        chat_template=BUILTIN_TEMPLATES["chatml"][0])
    hybrid = write_qwen35(d / "qwen35.gguf", seed=1, mtp=False)
    return {"plain": str(plain), "hybrid": str(hybrid)}


@pytest.fixture(scope="module")
def llm(paths):
    return Llama(paths["plain"], n_ctx=128, verbose=False, seed=7)


def _greedy(llm, prompt=PROMPT, n=6):
    return list(llm.generate(prompt, temp=0, max_tokens=n))


def test_names_exported():
    for name in ("LlamaGrammar", "LogitsProcessorList", "StoppingCriteriaList", "LlamaRAMCache", "LlamaDiskCache",
                 "LlamaCache", "BaseLlamaCache", "MinTokensLogitsProcessor"):
        assert getattr(llamba, name) is getattr(llamba.llama, name)
    assert llamba.LlamaCache is llamba.LlamaRAMCache


def test_llama_grammar(tmp_path, llm):
    g = llamba.LlamaGrammar.from_string('root ::= "yes" | "no"')
    assert g._grammar == 'root ::= "yes" | "no"'
    f = tmp_path / "g.gbnf"
    f.write_text('root ::= "ab" "c"?\n')
    assert llamba.LlamaGrammar.from_file(f)._grammar == 'root ::= "ab" "c"?\n'
    (tmp_path / "empty.gbnf").write_text("")
    with pytest.raises(ParameterError):
        llamba.LlamaGrammar.from_file(tmp_path / "empty.gbnf")
    for seed in range(3):
        out = llm.create_completion(PROMPT, max_tokens=8, temperature=1.0, seed=seed, grammar=g)
        assert out["choices"][0]["text"] in ("yes", "no")
        assert out["choices"][0]["finish_reason"] == "stop"
    js = llamba.LlamaGrammar.from_json_schema(json.dumps({"type": "string", "enum": ["left", "right"]}))
    assert js._grammar.startswith("start: %json")
    out = llm.create_completion(PROMPT, max_tokens=8, temperature=1.0, seed=1, grammar=js)
    assert json.loads(out["choices"][0]["text"]) in ("left", "right")
    # the same constraint as the equivalent response_format
    rf = {"type": "json_object", "schema": {"type": "string", "enum": ["left", "right"]}}
    assert out["choices"][0]["text"] == llm.create_completion(PROMPT, max_tokens=8, temperature=1.0, seed=1,
                                                              response_format=rf)["choices"][0]["text"]
    bad = llamba.LlamaGrammar.from_string("root ::= (")
    with pytest.raises(ParameterError):
        llm.create_completion(PROMPT, max_tokens=2, grammar=bad)


def test_logits_processor(llm):
    seen = []
    target = llm.tokenize(b"a", add_bos=False)[0]

    def force(input_ids, scores):
        assert input_ids.dtype == np.intc and scores.dtype == np.float32 and scores.shape == (llm.n_vocab(),)
        seen.append(input_ids.tolist())
        scores[:] = -np.inf
        scores[target] = 0.0
        return scores

    out = llm.create_completion(PROMPT, max_tokens=4, temperature=0.8, seed=1,
                                logits_processor=llamba.LogitsProcessorList([force]))
    assert out["choices"][0]["text"] == llm.detokenize([target] * 4).decode()
    # input_ids: the prompt, then each sampled token appended
    assert seen == [PROMPT + [target] * k for k in range(4)]
    # a processor that adds a bias samples what logit_bias samples; a plain list of callables works too
    bias = {11: 3.0, 40: 5.0, 99: 4.0}

    def add(input_ids, scores):
        for t, b in bias.items():
            scores[t] += b
        return scores
    a = llm.create_completion(PROMPT, max_tokens=6, temperature=0.9, seed=3, logits_processor=[add])
    b = llm.create_completion(PROMPT, max_tokens=6, temperature=0.9, seed=3, logit_bias=bias)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    with pytest.raises(ParameterError, match="returned None"):
        llm.create_completion(PROMPT, max_tokens=2, logits_processor=[lambda ids, s: None])
    # streamed and chat, and the token API
    chunks = list(llm.create_completion(PROMPT, max_tokens=3, stream=True, logits_processor=[force]))
    assert "".join(c["choices"][0]["text"] for c in chunks) == llm.detokenize([target] * 3).decode()
    assert list(llm.generate(PROMPT, max_tokens=3, logits_processor=[force])) == [target] * 3
    msg = [{"role": "user", "content": "hi"}]
    ch = llm.create_chat_completion(msg, max_tokens=3, logits_processor=[force])
    assert ch["choices"][0]["message"]["content"] == llm.detokenize([target] * 3).decode()


def test_min_tokens_processor(llm):
    eos = llm.token_eos()

    def eos_first(input_ids, scores):
        scores[eos] = 100.0
        return scores
    out = llm.create_completion(PROMPT, max_tokens=8, temperature=0, logits_processor=[eos_first])
    assert out["choices"][0]["text"] == "" and out["choices"][0]["finish_reason"] == "stop"
    out = llm.create_completion(PROMPT, max_tokens=8, temperature=0, logits_processor=llamba.LogitsProcessorList(
        [eos_first, llamba.MinTokensLogitsProcessor(3, eos)]))
    assert out["choices"][0]["text"] == llm.detokenize(_greedy(llm, n=3)).decode()
    assert out["choices"][0]["finish_reason"] == "stop"


def test_stopping_criteria(llm):
    ref = _greedy(llm, n=8)
    rows = []

    def after3(input_ids, logits):
        rows.append(logits)
        return len(input_ids) >= len(PROMPT) + 3

    out = llm.create_completion(PROMPT, max_tokens=8, temperature=0,
                                stopping_criteria=llamba.StoppingCriteriaList([after3]))
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 3
    assert out["choices"][0]["text"] == llm.detokenize(ref[:3]).decode()
    # the rows are the ones the tokens were sampled from
    fresh = Llama(llm.model_path, n_ctx=128, verbose=False).eval_logits(PROMPT + ref[:3])
    assert rows[0].dtype == np.float32 and np.array_equal(rows[0], fresh[len(PROMPT) - 1])
    assert np.array_equal(rows[3], fresh[len(PROMPT) + 2])
    # never firing: the usual end
    out = llm.create_completion(PROMPT, max_tokens=4, temperature=0, stopping_criteria=[lambda i, l: False])
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 4
    assert list(llm.generate(PROMPT, temp=0, max_tokens=8, stopping_criteria=[after3])) == ref[:3]
    msg = [{"role": "user", "content": "hi"}]
    ch = llm.create_chat_completion(msg, max_tokens=8, temperature=0, stopping_criteria=[lambda i, l: True])
    assert ch["choices"][0]["message"]["content"] == "" and ch["choices"][0]["finish_reason"] == "stop"
    chunks = list(llm.create_completion(PROMPT, max_tokens=8, temperature=0, stream=True,
                                        stopping_criteria=[after3]))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_batching_engine(paths, llm):
    eng = Llama(paths["plain"], n_ctx=128, verbose=False, n_parallel=2)
    try:
        with pytest.raises(ParameterError, match="logits_processor"):
            eng.create_completion(PROMPT, max_tokens=2, logits_processor=[lambda i, s: s])
        with pytest.raises(ParameterError, match="logits_processor"):
            eng.generate(PROMPT, max_tokens=2, logits_processor=[lambda i, s: s])
        with pytest.raises(ParameterError, match="set_cache"):
            eng.set_cache(llamba.LlamaRAMCache())
        # stopping criteria work there (the rows come with the tokens)
        crit = [lambda ids, row: len(ids) >= len(PROMPT) + 2]
        a = eng.create_completion(PROMPT, max_tokens=6, temperature=0, stopping_criteria=crit)
        b = llm.create_completion(PROMPT, max_tokens=6, temperature=0, stopping_criteria=crit)
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        assert a["choices"][0]["finish_reason"] == "stop" and a["usage"]["completion_tokens"] == 2
    finally:
        eng.close()


def test_unsupported_arguments_are_errors(llm):
    ok = llm.create_completion(PROMPT, max_tokens=2, temperature=0, tfs_z=1.0, mirostat_mode=0, mirostat_tau=5.0,
                               mirostat_eta=0.1, model="my-model")
    assert ok["model"] == "my-model"
    with pytest.raises(UnsupportedError, match="mirostat"):
        llm.create_completion(PROMPT, max_tokens=2, mirostat_mode=2)
    with pytest.raises(UnsupportedError, match="tfs_z"):
        llm.create_completion(PROMPT, max_tokens=2, tfs_z=0.95)
    with pytest.raises(UnsupportedError, match="suffix"):
        llm.create_completion(PROMPT, suffix="end", max_tokens=2)
    with pytest.raises(TypeError, match="no_such_arg"):
        llm.create_completion(PROMPT, max_tokens=2, no_such_arg=1)
    with pytest.raises(TypeError, match="no_such_arg"):
        llm(PROMPT, max_tokens=2, no_such_arg=1)
    with pytest.raises(TypeError, match="no_such_arg"):
        llm.generate(PROMPT, no_such_arg=1)
    with pytest.raises(UnsupportedError, match="mirostat"):
        llm.generate(PROMPT, mirostat_mode=1)
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(UnsupportedError, match="functions"):
        llm.create_chat_completion(msg, functions=[{"name": "f", "parameters": {}}])
    with pytest.raises(UnsupportedError, match="mirostat"):
        llm.create_chat_completion(msg, mirostat_mode=1)
    with pytest.raises(TypeError, match="no_such_arg"):
        llm.create_chat_completion(msg, no_such_arg=1)
    out = llm.create_chat_completion(msg, max_tokens=2, model="m", tfs_z=1.0, mirostat_mode=0)
    assert out["model"] == "m"
    chunks = list(llm.create_chat_completion(msg, max_tokens=2, model="m", stream=True))
    assert {c["model"] for c in chunks} == {"m"}
    chunks = list(llm.create_completion(PROMPT, max_tokens=2, model="m", stream=True))
    assert {c["model"] for c in chunks} == {"m"}


def test_sample_after_eval(paths):
    llm = Llama(paths["plain"], n_ctx=128, verbose=False)
    rows = llm.eval(PROMPT)
    assert llm.n_tokens == len(PROMPT) and llm.input_ids.tolist() == PROMPT
    t = llm.sample(temp=0.0, idx=len(PROMPT) - 1)
    assert t == int(np.argmax(rows[-1])) == _greedy(Llama(paths["plain"], n_ctx=128, verbose=False), n=1)[0]
    assert llm.sample(temp=0.0) == t and llm.n_tokens == len(PROMPT)  # nothing added
    with pytest.raises(ParameterError, match="logits_all"):
        llm.sample(temp=0.0, idx=1)
    assert llm.sample(temp=0.0, logits_processor=[lambda i, s: np.where(np.arange(len(s)) == 3, 9e9, s)]) == 3
    g = llamba.LlamaGrammar.from_string('root ::= "zz"')
    z = llm.sample(temp=0.0, grammar=g)
    assert llm.detokenize([z]).decode() in ("z", "zz")
    # after a generation moved the cache on, the last position's logits are recomputed
    gen = _greedy(llm, n=3)
    assert llm.n_tokens == len(PROMPT) + 2
    assert llm.sample(temp=0.0) == _greedy(Llama(paths["plain"], n_ctx=128, verbose=False), PROMPT + gen[:2], 1)[0]


def test_model_kind_flags_and_small_api(paths, llm):
    assert llm._is_recurrent is False and llm._is_hybrid is False
    hy = Llama(paths["hybrid"], n_ctx=64, verbose=False)
    assert hy._is_recurrent is False and hy._is_hybrid is True
    assert llm.token_nl() == llm.tokenize(b"\n", add_bos=False)[0]
    assert Llama.longest_token_prefix([1, 2, 3], [1, 2, 4]) == 2 and Llama.longest_token_prefix([], [1]) == 0
    s = llm.seed
    try:
        llm.set_seed(1234)
        assert llm.seed == 1234
        with pytest.raises(ParameterError):
            llm.set_seed("x")
    finally:
        llm.seed = s


@pytest.mark.parametrize("kind", ["plain", "hybrid"])
def test_ram_cache(paths, kind):
    p = paths[kind]
    mk = lambda: Llama(p, n_ctx=64, verbose=False)  # noqa: E731
    prompt = [5, 6, 7, 8, 9, 10, 11]
    expected = mk().create_completion(prompt, max_tokens=3, temperature=0)
    cache = llamba.LlamaRAMCache()
    writer = mk()
    writer.set_cache(cache)
    writer.create_completion(prompt, max_tokens=3, temperature=0)
    assert len(cache.cache_state) == 1 and cache.cache_size > 0
    key = next(iter(cache.cache_state))
    assert list(key[:len(prompt)]) == prompt and prompt in cache
    cached = mk()
    cached.set_cache(cache)
    calls = []
    orig = cached.load_state
    cached.load_state = lambda st: (calls.append(st), orig(st))
    actual = cached.create_completion(prompt, max_tokens=3, temperature=0)
    assert len(calls) == 1
    assert actual["choices"][0]["text"] == expected["choices"][0]["text"]
    assert actual["usage"] == expected["usage"]
    # a longer prompt sharing the prefix: restored from the cache too, same output as fresh
    longer = prompt + [20, 21]
    fresh = mk().create_completion(longer, max_tokens=3, temperature=0)
    other = mk()
    other.set_cache(cache)
    assert other.create_completion(longer, max_tokens=3, temperature=0)["choices"][0]["text"] == \
        fresh["choices"][0]["text"]
    assert other.n_tokens > 0
    # nothing in common: a miss
    with pytest.raises(KeyError):
        cache[[300, 301]]
    # eviction by size
    assert len(cache.cache_state) == 2
    small = llamba.LlamaRAMCache(capacity_bytes=max(v.llama_state_size for v in cache.cache_state.values()) + 1)
    for k, v in list(cache.cache_state.items()):
        small[k] = v
    assert len(small.cache_state) == 1


def test_disk_cache(tmp_path, paths):
    p = paths["plain"]
    prompt = [5, 6, 7, 8, 9]
    expected = Llama(p, n_ctx=64, verbose=False).create_completion(prompt, max_tokens=3, temperature=0)
    writer = Llama(p, n_ctx=64, verbose=False)
    writer.set_cache(llamba.LlamaDiskCache(cache_dir=str(tmp_path / "c")))
    writer.create_completion(prompt, max_tokens=3, temperature=0)
    cache = llamba.LlamaDiskCache(cache_dir=str(tmp_path / "c"))  # a new process would see the same entries
    assert len(cache) == 1 and prompt in cache and cache.cache_size > 0
    reader = Llama(p, n_ctx=64, verbose=False)
    reader.set_cache(cache)
    assert reader.create_completion(prompt, max_tokens=3, temperature=0)["choices"][0]["text"] == \
        expected["choices"][0]["text"]
    assert reader.n_tokens >= len(prompt)


def test_chat_format_helpers():
    from llamba import llama_chat_format, llama_types
    msgs = [llama_types.ChatCompletionRequestUserMessage(role="user", content="Instruction"),
            llama_types.ChatCompletionRequestAssistantMessage(role="assistant", content="Model answer"),
            llama_types.ChatCompletionRequestUserMessage(role="user", content="Follow-up instruction")]
    r = llama_chat_format.format_mistral_instruct(messages=msgs)
    assert not r.added_special and r.stop == "</s>"
    assert "<s>" + r.prompt == "<s>[INST] Instruction [/INST]Model answer</s>[INST] Follow-up instruction [/INST]"
    cfg = {"bos_token": "<s>", "eos_token": "</s>",
           "chat_template": "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                            "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
                            "'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"}
    fmt = llama_chat_format.hf_tokenizer_config_to_chat_formatter(cfg)
    out = fmt(messages=[{"role": "user", "content": "Hello, world!"}])
    assert out.prompt == "<s>[INST] Hello, world! [/INST]</s>" and out.added_special
    j = llama_chat_format.Jinja2ChatFormatter(cfg["chat_template"], eos_token="</s>", bos_token="<s>")
    assert j(messages=[{"role": "user", "content": "x"}]).prompt == "<s>[INST] x [/INST]"
    assert llama_chat_format.get_chat_format("mistral-instruct") is llama_chat_format.format_mistral_instruct


def test_prompt_lookup_decoding(paths):
    from llamba.llama_speculative import LlamaPromptLookupDecoding
    f = LlamaPromptLookupDecoding.find_candidate_pred_tokens
    assert np.array_equal(f(np.array([1, 2, 3, 1, 2, 3, 1, 2, 3]), max_ngram_size=3, num_pred_tokens=2), [1, 2])
    assert np.array_equal(f(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9]), max_ngram_size=3, num_pred_tokens=2), [])
    plain = Llama(paths["plain"], n_ctx=128, verbose=False)
    spec = Llama(paths["plain"], n_ctx=128, verbose=False, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=4))
    assert spec.spec_options["spec"] == "ngram"
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    assert _greedy(spec, prompt, 10) == _greedy(plain, prompt, 10)
