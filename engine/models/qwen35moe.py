"""`qwen35moe` (Qwen3.5 MoE, ENGINE_BRIEF §3.5): the qwen35 model (hybrid Gated DeltaNet + gated full attention,
optional MTP head) with a mixture-of-experts FFN (llamba.models.moe.MoEFFN) in every block, the MTP block's
included. Extra keys: expert_count, expert_used_count, expert_feed_forward_length (default n_ff /
expert_used_count), expert_shared_feed_forward_length (default n_ff)."""
from __future__ import annotations

import dataclasses

from llamba.config import ModelConfig
from llamba.errors import GGUFError
from llamba.models import qwen35


def config_from_gguf(gf, arch: str = "qwen35moe") -> ModelConfig:
    p = arch + "."
    cfg = qwen35.config_from_gguf(gf, arch)
    n_expert = int(gf.require(p + "expert_count"))
    n_used = int(gf.require(p + "expert_used_count"))
    if n_expert <= 0 or not 0 < n_used <= n_expert:
        raise GGUFError(f"{gf.path}: {p}expert_used_count {n_used} must be between 1 and {p}expert_count "
                        f"{n_expert}")
    n_ff = cfg.n_ff[0]
    n_ff_exp = int(gf.get(p + "expert_feed_forward_length", 0) or 0) or n_ff // n_used
    n_ff_shexp = int(gf.get(p + "expert_shared_feed_forward_length", 0) or 0) or n_ff
    if n_ff_exp <= 0 or n_ff_shexp <= 0:
        raise GGUFError(f"{gf.path}: cannot tell the expert FFN widths: {p}expert_feed_forward_length / "
                        f"expert_shared_feed_forward_length are missing and {p}feed_forward_length is 0")
    return dataclasses.replace(cfg, n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp,
                               n_ff_shexp=n_ff_shexp)


def build(gf, n_ctx: int, **opts):
    return qwen35.Qwen35(gf, config_from_gguf(gf), n_ctx, load_mtp=opts.get("load_mtp", True))
