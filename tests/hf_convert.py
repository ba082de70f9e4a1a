"""A small Hugging Face transformers -> GGUF converter for the parity tests (tests/test_hf_parity.py).

`convert(model, path)` writes a GGUF (F32 weights) from a transformers `Qwen2ForCausalLM` (arch `qwen2`: llama's
names plus attn_q/k/v.bias, no QK-norm), `Qwen3ForCausalLM` (arch `qwen3`), `Qwen3MoeForCausalLM` (arch
`qwen3moe`: qwen3's attention, router ffn_gate_inp and experts as for qwen35moe, no shared expert),
`Gemma2ForCausalLM` (arch `gemma2`: norm weights + 1 baked in, sliding window and soft-capping keys),
`Phi3ForCausalLM` (arch `phi3`: fused attn_qkv and ffn_up; LongRoPE factors and attn_factor),
`LlamaForCausalLM` / `MixtralForCausalLM` (arch `llama`: Q/K rows permuted as llama.cpp's converter does; Mixtral's
router and experts as for qwen3moe),
`Qwen3_5ForCausalLM` (arch `qwen35`) or `Qwen3_5MoeForCausalLM` (arch `qwen35moe`), applying the conversion
transforms of llama.cpp's convert_hf_to_gguf.py (`Qwen3Model`, `Qwen3NextModel`, `_LinearAttentionVReorderBase`,
`Qwen3_5TextModel`, `Qwen3_5MoeTextModel`; docs/architectures.md):

qwen35:
* MTP tensors (`mtp.*`, only if the state dict holds any; transformers' Qwen3_5ForCausalLM has no MTP module
  and drops them at load) are renamed first: `mtp.fc` -> `blk.L.nextn.eh_proj`, `mtp.pre_fc_norm_embedding` ->
  `.nextn.enorm`, `mtp.pre_fc_norm_hidden` -> `.nextn.hnorm`, `mtp.norm` -> `.nextn.shared_head_norm`,
  `mtp.layers.0.*` -> the ordinary layer names at index L = n_layer; block_count = n_layer + n_mtp and
  nextn_predict_layers = n_mtp. Renaming first means the +1 below also reaches every MTP norm.
* +1 on every tensor whose (renamed) HF name ends in `norm.weight`, except `linear_attn.norm.weight`
  (Qwen3.5's RMSNorm is zero-centred: it multiplies by 1 + w).
* `A_log` -> `ssm_a = -exp(A_log)`, `dt_bias` -> `ssm_dt.bias`, conv1d `[C, 1, K]` squeezed to `[C, K]`.
* If linear_num_value_heads != linear_num_key_heads, the value heads go from HF's grouped order
  (`[K0: v0..v(r-1), K1: ...]`) to the tiled order (`[K0v0, K1v0, ..., K0v1, K1v1, ...]`) in the V rows of
  in_proj_qkv, the rows of in_proj_z / in_proj_a / in_proj_b, A_log, dt_bias, the V channels of conv1d and the
  input columns of out_proj.
* `q_proj` is copied as is: HF already lays it out per head as [query (head_dim) | gate (head_dim)], which is
  the interleaved Q/gate order llama.cpp's `attn_q` expects; the converter does not touch it either.
* Keys: rope.dimension_count = int(head_dim * partial_rotary_factor); rope.dimension_sections = mrope_section
  padded to 4 (default [11, 11, 10, 0]); attention.recurrent_layers from layer_types (MTP entries false);
  full_attention_interval (default 4); ssm.conv_kernel / state_size / group_count / time_step_rank /
  inner_size.

qwen35moe (Qwen3_5MoeForCausalLM): everything of qwen35, plus the MoE FFN of every layer (the MTP layer's
included): `mlp.gate` -> `ffn_gate_inp`; `mlp.experts.gate_up_proj` (n_expert, 2 n_ff_exp, n_embd), gate rows
first, -> `ffn_gate_up_exps` (ne [n_embd, 2 n_ff_exp, n_expert], as llama.cpp's converter) or, with
split_experts, `ffn_gate_exps` + `ffn_up_exps`; `mlp.experts.down_proj` -> `ffn_down_exps`;
`mlp.shared_expert.{gate,up,down}_proj` -> `ffn_{gate,up,down}_shexp`; `mlp.shared_expert_gate` (1, n_embd) ->
`ffn_gate_inp_shexp` (ne [n_embd]). Keys expert_count, expert_used_count, expert_feed_forward_length,
expert_shared_feed_forward_length; no feed_forward_length.

qwen3: llama base keys + key_length/value_length (head_dim), q_norm/k_norm copied as is, no Q/K permutation
(NEOX rope, unlike the llama converter).

Vocabulary: a synthetic byte-level BPE vocab (tests/tiny_models.bpe_vocab) of exactly config.vocab_size entries,
`tokenizer.ggml.pre` = `qwen35` / `qwen2`. Only token ids matter for the parity tests.
"""
from __future__ import annotations

import re

import numpy as np
from gguf import GGUFWriter

from tiny_models import bpe_vocab

# HF name suffix (inside model.layers.{i}.) -> GGUF name suffix (inside blk.{i}.)
_COMMON = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_QWEN3 = {**_COMMON, "post_attention_layernorm.weight": "ffn_norm.weight"}
_QWEN2 = {**{k: v for k, v in _QWEN3.items() if "_norm." not in k},
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias"}
_GEMMA2 = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",  # the attention output norm
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LLAMA = {k: v for k, v in _COMMON.items() if "_norm." not in k}
_LLAMA["post_attention_layernorm.weight"] = "ffn_norm.weight"
_MIXTRAL = {
    **{k: v for k, v in _LLAMA.items() if not k.startswith("mlp.")},
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
_PHI3 = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",  # gate rows first (HF: gate, up = chunk(2))
    "mlp.down_proj.weight": "ffn_down.weight",
}
_QWEN3MOE = {
    **{k: v for k, v in _QWEN3.items() if not k.startswith("mlp.")},
    "mlp.gate.weight": "ffn_gate_inp.weight",  # router (n_expert, n_embd)
    "mlp.experts.gate_up_proj": "ffn_gate_up_exps.weight",  # (n_expert, 2 n_ff_exp, n_embd), gate rows first
    "mlp.experts.down_proj": "ffn_down_exps.weight",  # (n_expert, n_embd, n_ff_exp)
}
_QWEN35 = {
    **_COMMON,
    "post_attention_layernorm.weight": "post_attention_norm.weight",  # the pre-FFN norm
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
    "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
    "enorm.weight": "nextn.enorm.weight",
    "hnorm.weight": "nextn.hnorm.weight",
    "eh_proj.weight": "nextn.eh_proj.weight",
    "shared_head.norm.weight": "nextn.shared_head_norm.weight",
}
_QWEN35MOE = {
    **{k: v for k, v in _QWEN35.items() if not k.startswith("mlp.")},
    "mlp.gate.weight": "ffn_gate_inp.weight",  # router (n_expert, n_embd): ne [n_embd, n_expert]
    "mlp.experts.gate_up_proj": "ffn_gate_up_exps.weight",  # (n_expert, 2 n_ff_exp, n_embd), gate rows first
    "mlp.experts.down_proj": "ffn_down_exps.weight",  # (n_expert, n_embd, n_ff_exp)
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",  # (1, n_embd) stored as ne [n_embd]
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_MTP_REMAP = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
              "norm": "shared_head.norm"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _np(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(np.asarray(t, dtype=np.float32))


def reorder_v_heads(a: np.ndarray, axis: int, n_k: int, r: int, head_dim: int) -> np.ndarray:
    """Grouped (HF: head g*r + j) -> tiled (GGUF: head j*n_k + g) along `axis` of length n_k*r*head_dim."""
    a = np.moveaxis(a, axis, 0)
    rest = a.shape[1:]
    a = a.reshape(n_k, r, head_dim, *rest).swapaxes(0, 1).reshape(n_k * r * head_dim, *rest)
    return np.ascontiguousarray(np.moveaxis(a, 0, axis))


def _remap_mtp(name: str, n_layer: int) -> tuple[str, int]:
    """llama.cpp's _QwenMtpMixin.filter_tensors: mtp.* -> model.layers.{n_layer + i}.*; returns (name, n_mtp)."""
    if name.startswith("model.mtp."):
        name = name[len("model."):]
    if not name.startswith("mtp."):
        return name, 0
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[1] == "layers" and parts[2].isdecimal():
        return f"model.layers.{n_layer + int(parts[2])}.{parts[3]}", int(parts[2]) + 1
    if len(parts) == 3 and parts[1] in _MTP_REMAP:
        return f"model.layers.{n_layer}.{_MTP_REMAP[parts[1]]}.{parts[2]}", 1
    raise ValueError(f"unexpected MTP tensor {name}")


def _rope_params(cfg) -> dict:
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    if "rope_theta" not in rp and getattr(cfg, "rope_theta", None) is not None:
        rp["rope_theta"] = cfg.rope_theta
    if "partial_rotary_factor" not in rp and getattr(cfg, "partial_rotary_factor", None) is not None:
        rp["partial_rotary_factor"] = cfg.partial_rotary_factor
    rtype = rp.get("rope_type", "default")
    if rtype not in ("default", None) and not (rtype == "longrope" and cfg.model_type == "phi3"):
        raise NotImplementedError(f"rope_type {rtype!r} is not handled by this test converter")
    return rp


def convert(model, path, *, state_dict=None, reorder_v: bool = True, n_ctx: int | None = None,
            split_experts: bool = False):
    """Write `model` (a transformers Qwen3ForCausalLM / Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM) as a GGUF
    at `path`.

    state_dict: optional override of model.state_dict() (e.g. with extra `mtp.*` tensors).
    reorder_v: apply the grouped -> tiled v-head reorder (False only to prove a test would catch its absence).
    split_experts (qwen35moe): write the experts' gate_up_proj as separate ffn_gate_exps / ffn_up_exps instead
    of the fused ffn_gate_up_exps (llama.cpp's current converter writes the fused form).
    """
    cfg = model.config
    mt = cfg.model_type
    if mt == "qwen3":
        arch, pre, table = "qwen3", "qwen2", _QWEN3
    elif mt == "qwen2":
        arch, pre, table = "qwen2", "qwen2", _QWEN2
    elif mt == "qwen3_moe":
        arch, pre, table = "qwen3moe", "qwen2", _QWEN3MOE
    elif mt == "gemma2":
        arch, pre, table = "gemma2", "gpt-2", _GEMMA2
    elif mt == "phi3":
        arch, pre, table = "phi3", "gpt-2", _PHI3
    elif mt in ("llama", "mixtral"):
        arch, pre, table = "llama", "gpt-2", _LLAMA if mt == "llama" else _MIXTRAL
    elif mt in ("qwen3_5_text", "qwen3_5"):
        if mt == "qwen3_5":
            cfg = cfg.text_config
        arch, pre, table = "qwen35", "qwen35", _QWEN35
    elif mt in ("qwen3_5_moe_text", "qwen3_5_moe"):
        if mt == "qwen3_5_moe":
            cfg = cfg.text_config
        arch, pre, table = "qwen35moe", "qwen35", _QWEN35MOE
    else:
        raise NotImplementedError(f"model_type {mt!r}")
    sd = {k: _np(v) for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    n_layer = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rp = _rope_params(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))

    # ---- tensors
    tensors: dict[str, np.ndarray] = {}
    n_mtp = 0
    for hf_name, a in sd.items():
        if arch in ("qwen35", "qwen35moe"):
            hf_name, m = _remap_mtp(hf_name, n_layer)
            n_mtp = max(n_mtp, m)
            a = _qwen35_transform(hf_name, a, cfg, reorder_v)
        if hf_name == "lm_head.weight" and tied:
            continue
        if arch == "gemma2" and hf_name.endswith("norm.weight"):
            a = a + 1.0  # Gemma's RMSNorm multiplies by (1 + w): the converter bakes the 1 in
        if arch == "llama" and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            # llama.cpp's LlamaModel.permute: rows of each head from (half, half) to interleaved pairs (NORM RoPE)
            nh = cfg.num_attention_heads if hf_name.endswith("q_proj.weight") else cfg.num_key_value_heads
            a = a.reshape(nh, 2, a.shape[0] // nh // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if hf_name in _GLOBAL:
            tensors[_GLOBAL[hf_name]] = a
            continue
        m = _LAYER_RE.match(hf_name)
        if m is None or m.group(2) not in table:
            raise ValueError(f"{arch}: no GGUF name for HF tensor {hf_name}")
        if m.group(2) == "mlp.shared_expert_gate.weight":
            a = a.reshape(-1)
        if m.group(2) == "mlp.experts.gate_up_proj" and split_experts:
            ff = a.shape[1] // 2  # HF: gate, up = linear(x, gate_up_proj[e]).chunk(2)
            tensors[f"blk.{m.group(1)}.ffn_gate_exps.weight"] = a[:, :ff]
            tensors[f"blk.{m.group(1)}.ffn_up_exps.weight"] = a[:, ff:]
            continue
        tensors[f"blk.{m.group(1)}.{table[m.group(2)]}"] = a

    # ---- metadata
    w = GGUFWriter(str(path), arch)
    w.add_name(f"hf-parity-{arch}")
    w.add_context_length(int(n_ctx or cfg.max_position_embeddings))
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_layer + n_mtp)
    if getattr(cfg, "intermediate_size", None) is not None:  # none for qwen35moe (llama.cpp writes none)
        w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(0)  # ALL_F32
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        if mt == "mixtral":
            w.add_expert_count(cfg.num_local_experts)
            w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "phi3":
        w.add_rope_dimension_count(int(head_dim * rp.get("partial_rotary_factor", 1.0)))
        if rp.get("rope_type") == "longrope":  # as llama.cpp's Phi3MiniModel converter writes LongRoPE
            import math
            orig = int(getattr(cfg, "original_max_position_embeddings", cfg.max_position_embeddings))
            scale = cfg.max_position_embeddings / orig
            af = rp.get("attention_factor") or (1.0 if scale <= 1.0 else
                                                math.sqrt(1 + math.log(scale) / math.log(orig)))
            w.add_rope_scaling_attn_factors(float(af))
            w.add_uint32("phi3.rope.scaling.original_context_length", orig)
            tensors["rope_factors_long.weight"] = np.asarray(rp["long_factor"], np.float32)
            tensors["rope_factors_short.weight"] = np.asarray(rp["short_factor"], np.float32)
    if arch == "gemma2":
        w.add_sliding_window(cfg.sliding_window)
        w.add_float32("gemma2.attn_logit_softcapping", float(cfg.attn_logit_softcapping))
        w.add_float32("gemma2.final_logit_softcapping", float(cfg.final_logit_softcapping))
    if arch == "qwen3moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen35moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch in ("qwen35", "qwen35moe"):
        if cfg.linear_key_head_dim != cfg.linear_value_head_dim:
            raise NotImplementedError("llama.cpp's qwen35 needs linear_key_head_dim == linear_value_head_dim")
        sections = list(rp.get("mrope_section", [11, 11, 10]))
        sections = (sections + [0, 0, 0, 0])[:4]
        w.add_rope_dimension_sections(sections)
        w.add_rope_dimension_count(int(head_dim * rp.get("partial_rotary_factor", 0.25)))
        w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
        w.add_ssm_state_size(cfg.linear_key_head_dim)
        w.add_ssm_group_count(cfg.linear_num_key_heads)
        w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
        w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
        if getattr(cfg, "layer_types", None) is not None:
            rec = [t == "linear_attention" for t in cfg.layer_types] + [False] * n_mtp
            w.add_array(f"{arch}.attention.recurrent_layers", rec)
        w.add_full_attention_interval(int(getattr(cfg, "full_attention_interval", 4)))
        if n_mtp:
            w.add_nextn_predict_layers(n_mtp)

    toks, types, merges = bpe_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(toks) - 3)  # <|endoftext|>
    w.add_add_bos_token(False)

    for name, a in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _qwen35_transform(name: str, a: np.ndarray, cfg, reorder_v: bool) -> np.ndarray:
    """Qwen3NextModel.modify_tensors + _LinearAttentionVReorderBase.modify_tensors, for one (renamed) HF tensor."""
    n_k, n_v = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    if reorder_v and n_k != n_v and "linear_attn." in name:
        r = n_v // n_k
        if ".in_proj_qkv." in name:
            qk = 2 * dk * n_k
            a = np.concatenate([a[:qk], reorder_v_heads(a[qk:], 0, n_k, r, dv)], axis=0)
        elif ".in_proj_z." in name:
            a = reorder_v_heads(a, 0, n_k, r, dv)
        elif ".in_proj_a." in name or ".in_proj_b." in name:
            a = reorder_v_heads(a, 0, n_k, r, 1)
        elif name.endswith(".A_log") or name.endswith(".dt_bias"):
            a = reorder_v_heads(a, 0, n_k, r, 1)
        elif ".conv1d." in name:
            a = a.reshape(a.shape[0], -1)  # squeeze [C, 1, K]
            qk = 2 * dk * n_k
            a = np.concatenate([a[:qk], reorder_v_heads(a[qk:], 0, n_k, r, dv)], axis=0)
        elif ".out_proj." in name:
            a = reorder_v_heads(a, 1, n_k, r, dv)
    if name.endswith(".A_log"):
        a = -np.exp(a)
    elif ".conv1d." in name:
        a = a.reshape(a.shape[0], -1)
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        a = a + np.float32(1.0)
    return np.ascontiguousarray(a, dtype=np.float32)
