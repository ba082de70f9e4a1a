"""The one validation layer between the GGUF reader and model construction.

`llamba.models.build_config` (and so `load_model`, `Llama`, `llamba info`) runs, for every architecture:

1. `check_metadata(gf, arch)` before the config is built: every `{arch}.*` key an architecture reads has the
   expected type (integer, float, string, per-layer scalar-or-array) and a sane range (positive sizes, finite
   positive eps and RoPE base, YaRN betas != 0, 1 <= block_count <= MAX_LAYERS, per-layer arrays with one entry
   per layer, ...), so that no arithmetic in `config_from_gguf` divides by zero and nothing is sized from an
   absurd count.
2. `check_config(gf, cfg)` on the built config before any weight is touched: the hyperparameters against each
   other (head counts divide, 0 < n_rot <= head size and even, RoPE sections, expert counts, recurrent sizes),
   the vocabulary (tokens) against the embedding / output rows, and the shape and type of every tensor the
   model reads against the config (`expected_tensors`: one table for every architecture), plus the blk.N
   tensors against block_count.

Each failure is a one-line GGUFError naming the file, the key or tensor, the value (quoted through
`llamba.gguf.short`, so a corrupt file never produces a megabyte message) and what was expected.
"""
from __future__ import annotations

import math
import re

import numpy as np

from llamba.errors import GGUFError
from llamba.kernels import traits as _traits

MAX_LAYERS = 4096
MAX_EMBD = 1 << 17
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 13
MAX_FF = 1 << 20
MAX_VOCAB = 1 << 24
MAX_CTX = 1 << 24
MAX_EXPERTS = 1 << 12
MAX_SSM = 1 << 12

# key suffix (after "{arch}.") -> (kind, low, high); kinds:
#   int: an integer (not a bool) in [low, high]; layers: such an integer or an integer array with one entry per
#   layer; float: a finite number in [low, high] (low/high None: unbounded); nonzero: a finite number != 0;
#   str: a string; pattern: an integer >= 0 or a bool/integer array with one entry per layer; sections: a short
#   array of integers >= 0 with a positive sum
_KEYS = {
    "block_count": ("int", 1, MAX_LAYERS),
    "embedding_length": ("int", 1, MAX_EMBD),
    "attention.head_count": ("layers", 1, MAX_HEADS),
    "attention.head_count_kv": ("layers", 1, MAX_HEADS),
    "feed_forward_length": ("layers", 0, MAX_FF),
    "attention.key_length": ("int", 1, MAX_HEAD_DIM),
    "attention.value_length": ("int", 1, MAX_HEAD_DIM),
    "rope.dimension_count": ("int", 1, MAX_HEAD_DIM),
    "vocab_size": ("int", 1, MAX_VOCAB),
    "context_length": ("int", 1, MAX_CTX),
    "rope.scaling.original_context_length": ("int", 1, MAX_CTX),
    "nextn_predict_layers": ("int", 0, MAX_LAYERS - 1),
    "attention.sliding_window": ("int", 0, MAX_CTX),
    "expert_count": ("int", 0, MAX_EXPERTS),
    "expert_used_count": ("int", 0, MAX_EXPERTS),
    "expert_feed_forward_length": ("int", 0, MAX_FF),
    "expert_shared_feed_forward_length": ("int", 0, MAX_FF),
    "full_attention_interval": ("int", 1, MAX_LAYERS),
    "ssm.conv_kernel": ("int", 1, 256),
    "ssm.state_size": ("int", 1, MAX_SSM),
    "ssm.group_count": ("int", 1, MAX_SSM),
    "ssm.time_step_rank": ("int", 1, MAX_SSM),
    "ssm.inner_size": ("int", 1, MAX_FF),
    "attention.layer_norm_rms_epsilon": ("float", 1e-38, 1.0),
    "rope.freq_base": ("float", 1e-30, None),
    "rope.freq_base_swa": ("float", 1e-30, None),
    "rope.scaling.factor": ("float", 0.0, None),
    "rope.scale_linear": ("float", 0.0, None),
    "rope.scaling.attn_factor": ("float", None, None),
    "rope.scaling.yarn_ext_factor": ("float", None, None),
    "rope.scaling.yarn_beta_fast": ("nonzero", None, None),
    "rope.scaling.yarn_beta_slow": ("nonzero", None, None),
    "final_logit_softcapping": ("float", 0.0, None),
    "attn_logit_softcapping": ("float", 0.0, None),
    "rope.scaling.type": ("str", None, None),
    "attention.sliding_window_pattern": ("pattern", 0, MAX_LAYERS),
    "attention.recurrent_layers": ("pattern", None, None),
    "rope.dimension_sections": ("sections", 0, MAX_HEAD_DIM),
}

_FLOAT_TYPES = (_traits.F32, _traits.F16)  # what vectors (norms, biases, factors) are read as


def _short(v, limit: int = 60) -> str:
    from llamba.gguf import short
    return short(v, limit)


def _kind(v) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of {v.size} {v.dtype}"
    if isinstance(v, (bool, np.bool_)):
        return "a bool"
    if isinstance(v, (int, np.integer)):
        return "an integer"
    if isinstance(v, (float, np.floating)):
        return "a float"
    if isinstance(v, str):
        return "a string"
    try:
        return f"an array of {len(v)} items"
    except TypeError:
        return type(v).__name__


def _is_str_array(v) -> bool:
    from llamba.gguf import StringArray
    return isinstance(v, StringArray) or (isinstance(v, list) and all(isinstance(t, str) for t in v))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _range_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    if lo is not None:
        return f">= {lo}" if lo != 1e-30 and lo != 1e-38 else "> 0"
    return f"<= {hi}" if hi is not None else "finite"


def check_metadata(gf, arch: str):
    """Types and ranges of the `{arch}.*` keys (see _KEYS), before any config arithmetic uses them."""
    p = arch + "."
    path = gf.path

    def bad(key, v, want):
        return GGUFError(f"{path}: metadata key '{key}' is {_kind(v)} {_short(v)}; expected {want}")

    n_layer = None
    for suffix in ["block_count"] + [k for k in _KEYS if k != "block_count"]:
        key = p + suffix
        if key not in gf.metadata:
            continue
        v = gf.metadata[key]
        kind, lo, hi = _KEYS[suffix]
        if kind == "int" or (kind == "layers" and not isinstance(v, np.ndarray)):
            if not _is_int(v) or not lo <= int(v) <= hi:
                raise bad(key, v, f"an integer {_range_text(lo, hi)}")
            if suffix == "block_count":
                n_layer = int(v)
        elif kind == "layers":
            if v.ndim != 1 or v.dtype.kind not in "iu":
                raise bad(key, v, f"an integer or an integer array with one entry per layer")
            if n_layer is not None and v.shape[0] != n_layer:
                raise bad(key, v, f"one entry per layer ({p}block_count {n_layer})")
            if v.size and (int(v.min()) < lo or int(v.max()) > hi):
                raise bad(key, v, f"entries {_range_text(lo, hi)}")
        elif kind in ("float", "nonzero"):
            if not _is_num(v) or not math.isfinite(float(v)):
                raise bad(key, v, "a finite number" + (" other than 0" if kind == "nonzero" else ""))
            f = float(v)
            if kind == "nonzero" and f == 0.0:
                raise bad(key, v, "a finite number other than 0 (it divides)")
            if (lo is not None and f < lo) or (hi is not None and f > hi):
                raise bad(key, v, f"a number {_range_text(lo, hi)}")
        elif kind == "str":
            if not isinstance(v, str):
                raise bad(key, v, "a string")
        elif kind == "pattern":
            if isinstance(v, np.ndarray):
                if v.ndim != 1 or v.dtype.kind not in "biu":
                    raise bad(key, v, "a bool or integer array with one entry per layer")
                if n_layer is not None and v.shape[0] != n_layer:
                    raise bad(key, v, f"one entry per layer ({p}block_count {n_layer})")
            elif lo is None or not _is_int(v) or not lo <= int(v) <= hi:
                raise bad(key, v, "a bool array with one entry per layer" if lo is None
                          else f"an integer {_range_text(lo, hi)} or an array with one entry per layer")
        elif kind == "sections":
            if not isinstance(v, np.ndarray) or v.ndim != 1 or v.dtype.kind not in "iu" or not 1 <= v.size <= 4:
                raise bad(key, v, "an array of 1 to 4 integers")
            if int(v.min()) < lo or int(v.max()) > hi or int(v.sum()) <= 0:
                raise bad(key, v, "integers >= 0 with a positive sum")
    heads, embd = gf.metadata.get(p + "attention.head_count"), gf.metadata.get(p + "embedding_length")
    if p + "attention.key_length" not in gf.metadata and heads is not None and embd is not None:
        h = int(np.max(heads)) if isinstance(heads, np.ndarray) and heads.size else int(heads)
        if int(embd) < h:  # the head size defaults to embedding_length / head_count: it would be 0
            raise GGUFError(f"{path}: {p}embedding_length {int(embd)} is smaller than {p}attention.head_count {h} "
                            f"(no {p}attention.key_length): the head size would be 0")
    toks = gf.metadata.get("tokenizer.ggml.tokens")
    if toks is not None and not _is_str_array(toks):
        raise bad("tokenizer.ggml.tokens", toks, "an array of strings (the vocabulary)")


def _fail(gf, what: str):
    return GGUFError(f"{gf.path}: {what}")


def check_config(gf, cfg):
    """The config's hyperparameters against each other and against the tensors (before any weight is read)."""
    p = cfg.arch + "."
    L, Lt = cfg.n_layer_all, cfg.n_layer
    if not 1 <= L <= MAX_LAYERS:
        raise _fail(gf, f"{p}block_count {L} is out of range (1 to {MAX_LAYERS})")
    if not 1 <= Lt <= L:
        raise _fail(gf, f"{p}nextn_predict_layers {cfg.n_nextn} leaves {Lt} trunk layers of {p}block_count {L}; "
                        f"expected at least one")
    for name in ("n_head", "n_head_kv", "n_ff", "swa_layers") + (("recurrent",) if cfg.recurrent else ()):
        vals = getattr(cfg, name)
        if len(vals) != L:
            raise _fail(gf, f"{name} has {len(vals)} entries for {L} layers")
    if not 1 <= cfg.n_embd <= MAX_EMBD:
        raise _fail(gf, f"{p}embedding_length {cfg.n_embd} is out of range (1 to {MAX_EMBD})")
    if not 1 <= cfg.n_vocab <= MAX_VOCAB:
        raise _fail(gf, f"vocabulary size {cfg.n_vocab} is out of range (1 to {MAX_VOCAB})")
    if not 1 <= cfg.head_dim <= MAX_HEAD_DIM or not 1 <= cfg.head_dim_v <= MAX_HEAD_DIM:
        raise _fail(gf, f"head sizes {cfg.head_dim} / {cfg.head_dim_v} ({p}attention.key_length / value_length, "
                        f"or embedding_length / head_count) are out of range (1 to {MAX_HEAD_DIM})")
    attn_layers = [il for il in range(L) if not (cfg.recurrent and cfg.recurrent[il])]
    for il in attn_layers:
        h, hkv = cfg.n_head[il], cfg.n_head_kv[il]
        if h < 1 or hkv < 1 or h % hkv:
            raise _fail(gf, f"layer {il}: {p}attention.head_count {h} must be a positive multiple of "
                            f"{p}attention.head_count_kv {hkv}")
    if cfg.n_rot < 1 or cfg.n_rot > cfg.head_dim or cfg.n_rot % 2:
        raise _fail(gf, f"{p}rope.dimension_count {cfg.n_rot} must be even and between 2 and the head size "
                        f"{cfg.head_dim}")
    # the kernels compute in float32 (and a float division by zero raises there): the checks are on float32 values
    pos, nonzero, any_ = ("> 0", lambda f: f > 0), ("!= 0 (it divides)", lambda f: f != 0), ("finite", None)
    for what, v, (want, ok) in (
            ("attention.layer_norm_rms_epsilon", cfg.eps, pos),
            ("rope.freq_base", cfg.rope_base, ("> 0 and != 1 (its log divides)", lambda f: f > 0 and f != 1)),
            ("rope.freq_base_swa", cfg.rope_base_swa, ("> 0 and != 1 (its log divides)", lambda f: f > 0 and f != 1)),
            ("rope.scaling.factor (as a frequency scale 1/factor)", cfg.freq_scale, pos),
            ("rope.scaling.yarn_ext_factor", cfg.rope_ext_factor, any_),
            ("rope.scaling.attn_factor", cfg.rope_attn_factor, any_),
            ("rope.scaling.yarn_beta_fast", cfg.rope_beta_fast, nonzero),
            ("rope.scaling.yarn_beta_slow", cfg.rope_beta_slow, nonzero),
            ("embedding scale", cfg.embd_scale, (">= 0", lambda f: f >= 0)),
            ("attention scale", cfg.attn_scale, (">= 0", lambda f: f >= 0)),
            ("final_logit_softcapping", cfg.final_logit_softcap, (">= 0", lambda f: f >= 0)),
            ("attn_logit_softcapping", cfg.attn_softcap, (">= 0", lambda f: f >= 0))):
        with np.errstate(over="ignore"):
            f = np.float32(v)
        if not (np.isfinite(f) and (ok is None or ok(f))):
            raise _fail(gf, f"{p}{what} is {_short(v)}; expected a finite float32 value {want}")
    if not 0 <= cfg.n_swa <= MAX_CTX or not 0 <= cfg.n_ctx_orig <= MAX_CTX or not 1 <= cfg.n_ctx_train <= MAX_CTX:
        raise _fail(gf, f"context sizes out of range: sliding window {cfg.n_swa}, original context "
                        f"{cfg.n_ctx_orig}, context_length {cfg.n_ctx_train} (0 to {MAX_CTX})")
    if cfg.n_expert:
        if not 1 <= cfg.n_expert_used <= cfg.n_expert <= MAX_EXPERTS or cfg.n_ff_exp < 1:
            raise _fail(gf, f"{p}expert_used_count {cfg.n_expert_used} / expert_count {cfg.n_expert} / expert FFN "
                            f"width {cfg.n_ff_exp} out of range")
    if cfg.recurrent and any(cfg.recurrent):
        for what, v in (("ssm.conv_kernel", cfg.ssm_d_conv), ("ssm.state_size", cfg.ssm_d_state),
                        ("ssm.group_count", cfg.ssm_n_k), ("ssm.time_step_rank", cfg.ssm_n_v)):
            if not 1 <= v <= MAX_SSM:
                raise _fail(gf, f"{p}{what} {v} is out of range (1 to {MAX_SSM})")
        if cfg.ssm_n_v % cfg.ssm_n_k or cfg.ssm_d_inner != cfg.ssm_n_v * cfg.ssm_d_state:
            raise _fail(gf, f"{p}ssm sizes do not fit together: time_step_rank {cfg.ssm_n_v}, group_count "
                            f"{cfg.ssm_n_k}, state_size {cfg.ssm_d_state}, inner_size {cfg.ssm_d_inner}")
    _check_vocab(gf, cfg)
    _check_blocks(gf, cfg)
    _check_tensors(gf, cfg)


def _check_vocab(gf, cfg):
    toks = gf.get("tokenizer.ggml.tokens")
    if toks is None or isinstance(toks, (str, np.ndarray)):
        return  # no vocabulary / a mistyped one: the tokenizer reports it
    n = len(toks)
    if n != cfg.n_vocab:
        raise _fail(gf, f"the vocabulary (tokenizer.ggml.tokens) has {n} tokens but the model has {cfg.n_vocab} "
                        f"({cfg.arch}.vocab_size / output rows); every output row needs a token and every "
                        f"token an embedding")


_BLK = re.compile(r"^blk\.(\d+)\.")


def _check_blocks(gf, cfg):
    present = set()
    for name in gf.tensors:
        m = _BLK.match(name)
        if m:
            il = int(m.group(1))
            if il >= cfg.n_layer_all:
                raise _fail(gf, f"tensor '{_short(name)}' belongs to block {il} but {cfg.arch}.block_count is "
                                f"{cfg.n_layer_all}")
            present.add(il)
    for il in range(cfg.n_layer):
        if il not in present:
            raise _fail(gf, f"{cfg.arch}.block_count is {cfg.n_layer_all} but the file has no tensors for "
                            f"block {il}")


def expected_tensors(gf, cfg) -> dict:
    """name -> expected ne (ggml order, trailing 1s dropped) of every tensor the model may read; a name maps to a
    tuple of alternatives when several layouts are allowed. Only tensors present in the file are checked
    (construction reports the missing required ones)."""
    E, V, arch = cfg.n_embd, cfg.n_vocab, cfg.arch
    qwen35 = arch in ("qwen35", "qwen35moe")
    want: dict = {"token_embd.weight": (E, V), "output.weight": (E, V), "output_norm.weight": (E,)}
    if arch == "phi3":
        want["rope_factors_long.weight"] = want["rope_factors_short.weight"] = (cfg.n_rot // 2,)
    layers = range(cfg.n_layer_all if qwen35 else cfg.n_layer)
    for il in layers:
        b = f"blk.{il}."
        H, Hkv, hd, hdv, ff = cfg.n_head[il], cfg.n_head_kv[il], cfg.head_dim, cfg.head_dim_v, cfg.n_ff[il]
        w = {"attn_norm.weight": (E,), "ffn_norm.weight": (E,), "post_attention_norm.weight": (E,),
             "post_ffw_norm.weight": (E,)}
        if qwen35 and cfg.recurrent[il]:
            S, Hk, Hv, Dc = cfg.ssm_d_state, cfg.ssm_n_k, cfg.ssm_n_v, cfg.ssm_d_conv
            conv = 2 * S * Hk + S * Hv
            w.update({"attn_qkv.weight": (E, conv), "attn_gate.weight": (E, S * Hv), "ssm_beta.weight": (E, Hv),
                      "ssm_alpha.weight": (E, Hv), "ssm_conv1d.weight": (Dc, conv), "ssm_dt.bias": (Hv,),
                      "ssm_a": (Hv,), "ssm_norm.weight": (S,), "ssm_out.weight": (S * Hv, E)})
        elif qwen35:  # gated attention: Q and its gate interleaved per head
            nq, nkv = H * hd, Hkv * hd
            w.update({"attn_q.weight": (E, 2 * nq), "attn_k.weight": (E, nkv), "attn_v.weight": (E, nkv),
                      "attn_qkv.weight": (E, 2 * nq + 2 * nkv), "attn_q_norm.weight": (hd,),
                      "attn_k_norm.weight": (hd,), "attn_output.weight": (nq, E)})
        else:
            nq, nk, nv = H * hd, Hkv * hd, Hkv * hdv
            w.update({"attn_q.weight": (E, nq), "attn_k.weight": (E, nk), "attn_v.weight": (E, nv),
                      "attn_qkv.weight": (E, nq + nk + nv), "attn_q.bias": (nq,), "attn_k.bias": (nk,),
                      "attn_v.bias": (nv,), "attn_qkv.bias": (nq + nk + nv,), "attn_q_norm.weight": (hd,),
                      "attn_k_norm.weight": (hd,), "attn_output.weight": (H * hdv, E), "attn_output.bias": (E,)})
        has_gate = gf.has(b + "ffn_gate.weight")
        w.update({"ffn_gate.weight": (E, ff), "ffn_up.weight": (E, ff) if has_gate else ((E, ff), (E, 2 * ff)),
                  "ffn_down.weight": (ff, E), "ffn_gate.bias": (ff,), "ffn_up.bias": ((ff,), (2 * ff,)),
                  "ffn_down.bias": (E,)})
        if cfg.n_expert:
            X, fe, fs = cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_shexp
            w.update({"ffn_gate_inp.weight": (E, X), "ffn_gate_exps.weight": (E, fe, X),
                      "ffn_up_exps.weight": (E, fe, X), "ffn_gate_up_exps.weight": (E, 2 * fe, X),
                      "ffn_down_exps.weight": (fe, E, X)})
            if fs:
                w.update({"ffn_gate_shexp.weight": (E, fs), "ffn_up_shexp.weight": (E, fs),
                          "ffn_down_shexp.weight": (fs, E), "ffn_gate_inp_shexp.weight": (E,)})
        if qwen35 and il >= cfg.n_layer:  # the MTP block
            w.update({"nextn.eh_proj.weight": (2 * E, E), "nextn.enorm.weight": (E,), "nextn.hnorm.weight": (E,),
                      "nextn.shared_head_norm.weight": (E,), "nextn.shared_head_head.weight": (E, V),
                      "nextn.embed_tokens.weight": (E, V)})
        for k, v in w.items():
            want[b + k] = v
    return want


def _strip(ne) -> tuple:
    ne = tuple(int(d) for d in ne)
    while len(ne) > 1 and ne[-1] == 1:
        ne = ne[:-1]
    return ne


def _check_tensors(gf, cfg):
    from llamba.kernels.traits import TYPES
    want = expected_tensors(gf, cfg)
    for name, exp in want.items():
        info = gf.tensors.get(name)
        if info is None:
            continue
        alts = exp if isinstance(exp[0], tuple) else (exp,)
        got = _strip(info.ne)
        if got not in [_strip(a) for a in alts]:
            wanted = " or ".join(str(list(a)) for a in alts)
            raise _fail(gf, f"tensor '{name}' has shape {list(info.ne)}, expected {wanted} (ggml order)")
        if len(alts[0]) == 1 and not name.endswith("_shexp.weight") and info.type_id not in _FLOAT_TYPES:
            # vectors (norms, biases, ssm_a, factors) are read as float32 values
            raise _fail(gf, f"tensor '{name}' (a vector) has type {TYPES[info.type_id].name}, expected F32 or F16")
        if name.endswith("ssm_conv1d.weight") and info.type_id != _traits.F32:
            raise _fail(gf, f"tensor '{name}' has type {TYPES[info.type_id].name}, expected F32")
    factors = ["rope_factors_long.weight", "rope_factors_short.weight"] if cfg.arch == "phi3" else []
    if gf.has("rope_freqs.weight") and cfg.arch not in ("qwen35", "qwen35moe"):
        info = gf.info("rope_freqs.weight")
        n = info.n_elements
        if info.type_id not in _FLOAT_TYPES or len(_strip(info.ne)) != 1 or n < cfg.n_rot // 2:
            raise _fail(gf, f"tensor 'rope_freqs.weight' has shape {list(info.ne)} and type "
                            f"{TYPES[info.type_id].name}; expected F32/F16 with at least {cfg.n_rot // 2} "
                            f"(rope.dimension_count / 2) factors")
        factors.append("rope_freqs.weight")
    for name in factors:  # RoPE frequency divisors: a few values, read once here
        if gf.has(name):
            ff = np.asarray(gf.tensor(name), dtype=np.float32).reshape(-1)[:cfg.n_rot // 2]
            bad = np.flatnonzero(~np.isfinite(ff) | (ff == 0))
            if bad.size:
                raise _fail(gf, f"tensor '{name}' has factor {_short(ff[bad[0]])} at {int(bad[0])}; "
                                f"expected finite values != 0 (RoPE divides by them)")


def validate(gf, arch: str, make_config):
    """check_metadata, then cfg = make_config(gf), then check_config; returns cfg."""
    check_metadata(gf, arch)
    cfg = make_config(gf)
    check_config(gf, cfg)
    return cfg
