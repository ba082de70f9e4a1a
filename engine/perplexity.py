"""`llamba perplexity`: perplexity over a text file as llama.cpp's llama-perplexity computes it, and KL divergence
of a model against saved logits of another (a base model or a better quantization).

Perplexity (llama-perplexity's `perplexity()`): the whole file is tokenized once (with BOS when the vocabulary adds
one), cut into n_chunk = n_tokens // n_ctx windows of n_ctx tokens; each window is evaluated from an empty cache
in batches of n_batch tokens, its first token replaced by BOS when the vocabulary adds one; only the second half
of the window is scored: the logits of positions first = n_ctx/2 .. n_ctx-2 against the tokens after them
(n_ctx - 1 - first tokens per window). PPL = exp(mean NLL); its error is ppl * sqrt(var(NLL) / (count - 1)).

KL divergence: `--kl-divergence-base FILE` runs the same windows and saves, for every scored position, the
model's top-k token ids and log-probabilities (k = 32 by default) plus the tokens (an .npz file; not llama.cpp's
full-vocabulary logits format). `--kl-divergence` then runs another model (same vocabulary) over the same tokens
and reports mean KLD(base || model) and top-1 agreement. With only the base's top-k kept, the KLD is computed over
the base's top-k tokens plus one "rest" bucket holding the remaining probability mass of each model
(sum_i p_i log(p_i/q_i) over top-k, + p_rest log(p_rest/q_rest)): a lower bound of the full-vocabulary KLD that
is exact when the base's top-k hold all its mass.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from llamba.errors import LlambaError

KLD_TOP_K = 32


def log_softmax_rows(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (what llama-perplexity's log_softmax computes per row)."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def windows(n_tokens: int, n_ctx: int, n_chunks: int | None = None) -> int:
    """Number of windows llama-perplexity evaluates."""
    n = n_tokens // n_ctx
    return n if n_chunks is None or n_chunks < 0 else min(n, n_chunks)


def window_logprobs(model, toks: list[int], n_ctx: int, n_batch: int, bos: int | None, on_rows):
    """Evaluate one window (`toks`, n_ctx ids) from an empty cache; `on_rows(j0, logprobs)` gets the log-softmax
    rows of positions j0.. for every batch that has positions >= n_ctx/2."""
    first = n_ctx // 2
    model.reset()
    feed = list(toks)
    if bos is not None:
        feed[0] = bos
    for j0 in range(0, n_ctx, n_batch):
        part = feed[j0:j0 + n_batch]
        want = j0 + len(part) > first
        lg = model.forward(part, logits="all" if want else "none", gemm=False)
        if want:
            lo = max(0, first - j0)
            on_rows(j0 + lo, log_softmax_rows(lg[lo:]))


class Result:
    def __init__(self):
        self.nll = 0.0
        self.nll2 = 0.0
        self.count = 0
        self.running: list[float] = []

    def add(self, v: np.ndarray):
        self.nll += float(v.sum())
        self.nll2 += float((v * v).sum())
        self.count += int(v.shape[0])

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count)

    @property
    def error(self) -> float:
        m = self.nll / self.count
        var = self.nll2 / self.count - m * m
        return math.sqrt(var / (self.count - 1)) * self.ppl if var > 0 and self.count > 1 else float("nan")


def perplexity(model, tokens: list[int], n_ctx: int, n_batch: int, bos: int | None, n_chunks: int | None = None,
               save_top_k: int = 0, out=None, progress: bool = True):
    """Perplexity of `model` (a llamba model: forward/reset) over `tokens` as llama-perplexity computes it.
    Returns (Result, saved) where saved holds per scored position the top-k ids/log-probs (save_top_k > 0)."""
    out = out or sys.stdout
    n_batch = min(n_batch, n_ctx)
    n_chunk = windows(len(tokens), n_ctx, n_chunks)
    if len(tokens) < 2 * n_ctx:
        raise LlambaError(f"the text tokenizes to {len(tokens)} tokens; at least {2 * n_ctx} (2 x n_ctx) are needed "
                          f"to compute perplexity with a context of {n_ctx}")
    first = n_ctx // 2
    res = Result()
    top_ids, top_lp = [], []
    t0 = time.perf_counter()
    for i in range(n_chunk):
        start = i * n_ctx
        win = tokens[start:start + n_ctx]

        def rows(p0, lp):
            # row r (position p0 + r) predicts win[p0 + r + 1]; the last position has no target
            n = min(lp.shape[0], n_ctx - 1 - p0)
            if n <= 0:
                return
            tgt = np.asarray(win[p0 + 1:p0 + 1 + n], dtype=np.int64)
            res.add(-lp[np.arange(n), tgt])
            if save_top_k:
                ids = np.argpartition(-lp[:n], save_top_k, axis=1)[:, :save_top_k]
                top_ids.append(ids.astype(np.int32))
                top_lp.append(np.take_along_axis(lp[:n], ids, axis=1).astype(np.float32))
        window_logprobs(model, win, n_ctx, n_batch, bos, rows)
        if i == 0 and progress:
            dt = time.perf_counter() - t0
            print(f"perplexity: {dt:.2f} seconds per pass - ETA {dt * n_chunk / 60:.2f} minutes", file=sys.stderr)
        res.running.append(res.ppl)
        print(f"[{i + 1}]{res.ppl:.4f},", end="", file=out, flush=True)
    print("", file=out)
    assert res.count == n_chunk * (n_ctx - 1 - first)
    saved = None
    if save_top_k:
        saved = {"ids": np.concatenate(top_ids), "logprobs": np.concatenate(top_lp)}
    return res, saved


def kl_divergence(model, base: dict, n_batch: int, out=None):
    """Mean KLD(base || model) over the base's scored positions (top-k + rest bucket, see the module docstring),
    its standard error, and top-1 agreement. base: the arrays saved by --kl-divergence-base."""
    out = out or sys.stdout
    tokens = [int(t) for t in base["tokens"]]
    n_ctx = int(base["n_ctx"])
    bos = int(base["bos"]) if int(base["bos"]) >= 0 else None
    n_chunk = int(base["n_chunk"])
    ids_all, lp_all = base["ids"], base["logprobs"]
    first = n_ctx // 2
    per = n_ctx - 1 - first
    klds, agree = [], []
    ppl = Result()
    for i in range(n_chunk):
        win = tokens[i * n_ctx:(i + 1) * n_ctx]
        b0 = i * per

        def rows(p0, lq):
            n = min(lq.shape[0], n_ctx - 1 - p0)
            if n <= 0:
                return
            k0 = b0 + p0 - first
            ids, lp = ids_all[k0:k0 + n].astype(np.int64), lp_all[k0:k0 + n].astype(np.float64)
            tgt = np.asarray(win[p0 + 1:p0 + 1 + n], dtype=np.int64)
            ppl.add(-lq[np.arange(n), tgt])
            klds.append(kld_topk(ids, lp, lq[:n]))
            agree.append(ids[np.arange(n), lp.argmax(axis=1)] == lq[:n].argmax(axis=1))
        window_logprobs(model, win, n_ctx, n_batch, bos, rows)
        k = np.concatenate(klds)
        print(f"[{i + 1}] KLD {k.mean():.6f},", end="", file=out, flush=True)
    print("", file=out)
    k = np.concatenate(klds)
    a = np.concatenate(agree)
    return {"kld_mean": float(k.mean()), "kld_err": float(k.std(ddof=1) / math.sqrt(k.size)) if k.size > 1 else 0.0,
            "kld_median": float(np.median(k)), "kld_max": float(k.max()), "top1": float(a.mean()),
            "top1_err": float(math.sqrt(a.mean() * (1 - a.mean()) / max(1, a.size - 1))), "n": int(k.size),
            "ppl": ppl.ppl, "ppl_err": ppl.error}


def kld_topk(ids: np.ndarray, lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """Per row: sum over the base's top-k of p (log p - log q) plus the rest bucket's term."""
    lq_k = np.take_along_axis(lq, ids, axis=1)
    p = np.exp(lp)
    kl = (p * (lp - lq_k)).sum(axis=1)
    p_rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(lq_k).sum(axis=1), 1e-30, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, 1e-30)) - np.log(q_rest)), 0.0)
    return np.maximum(kl + rest, 0.0)


# ---- command line
def add_parser(sub, add_model_args):
    p = sub.add_parser("perplexity", help="perplexity of a model over a text file (as llama-perplexity), KL divergence",
                       description="Perplexity over windows of n_ctx tokens, scoring the second half of each "
                                   "(llama.cpp's llama-perplexity). --kl-divergence-base saves the model's top-k "
                                   "log-probs; --kl-divergence compares another model/quantization against them.")
    add_model_args(p)
    p.add_argument("-f", "--file", required=False, help="text file (UTF-8)")
    p.add_argument("--chunks", type=int, default=-1, help="most windows to evaluate (-1: all)")
    p.add_argument("--kl-divergence-base", default=None, metavar="FILE",
                   help="save the model's top-k log-probs of every scored position to FILE (.npz)")
    p.add_argument("--kl-divergence", action="store_true",
                   help="compare the model with the logits saved in --kl-divergence-base FILE (-f not needed)")
    p.add_argument("--kl-top-k", type=int, default=KLD_TOP_K, help=f"top-k kept per position (default {KLD_TOP_K})")
    return p


def main(a) -> int:
    from llamba.llama import Llama
    n_ctx = a.ctx_size
    if a.kl_divergence:
        if not a.kl_divergence_base:
            raise LlambaError("--kl-divergence needs --kl-divergence-base FILE (the saved base logits)")
        try:
            base = dict(np.load(a.kl_divergence_base))
        except (OSError, ValueError) as e:
            raise LlambaError(f"cannot read {a.kl_divergence_base}: {e}") from None
        n_ctx = int(base["n_ctx"])
        llm = Llama(a.model, n_ctx=n_ctx, n_threads=a.threads, verbose=a.verbose, n_batch=a.batch_size)
        if llm.n_vocab() != int(base["n_vocab"]):
            raise LlambaError(f"the model has {llm.n_vocab()} tokens but the base logits {int(base['n_vocab'])}")
        r = kl_divergence(llm.model, base, min(a.batch_size, n_ctx))
        print(f"Final estimate: PPL = {r['ppl']:.4f} +/- {r['ppl_err']:.5f}")
        print(f"Mean    KLD: {r['kld_mean']:10.6f} +/- {r['kld_err']:10.6f}   (over the base's top-"
              f"{base['ids'].shape[1]} + rest, {r['n']} positions)")
        print(f"Median  KLD: {r['kld_median']:10.6f}")
        print(f"Maximum KLD: {r['kld_max']:10.6f}")
        print(f"Same top p: {100 * r['top1']:6.3f} +/- {100 * r['top1_err']:5.3f} %")
        return 0
    if not a.file:
        raise LlambaError("perplexity needs a text file: -f FILE")
    try:
        with open(a.file, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        raise LlambaError(f"cannot read {a.file}: {e.strerror}") from None
    llm = Llama(a.model, n_ctx=n_ctx, n_threads=a.threads, verbose=a.verbose, n_batch=a.batch_size)
    n_ctx = llm.n_ctx()
    tok = llm.tokenizer
    tokens = tok.encode(text, add_bos=True, special=False)
    bos = tok.bos_id if tok.add_bos else None
    n_chunk = windows(len(tokens), n_ctx, a.chunks)
    print(f"perplexity: {len(tokens)} tokens, calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, "
          f"batch_size={min(a.batch_size, n_ctx)}", file=sys.stderr)
    k = max(1, int(a.kl_top_k)) if a.kl_divergence_base else 0
    res, saved = perplexity(llm.model, tokens, n_ctx, a.batch_size, bos, a.chunks, save_top_k=k)
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.error:.5f}")
    if saved is not None:
        with open(a.kl_divergence_base, "wb") as f:
            np.savez(f, tokens=np.asarray(tokens[:n_chunk * n_ctx], dtype=np.int32),
                     n_ctx=n_ctx, n_chunk=n_chunk, n_vocab=llm.n_vocab(), bos=-1 if bos is None else bos, **saved)
        print(f"perplexity: saved top-{k} log-probs of {saved['ids'].shape[0]} positions to {a.kl_divergence_base}",
              file=sys.stderr)
    return 0
