"""Tokenizer: llama.cpp-exact byte-level BPE (`gpt2`) and SentencePiece (`llama`) vocabularies (docs/tokenizer.md).

The bar is llama.cpp's token ids, so this module ports `llama-vocab.cpp` / `unicode.cpp` rather than following
the Hugging Face tokenizers:

* special-token partition: every CONTROL / USER_DEFINED / UNKNOWN token text, longest first, is split out of the
  raw text one token at a time (each token over all fragments before the next token); without `special` only
  USER_DEFINED texts are matched; LSTRIP / RSTRIP attributes strip C-locale whitespace around a match;
* BPE: the pre-tokenizer regexes of `tokenizer.ggml.pre` applied one after another (unmatched gaps are pieces too),
  GPT-2 byte->unicode encoding, then llama.cpp's merge queue (lowest rank first, leftmost on ties, stale entries
  skipped), byte fallback through single-character tokens;
* SPM: " " -> "▁", optional space prefix, highest-score merge of adjacent symbols whose concatenation is a token
  (leftmost on ties), resegmentation of unknown symbols along the recorded merges, byte fallback `<0xXX>`;
* detokenization: `llama_token_to_piece` (CONTROL/UNKNOWN empty unless `special`) and `llama_detokenize`
  (leading-space removal for `add_space_prefix`, `clean_up_tokenization_spaces` passes).

Invalid UTF-8 input (bytes) is handled as llama.cpp does: the BPE pre-tokenizer sees U+FFFD for each bad byte,
SPM splits symbols by the UTF-8 lead byte and falls back to byte tokens.
"""
from __future__ import annotations

import codecs
from array import array
import heapq
import os

import numpy as np
import regex

from llamba.errors import GGUFError, TokenIdError, UnsupportedError

# ---------------------------------------------------------------- token types / attributes (llama.h)

TOKEN_TYPE_UNDEFINED, TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL = 0, 1, 2, 3
TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNUSED, TOKEN_TYPE_BYTE = 4, 5, 6

ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_NORMALIZED = 1 << 6
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
ATTR_SINGLE_WORD = 1 << 9

_TYPE_TO_ATTR = np.array([ATTR_UNDEFINED, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED,
                          ATTR_UNUSED, ATTR_BYTE], dtype=np.int32)
_ATTR_SPECIAL = ATTR_UNKNOWN | ATTR_CONTROL  # printed only with special=True
_ATTR_PARTITION = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN  # candidates of the special-token partition

_C_SPACE = b" \t\n\v\f\r"  # C isspace()
_SPM_SPACE = "\u2581"  # "▁"
_SPM_SPACE_B = _SPM_SPACE.encode()

# ---------------------------------------------------------------- GPT-2 byte <-> unicode map


def _gpt2_byte_map() -> list[str]:
    direct = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out = [""] * 256
    for b in direct:
        out[b] = chr(b)
    n = 0
    for b in range(256):
        if not out[b]:
            out[b] = chr(256 + n)
            n += 1
    return out


BYTE_TO_UNICODE: list[str] = _gpt2_byte_map()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}
_BYTE_ENCODE_TABLE = str.maketrans({b: c for b, c in enumerate(BYTE_TO_UNICODE)})  # latin-1 str -> GPT-2 str

# ---------------------------------------------------------------- pre-tokenizers (llama-vocab.cpp)

_RX_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_RX_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RX_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RX_QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
              r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_PRE_REGEXES = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _RX_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_RX_GPT2,),
    "starcoder": (r"\p{N}", _RX_GPT2),
    "llama3": (_RX_LLAMA3,),
    "qwen2": (_RX_QWEN2,),
    "qwen35": (_RX_QWEN35,),
}

# tokenizer.ggml.pre -> (regex family, flag overrides), as in llama_vocab::impl::load
_PRE_TYPES: dict[str, tuple[str, dict]] = {}


def _pre(family: str, names: str, **flags):
    for name in names.split():
        _PRE_TYPES[name] = (family, flags)


_pre("default", "default")
_pre("llama3", "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
     ignore_merges=True, add_bos=True)
_pre("llama3", "dbrx smaug-bpe")
_pre("llama3", "chatglm-bpe", no_bos=True)
_pre("llama3", "glm4 glm5", no_bos=True, ignore_merges=True)
_pre("gpt2", "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert mpt olmo jais "
     "exaone4 jina-v1-en jina-v2-code roberta-bpe")
_pre("gpt2", "trillion granite-docling", clean_spaces=False)
_pre("starcoder", "starcoder refact codeshell exaone minerva-7b mellum2")
_pre("starcoder", "smollm command-r", clean_spaces=False)
_pre("qwen2", "qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open", clean_spaces=False)
_pre("qwen2", "megrez stablelm2")
_pre("qwen35", "qwen35", clean_spaces=False)

SUPPORTED_MODELS = ("gpt2", "llama")
SUPPORTED_PRE = tuple(sorted(_PRE_TYPES))

_COMPILED: dict[str, regex.Pattern] = {}


def _compiled(patterns) -> list[regex.Pattern]:
    out = []
    for p in patterns:
        rx = _COMPILED.get(p)
        if rx is None:
            rx = _COMPILED[p] = regex.compile(p)
        out.append(rx)
    return out


# ---------------------------------------------------------------- token texts that llama.cpp recognises

_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                  "<|code_prefix|>", "<|prefix|>")
_FIM_SUF_TEXTS = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                  "<|code_suffix|>", "<|suffix|>")
_FIM_MID_TEXTS = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                  "<|code_middle|>", "<|middle|>")
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
             "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
             "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
             "<｜end▁of▁sentence｜>", "[e~[")
_ALWAYS_RENDER = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss: forced USER_DEFINED

_MAX_CACHE = 1 << 17  # entries per encode cache before it is cleared


def _to_bytes(s: str) -> bytes:
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass")


def _utf8_of(tokens, ids) -> dict:
    """{i: _to_bytes(tokens[i])} for the ids; a StringArray's (valid UTF-8) straight from its bytes."""
    blob = getattr(tokens, "_blob", None)
    if blob is None:
        return {i: _to_bytes(tokens[i]) for i in ids}
    o = tokens._offs
    return {i: blob[o[i]:o[i + 1]] for i in ids}


def _contains(tokens, ids: np.ndarray, sub: str) -> np.ndarray:
    """Booleans: `sub` (ASCII) occurs in tokens[i], for each i of ids; a StringArray's searched in its bytes (an
    ASCII byte never occurs inside a multi-byte UTF-8 character, so a byte match is a text match)."""
    blob = getattr(tokens, "_blob", None)
    if blob is None or not sub.isascii():
        return np.array([sub in tokens[i] for i in ids.tolist()], dtype=bool)
    pat, pos, k = sub.encode(), [], blob.find(sub.encode())
    while k >= 0:
        pos.append(k)
        k = blob.find(pat, k + 1)
    offs = tokens._offsets()
    pos = np.asarray(pos, dtype=np.int64)
    tok = np.searchsorted(offs, pos, side="right") - 1
    inside = pos + len(pat) <= offs[tok + 1]
    has = np.zeros(len(offs) - 1, dtype=bool)
    has[tok[inside]] = True
    return has[np.asarray(ids, dtype=np.int64)]


def _lenient_utf8_decode(b: bytes) -> str:
    """llama.cpp's unicode_cpts_from_utf8: structurally valid sequences decode (overlong and surrogate forms
    included), every other byte becomes U+FFFD."""
    out = []
    i, n = 0, len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            out.append(chr(c))
            i += 1
            continue
        if c & 0x40 == 0:
            cp, ln = -1, 1
        elif c & 0x20 == 0:
            ln = 2
            cp = ((c & 0x1F) << 6) | (b[i + 1] & 0x3F) if i + 1 < n and b[i + 1] & 0xC0 == 0x80 else -1
        elif c & 0x10 == 0:
            ln = 3
            ok = i + 2 < n and b[i + 1] & 0xC0 == 0x80 and b[i + 2] & 0xC0 == 0x80
            cp = ((c & 0x0F) << 12) | ((b[i + 1] & 0x3F) << 6) | (b[i + 2] & 0x3F) if ok else -1
        elif c & 0x08 == 0:
            ln = 4
            ok = i + 3 < n and b[i + 1] & 0xC0 == 0x80 and b[i + 2] & 0xC0 == 0x80 and b[i + 3] & 0xC0 == 0x80
            cp = (((c & 0x07) << 18) | ((b[i + 1] & 0x3F) << 12) | ((b[i + 2] & 0x3F) << 6) | (b[i + 3] & 0x3F)
                  if ok else -1)
        else:
            cp = -1
        if cp < 0:
            out.append("\ufffd")
            i += 1
        else:
            out.append(chr(cp) if cp <= 0x10FFFF else "\ufffd")
            i += ln
    return "".join(out)


def _is_str_seq(v) -> bool:
    """A GGUF string array: a list of str or a llamba.gguf.StringArray."""
    from llamba.gguf import StringArray
    return isinstance(v, StringArray) or (isinstance(v, list) and all(isinstance(t, str) for t in v))


def _num_array(meta: dict, key: str, n: int):
    """The numeric array `key` (None when absent) with at least n entries, else a one-line GGUFError."""
    v = meta.get(key)
    if v is None:
        return None
    if not isinstance(v, np.ndarray) or v.ndim != 1 or v.dtype.kind not in "biuf":
        from llamba.gguf import short
        raise GGUFError(f"metadata key '{key}' must be a numeric array with one entry per token, not {short(v)}")
    if len(v) < n:
        raise GGUFError(f"metadata key '{key}' has {len(v)} entries for {n} tokens")
    return v


_BYTE_TOKEN = regex.compile(r"<0x[0-9A-Fa-f]{2}>")


def _utf8_len(lead: int) -> int:
    """unicode_len_utf8: sequence length from the high nibble of the lead byte."""
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[lead >> 4]


# ================================================================= compact string -> index map


_HIT_CACHE = 1 << 14  # StrIndex: most recent distinct hits remembered per index


class StrIndex:
    """str -> index over a sequence of strings (a list or a gguf StringArray), without a dict of its strings.

    A dict over a 262k-entry vocabulary costs ~37 MiB (str objects, int objects, the table); this keeps 8-byte
    hashes, 4-byte ids and a bucket table (~4 MiB) and verifies a hit against the sequence itself. Buckets are
    the low bits of the hash; inside a bucket, entries are ordered so that among duplicate texts the
    winner comes first: the last occurrence (`last_wins`, llama.cpp's token_to_id map, where a later token
    overwrites) or the first (`merges`' std::unordered_map::emplace keeps the first rank).

    The hash of a list's strings is Python's str hash; that of a StringArray's (a GGUF vocabulary: UTF-8 bytes) is
    `_bytes_hash`, computed for all of them at once from the bytes (numpy), without making a str object of each
    (a third of the cost of building the index of a 262k-entry vocabulary otherwise, on the time to first
    token); a lookup hashes the UTF-8 encoding of the text it is given the same way."""

    __slots__ = ("get", "_n")

    def __init__(self, texts, last_wins: bool):
        n = len(texts)
        blob = getattr(texts, "_blob", None)
        if blob is not None and getattr(texts, "_offsets", None) is not None:
            hs = _bytes_hashes(blob, texts._offsets())
        else:
            blob = None
            strs = texts.tolist() if hasattr(texts, "tolist") else texts
            hs = np.fromiter(map(hash, strs), dtype=np.int64, count=n)
            del strs
        nbits = max(4, int(n).bit_length())  # 2^nbits buckets >= n: ~1 entry per bucket
        mask = (1 << nbits) - 1
        keys = hs & mask if blob is None else (hs & np.uint64(mask)).astype(np.int64)
        # by bucket, then index (ascending: the first wins; descending: the last wins), in one sort of one key
        idx = np.arange(n, dtype=np.int64)
        order = np.sort((keys << 32) | (((n - 1) - idx) if last_wins else idx)) & 0xFFFFFFFF
        if last_wins:
            order = (n - 1) - order
        counts = np.bincount(keys, minlength=mask + 1)
        bucket = np.zeros(mask + 2, np.int32)
        np.cumsum(counts, out=bucket[1:])
        self._n = n
        hs_o = hs[order]
        self.get = _make_get(texts, array("q" if blob is None else "Q", hs_o.tobytes()),
                             array("i", order.astype(np.int32).tobytes()), array("i", bucket.tobytes()), mask,
                             bytes_hash=blob is not None)

    def __contains__(self, text) -> bool:
        return self.get(text) is not None

    def __len__(self) -> int:
        return self._n


_HASH_MOD = 4294967291  # the largest prime below 2**32


def _bytes_hash(b: bytes) -> int:
    """StrIndex's hash of a StringArray's string: its UTF-8 bytes as a big-endian integer modulo _HASH_MOD."""
    return int.from_bytes(b, "big") % _HASH_MOD


def _bytes_hashes(blob: bytes, offs: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """_bytes_hash of every string blob[offs[i]:offs[i+1]] (uint64), vectorized: sum over a string's bytes of
    byte * (256**distance to its end mod M), mod M, in chunks of about `chunk` bytes (bounded temporaries)."""
    M = np.uint64(_HASH_MOD)
    b8 = np.frombuffer(blob, np.uint8)
    offs = np.asarray(offs, np.int64)
    n = len(offs) - 1
    out = np.zeros(max(n, 0), np.uint64)
    if n <= 0 or not len(b8):
        return out
    lens = np.diff(offs)
    pw = np.ones(1, np.uint64)  # pw[k] = 256**k mod M, doubling (each product < 2**64)
    while len(pw) < int(lens.max()):
        pw = np.concatenate([pw, pw * ((pw[-1] * np.uint64(256)) % M) % M])
    i = 0
    while i < n:
        j = min(n, max(i + 1, int(np.searchsorted(offs, offs[i] + chunk, side="right")) - 1))
        a, e = int(offs[i]), int(offs[j])
        if e > a:
            ln = lens[i:j]
            dist = np.repeat(offs[i + 1:j + 1] - (a + 1), ln) - np.arange(e - a)  # bytes after this one in its string
            terms = b8[a:e] * pw[dist] % M
            nz = ln > 0
            out[i:j][nz] = np.add.reduceat(terms, (offs[i:j] - a)[nz]) % M
        i = j
    return out


def _make_get(texts, hs, ids, bucket, mask, bytes_hash: bool = False):
    """StrIndex.get(text, default=None) as a closure over its tables (the tokenizer's hot lookup: no attribute
    reads). A StringArray is verified straight from its bytes (no per-item method call); `bytes_hash`: `hs` holds
    _bytes_hash values (a StringArray's), else Python's str hashes."""
    blob = getattr(texts, "_blob", None)
    offs = getattr(texts, "_offs", None) if blob is not None else None
    if offs is not None and bytes_hash:
        hits: dict = {}
        M = _HASH_MOD
        frombytes = int.from_bytes

        def get(text: str, default=None):
            i = hits.get(text)
            if i is not None:
                return i
            tb = text.encode("utf-8", "surrogatepass")  # a lone surrogate matches nothing (the blob is valid UTF-8)
            h = frombytes(tb, "big") % M
            b = h & mask
            k, e = bucket[b], bucket[b + 1]
            while k < e:
                if hs[k] == h:
                    i = ids[k]
                    if blob[offs[i]:offs[i + 1]] == tb:
                        if len(hits) >= _HIT_CACHE:
                            hits.clear()
                        hits[text] = i
                        return i
                k += 1
            return default
        return get

    def get(text: str, default=None):  # a list's strings (Python's str hashes)
        h = hash(text)
        b = h & mask
        k, e = bucket[b], bucket[b + 1]
        while k < e:
            if hs[k] == h and texts[ids[k]] == text:
                return ids[k]
            k += 1
        return default
    return get


# ================================================================= Tokenizer


class Tokenizer:
    """A GGUF vocabulary with llama.cpp's tokenize / token_to_piece / detokenize behaviour.

    Attributes: `model` ("gpt2" or "llama"), `pre`, `tokens` (a sequence of str: a list, or for GGUF vocabularies
    a llamba.gguf.StringArray that decodes each token on access), `token_type` (int32 array as stored),
    `attrs` (llama token attribute bit masks, after llama.cpp's load-time adjustments), `n_vocab`, `bos_id`,
    `eos_id`, `eot_id`, `eom_id`, `unk_id`, `pad_id`, `sep_id`, `mask_id`, `fim_*_id` (None when absent),
    `eog_ids` (frozenset), `add_bos`, `add_eos`, `add_space_prefix`, `clean_spaces`, `ignore_merges`,
    `special_ids` (partition candidates, longest text first).
    """

    # ------------------------------------------------------------ construction

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        from llamba.gguf import GGUFFile
        g = GGUFFile(path)
        try:
            return cls.from_metadata(g.metadata)
        finally:
            g.close()

    @classmethod
    def from_metadata(cls, meta: dict) -> "Tokenizer":
        return cls(meta)

    def __init__(self, meta: dict):
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise GGUFError("missing required metadata key 'tokenizer.ggml.model' (the file has no vocabulary)")
        if not isinstance(model, str) or model not in SUPPORTED_MODELS:
            from llamba.gguf import short
            raise UnsupportedError(f"unsupported tokenizer model '{short(model)}' (tokenizer.ggml.model); llamba "
                                   f"supports {', '.join(SUPPORTED_MODELS)} (byte-level BPE and SentencePiece)")
        self.model = model
        self.is_spm = model == "llama"
        pre = meta.get("tokenizer.ggml.pre")
        self.pre = pre if isinstance(pre, str) else ""

        tokens = meta.get("tokenizer.ggml.tokens")
        if not _is_str_seq(tokens) or not len(tokens):
            raise GGUFError("missing or empty metadata key 'tokenizer.ggml.tokens'")
        n = len(tokens)
        empty = (np.nonzero(tokens.byte_lengths() == 0)[0].tolist() if hasattr(tokens, "byte_lengths")
                 else [i for i, t in enumerate(tokens) if not t])
        if empty:  # llama.cpp renames empty tokens
            tokens = list(tokens)
            for i in empty:
                tokens[i] = f"[EMPTY_{i}]"
        elif not hasattr(tokens, "byte_lengths"):
            tokens = list(tokens)
        self._tok2id = StrIndex(tokens, last_wins=True)  # a later duplicate wins, as in llama.cpp
        self.tokens = tokens
        self.n_vocab = n

        tt = _num_array(meta, "tokenizer.ggml.token_type", n)
        if tt is None:
            tt = np.full(n, TOKEN_TYPE_NORMAL, dtype=np.int32)
        with np.errstate(all="ignore"):  # a corrupt type (NaN, 2^64-1) is just an undefined one
            tt = np.nan_to_num(tt[:n], nan=-1).astype(np.int64).clip(-1, 1 << 20).astype(np.int32)
        self.token_type = tt
        attrs = np.where((self.token_type >= 0) & (self.token_type < len(_TYPE_TO_ATTR)),
                         _TYPE_TO_ATTR[np.clip(self.token_type, 0, len(_TYPE_TO_ATTR) - 1)], ATTR_UNDEFINED)
        # a BYTE token must read <0xXX> (its piece is that byte); one that does not is kept as the normal text it is
        for i in np.flatnonzero(attrs & ATTR_BYTE).tolist():
            if not _BYTE_TOKEN.fullmatch(tokens[i]):
                attrs[i] = ATTR_NORMAL

        scores = _num_array(meta, "tokenizer.ggml.scores", n)
        if scores is not None:
            # array('f'): float32 storage (1 MiB for a 262k vocabulary, not 8 as a list), indexing gives Python floats
            with np.errstate(all="ignore"):
                sc = np.nan_to_num(np.asarray(scores[:n], dtype=np.float32), nan=-np.inf)
            self._scores = array("f", sc.tobytes())
        else:
            self._scores = None

        # ---- flags and special-id defaults per model / pre-tokenizer
        self.ignore_merges = False
        self.clean_spaces = False
        self.add_sep = False
        null = None
        if self.is_spm:
            bos, eos, unk = 1, 2, 0
            self.add_space_prefix, self.add_bos, self.add_eos = True, True, False
            self._regexes = []
            self._ranks = None
        else:
            bos, eos, unk = 11, 11, null
            self.add_space_prefix, self.add_bos, self.add_eos = False, False, False
            self.clean_spaces = True
            pre_key = self.pre or "default"
            if pre_key not in _PRE_TYPES:
                from llamba.gguf import short
                raise UnsupportedError(f"unsupported BPE pre-tokenizer '{short(self.pre, 40)}' (tokenizer.ggml.pre); "
                                       f"llamba supports {len(SUPPORTED_PRE)} of them: "
                                       f"{short(', '.join(SUPPORTED_PRE), 100)}")
            family, flags = _PRE_TYPES[pre_key]
            self.pre_family = family
            self._regexes = _compiled(_PRE_REGEXES[family])
            self.ignore_merges = flags.get("ignore_merges", False)
            self.add_bos = flags.get("add_bos", False)
            self.clean_spaces = flags.get("clean_spaces", True)
            if flags.get("no_bos"):
                bos = null
            merges = meta.get("tokenizer.ggml.merges")
            if not _is_str_seq(merges):
                what = "without" if merges is None else "with a malformed (not an array of strings)"
                raise GGUFError(f"BPE vocabulary {what} 'tokenizer.ggml.merges'; re-convert the model")
            if not hasattr(merges, "byte_lengths"):
                merges = list(merges)
            # key "left right" -> rank; the first occurrence of a duplicate wins (std::unordered_map::emplace)
            self._ranks = StrIndex(merges, last_wins=False)
        if self.is_spm:
            self.pre_family = "spm"
        v = meta.get("tokenizer.ggml.add_space_prefix")
        if isinstance(v, (bool, np.bool_)):
            self.add_space_prefix = bool(v)

        # ---- special token ids: default (disabled when out of range), then the GGUF key when in range
        def special(key, default):
            if default is not None and not 0 <= default < n:
                default = None
            v = meta.get("tokenizer.ggml." + key)
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= int(v) < n:
                return int(v)
            return default

        self.bos_id = special("bos_token_id", bos)
        self.eos_id = special("eos_token_id", eos)
        self.eot_id = special("eot_token_id", None)
        self.eom_id = special("eom_token_id", None)
        self.unk_id = special("unknown_token_id", unk)
        self.sep_id = special("seperator_token_id", None)
        self.pad_id = special("padding_token_id", None)
        self.mask_id = special("mask_token_id", None)
        self.fim_pre_id = special("fim_pre_token_id", None)
        self.fim_suf_id = special("fim_suf_token_id", None)
        self.fim_mid_id = special("fim_mid_token_id", None)
        self.fim_pad_id = special("fim_pad_token_id", None)
        self.fim_rep_id = special("fim_rep_token_id", None)
        self.fim_sep_id = special("fim_sep_token_id", None)
        self.fim_pre_id = special("prefix_token_id", self.fim_pre_id)  # deprecated spellings, read last
        self.fim_suf_id = special("suffix_token_id", self.fim_suf_id)
        self.fim_mid_id = special("middle_token_id", self.fim_mid_id)

        for key, name in (("add_bos_token", "add_bos"), ("add_eos_token", "add_eos"), ("add_sep_token", "add_sep")):
            v = meta.get("tokenizer.ggml." + key)
            if isinstance(v, (bool, np.bool_)):
                setattr(self, name, bool(v))

        # ---- llama.cpp's load-time attribute fixes and EOG set
        tok2id = self._tok2id

        def mark_control(i):
            if not attrs[i] & ATTR_CONTROL:
                attrs[i] |= ATTR_CONTROL

        def detect(current, texts):
            if current is not None:
                return current
            for t in texts:
                i = tok2id.get(t)
                if i is not None:
                    mark_control(i)
                    return i
            return None

        self.eot_id = detect(self.eot_id, _EOT_TEXTS)
        self.eom_id = detect(self.eom_id, _EOM_TEXTS)
        self.fim_pre_id = detect(self.fim_pre_id, _FIM_PRE_TEXTS)
        self.fim_suf_id = detect(self.fim_suf_id, _FIM_SUF_TEXTS)
        self.fim_mid_id = detect(self.fim_mid_id, _FIM_MID_TEXTS)
        self.fim_pad_id = detect(self.fim_pad_id, _FIM_PAD_TEXTS)
        self.fim_rep_id = detect(self.fim_rep_id, _FIM_REP_TEXTS)
        self.fim_sep_id = detect(self.fim_sep_id, _FIM_SEP_TEXTS)

        ctrl = np.nonzero(attrs & ATTR_CONTROL)[0]  # control tokens named "unused..." are unused
        attrs[ctrl[_contains(tokens, ctrl, "unused")]] |= ATTR_UNUSED

        eog = set()
        for i in (self.fim_pad_id, self.fim_rep_id, self.fim_sep_id):
            if i is not None:
                eog.add(i)
        for t in EOG_TEXTS:
            i = tok2id.get(t)
            if i is not None:
                eog.add(i)
                mark_control(i)
        for t in _ALWAYS_RENDER:
            i = tok2id.get(t)
            if i is not None:
                attrs[i] = ATTR_USER_DEFINED
        for i in (self.eos_id, self.eot_id, self.eom_id):
            if i is not None:
                eog.add(i)
        texts_in_eog = {tokens[i]: i for i in eog}
        if "<|end|>" in texts_in_eog and (("<|return|>" in texts_in_eog and "<|call|>" in texts_in_eog)
                                          or ("<|calls|>" in texts_in_eog and "<|flush|>" in texts_in_eog)):
            i = texts_in_eog["<|end|>"]  # o200k_harmony / solar-open: <|end|> is not end-of-generation
            eog.discard(i)
            attrs[i] = ATTR_USER_DEFINED
        if "</s>" in texts_in_eog and ("<|tool_response>" in texts_in_eog or "<|plamo:eos|>" in texts_in_eog):
            i = texts_in_eog["</s>"]
            eog.discard(i)
            attrs[i] = ATTR_NORMAL
        self.eog_ids: frozenset[int] = frozenset(eog)

        # ---- special-token partition candidates, longest (in bytes) first; ties by id
        cand = np.nonzero(attrs & _ATTR_PARTITION)[0].tolist()
        cand_b = _utf8_of(tokens, cand)
        self.special_ids: list[int] = sorted(cand, key=lambda i: -len(cand_b[i]))
        self._special_bytes = cand_b

        # ---- per-model LSTRIP / RSTRIP attributes (set after the caches, as llama.cpp does)
        name = str(meta.get("general.name", "")).lower()
        arch = str(meta.get("general.architecture", ""))
        pre_s = self.pre

        def set_attr(text, bit, value):
            i = tok2id.get(text)
            if i is not None:
                attrs[i] = attrs[i] | bit if value else attrs[i] & ~bit

        if any(s in pre_s for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
                any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
            set_attr("<mask>", ATTR_LSTRIP, True)
        elif "phi-3" in name or "phi3" in name:
            for i in self.special_ids:
                attrs[i] |= ATTR_RSTRIP
            set_attr("</s>", ATTR_RSTRIP, True)
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                set_attr(t, ATTR_RSTRIP, False)
        elif "modern-bert" in name:
            set_attr("[MASK]", ATTR_LSTRIP, True)

        self.attrs = array("i", attrs.astype(np.int32).tobytes())  # compact; indexing gives ints
        part_all = [(cand_b[i], i, self.attrs[i]) for i in self.special_ids]
        part_user = [c for c in part_all if not c[2] & (ATTR_CONTROL | ATTR_UNKNOWN)]
        self._partition_sets = (_PartitionSet(part_user), _PartitionSet(part_all))
        self._pieces: dict = {}
        self._word_cache: dict = {}
        self._spm_cache: dict = {}
        self._byte_tokens: list | None = None
        self._srank: list | None = None

    # ------------------------------------------------------------ small queries

    def __repr__(self):
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos}, add_eos={self.add_eos})")

    def __len__(self):
        return self.n_vocab

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def token_id(self, text: str) -> int | None:
        """Id of the token whose text is exactly `text`, or None."""
        return self._tok2id.get(text)

    def is_control(self, token_id: int) -> bool:
        return bool(self.attrs[self._check_id(token_id)] & ATTR_CONTROL)

    def _check_id(self, token_id) -> int:
        """token_id as an int in [0, n_vocab), else TokenIdError (a ValueError)."""
        t = int(token_id)
        if not 0 <= t < self.n_vocab:
            raise TokenIdError(f"token id {t} is out of range for a vocabulary of {self.n_vocab} tokens")
        return t

    @property
    def nl_id(self) -> int | None:
        """The newline token (llama.cpp's linefeed_id)."""
        if self.is_spm:
            return self._byte_token(0x0A)
        ids = self.encode("\n", add_bos=False)
        return ids[0] if ids else self.pad_id

    # ------------------------------------------------------------ encode

    def encode(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """llama_tokenize(text, add_special=add_bos, parse_special=special).

        `add_bos` adds the model's BOS and/or EOS as its add_bos / add_eos flags say (llama.cpp's add_special);
        `special` lets CONTROL / UNKNOWN token texts in `text` become those tokens (USER_DEFINED always do).
        """
        raw = _to_bytes(text) if isinstance(text, str) else bytes(text)
        frags = self._partition(raw, special) if raw else []
        out: list[int] = []
        if add_bos and self.add_bos:
            if self.bos_id is None:
                raise UnsupportedError("this vocabulary asks for a BOS token but defines none (add_bos_token is "
                                       "true, bos_token_id missing); encode with add_bos=False")
            out.append(self.bos_id)
        if self.is_spm:
            prev_special = True  # a space prefix goes before the first text fragment too
            for f in frags:
                if type(f) is int:
                    out.append(f)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    f = b" " + f
                self._spm_fragment(f.replace(b" ", _SPM_SPACE_B), out)
                prev_special = False
        else:
            for f in frags:
                if type(f) is int:
                    out.append(f)
                else:
                    self._bpe_fragment(f, out)
        if add_bos and self.add_eos:
            if self.eos_id is None:
                raise UnsupportedError("this vocabulary asks for an EOS token but defines none; "
                                       "encode with add_bos=False")
            out.append(self.eos_id)
        return out

    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama.cpp's spelling of `encode`."""
        return self.encode(text, add_bos=add_special, special=parse_special)

    def _partition(self, raw: bytes, special: bool) -> list:
        """tokenizer_st_partition: bytes fragments and int token ids."""
        cands = self._partition_sets[1 if special else 0].present(raw)
        frags: list = [raw]
        for tb, tid, attr in cands:
            lstrip = attr & ATTR_LSTRIP
            rstrip = attr & ATTR_RSTRIP
            ln = len(tb)
            new: list = []
            for f in frags:
                if type(f) is int:
                    new.append(f)
                    continue
                start = 0
                flen = len(f)
                while True:
                    i = f.find(tb, start)
                    if i < 0:
                        break
                    if i > start:
                        left = f[start:i]
                        if lstrip:
                            left = left.rstrip(_C_SPACE)
                        if left:
                            new.append(left)
                    new.append(tid)
                    start = i + ln
                    if rstrip:
                        while start < flen and f[start] in _C_SPACE:
                            start += 1
                if start == 0:
                    new.append(f)
                elif start < flen:
                    new.append(f[start:])
            frags = new
        return frags

    # ------------------------------------------------------------ BPE

    def pretokenize(self, text: str) -> list[str]:
        """The BPE pre-tokenizer pieces of `text` (before byte encoding)."""
        pieces = [text]
        for rx in self._regexes:
            out = []
            for p in pieces:
                pos = 0
                for m in rx.finditer(p):
                    s, e = m.span()
                    if s > pos:
                        out.append(p[pos:s])
                    out.append(p[s:e])
                    pos = e
                if pos < len(p):
                    out.append(p[pos:])
            pieces = out
        return pieces

    def _bpe_fragment(self, frag: bytes, out: list):
        try:
            text = frag.decode("utf-8")
        except UnicodeDecodeError:
            text = _lenient_utf8_decode(frag)
        cache = self._word_cache
        if len(cache) > _MAX_CACHE:
            cache.clear()
        for piece in self.pretokenize(text):
            ids = cache.get(piece)
            if ids is None:
                ids = cache[piece] = self._bpe_word(piece)
            out.extend(ids)

    def _bpe_word(self, piece: str) -> tuple:
        word = piece.encode("utf-8", "surrogatepass").decode("latin-1").translate(_BYTE_ENCODE_TABLE)
        tok2id = self._tok2id
        if self.ignore_merges:
            tid = tok2id.get(word)
            if tid is not None:
                return (tid,)
        syms = list(word)
        n = len(syms)
        if n > 1:
            ranks = self._ranks
            nxt = list(range(1, n + 1))
            nxt[-1] = -1
            prv = list(range(-1, n - 1))
            heap = []
            for i in range(n - 1):
                r = ranks.get(syms[i] + " " + syms[i + 1])
                if r is not None:
                    heap.append((r, i, i + 1, syms[i] + syms[i + 1]))
            heapq.heapify(heap)
            push, pop = heapq.heappush, heapq.heappop
            while heap:
                _, left, right, text = pop(heap)
                ls, rs = syms[left], syms[right]
                if not ls or not rs or ls + rs != text:
                    continue  # outdated
                syms[left] = text
                syms[right] = ""
                nr = nxt[right]
                nxt[left] = nr
                if nr >= 0:
                    prv[nr] = left
                p = prv[left]
                if p >= 0:
                    r = ranks.get(syms[p] + " " + text)
                    if r is not None:
                        push(heap, (r, p, left, syms[p] + text))
                if nr >= 0:
                    r = ranks.get(text + " " + syms[nr])
                    if r is not None:
                        push(heap, (r, left, nr, text + syms[nr]))
        ids = []
        for s in syms:
            if not s:
                continue
            tid = tok2id.get(s)
            if tid is not None:
                ids.append(tid)
                continue
            for b in s.encode("utf-8"):  # byte fallback: the token whose text is that single byte
                tid = tok2id.get(chr(b) if b < 0x80 else chr(0xDC00 + b))
                if tid is not None:
                    ids.append(tid)
        return tuple(ids)

    # ------------------------------------------------------------ SPM

    def _byte_token(self, b: int) -> int | None:
        """llama_vocab::byte_to_token for SPM: `<0xXX>`, else the single-byte token."""
        if self._byte_tokens is None:
            tbl = []
            for x in range(256):
                tid = self._tok2id.get(f"<0x{x:02X}>")
                if tid is None:
                    tid = self._tok2id.get(chr(x) if x < 0x80 else chr(0xDC00 + x))
                tbl.append(tid)
            self._byte_tokens = tbl
        return self._byte_tokens[b]

    def _score_ranks(self):
        """Per token: the dense rank of its score, 0 for the highest (equal scores share a rank)."""
        r = self._srank
        if r is None:
            sc = np.asarray(self._scores if self._scores is not None else np.zeros(self.n_vocab), dtype=np.float32)
            _, inv = np.unique(-sc, return_inverse=True)
            r = self._srank = array("q", inv.astype(np.int64).tobytes())  # compact; indexing gives ints
        return r

    def _spm_fragment(self, frag: bytes, out: list):
        cache = self._spm_cache
        ids = cache.get(frag)
        if ids is None:
            if len(cache) > _MAX_CACHE // 8:
                cache.clear()
            ids = cache[frag] = self._spm_session(frag)
        out.extend(ids)

    def _spm_session(self, frag: bytes) -> tuple:
        """llm_tokenizer_spm_session::tokenize on one (escaped) fragment."""
        try:
            s = frag.decode("utf-8")
            valid = True
            n = len(s)
            start = list(range(n))
            lens = [1] * n
        except UnicodeDecodeError:  # split by the UTF-8 lead byte, as llama.cpp does
            s = frag
            valid = False
            start, lens = [], []
            off, nb = 0, len(frag)
            while off < nb:
                ln = min(_utf8_len(frag[off]), nb - off)
                start.append(off)
                lens.append(ln)
                off += ln
            n = len(start)
        if n == 0:
            return ()

        if valid:
            def key(a, b):
                return s[a:b]
        else:
            def key(a, b):
                return s[a:b].decode("utf-8", "surrogateescape")

        tok2id = self._tok2id
        srank = self._score_ranks()
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        # heap items are ints (score rank, left, right, size) packed high to low: highest score first, then
        # leftmost, as llm_bigram_spm::comparator orders them
        heap: list = []
        rev_merge: dict = {}
        push, pop = heapq.heappush, heapq.heappop

        for i in range(1, n):
            a = start[i - 1]
            size = lens[i - 1] + lens[i]
            text = key(a, a + size)
            tid = tok2id.get(text)
            if tid is not None:
                heap.append((((srank[tid] << 32) | (i - 1)) << 64) | (i << 32) | size)
                rev_merge[text] = (i - 1, i)
        heapq.heapify(heap)
        mask = 0xFFFFFFFF
        while heap:
            item = pop(heap)
            size = item & mask
            right = (item >> 32) & mask
            left = (item >> 64) & mask
            ll, rl = lens[left], lens[right]
            if ll == 0 or rl == 0 or ll + rl != size:
                continue
            lens[left] = size
            lens[right] = 0
            nr = nxt[right]
            nxt[left] = nr
            if nr >= 0:
                prv[nr] = left
            p = prv[left]
            if p >= 0:  # try_add_bigram(prev, left)
                a = start[p]
                sz = lens[p] + size
                text = key(a, a + sz)
                tid = tok2id.get(text)
                if tid is not None:
                    push(heap, (((srank[tid] << 32) | p) << 64) | (left << 32) | sz)
                    rev_merge[text] = (p, left)
            if nr >= 0:  # try_add_bigram(left, next)
                a = start[left]
                sz = size + lens[nr]
                text = key(a, a + sz)
                tid = tok2id.get(text)
                if tid is not None:
                    push(heap, (((srank[tid] << 32) | left) << 64) | (nr << 32) | sz)
                    rev_merge[text] = (left, nr)

        ids: list[int] = []

        def resegment(i, depth=0):
            a = start[i]
            b = a + lens[i]
            text = key(a, b)
            tid = tok2id.get(text)
            if tid is not None:
                ids.append(tid)
                return
            p = rev_merge.get(text)
            if p is None or depth > 64 or i in p:
                raw = s[a:b].encode("utf-8", "surrogatepass") if valid else s[a:b]
                for byte in raw:
                    t = self._byte_token(byte)
                    if t is None:
                        t = self.unk_id  # llama.cpp would throw here (vocabulary without byte tokens)
                    if t is not None:
                        ids.append(t)
                return
            resegment(p[0], depth + 1)
            resegment(p[1], depth + 1)

        i = 0
        while i != -1:
            resegment(i)
            i = nxt[i]
        return tuple(ids)

    # ------------------------------------------------------------ decode

    def _piece(self, token_id: int) -> bytes:
        """token_to_piece(special=True) without lstrip (llama.cpp's cache_token_to_piece)."""
        p = self._pieces.get(token_id)
        if p is not None:
            return p
        attr = self.attrs[token_id]
        text = self.tokens[token_id]
        if attr & (_ATTR_SPECIAL | ATTR_USER_DEFINED):
            p = _to_bytes(text)
        elif attr & ATTR_NORMAL:
            if self.is_spm:
                p = _to_bytes(text.replace(_SPM_SPACE, " "))
            else:
                p = self._bpe_decode_text(text)
        elif attr & ATTR_BYTE:
            p = bytes([int(text[3:5], 16)])
        else:
            p = b""
        self._pieces[token_id] = p
        return p

    @staticmethod
    def _bpe_decode_text(text: str) -> bytes:
        """llama_decode_text: GPT-2 unicode -> bytes; unmapped characters become '[UNK_BYTE_0x..<text>]'."""
        try:
            return bytes([UNICODE_TO_BYTE[c] for c in text])
        except KeyError:
            pass
        out = bytearray()
        for c in text:
            b = UNICODE_TO_BYTE.get(c)
            if b is not None:
                out.append(b)
            else:
                out += b"[UNK_BYTE_0x" + _to_bytes(c).hex().encode() + _to_bytes(text) + b"]"
        return bytes(out)

    def token_to_piece(self, token_id: int, special: bool = False, lstrip: int = 0) -> bytes:
        """llama_token_to_piece: the bytes of one token. CONTROL / UNKNOWN tokens are empty unless `special`;
        up to `lstrip` leading spaces are dropped."""
        token_id = self._check_id(token_id)
        if not special and self.attrs[token_id] & _ATTR_SPECIAL:
            return b""
        p = self._piece(token_id)
        if lstrip:
            k = 0
            while k < lstrip and k < len(p) and p[k] == 0x20:
                k += 1
            p = p[k:]
        return p

    def decode(self, ids, special: bool = False, remove_special: bool = False) -> bytes:
        """llama_detokenize(ids, remove_special, unparse_special=special) as bytes.

        With `add_space_prefix` (SPM) the leading space of the first piece is dropped, unless `remove_special`
        removed a leading BOS; `remove_special` also drops a trailing EOS when the model adds one. BPE vocabularies
        with clean_up_tokenization_spaces get llama.cpp's space clean-up passes.
        """
        ids = [int(t) for t in ids]
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts = []
        for t in ids:
            parts.append(self.token_to_piece(t, special, 1 if remove_space else 0))
            remove_space = False
        text = b"".join(parts)
        if self.clean_spaces and text:
            text = _clean_spaces(text)
        return text

    def decode_text(self, ids, special: bool = False, errors: str = "replace") -> str:
        """`decode` as a str (invalid UTF-8 replaced)."""
        return self.decode(ids, special).decode("utf-8", errors)

    def stream_decoder(self, special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, special)


class _PartitionSet:
    """Special-token texts in partition order, indexed by their first three bytes so that only the tokens that
    occur in a text are scanned (6k+ control tokens in Gemma 3)."""

    def __init__(self, cands: list):
        self.cands = cands
        self.short: list[int] = []
        self.index: dict[bytes, list[int]] = {}
        for k, c in enumerate(cands):
            if len(c[0]) < 3:
                self.short.append(k)
            else:
                self.index.setdefault(c[0][:3], []).append(k)

    def present(self, raw: bytes) -> list:
        """The candidates that occur in `raw`, in partition order (fragments are substrings of raw, so no
        other candidate can match)."""
        cands = self.cands
        if not cands:
            return cands
        idx = list(self.short)
        if self.index and len(raw) >= 3:
            grams = {raw[i:i + 3] for i in range(len(raw) - 2)}
            for g in grams & self.index.keys():
                idx.extend(self.index[g])
            idx.sort()
        return [cands[k] for k in idx if cands[k][0] in raw]


def _clean_spaces(data: bytes) -> bytes:
    """The three clean_up_tokenization_spaces passes of llama_vocab::impl::detokenize, in place like the C++."""
    t = bytearray(data)
    sp, ap = 0x20, 0x27
    # first pass: " ?", " !", " .", " ,"
    total1 = len(t)
    total = 1 if total1 else 0
    for i in range(1, total1):
        x = t[i]
        if t[i - 1] == sp and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    # second pass: strip a single apostrophe between spaces
    total2 = total
    total = 1 if total2 else 0
    i = 1
    while i < total2:
        x = t[i]
        if x == ap and i + 1 < total2 and t[i - 1] == sp and t[i + 1] == sp:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    # third pass: apostrophe contractions " 's", " 'm", " 're", " 've"
    total3 = total
    total = 1 if total3 else 0
    for i in range(1, total3):
        x = t[i]
        if t[i - 1] == sp and x == ap and i + 1 < total3:
            x1 = t[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < total3:
                x2 = t[i + 2]
                if (x1 == 0x72 and x2 == 0x65) or (x1 == 0x76 and x2 == 0x65):  # "re", "ve"
                    total -= 1
        t[total] = x
        total += 1
    return bytes(t[:total])


class StreamDecoder:
    """Incremental detokenizer: `feed(id)` returns the newly completed UTF-8 text (a character split over several
    tokens appears once its last byte arrives); `flush()` returns what is left (invalid bytes as U+FFFD).
    Pieces are llama_token_to_piece(id, special) with no leading-space removal, as llama.cpp's CLI prints them."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        return self._dec.decode(self.tokenizer.token_to_piece(token_id, self.special))

    def feed_many(self, ids) -> str:
        return "".join(self.feed(t) for t in ids)

    def flush(self) -> str:
        s = self._dec.decode(b"", final=True)
        self._dec.reset()
        return s

    def reset(self):
        self._dec.reset()
