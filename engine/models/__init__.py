"""Architecture registry: `models/<general.architecture>.py` defines `build(gf, n_ctx, **opts)`; the engine
options (llamba.options) travel with `gf` (`gf.options`, set by `load_model`)."""
from __future__ import annotations

import importlib

from llamba.errors import UnsupportedError

ARCHITECTURES = ("llama", "gemma2", "gemma3", "phi3", "qwen2", "qwen3", "qwen3moe", "qwen35", "qwen35moe")


def load_model(gf, n_ctx: int, options=None, **opts):
    """The model of GGUF file `gf` with a default sequence of n_ctx positions. `options` (llamba.options.Options;
    None: `Options.from_env()`) go with the file to every layer built from it (`gf.options`): the model's
    `model.options`, its Linears' repacking, its KV pool's element type, its BLAS prefill threshold."""
    from llamba.options import Options
    build_config(gf)  # every file goes through llamba.validate before anything is built from it
    if options is None:
        options = Options.from_env()
    elif not isinstance(options, Options):
        raise TypeError(f"options must be a llamba.options.Options, got {type(options).__name__}")
    gf.options = options
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
