"""GPU offload: device-side twins of the model blocks, and `offload_model` which places layers (llamba.backend)
and swaps the offloaded blocks, their KV cache and recurrent state, the output layer and the MTP layer onto
their devices (ENGINE_BRIEF §7).

The device blocks are written against a device's array module `xp` (numpy or cupy) and its device-kernel
interface (llamba.kernels.cuda: `CudaKernels` on a GPU, `XpKernels(numpy)` or `HostKernels` on the numpy
stand-in). They mirror the CPU blocks op for op, so with `HostKernels` the offload path gives logits
bit-identical to the CPU path, and with the xp or CUDA kernels they differ only by float-activation matmuls.

How the model code hooks in (the forward loops are unchanged otherwise):
* `model.blocks[il]` is replaced by a device block with the same call signature. The first block of each
  device (`entry`) copies the incoming activations there; consecutive blocks on one device pass x as is.
* `model.kv.k/v[il]` and `model.rec[il]` are replaced by arrays on the layer's device (KV as fp16).
* `model.out_dev` (output norm + head) and `model.mtp.out_dev` (the whole nextn layer) are set; the forward
  tails call them when set, and they return host (numpy) hidden rows and logits.
* qwen35moe: a block's mixture-of-experts FFN stays on the CPU (`HostMoE`, like llama.cpp's --cpu-moe); the
  rest of the block (norms, attention / DeltaNet, its caches) runs on the device.
"""
from __future__ import annotations

import sys

import numpy as np

from llamba.backend import Device, discover_devices, parse_ngl, parse_split_mode, parse_tensor_split, plan_layers, \
    warn_once
from llamba.kernels import deltanet as D
from llamba.kernels import ops as K
from llamba.layers import GEGLU, Linear


# ----------------------------------------------------------------------------------------------------
# the CPU kernels behind the device-kernel interface (exact twin of the CPU path, numpy stand-in only)
# ----------------------------------------------------------------------------------------------------

class HostKernels:
    """The device-kernel interface implemented by the CPU kernels (llamba.kernels.ops/deltanet/quant): the
    offload code path then computes exactly what the CPU path computes. Weights are the CPU Linears."""

    name = "host"
    kv_dtype = K.KV_DTYPE  # the CPU cache type (fp16 bits in uint16, or float32 holding fp16 values)
    xp = np

    def upload(self, lin):
        return lin

    def matmul(self, W, x, gemm):
        return W.gemm(x) if gemm else W(x)

    def rms_norm(self, x, w, eps):
        out = np.empty_like(x)
        K.rms_norm(x, w, eps, out)
        return out

    def rope(self, x, cos, sin, n_rot, neox):
        K.rope_apply(x, cos, sin, n_rot, neox)

    def store_kv(self, k, v, kc, vc, pos0):
        K.store_kv(k, v, kc, vc, pos0)

    def attention(self, q, kc, vc, pos, n_kv, scale, n_swa):
        o = np.empty((q.shape[0], q.shape[1], vc.shape[2]), dtype=np.float32)
        K.attention(q, kc, vc, pos, n_kv, scale, n_swa, o)
        return o

    def swiglu(self, g, u):
        K.swiglu(g, u, g)
        return g

    def geglu(self, g, u):
        K.geglu_tanh(g, u, g)
        return g

    def sigmoid(self, x):
        out = np.empty_like(x)
        K.sigmoid(x, out)
        return out

    def gdn_gates(self, alpha, beta_raw, dt_bias, ssm_a):
        g = np.empty(alpha.shape, dtype=np.float32)
        beta = np.empty(alpha.shape, dtype=np.float32)
        D.gdn_gates(alpha, beta_raw, dt_bias, ssm_a, g, beta)
        return g, beta

    def conv1d_silu(self, m, conv_state, w, n_snap):
        T, C = m.shape
        snaps = np.empty((n_snap, C, w.shape[1] - 1), dtype=np.float32)
        out = np.empty((T, C), dtype=np.float32)
        D.conv1d_silu(m, conv_state, w, out, snaps)
        return out, (snaps if n_snap else None)

    def l2_norm_heads(self, x, eps):
        out = np.empty(x.shape, dtype=np.float32)
        D.l2_norm_heads(x, eps, out)
        return out

    def delta_rule(self, q, k, v, g, beta, state, n_snap):
        T, Hv, S = v.shape
        o = np.empty((T, Hv, S), dtype=np.float32)
        snaps = np.empty((n_snap, Hv, S, S), dtype=np.float32)
        D.gated_delta_rule(q, k, v, g, beta, state, o, snaps)
        return o, (snaps if n_snap else None)

    def gated_rms_norm(self, o, z, w, eps):
        y = np.empty_like(o)
        D.gated_rms_norm(o, z, w, eps, y)
        return y


# ----------------------------------------------------------------------------------------------------
# device blocks (mirror llamba.models.base / qwen35 op for op)
# ----------------------------------------------------------------------------------------------------

class _On:
    """Base of the device blocks: the device, its kernels and array module, and parameter accounting."""

    def __init__(self, dev: Device):
        self.dev = dev
        self.k = dev.kernels
        self.xp = dev.xp
        self.nbytes = 0

    def w(self, lin):
        if lin is None:
            return None
        W = self.k.upload(lin)
        self.nbytes += int(W.nbytes) if hasattr(W, "nbytes") else 0
        return W

    def p(self, a):
        if a is None:
            return None
        d = self.dev.upload(np.ascontiguousarray(a, dtype=np.float32))
        self.nbytes += int(d.nbytes)
        return d


class DevFFN(_On):
    def __init__(self, dev, ffn):
        super().__init__(dev)
        self.w_gate, self.w_up, self.w_down = self.w(ffn.w_gate), self.w(ffn.w_up), self.w(ffn.w_down)
        self.gelu = ffn.glu == GEGLU
        self.n_ff = ffn.n_ff

    def __call__(self, h, gemm):
        k = self.k
        if self.w_gate is None:  # fused [gate | up] (phi3)
            gu = k.matmul(self.w_up, h, gemm)
            xp = self.xp
            g, u = xp.ascontiguousarray(gu[:, :self.n_ff]), xp.ascontiguousarray(gu[:, self.n_ff:])
        else:
            g = k.matmul(self.w_gate, h, gemm)
            u = k.matmul(self.w_up, h, gemm)
        a = k.geglu(g, u) if self.gelu else k.swiglu(g, u)
        return k.matmul(self.w_down, a, gemm)


class HostMoE(_On):
    """A mixture-of-experts FFN (llamba.models.moe.MoEFFN) left on the CPU, like llama.cpp's --cpu-moe: the rows
    go to the host, through the CPU MoE FFN (router, experts, shared expert), and back onto the device. Its
    weights take no device memory."""

    def __init__(self, dev, ffn):
        super().__init__(dev)
        self.ffn = ffn

    def __call__(self, h, gemm):
        y = self.ffn(self.dev.to_host(h), gemm)
        with self.dev.activate():
            return self.dev.put(y)


def _dev_ffn(dev, ffn):
    return HostMoE(dev, ffn) if getattr(ffn, "offload_on_cpu", False) else DevFFN(dev, ffn)


class DevAttentionBlock(_On):
    """llamba.models.base.AttentionBlock on a device (llama, gemma3, qwen2, qwen3, qwen3moe)."""

    recurrent = False

    def __init__(self, dev, blk, entry: bool):
        super().__init__(dev)
        self.entry = entry
        for a in ("il", "n_head", "n_head_kv", "hd", "hd_v", "eps", "splits", "swa", "n_swa", "rope_base",
                  "freq_scale", "neox", "n_rot", "q_scale"):
            setattr(self, a, getattr(blk, a))
        self.attn_norm = self.p(blk.attn_norm)
        self.wqkv, self.wq, self.wk, self.wv = self.w(blk.wqkv), self.w(blk.wq), self.w(blk.wk), self.w(blk.wv)
        self.q_norm, self.k_norm = self.p(blk.q_norm), self.p(blk.k_norm)
        self.wo = self.w(blk.wo)
        self.post_attn_norm = self.p(blk.post_attn_norm)
        self.ffn_norm = self.p(blk.ffn_norm)
        self.ffn = _dev_ffn(dev, blk.ffn)  # an MoE FFN (qwen3moe) stays on the CPU
        self.post_ffw_norm = self.p(blk.post_ffw_norm)
        self.nbytes += self.ffn.nbytes

    def attention(self, h, pos, n_kv, kv, rope, gemm):
        k, xp, dev = self.k, self.xp, self.dev
        T = h.shape[0]
        if self.wqkv is not None:
            qkv = k.matmul(self.wqkv, h, gemm)
            a, b = self.splits
            q, kk, v = qkv[:, :a], qkv[:, a:b], qkv[:, b:]
        else:
            q, kk, v = k.matmul(self.wq, h, gemm), k.matmul(self.wk, h, gemm), k.matmul(self.wv, h, gemm)
        q = xp.ascontiguousarray(q).reshape(T, self.n_head, self.hd)
        kk = xp.ascontiguousarray(kk).reshape(T, self.n_head_kv, self.hd)
        v = xp.ascontiguousarray(v).reshape(T, self.n_head_kv, self.hd_v)
        if self.q_norm is not None:
            q = k.rms_norm(q.reshape(-1, self.hd), self.q_norm, self.eps).reshape(q.shape)
        if self.k_norm is not None:
            kk = k.rms_norm(kk.reshape(-1, self.hd), self.k_norm, self.eps).reshape(kk.shape)
        cos, sin = rope.get(pos, self.rope_base, self.freq_scale)
        cos, sin = dev.cached(cos), dev.cached(sin)
        k.rope(q, cos, sin, self.n_rot, self.neox)
        k.rope(kk, cos, sin, self.n_rot, self.neox)
        if self.q_scale > 0:
            q *= np.float32(self.q_scale)
            scale = 1.0
        else:
            scale = 1.0 / np.sqrt(self.hd)
        kc, vc = kv.k[self.il], kv.v[self.il]
        k.store_kv(kk, v, kc, vc, int(pos[0]))
        o = k.attention(q, kc, vc, dev.cached(pos), n_kv, scale, self.n_swa)
        return o.reshape(T, -1)

    def __call__(self, x, pos, n_kv, kv, rope, gemm: bool):
        k, dev = self.k, self.dev
        with dev.activate():
            if self.entry:
                x = dev.put(x)
            h = k.rms_norm(x, self.attn_norm, self.eps)
            a = k.matmul(self.wo, self.attention(h, pos, n_kv, kv, rope, gemm), gemm)
            if self.post_attn_norm is not None:
                a = k.rms_norm(a, self.post_attn_norm, self.eps)
            x += a
            h = k.rms_norm(x, self.ffn_norm, self.eps)
            f = self.ffn(h, gemm)
            if self.post_ffw_norm is not None:
                f = k.rms_norm(f, self.post_ffw_norm, self.eps)
            x += f
            return x


class DevGatedAttention(_On):
    """llamba.models.qwen35.GatedAttention on a device."""

    def __init__(self, dev, m):
        super().__init__(dev)
        for a in ("il", "H", "Hkv", "hd", "eps", "n_rot", "base", "freq_scale"):
            setattr(self, a, getattr(m, a))
        self.wqkv = self.w(m.wqkv)
        if m.wqkv is None:
            self.wq, self.wk, self.wv = self.w(m.wq), self.w(m.wk), self.w(m.wv)
        self.q_norm, self.k_norm = self.p(m.q_norm), self.p(m.k_norm)
        self.wo = self.w(m.wo)

    def __call__(self, h, pos, n_kv, kv, rope, gemm):
        k, xp, dev = self.k, self.xp, self.dev
        T = h.shape[0]
        H, Hkv, hd = self.H, self.Hkv, self.hd
        if self.wqkv is not None:
            qkv = k.matmul(self.wqkv, h, gemm)
            qg = qkv[:, :2 * H * hd]
            kk = qkv[:, 2 * H * hd:2 * H * hd + Hkv * hd]
            v = qkv[:, 2 * H * hd + Hkv * hd:]
        else:
            qg, kk, v = k.matmul(self.wq, h, gemm), k.matmul(self.wk, h, gemm), k.matmul(self.wv, h, gemm)
        qg = qg.reshape(T, H, 2, hd)
        q = k.rms_norm(xp.ascontiguousarray(qg[:, :, 0]).reshape(-1, hd), self.q_norm, self.eps).reshape(T, H, hd)
        gate = xp.ascontiguousarray(qg[:, :, 1]).reshape(T, H * hd)
        kk = k.rms_norm(xp.ascontiguousarray(kk).reshape(-1, hd), self.k_norm, self.eps).reshape(T, Hkv, hd)
        v = xp.ascontiguousarray(v).reshape(T, Hkv, hd)
        cos, sin = rope.get(pos, self.base, self.freq_scale)
        cos, sin = dev.cached(cos), dev.cached(sin)
        k.rope(q, cos, sin, self.n_rot, True)
        k.rope(kk, cos, sin, self.n_rot, True)
        kc, vc = kv.k[self.il], kv.v[self.il]
        k.store_kv(kk, v, kc, vc, int(pos[0]))
        o = k.attention(q, kc, vc, dev.cached(pos), n_kv, 1.0 / np.sqrt(hd), 0)
        sg = k.sigmoid(gate)
        o = o.reshape(T, H * hd)
        o *= sg
        return k.matmul(self.wo, o, gemm)


class DevGatedDeltaNet(_On):
    """llamba.models.qwen35.GatedDeltaNet on a device (token-by-token recurrence, like the CPU path)."""

    def __init__(self, dev, m):
        super().__init__(dev)
        for a in ("il", "S", "Hk", "Hv", "Dc", "key_dim", "value_dim", "conv_dim", "eps"):
            setattr(self, a, getattr(m, a))
        self.w_qkv, self.w_gate = self.w(m.w_qkv), self.w(m.w_gate)
        self.w_beta, self.w_alpha = self.w(m.w_beta), self.w(m.w_alpha)
        self.conv_w = self.p(m.conv_w)
        self.dt_bias, self.ssm_a, self.ssm_norm = self.p(m.dt_bias), self.p(m.ssm_a), self.p(m.ssm_norm)
        self.w_out = self.w(m.w_out)

    def __call__(self, h, state, snaps, gemm, chunked):
        k, xp = self.k, self.xp
        T = h.shape[0]
        S, Hk, Hv, kd = self.S, self.Hk, self.Hv, self.key_dim
        conv_state, ssm = state
        m = k.matmul(self.w_qkv, h, gemm)
        z = k.matmul(self.w_gate, h, gemm)
        b = k.matmul(self.w_beta, h, gemm)
        a = k.matmul(self.w_alpha, h, gemm)
        g, beta = k.gdn_gates(a, b, self.dt_bias, self.ssm_a)
        n_snap = T if snaps is not None else 0
        c, conv_snap = k.conv1d_silu(m, conv_state, self.conv_w, n_snap)
        q = k.l2_norm_heads(xp.ascontiguousarray(c[:, :kd]).reshape(T, Hk, S), self.eps)
        kk = k.l2_norm_heads(xp.ascontiguousarray(c[:, kd:2 * kd]).reshape(T, Hk, S), self.eps)
        v = xp.ascontiguousarray(c[:, 2 * kd:]).reshape(T, Hv, S)
        o, ssm_snap = k.delta_rule(q, kk, v, g, beta, ssm, n_snap)
        if snaps is not None:
            snaps.append((conv_snap, ssm_snap))
        y = k.gated_rms_norm(o, z.reshape(T, Hv, S), self.ssm_norm, self.eps)
        return k.matmul(self.w_out, y.reshape(T, self.value_dim), gemm)


class DevQwen35Block(_On):
    """llamba.models.qwen35.Qwen35Block on a device."""

    def __init__(self, dev, blk, entry: bool):
        super().__init__(dev)
        self.entry = entry
        self.il, self.recurrent, self.eps = blk.il, blk.recurrent, blk.eps
        self.attn_norm = self.p(blk.attn_norm)
        self.mixer = (DevGatedDeltaNet if blk.recurrent else DevGatedAttention)(dev, blk.mixer)
        self.post_attention_norm = self.p(blk.post_attention_norm)
        self.ffn = _dev_ffn(dev, blk.ffn)  # qwen35moe: the MoE FFN stays on the CPU (HostMoE)
        self.nbytes += self.mixer.nbytes + self.ffn.nbytes

    def __call__(self, x, pos, n_kv, kv, rope, gemm: bool, rec_state=None, snaps=None, chunked: bool = False):
        k, dev = self.k, self.dev
        with dev.activate():
            if self.entry:
                x = dev.put(x)
            h = k.rms_norm(x, self.attn_norm, self.eps)
            if self.recurrent:
                x += self.mixer(h, rec_state, snaps, gemm, chunked)
            else:
                x += self.mixer(h, pos, n_kv, kv, rope, gemm)
            x += self.ffn(k.rms_norm(x, self.post_attention_norm, self.eps), gemm)
            return x


class DevHead(_On):
    """An output projection (+ soft-capping) on a device; rows in, host logits out."""

    def __init__(self, dev, lin, n_vocab: int, cap: float):
        super().__init__(dev)
        self.W = self.w(lin)
        self.n_vocab, self.cap = n_vocab, cap

    def __call__(self, h, gemm) -> np.ndarray:
        if h.shape[0] == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        xp = self.xp
        with self.dev.activate():
            y = self.k.matmul(self.W, h, gemm)
            if self.cap > 0:
                y = xp.tanh(y / self.cap)
                y *= self.cap
            return self.dev.to_host(y)


class DevOutput(_On):
    """The output layer (output_norm + output) on a device: `(x, rows, keep_hidden, gemm) -> (hidden, logits)`,
    both host arrays, as the tail of Transformer/Qwen35.forward computes them."""

    def __init__(self, dev, model, entry: bool):
        super().__init__(dev)
        self.entry = entry
        self.eps = model.config.eps
        self.norm = self.p(model.output_norm)
        self.head = DevHead(dev, model.output, model.config.n_vocab, model.config.final_logit_softcap)
        self.nbytes += self.head.nbytes

    def __call__(self, x, rows, keep_hidden, gemm):
        xp, dev = self.xp, self.dev
        with dev.activate():
            if self.entry:
                x = dev.put(x)
            hN = self.k.rms_norm(x if keep_hidden else xp.ascontiguousarray(x[rows]), self.norm, self.eps)
            hidden = dev.to_host(hN) if keep_hidden else None
            h = xp.ascontiguousarray(hN[rows]) if keep_hidden else hN
            return hidden, self.head(h, gemm and hN.shape[0] > 1)


class DevMTP(_On):
    """The nextn (MTP) layer on a device: enorm/hnorm/eh_proj, its block, shared_head_norm; the head on the
    output layer's device (or on this one when the MTP has its own shared_head_head)."""

    def __init__(self, dev, mtp, out_head: DevHead):
        super().__init__(dev)
        self.eps = mtp.eps
        self.enorm, self.hnorm = self.p(mtp.enorm), self.p(mtp.hnorm)
        self.eh_proj = self.w(mtp.eh_proj)
        self.block = DevQwen35Block(dev, mtp.block, entry=False)
        self.head_norm = self.p(mtp.head_norm)
        self.nbytes += self.block.nbytes
        if out_head is not None:
            self.head = out_head
        else:
            self.head = DevHead(dev, mtp.output, mtp.config.n_vocab, mtp.config.final_logit_softcap)
            self.nbytes += self.head.nbytes

    def __call__(self, mtp, tokens, h_prev, pos, rows, gemm):
        k, xp, dev = self.k, self.xp, self.dev
        T = tokens.shape[0]
        with dev.activate():
            e = k.rms_norm(dev.put(mtp.embed(tokens)), self.enorm, self.eps)
            hh = k.rms_norm(dev.put(np.ascontiguousarray(h_prev, dtype=np.float32).reshape(T, -1)), self.hnorm,
                            self.eps)
            x = k.matmul(self.eh_proj, xp.concatenate([e, hh], axis=1), gemm)
            x = self.block(x, pos, mtp.n_past + T, mtp.kv, mtp.rope, gemm)
            hM = k.rms_norm(xp.ascontiguousarray(x[rows]), self.head_norm, self.eps)
            hidden = dev.to_host(hM)
        if self.head.dev is not dev:
            with self.head.dev.activate():
                hM = self.head.dev.put(hM)
        return hidden, self.head(hM, False)


# ----------------------------------------------------------------------------------------------------
# placement and installation
# ----------------------------------------------------------------------------------------------------

def _param_bytes(obj, seen: set) -> int:
    """Bytes of the weights an object of llamba.models holds (Linears and float arrays, walked recursively)."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if getattr(obj, "offload_on_cpu", False):  # a MoE FFN: kept on the CPU (HostMoE), no device memory
        return 0
    if isinstance(obj, Linear):
        return int(obj.w.nbytes) + (int(obj.bias.nbytes) if obj.bias is not None else 0)
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if type(obj).__module__.startswith("llamba.models") and hasattr(obj, "__dict__"):
        return sum(_param_bytes(v, seen) for k, v in vars(obj).items() if k not in ("kv", "rope", "embed"))
    return 0


def _kv_bytes(kv, il, itemsize=2) -> int:
    if kv is None or il not in kv.k:
        return 0
    return (kv.k[il].size + kv.v[il].size) * itemsize


def layer_bytes(model) -> list[int]:
    """Estimated device bytes of each of the n_layer_all + 1 layers (weights, fp16 KV, recurrent state)."""
    cfg = model.config
    L = cfg.n_layer
    out = [0] * (cfg.n_layer_all + 1)
    rec = getattr(model, "rec", {}) or {}
    for blk in model.blocks:
        out[blk.il] = _param_bytes(blk, set()) + _kv_bytes(model.kv, blk.il) + \
            sum(int(a.nbytes) for a in rec.get(blk.il, ()))
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        seen = {id(model.output), id(model.output_norm)}
        out[L] = _param_bytes(mtp, seen) + _kv_bytes(mtp.kv, L)
    out[cfg.n_layer_all] = _param_bytes(model.output, set()) + int(model.output_norm.nbytes)
    return out


class OffloadInfo:
    """What `offload_model` did: the placement (device position per layer, None = CPU), the devices and the
    bytes each holds."""

    def __init__(self, placement, devices, weights, kv, state, n_cpu_moe: int = 0):
        self.placement, self.devices = placement, devices
        self.weights, self.kv, self.state = weights, kv, state
        self.n_cpu_moe = n_cpu_moe  # offloaded layers whose MoE FFN stays on the CPU

    @property
    def n_offloaded(self) -> int:
        return sum(d is not None for d in self.placement)

    def report(self) -> list[str]:
        n = len(self.placement)
        kind = "GPU" if any(d.kind == "cuda" for d in self.devices) else "device (numpy stand-in)"
        lines = [f"offloaded {self.n_offloaded}/{n} layers to {kind} (output layer = {n - 1})"]
        if self.n_cpu_moe:
            lines.append(f"  the MoE FFNs (router, experts, shared expert) of {self.n_cpu_moe} offloaded layers "
                         f"stay on the CPU (like llama.cpp's --cpu-moe)")
        for i, d in enumerate(self.devices):
            layers = [il for il, p in enumerate(self.placement) if p == i]
            if not layers:
                continue
            span = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
            free, total = d.mem_info()
            mem = "" if total is None else f"; {free / 2**20:.0f} of {total / 2**20:.0f} MiB free"
            lines.append(f"  {d.label} ({d.name}): {span}: weights {self.weights[i] / 2**20:.1f} MiB, "
                         f"KV cache {self.kv[i] / 2**20:.1f} MiB, recurrent state {self.state[i] / 2**20:.1f} MiB"
                         f"{mem}")
        return lines


def offload_model(model, n_gpu_layers, *, tensor_split=None, main_gpu: int = 0, split_mode="layer",
                  devices: list[Device] | None = None, verbose: bool = False, what: str | None = None):
    """Move the last `n_gpu_layers` layers of `model` to the devices (ENGINE_BRIEF §7). Returns an OffloadInfo,
    or None when nothing was offloaded (n_gpu_layers == 0, or no usable device: one warning line, CPU).
    `devices` overrides discovery (tests pass numpy stand-ins; the same Device twice is allowed)."""
    n_gpu_layers = parse_ngl(n_gpu_layers)
    split_mode = parse_split_mode(split_mode)
    tensor_split = parse_tensor_split(tensor_split)
    what = what or (f"GPU offload of {'all' if n_gpu_layers < 0 else n_gpu_layers} layers "
                    f"(-ngl / n_gpu_layers {n_gpu_layers})")
    if n_gpu_layers == 0:
        return None
    if getattr(model.config, "attn_softcap", 0.0) > 0:  # the device attention kernels have no soft-capping yet
        warn_once(f"{what} ignored: {model.config.arch} (attention logit soft-capping) is not offloaded yet; "
                  f"running on the CPU")
        return None
    if split_mode == "row":  # a usage error whether or not a GPU is present
        from llamba.errors import UnsupportedError
        raise UnsupportedError("--split-mode row is not supported by llamba; use layer (the default) or none")
    if devices is None:
        devices, why = discover_devices()
        if not devices:
            warn_once(f"{what} ignored: no usable GPU: {why}; running on the CPU")
            return None
    cfg = model.config
    free = [d.mem_info()[0] for d in devices]  # now, not at discovery: an earlier model may hold some
    placement = plan_layers(cfg.n_layer_all, n_gpu_layers, free, tensor_split=tensor_split, split_mode=split_mode,
                            main_gpu=main_gpu, layer_bytes=layer_bytes(model))
    if all(p is None for p in placement):
        warn_once(f"{what} ignored: not even the output layer fits in the free GPU memory; running on the CPU")
        return None
    try:
        plan = _build(model, placement, devices)
    except Exception as e:
        if all(d.kind != "cuda" for d in devices):
            raise
        msg = (str(e).strip().splitlines() or [""])[0]
        warn_once(f"{what} ignored: GPU setup failed ({type(e).__name__}: {msg}); running on the CPU")
        return None
    info = _install(model, plan, placement, devices)
    if verbose:
        for line in info.report():
            print(f"llamba: {line}", file=sys.stderr)
    return info


def _build(model, placement, devices):
    """Create every device object first (weights uploaded, caches allocated); nothing in `model` changes."""
    cfg = model.config
    L, n_all = cfg.n_layer, cfg.n_layer_all

    def dev_of(il):
        p = placement[il]
        return None if p is None else devices[p]

    plan = {"blocks": {}, "kv": {}, "rec": {}, "out": None, "mtp": None, "mtp_kv": None}
    prev = None  # the device x comes from (None: the CPU embedding)
    for blk in model.blocks:
        d = dev_of(blk.il)
        if d is not None:
            with d.activate():
                cls = DevQwen35Block if hasattr(blk, "mixer") else DevAttentionBlock
                plan["blocks"][blk.il] = cls(d, blk, entry=d is not prev)
                if blk.il in model.kv.k:
                    kdt = d.kernels.kv_dtype
                    plan["kv"][blk.il] = (d.zeros(model.kv.k[blk.il].shape, kdt),
                                          d.zeros(model.kv.v[blk.il].shape, kdt))
                rec = getattr(model, "rec", None)
                if rec and blk.il in rec:
                    plan["rec"][blk.il] = tuple(d.upload(np.array(a, copy=True)) for a in rec[blk.il])
        prev = d
    d_out = dev_of(n_all)
    if d_out is not None:
        with d_out.activate():
            plan["out"] = DevOutput(d_out, model, entry=d_out is not prev)
    mtp = getattr(model, "mtp", None)
    d_mtp = dev_of(L) if n_all > L else None
    if mtp is not None and d_mtp is not None:
        with d_mtp.activate():
            shared = mtp.output is model.output
            plan["mtp"] = DevMTP(d_mtp, mtp, plan["out"].head if shared and plan["out"] is not None else None)
            kdt = d_mtp.kernels.kv_dtype
            plan["mtp_kv"] = (d_mtp.zeros(mtp.kv.k[L].shape, kdt), d_mtp.zeros(mtp.kv.v[L].shape, kdt))
    return plan


def _install(model, plan, placement, devices) -> OffloadInfo:
    n = len(devices)
    weights, kv, state = [0] * n, [0] * n, [0] * n
    pos_of = {id(d): i for i, d in enumerate(devices)}

    def acct(arr_list, d, into):
        into[pos_of[id(d)]] += sum(int(a.nbytes) for a in arr_list)

    for i, blk in enumerate(model.blocks):
        nb = plan["blocks"].get(blk.il)
        if nb is None:
            continue
        model.blocks[i] = nb
        weights[pos_of[id(nb.dev)]] += nb.nbytes
        if blk.il in plan["kv"]:
            model.kv.k[blk.il], model.kv.v[blk.il] = plan["kv"][blk.il]
            acct(plan["kv"][blk.il], nb.dev, kv)
        if blk.il in plan["rec"]:
            model.rec[blk.il] = plan["rec"][blk.il]
            acct(plan["rec"][blk.il], nb.dev, state)
    if plan["out"] is not None:
        model.out_dev = plan["out"]
        weights[pos_of[id(plan["out"].dev)]] += plan["out"].nbytes
    if plan["mtp"] is not None:
        L = model.config.n_layer
        model.mtp.out_dev = plan["mtp"]
        model.mtp.kv.k[L], model.mtp.kv.v[L] = plan["mtp_kv"]
        weights[pos_of[id(plan["mtp"].dev)]] += plan["mtp"].nbytes
        acct(plan["mtp_kv"], plan["mtp"].dev, kv)
    n_cpu_moe = sum(isinstance(getattr(b, "ffn", None), HostMoE) for b in plan["blocks"].values())
    if plan["mtp"] is not None and isinstance(plan["mtp"].block.ffn, HostMoE):
        n_cpu_moe += 1
    info = OffloadInfo(placement, devices, weights, kv, state, n_cpu_moe)
    model.offload = info
    return info
