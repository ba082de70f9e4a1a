"""Tool calls (issue 12): llamba.tools parsing for each format (whole and streamed, malformed text kept as content),
validation, message adaptation for templates, the constrained tool-call grammars; then end to end through the
official openai client against an in-process server: a tiny random qwen3 model with a Qwen-style `<tool_call>`
chat template, and SmolLM2-135M-Instruct (whose template has no tool syntax: the generic format). Each flow is
call -> tool result -> final answer; streamed delta.tool_calls assemble to the non-streamed calls."""
from __future__ import annotations

import json
import random
import socket
import threading
import time

import pytest

from llamba import Llama
from llamba.errors import ParameterError
from llamba.tools import (GENERIC_SYSTEM, ToolError, ToolStreamParser, adapt_messages, assemble, check_tool_choice,
                          check_tools, detect_format, parse_tool_calls, plan_tools, tool_grammar)
from tiny_models import QT, write_model

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

# A Qwen3-style template (written for this test): tools listed in the system turn inside <tools></tools>, past calls
# as <tool_call> blocks with `arguments | tojson` (so arguments must reach it as a dict), tool results as
# <tool_response> blocks in a user turn.
QWEN_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nFunction signatures inside <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nCall a function with <tool_call>\\n{\"name\": <name>, \"arguments\": <args>}\\n</tool_call>"
    "<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tc in message.tool_calls or [] %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' }}"
    "{{- tc.function.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "hour24": {"type": "boolean"}},
                   "required": ["city"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# ---------------------------------------------------------------- parsing (no model)

CALL_P = ("get_weather", '{"city": "Paris", "unit": "c"}')
CALL_R = ("get_time", '{"city":"Rome"}')
VALID = [  # (format, text, content, [(name, arguments text)])
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
     None, [CALL_P]),
    ("hermes", 'Let me look.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
     '</tool_call>\n<tool_call>\n{"name":"get_time","arguments":{"city":"Rome"}}\n</tool_call>\n',
     "Let me look.", [CALL_P, CALL_R]),
    ("hermes", '<tool_call>{"arguments": {"city": "Paris", "unit": "c"}, "name": "get_weather"}</tool_call>',
     None, [CALL_P]),
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"city": "a}\\"{b"}}\n</tool_call>',
     None, [("get_time", '{"city": "a}\\"{b"}')]),
    ("generic", 'ok <tool_call>\n{"name": "get_time", "arguments": {"city":"Rome"}}\n</tool_call>', "ok", [CALL_R]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', None, [CALL_P]),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; '
     '{"name": "get_time", "parameters": {"city":"Rome"}}', None, [CALL_P, CALL_R]),
    ("llama3", 'Checking. <|python_tag|>{"name": "get_time", "arguments": {"city":"Rome"}}', "Checking.", [CALL_R]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
     '{"name": "get_time", "arguments": {"city":"Rome"}}]', None, [CALL_P, CALL_R]),
    ("mistral", 'Sure [TOOL_CALLS]get_time[ARGS]{"city":"Rome"}', "Sure", [CALL_R]),
]
MALFORMED = [  # kept whole as content, no call
    ("hermes", "plain answer, no call"),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut by max_tokens
    ("hermes", '<tool_call>\n{"name": get_weather}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}} trailing</tool_call>'),
    ("hermes", "a < b and <tool_"),
    ("llama3", '{"city": "Paris"}'),
    ("llama3", "{ not json at all"),
    ("llama3", 'The answer is {"name": "x"}'),
    ("mistral", "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {}"),
    ("mistral", "[TOOL_CALLS] nonsense"),
]


def _pairs(calls):
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def _stream(fmt, text, rng, names=None):
    p = ToolStreamParser(fmt, names)
    deltas, i = [], 0
    while i < len(text):
        k = rng.randint(1, 9)
        deltas += p.feed(text[i:i + k])
        i += k
    deltas += p.finish()
    return deltas, p


@pytest.mark.parametrize("fmt,text,content,calls", VALID)
def test_parse_valid(fmt, text, content, calls):
    c, got = parse_tool_calls(text, fmt)
    assert c == content
    assert _pairs(got) == calls
    for call in got:
        assert call["id"].startswith("call_") and len(call["id"]) > 10 and call["type"] == "function"
        json.loads(call["function"]["arguments"])
    rng = random.Random(len(text))
    for _ in range(25):  # streamed in random pieces: the same content and calls
        deltas, p = _stream(fmt, text, rng)
        sc, scalls = assemble(deltas)
        assert (sc, _pairs(scalls)) == (content, calls)
        assert p.has_calls
        heads = [tc for d in deltas for tc in d.get("tool_calls", ()) if "id" in tc]
        assert [h["function"]["name"] for h in heads] == [n for n, _ in calls]  # name first, then fragments
        assert all(h["function"]["arguments"] == "" for h in heads)


@pytest.mark.parametrize("fmt,text", MALFORMED)
def test_parse_malformed_keeps_content(fmt, text):
    c, got = parse_tool_calls(text, fmt)
    assert c == text and got == []


@pytest.mark.parametrize("fmt,text,content,calls", VALID)
def test_truncated_text_never_crashes(fmt, text, content, calls):
    """Every prefix of a valid answer (a call cut by max_tokens) parses without error: either calls that are
    complete or the text as content; the streamed parser never reports a call the whole parse does not have."""
    for k in range(len(text)):
        c, got = parse_tool_calls(text[:k], fmt)
        if not got:
            assert c == text[:k]
        else:
            assert len(got) <= len(calls)
        deltas, p = _stream(fmt, text[:k], random.Random(k))
        sc, scalls = assemble(deltas)
        if got:
            assert _pairs(scalls) == _pairs(got)
        elif not scalls:
            assert sc == (text[:k] or None)


def test_stream_holds_back_marker_prefix():
    p = ToolStreamParser("hermes")
    assert p.feed("Hello <tool") == [{"content": "Hello"}]  # " <tool" could start a marker
    assert p.feed("box>") == [{"content": " <toolbox>"}]
    p = ToolStreamParser("mistral")
    assert p.feed("x [TOOL_") == [{"content": "x"}]
    assert p.finish() == [{"content": " [TOOL_"}]
    p = ToolStreamParser("llama3")
    assert p.feed('  {"na') == []  # a call may be starting
    assert p.finish() == [{"content": '  {"na'}]


def test_parse_unknown_function_and_parallel_limit():
    text = VALID[1][1]
    assert parse_tool_calls(text, "hermes", names={"get_weather"})[1] == []
    c, calls = parse_tool_calls(text, "hermes", max_calls=1)
    assert _pairs(calls) == [CALL_P]
    deltas, _ = _stream("hermes", text, random.Random(0))
    p = ToolStreamParser("hermes", max_calls=1)
    out = p.feed(text) + p.finish()
    assert _pairs(assemble(out)[1]) == [CALL_P]


def test_detect_format():
    assert detect_format(QWEN_TEMPLATE) == "hermes"
    assert detect_format("{% for m in messages %}[INST]{{ m.content }}{% endfor %}[TOOL_CALLS]") == "mistral"
    assert detect_format("<|start_header_id|>{{ tools }} \"parameters\"") == "llama3"
    assert detect_format("{{ '<|python_tag|>' }}") == "llama3"
    from llamba.chat import BUILTIN_TEMPLATES
    assert detect_format(BUILTIN_TEMPLATES["chatml"][0]) == "generic"
    assert detect_format(None) == "generic"


@pytest.mark.parametrize("tools,choice,needle", [
    ("get_weather", None, "must be a list"),
    ([{"type": "function"}], None, "function must be an object"),
    ([{"type": "retrieval", "function": {"name": "a"}}], None, "type must be 'function'"),
    ([{"type": "function", "function": {"name": "has space"}}], None, "function.name"),
    ([{"type": "function", "function": {"name": "a", "parameters": "x"}}], None, "parameters must be"),
    ([WEATHER, WEATHER], None, "defined twice"),
    (TOOLS, "sometimes", "tool_choice must be"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not in 'tools'"),
    (TOOLS, {"type": "function"}, "tool_choice as an object"),
    (None, "required", "needs 'tools'"),
    (TOOLS, 3, "string or an object"),
])
def test_validation(tools, choice, needle):
    with pytest.raises(ToolError, match=needle) as e:
        plan_tools(None, tools, choice)
    assert isinstance(e.value, ParameterError)
    with pytest.raises(ToolError, match="parallel_tool_calls"):
        plan_tools(None, TOOLS, None, "yes")


def test_tool_choice_modes():
    ts = check_tools(TOOLS)
    assert check_tool_choice(None, ts) == ("auto", None)
    assert check_tool_choice(None, []) == ("none", None)
    assert check_tool_choice("none", ts) == ("none", None)
    assert check_tool_choice("required", ts) == ("required", None)
    assert check_tool_choice({"type": "function", "function": {"name": "get_time"}}, ts) == ("required", "get_time")
    assert check_tools([{"type": "function", "function": {"name": "f"}}])[0]["function"]["parameters"] == \
        {"type": "object", "properties": {}}
    p = plan_tools(QWEN_TEMPLATE, TOOLS, "none")
    assert not p.active and p.template_tools() is None


def test_adapt_messages():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Rome"}'}}
    msgs = [{"role": "user", "content": "time?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
            {"role": "tool", "tool_call_id": "call_2", "content": "13:00"}]
    native = adapt_messages(msgs, "hermes")
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'  # the caller's copy untouched
    assert native[2]["role"] == "tool" and len(native) == 4
    gen = adapt_messages(msgs, "generic", check_tools(TOOLS))
    assert gen[0]["role"] == "system" and "<tools>" in gen[0]["content"] and '"get_weather"' in gen[0]["content"]
    assert gen[2] == {"role": "assistant",
                      "content": '<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>'}
    assert gen[3] == {"role": "user", "content": "<tool_response>\n12:00\n</tool_response>\n<tool_response>\n"
                                                 "13:00\n</tool_response>"}
    gen = adapt_messages([{"role": "system", "content": "Be brief."}] + msgs, "generic", check_tools(TOOLS))
    assert gen[0]["content"].startswith("Be brief.\n\n" + GENERIC_SYSTEM.split("{tools}")[0])
    with pytest.raises(ToolError, match="tool_calls"):
        adapt_messages([{"role": "assistant", "content": "", "tool_calls": [{"function": "x"}]}], "hermes")


# ---------------------------------------------------------------- models

N_CTX = 2048


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tools") / "tiny-qwen3-tools.gguf")
    write_model(path, "qwen3", qtype=QT.Q8_0, n_ctx=N_CTX, seed=3, tied=False, chat_template=QWEN_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def qwen(qwen_path):
    return Llama(qwen_path, n_ctx=N_CTX, n_threads=2, verbose=False, seed=1)


class InProcessServer:
    def __init__(self, llm):
        from llamba.server import make_server
        self.srv = make_server(llm, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()
        port = self.srv.server_address[1]
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        self.base = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", timeout=600, max_retries=0)

    def close(self):
        self.srv.shutdown()
        self.thread.join(10)
        self.srv.server_close()


@pytest.fixture(scope="module")
def qwen_server(qwen):
    s = InProcessServer(qwen)
    yield s
    s.close()


@pytest.mark.parametrize("fmt", ["hermes", "generic", "llama3", "mistral"])
def test_tool_grammar_admits_only_valid_calls(qwen, fmt):
    from llamba.constrain import compile_constraint
    tk = qwen.tokenizer
    for name, parallel in ((None, True), ("get_time", False)):
        c = compile_constraint(tk, "lark", tool_grammar(fmt, check_tools(TOOLS), name, parallel, tk))
        good = {"hermes": '<tool_call>\n{"name":"get_time","arguments":{"city":"Rome"}}\n</tool_call>',
                "llama3": '{"name":"get_time","parameters":{"city":"Rome"}}',
                "mistral": '[TOOL_CALLS][{"name":"get_time","arguments":{"city":"Rome"}}]'}[
            "hermes" if fmt == "generic" else fmt]
        ids = tk.encode(good, add_bos=False, special=False)
        m = c.matcher()
        assert m.valid_prefix(ids) == len(ids)
        for t in ids:
            m.accept(t)
        assert m.is_accepting()
        bad = good.replace('"Rome"', "7")  # city must be a string
        ids = tk.encode(bad, add_bos=False, special=False)
        assert c.matcher().valid_prefix(ids) < len(ids)
        if name is not None:  # the named function only
            other = good.replace("get_time", "get_weather")
            ids = tk.encode(other, add_bos=False, special=False)
            assert c.matcher().valid_prefix(ids) < len(ids)


def test_qwen_template_round_trip(qwen):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Rome"}'}}
    msgs = [{"role": "user", "content": "time in Rome?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    toks, plan = qwen.chat_prompt(msgs, TOOLS, "auto")
    text = qwen.detokenize(toks, special=True).decode()
    assert plan.fmt == "hermes" and plan.active
    assert '"name": "get_weather"' in text and "<tools>" in text  # the template rendered the tools
    assert '<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>' in text  # a dict
    assert "<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>" in text
    toks_none, plan = qwen.chat_prompt(msgs, TOOLS, "none")
    assert "<tools>" not in qwen.detokenize(toks_none, special=True).decode()


def _check_calls(calls, only=None):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert c.function.name in SCHEMAS and (only is None or c.function.name == only)
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def _streamed(client, **kw):
    """(content, [(name, arguments)], ids, finish_reason) per choice index, assembled from a stream."""
    out = {}
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            o = out.setdefault(c.index, {"content": "", "calls": {}, "finish": None})
            o["content"] += c.delta.content or ""
            for tc in c.delta.tool_calls or ():
                call = o["calls"].setdefault(tc.index, {"id": None, "name": None, "args": ""})
                if tc.id:
                    assert call["id"] is None and tc.function.name and tc.function.arguments == ""
                    call["id"], call["name"] = tc.id, tc.function.name
                call["args"] += tc.function.arguments or ""
            if c.finish_reason:
                o["finish"] = c.finish_reason
    return {i: (o["content"] or None, [(c["name"], c["args"]) for _, c in sorted(o["calls"].items())],
                [c["id"] for _, c in sorted(o["calls"].items())], o["finish"]) for i, o in out.items()}


def _flow(client, first_msgs, tool_choice, seed, only=None, parallel=None, max_tokens=200, model="m"):
    """call -> tool result -> final answer; the call's stream equals it; returns (first response, final)."""
    kw = dict(model=model, messages=first_msgs, tools=TOOLS, tool_choice=tool_choice, max_tokens=max_tokens,
              seed=seed, temperature=0.8)
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    r = client.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    _check_calls(ch.message.tool_calls, only)
    if parallel is False:
        assert len(ch.message.tool_calls) == 1
    s = _streamed(client, **kw)[0]
    assert s[0] == ch.message.content and s[3] == "tool_calls"
    assert s[1] == [(c.function.name, c.function.arguments) for c in ch.message.tool_calls]
    assert len(set(s[2])) == len(s[2]) and all(i.startswith("call_") for i in s[2])
    msgs = list(first_msgs) + [ch.message]  # the message object itself, as openai users append it
    for c in ch.message.tool_calls:
        msgs.append({"role": "tool", "tool_call_id": c.id, "content": json.dumps({"result": c.function.name})})
    final = client.chat.completions.create(model=model, messages=msgs, tools=TOOLS, tool_choice="none",
                                           max_tokens=20, seed=seed)
    f = final.choices[0]
    assert f.finish_reason in ("stop", "length") and f.message.tool_calls is None
    assert isinstance(f.message.content, str)
    bare = client.chat.completions.create(model=model, messages=first_msgs, tools=TOOLS, tool_choice="none",
                                          max_tokens=1)
    n_calls = sum(len(c.function.arguments) for c in ch.message.tool_calls)
    assert final.usage.prompt_tokens > bare.usage.prompt_tokens + n_calls // 8  # the calls and results are in it
    return r, final


def test_qwen_flow_required_and_named(qwen_server):
    c = qwen_server.client
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    _flow(c, msgs, "required", seed=1, parallel=False)
    _flow(c, msgs, {"type": "function", "function": {"name": "get_time"}}, seed=2, only="get_time")


def test_qwen_parallel_calls_and_n(qwen, qwen_server):
    """parallel_tool_calls: several calls come (each valid; end-of-generation is biased down so that the random
    model goes on to a further call, the grammar still ends it after at most MAX_PARALLEL); n=3 choices, each
    streamed as its own, equal to the non-streamed choices with the same seed."""
    c = qwen_server.client
    msgs = [{"role": "user", "content": "weather and time in Oslo?"}]
    counts = []
    bias = {str(t): -2.0 for t in qwen.tokenizer.eog_ids}
    kw = dict(model="m", messages=msgs, tools=TOOLS, tool_choice="required", max_tokens=600, temperature=1.0,
              n=3, parallel_tool_calls=True, logit_bias=bias)
    for seed in (0,):
        r = c.chat.completions.create(seed=seed, **kw)
        assert [ch.index for ch in r.choices] == [0, 1, 2]
        s = _streamed(c, seed=seed, **kw)
        assert sorted(s) == [0, 1, 2]
        for ch in r.choices:
            if ch.finish_reason != "tool_calls":
                assert ch.finish_reason == "length"
                continue
            _check_calls(ch.message.tool_calls)
            counts.append(len(ch.message.tool_calls))
            assert s[ch.index][1] == [(t.function.name, t.function.arguments) for t in ch.message.tool_calls]
        assert len({json.dumps(ch.message.model_dump(exclude={"tool_calls"}) |
                               {"calls": [t.function.model_dump() for t in ch.message.tool_calls or []]})
                    for ch in r.choices}) > 1  # the choices differ
    print("calls per choice:", counts)
    assert counts and max(counts) > 1, counts  # a random model under the grammar makes several calls sometimes


def test_qwen_auto_unconstrained(qwen, qwen_server):
    """auto: no constraint; the random model's text comes back as content (or, if it happens to be a call, as a
    call), streamed equal to non-streamed; the library gives the same answer."""
    c = qwen_server.client
    msgs = [{"role": "user", "content": "hello"}]
    kw = dict(model="m", messages=msgs, tools=TOOLS, max_tokens=30, seed=5)
    r = c.chat.completions.create(**kw)
    ch = r.choices[0]
    s = _streamed(c, **kw)[0]
    lib = qwen.create_chat_completion(msgs, tools=TOOLS, max_tokens=30, seed=5)["choices"][0]
    if ch.message.tool_calls:
        assert ch.finish_reason == "tool_calls"
    else:
        assert ch.finish_reason in ("stop", "length") and s[1] == []
        assert s[0] == ch.message.content == lib["message"]["content"]


def test_bad_tool_requests_are_400(qwen_server):
    c = qwen_server.client
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "nope"),
        (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "name"),
        (dict(tools=[{"type": "function"}]), "function"),
        (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
        (dict(tool_choice="required"), "needs 'tools'"),
        (dict(tools=TOOLS, tool_choice="required",
              response_format={"type": "json_object"}), "cannot be combined"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
              tool_choice="required"), "(?i)schema"),
        (dict(n=0), "n"),
        (dict(extra_body={"parallel_tool_calls": "yes"}, tools=TOOLS), "parallel_tool_calls"),
    ]
    for kw, needle in cases:
        with pytest.raises(openai.BadRequestError, match=needle):
            c.chat.completions.create(model="m", messages=msgs, max_tokens=5, **kw)
    bad_msgs = msgs + [{"role": "assistant", "content": None, "tool_calls": [{"id": "x", "type": "function"}]}]
    with pytest.raises(openai.BadRequestError, match="tool_calls"):
        c.chat.completions.create(model="m", messages=bad_msgs, max_tokens=5)
    r = c.chat.completions.create(model="m", messages=msgs, max_tokens=3, seed=1)  # still serving
    assert r.choices[0].finish_reason in ("stop", "length")


def test_library_n_and_seeds(qwen):
    msgs = [{"role": "user", "content": "hi"}]
    r = qwen.create_chat_completion(msgs, max_tokens=12, seed=7, n=3, temperature=1.0)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for j in range(3):  # choice j is the seed + j generation
        one = qwen.create_chat_completion(msgs, max_tokens=12, seed=7 + j, temperature=1.0)
        assert one["choices"][0]["message"] == r["choices"][j]["message"]
    chunks = list(qwen.create_chat_completion(msgs, max_tokens=12, seed=7, n=3, temperature=1.0, stream=True))
    for j in range(3):
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"][0]["index"] == j)
        assert text == r["choices"][j]["message"]["content"]
    assert r["usage"]["completion_tokens"] >= 3
    with pytest.raises(ParameterError, match="n"):
        qwen.create_chat_completion(msgs, max_tokens=2, n=0)


# ---------------------------------------------------------------- SmolLM2-135M-Instruct (generic format)

@pytest.fixture(scope="module")
def smol_server(smollm2):
    llm = Llama(str(smollm2), n_ctx=N_CTX, n_threads=2, verbose=False, seed=0)
    s = InProcessServer(llm)
    s.llm = llm
    yield s
    s.close()


@pytest.mark.slow
def test_smollm2_tools_required_and_named(smol_server):
    """SmolLM2's template has no tool syntax: the tools go into the system prompt (generic format); required and
    a named function are constrained, so they always yield a valid call; then the tool's result and an answer."""
    c = smol_server.client
    msgs = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    r, final = _flow(c, msgs, "required", seed=0, parallel=False, max_tokens=60)
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    _flow(c, [{"role": "user", "content": "What time is it in Rome?"}],
          {"type": "function", "function": {"name": "get_time"}}, seed=0, only="get_time", max_tokens=60)


@pytest.mark.slow
def test_smollm2_tools_auto(smol_server):
    """auto, unconstrained: with two earlier calls in the conversation (few-shot), greedy SmolLM2 writes a
    <tool_call> block, which is parsed into a call; streamed the same."""
    def shot(city, i):
        return [{"role": "user", "content": f"What is the weather in {city}?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": f"call_{i}", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    msgs = shot("Rome", 1) + shot("Oslo", 2) + [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="m", messages=msgs, tools=tools, tool_choice="auto", max_tokens=40, temperature=0)
    r = smol_server.client.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    assert [(t.function.name, json.loads(t.function.arguments)) for t in ch.message.tool_calls] == \
        [("get_weather", {"city": "Paris"})]
    s = _streamed(smol_server.client, **kw)[0]
    assert s[1] == [(t.function.name, t.function.arguments) for t in ch.message.tool_calls] and s[3] == "tool_calls"


@pytest.mark.slow
def test_smollm2_schemas_validate(smollm2):
    """bench_schemas' generator, 20 schemas: every output that ended (not cut by max_tokens) validates."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "bench_schemas", os.path.join(os.path.dirname(__file__), "..", "bench", "bench_schemas.py"))
    bs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bs)
    llm = Llama(str(smollm2), n_ctx=N_CTX, n_threads=2, verbose=False, seed=0)
    res = bs.run_schemas(llm, n=20, seed=0, max_tokens=256)
    assert res["stop"] >= 15, res
    assert res["invalid"] == 0, res["failures"]
    assert res["valid"] == res["stop"]
