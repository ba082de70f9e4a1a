"""Peak memory (RSS) of llamba, optionally side by side with llama.cpp (llama-cpp-python), on a GGUF file.

    python bench/bench_memory.py -m MODEL.gguf [--compare --ref-python PATH]
    python bench/bench_memory.py --synthetic 1.1 --vocab-from SmolLM2.gguf [--type q8_0] [--compare ...]

Each engine runs in a fresh process that loads the model (n_ctx 1024), processes a 512-token prompt and decodes
32 tokens. Printed per engine: the runtime floor (RSS once the engine is imported and its kernel runtime is
started, before any model is opened: for llamba that includes Numba/LLVM and one loaded kernel, with LLVM's code
pages handed back as `Llama` does after loading; for llama.cpp libllama and its backend), the peak RSS of the whole process (ru_maxrss), peak minus floor, the KV cache size,
and the memory target 1.2 x GGUF size + KV cache.

`--synthetic GB` writes a llama-architecture GGUF of about that many GB with random weights (Q8_0 or Q4_0,
TinyLlama-like shapes scaled in depth) and the vocabulary of `--vocab-from`, to see how the figures scale with
the model size; the text it generates is noise, only the memory is of interest.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

_RSS_HELPER = r"""
def _rss():
    for l in open('/proc/self/status'):
        if l.startswith('VmRSS'):
            return int(l.split()[1]) / 1024
"""

LLAMBA_SCRIPT = _RSS_HELPER + r"""
import json, resource, sys
import numpy as np
import llamba
from llamba.kernels import ops
ops.rms_norm(np.ones((1, 8), np.float32), np.ones(8, np.float32), 1e-6, np.empty((1, 8), np.float32))
from llamba.kernels._jit import release_llvm_pages
release_llvm_pages()  # as Llama does after loading a model
floor = _rss()
from llamba import Llama
llm = Llama(sys.argv[1], n_ctx=1024, n_threads=int(sys.argv[2]), verbose=False)
m = llm.model
rng = np.random.default_rng(0)
nv = llm.n_vocab()
lg = m.forward(rng.integers(100, nv - 100, 512), logits="last")
tok = int(np.argmax(lg[-1]))
for _ in range(32):
    tok = int(np.argmax(m.forward([tok], logits="last", gemm=False)[-1]))
print("RESULT " + json.dumps({"floor": floor, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "kv": m.kv.nbytes / 2**20}))
"""

REF_SCRIPT = _RSS_HELPER + r"""
import json, resource, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
llama_cpp.llama_backend_init()
floor = _rss()
llm = Llama(sys.argv[1], n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=int(sys.argv[2]),
            n_threads_batch=int(sys.argv[2]), flash_attn=True, verbose=False, seed=0)
rng = np.random.default_rng(0)
nv = llm.n_vocab()
llm.eval([int(t) for t in rng.integers(100, nv - 100, 512)])
for _ in range(32):
    llm.eval([int(rng.integers(100, nv - 100))])  # the token does not matter for memory
print("RESULT " + json.dumps({"floor": floor, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(python: str, script: str, path: str, threads: int) -> dict | None:
    r = subprocess.run([python, "-c", script, path, str(threads)], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"run failed: {r.stderr.strip()[-600:]}", file=sys.stderr)
    return None


# ---------------------------------------------------------------- synthetic model

def _random_blocks(rng, rows: int, cols: int, qtype: str) -> np.ndarray:
    """Random quantized rows (uint8, rows x bytes) with small finite fp16 scales."""
    nb = cols // 32
    bb = 34 if qtype == "q8_0" else 18
    a = rng.integers(0, 256, size=(rows, nb, bb), dtype=np.uint8)
    a[:, :, 0:2] = np.frombuffer(np.float16(0.004 if qtype == "q8_0" else 0.02).tobytes(), np.uint8)
    return a.reshape(rows, nb * bb)


def write_synthetic(out: str, gb: float, vocab_from: str, qtype: str, log) -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q
    src = gguf.GGUFReader(vocab_from)
    tokens = src.fields["tokenizer.ggml.tokens"].contents()
    nv = len(tokens)
    E, F, H, Hkv = 2048, 5632, 32, 4
    hd = E // H
    bpe = (34 if qtype == "q8_0" else 18) / 32
    per_layer = (2 * E * E + 2 * E * Hkv * hd + 3 * E * F) * bpe
    L = max(1, int(round((gb * 1e9 - nv * E * bpe) / per_layer)))
    log(f"writing {out}: llama, {L} layers, hidden {E}, ffn {F}, vocab {nv}, {qtype}")
    w = gguf.GGUFWriter(out, "llama")
    w.add_name("synthetic-llama")
    w.add_context_length(2048)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(7 if qtype == "q8_0" else 2)
    for key, field in src.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        v = field.contents()
        t = field.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            w.add_array(key, v)
        elif t == gguf.GGUFValueType.STRING:
            w.add_string(key, v)
        elif t == gguf.GGUFValueType.BOOL:
            w.add_bool(key, v)
        else:
            w.add_uint32(key, int(v))
    rng = np.random.default_rng(0)
    qt = Q.Q8_0 if qtype == "q8_0" else Q.Q4_0
    w.add_tensor("token_embd.weight", _random_blocks(rng, nv, E, qtype), raw_dtype=qt)
    w.add_tensor("output_norm.weight", np.ones(E, np.float32))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(E, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(E, np.float32))
        for name, rows, cols in (("attn_q", E, E), ("attn_k", Hkv * hd, E), ("attn_v", Hkv * hd, E),
                                 ("attn_output", E, E), ("ffn_gate", F, E), ("ffn_up", F, E), ("ffn_down", E, F)):
            w.add_tensor(p + name + ".weight", _random_blocks(rng, rows, cols, qtype), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model")
    ap.add_argument("--synthetic", type=float, metavar="GB", help="write and measure a random llama GGUF this big")
    ap.add_argument("--vocab-from", help="GGUF whose vocabulary the synthetic model uses")
    ap.add_argument("--type", default="q8_0", choices=("q8_0", "q4_0"), help="synthetic weight type")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", action="store_true", help="also run llama-cpp-python")
    ap.add_argument("--ref-python", default=sys.executable, help="interpreter that can import llama_cpp")
    a = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    tmp = None
    path = a.model
    if a.synthetic:
        if not a.vocab_from:
            ap.error("--synthetic needs --vocab-from MODEL.gguf")
        tmp = tempfile.mkdtemp(prefix="llamba-mem-")
        path = os.path.join(tmp, "synthetic.gguf")
        write_synthetic(path, a.synthetic, a.vocab_from, a.type, log)
    elif not path:
        ap.error("give -m MODEL.gguf or --synthetic GB")
    try:
        size = os.path.getsize(path) / 2**20
        print(f"model: {path} ({size:.1f} MiB), threads {a.threads}, n_ctx 1024, pp512 + 32 decode steps")
        log("  llamba ...")
        mine = run_child(sys.executable, LLAMBA_SCRIPT, path, a.threads)
        ref = None
        if a.compare:
            log("  llama.cpp ...")
            ref = run_child(a.ref_python, REF_SCRIPT, path, a.threads)
        if mine is None:
            return 1
        kv = mine["kv"]
        limit = 1.2 * size + kv
        print(f"KV cache {kv:.1f} MiB; target 1.2 x GGUF + KV = {limit:.0f} MiB")
        print(f"{'engine':>9} {'floor MiB':>10} {'peak MiB':>9} {'peak-floor':>11} {'peak/target':>12}")
        for name, r in (("llamba", mine), ("llama.cpp", ref)):
            if r:
                print(f"{name:>9} {r['floor']:10.0f} {r['peak']:9.0f} {r['peak'] - r['floor']:11.0f} "
                      f"{r['peak'] / limit:12.2f}")
    finally:
        if tmp:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
