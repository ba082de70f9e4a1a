"""`Llama`: a drop-in for the common calls of llama-cpp-python's `Llama`.

    from llamba import Llama
    llm = Llama("model.gguf", n_ctx=2048, n_threads=2, seed=0)
    out = llm("Once upon a time", max_tokens=32, temperature=0)
    print(out["choices"][0]["text"])

Generated text -- incremental UTF-8 pieces, stop strings, logprobs and finish reasons -- comes from one stream,
`llamba.textstream.stream_text`, fed by `Llama.stream_text`; completions, chat completions (and so the server),
the chat REPL (`Llama.chat_stream`) and the CLI all read it. Front ends use the public methods only (chat_prompt,
chat_constraint, compile_constraint, make_sampler, speculative_proposer, set_chat_template, n_vocab_ids, ...);
tests/test_structure.py checks that no other module touches a private member of a Llama.
"""
from __future__ import annotations

import math
import os
import secrets
import sys
import time
import uuid
from typing import Callable, Iterator

import numpy as np

from llamba.constrain import LlamaGrammar  # noqa: F401 - llama-cpp-python's names, here as there
from llamba.errors import (LlambaError, ParameterError, ParameterTypeError, ResourceLimitError,
                            TokenIdError)
from llamba.generate import GenStats, Session, generate
from llamba.gguf import GGUFFile
from llamba.llama_cache import (BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache,  # noqa: F401
                                longest_token_prefix)
from llamba.options import Options
from llamba.sampling import RANDOM_SEED, Sampler, SamplingParams
from llamba.textstream import (LogprobRecorder, chat_logprobs_content, completion_logprobs_chunk,
                                logits_to_logprobs, stream_text, top_n_logprobs)
from llamba.tokenizer import Tokenizer

# llama.cpp's enum llama_pooling_type (the `{arch}.pooling_type` GGUF key, llama-cpp-python's pooling_type)
POOLING_UNSPECIFIED, POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = -1, 0, 1, 2, 3, 4
POOLING_NAMES = {POOLING_NONE: "none", POOLING_MEAN: "mean", POOLING_CLS: "cls", POOLING_LAST: "last",
                 POOLING_RANK: "rank"}


def set_threads(n_threads: int | None):
    import numba
    n = n_threads if n_threads and n_threads > 0 else (os.cpu_count() or 1)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


# ---- argument checks at the API boundary (issue 11: one error type per failure class, never a numpy / overflow
# traceback): bad token ids -> TokenIdError, bad values -> ParameterError (wrong types: ParameterTypeError, also a
# TypeError), what does not fit memory -> ResourceLimitError with the numbers.

MAX_STOPS, MAX_STOP_CHARS = 64, 1024  # stop strings are matched against the text on every token
MAX_CHAT_N = 128  # chat choices per call (each its own generation)
MAX_LOGPROBS = 1000  # alternatives per token (OpenAI allows 20): each costs a detokenize per generated token


def _show(v) -> str:
    """A short, one-line rendering of a bad argument for a message."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"{'-' if v < 0 else ''}<an integer of {v.bit_length()} bits>"
    try:
        s = " ".join(repr(v).split())
    except Exception:  # noqa: BLE001 - a repr that fails
        s = f"<{type(v).__name__}>"
    return s if len(s) <= 40 else s[:37] + "..."


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _token_ids(tokens, n_vocab: int, what: str = "tokens") -> list[int]:
    """`tokens` as a list of ints in [0, n_vocab); anything else is a TokenIdError."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
            raise TokenIdError(f"{what} must be a 1-D sequence of integer token ids, got an array of "
                               f"{tokens.dtype} with shape {tokens.shape}")
        tokens = tokens.tolist()
    elif isinstance(tokens, (str, bytes, bytearray, dict, set, frozenset)) or not hasattr(tokens, "__iter__"):
        raise TokenIdError(f"{what} must be a sequence of token ids (integers), got {type(tokens).__name__}")
    out = []
    for t in tokens:
        if type(t) is not int:
            if not _is_int(t):
                raise TokenIdError(f"{what}: {_show(t)} is not a token id (an integer)")
            t = int(t)
        if not 0 <= t < n_vocab:
            raise TokenIdError(f"token id {_show(t)} is out of range for a vocabulary of {n_vocab} tokens")
        out.append(t)
    return out


def _int_arg(name: str, v, *, lo: int | None = None, hi: int | None = None, none_ok: bool = True):
    if v is None and none_ok:
        return None
    if not _is_int(v):
        raise ParameterTypeError(f"{name} must be an integer{' or None' if none_ok else ''}, got {_show(v)}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = "a non-negative integer" if lo == 0 else f"an integer >= {lo}" if lo is not None else "an integer"
        rng += f" (at most {hi})" if hi is not None else ""
        raise ParameterError(f"{name} must be {rng}, got {_show(v)}")
    return v


def constraint_spec(response_format=None, grammar=None):
    """(kind, text) for llamba.constrain.compile_constraint from an OpenAI `response_format` and/or a llama.cpp
    `grammar` (GBNF text or a LlamaGrammar-like object), or None (no constraint). Invalid -> GrammarError."""
    from llamba.constrain import GrammarError, grammar_spec
    if grammar is not None and response_format is not None and _rf_type(response_format) != "text":
        raise GrammarError("give either grammar or response_format, not both")
    if grammar is not None:
        return grammar_spec(grammar)
    if response_format is None:
        return None
    rf = response_format
    if hasattr(rf, "model_dump"):
        rf = rf.model_dump(exclude_none=True)
    if not isinstance(rf, dict):
        raise GrammarError(f"response_format must be an object, not {type(rf).__name__}")
    t = _rf_type(rf)
    if t == "text":
        return None
    if t == "json_object":
        schema = rf.get("schema")  # llama-cpp-python: {"type": "json_object", "schema": {...}}
        return ("json_schema", schema) if schema is not None else ("json_object", "")
    if t == "json_schema":
        js = rf.get("json_schema")
        if js is None:
            js = {"schema": rf["schema"]} if "schema" in rf else None
        if not isinstance(js, dict):
            raise GrammarError("response_format of type json_schema needs a 'json_schema' object "
                               "({'name': ..., 'schema': {...}})")
        schema = js.get("schema")
        if schema is None:
            return ("json_object", "")
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"response_format json_schema.schema must be an object, not {type(schema).__name__}")
        if schema is True:
            schema = {}
        if schema is False:
            raise GrammarError("invalid JSON schema: false admits nothing")
        return ("json_schema", schema)
    raise GrammarError(f"response_format type {str(t)[:40]!r} is not supported: use 'text', 'json_object' or "
                       f"'json_schema'")


def _rf_type(rf):
    if hasattr(rf, "model_dump"):
        rf = rf.model_dump(exclude_none=True)
    return rf.get("type") if isinstance(rf, dict) else None


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise ParameterTypeError(f"stop must be a string or a list of strings, got {_show(stop)}")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ParameterError(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters "
                             f"(got {len(stops)}, the longest {max(map(len, stops), default=0)})")
    return list(stops)


def _logit_bias(bias, n_vocab: int):
    """{token id: bias}: ids checked like every token id (str keys of JSON objects accepted), biases numbers."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ParameterTypeError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    out = {}
    for k, v in bias.items():
        if isinstance(k, str) and k.strip().lstrip("+-").isdigit() and len(k) < 40:
            k = int(k)
        t = _token_ids([k], n_vocab, "logit_bias")[0]
        if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)) or \
                math.isnan(float(v)):
            raise ParameterError(f"logit_bias[{t}] must be a number, got {_show(v)}")
        out[t] = float(v)
    return out


def _available_memory() -> int | None:
    """Bytes of memory available now (/proc/meminfo MemAvailable, else free physical pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _context_bytes(cfg, n_ctx: int, logits_all: bool, kv_dtype=np.uint16) -> int:
    """What a context of n_ctx positions allocates: K and V rows of every attention layer (recurrent layers keep a
    fixed-size state instead), plus the (n_ctx, n_vocab) float32 `scores` with logits_all."""
    item = np.dtype(kv_dtype).itemsize
    rec = tuple(getattr(cfg, "recurrent", ()) or ())
    per_pos = 0
    for il in range(cfg.n_layer_all):
        if il < len(rec) and rec[il]:
            continue
        h = cfg.n_head_kv[il] if il < len(cfg.n_head_kv) else cfg.n_head_kv[-1]
        per_pos += int(h) * (int(cfg.head_dim) + int(cfg.head_dim_v)) * item
    return n_ctx * per_pos + (n_ctx * int(cfg.n_vocab) * 4 if logits_all else 0)


def _check_context(cfg, n_ctx: int, logits_all: bool, kv_dtype=np.uint16) -> None:
    """Refuse a context whose cache cannot fit the memory available, before anything is allocated (llama.cpp
    allows n_ctx beyond the trained context; so does this, as long as it fits)."""
    need = _context_bytes(cfg, n_ctx, logits_all, kv_dtype)
    avail = _available_memory()
    if n_ctx > MAX_N_CTX or (avail is not None and need > avail):
        have = f"{avail / 2**30:.1f} GiB of memory is available" if avail is not None else "that is too much"
        raise ResourceLimitError(
            f"n_ctx {n_ctx} needs {need} bytes ({need / 2**30:.1f} GiB) for the KV cache"
            f"{' and scores (logits_all)' if logits_all else ''} but {have} (the model was trained for "
            f"{cfg.n_ctx_train}); lower n_ctx (-c)")


MAX_N_CTX = (1 << 31) - 1  # positions are int32


def _check_init_args(n_ctx, n_batch, n_threads, seed) -> None:
    if (_int_arg("n_ctx", n_ctx) or 0) > MAX_N_CTX:
        raise ResourceLimitError(f"n_ctx {n_ctx} is over the limit of {MAX_N_CTX} positions; lower n_ctx (-c)")
    _int_arg("n_batch", n_batch, lo=0, none_ok=False)
    _int_arg("n_threads", n_threads)
    try:
        SamplingParams(seed=seed)
    except LlambaError as e:
        raise ParameterError(f"seed: {e}") from None


def _check_state(state, n_ctx: int, n_vocab: int) -> None:
    """A LlamaState's structure, before any of it is copied into the cache: load_state must never leave a cache
    half-written by a malformed state (KV rows shorter than n_past, wrong dtypes, counts past the context)."""
    def bad(why):
        raise ParameterError(f"load_state: the state is malformed ({why})")

    st = getattr(state, "llama_state", None)
    n = getattr(state, "n_tokens", None)
    if not isinstance(st, dict) or not _is_int(n):
        bad("no llama_state dict or n_tokens")
    n_past = st.get("n_past")
    if not _is_int(n_past) or n_past != n or not 0 <= n <= n_ctx:
        bad(f"n_tokens {_show(n)} and n_past {_show(n_past)} must be equal and within the context of {n_ctx}")
    ids = getattr(state, "input_ids", None)
    if ids is None or len(_token_ids(ids, n_vocab, "load_state input_ids")) < n:
        bad(f"input_ids hold fewer than n_tokens ({n}) ids")
    kv, rec = st.get("kv"), st.get("rec", {})
    if not isinstance(kv, dict) or not isinstance(rec, dict) or not isinstance(st.get("model", ()), tuple):
        bad("kv / rec / model entries of the wrong type")
    for il, pair in kv.items():
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(a, np.ndarray) for a in pair)):
            bad(f"layer {_show(il)}: KV is not a pair of arrays")
        k, v = pair
        if k.ndim != 3 or v.ndim != 3 or k.shape[1] != n or v.shape[1] != n or k.shape[0] != v.shape[0] or \
                k.dtype != v.dtype:
            bad(f"layer {_show(il)}: KV arrays of shapes {k.shape} / {v.shape} do not hold {n} positions")
    for il, pair in rec.items():
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(a, np.ndarray) for a in pair)):
            bad(f"layer {_show(il)}: the recurrent state is not a pair of arrays")
    sc = getattr(state, "scores", None)
    if sc is not None and (not isinstance(sc, np.ndarray) or sc.ndim != 2 or sc.shape[1] != n_vocab or
                           sc.dtype.kind != "f"):
        bad(f"scores must be a float array of {n_vocab} columns")
    seed = getattr(state, "seed", None)
    if seed is not None and not _is_int(seed):
        bad(f"seed {_show(seed)} is not an integer")


LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
StoppingCriteria = Callable[[np.ndarray, np.ndarray], bool]


class LogitsProcessorList(list):
    """llama-cpp-python's LogitsProcessorList: callables `(input_ids, scores) -> scores` applied in order to each
    row of logits before sampling (`logits_processor=` of create_completion, create_chat_completion, generate,
    sample). `input_ids`: the token ids evaluated so far (prompt and generated, an intc array); `scores`: a float32
    copy of the row (a processor may change it in place and return it)."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(list):
    """llama-cpp-python's StoppingCriteriaList: callables `(input_ids, logits) -> bool`; after each token is
    sampled they get the token ids evaluated so far and the logits row the token was sampled from, and when any
    returns True the generation ends there (that token is dropped) with finish_reason "stop"."""

    def __call__(self, input_ids: np.ndarray, logits: np.ndarray) -> bool:
        return any([criterion(input_ids, logits) for criterion in self])


class MinTokensLogitsProcessor:
    """llama-cpp-python's MinTokensLogitsProcessor: no `token_eos` before `min_tokens` tokens were generated."""

    def __init__(self, min_tokens: int, token_eos: int):
        self.min_tokens = min_tokens
        self.token_eos = token_eos
        self.prompt_tokens = None

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        if len(input_ids) - self.prompt_tokens < self.min_tokens:
            scores[self.token_eos] = -np.inf
        return scores


def _hook(name: str, v):
    """A logits_processor / stopping_criteria argument: None, a callable (a LogitsProcessorList or
    StoppingCriteriaList is one), or a list / tuple of callables (wrapped in the matching list class)."""
    if v is None or (isinstance(v, (list, tuple)) and not v):
        return None
    if isinstance(v, (list, tuple)) and not callable(v):
        if not all(callable(f) for f in v):
            raise ParameterTypeError(f"{name} must be a list of callables, got {_show(v)}")
        return (LogitsProcessorList if name == "logits_processor" else StoppingCriteriaList)(v)
    if not callable(v):
        raise ParameterTypeError(f"{name} must be a callable or a list of callables, got {_show(v)}")
    return v


def _check_unsupported(tfs_z=1.0, mirostat_mode=0, mirostat_tau=5.0, mirostat_eta=0.1, penalize_nl=True) -> None:
    """llama-cpp-python sampling arguments llamba does not implement: accepted at their no-op values (tfs_z 1.0,
    mirostat_mode 0, penalize_nl True), an UnsupportedError otherwise -- never silently ignored."""
    from llamba.errors import UnsupportedError
    if isinstance(mirostat_mode, bool) or not _is_int(mirostat_mode) or mirostat_mode not in (0, 1, 2):
        raise ParameterError(f"mirostat_mode must be 0, 1 or 2, got {_show(mirostat_mode)}")
    if mirostat_mode:
        raise UnsupportedError(f"mirostat_mode={int(mirostat_mode)} (mirostat sampling) is not supported by llamba; "
                               f"use mirostat_mode=0 (top_k / top_p / min_p / temperature sampling)")
    for name, v in (("tfs_z", tfs_z), ("mirostat_tau", mirostat_tau), ("mirostat_eta", mirostat_eta)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ParameterTypeError(f"{name} must be a number, got {_show(v)}")
    if float(tfs_z) != 1.0:
        raise UnsupportedError(f"tfs_z={_show(tfs_z)} (tail-free sampling, removed from llama.cpp) is not supported "
                               f"by llamba; use tfs_z=1.0 (off)")
    if penalize_nl is not True and penalize_nl != 1:
        raise UnsupportedError("penalize_nl=False is not supported by llamba: the repeat / frequency / presence "
                               "penalties apply to every token, the newline included (as in llama.cpp)")


def _check_kwargs(where: str, kwargs: dict) -> None:
    """Keyword arguments no parameter took: a TypeError naming them (llamba ignores no argument silently)."""
    if kwargs:
        names = ", ".join(repr(k) for k in list(kwargs)[:5])
        raise ParameterTypeError(f"{where}() got unexpected keyword argument{'s' if len(kwargs) > 1 else ''} "
                                 f"{names}")


def _processed_row(processor, ids: list, row) -> np.ndarray:
    """`processor(input_ids, scores)` on a float32 copy of `row`, checked: one float per vocabulary entry."""
    out = processor(np.array(ids, dtype=np.intc), np.array(row, dtype=np.float32))
    if out is None:
        raise ParameterError("a logits_processor returned None: it must return the scores (the array it was "
                             "given, changed in place or not, or a new one)")
    out = np.asarray(out, dtype=np.float32)
    if out.shape != np.shape(row):
        raise ParameterError(f"a logits_processor returned scores of shape {out.shape}, expected {np.shape(row)}")
    return out


class _ProcessedSampler:
    """A Sampler whose rows go through a llama-cpp-python logits processor first (the token ids so far: `ids`,
    which grows with each sampled token). llamba.generate.generate calls only sample_and_accept."""

    def __init__(self, sampler: Sampler, processor, ids: list):
        self.sampler, self.processor, self.ids = sampler, processor, ids
        self.params = sampler.params
        self.constraint = sampler.constraint

    def sample_and_accept(self, logits) -> int:
        t = self.sampler.sample_and_accept(_processed_row(self.processor, self.ids, logits))
        self.ids.append(t)
        return t


def _criteria_tokens(source, ids: list, criteria, last_row: list, ended: list, stats: GenStats):
    """`source`'s tokens until `criteria(input_ids, logits)` is true (llama-cpp-python's generate: checked after
    each token is sampled, with the ids evaluated so far and the row it was sampled from; that token is dropped,
    and not counted in `stats`). `last_row[0]` is kept current by the token source's on_logits; `ended[0]`
    becomes True when a criterion fired."""
    try:
        for t in source:
            if criteria(np.array(ids, dtype=np.intc), last_row[0]):
                ended[0] = True
                stats.n_gen = max(0, stats.n_gen - 1)
                return
            ids.append(t)
            yield t
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


class Llama:
    def __init__(self, model_path: str, *, n_ctx: int = 512, n_threads: int | None = None,
                 seed: int = RANDOM_SEED, vocab_only: bool = False, verbose: bool = True,
                 n_gpu_layers: int = 0, n_batch: int = 512, logits_all: bool = False,
                 tensor_split=None, main_gpu: int = 0, split_mode="layer",
                 spec: str = "none", draft_max: int = 3, draft_p_min: float = 0.0,
                 draft_model: str | None = None, chat_format: str | None = None,
                 chat_template: str | None = None, embedding: bool = False,
                 pooling_type: int = POOLING_UNSPECIFIED, n_parallel: int = 1, mtp_head: str | None = None,
                 kv_type: str | None = None, repack: bool | None = None, gemm_min_batch: int | None = None,
                 options: Options | None = None, **kwargs):
        t0 = time.perf_counter()
        _check_init_args(n_ctx, n_batch, n_threads, seed)
        # engine options (llamba.options): `options` or the environment's defaults, with the keywords given
        if options is not None and not isinstance(options, Options):
            raise ParameterTypeError(f"options must be a llamba.options.Options, got {type(options).__name__}")
        self.options = (options or Options.from_env()).with_(kv_type=kv_type, repack=repack,
                                                             gemm_min_batch=gemm_min_batch)
        self.model_path = str(model_path)
        self.verbose = verbose
        self.seed = seed
        self.gguf = GGUFFile(self.model_path)
        self.metadata = self.gguf.metadata
        if not vocab_only:  # an unsupported architecture is the first thing to report
            from llamba.models import build_config
            build_config(self.gguf)
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
        self.n_threads = set_threads(n_threads)
        self.model = None
        self.session = None
        self.last_stats: GenStats | None = None
        if draft_model is not None and not isinstance(draft_model, (str, os.PathLike)):
            # llama-cpp-python's draft_model objects (llamba.llama_speculative): prompt lookup is llamba's n-gram
            # speculation; drafts are verified exactly, so the output is unchanged
            from llamba.errors import UnsupportedError
            from llamba.llama_speculative import LlamaPromptLookupDecoding
            if not isinstance(draft_model, LlamaPromptLookupDecoding):
                raise UnsupportedError(f"draft_model: a {type(draft_model).__name__} is not supported; give a GGUF "
                                       f"path or llamba.llama_speculative.LlamaPromptLookupDecoding")
            spec, draft_max = "ngram", _int_arg("num_pred_tokens", draft_model.num_pred_tokens, lo=1,
                                                none_ok=False)
            draft_model = None
        self.spec_options = dict(spec=spec, draft_max=draft_max, draft_p_min=draft_p_min, draft_model=draft_model)
        self._prop, self._prop_key = None, None
        if not vocab_only:
            from llamba.models import build_config, load_model
            cfg = build_config(self.gguf)
            if n_ctx is None or n_ctx <= 0:
                n_ctx = cfg.n_ctx_train
            _check_context(cfg, n_ctx, logits_all, self.options.kv_dtype)
            self.model = load_model(self.gguf, n_ctx, options=self.options, n_gpu_layers=n_gpu_layers)
            if n_gpu_layers:  # GPU offload (llamba.offload); without a usable GPU: one warning, CPU
                from llamba.offload import offload_model
                offload_model(self.model, n_gpu_layers, tensor_split=tensor_split, main_gpu=main_gpu,
                              split_mode=split_mode, verbose=verbose)
            if mtp_head:  # a sidecar MTP head (llamba mtp-train): becomes model.mtp, so --spec auto/mtp use it
                from llamba.mtp_head import attach_head
                attach_head(self.model, self.gguf, mtp_head)
            self.session = Session(self.model, n_batch)
        self._n_ctx = n_ctx
        # llama-cpp-python's model kind flags: every layer recurrent (no KV cache), or recurrent and attention
        # layers mixed (e.g. Qwen3.5's Gated DeltaNet)
        rec = tuple(getattr(self.model.config, "recurrent", ()) or ()) if self.model is not None else ()
        self._is_recurrent = bool(rec) and all(rec)
        self._is_hybrid = any(rec) and not all(rec)
        self.cache = None  # a llamba.llama_cache cache (set_cache): prompt states saved and restored
        self.engine = None  # the continuous-batching scheduler (llamba.scheduler), with n_parallel > 1
        self.concurrent = False  # True: generation calls may come from several threads at once
        if self.model is not None and n_parallel is not None and int(n_parallel) > 1:  # (1: see start_engine)
            self.start_engine(int(n_parallel))
        self.embedding = bool(embedding)
        if pooling_type not in POOLING_NAMES and pooling_type != POOLING_UNSPECIFIED:
            raise LlambaError(f"pooling_type must be one of {sorted(POOLING_NAMES)} or {POOLING_UNSPECIFIED} "
                              f"(the model's), got {pooling_type!r}")
        self._pooling = pooling_type
        self.logits_all = bool(logits_all)
        self._scores = None  # (n_ctx, n_vocab) logits rows by position, allocated on first eval (see `scores`)
        self._scores_toks = None  # the cached tokens when `eval` last wrote the rows (sample() checks them)
        self._chat_opt = chat_template or chat_format  # NAME | FILE | template text; None: the model's own
        self._chat = None
        if self._chat_opt:
            self.get_chat_template()  # a bad name or file fails here, not at the first chat
        if self.model is not None:
            # LLVM's code is only needed to compile or load kernels: hand its resident pages back (llamba.kernels._jit)
            # once the kernel loads of loading (and of a first generation right after) are over
            from llamba.kernels._jit import release_llvm_pages_later
            release_llvm_pages_later()
        self.load_time = time.perf_counter() - t0
        if verbose and not vocab_only:
            c = self.model.config
            print(f"llamba: loaded {os.path.basename(self.model_path)} ({c.arch}, {c.n_layer} layers, "
                  f"n_ctx {n_ctx}) in {self.load_time:.2f} s", file=sys.stderr)

    def start_engine(self, n_parallel: int, step_tokens: int | None = None, spare_core_rows: int = 0):
        """Serve generation calls through the batching engine: up to n_parallel sequences decode together, over
        one shared KV pool of n_ctx slots (each sequence may grow to n_ctx while the pool has room)."""
        from llamba.scheduler import Engine
        self._need_model()
        if self.engine is not None:
            return
        spec = self.spec_options["spec"]
        if spec == "auto":
            spec = "mtp" if getattr(self.model, "mtp", None) is not None else "none"
        if spec == "draft":
            if n_parallel == 1:
                return  # a draft model keeps its own single-sequence cache: the one-caller path serves it
            raise LlambaError("a draft model (--spec draft) serves one sequence at a time; use --spec mtp or "
                              "ngram with --parallel > 1")
        self.engine = Engine(self.model, n_ctx=self._n_ctx, n_parallel=n_parallel,
                             step_tokens=step_tokens or max(32, min(64, self.session.n_batch or 64)), spec=spec,
                             draft_max=self.spec_options["draft_max"], draft_p_min=self.spec_options["draft_p_min"],
                             is_eog=self.tokenizer.is_eog, lock=self.session.lock, n_threads=self.n_threads,
                             spare_core_rows=spare_core_rows)
        self.session.executor = self.engine  # model calls run on the engine's thread when it has one
        # the session's users take the engine's lock (the same lock, parked for by consumers on the engine's
        # thread instead of blocking it: scheduler.HostedLock)
        self.session.lock = self.engine.lock
        self.concurrent = True

    @property
    def stream_usage(self) -> bool:
        """True when streamed completions end with a chunk carrying `usage` (with the batching engine)."""
        return self.engine is not None

    @property
    def engine_stats(self) -> dict | None:
        """Counters of the batching engine (requests, tokens, queue, batch rows, drafts), or None."""
        return self.engine.snapshot() if self.engine is not None else None

    def generate_batch(self, prompts, max_tokens: int | None = 16, temperature: float = 0.8, top_k: int = 40,
                       top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0, repeat_penalty: float = 1.0,
                       frequency_penalty: float = 0.0, presence_penalty: float = 0.0, seed: int | None = None,
                       logit_bias=None, stop_at_eog: bool = True, n_parallel: int | None = None) -> list[list[int]]:
        """Offline batch generation, in the spirit of vLLM's `LLM.generate(prompts, sampling_params)`: every
        prompt (token ids, or text tokenized with BOS) runs as its own sequence through the batching scheduler,
        up to n_parallel at once (default: the engine's, else 8); returns the generated token ids per prompt,
        in order. Each output equals what the prompt gives alone (batch invariance)."""
        self._need_model()
        from llamba.scheduler import Engine
        reqs_toks = [self.tokenize(p, add_bos=True) if isinstance(p, (str, bytes)) else self._ids(p, "prompts")
                     for p in prompts]
        sampler = self.make_sampler(temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
                                    frequency_penalty, presence_penalty, seed, logit_bias)
        if self.engine is not None and n_parallel is None:
            reqs = [self.engine.submit(t, sampler.params, max_tokens, stop_at_eog=stop_at_eog) for t in reqs_toks]
            return [r.tokens() for r in reqs]
        eng = Engine(self.model, n_ctx=self._n_ctx, n_parallel=n_parallel or 8, is_eog=self.tokenizer.is_eog,
                     lock=self.session.lock)
        reqs = [eng.submit(t, sampler.params, max_tokens, stop_at_eog=stop_at_eog) for t in reqs_toks]
        eng.run_until_done()
        return [r.tokens() for r in reqs]

    def _engine_tokens(self, toks, sampler, max_tokens, stats, on_logits, stop_at_eog: bool = True):
        """generate()'s token stream, from the batching engine (the request is cancelled if the consumer stops)."""
        req = self.engine.submit(toks, sampler.params, max_tokens, stop_at_eog=stop_at_eog,
                                 want_rows=on_logits is not None, constraint=sampler.constraint)
        stats.n_prompt = len(toks)
        try:
            for t in req:
                stats.n_reused = req.n_cached
                stats.n_prompt = len(toks) - req.n_cached
                stats.n_gen += 1
                if on_logits is not None:
                    on_logits(t.row)
                yield t.id
        finally:
            if req.finish_reason is None:
                req.cancel()

    # ---- properties mirroring llama-cpp-python
    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self.tokenizer.n_vocab

    def n_embd(self) -> int:
        self._need_model()
        return self.model.config.n_embd

    def pooling_type(self) -> int:
        """The pooling of `embed`: the one given to the constructor, else the model's `{arch}.pooling_type`, else
        none (one embedding per token), as llama.cpp resolves it."""
        if self._pooling != POOLING_UNSPECIFIED:
            return self._pooling
        v = self.metadata.get(f"{self.metadata.get('general.architecture', '')}.pooling_type")
        return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else POOLING_NONE

    def token_bos(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else -1

    def token_eos(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else -1

    def token_nl(self) -> int:
        """The newline token (llama.cpp's linefeed id), -1 when the vocabulary has none."""
        nl = self.tokenizer.nl_id
        return int(nl) if nl is not None else -1

    def set_seed(self, seed: int) -> None:
        """The seed of later generations that give no `seed` of their own (llama-cpp-python's set_seed)."""
        try:
            SamplingParams(seed=seed)
        except LlambaError as e:
            raise ParameterError(f"seed: {e}") from None
        self.seed = seed

    def set_cache(self, cache) -> None:
        """Save the state after each completion in `cache` (a llamba.llama_cache LlamaRAMCache / LlamaDiskCache,
        keyed by the prompt and completion token ids) and, before a completion, restore the cached state sharing
        the longest prefix with its prompt when that is longer than what this Llama's cache already holds
        (llama-cpp-python's set_cache); None: no cache. The one-caller path only: with n_parallel > 1 the batching
        engine keeps its own prefix cache, and set_cache raises a ParameterError."""
        if cache is not None:
            if self.engine is not None:
                raise ParameterError("set_cache is not supported with the batching engine (n_parallel > 1): it "
                                     "keeps a prefix cache of its own")
            if not all(hasattr(cache, m) for m in ("__getitem__", "__setitem__")):
                raise ParameterTypeError(f"set_cache expects a cache such as llamba.LlamaRAMCache, got "
                                         f"{type(cache).__name__}")
        self.cache = cache

    longest_token_prefix = staticmethod(longest_token_prefix)

    def _cache_restore(self, tokens) -> None:
        """Before a generation on the default sequence: load the cached state with the longest common prefix with
        `tokens` if it shares more of them than the sequence does (llama-cpp-python's rule)."""
        try:
            item = self.cache[tokens]
        except KeyError:
            return
        if longest_token_prefix(item.input_ids.tolist(), tokens) > longest_token_prefix(self.session.tokens, tokens):
            self.load_state(item)

    @property
    def n_tokens(self) -> int:
        return len(self.session.tokens) if self.session else 0

    # ---- tokens
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text`: bytes (llama-cpp-python) or a str (encoded as UTF-8)."""
        if not isinstance(text, (bytes, bytearray, memoryview, str)):
            raise ParameterTypeError(f"tokenize expects bytes or str, got {type(text).__name__}")
        return self.tokenizer.encode(text if isinstance(text, str) else bytes(text), add_bos=add_bos, special=special)

    def detokenize(self, tokens, prev_tokens=None, special: bool = False) -> bytes:
        """Bytes of `tokens`; like llama-cpp-python, one leading space after a leading BOS is dropped."""
        tokens = _token_ids(tokens, self.n_vocab())
        out = b"".join(self.tokenizer.token_to_piece(t, special=special) for t in tokens)
        if tokens and tokens[0] == self.tokenizer.bos_id and out[:1] == b" ":
            out = out[1:]
        return out

    def reset(self):
        if self.session:
            self.session.reset()

    def _need_model(self):
        if self.model is None:
            raise LlambaError("this Llama was created with vocab_only=True: it can only tokenize")

    def n_vocab_ids(self) -> int:
        """How many token ids the model can take (ids 0 .. n_vocab_ids() - 1): the vocabulary's size, or the
        embedding rows when the loaded model has fewer. Token arguments are checked against it."""
        n = self.n_vocab()
        return min(n, self.model.config.n_vocab) if self.model is not None else n

    def _ids(self, tokens, what: str = "tokens") -> list[int]:
        return _token_ids(tokens, self.n_vocab_ids(), what)

    # ---- evaluation
    def eval_logits(self, tokens) -> np.ndarray:
        """Logits (len(tokens), n_vocab) float32 of every position, from an empty cache."""
        self._need_model()
        toks = self._ids(tokens)
        self.session.reset()
        self.model.check_room(len(toks))
        return self.session.eval(toks, logits="all")

    def eval(self, tokens):
        """Append tokens to the cache (llama-cpp-python's `eval`) and return their logits: every row with
        `logits_all=True`, else only the last token's (shape (1, n_vocab); the other rows are not computed).
        They are also kept in `scores`."""
        self._need_model()
        toks = self._ids(tokens)
        if not toks:
            return np.empty((0, self.n_vocab()), dtype=np.float32)
        n0 = self.n_tokens
        rows_ok = n0 == 0 or self._scores_toks == self.session.tokens  # the rows before n0 are this sequence's
        out = self.session.eval(toks, logits="all" if self.logits_all else "last")
        sc = self._scores_buf()
        if self.logits_all:
            sc[n0:n0 + len(toks)] = out
        else:
            sc[0] = out[-1]
        self._scores_toks = list(self.session.tokens) if rows_ok or not self.logits_all else None
        return out

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_eta: float = 0.1,
               mirostat_tau: float = 5.0, penalize_nl: bool = True, logits_processor=None, grammar=None,
               idx: int | None = None) -> int:
        """A token sampled from the logits after cache position `idx` (default: the last evaluated one), as
        llama-cpp-python's `sample` after `eval`; the token is not added to the cache. Other positions than the
        last need logits_all=True and rows written by `eval`. The penalties see the cached tokens up to `idx`;
        `logits_processor` gets them and a copy of the row first; a `grammar` constrains the token from its start.
        The seed: this Llama's (set_seed)."""
        self._need_model()
        _check_unsupported(tfs_z, mirostat_mode, mirostat_tau, mirostat_eta, penalize_nl)
        processor = _hook("logits_processor", logits_processor)
        toks = list(self.session.tokens)
        n = len(toks)
        if n == 0:
            raise LlambaError("sample: nothing is evaluated yet; call eval(tokens) first")
        idx = n - 1 if idx is None else _int_arg("idx", idx, lo=0, none_ok=False)
        if idx >= n or (idx != n - 1 and not self.logits_all):
            more = "" if self.logits_all else "; other positions than the last need logits_all=True"
            raise ParameterError(f"sample: idx {idx} is not an evaluated position with logits (the cache holds {n} "
                                 f"tokens{more})")
        if self._scores is not None and self._scores_toks == toks:
            row = self._scores[idx if self.logits_all else 0]
        elif idx == n - 1 and self.model.can_truncate(n - 1):
            with self.session.lock:  # the last position's logits again (the kernels are row-exact)
                self.session.rollback(n - 1)
                row = self.session.eval(toks[-1:], logits="last")[-1]
            self._scores_buf()[idx if self.logits_all else 0] = row
            if not self.logits_all:
                self._scores_toks = toks
        else:
            raise ParameterError(f"sample: the logits of position {idx} are not kept; evaluate the tokens with eval() "
                                 f"first")
        ids = toks[:idx + 1]
        if processor is not None:
            row = _processed_row(processor, ids, row)
        sampler = self.make_sampler(temp, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
                                    presence_penalty, None)
        sampler.accept_many(ids)
        constraint = self.compile_constraint(None, grammar)
        if constraint is not None:
            sampler.constraint = constraint.matcher()
        return int(sampler.sample(row))

    def _scores_buf(self) -> np.ndarray:
        if self._scores is None:
            # logits_all: (n_ctx, n_vocab), virtual memory until rows are written; else one row
            self._scores = np.empty((self._n_ctx if self.logits_all else 1, self.n_vocab()), dtype=np.float32)
        return self._scores

    @property
    def scores(self) -> np.ndarray:
        """Logits by cache position, as llama-cpp-python's `scores` (n_ctx, n_vocab): with logits_all=True row i
        holds the logits after token i; otherwise only the last evaluated row is kept (memory: one row) and every
        row of this read-only view shows it, so `scores[n_tokens - 1]` is the latest logits either way."""
        self._need_model()
        buf = self._scores_buf()
        if self.logits_all:
            return buf
        v = np.lib.stride_tricks.as_strided(buf, shape=(self._n_ctx, buf.shape[1]), strides=(0, buf.strides[1]))
        v.flags.writeable = False
        return v

    @property
    def _input_ids(self) -> np.ndarray:
        return np.array(self.session.tokens if self.session else [], dtype=np.intc)

    @property
    def input_ids(self) -> np.ndarray:
        return self._input_ids

    def compile_constraint(self, response_format=None, grammar=None):
        """The compiled constraint (llamba.constrain.Constraint, cached by kind and text) for an OpenAI
        `response_format` and/or a llama.cpp `grammar` (as create_completion takes them), or None when they
        constrain nothing. Invalid -> GrammarError (a ParameterError) with a one-line message, so a front end can
        check a request before generating."""
        spec = constraint_spec(response_format, grammar)
        if spec is None:
            return None
        from llamba.constrain import compile_constraint
        return compile_constraint(self.tokenizer, *spec)

    def make_sampler(self, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                     typical_p: float = 1.0, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
                     presence_penalty: float = 0.0, seed: int | None = None, logit_bias=None) -> Sampler:
        """A llamba.sampling.Sampler for these parameters (create_completion's names and defaults; `seed` None: this
        Llama's seed) over this Llama's context; its `.params` (SamplingParams) is what the batching engine's
        `submit` takes. Bad values -> ParameterError; logit_bias ids are checked like token ids."""
        s = self.seed if seed is None else seed
        logit_bias = _logit_bias(logit_bias, self.n_vocab_ids())
        params = SamplingParams(temp=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                                repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                                presence_penalty=presence_penalty, seed=s, logit_bias=logit_bias)
        return Sampler(params, n_ctx=self._n_ctx)

    def speculative_proposer(self):
        """The speculative-decoding proposer of this Llama's `spec` options (llamba.speculative), or None for
        spec="none"; built once and kept (it holds the MTP / draft-model cache state). A bad choice (e.g. spec="mtp"
        on a model without MTP layers) raises here, so a front end can call it to fail before any output."""
        if self._prop_key != self.spec_options:
            from llamba.speculative import make_proposer
            self._prop = make_proposer(self, **self.spec_options)
            self._prop_key = dict(self.spec_options)
        return self._prop

    @property
    def spec_stats(self):
        """Speculative-decoding statistics of the last generation (SpecStats), or None."""
        st = self.last_stats
        return st.spec if st and st.spec else None

    def generate(self, tokens, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor=None, stopping_criteria=None, grammar=None,
                 seed: int | None = None, max_tokens: int | None = None, logit_bias=None, response_format=None,
                 **kwargs) -> Iterator[int]:
        """Yield sampled token ids after `tokens` (reusing the cached prefix). Like llama-cpp-python it does
        not stop at end-of-generation tokens by itself unless `max_tokens` runs out or the context is full, or a
        `stopping_criteria` returns True (see StoppingCriteriaList). `logits_processor` (LogitsProcessorList)
        changes each row before sampling (one caller only: with the batching engine it is a ParameterError);
        `grammar` / `response_format` constrain the tokens (create_completion's). The arguments are checked at
        the call, before the first token."""
        self._need_model()
        _check_kwargs("generate", kwargs)
        _check_unsupported(tfs_z, mirostat_mode, mirostat_tau, mirostat_eta, penalize_nl)
        processor, criteria = self._hooks(logits_processor, stopping_criteria)
        if reset is False:
            pass  # prefix reuse is automatic
        sampler = self.make_sampler(temp, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty,
                                    presence_penalty, seed, logit_bias)
        constraint = self.compile_constraint(response_format, grammar)
        if constraint is not None:
            sampler.constraint = constraint.matcher()
        toks = self._ids(tokens)
        max_tokens = _int_arg("max_tokens", max_tokens)
        if not toks:
            raise ParameterError("the prompt is empty: give at least one token")
        return self._generate(toks, sampler, max_tokens, processor, criteria)

    def _generate(self, toks, sampler, max_tokens, processor, criteria):
        stats = GenStats()
        self.last_stats = stats
        last, on_logits = self._criteria_rows(criteria, None)
        if self.engine is not None:
            source = self._engine_tokens(toks, sampler, max_tokens, stats, on_logits, stop_at_eog=False)
        else:
            source = self._local_tokens(toks, sampler, max_tokens, stats, None, processor, criteria, on_logits)
        if criteria is not None:
            source = _criteria_tokens(source, list(toks), criteria, last, [False], stats)
        yield from source

    def _local_tokens(self, toks, sampler, max_tokens, stats, is_eog, processor, criteria, on_logits):
        """Generated ids on the one-caller path (the session), the sampler wrapped for a logits processor."""
        sampler.accept_many(toks)
        proposer = self.speculative_proposer()
        if processor is not None or criteria is not None:
            proposer = None  # (a processor / criterion sees every row in order: no speculative drafts)
        if processor is not None:
            sampler = _ProcessedSampler(sampler, processor, list(toks))
        return generate(self.session, toks, sampler, max_tokens, stats, is_eog, proposer, on_logits)

    def _hooks(self, logits_processor, stopping_criteria):
        """The checked logits_processor / stopping_criteria arguments (None when not given). A logits processor
        needs the one-caller path: the batching engine samples on its own thread from SamplingParams only."""
        processor = _hook("logits_processor", logits_processor)
        criteria = _hook("stopping_criteria", stopping_criteria)
        if processor is not None and self.engine is not None:
            raise ParameterError("logits_processor is not supported with the batching engine (n_parallel > 1): its "
                                 "sampling runs on the engine's thread; use logit_bias / grammar, or a Llama with "
                                 "n_parallel=1")
        return processor, criteria

    @staticmethod
    def _criteria_rows(criteria, on_logits):
        """([last row], the token source's on_logits) for stopping criteria: each row a token is sampled from is
        kept (a float32 copy) for the criteria, and passed on to `on_logits` (a logprob recorder's)."""
        if criteria is None:
            return None, on_logits
        last = [None]

        def rows(row, _then=on_logits):
            last[0] = np.array(row, dtype=np.float32)
            if _then is not None:
                _then(row)
        return last, rows

    # ---- cache state (llama-cpp-python's save_state / load_state)
    def save_state(self) -> "LlamaState":
        """A copy of the evaluated tokens and the cache (KV rows, recurrent states) and `scores`, to restore
        later with `load_state` (here or in another Llama of the same model), e.g. to reuse a long prompt."""
        self._need_model()
        st = self.model.get_state()
        size = sum(a.nbytes for pair in st["kv"].values() for a in pair)
        size += sum(a.nbytes for pair in st.get("rec", {}).values() for a in pair)
        n = self.n_tokens
        scores = None if self._scores is None else self._scores[:n if self.logits_all else 1].copy()
        return LlamaState(np.array(self.session.tokens, dtype=np.intc), scores, n, st, size, self.seed,
                          os.path.basename(self.model_path))

    def load_state(self, state: "LlamaState") -> None:
        self._need_model()
        if not isinstance(state, LlamaState):
            raise LlambaError(f"load_state expects a LlamaState from save_state, got {type(state).__name__}")
        _check_state(state, self._n_ctx, self.n_vocab())
        self.model.set_state(state.llama_state)
        self.session.tokens = [int(t) for t in state.input_ids[:state.n_tokens]]
        if state.scores is not None:
            buf = self._scores_buf()
            rows = min(len(state.scores), len(buf))
            buf[:rows] = state.scores[:rows]
        self._scores_toks = None  # (a saved state's rows are not known to be current: sample() recomputes)
        self.seed = state.seed
        self._prop, self._prop_key = None, None  # a speculative proposer's own caches start over

    # ---- embeddings
    def embed(self, input, normalize: bool = False, truncate: bool = True, return_count: bool = False):
        """Embeddings of a string or a list of strings, as llama-cpp-python's `embed`: the model's final hidden
        states after the output norm (llama.cpp's embeddings of a decoder model), pooled by `pooling_type()` --
        none: one vector per token; mean; cls: the first token's; last: the last token's -- and L2-normalized
        with `normalize`. Each input is tokenized like `tokenize` (BOS added by the model's rule) and cut to
        n_batch tokens (`truncate`, else a longer input is an error). Needs `Llama(..., embedding=True)`."""
        self._need_model()
        if not self.embedding:
            raise RuntimeError("Llama model must be created with embedding=True to call this method")
        pooling = self.pooling_type()
        if pooling not in (POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST):
            raise LlambaError(f"pooling type {POOLING_NAMES.get(pooling, pooling)} is not supported for embeddings "
                              f"(supported: none, mean, cls, last)")
        if not isinstance(input, (str, list, tuple)):
            raise ParameterTypeError(f"embed expects a string or a list of strings, got {type(input).__name__}")
        inputs = [input] if isinstance(input, str) else list(input)
        n_batch = min(self.session.n_batch or 512, self._n_ctx)  # llama-cpp-python: n_batch, at most n_ctx
        data, total = [], 0
        try:
            for text in inputs:
                if not isinstance(text, str):
                    raise LlambaError(f"embed: inputs must be strings, got {type(text).__name__}")
                toks = self.tokenize(text)  # str: lone surrogates encode as the tokenizer does
                if truncate:
                    toks = toks[:n_batch]
                if len(toks) > n_batch:
                    raise ValueError(f"Requested tokens ({len(toks)}) exceed batch size of {n_batch}")
                if not toks:
                    raise LlambaError("embed: an input has no tokens (empty text); give some text")
                total += len(toks)
                with self.session.lock:  # (the default sequence and model.hidden: no step in between)
                    self.session.reset()
                    self.session.eval(toks, logits="none", keep_hidden=True)
                    h = np.asarray(self.model.hidden, dtype=np.float32)
                if pooling == POOLING_NONE:
                    emb = [_normalized(r) if normalize else r.tolist() for r in h]
                else:
                    v = h.mean(axis=0, dtype=np.float32) if pooling == POOLING_MEAN else \
                        h[0] if pooling == POOLING_CLS else h[-1]
                    emb = _normalized(v) if normalize else v.tolist()
                data.append(emb)
        finally:
            self.session.reset()
            self.model.hidden = None
        out = data[0] if isinstance(input, str) else data
        return (out, total) if return_count else out

    def create_embedding(self, input, model: str | None = None) -> dict:
        """OpenAI-style embeddings response for a string or a list of strings (llama-cpp-python's
        `create_embedding`: `embed` without normalization)."""
        inputs = input if isinstance(input, list) else [input]
        embeds, total = self.embed(inputs, return_count=True)
        return {"object": "list", "data": [{"object": "embedding", "embedding": e, "index": i}
                                           for i, e in enumerate(embeds)],
                "model": model if model is not None else self.model_path,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    # ---- completions
    def create_completion(self, prompt, suffix=None, max_tokens: int | None = 16, temperature: float = 0.8,
                          top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0, logprobs=None,
                          echo: bool = False, stop=None, frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0, repeat_penalty: float = 1.0, top_k: int = 40,
                          stream: bool = False, seed: int | None = None, logit_bias=None, grammar=None,
                          response_format=None, *, tfs_z: float = 1.0, mirostat_mode: int = 0,
                          mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: str | None = None,
                          stopping_criteria=None, logits_processor=None, special: bool = False,
                          keep_scores: bool = True, **kwargs):
        """A text completion, as llama-cpp-python's. `grammar` (llama.cpp GBNF text or a LlamaGrammar-like
        object) or `response_format` ({"type": "json_object"} / {"type": "json_schema", "json_schema": {"schema":
        {...}}}) constrain the output (llamba.constrain); an invalid one raises GrammarError (a ParameterError).
        The text comes from `stream_text`. `keep_scores=False` (llamba's, for serving): `logprobs` work without
        logits_all and leave `scores` untouched (with True, llama-cpp-python's rule: logprobs need
        logits_all=True, and the evaluated rows are kept in `scores`).
        llama-cpp-python's `logits_processor` (LogitsProcessorList: each row changed before sampling; not with the
        batching engine) and `stopping_criteria` (StoppingCriteriaList: the generation ends, finish_reason "stop",
        when one returns True) work as there; `model` names the model in the response; `special`: special-token
        text in the prompt is parsed as the special token. tfs_z and mirostat are not implemented (only their
        off values, 1.0 and 0, are accepted: anything else is an UnsupportedError), nor is `suffix`
        (fill-in-the-middle); an unknown keyword is a TypeError."""
        self._need_model()
        _check_kwargs("create_completion", kwargs)
        _check_unsupported(tfs_z, mirostat_mode, mirostat_tau, mirostat_eta)
        if suffix is not None and suffix != "":
            from llamba.errors import UnsupportedError
            raise UnsupportedError("suffix (fill-in-the-middle) is not supported by llamba")
        model_name = self._model_name(model)
        hooks = self._hooks(logits_processor, stopping_criteria)
        constraint = self.compile_constraint(response_format, grammar)
        if logprobs is not None:
            if not self.logits_all and keep_scores:  # llama-cpp-python's rule and message
                raise ValueError("logprobs is not supported for models created with logits_all=False")
            logprobs = _int_arg("logprobs", logprobs, lo=0, hi=MAX_LOGPROBS)
        if isinstance(prompt, (bytes, str)):
            toks = self.tokenize(prompt, add_bos=True, special=special)
            text = prompt.encode("utf-8", "surrogatepass") if isinstance(prompt, str) else prompt
            prompt_text = text.decode("utf-8", errors="replace")  # lone surrogates -> U+FFFD
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            toks = self._ids(prompt, "prompt")
            prompt_text = self.detokenize(toks).decode("utf-8", errors="replace")
        else:
            raise ParameterTypeError(f"prompt must be a string, bytes or a list of token ids, got "
                                     f"{type(prompt).__name__}")
        if not toks:
            raise LlambaError("the prompt is empty: give at least one token")
        if len(toks) >= self._n_ctx:
            from llamba.errors import ContextOverflowError
            raise ContextOverflowError(f"the prompt has {len(toks)} tokens but the context holds {self._n_ctx}; "
                                       f"raise n_ctx or shorten the prompt")
        max_tokens = _int_arg("max_tokens", max_tokens)
        if max_tokens is None or max_tokens <= 0:
            max_tokens = self._n_ctx - len(toks)
        stops = _stop_list(stop)
        cid = f"cmpl-{uuid.uuid4()}"
        created = int(time.time())
        gen_toks: list[int] | None = [] if logprobs is not None else None
        rec = LogprobRecorder(logprobs) if logprobs is not None and stream else None
        stats = GenStats()
        it = self.stream_text(toks, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              typical_p=typical_p, repeat_penalty=repeat_penalty,
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, seed=seed,
                              logit_bias=logit_bias, stop=stops, constraint=constraint, recorder=rec, stats=stats,
                              out_tokens=gen_toks, logits_processor=hooks[0], stopping_criteria=hooks[1])
        if stream:
            return self._stream_chunks(it, cid, created, prompt_text if echo else None, rec, toks, len(prompt_text),
                                       stats, model_name)
        pieces, finish = [], "length"
        for piece, fin in it:
            pieces.append(piece)
            if fin:
                finish = fin
        text = "".join(pieces)
        if echo:
            text = prompt_text + text
        st = stats
        lp = None
        if logprobs is not None:
            with self.session.lock:  # (re-evaluates on the default sequence)
                # positions the generation evaluated: with the engine (another sequence than `session`), the prompt
                # and every generated token but the last sampled one (an end-of-generation token is never kept)
                n_ev = None if self.engine is None else \
                    len(toks) + len(gen_toks) - (0 if getattr(stats, "ended_eog", False) else 1)
                lp = self._completion_logprobs(prompt, toks, gen_toks, logprobs, echo, keep_scores, n_ev)
        return {
            "id": cid, "object": "text_completion", "created": created, "model": model_name,
            "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}],
            "usage": _usage(len(toks), st, self.engine is not None),
        }

    def _model_name(self, model) -> str:
        """The `model` of a response: the one given (llama-cpp-python's `model=`), else the model's path."""
        if model is None:
            return self.model_path
        if not isinstance(model, str):
            raise ParameterTypeError(f"model must be a string (the name in the response), got {_show(model)}")
        return model

    def _stream_chunks(self, it, cid, created, echo_text, rec=None, prompt_tokens=None, prompt_len=0, stats=None,
                       model_name=None):
        try:
            if echo_text:
                yield self._chunk(cid, created, echo_text, None, model_name=model_name)
            for piece, fin in it:
                if piece or fin:
                    lp = completion_logprobs_chunk(self.detokenize, rec.take(), prompt_tokens, prompt_len) \
                        if rec else None
                    c = self._chunk(cid, created, piece, fin, lp, model_name)
                    if fin and self.stream_usage and stats is not None:  # serving: usage on the last chunk
                        c["usage"] = _usage(len(prompt_tokens), stats, True)
                    yield c
        finally:
            it.close()

    def _chunk(self, cid, created, text, finish, logprobs=None, model_name=None):
        return {"id": cid, "object": "text_completion", "created": created,
                "model": self.model_path if model_name is None else model_name,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}

    @staticmethod
    def logits_to_logprobs(logits, axis: int = -1) -> np.ndarray:
        """log-softmax in float32, computed as llama-cpp-python's `Llama.logits_to_logprobs`
        (llamba.textstream.logits_to_logprobs)."""
        return logits_to_logprobs(logits, axis)

    def _completion_logprobs(self, prompt, prompt_tokens, completion_tokens, n: int, echo: bool,
                             keep_scores: bool = True, n_evaluated: int | None = None) -> dict:
        """The OpenAI `logprobs` object of a finished completion, laid out as llama-cpp-python lays it out (its
        offsets, its BOS handling, null first entry with echo). The logits of every position come from a batched
        evaluation of prompt + completion, n_batch rows at a time (bit-identical to the rows the generation sampled
        from: the batched path is row-exact); they are also left in `scores` (keep_scores). Like llama-cpp-python,
        entry i pairs token i with the i-th evaluated row (with echo on a model without BOS that row is the one
        after the token, not before it)."""
        full = list(prompt_tokens) + list(completion_tokens)
        # the positions llama.cpp evaluated: not the last sampled token when generation stopped on the length
        if n_evaluated is None:
            n_evaluated = len(self.session.tokens)
        n_eval = min(len(full), max(n_evaluated, len(prompt_tokens)))
        text_offset = 0 if echo else len(prompt)
        token_offset = 0 if echo else len(prompt_tokens) - 1
        bos = self.token_bos()
        if echo:
            all_tokens = list(prompt_tokens[1 if prompt_tokens and prompt_tokens[0] == bos else 0:]) + \
                list(completion_tokens)
        else:
            all_tokens = list(completion_tokens)
        # per entry idx (row token_offset + idx): (its token's logprob, [(id, logprob)] top n), row by row
        red: list = []
        self.session.reset()
        self.model.check_room(n_eval)
        nb = self.session.n_batch or n_eval
        n_need = min(len(all_tokens), max(0, n_eval - token_offset))
        for a in range(0, n_eval, nb):
            rows = self.session.eval(full[a:min(a + nb, n_eval)], logits="all")
            if keep_scores:
                self._scores_buf()[a:a + len(rows)] = rows
            for r in range(max(a, token_offset), a + len(rows)):
                idx = r - token_offset
                if idx >= n_need:
                    break
                lp = self.logits_to_logprobs(rows[r - a])
                red.append((float(lp[all_tokens[idx]]), top_n_logprobs(lp, n)))
        strs = [self.detokenize([t], prev_tokens=all_tokens[:i]).decode("utf-8", errors="ignore")
                for i, t in enumerate(all_tokens)]
        offsets, token_lps, tokens, tops = [], [], [], []
        for idx, (tok, tok_str, (lp_tok, top_ids)) in enumerate(zip(all_tokens, strs, red)):
            if tok == bos:
                continue
            offsets.append(text_offset + len(self.detokenize(all_tokens[:idx]).decode("utf-8", errors="ignore")))
            tokens.append(tok_str)
            token_lps.append(lp_tok)
            top = {self.detokenize([i], prev_tokens=all_tokens[:idx]).decode("utf-8", errors="ignore"): v
                   for i, v in top_ids}
            top[tok_str] = lp_tok
            tops.append(top)
        if echo and all_tokens:
            token_lps[0] = None
            tops[0] = None
        return {"tokens": tokens, "text_offset": offsets, "token_logprobs": token_lps, "top_logprobs": tops}

    def stream_text(self, tokens, max_tokens: int | None = None, *, temperature: float = 0.8, top_k: int = 40,
                    top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0, repeat_penalty: float = 1.0,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0, seed: int | None = None,
                    logit_bias=None, stop=None, constraint=None, recorder: LogprobRecorder | None = None,
                    stats: GenStats | None = None, keep_special=None, out_tokens: list[int] | None = None,
                    logits_processor=None, stopping_criteria=None):
        """Generate after the prompt token ids `tokens` and yield (text_piece, finish_reason | None): the text
        stream (llamba.textstream.stream_text) that completions, chat completions, the chat REPL and the CLI all
        read. Text that could be the start of a `stop` string is held back; the last item carries "stop" or
        "length". The tokens come from the batching engine when it runs, else from this Llama's sequence (with its
        speculative proposer). A generator: nothing runs, and sampling parameters are not checked, before the first
        `next()`; closing it ends the generation. The prompt is not checked here (create_completion and
        chat_stream check it first).
        `constraint`: a compiled llamba.constrain.Constraint (see compile_constraint). `recorder` (a
        textstream.LogprobRecorder): each generated token's logprobs are recorded, and after each item
        `recorder.take()` gives the tokens whose text has started to come out (tokens of a cut stop string or the
        end-of-generation token never do). `keep_special`: ids of special tokens whose text is kept (tool-call
        markers such as [TOOL_CALLS]). `stop`: a string or a list of strings (not checked here). `stats`: the
        GenStats to fill (also `last_stats`). `out_tokens`: a list that receives the generated ids
        (end-of-generation tokens excepted).
        `logits_processor` / `stopping_criteria`: llama-cpp-python's (LogitsProcessorList, StoppingCriteriaList;
        checked here, at the first `next()`): a processor changes each row before sampling (the one-caller path
        only: with the batching engine, a ParameterError); a criterion that returns True ends the text with
        finish_reason "stop". With a cache set (set_cache), the longest cached prefix state is restored first and
        the state after the generation is saved under the prompt and completion ids."""
        stops = [stop] if isinstance(stop, str) else list(stop or ())  # (checked by the callers: _stop_list)
        processor, criteria = self._hooks(logits_processor, stopping_criteria)
        sampler = self.make_sampler(temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
                                    frequency_penalty, presence_penalty, seed, logit_bias)
        if constraint is not None:
            sampler.constraint = constraint.matcher()
        stats = GenStats() if stats is None else stats  # per call (several threads may generate at once)
        self.last_stats = stats
        last, on_logits = self._criteria_rows(criteria, recorder.row if recorder is not None else None)
        cache = self.cache if self.engine is None else None
        if self.engine is not None:
            source = self._engine_tokens(tokens, sampler, max_tokens, stats, on_logits)
        else:
            if cache is not None:
                self._cache_restore(list(tokens))
            source = self._local_tokens(tokens, sampler, max_tokens, stats, self.tokenizer.is_eog, processor,
                                        criteria, on_logits)
        ended = [False]
        if criteria is not None:
            source = _criteria_tokens(source, list(tokens), criteria, last, ended, stats)
        gen = out_tokens if out_tokens is not None or cache is None else []
        yield from stream_text(source, self.tokenizer, stops, recorder=recorder, keep_special=keep_special,
                               stats=stats, out_tokens=gen, end_reason=lambda: "stop" if ended[0] else "length")
        if cache is not None:  # (a finished generation: llama-cpp-python saves then, keyed by prompt + completion)
            cache[list(tokens) + list(gen)] = self.save_state()

    # ---- chat
    def get_chat_template(self):
        """The ChatTemplate used for chat: the one set with set_chat_template, else `chat_template`/`chat_format`
        if given, else the model's own."""
        if self._chat is None:
            from llamba.chat import ChatTemplate
            self._chat = ChatTemplate.for_model(self.metadata, self.tokenizer, self._chat_opt)
        return self._chat

    def set_chat_template(self, template) -> None:
        """Use `template` for chat from now on: a llamba.chat.ChatTemplate, or what the `chat_template` argument
        takes (a built-in NAME such as "gemma", a FILE, or template text); None: back to the constructor's choice.
        A bad name or file fails here."""
        if template is None or not isinstance(template, str):
            self._chat = template
            if template is None:
                self.get_chat_template()
            return
        from llamba.chat import ChatTemplate
        self._chat = ChatTemplate.for_model(self.metadata, self.tokenizer, template)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None, tokenize: bool = False,
                            **kwargs):
        """Render `messages` (HF `apply_chat_template`); `tokenize=True` returns the prompt token ids."""
        text = self.get_chat_template().render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                               **kwargs)
        if not tokenize:
            return text
        from llamba.chat import encode_chat_prompt
        return encode_chat_prompt(self.tokenizer, text)

    def create_chat_completion(self, messages, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False, stop=None,
                               seed: int | None = None, max_tokens: int | None = None,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               repeat_penalty: float = 1.0, logit_bias=None, tools=None, tool_choice=None,
                               response_format=None, chat_template_kwargs: dict | None = None,
                               logprobs: bool | None = None, top_logprobs: int | None = None,
                               parallel_tool_calls: bool | None = None, n: int | None = None, *,
                               functions=None, function_call=None, tfs_z: float = 1.0, mirostat_mode: int = 0,
                               mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: str | None = None,
                               logits_processor=None, stopping_criteria=None, grammar=None, **kwargs):
        """OpenAI-style chat completion (a `chat.completion` dict, or `chat.completion.chunk` dicts when
        streaming), like llama-cpp-python. `chat_template_kwargs` (e.g. {"enable_thinking": False};
        `enable_thinking=` also works) go to the template; `response_format` (and `grammar=`) constrain the output
        (see create_completion).
        `tools` / `tool_choice` ("auto", "none", "required", {"type": "function", "function": {"name": N}}) /
        `parallel_tool_calls` (llamba.tools): the tools are rendered for the chat template's tool-call format and
        the answer is parsed into `message.tool_calls` (streamed: `delta.tool_calls`) with finish_reason
        "tool_calls"; "required" or a named function constrain the answer to valid calls. Invalid -> ToolError.
        `n`: that many choices, each its own generation (choice j samples with seed + j, as completions do).
        `logprobs=True` (with `top_logprobs` alternatives per token, default 0) adds OpenAI's
        `logprobs.content` (token, logprob, bytes, top_logprobs) for the generated tokens, recorded from the rows
        they were sampled from (no logits_all needed).
        llama-cpp-python's `logits_processor`, `stopping_criteria`, `grammar` and `model` work as in
        create_completion; tfs_z / mirostat only at their off values; the legacy `functions` / `function_call`
        are not supported (an UnsupportedError: use tools / tool_choice); an unknown keyword is a TypeError."""
        self._need_model()
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ParameterTypeError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        tkw = dict(chat_template_kwargs or {})
        if "enable_thinking" in kwargs:
            tkw["enable_thinking"] = kwargs.pop("enable_thinking")
        _check_kwargs("create_chat_completion", kwargs)
        if functions is not None or function_call is not None:
            from llamba.errors import UnsupportedError
            raise UnsupportedError("functions / function_call (OpenAI's legacy function calling) are not supported "
                                   "by llamba; pass tools=[{'type': 'function', 'function': {...}}] and "
                                   "tool_choice instead")
        _check_unsupported(tfs_z, mirostat_mode, mirostat_tau, mirostat_eta)
        model_name = self._model_name(model)
        processor, criteria = self._hooks(logits_processor, stopping_criteria)
        n = _int_arg("n", n, lo=1, hi=MAX_CHAT_N)
        n = 1 if n is None else n
        toks, plan = self.chat_prompt(messages, tools, tool_choice, parallel_tool_calls, tkw)
        constraint = self.chat_constraint(plan, response_format, grammar)
        kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
                  stop=stop, max_tokens=max_tokens, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, logit_bias=logit_bias,
                  constraint=constraint)
        if processor is not None:
            kw["logits_processor"] = processor
        if criteria is not None:
            kw["stopping_criteria"] = criteria
        if n == 1:
            return self._chat_completion_from_tokens(toks, stream=stream, logprobs=logprobs,
                                                     top_logprobs=top_logprobs, plan=plan, seed=seed,
                                                     model_name=model_name, **kw)
        seeds = self._choice_seeds(seed, n)
        if stream:
            return self._chat_n_stream(toks, seeds, logprobs, top_logprobs, plan, dict(kw, model_name=model_name))
        outs = [self._chat_completion_from_tokens(toks, logprobs=logprobs, top_logprobs=top_logprobs, plan=plan,
                                                  seed=sd, index=j, model_name=model_name, **kw)
                for j, sd in enumerate(seeds)]
        first = outs[0]
        usage = dict(first["usage"])
        usage["completion_tokens"] = sum(o["usage"]["completion_tokens"] for o in outs)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return dict(first, choices=[o["choices"][0] for o in outs], usage=usage)

    def _choice_seeds(self, seed, n: int) -> list:
        """Per-choice seeds: choice j uses seed + j (the Llama's seed, or a random base, when none is given)."""
        if seed is None or seed == -1:
            s = self.seed
            seed = s if isinstance(s, int) and 0 <= s < 0xFFFFFFFF else secrets.randbelow(1 << 31)
        return [int(seed) + j for j in range(n)]

    def _chat_n_stream(self, toks, seeds, logprobs, top_logprobs, plan, kw):
        """n streamed choices, one after the other (chunk `index` j)."""
        for j, sd in enumerate(seeds):
            yield from self._chat_completion_from_tokens(toks, stream=True, logprobs=logprobs,
                                                         top_logprobs=top_logprobs, plan=plan, seed=sd, index=j,
                                                         **kw)

    def chat_prompt(self, messages, tools=None, tool_choice=None, parallel_tool_calls=None,
                    chat_template_kwargs: dict | None = None):
        """(prompt token ids, llamba.tools.ToolPlan) of a chat request, as create_chat_completion renders it: tools
        checked and rendered for the template's tool-call format, tool-call messages adapted (arguments as dicts
        for the template), `chat_template_kwargs` passed to the template. Invalid tools -> ToolError; a front end
        calls it to check a request before generating."""
        tkw = chat_template_kwargs
        from llamba.tools import plan_tools
        tmpl = self.get_chat_template()
        plan = plan_tools(tmpl.source, tools, tool_choice, parallel_tool_calls)
        msgs = plan.messages(messages)
        toks = self.apply_chat_template(msgs, add_generation_prompt=True, tools=plan.template_tools(),
                                        tokenize=True, **(tkw or {}))
        return toks, plan

    def chat_constraint(self, plan, response_format=None, grammar=None):
        """The compiled constraint of a chat request (or None): with tool_choice "required" or a named function
        (`plan` from chat_prompt), the tool-call grammar (each tool's schema checked first: a bad one is a ToolError
        naming it); else compile_constraint(response_format, grammar)."""
        if plan is not None and plan.constrained:
            if grammar is not None or (response_format is not None and
                                       (not isinstance(response_format, dict) or
                                        response_format.get("type") != "text")):
                from llamba.tools import ToolError
                raise ToolError("tool_choice 'required' or a named function cannot be combined with "
                                "response_format / grammar")
            from llamba.constrain import GrammarError, compile_constraint
            from llamba.tools import ToolError
            for i, t in enumerate(plan.tools):  # each schema on its own first: an error names the function
                f = t["function"]
                if plan.name is None or f["name"] == plan.name:
                    try:
                        compile_constraint(self.tokenizer, "json_schema", f["parameters"])
                    except GrammarError as e:
                        raise ToolError(f"tools[{i}] ({f['name']}): parameters: {e}") from None
            return compile_constraint(self.tokenizer, "lark", plan.grammar(self.tokenizer))
        return self.compile_constraint(response_format, grammar)

    def chat_stream(self, tokens, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                    min_p: float = 0.05, typical_p: float = 1.0, stop=None, seed: int | None = None,
                    max_tokens: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    repeat_penalty: float = 1.0, logit_bias=None, recorder: LogprobRecorder | None = None,
                    stats: GenStats | None = None, constraint=None, keep_special=None, logits_processor=None,
                    stopping_criteria=None):
        """The answer to a rendered chat prompt (token ids, e.g. from chat_prompt or apply_chat_template(...,
        tokenize=True)) as stream_text's (text_piece, finish_reason | None) generator, with
        create_chat_completion's defaults; the chat template's stop strings are added to `stop`, and max_tokens
        None or <= 0 means the rest of the context. The prompt, max_tokens and stop are checked here, before the
        generator is returned (ContextOverflowError, ParameterError); the chat REPL (llamba.chat.ChatSession)
        reads it. `logits_processor` / `stopping_criteria`: see stream_text."""
        toks = tokens
        self._need_model()
        if not toks:
            raise LlambaError("the chat prompt is empty")
        if len(toks) >= self._n_ctx:
            from llamba.errors import ContextOverflowError
            raise ContextOverflowError(f"the chat prompt has {len(toks)} tokens but the context holds "
                                       f"{self._n_ctx}; raise n_ctx or shorten the conversation")
        max_tokens = _int_arg("max_tokens", max_tokens)
        if max_tokens is None or max_tokens <= 0:
            max_tokens = self._n_ctx - len(toks)
        stops = _stop_list(stop)
        stops += [s for s in self.get_chat_template().stop if s not in stops]
        return self.stream_text(list(toks), max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, typical_p=typical_p, repeat_penalty=repeat_penalty,
                                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, seed=seed,
                                logit_bias=logit_bias, stop=stops, constraint=constraint, recorder=recorder,
                                stats=stats, keep_special=keep_special, logits_processor=logits_processor,
                                stopping_criteria=stopping_criteria)

    def _chat_completion_from_tokens(self, toks, stream: bool = False, logprobs=None, top_logprobs=None, plan=None,
                                     index: int = 0, model_name=None, **kw):
        rec = None
        if logprobs:
            n = _int_arg("top_logprobs", 0 if top_logprobs is None else top_logprobs, lo=0, hi=MAX_LOGPROBS)
            rec = LogprobRecorder(n)
        stats = GenStats()
        tools_on = plan is not None and plan.active
        if tools_on:
            from llamba.tools import marker_ids
            kw["keep_special"] = marker_ids(plan.fmt, self.tokenizer) or None
        it = self.chat_stream(toks, recorder=rec, stats=stats, **kw)
        cid = f"chatcmpl-{uuid.uuid4()}"
        created = int(time.time())
        if stream:
            return self._chat_chunks(it, cid, created, rec, stats, len(toks), plan if tools_on else None, index,
                                     model_name)
        pieces, finish = [], "length"
        for piece, fin in it:
            pieces.append(piece)
            if fin:
                finish = fin
        lp = {"content": chat_logprobs_content(self.tokenizer, rec.take()), "refusal": None} if rec else None
        message = {"role": "assistant", "content": "".join(pieces)}
        if tools_on:
            content, calls = plan.parse(message["content"])
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish = "tool_calls"
        return {
            "id": cid, "object": "chat.completion", "created": created,
            "model": self.model_path if model_name is None else model_name,
            "choices": [{"index": index, "message": message, "logprobs": lp, "finish_reason": finish}],
            "usage": _usage(len(toks), stats, self.engine is not None),
        }

    def _chat_chunks(self, it, cid, created, rec=None, stats=None, n_prompt=0, plan=None, index: int = 0,
                     model_name=None):
        name = self.model_path if model_name is None else model_name

        def chunk(delta, finish, lp=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        parser = plan.stream_parser() if plan is not None else None
        try:
            yield chunk({"role": "assistant"}, None)
            finish = "length"
            for piece, fin in it:
                if piece:
                    lp = {"content": chat_logprobs_content(self.tokenizer, rec.take()), "refusal": None} \
                        if rec else None
                    if parser is None:
                        yield chunk({"content": piece}, None, lp)
                    else:
                        deltas = parser.feed(piece)
                        for k, d in enumerate(deltas):
                            yield chunk(d, None, lp if k == 0 else None)
                        if not deltas and lp is not None and lp["content"]:
                            yield chunk({}, None, lp)
                if fin:
                    finish = fin
            if parser is not None:
                for d in parser.finish():
                    yield chunk(d, None)
                if parser.has_calls:
                    finish = "tool_calls"
            last = chunk({}, finish)
            if self.stream_usage and stats is not None:  # serving: usage on the last chunk
                last["usage"] = _usage(n_prompt, stats, True)
            yield last
        finally:
            it.close()  # a consumer that stops early ends the generation here

    def __call__(self, prompt, *args, **kwargs):
        return self.create_completion(prompt, *args, **kwargs)

    def close(self):
        if getattr(self, "engine", None) is not None:
            self.engine.stop()
            self.engine = None
        self.model = None
        self.session = None

    def prompt_logprobs(self, tokens, n: int = 0) -> list[tuple[float, list[tuple[int, float]]]]:
        """Log-probabilities of a prompt's own tokens, as OpenAI and vLLM lay out `echo` + `logprobs`: element i-1
        is for tokens[i] (i >= 1): (log p(tokens[i] | tokens[:i]), the top-n (id, logprob) pairs of that row,
        logprob descending); tokens[0] has none (nothing precedes it), so len(tokens) - 1 elements. The rows come
        from evaluating tokens[:-1] from an empty cache, n_batch rows at a time (only n_batch x n_vocab logits
        held at once; the batched rows are the rows generation samples from); the cache keeps tokens[:-1], which
        a following generation on the same prompt reuses."""
        import contextlib
        self._need_model()
        toks = self._ids(tokens, "prompt_logprobs")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise LlambaError(f"prompt_logprobs: n must be a non-negative integer, got {n!r}")
        if len(toks) < 2:
            return []
        out = []
        with getattr(self.session, "lock", None) or contextlib.nullcontext():
            self.session.reset()
            self.model.check_room(len(toks) - 1)
            nb = self.session.n_batch or len(toks)
            for a in range(0, len(toks) - 1, nb):
                rows = self.session.eval(toks[a:min(a + nb, len(toks) - 1)], logits="all")
                for r in range(len(rows)):
                    lp = self.logits_to_logprobs(rows[r])
                    out.append((float(lp[toks[a + r + 1]]), top_n_logprobs(lp, int(n))))
        return out


class LlamaState:
    """What `Llama.save_state` returns (llama-cpp-python's LlamaState fields: input_ids, scores, n_tokens,
    llama_state, llama_state_size, seed). Here `llama_state` is a dict of numpy arrays (KV rows of the cached
    positions, recurrent states), not llama.cpp's byte blob; the object pickles."""

    def __init__(self, input_ids, scores, n_tokens, llama_state, llama_state_size, seed, model_name=""):
        self.input_ids = input_ids
        self.scores = scores
        self.n_tokens = int(n_tokens)
        self.llama_state = llama_state
        self.llama_state_size = int(llama_state_size)
        self.seed = seed
        self.model_name = model_name

    def __repr__(self):
        return f"LlamaState({self.n_tokens} tokens, {self.llama_state_size / 2**20:.1f} MiB, {self.model_name})"


def _usage(n_prompt: int, stats, details: bool = False) -> dict:
    """OpenAI `usage` (llama-cpp-python's three counts); with details (the batching engine, i.e. serving), also the
    prompt tokens found in the cache (prompt_tokens_details.cached_tokens)."""
    n_gen = stats.n_gen if stats is not None else 0
    u = {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
    if details:
        u["prompt_tokens_details"] = {"cached_tokens": stats.n_reused if stats is not None else 0}
    return u


def _normalized(v: np.ndarray) -> list[float]:
    """L2-normalized copy as a list (llama-cpp-python's normalize_embedding: unchanged when the norm is 0)."""
    v = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(v))
    return (v / n).tolist() if n != 0.0 else v.tolist()
