"""Continuous batching: one scheduler loop that serves many sequences at once, with speculative decoding inside
the batch.

Each `step()`:
1. admits waiting requests (up to `n_parallel` running) onto sequences (llamba.kv_cache.SeqCache) from one
   shared KV pool, reusing the longest cached prefix an idle sequence still holds (a shared system prompt, the
   earlier turns of a chat);
2. gives every running sequence either its decode token plus drafts (MTP or n-gram) or the next chunk of its
   prompt, under a per-step token budget (chunked prefill: a long prompt does not stall everyone's decoding);
3. runs ONE forward over all those rows (llamba.models.base `forward_batch`: weights streamed once per step);
4. samples per sequence with its own sampler (parameters, seed, penalty history), verifying drafts like
   llamba.speculative.verifier does (longest agreeing prefix + correction/bonus; KV and recurrent state rolled
   back), streams each token to its request, and retires finished or cancelled sequences;
5. drafts the next step's tokens (MTP head catch-up and drafts batched over the sequences too).
Plain decoding is the same path with no drafts. Every row is computed by row-exact kernels, so a sequence's
logits, and hence its tokens under greedy or seeded sampling, do not depend on what else is in the batch.

The engine is stepped by the threads that wait for its tokens (iterating a `Request` runs a step whenever no other
thread is running one: a single caller decodes at the library's own speed, with no thread hand-off per token), by
`run_until_done()` (the offline batch API), or by a thread of its own (`start()`). Callers talk to it only through
`submit()` and the `Request` handles it returns.
"""
from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import OrderedDict, deque

import numpy as np

from llamba.errors import ContextOverflowError, LlambaError, TokenIdError
from llamba.kv_cache import KVExhaustedError, SeqCache
from llamba.sampling import Sampler, SamplingParams, draft_top

try:  # consumers hosted on the engine's thread (Engine.spawn); without it they run on threads of their own
    import greenlet as _gl
except ImportError:  # pragma: no cover - a dependency; kept optional for embedders
    _gl = None

_END = object()
_ids = itertools.count(1)


class Token:
    """One generated token: its id and (when the request asked for them) the logits row it was sampled from."""
    __slots__ = ("id", "row")

    def __init__(self, tid: int, row=None):
        self.id = tid
        self.row = row


class Request:
    """A generation request and its output stream. Iterate it for `Token`s (blocks until each comes); `cancel()`
    stops it within one step. After the stream ends: `finish_reason` ('stop' | 'length' | 'cancelled'),
    `n_prompt`, `n_cached` (prompt tokens reused from the cache), `n_gen`, `error` (an exception, re-raised by
    the iterator), `prompt_logprobs` (when asked: per prompt position i >= 1, (logprob of token i, top-n
    [(id, logprob)]))."""

    def __init__(self, prompt, params: SamplingParams, max_tokens: int | None, *, stop_at_eog: bool = True,
                 want_rows: bool = False, prompt_logprobs: int | None = None, engine=None, constraint=None):
        self.id = next(_ids)
        self.constraint = constraint  # a llamba.constrain.Matcher (structured output) or None
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.max_tokens = max_tokens
        self.stop_at_eog = stop_at_eog
        self.want_rows = want_rows
        self.n_prompt_logprobs = prompt_logprobs
        self.prompt_logprobs = None
        self.finish_reason = None
        self.error = None
        self.n_prompt = len(self.prompt)
        self.n_cached = 0
        self.n_gen = 0
        self.t_submit = time.perf_counter()
        self.t_first = None
        self.t_end = None
        self.cancelled = False
        self.spec = None  # SpecStats-like counts: [drafted, accepted, steps]
        self.output: list[int] = []  # every token id streamed so far
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._engine = engine
        self.done = threading.Event()

    def cancel(self):
        self.cancelled = True
        if self._engine is not None:
            self._engine._wake()

    def _put(self, item):
        self._q.put(item)

    def _finish(self, reason: str, error: BaseException | None = None):
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        self.error = error
        self.t_end = time.perf_counter()
        self._q.put(_END)
        self.done.set()

    def __iter__(self):
        eng = self._engine
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                if eng is not None and eng._thread is None:
                    # no engine thread: the callers waiting for tokens take turns stepping it (the thread that
                    # waits runs the step itself: no hand-off between threads per token)
                    if eng._try_step():
                        continue
                    try:
                        item = self._q.get(timeout=0.005)
                    except queue.Empty:
                        continue
                elif eng is not None and eng.hosting():
                    # a consumer on the engine's own thread: give the thread back until a step brings a token
                    eng.park(self._has_items)
                    continue
                else:
                    item = self._q.get()
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def _has_items(self) -> bool:
        return not self._q.empty()

    def tokens(self) -> list[int]:
        """Wait for the whole output; its token ids (raises the request's error, if any)."""
        if self._engine is not None and self._engine.hosting():
            self._engine.park(self.done.is_set)
        if self._engine is not None and self._engine._thread is None:
            while not self.done.is_set():
                if not self._engine._try_step():
                    self.done.wait(0.005)
        self.done.wait()
        if self.error is not None:
            raise self.error
        return list(self.output)


class HostedLock:
    """A lock (threading.Lock or RLock) that a consumer hosted on an engine's thread (Engine.spawn) waits for by
    parking, not by blocking: the thread that holds it may be waiting for that engine's thread (a model call it
    lends through Engine.call), which a blocked engine thread would never run. Anywhere else it is the lock."""

    def __init__(self, lock, engine=None):
        self._lock = lock.inner if isinstance(lock, HostedLock) else lock
        self.engine = engine

    @property
    def inner(self):
        return self._lock

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(False):
            return True
        eng = self.engine
        if not blocking or eng is None or not eng.hosting():
            return self._lock.acquire(blocking, timeout) if blocking else False
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        got = []

        def ready():
            if self._lock.acquire(False):
                got.append(True)
                return True
            return deadline is not None and time.monotonic() >= deadline

        eng.park(ready)
        return bool(got)

    def release(self):
        self._lock.release()

    def _is_owned(self) -> bool:
        f = getattr(self._lock, "_is_owned", None)
        return f() if f is not None else self._lock.locked()

    def locked(self) -> bool:
        f = getattr(self._lock, "locked", None)
        return f() if f is not None else False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class _Run:
    """A running request on its sequence."""

    def __init__(self, req: Request, seq: SeqCache, sampler: Sampler, keep: int):
        self.req = req
        self.seq = seq
        self.sampler = sampler
        self.n_fed = keep  # prompt tokens in the cache
        self.decoding = False
        self.id_last = None  # the sampled token not yet in the cache (decode phase)
        self.drafts: list[int] = []
        self.pending_h = None  # MTP: trunk hidden of the position before the next catch-up row
        self.committed: list[int] = []  # tokens this step added to the cache (for the MTP catch-up)
        self.hidden = None  # their trunk hidden rows


class Engine:
    """Continuous-batching scheduler over one model (see the module docstring).

    n_ctx: KV slots in the shared pool (all sequences together); n_ctx_seq: most positions one sequence may
    hold (default: n_ctx); n_parallel: most sequences running at once; step_tokens: rows per forward when one
    sequence runs, busy_step_tokens when several do (decode rows first, then prompt chunks, shortest remaining
    prompt first: a short request is not held up behind a long prompt's prefill. Measured with SmolLM2 on 2
    cores, prefill runs at ~400-440 tokens/s for any chunk of 32-512 rows, so a step of 128 rows takes ~0.3 s and
    one of 32 ~0.08 s: what a request arriving during a long prefill waits for its first token. `Llama` uses 64:
    a short request's TTFT during a 2,000-token prefill measured 1.1x its idle TTFT (128: 2.1-2.4x), the long
    prompt's prefill as fast); spec: 'none' | 'mtp' | 'ngram' with up to draft_max tokens per step
    and sequence, adapted to load: the verify rows of all decoding sequences together stay within spec_rows
    (draft length spec_rows // n_decoding - 1, none when that is < 1). Measured on 2 cores (bench/bench_batch.py,
    the padded Qwen3.5 fixture, greedy): matmuls stop being bound by weight reads at about 4 rows, so drafts pay
    for one sequence (1.2-1.6x), break even for two (1 draft) and lose for four (0.7-0.8x with 1-3 drafts).
    spec_max_seqs (optional) also switches speculation off above that many decoding sequences."""

    def __init__(self, model, *, n_ctx: int, n_ctx_seq: int | None = None, n_parallel: int = 4,
                 block_size: int = 32, step_tokens: int = 128, busy_step_tokens: int = 32, spec: str = "none",
                 draft_max: int = 3,
                 draft_p_min: float = 0.0, spec_rows: int = 4, spec_max_seqs: int | None = None,
                 busy_draft_p: float | None = None, busy_draft_seqs: int = 8, is_eog=None,
                 lock=None, n_threads: int | None = None, spare_core_rows: int = 0):
        if n_parallel < 1:
            raise LlambaError(f"n_parallel must be at least 1, got {n_parallel}")
        self.model = model
        self.n_ctx = int(n_ctx)
        self.n_ctx_seq = int(min(n_ctx_seq or n_ctx, n_ctx))
        self.n_parallel = int(n_parallel)
        self.step_tokens = max(8, int(step_tokens))
        self.busy_step_tokens = max(8, min(int(busy_step_tokens), self.step_tokens))
        self.pool = model.new_pool(self.n_ctx, block_size)
        self.is_eog = is_eog or (lambda t: False)
        self.spec = spec or "none"
        if self.spec == "mtp" and getattr(model, "mtp", None) is None:
            raise LlambaError("this model has no MTP (nextn) layers, so --spec mtp cannot be used")
        if self.spec not in ("none", "mtp", "ngram"):
            raise LlambaError(f"the batching engine drafts with 'mtp' or 'ngram' (or 'none'), not {self.spec!r}")
        self.draft_max = int(draft_max) if self.spec != "none" else 0
        self.draft_p_min = float(draft_p_min)
        self.spec_rows = int(spec_rows)
        self.spec_max_seqs = spec_max_seqs
        # under load (no drafts by spec_rows), still one MTP draft for a sequence whose head is at least this sure
        # of it, up to busy_draft_seqs decoding sequences (None: off)
        self.busy_draft_p = busy_draft_p
        self.busy_draft_seqs = int(busy_draft_seqs)
        self._ngram = None
        if self.spec == "ngram":
            from llamba.speculative.ngram import NgramProposer
            self._ngram = NgramProposer(draft_max=max(1, self.draft_max))
        self.has_rec = bool(model.rec_shapes())
        # held for each step (other users of the model take it too); a consumer hosted on the engine's thread that
        # finds it taken parks until it is free instead of blocking the thread (see HostedLock)
        self.lock = HostedLock(lock or threading.RLock(), self)
        # kernel threads of a step: Numba's thread count is per calling thread, and steps run in whichever thread
        # waits for tokens, so each step sets it (None: leave the caller's)
        self.n_threads = n_threads
        # a step of at most this many rows runs on one thread less, leaving a core to the other threads of the
        # process (HTTP) and to clients on the same machine. Off by default: on 2 cores (SmolLM2, one streaming
        # client through `llamba serve`) it measured 64-70 -> 87-92 tokens/s in some runs and no better in others
        self.spare_core_rows = int(spare_core_rows)
        self._cv = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.running: list[_Run] = []
        self.idle: OrderedDict[int, SeqCache] = OrderedDict()  # finished sequences kept for prefix reuse, LRU
        self._thread = None
        self._stop = False
        self._calls: deque = deque()  # (fn, args, kw, done, result, error) to run on the engine's thread
        self._spawned: deque = deque()  # (fn, args, on_done) to start as hosted consumers (spawn)
        self._hosted: dict = {}  # hosted consumer (greenlet) -> what it waits for (a predicate), None while it runs
        self._aloop = self._aevent = None  # the event loop and its wake-up while the engine steps in it (run_async)
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "errors": 0, "prompt_tokens": 0,
                      "cached_tokens": 0, "generated_tokens": 0, "steps": 0, "batch_rows": 0, "drafted": 0,
                      "accepted": 0}
        self.last_batch = 0

    # ---- the public side
    def submit(self, prompt, params: SamplingParams | None = None, max_tokens: int | None = None, **kw) -> Request:
        """Queue a request; returns its handle at once (thread-safe)."""
        req = Request(prompt, params or SamplingParams(), max_tokens, engine=self, **kw)
        if not req.prompt:
            raise LlambaError("the prompt is empty: give at least one token")
        nv = self.model.config.n_vocab
        bad = next((t for t in req.prompt if not 0 <= t < nv), None)
        if bad is not None:  # here, not in the step, where the embedding lookup would fail every running request
            raise TokenIdError(f"token id {bad} is out of range for a vocabulary of {nv} tokens")
        if len(req.prompt) >= self.n_ctx_seq:
            raise ContextOverflowError(f"the prompt has {len(req.prompt)} tokens but a sequence holds "
                                       f"{self.n_ctx_seq}; raise n_ctx (-c) or shorten the prompt")
        with self._cv:
            self.waiting.append(req)
            self.stats["requests"] += 1
            self._notify()
        return req

    def start(self):
        """Step in a thread of the engine's own (the callers then only wait for their tokens)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="llamba-engine", daemon=True)
            self._thread.start()
        return self

    def run_forever(self, until=None):
        """Step on the calling thread until stop() (or until `until()` is true, checked at least every 0.1 s).

        Kernels should run on one thread of the process: with GNU OpenMP (Numba's default threading layer) every
        thread that starts parallel regions keeps its own worker pool, and as soon as a process has more pool
        threads than cores, all of them stop spinning between regions and sleep instead, which measured 2x slower
        (SmolLM2, 2 cores: 212 tokens/s decoding on the main thread, 104 in a second thread once the main thread
        had run a kernel). `llamba serve` loads the model and runs this on the main thread; the HTTP server runs
        in another thread, and model work that is not a generation goes through `call`."""
        if self._thread is not None:
            raise LlambaError("the engine already runs in a thread")
        self._stop = False
        self._thread = threading.current_thread()
        try:
            self._loop(until)
        finally:
            self._thread = None

    def elsewhere(self) -> bool:
        """True when the engine steps on a thread of its own and this is another thread."""
        th = self._thread
        return th is not None and th is not threading.current_thread()

    def call(self, fn, *args, **kw):
        """fn(*args, **kw) on the engine's thread between two steps (at once when there is no engine thread, or
        when called from it); returns its result or raises its exception."""
        th = self._thread
        if th is None or th is threading.current_thread():
            with self.lock:
                return fn(*args, **kw)
        # a caller holding the model lock (a sequence of model calls) lends it to the engine's thread, which is
        # not stepping meanwhile (a step needs the lock); otherwise the engine's thread takes it for fn
        item = [fn, args, kw, threading.Event(), None, None, not self.lock._is_owned()]
        with self._cv:
            self._calls.append(item)
            self._notify()
        while not item[3].wait(0.1):
            if self._thread is not th:  # the loop ended without taking it: run it here
                with self._cv:
                    mine = any(x is item for x in self._calls)
                    if mine:
                        self._calls = deque(x for x in self._calls if x is not item)
                if mine:
                    with self.lock if item[6] else contextlib.nullcontext():
                        return fn(*args, **kw)
        if item[5] is not None:
            raise item[5]
        return item[4]

    # ---- consumers hosted on the engine's thread
    def can_host(self) -> bool:
        """True when `spawn` can run consumers on the engine's own thread: the engine steps on a thread of its own
        (run_forever / start) and the greenlet package is there."""
        return _gl is not None and self._thread is not None

    def spawn(self, fn, *args, on_done=None):
        """Run fn(*args) on the engine's thread, between steps, as a consumer of requests (thread-safe; see
        can_host). The consumer is a greenlet: where it would block waiting for a request's tokens (iterating a
        `Request`, `Request.tokens`, or `park`) it hands the thread back to the engine, which resumes it after the
        step that brings them. So a streaming response's per-token work (detokenizing, stop strings, JSON) runs
        on the engine's thread with no thread hand-off per token: a consumer on a thread of its own wakes per
        token and takes the interpreter lock from the engine between kernels, which measured 200 -> 105-125
        tokens/s for one stream (SmolLM2, 2 cores). fn must not block on anything else for long (it holds up
        every sequence meanwhile) and must not park while holding a lock the engine takes.
        on_done(error or None) is called on the engine's thread when fn has returned."""
        if _gl is None:
            raise LlambaError("hosted consumers need the greenlet package")
        with self._cv:
            self._spawned.append((fn, args, on_done))
            self._notify()

    def hosting(self) -> bool:
        """True in a consumer that runs on the engine's thread (spawn)."""
        return bool(self._hosted) and _gl is not None and _gl.getcurrent() in self._hosted

    def park(self, ready):
        """In a hosted consumer: hand the thread back to the engine until ready() is true (checked between
        steps, and when something calls `wake()`)."""
        g = _gl.getcurrent()
        self._hosted[g] = ready
        try:
            g.parent.switch()
        finally:
            if g in self._hosted:
                self._hosted[g] = None

    def wake(self):
        """Have the engine's thread look at its parked consumers again (thread-safe)."""
        self._wake()

    def _start_consumer(self, fn, args, on_done):
        def body():
            err = None
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to on_done
                err = e
            finally:
                self._hosted.pop(_gl.getcurrent(), None)
            if on_done is not None:
                try:
                    on_done(err)
                except Exception:  # noqa: BLE001
                    pass

        g = _gl.greenlet(body)
        self._hosted[g] = None
        g.switch()

    def _ready_consumers(self) -> list:
        out = []
        for g, ready in list(self._hosted.items()):
            try:
                ok = ready is not None and ready()
            except Exception:  # noqa: BLE001 - a failing predicate: resume it, it will see why
                ok = True
            if ok:
                out.append(g)
        return out

    def _run_consumers(self):
        """Start the spawned consumers and resume the parked ones whose wait is over (engine thread)."""
        while self._spawned:
            with self._cv:
                if not self._spawned:
                    break
                fn, args, on_done = self._spawned.popleft()
            self._start_consumer(fn, args, on_done)
        if self._hosted:
            for g in self._ready_consumers():
                if not g.dead:
                    g.switch()

    def _acquire(self):
        """Take the model lock on the engine's thread; while another thread holds it, run the calls that thread
        makes meanwhile (it lends the lock: see `call`)."""
        while not self.lock.acquire(timeout=0.002):
            self._run_calls(lent_only=True)

    def _run_calls(self, error: BaseException | None = None, lent_only: bool = False):
        while True:
            with self._cv:
                item = next((x for x in self._calls if not (lent_only and x[6])), None)
                if item is None:
                    return
                self._calls = deque(x for x in self._calls if x is not item)
            fn, args, kw, done = item[:4]
            if error is not None:
                item[5] = error
            else:
                try:
                    if item[6]:  # the caller does not hold the lock: take it
                        self._acquire()
                        try:
                            item[4] = fn(*args, **kw)
                        finally:
                            self.lock.release()
                    else:
                        item[4] = fn(*args, **kw)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    item[5] = e
            done.set()

    def stop(self):
        self._stop = True
        self._wake()
        th = self._thread
        if th is not None and th is not threading.current_thread() and th.name == "llamba-engine":
            th.join(timeout=30)
            self._thread = None

    def run_until_done(self):
        """Step until nothing is waiting or running (the offline batch API drives the engine this way)."""
        while self.waiting or self.running:
            self.step()

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    @property
    def n_running(self) -> int:
        return len(self.running)

    def snapshot(self) -> dict:
        d = dict(self.stats)
        d.update(waiting=len(self.waiting), running=len(self.running), idle_sequences=len(self.idle),
                 kv_blocks_free=self.pool.n_free, kv_blocks_total=self.pool.n_blocks, n_parallel=self.n_parallel,
                 last_batch_rows=self.last_batch)
        return d

    def _wake(self):
        with self._cv:
            self._notify()

    def _notify(self):
        """Wake the stepping loop (the caller holds _cv): the thread waiting on _cv, or the event loop's task
        (run_async), from its own thread or another."""
        self._cv.notify()
        ev = self._aevent
        if ev is not None and not ev.is_set():
            if threading.current_thread() is self._thread:
                ev.set()
            else:
                try:
                    self._aloop.call_soon_threadsafe(ev.set)
                except RuntimeError:  # the loop is closed: the task is gone too
                    pass

    def _idle(self) -> bool:
        """Nothing to do until something arrives (the caller holds _cv)."""
        return not self._stop and not self.waiting and not self.running and not self._calls and \
            not self._spawned and not (self._hosted and self._ready_consumers())

    def _loop(self, until=None):
        """The engine's own stepping loop (start's thread, or run_forever's caller) until stop() or `until()`."""
        try:
            while not self._stop and not (until is not None and until()):
                self._run_consumers()
                with self._cv:
                    if self._idle():
                        # parked consumers may wait for something else than a step (a client reading): look again
                        self._cv.wait(0.02 if self._hosted else None if until is None else 0.1)
                self._run_calls()
                if self._stop:
                    break
                self._acquire()
                self._step_held()
        finally:
            self._wind_down()

    async def run_async(self):
        """Step as a task of the running asyncio event loop, on the loop's own thread, until stop().

        `llamba serve` runs its HTTP server and the engine on one thread this way (the main thread, where the
        model was loaded: see run_forever for why kernels should start from one thread): between two steps the
        task yields to the loop, which reads requests and writes the chunks the step produced; the consumers
        hosted on the engine's thread (spawn) run here too. So per token no thread but the engine's wakes up
        on the server's side (with HTTP on a thread of its own, that thread woke per token and took a core from
        the kernels' two-thread regions). Model work that other threads hand over (`call`) runs between steps,
        and a thread holding the model lock never blocks the loop: the task polls for it.
        A step blocks the loop for its duration (a few ms; a prompt chunk tens of ms)."""
        import asyncio
        if self._thread is not None:
            raise LlambaError("the engine already runs in a thread")
        self._stop = False
        self._thread = threading.current_thread()
        self._aloop = asyncio.get_running_loop()
        self._aevent = asyncio.Event()
        try:
            while not self._stop:
                self._run_consumers()
                with self._cv:
                    idle = self._idle()
                    if idle:
                        self._aevent.clear()
                if idle:
                    try:
                        await asyncio.wait_for(self._aevent.wait(), 0.02 if self._hosted else None)
                    except (TimeoutError, asyncio.TimeoutError):
                        pass
                    continue
                self._run_calls()
                if self._stop:
                    break
                while not self.lock.acquire(False):  # a thread holds it: run what it lends, let the loop run
                    self._run_calls(lent_only=True)
                    await asyncio.sleep(0.001)
                self._step_held()
                await self._yield_to_loop()
        finally:
            self._aevent = self._aloop = None
            try:
                self._wind_down()
            finally:
                self._thread = None

    async def _yield_to_loop(self):
        """The loop's turn between two steps: reads, new requests, and the writes of the chunks this step made.
        A chunk goes out after a few loop iterations (outbox -> the request's queue -> its response task -> the
        socket), so yield while callbacks are still queued (up to 16 iterations), else the chunk would wait for
        the next step."""
        import asyncio
        loop = self._aloop
        for _ in range(16):
            await asyncio.sleep(0)
            ready = getattr(loop, "_ready", None)  # (CPython's loops: the callbacks for the next iteration)
            if ready is None:
                await asyncio.sleep(0)
                return
            if not ready:
                return

    def _step_held(self):
        """One step with the model lock already taken (released here); a failing step fails the running
        requests, never the loop."""
        try:
            try:
                self._step()
            finally:
                self.lock.release()
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - never let the loop die: fail the running requests
            self._fail_all(e)

    def _wind_down(self):
        self._fail_all(LlambaError("the engine stopped"))
        self._run_calls(LlambaError("the engine stopped"))
        if _gl is not None and threading.current_thread() is self._thread:
            self._run_consumers()  # they see their requests' errors and end

    def _fail_all(self, e: BaseException):
        for run in list(self.running):
            self._retire(run, "error", e, keep=False)
        with self._cv:
            while self.waiting:
                self.waiting.popleft()._finish("error", e)

    # ---- admission
    def _admit(self):
        while self.waiting and len(self.running) < self.n_parallel:
            with self._cv:
                req = self.waiting[0]
            if req.cancelled:
                with self._cv:
                    self.waiting.popleft()
                req._finish("cancelled")
                self.stats["cancelled"] += 1
                continue
            seq, keep = self._sequence_for(req)
            need = seq.blocks_needed(len(req.prompt) + 1)
            if need > self.pool.n_free:
                self._evict(need)
            if need > self.pool.n_free:
                if self.running:  # wait for running sequences to finish
                    self._park(seq)
                    return
                self._park(seq)
                with self._cv:
                    self.waiting.popleft()
                req._finish("error", KVExhaustedError(
                    f"the prompt needs {need} KV blocks of {self.pool.bs} tokens but the cache has "
                    f"{self.pool.n_free} of {self.pool.n_blocks} free; raise the context size (-c)"))
                self.stats["errors"] += 1
                continue
            with self._cv:
                self.waiting.popleft()
            sampler = Sampler(req.params, n_ctx=self.n_ctx_seq)
            sampler.accept_many(req.prompt)
            if req.constraint is not None:
                sampler.constraint = req.constraint
            run = _Run(req, seq, sampler, keep)
            req.n_cached = keep
            self.stats["prompt_tokens"] += len(req.prompt) - keep
            self.stats["cached_tokens"] += keep
            if self.spec == "mtp":
                h = getattr(seq, "mtp_last_h", None)
                run.pending_h = h[1] if (h is not None and h[0] == keep - 1) else self._zeros()
            self.running.append(run)

    def _zeros(self):
        return np.zeros((1, self.model.config.n_embd), dtype=np.float32)

    def _sequence_for(self, req: Request) -> tuple[SeqCache, int]:
        """A sequence for the request and how many of its prompt's positions it already holds: the idle sequence
        sharing the longest prefix with the prompt, taken over when all it holds is that prefix (the next turn
        of a chat), else forked (its full blocks shared, the partial one copied: the idle sequence keeps its
        cache for whoever comes next, see kv_cache); a fresh one when nothing matches. Sequences with recurrent
        state cannot fork: they are truncated to the prefix and taken over."""
        prompt = req.prompt
        best, best_n = None, 0
        if req.n_prompt_logprobs is None:  # prompt logprobs need every prompt row computed
            for key, s in self.idle.items():
                n = _common_prefix(s.tokens, prompt, len(prompt) - 1)
                if s.mtp is not None:
                    n = min(n, s.mtp.n_past)
                if n > best_n and (s.can_fork() or s.can_truncate(n)):
                    best, best_n = key, n
        if best is not None:
            src = self.idle[best]
            if best_n < src.n_past and src.can_fork():
                if best_n % self.pool.bs and self.pool.n_free < 1:  # room for the copy of the partial block
                    self.idle.move_to_end(best)
                    self._evict(1)
                if best in self.idle and (best_n % self.pool.bs == 0 or self.pool.n_free >= 1):
                    self.idle.move_to_end(best)  # (recently used: evicted last)
                    return src.fork(best_n), best_n
            if best in self.idle and src.can_truncate(best_n):
                seq = self.idle.pop(best)
                seq.truncate(best_n)
                return seq, best_n
        return self.model.new_seq(self.pool, self.n_ctx_seq), 0

    def _park(self, seq: SeqCache):
        """Keep a sequence's cache for prefix reuse (most recently used last)."""
        if seq.n_past == 0:
            seq.release()
            return
        self.idle[id(seq)] = seq
        self.idle.move_to_end(id(seq))

    def _evict(self, need: int):
        """Release idle sequences, least recently used first, until `need` blocks are free."""
        while self.idle and self.pool.n_free < need:
            _, s = self.idle.popitem(last=False)
            s.release()

    def _reserve(self, run: _Run, n_pos: int) -> bool:
        """Take the blocks positions < n_pos need (evicting idle sequences first); False if they are not there."""
        return self._room(run.seq, n_pos)

    def _room(self, view, n_pos: int) -> bool:
        """Slots for positions < n_pos of a sequence or its MTP view (evicting idle sequences first), without
        preempting anyone: False when they are not there (the caller goes without drafts)."""
        need = view.owner.blocks_needed(n_pos)
        if need > self.pool.n_free:
            self._evict(need)
        if need > self.pool.n_free:
            return False
        view.reserve(n_pos)
        return True

    def _preempt(self, keep: _Run | None = None) -> bool:
        """Free memory by sending the youngest running request that has produced nothing yet back to the front of
        the queue (its prompt is computed again later, its cache released). False if there is none."""
        for run in reversed(self.running):
            if run is keep or run.decoding or run.req.n_gen:
                continue
            self.running.remove(run)
            run.seq.release()
            self.stats["prompt_tokens"] -= len(run.req.prompt) - run.req.n_cached
            self.stats["cached_tokens"] -= run.req.n_cached
            with self._cv:
                self.waiting.appendleft(run.req)
            self.stats["preempted"] = self.stats.get("preempted", 0) + 1
            return True
        return False

    def _retire(self, run: _Run, reason: str, error=None, keep: bool = True):
        if run in self.running:
            self.running.remove(run)
        seq = run.seq
        if self.spec == "mtp" and run.pending_h is not None and seq.mtp is not None:
            if seq.mtp.n_past > seq.n_past:
                seq.mtp.truncate(seq.n_past)
            seq.mtp_last_h = (seq.mtp.n_past - 1, run.pending_h)  # the trunk hidden the next catch-up row needs
        if keep and error is None:
            self._park(seq)
        else:
            seq.release()
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        elif reason == "error":
            self.stats["errors"] += 1
        else:
            self.stats["finished"] += 1
        run.req._finish(reason, error)

    def _limit(self, req: Request) -> int:
        """Most tokens the request may generate: max_tokens, or (none / <= 0) a whole sequence."""
        return req.max_tokens if req.max_tokens is not None and req.max_tokens > 0 else self.n_ctx_seq

    def draft_len(self, n_decoding: int) -> int:
        """Draft tokens per sequence this step, with n_decoding sequences decoding."""
        if self.draft_max <= 0 or n_decoding <= 0:
            return 0
        if self.spec_max_seqs is not None and n_decoding > self.spec_max_seqs:
            return 0
        return max(0, min(self.draft_max, self.spec_rows // n_decoding - 1))

    def draft_plan(self, n_decoding: int) -> tuple[int, float]:
        """(draft tokens per sequence, least head probability of a draft token) this step: draft_len, or under
        load one confident MTP draft (busy_draft_p)."""
        n = self.draft_len(n_decoding)
        if n > 0:
            return n, self.draft_p_min
        if self.spec == "mtp" and self.busy_draft_p is not None and self.draft_max > 0 and \
                0 < n_decoding <= self.busy_draft_seqs and \
                (self.spec_max_seqs is None or n_decoding <= self.spec_max_seqs):
            return 1, max(self.draft_p_min, float(self.busy_draft_p))
        return 0, self.draft_p_min

    def _try_step(self) -> bool:
        """One step, unless another thread is stepping (then False at once)."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if not self.waiting and not self.running:
                return False
            try:
                return self._step()
            except BaseException as e:  # noqa: BLE001 - fail the running requests, keep the engine usable
                self._fail_all(e)
                return True
        finally:
            self.lock.release()

    # ---- one step
    def step(self) -> bool:
        with self.lock:
            return self._step()

    def _set_threads(self, n_rows: int):
        if self.n_threads:
            import numba
            n = self.n_threads
            if n > 1 and n_rows <= self.spare_core_rows:
                n -= 1
            if numba.get_num_threads() != n:
                numba.set_num_threads(n)

    def _step(self) -> bool:
        for run in list(self.running):
            if run.req.cancelled:
                self._retire(run, "cancelled")
        self._admit()
        if not self.running:
            return False
        # the step's row budget: a long prompt alone gets step_tokens rows; when other sequences decode or
        # prefill beside it, steps stay short (busy_step_tokens) so their tokens are not held up by it
        busy = len(self.running) > 1
        budget = self.busy_step_tokens if busy else self.step_tokens
        items = []  # (run, tokens, logits mode, n_draft)
        n_dec = sum(1 for r in self.running if r.decoding)
        dmax = self.draft_plan(n_dec)[0]
        for run in list(self.running):
            if not run.decoding:
                continue
            seq, req = run.seq, run.req
            if seq.n_past >= self.n_ctx_seq:
                self._retire(run, "length")
                continue
            room = self.n_ctx_seq - seq.n_past - 1
            limit = self._limit(req)
            nd = max(0, min(dmax, room, limit - req.n_gen - 1, len(run.drafts)))
            drafts = run.drafts[:nd]
            if drafts and req.constraint is not None:  # a draft token the grammar forbids ends the draft there
                drafts = drafts[:req.constraint.valid_prefix(drafts)]  # (state: after id_last)
                nd = len(drafts)
            if not self._reserve(run, seq.n_past + 1 + nd):
                drafts = []
                while not self._reserve(run, seq.n_past + 1):
                    if not self._preempt(keep=run):
                        break
                else:
                    toks = [run.id_last]
                    items.append((run, toks, "last", 0))
                    budget -= 1
                    continue
                self._retire(run, "length")  # the shared KV cache is full
                continue
            toks = [run.id_last] + drafts
            items.append((run, toks, "all" if drafts else "last", len(drafts)))
            budget -= len(toks)
        # prompts in order of what is left of them: a short request's prefill goes before a long one's chunk, and
        # a step that finishes some prompt gives no rows to prompts it does not finish, so the short request's
        # first token costs what its own prefill costs, not that plus a slice of someone else's long prompt
        finishing = False
        for run in sorted(self.running, key=lambda r: len(r.req.prompt) - r.n_fed):
            if run.decoding or budget <= 0:
                continue
            req = run.req
            n = min(len(req.prompt) - run.n_fed, budget)
            if finishing and run.n_fed + n < len(req.prompt):
                break  # (sorted: every later prompt is at least as long)
            while n > 0 and not self._reserve(run, run.n_fed + n):
                n = min(n - 1, (len(run.seq.blocks) * self.pool.bs + self.pool.n_free * self.pool.bs) - run.n_fed)
            if n <= 0:
                continue  # waits for memory
            chunk = req.prompt[run.n_fed:run.n_fed + n]
            final = run.n_fed + n == len(req.prompt)
            mode = "all" if req.n_prompt_logprobs is not None else ("last" if final else "none")
            items.append((run, chunk, mode, -1))
            budget -= n
            finishing = finishing or final
        if not items:
            if len(self.running) > 1 and self._preempt():
                return True
            for run in list(self.running):  # alone and still no room: the pool is too small for it
                self._retire(run, "error", KVExhaustedError(
                    f"the KV cache ({self.pool.n_blocks} blocks of {self.pool.bs} tokens) cannot hold this "
                    f"request; raise the context size (-c)"), keep=False)
            return True
        seqs = [it[0].seq for it in items]
        self._set_threads(sum(len(it[1]) for it in items))
        mtp = self.spec == "mtp"
        snaps = self.has_rec and any(it[3] > 0 for it in items)
        outs = self.model.forward_batch(seqs, [it[1] for it in items], [it[2] for it in items], gemm=False,
                                        keep_hidden=mtp, snapshots=snaps)
        self.stats["steps"] += 1
        self.last_batch = sum(len(it[1]) for it in items)
        self.stats["batch_rows"] += self.last_batch
        for (run, toks, mode, nd), rows in zip(items, outs):
            try:
                self._after(run, toks, mode, nd, rows)
            except BaseException as e:  # noqa: BLE001 - a sampling error fails that request only
                self._retire(run, "error", e, keep=False)
        if mtp:
            if self.draft_plan(sum(1 for r in self.running if r.decoding))[0] > 0 or \
                    any(not r.decoding for r in self.running):
                self._mtp_draft()
            else:  # no drafts under this load: the head's catch-up is skipped too (it restarts from zeros)
                for r in self.running:
                    r.committed, r.hidden, r.drafts = [], None, []
                    r.pending_h = self._zeros()
        elif self._ngram is not None:
            for run in self.running:
                if run.decoding:
                    run.drafts = self._ngram.draft(_TokView(run.seq), run.id_last, self.draft_max) \
                        if self.draft_len(len(self.running)) > 0 else []
        return True

    def _after(self, run: _Run, toks, mode, nd, rows):
        req, seq = run.req, run.seq
        hid = seq.hidden
        if nd < 0:  # a prompt chunk
            p0 = run.n_fed
            run.n_fed += len(toks)
            if req.n_prompt_logprobs is not None:
                self._record_prompt_logprobs(req, p0, rows)
            run.committed, run.hidden = list(toks), hid
            if run.n_fed < len(req.prompt):
                return
            run.decoding = True
            ids = [run.sampler.sample_and_accept(rows[-1])]
            sample_rows = rows[-1:]
        else:
            n_before = seq.n_past - len(toks)
            if nd == 0:
                ids = [run.sampler.sample_and_accept(rows[-1])]
            else:
                ids = run.sampler.sample_and_accept_n(rows, toks[1:])
            k = len(ids) - 1
            if nd:
                self.stats["drafted"] += nd
                self.stats["accepted"] += k
                if req.spec is None:
                    req.spec = [0, 0, 0]
                req.spec[0] += nd
                req.spec[1] += k
                req.spec[2] += 1
            if k < nd:
                seq.truncate(n_before + 1 + k)
            run.committed = toks[:k + 1]
            run.hidden = hid[:k + 1] if hid is not None else None
            sample_rows = rows[:k + 1] if nd else rows[-1:]
        run.drafts = []
        for j, t in enumerate(ids):
            req.n_gen += 1
            self.stats["generated_tokens"] += 1
            if req.t_first is None:
                req.t_first = time.perf_counter()
            req.output.append(int(t))
            req._put(Token(int(t), sample_rows[j] if req.want_rows else None))
            limit = self._limit(req)
            if req.stop_at_eog and self.is_eog(t):
                self._retire(run, "stop")
                return
            if req.n_gen >= limit:
                self._retire(run, "length")
                return
        run.id_last = int(ids[-1])
        if seq.n_past >= self.n_ctx_seq:
            self._retire(run, "length")

    def _record_prompt_logprobs(self, req: Request, p0: int, rows):
        """Entry i (prompt position i >= 1): logprob of prompt[i] from the row of position i-1, top-n."""
        n = req.n_prompt_logprobs
        if req.prompt_logprobs is None:
            req.prompt_logprobs = []
        for r in range(rows.shape[0]):
            i = p0 + r + 1
            if i >= len(req.prompt):
                break
            lp = _log_softmax(rows[r])
            top = []
            if n:
                idx = np.argpartition(-lp, min(n, lp.shape[0] - 1))[:n]
                idx = idx[np.lexsort((idx, -lp[idx]))]
                top = [(int(j), float(lp[j])) for j in idx]
            req.prompt_logprobs.append((float(lp[req.prompt[i]]), top))

    # ---- MTP drafting, batched over the sequences
    def _mtp_draft(self):
        mtp = self.model.mtp
        dl, p_min = self.draft_plan(sum(1 for r in self.running if r.decoding))
        cat = []  # (run, tokens, hiddens, wants a draft)
        for run in self.running:
            if not run.committed or run.hidden is None:
                continue
            if dl == 0 and run.decoding:  # no drafts under this load: no catch-up for it either (as in _step)
                run.committed, run.hidden, run.drafts = [], None, []
                run.pending_h = self._zeros()
                continue
            view = run.seq.mtp
            start = run.seq.n_past - len(run.committed)
            if view.n_past > start:
                view.truncate(start)
            if view.n_past < start:  # rows the head never saw (e.g. reused from another request): skip ahead
                view.n_past = start
            H = run.hidden
            hp = np.concatenate([run.pending_h, H[:-1]]) if len(H) > 1 else run.pending_h
            toks = list(run.committed)
            draft_now = run.decoding and dl > 0 and run.seq.n_past + 1 < self.n_ctx_seq
            if draft_now:
                toks.append(run.id_last)
                hp = np.concatenate([hp, H[-1:]])
            run.pending_h = H[-1:].copy()
            cat.append((run, toks, hp, draft_now))
            run.committed, run.hidden = [], None
        if not cat:
            return
        ok = []
        for c in cat:
            if self._room(c[0].seq.mtp, c[0].seq.mtp.n_past + len(c[1])):
                ok.append(c)
            else:  # no room for the head's rows: this sequence decodes without drafts
                c[0].seq.mtp.n_past = min(c[0].seq.mtp.n_past, c[0].seq.n_past)
        cat = ok
        if not cat:
            return
        outs = mtp.forward_batch([c[0].seq.mtp for c in cat], [c[1] for c in cat], [c[2] for c in cat],
                                 ["last" if c[3] else "none" for c in cat], gemm=False)
        active = []
        for (run, toks, hp, d), lg in zip(cat, outs):
            if not d:
                continue
            t, p = draft_top(lg[-1], 10)
            if p < p_min:
                continue
            run.drafts = [t]
            active.append(run)
        for _ in range(1, dl):
            active = [r for r in active if r.seq.mtp.n_past + 1 < self.n_ctx_seq and
                      self._room(r.seq.mtp, r.seq.mtp.n_past + 1)]
            if not active:
                break
            outs = mtp.forward_batch([r.seq.mtp for r in active], [[r.drafts[-1]] for r in active],
                                     [r.seq.mtp.hidden[-1:] for r in active], "last", gemm=False)
            nxt = []
            for r, lg in zip(active, outs):
                t, p = draft_top(lg[-1], 10)
                if p < p_min:
                    continue
                r.drafts.append(t)
                nxt.append(r)
            active = nxt
        for run, *_ in cat:  # draft rows are rewritten by the next catch-up
            if run.seq.mtp.n_past > run.seq.n_past:
                run.seq.mtp.truncate(run.seq.n_past)


class _TokView:
    """What NgramProposer reads of a session: the token ids in the cache."""

    def __init__(self, seq):
        self.tokens = seq.tokens


def _common_prefix(a, b, cap: int) -> int:
    n = min(len(a), len(b), cap)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    m = np.max(x)
    if not np.isfinite(m):
        m = 0.0
    sub = x - np.float32(m)
    return sub - np.float32(np.log(np.sum(np.exp(sub, dtype=np.float64))))
