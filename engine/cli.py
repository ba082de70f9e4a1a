"""`llamba` command line: thin — parses flags, calls the library, prints.

    llamba run [-m MODEL] -p PROMPT [-n N] [-t THREADS] [-c CTX] [--temp T] [--top-k K] [--top-p P] [--min-p P]
               [--repeat-penalty R] [--seed S]
    llamba info MODEL

Errors print one line to stderr and exit with status 1 (no traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from llamba.errors import LlambaError


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", help="GGUF model file (default: the embedded Gemma 3 270M from llamba[demo])")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens (0 = the model's)")
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", default="0",
                   help="layers to offload to the GPU (N, -1 or 'all')")
    p.add_argument("--tensor-split", default=None, help="GPU split proportions, e.g. 3,1")
    p.add_argument("--verbose", action="store_true", help="print load details")


def _add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--temp", type=float, default=0.8, help="temperature (<= 0: greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=-1, help="RNG seed (-1: random)")


def _add_spec_args(p: argparse.ArgumentParser):
    p.add_argument("--spec", choices=["auto", "mtp", "draft", "ngram", "none"], default="auto",
                   help="speculative decoding: auto = the model's MTP head when it has one")
    p.add_argument("--draft-max", type=int, default=3, help="tokens drafted per step (default 3)")
    p.add_argument("--draft-p-min", type=float, default=0.0, help="stop drafting below this probability")
    p.add_argument("--draft-model", default=None, help="a smaller GGUF with the same vocabulary (--spec draft)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llamba", description="Local LLM inference on GGUF models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="generate a continuation of a prompt, streamed to stdout")
    _add_model_args(run)
    run.add_argument("-p", "--prompt", required=True, help="prompt text, or - to read it from stdin")
    run.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1: until end/context)")
    run.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    run.add_argument("--special", action="store_true", help="parse special tokens in the prompt")
    _add_sampling_args(run)
    _add_spec_args(run)
    info = sub.add_parser("info", help="describe a GGUF model")
    info.add_argument("model", nargs="?", help="GGUF model file")
    info.add_argument("--devices", action="store_true", help="list GPU devices")
    return ap


def _model_path(arg: str | None) -> str:
    if arg:
        return arg
    from llamba.demo import default_model_path
    return default_model_path()


def _warn_gpu(ngl: str):
    if str(ngl) not in ("0", ""):
        print("llamba: warning: GPU offload is not available in this build; running on the CPU", file=sys.stderr)


def cmd_run(a) -> int:
    from llamba.llama import Llama
    from llamba.sampling import RANDOM_SEED
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    path = _model_path(a.model)
    _warn_gpu(a.n_gpu_layers)
    t0 = time.perf_counter()
    llm = Llama(path, n_ctx=a.ctx_size, n_threads=a.threads, seed=RANDOM_SEED if a.seed < 0 else a.seed,
                verbose=a.verbose, spec=a.spec, draft_max=a.draft_max, draft_p_min=a.draft_p_min,
                draft_model=a.draft_model)
    llm._proposer()  # a bad --spec choice fails here, before any output
    t_load = time.perf_counter() - t0
    toks = llm.tokenize(prompt.encode("utf-8"), add_bos=not a.no_bos, special=a.special)
    if not toks:
        raise LlambaError("the prompt is empty after tokenization; give some text with -p")
    n_predict = a.n_predict if a.n_predict and a.n_predict > 0 else None
    if len(toks) >= llm.n_ctx():
        from llamba.errors import ContextOverflowError
        raise ContextOverflowError(f"the prompt has {len(toks)} tokens but the context holds {llm.n_ctx()}; "
                                   f"raise -c or shorten the prompt")
    out = sys.stdout
    for chunk in llm.create_completion(toks, max_tokens=n_predict or -1, temperature=a.temp, top_k=a.top_k,
                                       top_p=a.top_p, min_p=a.min_p, repeat_penalty=a.repeat_penalty,
                                       stream=True):
        out.write(chunk["choices"][0]["text"])
        out.flush()
    out.write("\n")
    out.flush()
    st = llm.last_stats
    print(f"llamba: load {t_load:.2f} s | prompt {st.n_prompt} tokens, {st.prompt_tps:.1f} tokens/s | "
          f"generated {st.n_gen} tokens, {st.gen_tps:.1f} tokens/s", file=sys.stderr)
    if st.spec:
        print(f"llamba: {st.spec.summary()}", file=sys.stderr)
    return 0


def cmd_info(a) -> int:
    if a.devices:
        print("devices: none (GPU offload is not built into this llamba)")
        if not a.model:
            return 0
    from llamba.gguf import GGUFFile
    from llamba.layers import type_mix
    from llamba.models import build_config
    from llamba.tokenizer import Tokenizer
    path = _model_path(a.model)
    gf = GGUFFile(path)
    cfg = build_config(gf)
    n_params = sum(i.n_elements for i in gf.tensors.values())
    tok = Tokenizer.from_metadata(gf.metadata)
    name = gf.get("general.name", os.path.basename(path))
    print(f"model:          {name} ({path})")
    print(f"architecture:   {cfg.arch}")
    print(f"parameters:     {n_params / 1e6:.1f} M ({gf.file_size / 2**20:.1f} MiB on disk)")
    print(f"quant mix:      " + ", ".join(f"{k} x{v}" for k, v in type_mix(gf).items()))
    print(f"layers:         {cfg.n_layer} (+{cfg.n_nextn} MTP)" if cfg.n_nextn else f"layers:         {cfg.n_layer}")
    print(f"embedding:      {cfg.n_embd}, heads {cfg.n_head[0]} (kv {cfg.n_head_kv[0]}), head dim {cfg.head_dim}")
    print(f"context length: {cfg.n_ctx_train}")
    print(f"tokenizer:      {gf.get('tokenizer.ggml.model')} (pre: {gf.get('tokenizer.ggml.pre', 'default')}), "
          f"{tok.n_vocab} tokens")
    sp = []
    for label, tid in (("bos", tok.bos_id), ("eos", tok.eos_id)):
        if tid is not None and tid >= 0:
            sp.append(f"{label}={tid} {tok.tokens[tid]!r}")
    sp.append("eog=" + ",".join(str(i) for i in sorted(tok.eog_ids)))
    print(f"special tokens: " + " ".join(sp) + f" (add_bos={tok.add_bos})")
    print(f"chat template:  {'yes' if gf.get('tokenizer.chat_template') else 'no'}")
    return 0


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        if a.cmd == "run":
            return cmd_run(a)
        if a.cmd == "info":
            return cmd_info(a)
    except LlambaError as e:
        print(f"llamba: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
