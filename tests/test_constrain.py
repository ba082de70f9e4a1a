"""Structured output (llamba.constrain, issue 12): JSON-schema / json_object / GBNF / regex constraints through
llguidance. A tiny random model writes garbage, but under a constraint it must be garbage that parses and validates:
that is the check. Also: the batching engine (constrained and unconstrained requests together; the unconstrained
ones are unchanged), speculative decoding under a constraint equals plain decoding, bad inputs -> ParameterError,
the server (openai client: valid JSON back, a bad response_format -> 400) and `llamba run --json-schema`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from llamba import Llama
from llamba.chat import BUILTIN_TEMPLATES
from llamba.errors import ParameterError
from llamba.sampling import Sampler, SamplingParams
from tiny_models import QT, write_model

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "models", "tiny-qwen35-mtp-q8_0.gguf")

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                                      "n": {"type": "integer", "minimum": 10, "maximum": 20}},
     "required": ["n"], "additionalProperties": False},
]

RF = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": SCHEMAS[0]}}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("constrain") / "tiny-chat.gguf")
    write_model(path, "llama", qtype=QT.Q8_0, n_ctx=1024, seed=1, tied=False,
                chat_template=BUILTIN_TEMPLATES["chatml"][0])
    return path


@pytest.fixture(scope="module")
def llm(tiny_path):
    return Llama(tiny_path, n_ctx=1024, verbose=False, seed=1)


def _text(r):
    return r["choices"][0]["text"], r["choices"][0]["finish_reason"]


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_schema_outputs_validate(llm, i):
    schema = SCHEMAS[i]
    rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
    ended = 0
    for seed in range(3):
        text, fin = _text(llm.create_completion("data:", max_tokens=120, seed=seed, temperature=1.0, top_k=0,
                                                top_p=1.0, min_p=0.0, response_format=rf))
        if fin == "stop":
            ended += 1
            jsonschema.validate(json.loads(text), schema)
        else:  # cut by max_tokens: still a prefix of valid JSON
            assert text[:1] in "{[", text
    assert ended >= 1


def test_json_object_and_chat(llm):
    for seed in range(3):
        text, fin = _text(llm.create_completion("x", max_tokens=100, seed=seed, temperature=1.0,
                                                response_format={"type": "json_object"}))
        if fin == "stop":
            assert isinstance(json.loads(text), dict)
    r = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=100, seed=3, response_format=RF)
    msg = r["choices"][0]
    if msg["finish_reason"] == "stop":
        jsonschema.validate(json.loads(msg["message"]["content"]), SCHEMAS[0])
    chunks = list(llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=100, seed=3,
                                             response_format=RF, stream=True))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == msg["message"]["content"]
    r = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=5, seed=3,
                                   response_format={"type": "text"})
    assert r["choices"][0]["finish_reason"] in ("stop", "length")


class LlamaGrammarLike:  # llama-cpp-python's LlamaGrammar keeps its GBNF text in ._grammar
    def __init__(self, text):
        self._grammar = text


def test_gbnf_yes_no_and_regex(llm):
    g = 'root ::= answer\nanswer ::= "yes" | "no"\n'
    seen = set()
    for seed in range(6):
        text, fin = _text(llm.create_completion("q?", max_tokens=20, seed=seed, temperature=1.5, grammar=g))
        assert fin == "stop" and text in ("yes", "no")
        seen.add(text)
    text, fin = _text(llm.create_completion("q?", max_tokens=20, seed=0, grammar=LlamaGrammarLike(g)))
    assert text in ("yes", "no")
    from llamba.constrain import compile_constraint
    c = compile_constraint(llm.tokenizer, "regex", r"[0-9]{3}-[a-z]{2}")
    m = c.matcher()
    rng = np.random.default_rng(0)
    s = Sampler(SamplingParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1))
    s.constraint = m
    out = []
    for _ in range(20):
        t = s.sample_and_accept(rng.standard_normal(llm.n_vocab()).astype(np.float32))
        if llm.tokenizer.is_eog(t):
            break
        out.append(t)
    import re
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", llm.detokenize(out).decode()), llm.detokenize(out)
    assert m.is_done()


def test_matcher_api(llm):
    from llamba.constrain import compile_constraint
    c = compile_constraint(llm.tokenizer, "gbnf", 'root ::= "yes" | "no"')
    assert compile_constraint(llm.tokenizer, "gbnf", 'root ::= "yes" | "no"') is c  # cached
    m = c.matcher()
    yes = llm.tokenize(b"yes", add_bos=False)
    no = llm.tokenize(b"no", add_bos=False)
    assert m.valid_prefix(yes) == len(yes)
    assert m.valid_prefix(no + yes) == len(no)
    row = np.zeros(llm.n_vocab(), dtype=np.float32)
    m.mask(row)
    allowed = np.nonzero(np.isfinite(row))[0].tolist()
    assert yes[0] in allowed and no[0] in allowed and len(allowed) < 10
    for t in yes:
        m.accept(t)
    assert m.is_accepting()
    m.rollback(len(yes))
    for t in no:
        m.accept(t)
    row = np.zeros(llm.n_vocab(), dtype=np.float32)
    m.mask(row)
    assert all(llm.tokenizer.is_eog(int(t)) for t in np.nonzero(np.isfinite(row))[0])
    cl = m.clone()
    assert cl.is_accepting()


def test_unconstrained_numbers_unchanged(llm):
    """No constraint: the sampler's code path and results are what they were (the attribute stays None)."""
    s = Sampler(SamplingParams(temp=0.8, seed=5))
    assert s.constraint is None
    row = np.random.default_rng(1).standard_normal(llm.n_vocab()).astype(np.float32)
    keep = row.copy()
    a = [s.clone().sample(row) for _ in range(3)]
    assert np.array_equal(row, keep) and len(set(a)) == 1
    from llamba.constrain import compile_constraint
    s2 = Sampler(SamplingParams(temp=0.8, seed=5))
    s2.constraint = compile_constraint(llm.tokenizer, "json_object", "").matcher()
    s2.sample(row)
    assert np.array_equal(row, keep)  # the caller's row is never masked in place


@pytest.mark.parametrize("bad", [
    dict(response_format={"type": "sound"}),
    dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}),
    dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}),
    dict(response_format={"type": "json_schema", "json_schema": "nope"}),
    dict(response_format="json"),
    dict(grammar='root ::= "unterminated'),
    dict(grammar="root ::= undefined-rule"),
    dict(grammar='root ::= "a"', response_format={"type": "json_object"}),
])
def test_bad_inputs_are_parameter_errors(llm, bad):
    with pytest.raises(ParameterError) as ei:
        llm.create_completion("x", max_tokens=4, **bad)
    assert "\n" not in str(ei.value) and str(ei.value)
    if "response_format" in bad and "grammar" not in bad:
        with pytest.raises(ParameterError):
            llm.create_chat_completion([{"role": "user", "content": "x"}], max_tokens=4, **bad)


def test_engine_mixed_batch(tiny_path):
    """Llama(n_parallel=4): constrained and unconstrained requests at once; the unconstrained ones equal their
    outputs alone, the constrained ones validate (and equal their own outputs alone)."""
    single = Llama(tiny_path, n_ctx=1024, verbose=False, seed=1)
    llm = Llama(tiny_path, n_ctx=4096, verbose=False, seed=1, n_parallel=4)
    try:
        jobs = [("hello world", None), ("the quick brown fox", RF), ("a b c", None),
                ("once upon", {"type": "json_object"}), ("zz", RF), ("more text here", None)]
        kw = dict(max_tokens=60, temperature=0.9, seed=7)
        want = [single.create_completion(p, response_format=rf, **kw)["choices"][0] for p, rf in jobs]
        out = [None] * len(jobs)

        def work(i):
            p, rf = jobs[i]
            out[i] = llm.create_completion(p, response_format=rf, **kw)["choices"][0]

        ths = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        assert [o["text"] for o in out] == [w["text"] for w in want]
        for (p, rf), o in zip(jobs, out):
            if rf is not None and o["finish_reason"] == "stop":
                v = json.loads(o["text"])
                if rf is RF:
                    jsonschema.validate(v, SCHEMAS[0])
    finally:
        llm.close()


@pytest.mark.skipif(not os.path.exists(FIXTURE), reason="tiny MTP fixture missing")
@pytest.mark.parametrize("spec", ["mtp", "ngram"])
def test_speculative_under_constraint_equals_plain(spec):
    """Drafts are cut at the first token the grammar forbids; the output equals plain decoding, token for token
    (one-caller path and the engine)."""
    rf = {"type": "json_schema", "json_schema": {"schema": SCHEMAS[3]}}
    plain = Llama(FIXTURE, n_ctx=512, verbose=False)
    sp = Llama(FIXTURE, n_ctx=512, verbose=False, spec=spec, draft_max=3)
    kw = dict(max_tokens=40, temperature=0.0, response_format=rf)
    for p in ("hello", "data: {"):
        a = plain.create_completion(p, **kw)["choices"][0]
        b = sp.create_completion(p, **kw)["choices"][0]
        assert a == b
        if a["finish_reason"] == "stop":
            jsonschema.validate(json.loads(a["text"]), SCHEMAS[3])
    eng = Llama(FIXTURE, n_ctx=2048, verbose=False, spec=spec, draft_max=3, n_parallel=2)
    try:
        for p in ("hello", "data: {"):
            assert eng.create_completion(p, **kw)["choices"][0]["text"] == plain.create_completion(p, **kw)[
                "choices"][0]["text"]
    finally:
        eng.close()


def test_cli_json_schema_and_grammar(tiny_path, tmp_path):
    sf = tmp_path / "s.json"
    sf.write_text(json.dumps(SCHEMAS[3]))
    gf = tmp_path / "g.gbnf"
    gf.write_text('root ::= "yes" | "no"\n')
    base = [sys.executable, "-m", "llamba.cli", "run", "-m", tiny_path, "-p", "hi", "-n", "80", "--seed", "2"]
    r = subprocess.run(base + ["--json-schema", str(sf)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout.strip()), SCHEMAS[3])
    r = subprocess.run(base + ["--grammar-file", str(gf)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() in ("yes", "no"), r.stderr
    gf.write_text('root ::= "yes\n')
    r = subprocess.run(base + ["--grammar-file", str(gf)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("llamba: error: invalid grammar"), r.stderr


def test_server_response_format(tiny_path):
    openai = pytest.importorskip("openai")
    from test_server import Server
    s = Server(tiny_path)
    try:
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", timeout=120, max_retries=0)
        msgs = [{"role": "user", "content": "give me a person"}]
        r = c.chat.completions.create(model="m", messages=msgs, max_tokens=120, seed=1, response_format=RF)
        if r.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[0])
        else:
            assert r.choices[0].message.content.startswith("{")
        parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="m", messages=msgs, max_tokens=120, seed=1, response_format=RF, stream=True) if ch.choices]
        assert "".join(parts) == r.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="sound"):
            c.chat.completions.create(model="m", messages=msgs, max_tokens=5, response_format={"type": "sound"})
        with pytest.raises(openai.BadRequestError, match="(?i)schema"):
            c.chat.completions.create(model="m", messages=msgs, max_tokens=5, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}})
        r = c.completions.create(model="m", prompt="x", max_tokens=20, seed=1,
                                 extra_body={"grammar": 'root ::= "yes" | "no"'})
        assert r.choices[0].text in ("yes", "no")
        st, body = s.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 5, "grammar": "root ::= ("})
        assert st == 400 and "grammar" in body["error"]["message"]
        assert c.models.list().data  # still serving
    finally:
        s.stop()


@pytest.mark.slow
def test_smollm2_json_schema(smollm2):
    """The real model under a schema: the answer parses and validates (greedy; a bounded schema so it ends)."""
    llm = Llama(str(smollm2), n_ctx=1024, n_threads=2, verbose=False, seed=0)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "city": {"enum": ["Paris", "London", "Tokyo"]}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Describe a fictional person as JSON with name, age and city."}]
    r = llm.create_chat_completion(msgs, max_tokens=60, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    ch = r["choices"][0]
    assert ch["finish_reason"] == "stop", ch
    jsonschema.validate(json.loads(ch["message"]["content"]), schema)
