"""Fuzz the public Llama API with hostile arguments (issue 11) and print what happened.

    python bench/fuzz_api.py [--seeds 0:100] [--cases 100] [--ctor 200] [--templates 300] [-m MODEL.gguf]

Each seed runs --cases random calls (tests/api_fuzz.py: tokenize, detokenize, eval, eval_logits, generate,
create_completion, create_chat_completion, apply_chat_template, embed, load_state with mostly hostile arguments)
on a tiny random model (or -m MODEL), --ctor hostile constructor calls, and --templates random chat templates
built from runaway pieces (loops, recursion, growth, printing functions). A call passes when it returns or raises
a LlambaError / TypeError / ValueError with a one-line message, within 10 s (templates: a TemplateError within
5 s, or a normal render). Prints counts per call and outcome, then every problem; exit status 1 if any.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402

import api_fuzz  # noqa: E402

PIECES = [
    "{% for i in range(100000) %}", "{% for c in s %}", "{% for m in messages %}", "{% endfor %}",
    "{{ lipsum(n=N) }}", "{% set ns.s = ns.s ~ ns.s %}", "{% set ns.s = ns.s + ns.s %}", "{{ f(N) }}",
    "{{ 'x' * N }}", "{{ raise_exception|string }}", "{{ cycler(1, 2) }}", "{{ 'a'.upper }}", "{{ joiner() }}",
    "{{ namespace }}", "{{ [1, 2]|reverse }}", "{{ '%Ns' % 1 }}", "{{ '{:>N}'.format(1) }}", "{{ s|center(N) }}",
    "{{ [s] * N }}", "{{ ([s] * N)|join }}", "{{ s|replace('x', s) }}", "{{ range(N)|batch(N, 1)|list }}",
    "{{ messages|tojson }}", "{{ ns.s|length }}", "{{ (N).to_bytes(N, 'big') }}", "{{ s.ljust(N) }}",
    "{{ messages[0].content }}", "{% if true %}", "{% endif %}", "{{ loop.index if loop is defined }}",
]
PRELUDE = ("{% set ns = namespace(s='xy') %}{% set s = 'x' * 1000 %}"
           "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}")


def random_template(rng) -> str:
    parts, depth = [PRELUDE], 0
    for _ in range(int(rng.integers(1, 9))):
        p = PIECES[int(rng.integers(len(PIECES)))]
        if p == "{% endfor %}":
            if depth == 0:
                continue
            depth -= 1
        elif p.startswith("{% for"):
            depth += 1
        elif p in ("{% if true %}", "{% endif %}"):
            continue
        n = [3, 64, 10**5, 10**7, 10**9][int(rng.integers(5))]
        parts.append(p.replace("N", str(n)))
    parts += ["{% endfor %}"] * depth
    return "".join(parts)


def fuzz_templates(seed: int, n: int):
    from llamba.chat import ChatTemplate
    from llamba.errors import TemplateError
    rng = np.random.default_rng(seed)
    counts, problems, slowest = Counter(), [], 0.0
    for i in range(n):
        src = random_template(rng)
        msgs = api_fuzz.hostile_messages(rng, 320) if rng.random() < 0.3 else [{"role": "user", "content": "hi"}]
        t0 = time.perf_counter()
        try:
            out = ChatTemplate(src).render(msgs)
            outcome = "ok"
            import re
            if re.search(r" at 0x[0-9a-fA-F]{6,}", out):
                problems.append((seed, i, "template", f"address in output: {src!r}"))
        except TemplateError as e:
            outcome = "TemplateError"
            if "\n" in str(e) or "0x" in str(e):
                problems.append((seed, i, "template", f"bad message {str(e)[:100]!r}"))
        except api_fuzz.ALLOWED as e:  # message checks (nesting) come before the template runs
            outcome = type(e).__name__
        except Exception as e:  # noqa: BLE001
            outcome = type(e).__name__
            problems.append((seed, i, "template", f"{outcome}: {str(e)[:100]} in {src!r}"))
        dt = time.perf_counter() - t0
        slowest = max(slowest, dt)
        if dt > 5:
            problems.append((seed, i, "template", f"took {dt:.1f} s: {src!r}"))
        counts[("template", outcome)] += 1
    return counts, problems, slowest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="a GGUF model (default: a tiny random llama with a chatml template)")
    ap.add_argument("--seeds", default="0:100", help="seed range a:b (default 0:100)")
    ap.add_argument("--cases", type=int, default=100, help="API calls per seed (default 100)")
    ap.add_argument("--ctor", type=int, default=200, help="hostile constructor calls (default 200)")
    ap.add_argument("--templates", type=int, default=300, help="random runaway templates (default 300)")
    a = ap.parse_args()
    from llamba import Llama
    path = a.model
    if path is None:
        from llamba.chat import BUILTIN_TEMPLATES
        from tiny_models import write_model
        path = str(write_model(os.path.join(tempfile.mkdtemp(), "m.gguf"), "llama", seed=4,
                               chat_template=BUILTIN_TEMPLATES["chatml"][0]))
    lo, hi = (int(x) for x in a.seeds.split(":"))
    t0 = time.perf_counter()
    llm = Llama(path, n_ctx=128, n_threads=1, verbose=False, logits_all=True, embedding=True)
    counts, problems, slowest = Counter(), [], 0.0
    for seed in range(lo, hi):
        c, p, s = api_fuzz.run(llm, seed, a.cases)
        counts.update(c)
        problems += p
        slowest = max(slowest, s)
    c, p = api_fuzz.constructor_cases(path, lo, a.ctor)
    counts.update(c)
    problems += p
    if a.templates:
        c, p, s = fuzz_templates(lo, a.templates)
        counts.update(c)
        problems += p
        slowest = max(slowest, s)
    by_op: dict = {}
    for (op, outcome), k in counts.items():
        by_op.setdefault(op, Counter())[outcome] += k
    for op in sorted(by_op):
        print(f"{op:24s} {sum(by_op[op].values()):6d}  " +
              ", ".join(f"{o} {k}" for o, k in by_op[op].most_common()))
    total = sum(counts.values())
    print(f"total {total} calls in {time.perf_counter() - t0:.1f} s, slowest {slowest:.2f} s, "
          f"{len(problems)} problems")
    for seed, i, op, prob in problems[:50]:
        print(f"PROBLEM seed {seed} case {i} {op}: {prob}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
