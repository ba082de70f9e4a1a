"""llamba replicas behind Ray Serve: many engines, each batching its own requests, as one OpenAI-compatible endpoint.

    pip install "llamba[cluster]"          # ray[serve]

    from ray import serve
    import llamba.cluster
    serve.run(llamba.cluster.deployment("model.gguf", replicas=2, threads_per_replica=1), route_prefix="/")

or `llamba cluster serve -m MODEL --replicas N`. The pieces (docs/cluster.md):

- `LlambaReplica` (one Ray actor per replica, `num_cpus` = threads): loads the model from `model_path` (a path every
  node can read), runs its own continuous-batching engine (`Llama.start_engine(n_parallel)`) and llamba's own
  FastAPI app (`llamba.server.create_app`): the routes, schemas, errors and streaming are the single-server ones.
  `handle(scope, body)` runs that ASGI app on one buffered request and yields the ASGI messages it sends.
- `LlambaIngress` (the HTTP entry behind Ray Serve's proxy, no CPU reserved): reads the request body, computes the
  request's affinity key (the conversation: the messages up to the first user message, or the prompt's start),
  forwards it with a streaming deployment handle, and relays the messages. A replica that dies before anything
  reached the client: the request is sent once more, to another replica; one that dies mid-stream: the stream ends
  with an SSE error event. No replica / a full queue: 503 with llamba's JSON error body.
- `LlambaRouter` (llamba.cluster_router, a Ray Serve `RequestRouter` running inside the ingress process): sends a
  request whose key it has seen to the replica that served the key (its KV cache holds that prefix) while that
  replica has a free decode slot (or is at most `imbalance` requests busier than the least-loaded one); other
  requests go to the replica with the fewest in flight.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import threading
import time
import uuid

try:
    from ray import serve
    HAVE_RAY = True
except ImportError:  # the `cluster` extra is not installed: the module imports, deployment() says what to install
    serve = None
    HAVE_RAY = False

log = logging.getLogger("llamba.cluster")

APP_NAME = "llamba"
REPLICA_HEADER = b"x-llamba-replica"  # response header: the Ray actor name of the replica that answered
RETRY_HEADER = b"x-llamba-retried-from"  # response header: the replica that failed before this answer (retried)
SESSION_HEADER = b"x-session-id"  # request header: an explicit affinity key (overrides the one from the body)
PROMPT_KEY_CHARS = 256  # a completions prompt is keyed on its first this many characters
PROMPT_KEY_IDS = 64  # ... or its first this many token ids
MAX_KEYS = 100_000  # affinity entries kept per router (least recently used dropped)
DEFAULT_MAX_BODY = 1 << 20


def _need_ray():
    if not HAVE_RAY:
        from llamba.errors import LlambaError
        raise LlambaError('llamba.cluster needs Ray Serve: pip install "llamba[cluster]" (ray[serve])')


# ---------------------------------------------------------------- affinity keys (ingress side)

def _digest(obj) -> str:
    raw = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def affinity_key(path: str, body: bytes, headers=()) -> str | None:
    """The conversation a request belongs to, or None (then the least-loaded replica takes it).

    An `X-Session-ID` header wins. Chat: the model and the messages up to and including the first user message
    (every later turn of the conversation starts with them). Completions: the model and the first
    PROMPT_KEY_CHARS characters (or PROMPT_KEY_IDS token ids) of the first prompt. Anything else: None."""
    for k, v in headers:
        if k.lower() == SESSION_HEADER and v:
            return "s:" + _digest(v.decode("latin-1"))
    if not path.endswith(("/chat/completions", "/completions")) or not body:
        return None
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(req, dict):
        return None
    model = req.get("model")
    msgs = req.get("messages")
    if path.endswith("/chat/completions"):
        if not isinstance(msgs, list) or not msgs:
            return None
        head = []
        for m in msgs:
            head.append(m)
            if isinstance(m, dict) and m.get("role") == "user":
                break
        return "c:" + _digest([model, head])
    p = req.get("prompt")
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str) and p:
        return "p:" + _digest([model, p[:PROMPT_KEY_CHARS]])
    if isinstance(p, list) and p:
        return "p:" + _digest([model, p[:PROMPT_KEY_IDS]])
    return None


# ---------------------------------------------------------------- the router (runs in the ingress process)

# ticket -> the replica a request was routed to, so that the ingress can steer a retry away from a replica that
# failed (the router and the ingress share one process; entries are dropped oldest first)
_ROUTED: collections.OrderedDict = collections.OrderedDict()
_ROUTED_LOCK = threading.Lock()


def _note_routed(ticket, rid):
    with _ROUTED_LOCK:
        _ROUTED[ticket] = rid
        while len(_ROUTED) > 10_000:
            _ROUTED.popitem(last=False)


def routed_to(ticket) -> str | None:
    with _ROUTED_LOCK:
        return _ROUTED.pop(ticket, None)


# ---------------------------------------------------------------- a replica: one engine, llamba's own app

class LlambaReplica:
    """One llamba engine and llamba's FastAPI app; `handle` runs one buffered HTTP request through the app."""

    def __init__(self, model_path: str, threads: int = 1, n_parallel: int = 4, llama_kwargs: dict | None = None,
                 server_kwargs: dict | None = None, alias: str | None = None, stream_interval: float = 0.0):
        self.stream_interval = float(stream_interval or 0.0)
        from llamba.options import set_default_env
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            set_default_env(var, str(threads))
        from llamba.llama import Llama
        from llamba.server import LlambaService, create_app
        kw = dict(n_ctx=4096, embedding=True)
        kw.update(llama_kwargs or {})
        kw["n_threads"] = threads
        chat_template = kw.pop("chat_template", None)
        self.llm = Llama(model_path, chat_template=chat_template, **kw)
        self.llm.start_engine(n_parallel)
        skw = dict(server_kwargs or {})
        app_kw = {k: skw.pop(k) for k in ("max_body", "api_key", "read_timeout") if k in skw}
        self.svc = LlambaService(self.llm, alias=alias or os.path.basename(model_path), n_parallel=n_parallel,
                                 **skw)
        self.app = create_app(self.svc, **app_kw)
        try:
            import ray
            self.name = ray.get_runtime_context().get_actor_name() or ""
        except Exception:  # noqa: BLE001 - outside Ray (tests of the class itself)
            self.name = ""

    async def handle(self, scope: dict, body: bytes, **routing):
        """Run llamba's app on one request; yields lists of ASGI messages (several when they come together, so
        a batch of tokens is one Ray object, not one per token). `routing`: the router's hints (affinity key,
        replica to avoid, ticket), unused here."""
        q: asyncio.Queue = asyncio.Queue(maxsize=256)
        gone = asyncio.Event()
        given = False
        done = object()

        async def receive():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg):
            if msg.get("type") == "http.response.start" and self.name:
                msg = dict(msg)
                msg["headers"] = list(msg.get("headers") or []) + [(REPLICA_HEADER, self.name.encode())]
            await q.put(msg)

        async def run():
            try:
                await self.app(dict(scope), receive, send)
            finally:
                await q.put(done)

        task = asyncio.ensure_future(run())
        try:
            finished = False
            bodies = 0
            while not finished:
                batch = [await q.get()]
                if (self.stream_interval > 0 and bodies and batch[0] is not done
                        and batch[0].get("more_body")):  # (the first event goes at once: time to first token)
                    # a stream's events: gather what comes within stream_interval into one Ray object
                    t_end = time.monotonic() + self.stream_interval
                    while batch[-1] is not done and batch[-1].get("more_body"):
                        left = t_end - time.monotonic()
                        if left <= 0:
                            break
                        try:
                            batch.append(await asyncio.wait_for(q.get(), left))
                        except asyncio.TimeoutError:
                            break
                while not q.empty() and batch[-1] is not done:
                    batch.append(q.get_nowait())
                if batch[-1] is done:
                    batch.pop()
                    finished = True
                bodies += sum(1 for m in batch if m.get("type") == "http.response.body")
                if batch:
                    yield batch
            task.result()  # an exception from the app (after its response) surfaces here
        finally:
            gone.set()  # the caller went away (client disconnected): llamba cancels the generation
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), 5)
                except (asyncio.TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
                    task.cancel()

    def stats(self) -> dict:
        return {"name": self.name, **self.svc.snapshot()}

    def check_health(self):
        """Ray Serve calls this periodically: a replica whose engine loop is gone is replaced."""
        eng = getattr(self.llm, "engine", None)
        th = getattr(eng, "_thread", None) or getattr(eng, "thread", None)
        if isinstance(th, threading.Thread) and not th.is_alive():
            raise RuntimeError("the llamba engine loop has stopped")

    def __del__(self):
        try:
            self.svc.close()
            self.llm.close()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------- the ingress: HTTP in, routed handle calls out

_FWD_SCOPE = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
              "headers", "client", "server")


def _json_error(status: int, message: str, code: str | None, etype: str = "server_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}}).encode()


class LlambaIngress:
    """Raw ASGI app behind Ray Serve's HTTP proxy: buffers the body, routes by affinity key, relays the replica's
    messages; retries once on another replica when nothing has reached the client yet."""

    def __init__(self, replicas, max_body: int = DEFAULT_MAX_BODY, request_timeout: float = 600.0,
                 retries: int = 1):
        self.replicas = replicas
        self.max_body = int(max_body)
        self.request_timeout = float(request_timeout)
        self.retries = int(retries)
        self.counts = collections.Counter()

    def __serve_build_asgi_app__(self):
        async def app(scope, receive, send):  # a plain coroutine function: uvicorn's lifespan sees ASGI 3
            await self._asgi(scope, receive, send)
        return app

    async def _asgi(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = bytearray()
        more = True
        while more and len(body) <= self.max_body:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        # an oversized body: the first max_body+1 bytes go on, and llamba's body check answers 413
        body = bytes(body[: self.max_body + 1])
        fwd = {k: scope[k] for k in _FWD_SCOPE if k in scope}
        fwd["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
        root = scope.get("root_path") or ""
        if root and fwd.get("path", "").startswith(root):  # deployed under a route prefix: llamba's own paths
            fwd["path"] = fwd["path"][len(root):] or "/"
            fwd["raw_path"] = fwd["path"].encode()
        fwd["root_path"] = ""
        fwd.setdefault("query_string", b"")
        fwd.setdefault("raw_path", fwd.get("path", "/").encode())
        fwd["state"] = {}
        key = affinity_key(fwd.get("path", ""), body, fwd["headers"])
        await self._forward(fwd, body, key, send)

    async def _forward(self, scope, body, key, send):
        from ray import exceptions as rex
        from ray.serve.exceptions import BackPressureError
        avoid = None
        for attempt in range(self.retries + 1):
            ticket = uuid.uuid4().hex
            start = None
            held: list = []  # body parts not yet sent (a non-streamed answer is held whole)
            sent = False
            sse = False
            try:
                gen = self.replicas.options(stream=True).handle.remote(scope, body, affinity=key, avoid=avoid,
                                                                      ticket=ticket)
                async for batch in _deadline(gen, self.request_timeout):
                    for msg in batch:
                        t = msg.get("type")
                        if t == "http.response.start":
                            start = msg
                            if avoid:  # say which replica failed before this answer
                                start = dict(msg, headers=list(msg.get("headers") or []) + [(RETRY_HEADER,
                                                                                          avoid.encode())])
                            ctype = dict((bytes(k).lower(), bytes(v)) for k, v in msg.get("headers") or [])
                            sse = ctype.get(b"content-type", b"").startswith(b"text/event-stream")
                        elif t == "http.response.body":
                            if sse:
                                if not sent:
                                    await send(start)
                                    sent = True
                                await send(msg)
                            else:
                                held.append(msg.get("body", b""))
                                if not msg.get("more_body", False):
                                    await _send_whole(send, start, b"".join(held))
                                    sent = True
                routed_to(ticket)
                if start is not None and not sent:  # a response with no body message
                    await _send_whole(send, start, b"".join(held))
                elif start is None:
                    raise RuntimeError("the replica ended the request without an answer")
                self.counts["ok"] += 1
                return
            except asyncio.CancelledError:
                routed_to(ticket)
                raise
            except BackPressureError:
                routed_to(ticket)
                self.counts["busy"] += 1
                return await _send_whole(send, _start(503), _json_error(
                    503, "the server is busy (request queue full); retry later", "queue_full"))
            except Exception as e:  # noqa: BLE001 - a replica failed (died, unreachable) or the request timed out
                failed = routed_to(ticket)
                why = _why(e, rex)
                log.warning("llamba cluster: request failed on replica %s (attempt %d): %s", failed, attempt + 1,
                            why)
                if sent:
                    self.counts["cut"] += 1
                    if sse:
                        err = {"error": {"message": f"the replica serving this stream failed: {why}",
                                         "type": "server_error", "param": None, "code": "replica_failed"}}
                        try:
                            await send({"type": "http.response.body",
                                        "body": b"data: " + json.dumps(err).encode() + b"\n\n", "more_body": False})
                        except Exception:  # noqa: BLE001 - client gone too
                            pass
                    return
                if isinstance(e, asyncio.TimeoutError):  # the replica may still be working on it: not sent again
                    self.counts["failed"] += 1
                    return await _send_whole(send, _start(503), _json_error(
                        503, f"no answer from the replica within {self.request_timeout:g} s; retry later",
                        "replica_unavailable"))
                if not _retryable(e, rex):
                    self.counts["failed"] += 1
                    return await _send_whole(send, _start(500), _json_error(
                        500, f"the replica failed on this request ({why})", "internal_error"))
                if attempt < self.retries:
                    self.counts["retried"] += 1
                    avoid = failed or "unknown"
                    continue
                self.counts["failed"] += 1
                return await _send_whole(send, _start(503), _json_error(
                    503, f"no replica could answer this request ({why}); retry later", "replica_unavailable"))


def _retryable(e, rex) -> bool:
    """The replica (not the request) failed: it died, or cannot be reached."""
    from ray.serve.exceptions import ReplicaUnavailableError
    return isinstance(e, (rex.RayActorError, rex.ActorUnavailableError, ReplicaUnavailableError))


def _why(e, rex) -> str:
    if isinstance(e, rex.RayTaskError) and getattr(e, "cause", None) is not None:
        e = e.cause
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, rex.ActorDiedError):
        return "replica died"
    if isinstance(e, (rex.RayActorError, rex.ActorUnavailableError)):
        return "replica unavailable"
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:200]}" if s else type(e).__name__


async def _deadline(agen, timeout: float):
    """Iterate `agen`, raising asyncio.TimeoutError when one item takes longer than `timeout` s."""
    it = agen.__aiter__()
    while True:
        try:
            item = await asyncio.wait_for(it.__anext__(), timeout)
        except StopAsyncIteration:
            return
        yield item


def _start(status: int) -> dict:
    return {"type": "http.response.start", "status": status,
            "headers": [(b"content-type", b"application/json")]}


async def _send_whole(send, start: dict, body: bytes):
    headers = [(k, v) for k, v in (start.get("headers") or []) if bytes(k).lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send(dict(start, headers=headers))
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ---------------------------------------------------------------- the application

def deployment(model_path: str, replicas: int = 2, threads_per_replica: int = 1, n_parallel: int = 4, *,
               autoscaling: dict | None = None, max_queue: int = 64, max_ongoing_requests: int | None = None,
               max_queued_requests: int | None = None, imbalance: int = 0, llama_kwargs: dict | None = None,
               server_kwargs: dict | None = None, alias: str | None = None, max_body: int = DEFAULT_MAX_BODY,
               request_timeout: float = 600.0, ray_actor_options: dict | None = None, name: str = "LlambaReplica",
               stream_interval: float = 0.05):
    """A Ray Serve application: `LlambaIngress` in front of `replicas` `LlambaReplica`s of `model_path`.

    model_path: a GGUF file every node can read at this path (each replica loads it itself).
    threads_per_replica: CPU threads of each engine; also the replica's `num_cpus` reservation.
    n_parallel: requests each engine decodes at once; `max_ongoing_requests` (default 2 x n_parallel) is how
        many Ray Serve sends a replica at once (the ones beyond its slots wait in the replica's own queue, which
        costs nothing while waiting); beyond that they wait in the ingress's router (at most
        `max_queued_requests`, default `max_queue`, then 503), which probes the replicas until one has room.
    autoscaling: None for a fixed `replicas`; else Ray Serve's autoscaling_config (min_replicas, max_replicas,
        target_ongoing_requests, ...), defaults min 1, max `replicas`, target n_parallel (the queue beyond the
        slots of every replica makes it scale up).
    imbalance: a conversation stays on its replica while that replica has a free decode slot, or has at most
        this many more requests in flight than the least-loaded one (default 0: a busy replica's conversation
        moves rather than waits; more favours cache reuse over waiting).
    stream_interval: after a stream's first event, a replica sends the events that come within this many
        seconds as one Ray object (fewer objects through the handle and the proxy: measured 3.3 -> 1 ms of
        ingress + proxy CPU per token with 0.05, at up to this much added latency per event); 0 sends what is
        ready at once.
    llama_kwargs / server_kwargs: passed to `Llama(...)` / `LlambaService(...)` (+ create_app's api_key,
        read_timeout) in each replica. Returns the bound application for `serve.run(app, route_prefix="/")`."""
    _need_ray()
    from ray.serve.config import RequestRouterConfig
    threads = max(1, int(threads_per_replica))
    n_parallel = max(1, int(n_parallel))
    actor_opts = {"num_cpus": threads}
    actor_opts.update(ray_actor_options or {})
    opts = dict(name=name, ray_actor_options=actor_opts,
                max_ongoing_requests=int(max_ongoing_requests or 2 * n_parallel),
                request_router_config=RequestRouterConfig(request_router_class="llamba.cluster_router.LlambaRouter",
                                                          request_router_kwargs={"imbalance": int(imbalance),
                                                                                 "slots": n_parallel}),
                health_check_period_s=5, graceful_shutdown_timeout_s=5)
    # requests waiting in the router beyond every replica's max_ongoing_requests: 503 past this (as llamba serve's
    # --max-queue), -1 = no limit
    opts["max_queued_requests"] = int(max_queue if max_queued_requests is None else max_queued_requests)
    if autoscaling is not None:
        cfg = {"min_replicas": 1, "max_replicas": max(1, int(replicas)), "target_ongoing_requests": n_parallel}
        cfg.update(autoscaling)
        opts["autoscaling_config"] = cfg
    else:
        opts["num_replicas"] = max(1, int(replicas))
    skw = {"max_queue": max_queue, "max_body": max_body}
    skw.update(server_kwargs or {})
    replica = serve.deployment(LlambaReplica).options(**opts).bind(
        model_path, threads=threads, n_parallel=n_parallel, llama_kwargs=llama_kwargs, server_kwargs=skw,
        alias=alias, stream_interval=stream_interval)
    ingress = serve.deployment(serve.ingress()(LlambaIngress)).options(
        name="LlambaIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return ingress.bind(replica, max_body=max_body, request_timeout=request_timeout)


def run(app, *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME, route_prefix: str = "/",
        blocking: bool = False):
    """Start Serve's HTTP proxy on host:port (when Serve is not running yet) and deploy `app` at `route_prefix`
    (its endpoints are then http://host:port/PREFIX/v1/...)."""
    _need_ray()
    serve.start(http_options={"host": host, "port": int(port)})
    return serve.run(app, name=name, route_prefix=route_prefix, blocking=blocking)


def replica_names(name: str = APP_NAME, deployment_name: str = "LlambaReplica") -> list[str]:
    """Ray actor names of the replicas of `deployment_name` in app `name` (what x-llamba-replica reports)."""
    _need_ray()
    import ray
    prefix = f"SERVE_REPLICA::{name}#{deployment_name}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if isinstance(a, dict) and a.get("name", "").startswith(prefix))


def wait_replicas(n: int, timeout: float = 120.0, name: str = APP_NAME, deployment_name: str = "LlambaReplica",
                  gone=()) -> bool:
    """Block until `deployment_name` of app `name` has `n` running replicas, none of them named in `gone` (e.g. one
    just killed), and is healthy (True), or `timeout` passes (False)."""
    _need_ray()
    gone = set(gone)
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            st = serve.status().applications[name].deployments[deployment_name]
            if st.replica_states.get("RUNNING", 0) >= n and st.status == "HEALTHY":
                names = replica_names(name, deployment_name)
                if not gone & set(names) and len(names) >= n:
                    return True
        except (KeyError, AttributeError):
            pass
        time.sleep(0.5)
    return False
