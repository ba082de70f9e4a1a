"""Token sampling: llama.cpp's default sampler chain, in numpy (docs/sampling.md).

    params  = SamplingParams(temp=0.7, top_k=40, seed=42)      # or SamplingParams.from_gguf_defaults(gguf, temp=0.7)
    sampler = Sampler(params, n_ctx=4096)
    sampler.accept_many(prompt_tokens)                           # optional: let the penalties see the prompt
    tok = sampler.sample_and_accept(logits)                      # logits: (n_vocab,) float32

The chain is `logit bias -> params.samplers (in order) -> dist`. The default order is llama.cpp's
`penalties, top_k, typical_p, top_p, min_p, temperature` (DRY, top-n-sigma and XTC, which are off by default in
llama.cpp, are not implemented and are accepted as no-ops in the order). Each stage works on the current
candidate set exactly as llama.cpp's sampler of the same name does:

* penalties:   for each token among the last `penalty_last_n` accepted tokens, with count c: logit /= repeat if
               logit > 0 else logit *= repeat; then logit -= c*freq + (c > 0)*presence.
* top_k:       keep the k largest (ties: lower token id first); the candidates are now sorted, descending.
* typical_p:   locally typical sampling (Meister et al.); off at 1.0.
* top_p:       softmax over the current candidates' logits (untempered in the default order); keep the smallest
               sorted prefix whose cumulative probability is >= p, and at least max(1, min_keep) tokens.
* min_p:       keep logit >= max_logit + ln(p), at least max(1, min_keep) tokens.
* temperature: logits /= temp; temp <= 0 keeps only the arg-max (greedy; lowest id on exact ties).
* dist:        softmax over the survivors, u ~ U[0,1) (double), pick the first candidate whose cumulative
               probability reaches u * sum.

Speed: with top_k set, only a block-max prefilter plus an `argpartition` over a few thousand entries touches the
full vocabulary (about 0.5 ms for 262k logits); the later stages work on k candidates. Without top_k, top_p grows
a partial sort (256, 2048, ... entries) until the nucleus is covered, and min_p is a single threshold pass. Greedy
(temp <= 0) with the default order is a single `argmax` after the bias and penalties.

RNG: `numpy.random.default_rng(seed)` (PCG64), not llama.cpp's `std::mt19937`, so the same seed does not give
llama.cpp's token stream; it does give a reproducible one.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from llamba.errors import ParameterError

__all__ = [
    "SamplingError", "SamplingParams", "Sampler", "make_sampler", "draft_top", "draft_candidates",
    "samplers_from_names", "samplers_from_chars", "DEFAULT_SAMPLERS", "RANDOM_SEED",
]

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: "pick a random seed"

DEFAULT_SAMPLERS = ("penalties", "top_k", "typical_p", "top_p", "min_p", "temperature")
IMPLEMENTED = frozenset(DEFAULT_SAMPLERS)
NOOP_SAMPLERS = frozenset({"dry", "top_n_sigma", "xtc", "infill"})  # accepted in an order, not implemented

# llama.cpp common_sampler_types_from_names: canonical names, then the alternative spellings
_NAMES = {
    "penalties": "penalties", "dry": "dry", "top_n_sigma": "top_n_sigma", "top_k": "top_k",
    "typ_p": "typical_p", "typical_p": "typical_p", "top_p": "top_p", "min_p": "min_p", "xtc": "xtc",
    "temperature": "temperature", "infill": "infill",
    "top-k": "top_k", "top-p": "top_p", "top-n-sigma": "top_n_sigma", "nucleus": "top_p", "typical-p": "typical_p",
    "typical": "typical_p", "typ-p": "typical_p", "typ": "typical_p", "min-p": "min_p", "temp": "temperature",
}
# llama.cpp common_sampler_types_from_chars (--sampling-seq)
_CHARS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typical_p", "p": "top_p",
          "m": "min_p", "x": "xtc", "t": "temperature", "i": "infill"}

_F32 = np.float32


class SamplingError(ParameterError):
    """Bad sampling parameters (one-line message)."""


def samplers_from_names(names: str | Sequence[str], strict: bool = True) -> list[str]:
    """Sampler names (a ';'-separated string or a list; llama.cpp's names and aliases) -> canonical names.

    Unknown names raise SamplingError when `strict`, else they are skipped (llama.cpp warns and skips)."""
    if isinstance(names, str):
        names = [n for n in names.split(";")]
    out = []
    for raw in names:
        n = str(raw).strip().lower()
        if not n:
            continue
        canon = _NAMES.get(n)
        if canon is None:
            if strict:
                raise SamplingError(f"unknown sampler '{raw}'; known: {', '.join(sorted(set(_NAMES.values())))}")
            continue
        out.append(canon)
    return out


def samplers_from_chars(chars: str, strict: bool = True) -> list[str]:
    """llama.cpp's --sampling-seq letters (e.g. 'ekypmt') -> canonical names."""
    out = []
    for c in chars:
        canon = _CHARS.get(c)
        if canon is None:
            if strict:
                raise SamplingError(f"unknown sampler letter '{c}' in '{chars}'; known: {''.join(_CHARS)}")
            continue
        out.append(canon)
    return out


def _gguf_float(v) -> float:
    """A GGUF float32 value as the decimal it was written as (0.949999988 -> 0.95)."""
    v = float(v)
    f = np.float32(v)
    return float(str(f)) if float(f) == v else v


@dataclass
class SamplingParams:
    """llama.cpp `common_params_sampling` (the subset implemented here), with llama.cpp's defaults."""
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64          # -1: the whole context (n_ctx); 0: penalties off
    seed: int | None = None           # None, -1 or 0xFFFFFFFF: random
    logit_bias: dict[int, float] | None = None
    suppress_tokens: list[int] | None = None   # applied as a -inf logit bias
    min_keep: int = 0
    samplers: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLERS))

    def __post_init__(self):
        self.samplers = samplers_from_names(self.samplers if self.samplers is not None else [], strict=True)
        try:
            self.temp = float(self.temp)
            self.top_p = float(self.top_p)
            self.min_p = float(self.min_p)
            self.typical_p = float(self.typical_p)
            self.repeat_penalty = float(self.repeat_penalty)
            self.frequency_penalty = float(self.frequency_penalty)
            self.presence_penalty = float(self.presence_penalty)
            self.top_k = int(self.top_k)
            self.penalty_last_n = int(self.penalty_last_n)
            self.min_keep = int(self.min_keep)
            if self.seed is not None:
                self.seed = int(self.seed)
            if self.logit_bias is not None:
                self.logit_bias = {int(k): float(v) for k, v in dict(self.logit_bias).items()}
            if self.suppress_tokens is not None:
                self.suppress_tokens = [int(t) for t in self.suppress_tokens]
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
            raise SamplingError(f"bad sampling parameter: {' '.join(str(e).split())[:200]}") from None
        for name in ("temp", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
                     "presence_penalty"):
            if math.isnan(getattr(self, name)):
                raise SamplingError(f"sampling parameter {name} is NaN")
        if self.repeat_penalty <= 0:
            raise SamplingError(f"repeat_penalty must be > 0 (1.0 = off), got {self.repeat_penalty}")
        if self.penalty_last_n > 1 << 31:
            raise SamplingError(f"penalty_last_n must be at most 2^31, got {self.penalty_last_n}")
        if self.penalty_last_n < -1:
            raise SamplingError(f"penalty_last_n must be >= -1 (-1 = whole context, 0 = off), got {self.penalty_last_n}")
        if self.min_keep < 0:
            raise SamplingError(f"min_keep must be >= 0, got {self.min_keep}")
        if self.seed is not None and self.seed < -1:
            raise SamplingError(f"seed must be >= 0 (or -1 / 0xFFFFFFFF for random), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temp <= 0 and "temperature" in self.samplers

    @classmethod
    def from_gguf_defaults(cls, metadata, **user_overrides) -> "SamplingParams":
        """Defaults, replaced by the model's `general.sampling.*` keys, replaced by what the user set.

        `metadata`: a GGUFFile (anything with `.metadata`) or a key -> value mapping. Overrides whose value is None
        count as "not set" (so CLI arguments can be passed through as they are)."""
        meta = getattr(metadata, "metadata", metadata)
        if meta is None:
            meta = {}
        if not isinstance(meta, Mapping):
            raise SamplingError(f"from_gguf_defaults: expected GGUF metadata, got {type(metadata).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        user = {k: v for k, v in user_overrides.items() if v is not None}
        unknown = sorted(set(user) - names)
        if unknown:
            raise SamplingError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        conv = {
            "top_k": ("top_k", int), "top_p": ("top_p", _gguf_float), "min_p": ("min_p", _gguf_float),
            "temp": ("temp", _gguf_float), "penalty_last_n": ("penalty_last_n", int),
            "penalty_repeat": ("repeat_penalty", _gguf_float),
            "sequence": ("samplers", lambda s: samplers_from_names(str(s), strict=False)),
        }
        kw = {}
        for key, (fname, fn) in conv.items():
            v = meta.get("general.sampling." + key)
            if v is None or fname in user:
                continue
            try:
                kw[fname] = fn(v)
            except (TypeError, ValueError):
                raise SamplingError(f"model metadata general.sampling.{key} = {v!r} is not valid") from None
        kw.update(user)
        return cls(**kw)


# ----------------------------------------------------------------------------------------------------------------
# selection helpers

def _block_prefilter(x: np.ndarray, k: int):
    """Ascending positions of a superset of the k largest entries of a big x, or None.

    The k-th largest of the block maxima lower-bounds the k-th largest value (k distinct blocks each hold a value
    >= it), so `x >= that` keeps every top-k entry and, for real logits, little else."""
    n = x.shape[0]
    bsz = n // max(16 * k, 2048)
    if bsz < 8:
        return None
    nb = n // bsz
    bm = x[: nb * bsz].reshape(nb, bsz).max(axis=1)
    if nb * bsz < n:
        bm = np.append(bm, x[nb * bsz:].max())
    m = bm.shape[0]
    thr = np.partition(bm, m - k)[m - k]
    pos = np.flatnonzero(x >= thr)
    if pos.shape[0] < k:  # NaNs
        return None
    return pos


def _sort_desc(x: np.ndarray, ids) -> np.ndarray:
    """Order of x by value descending, ties by id ascending (ids None: the positions are the ids)."""
    key = np.arange(x.shape[0]) if ids is None else ids
    return np.lexsort((key, -x))


def _topk_order(x: np.ndarray, k: int, ids=None) -> np.ndarray:
    """Positions of the k largest entries of x, ordered by value descending, ties by id ascending."""
    n = x.shape[0]
    if k >= n:
        return _sort_desc(x, ids)
    pos = _block_prefilter(x, k) if (ids is None and n >= 16384) else None
    if pos is None:
        pos = np.arange(n)
        v = x
    else:
        v = x[pos]
    key = pos if ids is None else ids[pos]
    m = v.shape[0]
    if m > 4 * k + 64:
        part = np.argpartition(v, m - k)[m - k:]
        thr = v[part].min()
        gt = np.flatnonzero(v > thr)
        eq = np.flatnonzero(v == thr)
        need = k - gt.shape[0]
        if eq.shape[0] > need:
            eq = eq[np.argsort(key[eq], kind="stable")[:need]]
        sub = np.concatenate([gt, eq])
        if sub.shape[0] != k:  # NaNs in play; fall back to a full order
            sub = np.arange(m)
    else:
        sub = np.arange(m)
    order = sub[np.lexsort((key[sub], -v[sub]))][:k]
    return pos[order]


def _softmax64(x: np.ndarray) -> np.ndarray:
    m = x.max()
    if not np.isfinite(m):
        p = (x == m).astype(np.float64)
        return p / p.sum() if p.sum() > 0 else np.full(x.shape[0], 1.0 / x.shape[0])
    e = np.exp((x - m).astype(np.float64))
    return e / e.sum()


def _as_logits(logits) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1 or x.shape[0] == 0:
        raise SamplingError(f"expected logits of shape (n_vocab,), got {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


def _resolve_seed(seed) -> int:
    if seed is None or seed == -1 or seed == RANDOM_SEED:
        return int(np.random.SeedSequence().entropy) & 0xFFFFFFFF
    return int(seed)


# ----------------------------------------------------------------------------------------------------------------

class Sampler:
    """A sampler chain with its penalty history and RNG.

    `sample(logits)` runs the chain and draws; `accept(token)` commits a token to the penalty history. A speculative
    verifier samples each verify row with `sample_and_accept` (or `sample_and_accept_n`), so the penalties see the
    tokens accepted so far; `clone()` / `get_state()` / `set_state()` let a caller try and roll back.

    `n_ctx` resolves `penalty_last_n = -1` (without it, -1 means the whole history). `rng` replaces the seeded
    numpy Generator (anything with a `.random()` returning a float in [0, 1)).
    """

    def __init__(self, params: SamplingParams | None = None, *, n_ctx: int | None = None, rng=None, **overrides):
        if params is None:
            params = SamplingParams(**overrides)
        elif overrides:
            params = dataclasses.replace(params, **overrides)
        else:
            params = dataclasses.replace(params)  # own copy: the chain is built from it once, here
        self.params = params
        p = params
        self.n_ctx = n_ctx
        last_n = p.penalty_last_n
        if last_n == -1:
            last_n = int(n_ctx) if n_ctx is not None and n_ctx > 0 else None  # None: unbounded
        self._last_n = last_n
        self._hist: deque = deque(maxlen=last_n) if last_n else deque()
        self._counts: dict[int, int] = {}
        self._pen_cache = None
        self._own_rng = rng is None
        self.seed = _resolve_seed(p.seed) if rng is None else None
        self._rng = np.random.default_rng(self.seed) if rng is None else rng

        # logit bias (llama.cpp puts it first in the chain)
        bias = dict(p.logit_bias or {})
        for t in p.suppress_tokens or ():
            bias[int(t)] = -math.inf
        if bias:
            self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
            self._bias_vals = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
        else:
            self._bias_ids = None

        self._pen_active = last_n != 0 and not (
            p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0)

        active = {
            "penalties": self._pen_active,
            "top_k": p.top_k > 0,
            "typical_p": p.typical_p < 1.0,
            "top_p": p.top_p < 1.0,
            "min_p": p.min_p > 0.0,
            "temperature": p.temp != 1.0,
        }
        fns = {"penalties": self._st_penalties, "top_k": self._st_top_k, "typical_p": self._st_typical,
               "top_p": self._st_top_p, "min_p": self._st_min_p, "temperature": self._st_temp}
        self.stages = [s for s in p.samplers if s in IMPLEMENTED and active[s]]
        self._fns = [fns[s] for s in self.stages]

        # Greedy fast path: temp <= 0 and everything before the temperature stage either comes first (penalties)
        # or keeps the arg-max (top_k / top_p / min_p keep the largest logit, lowest id first on ties), so the
        # chain's answer is argmax(biased, penalized logits).
        self._greedy_fast = False
        self._greedy_pen = False
        if p.temp <= 0 and "temperature" in self.stages:
            pre = self.stages[: self.stages.index("temperature")]
            ok = all(s in ("penalties", "top_k", "top_p", "min_p") for s in pre)
            if "penalties" in pre and pre.index("penalties") != 0:
                ok = False
            self._greedy_fast = ok
            self._greedy_pen = "penalties" in pre

    # ---- history

    @property
    def history(self) -> list[int]:
        """The tokens the penalties currently see (oldest first)."""
        return list(self._hist)

    def accept(self, token_id: int) -> None:
        """Commit a generated (or prompt) token to the penalty history."""
        if self._last_n == 0:
            return
        t = int(token_id)
        h = self._hist
        if h.maxlen is not None and len(h) == h.maxlen:
            old = h[0]
            c = self._counts[old] - 1
            if c:
                self._counts[old] = c
            else:
                del self._counts[old]
        h.append(t)
        self._counts[t] = self._counts.get(t, 0) + 1
        self._pen_cache = None

    def accept_many(self, tokens) -> None:
        for t in tokens:
            self.accept(t)

    def reset(self) -> None:
        """Forget the history and re-seed (a new random seed when the seed is random), like llama_sampler_reset."""
        self._hist.clear()
        self._counts.clear()
        self._pen_cache = None
        if self._own_rng:
            self.seed = _resolve_seed(self.params.seed)
            self._rng = np.random.default_rng(self.seed)

    def get_state(self):
        """An opaque snapshot (history and RNG state) for set_state."""
        rng_state = self._rng.bit_generator.state if isinstance(self._rng, np.random.Generator) else copy.deepcopy(self._rng)
        return (tuple(self._hist), rng_state)

    def set_state(self, state) -> None:
        hist, rng_state = state
        self._hist.clear()
        self._counts.clear()
        self._pen_cache = None
        for t in hist:
            self.accept(t)
        if isinstance(self._rng, np.random.Generator):
            self._rng.bit_generator.state = rng_state
        else:
            self._rng = copy.deepcopy(rng_state)

    def clone(self) -> "Sampler":
        """An independent copy: same params, history and RNG state."""
        new = object.__new__(Sampler)
        new.__dict__.update(self.__dict__)
        new._hist = deque(self._hist, maxlen=self._hist.maxlen)
        new._counts = dict(self._counts)
        new._pen_cache = None
        new._rng = copy.deepcopy(self._rng)
        # the stage functions are bound methods of self: rebind them to the copy
        fns = {"penalties": new._st_penalties, "top_k": new._st_top_k, "typical_p": new._st_typical,
               "top_p": new._st_top_p, "min_p": new._st_min_p, "temperature": new._st_temp}
        new._fns = [fns[s] for s in new.stages]
        if self.constraint is not None:
            new.constraint = self.constraint.clone()
        return new

    # ---- sampling

    # an optional grammar state (llamba.constrain.Matcher): sample() masks a copy of the row with it, and
    # sample_and_accept() advances it; None (the default) runs no extra code
    constraint = None

    def sample(self, logits) -> int:
        """Run the chain on one row of logits and draw a token (does not accept it)."""
        x = self._prepare(logits)
        if self.constraint is not None:
            x = self._constrained(x)
        if self._greedy_fast:
            if self._greedy_pen:
                x = self._penalize_full(x)
            return int(np.argmax(x))
        ids, x = self._chain(x)
        return self._dist(ids, x)

    def sample_and_accept(self, logits) -> int:
        t = self.sample(logits)
        self.accept(t)
        if self.constraint is not None:
            self.constraint.accept(t)
        return t

    def sample_and_accept_n(self, rows, draft) -> list[int]:
        """Speculative verification (llama.cpp common_sampler_sample_and_accept_n).

        rows[i] are the logits after the i-th verified position (len(draft) + 1 rows, or len(draft) without a bonus
        row). Samples row by row, accepting each token; stops after the first sampled token that differs from the
        draft. Returns the sampled tokens: the accepted draft prefix plus one more (the correction or the bonus)."""
        draft = [int(t) for t in draft]
        n_rows = len(rows)
        if n_rows not in (len(draft), len(draft) + 1):
            raise SamplingError(f"sample_and_accept_n: {n_rows} logit rows for {len(draft)} draft tokens "
                                f"(need {len(draft) + 1})")
        out = []
        for i in range(n_rows):
            t = self.sample_and_accept(rows[i])
            out.append(t)
            if i < len(draft) and t != draft[i]:
                break
        return out

    def candidates(self, logits) -> tuple[np.ndarray, np.ndarray]:
        """The chain without the final draw: (token ids int64, their processed float32 logits), in chain order
        (sorted descending after top_k / top_p)."""
        x = self._prepare(logits)
        if self.constraint is not None:
            x = self._constrained(x)
        ids, x = self._chain(x)
        if ids is None:
            ids = np.arange(x.shape[0], dtype=np.int64)
        return ids.astype(np.int64, copy=False), x

    def candidate_probs(self, logits) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities the final draw would use)."""
        ids, x = self.candidates(logits)
        return ids, _softmax64(x)

    # ---- internals

    def _prepare(self, logits) -> np.ndarray:
        x = _as_logits(logits)
        if self._bias_ids is not None:
            n = x.shape[0]
            ok = (self._bias_ids >= 0) & (self._bias_ids < n)
            x = x.copy()
            np.add.at(x, self._bias_ids[ok], self._bias_vals[ok])
            self._x_owned = True
        else:
            self._x_owned = False
        return x

    def _constrained(self, x: np.ndarray) -> np.ndarray:
        """x with the tokens the grammar forbids at -inf (a copy unless x is already the sampler's own)."""
        if not self._x_owned:
            x = x.copy()
            self._x_owned = True
        return self.constraint.mask(x)

    def _pen_arrays(self):
        if self._pen_cache is None:
            n = len(self._counts)
            toks = np.fromiter(self._counts.keys(), dtype=np.int64, count=n)
            cnts = np.fromiter(self._counts.values(), dtype=np.int64, count=n)
            o = np.argsort(toks)
            self._pen_cache = (toks[o], cnts[o])
        return self._pen_cache

    def _penalty_values(self, vals: np.ndarray, cnts: np.ndarray) -> np.ndarray:
        p = self.params
        rep = _F32(p.repeat_penalty)
        vals = np.where(vals <= 0, vals * rep, vals / rep).astype(np.float32)
        sub = cnts.astype(np.float32) * _F32(p.frequency_penalty) + _F32(p.presence_penalty)
        return (vals - sub).astype(np.float32)

    def _penalize_full(self, x: np.ndarray) -> np.ndarray:
        if not self._pen_active or not self._counts:
            return x
        toks, cnts = self._pen_arrays()
        ok = (toks >= 0) & (toks < x.shape[0])
        toks, cnts = toks[ok], cnts[ok]
        if not self._x_owned:
            x = x.copy()
            self._x_owned = True
        x[toks] = self._penalty_values(x[toks], cnts)
        return x

    def _chain(self, x: np.ndarray):
        ids = None       # None: x is the full vocabulary, position == token id
        srt = False
        for fn in self._fns:
            ids, x, srt = fn(ids, x, srt)
        return ids, x

    def _st_penalties(self, ids, x, srt):
        if not self._counts:
            return ids, x, srt
        if ids is None:
            return None, self._penalize_full(x), False
        toks, cnts = self._pen_arrays()
        j = np.searchsorted(toks, ids)
        jc = np.minimum(j, toks.shape[0] - 1)
        hit = (j < toks.shape[0]) & (toks[jc] == ids)
        if not hit.any():
            return ids, x, srt
        x = x.copy()
        x[hit] = self._penalty_values(x[hit], cnts[jc[hit]])
        return ids, x, False

    def _st_top_k(self, ids, x, srt):
        k = min(self.params.top_k, x.shape[0])
        if srt:
            return ids[:k], x[:k], True
        order = _topk_order(x, k, ids)
        return (order if ids is None else ids[order]), x[order], True

    def _st_typical(self, ids, x, srt):
        p = self.params
        if ids is None:
            ids = np.arange(x.shape[0], dtype=np.int64)
        if not srt:
            o = _sort_desc(x, ids)
            ids, x = ids[o], x[o]
        prob = _softmax64(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(prob)
            ent = -np.sum(np.where(prob > 0, prob * logp, 0.0))
            shifted = np.abs(-logp - ent)
        order = np.argsort(shifted, kind="stable")
        cum = np.cumsum(prob[order])
        cond = cum > p.typical_p
        if p.min_keep > 0:
            cond &= np.arange(cum.shape[0]) >= p.min_keep - 1
        hit = np.flatnonzero(cond)
        last = int(hit[0]) + 1 if hit.shape[0] else cum.shape[0]
        keep = order[:last]
        return ids[keep], x[keep], False

    def _nucleus_cut(self, prob_sorted: np.ndarray):
        """Index+1 of the top-p cut in a descending prob prefix, or None if the prefix does not reach it."""
        p = self.params
        cum = np.cumsum(prob_sorted)
        cond = cum >= p.top_p
        if p.min_keep > 1:
            cond &= np.arange(1, cum.shape[0] + 1) >= p.min_keep
        hit = np.flatnonzero(cond)
        return int(hit[0]) + 1 if hit.shape[0] else None

    def _st_top_p(self, ids, x, srt):
        n = x.shape[0]
        prob = _softmax64(x)
        if srt:
            cut = self._nucleus_cut(prob)
            cut = n if cut is None else cut
            return ids[:cut], x[:cut], True
        if n > 1024:
            # Tokens with prob < (1 - p) / n hold less than 1 - p in total, so the nucleus (which reaches p before
            # any of them) lies among the others: sort only those.
            pos = np.flatnonzero(prob >= (1.0 - self.params.top_p) / n)
            if max(1, self.params.min_keep) <= pos.shape[0] < n:
                sub_ids = pos if ids is None else ids[pos]
                ids, x, prob = sub_ids, x[pos], prob[pos]
                n = x.shape[0]
            if n > 1024:  # try a partial sort first (llama.cpp does the same with 256)
                order = _topk_order(x, 256, ids)
                cut = self._nucleus_cut(prob[order])
                if cut is not None:
                    order = order[:cut]
                    return (order if ids is None else ids[order]), x[order], True
        order = _sort_desc(x, ids)
        cut = self._nucleus_cut(prob[order])
        if cut is not None:
            order = order[:cut]
        return (order if ids is None else ids[order]), x[order], True

    def _st_min_p(self, ids, x, srt):
        p = self.params
        mx = x.max()
        thr = _F32(_F32(mx) + _F32(math.log(p.min_p)))
        mask = x >= thr
        need = max(1, p.min_keep)
        if int(np.count_nonzero(mask)) >= need:
            if ids is None:
                pos = np.flatnonzero(mask)
                return pos, x[pos], False
            return ids[mask], x[mask], srt
        k = min(need, x.shape[0])
        if srt:
            return ids[:k], x[:k], True
        order = _topk_order(x, k, ids)
        return (order if ids is None else ids[order]), x[order], True

    def _st_temp(self, ids, x, srt):
        t = self.params.temp
        if t <= 0:
            if ids is None:
                i = int(np.argmax(x))
                return np.array([i], dtype=np.int64), x[i:i + 1], True
            cand = np.flatnonzero(x == x.max())
            if cand.shape[0] == 0:  # NaN max
                cand = np.arange(x.shape[0])
            j = int(cand[np.argmin(ids[cand])])
            return ids[j:j + 1], x[j:j + 1], True
        return ids, (x / _F32(t)).astype(np.float32, copy=False), srt

    def _dist(self, ids, x) -> int:
        n = x.shape[0]
        if n == 1:
            return int(ids[0]) if ids is not None else 0
        m = x.max()
        if not np.isfinite(m):  # everything -inf (all suppressed) or NaN: nothing to weigh
            j = int(np.argmax(x == m)) if m == m else 0
            return int(ids[j]) if ids is not None else j
        e = np.exp(x - m)
        cum = np.cumsum(e, dtype=np.float64)
        u = float(self._rng.random())
        j = int(np.searchsorted(cum, u * cum[-1], side="left"))
        if j >= n:
            j = n - 1
        if e[j] == 0:  # u == 0 landing on a zero-probability candidate
            nz = np.flatnonzero(e[j:] > 0)
            j = j + int(nz[0]) if nz.shape[0] else int(np.flatnonzero(e > 0)[-1])
        return int(ids[j]) if ids is not None else j


def make_sampler(params: SamplingParams | None = None, *, n_ctx: int | None = None, **kwargs) -> Sampler:
    """mlx-lm style constructor: make_sampler(temp=0.7, top_p=0.9) or make_sampler(params, n_ctx=...)."""
    return Sampler(params, n_ctx=n_ctx, **kwargs)


def draft_candidates(logits, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The drafter's fixed chain (llama.cpp common_speculative: top-k `k`, softmax): the top-k token ids, sorted
    descending (ties: lower id first), and their probabilities within that top-k softmax."""
    x = _as_logits(logits)
    k = x.shape[0] if k <= 0 else min(int(k), x.shape[0])
    order = _topk_order(x, k)
    return order.astype(np.int64, copy=False), _softmax64(x[order])


def draft_top(logits, k: int = 10) -> tuple[int, float]:
    """(top token, its probability within the top-k softmax): what MTP / draft-model proposers draft, and the
    confidence they compare with p_min."""
    x = _as_logits(logits)
    k = x.shape[0] if k <= 0 else min(int(k), x.shape[0])
    i = int(np.argmax(x))
    if k == 1:
        return i, 1.0
    if x.shape[0] >= 16384:
        top = x[_topk_order(x, k)]
    else:
        top = np.partition(x, x.shape[0] - k)[x.shape[0] - k:]
    top = top.astype(np.float64)
    mx = top.max()
    if not np.isfinite(mx):
        return i, 1.0 / max(1, int(np.count_nonzero(top == mx)))
    return i, float(1.0 / np.exp(top - mx).sum())
