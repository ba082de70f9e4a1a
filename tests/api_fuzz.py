"""A seeded fuzzer of the public `Llama` API (issue 11): random, mostly hostile arguments to tokenize, detokenize,
eval, eval_logits, generate, create_completion, create_chat_completion, apply_chat_template, embed, load_state and
the constructor. Every call must return normally or raise a LlambaError / TypeError / ValueError subclass with a
one-line message of bounded length -- never another exception type, never a hang.

Used by tests/test_api_fuzz.py (a fixed seed list, ~1,000 cases) and bench/fuzz_api.py (as many as you like).
"""
from __future__ import annotations

import copy
import itertools
import time
from collections import Counter

import numpy as np

from llamba.errors import LlambaError

ALLOWED = (LlambaError, TypeError, ValueError)
MAX_MESSAGE = 1000  # characters an error message may have
MAX_CASE_SECONDS = 10.0  # a case slower than this counts as a hang

BIG_INTS = [-1, -5, 10**9, -10**9, 2**31, 2**32, 2**63, 2**64, 2**70, -2**70, 10**100]
FLOATS = [float("nan"), float("inf"), float("-inf"), -0.0, 1e308, -1e-308, 0.5, 1.5, 2.0, -3.0]
STRINGS = ["", "hi", "\ud800", "\x00", "a" * 3000, "<|im_start|>", "{{ x }}", "\U0001f600" * 5, "\n\n"]


def _hostile_scalar(rng, n_vocab: int):
    k = int(rng.integers(0, 10))
    if k == 0:
        return int(rng.integers(0, n_vocab))
    if k == 1:
        return BIG_INTS[int(rng.integers(len(BIG_INTS)))]
    if k == 2:
        return FLOATS[int(rng.integers(len(FLOATS)))]
    if k == 3:
        return STRINGS[int(rng.integers(len(STRINGS)))]
    if k == 4:
        return [None, True, False, b"\xff\xfe", object()][int(rng.integers(5))]
    if k == 5:
        return np.int64(rng.integers(-5, n_vocab + 5))
    if k == 6:
        return np.float32(rng.normal())
    if k == 7:
        return n_vocab + int(rng.integers(0, 3))
    if k == 8:
        return int(rng.integers(-3, n_vocab))
    return [1, 2] if rng.random() < 0.5 else {"a": 1}


def _nested(depth: int, leaf="x"):
    v = leaf
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


def hostile_ids(rng, n_vocab: int):
    """A token-id argument: mostly a valid list, sometimes with one hostile element, sometimes not a list at all."""
    k = int(rng.integers(0, 10))
    n = int(rng.integers(0, 12))
    ids = [int(x) for x in rng.integers(0, n_vocab, size=n)]
    if k <= 3:
        return ids
    if k <= 6 and ids:
        ids[int(rng.integers(len(ids)))] = _hostile_scalar(rng, n_vocab)
        return ids
    if k == 7:
        dt = [np.int64, np.int32, np.uint8, np.float32, np.int16][int(rng.integers(5))]
        a = rng.integers(-2, n_vocab + 2, size=n).astype(dt)
        return a.reshape(1, -1) if rng.random() < 0.2 else a
    if k == 8:
        return ids + [BIG_INTS[int(rng.integers(len(BIG_INTS)))]]
    return _hostile_scalar(rng, n_vocab)


def hostile_text(rng, n_vocab: int):
    k = int(rng.integers(0, 6))
    if k <= 2:
        return STRINGS[int(rng.integers(len(STRINGS)))]
    if k == 3:
        return STRINGS[int(rng.integers(len(STRINGS)))].encode("utf-8", "surrogatepass")
    return _hostile_scalar(rng, n_vocab)


def hostile_messages(rng, n_vocab: int):
    k = int(rng.integers(0, 12))
    if k == 0:
        return _hostile_scalar(rng, n_vocab)
    if k == 1:
        return []
    msgs = []
    for i in range(int(rng.integers(1, 4))):
        role = ["user", "assistant", "system", "tool", "robot", None, 5][int(rng.integers(0, 7))] \
            if rng.random() < 0.3 else ("user" if i % 2 == 0 else "assistant")
        content = STRINGS[int(rng.integers(len(STRINGS)))] if rng.random() < 0.6 else \
            [None, 5, [{"type": "text", "text": "hi"}], [{"type": "image_url"}], ["a", "b"], {"x": 1},
             _nested(int(rng.integers(1, 400)))][int(rng.integers(0, 7))]
        m = {"role": role, "content": content}
        if rng.random() < 0.2:
            m["extra"] = _nested([3, 50, 99, 101, 5000][int(rng.integers(0, 5))])
        if rng.random() < 0.1:
            m = _hostile_scalar(rng, n_vocab)
        msgs.append(m)
    return msgs


def hostile_sampling(rng, n_vocab: int, gen_api: bool = False) -> dict:
    """Sampling keyword arguments, each hostile with some probability (names as create_completion takes them;
    `gen_api`: generate()'s `temp`)."""
    kw = {}
    names = ["temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
             "presence_penalty", "seed", "logit_bias", "max_tokens", "stop"]
    for name in names:
        if rng.random() > 0.25:
            continue
        r = rng.random()
        if name == "logit_bias":
            if r < 0.4:
                v = {int(rng.integers(0, n_vocab)): float(rng.normal())}
            elif r < 0.9:
                key = _hostile_scalar(rng, n_vocab)
                if not isinstance(key, (int, float, str, bytes, np.generic)) or key is None:
                    key = str(key)  # unhashable keys cannot be in a dict at all
                v = {key: _hostile_scalar(rng, n_vocab)}
            else:
                v = _hostile_scalar(rng, n_vocab)
        elif name == "stop":
            v = ["\n"] if r < 0.3 else "x" if r < 0.5 else [5] if r < 0.6 else ["a"] * 100 if r < 0.7 else \
                ["z" * 5000] if r < 0.8 else _hostile_scalar(rng, n_vocab)
        elif name == "max_tokens":
            v = int(rng.integers(-2, 6)) if r < 0.6 else _hostile_scalar(rng, n_vocab)
        else:
            v = _hostile_scalar(rng, n_vocab) if r < 0.7 else float(rng.normal())
        kw[name] = v
    if gen_api:
        if "temperature" in kw:
            kw["temp"] = kw.pop("temperature")
        kw.pop("stop", None)
    kw.setdefault("max_tokens", 4)
    if _is_int(kw["max_tokens"]) and not 0 < kw["max_tokens"] <= 8:
        kw["max_tokens"] = 8 if rng.random() < 0.8 else kw["max_tokens"]
    return kw


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _consume(out, limit: int = 64):
    """Drain a generator / stream (at most `limit` items), so streamed errors surface here."""
    if hasattr(out, "__next__"):
        return list(itertools.islice(out, limit))
    return out


def make_case(rng, llm, state):
    """One random call on `llm` as (name, thunk)."""
    nv = llm.n_vocab()
    op = int(rng.integers(0, 12))
    if op == 0:
        text, ab, sp = hostile_text(rng, nv), bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        return "tokenize", lambda: llm.tokenize(text, add_bos=ab, special=sp)
    if op == 1:
        ids = hostile_ids(rng, nv)
        return "detokenize", lambda: llm.detokenize(ids, special=bool(rng.random() < 0.5))
    if op == 2:
        ids = hostile_ids(rng, nv)

        def ev():
            if rng.random() < 0.5:
                llm.reset()
            return llm.eval(ids)
        return "eval", ev
    if op == 3:
        ids = hostile_ids(rng, nv)
        return "eval_logits", lambda: llm.eval_logits(ids)
    if op == 4:
        ids, kw = hostile_ids(rng, nv), hostile_sampling(rng, nv, gen_api=True)
        return "generate", lambda: list(itertools.islice(llm.generate(ids, **kw), 4))
    if op in (5, 6):
        prompt = hostile_ids(rng, nv) if rng.random() < 0.5 else hostile_text(rng, nv)
        kw = hostile_sampling(rng, nv)
        kw["stream"] = bool(rng.random() < 0.3)
        kw["echo"] = bool(rng.random() < 0.2)
        if rng.random() < 0.15:
            kw["logprobs"] = _hostile_scalar(rng, nv) if rng.random() < 0.5 else int(rng.integers(0, 4))
        return "create_completion", lambda: _consume(llm.create_completion(prompt, **kw))
    if op in (7, 8):
        msgs, kw = hostile_messages(rng, nv), hostile_sampling(rng, nv)
        kw["stream"] = bool(rng.random() < 0.3)
        if rng.random() < 0.2:
            kw["logprobs"] = True
            kw["top_logprobs"] = _hostile_scalar(rng, nv) if rng.random() < 0.5 else int(rng.integers(0, 4))
        if rng.random() < 0.15:
            kw["chat_template_kwargs"] = {"enable_thinking": False} if rng.random() < 0.5 else \
                _hostile_scalar(rng, nv)
        return "create_chat_completion", lambda: _consume(llm.create_chat_completion(msgs, **kw))
    if op == 9:
        msgs = hostile_messages(rng, nv)
        tools = None if rng.random() < 0.6 else [{"type": "function", "function": {"name": "f"}}] \
            if rng.random() < 0.5 else _hostile_scalar(rng, nv)
        extra = {} if rng.random() < 0.7 else {"x": _nested(int(rng.integers(1, 300)))}
        return "apply_chat_template", lambda: llm.apply_chat_template(msgs, tools=tools,
                                                                      tokenize=bool(rng.random() < 0.5), **extra)
    if op == 10:
        inp = hostile_text(rng, nv) if rng.random() < 0.5 else \
            [hostile_text(rng, nv) for _ in range(int(rng.integers(0, 3)))]
        return "embed", lambda: llm.embed(inp, normalize=bool(rng.random() < 0.5))
    # load_state with a mutated copy of a saved state
    st = copy.deepcopy(state)
    r = rng.random()
    if r < 0.2:
        st.n_tokens = _hostile_scalar(rng, nv)
    elif r < 0.4:
        st.llama_state["kv"] = {il: (k[:, :int(rng.integers(0, 3))], v) for il, (k, v) in st.llama_state["kv"].items()}
    elif r < 0.5:
        st.llama_state["kv"] = {il: (k.astype(np.float64), v) for il, (k, v) in st.llama_state["kv"].items()}
    elif r < 0.6:
        st.llama_state["n_past"] = _hostile_scalar(rng, nv)
    elif r < 0.7:
        st.input_ids = hostile_ids(rng, nv)
    elif r < 0.8:
        st.scores = np.zeros((2, 3), dtype=np.float32)
    elif r < 0.9:
        st.llama_state = _hostile_scalar(rng, nv)
    return "load_state", lambda: llm.load_state(st)


def check_outcome(fn):
    """Run fn: (outcome, problem or None). outcome: 'ok' or the exception class name."""
    t0 = time.perf_counter()
    try:
        fn()
        outcome, problem = "ok", None
    except ALLOWED as e:
        msg = str(e)
        outcome = type(e).__name__
        problem = None
        if "\n" in msg or len(msg) > MAX_MESSAGE:
            problem = f"{outcome} message is not one short line: {msg[:200]!r}"
        elif not msg.strip():
            problem = f"{outcome} has an empty message"
    except Exception as e:  # noqa: BLE001 - what the fuzzer is looking for
        outcome = type(e).__name__
        problem = f"{outcome}: {' '.join(str(e).split())[:200]}"
    dt = time.perf_counter() - t0
    if dt > MAX_CASE_SECONDS:
        problem = (problem or "") + f" (took {dt:.1f} s)"
    return outcome, problem, dt


def run(llm, seed: int, n: int):
    """n random cases from `seed`: (Counter of (op, outcome), list of (case index, op, problem), slowest s)."""
    rng = np.random.default_rng(seed)
    llm.reset()
    llm.eval([1, 2, 3])
    state = llm.save_state()
    counts: Counter = Counter()
    problems = []
    slowest = 0.0
    for i in range(n):
        name, fn = make_case(rng, llm, state)
        outcome, problem, dt = check_outcome(fn)
        slowest = max(slowest, dt)
        counts[(name, outcome)] += 1
        if problem:
            problems.append((seed, i, name, problem))
    return counts, problems, slowest


def constructor_cases(path: str, seed: int, n: int):
    """Hostile Llama(...) constructor arguments (cheap: a refused one allocates nothing)."""
    from llamba import Llama
    rng = np.random.default_rng(seed)
    counts: Counter = Counter()
    problems = []
    for i in range(n):
        kw = {}
        for name, good in (("n_ctx", 64), ("n_batch", 16), ("n_threads", 1), ("seed", 0)):
            kw[name] = good if rng.random() < 0.6 else _hostile_scalar(rng, 320)
        if isinstance(kw["n_ctx"], (int, np.integer)) and not isinstance(kw["n_ctx"], bool) and \
                0 < kw["n_ctx"] < 10**6 and rng.random() < 0.9:
            kw["n_ctx"] = 64  # a real allocation only for small contexts
        if rng.random() < 0.2:
            kw["logits_all"] = True
        outcome, problem, _ = check_outcome(lambda: Llama(path, verbose=False, **kw))
        counts[("Llama()", outcome)] += 1
        if problem:
            problems.append((seed, i, "Llama()", f"{kw!r:.200}: {problem}"))
    return counts, problems
