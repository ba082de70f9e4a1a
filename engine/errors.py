"""Errors llamba raises for bad input. Each message is one line that says what is wrong and what to do."""


class LlambaError(Exception):
    """Base class for user-facing errors (the CLI prints the message, no traceback, exit code 1)."""


class GGUFError(LlambaError):
    """A model file is missing, truncated, corrupt, or uses something llamba does not support."""


class UnsupportedError(LlambaError):
    """The model uses an architecture, tensor type or feature llamba does not implement."""


class ContextOverflowError(LlambaError):
    """A prompt (plus generation) does not fit the context window."""


class TokenIdError(LlambaError, ValueError):
    """A token id that is not an integer in [0, n_vocab) (the same error from every call that takes ids)."""


class ParameterError(LlambaError, ValueError):
    """A bad argument value to the API (a negative n_batch, max_tokens that is not an integer, ...)."""


class ParameterTypeError(ParameterError, TypeError):
    """An argument of the wrong type (e.g. `tokenize(5)`); also a TypeError, as Python code expects."""


class ResourceLimitError(LlambaError):
    """A request that would need more memory (or work) than the limits allow; the message gives the numbers."""


class TemplateError(LlambaError):
    """A chat template failed or was stopped (render-time, output-size or sandbox limits)."""
