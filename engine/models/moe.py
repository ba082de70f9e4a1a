"""Mixture-of-experts FFN (qwen35moe and qwen3moe, docs/architectures.md): softmax router, top-k experts renormalized,
SwiGLU experts stored as 3-D GGUF tensors, plus (qwen35moe) a sigmoid-gated shared expert.

For the rows u (T, n_embd) after post_attention_norm:

    p = softmax(ffn_gate_inp @ u)                          over all n_expert experts
    sel = the expert_used_count largest p (ties: lower expert index first, a stable sort like llama.cpp's)
    w = p[sel] / max(sum(p[sel]), 2^-14)
    moe = sum_j w_j * down_j(silu(gate_j u) * up_j u)       accumulated in slot order j = 0, 1, ...
    out = moe + SwiGLU_shexp(u) * sigmoid(ffn_gate_inp_shexp . u)   (qwen3moe: out = moe)

Row-exact: every operation is per row. Tokens are grouped by expert and each expert's rows go through the
(row-exact) quantized Linears of that expert, so a token's numbers do not depend on which other tokens share
the batch; the weighted sum is elementwise in a fixed slot order.

Expert e of a 3-D tensor ne=[in, out, n_expert] is the contiguous 2-D slice [e] of its raw bytes: `ExpertLinear`
is a Linear over that zero-copy view.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from llamba.errors import GGUFError
from llamba.kernels import ops as K
from llamba.kernels.quant import ops_for
from llamba.layers import SWIGLU, Linear, LinearGroup

ROUTER_SUM_MIN = np.float32(6.103515625e-5)  # llama.cpp clamps the top-k weight sum to >= 2^-14


def moe_config(gf, cfg, arch: str, n_ff_exp_default, shared: bool):
    """`cfg` with the expert fields read from `{arch}.expert_*`: n_expert, n_expert_used, n_ff_exp
    (expert_feed_forward_length, else n_ff_exp_default(n_used)) and, with a shared expert, n_ff_shexp
    (expert_shared_feed_forward_length, else feed_forward_length)."""
    p = arch + "."
    n_expert = int(gf.require(p + "expert_count"))
    n_used = int(gf.require(p + "expert_used_count"))
    if n_expert <= 0 or not 0 < n_used <= n_expert:
        raise GGUFError(f"{gf.path}: {p}expert_used_count {n_used} must be between 1 and {p}expert_count "
                        f"{n_expert}")
    n_ff_exp = int(gf.get(p + "expert_feed_forward_length", 0) or 0) or n_ff_exp_default(n_used)
    n_ff_shexp = (int(gf.get(p + "expert_shared_feed_forward_length", 0) or 0) or cfg.n_ff[0]) if shared else 0
    if n_ff_exp <= 0 or (shared and n_ff_shexp <= 0):
        what = (f"widths: {p}expert_feed_forward_length / expert_shared_feed_forward_length are missing"
                if shared else f"width: {p}expert_feed_forward_length is missing")
        raise GGUFError(f"{gf.path}: cannot tell the expert FFN {what} and {p}feed_forward_length is 0")
    return dataclasses.replace(cfg, n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp,
                               n_ff_shexp=n_ff_shexp)


class ExpertLinear(Linear):
    """A Linear over expert e of a 3-D expert tensor (zero-copy view of its bytes)."""

    def __init__(self, name: str, type_id: int, w: np.ndarray, cols: int, ops):
        self.name = name
        self.type_id = type_id
        self.cols = cols
        self.rows = w.shape[0]
        self.w = w
        self.ops = ops
        self.bias = None


def expert_linears(gf, name: str, rows: int, cols: int, n_expert: int):
    """(the raw 3-D view, [ExpertLinear per expert]) for a tensor ne=[cols, rows, n_expert]."""
    info = gf.info(name)
    want = (cols, rows, n_expert)
    if tuple(info.ne) != want:
        raise GGUFError(f"{gf.path}: tensor '{name}' has shape {list(info.ne)}, expected {list(want)} "
                        f"([in, out, n_expert])")
    ops = ops_for(info.type_id, f"tensor '{name}'")
    w3 = gf.tensor(name)  # (n_expert, rows, cols or row bytes)
    return w3, [ExpertLinear(f"{name}[{e}]", info.type_id, w3[e], cols, ops) for e in range(n_expert)]


def route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Router logits (T, n_expert) -> (expert ids (T, k) int64, weights (T, k) float32), per row: softmax
    (llamba.kernels.ops.softmax_rows: float32 exp, float64 sum), the k largest probabilities (stable: the lower
    expert index wins a tie), renormalized by their sum (float64, rounded once, clamped to >= 2^-14)."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    p = np.empty_like(logits)
    K.softmax_rows(logits, p)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, axis=1)
    s = w[:, 0].astype(np.float64)
    for j in range(1, k):
        s += w[:, j]
    s = np.maximum(s.astype(np.float32), ROUTER_SUM_MIN)
    return idx, np.ascontiguousarray(w / s[:, None], dtype=np.float32)


class MoEFFN:
    """The MoE FFN of layer p = 'blk.{il}.': router, experts (separate gate/up or fused gate_up) and, with `shared`
    (qwen35moe), a shared expert with its scalar sigmoid gate (qwen3moe has none). Same interface as
    llamba.models.base.FFN (`__call__`, `normed`)."""

    offload_on_cpu = True  # llamba.offload keeps MoE FFNs on the CPU (like llama.cpp's --cpu-moe)

    def __init__(self, gf, cfg, il: int, shared: bool = True):
        p = f"blk.{il}."
        E = cfg.n_embd
        n_exp, k = cfg.n_expert, cfg.n_expert_used
        ff, ffs = cfg.n_ff_exp, cfg.n_ff_shexp
        self.il, self.n_expert, self.k, self.n_ff_exp = il, n_exp, k, ff
        if not gf.has(p + "ffn_gate_inp.weight"):
            raise GGUFError(f"{gf.path}: layer {il} has no MoE router '{p}ffn_gate_inp.weight' "
                            f"(every {cfg.arch} FFN, the MTP block's included, is a mixture of experts)")
        self.router = Linear(gf, p + "ffn_gate_inp.weight", None, (n_exp, E))
        if gf.has(p + "ffn_gate_up_exps.weight"):
            self.gate_up_exps, self.gate_up = expert_linears(gf, p + "ffn_gate_up_exps.weight", 2 * ff, E, n_exp)
            self.gate = self.up = None
        else:
            for t in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
                if not gf.has(p + t):
                    raise GGUFError(f"{gf.path}: MoE layer {il} has neither '{p}ffn_gate_up_exps.weight' nor "
                                    f"'{p}{t}'")
            self.gate_up = None
            self.gate_exps, self.gate = expert_linears(gf, p + "ffn_gate_exps.weight", ff, E, n_exp)
            self.up_exps, self.up = expert_linears(gf, p + "ffn_up_exps.weight", ff, E, n_exp)
        self.down_exps, self.down = expert_linears(gf, p + "ffn_down_exps.weight", E, ff, n_exp)
        self.shared = shared
        if shared:
            self.w_gate_sh = Linear(gf, p + "ffn_gate_shexp.weight", None, (ffs, E))
            self.w_up_sh = Linear(gf, p + "ffn_up_shexp.weight", None, (ffs, E))
            self.w_down_sh = Linear(gf, p + "ffn_down_shexp.weight", None, (E, ffs))
            self.w_gate_inp_sh = Linear(gf, p + "ffn_gate_inp_shexp.weight", None, (1, E))
            # everything that reads u: router logits, shared gate and up, shared-expert gate logit
            self.inp = LinearGroup([self.router, self.w_gate_sh, self.w_up_sh, self.w_gate_inp_sh])
            self.down_sh = LinearGroup([self.w_down_sh])
        else:
            self.w_gate_sh = self.w_up_sh = self.w_down_sh = self.w_gate_inp_sh = self.down_sh = None
            self.inp = LinearGroup([self.router])
        self._up_g: list = [None] * n_exp  # per-expert LinearGroups, built on first use
        self._down_g: list = [None] * n_exp

    def _expert(self, e: int, h: np.ndarray, gemm: bool) -> np.ndarray:
        ug = self._up_g[e]
        if ug is None:
            ug = self._up_g[e] = LinearGroup([self.gate_up[e]] if self.gate_up is not None
                                             else [self.gate[e], self.up[e]])
            self._down_g[e] = LinearGroup([self.down[e]])
        if self.gate_up is not None:
            gu = ug(h, gemm=gemm)[0]
            g, u = gu[:, :self.n_ff_exp], gu[:, self.n_ff_exp:]
        else:
            g, u = ug(h, gemm=gemm)
        return self._down_g[e](g, SWIGLU, u, gemm=gemm)[0]

    def __call__(self, u: np.ndarray, gemm: bool) -> np.ndarray:
        u = np.ascontiguousarray(u, dtype=np.float32)
        T, k = u.shape[0], self.k
        if self.shared:
            logits, g_sh, u_sh, gate_sh = self.inp(u, gemm=gemm)
        else:
            logits, = self.inp(u, gemm=gemm)
        idx, w = route(logits, k)
        # group the (token, slot) pairs by expert; each expert runs once on its rows
        flat = idx.reshape(-1)
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=self.n_expert)
        Y = np.empty((T, k, u.shape[1]), dtype=np.float32)
        start = 0
        for e in np.flatnonzero(counts):
            sel = order[start:start + counts[e]]
            start += counts[e]
            rows, slots = sel // k, sel % k
            Y[rows, slots] = self._expert(int(e), u[rows], gemm)
        out = Y[:, 0] * w[:, 0:1]  # llama.cpp: experts * weights, then added view by view in slot order
        for j in range(1, k):
            out += Y[:, j] * w[:, j:j + 1]
        if not self.shared:
            return out
        sh = self.down_sh(g_sh, SWIGLU, u_sh, gemm=gemm)[0]
        sg = np.empty_like(gate_sh)
        K.sigmoid(np.ascontiguousarray(gate_sh), sg)
        sh *= sg
        out += sh
        return out

    def normed(self, x: np.ndarray, norm_w: np.ndarray, eps: float, gemm: bool) -> np.ndarray:
        """self(rms_norm(x, norm_w, eps))."""
        u = np.empty_like(x)
        K.rms_norm(x, norm_w, eps, u)
        return self(u, gemm)
