"""Architecture registry: `models/<general.architecture>.py` defines `build(gf, n_ctx, **opts)`."""
from __future__ import annotations

import importlib

from llamba.errors import UnsupportedError

ARCHITECTURES = ("llama", "gemma2", "gemma3", "phi3", "qwen2", "qwen3", "qwen3moe", "qwen35", "qwen35moe")


def load_model(gf, n_ctx: int, **opts):
    arch = gf.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{gf.path}: architecture '{arch}' is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    mod = importlib.import_module(f"llamba.models.{arch}")
    return mod.build(gf, n_ctx, **opts)


def build_config(gf):
    arch = gf.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{gf.path}: architecture '{arch}' is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    return importlib.import_module(f"llamba.models.{arch}").config_from_gguf(gf)
