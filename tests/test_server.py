"""`llamba serve`: the real server in a subprocess on a free loopback port, driven by the official `openai` client
and raw HTTP. Greedy output equals the library's; concurrent streams each get their own text; bad requests get
4xx with a message; a client that disconnects mid-stream stops its generation."""
from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from llamba import Llama
from llamba.chat import BUILTIN_TEMPLATES
from tiny_models import write_model


class _OpenAI:
    """The `openai` module, imported on first use (it costs ~1 s at collection); a test skips without it."""

    def __getattr__(self, name):
        return getattr(pytest.importorskip("openai"), name)


openai = _OpenAI()

N_CTX = 4096
MAX_BODY = 65536
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


class Server:
    def __init__(self, model, *extra):
        cmd = [sys.executable, "-m", "llamba.cli", "serve", "-m", model, "-t", "1", "-c", str(N_CTX), "--port", "0",
               "--max-body", str(MAX_BODY), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        ready = threading.Event()
        self.port = None

        def drain():  # keep reading stderr so the server never blocks on it
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(120) or self.port is None:
            self.stop()
            raise AssertionError("server did not start: " + "".join(self.lines[-20:]))
        self.base = f"http://127.0.0.1:{self.port}"

    def request(self, method, path, body=None, headers=None, raw: bytes | None = None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            h = {"Content-Type": "application/json", **(headers or {})}
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            payload = r.read()
            return r.status, (json.loads(payload) if payload else None)
        finally:
            c.close()

    def stats(self):
        return self.request("GET", "/stats")[1]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("server_model")
    return str(write_model(d / "tiny-chat.gguf", "llama", n_ctx=N_CTX, seed=1, tied=False,
                           chat_template=BUILTIN_TEMPLATES["chatml"][0]))


@pytest.fixture(scope="module")
def server(model):
    s = Server(model)
    yield s
    s.stop()
    assert s.proc.returncode is not None


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def llm(model):
    return Llama(model, n_ctx=N_CTX, n_threads=1, verbose=False)


def chat_msgs(q):
    return [SYSTEM, {"role": "user", "content": q}]


QUESTIONS = [f"Question {i}: what is {w}?" for i, w in
             enumerate(["the sea", "the sky", "a tree", "the wind", "an atom", "it", "on and on", "the end"])]


def test_health_and_models(server, client):
    st, h = server.request("GET", "/health")
    assert st == 200 and h["status"] == "ok" and h["slots_idle"] + h["slots_processing"] >= 1
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat.gguf"]


def test_chat_equals_library(server, client, llm):
    for q in QUESTIONS[:3]:
        r = client.chat.completions.create(model="tiny-chat.gguf", messages=chat_msgs(q), temperature=0,
                                           max_tokens=32)
        ref = llm.create_chat_completion(chat_msgs(q), temperature=0, max_tokens=32)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny-chat.gguf"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == ref["choices"][0]["message"]["content"]
        assert r.choices[0].finish_reason == ref["choices"][0]["finish_reason"]
        assert r.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
        assert r.usage.completion_tokens == ref["usage"]["completion_tokens"]
    # a seeded sampled request is reproducible and equals the library too
    kw = dict(temperature=0.9, top_p=0.9, seed=1234, max_tokens=24)
    r = client.chat.completions.create(model="x", messages=chat_msgs("hi"), **kw)
    ref = llm.create_chat_completion(chat_msgs("hi"), **kw)
    assert r.choices[0].message.content == ref["choices"][0]["message"]["content"]


def test_completion_equals_library(server, client, llm):
    prompt = "Once upon a time, the sea"
    r = client.completions.create(model="tiny-chat.gguf", prompt=prompt, temperature=0, max_tokens=24)
    ref = llm.create_completion(prompt, temperature=0, max_tokens=24, special=True)
    assert r.object == "text_completion"
    assert r.choices[0].text == ref["choices"][0]["text"] and len(r.choices[0].text) > 0
    assert r.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    # token ids as the prompt, and echo
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    r2 = client.completions.create(model="x", prompt=ids, temperature=0, max_tokens=24)
    assert r2.choices[0].text == r.choices[0].text
    r3 = client.completions.create(model="x", prompt=prompt, temperature=0, max_tokens=24, echo=True)
    assert r3.choices[0].text == prompt + r.choices[0].text


def test_streaming_chat_and_completion(server, client):
    msgs = chat_msgs(QUESTIONS[3])
    full = client.chat.completions.create(model="x", messages=msgs, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model="x", messages=msgs, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1

    fullc = client.completions.create(model="x", prompt="The wind and the sea", temperature=0, max_tokens=30)
    parts = list(client.completions.create(model="x", prompt="The wind and the sea", temperature=0, max_tokens=30,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == fullc.choices[0].text
    assert parts[-1].choices[0].finish_reason == fullc.choices[0].finish_reason


def test_logprobs_chat_and_completion(server, client, llm):
    """OpenAI logprobs through the official client: chat `logprobs`/`top_logprobs` (token, logprob, bytes,
    alternatives) equal the library's, streamed or not; /v1/completions `logprobs=N` (llama-cpp-python's layout)
    equals the library's create_completion on a logits_all model."""
    msgs = chat_msgs(QUESTIONS[4])
    r = client.chat.completions.create(model="x", messages=msgs, temperature=0, max_tokens=12, logprobs=True,
                                       top_logprobs=3)
    ref = llm.create_chat_completion(msgs, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    rc = ref["choices"][0]["logprobs"]["content"]
    assert len(content) == len(rc) > 0
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == r.choices[0].message.content
    for e, f in zip(content, rc):
        assert (e.token, e.bytes) == (f["token"], f["bytes"]) and e.logprob == pytest.approx(f["logprob"], abs=1e-6)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy: the top token
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    chunks = list(client.chat.completions.create(model="x", messages=msgs, temperature=0, max_tokens=12,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    plain = client.chat.completions.create(model="x", messages=msgs, temperature=0, max_tokens=12)
    assert plain.choices[0].logprobs is None

    ref_llm = Llama(llm.model_path, n_ctx=N_CTX, n_threads=1, logits_all=True, verbose=False)
    prompt = "The sea and the sky"
    rc = client.completions.create(model="x", prompt=prompt, temperature=0, max_tokens=8, logprobs=2)
    want = ref_llm.create_completion(prompt, temperature=0, max_tokens=8, logprobs=2, special=True)
    got, exp = rc.choices[0].logprobs, want["choices"][0]["logprobs"]
    assert got.tokens == exp["tokens"] and got.text_offset == exp["text_offset"]
    assert got.token_logprobs == pytest.approx(exp["token_logprobs"], abs=1e-6)
    assert [sorted(d) for d in got.top_logprobs] == [sorted(d) for d in exp["top_logprobs"]]
    parts = list(client.completions.create(model="x", prompt=prompt, temperature=0, max_tokens=8, logprobs=2,
                                           stream=True))
    assert [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens] == exp["tokens"]


def test_embeddings_endpoint(server, model, llm):
    """/v1/embeddings through the openai client (which asks for base64) and as float JSON: the library's
    pooled embeddings; a model without a pooling type needs --pooling (400 with the hint otherwise)."""
    status, err = _post(server, {"input": "hello"}, "/v1/embeddings")
    assert status == 400 and "--pooling" in err["error"]["message"]
    s = Server(model, "--pooling", "mean")
    try:
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", timeout=120, max_retries=0)
        texts = ["the sea and the sky", "an atom"]
        r = c.embeddings.create(model="x", input=texts)
        ref = Llama(model, n_ctx=N_CTX, n_threads=1, embedding=True, pooling_type=1, verbose=False)
        want = ref.embed(texts)
        assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
        for d, w in zip(r.data, want):
            assert np.allclose(d.embedding, w, atol=1e-6)
        status, out = s.request("POST", "/v1/embeddings", {"input": "an atom", "encoding_format": "float"})
        assert status == 200 and np.allclose(out["data"][0]["embedding"], want[1], atol=1e-6)
        for bad in ({"input": []}, {"input": [10 ** 9]}, {"input": "x", "dimensions": 3}, {"input": "x", "foo": 1},
                    {"input": "x", "encoding_format": "hex"}):
            status, err = s.request("POST", "/v1/embeddings", bad)
            assert status == 400 and err["error"]["message"], bad
    finally:
        s.stop()


def test_concurrent_streams_get_their_own_output(server, client):
    ref = {q: client.chat.completions.create(model="x", messages=chat_msgs(q), temperature=0, max_tokens=48)
           .choices[0].message.content for q in QUESTIONS}
    assert len(set(ref.values())) > 1  # the prompts lead to different answers
    got, errors = {}, []
    barrier = threading.Barrier(len(QUESTIONS))

    def worker(q):
        try:
            c = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", timeout=120, max_retries=0)
            barrier.wait()
            stream = c.chat.completions.create(model="x", messages=chat_msgs(q), temperature=0, max_tokens=48,
                                               stream=True)
            got[q] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    assert got == ref


def _post(server, body, path="/v1/chat/completions"):
    return server.request("POST", path, body)


BAD_REQUESTS = [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, None),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),  # chat n > 1 is served (issue 12)
    ({"messages": [{"role": "user", "content": "x"}], "frobnicate": True}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": N_CTX}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x " * 3000}]}, "context"),
    ({"temperature": 0}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs"),
]


@pytest.mark.parametrize("body,needle", BAD_REQUESTS)
def test_bad_chat_requests(server, body, needle):
    status, err = _post(server, body)
    assert status == 400, err
    e = err["error"]
    assert e["type"] == "invalid_request_error" and isinstance(e["message"], str) and e["message"]
    if needle:
        assert needle in e["message"] or needle == e.get("param"), e


def test_malformed_http(server, client):
    st, err = server.request("POST", "/v1/chat/completions", raw=b'{"messages": [')
    assert st == 400 and "not valid JSON" in err["error"]["message"]
    st, err = server.request("POST", "/v1/chat/completions", raw=b"[1, 2]")
    assert st == 400 and "JSON object" in err["error"]["message"]
    st, err = server.request("POST", "/v1/completions", {"prompt": 5})
    assert st == 400 and "prompt" in err["error"]["message"]
    st, out = server.request("POST", "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2})
    assert st == 200 and [c["index"] for c in out["choices"]] == [0, 1]  # several prompts: several choices
    st, err = server.request("POST", "/v1/completions", {"prompt": ["a", [1, 2]]})
    assert st == 400 and "prompt" in err["error"]["message"]
    st, err = server.request("POST", "/v1/completions", {"prompt": "x " * 3000})
    assert st == 400 and err["error"]["code"] == "context_length_exceeded"
    big = json.dumps({"prompt": "a" * (MAX_BODY + 10)}).encode()
    st, err = server.request("POST", "/v1/completions", raw=big)
    assert st == 413 and "limit" in err["error"]["message"]
    st, err = server.request("GET", "/v1/nothing")
    assert st == 404 and "unknown path" in err["error"]["message"]
    st, err = server.request("POST", "/v2/chat", {"x": 1})
    assert st == 404
    st, err = server.request("GET", "/v1/chat/completions")
    assert st == 405
    # the official client sees the 400 as BadRequestError with the message
    with pytest.raises(openai.BadRequestError, match="lower max_tokens"):
        client.chat.completions.create(model="x", messages=chat_msgs("hi"), max_tokens=N_CTX * 2)
    # and the server keeps serving
    r = client.chat.completions.create(model="x", messages=chat_msgs("hi"), temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert server.request("GET", "/health")[0] == 200


def test_client_disconnect_stops_generation(server, client, llm):
    before = server.stats()
    eog = {str(t): -100 for t in llm.tokenizer.eog_ids}
    max_tokens = N_CTX - 200
    body = json.dumps({"messages": chat_msgs("Tell me a very long story."), "temperature": 0, "stream": True,
                       "max_tokens": max_tokens, "logit_bias": eog}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data: " not in got:
        chunk = s.recv(4096)
        assert chunk, "server closed the stream"
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    s.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = server.stats()
        if st["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the generation was not cancelled: {st}")
    assert st["last_cancelled_n_gen"] < max_tokens
    # the server still answers, correctly
    r = client.chat.completions.create(model="x", messages=chat_msgs(QUESTIONS[0]), temperature=0, max_tokens=32)
    assert r.choices[0].message.content == llm.create_chat_completion(
        chat_msgs(QUESTIONS[0]), temperature=0, max_tokens=32)["choices"][0]["message"]["content"]


def test_api_key_and_loopback(model):
    s = Server(model, "--api-key", "sekret", "--n-parallel", "4", "--alias", "tiny")
    try:
        assert any("one request at a time" in line or "4 requests decoded at once" in line for line in s.lines)
        assert s.request("GET", "/health")[0] == 200
        st, err = s.request("GET", "/v1/models")
        assert st == 401 and err["error"]["code"] == "invalid_api_key"
        c = openai.OpenAI(base_url=s.base + "/v1", api_key="sekret", timeout=60, max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        s.stop()
