"""`qwen35` (Qwen3.5/3.6 dense): hybrid Gated DeltaNet + gated full attention, with an optional MTP (nextn)
head (docs/architectures.md). `qwen35moe` (llamba.models.qwen35moe) is the same model with a mixture-of-experts
FFN (llamba.models.moe.MoEFFN) in every block.

Trunk layer il < n_layer: x += Mixer(attn_norm(x)); x += SwiGLU(post_attention_norm(x)), where Mixer is a
Gated DeltaNet (recurrent) layer or gated full attention. The MTP block blk.{n_layer} is a full-attention
layer fed by eh_proj([enorm(embed(tok)) | hnorm(h_prev)]), with its own KV cache (`MTPHead`).

Recurrent state (conv + ssm per GDN layer, per sequence in its SeqCache) cannot be truncated like a KV cache: a
forward can record per-token snapshots (`snapshots=True`), and `truncate(n)` restores the one after position n-1.
"""
from __future__ import annotations

import numpy as np

from llamba.compute import CPU
from llamba.config import ModelConfig, base_config
from llamba.errors import GGUFError, UnsupportedError
from llamba.layers import Embedding, Linear, LinearGroup, norm_weight
from llamba.kv_cache import Batch
from llamba.models.base import FFN, BaseModel, Head, RopeTable
from llamba.models.moe import MoEFFN
from llamba.options import options_of


def config_from_gguf(gf, arch: str = "qwen35") -> ModelConfig:
    p = arch + "."
    d = base_config(gf, arch, rope_neox=True)
    n_all, n_next = d["n_layer_all"], d["n_nextn"]
    n_layer = n_all - n_next
    rec = gf.get(p + "attention.recurrent_layers")
    if rec is not None:
        rec = tuple(bool(b) for b in rec)
        if len(rec) != n_all:
            raise GGUFError(f"{gf.path}: {p}attention.recurrent_layers has {len(rec)} entries, expected {n_all}")
        rec = tuple(r and i < n_layer for i, r in enumerate(rec))
    else:
        interval = int(gf.get(p + "full_attention_interval", 4))
        rec = tuple(i < n_layer and (i + 1) % interval != 0 for i in range(n_all))
    sections = gf.get(p + "rope.dimension_sections")
    if sections is None:
        raise GGUFError(f"{gf.path}: missing required metadata key '{p}rope.dimension_sections'")
    d.update(
        recurrent=rec,
        ssm_d_conv=int(gf.require(p + "ssm.conv_kernel")),
        ssm_d_state=int(gf.require(p + "ssm.state_size")),
        ssm_n_k=int(gf.require(p + "ssm.group_count")),
        ssm_n_v=int(gf.require(p + "ssm.time_step_rank")),
        ssm_d_inner=int(gf.require(p + "ssm.inner_size")),
    )
    cfg = ModelConfig(**d)
    if cfg.ssm_d_inner != cfg.ssm_n_v * cfg.ssm_d_state:
        raise UnsupportedError(f"{gf.path}: ssm.inner_size {cfg.ssm_d_inner} != time_step_rank x state_size; "
                               f"llamba (like llama.cpp) needs head_v_dim == state_size")
    if cfg.ssm_n_v % cfg.ssm_n_k:
        raise GGUFError(f"{gf.path}: {cfg.ssm_n_v} value heads is not a multiple of {cfg.ssm_n_k} key heads")
    return cfg


class GatedAttention:
    """Qwen3.5 full attention: Q and an output gate interleaved per head in attn_q, QK-norm, partial NEOX rope
    (IMROPE for text), out = attn_output(attn * sigmoid(gate))."""

    GROUPS = ("qkv", "o")
    PARAMS = ("q_norm", "k_norm")
    be = CPU

    def __init__(self, gf, cfg: ModelConfig, il: int):
        p = f"blk.{il}."
        E = cfg.n_embd
        self.il = il
        self.H, self.Hkv, self.hd = cfg.n_head[il], cfg.n_head_kv[il], cfg.head_dim
        self.eps = cfg.eps
        nq, nkv = self.H * self.hd, self.Hkv * self.hd
        if gf.has(p + "attn_qkv.weight"):
            self.wqkv = Linear(gf, p + "attn_qkv.weight", None, (2 * nq + 2 * nkv, E))
        else:
            self.wqkv = None
            self.wq = Linear(gf, p + "attn_q.weight", None, (2 * nq, E))
            self.wk = Linear(gf, p + "attn_k.weight", None, (nkv, E))
            self.wv = Linear(gf, p + "attn_v.weight", None, (nkv, E))
        self.q_norm = norm_weight(gf, p + "attn_q_norm.weight", self.hd)
        self.k_norm = norm_weight(gf, p + "attn_k_norm.weight", self.hd)
        self.wo = Linear(gf, p + "attn_output.weight", None, (E, nq))
        self.n_rot = cfg.n_rot
        self.base = cfg.rope_base
        self.freq_scale = cfg.freq_scale
        self.qkv = LinearGroup([self.wqkv] if self.wqkv is not None else [self.wq, self.wk, self.wv])
        self.o = LinearGroup([self.wo])

    def __call__(self, h, b: Batch, rope: RopeTable, gemm: bool):
        be = self.be
        xp = be.xp
        T = h.shape[0]
        H, Hkv, hd = self.H, self.Hkv, self.hd
        if self.wqkv is not None:
            qkv = self.qkv(h, gemm=gemm)[0]
            qg = qkv[:, :2 * H * hd]
            k = qkv[:, 2 * H * hd:2 * H * hd + Hkv * hd]
            v = qkv[:, 2 * H * hd + Hkv * hd:]
        else:
            qg, k, v = self.qkv(h, gemm=gemm)
        qg = qg.reshape(T, H, 2, hd)
        q = be.rms_norm(xp.ascontiguousarray(qg[:, :, 0]).reshape(-1, hd), self.q_norm, self.eps).reshape(T, H, hd)
        gate = xp.ascontiguousarray(qg[:, :, 1]).reshape(T, H * hd)
        k = be.rms_norm(xp.ascontiguousarray(k).reshape(-1, hd), self.k_norm, self.eps).reshape(T, Hkv, hd)
        v = xp.ascontiguousarray(v).reshape(T, Hkv, hd)
        cos, sin = rope.get(b.pos, self.base, self.freq_scale)
        be.rope(q, cos, sin, self.n_rot, True)
        be.rope(k, cos, sin, self.n_rot, True)
        kc, vc = b.kv.k[self.il], b.kv.v[self.il]
        be.store_kv_slots(k, v, kc, vc, b.slots)
        o = be.empty((T, H, hd))
        be.attention_paged(q, kc, vc, b.pos, b.row_seq, b.tables, b.bs, b.n_kv, 1.0 / np.sqrt(hd), 0, o)
        sg = be.empty(gate.shape)
        be.sigmoid(gate, sg)
        o = o.reshape(T, H * hd)
        o *= sg
        return self.o(o, gemm=gemm)[0]


class GatedDeltaNet:
    """Qwen3.5 linear-attention layer (docs/architectures.md, "Gated DeltaNet"): conv1d+SiLU over q|k|v channels,
    L2-normed q/k, gated delta rule with tiled v-head -> k-head mapping, gated RMSNorm, ssm_out."""

    GROUPS = ("proj_in", "out")
    PARAMS = ("conv_w", "dt_bias", "ssm_a", "ssm_norm")
    be = CPU

    def __init__(self, gf, cfg: ModelConfig, il: int):
        p = f"blk.{il}."
        E = cfg.n_embd
        self.il = il
        self.S, self.Hk, self.Hv, self.Dc = cfg.ssm_d_state, cfg.ssm_n_k, cfg.ssm_n_v, cfg.ssm_d_conv
        self.key_dim = self.S * self.Hk
        self.value_dim = self.S * self.Hv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.eps = cfg.eps
        self.w_qkv = Linear(gf, p + "attn_qkv.weight", None, (self.conv_dim, E))
        self.w_gate = Linear(gf, p + "attn_gate.weight", None, (self.value_dim, E))
        self.w_beta = Linear(gf, p + "ssm_beta.weight", None, (self.Hv, E))
        self.w_alpha = Linear(gf, p + "ssm_alpha.weight", None, (self.Hv, E))
        conv = gf.tensor(p + "ssm_conv1d.weight")
        if conv.dtype != np.float32 or conv.shape != (self.conv_dim, self.Dc):
            raise GGUFError(f"{gf.path}: {p}ssm_conv1d.weight must be F32 of shape ({self.conv_dim}, {self.Dc})")
        self.conv_w = np.ascontiguousarray(conv)
        self.dt_bias = norm_weight(gf, p + "ssm_dt.bias", self.Hv)
        self.ssm_a = norm_weight(gf, p + "ssm_a", self.Hv)
        self.ssm_norm = norm_weight(gf, p + "ssm_norm.weight", self.S)
        self.w_out = Linear(gf, p + "ssm_out.weight", None, (E, self.value_dim))
        self.proj_in = LinearGroup([self.w_qkv, self.w_gate, self.w_beta, self.w_alpha])
        self.out = LinearGroup([self.w_out])

    def __call__(self, h, b: Batch, snaps, gemm: bool):
        """Rows of b's sequences -> (R, n_embd); each sequence's rows run its own conv/ssm state (seq.rec[il]).
        snaps: None, or a dict to which seq index -> (conv_snapshots (T,C,D-1), ssm_snapshots (T,Hv,S,S)) is
        added."""
        be = self.be
        xp = be.xp
        R = h.shape[0]
        S, Hk, Hv = self.S, self.Hk, self.Hv
        m, z, bt, a = self.proj_in(h, gemm=gemm)
        g = be.empty((R, Hv))
        beta = be.empty((R, Hv))
        be.gdn_gates(a, bt, self.dt_bias, self.ssm_a, g, beta)
        c = be.empty((R, self.conv_dim))
        conv_snaps = []
        for i, (r0, r1) in enumerate(b.ranges):
            conv_state = b.seqs[i].rec[self.il][0]
            n_snap = r1 - r0 if snaps is not None else 0
            cs = be.empty((n_snap, self.conv_dim, self.Dc - 1))
            be.conv1d_silu(m[r0:r1], conv_state, self.conv_w, c[r0:r1], cs)
            conv_snaps.append(cs)
        q = be.empty((R, Hk, S))
        k = be.empty((R, Hk, S))
        be.l2_norm_heads(xp.ascontiguousarray(c[:, :self.key_dim]).reshape(R, Hk, S), self.eps, q)
        be.l2_norm_heads(xp.ascontiguousarray(c[:, self.key_dim:2 * self.key_dim]).reshape(R, Hk, S), self.eps, k)
        v = xp.ascontiguousarray(c[:, 2 * self.key_dim:]).reshape(R, Hv, S)
        o = be.empty((R, Hv, S))
        for i, (r0, r1) in enumerate(b.ranges):
            ssm = b.seqs[i].rec[self.il][1]
            n_snap = r1 - r0 if snaps is not None else 0
            ss = be.empty((n_snap, Hv, S, S))
            be.gated_delta_rule(q[r0:r1], k[r0:r1], v[r0:r1], g[r0:r1], beta[r0:r1], ssm, o[r0:r1], ss)
            if snaps is not None:
                snaps[i] = (conv_snaps[i], ss)
        y = be.empty(o.shape)
        be.gated_rms_norm(o, z.reshape(R, Hv, S), self.ssm_norm, self.eps, y)
        return self.out(y.reshape(R, self.value_dim), gemm=gemm)[0]


class Qwen35Block:
    """x += Mixer(attn_norm(x)); x += FFN(post_attention_norm(x)); Mixer: GatedDeltaNet or GatedAttention."""

    PARAMS = ("attn_norm", "post_attention_norm")
    PARTS = ("mixer", "ffn")
    be = CPU

    def __init__(self, gf, cfg, il: int):
        p = f"blk.{il}."
        E = cfg.n_embd
        self.il = il
        self.recurrent = cfg.recurrent[il]
        self.eps = cfg.eps
        self.attn_norm = norm_weight(gf, p + "attn_norm.weight", E)
        self.mixer = GatedDeltaNet(gf, cfg, il) if self.recurrent else GatedAttention(gf, cfg, il)
        self.post_attention_norm = norm_weight(gf, p + "post_attention_norm.weight", E)  # the pre-FFN norm
        if cfg.n_expert > 0:  # qwen35moe: every FFN (the MTP block's included) is a mixture of experts
            self.ffn = MoEFFN(gf, cfg, il)
        else:
            if gf.has(p + "ffn_gate_inp.weight"):
                raise UnsupportedError(f"{gf.path}: layer {il} has MoE FFN tensors but the architecture is "
                                       f"'{cfg.arch}', not qwen35moe")
            self.ffn = FFN(gf, p, E, cfg.n_ff[il], "silu")

    def ffn_part(self, x, gemm):
        x += self.ffn.normed(x, self.post_attention_norm, self.eps, gemm)
        return x

    def __call__(self, x, b: Batch, rope, gemm: bool, snaps=None):
        """x (R, n_embd) on this block's backend -> x after this block. Recurrent blocks run each sequence's own
        state and add its snapshots to snaps (a dict) when given."""
        h = self.be.rms_norm(x, self.attn_norm, self.eps)
        if self.recurrent:
            x += self.mixer(h, b, snaps, gemm)
        else:
            x += self.mixer(h, b, rope, gemm)
        return self.ffn_part(x, gemm)


class Qwen35(BaseModel):
    def __init__(self, gf, cfg: ModelConfig, n_ctx: int, load_mtp: bool = True):
        self.gf = gf
        self.options = options_of(gf)
        self.config = cfg
        self.n_ctx = n_ctx
        self.token_embd = Embedding(gf, "token_embd.weight")
        self.blocks = [Qwen35Block(gf, cfg, il) for il in range(cfg.n_layer)]
        self._init_output(gf, cfg)
        self.rope = RopeTable(cfg, cfg.n_rot, None)
        self.mtp = MTPHead(gf, cfg, n_ctx, self) if (load_mtp and cfg.n_nextn > 0) else None
        self._init_cache(n_ctx)

    def kv_layers(self):
        out = {b.il: (b.mixer.Hkv, b.mixer.hd, b.mixer.hd) for b in self.blocks if not b.recurrent}
        if self.mtp is not None:
            m = self.mtp.block.mixer
            out[self.mtp.il] = (m.Hkv, m.hd, m.hd)
        return out

    def rec_shapes(self):
        return {b.il: ((b.mixer.conv_dim, b.mixer.Dc - 1), (b.mixer.Hv, b.mixer.S, b.mixer.S))
                for b in self.blocks if b.recurrent}

    @property
    def _snap(self):
        return self.seq._snap

    @_snap.setter
    def _snap(self, v):
        self.seq._snap = v

    def forward_batch(self, seqs: list, toks: list, logits="last", gemm: bool | None = None,
                      keep_hidden: bool = False, snapshots: bool = False) -> list:
        """Append toks[i] to sequence seqs[i] for every i in one pass; per sequence its logits rows. With
        snapshots=True every sequence records its recurrent state after each row (truncate can roll back)."""
        b = Batch(seqs, toks)
        R = b.n_rows
        if R == 0:
            return [np.empty((0, self.config.n_vocab), dtype=np.float32) for _ in seqs]
        if gemm is None:  # (one sequence only: the BLAS path is not row-exact)
            gemm = len(seqs) == 1 and R >= self.options.gemm_threshold
        if snapshots:
            before = [{il: (cs.copy(), ss.copy()) for il, (cs, ss) in s.rec.items()} for s in seqs]
            snaps = [{} for _ in seqs]
        x = self.token_embd(b.tokens)
        rope = self.rope

        def run(blk, x):
            if not blk.recurrent:
                return blk(x, b, rope, gemm)
            got = {} if snapshots else None
            x = blk(x, b, rope, gemm, got)
            if snapshots:
                for i in range(len(seqs)):
                    snaps[i][blk.il] = got[i]
            return x
        x, be = self._blocks(x, b, gemm, run)
        out = self._tail(x, be, b, logits, gemm, keep_hidden)
        for i, (s, n) in enumerate(zip(seqs, b.lens)):
            s._snap = (s.n_past, before[i], snaps[i], n) if snapshots else None
        b.commit()
        return out


class MTPHead(BaseModel):
    """The nextn block as a drafter with its own KV cache (docs/architectures.md, "MTP").

    forward(tokens, h_prev): row i pairs token i (at position n_past+i) with the post-norm hidden h_prev[i] that
    predicted it; returns logits for the token after it and keeps its own post-norm hidden (`hidden`) for
    chained drafts. Offloaded (llamba.offload), the layer runs on its device and its head (the trunk's output
    head when shared) on the output layer's."""

    PARAMS = ("enorm", "hnorm", "head_norm")
    LINEARS = ("eh_proj",)
    PARTS = ("block",)
    be = CPU

    def __init__(self, gf, cfg: ModelConfig, n_ctx: int, trunk: Qwen35):
        L = cfg.n_layer
        p = f"blk.{L}."
        E = cfg.n_embd
        self.config = cfg
        self.n_ctx = n_ctx
        self.il = L
        self.eps = cfg.eps
        self.embed = (Embedding(gf, p + "nextn.embed_tokens.weight") if gf.has(p + "nextn.embed_tokens.weight")
                      else trunk.token_embd)
        self.enorm = norm_weight(gf, p + "nextn.enorm.weight", E)
        self.hnorm = norm_weight(gf, p + "nextn.hnorm.weight", E)
        self.eh_proj = Linear(gf, p + "nextn.eh_proj.weight", None, (E, 2 * E))
        self.block = Qwen35Block(gf, cfg, L)
        self.head_norm = (norm_weight(gf, p + "nextn.shared_head_norm.weight", E)
                          if gf.has(p + "nextn.shared_head_norm.weight") else trunk.output_norm)
        self.output = (Linear(gf, p + "nextn.shared_head_head.weight", shape=(cfg.n_vocab, E))
                       if gf.has(p + "nextn.shared_head_head.weight") else trunk.output)
        self.lm_head = (trunk.out_layer.head if self.output is trunk.output else
                        Head(self.output, cfg.n_vocab, cfg.final_logit_softcap))
        self.rope = RopeTable(cfg, cfg.n_rot, None)
        self.trunk = trunk  # its KV layer lives in the trunk's pool; its position in each SeqCache's `mtp` view
        self.options = trunk.options

    @property
    def seq(self):
        return self.trunk.seq.mtp

    @property
    def pool(self):
        return self.trunk.pool

    @property
    def out_dev(self):
        """This layer when it runs on a device (llamba.offload), else None."""
        return self if self.be is not CPU else None

    def forward(self, tokens, h_prev, logits: str = "last", gemm: bool | None = None):
        """One sequence (the default one): see forward_batch."""
        out = self.forward_batch([self.seq], [tokens], [h_prev], logits, gemm)[0]
        self.hidden = self.seq.hidden
        return None if logits == "none" else out

    def forward_batch(self, views: list, toks: list, h_prevs: list, logits="last", gemm: bool | None = None):
        """For each sequence's MTP view: row i pairs token i (at position n_past+i) with the post-norm hidden
        h_prev[i] that predicted it; returns logits for the token after it and keeps its own post-norm hidden
        rows (`view.hidden`, of the logits rows) for chained drafts."""
        b = Batch(views, toks)
        R = b.n_rows
        if R == 0:
            return [np.empty((0, self.config.n_vocab), dtype=np.float32) for _ in views]
        if gemm is None:
            gemm = len(views) == 1 and R >= self.options.gemm_threshold
        be = self.be
        xp = be.xp
        E = self.config.n_embd
        e = be.rms_norm(be.take(self.embed(b.tokens)), self.enorm, self.eps)
        hp = np.concatenate([np.ascontiguousarray(h, dtype=np.float32).reshape(-1, E) for h in h_prevs])
        hh = be.rms_norm(be.take(hp), self.hnorm, self.eps)
        x = be.linear(self.eh_proj, xp.concatenate([e, hh], axis=1), gemm)
        x = self.block(x, b, self.rope, gemm)
        rows, spans = self._rows_of(b, logits)
        hM = be.rms_norm(xp.ascontiguousarray(x[be.index(rows)]), self.head_norm, self.eps)
        head = self.lm_head
        if rows.shape[0] == 0:
            out = np.empty((0, self.config.n_vocab), dtype=np.float32)
        else:
            out = head(hM if head.be is be else head.be.take(hM), False)
        hM = be.to_host(hM)
        res = []
        for v, (a, c) in zip(views, spans):
            v.hidden = hM[a:c]
            res.append(out[a:c])
        b.commit()
        return res


def build(gf, n_ctx: int, **opts):
    return Qwen35(gf, config_from_gguf(gf), n_ctx, load_mtp=opts.get("load_mtp", True))
