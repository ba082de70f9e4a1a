"""Independent check of the llama (dense and Mixtral MoE), gemma2, qwen2, qwen3, qwen3moe, qwen35 and qwen35moe
forward passes against Hugging Face transformers.

Tiny random transformers models (float32, eager attention) are converted to GGUF by tests/hf_convert.py (the
transforms of llama.cpp's convert_hf_to_gguf.py) and llamba's logits are compared with the transformers logits:
max|llamba - hf| / max|hf| < 1e-3. llamba rounds Q and the KV cache to fp16 like llama.cpp, which alone gives ~1e-4.
Paths covered: batched prefill (>= 32 tokens: dequantize+BLAS matmuls; transformers' own Qwen3.5 prefill is the
chunked (WY) delta rule, two 64-token chunks, against llamba's token loop), a short batch (row-exact matmuls),
token-by-token decode, and prefill followed by decode. For qwen35 with n_v_heads = 2 x n_k_heads, a GGUF converted
*without* the tiled v-head reorder must be far off, which proves the test exercises that reorder. The MTP block (not
in transformers' Qwen3_5ForCausalLM) is checked against transformers' own decoder-layer and norm modules wired as
llama.cpp does.
"""
from __future__ import annotations

import numpy as np
import pytest

from hf_convert import convert
from llamba import Llama

# torch and transformers take ~10 s to import: _hf() imports them on first use (in the `cases` fixture), not at
# collection, so `pytest --collect-only` and runs that deselect these tests do not pay for them.
torch = transformers = None


def _hf():
    """Import torch and transformers into this module's globals, or skip the calling test/fixture."""
    global torch, transformers
    if transformers is None:
        t = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
        tf = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
        if not hasattr(tf, "Qwen3_5ForCausalLM"):
            pytest.skip(f"transformers {tf.__version__} has no Qwen3_5ForCausalLM")
        tf.logging.set_verbosity_error()  # no "falling back to the reference PyTorch kernel" notices
        torch, transformers = t, tf

# A long parity run (torch, transformers, 13 models): CI runs it, `pytest -m "not slow"` leaves it out
# (tests/test_models.py checks every architecture against tests/ref_forward.py in the fast tier).
pytestmark = pytest.mark.slow

TOL = 1e-3
N_TOK = 72  # > 32: the batched prefill path; > 64: two chunks of transformers' chunked delta rule
N_CTX = 128


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _qwen3():
    cfg = transformers.Qwen3Config(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32,  # head_dim != hidden/heads: key_length must be honoured
        max_position_embeddings=N_CTX, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "eager"
    return transformers.Qwen3ForCausalLM(cfg)


def _qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=N_CTX, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "eager"
    return transformers.Qwen2ForCausalLM(cfg)


def _gemma2():
    """Gemma 2: alternating sliding-window (8 < N_TOK) / full layers, attention and final logit soft-capping
    with caps that bite on these random weights, head_dim != hidden / heads, query_pre_attn_scalar = head_dim
    (llama.cpp's scale for every size but 27B)."""
    cfg = transformers.Gemma2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
        attn_logit_softcapping=3.0, final_logit_softcapping=5.0, max_position_embeddings=N_CTX,
        rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "eager"
    return transformers.Gemma2ForCausalLM(cfg)


def _phi3(longrope: bool):
    """Phi-3: fused qkv and gate_up, partial rotary (3/4 of head_dim 32); with LongRoPE short/long factors and
    an original context of 64 < N_CTX (llamba, like llama.cpp, picks the factors by n_ctx, as HF does by length
    only past the original context: the parity run stays within 64 tokens for the short factors)."""
    rp = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
    kw = {}
    if longrope:
        r = np.random.default_rng(3)
        rp = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
              "short_factor": (1.0 + r.random(12)).round(3).tolist(),
              "long_factor": (2.0 + 4 * r.random(12)).round(3).tolist()}
        kw = {"original_max_position_embeddings": 64}
    cfg = transformers.Phi3Config(
        vocab_size=320, hidden_size=128, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=N_CTX, rms_norm_eps=1e-5, tie_word_embeddings=False,
        sliding_window=None, pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters=rp, **kw)
    cfg._attn_implementation = "eager"
    return transformers.Phi3ForCausalLM(cfg)


def _llama(moe: bool):
    """Llama (Q/K permuted by the converter, NORM RoPE in llamba) or Mixtral (8 experts, top-2)."""
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=N_CTX, rms_norm_eps=1e-5, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if moe:
        cfg = transformers.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **kw)
        cfg._experts_implementation = "eager"
    else:
        cfg = transformers.LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    return (transformers.MixtralForCausalLM if moe else transformers.LlamaForCausalLM)(cfg)


def _qwen3moe(n_experts: int, top_k: int):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=n_experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, max_position_embeddings=N_CTX, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return transformers.Qwen3MoeForCausalLM(cfg)


def _qwen35(n_k: int, n_v: int, head_dim: int, partial: float, sections, layer_types, tied: bool):
    cfg = transformers.Qwen3_5TextConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        linear_num_key_heads=n_k, linear_num_value_heads=n_v, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, layer_types=layer_types, max_position_embeddings=N_CTX, rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial,
                         "mrope_section": list(sections), "mrope_interleaved": True})
    cfg._attn_implementation = "eager"
    return transformers.Qwen3_5ForCausalLM(cfg)


def _qwen35moe(n_experts: int, top_k: int, layer_types, tied: bool):
    """A Qwen3.5 MoE: n_v = 2 n_k (tiled v-head order), more experts than used, a shared expert wider than
    the routed experts."""
    cfg = transformers.Qwen3_5MoeTextConfig(
        vocab_size=384, hidden_size=64, num_hidden_layers=len(layer_types), num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4, layer_types=layer_types,
        num_experts=n_experts, num_experts_per_tok=top_k, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, max_position_embeddings=N_CTX, rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [3, 3, 2], "mrope_interleaved": True})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # the plain per-expert loop of Qwen3_5MoeExperts
    return transformers.Qwen3_5MoeForCausalLM(cfg)


def _randomize(model, seed: int, zero_centred_norms: bool):
    """Weights with O(1) effects everywhere (the transformers init leaves norms at their neutral value, tiny
    projections and fast-decaying DeltaNet states, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):  # decay exp(-A softplus(.)) per token: keep some memory
                p.copy_(torch.log(torch.empty(p.shape).uniform_(0.05, 1.0, generator=g)))
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * randn(*p.shape))
            elif p.ndim == 1 and "norm" in name:
                zc = zero_centred_norms and not name.endswith("linear_attn.norm.weight")
                p.copy_((0.0 if zc else 1.0) + 0.2 * randn(*p.shape))
            elif "conv1d" in name:
                p.copy_(0.5 * randn(*p.shape))
            elif "embed_tokens" in name:
                p.copy_(randn(*p.shape))
            else:
                p.copy_(randn(*p.shape) / np.sqrt(p.shape[-1]))
    model.eval()
    return model


CASES = {
    "gemma2": lambda: _randomize(_gemma2(), 9, zero_centred_norms=True),  # HF Gemma norms are (1 + w)
    "llama": lambda: _randomize(_llama(False), 7, zero_centred_norms=False),
    "phi3": lambda: _randomize(_phi3(False), 6, zero_centred_norms=False),
    "phi3-longrope": lambda: _randomize(_phi3(True), 5, zero_centred_norms=False),  # n_ctx 128 > 64: long factors
    "mixtral": lambda: _randomize(_llama(True), 8, zero_centred_norms=False),  # llama arch with experts
    "qwen2": lambda: _randomize(_qwen2(), 10, zero_centred_norms=False),  # Q/K/V biases, NEOX RoPE
    "qwen3": lambda: _randomize(_qwen3(), 11, zero_centred_norms=False),
    "qwen3moe": lambda: _randomize(_qwen3moe(8, 2), 14, zero_centred_norms=False),  # no shared expert
    # n_v == n_k, rope on 1/4 of head_dim 64 (n_rot 16), full attention at layers 1 and 3
    "qwen35-nv1x": lambda: _randomize(_qwen35(2, 2, 64, 0.25, (3, 3, 2), [
        "linear_attention", "full_attention", "linear_attention", "full_attention"], tied=False), 12, True),
    # n_v = 2 n_k: the tiled v-head order; rope on 1/2 of head_dim 32; the default 3:1 layer pattern
    "qwen35-nv2x": lambda: _randomize(_qwen35(2, 4, 32, 0.5, (3, 3, 2), [
        "linear_attention", "linear_attention", "linear_attention", "full_attention"], tied=True), 13, True),
    # qwen35moe: 8 experts, top-3, experts as llama.cpp's converter writes them (fused ffn_gate_up_exps)
    "qwen35moe-top3": lambda: _randomize(_qwen35moe(8, 3, [
        "linear_attention", "full_attention", "linear_attention", "full_attention"], tied=False), 15, True),
    # 8 experts, top-2, separate ffn_gate_exps / ffn_up_exps, tied head, the default 3:1 layer pattern
    "qwen35moe-top2-split": lambda: _randomize(_qwen35moe(8, 2, [
        "linear_attention", "linear_attention", "linear_attention", "full_attention"], tied=True), 16, True),
}
CONVERT_OPTS = {"qwen35moe-top2-split": {"split_experts": True}}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    _hf()
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf")
    toks = np.random.default_rng(5).integers(0, 320, N_TOK).tolist()
    out = {}
    for name, make in CASES.items():
        model = make()
        with torch.no_grad():
            ref = model(torch.tensor([toks]), use_cache=False).logits[0].double().numpy()
        path = convert(model, d / f"{name}.gguf", **CONVERT_OPTS.get(name, {}))
        out[name] = (model, path, ref)
    return toks, out


@pytest.fixture(scope="module")
def llms(cases):
    _, out = cases
    return {name: Llama(str(path), n_ctx=N_CTX, logits_all=True, verbose=False) for name, (_, path, _) in out.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_matches_hf(cases, llms, case, monkeypatch):
    toks, out = cases
    ref = out[case][2]
    from llamba.layers import Linear
    gemm, calls = Linear.gemm, []
    monkeypatch.setattr(Linear, "gemm", lambda self, *a, **k: calls.append(1) or gemm(self, *a, **k))
    llm = llms[case]
    llm.reset()
    got = llm.model.forward(toks, logits="all", gemm=True)  # 72 tokens: the dequantize+BLAS matmul path
    assert calls, "a 72-token prompt did not take the batched (gemm) prefill path"
    assert got.shape == ref.shape
    rel = _rel(got, ref)
    print(f"{case} prefill ({N_TOK} tokens) max rel diff {rel:.2e}")
    assert rel < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_short_batch_matches_hf(cases, llms, case):
    toks, out = cases
    ref = out[case][2][:20]  # causal: the first 20 rows do not depend on later tokens
    got = llms[case].eval_logits(toks[:20])  # < 32 tokens: row-exact matmuls, token-loop delta rule
    rel = _rel(got, ref)
    print(f"{case} short batch (20 tokens) max rel diff {rel:.2e}")
    assert rel < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches_hf(cases, llms, case):
    toks, out = cases
    ref = out[case][2]
    llm = llms[case]
    llm.reset()
    got = np.concatenate([llm.eval([t]) for t in toks])  # one token at a time: the decode path
    rel = _rel(got, ref)
    print(f"{case} token-by-token ({N_TOK} tokens) max rel diff {rel:.2e}")
    assert rel < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode_matches_hf(cases, llms, case):
    toks, out = cases
    ref = out[case][2]
    llm = llms[case]
    llm.reset()
    first = llm.eval(toks[:40])  # batched prefill, then the state (KV / conv / ssm) carries into decode
    rest = [llm.eval([t]) for t in toks[40:]]
    rel = _rel(np.concatenate([first, *rest]), ref)
    print(f"{case} prefill 40 + decode {N_TOK - 40} max rel diff {rel:.2e}")
    assert rel < TOL


def test_tiled_v_head_order_is_exercised(cases, tmp_path):
    """Without the grouped -> tiled v-head reorder the GGUF must be far off: the nv2x case really tests it."""
    toks, out = cases
    model, _, ref = out["qwen35-nv2x"]
    assert model.config.linear_num_value_heads == 2 * model.config.linear_num_key_heads
    bad = convert(model, tmp_path / "grouped.gguf", reorder_v=False)
    got = Llama(str(bad), n_ctx=N_CTX, verbose=False).eval_logits(toks)
    rel = _rel(got, ref)
    print(f"qwen35-nv2x without the v-head reorder: max rel diff {rel:.2e}")
    assert rel > 50 * TOL


@pytest.mark.parametrize("case", ["qwen35moe-top3", "qwen35moe-top2-split"])
def test_moe_routing_is_exercised(cases, case, monkeypatch):
    """Mis-routing must be far off: dropping the top-k renormalization, or taking the k *smallest*
    probabilities, moves the logits by much more than the tolerance, so the MoE cases really test routing."""
    toks, out = cases
    ref = out[case][2][:20]
    from llamba.models import moe
    route = moe.route

    def unnormalized(logits, k):
        p = np.empty_like(logits)
        moe.K.softmax_rows(np.ascontiguousarray(logits), p)
        idx, _ = route(logits, k)
        return idx, np.ascontiguousarray(np.take_along_axis(p, idx, 1))

    def smallest(logits, k):
        return route(-logits, k)

    for bad in (unnormalized, smallest):
        with monkeypatch.context() as m:
            m.setattr(moe, "route", bad)
            got = Llama(str(out[case][1]), n_ctx=N_CTX, verbose=False).eval_logits(toks[:20])
        rel = _rel(got, ref)
        print(f"{case} with {bad.__name__} routing: max rel diff {rel:.2e}")
        assert rel > 50 * TOL


def _hf_mtp(cfg):
    """Qwen3.5's MTP block under the checkpoint names (`mtp.fc`, `mtp.pre_fc_norm_embedding`,
    `mtp.pre_fc_norm_hidden`, `mtp.norm`, `mtp.layers.0.*`), built from transformers' own Qwen3.5 (or Qwen3.5
    MoE) modules. transformers' Qwen3_5(Moe)ForCausalLM has no MTP module (it drops `mtp.*` at load), so only
    the wiring is ours, as llama.cpp's (docs/architectures.md, "MTP forward"):
    hM = norm(layer(fc([enorm(embed(x_p)) | hnorm(h_{p-1})]))), where h is the trunk's post-final-norm hidden
    state and the layer is an ordinary full-attention decoder layer (with the MoE FFN for Qwen3.5 MoE)."""

    class HFMtp(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            import copy

            if cfg.model_type == "qwen3_5_moe_text":
                from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as M
                Norm, Layer, Rotary = M.Qwen3_5MoeRMSNorm, M.Qwen3_5MoeDecoderLayer, M.Qwen3_5MoeTextRotaryEmbedding
            else:
                from transformers.models.qwen3_5 import modeling_qwen3_5 as M
                Norm, Layer, Rotary = M.Qwen3_5RMSNorm, M.Qwen3_5DecoderLayer, M.Qwen3_5TextRotaryEmbedding
            c = copy.deepcopy(cfg)
            c.layer_types, c.num_hidden_layers = ["full_attention"], 1
            E, eps = cfg.hidden_size, cfg.rms_norm_eps
            self.fc = torch.nn.Linear(2 * E, E, bias=False)
            self.pre_fc_norm_embedding = Norm(E, eps)
            self.pre_fc_norm_hidden = Norm(E, eps)
            self.norm = Norm(E, eps)
            self.layers = torch.nn.ModuleList([Layer(c, 0)])
            self.rotary = Rotary(c)

        def forward(self, emb, h):
            x = self.fc(torch.cat([self.pre_fc_norm_embedding(emb), self.pre_fc_norm_hidden(h)], dim=-1))
            T = x.shape[1]
            mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
            x = self.layers[0](x, position_embeddings=self.rotary(x, torch.arange(T)[None]), attention_mask=mask)
            return self.norm(x)

    return HFMtp(cfg)


@pytest.mark.parametrize("case", ["qwen35-nv1x", "qwen35moe-top3"])
def test_mtp_block_matches_hf_modules(cases, tmp_path, case):
    """The converter's mtp.* -> blk.{n_layer}.nextn.* renaming (+1 on every MTP norm) and llamba's MTP head
    (for qwen35moe with a MoE FFN in the MTP block)."""
    toks, _ = cases
    model = CASES[case]()  # untied: the MTP head falls back to output.weight
    mtp = _randomize(_hf_mtp(model.config), 14, zero_centred_norms=True)
    sd = {**model.state_dict(), **{"mtp." + k: v for k, v in mtp.state_dict().items()}}
    path = convert(model, tmp_path / "mtp.gguf", state_dict=sd)
    ids = torch.tensor([toks])
    with torch.no_grad():
        hN = model.model(ids, use_cache=False).last_hidden_state  # post-final-norm
        ref_trunk = model.lm_head(hN)[0].double().numpy()
        ref = model.lm_head(mtp(model.model.embed_tokens(ids[:, 1:]), hN[:, :-1]))[0].double().numpy()
    llm = Llama(str(path), n_ctx=N_CTX, verbose=False)
    m = llm.model
    assert m.config.n_layer == model.config.num_hidden_layers and m.config.n_nextn == 1 and m.mtp is not None
    llm.reset()
    trunk = llm.session.eval(toks, logits="all", keep_hidden=True)
    rel_trunk = _rel(trunk, ref_trunk)
    m.mtp.truncate(0)
    got = m.mtp.forward(toks[1:], m.hidden[:-1], logits="all")  # row i: token i+1 with the hidden of row i
    rel = _rel(got, ref)
    if case.startswith("qwen35moe"):
        assert m.mtp.block.ffn.n_expert == model.config.num_experts
    print(f"{case} + MTP: trunk max rel diff {rel_trunk:.2e}, MTP head max rel diff {rel:.2e}")
    assert rel_trunk < TOL and rel < TOL
