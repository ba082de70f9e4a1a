"""llamba.textstream: token ids -> text pieces with stop strings, logprobs and finish reasons, on a toy tokenizer
(no model). Llama's completions, chat completions, the chat REPL and the CLI all read this stream; their own tests
(test_engine, test_server*, test_chat, test_cli, test_tools) check it end to end."""
from __future__ import annotations

import numpy as np

from llamba.generate import GenStats
from llamba.textstream import (LogprobRecorder, chat_logprobs_content, find_stop, logits_to_logprobs,
                               partial_stop_len, stream_text, top_n_logprobs)

EOG = 0
SPECIAL = 9
PIECES = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\n", 6: b"\n\n", 7: "é".encode()[:1],
          8: "é".encode()[1:], SPECIAL: b"<|tool|>"}


class ToyTokenizer:
    def token_to_piece(self, t, special=False):
        if t == EOG or (t == SPECIAL and not special):
            return b""
        return PIECES[t]

    def is_eog(self, t):
        return t == EOG


TK = ToyTokenizer()


def run(ids, stops=None, **kw):
    return list(stream_text(iter(ids), TK, stops, **kw))


def text(items):
    return "".join(p for p, _ in items)


def test_pieces_and_length():
    out = run([1, 2, 3, 4])
    assert text(out) == "Hello world"
    assert [f for _, f in out][-1] == "length" and all(f is None for _, f in out[:-1])


def test_split_character_waits_for_its_last_byte():
    out = run([1, 7, 8, 2])
    assert [p for p, _ in out][:3] == ["Hel", "é", "lo"]
    assert out[-1] == ("", "length")


def test_stop_string_over_tokens_is_held_back_and_cut():
    out = run([1, 2, 5, 5, 3], stops=["\n\n"])
    assert text(out) == "Hello" and out[-1][1] == "stop"
    assert all("\n" not in p for p, _ in out)


def test_prefix_of_a_stop_is_released_when_it_cannot_be_one():
    out = run([1, 5, 2, 4], stops=["\n\n"])
    assert text(out) == "Hel\nlold" and out[-1][1] == "length"
    assert ("Hel", None) in out  # "\n" waited for the next piece
    assert out[1] == ("\nlo", None)


def test_stop_found_at_the_end_and_eog():
    stats = GenStats()
    got = []
    out = run([1, 2, EOG, 3], stats=stats, out_tokens=got)
    assert text(out) == "Hello" and out[-1] == ("", "stop") and stats.ended_eog
    assert got == [1, 2]
    out = run([1, 5], stops=["\n"])
    assert out == [("Hel", None), ("", "stop")]


def test_special_tokens_kept_only_when_asked():
    assert text(run([1, SPECIAL, 2])) == "Hello"
    assert text(run([1, SPECIAL, 2], keep_special={SPECIAL})) == "Hel<|tool|>lo"


def test_logprob_records_follow_the_text():
    rng = np.random.default_rng(0)
    rows = {t: rng.standard_normal(12).astype(np.float32) for t in range(12)}
    rec = LogprobRecorder(2)

    def source():
        for t in [1, 2, 5, 6, 3]:
            rec.row(rows[t])
            yield t

    seen = []
    for piece, fin in stream_text(source(), TK, ["\n\n"], recorder=rec):
        seen.append((piece, [r.id for r in rec.take()]))
    # "Hel", "lo" out at once; "\n" held (a stop prefix), then "\n\n" makes the stop: tokens 5 and 6 never come out
    assert seen == [("Hel", [1]), ("lo", [2]), ("", [])]
    lp = logits_to_logprobs(rows[1])
    rec2 = LogprobRecorder(3)
    rec2.row(rows[1])
    rec2.token(1, 0, [])
    rec2.emitted(1)
    (r,) = rec2.take()
    assert r.logprob == float(lp[1]) and r.top == top_n_logprobs(lp, 3) and r.prev == []
    entries = chat_logprobs_content(TK, [r])
    assert entries[0]["token"] == "Hel" and entries[0]["bytes"] == list(b"Hel")
    assert len(entries[0]["top_logprobs"]) == 3


def test_closing_the_stream_closes_the_source():
    closed = []

    def source():
        try:
            yield from [1, 2, 3, 4]
        finally:
            closed.append(True)

    it = stream_text(source(), TK)
    assert next(it) == ("Hel", None)
    it.close()
    assert closed == [True]


def test_stop_helpers():
    assert find_stop("abcabc", ["ca", "bc"]) == 1
    assert find_stop("abc", ["", "x"]) is None
    assert partial_stop_len("hello\n", ["\n\n"]) == 1
    assert partial_stop_len("hello", ["\n\n"]) == 0
    assert partial_stop_len("ab", ["abc", "bx"]) == 2


def test_top_n_ties_and_order():
    lp = np.array([-1.0, -0.5, -0.5, -3.0], dtype=np.float32)
    assert top_n_logprobs(lp, 2) == [(2, -0.5), (1, -0.5)]  # equal logprobs: the higher id first
    assert top_n_logprobs(lp, 0) == []
    assert [i for i, _ in top_n_logprobs(lp, 10)] == [2, 1, 0, 3]
