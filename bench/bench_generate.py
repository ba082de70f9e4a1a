"""Prefill and decode speed of llamba, optionally side by side with llama.cpp (llama-cpp-python).

    python bench/bench_generate.py -m MODEL.gguf [--threads 1,2] [--compare] [--ref-python PATH] [--reps 3]

Measures, per thread count: model load time, prompt processing pp128 and pp512 (tokens/s, from an empty cache),
decode tg64 (tokens/s, 64 single-token steps after a 16-token prompt), and peak RSS. `--compare` runs the same
measurements with llama-cpp-python on the same file in a subprocess (`--ref-python`, default: this interpreter,
so llama_cpp must be importable there) and prints llamba/llama.cpp ratios. Figures are medians over --reps runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

REF_SCRIPT = r"""
import json, sys, time, statistics, resource
import numpy as np
from llama_cpp import Llama
path, threads, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
llm = Llama(path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
            flash_attn=True, verbose=False, seed=0)
load = time.perf_counter() - t0
rng = np.random.default_rng(0)
nv = llm.n_vocab()
res = {"load_s": load}
for n in (128, 512):
    ts = []
    for _ in range(reps):
        toks = [int(t) for t in rng.integers(100, nv - 100, n)]
        llm.reset(); llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
        t = time.perf_counter(); llm.eval(toks); ts.append(time.perf_counter() - t)
    res[f"pp{n}"] = n / statistics.median(ts)
ts = []
for _ in range(reps):
    llm.reset(); llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
    llm.eval([int(t) for t in rng.integers(100, nv - 100, 16)])
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(64):
        llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    ts.append(time.perf_counter() - t)
res["tg64"] = 64 / statistics.median(ts)
res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(res))
"""


def bench_llamba(path: str, threads: int, reps: int, log) -> dict:
    from llamba import Llama
    t0 = time.perf_counter()
    llm = Llama(path, n_ctx=1024, n_threads=threads, verbose=False)
    load = time.perf_counter() - t0
    model = llm.model
    rng = np.random.default_rng(0)
    nv = llm.n_vocab()
    res = {"load_s": load}
    # warm-up: compiles/loads every kernel the model uses (Numba cache) outside the timed runs
    llm.reset()
    model.forward(rng.integers(100, nv - 100, 40), logits="last")
    model.forward([1], logits="last", gemm=False)
    for n in (128, 512):
        ts = []
        for r in range(reps):
            log(f"  llamba t={threads} pp{n} run {r + 1}/{reps}")
            llm.reset()
            toks = rng.integers(100, nv - 100, n)
            t = time.perf_counter()
            model.forward(toks, logits="last")
            ts.append(time.perf_counter() - t)
        res[f"pp{n}"] = n / statistics.median(ts)
    ts = []
    for r in range(reps):
        log(f"  llamba t={threads} tg64 run {r + 1}/{reps}")
        llm.reset()
        lg = model.forward(rng.integers(100, nv - 100, 16), logits="last")
        tok = int(np.argmax(lg[-1]))
        t = time.perf_counter()
        for _ in range(64):
            tok = int(np.argmax(model.forward([tok], logits="last", gemm=False)[-1]))
        ts.append(time.perf_counter() - t)
    res["tg64"] = 64 / statistics.median(ts)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["kv_mib"] = model.kv.nbytes / 2**20 if hasattr(model, "kv") else 0.0
    return res


def bench_ref(path: str, threads: int, reps: int, python: str) -> dict | None:
    r = subprocess.run([python, "-c", REF_SCRIPT, path, str(threads), str(reps)], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"llama.cpp run failed: {r.stderr.strip()[-400:]}", file=sys.stderr)
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compare", action="store_true", help="also run llama-cpp-python and print ratios")
    ap.add_argument("--ref-python", default=sys.executable, help="interpreter that can import llama_cpp")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    size = os.path.getsize(a.model) / 2**20
    print(f"model: {a.model} ({size:.1f} MiB)")
    rows = []
    for th in [int(x) for x in a.threads.split(",")]:
        log(f"llamba, {th} thread(s)...")
        # each thread count in a fresh process so peak RSS and load time are per run
        r = subprocess.run([sys.executable, __file__, "--_one", a.model, str(th), str(a.reps)],
                           capture_output=False, stdout=subprocess.PIPE, text=True)
        mine = None
        for line in r.stdout.splitlines():
            if line.startswith("RESULT "):
                mine = json.loads(line[7:])
        ref = None
        if a.compare:
            log(f"llama.cpp, {th} thread(s)...")
            ref = bench_ref(a.model, th, a.reps, a.ref_python)
        rows.append((th, mine, ref))
    hdr = f"{'threads':>7} {'engine':>9} {'load s':>7} {'pp128':>8} {'pp512':>8} {'tg64':>8} {'peak RSS MiB':>13}"
    print(hdr)
    for th, mine, ref in rows:
        for name, r in (("llamba", mine), ("llama.cpp", ref)):
            if r:
                print(f"{th:>7} {name:>9} {r['load_s']:7.2f} {r['pp128']:8.1f} {r['pp512']:8.1f} {r['tg64']:8.1f} "
                      f"{r['peak_rss_mib']:13.0f}")
        if mine and ref:
            print(f"{th:>7} {'ratio':>9} {'':>7} {mine['pp128'] / ref['pp128']:7.2f}x {mine['pp512'] / ref['pp512']:7.2f}x "
                  f"{mine['tg64'] / ref['tg64']:7.2f}x")
    if mine:
        print(f"KV cache (n_ctx 1024): {rows[-1][1].get('kv_mib', 0):.1f} MiB; GGUF {size:.1f} MiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"threads": th, "llamba": m, "llama.cpp": r} for th, m, r in rows], f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_one":
        res = bench_llamba(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                           lambda m: print(m, file=sys.stderr, flush=True))
        print("RESULT " + json.dumps(res))
    else:
        main()
