"""`llamba serve` on FastAPI/uvicorn, the parts the stdlib server did not have: tokenizer endpoints in llama-server's
and vLLM's shapes, /tokenizer_info, CORS, /metrics, /health slots, lists of prompts / token-id prompts / n > 1,
echo + logprobs in OpenAI's layout (checked against the library's own logits), hostile bodies (deep JSON, lone
surrogates, NaN, huge or slow bodies), slow readers and idle sockets, template errors; and the concurrency contract
with the engine (`llm.concurrent`, slots, queue, cancellation) on a stand-in model in process."""
from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time

import numpy as np
import pytest

from llamba import Llama
from llamba.chat import BUILTIN_TEMPLATES
from test_server import N_CTX, Server, openai  # (openai: imported on first use)
from tiny_models import write_model

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("asgi_model")
    return str(write_model(d / "tiny-chat.gguf", "llama", n_ctx=N_CTX, seed=1, tied=False,
                           chat_template=BUILTIN_TEMPLATES["chatml"][0]))


@pytest.fixture(scope="module")
def server(model):
    s = Server(model, "--stream-buffer", "65536", "--read-timeout", "3")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm(model):
    return Llama(model, n_ctx=N_CTX, n_threads=1, verbose=False)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", timeout=120, max_retries=0)


def _raw(port, data: bytes, timeout=30, rcvbuf=None) -> bytes:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, body = out.partition(b"\r\n\r\n")
                m = re.search(rb"content-length: (\d+)", head, re.I)
                if m and len(body) >= int(m.group(1)):
                    break
        return out
    finally:
        s.close()


def _post_raw(port, path, body: bytes, extra=b"") -> tuple[int, dict | None]:
    req = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra +
           b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    out = _raw(port, req)
    head, _, payload = out.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, None


def _sse(server, path, body) -> list:
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
        events = [line[6:] for line in r.read().decode().split("\n") if line.startswith("data: ")]
    finally:
        c.close()
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


# ---------------------------------------------------------------- tokenizer endpoints

def test_tokenize_detokenize_both_shapes(server, llm):
    text = "Hello world, the sea"
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)
    ids_nobos = llm.tokenize(text.encode(), add_bos=False, special=True)
    for path in ("/tokenize", "/v1/tokenize"):
        # llama-server: {"content"} -> {"tokens"}, add_special defaults to false
        st, out = server.request("POST", path, {"content": text})
        assert st == 200 and out["tokens"] == ids_nobos
        st, out = server.request("POST", path, {"content": text, "add_special": True, "with_pieces": True})
        assert st == 200 and [p["id"] for p in out["tokens"]] == ids
        assert "".join(p["piece"] for p in out["tokens"] if isinstance(p["piece"], str)).endswith("the sea")
        # vLLM: {"prompt", "add_special_tokens" (default true)} -> {"tokens", "count", "max_model_len"}
        st, out = server.request("POST", path, {"prompt": text})
        assert st == 200 and out["tokens"] == ids and out["count"] == len(ids) and out["max_model_len"] == N_CTX
        st, out = server.request("POST", path, {"prompt": text, "add_special_tokens": False})
        assert out["tokens"] == ids_nobos
    # the eos token's text tokenizes to the eos id (lm-evaluation-harness's RemoteTokenizer.eos_token_id)
    st, info = server.request("GET", "/tokenizer_info")
    assert st == 200 and info["eos_token"]
    st, out = server.request("POST", "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
    assert out["tokens"] == [llm.token_eos()]
    # chat messages (vLLM's chat form): the prompt the chat endpoint would run
    msgs = [{"role": "user", "content": "hi"}]
    st, out = server.request("POST", "/tokenize", {"messages": msgs})
    assert st == 200 and out["tokens"] == llm.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    for path in ("/detokenize", "/v1/detokenize"):
        st, out = server.request("POST", path, {"tokens": ids_nobos})
        assert st == 200 and out["prompt"] == text and out["content"] == text
    for bad in ({"tokens": [10 ** 9]}, {"tokens": [-1]}, {"tokens": "abc"}, {"tokens": [1.5]}):
        st, err = server.request("POST", "/detokenize", bad)
        assert st == 400 and "tokens" in err["error"]["message"], bad
    for bad in ({}, {"content": "a", "prompt": "b"}, {"content": 5}, {"prompt": "a", "bogus": 1}):
        st, err = server.request("POST", "/tokenize", bad)
        assert st == 400 and err["error"]["message"], bad


def test_tokenizer_info(server, llm):
    st, info = server.request("GET", "/tokenizer_info")
    assert st == 200
    for k in ("bos_token", "eos_token", "pad_token", "chat_template", "model_max_length", "tokenizer_class"):
        assert k in info
    assert info["model_max_length"] == N_CTX and info["chat_template"] == BUILTIN_TEMPLATES["chatml"][0]
    assert info["eos_token"] == llm.detokenize([llm.token_eos()], special=True).decode()
    assert server.request("GET", "/v1/tokenizer_info") == (200, info)


# ---------------------------------------------------------------- health, metrics, openapi

def test_health_metrics_openapi(server, client):
    st, h = server.request("GET", "/health")
    assert st == 200 and h["status"] == "ok" and h["slots_processing"] == 0 and h["slots_idle"] >= 1
    client.completions.create(model="x", prompt="The sea", max_tokens=4, temperature=0)
    server.request("POST", "/v1/completions", {"prompt": 5})
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    c.request("GET", "/metrics")
    r = c.getresponse()
    text = r.read().decode()
    assert r.status == 200 and r.getheader("content-type").startswith("text/plain")
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? '
                        r'(-?[0-9.]+(e[-+]?[0-9]+)?|NaN|[+-]Inf)$')
    values = {}
    for line in text.strip().split("\n"):
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* ", line), line
            continue
        assert sample.match(line), line
        name, v = line.rsplit(" ", 1)
        values[name] = float(v)
    assert values['llamba_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values['llamba_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    assert values["llamba_generation_tokens_total"] >= 4 and values["llamba_prompt_tokens_total"] > 0
    assert values["llamba_requests_waiting"] == 0 and values["llamba_slots_total"] == h["slots_idle"]
    assert "# TYPE llamba_requests_total counter" in text and "# TYPE llamba_requests_running gauge" in text
    st, spec = server.request("GET", "/openapi.json")
    assert st == 200 and spec["openapi"].startswith("3.")
    for p in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"):
        assert "requestBody" in spec["paths"][p]["post"], p


# ---------------------------------------------------------------- completions: prompts, n, echo + logprobs

def test_list_of_prompts_and_token_prompts(server, client, llm):
    prompts = ["The sea and", "Once upon a time", "An atom"]
    single = [client.completions.create(model="x", prompt=p, temperature=0, max_tokens=10).choices[0].text
              for p in prompts]
    r = client.completions.create(model="x", prompt=prompts, temperature=0, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1, 2] and [c.text for c in r.choices] == single
    ids = [llm.tokenize(p.encode(), add_bos=True, special=True) for p in prompts]
    assert r.usage.prompt_tokens == sum(map(len, ids))
    r2 = client.completions.create(model="x", prompt=ids, temperature=0, max_tokens=10)
    assert [c.text for c in r2.choices] == single
    r3 = client.completions.create(model="x", prompt=ids[1], temperature=0, max_tokens=10)
    assert r3.choices[0].text == single[1]
    # streamed: chunks of every choice, by index
    chunks = _sse(server, "/v1/completions", {"prompt": prompts, "temperature": 0, "max_tokens": 10,
                                               "stream": True, "stream_options": {"include_usage": True}})
    got = {}
    for ch in chunks[:-1]:
        c = ch["choices"][0]
        got[c["index"]] = got.get(c["index"], "") + c["text"]
    assert [got[i] for i in range(3)] == single
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert len({ch["id"] for ch in chunks}) == 1
    for bad in ([], [[]], ["a", [1]], [1, "a"], [[1], [10 ** 9]], [True], {"a": 1}):
        st, err = server.request("POST", "/v1/completions", {"prompt": bad})
        assert st == 400 and "prompt" in err["error"]["message"], bad


def test_n_choices_with_seeds(server, client):
    kw = dict(model="x", prompt="Once upon a time", temperature=1.0, top_p=1.0, max_tokens=12,
              extra_body={"top_k": 0, "min_p": 0.0})
    r = client.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for j, c in enumerate(r.choices):
        assert c.text == client.completions.create(seed=11 + j, **kw).choices[0].text
    assert len({c.text for c in r.choices}) > 1
    r2 = client.completions.create(n=2, seed=11, **dict(kw, prompt=["Once upon a time", "The sea"]))
    assert [c.index for c in r2.choices] == [0, 1, 2, 3]
    assert [c.text for c in r2.choices[:2]] == [c.text for c in r.choices[:2]]
    st, err = server.request("POST", "/v1/completions", {"prompt": "a", "n": 0})
    assert st == 400 and "n" in err["error"]["param"]
    st, err = server.request("POST", "/v1/completions", {"prompt": "a", "n": 2, "best_of": 5})
    assert st == 400 and "best_of" in err["error"]["message"]


def test_echo_logprobs_openai_layout(server, llm):
    """lm-evaluation-harness's request: token ids, echo, logprobs, max_tokens 1. Entry 0 has no logprob, entry i
    is log_softmax of the logits after tokens[:i] at tokens[i] (the library's eval_logits row i-1), the generated
    token follows; top_logprobs hold the top-n and the token itself."""
    ids = llm.tokenize(b"The sea and the sky are blue", add_bos=True, special=True)
    st, out = server.request("POST", "/v1/completions", {"prompt": [ids, ids[:4]], "max_tokens": 1,
                                                          "temperature": 0, "echo": True, "logprobs": 2})
    assert st == 200 and len(out["choices"]) == 2
    for c, pids in zip(out["choices"], (ids, ids[:4])):
        lp = c["logprobs"]
        n = len(pids) + 1
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        gen = int(np.argmax(llm.eval_logits(pids)[-1]))  # greedy: the argmax after the prompt
        full = pids + [gen]
        rows = llm.eval_logits(full)
        for i in range(1, n):
            ls = _log_softmax(rows[i - 1])
            assert lp["token_logprobs"][i] == pytest.approx(ls[full[i]], abs=1e-4), i
            top = lp["top_logprobs"][i]
            assert max(top.values()) == pytest.approx(ls.max(), abs=1e-4)
            assert 1 <= len(top) <= 3  # top 2 and the token itself (ids with the same text share a key)
        # the generated token is the greedy one: lm-eval's is_greedy check holds for it
        assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()), abs=1e-6)
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
        assert c["text"].startswith(llm.detokenize(pids).decode("utf-8", "replace"))
    assert out["usage"]["completion_tokens"] == 2
    # max_tokens 0 with echo: the prompt scored, nothing generated
    st, out = server.request("POST", "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True,
                                                          "logprobs": 0})
    lp = out["choices"][0]["logprobs"]
    assert st == 200 and len(lp["token_logprobs"]) == len(ids) and out["usage"]["completion_tokens"] == 0
    rows = llm.eval_logits(ids)
    assert lp["token_logprobs"][1:] == pytest.approx([_log_softmax(rows[i - 1])[ids[i]] for i in range(1, len(ids))],
                                                     abs=1e-4)
    st, err = server.request("POST", "/v1/completions", {"prompt": ids, "max_tokens": 0})
    assert st == 400 and "max_tokens" in err["error"]["message"]
    # a text prompt with echo: its text comes back verbatim, the offsets index into it
    prompt = "The sea and the sky"
    st, out = server.request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0,
                                                          "echo": True, "logprobs": 1})
    c = out["choices"][0]
    assert c["text"].startswith(prompt)
    toks = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    assert len(c["logprobs"]["tokens"]) == len(toks) + out["usage"]["completion_tokens"]
    offs = c["logprobs"]["text_offset"]
    assert offs[len(toks)] == len(prompt)
    # echo without logprobs, streamed: the prompt first, then the continuation
    chunks = _sse(server, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True,
                                               "stream": True})
    assert chunks[0]["choices"][0]["text"] == prompt
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == c["text"]


def test_chat_usage_and_cached_tokens(client):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the sea."}]
    r1 = client.chat.completions.create(model="x", messages=msgs, temperature=0, max_tokens=4)
    r2 = client.chat.completions.create(model="x", messages=msgs, temperature=0, max_tokens=4)
    assert r2.usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its prefix was cached
    assert r1.choices[0].message.content == r2.choices[0].message.content


def test_embeddings_token_ids_and_limits(model, llm):
    """Embedding inputs as OpenAI allows them (strings, token ids, lists of either); an input longer than the batch
    is a 400, never a silent truncation; token ids that are not this tokenizer's output of any text are refused."""
    s = Server(model, "--pooling", "mean", "-b", "64")
    try:
        texts = ["the sea and the sky", "an atom"]
        st, ref = s.request("POST", "/v1/embeddings", {"input": texts})
        assert st == 200 and [d["index"] for d in ref["data"]] == [0, 1]
        ids = [llm.tokenize(t.encode()) for t in texts]
        st, out = s.request("POST", "/v1/embeddings", {"input": ids})
        assert st == 200 and out["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
        for a, b in zip(out["data"], ref["data"]):
            assert np.allclose(a["embedding"], b["embedding"], atol=1e-6)
        st, one = s.request("POST", "/v1/embeddings", {"input": ids[1]})
        assert st == 200 and np.allclose(one["data"][0]["embedding"], ref["data"][1]["embedding"], atol=1e-6)
        st, err = s.request("POST", "/v1/embeddings", {"input": "word " * 200})
        assert st == 400 and "64" in err["error"]["message"] and err["error"]["code"] == "context_length_exceeded"
        st, err = s.request("POST", "/v1/embeddings", {"input": ["ok", "word " * 200]})
        assert st == 400 and "input[1]" in err["error"]["message"]
        for bad in ({"input": [[]]}, {"input": [""]}, {"input": [1, "a"]}, {"input": [[1], ["a"]]},
                    {"input": [10 ** 9]}, {"input": "x", "encoding_format": "hex"}):
            st, err = s.request("POST", "/v1/embeddings", bad)
            assert st == 400 and "input" in err["error"]["message"] or "encoding_format" in err["error"]["message"]
    finally:
        s.stop()


# ---------------------------------------------------------------- hostile requests

def test_deep_json_surrogates_nan(server, client):
    port = server.port
    for depth in (65, 1000, 30_000):
        body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
        st, err = _post_raw(port, "/v1/completions", body)
        assert st == 400 and "levels deep" in err["error"]["message"], depth
    deep_kwargs = b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": ' + \
        b'{"a": ' * 500 + b"1" + b"}" * 500 + b"}"
    st, err = _post_raw(port, "/v1/chat/completions", deep_kwargs)
    assert st == 400 and "levels deep" in err["error"]["message"]
    # 60 levels is fine for the parser; the schema says what is wrong
    st, err = _post_raw(port, "/v1/completions", b'{"prompt": ' + b"[" * 60 + b"]" * 60 + b"}")
    assert st == 400 and "prompt" in err["error"]["message"]
    for body, where in ((rb'{"prompt": "\ud800"}', "prompt"), (rb'{"prompt": ["ok", "a\udfffb"]}', "prompt[1]"),
                        (rb'{"messages": [{"role": "user", "content": "\udc00"}]}', "messages[0].content"),
                        (rb'{"input": "\ud800"}', "input"), (rb'{"content": "\ud800"}', "content")):
        path = "/v1/chat/completions" if b"messages" in body else "/v1/embeddings" if b"input" in body else \
            "/tokenize" if b"content" in body else "/v1/completions"
        st, err = _post_raw(port, path, body)
        assert st == 400 and "surrogate" in err["error"]["message"] and where in err["error"]["message"], body
        r = client.completions.create(model="x", prompt="still serving", max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
    st, out = _post_raw(port, "/v1/completions", rb'{"prompt": "pair \ud83d\ude00 ok", "max_tokens": 2}')
    assert st == 200  # a valid surrogate pair is a character
    for body in (b'{"prompt": "a", "temperature": NaN}', b'{"prompt": "a", "top_p": Infinity}',
                 b'{"prompt": "a"', b"\xff\xfe", b"", b"null", b'"x"', b"[]",
                 b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}"):
        st, err = _post_raw(port, "/v1/completions", body)
        assert st == 400 and err["error"]["type"] == "invalid_request_error", body
    assert server.request("GET", "/health")[0] == 200


def test_body_limits_and_slow_sockets(server):
    port = server.port
    # declared far over the limit: answered at once, nothing read
    out = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000000\r\n\r\n", timeout=10)
    assert out.startswith(b"HTTP/1.1 413") and b"request_too_large" in out
    # a request the HTTP parser refuses: a 400 with the same JSON error body as every other 4xx
    out = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: abc\r\n\r\n{}", timeout=10)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["type"] == "invalid_request_error"
    # a 2 MB body: read, dropped, 413
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", "/v1/completions", body=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]["message"]
    c.close()
    # chunked, over the limit
    chunk = b"a" * 30000
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    out = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert out.startswith(b"HTTP/1.1 413")
    # a body that never arrives: 408 after --read-timeout (3 s)
    t0 = time.monotonic()
    out = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro", timeout=20)
    assert out.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 15
    # a request head dribbled forever (slowloris) is dropped after --read-timeout
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    assert s.recv(100) == b"" and time.monotonic() - t0 < 15
    s.close()
    # 200 idle sockets and 50 half-sent heads do not keep anyone out
    idle = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(200)]
    half = []
    for _ in range(50):
        h = socket.create_connection(("127.0.0.1", port), timeout=20)
        h.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        half.append(h)
    try:
        st, out = server.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert st == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")
        assert server.request("GET", "/health")[0] == 200
    finally:
        for s in idle + half:
            s.close()


def test_slow_reader_does_not_block_others(server, client, llm):
    """A client that asks for a long stream and never reads: its events pile up in its own bounded buffer (the
    writes happen on the event loop, not under the model), it is cut off, and another client's request is served
    meanwhile, without waiting for the slow socket to close."""
    eog = {str(t): -100 for t in llm.tokenizer.eog_ids}
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": N_CTX - 100, "temperature": 0, "stream": True,
                       "logprobs": 20, "logit_bias": eog}).encode()
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", server.port))
    try:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(1.0)  # it is generating (and not being read)
        t0 = time.monotonic()
        r = client.completions.create(model="x", prompt="The sea", temperature=0, max_tokens=8)
        dt = time.monotonic() - t0
        assert r.choices[0].finish_reason in ("stop", "length") and dt < 60
        h = server.request("GET", "/health")[1]
        if h["slots_idle"] + h["slots_processing"] == 1:  # one at a time: the slow one was cut off, the model freed
            deadline = time.monotonic() + 10
            while server.stats()["running"] and time.monotonic() < deadline:  # (freed just after the answer)
                time.sleep(0.05)
            assert server.stats()["running"] == 0
    finally:
        slow.close()
    deadline = time.monotonic() + 10
    while server.request("GET", "/health")[1]["slots_processing"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the slow stream's generation ends once its socket is closed
    assert server.request("GET", "/health")[1]["slots_processing"] == 0


def test_cors_api_key_and_template_errors(model, tmp_path):
    loop = tmp_path / "loop.jinja"
    loop.write_text("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}")
    s = Server(model, "--cors-origin", "http://example.com", "--api-key", "k", "--chat-template", str(loop))
    try:
        pre = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        c.request("OPTIONS", "/v1/chat/completions", headers=pre)  # a preflight carries no key
        r = c.getresponse()
        r.read()
        assert r.status == 200 and r.getheader("access-control-allow-origin") == "http://example.com"
        assert "POST" in r.getheader("access-control-allow-methods")
        assert "authorization" in r.getheader("access-control-allow-headers").lower()
        c.request("OPTIONS", "/v1/chat/completions", headers=dict(pre, Origin="http://evil.example"))
        r = c.getresponse()
        r.read()
        assert r.status == 400 and r.getheader("access-control-allow-origin") is None
        c.request("GET", "/v1/models", headers={"Origin": "http://example.com"})
        r = c.getresponse()
        assert r.status == 401 and r.getheader("access-control-allow-origin") == "http://example.com"
        r.read()
        c.close()
        assert s.request("GET", "/health")[0] == 200
        auth = {"Authorization": "Bearer k"}
        st, err = s.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
                            headers=auth)
        t0 = time.monotonic()
        assert st == 400 and "chat template" in err["error"]["message"] and "\n" not in err["error"]["message"]
        st, out = s.request("POST", "/v1/completions", {"prompt": "still here", "max_tokens": 2}, headers=auth)
        assert st == 200 and time.monotonic() - t0 < 5
        assert s.request("POST", "/tokenize", {"prompt": "x"})[0] == 401
        assert s.request("POST", "/tokenize", {"prompt": "x"}, headers=auth)[0] == 200
    finally:
        s.stop()


# ---------------------------------------------------------------- the concurrency contract, on a stand-in model

class FakeLlama:
    """The calls the server makes, with a `concurrent` flag; generation sleeps per token and records how many
    run at once and how many were closed."""

    model_path = "fake.gguf"
    n_threads = None
    seed = 0
    stream_usage = True  # the last streamed chunk carries `usage`

    def __init__(self, concurrent: bool, step: float = 0.02, piece: str = "x"):
        self.concurrent = concurrent
        self.step = step
        self.piece = piece
        self.lock = threading.Lock()
        self.active = self.peak = self.closed = self.finished = self.tokens = 0
        self.engine_stats = {"batch_rows": 3, "spec_acceptance": 0.5}

    def n_ctx(self):
        return 1 << 20

    def n_vocab(self):
        return 256

    def token_bos(self):
        return -1

    def token_eos(self):
        return 0

    def tokenize(self, text, add_bos=True, special=False):
        return list(text)

    def detokenize(self, toks, prev_tokens=None, special=False):
        return bytes(toks)

    def create_completion(self, prompt, max_tokens=16, stream=False, **kw):
        assert stream

        def gen():
            with self.lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
            try:
                for i in range(max_tokens):
                    time.sleep(self.step)
                    self.tokens += 1
                    last = i == max_tokens - 1
                    chunk = {"choices": [{"text": self.piece, "index": 0, "logprobs": None,
                                          "finish_reason": "length" if last else None}]}
                    if last:
                        chunk["usage"] = {"prompt_tokens": 1, "completion_tokens": max_tokens,
                                          "total_tokens": 1 + max_tokens,
                                          "prompt_tokens_details": {"cached_tokens": 1}}
                    yield chunk
                self.finished += 1
            finally:
                with self.lock:
                    self.active -= 1
                    self.closed += 1
        return gen()


@pytest.fixture
def fake_server():
    from llamba.server import make_server
    made = []

    def start(llm, **kw):
        srv = make_server(llm, "127.0.0.1", 0, **kw)
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        port = srv.server_address[1]
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        made.append((srv, t))
        return srv, port

    yield start
    for srv, t in made:
        srv.shutdown()
        t.join(10)
        srv.server_close()


def _get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if path != "/metrics" else data.decode())
    finally:
        c.close()


def _complete(port, body, out, key):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        out[key] = (r.status, r.read())
    finally:
        c.close()


@pytest.mark.parametrize("concurrent", [True, False])
def test_concurrency_contract(fake_server, concurrent):
    llm = FakeLlama(concurrent)
    srv, port = fake_server(llm, n_parallel=4, max_queue=64)
    out = {}
    threads = [threading.Thread(target=_complete, args=(port, {"prompt": "a", "max_tokens": 15}, out, i))
               for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.15)
    st, h = _get(port, "/health")
    want = 4 if concurrent else 1
    assert h["slots_processing"] == want and h["slots_idle"] == 0
    for t in threads:
        t.join(60)
    assert all(s == 200 and json.loads(b)["choices"][0]["text"] == "x" * 15 for s, b in out.values())
    assert llm.peak == want and llm.active == 0
    st, metrics = _get(port, "/metrics")
    assert "llamba_engine_batch_rows 3" in metrics and "llamba_engine_spec_acceptance 0.5" in metrics
    assert f"llamba_slots_total {want}" in metrics
    # several prompts run as several generations, at once when concurrent
    llm.peak = 0
    st, _ = [None, None]
    _complete(port, {"prompt": ["a", "b", "c"], "max_tokens": 5}, out, "multi")
    assert out["multi"][0] == 200 and llm.peak == (3 if concurrent else 1)


def test_disconnect_and_queue_limit(fake_server):
    llm = FakeLlama(True, step=0.05)
    srv, port = fake_server(llm, n_parallel=2, max_queue=1)
    socks = []
    body = json.dumps({"prompt": "a", "max_tokens": 2000, "stream": True}).encode()
    for _ in range(3):  # two run, one waits
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        socks.append(s)
        time.sleep(0.1)
    time.sleep(0.2)
    assert _get(port, "/stats")[1]["queue"] == 1
    st = {}
    _complete(port, {"prompt": "a", "max_tokens": 2}, st, "x")  # the queue is full
    assert st["x"][0] == 503 and json.loads(st["x"][1])["error"]["code"] == "queue_full"
    closed = llm.closed
    for s in socks:
        s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (llm.active or _get(port, "/stats")[1]["queue"]):
        time.sleep(0.05)
    assert llm.active == 0 and llm.closed == closed + 2 and llm.finished == 0  # stopped, not run to the end
    assert _get(port, "/health")[1] == {"status": "ok", "slots_idle": 2, "slots_processing": 0}
    assert _get(port, "/stats")[1]["cancelled"] >= 2


@pytest.mark.parametrize("concurrent", [True, False])
def test_slow_reader_pauses_or_is_cut(fake_server, concurrent):
    """A client that does not read fills its own buffer; then, with a concurrent engine, its generation is paused
    (it holds only its slot) and, one at a time, it is cancelled (a paused generation would hold the model). Either
    way the others go on at full speed."""
    llm = FakeLlama(concurrent, step=0.001, piece="y" * 20000)  # 20 MB/s: the socket buffers fill within a second
    srv, port = fake_server(llm, n_parallel=2, stream_buffer=65536)
    body = json.dumps({"prompt": "a", "max_tokens": 500000, "stream": True}).encode()
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    slow.connect(("127.0.0.1", port))
    try:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(2.0)
        if concurrent:
            pipe = next(iter(srv.service.pipes))
            assert pipe.buffered > 0 and not pipe.cancelled  # its buffer is full: the generation waits
            n = llm.tokens
            time.sleep(0.5)
            assert llm.tokens <= n + 1 and llm.active == 1 and llm.finished == 0  # paused, not cancelled
        else:
            assert llm.active == 0 and llm.closed == 1 and llm.finished == 0  # cut off, the model is free
            assert srv.service.stats["cancelled"] == 1
        t0 = time.monotonic()
        out = {}
        _complete(port, {"prompt": "a", "max_tokens": 200}, out, 0)
        assert out[0][0] == 200 and time.monotonic() - t0 < 5
    finally:
        slow.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and llm.active:
        time.sleep(0.05)
    assert llm.active == 0


class BrokenLlama(FakeLlama):
    """Raises what a bug would raise: at the start of one prompt, midway through another."""

    def create_completion(self, prompt, max_tokens=16, stream=False, **kw):
        if prompt == "boom":
            raise RuntimeError("something at 0x7f00deadbeef broke\nTraceback (most recent call last): ...")
        inner = super().create_completion(prompt, max_tokens=max_tokens, stream=stream, **kw)

        def gen():
            for i, c in enumerate(inner):
                if prompt == "late" and i == 3:
                    raise KeyError("late failure")
                yield c
        return gen()


def test_unexpected_errors_are_one_line_500(fake_server, capfd):
    llm = BrokenLlama(True, step=0.001)
    srv, port = fake_server(llm, n_parallel=2)
    out = {}
    _complete(port, {"prompt": "boom", "max_tokens": 5}, out, "a")
    st, body = out["a"]
    err = json.loads(body)["error"]
    assert st == 500 and err["type"] == "server_error" and "RuntimeError" in err["message"]
    assert "\n" not in err["message"] and "Traceback" not in err["message"] and "0x7f" not in err["message"]
    # after the stream started: an in-band error event, then the end of the stream (no [DONE])
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", "/v1/completions", body=json.dumps({"prompt": "late", "max_tokens": 10, "stream": True}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    events = [e[6:] for e in r.read().decode().split("\n") if e.startswith("data: ")]
    c.close()
    assert r.status == 200 and len(events) == 4 and json.loads(events[-1])["error"]["code"] == "internal_error"
    _complete(port, {"prompt": "fine", "max_tokens": 3}, out, "b")
    assert out["b"][0] == 200
    assert _get(port, "/health")[1]["slots_processing"] == 0
    err_text = capfd.readouterr().err
    assert not any(line.startswith("Traceback") for line in err_text.splitlines())  # one line each in the log
    assert "late failure" in err_text
