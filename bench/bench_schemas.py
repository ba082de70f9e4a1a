"""Random JSON schemas x a model through `Llama.create_chat_completion(response_format=json_schema)`: every output is
parsed and validated with `jsonschema` (issue 12's "200 random JSON schemas x SmolLM2-135M").

    python bench/bench_schemas.py [-n 200] [--seed 0] [--max-tokens 256] [-m MODEL.gguf] [--threads 2]
                                  [--temperature 0] [--free-runs 5] [--show 3] [--json]

The schemas come from a seeded generator: a top-level object of 2-5 properties whose values are nested objects
(depth <= 3), arrays (items of any kind, minItems/maxItems), enums (strings, numbers, null), integers and numbers
with bounds, strings with a pattern or min/maxLength, booleans, nulls and nullable values (type [T, "null"]), a
random subset required, additionalProperties false. Strings are bounded (maxLength or a bounded pattern) so an
output has a finite size; JSON is compact (llamba.constrain: no free whitespace).

Printed: how many outputs are valid / invalid (a finished output that does not parse or validate: must be 0),
how many ended cleanly (finish_reason "stop") and how many hit max_tokens (truncated JSON, reported apart:
not validated), tokens per output; then the constraint's own cost per token (mask + accept, timed inside the
constrained decodes, bench_constrain's method) as a % of an unconstrained token's decode time (unconstrained
greedy decodes of the same prompts, --free-runs of them).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

WORDS = ["name", "age", "city", "tags", "score", "id", "color", "items", "price", "active", "owner", "email",
         "count", "level", "title", "notes", "kind", "size", "rank", "code", "zip", "unit", "start", "end", "label"]
PATTERNS = [r"^[a-z]{3,8}$", r"^[A-Z]{2}[0-9]{3}$", r"^[0-9]{3}-[0-9]{4}$", r"^[a-f0-9]{6}$",
            r"^(red|green|blue)-[0-9]{1,2}$", r"^[A-Z][a-z]{2,9}$"]
STR_ENUMS = [["red", "green", "blue"], ["low", "medium", "high"], ["cat", "dog"], ["yes", "no", "maybe"],
             ["north", "south", "east", "west"]]


def _leaf(rng: random.Random) -> dict:
    k = rng.choice(["string", "string", "pattern", "integer", "number", "boolean", "null", "enum", "nullable"])
    if k == "string":
        lo = rng.choice([0, 1, 2])
        return {"type": "string", "minLength": lo, "maxLength": rng.randint(max(lo, 3), 16)}
    if k == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if k == "integer":
        lo = rng.randint(-100, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 500)}
    if k == "number":
        lo = round(rng.uniform(-10, 10), 1)
        return {"type": "number", "minimum": lo, "maximum": round(lo + rng.uniform(0.5, 100), 1)}
    if k == "boolean":
        return {"type": "boolean"}
    if k == "null":
        return {"type": "null"}
    if k == "enum":
        e = list(rng.choice(STR_ENUMS))
        if rng.random() < 0.3:
            e += [rng.randint(0, 9), None]
        return {"enum": e}
    inner = _leaf(rng)
    while not isinstance(inner.get("type"), str) or inner["type"] == "null":
        inner = _leaf(rng)
    return dict(inner, type=[inner["type"], "null"])


def _value(rng: random.Random, depth: int) -> dict:
    r = rng.random()
    if depth < 3 and r < 0.18:
        return _object(rng, depth + 1)
    if depth < 3 and r < 0.36:
        lo = rng.randint(0, 2)
        return {"type": "array", "items": _value(rng, depth + 1) if rng.random() < 0.3 else _leaf(rng),
                "minItems": lo, "maxItems": lo + rng.randint(0, 3)}
    return _leaf(rng)


def _object(rng: random.Random, depth: int) -> dict:
    n = rng.randint(2, 5) if depth == 0 else rng.randint(1, 3)
    names = rng.sample(WORDS, n)
    props = {k: _value(rng, depth) for k in names}
    req = [k for k in names if rng.random() < 0.7] or [names[0]]
    return {"type": "object", "properties": props, "required": req, "additionalProperties": False}


def random_schemas(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_object(rng, 0) for _ in range(n)]


def _messages(schema: dict) -> list[dict]:
    return [{"role": "system", "content": "You answer with a JSON value only."},
            {"role": "user", "content": "Write a realistic JSON object that follows this JSON schema:\n"
                                        + json.dumps(schema)}]


def run_schemas(llm, n: int = 200, seed: int = 0, max_tokens: int = 256, temperature: float = 0.0,
                progress=None) -> dict:
    """Generate under n random schemas; returns counts (valid, invalid, stop, length), the failures, per-output
    token counts, and the constraint's time inside the decodes (mask + accept seconds and steps)."""
    import jsonschema
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

    res = {"n": n, "valid": 0, "invalid": 0, "stop": 0, "length": 0, "failures": [], "tokens": [],
           "gen_s": 0.0, "compile_s": 0.0, "examples": []}
    C.Matcher.mask, C.Matcher.accept = timed_mask, timed_accept
    try:
        for i, schema in enumerate(random_schemas(n, seed)):
            rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
            t = time.perf_counter()
            C.compile_constraint(llm.tokenizer, "json_schema", schema)
            res["compile_s"] += time.perf_counter() - t
            r = llm.create_chat_completion(_messages(schema), max_tokens=max_tokens, temperature=temperature,
                                           seed=i, response_format=rf)
            st = llm.last_stats
            res["gen_s"] += getattr(st, "t_gen", 0.0) or 0.0
            ch = r["choices"][0]
            text, fin = ch["message"]["content"], ch["finish_reason"]
            res["tokens"].append(r["usage"]["completion_tokens"])
            if len(res["examples"]) < 5:
                res["examples"].append(text)
            if fin == "length":
                res["length"] += 1
            else:
                res["stop"] += 1
                try:
                    jsonschema.validate(json.loads(text), schema)
                    res["valid"] += 1
                except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError) as e:
                    res["invalid"] += 1
                    res["failures"].append({"i": i, "schema": schema, "text": text, "error": str(e)[:300]})
            if progress:
                progress(i, res)
    finally:
        C.Matcher.mask, C.Matcher.accept = orig_mask, orig_accept
    res["constraint_s"], res["constraint_steps"] = spent["s"], spent["n"]
    return res


def free_decode_ms(llm, n_runs: int, seed: int, max_tokens: int) -> float:
    """Median ms per token of unconstrained greedy decodes of the same kind of prompt."""
    per = []
    for i, schema in enumerate(random_schemas(n_runs, seed)):
        llm.create_chat_completion(_messages(schema), max_tokens=max_tokens, temperature=0, seed=i)
        st = llm.last_stats
        if st.n_gen > 1 and st.gen_tps:
            per.append(1000.0 / st.gen_tps)
    return statistics.median(per) if per else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=os.path.expanduser("~/.cache/llamba-test/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-n", type=int, default=200, help="schemas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--free-runs", type=int, default=5, help="unconstrained decodes for the per-token baseline")
    ap.add_argument("--show", type=int, default=3, help="print this many outputs")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    a = ap.parse_args(argv)
    from llamba import Llama
    llm = Llama(a.model, n_ctx=2048, n_threads=a.threads, verbose=False, seed=0)
    llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)  # JIT warm-up
    t0 = time.perf_counter()

    def progress(i, r):
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{a.n}: valid {r['valid']} invalid {r['invalid']} length {r['length']} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    res = run_schemas(llm, a.n, a.seed, a.max_tokens, a.temperature, progress)
    wall = time.perf_counter() - t0
    free_ms = free_decode_ms(llm, a.free_runs, a.seed + 1000, 64)
    toks = res["tokens"]
    con_ms = res["constraint_s"] * 1000 / max(1, res["constraint_steps"])
    print(f"model {os.path.basename(a.model)}, {a.threads} threads, {a.n} schemas (seed {a.seed}), "
          f"max_tokens {a.max_tokens}, temperature {a.temperature}, {wall:.0f} s")
    print(f"valid {res['valid']}, invalid {res['invalid']} (finished outputs that fail to parse/validate), "
          f"ended cleanly (stop) {res['stop']}, hit max_tokens {res['length']} (truncated, not validated)")
    print(f"completion tokens per output: median {statistics.median(toks):.0f}, max {max(toks)}, "
          f"total {sum(toks)}; schema compile {res['compile_s'] * 1000 / a.n:.1f} ms/schema (first compile)")
    print(f"constraint inside decode (mask + accept, {res['constraint_steps']} steps): {con_ms:.3f} ms/token = "
          f"{con_ms / free_ms * 100:.1f} % of an unconstrained token ({free_ms:.2f} ms/token, median of "
          f"{a.free_runs} free decodes)")
    for f in res["failures"][:5]:
        print(f"INVALID #{f['i']}: {f['error']}\n  schema {json.dumps(f['schema'])}\n  output {f['text'][:300]}")
    for t in res["examples"][:a.show]:
        print(f"output: {t[:200]}")
    if a.json:
        print(json.dumps({k: v for k, v in res.items() if k not in ("examples",)} |
                         {"free_ms_per_token": free_ms, "constraint_ms_per_token": con_ms, "wall_s": wall}))
    return 1 if res["invalid"] else 0


if __name__ == "__main__":
    sys.exit(main())
