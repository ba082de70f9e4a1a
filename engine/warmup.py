"""Compiling the kernels ahead, and showing it while it happens.

Numba compiles a kernel the first time it is called with a new signature and keeps the machine code in its disk
cache (``__pycache__`` next to the kernel modules, or ``NUMBA_CACHE_DIR``); later processes load it in a fraction
of a second. So the first run on a fresh install compiles what the model's first token needs: the fused matmul
kernel of each weight family specialised on the model's tensor types, each type's unit kernel, attention, RoPE,
norms, the KV store and the tokenizer's string kernel.

* ``CompileProgress``: while active, every llamba kernel Numba starts compiling is named on stderr with a count
  and the seconds so far (nothing is printed when everything comes from the cache).
* ``warmup(llm)``: runs the steps that compile what a model needs (a short prompt, a decode step, a prompt
  longer than the fused kernels take, sampling), then forgets them; ``llamba warmup [-m MODEL]`` calls it.
"""
from __future__ import annotations

import os
import sys
import time

from numba.core import event as _event


class CompileProgress(_event.Listener):
    """Context manager: names each llamba kernel Numba compiles on ``out`` (stderr), with a running count.

    ``stage(i, n, what)`` tags the lines that follow ("[2/4 prompt]"). ``compiled`` counts the kernels compiled."""

    def __init__(self, out=None, header: str | None = None):
        self.out = out if out is not None else sys.stderr
        self.header = header
        self.compiled = 0
        self.t0 = None
        self._tag = ""
        self._said_header = False
        self._depth = 0

    def stage(self, i: int, n: int, what: str):
        self._tag = f"[{i}/{n} {what}] "

    def _say(self, text: str):
        try:
            print(text, file=self.out, flush=True)
        except (OSError, ValueError):
            pass

    def on_start(self, event):
        self._depth += 1
        disp = (event.data or {}).get("dispatcher")
        fn = getattr(disp, "py_func", None)
        mod = getattr(fn, "__module__", "") or ""
        if not mod.startswith("llamba"):
            return  # Numba's own helpers (np.empty, min, ...) compiled as parts of a kernel
        if self.t0 is None:
            self.t0 = time.perf_counter()
        if not self._said_header and self.header:
            self._said_header = True
            self._say(self.header)
        self.compiled += 1
        name = f"{mod.rsplit('.', 1)[-1]}.{fn.__name__}"
        self._say(f"llamba: {self._tag}compiling kernel {self.compiled}: {name} "
                  f"({time.perf_counter() - self.t0:.0f} s)")

    def on_end(self, event):
        self._depth -= 1

    def __enter__(self):
        _event.register("numba:compile", self)
        return self

    def __exit__(self, *exc):
        _event.unregister("numba:compile", self)
        return False

    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.perf_counter() - self.t0


FIRST_RUN_HEADER = ("llamba: first run: compiling the kernels this model needs (cached afterwards; "
                    "`llamba warmup` does it ahead of time)")

# prompt rows that go past every fused (small-batch) kernel: the per-type matmul kernels of a long prompt
LONG_PROMPT = 40


def warmup_steps(llm) -> list:
    """[(name, fn)]: the calls that compile what `llm`'s model needs, in the order a generation needs them."""
    tok = llm.tokenizer
    n_vocab = llm.n_vocab_ids()
    # ordinary token ids (not special ones): the text of a few bytes
    ids = [t for t in llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 8, add_bos=False)
           if 0 <= t < n_vocab] or [min(n_vocab - 1, 1)]
    n_ctx = llm.n_ctx()

    def prompt(n):
        toks = (ids * (n // len(ids) + 1))[:n]
        bos = [tok.bos_id] if getattr(tok, "add_bos", False) and tok.bos_id is not None and tok.bos_id >= 0 else []
        return (bos + toks)[:max(2, min(n, n_ctx - 2))]

    def short():
        llm.reset()
        llm.eval(prompt(4))

    def decode():
        # a 1-token step and the sampler, through the same call a generation makes
        llm.reset()
        for _ in llm.create_completion(prompt(3), max_tokens=2, temperature=0.8, stream=True):
            pass

    def long():
        llm.reset()
        llm.eval(prompt(LONG_PROMPT))

    steps = [("prompt", short), ("decode", decode)]
    if n_ctx > LONG_PROMPT + 2:
        steps.append(("long prompt", long))
    return steps


def warmup(llm, progress: CompileProgress | None = None, stages_before: int = 0) -> int:
    """Compile (or load from the cache) the kernels `llm`'s model needs; returns the number compiled. The model's
    cache is emptied afterwards. ``stages_before``: stages the caller already counted (the model's load)."""
    steps = warmup_steps(llm)
    n = len(steps) + stages_before
    own = progress is None
    prog = progress or CompileProgress()
    if own:
        prog.__enter__()
    try:
        for i, (name, fn) in enumerate(steps, stages_before + 1):
            prog.stage(i, n, name)
            fn()
    finally:
        llm.reset()
        if own:
            prog.__exit__(None, None, None)
    return prog.compiled


# --------------------------------------------------------------------------------------------------
# a first run in two processes: the fused matmul kernels (most of the compile time) in a second process while this
# one loads the model and compiles everything else; Numba's disk cache hands them over (compilation holds the GIL
# and Numba's compiler lock, so threads would not overlap; processes do). A model with fused kernels of both weight
# families compiles the second family's in a third process (`_worker_main`). The kernels the processes share
# (fused._prep: one signature for both families) may be compiled twice at once; both save the same entry.
# --------------------------------------------------------------------------------------------------


def fused_keys(gf) -> list:
    """kernel_key of each fused kernel a model's LinearGroups use (one per weight family when its types fit one
    kernel, as `LinearGroup` picks them; families with more types are left to the model's own first call)."""
    from llamba.kernels import fused as F
    from llamba.kernels import quants_simple as QS
    from llamba.layers import model_types
    mt = model_types(gf)
    keys = []
    for fam in (F.BLOCK32 + (QS.Q8_0P,), F.KQUANTS):
        ks = sorted(k for k in mt if k in fam)
        if ks:
            key = F.kernel_key(ks, among=mt)
            if list(key[1]) == ks:
                keys.append(key)
    return keys


def _fused_args(key):
    """Small arguments with exactly the types LinearGroup passes the fused kernel `key` (so that compiling it on
    them compiles the signature a model call needs)."""
    import numpy as np
    from llamba.kernels import fused as F
    from llamba.kernels import quants_simple as QS
    from llamba.kernels.traits import TYPES
    kinds = list(key[1])
    n = 256
    ws, rows = [], []
    for k in kinds:
        if k == QS.Q8_0P:
            w = np.zeros((1, n // 32 * QS.PACK_BB), np.uint8)
        else:
            w = np.zeros((8, n // TYPES[k].block_elems * TYPES[k].block_bytes), np.uint8)
        w.flags.writeable = False
        ws.append(w)
        rows.append(8)
    ws4, kinds4 = F.pad(ws, kinds)
    outs = tuple(np.empty((1, r), np.float32) for r in rows) + (np.empty((1, 0), np.float32),) * (F.SLOTS - len(ws))
    nw = np.zeros(n, np.float32)
    nw.flags.writeable = False
    x = np.zeros((1, n), np.float32)
    return (1, x, np.empty((1, 1), np.float32), nw, 1e-6, ws4, kinds4, outs, 1)


def fused_cached(key) -> bool:
    """True when Numba's disk cache holds the fused kernel `key` for the signature models call it with (or when
    that cannot be told: then nothing is done ahead)."""
    try:
        import numba
        from llamba.kernels import fused as F
        fn = F.kernel_for(key[1])
        sig = tuple(numba.typeof(a) for a in _fused_args(key))
        cache = fn._cache
        return cache._index_key(sig, fn.targetctx.codegen()) in cache._cache_file._load_index()
    except Exception:  # noqa: BLE001 - Numba internals not as expected
        return True


def fused_index_exists() -> bool:
    """False when no fused kernel at all is in Numba's disk cache (a fresh install): cheap, before any model is
    opened."""
    try:
        import glob
        from llamba.kernels import fused as F
        path = F._make(False, 2, -1, -1, -1)._cache._cache_path  # where every fused kernel's index goes
        return bool(glob.glob(os.path.join(glob.escape(path), "fused.fused_mm*.nbi")))
    except Exception:  # noqa: BLE001
        return True


def start_fused_worker(path: str | None = None, keys=None):
    """A second process compiling the fused kernels of the model at `path` (or of the given keys) into Numba's
    disk cache; its progress lines go to our stderr. None when it cannot be started."""
    import subprocess
    args = [sys.executable, "-m", "llamba.warmup"]
    if keys is not None:
        args += ["--keys"] + [f"{int(k[0])}:{','.join(str(t) for t in k[1])}" for k in keys]
    else:
        args += ["--model", str(path)]
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except OSError:
        return None


def _prep_args():
    """Arguments with exactly the types the fused kernels of both families pass their shared helper ``fused._prep``
    (a no-op call: no elements, no quantization)."""
    import numpy as np
    x = np.zeros((1, 32), np.float32)
    nw = np.zeros(32, np.float32)
    nw.flags.writeable = False
    i8, f32, i32 = (np.zeros((1, 1), t) for t in (np.int8, np.float32, np.int32))
    n = x.shape[1]
    return (1, x, x, nw, np.zeros(1, np.float32), 0, n - n, n - n, np.empty_like(x), False, False, i8, f32, f32, i32,
            i8, f32, i32)


def compile_shared_prep() -> bool:
    """Compile (or load) ``fused._prep`` before the processes that compile the two families' fused kernels start, so
    that they load it rather than both compiling it. False when that failed (they compile it then)."""
    try:
        from llamba.kernels import fused as F
        F._prep(*_prep_args())
        return True
    except Exception:  # noqa: BLE001 - a changed helper: each fused kernel's compile makes its own
        return False


def compile_fused(keys, progress: CompileProgress | None = None) -> int:
    from llamba.kernels import fused as F
    n = 0
    for key in keys:
        if fused_cached(key):
            continue
        F.kernel_for(key[1])(*_fused_args(key))
        n += 1
    return n


def _stub_forward(llm, n_tokens: int):
    """A forward pass of `n_tokens` with every LinearGroup answering zeros: compiles (or loads) every kernel of the
    pass but the fused matmuls, without them. The cache is emptied afterwards."""
    import numpy as np
    from llamba.layers import LinearGroup
    orig = LinearGroup.__call__

    def zeros(self, x, *args, **kwargs):
        return [np.zeros((x.shape[0], lin.rows), np.float32) for lin in self.lins]
    LinearGroup.__call__ = zeros
    try:
        llm.reset()
        ids = [t for t in llm.tokenize(b"The quick brown fox", add_bos=False) if 0 <= t < llm.n_vocab_ids()] or [1]
        llm.eval((ids * n_tokens)[:n_tokens])
        llm.eval(ids[:1])
    finally:
        LinearGroup.__call__ = orig
        llm.reset()


def prepare_first_run(llm, prog: CompileProgress, worker=None, stage: int = 2, n_stages: int = 3):
    """Before a generation: when the model's fused kernels are not in the disk cache, have a second process compile
    them (`worker`: one already started) while this one compiles the rest of a forward pass, then wait for it.
    Returns at once (a cache look-up) when they are cached. Returns the second process, if one ran."""
    try:
        keys = fused_keys(llm.gguf)
    except Exception:  # noqa: BLE001 - e.g. a model without fused groups: nothing to do ahead
        keys = []
    cold = [k for k in keys if not fused_cached(k)]
    if not cold:
        if worker is not None:
            worker.wait()
        return worker
    if worker is None:
        worker = start_fused_worker(keys=cold)
    if worker is None:
        return None
    prog.stage(stage, n_stages, "attention, norms, ...")
    try:
        _stub_forward(llm, 4)
    except Exception:  # noqa: BLE001 - the real forward pass compiles what this one did not
        llm.reset()
    prog.stage(stage, n_stages, "waiting for the matmul kernels")
    worker.wait()
    return worker


def _worker_main(argv) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m llamba.warmup")
    ap.add_argument("--model")
    ap.add_argument("--keys", nargs="*")
    a = ap.parse_args(argv)
    if a.keys:
        keys = [(bool(int(k.split(":")[0])), tuple(int(t) for t in k.split(":")[1].split(","))) for k in a.keys]
    else:
        from llamba.gguf import GGUFFile
        keys = fused_keys(GGUFFile(a.model))
    # a model with kernels of both families (block-32 and K-quant weights: most K-quant mixes): each in a process of
    # its own, so that the two cores share three compiles (this one's, the other family's, the first process's rest
    # of a forward pass) rather than one process compiling both families while the first one waits for it
    helpers = []
    try:
        with CompileProgress() as prog:
            prog.stage(1, 1, "matmul kernels, another process")
            if len(keys) > 1 and not all(fused_cached(k) for k in keys):
                compile_shared_prep()  # the helper loads the kernel both families call instead of compiling it too
                helpers = [start_fused_worker(keys=[k]) for k in keys[1:]]
            mine = keys[:1] if helpers and all(h is not None for h in helpers) else keys
            fams = "+".join(sorted({"K-quant" if k[0] else "block-32" for k in mine}))
            prog.stage(1, 1, f"{fams} matmul kernels, another process")
            compile_fused(mine, prog)
    finally:
        for h in helpers:
            if h is not None:
                h.wait()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
