"""Aggregate decode throughput of the batching engine (llamba.scheduler) at several concurrency levels, with and
without speculation, in one process (no HTTP): what `llamba serve -np N` can reach at most.

    python bench/bench_batch.py -m MODEL.gguf --parallel 1,2,4,8 --spec none,mtp --draft-max 3 -n 64

For each level, N sequences with different prompts decode `-n` tokens each (greedy); the figure is generated tokens
per second of wall time for the whole level (prefill included, measured after a warm-up level). Levels and
speculation modes are interleaved per repetition so background load hits all alike; the median is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "Once upon a time, in a land far away, there lived a",
    "The capital of France is",
    "class Stack:\n    def __init__(self):\n",
    "List three facts about the moon:\n1.",
    "for i in range(10):\n    print(",
    "Write a short poem about the sea.\n",
    "def parse_args(argv):\n",
    "The quick brown fox",
    "# A function that sorts a list\n",
    "Q: What is 12 times 7?\nA:",
    "import json\n\nwith open(",
    "In 1905, Albert Einstein",
    "def read_file(path):\n    with open(path) as f:\n",
    "Here is a recipe for pancakes:\n",
]


def run_level(llm, n_par, spec, draft_max, n_gen, spec_rows):
    from llamba.scheduler import Engine
    spec, _, busy_p = spec.partition("@")  # "mtp@0.8": under load, one draft when the head is >= 0.8 sure
    eng = Engine(llm.model, n_ctx=max(4096, n_par * 512), n_parallel=n_par, spec=spec, draft_max=draft_max,
                 spec_rows=spec_rows, busy_draft_p=float(busy_p) if busy_p else None, lock=llm.session.lock,
                 is_eog=lambda t: False)
    sp = llm.make_sampler(0.0, 40, 0.95, 0.05, 1.0, 1.0, 0.0, 0.0, None, None).params
    toks = [llm.tokenize(PROMPTS[i % len(PROMPTS)].encode(), add_bos=True) for i in range(n_par)]
    t0 = time.perf_counter()
    reqs = [eng.submit(t, sp, n_gen) for t in toks]
    eng.run_until_done()
    dt = time.perf_counter() - t0
    n = sum(r.n_gen for r in reqs)
    acc = eng.stats["accepted"] / eng.stats["drafted"] if eng.stats["drafted"] else 0.0
    return n / dt, acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--parallel", default="1,2,4,8")
    ap.add_argument("--spec", default="none",
                    help="comma list of none, mtp, ngram; mtp@P: with the engine's busy_draft_p=P (under load, one "
                         "draft for a sequence whose MTP head gives it probability >= P)")
    ap.add_argument("--draft-max", type=int, default=3)
    ap.add_argument("--spec-rows", type=int, default=4,
                    help="verify rows per step for all sequences together (the engine's load adaptation; 4 is "
                         "the default, a large value drafts draft-max tokens at any load)")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    from llamba import Llama
    llm = Llama(a.model, n_ctx=512, n_threads=a.threads, verbose=False)
    levels = [int(x) for x in a.parallel.split(",")]
    specs = a.spec.split(",")
    run_level(llm, 2, specs[0], a.draft_max, 8, a.spec_rows)  # warm-up (kernels loaded)
    res = {(n, s): [] for n in levels for s in specs}
    accs = {}
    for _ in range(a.reps):
        for n in levels:
            for s in specs:
                tps, acc = run_level(llm, n, s, a.draft_max, a.n, a.spec_rows)
                res[(n, s)].append(tps)
                accs[(n, s)] = acc
    print(f"{os.path.basename(a.model)}, {a.threads} threads, {a.n} tokens per sequence, median of {a.reps}")
    print("| sequences | " + " | ".join(f"{s} tok/s" for s in specs) + " |")
    print("|---|" + "---|" * len(specs))
    for n in levels:
        cells = []
        for s in specs:
            m = statistics.median(res[(n, s)])
            base = statistics.median(res[(n, specs[0])])
            extra = f" ({m / base:.2f}x, acc {accs[(n, s)]:.2f})" if s != specs[0] else ""
            cells.append(f"{m:.1f}{extra}")
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
