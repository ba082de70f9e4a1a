"""What speculative decoding buys: tokens/s without speculation and with a proposer at draft-max 1..4,
acceptance per draft position, and the cost of one verify step of k tokens relative to one decode step.

    python bench/bench_speculative.py -m MODEL.gguf [--spec mtp|ngram|draft] [--draft-model PATH]
                                      [--mtp-head HEAD.gguf] [--chat] [--threads 2] [-n 64]
                                      [--draft-max 1,2,3,4] [--reps 3]

With --mtp-head (a sidecar head from `llamba mtp-train`) the MTP proposer drafts with it; per draft-max the table
also gives the measured cost of a draft step (all the head's forwards of one step) and of a verify step, and the
speed-up those costs predict at the measured mean accepted length: t_decode * mean_len / (t_draft + t_verify).
--chat: held-out chat prompts through the model's chat template instead of the Python prompts.

Greedy; each run checks that the speculative text equals the plain greedy text (lossless). Prompts: the five
Python prompts of the qwen35 fixture (../shared/models/README.md), or --prompt (repeatable).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "    for i in range(len(self.data)):\n",
    "def read_file(path):\n    with open(path, 'r') as f:\n",
]


CHAT_PROMPTS = ["What makes a good friend?", "How do airplanes stay in the air?",
                "Describe a day in the life of a lighthouse keeper.", "Why is the sky blue?",
                "What should I know before adopting a cat?"]


def prompt_ids(llm, p):
    """Token ids of a prompt: text (tokenized with BOS) or already ids."""
    return list(p) if isinstance(p, list) else llm.tokenize(p.encode())


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def gen_pass(llm, prompts, n):
    """One greedy pass over the prompts: (generated tokens / decode seconds, first token excluded as in
    llama-bench; the outputs)."""
    toks, secs, outs = 0, 0.0, []
    for p in prompts:
        ids = prompt_ids(llm, p)
        llm.reset()
        outs.append(list(llm.generate(ids, temp=0, max_tokens=n)))
        st = llm.last_stats
        toks += st.n_gen - 1
        secs += st.t_gen
    return toks / secs, outs


def verify_cost(llm, ks, reps=30):
    """Seconds of one row-exact forward of k tokens (after a 64-token context), relative to k = 1. The k values are
    measured round-robin within each repetition, so a slow period of the machine hits all of them alike."""
    model = llm.model
    rng = np.random.default_rng(0)
    ctx = [int(t) for t in rng.integers(10, llm.n_vocab() - 10, 64)]
    kw = {"snapshots": True} if getattr(model, "rec", None) else {}
    ts = {k: [] for k in ks}
    for _ in range(reps):
        for k in ks:
            llm.reset()
            llm.session.eval(ctx, logits="none")
            batch = [int(t) for t in rng.integers(10, llm.n_vocab() - 10, k)]
            t = time.perf_counter()
            model.forward(batch, logits="all", gemm=False, **kw)
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--spec", default="mtp", choices=["mtp", "ngram", "draft"])
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--draft-max", default="1,2,3,4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", action="append")
    ap.add_argument("--verify-only", action="store_true", help="only measure verify-step cost")
    ap.add_argument("--mtp-head", default=None, help="a sidecar MTP head (llamba mtp-train) for --spec mtp")
    ap.add_argument("--chat", action="store_true", help="held-out chat prompts through the chat template")
    ap.add_argument("--verify-reps", type=int, default=30, help="repetitions of the verify-cost measurement")
    a = ap.parse_args(argv)
    from llamba import Llama
    from llamba.errors import LlambaError
    prompts = a.prompt or PROMPTS
    log(f"loading {a.model}...")
    plain = Llama(a.model, n_ctx=2048, n_threads=a.threads, verbose=False)
    if a.chat and not a.prompt:
        try:
            prompts = [list(plain.apply_chat_template([{"role": "user", "content": c}], tokenize=True))
                       for c in CHAT_PROMPTS]
        except LlambaError:  # no chat template in the file: the questions as plain text
            prompts = [c + "\n" for c in CHAT_PROMPTS]
    # warm-up: compile every kernel on this path
    list(plain.generate(prompt_ids(plain, prompts[0]), temp=0, max_tokens=4))
    ks = [1, 2, 3, 4, 5]
    log("verify-step cost...")
    vc = verify_cost(plain, ks, a.verify_reps)
    print(f"model: {a.model}, threads {a.threads}")
    print("verify step of k tokens / one decode step: " +
          ", ".join(f"k={k}: {vc[k] / vc[1]:.2f}x ({vc[k] * 1e3:.2f} ms)" for k in ks))
    if a.verify_only:
        return
    dms = [int(x) for x in a.draft_max.split(",")]
    engines = {0: plain}
    for dm in dms:
        spec = Llama(a.model, n_ctx=2048, n_threads=a.threads, verbose=False, spec=a.spec, draft_max=dm,
                     draft_model=a.draft_model, mtp_head=a.mtp_head)
        list(spec.generate(prompt_ids(spec, prompts[0]), temp=0, max_tokens=4))
        engines[dm] = spec
    # every repetition runs plain greedy and each draft-max back to back, so a slow period of the machine hits
    # them alike; speed-up = median over repetitions of (speculative / plain) of the same repetition
    rates = {dm: [] for dm in engines}
    outs = {}
    for r in range(a.reps):
        for dm, llm in engines.items():
            log(f"repetition {r + 1}/{a.reps}: {'plain greedy' if dm == 0 else f'{a.spec} draft-max {dm}'}...")
            tps, outs[dm] = gen_pass(llm, prompts, a.n)
            rates[dm].append(tps)
    base_tps = statistics.median(rates[0])
    print(f"no speculation: {base_tps:.1f} tokens/s (median of {a.reps})")
    t_dec = 1.0 / base_tps
    print(f"decode step: {t_dec * 1e3:.2f} ms")
    print(f"{'draft-max':>9} {'tokens/s':>9} {'speed-up':>8} {'accepted/drafted':>17} {'rate':>6} {'mean len':>8} "
          f"{'draft ms':>8} {'verify ms':>9} {'predicted':>9}  acceptance per position")
    for dm in dms:
        spec = engines[dm]
        tps = statistics.median(rates[dm])
        ratio = statistics.median(x / y for x, y in zip(rates[dm], rates[0]))
        lossless = outs[dm] == outs[0]
        # acceptance over one pass of all prompts
        acc = dr = steps = 0
        td = tv = 0.0
        pos_a, pos_d = [0] * dm, [0] * dm
        for p in prompts:
            spec.reset()
            list(spec.generate(prompt_ids(spec, p), temp=0, max_tokens=a.n))
            s = spec.spec_stats
            acc, dr, steps = acc + s.n_accepted, dr + s.n_drafted, steps + s.n_steps
            td, tv = td + s.t_draft, tv + s.t_verify
            for i in range(min(dm, len(s.drafted_at))):
                pos_a[i] += s.accepted_at[i]
                pos_d[i] += s.drafted_at[i]
        per_pos = ", ".join(f"{x / y:.2f}" if y else "-" for x, y in zip(pos_a, pos_d))
        mlen = 1 + acc / max(steps, 1)
        t_d, t_v = td / max(steps, 1), tv / max(steps, 1)
        pred = t_dec * mlen / (t_d + t_v) if t_d + t_v > 0 else 0.0
        print(f"{dm:>9} {tps:9.1f} {ratio:7.2f}x {acc:>8}/{dr:<8} {acc / max(dr, 1):6.1%} "
              f"{mlen:8.2f} {t_d * 1e3:8.2f} {t_v * 1e3:9.2f} {pred:8.2f}x  ({per_pos})"
              f"{'' if lossless else '  NOT LOSSLESS'}")

if __name__ == "__main__":
    main()
