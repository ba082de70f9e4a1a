"""Training data for a sidecar MTP head, made by the trunk itself (self-distillation, no downloads).

1. The trunk generates continuations of a built-in, varied set of seed prompts (chat turns through the model's chat
   template, code, prose, lists; plus `--data FILE` text cut into passages) through llamba's batching engine: one
   greedy pass over all of them (greedy decoding is what the verifier checks drafts against), then sampled passes
   (temperature 0.7 / 1.0, new seeds each pass) for as long as the data budget lasts.
2. llamba runs the trunk over every sequence once more with keep_hidden: per position p its post-norm hidden h[p]
   and the top-k of its log-probabilities (the distribution of token p+1).

A head row at position p pairs token t[p] with h[p-1] and is trained towards the trunk's distribution at row p
(the token after t[p]), which is what the verifier accepts against.
"""
from __future__ import annotations

import sys
import time

import numpy as np

TOPICS = ["the water cycle", "photosynthesis", "black holes", "the French Revolution", "machine learning",
          "compound interest", "the immune system", "volcanoes", "the history of the internet", "climate change",
          "how vaccines work", "the Roman Empire", "plate tectonics", "electric cars", "the stock market",
          "healthy sleep", "learning a new language", "the solar system", "recycling", "ancient Egypt",
          "how bread is made", "public speaking", "time management", "the human brain", "renewable energy",
          "the Great Wall of China", "honeybees", "coffee", "the Olympic Games", "chess openings"]
CHAT_TEMPLATES = ["Explain {t} to a ten-year-old.", "What are three interesting facts about {t}?",
                  "Write a short paragraph about {t}.", "Give me a list of five tips related to {t}.",
                  "What is the most common misconception about {t}?", "Summarize {t} in a few sentences."]
CODE_PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                "import os\nimport sys\n\n\ndef main():\n",
                "class Stack:\n    \"\"\"A simple stack.\"\"\"\n\n    def __init__(self):\n",
                "def is_prime(n: int) -> bool:\n",
                "# Sort a list of dictionaries by a key\ndef sort_records(records, key):\n",
                "function debounce(fn, ms) {\n",
                "def read_csv(path):\n    \"\"\"Read a CSV file into a list of rows.\"\"\"\n",
                "SELECT name, COUNT(*) AS n\nFROM orders\n"]
CODE_CHAT = ["Write a Python function that reverses a string.", "Write a Python function to check for palindromes.",
             "How do I read a JSON file in Python?", "Write a bash script that counts lines in all .txt files.",
             "Explain what a hash map is, with a short Python example.",
             "Write a Python class for a bank account with deposit and withdraw methods."]
PROSE = ["Once upon a time, in a small village by the sea,", "The history of science is full of surprises.",
         "It was a cold morning in November when", "The most important thing about writing is",
         "In the beginning of the twentieth century,", "My favourite recipe for a quick dinner is",
         "The city woke up slowly, as it always did on Sundays.", "Dear diary, today was"]
LISTS = ["Shopping list:\n1.", "Top 10 programming languages:\n1.", "Steps to plant a tree:\n1.",
         "Things to pack for a beach trip:\n-", "The planets of the solar system:\n1."]
# held out: never used for training (chat and prose), for the acceptance printed per epoch and at the end
HELD_OUT_CHAT = ["What makes a good friend?", "How do airplanes stay in the air?", "Describe a day in the life of "
                 "a lighthouse keeper.", "Why is the sky blue?", "What should I know before adopting a cat?",
                 "How does a refrigerator work?"]
HELD_OUT_PROSE = ["The old library had a secret that nobody", "Scientists have recently discovered that",
                  "When the train finally arrived at the station,", "The best way to start a morning is"]


def seed_prompts(llm) -> list[tuple[str, list[int]]]:
    """(kind, token ids) for the training seed prompts: chat through the chat template when the model has one."""
    out = []
    chat = _chat_ok(llm)
    for i, t in enumerate(TOPICS):
        for j, tmpl in enumerate(CHAT_TEMPLATES):
            out.append(("chat", _chat(llm, tmpl.format(t=t)) if chat else llm.tokenize(tmpl.format(t=t) + "\n")))
    for c in CODE_CHAT:
        out.append(("chat", _chat(llm, c) if chat else llm.tokenize(c + "\n")))
    for s in CODE_PROMPTS:
        out.append(("code", llm.tokenize(s)))
    for s in PROSE:
        out.append(("prose", llm.tokenize(s)))
    for s in LISTS:
        out.append(("list", llm.tokenize(s)))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def held_out_prompts(llm) -> list[tuple[str, list[int]]]:
    chat = _chat_ok(llm)
    out = [("chat", _chat(llm, c) if chat else llm.tokenize(c + "\n")) for c in HELD_OUT_CHAT]
    out += [("prose", llm.tokenize(s)) for s in HELD_OUT_PROSE]
    return out


def _chat_ok(llm) -> bool:
    try:
        llm.get_chat_template()
        return True
    except Exception:  # noqa: BLE001 - no template: plain prompts
        return False


def _chat(llm, text: str) -> list[int]:
    return list(llm.apply_chat_template([{"role": "user", "content": text}], tokenize=True))


def text_passages(llm, path: str, n_tok: int = 256) -> list[list[int]]:
    """--data FILE: the text tokenized and cut into passages of n_tok tokens (used as training sequences as is,
    and as prompts for continuations)."""
    with open(path, "rb") as f:
        ids = llm.tokenize(f.read().decode("utf-8", errors="replace"))
    return [ids[i:i + n_tok] for i in range(0, len(ids) - 16, n_tok)]


def generate(llm, prompts, seconds: float, max_tokens: int, n_parallel: int = 8, progress=None,
             token_budget: int = 0, temperature: float | None = None, seed: int = 1000) -> list[list[int]]:
    """Continuations of `prompts` (greedy and sampled, alternating by round, or all at `temperature`) until
    `seconds` have passed or the prompts run out (or token_budget tokens); returns prompt + continuation per
    sequence."""
    seqs = []
    t0 = time.perf_counter()
    n_tok = 0
    i = 0
    rnd = 0
    while i < len(prompts) and time.perf_counter() - t0 < seconds and (not token_budget or n_tok < token_budget):
        batch = [p for _, p in prompts[i:i + n_parallel]]
        i += n_parallel
        temp = temperature if temperature is not None else (0.0 if rnd % 2 == 0 else 0.8)
        outs = llm.generate_batch(batch, max_tokens=max_tokens, temperature=temp, top_k=40, top_p=0.95,
                                  min_p=0.05, seed=seed + rnd, n_parallel=n_parallel)
        for p, o in zip(batch, outs):
            seqs.append(list(p) + list(o))
            n_tok += len(o)
        rnd += 1
        if progress:
            progress(n_tok, time.perf_counter() - t0)
    return seqs


def teacher(llm, seqs, top_k: int, n_batch: int = 128, progress=None, seconds: float = 0.0):
    """Per sequence: (tokens int32 (T,), trunk post-norm hidden float32 (T, E), top-k ids int32 (T, k), top-k
    log-probs float32 (T, k)) from one forward of the trunk over it; with `seconds`, the sequences done when that
    much time has passed."""
    model = llm.model
    out = []
    t0 = time.perf_counter()
    done = 0
    total = sum(len(s) for s in seqs)
    for s in seqs:
        if seconds and time.perf_counter() - t0 > seconds:  # the time budget of this phase is spent
            break
        model.reset()
        hs, ids, lps = [], [], []
        for j in range(0, len(s), n_batch):
            lg = model.forward(s[j:j + n_batch], logits="all", keep_hidden=True, gemm=False)
            hs.append(np.array(model.hidden, dtype=np.float32))
            lg = np.asarray(lg, dtype=np.float32)
            m = lg.max(axis=1, keepdims=True)
            lse = m + np.log(np.exp(lg - m).sum(axis=1, keepdims=True))
            k = min(top_k, lg.shape[1] - 1)
            top = np.argpartition(-lg, k, axis=1)[:, :k]
            ids.append(top.astype(np.int32))
            lps.append((np.take_along_axis(lg, top, axis=1) - lse).astype(np.float32))
        out.append((np.asarray(s, dtype=np.int32), np.concatenate(hs), np.concatenate(ids), np.concatenate(lps)))
        done += len(s)
        if progress:
            progress(done, total, time.perf_counter() - t0)
    model.reset()
    return out


def bar(prefix: str, frac: float, extra: str = "", width: int = 30):
    frac = min(1.0, max(0.0, frac))
    n = int(round(frac * width))
    sys.stderr.write(f"\r{prefix} [{'#' * n}{'.' * (width - n)}] {100 * frac:5.1f}% {extra}   ")
    sys.stderr.flush()
