"""Multiple-choice log-likelihoods through `llamba serve` vs the library vs llama.cpp (issue 16).

    python bench/lm_eval_check.py -m MODEL.gguf [--lm-eval /work/lmeval/venv/bin/lm_eval] [--llama-server URL]
                                  [--llama-server-bin PATH] [--workdir /work/lmeval] [--json out.json]

A 40-question, 4-choice task (capitals, arithmetic, colors, animals, everyday facts; the data is in this file) is
scored four ways, all with lm-evaluation-harness's request layout: context "Question: Q\\nAnswer:", continuation
" " + choice, tokens = tok(context + continuation) split at len(tok(context)) (no special tokens: lm-eval's remote
tokenizer calls /tokenize with add_special_tokens=false, so no BOS even on Gemma), the log-likelihood of a choice
= the raw sum of log p(continuation token | everything before it), the prediction = the argmax (lm-eval's `acc`):

  lm-eval     lm-evaluation-harness itself (`lm_eval --model local-completions --model_args model=M,base_url=
              http://HOST:PORT/v1/completions,tokenizer_backend=remote,tokenized_requests=True ...`), run from its
              own virtualenv against `llamba serve`; per-choice log-likelihoods read from --log_samples
  server      the same flow done here: /tokenize, then POST /v1/completions {prompt: ids, echo: true, logprobs: 1,
              max_tokens: 1}, sum(choices[0].logprobs.token_logprobs[ctxlen:-1]) (exactly lm-eval's parse_logprobs)
  library     `Llama(path, logits_all=True).eval_logits(ids)`: log-softmax (float64) of the rows before the
              continuation tokens, summed
  llama.cpp   llama-server (`/completion`, token-id prompt, n_predict 1, n_probs 1, temperature 0,
              logit_bias {t: +100} so the sampled token is t): completion_probabilities[0].logprob is then the
              log-softmax of t over the raw logits (llama-server computes n_probs from the logits before the
              samplers, logit_bias included) — one request per continuation token, prompt cache on. llama-server
              has no prompt log-probabilities (`echo` is refused: "Only no echo is supported"), hence this.
              With --llama-server-bin it is scored once per --flash-attn mode (default: -fa on and -fa off),
              so llama.cpp's own spread between its two attention paths is printed beside the others.

Prints the four accuracies and how many of the 160 choices differ by more than 1e-3 between each pair.
The lm-eval task (YAML + JSONL) is written under --workdir/tasks; the exact lm_eval command is printed.
"""
from __future__ import annotations

import argparse
import glob
import http.client
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time

# (question, choices, index of the right one)
QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("What is the capital of Japan?", ["Beijing", "Seoul", "Tokyo", "Bangkok"], 2),
    ("What is the capital of Italy?", ["Rome", "Milan", "Venice", "Naples"], 0),
    ("What is the capital of Germany?", ["Munich", "Berlin", "Hamburg", "Vienna"], 1),
    ("What is the capital of Spain?", ["Lisbon", "Barcelona", "Madrid", "Seville"], 2),
    ("What is the capital of the United Kingdom?", ["Dublin", "Edinburgh", "Paris", "London"], 3),
    ("What is the capital of Russia?", ["Moscow", "Kyiv", "Warsaw", "Minsk"], 0),
    ("What is the capital of Egypt?", ["Nairobi", "Cairo", "Tunis", "Rabat"], 1),
    ("What is the capital of Canada?", ["Toronto", "Vancouver", "Ottawa", "Montreal"], 2),
    ("What is the capital of Australia?", ["Sydney", "Canberra", "Melbourne", "Perth"], 1),
    ("What is 2 + 2?", ["3", "4", "5", "6"], 1),
    ("What is 3 + 5?", ["8", "7", "9", "6"], 0),
    ("What is 10 - 4?", ["5", "7", "6", "4"], 2),
    ("What is 6 times 7?", ["36", "48", "40", "42"], 3),
    ("What is 9 + 1?", ["10", "11", "19", "91"], 0),
    ("What is 12 divided by 3?", ["3", "4", "6", "9"], 1),
    ("What is 5 times 5?", ["10", "20", "25", "55"], 2),
    ("What is 100 - 1?", ["98", "101", "90", "99"], 3),
    ("What is 7 + 8?", ["15", "14", "16", "13"], 0),
    ("What is 2 times 10?", ["12", "20", "22", "210"], 1),
    ("What color is the sky on a clear day?", ["green", "red", "blue", "brown"], 2),
    ("What color is grass?", ["green", "purple", "orange", "white"], 0),
    ("What color is snow?", ["black", "white", "red", "blue"], 1),
    ("What color is a ripe banana?", ["blue", "purple", "black", "yellow"], 3),
    ("What color is blood?", ["red", "green", "blue", "yellow"], 0),
    ("What color do you get by mixing blue and yellow?", ["red", "green", "orange", "pink"], 1),
    ("What color is coal?", ["white", "yellow", "black", "pink"], 2),
    ("What color is a carrot?", ["blue", "orange", "gray", "white"], 1),
    ("Which animal says moo?", ["cow", "cat", "dog", "duck"], 0),
    ("Which animal barks?", ["cat", "fish", "dog", "horse"], 2),
    ("Which animal has a very long neck?", ["giraffe", "pig", "mouse", "frog"], 0),
    ("Which animal is known as the king of the jungle?", ["rabbit", "lion", "sheep", "goat"], 1),
    ("Which animal can fly?", ["elephant", "snake", "whale", "bird"], 3),
    ("Which animal lives in water and has gills?", ["fish", "dog", "cow", "lion"], 0),
    ("Which animal has a trunk?", ["tiger", "zebra", "elephant", "bear"], 2),
    ("Which animal makes honey?", ["ant", "bee", "spider", "fly"], 1),
    ("How many days are in a week?", ["five", "six", "seven", "eight"], 2),
    ("How many legs does a spider have?", ["four", "six", "ten", "eight"], 3),
    ("What do cows drink?", ["water", "milk", "juice", "coffee"], 0),
    ("Which planet do we live on?", ["Mars", "Earth", "Venus", "Jupiter"], 1),
]
TASK = "llamba_mc40"
EPS = 1e-3


def write_task(workdir: str) -> str:
    tdir = os.path.join(workdir, "tasks")
    os.makedirs(tdir, exist_ok=True)
    data = os.path.join(tdir, f"{TASK}.jsonl")
    with open(data, "w") as f:
        for q, ch, a in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": ch, "answer": a}) + "\n")
    yml = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    with open(os.path.join(tdir, f"{TASK}.yaml"), "w") as f:
        f.write(yml)
    return tdir


def requests_text() -> list[tuple[int, int, str, str]]:
    """(question, choice, context, continuation) as lm-eval builds them (trailing spaces moved, as _encode_pair)."""
    out = []
    for qi, (q, ch, _) in enumerate(QUESTIONS):
        for ci, c in enumerate(ch):
            ctx, cont = f"Question: {q}\nAnswer:", " " + c
            n = len(ctx) - len(ctx.rstrip())
            if n:
                ctx, cont = ctx[:-n], ctx[-n:] + cont
            out.append((qi, ci, ctx, cont))
    return out


# ---------------------------------------------------------------- HTTP

def post(base: str, path: str, body: dict, timeout=300):
    host, port = base.split("//", 1)[1].split("/")[0].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"POST {path} -> {r.status}: {data[:300]!r}")
        return json.loads(data)
    finally:
        c.close()


def get(base: str, path: str, timeout=10):
    host, port = base.split("//", 1)[1].split("/")[0].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], base: str, log_path: str, health="/health", timeout=300):
    print(f"starting: {shlex.join(cmd)}", file=sys.stderr)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited with {proc.returncode}; see {log_path}")
        try:
            if get(base, health, 2)[0] == 200:
                return proc
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{cmd[0]} not ready after {timeout} s")


def stop(proc):
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------- the four scorers

def encode_pairs(base: str) -> list[dict]:
    """lm-eval's _encode_pair through the server's /tokenize (vLLM shape, add_special_tokens false)."""
    cache = {}

    def enc(s):
        if s not in cache:
            cache[s] = post(base, "/tokenize", {"prompt": s, "add_special_tokens": False})["tokens"]
        return cache[s]

    out = []
    for qi, ci, ctx, cont in requests_text():
        whole, c = enc(ctx + cont), enc(ctx)
        out.append({"q": qi, "c": ci, "ctx": c, "cont": whole[len(c):],
                    "boundary_ok": whole[:len(c)] == c})
    return out


def score_server(base: str, pairs: list[dict]) -> list[float]:
    res = []
    for p in pairs:
        toks = p["ctx"] + p["cont"]
        d = post(base, "/v1/completions", {"prompt": toks, "echo": True, "logprobs": 1, "max_tokens": 1,
                                           "temperature": 0, "seed": 1234})
        lp = d["choices"][0]["logprobs"]["token_logprobs"]
        if len(lp) != len(toks) + 1:
            raise RuntimeError(f"token_logprobs has {len(lp)} entries for {len(toks)} prompt tokens + 1")
        res.append(float(sum(lp[len(p["ctx"]):-1])))
    return res


def score_library(model: str, pairs: list[dict], threads: int) -> list[float]:
    import numpy as np
    from llamba import Llama
    llm = Llama(model, n_ctx=512, n_threads=threads, logits_all=True, verbose=False)
    res = []
    for p in pairs:
        toks = p["ctx"] + p["cont"]
        logits = np.asarray(llm.eval_logits(toks), dtype=np.float64)
        s = 0.0
        for j, t in enumerate(p["cont"]):
            row = logits[len(p["ctx"]) + j - 1]
            m = row.max()
            s += row[t] - m - math.log(np.exp(row - m).sum())
        res.append(float(s))
    return res


def score_llamacpp(base: str, pairs: list[dict]) -> list[float]:
    res = []
    for p in pairs:
        s = 0.0
        for j, t in enumerate(p["cont"]):
            prompt = p["ctx"] + p["cont"][:j]
            d = post(base, "/completion", {"prompt": prompt, "n_predict": 1, "n_probs": 1, "temperature": 0,
                                          "logit_bias": [[t, 100.0]], "cache_prompt": True,
                                          "post_sampling_probs": False, "samplers": ["temperature"]})
            cp = d["completion_probabilities"][0]
            if cp.get("id") != t:
                raise RuntimeError(f"llama-server sampled {cp.get('id')} instead of the forced token {t}")
            lp = cp["logprob"] if "logprob" in cp else math.log(cp["prob"])
            s += float(lp)
        res.append(s)
    return res


def run_lm_eval(lm_eval: str, base: str, tdir: str, outdir: str, alias: str) -> tuple[list[str], list | None, dict]:
    cmd = [lm_eval, "--model", "local-completions",
           "--model_args", f"model={alias},base_url={base}/v1/completions,tokenizer_backend=remote,"
                           f"tokenized_requests=True,num_concurrent=1,max_retries=1,timeout=300",
           "--tasks", TASK, "--include_path", tdir, "--output_path", outdir, "--log_samples", "--batch_size", "1"]
    print(f"running: {shlex.join(cmd)}", file=sys.stderr)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OPENAI_API_KEY="none")
    env.pop("PYTHONPATH", None)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    info = {"returncode": r.returncode, "stderr_tail": r.stderr[-3000:], "stdout_tail": r.stdout[-3000:]}
    if r.returncode != 0:
        return cmd, None, info
    files = sorted(glob.glob(os.path.join(outdir, "**", f"samples_{TASK}_*.jsonl"), recursive=True),
                   key=os.path.getmtime)
    res_files = sorted(glob.glob(os.path.join(outdir, "**", "results_*.json"), recursive=True), key=os.path.getmtime)
    if res_files:
        with open(res_files[-1]) as f:
            info["results"] = json.load(f)["results"].get(TASK)
    if not files:
        return cmd, None, info
    per = [[None] * 4 for _ in QUESTIONS]
    with open(files[-1]) as f:
        for line in f:
            s = json.loads(line)
            qi = int(s["doc_id"])
            for ci, fr in enumerate(s["filtered_resps"]):
                per[qi][ci] = float(fr[0])
    return cmd, per, info


# ---------------------------------------------------------------- main

def acc(ll: list[float]) -> float:
    right = 0
    for qi, (_, _, a) in enumerate(QUESTIONS):
        row = ll[4 * qi:4 * qi + 4]
        right += int(max(range(4), key=lambda i: row[i]) == a)
    return right / len(QUESTIONS)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="GGUF file (the library scores it; llamba serve runs it)")
    ap.add_argument("--url", help="a running llamba serve on this model instead of starting one")
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("--workdir", default="/work/lmeval")
    ap.add_argument("--lm-eval", default="/work/lmeval/venv/bin/lm_eval", help="lm_eval executable ('' to skip)")
    ap.add_argument("--llama-server", help="URL of a llama-server already serving this model")
    ap.add_argument("--llama-server-bin", help="start this llama-server on the model (when no --llama-server)")
    ap.add_argument("--flash-attn", default="on,off",
                    help="llama-server -fa modes to score with --llama-server-bin, comma-separated (default on,off)")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    tdir = write_task(a.workdir)
    name = os.path.basename(a.model)
    procs = []
    out: dict = {"model": a.model, "questions": len(QUESTIONS), "choices": 4 * len(QUESTIONS)}
    try:
        if a.url:
            base = a.url.rstrip("/")
        else:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "llamba.cli", "serve", "-m", a.model, "-t", str(a.threads), "-np", "4",
                   "-c", "4096", "--port", str(port), "--alias", name]
            procs.append(start(cmd, base, os.path.join(a.workdir, f"llamba_serve_{name}.log")))
            out["llamba_serve"] = shlex.join(cmd)
        pairs = encode_pairs(base)
        out["boundary_mismatches"] = sum(not p["boundary_ok"] for p in pairs)
        out["bos_in_requests"] = False
        scores = {}
        t0 = time.time()
        scores["server"] = score_server(base, pairs)
        out["server_seconds"] = round(time.time() - t0, 1)
        if a.lm_eval and os.path.exists(a.lm_eval):
            outdir = tempfile.mkdtemp(prefix="lmeval_out_", dir=a.workdir)
            t0 = time.time()
            cmd, per, info = run_lm_eval(a.lm_eval, base, tdir, outdir, name)
            out["lm_eval_command"] = shlex.join(cmd)
            out["lm_eval_seconds"] = round(time.time() - t0, 1)
            out["lm_eval_results"] = info.get("results")
            if per is None:
                out["lm_eval_error"] = info
                print(f"lm-eval failed (rc {info['returncode']}):\n{info['stderr_tail']}", file=sys.stderr)
            else:
                scores["lm-eval"] = [v for row in per for v in row]
        t0 = time.time()
        scores["library"] = score_library(a.model, pairs, a.threads)
        out["library_seconds"] = round(time.time() - t0, 1)
        # llama.cpp's reference: a running llama-server (--llama-server), or one started per flash-attention mode
        # (--llama-server-bin): its two attention paths round differently, and the gap between them is the
        # spread within which two correct engines' log-likelihoods can be expected to agree.
        targets = []
        if a.llama_server:
            targets.append(("llama.cpp", a.llama_server, None))
        elif a.llama_server_bin:
            for fa in a.flash_attn.split(","):
                targets.append(("llama.cpp" if fa == "auto" else f"llama.cpp-fa-{fa}", None, fa))
        for label, lbase, fa in targets:
            if lbase is None:
                port = free_port()
                lbase = f"http://127.0.0.1:{port}"
                cmd = [a.llama_server_bin, "-m", a.model, "-t", str(a.threads), "-c", "2048", "-np", "1",
                       "-fa", fa, "--port", str(port), "--host", "127.0.0.1"]
                proc = start(cmd, lbase, os.path.join(a.workdir, f"llama_server_{name}_fa-{fa}.log"))
                procs.append(proc)
                out.setdefault("llama_server", {})[label] = shlex.join(cmd)
            else:
                proc = None
            t0 = time.time()
            try:
                scores[label] = score_llamacpp(lbase, pairs)
            except (RuntimeError, OSError, KeyError, http.client.HTTPException) as e:
                out.setdefault("llama_cpp_error", {})[label] = f"{type(e).__name__}: {e}"
            out.setdefault("llama_cpp_seconds", {})[label] = round(time.time() - t0, 1)
            if proc is not None:
                stop(proc)
                procs.remove(proc)
    finally:
        for p in procs:
            stop(p)
    out["accuracy"] = {k: acc(v) for k, v in scores.items()}
    out["exact_zero_loglik_choices"] = {k: sum(1 for x in v if x == 0.0) for k, v in scores.items()}
    diffs = {}
    ks = list(scores)
    for i in range(len(ks)):
        for j in range(i + 1, len(ks)):
            d = [abs(x - y) for x, y in zip(scores[ks[i]], scores[ks[j]])]
            diffs[f"{ks[i]} vs {ks[j]}"] = {"over_1e-3": sum(x > EPS for x in d), "max_abs": max(d),
                                            "same_prediction": sum(
                                                max(range(4), key=lambda c: scores[ks[i]][4 * q + c])
                                                == max(range(4), key=lambda c: scores[ks[j]][4 * q + c])
                                                for q in range(len(QUESTIONS)))}
    out["differences"] = diffs
    out["loglik"] = scores
    print(f"\n{name}: {len(QUESTIONS)} questions x 4 choices (no BOS in the requests, as lm-eval's remote tokenizer)")
    if "lm_eval_command" in out:
        print(f"  lm-eval: {out['lm_eval_command']}")
        print(f"  lm-eval's own result: {out.get('lm_eval_results')}")
    for k, v in out["accuracy"].items():
        print(f"  acc via {k:<10} {v:.3f}   (choices scored exactly 0.0: {out['exact_zero_loglik_choices'][k]})")
    for k, v in diffs.items():
        print(f"  {k:<24} |diff| > 1e-3: {v['over_1e-3']:>3} of {len(pairs)}   max |diff| {v['max_abs']:.2e}   "
              f"same prediction {v['same_prediction']}/{len(QUESTIONS)}")
    if out.get("llama_cpp_error"):
        print(f"  llama.cpp errors: {out['llama_cpp_error']}")
    print(f"  context/continuation token boundary mismatches (tok(ctx) not a prefix of tok(ctx+cont)): "
          f"{out['boundary_mismatches']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
