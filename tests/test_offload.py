"""GPU offload (llamba.backend, llamba.offload, llamba.kernels.cuda), tested on the CPU:

* placement: `-ngl`, `--tensor-split`, `--split-mode`, `--main-gpu` arithmetic against llama.cpp's rules on
  worked examples with fake device lists;
* the device-kernel reference (`XpKernels(numpy)`) against the CPU kernels, op by op;
* the offload code path with numpy standing in for CuPy: with `HostKernels` (the CPU kernels behind the
  device interface) the logits are bit-identical to the CPU path; with the xp kernels (float activations,
  like the CUDA kernels) they agree to the documented tolerance, for tiny llama / gemma3 / qwen35+MTP /
  qwen35moe+MTP models at -ngl 0, half, all and a two-way split (qwen35moe: the MoE FFNs stay on the CPU);
* the CUDA C kernels themselves, compiled with g++ and run on a tiny CPU emulator of CUDA's thread model
  (every CUDA thread a fiber; `__syncthreads` and warp shuffles are barriers), and compiled to PTX by nvcc
  when it is installed;
* no GPU, no crash: one warning line and CPU output; `llamba info --devices`;
* `@pytest.mark.gpu`: the same checks on a real CUDA device through CuPy (skipped without one).
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from llamba import Llama
from llamba import backend as B
from llamba.errors import LlambaError, UnsupportedError
from llamba.kernels import deltanet as Dn
from llamba.kernels import ops as Ko
from llamba.kernels.cuda import CUDA_SOURCE, CUDA_TYPES, CudaKernels, XpKernels, dequantize_xp
from llamba.kernels.quant import dequantize
from llamba.kernels.traits import TYPES
from llamba.offload import offload_model
from tiny_models import write_model, write_qwen35

FIXTURE = Path(__file__).parent / "data" / "models" / "tiny-qwen35-mtp-q8_0.gguf"
F32 = np.float32
GiB = 2**30


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(autouse=True)
def _fresh_backend():
    B._reset_for_tests()
    yield
    B._reset_for_tests()


# ====================================================================================================
# placement arithmetic (llama.cpp llama_model::load_tensors)
# ====================================================================================================

def test_parse_ngl_and_split():
    assert B.parse_ngl("all") == -2 and B.parse_ngl("auto") == -1 and B.parse_ngl("-1") == -1
    assert B.parse_ngl("12") == 12 and B.parse_ngl(0) == 0
    with pytest.raises(LlambaError, match="-ngl"):
        B.parse_ngl("lots")
    assert B.parse_tensor_split("3,1") == [3.0, 1.0] and B.parse_tensor_split(None) is None
    with pytest.raises(LlambaError, match="tensor-split"):
        B.parse_tensor_split("3,x")
    assert B.parse_split_mode(1) == "layer" and B.parse_split_mode("none") == "none"
    with pytest.raises(LlambaError, match="split-mode"):
        B.parse_split_mode("rows")


def test_ngl_counts_blocks_mtp_and_output():
    # qwen35 with MTP: 4 trunk blocks + 1 MTP block = n_layer_all 5; layer 5 is the output layer
    one = [None] * 6
    assert B.plan_layers(5, 0, [8 * GiB]) == one
    assert B.plan_layers(5, 1, [8 * GiB]) == [None] * 5 + [0]  # -ngl 1: only the output layer
    assert B.plan_layers(5, 2, [8 * GiB]) == [None] * 4 + [0, 0]  # then the MTP block
    assert B.plan_layers(5, 3, [8 * GiB]) == [None] * 3 + [0, 0, 0]  # then the trunk from the end
    assert B.plan_layers(5, 6, [8 * GiB]) == [0] * 6
    assert B.plan_layers(5, 99, [8 * GiB]) == [0] * 6
    assert B.plan_layers(5, B.NGL_ALL, [None]) == [0] * 6  # unknown free memory: everything
    assert B.plan_layers(5, 3, []) == one  # no devices


def test_tensor_split_worked_examples():
    # SmolLM2-135M: 30 blocks + output = 31 layers, --tensor-split 3,1 -> split points [0.75, 1]:
    # layer il goes to GPU0 while il/31 < 0.75, i.e. il <= 23 (23/31 = 0.742, 24/31 = 0.774)
    p = B.plan_layers(30, 99, [GiB, GiB], tensor_split=[3, 1])
    assert p == [0] * 24 + [1] * 7
    # partial: -ngl 10 -> first GPU layer 21, f = (il - 21)/10 in {0, .1, ..., .9}: f < .75 on GPU0
    p = B.plan_layers(30, 10, [GiB, GiB], tensor_split=[3, 1])
    assert p == [None] * 21 + [0] * 8 + [1] * 2
    # a share point hit exactly: std::upper_bound takes the *next* device (split 1,1 -> [0.5, 1])
    assert B.plan_layers(3, 4, [GiB, GiB], tensor_split=[1, 1]) == [0, 0, 1, 1]
    # default: proportional to free memory (8 and 24 GiB -> [0.25, 1]); f = il/8
    assert B.plan_layers(7, 8, [8 * GiB, 24 * GiB]) == [0, 0, 1, 1, 1, 1, 1, 1]
    # all-zero split = default; a zero entry leaves that device empty; entries past the device count ignored
    assert B.plan_layers(7, 8, [8 * GiB, 24 * GiB], tensor_split=[0, 0]) == [0, 0, 1, 1, 1, 1, 1, 1]
    assert B.plan_layers(3, 4, [GiB, GiB], tensor_split=[0, 1]) == [1, 1, 1, 1]
    assert B.plan_layers(3, 4, [GiB, GiB], tensor_split=[1, 1, 5]) == [0, 0, 1, 1]
    # three devices 1,2,1 -> [0.25, 0.75, 1] over 8 layers: f = il/8
    assert B.plan_layers(7, 8, [GiB] * 3, tensor_split=[1, 2, 1]) == [0, 0, 1, 1, 1, 1, 2, 2]


def test_split_mode_none_and_row():
    assert B.plan_layers(3, 2, [GiB, GiB], split_mode="none", main_gpu=1) == [None, None, 1, 1]
    assert B.plan_layers(3, 4, [GiB, GiB], split_mode="none", tensor_split=[3, 1]) == [0, 0, 0, 0]
    with pytest.raises(LlambaError, match="main-gpu 2"):
        B.plan_layers(3, 2, [GiB, GiB], split_mode="none", main_gpu=2)
    with pytest.raises(UnsupportedError, match="row"):
        B.plan_layers(3, 2, [GiB, GiB], split_mode="row")


def test_auto_ngl_fits_free_memory():
    # 10 blocks of 100 MiB + a 300 MiB output layer; one device with 800 MiB free (no reserve): the output
    # layer and the last 5 blocks fit (800 = 300 + 5 x 100)
    MiB = 2**20
    lb = [100 * MiB] * 10 + [300 * MiB]
    assert B.plan_layers(10, -1, [800 * MiB], layer_bytes=lb, reserve=0) == [None] * 5 + [0] * 6
    assert B.plan_layers(10, -2, [799 * MiB], layer_bytes=lb, reserve=0) == [None] * 6 + [0] * 5
    assert B.plan_layers(10, -1, [100 * GiB], layer_bytes=lb, reserve=0) == [0] * 11
    # two devices split 1,1: each holds its own share; 700 + 700 MiB fit 7 blocks + output?
    # n=11 -> [0]*6 + [1]*5: dev1 = 4 x 100 + 300 = 700, dev0 = 600 -> fits
    assert B.plan_layers(10, -1, [700 * MiB, 700 * MiB], layer_bytes=lb, reserve=0, tensor_split=[1, 1]) == \
        [0] * 6 + [1] * 5
    assert B.plan_layers(10, -1, [200 * MiB, 200 * MiB], layer_bytes=lb, reserve=0, tensor_split=[1, 1]) == \
        [None] * 11  # the output layer alone does not fit its device
    assert B.plan_layers(10, -1, [None], layer_bytes=lb) == [0] * 11  # free memory unknown: all


def test_fake_devices_spec():
    d = B.fake_devices("2:100,50")
    assert [x.free for x in d] == [100 * 2**20, 50 * 2**20] and all(x.kind == "numpy" for x in d)
    assert B.fake_devices("1")[0].free is None
    with pytest.raises(LlambaError):
        B.fake_devices("two")


# ====================================================================================================
# device-kernel reference (XpKernels on numpy) vs the CPU kernels
# ====================================================================================================

_F16_FIELDS = {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0], 20: [0], 10: [80, 82], 11: [108], 12: [0, 2],
               13: [0, 2], 14: [208], 23: [0]}


def _random_raw(tid, rows, cols, rng):
    """Random GGUF block bytes of type tid, with sane fp16 scales (no inf/nan)."""
    t = TYPES[tid]
    if tid == 0:
        return rng.standard_normal((rows, cols)).astype(F32).view(np.uint8)
    if tid == 1:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if tid == 30:
        return (rng.standard_normal((rows, cols)).astype(F32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, (rows, cols // t.block_elems, t.block_bytes), dtype=np.uint8)
    for off in _F16_FIELDS[tid]:
        raw[..., off:off + 2] = (0.05 * rng.standard_normal(raw.shape[:2] + (1,))).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


class _Lin:
    """A Linear-like weight for the kernel interface (.w raw bytes, .type_id, .rows, .cols, .bias)."""

    def __init__(self, tid, raw, rows, cols, bias=None):
        self.type_id, self.rows, self.cols, self.bias, self.name, self.w = tid, rows, cols, bias, "w", raw


def _cpu_view(raw, tid):
    return raw.view({0: np.float32, 1: np.float16, 30: np.uint16}.get(tid, np.uint8))


@pytest.mark.parametrize("tid", list(CUDA_TYPES), ids=[CUDA_TYPES[t] for t in CUDA_TYPES])
def test_xp_dequant_bit_exact(tid):
    raw = _random_raw(tid, 3, 512, np.random.default_rng(tid))
    np.testing.assert_array_equal(dequantize_xp(np, tid, raw, 512), dequantize(_cpu_view(raw, tid), tid))


def test_xp_matmul_gemm_and_row_exact():
    rng = np.random.default_rng(0)
    xk = XpKernels(np)
    for tid in (2, 12, 14, 0):
        raw = _random_raw(tid, 40, 256, rng)
        bias = rng.standard_normal(40).astype(F32)
        W = xk.upload(_Lin(tid, raw, 40, 256, bias))
        x = rng.standard_normal((5, 256)).astype(F32)
        ref = x.astype(np.float64) @ dequantize(_cpu_view(raw, tid), tid).T.astype(np.float64) + bias
        a, b = xk.matmul(W, x, False), xk.matmul(W, x, True)
        assert _rel(a, ref) < 1e-5 and _rel(b, ref) < 1e-5
        np.testing.assert_array_equal(xk.matmul(W, x[2:3], False)[0], a[2])  # row-exact


def test_xp_ops_match_cpu_kernels():
    rng = np.random.default_rng(1)
    xk = XpKernels(np)
    x = rng.standard_normal((6, 96)).astype(F32)
    w = (1 + 0.1 * rng.standard_normal(96)).astype(F32)
    out = np.empty_like(x)
    Ko.rms_norm(x, w, 1e-6, out)
    assert _rel(xk.rms_norm(x, w, 1e-6), out) < 1e-6
    for neox in (False, True):
        q = rng.standard_normal((3, 4, 16)).astype(F32)
        pos = np.arange(5, 8)
        cos, sin = np.empty((3, 4), F32), np.empty((3, 4), F32)
        Ko.rope_cache(pos, 8, 10000.0, 1.0, np.ones(4, F32), 0.0, 1.0, 32.0, 1.0, 2048, cos, sin)
        a = q.copy()
        Ko.rope_apply(a, cos, sin, 8, neox)
        b = q.copy()
        xk.rope(b, cos, sin, 8, neox)
        np.testing.assert_array_equal(a, b)
    g, u = (4 * rng.standard_normal((3, 50))).astype(F32), rng.standard_normal((3, 50)).astype(F32)
    o = np.empty_like(g)
    Ko.geglu_tanh(g, u, o)
    np.testing.assert_array_equal(xk.geglu(g, u), o)
    Ko.swiglu(g, u, o)
    assert _rel(xk.swiglu(g, u), o) < 1e-6
    # attention with GQA and a sliding window, caches holding fp16 values
    T, H, Hkv, hd, n_ctx, p0 = 4, 4, 2, 16, 32, 9
    k = rng.standard_normal((T + p0, Hkv, hd)).astype(F32)
    v = rng.standard_normal((T + p0, Hkv, hd)).astype(F32)
    kc, vc = np.zeros((Hkv, n_ctx, hd), F32), np.zeros((Hkv, n_ctx, hd), F32)
    Ko.store_kv(k, v, kc, vc, 0)
    kc16, vc16 = np.zeros((Hkv, n_ctx, hd), np.float16), np.zeros((Hkv, n_ctx, hd), np.float16)
    xk.store_kv(k, v, kc16, vc16, 0)
    np.testing.assert_array_equal(kc16.astype(F32), kc)
    q = rng.standard_normal((T, H, hd)).astype(F32)
    pos = np.arange(p0, p0 + T)
    for swa in (0, 5):
        ref = np.empty((T, H, hd), F32)
        Ko.attention(q, kc, vc, pos, p0 + T, 0.25, swa, ref)
        assert _rel(xk.attention(q, kc16, vc16, pos, p0 + T, 0.25, swa), ref) < 1e-5


def _paged_case(rng, Hkv=2, d=16, dv=16, bs=8, lens=(5, 23, 40), n_blocks=16):
    """Three sequences over one paged pool with interleaved block tables: (k/v rows per sequence, slots per
    sequence, tables (n_seq, max_blocks) int32, n_kv)."""
    free = list(rng.permutation(n_blocks))
    tables = np.zeros((len(lens), -(-max(lens) // bs)), np.int32)
    for i, n in enumerate(lens):
        for j in range(-(-n // bs)):
            tables[i, j] = free.pop()
    slots = [tables[i, np.arange(n) // bs].astype(np.int64) * bs + np.arange(n) % bs for i, n in enumerate(lens)]
    kv = [(rng.standard_normal((n, Hkv, d)).astype(F32), rng.standard_normal((n, Hkv, dv)).astype(F32)) for n in lens]
    return kv, slots, tables, np.array(lens, np.int64)


def test_xp_paged_kv_and_attention_match_cpu_kernels():
    """store_kv_slots / attention_paged of the xp device kernels against the CPU kernels, on a pool whose
    sequences' blocks are interleaved, with GQA and a sliding window; rows of several sequences in one call."""
    rng = np.random.default_rng(4)
    xk = XpKernels(np)
    Hq, Hkv, d, bs, nb = 4, 2, 16, 8, 16
    kv, slots, tables, n_kv = _paged_case(rng, Hkv, d, d, bs, n_blocks=nb)
    kc, vc = np.zeros((Hkv, nb * bs, d), Ko.KV_DTYPE), np.zeros((Hkv, nb * bs, d), Ko.KV_DTYPE)
    kc16, vc16 = np.zeros((Hkv, nb * bs, d), np.float16), np.zeros((Hkv, nb * bs, d), np.float16)
    for (k, v), sl in zip(kv, slots):
        Ko.store_kv_slots(k, v, kc, vc, sl)
        xk.store_kv_slots(k, v, kc16, vc16, sl)
    as_f32 = (lambda a: a.view(np.float16).astype(F32)) if Ko.KV_DTYPE == np.uint16 else (lambda a: a)
    np.testing.assert_array_equal(kc16.astype(F32), as_f32(kc))
    np.testing.assert_array_equal(vc16.astype(F32), as_f32(vc))
    pos = np.concatenate([np.arange(n - min(n, 4), n) for n in n_kv]).astype(np.int64)
    row_seq = np.repeat(np.arange(3), [min(n, 4) for n in n_kv]).astype(np.int64)
    q = rng.standard_normal((pos.shape[0], Hq, d)).astype(F32)
    for swa in (0, 6):
        ref = np.empty_like(q)
        Ko.attention_paged(q, kc, vc, pos, row_seq, tables, bs, n_kv, 0.25, swa, ref)
        assert _rel(xk.attention_paged(q, kc16, vc16, pos, row_seq, tables, bs, n_kv, 0.25, swa), ref) < 1e-5


def test_xp_deltanet_ops_match_cpu_kernels():
    rng = np.random.default_rng(2)
    xk = XpKernels(np)
    T, C, Dc, Hk, Hv, S = 5, 24, 4, 2, 4, 8
    m = rng.standard_normal((T, C)).astype(F32)
    cs = rng.standard_normal((C, Dc - 1)).astype(F32)
    w = rng.standard_normal((C, Dc)).astype(F32)
    out, snaps, cs1 = np.empty((T, C), F32), np.empty((T, C, Dc - 1), F32), cs.copy()
    Dn.conv1d_silu(m, cs1, w, out, snaps)
    cs2 = cs.copy()
    o2, s2 = xk.conv1d_silu(m, cs2, w, T)
    assert _rel(o2, out) < 1e-5
    np.testing.assert_array_equal(s2, snaps)
    np.testing.assert_array_equal(cs2, cs1)
    q = rng.standard_normal((T, Hk, S)).astype(F32)
    qn = np.empty_like(q)
    Dn.l2_norm_heads(q, 1e-6, qn)
    assert _rel(xk.l2_norm_heads(q, 1e-6), qn) < 1e-6
    k = xk.l2_norm_heads(rng.standard_normal((T, Hk, S)).astype(F32), 1e-6)
    v = rng.standard_normal((T, Hv, S)).astype(F32)
    a, b = rng.standard_normal((T, Hv)).astype(F32), rng.standard_normal((T, Hv)).astype(F32)
    dt, sa = rng.standard_normal(Hv).astype(F32), -np.exp(rng.standard_normal(Hv)).astype(F32)
    g1, b1 = np.empty((T, Hv), F32), np.empty((T, Hv), F32)
    Dn.gdn_gates(a, b, dt, sa, g1, b1)
    g2, b2 = xk.gdn_gates(a, b, dt, sa)
    assert _rel(g2, g1) < 1e-6 and _rel(b2, b1) < 1e-6
    st = (0.1 * rng.standard_normal((Hv, S, S))).astype(F32)
    st1, st2 = st.copy(), st.copy()
    o1, sn1 = np.empty((T, Hv, S), F32), np.empty((T, Hv, S, S), F32)
    Dn.gated_delta_rule(qn, k, v, g1, b1, st1, o1, sn1)
    o2, sn2 = xk.delta_rule(qn, k, v, g1, b1, st2, T)
    assert _rel(o2, o1) < 1e-5 and _rel(st2, st1) < 1e-5 and _rel(sn2, sn1) < 1e-5
    z = rng.standard_normal((T, Hv, S)).astype(F32)
    nw = rng.standard_normal(S).astype(F32)
    y = np.empty_like(o1)
    Dn.gated_rms_norm(o1, z, nw, 1e-6, y)
    assert _rel(xk.gated_rms_norm(o1, z, nw, 1e-6), y) < 1e-6


# ====================================================================================================
# the offload code path with numpy standing in for CuPy
# ====================================================================================================

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("offload")
    return {
        "llama": write_model(d / "llama.gguf", "llama", qtype=QT.Q8_0, n_layer=3, seed=11),
        "gemma3": write_model(d / "gemma3.gguf", "gemma3", qtype=QT.Q4_0, n_layer=3, seed=12),
        "qwen2": write_model(d / "qwen2.gguf", "qwen2", qtype=QT.Q8_0, n_layer=3, seed=15, tied=False),
        "phi3": write_model(d / "phi3.gguf", "phi3", qtype=QT.Q8_0, n_layer=3, seed=18, tied=False),
        "qwen3moe": write_model(d / "qwen3moe.gguf", "qwen3moe", qtype=QT.Q8_0, n_layer=3, seed=16),  # MoE on CPU
        "qwen35": write_qwen35(d / "qwen35.gguf", qtype=QT.Q8_0, n_layer=4, mtp=True, seed=13),
        # MoE FFNs (8 experts, top-2, fused gate_up) in every block and the MTP block: they stay on the CPU
        "qwen35moe": write_qwen35(d / "qwen35moe.gguf", qtype=QT.Q8_0, n_layer=4, mtp=True, seed=14, n_expert=8,
                                  n_expert_used=2, fused_exps=True),
    }


PROMPT = [int(t) for t in np.random.default_rng(7).integers(0, 300, 36)]  # >= 32: the GEMM prefill path


def _run(llm):
    """Logits of (1) the prompt through the GEMM prefill path, (2) small batches appended to the cache through
    the GEMM path (float activations on the CPU too), (3) row-exact decode: a 3-token batch and single steps
    (on the CPU: activations quantized to int8 like llama.cpp's vec_dot)."""
    m = llm.model
    m.reset()
    pre = m.forward(PROMPT, logits="all", gemm=True)
    m.reset()
    gemm = np.concatenate([m.forward(PROMPT[a:b], logits="all", gemm=True) for a, b in ((0, 5), (5, 8), (8, 10))])
    m.reset()
    steps = [m.forward(PROMPT[:5], gemm=False), m.forward(PROMPT[5:8], logits="all", gemm=False)]
    steps += [m.forward([t], gemm=False) for t in PROMPT[8:11]]
    m.reset()
    return pre, gemm, np.concatenate(steps)


@pytest.fixture(scope="module")
def cpu_ref(tiny):
    return {arch: _run(Llama(str(p), n_ctx=96, verbose=False)) for arch, p in tiny.items()}


def _placements(n_all):
    """(n_gpu_layers, devices, tensor_split): -ngl 0, half, all, and all over two fake devices."""
    return [(0, 1, None), (n_all // 2, 1, None), (n_all, 1, None), (B.NGL_ALL, 2, [1, 1])]


_XP_SLOW = pytest.mark.slow  # (the host-kernel runs cover these architectures in the fast tier)


@pytest.mark.parametrize("kernels,arch", [
    pytest.param(k, a, marks=_XP_SLOW) if k == "xp" and a in ("phi3", "qwen2", "qwen3moe") else (k, a)
    for k in ("host", "xp") for a in ["llama", "gemma3", "phi3", "qwen2", "qwen3moe", "qwen35", "qwen35moe"]])
def test_offload_logits_match_cpu(tiny, cpu_ref, arch, kernels):
    """host kernels: bit-identical to the CPU path. xp kernels (float activations, as on the GPU): where the CPU
    also uses float activations (the GEMM path) they agree to 1e-4, with the same argmax everywhere; on the
    row-exact decode path, where the CPU quantizes activations to int8 (llama.cpp's vec_dot), to 8e-2."""
    ref_pre, ref_gemm, ref_dec = cpu_ref[arch]
    llm = Llama(str(tiny[arch]), n_ctx=96, verbose=False)
    n_all = llm.model.config.n_layer_all + 1
    for ngl, ndev, split in _placements(n_all):
        llm = Llama(str(tiny[arch]), n_ctx=96, verbose=False)
        devs = B.fake_devices(ndev, kernels)
        info = offload_model(llm.model, ngl, devices=devs, tensor_split=split)
        pre, gemm, dec = _run(llm)
        if ngl == 0:
            assert info is None
        else:
            n_off = n_all if ngl < 0 else ngl
            assert info.n_offloaded == n_off and info.placement[-1] is not None
            if ndev == 2:
                assert set(info.placement) == {0, 1}
                assert devs[1].n_transfers > 0  # activations crossed the split boundary
        if kernels == "host":
            np.testing.assert_array_equal(pre, ref_pre)
            np.testing.assert_array_equal(gemm, ref_gemm)
            np.testing.assert_array_equal(dec, ref_dec)
        else:
            assert _rel(pre, ref_pre) < 1e-4 and _rel(gemm, ref_gemm) < 1e-4, (ngl, ndev)
            assert (pre.argmax(-1) == ref_pre.argmax(-1)).all() and (gemm.argmax(-1) == ref_gemm.argmax(-1)).all()
            assert _rel(dec, ref_dec) < 8e-2, (ngl, ndev)


def test_activations_cross_devices_only_at_boundaries(tiny):
    llm = Llama(str(tiny["llama"]), n_ctx=96, verbose=False)
    devs = B.fake_devices(2, "host")
    info = offload_model(llm.model, 3, devices=devs, tensor_split=[1, 1])  # layers 1, 2 | 3 (output)
    assert info.placement == [None, 0, 0, 1]
    llm.eval(PROMPT[:4])
    llm.eval(PROMPT[4:5])
    assert [d.n_transfers for d in devs] == [2, 2]  # one copy in per device per forward
    # each layer's KV cache lives on its layer's device, as fp16 values (the CPU cache type under HostKernels)
    assert llm.model.blocks[1].be.dev is devs[0] and llm.model.out_dev.be.dev is devs[1]


def test_kv_and_state_on_device_and_memory_report(tiny, capsys):
    llm = Llama(str(tiny["qwen35"]), n_ctx=64, verbose=False)
    info = offload_model(llm.model, 3, devices=B.fake_devices(1, "xp"), verbose=True)
    m = llm.model
    assert info.placement == [None, None, None, 0, 0, 0]  # block 3, the MTP block 4, the output 5
    assert m.kv.k[3].dtype == np.float16 and m.mtp.kv.k[4].dtype == np.float16  # fp16 KV on the device
    from llamba.kernels import ops as K
    assert m.kv.k[1].dtype == K.KV_DTYPE  # a CPU layer keeps the CPU cache (fp16 bits, uint16)
    from llamba.compute import CPU
    assert type(m.blocks[2]).__name__ == "Qwen35Block" and m.blocks[2].be is CPU  # one block class, two backends
    assert type(m.blocks[3]).__name__ == "Qwen35Block" and m.blocks[3].be.dev is info.devices[0]
    assert m.blocks[3].mixer.be is m.blocks[3].be and m.blocks[3].ffn.be is m.blocks[3].be
    err = capsys.readouterr().err
    assert "offloaded 3/6 layers" in err and "weights" in err and "KV cache" in err


def test_qwen35moe_offload_keeps_moe_ffn_on_cpu(tiny, capsys):
    """qwen35moe: the offloaded blocks (and the MTP block) run on the device except their MoE FFNs, which stay
    on the CPU (HostMoE, like llama.cpp's --cpu-moe) and take no device memory."""
    from llamba.models.moe import MoEFFN
    from llamba.compute import HostFFN
    from llamba.offload import _param_bytes, layer_bytes
    llm = Llama(str(tiny["qwen35moe"]), n_ctx=64, verbose=False)
    m = llm.model
    # the placement estimate counts a block without its MoE FFN
    blk = m.blocks[1]
    assert _param_bytes(blk.ffn, set()) == 0 and blk.ffn.gate_up_exps.nbytes > 0
    assert layer_bytes(m)[1] == _param_bytes(blk.mixer, set()) + blk.attn_norm.nbytes + \
        blk.post_attention_norm.nbytes + m.kv.k[1].size * 4
    info = offload_model(m, B.NGL_ALL, devices=B.fake_devices(1, "host"), verbose=True)
    assert info.n_offloaded == 6 and info.n_cpu_moe == 5
    for b in m.blocks + [m.mtp.out_dev.block]:
        assert type(b).__name__ == "Qwen35Block" and b.be.dev is info.devices[0]
        assert isinstance(b.ffn, HostFFN) and isinstance(b.ffn.ffn, MoEFFN)
        assert b.ffn.nbytes == 0
    err = capsys.readouterr().err
    assert "offloaded 6/6 layers" in err and "MoE FFNs" in err and "5 offloaded layers" in err


def test_qwen35moe_ngl_through_api_and_mtp_on_device(tiny, monkeypatch):
    """`n_gpu_layers` on a qwen35moe model (stand-in devices found by discovery): no crash, the CPU's logits,
    and MTP speculation with the MoE MTP block on the device stays lossless."""
    monkeypatch.setenv("LLAMBA_FAKE_DEVICES", "2")
    monkeypatch.setenv("LLAMBA_FAKE_KERNELS", "host")
    cpu = Llama(str(tiny["qwen35moe"]), n_ctx=96, verbose=False)
    ref = cpu.eval_logits(PROMPT[:12])
    ref_gen = list(cpu.generate(PROMPT[:5], temp=0, max_tokens=12))
    for ngl in (2, -1):
        llm = Llama(str(tiny["qwen35moe"]), n_ctx=96, verbose=False, n_gpu_layers=ngl, spec="mtp", draft_max=3)
        assert llm.model.offload.n_offloaded == (2 if ngl == 2 else 6)
        np.testing.assert_array_equal(llm.eval_logits(PROMPT[:12]), ref)
        llm.reset()
        assert list(llm.generate(PROMPT[:5], temp=0, max_tokens=12)) == ref_gen


@pytest.mark.parametrize("kernels", ["host", "xp"])
def test_mtp_speculative_on_device(kernels):
    """The trained qwen35+MTP fixture: greedy generation with MTP drafts (verify batches, DeltaNet snapshot
    rollback on the device, the MTP layer and its KV cache on the device). Host kernels: the same tokens and
    the same acceptance as the CPU; xp kernels: the same greedy tokens."""
    prompt = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'

    def gen(ngl, ndev):
        llm = Llama(str(FIXTURE), n_ctx=256, verbose=False, spec="mtp", draft_max=3)
        if ngl:
            offload_model(llm.model, ngl, devices=B.fake_devices(ndev, kernels), tensor_split=[1] * ndev)
        out = llm(prompt, max_tokens=16 if kernels == "host" else 10, temperature=0)
        st = llm.spec_stats
        return out["choices"][0]["text"], (st.n_drafted, st.n_accepted)

    ref = gen(0, 1)
    assert ref[1][1] > 0  # the trained MTP head gets drafts accepted: verify + rollback both run
    n_all = Llama(str(FIXTURE), n_ctx=64, verbose=False).model.config.n_layer_all + 1
    for ngl, ndev in ((2, 1), (n_all, 2)):
        got = gen(ngl, ndev)
        assert got[0] == ref[0]
        if kernels == "host":
            assert got[1] == ref[1]


def _engine_cases(n_vocab, n=6, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, n_vocab - 1, size=int(rng.integers(2, 30)))] for _ in range(n)]
    temps = [0.0 if i % 2 == 0 else 0.9 for i in range(n)]
    seeds = [None if i % 2 == 0 else 100 + i for i in range(n)]
    maxt = [int(rng.integers(4, 16)) for _ in range(n)]
    return prompts, temps, seeds, maxt


@pytest.mark.parametrize("kernels,arch,spec", [
    pytest.param(k, a, s, marks=pytest.mark.slow) if (a, s) in (("gemma3", "none"), ("qwen35moe", "mtp")) else (k, a, s)
    for k in ("host", "xp")
    for a, s in [("llama", "none"), ("gemma3", "none"), ("qwen35", "mtp"), ("qwen35moe", "mtp"), ("qwen35", "ngram")]])
def test_offload_engine_batch_invariance(tiny, arch, spec, kernels):
    """Offloaded layers serve several sequences in one batch (llamba.scheduler.Engine: paged KV with block
    tables and per-sequence DeltaNet states on the stand-in devices, MTP drafts batched): every request gets
    exactly the tokens it gets alone on the same offloaded model, for a partial offload (the CPU/device boundary
    inside the trunk) and everything over two devices; with host kernels, also the CPU's tokens."""
    from llamba.scheduler import Engine
    cpu = Llama(str(tiny[arch]), n_ctx=256, verbose=False, seed=1)
    n_vocab = cpu.n_vocab()
    prompts, temps, seeds, maxt = _engine_cases(min(n_vocab, 300))

    def params(llm, t, sd):
        return llm.make_sampler(t, 40, 0.95, 0.05, 1.0, 1.0, 0.0, 0.0, sd, None).params

    def alone(llm):
        out = []
        for p, t, sd, m in zip(prompts, temps, seeds, maxt):
            out.append(list(llm.generate(p, temp=t, seed=sd, max_tokens=m)))
            llm.reset()
        return out

    ref = alone(cpu) if kernels == "host" else None
    n_all = cpu.model.config.n_layer_all + 1
    for ngl, ndev in ((n_all // 2 + 1, 1), (n_all, 2)):
        llm = Llama(str(tiny[arch]), n_ctx=256, verbose=False, seed=1)
        devs = B.fake_devices(ndev, kernels)
        info = offload_model(llm.model, ngl, devices=devs, tensor_split=[1] * ndev)
        assert info.n_offloaded == ngl
        solo = alone(llm)
        if ref is not None:
            assert solo == ref
        eng = Engine(llm.model, n_ctx=1024, n_parallel=len(prompts), block_size=16, step_tokens=48, spec=spec,
                     draft_max=3, spec_rows=32, lock=llm.session.lock)
        il = max(il for il, p in enumerate(info.placement[:-1]) if p is not None)
        if il in eng.pool.k:  # an offloaded layer's paged KV lives on its device (fp16), a CPU layer's on the CPU
            assert eng.pool.k[il].dtype == devs[-1].kernels.kv_dtype
        reqs = [eng.submit(p, params(llm, t, sd), m) for p, t, sd, m in zip(prompts, temps, seeds, maxt)]
        eng.run_until_done()
        assert [r.tokens() for r in reqs] == solo, (ngl, ndev)
        assert eng.stats["steps"] < sum(maxt)  # several sequences per step
        if spec == "mtp":
            assert eng.stats["drafted"] > 0
        for sq in list(eng.idle.values()):
            sq.release()
        assert eng.pool.n_free == eng.pool.n_blocks


def test_offloaded_llama_serves_n_parallel(tiny, monkeypatch):
    """Llama(n_parallel=4) with -ngl on stand-in devices starts the batching engine (no one-sequence fallback)
    and generate_batch gives each prompt its own tokens."""
    monkeypatch.setenv("LLAMBA_FAKE_DEVICES", "2")
    monkeypatch.setenv("LLAMBA_FAKE_KERNELS", "host")
    prompts = [PROMPT[:5], PROMPT[3:20], PROMPT[10:12], PROMPT[:30]]
    cpu = Llama(str(tiny["qwen35"]), n_ctx=256, verbose=False)
    ref = []
    for p in prompts:
        ref.append(list(cpu.generate(p, temp=0, max_tokens=8)))
        cpu.reset()
    llm = Llama(str(tiny["qwen35"]), n_ctx=256, verbose=False, n_gpu_layers=-1, n_parallel=4, spec="mtp")
    assert llm.model.offload.n_offloaded == 6 and llm.engine is not None and llm.concurrent
    assert llm.generate_batch(prompts, max_tokens=8, temperature=0) == ref


@pytest.mark.slow  # a `llamba run` subprocess per model
@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe"])
def test_offload_with_fake_devices_through_cli(tiny, arch):
    """`llamba run -ngl all --tensor-split 3,1` on two stand-in devices prints the CPU's greedy text."""
    env = dict(os.environ)
    env.pop("LLAMBA_FAKE_DEVICES", None)
    cmd = [sys.executable, "-m", "llamba.cli", "run", "-m", str(tiny[arch]), "-p", "the cat", "-n", "8",
           "--temp", "0", "-c", "64", "--spec", "none"]
    cpu = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    env.update(LLAMBA_FAKE_DEVICES="2", LLAMBA_FAKE_KERNELS="host")
    dev = subprocess.run(cmd + ["-ngl", "all", "--tensor-split", "3,1", "--verbose"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert cpu.returncode == 0 and dev.returncode == 0, dev.stderr
    assert dev.stdout == cpu.stdout and cpu.stdout.strip()
    assert "offloaded 6/6 layers" in dev.stderr and "warning" not in dev.stderr


# ====================================================================================================
# no GPU, no crash
# ====================================================================================================

def _no_gpu_env():
    """An environment in which discovery finds no device: the real one when CuPy/CUDA is absent, else the
    stand-in switch set to zero devices."""
    env = dict(os.environ)
    env.pop("LLAMBA_FAKE_DEVICES", None)
    devs, _ = B._discover_cuda()
    if devs:
        env["LLAMBA_FAKE_DEVICES"] = "0"
    return env


@pytest.mark.slow  # a `llamba run` subprocess
def test_cli_ngl_without_gpu_warns_once_and_runs(tiny):
    env = _no_gpu_env()
    r = subprocess.run([sys.executable, "-m", "llamba.cli", "run", "-m", str(tiny["llama"]), "-p", "the cat",
                        "-n", "6", "--temp", "0", "-c", "64", "-ngl", "8", "--tensor-split", "1,1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    warns = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warns) == 1 and "running on the CPU" in warns[0] and "8" in warns[0], r.stderr
    assert r.stdout.strip()  # output produced
    r0 = subprocess.run([sys.executable, "-m", "llamba.cli", "run", "-m", str(tiny["llama"]), "-p", "the cat",
                         "-n", "6", "--temp", "0", "-c", "64"], capture_output=True, text=True, env=env, timeout=300)
    assert r0.stdout == r.stdout and "warning" not in r0.stderr


def test_gemma2_is_not_offloaded_yet(tmp_path, capsys):
    """gemma2's attention logit soft-capping has no device kernel yet: -ngl warns once and the model runs on the
    CPU with the same logits."""
    p = write_model(tmp_path / "g2.gguf", "gemma2", qtype=QT.Q8_0, n_layer=2, seed=17)
    llm = Llama(str(p), n_ctx=64, verbose=False)
    ref = llm.eval_logits([1, 2, 3])
    assert offload_model(llm.model, B.NGL_ALL, devices=B.fake_devices(1, "host")) is None
    assert "soft-capping" in capsys.readouterr().err
    assert llm.model.out_dev is None and np.array_equal(llm.eval_logits([1, 2, 3]), ref)


def test_api_ngl_without_gpu_warns_once(tiny, capsys, monkeypatch):
    monkeypatch.setattr(B, "_discover_cuda", lambda: ([], "CuPy is not installed (test)"))
    monkeypatch.delenv("LLAMBA_FAKE_DEVICES", raising=False)
    a = Llama(str(tiny["llama"]), n_ctx=64, verbose=False, n_gpu_layers=-1)
    b = Llama(str(tiny["llama"]), n_ctx=64, verbose=False, n_gpu_layers=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CuPy is not installed (test)" in err[0] and err[0].startswith("llamba: warning:")
    assert getattr(a.model, "offload", None) is None and a.model.out_dev is None
    assert b.eval_logits([1, 2, 3]).shape == (3, b.n_vocab())
    Llama(str(tiny["llama"]), n_ctx=64, verbose=False, n_gpu_layers=0)
    assert capsys.readouterr().err == ""


def test_split_mode_row_is_a_clear_error(tiny):
    r = subprocess.run([sys.executable, "-m", "llamba.cli", "run", "-m", str(tiny["llama"]), "-p", "x", "-n", "2",
                        "-ngl", "4", "--split-mode", "row"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("llamba: error:") and \
        "row" in r.stderr


def test_info_devices():
    env = dict(os.environ)
    env.pop("LLAMBA_FAKE_DEVICES", None)
    r = subprocess.run([sys.executable, "-m", "llamba.cli", "info", "--devices"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("devices:")
    devs, why = B._discover_cuda()
    if devs:
        assert "GiB free" in r.stdout
    else:
        assert f"devices: none ({why})" in r.stdout and ("CuPy" in why or "CUDA" in why or "GPU" in why)
    env["LLAMBA_FAKE_DEVICES"] = "2:1024,512"
    r = subprocess.run([sys.executable, "-m", "llamba.cli", "info", "--devices"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.stdout.splitlines()[0] == "devices: 2" and "1.0 GiB total" in r.stdout


# ====================================================================================================
# the CUDA C kernels, compiled with g++ and run on a CPU emulator of CUDA's thread model
# ====================================================================================================

_EMU_SHIM = r"""
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <ucontext.h>
#include <vector>
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another. A fiber
// runs until it reaches a barrier (__syncthreads, or the warp barriers inside a shuffle) or exits; a barrier
// opens as soon as every thread of its block / warp that has not exited waits at it. The scheduler always
// runs the leading warp's threads first (warp 0 on even launches, the last warp on odd ones), so one warp
// races as far ahead of the others as the barriers allow and a missing barrier shows up as wrong results.
// A block that cannot progress (a barrier some live thread never reaches) aborts the process.
struct emu_dim3 { unsigned x, y, z; };
static emu_dim3 blockIdx, blockDim, gridDim, threadIdx;
enum { EMU_RUN, EMU_WAIT_BLOCK, EMU_WAIT_WARP, EMU_DONE };
struct emu_fiber { ucontext_t ctx; int state; };
static ucontext_t emu_main;
static std::vector<emu_fiber> emu_f;
static std::vector<std::vector<char>> emu_stacks;
static unsigned emu_cur;
static std::function<void()>* emu_body;
static double emu_slot[1024];
static unsigned emu_launches = 0;
#define __global__
#define __device__
#define __forceinline__ inline
#define __constant__
#define __shared__ static
static void emu_wait(int kind) {
    const unsigned me = emu_cur;
    emu_f[me].state = kind;
    swapcontext(&emu_f[me].ctx, &emu_main);
    asm volatile("" ::: "memory");  // other fibers wrote shared memory meanwhile
    emu_cur = me;
    threadIdx = {me, 0, 0};
}
static inline void __syncthreads() { emu_wait(EMU_WAIT_BLOCK); }
template <class T> static T __shfl_xor_sync(unsigned, T v, int m) {
    const unsigned tid = threadIdx.x;
    emu_slot[tid] = (double)v;
    emu_wait(EMU_WAIT_WARP);
    const T r = (T)emu_slot[(tid & ~31u) | ((tid & 31u) ^ (unsigned)m)];
    emu_wait(EMU_WAIT_WARP);
    return r;
}
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static void emu_entry() {
    (*emu_body)();
    emu_f[emu_cur].state = EMU_DONE;
}
template <class F> static void emu_launch(unsigned gx, unsigned gy, unsigned bx, F&& body) {
    std::function<void()> fb(body);
    emu_body = &fb;
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    emu_f.resize(bx);
    while (emu_stacks.size() < bx) emu_stacks.emplace_back(1 << 16);
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
            blockIdx = {x, y, 0};
            for (unsigned t = 0; t < bx; ++t) {
                getcontext(&emu_f[t].ctx);
                emu_f[t].ctx.uc_stack.ss_sp = emu_stacks[t].data();
                emu_f[t].ctx.uc_stack.ss_size = emu_stacks[t].size();
                emu_f[t].ctx.uc_link = &emu_main;
                makecontext(&emu_f[t].ctx, emu_entry, 0);
                emu_f[t].state = EMU_RUN;
            }
            std::vector<unsigned> run;
            const bool rev = (emu_launches++ & 1u) != 0;  // warp 0 leads, or the last warp: alternately
            const unsigned nw = (bx + 31) / 32;
            for (;;) {
                run.clear();
                for (unsigned t = 0; t < bx; ++t)
                    if (emu_f[t].state == EMU_RUN) run.push_back(t);
                if (run.empty()) {
                    bool live = false;
                    for (unsigned t = 0; t < bx; ++t) live |= emu_f[t].state != EMU_DONE;
                    if (!live) break;
                    std::abort();  // deadlock: a barrier that not every live thread of its block/warp reaches
                }
                unsigned t = run[0], best = ~0u;  // the runnable thread of the leading warp ...
                for (unsigned u : run) {
                    const unsigned key = ((rev ? nw - 1 - (u >> 5) : (u >> 5)) << 5) | (u & 31u);
                    if (key < best) best = key, t = u;
                }
                emu_cur = t;
                threadIdx = {t, 0, 0};
                swapcontext(&emu_main, &emu_f[t].ctx);  // ... runs to its next barrier or its end
                const unsigned w0 = t & ~31u, w1 = w0 + 32 < bx ? w0 + 32 : bx;
                bool warp_ready = true, warp_any = false, block_ready = true, block_any = false;
                for (unsigned u = w0; u < w1; ++u) {
                    warp_ready &= emu_f[u].state == EMU_DONE || emu_f[u].state == EMU_WAIT_WARP;
                    warp_any |= emu_f[u].state == EMU_WAIT_WARP;
                }
                if (warp_ready && warp_any)  // barriers open as soon as they can: warps race ahead
                    for (unsigned u = w0; u < w1; ++u)
                        if (emu_f[u].state == EMU_WAIT_WARP) emu_f[u].state = EMU_RUN;
                for (unsigned u = 0; u < bx; ++u) {
                    block_ready &= emu_f[u].state == EMU_DONE || emu_f[u].state == EMU_WAIT_BLOCK;
                    block_any |= emu_f[u].state == EMU_WAIT_BLOCK;
                }
                if (block_ready && block_any)
                    for (unsigned u = 0; u < bx; ++u)
                        if (emu_f[u].state == EMU_WAIT_BLOCK) emu_f[u].state = EMU_RUN;
            }
        }
}
"""


def _emu_wrappers(src: str) -> str:
    """extern "C" emu_<kernel>(grid.x, grid.y, block.x, void** args) for every kernel in src."""
    out = []
    for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', src):
        types = []
        for p in params.split(","):
            p = p.replace("__restrict__", "").strip()
            types.append(p[:p.rfind(" ")].strip())
        args = ", ".join(f"*({t}*)a[{i}]" for i, t in enumerate(types))
        out.append(f'extern "C" void emu_{name}(unsigned gx, unsigned gy, unsigned bx, void** a) '
                   f'{{ emu_launch(gx, gy, bx, [&] {{ {name}({args}); }}); }}')
    return "\n".join(out)


class _EmuFunction:
    """Called like a cupy RawKernel: f(grid, block, args) with numpy arrays and np.int32/int64/float32."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, grid, block, args, shared_mem=0):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        assert grid[2] == 1 and tuple(block)[1:] in ((), (1,), (1, 1))
        keep = []
        for a in args:
            if isinstance(a, np.ndarray):
                keep.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, (np.int32, np.int64, np.float32)):
                ctype = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.float32: ctypes.c_float}[type(a)]
                keep.append(ctype(a))
            else:
                raise TypeError(f"kernel argument {a!r} of type {type(a).__name__}")
        ptrs = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.pointer(k), ctypes.c_void_p) for k in keep])
        self.fn(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(block[0]), ptrs)


class _EmuModule:
    def __init__(self, lib):
        self.lib = lib

    def get_function(self, name):
        return _EmuFunction(getattr(self.lib, "emu_" + name))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: cannot build the CUDA emulator")
    d = tmp_path_factory.mktemp("cuda_emu")
    (d / "emu.cpp").write_text(_EMU_SHIM + CUDA_SOURCE + "\n" + _emu_wrappers(CUDA_SOURCE))
    r = subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas",
                        "-o", str(d / "emu.so"), str(d / "emu.cpp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return CudaKernels(np, _EmuModule(ctypes.CDLL(str(d / "emu.so"))))


def test_cuda_source_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    src = tmp_path / "k.cu"
    src.write_text(CUDA_SOURCE)
    r = subprocess.run([nvcc, "-arch=sm_80", "-ptx", "--std=c++14", "-o", str(tmp_path / "k.ptx"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ptx = (tmp_path / "k.ptx").read_text()
    for name in [f"mmv_{n}" for n in CUDA_TYPES.values()] + ["attn_f16kv_paged", "store_kv_f16", "gdn_rule",
                                                               "rms_norm_f32", "rope_f32"]:
        assert f".entry {name}(" in ptx


@pytest.mark.parametrize("tid", list(CUDA_TYPES), ids=[CUDA_TYPES[t] for t in CUDA_TYPES])
def test_emulated_cuda_matvec_and_dequant(emu, tid):
    rng = np.random.default_rng(100 + tid)
    rows, cols = 9, 512
    raw = _random_raw(tid, rows, cols, rng)
    W = emu.upload(_Lin(tid, raw, rows, cols, rng.standard_normal(rows).astype(F32)))
    np.testing.assert_array_equal(emu.dequant(W), dequantize(_cpu_view(raw, tid), tid))  # bit-exact
    x = rng.standard_normal((10, cols)).astype(F32)  # 10 tokens: two MMV_NT passes
    ref = XpKernels(np).matmul(W, x, True)
    a = emu.matmul(W, x, False)
    assert _rel(a, ref) < 1e-5 and _rel(emu.matmul(W, x, True), ref) < 1e-5
    np.testing.assert_array_equal(emu.matmul(W, x[3:4], False)[0], a[3])  # row-exact


def test_emulated_cuda_ops(emu):
    rng = np.random.default_rng(5)
    xk = XpKernels(np)
    x = rng.standard_normal((5, 300)).astype(F32)
    w = rng.standard_normal(300).astype(F32)
    np.testing.assert_array_equal(emu.rms_norm(x, w, 1e-6), xk.rms_norm(x, w, 1e-6))
    for neox in (True, False):
        q = rng.standard_normal((3, 4, 16)).astype(F32)
        c, s = rng.standard_normal((3, 4)).astype(F32), rng.standard_normal((3, 4)).astype(F32)
        a, b = q.copy(), q.copy()
        emu.rope(a, c, s, 8, neox)
        xk.rope(b, c, s, 8, neox)
        np.testing.assert_array_equal(a, b)
    g, u = (6 * rng.standard_normal((4, 100))).astype(F32), rng.standard_normal((4, 100)).astype(F32)
    assert _rel(emu.swiglu(g, u), xk.swiglu(g, u)) < 1e-6
    np.testing.assert_array_equal(emu.geglu(g, u), xk.geglu(g, u))
    # attention: GQA, > 128 keys (several online-softmax chunks), head size 256, sliding window, empty rows
    for T, H, Hkv, dk, dv, p0, swa in [(3, 4, 2, 16, 16, 0, 0), (2, 4, 1, 64, 32, 150, 0), (3, 2, 2, 256, 256, 20, 8)]:
        n_ctx, n_kv = 200, p0 + T
        kc, vc = np.zeros((Hkv, n_ctx, dk), np.float16), np.zeros((Hkv, n_ctx, dv), np.float16)
        kc[:, :n_kv] = rng.standard_normal((Hkv, n_kv, dk))
        vc[:, :n_kv] = rng.standard_normal((Hkv, n_kv, dv))
        q = rng.standard_normal((T, H, dk)).astype(F32)
        pos = np.arange(p0, p0 + T, dtype=np.int64)
        want = xk.attention(q, kc, vc, pos, n_kv, 0.125, swa)
        assert _rel(emu.attention(q, kc, vc, pos, n_kv, 0.125, swa), want) < 1e-5
    # gated delta rule with snapshots, S up to 128, several v-heads per k-head
    for T, Hk, Hv, S, ns in [(4, 2, 4, 16, 4), (2, 2, 2, 128, 0)]:
        q = xk.l2_norm_heads(rng.standard_normal((T, Hk, S)).astype(F32), 1e-6)
        k = xk.l2_norm_heads(rng.standard_normal((T, Hk, S)).astype(F32), 1e-6)
        v = rng.standard_normal((T, Hv, S)).astype(F32)
        gg = -np.abs(rng.standard_normal((T, Hv))).astype(F32)
        be = rng.random((T, Hv)).astype(F32)
        st = rng.standard_normal((Hv, S, S)).astype(F32)
        s1, s2 = st.copy(), st.copy()
        o1, sn1 = emu.delta_rule(q, k, v, gg, be, s1, ns)
        o2, sn2 = xk.delta_rule(q, k, v, gg, be, s2, ns)
        assert _rel(o1, o2) < 1e-5 and _rel(s1, s2) < 1e-5
        assert (sn1 is None) == (ns == 0) and (ns == 0 or _rel(sn1, sn2) < 1e-5)


def test_emulated_cuda_paged_kv_and_attention(emu):
    """The CUDA paged-KV kernels (store_kv_f16, attn_f16kv_paged) against the xp reference: interleaved block
    tables, several sequences per call, GQA, > 128 keys (several online-softmax chunks), head size 256, a
    sliding window."""
    rng = np.random.default_rng(6)
    xk = XpKernels(np)
    for Hq, Hkv, d, dv, bs, lens, swa in [(4, 2, 16, 16, 8, (5, 23, 40), 0), (2, 1, 64, 32, 16, (150, 3), 0),
                                          (2, 2, 256, 256, 32, (20, 70), 8)]:
        nb = sum(-(-n // bs) for n in lens) + 2
        kv, slots, tables, n_kv = _paged_case(rng, Hkv, d, dv, bs, lens, nb)
        caches = [(np.zeros((Hkv, nb * bs, d), np.float16), np.zeros((Hkv, nb * bs, dv), np.float16)) for _ in (0, 1)]
        for (k, v), sl in zip(kv, slots):
            emu.store_kv_slots(k, v, *caches[0], sl)
            xk.store_kv_slots(k, v, *caches[1], sl)
        np.testing.assert_array_equal(caches[0][0], caches[1][0])
        np.testing.assert_array_equal(caches[0][1], caches[1][1])
        pos = np.concatenate([np.arange(n - min(n, 3), n) for n in n_kv]).astype(np.int64)
        row_seq = np.repeat(np.arange(len(lens)), [min(n, 3) for n in n_kv]).astype(np.int64)
        q = rng.standard_normal((pos.shape[0], Hq, d)).astype(F32)
        want = xk.attention_paged(q, *caches[1], pos, row_seq, tables, bs, n_kv, 0.125, swa)
        got = emu.attention_paged(q, *caches[0], pos, row_seq, tables, bs, n_kv, 0.125, swa)
        assert _rel(got, want) < 1e-5


@pytest.mark.slow  # the emulated CUDA kernels through a whole model (the ops themselves are checked above)
def test_emulated_cuda_model_forward(emu, tiny):
    """The qwen35+MTP tiny model with every layer on a stand-in device that computes with the CUDA kernels
    (emulated): the same logits as the xp reference kernels, for the trunk and for the MTP layer."""
    toks = PROMPT[:4]
    h0 = np.random.default_rng(0).standard_normal((2, 64)).astype(F32)
    out = []
    for kern in (emu, XpKernels(np)):
        llm = Llama(str(tiny["qwen35"]), n_ctx=96, verbose=False)
        dev = B.Device(0, "stand-in", "numpy")
        dev._kernels = kern
        assert offload_model(llm.model, B.NGL_ALL, devices=[dev]).n_offloaded == 6
        out.append((llm.eval_logits(toks), llm.model.mtp.forward(toks[:2], h0, logits="all")))
    (a, ma), (b, mb) = out
    assert _rel(a, b) < 1e-4 and (a.argmax(-1) == b.argmax(-1)).all()
    assert _rel(ma, mb) < 1e-4


# ====================================================================================================
# real GPU (CuPy + CUDA); skipped without one
# ====================================================================================================

def _cuda_devices():
    devs, why = B._discover_cuda()
    if not devs:
        pytest.skip(f"no CUDA device: {why}")
    return devs


@pytest.mark.gpu
@pytest.mark.parametrize("tid", list(CUDA_TYPES), ids=[CUDA_TYPES[t] for t in CUDA_TYPES])
def test_gpu_matvec_and_dequant(tid):
    devs = _cuda_devices()
    import cupy
    with cupy.cuda.Device(devs[0].index):
        ck = CudaKernels.for_cupy(cupy)
        rng = np.random.default_rng(tid)
        rows, cols = 100, 1024
        raw = _random_raw(tid, rows, cols, rng)
        W = ck.upload(_Lin(tid, raw, rows, cols))
        np.testing.assert_array_equal(ck.dequant(W).get(), dequantize(_cpu_view(raw, tid), tid))
        x = rng.standard_normal((19, cols)).astype(F32)
        ref = XpKernels(np).matmul(XpKernels(np).upload(_Lin(tid, raw, rows, cols)), x, True)
        a = ck.matmul(W, cupy.asarray(x), False).get()
        assert _rel(a, ref) < 1e-5 and _rel(ck.matmul(W, cupy.asarray(x), True).get(), ref) < 1e-4
        np.testing.assert_array_equal(ck.matmul(W, cupy.asarray(x[5:6]), False).get()[0], a[5])


@pytest.mark.gpu
def test_gpu_ops_match_reference():
    devs = _cuda_devices()
    import cupy
    with cupy.cuda.Device(devs[0].index):
        ck, xk = CudaKernels.for_cupy(cupy), XpKernels(np)
        rng = np.random.default_rng(3)
        x = rng.standard_normal((7, 640)).astype(F32)
        w = rng.standard_normal(640).astype(F32)
        assert _rel(ck.rms_norm(cupy.asarray(x), cupy.asarray(w), 1e-6).get(), xk.rms_norm(x, w, 1e-6)) < 1e-6
        T, H, Hkv, hd, n_ctx, p0 = 5, 8, 2, 256, 1024, 700
        kc = rng.standard_normal((Hkv, n_ctx, hd)).astype(np.float16)
        vc = rng.standard_normal((Hkv, n_ctx, hd)).astype(np.float16)
        q = rng.standard_normal((T, H, hd)).astype(F32)
        pos = np.arange(p0, p0 + T, dtype=np.int64)
        for swa in (0, 512):
            a = ck.attention(cupy.asarray(q), cupy.asarray(kc), cupy.asarray(vc), cupy.asarray(pos), p0 + T,
                             0.0625, swa)
            assert _rel(a.get(), xk.attention(q, kc, vc, pos, p0 + T, 0.0625, swa)) < 1e-5
        Tq, Hk, Hv, S = 6, 2, 4, 128
        qq = xk.l2_norm_heads(rng.standard_normal((Tq, Hk, S)).astype(F32), 1e-6)
        kk = xk.l2_norm_heads(rng.standard_normal((Tq, Hk, S)).astype(F32), 1e-6)
        v = rng.standard_normal((Tq, Hv, S)).astype(F32)
        g = -np.abs(rng.standard_normal((Tq, Hv))).astype(F32)
        be = rng.random((Tq, Hv)).astype(F32)
        st = rng.standard_normal((Hv, S, S)).astype(F32)
        sd = cupy.asarray(st)
        o, sn = ck.delta_rule(*(cupy.asarray(a) for a in (qq, kk, v, g, be)), sd, Tq)
        o2, sn2 = xk.delta_rule(qq, kk, v, g, be, st.copy(), Tq)
        assert _rel(o.get(), o2) < 1e-5 and _rel(sn.get(), sn2) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen35", "qwen35moe"])
def test_gpu_offload_matches_cpu(tiny, cpu_ref, arch):
    devs = _cuda_devices()
    ref_pre, ref_gemm, ref_dec = cpu_ref[arch]
    n_all = Llama(str(tiny[arch]), n_ctx=96, verbose=False).model.config.n_layer_all + 1
    two = [devs[0], devs[1]] if len(devs) > 1 else [devs[0], B.Device(devs[0].index, devs[0].name, "cuda",
                                                                      devs[0].total, devs[0].free)]
    for ngl, dl, split in ((n_all // 2, devs[:1], None), (n_all, devs[:1], None), (n_all, two, [1, 1])):
        llm = Llama(str(tiny[arch]), n_ctx=96, verbose=False)
        offload_model(llm.model, ngl, devices=dl, tensor_split=split)
        pre, gemm, dec = _run(llm)
        assert _rel(pre, ref_pre) < 1e-3 and (pre.argmax(-1) == ref_pre.argmax(-1)).all()
        assert _rel(gemm, ref_gemm) < 1e-3 and _rel(dec, ref_dec) < 8e-2
