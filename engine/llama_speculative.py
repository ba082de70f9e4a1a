"""llama-cpp-python's `llama_cpp.llama_speculative` draft models.

`Llama(..., draft_model=LlamaPromptLookupDecoding(num_pred_tokens=N))` turns on llamba's own n-gram prompt-lookup
speculation (`spec="ngram"`, `draft_max=N`; llamba.speculative.ngram), whose drafts are verified exactly: the
output is the output without speculation. `find_candidate_pred_tokens` is the lookup as llama-cpp-python defines
it, for code that calls it directly. Other LlamaDraftModel subclasses are not supported by Llama (an
UnsupportedError)."""
from __future__ import annotations

import abc
from typing import Any

import numpy as np

__all__ = ["LlamaDraftModel", "LlamaPromptLookupDecoding"]


class LlamaDraftModel(abc.ABC):
    @abc.abstractmethod
    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        raise NotImplementedError


class LlamaPromptLookupDecoding(LlamaDraftModel):
    """Prompt-lookup decoding (https://github.com/apoorvumang/prompt-lookup-decoding): the tokens that followed
    the first earlier occurrence of the longest (up to max_ngram_size) suffix n-gram of the ids."""

    def __init__(self, max_ngram_size: int = 2, num_pred_tokens: int = 10):
        self.max_ngram_size = max_ngram_size
        self.num_pred_tokens = num_pred_tokens

    @staticmethod
    def find_candidate_pred_tokens(input_ids: np.ndarray, max_ngram_size: int, num_pred_tokens: int) -> np.ndarray:
        """Up to num_pred_tokens ids that followed the first earlier match of the last n ids (n from max_ngram_size
        down to 1; the trailing n-gram itself is never its own match unless the ids repeat), else an empty
        array."""
        ids = np.asarray(input_ids)
        n_ids = ids.shape[0]
        for n in range(min(int(max_ngram_size), n_ids - 1), 0, -1):
            tail = ids[n_ids - n:]
            windows = np.lib.stride_tricks.sliding_window_view(ids, n)
            for start in np.flatnonzero((windows == tail).all(axis=1)):
                lo = int(start) + n
                hi = min(lo + int(num_pred_tokens), n_ids)
                if lo < hi:
                    return ids[lo:hi]
        return np.array([], dtype=np.intc)

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        return self.find_candidate_pred_tokens(input_ids, self.max_ngram_size, self.num_pred_tokens)
