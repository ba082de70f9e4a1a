"""Architecture registry: `models/<general.architecture>.py` defines `build(gf, n_ctx, **opts)`."""
from __future__ import annotations

import importlib

from llamba.errors import UnsupportedError

ARCHITECTURES = ("llama", "gemma2", "gemma3", "phi3", "qwen2", "qwen3", "qwen3moe", "qwen35", "qwen35moe")


def load_model(gf, n_ctx: int, **opts):
    build_config(gf)  # every file goes through llamba.validate before anything is built from it
    mod = importlib.import_module(f"llamba.models.{gf.architecture}")
    return mod.build(gf, n_ctx, **opts)


def build_config(gf):
    """The architecture's config, validated (llamba.validate: metadata types and ranges first, then the config
    against itself and against every tensor the model reads), before any weight is touched."""
    from llamba.validate import validate
    arch = gf.architecture
    if arch not in ARCHITECTURES:
        from llamba.gguf import short
        raise UnsupportedError(f"{gf.path}: architecture '{short(arch)}' is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    return validate(gf, arch, importlib.import_module(f"llamba.models.{arch}").config_from_gguf)
