"""Per-token cost of a JSON-schema constraint (llamba.constrain / llguidance) against unconstrained decoding.

    python bench/bench_constrain.py [-m MODEL.gguf] [--threads 2] [--tokens 96] [--reps 3]

Decodes greedily (chat prompt asking for a JSON object) with and without a JSON-schema constraint and prints
decode tokens/s for both, the constraint's own cost per token (mask + accept, timed in isolation on the tokens the
constrained run produced, over the model's real vocabulary) and the overhead in % of an unconstrained token's time.
Decode figures are medians over --reps interleaved runs; on a shared machine the end-to-end difference is mostly
load noise, and the constraint's own time (measured inside the constrained decode, and in isolation) is the figure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9.]+$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 8},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
        "status": {"enum": ["active", "inactive", "banned"]},
    },
    "required": ["name", "age", "tags", "address", "status"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=os.path.expanduser("~/.cache/llamba-test/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    from llamba import Llama
    from llamba.constrain import compile_constraint
    llm = Llama(a.model, n_ctx=1024, n_threads=a.threads, verbose=False, seed=0)
    msgs = [{"role": "system", "content": "You answer with JSON only."},
            {"role": "user", "content": "Describe a fictional person as a JSON object with name, age, email, tags, "
                                        "address and status."}]
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    t = time.perf_counter()
    cons = compile_constraint(llm.tokenizer, "json_schema", SCHEMA)
    t_compile = time.perf_counter() - t
    llm.create_chat_completion(msgs, max_tokens=8, temperature=0)  # warm-up (JIT)
    llm.create_chat_completion(msgs, max_tokens=8, temperature=0, response_format=rf)

    def run(**kw):
        r = llm.create_chat_completion(msgs, max_tokens=a.tokens, temperature=0, **kw)
        st = llm.last_stats
        return st.gen_tps, r["choices"][0]["message"]["content"], st.n_gen

    # time the constraint's own work inside the constrained runs (mask + accept, as called by the sampler)
    from llamba import constrain as C
    spent = {"s": 0.0, "n": 0}
    orig_mask, orig_accept = C.Matcher.mask, C.Matcher.accept

    def timed_mask(self, x):
        t0 = time.perf_counter()
        try:
            return orig_mask(self, x)
        finally:
            spent["s"] += time.perf_counter() - t0
            spent["n"] += 1

    def timed_accept(self, tok):
        t0 = time.perf_counter()
        try:
            return orig_accept(self, tok)
        finally:
            spent["s"] += time.perf_counter() - t0

    C.Matcher.mask, C.Matcher.accept = timed_mask, timed_accept
    free, con = [], []
    for _ in range(a.reps):  # interleaved: a shared machine's load drifts alike over both
        free.append(run())
        con.append(run(response_format=rf))
    free_tps, n_free = statistics.median(f[0] for f in free), free[-1][2]
    con_tps, con_text, n_con = statistics.median(c[0] for c in con), con[-1][1], con[-1][2]
    C.Matcher.mask, C.Matcher.accept = orig_mask, orig_accept
    in_decode = spent["s"] / max(1, spent["n"])
    # the constraint alone: mask + accept over the tokens the constrained run produced
    toks = llm.tokenize(con_text.encode("utf-8"), add_bos=False)
    m = cons.matcher()
    ok = m.valid_prefix(toks)
    toks = toks[:ok]
    row = np.zeros(llm.n_vocab(), dtype=np.float32)
    ts = []
    for _ in range(a.reps):
        m = cons.matcher()
        t = time.perf_counter()
        for tok in toks:
            row.fill(0.0)
            m.mask(row)
            m.accept(tok)
        ts.append((time.perf_counter() - t) / max(1, len(toks)))
    per_tok = statistics.median(ts)
    free_ms = 1000.0 / free_tps if free_tps else float("nan")
    print(f"model {os.path.basename(a.model)}, {a.threads} threads, vocab {llm.n_vocab()}, greedy, "
          f"max {a.tokens} tokens, median of {a.reps}")
    print(f"schema compile (first, incl. tokenizer): {t_compile * 1000:.1f} ms")
    print(f"unconstrained decode: {free_tps:.1f} tokens/s ({n_free} tokens, {free_ms:.2f} ms/token)")
    print(f"JSON-schema decode:   {con_tps:.1f} tokens/s ({n_con} tokens)  -> end to end "
          f"{(free_tps / con_tps - 1) * 100 if con_tps else float('nan'):+.1f} % time per token")
    print(f"constraint inside decode (mask + accept, {spent['n']} steps): {in_decode * 1000:.3f} ms/token = "
          f"{in_decode * 1000 / free_ms * 100:.1f} % of an unconstrained token")
    print(f"constraint alone (mask + accept, {len(toks)} tokens): {per_tok * 1000:.3f} ms/token = "
          f"{per_tok * 1000 / free_ms * 100:.1f} % of an unconstrained token")
    print(f"output: {con_text[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
