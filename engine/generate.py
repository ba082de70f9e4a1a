"""Prefill + decode as a generator of steps; no printing (the CLI prints).

Prompt handling is the same with and without speculation, so both paths see bit-identical numbers:
all prompt tokens but the last go through the batched prefill path; the last prompt token and every
generated token go through the row-exact path (the one speculative verification uses).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GenStats:
    n_prompt: int = 0  # prompt tokens evaluated (not reused from the cache)
    n_reused: int = 0  # prompt tokens found in the cache
    n_gen: int = 0
    t_prompt: float = 0.0  # seconds, prefill incl. the last prompt token
    t_gen: float = 0.0  # seconds after the first token
    t_first: float = 0.0  # seconds from start to the first sampled token
    spec: dict = field(default_factory=dict)
    ended_eog: bool = False  # the generation ended with an end-of-generation token

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.t_prompt if self.t_prompt > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        # the first token comes from the prompt pass; decode speed counts the rest
        n = self.n_gen - 1
        return n / self.t_gen if self.t_gen > 0 and n > 0 else 0.0


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    """A model's default sequence (llamba.kv_cache.SeqCache: its cache and the token ids in it), for one caller:
    prefix reuse across calls, like llama-cpp-python."""

    def __init__(self, model, n_batch: int = 512):
        self.model = model
        # every forward over this model's weights takes it (the batching engine holds it for each step)
        self.lock = threading.RLock()
        # longest batch one forward call processes (llama.cpp's n_batch/n_ubatch): a long prompt goes through in
        # chunks, so activation memory is bounded by n_batch rows, not by the prompt length; the rows are
        # computed exactly as in one call (the kernels are row-exact)
        self.n_batch = max(1, int(n_batch)) if n_batch else 0
        # the batching engine when it steps on a thread of its own (Engine.run_forever / start): model calls
        # from other threads run on that thread (Engine.call), so kernels keep running on one thread
        self.executor = None

    @property
    def tokens(self) -> list[int]:
        return self.model.seq.tokens

    @tokens.setter
    def tokens(self, toks):
        self.model.seq.tokens[:] = [int(t) for t in toks]

    def reset(self):
        self.model.truncate(0)

    def rollback(self, n: int):
        self.model.truncate(n)

    def eval(self, tokens, logits: str = "last", gemm=None, keep_hidden=False):
        ex = self.executor
        if ex is not None and ex.elsewhere():  # (Engine.call holds the lock for it, or the caller lends it)
            return ex.call(self._eval, tokens, logits, gemm, keep_hidden)
        with self.lock:
            return self._eval(tokens, logits, gemm, keep_hidden)

    def _eval(self, tokens, logits, gemm, keep_hidden):
        kw = {"keep_hidden": True} if keep_hidden else {}
        nb = self.n_batch
        if not nb or len(tokens) <= nb:
            return self.model.forward(tokens, logits=logits, gemm=gemm, **kw)
        return self._eval_chunked(tokens, logits, gemm, kw, nb)

    def _eval_chunked(self, tokens, logits, gemm, kw, nb):
        model = self.model
        keep_hidden = bool(kw)
        model.check_room(len(tokens))  # all or nothing: fail before the first chunk
        n0 = model.n_past
        outs, hids = [], []
        try:
            for i in range(0, len(tokens), nb):
                last = i + nb >= len(tokens)
                lg = logits if logits != "last" or last else "none"
                outs.append(model.forward(tokens[i:i + nb], logits=lg, gemm=gemm, **kw))
                if keep_hidden:
                    hids.append(model.hidden)
        except BaseException:
            if model.can_truncate(n0):
                model.truncate(n0)
            raise
        if keep_hidden:
            model.hidden = np.concatenate(hids)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def prefill_body(self, prompt: list[int], stats: GenStats, keep_hidden: bool = False, can_resume=None) -> int:
        """Bring the cache to prompt[:-1], reusing the common prefix; returns how many tokens were reused.
        `can_resume(keep)` lets a proposer veto a reuse point it cannot continue from (then start over)."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt) > self.model.n_ctx:
            self.model.check_room(len(prompt) - self.model.n_past)  # raises ContextOverflowError with the numbers
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1)
        if not self.model.can_truncate(keep) or (can_resume is not None and not can_resume(keep)):
            keep = 0  # recurrent state without a snapshot there, or a proposer out of step: start over
        if keep < len(self.tokens):
            self.rollback(keep)
        stats.n_reused = keep
        stats.n_prompt = len(prompt) - keep
        body = prompt[keep:-1]
        if body:
            self.eval(body, logits="none", keep_hidden=keep_hidden)
        elif keep_hidden:
            self.model.hidden = np.empty((0, self.model.config.n_embd), dtype=np.float32)
        return keep


def generate(session: Session, prompt: list[int], sampler, max_tokens: int | None, stats: GenStats,
             is_eog=None, proposer=None, on_logits=None):
    """Yield generated token ids. Stops at an end-of-generation token (which is yielded), after
    `max_tokens`, or when the context is full. `proposer` enables speculative decoding. `on_logits(row)`, if
    given, is called before each token is yielded with the model's logits row it was sampled from (logprobs)."""
    t0 = time.perf_counter()
    model = session.model
    budget = max_tokens if max_tokens is not None and max_tokens > 0 else model.n_ctx
    if proposer is not None:
        from llamba.speculative.verifier import speculative_generate
        keep = session.prefill_body(prompt, stats, keep_hidden=proposer.needs_hidden,
                                    can_resume=proposer.can_resume)
        proposer.begin(session, keep)
        yield from speculative_generate(session, prompt, sampler, budget, stats, is_eog, proposer, t0, on_logits)
        return
    session.prefill_body(prompt, stats)
    logits = session.eval(prompt[-1:], logits="last", gemm=False)[-1]
    tok = sampler.sample_and_accept(logits)
    t1 = time.perf_counter()
    stats.t_prompt = stats.t_first = t1 - t0
    stats.n_gen = 1
    from llamba.kernels._jit import release_llvm_pages_after_first_token  # (imports Numba: lazily)
    release_llvm_pages_after_first_token()
    if on_logits is not None:
        on_logits(logits)
    yield tok
    while stats.n_gen < budget and not (is_eog and is_eog(tok)):
        if model.n_past >= model.n_ctx:
            break
        logits = session.eval([tok], logits="last", gemm=False)[-1]
        tok = sampler.sample_and_accept(logits)
        stats.n_gen += 1
        stats.t_gen = time.perf_counter() - t1
        if on_logits is not None:
            on_logits(logits)
        yield tok
