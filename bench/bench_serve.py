"""Load generator for OpenAI-compatible servers: concurrent streaming clients, throughput and latency per level.

    python bench/bench_serve.py (-m MODEL.gguf | --url http://127.0.0.1:8080)
        [--compare-url URL | --compare-library MODEL.gguf] [--clients 1,2,4,8,16] [--duration S | --requests R] [--max-tokens 64] [--json FILE]
        [--threads 2] [--parallel 8] [-c 8192] [--long-prompt-probe]

Target: with -m, starts `python -m llamba.cli serve -m MODEL -t THREADS -c CTX` on a free loopback port (plus
`-np PARALLEL` when its --help lists -np/--parallel) and stops it at the end; with --url, uses a running server
(llamba, llama-server, vLLM, ...). --compare-url runs the same load against a second running server in the same
run; the two are measured alternately, level by level (A then B, then B then A at the next level), so background
load hits both alike, and the table shows them side by side with ratios A/B. --compare-library runs the same
one-client load through the library itself in this process instead (`Llama.create_completion(stream=True)`, one
caller on the main thread): what one client through the server gets, as a fraction of the library's own speed.

Load: for each N in --clients, N threads (one per client, each on a plain socket: see sse_events) send streaming
/v1/completions requests back to back (`stream: true`, temperature 0, max_tokens --max-tokens,
`stream_options: {include_usage: true}`) over a fixed built-in set of 20 prompts of about 10-200 tokens (client c
sends prompts c, c+N, c+2N, ... mod 20), for --duration seconds (requests in flight at the deadline are finished and
counted) or --requests requests per client. Nothing non-portable (ignore_eos, min_tokens) is sent, so a request
may stop early at EOS: the tokens actually produced are counted, from usage.completion_tokens when the server
reports it, else as the number of content chunks.

Figures per level: output tokens/s (all completion tokens / wall time of the level, first request sent to last
response finished), decode tokens/s (dec/s: the gaps between a stream's content chunks, summed over all streams;
tokens after the first over that time: the decode speed one stream sees, prefill excluded), requests/s, TTFT p50/p95 (request sent -> first chunk with text), inter-token latency p50/p95
(gaps between consecutive content chunks of a request), failed requests, and the 1-minute load average when the
level started and the CPU pressure (Linux PSI `some avg10`, % of time a runnable task waited for a CPU) when it
ended (the machine may be shared: read the figures with them).

--long-prompt-probe: TTFT of a short streaming request on the idle server (median of --probe-reps), then again
with the short request sent ~50 ms after a request with a ~--probe-tokens-token prompt (default 2000), i.e. while
that prompt is being prefilled; prints the ratio loaded/idle (issue 16 asks for <= 2x). Every probe prompt starts
with a fresh tag so no prefix cache can skip its prefill. Here TTFT is the first event carrying a choice, so a
request that ends at once with EOS (greedy output may change under batching) still counts.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

# ---------------------------------------------------------------- the fixed prompt set

_PASSAGES = [
    "The history of the city begins with a small settlement on the banks of a river, where farmers and traders "
    "met to exchange grain, salt and stories about the lands beyond the hills. Over the centuries the market grew "
    "into a town with stone walls, a cathedral and a university, and the river, once a border, became the main "
    "street of a busy port. Merchants from distant countries built warehouses along the quays, and their languages "
    "mixed with the local dialect until a new way of speaking was born in the taverns near the harbour. Floods, "
    "fires and wars destroyed parts of the town many times, yet each generation rebuilt it a little larger.",
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical energy. "
    "Inside the chloroplasts, pigments such as chlorophyll absorb mostly red and blue light and use its energy to "
    "split water molecules, releasing oxygen as a by-product. The energy captured in this way is stored in two "
    "carrier molecules, which then drive a cycle of reactions that fixes carbon dioxide from the air into sugars. "
    "These sugars feed the plant, and through food chains almost every other living thing on the planet, while the "
    "oxygen released over billions of years changed the atmosphere and made complex animal life possible.",
    "To bake a simple loaf of bread you need flour, water, salt and yeast. Mix the flour and salt in a large bowl, "
    "dissolve the yeast in lukewarm water and pour it in, then stir until a rough dough forms. Knead the dough on a "
    "floured table for about ten minutes, until it is smooth and springs back when pressed. Leave it covered in a "
    "warm place for an hour or two, until it has doubled in size, then shape it, let it rise again, and bake it in "
    "a hot oven until the crust is deep brown and the loaf sounds hollow when you tap its bottom.",
    "A binary search finds an item in a sorted list by repeatedly halving the range in which it can be. It compares "
    "the target with the middle element: if they are equal the search ends, if the target is smaller the search "
    "continues in the left half, otherwise in the right half. Because the range halves at every step, a list of a "
    "million elements needs at most twenty comparisons. The method is simple to describe but easy to get wrong: "
    "off-by-one errors in the bounds and overflow when computing the middle index are classic bugs that appeared "
    "even in widely used standard libraries for many years before anyone noticed them.",
    "The expedition left the last village at dawn, with twelve porters, four mules and enough food for three weeks. "
    "The first days were easy, following a shepherds' path through meadows full of flowers, but on the fourth day "
    "the weather turned and snow covered the trail. The leader decided to wait in a cave for the storm to pass, and "
    "for two nights the group listened to the wind and counted their supplies. When the sky cleared, the mountain "
    "stood before them, white and silent, and the route they had studied on maps for months looked very different "
    "from what they had imagined at home.",
    "Interest rates are the price of borrowing money over time. When a central bank raises its policy rate, loans "
    "for houses, cars and businesses usually become more expensive, people and companies borrow and spend less, and "
    "inflation tends to slow down after a delay of a year or more. Lower rates have the opposite effect, encouraging "
    "spending and investment. Because the effects arrive slowly and depend on expectations about the future, "
    "central banks publish forecasts and explain their decisions, hoping that clear communication will make their "
    "policy work faster and with fewer surprises for markets.",
]
_INSTRUCTIONS = [
    "Continue the story:", "Summarize the following text in one sentence:", "Explain this to a child:",
    "Translate the main idea into simple words:", "Write a short poem inspired by this:",
    "List three questions a student might ask about this:", "Give this text a title:",
    "What happens next?", "Rewrite this in a more formal style:", "Name the key facts in this passage:",
]
# words of passage text per prompt: about 10 to 200 tokens with the instruction
_WORDS = [4, 120, 15, 60, 160, 25, 90, 8, 35, 110, 50, 170, 12, 75, 20, 140, 45, 100, 30, 85]


def prompt_set() -> list[str]:
    out = []
    for i, n in enumerate(_WORDS):
        words = (_PASSAGES[i % len(_PASSAGES)] + " " + _PASSAGES[(i + 1) % len(_PASSAGES)]).split()
        text = " ".join(words[:n])
        out.append(f"{_INSTRUCTIONS[i % len(_INSTRUCTIONS)]}\n\n{text}")
    return out


PROMPTS = prompt_set()

# ---------------------------------------------------------------- one streaming request


def new_result() -> dict:
    """One request's record (times from time.perf_counter)."""
    return {"ok": False, "error": None, "t_send": None, "ttft": None, "gaps": [], "n_chunks": 0,
            "completion_tokens": None, "prompt_tokens": None, "t_end": None, "first_event": None}


def note_content(res: dict, now: float, t0: float, last) -> float:
    """Count a chunk with content that arrived at `now`: the first sets ttft, later ones add their gap to the
    previous one (`last`). Returns `now` (the new `last`)."""
    res["n_chunks"] += 1
    if res["ttft"] is None:
        res["ttft"] = now - t0
    else:
        res["gaps"].append(now - last)
    return now


class Target:
    def __init__(self, url: str, label: str, api_key: str | None = None, timeout: float = 600.0):
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if u.scheme not in ("http", ""):
            raise SystemExit(f"only http:// URLs are supported: {url}")
        self.url, self.label = url.rstrip("/"), label
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.base = u.path.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.api_key, self.timeout = api_key, timeout
        self.model = None

    def _headers(self, body: bool = True) -> dict:
        h = {"Accept": "text/event-stream, application/json"}
        if body:
            h["Content-Type"] = "application/json"
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def get(self, path: str, timeout: float = 5.0):
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            c.request("GET", self.base + path, headers=self._headers(False))
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def post_json(self, path: str, body: dict):
        c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            c.request("POST", self.base + path, body=json.dumps(body), headers=self._headers())
            r = c.getresponse()
            data = r.read()
            try:
                return r.status, json.loads(data)
            except ValueError:
                return r.status, {"raw": data[:500].decode(errors="replace")}
        finally:
            c.close()

    def discover_model(self):
        try:
            st, data = self.get("/v1/models")
            if st == 200:
                d = json.loads(data).get("data") or []
                if d and isinstance(d[0], dict):
                    self.model = d[0].get("id")
        except (OSError, ValueError, http.client.HTTPException):
            pass

    def body(self, prompt: str, max_tokens: int, stream: bool = True, extra: dict | None = None) -> dict:
        b = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        if stream:
            b["stream_options"] = {"include_usage": True}
        if self.model:
            b["model"] = self.model
        if extra:
            b.update(extra)
        return b

    def stream(self, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
        """One streaming /v1/completions request. Returns {ok, error, t_send, ttft, gaps, n_chunks,
        completion_tokens, prompt_tokens, t_end} (times from time.perf_counter)."""
        res = new_result()
        payload = json.dumps(self.body(prompt, max_tokens, True, extra)).encode()
        t0 = time.perf_counter()
        res["t_send"] = t0
        try:
            last = None
            done = False
            for now, data in sse_events(self.host, self.port, self.base + "/v1/completions", payload,
                                        self._headers(), self.timeout):
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    ev = json.loads(data)
                except ValueError:
                    res["error"] = f"bad event: {data[:200]!r}"
                    return res
                if not isinstance(ev, dict):
                    continue
                if "error" in ev:
                    res["error"] = f"in-stream error: {json.dumps(ev['error'])[:300]}"
                    return res
                if res["first_event"] is None and ev.get("choices"):
                    res["first_event"] = now - t0
                text = ""
                for ch in ev.get("choices") or []:
                    text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                if text:
                    last = note_content(res, now, t0, last)
                u = ev.get("usage")
                if isinstance(u, dict):
                    if u.get("completion_tokens") is not None:
                        res["completion_tokens"] = int(u["completion_tokens"])
                    if u.get("prompt_tokens") is not None:
                        res["prompt_tokens"] = int(u["prompt_tokens"])
            res["t_end"] = time.perf_counter()
            # a stream that ends without [DONE] still counts if the server closed it cleanly after content
            if not done and res["n_chunks"] == 0:
                res["error"] = "stream ended without content or [DONE]"
                return res
            res["ok"] = True
            return res
        except HTTPStatusError as e:
            res["error"] = str(e)
            return res
        except (OSError, ValueError, http.client.HTTPException) as e:
            res["error"] = f"{type(e).__name__}: {e}"
            return res
        finally:
            if res["t_end"] is None:
                res["t_end"] = time.perf_counter()


class LibraryTarget:
    """The library in this process as a target: one caller streaming `Llama.create_completion` on the main
    thread (what `llamba run` and a Python program get), timed exactly as a server's stream is."""
    in_process = True

    def __init__(self, model: str, threads: int, ctx: int):
        from llamba import Llama
        self.label, self.url = f"library {os.path.basename(model)}", model
        self.llm = Llama(model, n_ctx=ctx, n_threads=threads, verbose=False)
        self.model = os.path.basename(model)

    def discover_model(self):
        pass

    def stream(self, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
        res = new_result()
        t0 = res["t_send"] = time.perf_counter()
        last = None
        try:
            for ch in self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
                now = time.perf_counter()
                if res["first_event"] is None:
                    res["first_event"] = now - t0
                if ch["choices"] and ch["choices"][0].get("text"):
                    last = note_content(res, now, t0, last)
            res["ok"] = True
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"
        res["t_end"] = time.perf_counter()
        return res


class HTTPStatusError(Exception):
    pass


def sse_events(host: str, port: int, path: str, payload: bytes, headers: dict, timeout: float):
    """POST `payload` and yield (arrival time, data) for each server-sent `data:` line of the response.

    A plain socket and a few bytes operations per event (HTTP/1.1 with Connection: close; chunked, sized or
    close-delimited bodies): the load generator shares the machine with the server it measures, so the CPU it
    spends per token is taken from the server's kernels. http.client's readline over a chunked body cost about
    0.15-0.2 ms per event, which on 2 cores measured as ~30 % fewer tokens/s for one client than a curl client
    got from the same server."""
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(payload)}",
            "Connection: close"] + [f"{k}: {v}" for k, v in headers.items()]
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        buf = b""
        while b"\r\n\r\n" not in buf:
            got = sock.recv(65536)
            if not got:
                raise http.client.RemoteDisconnected("connection closed before the response head")
            buf += got
        hdr, buf = buf.split(b"\r\n\r\n", 1)
        lines = hdr.split(b"\r\n")
        parts = lines[0].split(None, 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        fields = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(b":")
            fields[k.strip().lower()] = v.strip()
        chunked = b"chunked" in fields.get(b"transfer-encoding", b"").lower()
        body = b""  # de-chunked bytes not yet split into lines
        eof = False
        if status != 200:
            rest = buf
            while not eof and len(rest) < 4096:
                got = sock.recv(65536)
                eof = not got
                rest += got
            raise HTTPStatusError(f"HTTP {status}: {rest[:300].decode(errors='replace')}")
        while True:
            now = time.perf_counter()
            if chunked:  # move every complete chunk of buf into body
                while True:
                    i = buf.find(b"\r\n")
                    if i < 0:
                        break
                    n = int(buf[:i].split(b";")[0], 16)
                    if n == 0:
                        eof = True
                        break
                    if len(buf) < i + 2 + n + 2:
                        break
                    body += buf[i + 2:i + 2 + n]
                    buf = buf[i + 2 + n + 2:]
            else:  # sized or close-delimited (Connection: close: the server closes after the body)
                body += buf
                buf = b""
            while True:
                j = body.find(b"\n")
                if j < 0:
                    break
                line, body = body[:j].strip(), body[j + 1:]
                if line.startswith(b"data:"):
                    yield now, line[5:].strip()
            if eof:
                return
            got = sock.recv(65536)
            if not got:
                if body.strip().startswith(b"data:"):
                    yield time.perf_counter(), body.strip()[5:].strip()
                return
            buf += got
    finally:
        sock.close()


def n_tokens(r: dict) -> int:
    return r["completion_tokens"] if r["completion_tokens"] is not None else r["n_chunks"]


# ---------------------------------------------------------------- statistics


def pct(xs, p: float):
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs):
    return pct(xs, 50)


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 10 s in which some runnable task waited for a CPU (others' load shows here)."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return None


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        la = loadavg()
        return f"load average: {la}"


# ---------------------------------------------------------------- one load level


def run_level(t: Target, n: int, a) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(n + 1)
    deadline = [0.0]

    def client(c: int):
        k = 0
        start.wait()
        while True:
            if a.requests:
                if k >= a.requests:
                    break
            elif time.perf_counter() >= deadline[0]:
                break
            p = PROMPTS[(c + k * n) % len(PROMPTS)]
            if a.unique:
                p = f"[{c}.{k}.{time.time_ns() % 10**9}] {p}"
            r = t.stream(p, a.max_tokens)
            with lock:
                results.append(r)
            k += 1

    la = loadavg()
    if getattr(t, "in_process", False):  # the library: its one caller on this (the main) thread
        if n != 1:
            return None
        start = threading.Barrier(1)
        t0 = time.perf_counter()
        deadline[0] = t0 + a.duration
        client(0)
        return _level(n, results, time.perf_counter() - t0, la)
    ths = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(n)]
    for th in ths:
        th.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + a.duration
    start.wait()
    for th in ths:
        th.join()
    return _level(n, results, time.perf_counter() - t0, la)


def _level(n: int, results: list, wall: float, la) -> dict:
    ok = [r for r in results if r["ok"]]
    bad = [r for r in results if not r["ok"]]
    toks = sum(n_tokens(r) for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    return {
        # decode speed as one stream sees it: tokens after the first over the time between first and last
        "decode_tok_s": round(len(gaps) / sum(gaps), 2) if gaps and sum(gaps) > 0 else None,
        "clients": n, "wall_s": round(wall, 3), "requests_ok": len(ok), "failed": len(bad),
        "errors": sorted({r["error"] for r in bad})[:5],
        "completion_tokens": toks, "tokens_per_request": round(toks / len(ok), 1) if ok else None,
        "usage_reported": all(r["completion_tokens"] is not None for r in ok) if ok else None,
        "tok_s": round(toks / wall, 2) if wall > 0 else None,
        "req_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "ttft_p50": median(ttft), "ttft_p95": pct(ttft, 95),
        "itl_p50": median(gaps), "itl_p95": pct(gaps, 95),
        "load1": la, "cpu_psi10_end": cpu_pressure(),
    }


# ---------------------------------------------------------------- long-prompt probe


def _long_unit() -> str:
    return " ".join(_PASSAGES)


def probe(t: Target, a) -> dict:
    """Short-request TTFT idle vs. while a ~probe_tokens prompt is being prefilled."""
    tag = [0]

    def first(r):  # first token: first text chunk, else the first event (a request may end at once with EOS)
        return r["ttft"] if r["ttft"] is not None else r["first_event"]

    def fresh(prefix: str) -> str:
        tag[0] += 1
        return f"{prefix} {tag[0]}-{time.time_ns() % 10**9}:"

    short_text = "Write one sentence about the sea."
    unit = _long_unit()
    # calibrate: tokens of one unit of long text (non-streaming, 1 token)
    st, out = t.post_json("/v1/completions", t.body(fresh("Calibration") + " " + unit, 1, stream=False))
    per_unit = None
    if st == 200 and isinstance(out.get("usage"), dict):
        per_unit = out["usage"].get("prompt_tokens")
    if not per_unit:
        per_unit = int(len(unit.split()) * 1.35)
        print(f"  [{t.label}] no usage.prompt_tokens from calibration (HTTP {st}); estimating {per_unit}/unit",
              file=sys.stderr)
    words = unit.split()
    n_words = int(len(words) * a.probe_tokens / per_unit)
    long_words = []
    while len(long_words) < n_words:
        long_words += [f"Part {len(long_words) // len(words) + 1}."] + words
    long_body = " ".join(long_words[:n_words])

    # idle TTFT (one untimed warm-up first)
    t.stream(fresh("Note") + " " + short_text, a.probe_short_tokens)
    idle = []
    for _ in range(a.probe_reps):
        r = t.stream(fresh("Note") + " " + short_text, a.probe_short_tokens)
        if r["ok"] and first(r) is not None:
            idle.append(first(r))
        else:
            print(f"  [{t.label}] idle short request failed: {r['error']}", file=sys.stderr)
        time.sleep(0.2)
    loaded, long_ttft, long_prompt_tok, before = [], [], [], 0
    errors = []
    for _ in range(a.probe_reps):
        holder = {}
        lp = fresh("Document") + " " + long_body + "\n\nSummarize the document above."
        th = threading.Thread(target=lambda: holder.update(r=t.stream(lp, a.probe_long_tokens)), daemon=True)
        th.start()
        time.sleep(a.probe_delay)
        rs = t.stream(fresh("Note") + " " + short_text, a.probe_short_tokens)
        th.join()
        rl = holder.get("r")
        if rs["ok"] and first(rs) is not None:
            loaded.append(first(rs))
        else:
            errors.append(f"short: {rs['error']}")
        lt = first(rl) if rl and rl["ok"] else None
        if lt is not None:
            long_ttft.append(lt)
            if rl["prompt_tokens"]:
                long_prompt_tok.append(rl["prompt_tokens"])
            if rs["ok"] and first(rs) is not None and rs["t_send"] + first(rs) < rl["t_send"] + lt:
                before += 1
        else:
            errors.append(f"long: {rl['error'] if rl else 'no result'}")
        time.sleep(0.5)
    ti, tl = median(idle), median(loaded)
    return {"idle_ttft_p50": ti, "loaded_ttft_p50": tl, "ratio": (tl / ti) if ti and tl else None,
            "idle_ttft": idle, "loaded_ttft": loaded, "long_ttft": long_ttft,
            "long_prompt_tokens": long_prompt_tok or [a.probe_tokens],
            "short_first_before_long_first": before, "reps": a.probe_reps, "errors": errors[:5],
            "load1": loadavg()}


# ---------------------------------------------------------------- launching llamba serve


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_llamba(a):
    help_out = subprocess.run([sys.executable, "-m", "llamba.cli", "serve", "--help"], capture_output=True,
                              text=True).stdout
    port = free_port()
    cmd = [sys.executable, "-m", "llamba.cli", "serve", "-m", a.model, "-t", str(a.threads),
           "-c", str(a.ctx), "--port", str(port)]
    if a.parallel:
        if "-np" in help_out.split() or "-np" in help_out:
            cmd += ["-np", str(a.parallel)]
        elif "--parallel" in help_out:
            cmd += ["--parallel", str(a.parallel)]
        else:
            print("llamba serve --help lists no -np/--parallel: not passed", file=sys.stderr)
    cmd += shlex.split(a.server_args or "")
    log = open(a.server_log, "w") if a.server_log else tempfile.TemporaryFile("w+")
    print(f"starting: {shlex.join(cmd)}", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    t = Target(f"http://127.0.0.1:{port}", a.label or "llamba serve")
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            tail = f"(see {a.server_log})"
            if not a.server_log:
                log.seek(0)
                tail = log.read()[-2000:]
            raise SystemExit(f"llamba serve exited with {proc.returncode} before it was ready\n{tail}")
        try:
            st, _ = t.get("/health", timeout=2)
            if st == 200:
                break
        except (OSError, http.client.HTTPException):
            pass
        if time.time() - t0 > a.startup_timeout:
            proc.kill()
            raise SystemExit(f"llamba serve not ready after {a.startup_timeout} s")
        time.sleep(0.5)
    print(f"llamba serve ready on port {port} after {time.time() - t0:.1f} s", file=sys.stderr)
    return proc, t, cmd


def stop(proc):
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- output


def _ms(x):
    return "-" if x is None else f"{x * 1000:.0f}"


def _f(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def print_table(label: str, levels: list[dict]):
    print(f"\n{label}")
    h = (f"{'clients':>7} {'tok/s':>8} {'dec/s':>7} {'req/s':>6} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} "
         f"{'ITL p95':>8} {'ok':>5} {'fail':>4} {'tok/req':>7} {'wall s':>6} {'load1':>5} {'psi10':>5}")
    print(h)
    for L in levels:
        print(f"{L['clients']:>7} {_f(L['tok_s']):>8} {_f(L.get('decode_tok_s')):>7} {_f(L['req_s'], 2):>6} "
              f"{_ms(L['ttft_p50']):>7}ms "
              f"{_ms(L['ttft_p95']):>7}ms {_ms(L['itl_p50']):>6}ms {_ms(L['itl_p95']):>6}ms {L['requests_ok']:>5} "
              f"{L['failed']:>4} {_f(L['tokens_per_request']):>7} {_f(L['wall_s']):>6} {_f(L['load1'], 2):>5} {_f(L.get('cpu_psi10_end')):>5}")
        for e in L["errors"]:
            print(f"{'':>9}error: {e}")


def _ratio(x, y, nd=2):
    return "-" if not x or not y else f"{x / y:.{nd}f}"


def print_compare(la: str, lb: str, A: list[dict], B: list[dict]):
    print(f"\nside by side: A = {la}, B = {lb} (ratios A/B)")
    print(f"{'clients':>7} | {'tok/s A':>8} {'tok/s B':>8} {'A/B':>5} | {'dec/s A':>8} {'dec/s B':>8} {'A/B':>5} | "
          f"{'TTFT50 A':>9} {'TTFT50 B':>9} {'A/B':>5} | {'ITL50 A':>8} {'ITL50 B':>8} {'A/B':>5} | {'fail A/B':>8}")
    byc = {y["clients"]: y for y in B}
    for x in A:
        y = byc.get(x["clients"])
        if y is None:
            continue
        xd, yd = x.get("decode_tok_s"), y.get("decode_tok_s")
        print(f"{x['clients']:>7} | {_f(x['tok_s']):>8} {_f(y['tok_s']):>8} {_ratio(x['tok_s'], y['tok_s']):>5} | "
              f"{_f(xd):>8} {_f(yd):>8} {_ratio(xd, yd):>5} | "
              f"{_ms(x['ttft_p50']):>7}ms {_ms(y['ttft_p50']):>7}ms {_ratio(x['ttft_p50'], y['ttft_p50']):>5} | "
              f"{_ms(x['itl_p50']):>6}ms {_ms(y['itl_p50']):>6}ms {_ratio(x['itl_p50'], y['itl_p50']):>5} | "
              f"{x['failed']:>3}/{y['failed']:<4}")


def print_probe(label: str, p: dict):
    print(f"\nlong-prompt probe, {label}: short request TTFT idle {_ms(p['idle_ttft_p50'])} ms, "
          f"during a {median(p['long_prompt_tokens']):.0f}-token prefill {_ms(p['loaded_ttft_p50'])} ms, "
          f"ratio {_f(p['ratio'], 2)} (target <= 2); long request TTFT p50 {_ms(median(p['long_ttft']))} ms; "
          f"short answered before the long prompt's first token in {p['short_first_before_long_first']}/{p['reps']}"
          f"; load1 {p['load1']}")
    for e in p["errors"]:
        print(f"  error: {e}")


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("-m", "--model", help="GGUF file: start `llamba serve` on it (on a free loopback port)")
    g.add_argument("--url", help="a running OpenAI-compatible server, e.g. http://127.0.0.1:8080")
    ap.add_argument("--compare-url", help="a second running server measured alternately with the first")
    ap.add_argument("--compare-library", metavar="MODEL.gguf",
                    help="compare with the library itself in this process (one caller on the main thread, "
                         "-t threads; one-client levels only), measured alternately like --compare-url")
    ap.add_argument("--label", help="name of the first server in the output")
    ap.add_argument("--compare-label", help="name of the second server in the output")
    ap.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' to both servers")
    ap.add_argument("--clients", default="1,2,4,8,16", help="concurrent clients per level (default 1,2,4,8,16)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per level (default 20)")
    ap.add_argument("--requests", type=int, default=0, help="requests per client per level instead of --duration")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    ap.add_argument("--unique", action="store_true",
                    help="prefix every prompt with a unique tag so prefix caches cannot skip its prefill")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests per server first (default 2)")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--timeout", type=float, default=600.0, help="socket timeout per request (default 600 s)")
    ls = ap.add_argument_group("llamba serve (with -m)")
    ls.add_argument("-t", "--threads", type=int, default=2)
    ls.add_argument("-np", "--parallel", type=int, default=8,
                    help="passed as -np N when `llamba serve --help` lists it (0: not passed)")
    ls.add_argument("-c", "--ctx", type=int, default=8192)
    ls.add_argument("--server-args", help="more arguments for llamba serve (one shell-quoted string)")
    ls.add_argument("--server-log", help="write the server's output to this file")
    ls.add_argument("--startup-timeout", type=float, default=600.0)
    pr = ap.add_argument_group("long-prompt probe")
    pr.add_argument("--long-prompt-probe", action="store_true", help="also run the long-prompt probe")
    pr.add_argument("--probe-only", action="store_true", help="run only the long-prompt probe")
    pr.add_argument("--probe-tokens", type=int, default=2000, help="long prompt size in tokens (default 2000)")
    pr.add_argument("--probe-reps", type=int, default=3)
    pr.add_argument("--probe-delay", type=float, default=0.05, help="seconds between long and short (0.05)")
    pr.add_argument("--probe-short-tokens", type=int, default=4, help="max_tokens of the short request")
    pr.add_argument("--probe-long-tokens", type=int, default=16, help="max_tokens of the long request")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.clients.split(",") if x.strip()]
    if a.requests < 0 or a.duration <= 0 or not levels or min(levels) < 1:
        ap.error("bad --clients/--duration/--requests")

    proc = None
    try:
        if a.model:
            proc, A, cmd = launch_llamba(a)
        else:
            A, cmd = Target(a.url, a.label or f"server@{a.url}"), None
        A.api_key = a.api_key
        A.timeout = a.timeout
        targets = [A]
        if a.compare_url:
            B = Target(a.compare_url, a.compare_label or f"server@{a.compare_url}", a.api_key, a.timeout)
            targets.append(B)
        elif a.compare_library:
            targets.append(LibraryTarget(a.compare_library, a.threads, a.ctx))
        for t in targets:
            t.discover_model()
            for i in range(a.warmup):
                r = t.stream(PROMPTS[i % len(PROMPTS)], a.max_tokens)
                if not r["ok"]:
                    raise SystemExit(f"{t.label}: warm-up request failed: {r['error']}")
            print(f"{t.label}: model {t.model!r}, warm", file=sys.stderr)

        report = {"argv": sys.argv[1:] if argv is None else argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "uptime_start": uptime(), "cpus": os.cpu_count(), "llamba_cmd": cmd,
                  "config": {"clients": levels, "duration": a.duration, "requests": a.requests,
                             "max_tokens": a.max_tokens, "unique": a.unique, "n_prompts": len(PROMPTS)},
                  "servers": {t.label: {"url": t.url, "model": t.model, "levels": [], "probe": None}
                              for t in targets}}
        print(f"uptime at start: {report['uptime_start']}", file=sys.stderr)
        if not a.probe_only:
            for li, n in enumerate(levels):
                order = targets if li % 2 == 0 else targets[::-1]
                for t in order:
                    L = run_level(t, n, a)
                    if L is None:
                        continue
                    report["servers"][t.label]["levels"].append(L)
                    print(f"  [{t.label}] {n} clients: {_f(L['tok_s'])} tok/s, TTFT p50 {_ms(L['ttft_p50'])} ms, "
                          f"ITL p50 {_ms(L['itl_p50'])} ms, {L['requests_ok']} ok, {L['failed']} failed, "
                          f"load1 {L['load1']}", file=sys.stderr)
        if a.long_prompt_probe or a.probe_only:
            for t in targets:
                if not getattr(t, "in_process", False):
                    report["servers"][t.label]["probe"] = probe(t, a)
        report["uptime_end"] = uptime()

        print(f"\nuptime at start: {report['uptime_start']}\nuptime at end:   {report['uptime_end']}")
        if not a.probe_only:
            print(f"load: {'%d requests per client' % a.requests if a.requests else '%g s per level' % a.duration}, "
              f"max_tokens {a.max_tokens}, temperature 0, {len(PROMPTS)} prompts, streaming /v1/completions")
        for t in targets:
            s = report["servers"][t.label]
            if s["levels"]:
                print_table(f"{t.label} ({t.url}, model {t.model})", s["levels"])
        if len(targets) == 2 and not a.probe_only:
            print_compare(targets[0].label, targets[1].label, report["servers"][targets[0].label]["levels"],
                          report["servers"][targets[1].label]["levels"])
        for t in targets:
            p = report["servers"][t.label]["probe"]
            if p:
                print_probe(t.label, p)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)
            print(f"\nwrote {a.json}")
        fails = sum(L["failed"] for s in report["servers"].values() for L in s["levels"])
        return 1 if fails else 0
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
