"""An OpenAI-compatible HTTP server on the standard library (`http.server.ThreadingHTTPServer`).

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the one loaded model
    GET  /stats                  counters: requests, cancelled, errors, tokens generated, queue length
    POST /v1/completions         text completion (prompt: a string or a list of token ids)
    POST /v1/chat/completions    chat completion through the model's chat template
    POST /v1/embeddings          pooled embeddings of strings (float or base64; needs a pooling type:
                                 the model's or `llamba serve --pooling mean|cls|last`)
    ("stream": true answers with server-sent events: `data: {json}` ... `data: [DONE]`)

One model with one KV cache serves one request at a time: requests wait in a FIFO queue (n-parallel = 1, no
batched decoding). Each request runs alone on the model, so every client gets exactly its own output; prefix
reuse across requests only skips prompt tokens that are already cached. Requests are validated before they
queue: 400 with an OpenAI-style error for bad JSON, wrong types, unknown parameters, prompts or `max_tokens`
that do not fit the context; 413 for bodies over `max_body`; 404 for unknown paths. A streaming client that
disconnects stops its generation at the next token.
"""
from __future__ import annotations

import hmac
import json
import math
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from llamba.errors import ContextOverflowError, LlambaError

DEFAULT_MAX_BODY = 1 << 20
MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (OpenAI: 20 for chat)
MAX_EMBED_INPUTS = 2048  # inputs per embeddings request (OpenAI's limit)


class APIError(Exception):
    def __init__(self, status: int, message: str, etype: str = "invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.message, self.etype, self.code, self.param = status, message, etype, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.etype, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    pass


# ---------------------------------------------------------------- request validation

def _bad(msg, param=None, code=None):
    return APIError(400, msg, param=param, code=code)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(lo=None, hi=None):
    def check(name, v):
        if not _is_num(v):
            raise _bad(f"'{name}' must be a number (got {json.dumps(v)})", name)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _bad(f"'{name}' must be between {lo} and {hi} (got {v})", name)
        return float(v)
    return check


def _int(lo=None, hi=None):
    def check(name, v):
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise _bad(f"'{name}' must be an integer (got {json.dumps(v)})", name)
        v = int(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _bad(f"'{name}' must be between {lo} and {hi} (got {v})", name)
        return v
    return check


def _bool(name, v):
    if not isinstance(v, bool):
        raise _bad(f"'{name}' must be true or false (got {json.dumps(v)})", name)
    return v


def _str(name, v):
    if not isinstance(v, str):
        raise _bad(f"'{name}' must be a string", name)
    return v


def _obj(name, v):
    if not isinstance(v, dict):
        raise _bad(f"'{name}' must be an object", name)
    return v


def _any(name, v):
    return v


def _stop(name, v):
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v) and len(v) <= 16:
        return [s for s in v if s]
    raise _bad("'stop' must be a string or a list of at most 16 strings", name)


def _one(name, v):
    if v != 1 and not (name == "best_of" and v in (0, 1)):
        raise _bad(f"'{name}' must be 1: this server returns one choice per request", name)
    return 1


def _n_logprobs(name, v):
    """How many alternatives per token: /v1/completions `logprobs` (llama-cpp-python / OpenAI legacy) and chat
    `top_logprobs`; a JSON integer (not a bool, not 2.0) from 0 to MAX_LOGPROBS."""
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_LOGPROBS:
        raise _bad(f"'{name}' must be an integer from 0 to {MAX_LOGPROBS}", name)
    return v


def _logit_bias(name, v):
    if not isinstance(v, dict):
        raise _bad("'logit_bias' must be an object of token id -> bias", name)
    out = {}
    for k, b in v.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise _bad(f"'logit_bias' key {k!r} is not a token id", name) from None
        if not _is_num(b):
            raise _bad(f"'logit_bias' value for {k} must be a number", name)
        out[tid] = float(b)
    return out


def _stream_options(name, v):
    _obj(name, v)
    for k, x in v.items():
        if k != "include_usage":
            raise _bad(f"unrecognized stream option: {k}", name)
        _bool("stream_options.include_usage", x)
    return v


def _tools(name, v):
    if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
        raise _bad("'tools' must be a list of tool objects", name)
    return v


# parameter -> (validator, Llama keyword or None to ignore)
_SAMPLING = {
    "temperature": (_num(0, 100), "temperature"),
    "top_p": (_num(0, 1), "top_p"),
    "top_k": (_int(-1, None), "top_k"),
    "min_p": (_num(0, 1), "min_p"),
    "typical_p": (_num(0, 1), "typical_p"),
    "repeat_penalty": (_num(0, 100), "repeat_penalty"),
    "presence_penalty": (_num(-2, 2), "presence_penalty"),
    "frequency_penalty": (_num(-2, 2), "frequency_penalty"),
    "seed": (_int(None, None), "seed"),
    "stop": (_stop, "stop"),
    "logit_bias": (_logit_bias, "logit_bias"),
    "max_tokens": (_int(1, None), "max_tokens"),
    "stream": (_bool, None),
    "stream_options": (_stream_options, None),
    "model": (_str, None),
    "n": (_one, None),
    "user": (_str, None),
    "cache_prompt": (_bool, None),  # llama.cpp: prefix reuse is always on here
    "metadata": (_any, None),
    "store": (_any, None),
}
_CHAT_PARAMS = dict(_SAMPLING, **{
    "messages": (_any, None),
    "logprobs": (_bool, "logprobs"),
    "top_logprobs": (_n_logprobs, "top_logprobs"),
    "max_completion_tokens": (_int(1, None), "max_tokens"),
    "tools": (_tools, None),
    "tool_choice": (_any, None),
    "parallel_tool_calls": (_any, None),
    "response_format": (_obj, None),
    "chat_template_kwargs": (_obj, None),
})
_COMPLETION_PARAMS = dict(_SAMPLING, **{
    "prompt": (_any, None),
    "logprobs": (_n_logprobs, "logprobs"),
    "echo": (_bool, "echo"),
    "best_of": (_one, None),
    "suffix": (_any, None),
})


def _parse_params(body: dict, table: dict) -> dict:
    kw = {}
    for k, v in body.items():
        if k not in table:
            raise _bad(f"Unrecognized request argument supplied: {k}", k, "unknown_parameter")
        if v is None:
            continue
        check, target = table[k]
        v = check(k, v)
        if target:
            kw[target] = v
    return kw


# ---------------------------------------------------------------- the request queue

class FifoLock:
    """A lock granted in arrival order (threading.Lock is not fair), with a cap on how many may wait."""

    def __init__(self, max_waiting: int = 64):
        self._cv = threading.Condition()
        self._next = 0  # next ticket to hand out
        self._serving = 0  # ticket now allowed to run
        self.max_waiting = max_waiting

    @property
    def waiting(self) -> int:
        return self._next - self._serving

    def acquire(self):
        with self._cv:
            if self.max_waiting and self._next - self._serving > self.max_waiting:
                raise APIError(503, "the server is busy (request queue full); retry later", "server_error",
                               "queue_full")
            t = self._next
            self._next += 1
            while t != self._serving:
                self._cv.wait()

    def release(self):
        with self._cv:
            self._serving += 1
            self._cv.notify_all()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------- the service (no HTTP here)

class LlambaService:
    """Turns validated OpenAI requests into `Llama` calls, one at a time."""

    def __init__(self, llm, alias: str | None = None, max_queue: int = 64):
        import os
        self.llm = llm
        self.alias = alias or os.path.basename(llm.model_path)
        self.lock = FifoLock(max_queue)
        self._tok_lock = threading.Lock()
        self.created = int(time.time())
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "tokens_generated": 0,
                      "last_cancelled_n_gen": None}
        self._stats_lock = threading.Lock()

    def count(self, key, n=1):
        with self._stats_lock:
            self.stats[key] += n

    def models(self) -> dict:
        llm = self.llm
        meta = {"n_ctx": llm.n_ctx(), "n_vocab": llm.n_vocab(), "arch": llm.model.config.arch if llm.model else None}
        return {"object": "list", "data": [{"id": self.alias, "object": "model", "created": self.created,
                                            "owned_by": "llamba", "meta": meta}]}

    def snapshot(self) -> dict:
        with self._stats_lock:
            s = dict(self.stats)
        s["queue"] = self.lock.waiting
        return s

    # ---- preparation: validation + tokenization, before queueing
    def _check_fit(self, toks: list[int], kw: dict):
        n_ctx = self.llm.n_ctx()
        if not toks:
            raise _bad("the prompt is empty", "prompt")
        if len(toks) >= n_ctx:
            raise _bad(f"the prompt has {len(toks)} tokens but the context holds {n_ctx}; shorten it",
                       "messages", "context_length_exceeded")
        mt = kw.get("max_tokens")
        if mt is not None and len(toks) + mt > n_ctx:
            raise _bad(f"this model's context is {n_ctx} tokens, but {len(toks) + mt} were requested "
                       f"({len(toks)} in the prompt, {mt} for the completion); lower max_tokens",
                       "max_tokens", "context_length_exceeded")
        if kw.get("logit_bias"):
            nv = self.llm.n_vocab()
            bad = [t for t in kw["logit_bias"] if not 0 <= t < nv]
            if bad:
                raise _bad(f"logit_bias token id {bad[0]} is out of range (vocabulary of {nv})", "logit_bias")

    def prepare_chat(self, body: dict):
        kw = _parse_params(body, _CHAT_PARAMS)
        if "messages" not in body:
            raise _bad("'messages' is required", "messages")
        tkw = body.get("chat_template_kwargs") or {}
        clash = sorted(set(tkw) & {"messages", "tools", "add_generation_prompt", "tokenize"})
        if clash:
            raise _bad(f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        tools = body.get("tools")
        with self._tok_lock:
            try:
                toks = self.llm.apply_chat_template(body["messages"], add_generation_prompt=True, tools=tools,
                                                    tokenize=True, **tkw)
            except LlambaError as e:
                raise _bad(str(e), "messages") from None
        self._check_fit(toks, kw)
        return toks, kw

    def prepare_completion(self, body: dict):
        kw = _parse_params(body, _COMPLETION_PARAMS)
        if body.get("suffix"):
            raise _bad("'suffix' (fill-in-the-middle) is not supported by this server", "suffix")
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            with self._tok_lock:
                toks = self.llm.tokenize(p.encode("utf-8"), add_bos=True, special=True)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            nv = self.llm.n_vocab()
            if not all(0 <= t < nv for t in p):
                raise _bad(f"prompt token ids must be in [0, {nv})", "prompt")
            toks = list(p)
        elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
            raise _bad("batched prompts (a list of several prompts) are not supported; send one per request",
                       "prompt")
        else:
            raise _bad("'prompt' must be a string or a non-empty list of token ids", "prompt")
        self._check_fit(toks, kw)
        kw["prompt_text"] = p if isinstance(p, str) else None
        return toks, kw

    def prepare_embeddings(self, body: dict):
        """Validate an OpenAI embeddings request -> (list of input strings, encoding format)."""
        for k in body:
            if k not in ("input", "model", "encoding_format", "dimensions", "user"):
                raise _bad(f"Unrecognized request argument supplied: {k}", k, "unknown_parameter")
        inp = body.get("input")
        if isinstance(inp, str):
            inputs = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(t, str) for t in inp):
            inputs = list(inp)
        elif isinstance(inp, list) and inp and all(isinstance(t, (int, list)) for t in inp):
            raise _bad("token-id inputs are not supported by this server; send the text", "input")
        else:
            raise _bad("'input' must be a string or a non-empty list of strings", "input")
        if len(inputs) > MAX_EMBED_INPUTS:
            raise _bad(f"at most {MAX_EMBED_INPUTS} inputs per request", "input")
        if any(not t for t in inputs):
            raise _bad("'input' must not contain empty strings", "input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        dims = body.get("dimensions")
        if dims is not None and dims != self.llm.n_embd():
            raise _bad(f"this model's embeddings have {self.llm.n_embd()} dimensions; 'dimensions' cannot change "
                       f"that", "dimensions")
        from llamba.llama import POOLING_NAMES, POOLING_NONE
        pt = self.llm.pooling_type()
        if pt == POOLING_NONE:
            raise _bad("this model has no pooling type (its embeddings are per token); start the server with "
                       "--pooling mean|cls|last", "input")
        if pt not in POOLING_NAMES or POOLING_NAMES[pt] == "rank":
            raise _bad(f"pooling type {POOLING_NAMES.get(pt, pt)} cannot produce embeddings", "input")
        return inputs, fmt

    def embeddings(self, inputs: list[str], fmt: str) -> dict:
        import base64
        embeds, total = self.llm.embed(inputs, return_count=True)
        data = []
        for i, e in enumerate(embeds):
            v = base64.b64encode(np.asarray(e, dtype="<f4").tobytes()).decode("ascii") if fmt == "base64" else e
            data.append({"object": "embedding", "index": i, "embedding": v})
        return {"object": "list", "data": data, "model": self.alias,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    # ---- generation (call with self.lock held)
    def bind_thread(self):
        """Numba's thread count is per calling thread: give this handler thread the model's."""
        from llamba.llama import set_threads
        set_threads(self.llm.n_threads)

    def chat(self, toks, kw, stream: bool):
        out = self.llm._chat_completion_from_tokens(toks, stream=stream, **kw)
        if not stream:
            out["model"] = self.alias
            return out
        return self._rename(out)

    def completion(self, toks, kw, stream: bool):
        kw = dict(kw)
        text = kw.pop("prompt_text")
        max_tokens = kw.pop("max_tokens", None) or -1
        # a text prompt goes in as text (so `echo` returns it verbatim); it tokenizes as in prepare_completion
        # logprobs without keeping every row in `scores` (that is llama-cpp-python's logits_all memory)
        out = self.llm.create_completion(text if text is not None else toks, max_tokens=max_tokens, stream=stream,
                                         special=True, _no_scores=True, **kw)
        if not stream:
            out["model"] = self.alias
            return out
        return self._rename(out)

    def _rename(self, it):
        try:
            for c in it:
                c["model"] = self.alias
                yield c
        finally:
            it.close()

    def usage(self, n_prompt: int) -> dict:
        st = self.llm.last_stats
        n_gen = st.n_gen if st else 0
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}


# ---------------------------------------------------------------- HTTP

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llamba"
    service: LlambaService = None  # set per server class
    max_body = DEFAULT_MAX_BODY
    verbose = False
    api_key = None

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write(f"llamba: {self.address_string()} {fmt % args}\n")

    # ---- plumbing
    def _send_json(self, status: int, obj, close: bool = False):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: APIError, close: bool = False):
        try:
            self._send_json(err.status, err.body(), close=close)
        except OSError:
            self.close_connection = True

    def _read_json(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise APIError(411, "chunked request bodies are not supported; send Content-Length", code="length_required")
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _bad("invalid Content-Length header") from None
        if n < 0:
            raise _bad("invalid Content-Length header")
        if n > self.max_body:
            self._drain(n)
            raise APIError(413, f"request body of {n} bytes is over the limit of {self.max_body} bytes "
                                f"(--max-body)", code="request_too_large")
        raw = self.rfile.read(n) if n else b""
        if len(raw) < n:
            raise ClientGone()
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise _bad(f"the request body is not valid JSON: {' '.join(str(e).split())}", code="invalid_json") \
                from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object", code="invalid_json")
        return body

    def _drain(self, n: int):
        """Read and drop an oversized body (up to 64 MiB) so the client can read our 413 instead of a reset."""
        self.close_connection = True
        if n > 64 << 20:
            return
        try:
            self.connection.settimeout(5)
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    break
                n -= len(chunk)
        except OSError:
            pass

    def _peer_closed(self) -> bool:
        """True when the client has closed its end (readable with no data)."""
        sock = self.connection
        try:
            if hasattr(select, "poll"):  # no FD_SETSIZE limit
                p = select.poll()
                p.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
                ready = bool(p.poll(0))
            else:
                ready = bool(select.select([sock], [], [], 0)[0])
            # readable: either data (a pipelined request) or the end of the stream
            return ready and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _write_event(self, obj):
        data = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode("utf-8")
        try:
            self.wfile.write(b"data: " + data + b"\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout, OSError):
            raise ClientGone() from None
        if self._peer_closed():
            raise ClientGone()

    def _authorized(self, path: str) -> bool:
        if not self.api_key or path == "/health":
            return True
        got = self.headers.get("Authorization") or ""
        if hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            return True
        self._send_error(APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                  "authentication_error", "invalid_api_key"), close=True)
        return False

    # ---- routes
    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        svc = self.service
        if not self._authorized(path):
            return
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            self._send_json(200, svc.models())
        elif path == "/stats":
            self._send_json(200, svc.snapshot())
        elif path in ("/v1/completions", "/v1/chat/completions", "/completions", "/chat/completions"):
            self._send_error(APIError(405, f"use POST for {path}", code="method_not_allowed"))
        else:
            self._send_error(APIError(404, f"unknown path {path}", code="not_found"))

    def _embeddings(self):
        svc = self.service
        svc.count("requests")
        try:
            body = self._read_json()
            inputs, fmt = svc.prepare_embeddings(body)
            with svc.lock:
                if self._peer_closed():
                    svc.count("cancelled")
                    self.close_connection = True
                    return
                svc.bind_thread()
                out = svc.embeddings(inputs, fmt)
            svc.count("completed")
            self._send_json(200, out)
        except ClientGone:
            self.close_connection = True
        except APIError as e:
            svc.count("errors")
            self._send_error(e, close=e.status in (411, 413))
        except (ValueError, LlambaError) as e:
            svc.count("errors")
            self._send_error(_bad(str(e), "input"))

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if not self._authorized(path):
            return
        if path in ("/v1/chat/completions", "/chat/completions"):
            kind = "chat"
        elif path in ("/v1/completions", "/completions"):
            kind = "completion"
        elif path in ("/v1/embeddings", "/embeddings"):
            return self._embeddings()
        else:
            # the body is not read: close so it is not taken for the next request
            self._send_error(APIError(404, f"unknown path {path}", code="not_found"), close=True)
            return
        svc = self.service
        svc.count("requests")
        try:
            body = self._read_json()
            toks, kw = svc.prepare_chat(body) if kind == "chat" else svc.prepare_completion(body)
        except ClientGone:
            self.close_connection = True
            return
        except APIError as e:
            svc.count("errors")
            self._send_error(e, close=e.status in (411, 413))
            return
        stream = bool(body.get("stream"))
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            with svc.lock:
                if self._peer_closed():  # gave up while queued
                    svc.count("cancelled")
                    self.close_connection = True
                    return
                svc.bind_thread()
                if stream:
                    self._stream(kind, toks, kw, usage)
                else:
                    out = svc.chat(toks, kw, False) if kind == "chat" else svc.completion(toks, kw, False)
                    svc.count("completed")
                    svc.count("tokens_generated", out["usage"]["completion_tokens"])
                    self._send_json(200, out)
        except APIError as e:
            svc.count("errors")
            self._send_error(e)
        except ContextOverflowError as e:
            svc.count("errors")
            self._send_error(_bad(str(e), code="context_length_exceeded"))
        except LlambaError as e:
            svc.count("errors")
            self._send_error(_bad(str(e)))
        except ClientGone:
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - keep serving; report the failure to this client only
            svc.count("errors")
            sys.stderr.write(f"llamba: error while serving {path}: {type(e).__name__}: {e}\n")
            self._send_error(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    def _stream(self, kind, toks, kw, include_usage):
        svc = self.service
        it = svc.chat(toks, kw, True) if kind == "chat" else svc.completion(toks, kw, True)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the body ends when the connection closes
        self.end_headers()
        self.close_connection = True
        last = None
        try:
            for chunk in it:
                last = chunk
                self._write_event(chunk)
        except ClientGone:
            it.close()  # stops the generation: the generator's finally closes the decode loop
            svc.count("cancelled")
            st = svc.llm.last_stats
            with svc._stats_lock:
                svc.stats["last_cancelled_n_gen"] = st.n_gen if st else 0
                svc.stats["tokens_generated"] += st.n_gen if st else 0
            raise
        except LlambaError as e:  # after the headers: report in-band, then end the stream
            svc.count("errors")
            try:
                self._write_event(_bad(str(e)).body())
            except ClientGone:
                pass
            return
        finally:
            it.close()
        st = svc.llm.last_stats
        svc.count("completed")
        svc.count("tokens_generated", st.n_gen if st else 0)
        try:
            if include_usage and last is not None:
                self._write_event({"id": last["id"], "object": last["object"], "created": last["created"],
                                   "model": svc.alias, "choices": [], "usage": svc.usage(len(toks))})
            self._write_event(b"[DONE]")
        except ClientGone:
            pass


class LlambaHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def make_server(llm, host: str = "127.0.0.1", port: int = 8080, *, alias: str | None = None,
                max_body: int = DEFAULT_MAX_BODY, max_queue: int = 64, timeout: float | None = 600.0,
                verbose: bool = False, api_key: str | None = None) -> LlambaHTTPServer:
    """A ready-to-run server (call `serve_forever()`); `port=0` picks a free port (see `server.server_address`)."""
    service = LlambaService(llm, alias=alias, max_queue=max_queue)
    handler = type("Handler", (_Handler,), {"service": service, "max_body": max_body, "verbose": verbose,
                                            "timeout": timeout, "api_key": api_key})
    try:
        srv = LlambaHTTPServer((host, port), handler)
    except OSError as e:
        raise LlambaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    srv.service = service
    return srv
