"""llamba: local LLM inference on GGUF models, Numba kernels on the CPU, optional CuPy offload."""
__version__ = "0.1.0"

from llamba.errors import ContextOverflowError, GGUFError, LlambaError, UnsupportedError  # noqa: E402


def __getattr__(name):  # lazy: `import llamba` stays cheap (no Numba compile) until a model is used
    if name in ("Llama", "LlamaState"):
        from llamba import llama
        return getattr(llama, name)
    raise AttributeError(name)


__all__ = ["Llama", "LlamaState", "GGUFError", "LlambaError", "UnsupportedError", "ContextOverflowError", "__version__"]
