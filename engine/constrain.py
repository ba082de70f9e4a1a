"""Constrained decoding (structured output) through llguidance.

llguidance (guidance-ai, Rust with a binary abi3 wheel: no compiler needed) compiles JSON schemas, regexes, Lark and
llama.cpp GBNF grammars against a tokenizer given as the byte string of every token id, and computes a per-step token
bitmask with an incremental Earley parser (tens of microseconds per token for JSON). It was chosen over xgrammar
because xgrammar's Python package imports torch and wants a HF tokenizer; llguidance's tokenizer interface is just
bytes per token id, which llamba's GGUF tokenizer gives directly.

Use:
    c = compile_constraint(tokenizer, "json_schema", schema)   # cached by (kind, text): compiled once
    m = c.matcher()                                             # per sequence
    m.mask(row)        # in place: disallowed tokens' logits -> -inf (float32 row)
    m.accept(token_id) # advance
    m.is_done()        # the grammar is complete and admits nothing more (only end-of-generation follows)
    m.rollback(n), m.valid_prefix(draft)  # speculative drafts

When the grammar is complete, the mask admits only the end-of-generation tokens, so generation ends with
finish_reason "stop" through the ordinary end-of-generation path. Sampling without a constraint runs no code here.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import numpy as np

from llamba.errors import ParameterError

KINDS = ("json_schema", "json_object", "regex", "gbnf", "lark")


class GrammarError(ParameterError):
    """An invalid grammar, JSON schema, regex or response_format (one line)."""


def _one_line(msg: str, limit: int = 300) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def _ll():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - it is an install dependency
        raise GrammarError("structured output needs the llguidance package (pip install llguidance)") from e
    return llguidance


_TOK_LOCK = threading.Lock()


def ll_tokenizer(tokenizer):
    """llguidance's tokenizer for a llamba Tokenizer (built once per tokenizer, cached on it)."""
    llt = getattr(tokenizer, "_ll_tokenizer", None)
    if llt is not None:
        return llt
    with _TOK_LOCK:
        llt = getattr(tokenizer, "_ll_tokenizer", None)
        if llt is not None:
            return llt
        ll = _ll()
        from llamba.tokenizer import ATTR_CONTROL, ATTR_USER_DEFINED
        n = tokenizer.n_vocab
        attrs = tokenizer.attrs
        toks = []
        for i in range(n):
            b = bytes(tokenizer.token_to_piece(i, special=True))
            a = int(attrs[i])
            if a & ATTR_CONTROL or (a & ATTR_USER_DEFINED and b.startswith(b"<") and b.endswith(b">")):
                b = b"\xff" + b  # llguidance: a special token, never matched by grammar text
            toks.append(b)
        eos = tokenizer.eos_id
        eog = sorted(int(t) for t in tokenizer.eog_ids)
        if eos is None or eos not in eog:
            eos = eog[0] if eog else 0

        def encode(s):
            if isinstance(s, str):
                s = s.encode("utf-8")
            return tokenizer.encode(s, add_bos=False, special=False)

        wrap = ll.TokenizerWrapper.__new__(ll.TokenizerWrapper)
        wrap.eos_token_id = int(eos)
        wrap.bos_token_id = tokenizer.bos_id
        wrap.tokens = toks
        wrap.special_token_ids = [i for i in range(n) if toks[i][:1] == b"\xff"]
        wrap.is_tokenizer_wrapper = True
        wrap._gtokenizer = encode
        wrap._accepts_bytes = True
        llt = ll.LLTokenizer(wrap, n_vocab=n, eos_token=eog or [int(eos)])
        tokenizer._ll_tokenizer = llt
        return llt


class LlamaGrammar:
    """A grammar as llama-cpp-python's `LlamaGrammar` holds it: the source text in `._grammar` (llama.cpp GBNF; Lark
    also works), compiled against a model's tokenizer only when a completion uses it (`grammar=`), so an invalid
    grammar is a GrammarError there. `from_json_schema` keeps the schema too (`._json_schema`): it is compiled as
    a JSON schema, exactly as `response_format={"type": "json_object", "schema": ...}` would be."""

    def __init__(self, *args, _grammar: str, **kwargs):
        if not isinstance(_grammar, str):
            raise GrammarError(f"a grammar must be text, not {type(_grammar).__name__}")
        self._grammar = _grammar
        self._root = "root"
        self._json_schema = kwargs.get("_json_schema")

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> "LlamaGrammar":
        """A grammar from GBNF text."""
        return cls(_grammar=grammar)

    @classmethod
    def from_file(cls, file, verbose: bool = True) -> "LlamaGrammar":
        """A grammar from a GBNF file (an empty file is a ValueError, as in llama-cpp-python)."""
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise GrammarError(f"cannot read the grammar file {file}: {e.strerror or e}") from None
        if not text:
            raise GrammarError(f"the grammar file {file} is empty")
        return cls.from_string(text, verbose=verbose)

    @classmethod
    def from_json_schema(cls, json_schema, verbose: bool = True) -> "LlamaGrammar":
        """A grammar admitting the JSON documents valid under `json_schema` (a JSON string, or a dict). Its
        `._grammar` is llguidance Lark text (`start: %json {...}`)."""
        if isinstance(json_schema, (bytes, bytearray)):
            json_schema = bytes(json_schema).decode("utf-8")
        if isinstance(json_schema, str):
            try:
                schema = json.loads(json_schema)
            except ValueError as e:
                raise GrammarError(f"invalid JSON schema: not JSON ({e})") from None
        else:
            schema = json_schema
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError("invalid JSON schema: it must be a JSON object")
        text = json.dumps(schema, sort_keys=True)
        return cls(_grammar=f"start: %json {text}", _json_schema=text)

    def __repr__(self):
        src = " ".join(self._grammar.split())
        return f"LlamaGrammar({src[:60] + '...' if len(src) > 60 else src!r})"


def grammar_spec(grammar) -> tuple[str, str]:
    """(kind, text) of a `grammar=` argument for compile_constraint: GBNF text, or a LlamaGrammar-like object (a
    LlamaGrammar made from a JSON schema compiles as that schema)."""
    js = getattr(grammar, "_json_schema", None)
    if not isinstance(grammar, str) and isinstance(js, str):
        return ("json_schema", js)
    return ("gbnf", grammar_text(grammar))


def grammar_text(grammar) -> str:
    """A GBNF/Lark grammar as text: a str, or an object with a .grammar / ._grammar text attribute (llama-cpp-python's
    LlamaGrammar keeps the source in ._grammar)."""
    if isinstance(grammar, str):
        return grammar
    for attr in ("_grammar", "grammar"):
        g = getattr(grammar, attr, None)
        if isinstance(g, str):
            return g
    raise GrammarError(f"grammar must be a GBNF string or a LlamaGrammar-like object, not {type(grammar).__name__}")


# compact JSON (no free whitespace between tokens: a model cannot pad its output with newlines and tabs); a schema's
# "x-guidance" object may override it
_JSON_DEFAULTS = {"whitespace_flexible": False}


def _to_ll_grammar(kind: str, text: str) -> str:
    ll = _ll()
    if kind == "json_object":
        return ll.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_DEFAULTS)
    if kind == "json_schema":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise GrammarError("invalid JSON schema: it must be a JSON object")
        try:
            return ll.LLMatcher.grammar_from_json_schema(obj, defaults=_JSON_DEFAULTS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {_one_line(e)}") from None
    if kind == "regex":
        return ll.LLMatcher.grammar_from_regex(text)
    if kind == "lark":
        return ll.LLMatcher.grammar_from_lark(text)
    if kind == "gbnf":
        try:
            return ll.grammar_from("gbnf", text)
        except Exception as e:  # noqa: BLE001 - the converter raises assorted errors on bad input
            raise GrammarError(f"invalid grammar: {_one_line(e)}") from None
    raise GrammarError(f"unknown constraint kind {kind!r} (one of {', '.join(KINDS)})")


class Constraint:
    """A compiled grammar for one tokenizer; matcher() makes per-sequence state."""

    def __init__(self, llt, kind: str, text: str, grammar: str):
        self.llt, self.kind, self.text, self.grammar = llt, kind, text, grammar

    def matcher(self) -> "Matcher":
        ll = _ll()
        m = ll.LLMatcher(self.llt, self.grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"invalid {self.kind}: {_one_line(m.get_error())}")
        return Matcher(m, self.llt.vocab_size)


_CACHE: "OrderedDict[tuple, Constraint]" = OrderedDict()
_CACHE_MAX = 32
_CACHE_LOCK = threading.Lock()


def compile_constraint(tokenizer, kind: str, text) -> Constraint:
    """Compile (or fetch from the LRU cache) a constraint. kind: 'json_schema' (text: a schema as a JSON string or a
    dict), 'json_object' (any JSON object; text ignored), 'regex', 'gbnf' (llama.cpp GBNF, Lark also accepted),
    'lark'. Invalid input -> GrammarError (a ParameterError) with a one-line message."""
    if kind == "json_schema" and not isinstance(text, str):
        try:
            text = json.dumps(text, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"invalid JSON schema: {_one_line(e)}") from None
    if kind == "json_object":
        text = ""
    if not isinstance(text, str):
        raise GrammarError(f"a {kind} constraint must be given as text, not {type(text).__name__}")
    llt = ll_tokenizer(tokenizer)
    key = (id(llt), kind, text)
    with _CACHE_LOCK:
        c = _CACHE.get(key)
        if c is not None:
            _CACHE.move_to_end(key)
            return c
    g = _to_ll_grammar(kind, text)
    ll = _ll()
    err = ll.LLMatcher.validate_grammar(g, llt)
    if err and not err.startswith("WARNING"):
        what = {"json_schema": "JSON schema", "gbnf": "grammar", "lark": "grammar"}.get(kind, kind)
        raise GrammarError(f"invalid {what}: {_one_line(err)}")
    c = Constraint(llt, kind, text, g)
    c.matcher()  # fails here (once) rather than per request
    with _CACHE_LOCK:
        _CACHE[key] = c
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return c


class Matcher:
    """Per-sequence grammar state (an llguidance LLMatcher)."""

    def __init__(self, m, n_vocab: int):
        self.m = m
        self.n_vocab = n_vocab
        self._words = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """A bool array over the tokenizer's vocabulary: tokens the grammar admits next."""
        m = self.m
        if m.is_error():
            raise GrammarError(f"constraint failed: {_one_line(m.get_error())}")
        w = self._words
        m.unsafe_compute_mask_ptr(w.ctypes.data, w.nbytes)
        return np.unpackbits(w.view(np.uint8), bitorder="little")[:self.n_vocab].view(np.bool_)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """In place on a float32 row: disallowed tokens -> -inf (positions past the tokenizer's vocabulary too)."""
        ok = self.allowed()
        n = min(self.n_vocab, logits.shape[0])
        logits[:n][~ok[:n]] = -np.inf
        if logits.shape[0] > self.n_vocab:
            logits[self.n_vocab:] = -np.inf
        return logits

    def accept(self, token_id: int) -> bool:
        ok = self.m.consume_token(int(token_id))
        if not ok:
            raise GrammarError(f"constraint failed: token {int(token_id)} rejected ({_one_line(self.m.get_error())})")
        return ok

    def is_done(self) -> bool:
        return self.m.is_stopped()

    def is_accepting(self) -> bool:
        return self.m.is_accepting()

    def rollback(self, n: int) -> None:
        if n > 0 and not self.m.rollback(int(n)):
            raise GrammarError(f"constraint rollback of {n} tokens failed")

    def valid_prefix(self, tokens) -> int:
        """How many of `tokens` (a draft) the grammar admits in a row from the current state (nothing committed)."""
        toks = [int(t) for t in tokens]
        if not toks:
            return 0
        return int(self.m.validate_tokens(toks))

    def clone(self) -> "Matcher":
        new = Matcher(self.m.deep_copy(), self.n_vocab)
        return new
