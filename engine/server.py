"""An OpenAI-compatible HTTP server on FastAPI (Starlette) and uvicorn.

    GET  /health                 {"status": "ok", "slots_idle": n, "slots_processing": n}
    GET  /v1/models              the one loaded model (under its alias)
    GET  /metrics                Prometheus text: requests by endpoint and status, tokens, queue, running, engine stats
    GET  /stats                  the same counters as JSON (requests, cancelled, errors, tokens generated, queue)
    POST /v1/completions         text completion: prompt a string, a list of strings, a list of token ids or a list
                                 of token-id lists (one choice per prompt and per `n`); `echo` + `logprobs` laid out
                                 as OpenAI and vLLM lay them out
    POST /v1/chat/completions    chat completion through the model's chat template
    POST /v1/embeddings          pooled embeddings of strings or token ids (float or base64)
    POST /tokenize, /detokenize  llama-server's shape ({"content"} -> {"tokens"}) and vLLM's ({"prompt"} ->
                                 {"tokens", "count", "max_model_len"}; {"tokens"} -> {"prompt"}); also under /v1
    GET  /tokenizer_info         vLLM's: bos/eos/pad tokens, chat template, model_max_length
    GET  /openapi.json           the request schemas
    ("stream": true answers with server-sent events: `data: {json}` ... `data: [DONE]`)

Requests are validated by pydantic models before they queue (400 with an OpenAI-style error naming the field; the
body is parsed here first with a nesting-depth limit and a check for lone UTF-16 surrogates); 413 for bodies over
`max_body`; 401 without the API key; 404/405 for unknown paths and methods; 503 when the queue is full; 500 (a
one-line JSON message, no traceback) for anything unexpected. Every request gets an answer.

Concurrency. Generation calls the `Llama`'s public methods (`create_completion(..., stream=True)`,
`create_chat_completion(..., stream=True)`, `embed`, `prompt_logprobs`) in worker threads. A `Llama` that is not
thread-safe (today's) runs one generation at a time; one whose `concurrent` attribute is true (the batching engine)
runs up to `n_parallel` at once. Each generation's iterator is pulled in its worker thread and its events are handed
to the event loop through a queue; the HTTP writes happen on the event loop, never in the worker. A client that stops
reading only fills its own bounded buffer (`stream_buffer` bytes): then its generation is paused (concurrent engine;
for 30 s at most, then cut) or cancelled (one at a time, where a paused generation would hold the model), so it never
holds up other requests; a write the client does not take within `timeout` s drops the connection. A client that
disconnects cancels its generation within one step (the worker closes the iterator). Connections cost no thread
(asyncio); their number, idle time, header size and header/body read time are bounded.

What the server needs from the `Llama` when `concurrent` is true: `create_completion` / `create_chat_completion`
(streamed and not), `generate`, `prompt_logprobs`, `embed`, `tokenize`, `detokenize` and `apply_chat_template`
callable from several threads at once, and a streamed iterator closed from the thread that pulls it stops its
sequence. Usage: the last streamed chunk may carry `usage` (prompt_tokens, completion_tokens,
prompt_tokens_details.cached_tokens); a `Llama` that sets `stream_usage = True` promises it, and then non-streamed
requests stream too (cancellable on disconnect). `engine_stats` (a dict of numbers, or a callable returning one) is
exported on /metrics as llamba_engine_<name>.
"""
import asyncio
import base64
import codecs
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WrapValidator,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from llamba.errors import ContextOverflowError, LlambaError
from llamba.textstream import find_stop

DEFAULT_MAX_BODY = 1 << 20
MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (OpenAI: 20 for chat)
MAX_EMBED_INPUTS = 2048  # inputs per embeddings request (OpenAI's limit)
MAX_JSON_DEPTH = 64  # deepest nesting of arrays/objects in a request body
MAX_N = 64  # completions `n`
MAX_CHOICES = 256  # prompts x n in one completions request
MAX_STOP = 16
DEFAULT_STREAM_BUFFER = 1 << 20  # bytes of events held for a streaming client that is not reading
MAX_DRAIN = 64 << 20  # an oversized body up to this size is read and dropped so the client sees the 413
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


# ---------------------------------------------------------------- errors

class APIError(Exception):
    def __init__(self, status: int, message: str, etype: str = "invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.message, self.etype, self.code, self.param = status, message, etype, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.etype, "param": self.param, "code": self.code}}


def _bad(msg, param=None, code=None) -> APIError:
    return APIError(400, msg, param=param, code=code)


_ADDR = re.compile(r" (?:object )?at 0x[0-9a-fA-F]{4,}")


def _line(e, limit: int = 500) -> str:
    """An exception's text on one line, without heap addresses, at most `limit` characters."""
    s = _ADDR.sub("", " ".join(str(e).split()))
    return s if len(s) <= limit else s[:limit] + "..."


def _api_error(e: BaseException) -> APIError:
    """A library error raised for a request -> the HTTP error (4xx for the caller's mistakes)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return _bad(_line(e), code="context_length_exceeded")
    if isinstance(e, LlambaError):
        return _bad(_line(e))
    sys.stderr.write(f"llamba: internal error: {type(e).__name__}: {_line(e)}\n")
    return APIError(500, f"internal error ({type(e).__name__}); the server log has the details", "server_error",
                    "internal_error")


def _dumps(obj) -> bytes:
    # backslashreplace: a lone surrogate that slipped into a string is written as its JSON escape, never a crash
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


class JSONResp(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return _dumps(content)


def _error_response(err: APIError, close: bool = False) -> Response:
    headers = {"connection": "close"} if close else None
    if err.status == 405 and err.param:
        headers = dict(headers or {}, allow=err.param)
        err = APIError(405, err.message, err.etype, err.code)
    return JSONResp(err.body(), status_code=err.status, headers=headers)


async def _send_error(send, err: APIError, close: bool = False):
    """An error answer from a plain ASGI middleware."""
    data = _dumps(err.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


# ---------------------------------------------------------------- the request body

_STR_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SURROGATE_ESC = re.compile(rb"\\u[dD][89a-fA-F]")


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text (brackets inside strings do not count)."""
    a = np.frombuffer(_STR_RE.sub(b"", raw), dtype=np.uint8)
    if not len(a):
        return 0
    step = ((a == 0x5B) | (a == 0x7B)).astype(np.int32) - ((a == 0x5D) | (a == 0x7D))
    return int(np.cumsum(step).max())


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _find_surrogate(obj, path: str = "") -> str | None:
    """The path of the first string (or key) holding a lone UTF-16 surrogate, or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "(body)"
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else str(k)
            if _find_surrogate(k) is not None:
                return (path + "." if path else "") + "(a key)"
            hit = _find_surrogate(v, p)
            if hit is not None:
                return hit
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hit = _find_surrogate(v, f"{path}[{i}]")
            if hit is not None:
                return hit
    return None


def parse_json_body(raw: bytes) -> dict:
    """A request body -> its JSON object, or an APIError (400) that says what is wrong: not UTF-8, not JSON (NaN and
    Infinity are not JSON), nested deeper than MAX_JSON_DEPTH, not an object, a lone surrogate in a string."""
    if not raw.strip():
        raise _bad("the request body is empty; send a JSON object", code="invalid_json")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        d = _json_depth(raw)
        if d > MAX_JSON_DEPTH:
            raise _bad(f"the request body nests arrays/objects {d} levels deep; the limit is {MAX_JSON_DEPTH}",
                       code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise _bad(f"the request body is not valid JSON: {_line(e, 200)}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise _bad("the request body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESC.search(raw):
        where = _find_surrogate(obj)
        if where is not None:
            raise _bad(f"'{where}' holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair), which is "
                       f"not Unicode text", param=where.split(".")[0].split("[")[0], code="invalid_unicode")
    return obj


# ---------------------------------------------------------------- request schemas (pydantic)

def _intish(v):
    """JSON numbers like 2.0 are integers too (the old server took them); 1.5 is not."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_intish)]


def _err(message: str, param: str | None = None):
    return PydanticCustomError("llamba", message.replace("{", "(").replace("}", ")"),
                               {"param": param} if param else None)


def _one_of(tp, message: str):
    """`tp` (a union) whose validation failure is one clear message instead of one per member."""
    def check(v, handler):
        try:
            return handler(v)
        except ValidationError:
            raise _err(message) from None
    return Annotated[tp, WrapValidator(check)]


StopT = _one_of(Union[str, list[str]], f"must be a string or a list of at most {MAX_STOP} strings")
PromptT = _one_of(Union[str, list[str], list[int], list[list[int]]],
                  "must be a string, a list of strings, a list of token ids or a list of lists of token ids")
EmbedInputT = _one_of(Union[str, list[str], list[int], list[list[int]]],
                      "must be a string, a list of strings, a list of token ids or a list of lists of token ids")
ContentT = _one_of(Union[str, list[Union[str, dict[str, Any]]], None],
                   "must be a string, a list of content parts, or null")


class _Strict(BaseModel):
    # strict: "5" is not a number, "yes" is not a bool, 1.5 is not an integer; unknown fields are refused
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


class ChatMessage(BaseModel):
    """An OpenAI chat message; other fields (tool_calls, tool_call_id, reasoning_content...) go to the template."""
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal[CHAT_ROLES]
    content: ContentT = None
    name: Optional[str] = None


class _Sampling(_Strict):
    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0, le=100)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    top_k: Optional[Int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    typical_p: Optional[float] = Field(None, ge=0, le=1)
    repeat_penalty: Optional[float] = Field(None, ge=0, le=100)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[Int] = Field(None, ge=-1, lt=1 << 64)
    stop: Optional[StopT] = None
    logit_bias: Optional[dict[str, float]] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    cache_prompt: Optional[bool] = None  # llama.cpp's; prefix reuse is always on here
    metadata: Any = None
    store: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise _err(f"must be a string or a list of at most {MAX_STOP} strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for k in v or {}:
            if not re.fullmatch(r"-?\d{1,12}", k.strip()):
                raise _err(f"key {k[:20]!r} is not a token id")
        return v


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[Int] = Field(None, ge=1)
    max_completion_tokens: Optional[Int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Int] = Field(None, ge=0, le=MAX_LOGPROBS)
    n: Optional[Int] = Field(None, ge=1, le=MAX_N)
    tools: Optional[list[Any]] = None  # checked by llamba.tools (one message per mistake)
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _err("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        clash = sorted(set(self.chat_template_kwargs or {}) & {"messages", "tools", "add_generation_prompt",
                                                               "tokenize"})
        if clash:
            raise _err(f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")
        return self


class CompletionRequest(_Sampling):
    prompt: PromptT
    max_tokens: Optional[Int] = Field(None, ge=0)
    logprobs: Optional[Int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = None
    n: Optional[Int] = Field(None, ge=1, le=MAX_N)
    best_of: Optional[Int] = Field(None, ge=0, le=MAX_N)
    suffix: Optional[str] = None
    response_format: Optional[dict[str, Any]] = None
    grammar: Optional[str] = None  # llama.cpp GBNF (llama-server's and llama-cpp-python's field)

    @model_validator(mode="after")
    def _check(self):
        if self.suffix:
            raise _err("'suffix' (fill-in-the-middle) is not supported by this server", "suffix")
        if self.max_tokens == 0 and not self.echo:
            raise _err("'max_tokens' must be at least 1 (0 only with 'echo': true, to score the prompt)",
                       "max_tokens")
        if (self.response_format is not None or self.grammar is not None) and self.echo and self.logprobs is not None:
            raise _err("'response_format' / 'grammar' cannot be combined with 'echo' + 'logprobs' (scoring)",
                       "response_format")
        if self.best_of not in (None, 0, 1) and self.best_of != (self.n or 1):
            raise _err("'best_of' other than 'n' is not supported (each choice is returned)", "best_of")
        return self


class EmbeddingRequest(_Strict):
    input: EmbedInputT
    model: Optional[str] = None
    encoding_format: Optional[Literal["float", "base64"]] = None
    dimensions: Optional[Int] = None
    user: Optional[str] = None


class TokenizeRequest(_Strict):
    """llama-server: {"content", "add_special" (false), "parse_special" (true), "with_pieces"};
    vLLM: {"prompt", "add_special_tokens" (true), "return_token_strs"} or {"messages", "add_generation_prompt"}."""
    content: Optional[str] = None
    add_special: Optional[bool] = None
    parse_special: Optional[bool] = None
    with_pieces: Optional[bool] = None
    prompt: Optional[str] = None
    add_special_tokens: Optional[bool] = None
    return_token_strs: Optional[bool] = None
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1)]] = None
    add_generation_prompt: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    model: Optional[str] = None

    @model_validator(mode="after")
    def _check(self):
        given = [k for k in ("content", "prompt", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise _err("give exactly one of 'content' (llama-server), 'prompt' or 'messages' (vLLM)", "prompt")
        return self


class DetokenizeRequest(_Strict):
    tokens: list[int]
    model: Optional[str] = None


def _loc(loc) -> str:
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        else:
            out += f".{x}" if out else str(x)
    return out


def _short(v) -> str:
    try:
        s = json.dumps(v, ensure_ascii=True)
    except (TypeError, ValueError):
        s = type(v).__name__
    return s if len(s) <= 40 else s[:40] + "..."


_TYPE_WORDS = {"int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
               "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
               "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
               "list_type": "a list", "dict_type": "an object", "model_type": "an object",
               "model_attributes_type": "an object"}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "less_than_equal": ("<=", "le"), "greater_than": (">", "gt"),
           "less_than": ("<", "lt")}


def validation_message(err: dict) -> APIError:
    """One pydantic error -> a one-line 400 naming the field."""
    loc = [x for x in err.get("loc", ()) if x != "body"]
    typ = err.get("type", "")
    ctx = err.get("ctx") or {}
    field = _loc(loc)
    param = loc[0] if loc and isinstance(loc[0], str) else None
    if typ == "llamba":
        msg = err.get("msg", "invalid value")
        param = ctx.get("param") or param
        return _bad(f"'{field}' {msg}" if field and not ctx.get("param") else msg, param)
    if not loc:
        if typ in ("missing", "model_attributes_type", "model_type", "dict_type"):
            return _bad("the request body must be a JSON object", code="invalid_json")
        return _bad(f"the request body is invalid: {_line(err.get('msg', ''), 200)}")
    if typ == "extra_forbidden":
        return _bad(f"Unrecognized request argument supplied: {field}", param, "unknown_parameter")
    if typ == "missing":
        return _bad(f"'{field}' is required", param)
    got = f" (got {_short(err.get('input'))})"
    if typ in _TYPE_WORDS:
        return _bad(f"'{field}' must be {_TYPE_WORDS[typ]}{got}", param)
    if typ in _BOUNDS:
        op, key = _BOUNDS[typ]
        return _bad(f"'{field}' must be {op} {ctx.get(key)}{got}", param)
    if typ == "literal_error":
        return _bad(f"'{field}' must be {ctx.get('expected')}{got}", param)
    if typ == "too_short":
        k = ctx.get("min_length", 1)
        return _bad(f"'{field}' must have at least {k} item{'s' if k != 1 else ''}", param)
    if typ == "too_long":
        k = ctx.get("max_length")
        return _bad(f"'{field}' must have at most {k} item{'s' if k != 1 else ''}", param)
    msg = _line(err.get("msg", "invalid value"), 200)
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return _bad(f"'{field}': {msg}", param)


# ---------------------------------------------------------------- admission: slots and the waiting queue

class Gate:
    """`slots` generations at once, granted in arrival order; the others wait (at most `max_queue` of them).
    Event-loop side only (no locks)."""

    def __init__(self, slots: int, max_queue: int):
        self.slots = max(1, int(slots))
        self.max_queue = max_queue
        self.busy = 0
        self._waiters: list[asyncio.Future] = []

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def full(self) -> bool:
        return bool(self.max_queue) and self.waiting >= self.max_queue

    async def acquire(self):
        if self.busy < self.slots and not self.waiting:
            self.busy += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled: pass the slot on
                self.release()
            raise
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def release(self):
        while self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                fut.set_result(None)  # the slot passes to the next waiter (busy unchanged)
                return
        self.busy -= 1


# ---------------------------------------------------------------- worker -> event loop

_GONE = ("gone", -1, None, 0)


_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+

WRITE_THROUGH_S = 0.005  # a worker waits at most this long for the event loop to write the chunk it handed over


class _Pipe:
    """Events of one request's generations, from worker threads to the event loop. `limit` bounds the bytes not yet
    written to the client; a worker that would go over waits (`can_pause`, up to `stall` s) or stops (cancels)."""

    def __init__(self, loop, limit: int, can_pause: bool, stall: float, outbox=None):
        self.loop = loop
        self.q: asyncio.Queue = asyncio.Queue()
        self.cv = threading.Condition()
        self.buffered = 0
        self.limit, self.can_pause, self.stall = limit, can_pause, stall
        self.cancelled = False
        self.overflow = False
        self.outbox = outbox if outbox is not None else _Outbox(loop)
        self.host = None  # the engine whose thread runs this request's generation (Engine.spawn), if it does
        self.parked = False  # its consumer waits for the client to read (then consumed() wakes the engine)

    def _over(self, size: int) -> bool:
        return bool(size and self.limit and self.buffered and self.buffered + size > self.limit)

    def put(self, item, size: int = 0) -> bool:
        """Worker thread: hand an event over; False means stop generating (cancelled or the client is not
        reading)."""
        host = self.host
        if host is not None and host.hosting():
            return self._put_hosted(host, item, size)
        with self.cv:
            if self._over(size):
                if not self.can_pause:
                    self.cancelled = self.overflow = True
                else:
                    deadline = time.monotonic() + self.stall
                    while not self.cancelled and self._over(size):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self.cancelled = self.overflow = True
                            break
                        self.cv.wait(left)
            if self.cancelled and size:
                return False
            self.buffered += size
        if not self.outbox.send(self.q, item):  # the loop is closed (shutdown)
            self.cancel()
            return False
        if size and WRITE_THROUGH_S > 0:
            # let the event loop write it before this thread goes back to generating: the loop then runs between
            # engine steps, not in the middle of one (a third busy thread on a 2-core machine stalls the kernels'
            # parallel regions for whole scheduler time slices: measured 13 -> 8 ms per token for one client)
            with self.cv:
                deadline = time.monotonic() + WRITE_THROUGH_S
                while self.buffered >= size and not self.cancelled:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cv.wait(left)
        return not self.cancelled

    def _put_hosted(self, host, item, size: int) -> bool:
        """put() from a consumer on the engine's thread: it never blocks the thread; waiting for a slow reader
        parks the consumer (the engine steps the other sequences meanwhile)."""
        if self._over(size):
            if not self.can_pause:
                self.cancelled = self.overflow = True
            else:
                deadline = time.monotonic() + self.stall
                self.parked = True
                try:
                    host.park(lambda: self.cancelled or not self._over(size) or time.monotonic() >= deadline)
                finally:
                    self.parked = False
                with self.cv:
                    if not self.cancelled and self._over(size):
                        self.cancelled = self.overflow = True
        with self.cv:
            if self.cancelled and size:
                return False
            self.buffered += size
        if not self.outbox.send(self.q, item):
            self.cancel()
            return False
        return not self.cancelled

    def consumed(self, size: int):
        if size:
            with self.cv:
                self.buffered -= size
                self.cv.notify_all()
            if self.host is not None and self.parked:
                self.host.wake()

    def cancel(self):
        with self.cv:
            self.cancelled = True
            self.cv.notify_all()
        if self.host is not None:
            self.host.wake()


class _Outbox:
    """Events from the generating side to the event loop, handed over in batches: one loop wake-up for all the
    events that arrive before the loop gets to them (every stream's chunk of one engine step, say), not one per
    event."""

    def __init__(self, loop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list = []
        self.scheduled = False

    def send(self, q, item) -> bool:
        with self.lock:
            self.items.append((q, item))
            if self.scheduled:
                return True
            self.scheduled = True
        try:
            if asyncio._get_running_loop() is self.loop:  # the loop's own thread (the engine steps in it)
                self.loop.call_soon(self._drain)
            else:
                self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed
            with self.lock:
                self.scheduled = False
            return False
        return True

    def _drain(self):
        with self.lock:
            items, self.items = self.items, []
            self.scheduled = False
        for q, item in items:
            q.put_nowait(item)


class _Job:
    """One generation (one choice): what to call, how to rewrite its chunks, what to send before it."""

    def __init__(self, index: int, kind: str, n_prompt: int, open_fn, prologue=None):
        self.index, self.kind, self.n_prompt = index, kind, n_prompt
        self.open_fn = open_fn  # (cancelled: () -> bool) -> iterator of library chunks, or None
        self.prologue = prologue  # () -> list of chunks sent first (echo), or None


# ---------------------------------------------------------------- the service (no HTTP here)

class LlambaService:
    """Turns validated requests into `Llama` calls on worker threads, with admission control and counters."""

    def __init__(self, llm, alias: str | None = None, max_queue: int = 64, n_parallel: int = 4,
                 stream_buffer: int = DEFAULT_STREAM_BUFFER, timeout: float | None = 600.0):
        self.llm = llm
        self.alias = alias or os.path.basename(llm.model_path)
        self.concurrent = bool(getattr(llm, "concurrent", False))
        # Streamed chunks without `usage` (today's library): with several generations at once `last_stats` is not
        # this request's, so non-streamed requests use the library's non-streamed calls (exact usage, cached
        # tokens), which cannot be cancelled midway. A library whose last streamed chunk carries `usage` says so
        # with `stream_usage = True`, and every request streams (cancellable).
        self.whole_calls = self.concurrent and not getattr(llm, "stream_usage", False)
        self.n_parallel = max(1, int(n_parallel or 1))
        self.slots = self.n_parallel if self.concurrent else 1
        self.gate = Gate(self.slots, max_queue)
        self.stream_buffer = int(stream_buffer)
        self.timeout = float(timeout) if timeout else 600.0
        self.pool = ThreadPoolExecutor(self.slots, thread_name_prefix="llamba-gen", initializer=self._bind_thread)
        self.prep_pool = ThreadPoolExecutor(2, thread_name_prefix="llamba-prep", initializer=self._bind_thread)
        # embeddings / prompt scoring: not through the batching engine (a generation on the engine's thread that
        # finds it taken parks until it is free: the holder may be waiting for that thread)
        from llamba.scheduler import HostedLock
        self.exclusive = HostedLock(threading.Lock(), getattr(llm, "engine", None))
        self.created = int(time.time())
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "tokens_generated": 0,
                      "tokens_prompt": 0, "last_cancelled_n_gen": None}
        self.by_status: dict[tuple[str, int], int] = {}
        self.pipes: set = set()
        self._outboxes: dict = {}
        # generations run on the engine's thread when it has one of its own (see host_engine); False: on threads
        self.host_consumers = True

    def outbox(self, loop) -> _Outbox:
        """The event loop's outbox (one per loop, shared by every request's pipe)."""
        ob = self._outboxes.get(loop)
        if ob is None:
            ob = self._outboxes[loop] = _Outbox(loop)
        return ob

    def host_engine(self):
        """The batching engine, when generations can run on its own thread (Engine.spawn), else None."""
        if not self.host_consumers or not self.concurrent:
            return None
        eng = getattr(self.llm, "engine", None)
        return eng if eng is not None and hasattr(eng, "can_host") and eng.can_host() else None

    def _bind_thread(self):
        """Numba's thread count is per calling thread: give the worker threads the model's."""
        n = getattr(self.llm, "n_threads", None)
        if n:
            try:
                from llamba.llama import set_threads
                set_threads(n)
            except Exception:  # noqa: BLE001 - a stand-in llm in tests
                pass

    def close(self):
        for p in list(self.pipes):
            p.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.prep_pool.shutdown(wait=False, cancel_futures=True)

    async def prep(self, fn, *args):
        """Tokenization / template rendering / checks, off the event loop (they do not touch the model)."""
        return await asyncio.get_running_loop().run_in_executor(self.prep_pool, fn, *args)

    # ---- info
    def models(self) -> dict:
        llm = self.llm
        m = getattr(llm, "model", None)
        meta = {"n_ctx": llm.n_ctx(), "n_vocab": llm.n_vocab(),
                "arch": m.config.arch if m is not None and hasattr(m, "config") else None}
        return {"object": "list", "data": [{"id": self.alias, "object": "model", "created": self.created,
                                            "owned_by": "llamba", "max_model_len": llm.n_ctx(), "meta": meta}]}

    def health(self) -> dict:
        busy = min(self.gate.busy, self.slots)
        return {"status": "ok", "slots_idle": self.slots - busy, "slots_processing": busy}

    def snapshot(self) -> dict:
        s = dict(self.stats)
        s["queue"] = self.gate.waiting
        s["running"] = self.gate.busy
        return s

    def engine_stats(self) -> dict:
        try:
            st = getattr(self.llm, "engine_stats", None)
            st = st() if callable(st) else st
        except Exception:  # noqa: BLE001 - stats must never break /metrics
            return {}
        return st if isinstance(st, dict) else {}

    def metrics(self) -> str:
        out = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, v in samples:
                lab = "{" + ",".join(f'{k}="{_prom_escape(str(x))}"' for k, x in labels) + "}" if labels else ""
                out.append(f"{name}{lab} {_prom_num(v)}")

        metric("llamba_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
               [((("endpoint", ep), ("status", st)), n) for (ep, st), n in sorted(self.by_status.items())])
        s = self.stats
        metric("llamba_prompt_tokens_total", "counter", "Prompt tokens of generations (per choice).",
               [((), s["tokens_prompt"])])
        metric("llamba_generation_tokens_total", "counter", "Tokens generated.", [((), s["tokens_generated"])])
        metric("llamba_requests_cancelled_total", "counter",
               "Generations stopped early (client gone or not reading).", [((), s["cancelled"])])
        metric("llamba_requests_waiting", "gauge", "Generations waiting for a slot.", [((), self.gate.waiting)])
        metric("llamba_requests_running", "gauge", "Generations running.", [((), self.gate.busy)])
        metric("llamba_slots_total", "gauge", "Generations that can run at once.", [((), self.slots)])
        for k, v in sorted(self.engine_stats().items()):
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                name = "llamba_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", str(k))
                metric(name, "gauge", f"Engine statistic {_prom_escape(str(k))}.", [((), float(v))])
        return "\n".join(out) + "\n"

    # ---- checks (prep threads)
    def _n_ctx(self) -> int:
        return self.llm.n_ctx()

    def _check_ids(self, toks, param: str):
        nv = self.llm.n_vocab()
        for t in toks:
            if not 0 <= t < nv:
                raise _bad(f"'{param}': token id {t} is out of range (vocabulary of {nv})", param, "invalid_token_id")

    def _check_fit(self, toks: list[int], max_tokens, param: str, logit_bias=None, allow_zero: bool = False):
        n_ctx = self._n_ctx()
        if not toks:
            raise _bad("the prompt is empty", param)
        if len(toks) >= n_ctx and not (allow_zero and max_tokens == 0 and len(toks) <= n_ctx):
            raise _bad(f"the prompt has {len(toks)} tokens but the context holds {n_ctx}; shorten it",
                       param, "context_length_exceeded")
        if max_tokens is not None and len(toks) + max_tokens > n_ctx:
            raise _bad(f"this model's context is {n_ctx} tokens, but {len(toks) + max_tokens} were requested "
                       f"({len(toks)} in the prompt, {max_tokens} for the completion); lower max_tokens",
                       "max_tokens", "context_length_exceeded")

    def _logit_bias(self, lb) -> dict | None:
        if not lb:
            return None
        out = {int(k): float(v) for k, v in lb.items()}
        nv = self.llm.n_vocab()
        bad = [t for t in out if not 0 <= t < nv]
        if bad:
            raise _bad(f"logit_bias token id {bad[0]} is out of range (vocabulary of {nv})", "logit_bias")
        return out

    def sampling_kwargs(self, req: _Sampling) -> dict:
        kw = {}
        for k in ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                  "frequency_penalty", "seed"):
            v = getattr(req, k)
            if v is not None:
                kw[k] = v
        if req.stop is not None:
            stops = [req.stop] if isinstance(req.stop, str) else req.stop
            stops = [s for s in stops if s]
            if stops:
                kw["stop"] = stops
        lb = self._logit_bias(req.logit_bias)
        if lb:
            kw["logit_bias"] = lb
        return kw

    def constraint_kwargs(self, req) -> dict:
        """response_format / grammar for the library, compiled once here so that an invalid one is a 400."""
        kw = {}
        if getattr(req, "response_format", None) is not None:
            kw["response_format"] = req.response_format
        if getattr(req, "grammar", None) is not None:
            kw["grammar"] = req.grammar
        if kw:
            try:
                self.llm.compile_constraint(**kw)
            except LlambaError as e:
                raise _bad(_line(e), "grammar" if "grammar" in kw else "response_format") from None
        return kw

    def _seeds(self, seed, n: int) -> list:
        """Per-choice seeds: choice j of a prompt uses seed + j (a random base when none is given)."""
        if n == 1:
            return [seed]
        if seed is None or seed == -1:
            s = getattr(self.llm, "seed", None)
            from_server = isinstance(s, int) and 0 <= s < 0xFFFFFFFF
            seed = s if from_server else secrets.randbelow(1 << 31)
        return [seed + j for j in range(n)]

    # ---- preparation (prep threads): validation that needs the tokenizer -> jobs
    def prepare_chat(self, req: ChatCompletionRequest) -> tuple[list[_Job], dict]:
        llm = self.llm
        kw = self.sampling_kwargs(req)
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        msgs = [m.model_dump(exclude_unset=True) for m in req.messages]
        tkw = dict(req.chat_template_kwargs or {})
        from llamba.tools import ToolError
        try:
            toks, plan = llm.chat_prompt(msgs, req.tools, req.tool_choice, req.parallel_tool_calls, tkw)
        except ToolError as e:
            msg = _line(e)
            param = next((p for p in ("tool_choice", "parallel_tool_calls", "tools") if msg.startswith(p)),
                         "messages" if msg.startswith("messages") else "tools")
            raise _bad(msg, param) from None
        except LlambaError as e:
            raise _bad(_line(e), "messages") from None
        if plan.constrained:  # the tool-call grammar, compiled once here so that a bad schema is a 400
            try:
                llm.chat_constraint(plan, req.response_format)
            except LlambaError as e:
                raise _bad(_line(e), "tools" if req.response_format is None else "response_format") from None
        else:
            kw.update(self.constraint_kwargs(req))
        for k in ("tools", "tool_choice", "parallel_tool_calls", "response_format"):
            if getattr(req, k) is not None:
                kw[k] = getattr(req, k)
        self._check_fit(toks, mt, "messages")
        if mt is not None:
            kw["max_tokens"] = mt
        if req.logprobs:
            kw["logprobs"] = True
            kw["top_logprobs"] = req.top_logprobs or 0

        whole = not req.stream and self.whole_calls

        def job(index, jkw):
            def open_fn(cancelled):
                out = llm.create_chat_completion(msgs, stream=not whole, chat_template_kwargs=tkw, **jkw)
                return iter([out]) if whole else out
            return _Job(index, "chat", len(toks), open_fn)

        n = req.n or 1
        jobs = []
        for j, seed in enumerate(self._seeds(kw.get("seed"), n)):
            jkw = dict(kw)
            if seed is not None:
                jkw["seed"] = seed
            jobs.append(job(j, jkw))
        return jobs, {"n_prompt": len(toks)}

    def prepare_completion(self, req: CompletionRequest) -> tuple[list[_Job], dict]:
        llm = self.llm
        kw = self.sampling_kwargs(req)
        kw.update(self.constraint_kwargs(req))
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts:
            raise _bad("'prompt' is empty: give a string, a list of strings or token ids", "prompt")
        n = req.n or 1
        if len(prompts) * n > MAX_CHOICES:
            raise _bad(f"{len(prompts)} prompts x n={n} is over the limit of {MAX_CHOICES} choices per request",
                       "prompt")
        mt = req.max_tokens
        n_lp = req.logprobs
        echo = bool(req.echo)
        jobs, n_prompt = [], 0
        for i, pr in enumerate(prompts):
            if isinstance(pr, str):
                toks = llm.tokenize(pr.encode("utf-8"), add_bos=True, special=True)
                text = pr
            else:
                toks = [int(t) for t in pr]
                self._check_ids(toks, "prompt")
                text = None
            self._check_fit(toks, mt, "prompt", allow_zero=echo)
            n_prompt += len(toks)
            if echo and text is None:
                text = llm.detokenize(toks).decode("utf-8", errors="replace")
            for j, seed in enumerate(self._seeds(kw.get("seed"), n)):
                jkw = dict(kw)
                if seed is not None:
                    jkw["seed"] = seed
                jobs.append(self._completion_job(i * n + j, toks, text if isinstance(pr, str) else None,
                                                 text, mt, n_lp, echo, jkw, bool(req.stream)))
        return jobs, {"n_prompt": n_prompt}

    def _completion_job(self, index, toks, prompt_text, echo_text, max_tokens, n_lp, echo, kw,
                        stream: bool) -> _Job:
        llm = self.llm
        if echo and n_lp is not None:  # scoring (lm-evaluation-harness): every token gets its entry
            return _Job(index, "completion", len(toks),
                        lambda cancelled: self._scored(toks, echo_text, max_tokens, n_lp, kw, cancelled))

        def open_fn(cancelled):
            if max_tokens == 0:
                return None
            # a text prompt goes in as text (so text offsets count its characters); it tokenizes as above
            src = prompt_text if prompt_text is not None else toks
            if not stream and (n_lp is not None or self.whole_calls):
                # the library's non-streamed call, as one chunk (not cancellable midway): its layout and offsets
                # of the generated tokens' logprobs (llama-cpp-python's, which is OpenAI's without echo), its usage
                return iter([llm.create_completion(src, max_tokens=max_tokens or -1, special=True, logprobs=n_lp,
                                                   keep_scores=False, **kw)])
            return llm.create_completion(src, max_tokens=max_tokens or -1, stream=True, special=True,
                                         logprobs=n_lp, keep_scores=False, **kw)

        prologue = (lambda: [{"text": echo_text, "logprobs": None}]) if echo else None
        return _Job(index, "completion", len(toks), open_fn, prologue)

    def _scored(self, toks, echo_text, max_tokens, n, kw, cancelled):
        """An `echo` + `logprobs` completion laid out as OpenAI and vLLM lay it out: one entry per token, prompt
        and generated (an end-of-generation token included, as vLLM does); entry 0 has no logprob, entry i is
        scored from the logits after tokens[:i] with its top-n alternatives (and itself) in `top_logprobs`;
        `text_offset` counts characters of the returned text. The tokens are generated with `Llama.generate` and
        all of them scored in one `Llama.prompt_logprobs` pass. Yields one library-shaped chunk."""
        llm = self.llm
        gen, text, finish = [], "", "length"
        starts = []  # characters of generated text before each generated token
        if max_tokens != 0:
            tk = getattr(llm, "tokenizer", None)
            is_eog = getattr(tk, "is_eog", None) or (lambda t: t == llm.token_eos())
            stops = kw.get("stop") or []
            budget = max_tokens or (llm.n_ctx() - len(toks))
            gkw = {k: v for k, v in kw.items() if k != "stop"}
            if "temperature" in gkw:
                gkw["temp"] = gkw.pop("temperature")
            dec = codecs.getincrementaldecoder("utf-8")("replace")
            it = llm.generate(toks, max_tokens=budget, **gkw)
            try:
                for t in it:
                    starts.append(len(text))
                    gen.append(int(t))
                    if is_eog(t):
                        finish = "stop"
                        break
                    text += dec.decode(llm.detokenize([t]))
                    hit = find_stop(text, stops)
                    if hit is not None:
                        text, finish = text[:hit], "stop"
                        while gen and starts[-1] >= hit:  # tokens wholly inside the stop string
                            gen.pop()
                            starts.pop()
                        break
                    if len(gen) >= budget or cancelled():
                        break
            finally:
                it.close()
            if finish == "length":
                text += dec.decode(b"", final=True)
        if cancelled():
            return
        full = list(toks) + gen
        if self.concurrent:
            with self.exclusive:
                scored = llm.prompt_logprobs(full, n)
        else:
            scored = llm.prompt_logprobs(full, n)
        cache: dict[int, str] = {}

        def piece(t):
            s = cache.get(t)
            if s is None:
                s = cache[t] = llm.detokenize([t], special=True).decode("utf-8", errors="ignore")
            return s

        bos = llm.token_bos()
        pdec = codecs.getincrementaldecoder("utf-8")("ignore")
        pos = 0
        lp = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        n_echo = len(echo_text)
        for i, t in enumerate(full):
            s = piece(t)
            lp["tokens"].append(s)
            if i < len(toks):
                lp["text_offset"].append(pos)
                b = llm.detokenize([t])  # detokenize(toks)'s text: no control tokens, one space dropped after BOS
                if i == 1 and toks[0] == bos and b[:1] == b" ":
                    b = b[1:]
                pos += len(pdec.decode(b))
            else:
                lp["text_offset"].append(n_echo + starts[i - len(toks)])
            if i == 0:
                lp["token_logprobs"].append(None)
                lp["top_logprobs"].append(None)
                continue
            v, top = scored[i - 1]
            d: dict[str, float] = {}
            for k, x in list(top) + [(t, v)]:  # ids with the same text share a key: it keeps the higher logprob
                key = piece(k)
                d[key] = max(d.get(key, -math.inf), x)
            lp["token_logprobs"].append(v)
            lp["top_logprobs"].append(d)
        yield {"choices": [{"text": echo_text + text, "logprobs": lp, "finish_reason": finish}],
               "usage": {"prompt_tokens": len(toks), "completion_tokens": len(gen), "total_tokens": len(full)}}

    def prepare_embeddings(self, req: EmbeddingRequest) -> list[str]:
        llm = self.llm
        inp = req.input
        if isinstance(inp, str):
            inputs = [inp]
        elif inp and all(isinstance(x, int) for x in inp):
            inputs = [list(inp)]
        else:
            inputs = list(inp)
        if not inputs:
            raise _bad("'input' must not be empty", "input")
        if len(inputs) > MAX_EMBED_INPUTS:
            raise _bad(f"at most {MAX_EMBED_INPUTS} inputs per request", "input")
        if req.dimensions is not None and req.dimensions != llm.n_embd():
            raise _bad(f"this model's embeddings have {llm.n_embd()} dimensions; 'dimensions' cannot change that",
                       "dimensions")
        from llamba.llama import POOLING_NAMES, POOLING_NONE
        pt = llm.pooling_type()
        if pt == POOLING_NONE:
            raise _bad("this model has no pooling type (its embeddings are per token); start the server with "
                       "--pooling mean|cls|last", "input")
        if pt not in POOLING_NAMES or POOLING_NAMES[pt] == "rank":
            raise _bad(f"pooling type {POOLING_NAMES.get(pt, pt)} cannot produce embeddings", "input")
        sess = getattr(llm, "session", None)
        limit = min(getattr(sess, "n_batch", 0) or 512, llm.n_ctx())
        texts = []
        for i, x in enumerate(inputs):
            where = "input" if len(inputs) == 1 else f"input[{i}]"
            if isinstance(x, str):
                if not x:
                    raise _bad(f"'{where}' is an empty string", "input")
                toks = llm.tokenize(x.encode("utf-8"))
                text = x
            else:
                ids = [int(t) for t in x]
                if not ids:
                    raise _bad(f"'{where}' is an empty list of token ids", "input")
                self._check_ids(ids, "input")
                text, toks = self._ids_as_text(ids, where)
            if len(toks) > limit:
                raise _bad(f"'{where}' has {len(toks)} tokens; embeddings take at most {limit} (the batch size, "
                           f"-b, and the context); split it", "input", "context_length_exceeded")
            if not toks:
                raise _bad(f"'{where}' has no tokens", "input")
            texts.append(text)
        return texts

    def _ids_as_text(self, ids: list[int], where: str):
        """Token-id embedding input -> the text that tokenizes back to exactly those ids (with the BOS the model
        adds), so what is embedded is what was sent; ids that do not round-trip are refused, not approximated."""
        llm = self.llm
        try:
            text = llm.detokenize(ids).decode("utf-8")
        except UnicodeDecodeError:
            text = None
        toks = llm.tokenize(text.encode("utf-8")) if text else []
        bos = llm.token_bos()
        if text and (toks == ids or (toks and toks[0] == bos and toks[1:] == ids)):
            return text, toks
        raise _bad(f"the token ids of '{where}' are not this model's tokenization of any text (they do not "
                   f"round-trip); send the text", "input")

    def embeddings(self, texts: list[str], fmt: str) -> dict:
        llm = self.llm
        try:
            embeds, total = llm.embed(texts, truncate=False, return_count=True)
        except ValueError as e:  # e.g. "Requested tokens (...) exceed batch size"
            raise _bad(_line(e), "input") from None
        data = []
        for i, e in enumerate(embeds):
            v = base64.b64encode(np.asarray(e, dtype="<f4").tobytes()).decode("ascii") if fmt == "base64" else e
            data.append({"object": "embedding", "index": i, "embedding": v})
        return {"object": "list", "data": data, "model": self.alias,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    def tokenize(self, req: TokenizeRequest) -> dict:
        llm = self.llm
        if req.messages is not None:
            msgs = [m.model_dump(exclude_unset=True) for m in req.messages]
            agp = True if req.add_generation_prompt is None else req.add_generation_prompt
            try:
                toks = llm.apply_chat_template(msgs, add_generation_prompt=agp, tools=req.tools, tokenize=True,
                                               **(req.chat_template_kwargs or {}))
            except LlambaError as e:
                raise _bad(_line(e), "messages") from None
        elif req.content is not None:  # llama-server
            toks = llm.tokenize(req.content.encode("utf-8"), add_bos=bool(req.add_special),
                                special=req.parse_special is not False)
        else:  # vLLM (special tokens in the text are parsed, as HF tokenizers do)
            toks = llm.tokenize(req.prompt.encode("utf-8"), add_bos=req.add_special_tokens is not False,
                                special=True)
        out: dict = {"tokens": toks, "count": len(toks), "max_model_len": llm.n_ctx()}
        if req.with_pieces:
            pieces = []
            for t in toks:
                b = llm.detokenize([t], special=True)
                try:
                    p = b.decode("utf-8")
                except UnicodeDecodeError:
                    p = list(b)
                pieces.append({"id": t, "piece": p})
            out["tokens"] = pieces
        if req.return_token_strs:
            out["token_strs"] = [llm.detokenize([t], special=True).decode("utf-8", errors="replace") for t in toks]
        return out

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self._check_ids(req.tokens, "tokens")
        s = self.llm.detokenize(req.tokens, special=True).decode("utf-8", errors="replace")
        return {"content": s, "prompt": s}

    def tokenizer_info(self) -> dict:
        llm = self.llm
        tk = getattr(llm, "tokenizer", None)

        def text(i):
            if i is None or not isinstance(i, int) or i < 0 or i >= llm.n_vocab():
                return None
            return llm.detokenize([i], special=True).decode("utf-8", errors="replace")

        try:
            tmpl = llm.get_chat_template().source
        except (LlambaError, AttributeError):
            tmpl = None
        meta = getattr(llm, "metadata", {}) or {}
        return {"tokenizer_class": "LlambaTokenizer", "model": self.alias,
                "tokenizer_model": meta.get("tokenizer.ggml.model"),
                "bos_token": text(llm.token_bos()), "eos_token": text(llm.token_eos()),
                "pad_token": text(getattr(tk, "pad_id", None)), "unk_token": text(getattr(tk, "unk_id", None)),
                "add_bos_token": bool(getattr(tk, "add_bos", False)),
                "add_eos_token": bool(getattr(tk, "add_eos", False)),
                "chat_template": tmpl, "model_max_length": llm.n_ctx(), "vocab_size": llm.n_vocab()}

    # ---- generation (worker threads)
    def work(self, job: _Job, pipe: _Pipe, stream: bool, rid: str, created: int):
        """Run one job in this worker thread: pull its iterator, hand each rewritten chunk to the event loop.
        Holds a slot (the caller's), never writes to a socket."""
        llm = self.llm
        it = None
        count = 0
        usage = None

        def post(chunk) -> bool:
            if stream:
                data = b"data: " + _dumps(chunk) + b"\n\n"
                return pipe.put(("data", job.index, data, len(data)), len(data))
            return pipe.put(("data", job.index, chunk, 0))

        try:
            if pipe.cancelled:
                return
            if job.prologue is not None:
                for c in job.prologue():
                    ch = {"text": c["text"], "index": job.index, "logprobs": c["logprobs"], "finish_reason": None}
                    if not post(self._wrap(job, rid, created, ch)):
                        return
            it = job.open_fn(lambda: pipe.cancelled)
            if it is not None:
                for chunk in it:
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if not chunk.get("choices"):
                        continue
                    ch = dict(chunk["choices"][0], index=job.index)
                    count += 1
                    if not post(self._wrap(job, rid, created, ch)):
                        break
                    if pipe.cancelled:
                        break
        except Exception as e:  # noqa: BLE001 - LlambaError -> 400, anything else -> 500; the server goes on
            pipe.put(("error", job.index, _api_error(e), 0))
        finally:
            if it is not None:
                try:
                    it.close()  # stops the generation (the generator's finally ends the decode loop)
                except Exception:  # noqa: BLE001
                    pass
            info = self._gen_info(job, usage, count, it is not None, pipe)
            try:  # counted on the event loop, whether or not the request is still there to read it
                pipe.loop.call_soon_threadsafe(self.record_end, info)
            except RuntimeError:
                pass
            pipe.put(("end", job.index, info, 0))

    def _wrap(self, job, rid, created, choice) -> dict:
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": self.alias, "choices": [choice]}

    def _gen_info(self, job, usage, count, ran, pipe) -> dict:
        n_gen, cached = 0, 0
        if usage:
            n_gen = int(usage.get("completion_tokens") or 0)
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        elif ran and not self.concurrent:
            st = getattr(self.llm, "last_stats", None)  # this job held the model: these are its stats
            n_gen = getattr(st, "n_gen", 0) if st else 0
            cached = getattr(st, "n_reused", 0) if st else 0
        elif ran:
            n_gen = count
        return {"n_gen": n_gen, "cached": cached, "cancelled": pipe.cancelled, "overflow": pipe.overflow,
                "n_prompt": job.n_prompt}

    def record_end(self, info: dict):
        self.stats["tokens_generated"] += info["n_gen"]
        self.stats["tokens_prompt"] += info["n_prompt"]
        if info["cancelled"]:
            self.stats["cancelled"] += 1
            self.stats["last_cancelled_n_gen"] = info["n_gen"]


def _prom_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _prom_num(v) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1 << 53 else repr(v)


# ---------------------------------------------------------------- one request in flight

class _Run:
    """A generation request's jobs: launched through the gate, their events consumed on the event loop; a client
    disconnect (seen by `watch`) cancels them."""

    def __init__(self, svc: LlambaService, jobs: list[_Job], stream: bool):
        self.svc, self.jobs, self.stream = svc, jobs, stream
        self.rid = f"{'chatcmpl' if jobs[0].kind == 'chat' else 'cmpl'}-{uuid.uuid4()}"
        self.created = int(time.time())
        loop = asyncio.get_running_loop()
        # a generation paused for a client that does not read holds its slot: for 30 s at most, then it is cut
        self.pipe = _Pipe(loop, svc.stream_buffer if stream else 0, svc.concurrent, min(svc.timeout, 30.0),
                          svc.outbox(loop))
        self.tasks: list[asyncio.Task] = []
        self.watcher = None
        self.gone = False
        self.ended = 0

    def start(self, receive):
        self.svc.pipes.add(self.pipe)
        self.watcher = asyncio.create_task(self._watch(receive))
        self.tasks = [asyncio.create_task(self._launch(j)) for j in self.jobs]

    async def _launch(self, job: _Job):
        svc = self.svc
        await svc.gate.acquire()
        if self.pipe.cancelled:
            svc.gate.release()
            return
        loop = asyncio.get_running_loop()
        eng = svc.host_engine()
        if eng is not None:  # the generation's per-token work runs on the engine's thread (Engine.spawn)
            self.pipe.host = eng

            def done(_err, loop=loop):
                try:
                    loop.call_soon_threadsafe(svc.gate.release)
                except RuntimeError:  # the loop is closed (shutdown)
                    pass
            eng.spawn(svc.work, job, self.pipe, self.stream, self.rid, self.created, on_done=done)
            return
        try:
            fut = loop.run_in_executor(svc.pool, svc.work, job, self.pipe, self.stream, self.rid, self.created)
        except RuntimeError:  # the pool is shut down
            svc.gate.release()
            return
        fut.add_done_callback(lambda f: svc.gate.release())  # the slot frees when the thread is done with it

    async def _watch(self, receive):
        try:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    self.gone = True
                    self.cancel()
                    self.pipe.q.put_nowait(_GONE)
                    return
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            return

    def cancel(self):
        self.pipe.cancel()
        for t in self.tasks:
            t.cancel()

    async def next(self):
        item = await self.pipe.q.get()
        self.pipe.consumed(item[3])
        if item[0] == "end":
            self.ended += 1
        return item

    def pending(self) -> list:
        """Items already queued (to batch several events into one write)."""
        out = []
        while not self.pipe.q.empty():
            item = self.pipe.q.get_nowait()
            self.pipe.consumed(item[3])
            if item[0] == "end":
                self.ended += 1
            out.append(item)
        return out

    def done(self) -> bool:
        return self.ended >= len(self.jobs)

    def close(self):
        self.cancel()
        if self.watcher is not None:
            self.watcher.cancel()
        self.svc.pipes.discard(self.pipe)


def _usage(n_prompt: int, infos: list[dict]) -> dict:
    n_gen = sum(i["n_gen"] for i in infos)
    cached = sum(i["cached"] for i in infos)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen,
            "prompt_tokens_details": {"cached_tokens": cached}}


class GenerationResponse(Response):
    """Runs a generation request when the response is sent (so a disconnect while queued or generating cancels
    it): a JSON body after all choices are done, or server-sent events as they come."""

    def __init__(self, svc: LlambaService, jobs: list[_Job], info: dict, stream: bool, include_usage: bool):
        super().__init__()
        self.svc, self.jobs, self.info, self.stream, self.include_usage = svc, jobs, info, stream, include_usage

    async def __call__(self, scope, receive, send):
        run = _Run(self.svc, self.jobs, self.stream)
        run.start(receive)
        try:
            if self.stream:
                await self._stream(run, send, scope)
            else:
                await self._whole(run, send, scope)
        finally:
            run.close()

    async def _error(self, scope, send, err: APIError):
        self.svc.stats["errors"] += 1
        await _error_response(err)(scope, None, send)

    async def _whole(self, run: _Run, send, scope):
        parts: dict[int, list] = {j.index: [] for j in self.jobs}
        infos: dict[int, dict] = {}
        while not run.done():
            kind, idx, payload, _ = await run.next()
            if kind == "gone":
                return
            if kind == "error":
                run.cancel()
                return await self._error(scope, send, payload)
            if kind == "data":
                parts[idx].append(payload)
            elif kind == "end":
                infos[idx] = payload
        if run.pipe.cancelled:
            return
        kind = self.jobs[0].kind
        choices = [(_chat_choice if kind == "chat" else _completion_choice)(i, parts[i]) for i in sorted(parts)]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        body = {"id": run.rid, "object": obj, "created": run.created, "model": self.svc.alias, "choices": choices,
                "usage": _usage(self.info["n_prompt"], list(infos.values()))}
        self.svc.stats["completed"] += 1
        await JSONResp(body)(scope, None, send)

    async def _stream(self, run: _Run, send, scope):
        svc = self.svc
        first = await run.next()
        while first[0] == "end" and not run.done():  # a job that produced nothing: wait for the next event
            first = await run.next()
        if first[0] == "gone":
            return
        if first[0] == "error":
            run.cancel()
            return await self._error(scope, send, first[2])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})
        infos, items, failed = [], [first], False
        while True:
            buf = []
            for kind, idx, payload, _ in items:
                if kind == "data":
                    buf.append(payload)
                elif kind == "end":
                    infos.append(payload)
                elif kind == "error" and not failed:  # after the headers: reported in-band, then the end
                    svc.stats["errors"] += 1
                    buf.append(b"data: " + _dumps(payload.body()) + b"\n\n")
                    failed = True
                    run.cancel()
                elif kind == "gone":
                    return
            if buf and not await self._write(send, b"".join(buf), True):
                return
            if failed:
                await self._write(send, b"", False)
                return
            if run.pipe.overflow:
                return  # the client stopped reading: its generation was stopped, the stream is cut
            if run.done():
                break
            items = [await run.next()] + run.pending()
        tail = b""
        if self.include_usage:
            obj = "chat.completion.chunk" if self.jobs[0].kind == "chat" else "text_completion"
            tail += b"data: " + _dumps({"id": run.rid, "object": obj, "created": run.created, "model": svc.alias,
                                        "choices": [], "usage": _usage(self.info["n_prompt"], infos)}) + b"\n\n"
        svc.stats["completed"] += 1
        await self._write(send, tail + b"data: [DONE]\n\n", False)

    async def _write(self, send, data: bytes, more: bool) -> bool:
        """One write; False when the client has not taken it within the timeout (then the stream is dropped)."""
        msg = {"type": "http.response.body", "body": data, "more_body": more}
        try:
            if _timeout is not None:  # (no task per write, as wait_for makes one)
                async with _timeout(self.svc.timeout):
                    await send(msg)
            else:
                await asyncio.wait_for(send(msg), self.svc.timeout)
            return True
        except (TimeoutError, asyncio.TimeoutError):
            return False


def _chat_choice(index: int, chunks: list[dict]) -> dict:
    text, finish, lps, want_lp = [], None, [], False
    calls: dict[int, dict] = {}
    for c in chunks:
        ch = c["choices"][0]
        d = ch.get("delta") or ch.get("message") or {}
        if d.get("content"):
            text.append(d["content"])
        for k, tc in enumerate(d.get("tool_calls") or ()):  # a whole message's calls, or streamed fragments
            i = tc.get("index", k)
            f = tc.get("function") or {}
            if "delta" not in ch:
                calls[i] = {"id": tc.get("id"), "type": "function",
                            "function": {"name": f.get("name"), "arguments": f.get("arguments") or ""}}
                continue
            call = calls.setdefault(i, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
            if tc.get("id"):
                call["id"] = tc["id"]
            if f.get("name"):
                call["function"]["name"] = f["name"]
            call["function"]["arguments"] += f.get("arguments") or ""
        if ch.get("logprobs") is not None:
            want_lp = True
            lps += ch["logprobs"].get("content") or []
        if ch.get("finish_reason"):
            finish = ch["finish_reason"]
    message = {"role": "assistant", "content": "".join(text)}
    if calls:
        message = {"role": "assistant", "content": "".join(text) or None, "tool_calls": [calls[i] for i in
                                                                                     sorted(calls)]}
    return {"index": index, "message": message,
            "logprobs": {"content": lps, "refusal": None} if want_lp else None, "finish_reason": finish or "length"}


def _completion_choice(index: int, chunks: list[dict]) -> dict:
    text, finish, lp = [], None, None
    for c in chunks:
        ch = c["choices"][0]
        text.append(ch.get("text") or "")
        if ch.get("logprobs") is not None:
            if lp is None:
                lp = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
            for k in lp:
                lp[k] += ch["logprobs"].get(k) or []
        if ch.get("finish_reason"):
            finish = ch["finish_reason"]
    return {"text": "".join(text), "index": index, "logprobs": lp, "finish_reason": finish or "length"}


# ---------------------------------------------------------------- ASGI middlewares

_KNOWN_PATHS = {"/health", "/v1/health", "/v1/models", "/models", "/metrics", "/stats", "/v1/completions",
                "/completions", "/v1/chat/completions", "/chat/completions", "/v1/embeddings", "/embeddings",
                "/tokenize", "/v1/tokenize", "/detokenize", "/v1/detokenize", "/tokenizer_info",
                "/v1/tokenizer_info", "/openapi.json"}
_JSON_POSTS = {"/v1/completions", "/completions", "/v1/chat/completions", "/chat/completions", "/v1/embeddings",
               "/embeddings", "/tokenize", "/v1/tokenize", "/detokenize", "/v1/detokenize"}
_OPEN_PATHS = {"/health", "/v1/health"}


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k == name:
            return v
    return None


class MetricsMiddleware:
    """Outermost: counts answers by endpoint and status, and normalizes a trailing slash of the path."""

    def __init__(self, app, svc: LlambaService):
        self.app, self.svc = app, svc

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
            path = scope["path"]
        status = [None]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        except Exception as e:  # noqa: BLE001 - anything unexpected: a one-line 500, no traceback to anyone
            self.svc.stats["errors"] += 1
            err = _api_error(e)
            if status[0] is None:
                try:
                    await _send_error(send_, err, close=True)
                except Exception:  # noqa: BLE001 - the client is gone
                    status[0] = 500
        finally:
            ep = path if path in _KNOWN_PATHS else "other"
            key = (ep, status[0] or 499)  # 499: the client went away before an answer (nginx's code)
            self.svc.by_status[key] = self.svc.by_status.get(key, 0) + 1


class AuthMiddleware:
    """`Authorization: Bearer KEY` on everything but /health (CORS preflights are answered further out)."""

    def __init__(self, app, api_key: str):
        self.app, self.want = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        got = _header(scope, b"authorization") or b""
        if hmac.compare_digest(got, self.want):
            return await self.app(scope, receive, send)
        await _send_error(send, APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                         "authentication_error", "invalid_api_key"))


class BodyMiddleware:
    """Reads every request body here, with its limits: 413 over `max_body` (an oversized body is read and dropped
    first, up to MAX_DRAIN, so the client sees the answer instead of a reset), 408 when it does not arrive within
    `timeout` s; the JSON endpoints' bodies are parsed here with the depth and Unicode checks (400) before the
    routes' pydantic validation sees them, and marked application/json whatever Content-Type said."""

    def __init__(self, app, svc: LlambaService, max_body: int, timeout: float):
        self.app, self.svc, self.max_body, self.timeout = app, svc, max_body, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        cl = _header(scope, b"content-length")
        declared = None
        if cl is not None:
            try:
                declared = int(cl)
                if declared < 0:
                    raise ValueError
            except ValueError:
                return await _send_error(send, _bad("invalid Content-Length header"), close=True)
        expects = _header(scope, b"expect") is not None
        if declared is not None and declared > self.max_body:
            if declared <= MAX_DRAIN and not expects:
                await self._drain(receive, declared)
            return await _send_error(send, self._too_large(declared), close=True)
        chunks, n = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await _send_error(send, APIError(408, f"the request body did not arrive within "
                                                             f"{self.timeout:g} s", code="request_timeout"),
                                         close=True)
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            n += len(body)
            if n > self.max_body:
                if msg.get("more_body", False):
                    await self._drain(receive, MAX_DRAIN - n)
                return await _send_error(send, self._too_large(n, more=True), close=True)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        raw = b"".join(chunks)
        if scope["path"] in _JSON_POSTS:
            try:
                parse_json_body(raw)
            except APIError as e:
                self.svc.stats["errors"] += 1
                return await _send_error(send, e)
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, n: int, more: bool = False) -> APIError:
        size = f"over {self.max_body} bytes" if more else f"of {n} bytes"
        return APIError(413, f"request body {size} is over the limit of {self.max_body} bytes (--max-body)",
                        code="request_too_large")

    async def _drain(self, receive, budget: int):
        deadline = time.monotonic() + min(self.timeout, 10.0)
        try:
            while budget > 0:
                msg = await asyncio.wait_for(receive(), max(0.01, deadline - time.monotonic()))
                if msg["type"] != "http.request":
                    return
                budget -= len(msg.get("body", b""))
                if not msg.get("more_body", False):
                    return
        except asyncio.TimeoutError:
            return


# ---------------------------------------------------------------- the app

def create_app(svc: LlambaService, *, max_body: int = DEFAULT_MAX_BODY, api_key: str | None = None,
               cors_origins=(), read_timeout: float = 30.0) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        svc.close()

    app = FastAPI(title="llamba", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan,
                  redirect_slashes=False,
                  description="OpenAI-compatible completions, chat, embeddings; llama-server and vLLM tokenizer "
                              "endpoints.")

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        svc.stats["errors"] += 1
        errs = exc.errors()
        return _error_response(validation_message(errs[0]) if errs else _bad("invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        path = request.url.path
        if exc.status_code == 404:
            return _error_response(APIError(404, f"unknown path {path}", code="not_found"))
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "POST")
            return _error_response(APIError(405, f"use {allow.replace(', ', ' or ')} for {path}",
                                            code="method_not_allowed", param=allow))
        return _error_response(APIError(exc.status_code, _line(exc.detail), code=None))

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        if exc.status >= 400:
            svc.stats["errors"] += 1
        return _error_response(exc)

    @app.exception_handler(LlambaError)
    async def on_llamba(request: Request, exc: LlambaError):
        svc.stats["errors"] += 1
        return _error_response(_api_error(exc))

    # ---- GET
    @app.get("/health", tags=["server"])
    @app.get("/v1/health", include_in_schema=False)
    async def health():
        return JSONResp(svc.health())

    @app.get("/v1/models", tags=["openai"])
    @app.get("/models", include_in_schema=False)
    async def models():
        return JSONResp(svc.models())

    @app.get("/stats", tags=["server"])
    async def stats():
        return JSONResp(svc.snapshot())

    @app.get("/metrics", tags=["server"])
    async def metrics():
        return Response(svc.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/tokenizer_info", tags=["tokenizer"])
    @app.get("/v1/tokenizer_info", include_in_schema=False)
    async def tokenizer_info():
        return JSONResp(await svc.prep(svc.tokenizer_info))

    # ---- POST
    def _admit():
        if svc.gate.full():
            raise APIError(503, "the server is busy (request queue full); retry later", "server_error", "queue_full")

    async def _generation(req, prepare):
        svc.stats["requests"] += 1
        jobs, info = await svc.prep(prepare, req)
        _admit()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return GenerationResponse(svc, jobs, info, bool(req.stream), include_usage)

    @app.post("/v1/chat/completions", tags=["openai"])
    @app.post("/chat/completions", include_in_schema=False)
    async def chat(req: ChatCompletionRequest):
        return await _generation(req, svc.prepare_chat)

    @app.post("/v1/completions", tags=["openai"])
    @app.post("/completions", include_in_schema=False)
    async def completions(req: CompletionRequest):
        return await _generation(req, svc.prepare_completion)

    @app.post("/v1/embeddings", tags=["openai"])
    @app.post("/embeddings", include_in_schema=False)
    async def embeddings(req: EmbeddingRequest):
        svc.stats["requests"] += 1
        texts = await svc.prep(svc.prepare_embeddings, req)
        _admit()
        fmt = req.encoding_format or "float"
        await svc.gate.acquire()
        loop = asyncio.get_running_loop()

        def run():
            if svc.concurrent:
                with svc.exclusive:
                    return svc.embeddings(texts, fmt)
            return svc.embeddings(texts, fmt)

        try:
            fut = loop.run_in_executor(svc.pool, run)
        except BaseException:
            svc.gate.release()
            raise
        fut.add_done_callback(lambda f: svc.gate.release())
        out = await asyncio.shield(fut)
        svc.stats["completed"] += 1
        return JSONResp(out)

    @app.post("/tokenize", tags=["tokenizer"])
    @app.post("/v1/tokenize", include_in_schema=False)
    async def tokenize(req: TokenizeRequest):
        return JSONResp(await svc.prep(svc.tokenize, req))

    @app.post("/detokenize", tags=["tokenizer"])
    @app.post("/v1/detokenize", include_in_schema=False)
    async def detokenize(req: DetokenizeRequest):
        return JSONResp(await svc.prep(svc.detokenize, req))

    # middlewares, innermost first: body limits/JSON checks, API key, CORS (answers preflights), counters
    app.add_middleware(BodyMiddleware, svc=svc, max_body=max_body, timeout=read_timeout)
    if api_key:
        app.add_middleware(AuthMiddleware, api_key=api_key)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"], allow_credentials="*" not in cors_origins, max_age=600)
    app.add_middleware(MetricsMiddleware, svc=svc)
    return app


# ---------------------------------------------------------------- uvicorn

def _protocol_class(head_timeout: float):
    """uvicorn's h11 protocol with a deadline for each request head: a connection that sends nothing, or
    dribbles its headers (slowloris), is closed after `head_timeout` s instead of being kept forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_timer = None
        _head_cycle = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            try:
                self._head_cycle = self.cycle
                self._head_timer = self.loop.call_later(head_timeout, self._head_timeout)
            except AttributeError:  # another uvicorn's internals: serve without the head deadline
                self._head_timer = None

        def data_received(self, data):
            cycle = getattr(self, "cycle", None)
            if self._head_timer is None and (cycle is None or getattr(cycle, "response_complete", False)):
                self._arm()
            super().data_received(data)
            if self._head_timer is not None and getattr(self, "cycle", None) is not self._head_cycle:
                self._head_timer.cancel()  # a request head arrived
                self._head_timer = None

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            """A request the HTTP parser refuses (e.g. Content-Length: abc) gets the same JSON error body as every
            other 4xx, not uvicorn's plain text."""
            try:
                import h11
                body = json.dumps({"error": {"message": f"malformed HTTP request: {msg}"[:200],
                                             "type": "invalid_request_error", "param": None,
                                             "code": None}}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                           (b"connection", b"close")]
                self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers,
                                                                  reason=b"Bad Request")))
                self.transport.write(self.conn.send(h11.Data(data=body)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
                self.transport.close()
            except Exception:  # noqa: BLE001 - another uvicorn's internals: its own answer
                if not self.transport.is_closing():
                    super().send_400_response(msg)

        def _head_timeout(self):
            self._head_timer = None
            if getattr(self, "cycle", None) is self._head_cycle and not self.transport.is_closing():
                self.transport.close()

    return Protocol


class _QuietCut(logging.Filter):
    """A stream cut on purpose (client not reading) is not an error worth a log line."""

    def filter(self, record):
        return "without completing response" not in record.getMessage()


class LlambaServer:
    """A bound, ready-to-run server: `serve_forever()` runs uvicorn on the socket; `server_address` is where."""

    def __init__(self, app, service: LlambaService, sock: socket.socket, config_kw: dict):
        self.app, self.service, self.socket, self._kw = app, service, sock, config_kw
        self.server_address = sock.getsockname()[:2]
        self._server = None

    def serve_forever(self, engine=None):
        """Serve until shutdown(). With `engine` (a llamba.scheduler.Engine without a thread of its own), the
        engine steps in this thread's event loop too (Engine.run_async): HTTP and the engine share one thread,
        and the engine stops when the server does."""
        import uvicorn
        logging.getLogger("uvicorn.error").addFilter(_QuietCut())
        config = uvicorn.Config(self.app, **self._kw)
        self._server = server = uvicorn.Server(config)
        if engine is None:
            server.run(sockets=[self.socket])
            return

        async def main():
            task = asyncio.create_task(engine.run_async())
            try:
                await server.serve(sockets=[self.socket])
            finally:
                engine.stop()
                await task

        asyncio.run(main())

    def shutdown(self):
        if self._server is not None:
            self._server.should_exit = True

    def server_close(self):
        self.service.close()
        try:
            self.socket.close()
        except OSError:
            pass


def make_server(llm, host: str = "127.0.0.1", port: int = 8080, *, alias: str | None = None,
                max_body: int = DEFAULT_MAX_BODY, max_queue: int = 64, timeout: float | None = 600.0,
                verbose: bool = False, api_key: str | None = None, n_parallel: int = 4, cors_origins=(),
                max_connections: int = 512, keep_alive: float = 5.0, read_timeout: float = 30.0,
                stream_buffer: int = DEFAULT_STREAM_BUFFER, max_header: int = 32768) -> LlambaServer:
    """A ready-to-run server (call `serve_forever()`); `port=0` picks a free port (see `server.server_address`)."""
    service = LlambaService(llm, alias=alias, max_queue=max_queue, n_parallel=n_parallel,
                            stream_buffer=stream_buffer, timeout=timeout)
    app = create_app(service, max_body=max_body, api_key=api_key, cors_origins=tuple(cors_origins or ()),
                     read_timeout=read_timeout)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as e:
        raise LlambaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    kw = dict(http=_protocol_class(read_timeout), lifespan="on", log_level="info" if verbose else "warning",
              access_log=verbose, limit_concurrency=max_connections, timeout_keep_alive=max(1, int(keep_alive)),
              h11_max_incomplete_event_size=max_header, timeout_graceful_shutdown=3, server_header=False,
              headers=[("server", "llamba")], loop="asyncio")
    return LlambaServer(app, service, sock, kw)
