"""Text streaming: generated token ids -> text pieces, with stop strings, logprobs and finish reasons.

Every front end gets its text from one generator, `stream_text`: `Llama.create_completion`,
`Llama.create_chat_completion` (and so the server, which serves them), the chat REPL (`ChatSession`, through
`Llama.chat_stream`) and the CLI (`llamba run`, through `create_completion(stream=True)`). `Llama.stream_text`
feeds it the token ids of a generation (one sequence, or the batching engine).

    for piece, finish in stream_text(token_ids, tokenizer, stops=["\\n\\n"]):
        print(piece, end="")          # finish: None while generating, then "stop" or "length"

What it promises:
- pieces are whole UTF-8 characters (`llamba.tokenizer.StreamDecoder`: bytes of a character split over tokens
  wait for the rest);
- text that could still be the start of a stop string is held back until it cannot be one; a stop string ends
  the stream with the text before it (the stop string itself never comes out);
- the last item has the finish reason: "stop" (an end-of-generation token or a stop string) or "length" (the
  token source ended: max_tokens, a full context);
- with a `LogprobRecorder`, the logprobs of each token are released once its text starts to come out (tokens of
  a cut stop string and the end-of-generation token never are), in the order of the pieces.

The logprob records become the OpenAI / llama-cpp-python layouts with `chat_logprobs_content` (chat
`logprobs.content`) and `completion_logprobs_chunk` (a streamed completion chunk's `logprobs`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from llamba.tokenizer import StreamDecoder

__all__ = ["stream_text", "LogprobRecorder", "TokenLogprob", "logits_to_logprobs", "top_n_logprobs", "find_stop",
           "partial_stop_len", "chat_logprobs_content", "completion_logprobs_chunk"]


def logits_to_logprobs(logits, axis: int = -1) -> np.ndarray:
    """log-softmax in float32, computed as llama-cpp-python's `Llama.logits_to_logprobs`."""
    logits = np.asarray(logits, dtype=np.float32)
    m = np.amax(logits, axis=axis, keepdims=True)
    m[~np.isfinite(m)] = 0
    sub = np.subtract(logits, m, dtype=np.float32)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(sub), axis=axis, keepdims=True))
    return sub - out


def top_n_logprobs(lp: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n (id, logprob) pairs of a logprob row as llama-cpp-python picks them, sorted((logprob, id),
    reverse=True)[:n]: logprob descending, then the higher id first; sorted among the ids at or above the n-th
    largest logprob only (all of the first n, ties included)."""
    if n <= 0:
        return []
    if n < len(lp):
        cand = np.flatnonzero(lp >= np.partition(lp, len(lp) - n)[len(lp) - n])
    else:
        cand = np.arange(len(lp))
    order = cand[np.lexsort((-cand, -lp[cand]))][:n]
    return [(int(i), float(lp[i])) for i in order]


class TokenLogprob:
    """One generated token's record: `id`, `logprob`, `top` ([(id, logprob)], the top-n alternatives), `start`
    (characters of completion text before it) and `prev` (the completion tokens before it)."""
    __slots__ = ("id", "logprob", "top", "start", "_gen", "_k")

    def __init__(self, tok, logprob, top, start, gen, k):
        self.id, self.logprob, self.top, self.start, self._gen, self._k = tok, logprob, top, start, gen, k

    @property
    def prev(self) -> list[int]:
        """The completion tokens before this one."""
        return self._gen[:self._k]


class LogprobRecorder:
    """Logprobs of generated tokens as they are sampled (no logits_all needed): `row(logits)` is called with the
    row a token is sampled from (pass it as the token source's `on_logits`), `token(id, start, gen)` when the token
    arrives (`start`: characters of completion text before it); `emitted(upto)` releases the tokens whose text
    starts before `upto` characters, `take()` returns the released ones not taken yet (TokenLogprob records).
    `stream_text` makes the `token` / `emitted` calls; a consumer calls `take()` after each piece."""

    def __init__(self, n: int):
        self.n = int(n)  # top alternatives per token
        self._lp = None
        self._held: list = []
        self._ready: list = []

    def row(self, logits):
        self._lp = logits_to_logprobs(logits)

    def token(self, tok: int, start: int, gen: list):
        lp, self._lp = self._lp, None
        self._held.append(TokenLogprob(tok, float(lp[tok]), top_n_logprobs(lp, self.n), start, gen, len(gen)))

    def emitted(self, upto: int):
        k = 0
        while k < len(self._held) and self._held[k].start < upto:
            k += 1
        if k:
            self._ready += self._held[:k]
            del self._held[:k]

    def take(self) -> list:
        out, self._ready = self._ready, []
        return out


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the first occurrence in `text` of any (non-empty) stop string, or None."""
    best = None
    for s in stops:
        if s:
            i = text.find(s)
            if i >= 0 and (best is None or i < best):
                best = i
    return best


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


def stream_text(tokens: Iterable[int], tokenizer, stops: list[str] | None = None, *,
                recorder: LogprobRecorder | None = None, keep_special=None, stats=None,
                out_tokens: list[int] | None = None,
                end_reason: Callable[[], str] | None = None) -> Iterator[tuple[str, str | None]]:
    """Yield (text_piece, finish_reason | None) for the generated token ids `tokens` (see the module docstring).

    `tokenizer`: a llamba Tokenizer (`is_eog`, and what StreamDecoder needs). `stops`: stop strings.
    `keep_special`: ids of special tokens whose text is kept (tool-call markers such as [TOOL_CALLS]); other
    special tokens have no text. `recorder`: a LogprobRecorder whose `row` the token source calls; its records
    are released as described there. `stats` (a GenStats): `ended_eog` is set when an end-of-generation token
    ends the stream. `out_tokens`: a list that receives every generated id except end-of-generation ones.
    `end_reason()`: the finish reason when `tokens` runs out (default "length"; "stop" when a stopping criterion
    ended the token source).
    Closing the generator closes `tokens` (if it is a generator: a generation stops there)."""
    stops = list(stops or ())
    rec = recorder
    dec = StreamDecoder(tokenizer)
    is_eog = tokenizer.is_eog
    pending = ""
    total = 0  # characters decoded so far (yielded + pending)
    gen: list[int] = []

    def stop_in_pending():
        """Where a stop string starts in the pending text (its tokens' logprobs up to there released), or None."""
        hit = find_stop(pending, stops)
        if hit is not None and rec is not None:
            rec.emitted(total - len(pending) + hit)
        return hit

    try:
        for tok in tokens:
            if out_tokens is not None and not is_eog(tok):
                out_tokens.append(tok)
            if is_eog(tok):
                if stats is not None:
                    stats.ended_eog = True
                tail = dec.flush()
                total += len(tail)
                pending += tail
                if rec is not None:
                    rec.emitted(total)
                yield pending, "stop"
                return
            if rec is not None:
                rec.token(tok, total, gen)
            gen.append(tok)
            if keep_special:
                dec.special = tok in keep_special
            piece = dec.feed(tok)
            total += len(piece)
            pending += piece
            if stops:
                hit = stop_in_pending()
                if hit is not None:
                    yield pending[:hit], "stop"
                    return
                safe = len(pending) - partial_stop_len(pending, stops)
                if safe > 0:
                    if rec is not None:
                        rec.emitted(total - len(pending) + safe)
                    yield pending[:safe], None
                    pending = pending[safe:]
            elif pending:
                if rec is not None:
                    rec.emitted(total)
                yield pending, None
                pending = ""
        tail = dec.flush()
        total += len(tail)
        pending += tail
        if stops:
            hit = stop_in_pending()
            if hit is not None:
                yield pending[:hit], "stop"
                return
        if rec is not None:
            rec.emitted(total)
        yield pending, end_reason() if end_reason is not None else "length"
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()


def chat_logprobs_content(tokenizer, records: list[TokenLogprob]) -> list[dict]:
    """OpenAI chat `logprobs.content` entries of released records: token text, logprob, UTF-8 bytes,
    top_logprobs (each entry: token, logprob, bytes)."""
    def entry(t, v):
        b = tokenizer.token_to_piece(t, special=True)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": v, "bytes": list(b)}

    return [dict(entry(r.id, r.logprob), top_logprobs=[entry(i, v) for i, v in r.top]) for r in records]


def completion_logprobs_chunk(detokenize: Callable, records: list[TokenLogprob], prompt_tokens,
                              prompt_len: int) -> dict:
    """The llama-cpp-python `logprobs` object of one streamed completion chunk: the tokens whose text the chunk
    starts (tokens, text offsets into prompt + completion, their logprobs, top dicts with the token itself).
    `detokenize(ids, prev_tokens=...)` -> bytes is `Llama.detokenize`; `prompt_len`: characters of the prompt."""
    out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    for r in records:
        prev = list(prompt_tokens) + r.prev
        s = detokenize([r.id], prev_tokens=prev).decode("utf-8", errors="ignore")
        top = {detokenize([i], prev_tokens=prev).decode("utf-8", errors="ignore"): v for i, v in r.top}
        top[s] = r.logprob
        out["tokens"].append(s)
        out["text_offset"].append(prompt_len + r.start)
        out["token_logprobs"].append(r.logprob)
        out["top_logprobs"].append(top)
    return out
