"""GPU offload check for a machine with CUDA + CuPy: GPU vs CPU logits and speed on real models.

    python bench/gpu_check.py [--smollm PATH] [--gemma PATH] [--qwen35 PATH] [-p PROMPT_TOKENS] [-n DECODE_STEPS]

For each model (SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M, the qwen35+MTP test fixture; paths from the flags,
else tests/conftest.py's cache/downloaders, a model that cannot be found is skipped) it runs the CPU path and
-ngl half, -ngl all and a two-way layer split (two GPUs when present, else the same GPU twice so that the
cross-device copy path still runs), and prints for each:
  * the max relative difference of the logits vs the CPU (max|gpu - cpu| / max|cpu|) for the prompt
    (prefill: float activations on both sides) and for teacher-forced decode steps (row-exact path: the CPU
    quantizes activations to int8 like llama.cpp, the GPU keeps them in float, so expect ~1e-2), and how
    often the greedy token agrees;
  * prefill and decode tokens/s;
  * memory per device (weights, KV cache, recurrent state, free/total).
Without a usable GPU it prints "no GPU: nothing to check" and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "models" / "tiny-qwen35-mtp-q8_0.gguf"
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden hand press into a system that could produce books "
        "quickly and cheaply. Within fifty years presses were working in more than two hundred cities, and the "
        "number of books in Europe grew from thousands to millions. ") * 8


def _find(name: str, given: str | None):
    if given:
        p = Path(given)
        return p if p.exists() else None
    if name == "qwen35":
        return FIXTURE if FIXTURE.exists() else None
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        import conftest
        return Path(conftest.smollm2_path() if name == "smollm2" else conftest.gemma3_path())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # pytest.skip() raises a BaseException subclass
        print(f"  ({name}: not available: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})")
        return None


def _rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(float(np.abs(b).max()), 1e-30))


def _run(llm, prompt, forced):
    """Prompt logits (all rows), then teacher-forced decode logits; prefill and decode tokens/s."""
    m = llm.model
    m.reset()
    m.forward(prompt[:8], logits="last")  # warm-up: kernels compiled, caches allocated
    m.reset()
    t0 = time.perf_counter()
    m.forward(prompt, logits="last")
    t_pre = time.perf_counter() - t0
    m.reset()
    pre = m.forward(prompt, logits="all")
    dec = []
    t0 = time.perf_counter()
    for tok in forced:
        dec.append(m.forward([tok], logits="last", gemm=False)[0])
    t_dec = time.perf_counter() - t0
    m.reset()
    return pre, np.stack(dec), len(prompt) / t_pre, len(forced) / t_dec


def check_model(name, path, devices, n_prompt, n_dec, n_ctx):
    from llamba import Llama
    from llamba.backend import Device
    from llamba.offload import offload_model
    print(f"\n== {name}: {path.name}")
    cpu = Llama(str(path), n_ctx=n_ctx, verbose=False)
    prompt = cpu.tokenize(TEXT.encode(), add_bos=True)[:n_prompt]
    n_all = cpu.model.config.n_layer_all + 1
    # greedy continuation on the CPU, fed to every configuration (teacher forcing)
    cpu.model.reset()
    logits = cpu.model.forward(prompt, logits="last")
    forced = []
    for _ in range(n_dec):
        forced.append(int(logits[-1].argmax()))
        logits = cpu.model.forward(forced[-1:], logits="last", gemm=False)
    ref_pre, ref_dec, cpu_pp, cpu_tg = _run(cpu, prompt, forced)
    print(f"  {'config':<34} {'prefill rel':>11} {'decode rel':>10} {'greedy':>7} {'prefill t/s':>11} "
          f"{'decode t/s':>10}")
    print(f"  {'CPU (-ngl 0)':<34} {0:>11.1e} {0:>10.1e} {'100%':>7} {cpu_pp:>11.1f} {cpu_tg:>10.1f}")
    d0 = devices[0]
    twin = devices[1] if len(devices) > 1 else Device(d0.index, d0.name, d0.kind, d0.total, d0.free)
    two = "two GPUs" if len(devices) > 1 else "GPU0 twice"
    configs = [(f"-ngl {n_all // 2} (half)", n_all // 2, [d0], None),
               (f"-ngl {n_all} (all)", n_all, [d0], None),
               (f"-ngl all, split 1,1 ({two})", -1, [d0, twin], [1, 1])]
    for label, ngl, devs, split in configs:
        llm = Llama(str(path), n_ctx=n_ctx, verbose=False)
        info = offload_model(llm.model, ngl, devices=devs, tensor_split=split)
        pre, dec, pp, tg = _run(llm, prompt, forced)
        agree = float((dec.argmax(-1) == ref_dec.argmax(-1)).mean())
        print(f"  {label:<34} {_rel(pre, ref_pre):>11.1e} {_rel(dec, ref_dec):>10.1e} {agree:>7.0%} {pp:>11.1f} "
              f"{tg:>10.1f}")
        for line in info.report()[1:]:
            print(f"  {'':<4}{line.strip()}")
        del llm, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm", help="SmolLM2-135M-Instruct Q4_1 GGUF (default: the tests' cache/downloader)")
    ap.add_argument("--gemma", help="Gemma 3 270M Q4_K_M GGUF (default: the tests' cache/downloader)")
    ap.add_argument("--qwen35", help=f"qwen35 GGUF (default: {FIXTURE.relative_to(ROOT)})")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--decode", type=int, default=32)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--stand-in", action="store_true",
                    help="also accept numpy stand-in devices (LLAMBA_FAKE_DEVICES): tests this script without a GPU")
    a = ap.parse_args(argv)
    from llamba.backend import describe_devices, discover_devices
    devices, why = discover_devices()
    if not devices or (devices[0].kind != "cuda" and not a.stand_in):
        print(f"no GPU: nothing to check ({why or 'only stand-in devices'})")
        return 0
    print("\n".join(describe_devices()))
    t0 = time.perf_counter()
    for name, given in (("smollm2", a.smollm), ("gemma3", a.gemma), ("qwen35", a.qwen35)):
        path = _find(name, given)
        if path is None:
            print(f"\n== {name}: skipped (no model file; pass its path)")
            continue
        check_model(name, path, devices, a.prompt_tokens, a.decode, a.ctx)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
