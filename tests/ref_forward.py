"""An independent float64 numpy forward pass for llama / gemma2 / gemma3 / phi3 / qwen2 / qwen3 / qwen3moe GGUFs,
written from docs/architectures.md and read with gguf-py's own GGUFReader + dequantize (not llamba's loader or kernels).
Slow; tiny models only."""
from __future__ import annotations

import math

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class RefModel:
    def __init__(self, path):
        r = GGUFReader(str(path))
        self.arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
        self.meta = {}
        for k, f in r.fields.items():
            if f.types and f.types[0].name not in ("STRING", "ARRAY") and len(f.data) == 1:
                self.meta[k] = f.parts[f.data[0]][0].item()
        self.t = {}
        for t in r.tensors:
            arr = dequantize(t.data, t.tensor_type).astype(np.float64)
            self.t[t.name] = arr.reshape(tuple(reversed([int(x) for x in t.shape])))

    def m(self, key, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def forward(self, tokens):
        a = self.arch
        E = self.m("embedding_length")
        L = self.m("block_count")
        H = self.m("attention.head_count")
        Hkv = self.m("attention.head_count_kv", H)
        hd = self.m("attention.key_length", E // H)
        eps = self.m("attention.layer_norm_rms_epsilon")
        base = self.m("rope.freq_base", 10000.0)
        T = len(tokens)
        pos = np.arange(T)

        def rms(x, w):
            return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

        def rope(x, b, neox):  # x (T, h, hd)
            half = hd // 2
            inv = b ** (-2.0 * np.arange(half) / hd)
            th = pos[:, None] * inv[None, :]
            c, s = np.cos(th)[:, None, :], np.sin(th)[:, None, :]
            y = x.copy()
            if neox:
                x0, x1 = x[..., :half], x[..., half:]
                y[..., :half] = x0 * c - x1 * s
                y[..., half:] = x0 * s + x1 * c
            else:
                x0, x1 = x[..., 0::2], x[..., 1::2]
                y[..., 0::2] = x0 * c - x1 * s
                y[..., 1::2] = x0 * s + x1 * c
            return y

        x = self.t["token_embd.weight"][np.asarray(tokens)]
        gemma = a in ("gemma2", "gemma3")
        if gemma:
            x = x * math.sqrt(E)
        cap = self.m("attn_logit_softcapping", 0.0) or 0.0
        n_swa = self.m("attention.sliding_window", 0)
        for il in range(L):
            p = f"blk.{il}."
            W = lambda n: self.t[p + n]  # noqa: E731
            h = rms(x, W("attn_norm.weight"))
            B = lambda n: self.t.get(p + n, 0.0)  # noqa: E731  (qwen2: q/k/v biases)
            if p + "attn_qkv.weight" in self.t:  # phi3: fused Q|K|V rows
                qkv = h @ W("attn_qkv.weight").T
                q = qkv[:, :H * hd].reshape(T, H, hd)
                k = qkv[:, H * hd:(H + Hkv) * hd].reshape(T, Hkv, hd)
                v = qkv[:, (H + Hkv) * hd:].reshape(T, Hkv, hd)
            else:
                q = (h @ W("attn_q.weight").T + B("attn_q.bias")).reshape(T, H, hd)
                k = (h @ W("attn_k.weight").T + B("attn_k.bias")).reshape(T, Hkv, hd)
                v = (h @ W("attn_v.weight").T + B("attn_v.bias")).reshape(T, Hkv, hd)
            if a in ("gemma3", "qwen3", "qwen3moe"):
                q = rms(q, W("attn_q_norm.weight"))
                k = rms(k, W("attn_k_norm.weight"))
            swa = n_swa > 0 and ((a == "gemma3" and il % 6 < 5) or (a == "gemma2" and il % 2 == 0))
            b = self.m("rope.freq_base_swa", 10000.0) if swa else base
            q, k = rope(q, b, a != "llama"), rope(k, b, a != "llama")
            scale = 1.0 / math.sqrt(hd)
            o = np.zeros((T, H, hd))
            for hh in range(H):
                g = hh // (H // Hkv)
                s = q[:, hh] @ k[:, g].T * scale
                if cap > 0:
                    s = cap * np.tanh(s / cap)
                mask = pos[None, :] > pos[:, None]
                if swa:
                    mask |= (pos[:, None] - pos[None, :]) >= n_swa
                s = np.where(mask, -np.inf, s)
                s = np.exp(s - s.max(-1, keepdims=True))
                s /= s.sum(-1, keepdims=True)
                o[:, hh] = s @ v[:, g]
            att = o.reshape(T, -1) @ W("attn_output.weight").T
            if gemma:
                att = rms(att, W("post_attention_norm.weight"))
            x = x + att
            h = rms(x, W("ffn_norm.weight"))
            if p + "ffn_gate_inp.weight" in self.t:  # qwen3moe: softmax router, top-k renormalized, SwiGLU experts
                k_used = self.m("expert_used_count")
                lg = h @ W("ffn_gate_inp.weight").T
                pr = np.exp(lg - lg.max(-1, keepdims=True))
                pr /= pr.sum(-1, keepdims=True)
                f = np.zeros_like(x)
                for t in range(T):
                    sel = np.argsort(-pr[t], kind="stable")[:k_used]
                    wsel = pr[t, sel] / pr[t, sel].sum()
                    for e, we in zip(sel, wsel):
                        ge = W("ffn_gate_exps.weight")[e] @ h[t]
                        ue = W("ffn_up_exps.weight")[e] @ h[t]
                        f[t] += we * (W("ffn_down_exps.weight")[e] @ (ge / (1 + np.exp(-ge)) * ue))
                x = x + f
                continue
            if p + "ffn_gate.weight" in self.t:
                gt = h @ W("ffn_gate.weight").T
                up = h @ W("ffn_up.weight").T
            else:  # phi3: fused gate|up, gate rows first
                gu = h @ W("ffn_up.weight").T
                gt, up = gu[:, :gu.shape[1] // 2], gu[:, gu.shape[1] // 2:]
            if gemma:
                act = 0.5 * gt * (1 + np.tanh(math.sqrt(2 / math.pi) * (gt + 0.044715 * gt ** 3)))
            else:
                act = gt / (1 + np.exp(-gt))
            f = (act * up) @ W("ffn_down.weight").T
            if gemma:
                f = rms(f, W("post_ffw_norm.weight"))
            x = x + f
        x = rms(x, self.t["output_norm.weight"])
        out_w = self.t.get("output.weight", self.t["token_embd.weight"])
        logits = x @ out_w.T
        fcap = self.m("final_logit_softcapping", 0.0) or 0.0
        return fcap * np.tanh(logits / fcap) if fcap > 0 else logits
