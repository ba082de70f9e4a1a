"""Prompt-state caches for `Llama.set_cache`, as llama-cpp-python's `llama_cpp.llama_cache`.

    from llamba import Llama, LlamaRAMCache
    llm = Llama("model.gguf")
    llm.set_cache(LlamaRAMCache(capacity_bytes=1 << 30))
    llm("A long shared prefix ... question 1")   # the state after it is saved, keyed by prompt + completion ids
    llm("A long shared prefix ... question 2")   # the longest-prefix state is restored first (if it shares more)

A cache maps a tuple of token ids to a `LlamaState` (`Llama.save_state`); `cache[tokens]` returns the state whose
key shares the longest prefix with `tokens` (a KeyError when none shares a token). Both caches evict the oldest
entries while their size (the states' `llama_state_size`, bytes of KV rows and recurrent states) is over
`capacity_bytes`. `LlamaDiskCache` keeps each state as a pickle file in a directory (no extra package needed);
unlike llama-cpp-python's, reading an entry does not remove it.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

from llamba.errors import ParameterError

__all__ = ["BaseLlamaCache", "LlamaRAMCache", "LlamaDiskCache", "LlamaCache"]


def longest_token_prefix(a, b) -> int:
    """How many leading token ids `a` and `b` share (llama-cpp-python's Llama.longest_token_prefix)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _key(tokens: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(t) for t in tokens)


def _capacity(capacity_bytes) -> int:
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
        raise ParameterError(f"capacity_bytes must be a non-negative integer, got {capacity_bytes!r}")
    return capacity_bytes


class BaseLlamaCache(ABC):
    """What `Llama.set_cache` takes: `cache[tokens]` (longest-prefix lookup), `tokens in cache`,
    `cache[tokens] = state`, and `cache_size` (bytes)."""

    def __init__(self, capacity_bytes: int = (2 << 30)):
        self.capacity_bytes = _capacity(capacity_bytes)

    @property
    @abstractmethod
    def cache_size(self) -> int:
        raise NotImplementedError

    def _find_longest_prefix_key(self, key: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
        best, best_key = 0, None
        for k in self._keys():
            n = longest_token_prefix(k, key)
            if n > best:
                best, best_key = n, k
        return best_key

    @abstractmethod
    def _keys(self):
        raise NotImplementedError

    @abstractmethod
    def __getitem__(self, key: Sequence[int]):
        raise NotImplementedError

    def __contains__(self, key: Sequence[int]) -> bool:
        return self._find_longest_prefix_key(_key(key)) is not None

    @abstractmethod
    def __setitem__(self, key: Sequence[int], value) -> None:
        raise NotImplementedError


class LlamaRAMCache(BaseLlamaCache):
    """States in memory, least recently used evicted first."""

    def __init__(self, capacity_bytes: int = (2 << 30)):
        super().__init__(capacity_bytes)
        self.cache_state: "OrderedDict[Tuple[int, ...], object]" = OrderedDict()

    @property
    def cache_size(self) -> int:
        return sum(int(getattr(s, "llama_state_size", 0)) for s in self.cache_state.values())

    def _keys(self):
        return self.cache_state.keys()

    def __getitem__(self, key: Sequence[int]):
        k = self._find_longest_prefix_key(_key(key))
        if k is None:
            raise KeyError("Key not found")
        self.cache_state.move_to_end(k)
        return self.cache_state[k]

    def __setitem__(self, key: Sequence[int], value) -> None:
        k = _key(key)
        self.cache_state.pop(k, None)
        self.cache_state[k] = value
        while self.cache_state and self.cache_size > self.capacity_bytes:
            self.cache_state.popitem(last=False)

    def __len__(self) -> int:
        return len(self.cache_state)


LlamaCache = LlamaRAMCache  # llama-cpp-python's alias


class LlamaDiskCache(BaseLlamaCache):
    """States as pickle files under `cache_dir` (one `<sha256 of the key>.pkl` per entry, holding the key and the
    state), oldest (by modification time) evicted first; entries written by an earlier process are found."""

    def __init__(self, cache_dir: str = ".cache/llama_cache", capacity_bytes: int = (2 << 30)):
        super().__init__(capacity_bytes)
        self.cache_dir = os.fspath(cache_dir)
        os.makedirs(self.cache_dir, exist_ok=True)
        self._index: dict[Tuple[int, ...], str] = {}
        for name in os.listdir(self.cache_dir):
            if name.endswith(".pkl"):
                path = os.path.join(self.cache_dir, name)
                try:
                    with open(path, "rb") as f:
                        k = pickle.load(f)
                except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError):
                    continue
                if isinstance(k, tuple):
                    self._index[k] = path

    def _path(self, k: Tuple[int, ...]) -> str:
        h = hashlib.sha256(repr(k).encode("ascii")).hexdigest()[:32]
        return os.path.join(self.cache_dir, h + ".pkl")

    @property
    def cache_size(self) -> int:
        total = 0
        for path in self._index.values():
            try:
                total += os.path.getsize(path)
            except OSError:
                pass
        return total

    def _keys(self):
        return list(self._index)

    def __getitem__(self, key: Sequence[int]):
        k = self._find_longest_prefix_key(_key(key))
        if k is None:
            raise KeyError("Key not found")
        try:
            with open(self._index[k], "rb") as f:
                pickle.load(f)
                return pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            self._index.pop(k, None)
            raise KeyError(f"cache entry unreadable: {e}") from None

    def __setitem__(self, key: Sequence[int], value) -> None:
        k = _key(key)
        path = self._path(k)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(k, f, protocol=pickle.HIGHEST_PROTOCOL)
                pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._index[k] = path
        while self._index and self.cache_size > self.capacity_bytes:
            def mtime(item):
                try:
                    return os.path.getmtime(item[1])
                except OSError:
                    return 0.0
            old_k, old_path = min(self._index.items(), key=mtime)
            self._index.pop(old_k)
            try:
                os.unlink(old_path)
            except OSError:
                pass

    def __len__(self) -> int:
        return len(self._index)
