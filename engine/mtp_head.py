"""Sidecar MTP heads: a small GGUF holding one Qwen3.5-style `nextn` block trained for a given trunk model
(`llamba mtp-train`), loaded next to the trunk with `--mtp-head HEAD.gguf` / `Llama(mtp_head=...)`.

The head predicts token p+2 from the trunk's post-norm hidden h[p] and token p+1, and chains on its own hidden
like the Qwen3.5 head (llamba.models.qwen35.MTPHead):

    x = eh_proj(enorm(embed(t[p+1])) | hnorm(h[p]))      embed: the trunk's token_embd (unscaled)
    x = block(x)                                          one decoder block of the trunk's kind (llamba.models.base
                                                          AttentionBlock: its norms, QK-norm, activation, RoPE),
                                                          attention over its own KV layer at index n_layer
    hidden = output_norm(x)                               the trunk's output norm
    logits = output(hidden)                               the trunk's output head, restricted to the draft
                                                          vocabulary when the file has one (FR-Spec style)

Its KV layer lives in the trunk's KV pool and its position in each sequence's `MTPCache` view, exactly as the
Qwen3.5 head's, so the MTP proposer (llamba.speculative.mtp) and the batching scheduler draft with it unchanged.

File layout: general.architecture = "llamba-mtp-head"; tensors `blk.{L}.nextn.{eh_proj,enorm,hnorm}.weight` and
the block's `blk.{L}.attn_*`, `ffn_*` (+ Gemma's post norms), L = the trunk's n_layer; metadata `mtp_head.*`
ties it to its trunk: architecture, n_embd, n_vocab, n_layer and a hash of the token embedding (`embd_hash`: shape,
type and a strided sample of its raw rows), plus `mtp_head.draft_vocab` (token ids, optional).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from llamba.compute import CPU
from llamba.errors import GGUFError, LlambaError
from llamba.kv_cache import Batch
from llamba.layers import Linear, norm_weight
from llamba.models.base import AttentionBlock, BaseModel, Head

HEAD_ARCH = "llamba-mtp-head"
P = "mtp_head."
TRUNK_ARCHS = ("llama", "gemma2", "gemma3", "phi3", "qwen2", "qwen3", "qwen3moe")


class MTPHeadError(LlambaError):
    """A head file that does not belong to the model (or is not a head file)."""


def embedding_hash(gf) -> str:
    """Fingerprint of the trunk's token embedding: its shape, type and up to 4096 evenly spaced raw rows."""
    info = gf.info("token_embd.weight")
    w = gf.tensor("token_embd.weight")
    w = w.reshape(info.ne[1], -1)
    n = w.shape[0]
    rows = np.unique(np.linspace(0, n - 1, min(n, 4096)).astype(np.int64))
    h = hashlib.sha256()
    h.update(repr((tuple(int(x) for x in info.ne), int(info.type_id))).encode())
    h.update(np.ascontiguousarray(w[rows]).tobytes())
    return h.hexdigest()[:32]


def head_config(cfg, n_head: int, n_head_kv: int, n_ff: int):
    """The trunk's config with one more layer (the head's, index n_layer): global attention, the given widths."""
    L = cfg.n_layer

    def ext(t, v):
        t = tuple(t)[:L]
        return t + (v,) * (L + 1 - len(t))
    swa = ext(cfg.swa_layers, False) if cfg.swa_layers else ()
    return dataclasses.replace(cfg, n_layer_all=L + 1, n_nextn=1, n_head=ext(cfg.n_head, n_head),
                               n_head_kv=ext(cfg.n_head_kv, n_head_kv), n_ff=ext(cfg.n_ff, n_ff), swa_layers=swa)


def _rows_linear(src: Linear, ids: np.ndarray, name: str, repack: bool = False) -> Linear:
    """A Linear made of rows `ids` of `src` (quantized rows are independent: blocks run along the input); with
    `repack`, Q8_0 rows also get the packed layout (as the trunk's Options.repack says)."""
    from llamba.kernels import quants_simple as QS
    lin = object.__new__(Linear)
    lin.name = name
    lin.type_id = src.type_id
    lin.cols = src.cols
    lin.rows = int(ids.shape[0])
    lin.w = np.ascontiguousarray(src.w[ids])
    lin.ops = src.ops
    lin.bias = None if src.bias is None else src.bias[ids].copy()
    lin.wp = None
    if lin.type_id == QS.Q8_0 and lin.w.dtype == np.uint8 and repack:
        lin.wp = QS.repack_q8_0(lin.w)
    return lin


class SidecarHead(BaseModel):
    """A trained nextn block over a frozen trunk (see the module docstring); the interface of qwen35.MTPHead:
    forward(tokens, h_prev), forward_batch(views, toks, h_prevs), n_past / truncate on the default view, hidden."""

    be = CPU

    def __init__(self, hf, trunk, path: str = ""):
        cfg = trunk.config
        L = cfg.n_layer
        p = f"blk.{L}."
        E = cfg.n_embd
        self.path = path
        self.trunk = trunk
        self.il = L
        self.eps = cfg.eps
        self.n_ctx = trunk.n_ctx
        n_head = int(hf.get(P + "head_count", cfg.n_head[L - 1]))
        n_head_kv = int(hf.get(P + "head_count_kv", cfg.n_head_kv[L - 1]))
        n_ff = int(hf.get(P + "feed_forward_length", cfg.n_ff[L - 1]))
        self.config = cfg  # what callers read (n_vocab, n_embd): the trunk's
        self.block_config = head_config(cfg, n_head, n_head_kv, n_ff)
        self.embed = trunk.token_embd
        self.enorm = norm_weight(hf, p + "nextn.enorm.weight", E)
        self.hnorm = norm_weight(hf, p + "nextn.hnorm.weight", E)
        self.eh_proj = Linear(hf, p + "nextn.eh_proj.weight", None, (E, 2 * E))
        act = getattr(trunk, "activation", "silu")
        post = bool(getattr(trunk, "post_norms", False))
        self.block = AttentionBlock(hf, self.block_config, L, activation=act, post_norms=post)
        self.head_norm = (norm_weight(hf, p + "nextn.shared_head_norm.weight", E)
                          if hf.has(p + "nextn.shared_head_norm.weight") else trunk.output_norm)
        dv = hf.get(P + "draft_vocab")
        self.draft_vocab = None
        if dv is not None and len(dv) > 0:
            ids = np.asarray(dv, dtype=np.int64)
            if ids.min() < 0 or ids.max() >= cfg.n_vocab or np.unique(ids).shape[0] != ids.shape[0]:
                raise MTPHeadError(f"{path}: mtp_head.draft_vocab holds ids outside 0..{cfg.n_vocab - 1} or twice")
            self.draft_vocab = ids
            self.lm_head = Head(_rows_linear(trunk.output, ids, "output.draft", trunk.options.repack), ids.shape[0],
                                cfg.final_logit_softcap)
        else:
            self.lm_head = trunk.out_layer.head
        self.rope = trunk.rope

    def head_kv_layer(self) -> dict:
        b = self.block
        return {self.il: (b.n_head_kv, b.hd, b.hd_v)}

    @property
    def seq(self):
        return self.trunk.seq.mtp

    @property
    def pool(self):
        return self.trunk.pool

    @property
    def out_dev(self):
        return None

    def forward(self, tokens, h_prev, logits: str = "last", gemm: bool | None = None):
        out = self.forward_batch([self.seq], [tokens], [h_prev], logits, gemm)[0]
        self.hidden = self.seq.hidden
        return None if logits == "none" else out

    def forward_batch(self, views: list, toks: list, h_prevs: list, logits="last", gemm: bool | None = None):
        """For each sequence's MTP view: row i pairs token i (at position n_past+i) with the trunk's post-norm hidden
        h_prev[i] that predicted it; returns (full-vocabulary) logits for the token after it, and keeps the head's
        own post-norm hidden rows (`view.hidden`) for chained drafts. With a draft vocabulary, tokens outside it
        get -inf."""
        b = Batch(views, toks)
        nv = self.config.n_vocab
        if b.n_rows == 0:
            return [np.empty((0, nv), dtype=np.float32) for _ in views]
        if gemm is None:
            gemm = len(views) == 1 and b.n_rows >= self.trunk.options.gemm_threshold
        be = self.be
        E = self.config.n_embd
        e = be.rms_norm(self.embed(b.tokens), self.enorm, self.eps)
        hp = np.concatenate([np.ascontiguousarray(h, dtype=np.float32).reshape(-1, E) for h in h_prevs])
        hh = be.rms_norm(hp, self.hnorm, self.eps)
        x = be.linear(self.eh_proj, np.concatenate([e, hh], axis=1), gemm)
        x = self.block(x, b, self.rope, gemm)
        rows, spans = self._rows_of(b, logits)
        hM = be.rms_norm(np.ascontiguousarray(x[rows]), self.head_norm, self.eps)
        if rows.shape[0] == 0:
            out = np.empty((0, nv), dtype=np.float32)
        else:
            lg = self.lm_head(hM, False)
            if self.draft_vocab is None:
                out = lg
            else:
                out = np.full((lg.shape[0], nv), -np.inf, dtype=np.float32)
                out[:, self.draft_vocab] = lg
        res = []
        for v, (a, c) in zip(views, spans):
            v.hidden = hM[a:c]
            res.append(out[a:c])
        b.commit()
        return res


def read_head(path: str):
    from llamba.gguf import GGUFFile
    if not os.path.isfile(path):
        raise MTPHeadError(f"MTP head file not found: {path}")
    hf = GGUFFile(path)
    if hf.architecture != HEAD_ARCH:
        raise MTPHeadError(f"{path} is not an MTP head file (architecture '{hf.architecture}', expected "
                           f"'{HEAD_ARCH}': make one with llamba mtp-train)")
    return hf


def check_head(hf, gf, cfg, path: str):
    """One-line error unless the head was trained for this trunk."""
    want = {"trunk_architecture": cfg.arch, "trunk_n_embd": cfg.n_embd, "trunk_n_vocab": cfg.n_vocab,
            "trunk_n_layer": cfg.n_layer}
    for k, v in want.items():
        got = hf.get(P + k)
        if got is None:
            raise MTPHeadError(f"{path}: missing metadata key '{P}{k}'")
        if (str(got) if isinstance(v, str) else int(got)) != v:
            raise MTPHeadError(f"{path} is an MTP head for another model ({k.replace('trunk_', '')} {got}, this "
                               f"model has {v})")
    got = hf.get(P + "embd_hash")
    if got is None or str(got) != embedding_hash(gf):
        raise MTPHeadError(f"{path} is an MTP head for another model (its token-embedding hash does not match "
                           f"{os.path.basename(gf.path)})")


def attach_head(model, gf, path: str) -> SidecarHead:
    """Load the head at `path` for `model` (read from GGUF `gf`) and make it the model's MTP head (model.mtp);
    the model's default cache is rebuilt with the head's KV layer."""
    cfg = model.config
    if cfg.arch not in TRUNK_ARCHS or not hasattr(model, "blocks") or getattr(model, "mtp", None) is not None:
        raise MTPHeadError(f"--mtp-head is not supported for '{cfg.arch}' models"
                           + (" (it has its own MTP layers: use --spec mtp)" if getattr(model, "mtp", None) else ""))
    if getattr(model, "offload", None) is not None:
        raise MTPHeadError("--mtp-head with GPU offload (-ngl) is not supported")
    hf = read_head(path)
    check_head(hf, gf, cfg, path)
    try:
        head = SidecarHead(hf, model, path)
    except GGUFError as e:
        raise MTPHeadError(f"bad MTP head file: {e}") from None
    model.mtp = head
    model._init_cache(model.n_ctx)
    return head


# ---- writing
def head_tensor_names(L: int, trunk_gf) -> list[str]:
    """Names of the block tensors a head for this trunk has (those of the trunk's last layer, renamed to L)."""
    src = f"blk.{L - 1}."
    return [f"blk.{L}." + n[len(src):] for n in trunk_gf.tensors if n.startswith(src)
            and not n[len(src):].startswith(("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
                                               "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "exp_probs"))]


def write_head(path: str, trunk_gf, cfg, tensors: dict, draft_vocab=None, quant: str = "q8_0",
               n_head: int | None = None, n_head_kv: int | None = None, description: str = ""):
    """Write a head file: `tensors` name -> float32 array (numpy (out, in) for matrices). Matrices whose input width
    is a multiple of 32 are stored Q8_0 (quant='q8_0') or all F32 (quant='f32'); vectors F32."""
    import gguf
    L = cfg.n_layer
    w = gguf.GGUFWriter(path, HEAD_ARCH)
    w.add_string(P + "trunk_architecture", cfg.arch)
    w.add_uint32(P + "trunk_n_embd", cfg.n_embd)
    w.add_uint32(P + "trunk_n_vocab", cfg.n_vocab)
    w.add_uint32(P + "trunk_n_layer", L)
    w.add_string(P + "embd_hash", embedding_hash(trunk_gf))
    w.add_uint32(P + "block_index", L)
    ffn = tensors.get(f"blk.{L}.ffn_down.weight")
    if ffn is not None:
        w.add_uint32(P + "feed_forward_length", int(ffn.shape[1]))
    w.add_uint32(P + "head_count", int(n_head or cfg.n_head[L - 1]))
    w.add_uint32(P + "head_count_kv", int(n_head_kv or cfg.n_head_kv[L - 1]))
    if draft_vocab is not None and len(draft_vocab):
        w.add_array(P + "draft_vocab", [int(t) for t in draft_vocab])
    if description:
        w.add_string("general.description", description)
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 2 and quant == "q8_0" and a.shape[1] % 32 == 0:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dequantize_tensor(gf, name: str) -> np.ndarray:
    """A trunk tensor as float32, numpy shape (..., out, in)."""
    import gguf
    info = gf.info(name)
    raw = gf.tensor(name)
    if raw.dtype != np.uint8:
        return np.array(raw, dtype=np.float32)
    a = gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType(int(info.type_id)))
    return np.asarray(a, dtype=np.float32).reshape(tuple(int(d) for d in reversed(info.ne)))


def init_head_tensors(gf, cfg, rng=None, copy_last: bool = True, std: float = 0.02) -> dict:
    """Initial head weights: the block copied from the trunk's last layer (copy_last; a mixture-of-experts FFN
    becomes its first expert) with its attention-output and FFN-down projections zeroed, so that the block starts as
    the identity and the head as the trunk's own output on hnorm(h), or random (std); norms at the trunk's values
    (copy) or 1; eh_proj = [0 | I] + noise (training mixes the token in)."""
    rng = rng or np.random.default_rng(0)
    L = cfg.n_layer
    E = cfg.n_embd
    src = f"blk.{L - 1}."
    out = {}
    for n in gf.tensors:
        if not n.startswith(src):
            continue
        suffix = n[len(src):]
        if suffix.startswith(("ffn_gate_inp", "exp_probs", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")):
            continue
        dst = f"blk.{L}." + suffix.replace("_exps", "")
        if copy_last:
            a = dequantize_tensor(gf, n)
            if suffix.endswith("_exps.weight"):
                a = a[0]
        else:
            shape = tuple(int(d) for d in reversed(gf.info(n).ne))
            if suffix.endswith("_exps.weight"):
                shape = shape[1:]
            if len(shape) == 1 or n.endswith(".bias"):
                a = (np.ones(shape) if not n.endswith(".bias") else np.zeros(shape))
            else:
                a = rng.normal(0.0, std, size=shape)
        out[dst] = np.ascontiguousarray(a, dtype=np.float32)
    p = f"blk.{L}.nextn."
    out[p + "enorm.weight"] = np.ones(E, dtype=np.float32)
    out[p + "hnorm.weight"] = np.ones(E, dtype=np.float32)
    if copy_last:  # the block starts as the identity (its residual branches' output projections at 0)
        for n in (f"blk.{L}.attn_output.weight", f"blk.{L}.ffn_down.weight"):
            if n in out:
                out[n] = np.zeros_like(out[n])
    eh = rng.normal(0.0, std, size=(E, 2 * E)).astype(np.float32)
    eh[:, E:] += np.eye(E, dtype=np.float32)
    out[p + "eh_proj.weight"] = eh
    return out
