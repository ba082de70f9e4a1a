"""`qwen35moe` (Qwen3.5 MoE, docs/architectures.md): the qwen35 model (hybrid Gated DeltaNet + gated full attention,
optional MTP head) with a mixture-of-experts FFN (llamba.models.moe.MoEFFN) in every block, the MTP block's
included. Extra keys: expert_count, expert_used_count, expert_feed_forward_length (default n_ff /
expert_used_count), expert_shared_feed_forward_length (default n_ff)."""
from __future__ import annotations

from llamba.config import ModelConfig
from llamba.models import qwen35
from llamba.models.moe import moe_config


def config_from_gguf(gf, arch: str = "qwen35moe") -> ModelConfig:
    cfg = qwen35.config_from_gguf(gf, arch)
    return moe_config(gf, cfg, arch, lambda n_used: cfg.n_ff[0] // n_used, shared=True)


def build(gf, n_ctx: int, **opts):
    return qwen35.Qwen35(gf, config_from_gguf(gf), n_ctx, load_mtp=opts.get("load_mtp", True))
