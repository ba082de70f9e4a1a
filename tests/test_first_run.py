"""First run: the CPU features every kernel module compiles for (one helper, NUMBA_CPU_NAME honoured), the fused
kernels specialised on a model's weight types, and `llamba warmup`."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from llamba.kernels import _jit
from llamba.kernels import fused as F
from llamba.kernels import quants_k as QK
from llamba.kernels import quants_simple as QS


def test_target_features_follow_numba_config(monkeypatch):
    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)
    monkeypatch.setattr(numba.config, "CPU_NAME", None)
    from llvmlite import binding as llb
    assert _jit.target_features() == dict(llb.get_host_cpu_features())
    assert _jit.target_is_host()
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    assert _jit.target_features() == {}
    assert not _jit.target_is_host()
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,-f16c,+sse4.1")
    assert _jit.target_features() == {"avx2": True, "f16c": False, "sse4.1": True}


def test_kernel_modules_share_the_target_features():
    # both quant modules decide on the same feature set (quants_k used to read the host's whatever NUMBA_CPU_NAME said)
    assert QK._FEATURES == QS._FEATURES == _jit.target_features()


_GENERIC_SCRIPT = textwrap.dedent("""
    import numpy as np
    from llamba.kernels import _jit, fused as F, quants_k as K
    from llamba.kernels.ref import quants_k as R
    assert _jit.target_features() == {} and not K._X86_AVX2 and not K._HW_F16, (_jit.target_features(), K._X86_AVX2)
    rng = np.random.default_rng(5)
    rows, n = 24, 512
    raw = rng.integers(0, 256, size=(rows, n // 256, 144), dtype=np.uint8)
    d = (rng.uniform(1e-3, 2e-2, size=(rows, n // 256, 2)) * rng.choice([-1.0, 1.0], size=(rows, n // 256, 2)))
    raw[:, :, 0:4] = d.astype(np.float16).view(np.uint8).reshape(rows, n // 256, 4)
    w = np.frombuffer(raw.tobytes(), np.uint8).reshape(rows, -1)  # read-only, as a GGUF view
    x = rng.standard_normal((3, n)).astype(np.float32)
    act = K.act_q8_K(x)
    ract = R.act_q8_K(x)
    for a, b in zip(act, ract):
        assert np.array_equal(a, b)
    out = np.empty((3, rows), np.float32)
    K.matmul_q4_k(w, *act, out)
    ref = R.matmul_q4_k(w, *ract)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), np.abs(out - ref).max()
    fo = np.empty((3, rows), np.float32)
    nw = np.ones(n, np.float32)
    nw.flags.writeable = False
    F.run(0, x, x, nw, 0.0, [w], [K.Q4_K], [fo])
    assert np.array_equal(fo.view(np.uint32), ref.view(np.uint32))
    print("generic ok")
""")


@pytest.mark.slow  # compiles the Q4_K kernels from an empty cache in a subprocess (minutes on 2 cores)
def test_q4_k_matmul_on_a_generic_cpu_target(tmp_path):
    """NUMBA_CPU_NAME=generic (a portable cache): the Q4_K kernels emit no x86 intrinsics (which aborted LLVM) and
    still match the numpy twin bit for bit, alone and fused."""
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("NUMBA_CPU_FEATURES", None)
    r = subprocess.run([sys.executable, "-c", _GENERIC_SCRIPT], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generic ok" in r.stdout


def test_fused_kernel_per_model_type_set():
    q41, q80p, q50 = QS.Q4_1, QS.Q8_0P, QS.Q5_0
    # a call's types plus the model's other types of the same family, while they fit in SLOTS
    assert F.kernel_key([q41], among={q41, q80p, QK.Q6_K}) == (False, tuple(sorted((q41, q80p))))
    assert F.kernel_key([QK.Q4_K], among={QK.Q4_K, QK.Q6_K, q50}) == (True, (QK.Q4_K, QK.Q6_K))
    many = {QS.Q4_0, q41, q50, QS.Q5_1, QS.IQ4_NL}
    assert F.kernel_key([q50], among=many) == (False, (q50,))  # too many: the call's own types
    assert F.kernel_for([q41], among={q80p}) is F.kernel_for([q80p], among={q41})
    with pytest.raises(ValueError):
        F.kernel_key([q41, QK.Q4_K])
    with pytest.raises(ValueError):
        F.kernel_key([0])  # F32: no fused kernel


def test_fused_kernel_skips_no_type_it_was_given():
    """A kernel built for several types computes each of them (same numbers as a kernel for that type alone)."""
    rng = np.random.default_rng(0)
    n, rows = 64, 16
    ws, kinds = [], []
    for tid in (QS.Q4_1, QS.Q8_0):
        bb = QS.BLOCK_BYTES[tid]
        raw = rng.integers(0, 256, size=(rows, n // 32, bb), dtype=np.uint8)
        raw[:, :, 0:2] = np.array([0.01], np.float16).view(np.uint8)
        if tid == QS.Q4_1:
            raw[:, :, 2:4] = np.array([-0.02], np.float16).view(np.uint8)
        ws.append(np.frombuffer(raw.tobytes(), np.uint8).reshape(rows, -1))
        kinds.append(tid)
    x = rng.standard_normal((2, n)).astype(np.float32)
    nw = np.ones(n, np.float32)
    nw.flags.writeable = False
    both = [np.empty((2, rows), np.float32) for _ in ws]
    F.run(0, x, x, nw, 0.0, ws, kinds, both)
    for w, k, o in zip(ws, kinds, both):
        alone = np.empty((2, rows), np.float32)
        F.run(0, x, x, nw, 0.0, [w], [k], [alone])
        assert np.array_equal(o.view(np.uint32), alone.view(np.uint32))


def test_compile_progress_names_each_kernel_compiled():
    import io
    from llamba.warmup import CompileProgress

    def twice(a):
        return a * 2
    twice.__module__ = "llamba.kernels.progress_probe"  # a llamba kernel as far as the progress is concerned
    kern = numba.njit(twice)  # no cache: always compiled
    buf = io.StringIO()
    with CompileProgress(out=buf, header="HEADER") as prog:
        prog.stage(1, 2, "probe")
        assert kern(3) == 6
        kern(4)  # already compiled: no line
        numba.njit(lambda a: a + 1)(1)  # not a llamba kernel: no line
    kern(2.5)  # after the context: not reported
    lines = buf.getvalue().splitlines()
    assert lines[0] == "HEADER"
    assert len(lines) == 2 and "[1/2 probe] compiling kernel 1: progress_probe.twice" in lines[1], lines
    assert prog.compiled == 1


def test_compile_progress_silent_when_nothing_compiles():
    import io
    from llamba.warmup import CompileProgress
    buf = io.StringIO()
    with CompileProgress(out=buf, header="HEADER") as prog:
        np.add(1, 2)
    assert buf.getvalue() == "" and prog.compiled == 0


@pytest.mark.slow  # compiles a whole model's kernels from an empty cache in a subprocess (a minute on 2 cores)
def test_warmup_command(tmp_path):
    """`llamba warmup -m MODEL` runs the model's warm-up steps, reports what it compiled, and a later run of that
    model (same Numba cache) compiles nothing more: it prints no compile line."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import write_model
    p = tmp_path / "tiny.gguf"
    write_model(p, "llama", n_ctx=128)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "llamba.cli", "warmup", "-m", str(p), "-t", "1"], capture_output=True,
                       text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warmup done" in r.stderr and "[1/5 load]" in r.stderr and "compiling kernel" in r.stderr, r.stderr
    r2 = subprocess.run([sys.executable, "-m", "llamba.cli", "run", "-m", str(p), "-p", "the cat", "-n", "3",
                         "--temp", "0", "-t", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "compiling kernel" not in r2.stderr, r2.stderr


def test_second_process_compiles_the_signature_a_model_calls(tmp_path):
    """The fused kernels a first run compiles in a second process (on small stand-in arguments) must be the very
    signatures the model's LinearGroups call, or the first run would compile them twice."""
    sys.path.insert(0, os.path.dirname(__file__))
    from gguf import GGMLQuantizationType as QT
    from tiny_models import write_model
    from llamba.llama import Llama
    from llamba.warmup import _fused_args, fused_keys
    p = tmp_path / "tiny_q8.gguf"
    write_model(p, "llama", qtype=QT.Q8_0, n_ctx=64)
    llm = Llama(str(p), n_ctx=64, verbose=False)
    llm.eval([1, 2, 3])
    llm.eval([4])
    keys = fused_keys(llm.gguf)
    assert keys == [(False, (QS.Q8_0P,))]
    for key in keys:
        fn = F.kernel_for(key[1])
        assert tuple(numba.typeof(a) for a in _fused_args(key)) in [tuple(s) for s in fn.signatures]
    # and the helper both families' kernels call, which a first run's worker compiles before starting the other
    # family's process (a signature of its own would be compiled for nothing)
    # (the kernels above came from, or went to, the disk cache: so did the helper's signature they use)
    from llamba.warmup import _prep_args, compile_shared_prep
    P = F._prep
    sig = tuple(numba.typeof(a) for a in _prep_args())
    assert P._cache._index_key(sig, P.targetctx.codegen()) in P._cache._cache_file._load_index()
    before = {tuple(s) for s in P.signatures}  # (earlier tests in this process may have compiled others)
    assert compile_shared_prep()
    after = {tuple(s) for s in P.signatures}
    assert sig in after and after - before <= {sig}


def test_worker_splits_the_two_families_over_two_processes(monkeypatch):
    """A first run's worker given a model with fused kernels of both families compiles the first family's itself and
    starts a helper process for the other (three compiles on two cores, not two in a row); it waits for the helper.
    When the helper cannot be started it compiles both."""
    from llamba import warmup as W
    k32, kk = (False, (QS.Q5_0, QS.Q8_0P)), (True, (QK.Q4_K, QK.Q6_K))
    started, compiled, waited = [], [], []

    class Proc:
        def wait(self):
            waited.append(True)
            return 0
    monkeypatch.setattr(W, "fused_keys", lambda gf: [k32, kk])
    monkeypatch.setattr("llamba.gguf.GGUFFile", lambda path: path)
    monkeypatch.setattr(W, "start_fused_worker", lambda path=None, keys=None: started.append(keys) or Proc())
    monkeypatch.setattr(W, "compile_fused", lambda keys, prog=None: compiled.append(list(keys)) or len(keys))
    monkeypatch.setattr(W, "fused_cached", lambda key: False)
    preps = []
    monkeypatch.setattr(W, "compile_shared_prep", lambda: preps.append(len(started)) or True)
    assert W._worker_main(["--model", "m.gguf"]) == 0
    assert started == [[kk]] and compiled == [[k32]] and waited == [True]
    assert preps == [0]  # the kernel both families share, compiled before the helper starts
    started.clear(), compiled.clear(), waited.clear()
    assert W._worker_main(["--keys", "1:12,14"]) == 0  # one key: no helper
    assert started == [] and compiled == [[kk]]
    monkeypatch.setattr(W, "start_fused_worker", lambda path=None, keys=None: None)
    compiled.clear()
    assert W._worker_main(["--model", "m.gguf"]) == 0
    assert compiled == [[k32, kk]]
