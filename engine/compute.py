"""Kernel backends: what a model block computes with, so that each block is written once (llamba.models) and runs
on the CPU or, offloaded, on a device (llamba.offload).

A block holds `be`, its backend, and calls only through it:

* the ops, with the CPU kernels' own signatures (output arrays passed in, in-place ops in place):
  `rope(x, cos, sin, n_rot, neox)`, `store_kv_slots(k, v, kc, vc, slots)`,
  `attention_paged(q, kc, vc, pos, row_seq, tables, bs, n_kv, scale, n_swa, out[, softcap])`,
  `sigmoid(x, out)`, `swiglu(g, u, out)`, `geglu_tanh(g, u, out)`, `gdn_gates(a, b, dt_bias, ssm_a, g, beta)`,
  `conv1d_silu(m, conv_state, w, out, snaps)`, `l2_norm_heads(x, eps, out)`,
  `gated_delta_rule(q, k, v, g, beta, state, out, snaps)`,
  `gated_rms_norm(o, z, w, eps, out)`; `rms_norm(x, w, eps)` and `softcap(y, cap)` return their result;
* `xp` (the array module of the activations), `empty(shape)`, `zeros(shape, dtype)`;
* weights: `group(lins)` (a LinearGroup: [lin(f(x)) for lin in lins] with an optional fused norm/activation),
  `linear(lin, x, gemm)` (one matrix), `param(a)` (a norm weight or small float table);
* transfers: `take(x)` (activations from the CPU or another device into this backend), `to_host(x)`.

Batch metadata (positions, slots, block tables, RoPE tables) is passed as the host arrays the CPU kernels take;
a device backend copies them over once per forward (memoized on their identity, llamba.backend.Device.cached).

`CPU` is the CPU backend: the ops *are* the Numba kernels (llamba.kernels.ops / deltanet) and the groups are
LinearGroups, so the CPU path computes exactly what it computed before backends existed, at the same speed.
`DeviceCompute(dev)` runs the same block code on a device through its device-kernel interface
(llamba.kernels.cuda: CudaKernels on a GPU, XpKernels(numpy) or llamba.offload.HostKernels on the numpy
stand-in), with weights uploaded once (`place`).
"""
from __future__ import annotations

import copy

import numpy as np

from llamba.kernels import deltanet as D
from llamba.kernels import ops as K
from llamba.layers import GEGLU, IDENTITY, RMS_NORM, SWIGLU, LinearGroup

F32 = np.float32


def _proj(lin, x, gemm):
    return lin.gemm(x) if gemm else lin(x)


def _rms_norm(x, w, eps):
    out = np.empty_like(x)
    K.rms_norm(x, w, eps, out)
    return out


def _softcap(y, cap):
    np.tanh(y / cap, out=y)
    y *= cap
    return y


class CPUCompute:
    """The CPU backend: the Numba kernels themselves."""

    name = "cpu"
    xp = np
    dev = None
    kv_dtype = K.KV_DTYPE

    rms_norm = staticmethod(_rms_norm)
    rope = staticmethod(K.rope_apply)
    store_kv_slots = staticmethod(K.store_kv_slots)
    attention_paged = staticmethod(K.attention_paged)
    sigmoid = staticmethod(K.sigmoid)
    swiglu = staticmethod(K.swiglu)
    geglu_tanh = staticmethod(K.geglu_tanh)
    gdn_gates = staticmethod(D.gdn_gates)
    conv1d_silu = staticmethod(D.conv1d_silu)
    l2_norm_heads = staticmethod(D.l2_norm_heads)
    gated_delta_rule = staticmethod(D.gated_delta_rule)
    gated_rms_norm = staticmethod(D.gated_rms_norm)
    softcap = staticmethod(_softcap)
    linear = staticmethod(_proj)
    group = LinearGroup

    @staticmethod
    def empty(shape):
        return np.empty(shape, dtype=F32)

    @staticmethod
    def zeros(shape, dtype=F32):
        return np.zeros(shape, dtype=dtype)

    @staticmethod
    def param(a):
        return a

    @staticmethod
    def index(a):
        return a

    @staticmethod
    def take(x):
        return x if isinstance(x, np.ndarray) else x.get()

    @staticmethod
    def to_host(x):
        return x


CPU = CPUCompute()


class DevGroup:
    """A LinearGroup's matrices uploaded to a device: `(x, mode, x2, norm_w, eps, gemm) -> [W @ f(x)]`, the
    transform f run by the device kernels first (as LinearGroup's unfused path does on the CPU)."""

    fused = False  # (FFN._down: the activation is applied before the down projection, never fused)
    max_t = 0

    def __init__(self, be: "DeviceCompute", lins):
        self.be = be
        self.lins = list(lins)
        self.ws = [be.weight(lin) for lin in self.lins]

    def __call__(self, x, mode=IDENTITY, x2=None, norm_w=None, eps=0.0, gemm=False):
        k = self.be.k
        if mode == RMS_NORM:
            x = k.rms_norm(x, norm_w, eps)
        elif mode == SWIGLU:
            x = k.swiglu(x, x2)
        elif mode == GEGLU:
            x = k.geglu(x, x2)
        return [k.matmul(W, x, gemm) for W in self.ws]


class DeviceCompute:
    """The backend of one device (llamba.backend.Device): its kernels (`dev.kernels`) and array module, the
    same op signatures as CPUCompute. Kernels that return new arrays are copied into the output arrays the
    block code passes (a device-side copy)."""

    def __init__(self, dev):
        self.dev = dev
        self.k = dev.kernels
        self.xp = dev.xp
        self.name = f"{dev.label}:{self.k.name}"
        self.kv_dtype = self.k.kv_dtype
        self.uploaded = 0  # bytes of weights and parameters put on the device through this backend
        self._w = {}  # id(Linear) -> (Linear, uploaded weight): a matrix shared by two layers is uploaded once

    # ---- weights
    def weight(self, lin):
        hit = self._w.get(id(lin))
        if hit is not None and hit[0] is lin:
            return hit[1]
        with self.dev.activate():
            W = self.k.upload(lin)
        self.uploaded += int(getattr(W, "nbytes", 0) or 0)
        self._w[id(lin)] = (lin, W)
        return W

    def group(self, lins):
        return DevGroup(self, lins)

    def param(self, a):
        if a is None:
            return None
        d = self.dev.upload(np.ascontiguousarray(a, dtype=F32))
        self.uploaded += int(d.nbytes)
        return d

    def linear(self, W, x, gemm):
        return self.k.matmul(W, x, gemm)

    # ---- arrays and transfers
    def empty(self, shape):
        return self.xp.empty(shape, dtype=self.xp.float32)

    def zeros(self, shape, dtype=F32):
        return self.dev.zeros(shape, dtype)

    def take(self, x):
        """x (host, or on another device) copied onto this device, which becomes the current one (CuPy's current
        device is per thread: every forward makes it current at its first block here)."""
        if self.dev.kind == "cuda":
            self.xp.cuda.Device(self.dev.index).use()
        return self.dev.put(x)

    def to_host(self, x):
        return self.dev.to_host(x)

    def index(self, a):
        """A host index / metadata array (positions, slots, block tables, rows, RoPE tables) on the device,
        uploaded once per forward (memoized on the host array's identity)."""
        return self.dev.cached(a) if isinstance(a, np.ndarray) else a

    _t = index

    # ---- ops (CPU kernel signatures)
    def rms_norm(self, x, w, eps):
        return self.k.rms_norm(x, w, eps)

    def rope(self, x, cos, sin, n_rot, neox):
        self.k.rope(x, self._t(cos), self._t(sin), n_rot, neox)

    def store_kv_slots(self, k, v, kc, vc, slots):
        self.k.store_kv_slots(k, v, kc, vc, self._t(slots))

    def attention_paged(self, q, kc, vc, pos, row_seq, tables, bs, n_kv, scale, n_swa, out, softcap=0.0):
        if softcap > 0:
            raise NotImplementedError("attention logit soft-capping has no device kernel")
        out[...] = self.k.attention_paged(q, kc, vc, self._t(pos), self._t(row_seq), self._t(tables), int(bs),
                                          self._t(n_kv), float(scale), int(n_swa)).reshape(out.shape)

    def sigmoid(self, x, out):
        out[...] = self.k.sigmoid(x)

    def swiglu(self, g, u, out):
        out[...] = self.k.swiglu(g, u)

    def geglu_tanh(self, g, u, out):
        out[...] = self.k.geglu(g, u)

    def softcap(self, y, cap):
        xp = self.xp
        y = xp.tanh(y / xp.float32(cap))
        y *= xp.float32(cap)
        return y

    def gdn_gates(self, a, b, dt_bias, ssm_a, g, beta):
        gg, bb = self.k.gdn_gates(a, b, dt_bias, ssm_a)
        g[...] = gg
        beta[...] = bb

    def conv1d_silu(self, m, conv_state, w, out, snaps):
        o, s = self.k.conv1d_silu(m, conv_state, w, snaps.shape[0])
        out[...] = o
        if snaps.shape[0]:
            snaps[...] = s

    def l2_norm_heads(self, x, eps, out):
        out[...] = self.k.l2_norm_heads(x, eps)

    def gated_delta_rule(self, q, k, v, g, beta, state, out, snaps):
        o, s = self.k.delta_rule(q, k, v, g, beta, state, snaps.shape[0])
        out[...] = o
        if snaps.shape[0]:
            snaps[...] = s

    def gated_rms_norm(self, o, z, w, eps, out):
        out[...] = self.k.gated_rms_norm(o, z, w, eps)


class HostFFN:
    """An FFN kept on the CPU inside a block that runs on a device (a mixture of experts, like llama.cpp's
    --cpu-moe): the normed rows go to the host, through the CPU FFN, and back. Its weights take no device
    memory."""

    def __init__(self, ffn, be):
        self.ffn = ffn
        self.be = be
        self.nbytes = 0

    def normed(self, x, norm_w, eps, gemm):
        be = self.be
        h = be.rms_norm(x, norm_w, eps)
        y = self.ffn(be.to_host(h), gemm)
        with be.dev.activate():
            return be.take(y)


def place(obj, be):
    """A copy of a model part (block, mixer, FFN, output layer, MTP layer) whose weights live on backend `be`:
    the part's class lists them in GROUPS (LinearGroups), LINEARS (single Linears), PARAMS (norm weights and
    small float tables) and PARTS (sub-parts, placed recursively; an FFN marked `offload_on_cpu` stays on the
    CPU behind a HostFFN). The original is left as it was. `nbytes` of the copy: what it uploaded."""
    if getattr(obj, "offload_on_cpu", False):
        return HostFFN(obj, be)
    new = copy.copy(obj)
    new.be = be
    before = be.uploaded
    for name in getattr(obj, "GROUPS", ()):
        g = getattr(obj, name)
        if g is not None:
            setattr(new, name, be.group(g.lins))
    for name in getattr(obj, "LINEARS", ()):
        lin = getattr(obj, name)
        if lin is not None:
            setattr(new, name, be.weight(lin))
    for name in getattr(obj, "PARAMS", ()):
        a = getattr(obj, name)
        if a is not None:
            setattr(new, name, be.param(a))
    for name in getattr(obj, "PARTS", ()):
        part = getattr(obj, name)
        if part is not None:
            setattr(new, name, place(part, be))
    new.nbytes = be.uploaded - before
    return new
