"""Soak `llamba serve` (issue 16): many clients for minutes, good and hostile, then check nothing leaked.

    python bench/soak_serve.py -m MODEL.gguf [--minutes 5] [--clients 32] [--json out.json]
    python bench/soak_serve.py --url http://127.0.0.1:8080 [--pid PID] ...

With -m it starts `llamba serve -m MODEL -t 2 -np 8 -c 8192 --port FREE` (--threads/--parallel/--ctx to change).
First, on the idle server, each fixed good request (greedy and seeded; chat and completion; streamed and not; a
completion with a list of two prompts; one with token-id prompts) is run alone and its output recorded. Then
--clients threads loop for --minutes, each picking at random:

  good        one of the recorded requests; its output (text, finish_reason, completion_tokens) must equal the
              recorded one exactly (batch invariance under load, prefix cache on)
  slow        a recorded streaming request read a few bytes at a time with pauses; must also be equal
  disconnect  a streaming request whose socket is closed after k chunks (k random, 0 = before the first chunk),
              or a non-streamed one closed after a short wait
  malformed   bad JSON, wrong types, out-of-range values, huge max_tokens, unknown fields, deep nesting, lone
              surrogates, NaN, invalid UTF-8, bad content types, truncated JSON, truncated bodies (Content-Length
              longer than what is sent: half-closed, or left waiting for --read-timeout -> 408), oversize bodies
              (sent, or only declared), unknown paths and methods, prompts over the context, bad token ids:
              each must get a 4xx with a JSON {"error": {...}} body (never a 5xx, never a dropped connection;
              a body truncated by a half-close may be answered 4xx or closed)

The server's RSS (/proc/PID/status VmRSS) is sampled every --rss-every s. At the end (clients joined, then up to
60 s for the server to settle) /metrics and /health are read: all slots idle, no engine request running or
waiting, KV blocks held = blocks of the idle prefix-cache sequences only (then a request whose prompt needs
nearly the whole KV pool is sent: it can only be admitted if every held block belongs to an evictable idle
sequence). Prints a table; --json writes the figures. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict

SYSTEM = "You are a concise assistant. Answer in one or two sentences."
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Explain what a prime number is.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me a tip for learning to cook.",
    "What does a bee make?",
    "Why is the sky blue?",
]
COMPLETION_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n",
    "The three laws of thermodynamics are",
    "List of fruits: apple, banana,",
    "In 1969, the first person to walk on the moon was",
    "import numpy as np\nx = np.arange(10)\n",
    "Dear Sir or Madam,\n\nI am writing to",
]


def good_requests(n_vocab_hint: int = 1000) -> list[dict]:
    """The fixed good requests: {"name", "path", "body"} (stream added per use)."""
    out = []
    for i, p in enumerate(CHAT_PROMPTS):
        msgs = ([{"role": "system", "content": SYSTEM}] if i % 2 == 0 else []) + [{"role": "user", "content": p}]
        body = {"messages": msgs, "max_tokens": [16, 32, 48, 64][i % 4], "temperature": 0}
        out.append({"name": f"chat{i}", "path": "/v1/chat/completions", "body": body})
    for i, p in enumerate(COMPLETION_PROMPTS):
        body = {"prompt": p, "max_tokens": [24, 40, 56, 12][i % 4], "temperature": 0}
        out.append({"name": f"cmpl{i}", "path": "/v1/completions", "body": body})
    # seeded sampling (must also be load-independent)
    out.append({"name": "chat_seed", "path": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": CHAT_PROMPTS[3]}], "max_tokens": 40,
                         "temperature": 0.9, "top_p": 0.95, "seed": 1234}})
    out.append({"name": "cmpl_seed", "path": "/v1/completions",
                "body": {"prompt": COMPLETION_PROMPTS[1], "max_tokens": 40, "temperature": 1.0, "top_k": 40,
                         "seed": 77}})
    # several prompts in one request (several sequences in the batch)
    out.append({"name": "cmpl_multi", "path": "/v1/completions",
                "body": {"prompt": [COMPLETION_PROMPTS[0], COMPLETION_PROMPTS[5]], "max_tokens": 20,
                         "temperature": 0}})
    # token ids as the prompt
    out.append({"name": "cmpl_ids", "path": "/v1/completions",
                "body": {"prompt": [5, 17, 42, 99, 100, 7, 300], "max_tokens": 16, "temperature": 0}})
    # a long shared prefix (prefix cache) with different endings
    long_ctx = " ".join(f"Item {k}: the value is {k * 7 % 13}." for k in range(60))
    for j, q in enumerate(["What is item 3?", "What is item 41?"]):
        out.append({"name": f"cmpl_long{j}", "path": "/v1/completions",
                    "body": {"prompt": long_ctx + "\nQuestion: " + q + "\nAnswer:", "max_tokens": 12,
                             "temperature": 0}})
    return out


# ---------------------------------------------------------------- HTTP helpers

class Target:
    def __init__(self, url: str):
        m = re.match(r"https?://([^/:]+)(?::(\d+))?", url)
        if not m:
            raise SystemExit(f"bad --url {url!r}")
        self.host, self.port = m.group(1), int(m.group(2) or 80)
        self.url = url.rstrip("/")

    def conn(self, timeout=300.0):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get(self, path, timeout=10.0):
        c = self.conn(timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def post_json(self, path, body, timeout=300.0):
        c = self.conn(timeout)
        try:
            c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()


def sse_events(resp, slow: float = 0.0, piece: int = 0):
    """Yield decoded JSON events of an SSE response (stops at [DONE]); `slow` s between reads of `piece` bytes."""
    buf = b""
    while True:
        if slow:
            time.sleep(slow * random.random() * 2)
        data = resp.read1(piece) if piece else resp.read1(65536)
        if not data:
            if buf.strip():
                raise ValueError(f"stream ended inside an event: {buf[:200]!r}")
            raise ValueError("stream ended without [DONE]")
        buf += data
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            for line in ev.split(b"\n"):
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        return
                    yield json.loads(payload)


def outcome_whole(path, data: dict) -> list:
    """[(text, finish_reason)] per choice, plus completion tokens, of a non-streamed answer."""
    chs = sorted(data["choices"], key=lambda c: c["index"])
    if path.endswith("chat/completions"):
        texts = [(c["message"].get("content") or "", c["finish_reason"]) for c in chs]
    else:
        texts = [(c["text"], c["finish_reason"]) for c in chs]
    return [texts, (data.get("usage") or {}).get("completion_tokens")]


def outcome_stream(path, events) -> list:
    text, finish, usage = defaultdict(str), {}, None
    for ev in events:
        if ev.get("usage"):
            usage = ev["usage"]
        for c in ev.get("choices") or []:
            i = c.get("index", 0)
            if path.endswith("chat/completions"):
                text[i] += (c.get("delta") or {}).get("content") or ""
            else:
                text[i] += c.get("text") or ""
            if c.get("finish_reason"):
                finish[i] = c["finish_reason"]
    idx = sorted(set(text) | set(finish))
    return [[(text[i], finish.get(i)) for i in idx], (usage or {}).get("completion_tokens")]


def run_good(t: Target, req: dict, stream: bool, slow: float = 0.0, timeout=600.0):
    """Returns (status, outcome or error text)."""
    body = dict(req["body"], stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    c = t.conn(timeout)
    try:
        c.request("POST", req["path"], body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return r.status, r.read()[:300].decode("utf-8", "replace")
        if stream:
            return 200, outcome_stream(req["path"], sse_events(r, slow, 64 if slow else 0))
        return 200, outcome_whole(req["path"], json.loads(r.read()))
    finally:
        c.close()


def norm(o):
    return json.loads(json.dumps(o))


# ---------------------------------------------------------------- hostile requests

def raw_request(t: Target, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                declared_len: int | None = None, send_bytes: int | None = None, half_close: bool = False,
                timeout: float = 60.0):
    """Send a request over a raw socket; returns (status or None, body bytes, note)."""
    h = {"Host": f"{t.host}:{t.port}", "Connection": "close"}
    h.update(headers or {})
    if "Content-Length" not in h and method != "GET":
        h["Content-Length"] = str(len(body) if declared_len is None else declared_len)
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    s = socket.create_connection((t.host, t.port), timeout=timeout)
    data = b""
    try:
        payload = head.encode("latin-1") + (body if send_bytes is None else body[:send_bytes])
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (413) before taking the whole body
        if half_close:
            s.shutdown(socket.SHUT_WR)
        while True:
            try:
                d = s.recv(65536)
            except ConnectionResetError:
                break
            if not d:
                break
            data += d
    except socket.timeout:
        return None, data, "timeout"
    finally:
        s.close()
    if not data:
        return None, b"", "closed without a response"
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    if not m:
        return None, data[:200], "not an HTTP response"
    hdr, _, rest = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in hdr.lower():
        rest = _dechunk(rest)
    return int(m.group(1)), rest, ""


def _dechunk(b: bytes) -> bytes:
    out = b""
    while b:
        line, _, b = b.partition(b"\r\n")
        try:
            n = int(line.split(b";")[0], 16)
        except ValueError:
            return out
        if n == 0:
            break
        out, b = out + b[:n], b[n + 2:]
    return out


def J(o) -> bytes:
    return json.dumps(o).encode()


def malformed_cases() -> list[dict]:
    """{"name", "method", "path", "body", extra raw_request kwargs, "ok": statuses accepted, "closed_ok": bool}"""
    C, X = "/v1/completions", "/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    deep = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b', "max_tokens": 4}'
    cases = [
        ("bad_json", C, b'{"prompt": "hi", "max_tokens": 4', {}),
        ("bad_json_trailing", C, b'{"prompt": "hi"} xyz', {}),
        ("not_object", C, b'[1, 2, 3]', {}),
        ("json_null", X, b'null', {}),
        ("empty_body", C, b'', {}),
        ("wrong_type_prompt", C, J({"prompt": 5, "max_tokens": 4}), {}),
        ("wrong_type_max_tokens", C, J({"prompt": "hi", "max_tokens": "ten"}), {}),
        ("wrong_type_temperature", X, J({"messages": msg, "temperature": "hot"}), {}),
        ("wrong_type_messages", X, J({"messages": "hello", "max_tokens": 4}), {}),
        ("wrong_type_stream", C, J({"prompt": "hi", "max_tokens": 4, "stream": "yes"}), {}),
        ("float_max_tokens", C, J({"prompt": "hi", "max_tokens": 4.5}), {}),
        ("bad_role", X, J({"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4}), {}),
        ("empty_messages", X, J({"messages": [], "max_tokens": 4}), {}),
        ("empty_prompt", C, J({"prompt": "", "max_tokens": 4}), {}),
        ("missing_prompt", C, J({"max_tokens": 4}), {}),
        ("huge_max_tokens", C, J({"prompt": "hi", "max_tokens": 10 ** 12}), {}),
        ("huge_max_tokens_chat", X, J({"messages": msg, "max_tokens": 2 ** 63}), {}),
        ("ctx_max_tokens", C, J({"prompt": "hi", "max_tokens": 9000}), {}),
        ("negative_max_tokens", C, J({"prompt": "hi", "max_tokens": -1}), {}),
        ("temperature_range", C, J({"prompt": "hi", "max_tokens": 4, "temperature": -1}), {}),
        ("logprobs_range", C, J({"prompt": "hi", "max_tokens": 4, "logprobs": 1000}), {}),
        ("n_range", C, J({"prompt": "hi", "max_tokens": 4, "n": 100000}), {}),
        ("chat_n_range", X, J({"messages": msg, "max_tokens": 4, "n": 100000}), {}),  # (n = 2 is valid since chat n > 1)
        ("unknown_field", C, J({"prompt": "hi", "max_tokens": 4, "frobnicate": True}), {}),
        ("unknown_field_chat", X, J({"messages": msg, "max_tokens": 4, "temprature": 0.5}), {}),
        ("deep_nesting", C, deep, {}),
        ("deep_nesting_msgs", X, b'{"messages": [{"role": "user", "content": "hi", "x": ' + b'{"a":' * 3000
         + b'1' + b'}' * 3000 + b'}]}', {}),
        ("lone_surrogate", C, b'{"prompt": "abc \\ud800 def", "max_tokens": 4}', {}),
        ("lone_surrogate_chat", X, b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 4}', {}),
        ("nan", C, b'{"prompt": "hi", "max_tokens": 4, "temperature": NaN}', {}),
        ("infinity", C, b'{"prompt": "hi", "max_tokens": 4, "top_p": Infinity}', {}),
        ("invalid_utf8", C, b'{"prompt": "\xff\xfe\xc3", "max_tokens": 4}', {}),
        ("bad_token_id", C, J({"prompt": [1, 2, 10 ** 9], "max_tokens": 4}), {}),
        ("negative_token_id", C, J({"prompt": [1, -5], "max_tokens": 4}), {}),
        ("prompt_over_context", C, J({"prompt": [5] * 9000, "max_tokens": 1}), {}),
        ("too_many_stops", C, J({"prompt": "hi", "max_tokens": 4, "stop": ["a"] * 50}), {}),
        ("bad_logit_bias", C, J({"prompt": "hi", "max_tokens": 4, "logit_bias": {"abc": 1}}), {}),
        ("form_content_type", C, b"prompt=hi&max_tokens=4",
         {"headers": {"Content-Type": "application/x-www-form-urlencoded"}}),
        ("multipart_content_type", C, b"--x\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi\r\n--x--",
         {"headers": {"Content-Type": "multipart/form-data; boundary=x"}}),
        ("truncated_json", C, J({"prompt": "hello there", "max_tokens": 4})[:-9], {}),
        ("bad_content_length", C, J({"prompt": "hi"}), {"headers": {"Content-Length": "abc"}}),
        ("oversize_body", C, b'{"prompt": "' + b"a" * (2 << 20) + b'", "max_tokens": 4}', {}),
        ("oversize_declared", C, b'{"prompt": "hi"}', {"declared_len": 1 << 30, "send_bytes": 16}),
        ("unknown_path", "/v1/frobnicate", J({"prompt": "hi"}), {}),
        ("wrong_method", C, b"", {"method": "PUT"}),
        ("get_on_post", C, b"", {"method": "GET"}),
        ("tokenize_bad", "/tokenize", J({"content": "a", "prompt": "b"}), {}),
        ("detokenize_bad", "/detokenize", J({"tokens": [10 ** 9]}), {}),
        ("embeddings_bad", "/v1/embeddings", J({"input": 5}), {}),
    ]
    out = []
    for name, path, body, kw in cases:
        d = {"name": name, "path": path, "body": body, "method": kw.pop("method", "POST"),
             "ok": range(400, 500), "closed_ok": False}
        if name == "empty_prompt":  # on a model that adds BOS the prompt is [BOS]: generating from it is fine
            d["ok"] = [200] + list(range(400, 500))
        if "headers" not in kw and d["method"] != "GET":
            kw["headers"] = {"Content-Type": "application/json"}
        d["kw"] = kw
        out.append(d)
    # a body shorter than its Content-Length, then a half-close: a 4xx or a close (the client gave up) are fine
    out.append({"name": "truncated_body_halfclose", "path": C, "body": J({"prompt": "hello", "max_tokens": 4}),
                "method": "POST", "ok": range(400, 500), "closed_ok": True,
                "kw": {"headers": {"Content-Type": "application/json"}, "declared_len": 200, "half_close": True}})
    # ... and left waiting: the server must answer 408 after its read timeout
    out.append({"name": "truncated_body_wait", "path": C, "body": J({"prompt": "hello", "max_tokens": 4}),
                "method": "POST", "ok": range(400, 500), "closed_ok": False, "rare": True,
                "kw": {"headers": {"Content-Type": "application/json"}, "declared_len": 200, "timeout": 90.0}})
    return out


def run_malformed(t: Target, case: dict):
    """Returns (verdict, status, detail): verdict 'ok' (4xx JSON error), 'closed' (allowed close) or 'bad'."""
    kw = dict(case["kw"])
    try:
        st, body, note = raw_request(t, case["method"], case["path"], case["body"], **kw)
    except OSError as e:
        return "bad", None, f"{type(e).__name__}: {e}"
    if st is None:
        if case["closed_ok"] and note == "closed without a response":
            return "closed", None, note
        return "bad", None, note
    if st not in case["ok"]:
        return "bad", st, body[:200].decode("utf-8", "replace")
    if st == 200:
        return "ok", st, "accepted"
    try:
        err = json.loads(body)
        if not isinstance(err, dict) or not isinstance(err.get("error"), (dict, str)) and "detail" not in err:
            return "bad", st, "4xx without a JSON error object: " + body[:200].decode("utf-8", "replace")
    except ValueError:
        if case["method"] == "HEAD":
            return "ok", st, ""
        return "bad", st, "4xx body is not JSON: " + body[:200].decode("utf-8", "replace")
    return "ok", st, ""


# ---------------------------------------------------------------- disconnects

def run_disconnect(t: Target, req: dict, k: int, stream: bool) -> str:
    body = dict(req["body"], stream=stream)
    c = t.conn(120)
    try:
        c.request("POST", req["path"], body=json.dumps(body), headers={"Content-Type": "application/json"})
        if not stream:
            time.sleep(random.uniform(0.0, 0.5))
            return "closed"
        if k == 0:
            return "closed"
        r = c.getresponse()
        if r.status != 200:
            return f"status {r.status}"
        n = 0
        for _ in sse_events(r):
            n += 1
            if n >= k:
                break
        return "closed"
    except (OSError, ValueError, http.client.HTTPException) as e:
        return f"{type(e).__name__}"
    finally:
        try:
            if c.sock is not None:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        c.close()


# ---------------------------------------------------------------- RSS and metrics

def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def parse_metrics(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            key = m.group(1) + (m.group(2) or "")
            try:
                out[key] = float(m.group(3))
            except ValueError:
                pass
    return out


def launch(a):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llamba.cli", "serve", "-m", a.model, "-t", str(a.threads), "-np",
           str(a.parallel), "-c", str(a.ctx), "--port", str(port)] + shlex.split(a.server_args or "")
    log = open(a.server_log, "w") if a.server_log else tempfile.TemporaryFile("w+")
    print(f"starting: {shlex.join(cmd)}", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    t = Target(f"http://127.0.0.1:{port}")
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"llamba serve exited with {proc.returncode} before it was ready")
        try:
            if t.get("/health", 2)[0] == 200:
                break
        except (OSError, http.client.HTTPException):
            pass
        if time.time() - t0 > 300:
            proc.kill()
            raise SystemExit("llamba serve not ready after 300 s")
        time.sleep(0.5)
    print(f"ready on port {port} after {time.time() - t0:.1f} s (pid {proc.pid})", file=sys.stderr)
    return proc, t, cmd


# ---------------------------------------------------------------- the soak

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("-m", "--model", help="GGUF file: start llamba serve on it")
    g.add_argument("--url", help="an already running server")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("--parallel", "-np", type=int, default=8)
    ap.add_argument("--ctx", "-c", type=int, default=8192)
    ap.add_argument("--server-args", help="more llamba serve arguments (one shell-quoted string)")
    ap.add_argument("--server-log", help="write the server's output here")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline (default: "
                                                                 "20%% of the run, at most 60)")
    ap.add_argument("--rss-every", type=float, default=3.0)
    ap.add_argument("--mix", default="good=40,slow=8,disconnect=20,malformed=32",
                    help="relative weights of the request kinds")
    ap.add_argument("--read-timeout", type=float, default=30.0, help="the server's --read-timeout (for the 408 case)")
    ap.add_argument("--no-full-pool", action="store_true", help="skip the final whole-KV-pool request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results as JSON here ('-' for stdout)")
    a = ap.parse_args()
    random.seed(a.seed)

    proc, cmd = None, None
    if a.model:
        proc, t, cmd = launch(a)
        pid = proc.pid
    else:
        t, pid = Target(a.url), a.pid
    res: dict = {"command": shlex.join(cmd) if cmd else a.url, "minutes": a.minutes, "clients": a.clients}
    try:
        res.update(soak(a, t, pid))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    ok = report(res)
    if a.json:
        s = json.dumps(res, indent=1, default=str)
        if a.json == "-":
            print(s)
        else:
            with open(a.json, "w") as f:
                f.write(s + "\n")
    sys.exit(0 if ok else 1)


def soak(a, t: Target, pid):
    res: dict = {}
    goods = good_requests()
    # ---- record the expected outputs, each request alone on the idle server
    expected, rec_issues = {}, []
    t0 = time.time()
    for req in goods:
        for stream in (False, True):
            st, out = run_good(t, req, stream)
            if st != 200:
                raise SystemExit(f"recording {req['name']} stream={stream}: status {st}: {out}")
            expected[(req["name"], stream)] = norm(out)
        if expected[(req["name"], False)] != expected[(req["name"], True)]:
            rec_issues.append({"name": req["name"], "whole": expected[(req["name"], False)],
                               "stream": expected[(req["name"], True)]})
    # a second pass alone: the recording itself must be repeatable (prefix cache now warm)
    for req in goods:
        st, out = run_good(t, req, False)
        if norm(out) != expected[(req["name"], False)]:
            rec_issues.append({"name": req["name"], "repeat": norm(out), "first": expected[(req["name"], False)]})
    res["recorded"] = {"requests": len(goods), "seconds": round(time.time() - t0, 1),
                       "stream_vs_whole_or_repeat_mismatches": rec_issues}
    print(f"recorded {len(goods)} good requests (x2 stream modes) in {time.time() - t0:.1f} s; "
          f"{len(rec_issues)} recording inconsistencies", file=sys.stderr)

    cases = malformed_cases()
    common = [c for c in cases if not c.get("rare")]
    rare = [c for c in cases if c.get("rare")]
    mix = {k: float(v) for k, v in (p.split("=") for p in a.mix.split(","))}
    kinds, weights = list(mix), list(mix.values())
    lock = threading.Lock()
    counts: Counter = Counter()
    mismatches, bad_malformed, good_errors, disc_notes = [], [], [], Counter()
    mal_status: Counter = Counter()
    latencies = defaultdict(list)
    deadline = time.time() + a.minutes * 60
    stop_evt = threading.Event()

    def client(ci: int):
        rng = random.Random(a.seed * 1000 + ci)
        while time.time() < deadline:
            kind = rng.choices(kinds, weights)[0]
            ts = time.time()
            try:
                if kind in ("good", "slow"):
                    req = rng.choice(goods)
                    stream = True if kind == "slow" else rng.random() < 0.5
                    st, out = run_good(t, req, stream, slow=0.05 if kind == "slow" else 0.0)
                    key = f"{kind}_{'stream' if stream else 'whole'}"
                    with lock:
                        counts[key] += 1
                        if st != 200:
                            good_errors.append({"name": req["name"], "stream": stream, "status": st,
                                                "detail": str(out)[:300]})
                        elif norm(out) != expected[(req["name"], stream)]:
                            mismatches.append({"name": req["name"], "stream": stream, "kind": kind,
                                               "got": norm(out), "expected": expected[(req["name"], stream)]})
                        latencies[kind].append(time.time() - ts)
                elif kind == "disconnect":
                    req = rng.choice(goods)
                    stream = rng.random() < 0.8
                    k = rng.randint(0, 6)
                    note = run_disconnect(t, req, k, stream)
                    with lock:
                        counts["disconnect"] += 1
                        disc_notes[note] += 1
                else:
                    case = rng.choice(rare) if rare and rng.random() < 0.01 else rng.choice(common)
                    verdict, st, detail = run_malformed(t, case)
                    with lock:
                        counts["malformed"] += 1
                        counts[f"malformed_{verdict}"] += 1
                        mal_status[f"{case['name']}:{st}"] += 1
                        if verdict == "bad":
                            bad_malformed.append({"case": case["name"], "status": st, "detail": detail})
            except Exception as e:  # noqa: BLE001 - a client error is a finding, not a crash of the soak
                with lock:
                    counts[f"{kind}_exception"] += 1
                    (good_errors if kind in ("good", "slow") else bad_malformed).append(
                        {"kind": kind, "exception": f"{type(e).__name__}: {e}"[:300]})

    rss = []
    warm = a.warmup if a.warmup is not None else min(60.0, a.minutes * 60 * 0.2)
    t_start = time.time()

    def sampler():
        while not stop_evt.is_set():
            if pid:
                v = rss_kib(pid)
                if v is not None:
                    rss.append((round(time.time() - t_start, 1), v))
            stop_evt.wait(a.rss_every)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
    st_thread = threading.Thread(target=sampler, daemon=True)
    st_thread.start()
    for th in threads:
        th.start()
    last = 0.0
    while any(th.is_alive() for th in threads):
        time.sleep(1)
        if time.time() - last > 30:
            last = time.time()
            with lock:
                print(f"  {time.time() - t_start:5.0f} s  good {sum(v for k, v in counts.items() if k.startswith(('good_', 'slow_')))}"
                      f"  mismatches {len(mismatches)}  good errors {len(good_errors)}  malformed {counts['malformed']}"
                      f" (bad {len(bad_malformed)})  disconnects {counts['disconnect']}"
                      f"  RSS {rss[-1][1] / 1024 if rss else 0:.0f} MiB", file=sys.stderr)
    load_s = time.time() - t_start
    # ---- let the server settle, then read its state
    settle_t0 = time.time()
    metrics, health = {}, {}
    while True:
        try:
            metrics = parse_metrics(t.get("/metrics")[1].decode())
            health = json.loads(t.get("/health")[1])
        except (OSError, ValueError, http.client.HTTPException):
            pass
        busy = (metrics.get("llamba_engine_running", 0) or metrics.get("llamba_engine_waiting", 0)
                or metrics.get("llamba_requests_running", 0) or health.get("slots_processing", 0))
        if not busy or time.time() - settle_t0 > 60:
            break
        time.sleep(1)
    settle_s = time.time() - settle_t0
    time.sleep(a.rss_every)
    stop_evt.set()
    st_thread.join()

    # ---- RSS
    after = [v for ts, v in rss if ts >= warm]
    rss_res = {"samples": len(rss), "warmup_s": warm}
    if rss:
        rss_res.update(first_kib=rss[0][1], peak_kib=max(v for _, v in rss), last_kib=rss[-1][1])
    if after:
        rss_res.update(first_after_warmup_kib=after[0], max_after_warmup_kib=max(after),
                       ratio_last_to_first_after_warmup=round(after[-1] / after[0], 4),
                       ratio_max_to_first_after_warmup=round(max(after) / after[0], 4))
        rss_res["flat"] = after[-1] / after[0] <= 1.1
    rss_res["series_mib"] = [(ts, round(v / 1024, 1)) for ts, v in rss]

    # ---- final state
    keys = ["llamba_engine_running", "llamba_engine_waiting", "llamba_engine_idle_sequences",
            "llamba_engine_kv_blocks_free", "llamba_engine_kv_blocks_total", "llamba_requests_running",
            "llamba_requests_waiting", "llamba_slots_total", "llamba_engine_requests", "llamba_engine_finished",
            "llamba_engine_cancelled", "llamba_engine_errors", "llamba_requests_cancelled_total",
            "llamba_engine_cached_tokens", "llamba_engine_prompt_tokens", "llamba_engine_generated_tokens"]
    final = {k: metrics.get(k) for k in keys}
    final["health"] = health
    final["requests_by_status"] = {k[len("llamba_requests_total"):]: v for k, v in metrics.items()
                                   if k.startswith("llamba_requests_total")}
    held = None
    if final["llamba_engine_kv_blocks_total"] is not None and final["llamba_engine_kv_blocks_free"] is not None:
        held = final["llamba_engine_kv_blocks_total"] - final["llamba_engine_kv_blocks_free"]
    final["kv_blocks_held"] = held
    # (the whole-pool probe below is what shows these blocks are reclaimable)
    idle = final["llamba_engine_idle_sequences"] or 0
    final["kv_blocks_held_per_idle_sequence"] = round(held / idle, 2) if held and idle else 0
    # ---- whole-pool probe: a prompt needing nearly every block is only admitted if all held blocks are evictable
    probe = None
    if not a.no_full_pool and final["llamba_engine_kv_blocks_total"]:
        total = int(final["llamba_engine_kv_blocks_total"])
        bs = 32
        n_ctx = None
        try:
            n_ctx = json.loads(t.get("/v1/models")[1])["data"][0].get("max_model_len")
        except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException):
            pass
        n_tok = min(total * bs, n_ctx or total * bs) - bs - 2
        body = {"prompt": [random.Random(5).randrange(200, 5000) for _ in range(n_tok)], "max_tokens": 1,
                "temperature": 0}
        tp = time.time()
        try:
            st, out = t.post_json("/v1/completions", body, timeout=900)
            d = json.loads(out) if out else {}
            probe = {"prompt_tokens": n_tok, "status": st, "seconds": round(time.time() - tp, 1),
                     "usage": d.get("usage"), "error": d.get("error")}
        except (OSError, ValueError, http.client.HTTPException) as e:
            probe = {"prompt_tokens": n_tok, "status": None, "error": f"{type(e).__name__}: {e}"}
        try:
            m2 = parse_metrics(t.get("/metrics")[1].decode())
            probe["after"] = {k: m2.get(k) for k in ("llamba_engine_running", "llamba_engine_idle_sequences",
                                                    "llamba_engine_kv_blocks_free", "llamba_engine_kv_blocks_total")}
        except (OSError, ValueError, http.client.HTTPException):
            pass

    n_good = sum(v for k, v in counts.items() if k.startswith(("good_", "slow_")) and "exception" not in k)
    res.update({
        "load_seconds": round(load_s, 1), "settle_seconds": round(settle_s, 1),
        "counts": dict(counts),
        "good": {"total": n_good, "mismatches": len(mismatches), "errors": len(good_errors),
                 "latency_p50_s": {k: round(sorted(v)[len(v) // 2], 2) for k, v in latencies.items() if v}},
        "malformed": {"total": counts["malformed"], "ok_4xx": counts["malformed_ok"],
                      "closed_after_half_close": counts["malformed_closed"], "bad": len(bad_malformed),
                      "by_case_status": dict(sorted(mal_status.items()))},
        "disconnects": dict(disc_notes),
        "rss": rss_res, "final": final, "full_pool_probe": probe,
        "mismatch_examples": mismatches[:10], "good_error_examples": good_errors[:10],
        "bad_malformed_examples": bad_malformed[:20],
    })
    checks = {
        "good_all_correct": n_good > 0 and not mismatches and not good_errors,
        "malformed_all_4xx": counts["malformed"] > 0 and not bad_malformed,
        "rss_flat": bool(rss_res.get("flat")) if pid else None,
        "slots_idle": (health.get("slots_processing") == 0 and final["llamba_requests_running"] == 0
                       and final["llamba_requests_waiting"] == 0),
        "engine_empty": final["llamba_engine_running"] == 0 and final["llamba_engine_waiting"] == 0,
        "kv_held_only_by_idle": (held == 0 or (idle > 0 and probe is not None and probe.get("status") == 200))
        if held is not None else None,
        "recording_consistent": not rec_issues,
    }
    res["checks"] = checks
    return res


def report(res: dict) -> bool:
    print()
    print(f"soak: {res['command']}  ({res['clients']} clients, {res.get('load_seconds')} s of load)")
    rec = res.get("recorded", {})
    print(f"  recorded alone: {rec.get('requests')} requests x (whole, stream); inconsistencies: "
          f"{len(rec.get('stream_vs_whole_or_repeat_mismatches', []))}")
    c = res.get("counts", {})
    g, m = res.get("good", {}), res.get("malformed", {})
    rows = [
        ("good requests (incl. slow readers)", g.get("total"), f"mismatches {g.get('mismatches')}, "
                                                              f"errors {g.get('errors')}"),
        ("  whole / stream / slow", f"{c.get('good_whole', 0)} / {c.get('good_stream', 0)} / "
                                    f"{c.get('slow_stream', 0)}", f"p50 latency {g.get('latency_p50_s')}"),
        ("disconnects", c.get("disconnect", 0), str(res.get("disconnects"))),
        ("malformed", m.get("total"), f"4xx JSON {m.get('ok_4xx')}, closed after half-close "
                                      f"{m.get('closed_after_half_close')}, bad {m.get('bad')}"),
    ]
    r = res.get("rss", {})
    if r.get("first_after_warmup_kib"):
        rows.append(("RSS MiB first / after warm-up / max / last",
                     f"{r['first_kib'] / 1024:.0f} / {r['first_after_warmup_kib'] / 1024:.0f} / "
                     f"{r['max_after_warmup_kib'] / 1024:.0f} / {r['last_kib'] / 1024:.0f}",
                     f"last/first-after-warmup {r['ratio_last_to_first_after_warmup']}, "
                     f"max/first {r['ratio_max_to_first_after_warmup']}"))
    f = res.get("final", {})
    rows.append(("final engine running / waiting", f"{f.get('llamba_engine_running')} / "
                                                   f"{f.get('llamba_engine_waiting')}",
                 f"server running {f.get('llamba_requests_running')}, waiting {f.get('llamba_requests_waiting')}, "
                 f"health {f.get('health')}"))
    rows.append(("final KV blocks free / total", f"{f.get('llamba_engine_kv_blocks_free')} / "
                                                 f"{f.get('llamba_engine_kv_blocks_total')}",
                 f"held {f.get('kv_blocks_held')} by {f.get('llamba_engine_idle_sequences')} idle sequences"))
    p = res.get("full_pool_probe")
    if p:
        rows.append(("whole-pool probe", p.get("status"), f"{p.get('prompt_tokens')} prompt tokens in "
                                                          f"{p.get('seconds')} s; after: {p.get('after')}"))
    w = max(len(x[0]) for x in rows)
    for name, v, note in rows:
        print(f"  {name:<{w}}  {str(v):>14}  {note}")
    for k in ("mismatch_examples", "good_error_examples", "bad_malformed_examples"):
        for e in res.get(k, [])[:5]:
            print(f"  {k[:-9]}: {json.dumps(e)[:400]}")
    print("  checks: " + ", ".join(f"{k}={'PASS' if v else ('n/a' if v is None else 'FAIL')}"
                                   for k, v in res.get("checks", {}).items()))
    return all(v is not False for v in res.get("checks", {}).values())


if __name__ == "__main__":
    main()
