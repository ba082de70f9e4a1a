"""GPU offload: `offload_model` places layers (llamba.backend) and moves the offloaded blocks, their KV cache and
recurrent state, the output layer and the MTP layer onto their devices (docs/offload.md).

There are no device twins of the blocks: a block is written once (llamba.models) against a kernel backend
(llamba.compute), and offloading a block is `place(block, DeviceCompute(dev))`, a copy of it whose weights are
uploaded once and whose ops run through the device-kernel interface (llamba.kernels.cuda: `CudaKernels` on a
GPU, `XpKernels(numpy)` or `HostKernels` on the numpy stand-in). With `HostKernels` the offload path computes
exactly the CPU path's numbers (bit-identical logits); with the xp or CUDA kernels they differ only by
float-activation matmuls.

How the model hooks in:
* `model.blocks[il]` is replaced by the placed copy; it takes the same `blk(x, batch, rope, gemm)` call, so
  offloaded layers serve batches of several sequences (paged KV with block tables on the device too). The
  forward loop copies the activations into a device where the backend changes (once per device per forward).
* `model.state_be[il]` names the backend of each offloaded layer with state: `model.new_pool` / `new_seq`
  allocate that layer's KV arrays (fp16) and recurrent state on its device; the default pool's and sequence's
  arrays are replaced here.
* `model.out_layer` (output norm + head) and `model.mtp` (the whole nextn layer, its head on the output layer's
  device when shared) are replaced by placed copies; they return host (numpy) hidden rows and logits.
* a mixture-of-experts FFN stays on the CPU (`HostFFN`, like llama.cpp's --cpu-moe); the rest of the block
  (norms, attention / DeltaNet, its caches) runs on the device.
"""
from __future__ import annotations

import sys

import numpy as np

from llamba.backend import Device, discover_devices, parse_ngl, parse_split_mode, parse_tensor_split, plan_layers, \
    warn_once
from llamba.compute import DeviceCompute, HostFFN, place
from llamba.kernels import deltanet as D
from llamba.kernels import ops as K
from llamba.layers import Linear


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

    def store_kv_slots(self, k, v, kc, vc, slots):
        K.store_kv_slots(k, v, kc, vc, slots)

    def attention_paged(self, q, kc, vc, pos, row_seq, tables, bs, n_kv, scale, n_swa):
        o = np.empty((q.shape[0], q.shape[1], vc.shape[2]), dtype=np.float32)
        K.attention_paged(q, kc, vc, pos, row_seq, tables, bs, n_kv, scale, n_swa, o)
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
# placement and installation
# ----------------------------------------------------------------------------------------------------

def _param_bytes(obj, seen: set) -> int:
    """Bytes of the weights an object of llamba.models holds (Linears and float arrays, walked recursively)."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if getattr(obj, "offload_on_cpu", False):  # a MoE FFN: kept on the CPU (HostFFN), no device memory
        return 0
    if isinstance(obj, Linear):
        return int(obj.w.nbytes) + (int(obj.bias.nbytes) if obj.bias is not None else 0)
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if type(obj).__module__.startswith("llamba.models") and hasattr(obj, "__dict__"):
        return sum(_param_bytes(v, seen) for k, v in vars(obj).items() if k not in ("kv", "rope", "embed", "trunk"))
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
    """Move the last `n_gpu_layers` layers of `model` to the devices (docs/offload.md). Returns an OffloadInfo,
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
    computes = {}  # id(Device) -> its backend (the same Device twice in `devices` shares one)

    def be_of(il):
        p = placement[il]
        if p is None:
            return None
        d = devices[p]
        if id(d) not in computes:
            computes[id(d)] = DeviceCompute(d)
        return computes[id(d)]

    plan = {"blocks": {}, "kv": {}, "rec": {}, "out": None, "mtp": None, "mtp_kv": None, "state_be": {}}
    rec = getattr(model, "rec", None) or {}
    for blk in model.blocks:
        be = be_of(blk.il)
        if be is None:
            continue
        with be.dev.activate():
            plan["blocks"][blk.il] = place(blk, be)
            if blk.il in model.kv.k:
                plan["kv"][blk.il] = (be.zeros(model.kv.k[blk.il].shape, be.kv_dtype),
                                      be.zeros(model.kv.v[blk.il].shape, be.kv_dtype))
                plan["state_be"][blk.il] = be
            if blk.il in rec:
                plan["rec"][blk.il] = tuple(be.dev.upload(np.array(a, copy=True)) for a in rec[blk.il])
                plan["state_be"][blk.il] = be
    be_out = be_of(n_all)
    if be_out is not None:
        with be_out.dev.activate():
            plan["out"] = place(model.out_layer, be_out)
    mtp = getattr(model, "mtp", None)
    be_mtp = be_of(L) if n_all > L else None
    if mtp is not None and be_mtp is not None:
        with be_mtp.dev.activate():
            nm = place(mtp, be_mtp)
            if mtp.lm_head is model.out_layer.head and plan["out"] is not None:
                nm.lm_head = plan["out"].head  # the shared output head, on the output layer's device
            else:
                nm.lm_head = place(mtp.lm_head, be_mtp)
                nm.nbytes += nm.lm_head.nbytes
            plan["mtp"] = nm
            plan["mtp_kv"] = (be_mtp.zeros(mtp.kv.k[L].shape, be_mtp.kv_dtype),
                              be_mtp.zeros(mtp.kv.v[L].shape, be_mtp.kv_dtype))
            plan["state_be"][L] = be_mtp
    return plan


def _install(model, plan, placement, devices) -> OffloadInfo:
    n = len(devices)
    weights, kv, state = [0] * n, [0] * n, [0] * n
    pos_of = {id(d): i for i, d in enumerate(devices)}

    def acct(arr_list, be, into):
        into[pos_of[id(be.dev)]] += sum(int(a.nbytes) for a in arr_list)

    for i, blk in enumerate(model.blocks):
        nb = plan["blocks"].get(blk.il)
        if nb is None:
            continue
        model.blocks[i] = nb
        weights[pos_of[id(nb.be.dev)]] += nb.nbytes
        if blk.il in plan["kv"]:
            model.kv.k[blk.il], model.kv.v[blk.il] = plan["kv"][blk.il]
            acct(plan["kv"][blk.il], nb.be, kv)
        if blk.il in plan["rec"]:
            model.rec[blk.il] = plan["rec"][blk.il]
            acct(plan["rec"][blk.il], nb.be, state)
    if plan["out"] is not None:
        model.out_layer = plan["out"]
        weights[pos_of[id(plan["out"].be.dev)]] += plan["out"].nbytes
    if plan["mtp"] is not None:
        L = model.config.n_layer
        model.mtp = plan["mtp"]
        model.kv.k[L], model.kv.v[L] = plan["mtp_kv"]
        weights[pos_of[id(plan["mtp"].be.dev)]] += plan["mtp"].nbytes
        acct(plan["mtp_kv"], plan["mtp"].be, kv)
    model.state_be = dict(plan["state_be"])  # new pools and sequences put these layers' state on their devices
    n_cpu_moe = sum(isinstance(getattr(b, "ffn", None), HostFFN) for b in plan["blocks"].values())
    if plan["mtp"] is not None and isinstance(plan["mtp"].block.ffn, HostFFN):
        n_cpu_moe += 1
    info = OffloadInfo(placement, devices, weights, kv, state, n_cpu_moe)
    model.offload = info
    return info
