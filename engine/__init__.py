"""llamba: local LLM inference on GGUF models, Numba kernels on the CPU, optional CuPy offload."""
__version__ = "0.1.0"

from llamba.errors import ContextOverflowError, GGUFError, LlambaError, UnsupportedError  # noqa: E402


def __getattr__(name):  # lazy: `import llamba` stays cheap (no Numba compile) until a model is used
    if name in _LLAMA_NAMES:
        from llamba import llama
        return getattr(llama, name)
    if name[:1].isupper():  # llama-cpp-python's types at the top level too (ChatCompletionRequestUserMessage, ...)
        from llamba import llama_types
        if name in llama_types.__all__:
            return getattr(llama_types, name)
    raise AttributeError(name)


# llama-cpp-python's names (llama_cpp.Llama, LlamaGrammar, LogitsProcessorList, the caches, ...), from llamba.llama
_LLAMA_NAMES = ("Llama", "LlamaState", "LlamaGrammar", "LogitsProcessorList", "StoppingCriteriaList",
                "LogitsProcessor", "StoppingCriteria", "MinTokensLogitsProcessor", "BaseLlamaCache", "LlamaCache",
                "LlamaRAMCache", "LlamaDiskCache")

__all__ = [*_LLAMA_NAMES, "GGUFError", "LlambaError", "UnsupportedError", "ContextOverflowError", "__version__"]
