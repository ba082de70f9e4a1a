"""Shared pieces of every architecture: the model state protocol and the standard pre-norm attention + FFN
decoder block used by llama, gemma3 and qwen3.

A model holds weights; sequence state lives in `SeqCache` objects (llamba.kv_cache) over a shared `KVPool`.
`forward_batch(seqs, toks)` runs the rows of several sequences through every layer at once: weight matmuls over
all rows (row-exact kernels: a row's numbers never depend on the other rows), RoPE, KV writes, attention and
recurrences per sequence over its own state.

For one caller, a model also keeps a default sequence (`seq`, over a one-block pool of n_ctx slots: the
contiguous layout) and the single-sequence API on it: `n_past`, `forward(tokens)` appends tokens at positions
n_past.. and returns logits, `truncate(n)` rolls back.
"""
from __future__ import annotations

import numpy as np

from llamba.compute import CPU
from llamba.errors import LlambaError
from llamba.kernels import ops as K
from llamba.kv_cache import Batch, KVPool, SeqCache
from llamba.layers import GEGLU, RMS_NORM, SWIGLU, Embedding, Linear, LinearGroup, norm_weight
from llamba.options import NEVER, Options, options_of

# Prompt batches at least `model.options.gemm_threshold` long use the dequantize+BLAS path (llamba.options:
# gemm_min_batch). Off by default: the quantized int8 path is as fast on 2 threads (measured: SmolLM2 pp512 373 vs
# 141 tokens/s, because OpenBLAS's and Numba's OpenMP threads spin against each other), and it keeps prefill
# numerics identical to decode and to llama.cpp's. GEMM_MIN_BATCH: the default threshold (never), for code
# without a model's options at hand.
GEMM_MIN_BATCH = NEVER


class RopeTable:
    """cos/sin for the positions of one forward call, computed once per (base, scale) and shared by layers."""

    def __init__(self, cfg, n_rot: int, freq_factors: np.ndarray | None):
        self.cfg = cfg
        self.n_rot = n_rot
        self.ff = (freq_factors if freq_factors is not None else np.ones(n_rot // 2, dtype=np.float32))
        self._cache: dict = {}

    def get(self, pos: np.ndarray, base: float, freq_scale: float):
        key = (base, freq_scale)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is pos:
            return hit[1], hit[2]
        c = self.cfg
        T = pos.shape[0]
        cos = np.empty((T, self.n_rot // 2), dtype=np.float32)
        sin = np.empty_like(cos)
        K.rope_cache(pos, self.n_rot, base, freq_scale, self.ff, c.rope_ext_factor, c.rope_attn_factor,
                     c.rope_beta_fast, c.rope_beta_slow, c.n_ctx_orig, cos, sin)
        self._cache[key] = (pos, cos, sin)
        return cos, sin


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    out = np.empty_like(x)
    K.rms_norm(x, w, eps, out)
    return out


class Head:
    """Output projection (+ final logit soft-capping): post-norm rows (R, n_embd) -> host logits (R, n_vocab)."""

    GROUPS = ("g",)
    be = CPU

    def __init__(self, lin: Linear, n_vocab: int, cap: float):
        self.lin = lin
        self.n_vocab = n_vocab
        self.cap = cap
        self.g = None  # LinearGroup([lin]), built on first use

    def __call__(self, hN, gemm: bool) -> np.ndarray:
        if hN.shape[0] == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        if self.g is None:
            self.g = LinearGroup([self.lin])
        out = self.g(hN, gemm=gemm)[0]
        if self.cap > 0:
            out = self.be.softcap(out, self.cap)
        return self.be.to_host(out)


class OutputLayer:
    """output_norm + Head: `(x, rows, keep_hidden, gemm) -> (hidden, logits)`, host arrays; hidden is the
    post-norm rows of x (all of them) when kept, logits those of the rows asked for."""

    PARAMS = ("norm",)
    PARTS = ("head",)
    be = CPU

    def __init__(self, norm: np.ndarray, head: Head, eps: float):
        self.norm = norm
        self.head = head
        self.eps = eps

    def __call__(self, x, rows: np.ndarray, keep_hidden: bool, gemm: bool):
        be = self.be
        xp = be.xp
        ri = be.index(rows)
        hN = be.rms_norm(x if keep_hidden else xp.ascontiguousarray(x[ri]), self.norm, self.eps)
        hidden = be.to_host(hN) if keep_hidden else None
        out = self.head(xp.ascontiguousarray(hN[ri]) if keep_hidden else hN, gemm and rows.shape[0] > 1)
        return hidden, out


class BaseModel:
    """Sequence handling and the generation-facing API shared by all architectures."""

    config = None
    out_layer = None  # OutputLayer (on the CPU, or on a device after llamba.offload)
    state_be: dict = {}  # GPU offload: il -> backend holding that layer's KV / recurrent state (llamba.compute)
    seq = None  # the default sequence (single-caller API)
    hidden = None
    options = Options()  # llamba.options: set from the GGUF file's by each architecture's constructor

    @property
    def out_dev(self):
        """The output layer when it runs on a device (llamba.offload), else None."""
        ol = self.out_layer
        return ol if ol is not None and ol.be is not CPU else None

    # ---- sequences
    def kv_layers(self) -> dict[int, tuple[int, int, int]]:
        """il -> (n_head_kv, head_dim_k, head_dim_v) of every layer with a KV cache (MTP layers included)."""
        return {}

    def rec_shapes(self) -> dict:
        """il -> (conv state shape, ssm state shape) of every recurrent layer."""
        return {}

    def state_layers(self) -> list[int]:
        """The trunk's KV layers (what save_state keeps)."""
        return [il for il in self.kv_layers() if il < self.config.n_layer]

    def new_pool(self, n_slots: int, block_size: int) -> KVPool:
        pool = KVPool(self.kv_layers(), n_slots, block_size, self.options.kv_dtype)
        for il, be in self.state_be.items():  # offloaded layers: their KV arrays on their device
            if il in pool.k:
                pool.k[il] = be.zeros(pool.k[il].shape, be.kv_dtype)
                pool.v[il] = be.zeros(pool.v[il].shape, be.kv_dtype)
        return pool

    def new_seq(self, pool: KVPool, n_ctx: int | None = None) -> SeqCache:
        seq = SeqCache(pool, n_ctx or pool.n_slots, self.rec_shapes(), mtp=getattr(self, "mtp", None) is not None)
        for il, be in self.state_be.items():  # offloaded recurrent layers: their state on their device
            if il in seq.rec:
                seq.rec[il] = tuple(be.zeros(a.shape, np.float32) for a in seq.rec[il])
        return seq

    def _init_cache(self, n_ctx: int):
        """The default sequence: one block of n_ctx slots (the contiguous layout)."""
        self.n_ctx = n_ctx
        self.pool = self.new_pool(n_ctx, n_ctx)
        self.seq = self.new_seq(self.pool, n_ctx)

    @property
    def kv(self) -> KVPool:
        return self.pool

    @property
    def rec(self) -> dict:
        return self.seq.rec

    @property
    def n_past(self) -> int:
        return self.seq.n_past

    @n_past.setter
    def n_past(self, n: int):
        self.seq.n_past = n

    def check_room(self, n_tokens: int):
        self.seq.check_room(n_tokens)

    def reset(self):
        self.truncate(0)

    def can_truncate(self, n: int) -> bool:
        return self.seq.can_truncate(n)

    def truncate(self, n: int):
        """Forget every position >= n of the default sequence."""
        self.seq.truncate(n)

    def forward(self, tokens, logits: str = "last", gemm: bool | None = None, keep_hidden: bool = False, **kw):
        """Process `tokens` at positions n_past.. of the default sequence; returns logits (R, n_vocab) for the
        rows asked for (logits 'all', 'last' or 'none'). gemm=None picks the BLAS prefill path for batches of at
        least options.gemm_min_batch rows; False forces the row-exact quantized path (decode, speculative verify)."""
        out = self.forward_batch([self.seq], [tokens], logits, gemm=gemm, keep_hidden=keep_hidden, **kw)[0]
        self.hidden = self.seq.hidden
        return out

    def _rows_of(self, b: Batch, modes) -> tuple[np.ndarray, list]:
        """Global row indices of the logits asked for, and per sequence its (start, stop) among them."""
        if isinstance(modes, str):
            modes = [modes] * len(b.seqs)
        idx, spans = [], []
        n = 0
        for (r0, r1), m in zip(b.ranges, modes):
            sl = self._logit_rows(r1 - r0, m)
            rr = np.arange(r0 + sl.start, r0 + sl.stop, dtype=np.int64)
            idx.append(rr)
            spans.append((n, n + rr.shape[0]))
            n += rr.shape[0]
        return (np.concatenate(idx) if idx else np.empty(0, np.int64)), spans

    def _blocks(self, x, b: Batch, gemm: bool, run):
        """x through every block, `run(blk, x)` calling it; activations move into a block's backend (the CPU or a
        device) where it changes. Returns x and the backend it is on."""
        be = CPU
        for blk in self.blocks:
            if blk.be is not be:
                be = blk.be
                x = be.take(x)
            x = run(blk, x)
        return x, be

    def _tail(self, x, be, b: Batch, logits, gemm: bool, keep_hidden: bool) -> list:
        """Output norm + head of the rows asked for; per sequence its logits (and hidden rows if kept)."""
        rows, spans = self._rows_of(b, logits)
        ol = self.out_layer
        if ol.be is not be:
            x = ol.be.take(x)
        hidden, out = ol(x, rows, keep_hidden, gemm)
        res = []
        for s, (r0, r1), (a, c) in zip(b.seqs, b.ranges, spans):
            s.hidden = hidden[r0:r1] if keep_hidden else None
            res.append(out[a:c] if len(b.seqs) > 1 else out)
        return res

    def get_state(self) -> dict:
        """A copy of what the default sequence's cache holds (KV rows of the cached positions, recurrent
        states): `set_state` puts it back, in this model or another instance of the same model."""
        if getattr(self, "offload", None) is not None:
            raise LlambaError("saving the cache state of a GPU-offloaded model is not supported")
        n = self.n_past
        c = self.config
        st = {"n_past": n, "model": (c.arch, c.n_vocab, c.n_embd, c.n_layer_all),
              "kv": {il: self.seq.kv_rows(il, n) for il in self.state_layers()}}
        if self.rec:
            st["rec"] = {il: (cs.copy(), ss.copy()) for il, (cs, ss) in self.rec.items()}
        return st

    def set_state(self, st: dict):
        if getattr(self, "offload", None) is not None:
            raise LlambaError("restoring a cache state into a GPU-offloaded model is not supported")
        n = int(st["n_past"])
        if n > self.n_ctx:
            raise LlambaError(f"the saved state holds {n} positions but this context holds {self.n_ctx}")
        mine = set(self.state_layers())
        rec = self.rec or {}
        c = self.config
        if tuple(st.get("model", ())) != (c.arch, c.n_vocab, c.n_embd, c.n_layer_all) or \
                set(st["kv"]) != mine or set(st.get("rec", {})) != set(rec):
            raise LlambaError("the saved state is from a different model (its layers do not match)")
        kv = self.pool
        for il, (k, v) in st["kv"].items():
            if k.shape[0] != kv.k[il].shape[0] or k.shape[2:] != kv.k[il].shape[2:] or k.dtype != kv.k[il].dtype \
                    or k.shape[1] != n or v.shape[:2] != k.shape[:2] or v.shape[2:] != kv.v[il].shape[2:] \
                    or v.dtype != kv.v[il].dtype:
                raise LlambaError("the saved state is from a different model (its KV shapes do not match)")
        for il, (cs, ss) in st.get("rec", {}).items():
            if cs.shape != rec[il][0].shape or ss.shape != rec[il][1].shape:
                raise LlambaError("the saved state is from a different model (its recurrent states do not match)")
        self.seq.release()
        self.seq.reserve(n)
        for il, (k, v) in st["kv"].items():
            self.seq.set_kv_rows(il, k, v)
        for il, (cs, ss) in st.get("rec", {}).items():
            rec[il][0][...] = cs
            rec[il][1][...] = ss
        self.seq.n_past = n

    def _logit_rows(self, T: int, logits: str) -> slice:
        if logits == "all":
            return slice(0, T)
        if logits == "last":
            return slice(T - 1, T)
        if logits == "none":
            return slice(T, T)
        raise ValueError(f"logits must be 'all', 'last' or 'none', not {logits!r}")

    def _init_output(self, gf, cfg):
        """output_norm, output (tied to token_embd when the file has no output.weight) and the output layer."""
        self.output_norm = norm_weight(gf, "output_norm.weight", cfg.n_embd)
        self.output = Linear(gf, "output.weight" if gf.has("output.weight") else "token_embd.weight",
                             shape=(cfg.n_vocab, cfg.n_embd))
        self.out_layer = OutputLayer(self.output_norm, Head(self.output, cfg.n_vocab, cfg.final_logit_softcap),
                                     cfg.eps)

    def head(self, hN: np.ndarray, gemm: bool) -> np.ndarray:
        """Output projection (+ soft-capping) of post-norm hidden rows (R, n_embd) -> host logits (R, n_vocab)."""
        return self.out_layer.head(hN, gemm)


class FFN:
    """Gated FFN: down(act(gate(x)) * up(x)), act = SiLU (SwiGLU) or GELU-tanh (GeGLU)."""

    GROUPS = ("up", "down")
    be = CPU

    def __init__(self, gf, p: str, n_embd: int, n_ff: int, activation: str = "silu"):
        self.n_ff = n_ff
        if gf.has(p + "ffn_gate.weight") or not gf.has(p + "ffn_up.weight"):
            self.w_gate = Linear(gf, p + "ffn_gate.weight", p + "ffn_gate.bias", (n_ff, n_embd))
            self.w_up = Linear(gf, p + "ffn_up.weight", p + "ffn_up.bias", (n_ff, n_embd))
            self.up = LinearGroup([self.w_gate, self.w_up])
        else:  # phi3: one ffn_up of 2 n_ff rows, gate rows first (llama.cpp's fused SwiGLU)
            self.w_gate = None
            self.w_up = Linear(gf, p + "ffn_up.weight", p + "ffn_up.bias", (2 * n_ff, n_embd))
            self.up = LinearGroup([self.w_up])
        self.w_down = Linear(gf, p + "ffn_down.weight", p + "ffn_down.bias", (n_embd, n_ff))
        self.glu = SWIGLU if activation == "silu" else GEGLU  # LinearGroup input mode of down
        self.down = LinearGroup([self.w_down])

    def __call__(self, h: np.ndarray, gemm: bool) -> np.ndarray:
        return self._down(self.up(h, gemm=gemm), gemm)

    def normed(self, x: np.ndarray, norm_w: np.ndarray, eps: float, gemm: bool) -> np.ndarray:
        """self(rms_norm(x, norm_w, eps)); small batches in two fused kernel calls."""
        return self._down(self.up(x, RMS_NORM, None, norm_w, eps, gemm=gemm), gemm)

    def _down(self, gu: list, gemm: bool) -> np.ndarray:
        """down(act(gate) * up) from the list [gate, up] (which it empties); a fused [gate | up] is split."""
        be = self.be
        if self.w_gate is None:
            gup = gu.pop()
            gu += [be.xp.ascontiguousarray(gup[:, :self.n_ff]), be.xp.ascontiguousarray(gup[:, self.n_ff:])]
            del gup
        g = gu[0]
        if gemm or g.shape[0] > self.down.max_t or not self.down.fused:
            # prompt batches: act(g) * u written over g, and u let go (the list held the last reference) before
            # the down projection: the same kernel and numbers as LinearGroup's transform, with two (T, n_ff)
            # buffers fewer at the memory peak of a prefill
            (be.swiglu if self.glu == SWIGLU else be.geglu_tanh)(g, gu[1], g)
            gu.clear()
            return self.down(g, gemm=gemm)[0]
        u = gu[1]
        gu.clear()
        return self.down(g, self.glu, u, gemm=gemm)[0]


class AttentionBlock:
    """Pre-norm transformer block: [norm -> attention (+q/k norm, rope) -> (post norm) -> residual] then
    [norm -> gated FFN -> (post norm) -> residual]. Which optional pieces exist is read from the file.
    Computes through its backend `be` (llamba.compute: the CPU, or a device after llamba.offload)."""

    GROUPS = ("qkv", "o")
    PARAMS = ("attn_norm", "q_norm", "k_norm", "post_attn_norm", "ffn_norm", "post_ffw_norm")
    PARTS = ("ffn",)
    be = CPU

    def __init__(self, gf, cfg, il: int, *, activation: str, post_norms: bool, ffn=None):
        p = f"blk.{il}."
        E = cfg.n_embd
        self.il = il
        self.n_head = cfg.n_head[il]
        self.n_head_kv = cfg.n_head_kv[il]
        self.hd = cfg.head_dim
        self.hd_v = cfg.head_dim_v
        self.eps = cfg.eps
        self.attn_norm = norm_weight(gf, p + "attn_norm.weight", E)
        nq, nk, nv = self.n_head * self.hd, self.n_head_kv * self.hd, self.n_head_kv * self.hd_v
        if gf.has(p + "attn_qkv.weight"):
            self.wqkv = Linear(gf, p + "attn_qkv.weight", p + "attn_qkv.bias", (nq + nk + nv, E))
            self.wq = self.wk = self.wv = None
        else:
            self.wqkv = None
            self.wq = Linear(gf, p + "attn_q.weight", p + "attn_q.bias", (nq, E))
            self.wk = Linear(gf, p + "attn_k.weight", p + "attn_k.bias", (nk, E))
            self.wv = Linear(gf, p + "attn_v.weight", p + "attn_v.bias", (nv, E))
        self.splits = (nq, nq + nk)
        self.qkv = LinearGroup([self.wqkv] if self.wqkv is not None else [self.wq, self.wk, self.wv])
        self.q_norm = norm_weight(gf, p + "attn_q_norm.weight", self.hd) if gf.has(p + "attn_q_norm.weight") else None
        self.k_norm = norm_weight(gf, p + "attn_k_norm.weight", self.hd) if gf.has(p + "attn_k_norm.weight") else None
        self.wo = Linear(gf, p + "attn_output.weight", p + "attn_output.bias", (E, self.n_head * self.hd_v))
        self.o = LinearGroup([self.wo])
        self.post_attn_norm = norm_weight(gf, p + "post_attention_norm.weight", E) if post_norms else None
        self.ffn_norm = norm_weight(gf, p + "ffn_norm.weight", E)
        self.ffn = ffn if ffn is not None else FFN(gf, p, E, cfg.n_ff[il], activation)  # ffn: e.g. an MoEFFN
        self.post_ffw_norm = norm_weight(gf, p + "post_ffw_norm.weight", E) if post_norms else None
        self.swa = cfg.swa_layers[il] if cfg.swa_layers else False
        self.n_swa = cfg.n_swa if self.swa else 0
        self.rope_base = cfg.rope_base_swa if self.swa else cfg.rope_base
        self.freq_scale = 1.0 if self.swa else cfg.freq_scale
        self.neox = cfg.rope_neox
        self.n_rot = cfg.n_rot
        self.q_scale = cfg.attn_scale  # > 0: scale Q, attend with scale 1 (gemma3)
        self.softcap = cfg.attn_softcap  # > 0: attention logit soft-capping (gemma2)

    def attention(self, h, b: Batch, rope: RopeTable, gemm: bool, normed: bool = False):
        """Attention of the rows h (or of rms_norm(h, attn_norm) with normed=True) -> (R, n_head*hd_v); each row
        attends over its own sequence's cache (b: the batch's positions, slots and block tables)."""
        be = self.be
        xp = be.xp
        T = h.shape[0]
        if normed:
            qkv = self.qkv(h, RMS_NORM, None, self.attn_norm, self.eps, gemm=gemm)
        else:
            qkv = self.qkv(h, gemm=gemm)
        if self.wqkv is not None:
            a, c = self.splits
            q, k, v = qkv[0][:, :a], qkv[0][:, a:c], qkv[0][:, c:]
        else:
            q, k, v = qkv
        q = xp.ascontiguousarray(q).reshape(T, self.n_head, self.hd)
        k = xp.ascontiguousarray(k).reshape(T, self.n_head_kv, self.hd)
        v = xp.ascontiguousarray(v).reshape(T, self.n_head_kv, self.hd_v)
        if self.q_norm is not None:
            q = be.rms_norm(q.reshape(-1, self.hd), self.q_norm, self.eps).reshape(q.shape)
        if self.k_norm is not None:
            k = be.rms_norm(k.reshape(-1, self.hd), self.k_norm, self.eps).reshape(k.shape)
        cos, sin = rope.get(b.pos, self.rope_base, self.freq_scale)
        be.rope(q, cos, sin, self.n_rot, self.neox)
        be.rope(k, cos, sin, self.n_rot, self.neox)
        if self.q_scale > 0:
            q *= np.float32(self.q_scale)
            scale = 1.0
        else:
            scale = 1.0 / np.sqrt(self.hd)
        kc, vc = b.kv.k[self.il], b.kv.v[self.il]
        be.store_kv_slots(k, v, kc, vc, b.slots)
        o = be.empty((T, self.n_head, self.hd_v))
        args = (q, kc, vc, b.pos, b.row_seq, b.tables, b.bs, b.n_kv, scale, self.n_swa, o)
        if self.softcap > 0:  # (left out, softcap is a compile-time 0 in the kernel: no cost for other models)
            be.attention_paged(*args, self.softcap)
        else:
            be.attention_paged(*args)
        return o.reshape(T, -1)

    def __call__(self, x, b: Batch, rope, gemm: bool):
        """x (R, n_embd) on this block's backend -> x after the block (updated in place)."""
        be = self.be
        a = self.o(self.attention(x, b, rope, gemm, normed=True), gemm=gemm)[0]
        if self.post_attn_norm is not None:
            a = be.rms_norm(a, self.post_attn_norm, self.eps)
        x += a
        f = self.ffn.normed(x, self.ffn_norm, self.eps, gemm)
        if self.post_ffw_norm is not None:
            f = be.rms_norm(f, self.post_ffw_norm, self.eps)
        x += f
        return x


class Transformer(BaseModel):
    """Decoder-only transformer made of AttentionBlocks (llama, gemma3, qwen3)."""

    activation = "silu"
    post_norms = False

    def __init__(self, gf, cfg, n_ctx: int):
        self.gf = gf
        self.options = options_of(gf)
        self.config = cfg
        self.n_ctx = n_ctx
        self.token_embd = Embedding(gf, "token_embd.weight")
        self.blocks = [AttentionBlock(gf, cfg, il, activation=self.activation, post_norms=self.post_norms,
                                      ffn=self.make_ffn(gf, cfg, il))
                       for il in range(cfg.n_layer)]
        self._init_output(gf, cfg)
        ff = gf.tensor("rope_freqs.weight").astype(np.float32) if gf.has("rope_freqs.weight") else None
        self.rope = RopeTable(cfg, cfg.n_rot, ff)
        self._init_cache(n_ctx)

    def kv_layers(self):
        out = {b.il: (b.n_head_kv, b.hd, b.hd_v) for b in self.blocks}
        mtp = getattr(self, "mtp", None)
        if mtp is not None:  # a sidecar MTP head (llamba.mtp_head): its KV layer in the same pool
            out.update(mtp.head_kv_layer())
        return out

    def make_ffn(self, gf, cfg, il: int):
        """The FFN of layer il when it is not the dense gated FFN (None: that one): with experts in the config
        (qwen3moe, Mixtral-style llama), a layer with a router is a mixture of experts without a shared expert."""
        if cfg.n_expert and gf.has(f"blk.{il}.ffn_gate_inp.weight"):
            from llamba.models.moe import MoEFFN
            return MoEFFN(gf, cfg, il, shared=False)
        return None

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        x = self.token_embd(tokens)
        if self.config.embd_scale > 0:
            x *= np.float32(self.config.embd_scale)
        return x

    def forward_batch(self, seqs: list, toks: list, logits="last", gemm: bool | None = None,
                      keep_hidden: bool = False, **kw) -> list:
        """Append toks[i] to sequence seqs[i] for every i in one pass; returns per sequence its logits rows
        (logits: 'all' | 'last' | 'none', or one such mode per sequence)."""
        b = Batch(seqs, toks)
        R = b.n_rows
        if R == 0:
            return [np.empty((0, self.config.n_vocab), dtype=np.float32) for _ in seqs]
        if gemm is None:  # (one sequence only: the BLAS path is not row-exact, so batches of several never take it)
            gemm = len(seqs) == 1 and R >= self.options.gemm_threshold
        x = self.embed(b.tokens)
        rope = self.rope
        x, be = self._blocks(x, b, gemm, lambda blk, x: blk(x, b, rope, gemm))
        out = self._tail(x, be, b, logits, gemm, keep_hidden)
        b.commit()
        return out
