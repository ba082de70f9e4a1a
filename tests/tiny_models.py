"""Tiny random GGUF models written with gguf-py's writer, for fast tests that need no download.

`write_model(path, arch, ...)` writes a small llama / gemma3 / qwen3 model (`write_qwen35`: qwen35 / qwen35moe)
with a byte-level BPE vocabulary (256 byte tokens + a few merges + special tokens). Weights are random; tensor
types selectable.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from gguf.quants import quantize


def _byte_tokens():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def bpe_vocab(n_vocab: int):
    """tokens, token types, merges for a byte-level BPE vocab of exactly n_vocab entries (>= 300)."""
    toks = _byte_tokens()  # 256
    types = [1] * 256
    merges = []
    words = ["Ġt", "he", "Ġthe", "in", "Ġa", "er", "on", "Ġs", "at", "en", "an", "or", "Ġw", "es", "is", "it"]
    for w in words:
        # split into two known tokens
        for i in range(1, len(w)):
            a, b = w[:i], w[i:]
            if a in toks and b in toks:
                merges.append(f"{a} {b}")
                toks.append(w)
                types.append(1)
                break
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    while len(toks) < n_vocab - len(specials):
        toks.append(f"[PAD{len(toks)}]")
        types.append(5)
    toks += specials
    types += [3, 3, 3]
    return toks, types, merges


# K-quants gguf-py cannot quantize: random blocks with sane scales. byte offsets of the fp16 d (and dmin) fields
_KQ_SCALE_FIELDS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
                    QT.IQ4_XS: (0,)}


def _random_blocks(arr: np.ndarray, qtype: QT) -> np.ndarray:
    """Random raw blocks whose dequantized values have about the scale of `arr` (rows, cols)."""
    from gguf.constants import GGML_QUANT_SIZES
    be, bb = GGML_QUANT_SIZES[qtype]
    rows, cols = arr.shape
    rng = np.random.default_rng(int(abs(arr[0, 0]) * 1e6) % (2**32))
    raw = rng.integers(0, 256, size=(rows, cols // be, bb), dtype=np.uint8)
    target = float(np.abs(arr).mean()) or 1.0
    for off in _KQ_SCALE_FIELDS[qtype]:
        d = (rng.uniform(0.5, 1.5, size=(rows, cols // be)) * target / 200).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(rows, cols // be, 2)
    return raw.reshape(rows, cols // be * bb)


def _add_tensor(w: GGUFWriter, name: str, arr: np.ndarray, qtype: QT):
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim == 3 and qtype not in (QT.F32, QT.F16):  # expert stacks: quantize as one matrix, keep 3-D
        n, o, i = arr.shape
        if qtype in _KQ_SCALE_FIELDS:
            q = _random_blocks(arr.reshape(n * o, i), qtype)
        else:
            q = quantize(arr.reshape(n * o, i), qtype)
        q = q.reshape(n, o, -1)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        return
    if qtype == QT.F32 or arr.ndim == 1:
        w.add_tensor(name, arr)
    elif qtype == QT.F16:
        w.add_tensor(name, arr.astype(np.float16))
    elif qtype in _KQ_SCALE_FIELDS:
        q = _random_blocks(arr, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    else:
        q = quantize(arr, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)


def write_model(path, arch: str = "llama", *, n_vocab: int = 320, n_embd: int = 64, n_layer: int = 2,
                n_head: int = 4, n_head_kv: int = 2, head_dim: int | None = None, n_ff: int = 128,
                qtype: QT = QT.F32, seed: int = 0, tied: bool = True, n_ctx: int = 256,
                sliding_window: int = 8, extra_meta: dict | None = None, chat_template: str | None = None,
                n_expert: int = 8, n_expert_used: int = 2, n_ff_exp: int = 32):
    """A random llama / gemma2 / gemma3 / phi3 / qwen2 / qwen3 / qwen3moe model (qwen3moe: every FFN a mixture of
    n_expert experts of width n_ff_exp, top-n_expert_used, no shared expert; phi3: fused attn_qkv and ffn_up)."""
    rng = np.random.default_rng(seed)
    hd = head_dim or n_embd // n_head
    w = GGUFWriter(str(path), arch)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-6 if arch != "llama" else 1e-5)
    w.add_rope_freq_base(10000.0)
    if head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(sliding_window)
    if arch == "gemma2":
        w.add_float32("gemma2.attn_logit_softcapping", 4.0)
        w.add_float32("gemma2.final_logit_softcapping", 8.0)
    if arch == "qwen3moe":
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        w.add_expert_feed_forward_length(n_ff_exp)
    for k, v in (extra_meta or {}).items():
        if isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
    toks, types, merges = bpe_vocab(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(toks) - 3)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def mat(o, i, scale=None):
        return rng.standard_normal((o, i)).astype(np.float32) * (scale or 1.0 / np.sqrt(i))

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    _add_tensor(w, "token_embd.weight", rng.standard_normal((n_vocab, n_embd)).astype(np.float32), qtype)
    _add_tensor(w, "output_norm.weight", norm(n_embd), QT.F32)
    if not tied:
        _add_tensor(w, "output.weight", mat(n_vocab, n_embd), qtype)
    for il in range(n_layer):
        p = f"blk.{il}."
        _add_tensor(w, p + "attn_norm.weight", norm(n_embd), QT.F32)
        if arch == "phi3":  # fused Q|K|V
            _add_tensor(w, p + "attn_qkv.weight", mat((n_head + 2 * n_head_kv) * hd, n_embd), qtype)
        else:
            _add_tensor(w, p + "attn_q.weight", mat(n_head * hd, n_embd), qtype)
            _add_tensor(w, p + "attn_k.weight", mat(n_head_kv * hd, n_embd), qtype)
            _add_tensor(w, p + "attn_v.weight", mat(n_head_kv * hd, n_embd), qtype)
        _add_tensor(w, p + "attn_output.weight", mat(n_embd, n_head * hd), qtype)
        _add_tensor(w, p + "ffn_norm.weight", norm(n_embd), QT.F32)
        if arch == "qwen3moe":
            _add_tensor(w, p + "ffn_gate_inp.weight", mat(n_expert, n_embd, 1.0), QT.F32)
            for n, o, i in (("ffn_gate_exps", n_ff_exp, n_embd), ("ffn_up_exps", n_ff_exp, n_embd),
                            ("ffn_down_exps", n_embd, n_ff_exp)):
                e = rng.standard_normal((n_expert, o, i)).astype(np.float32) / np.sqrt(i)
                _add_tensor(w, p + n + ".weight", e, qtype)
        elif arch == "phi3":  # fused gate|up
            _add_tensor(w, p + "ffn_up.weight", mat(2 * n_ff, n_embd), qtype)
            _add_tensor(w, p + "ffn_down.weight", mat(n_embd, n_ff), qtype)
        else:
            _add_tensor(w, p + "ffn_gate.weight", mat(n_ff, n_embd), qtype)
            _add_tensor(w, p + "ffn_up.weight", mat(n_ff, n_embd), qtype)
            _add_tensor(w, p + "ffn_down.weight", mat(n_embd, n_ff), qtype)
        if arch == "qwen2":
            for n, rows in (("attn_q", n_head * hd), ("attn_k", n_head_kv * hd), ("attn_v", n_head_kv * hd)):
                _add_tensor(w, p + n + ".bias", (0.5 * rng.standard_normal(rows)).astype(np.float32), QT.F32)
        if arch in ("gemma3", "qwen3", "qwen3moe"):
            _add_tensor(w, p + "attn_q_norm.weight", norm(hd), QT.F32)
            _add_tensor(w, p + "attn_k_norm.weight", norm(hd), QT.F32)
        if arch in ("gemma2", "gemma3"):
            _add_tensor(w, p + "post_attention_norm.weight", norm(n_embd), QT.F32)
            _add_tensor(w, p + "post_ffw_norm.weight", norm(n_embd), QT.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_qwen35(path, *, n_vocab: int = 320, n_embd: int = 64, n_layer: int = 4, n_head: int = 2,
                 n_head_kv: int = 1, head_dim: int = 32, n_ff: int = 96, n_rot: int = 8, d_state: int = 16,
                 n_k_heads: int = 2, n_v_heads: int = 4, d_conv: int = 4, mtp: bool = True,
                 qtype: QT = QT.F32, seed: int = 0, n_ctx: int = 512, interval: int = 2, weight_scale: float = 1.0,
                 embd_scale: float = 1.0, n_expert: int = 0, n_expert_used: int = 2, n_ff_exp: int = 32,
                 n_ff_shexp: int = 64, fused_exps: bool = False, omit: tuple[str, ...] = (),
                 mtp_echo: bool = False):
    """A random qwen35 model: layers with (il+1) % interval == 0 are full attention, the others Gated DeltaNet;
    plus one MTP (nextn) block when `mtp`. Weights scaled by `weight_scale` (larger = peakier logits).
    n_expert > 0: a qwen35moe model, every FFN (the MTP block's included) a mixture of n_expert experts
    (top-n_expert_used, width n_ff_exp; expert gate/up separate or `fused_exps` as ffn_gate_up_exps) plus a
    shared expert of width n_ff_shexp. `omit`: tensor names left out (to test the errors for broken files).
    `mtp_echo`: the MTP's eh_proj passes the token embedding through, so with tied embeddings the MTP head tends
    to predict a repeat of its input token, which these random trunks also tend to produce: drafts get accepted."""
    rng = np.random.default_rng(seed)
    arch = "qwen35moe" if n_expert else "qwen35"

    def put(name, arr, qt):
        if name not in omit:
            _add_tensor(w, name, arr, qt)
    n_all = n_layer + (1 if mtp else 0)
    w = GGUFWriter(str(path), arch)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_all)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e7)
    w.add_rope_dimension_count(n_rot)
    w.add_array(f"{arch}.rope.dimension_sections", [n_rot // 4, n_rot // 4, n_rot // 2 - 2 * (n_rot // 4), 0])
    w.add_uint32(f"{arch}.nextn_predict_layers", 1 if mtp else 0)
    w.add_uint32(f"{arch}.ssm.conv_kernel", d_conv)
    w.add_uint32(f"{arch}.ssm.state_size", d_state)
    w.add_uint32(f"{arch}.ssm.group_count", n_k_heads)
    w.add_uint32(f"{arch}.ssm.time_step_rank", n_v_heads)
    w.add_uint32(f"{arch}.ssm.inner_size", d_state * n_v_heads)
    w.add_uint32(f"{arch}.full_attention_interval", interval)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        w.add_expert_feed_forward_length(n_ff_exp)
        w.add_expert_shared_feed_forward_length(n_ff_shexp)
    toks, types, merges = bpe_vocab(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen35")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(toks) - 3)
    w.add_add_bos_token(False)

    def mat(o, i):
        return rng.standard_normal((o, i)).astype(np.float32) * (weight_scale / np.sqrt(i))

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    key_dim, value_dim = d_state * n_k_heads, d_state * n_v_heads
    conv_dim = 2 * key_dim + value_dim
    put("token_embd.weight", embd_scale * rng.standard_normal((n_vocab, n_embd)).astype(np.float32), qtype)
    put("output_norm.weight", norm(n_embd), QT.F32)

    def attn_layer(p):
        put(p + "attn_q.weight", mat(2 * n_head * head_dim, n_embd), qtype)
        put(p + "attn_k.weight", mat(n_head_kv * head_dim, n_embd), qtype)
        put(p + "attn_v.weight", mat(n_head_kv * head_dim, n_embd), qtype)
        put(p + "attn_q_norm.weight", norm(head_dim), QT.F32)
        put(p + "attn_k_norm.weight", norm(head_dim), QT.F32)
        put(p + "attn_output.weight", mat(n_embd, n_head * head_dim), qtype)

    def experts(o, i):
        return np.stack([mat(o, i) for _ in range(n_expert)])

    def common(p):
        put(p + "attn_norm.weight", norm(n_embd), QT.F32)
        put(p + "post_attention_norm.weight", norm(n_embd), QT.F32)
        if not n_expert:
            put(p + "ffn_gate.weight", mat(n_ff, n_embd), qtype)
            put(p + "ffn_up.weight", mat(n_ff, n_embd), qtype)
            put(p + "ffn_down.weight", mat(n_embd, n_ff), qtype)
            return
        put(p + "ffn_gate_inp.weight", mat(n_expert, n_embd), QT.F32)
        if fused_exps:
            put(p + "ffn_gate_up_exps.weight", experts(2 * n_ff_exp, n_embd), qtype)
        else:
            put(p + "ffn_gate_exps.weight", experts(n_ff_exp, n_embd), qtype)
            put(p + "ffn_up_exps.weight", experts(n_ff_exp, n_embd), qtype)
        put(p + "ffn_down_exps.weight", experts(n_embd, n_ff_exp), qtype)
        put(p + "ffn_gate_inp_shexp.weight", mat(1, n_embd).reshape(-1), QT.F32)
        put(p + "ffn_gate_shexp.weight", mat(n_ff_shexp, n_embd), qtype)
        put(p + "ffn_up_shexp.weight", mat(n_ff_shexp, n_embd), qtype)
        put(p + "ffn_down_shexp.weight", mat(n_embd, n_ff_shexp), qtype)

    for il in range(n_layer):
        p = f"blk.{il}."
        common(p)
        if (il + 1) % interval == 0:
            attn_layer(p)
        else:
            put(p + "attn_qkv.weight", mat(conv_dim, n_embd), qtype)
            put(p + "attn_gate.weight", mat(value_dim, n_embd), qtype)
            put(p + "ssm_conv1d.weight", (0.5 * rng.standard_normal((conv_dim, d_conv))).astype(np.float32), QT.F32)
            put(p + "ssm_dt.bias", rng.standard_normal(n_v_heads).astype(np.float32), QT.F32)
            put(p + "ssm_a", (-np.exp(rng.standard_normal(n_v_heads))).astype(np.float32), QT.F32)
            put(p + "ssm_alpha.weight", mat(n_v_heads, n_embd), qtype if n_embd % 256 == 0 or qtype != QT.Q4_K else QT.F32)
            put(p + "ssm_beta.weight", mat(n_v_heads, n_embd), qtype if n_embd % 256 == 0 or qtype != QT.Q4_K else QT.F32)
            put(p + "ssm_norm.weight", norm(d_state), QT.F32)
            put(p + "ssm_out.weight", mat(n_embd, value_dim), qtype)
    if mtp:
        p = f"blk.{n_layer}."
        common(p)
        attn_layer(p)
        eh = mat(n_embd, 2 * n_embd)
        if mtp_echo:  # eh_proj = [I | 0]: the MTP block starts from the token's own (normed) embedding
            eh = np.hstack([np.eye(n_embd), np.zeros((n_embd, n_embd))]).astype(np.float32)
        put(p + "nextn.eh_proj.weight", eh, qtype)
        put(p + "nextn.enorm.weight", norm(n_embd), QT.F32)
        put(p + "nextn.hnorm.weight", norm(n_embd), QT.F32)
        put(p + "nextn.shared_head_norm.weight", norm(n_embd), QT.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
