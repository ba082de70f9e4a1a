"""Errors llamba raises for bad input. Each message is one line that says what is wrong and what to do."""


class LlambaError(Exception):
    """Base class for user-facing errors (the CLI prints the message, no traceback, exit code 1)."""


class GGUFError(LlambaError):
    """A model file is missing, truncated, corrupt, or uses something llamba does not support."""


class UnsupportedError(LlambaError):
    """The model uses an architecture, tensor type or feature llamba does not implement."""


class ContextOverflowError(LlambaError):
    """A prompt (plus generation) does not fit the context window."""
