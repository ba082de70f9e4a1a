"""Chat templates: render `tokenizer.chat_template` (HF Jinja) in a sandbox, then tokenize it (ENGINE_BRIEF §5.5).

    tmpl = ChatTemplate.for_model(metadata, tokenizer)          # or ChatTemplate.load("chatml", ...)
    text = tmpl.render(messages, add_generation_prompt=True)    # HF `apply_chat_template(tokenize=False)`
    ids = encode_chat_prompt(tokenizer, text)                   # special tokens parsed, BOS not doubled

Rendering follows transformers' `apply_chat_template`: `ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)` with the loop-controls extension, a no-op `{% generation %}` block, `raise_exception`,
`strftime_now`, HF's `tojson`, and the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
`tools`, plus any extra keyword (e.g. `enable_thinking`). Templates cannot reach Python internals: any unsafe
attribute access fails at once with a one-line `LlambaError`.

`ChatSession` keeps a conversation on one `Llama` (multi-turn with KV-cache prefix reuse); it does not print.
"""
from __future__ import annotations

import json
import operator
import os
from datetime import datetime

from llamba.errors import LlambaError

# ---------------------------------------------------------------- built-in templates (for models without one)

_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Gemma 2/3 instruction format (system text is folded into the first user turn; roles must alternate).
_GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

_LLAMA3 = (
    "{%- for message in messages %}"
    "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{%- if loop.index0 == 0 %}{%- set content = bos_token + content %}{%- endif %}"
    "{{- content }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{%- set msgs = messages[1:] %}"
    "{%- else %}{%- set sys = '' %}{%- set msgs = messages %}{%- endif %}"
    "{%- for message in msgs %}"
    "{%- if message['role'] == 'user' %}"
    "{{- bos_token + '[INST] ' + (sys if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

_ZEPHYR = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

_PHI3 = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

# name -> (template, extra stop strings for models whose end-of-turn marker is not an EOG token)
BUILTIN_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (_CHATML, ("<|im_end|>",)),
    "gemma": (_GEMMA, ("<end_of_turn>",)),
    "llama3": (_LLAMA3, ("<|eot_id|>",)),
    "llama2": (_LLAMA2, ()),
    "zephyr": (_ZEPHYR, ("<|user|>",)),
    "phi3": (_PHI3, ("<|end|>",)),
}
_ALIASES = {"llama-3": "llama3", "llama-2": "llama2", "gemma3": "gemma", "gemma2": "gemma", "qwen": "chatml",
            "phi-3": "phi3", "mistral": "llama2"}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_TEMPLATES)


# ---------------------------------------------------------------- the sandbox

def _one_line(msg) -> str:
    return " ".join(str(msg).split())


class _SandboxError(Exception):
    pass


class _TemplateRaised(Exception):
    """`raise_exception(...)` from inside a template (a user-facing message such as 'roles must alternate')."""


_MAX_REPEAT = 1 << 20  # longest string/list `*` may build
_MAX_POW_BITS = 1 << 20  # largest integer `**` may build, in bits


def _make_env():
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class GenerationBlock(Extension):
        """`{% generation %}…{% endgeneration %}` (HF's assistant-mask marker): rendered as its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"**", "*"})

        def unsafe_undefined(self, obj, attribute):
            # the stock sandbox returns an Undefined that only fails when used; fail right here instead
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

        def call_binop(self, context, op, left, right):
            if op == "**":
                if isinstance(left, int) and isinstance(right, int) and right > 0 and \
                        max(left.bit_length(), 1) * right > _MAX_POW_BITS:
                    raise SecurityError("power too large")
                return operator.pow(left, right)
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                    raise SecurityError("sequence repetition too large")
            return operator.mul(left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationBlock])

    def raise_exception(message):
        raise _TemplateRaised(message)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' version: unlike Jinja's own, no HTML escaping and keyword arguments honoured
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        """`dict(...)` for templates, without the type object itself."""
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(Namespace):
        """`namespace(...)` that refuses underscore names (as transformers does)."""
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a namespace attribute may not start with '_' (got {name!r})")

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


_ENV = None


def _env():
    global _ENV
    if _ENV is None:
        _ENV = _make_env()
    return _ENV


# ---------------------------------------------------------------- messages

_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(x):
    """A copy made of plain JSON types only (str/int/float/bool/None, dicts, lists): templates then never see an
    object whose methods the sandbox does not know about. Anything else becomes its str()."""
    if x is None or type(x) in (str, int, float, bool):
        return x
    if type(x).__module__ == "numpy" and hasattr(x, "item"):  # numpy scalars and arrays
        return _plain(x.item() if getattr(x, "ndim", 0) == 0 else x.tolist())
    if isinstance(x, str):
        return str.__str__(x)
    if isinstance(x, int):
        return int.__int__(x)
    if isinstance(x, float):
        return float.__float__(x)
    if isinstance(x, dict):
        return {_plain(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return str(x)


def normalize_messages(messages) -> list[dict]:
    """Check OpenAI-style messages and copy them for rendering: content parts of type "text" are joined into
    one string (the form every text template handles), a null content becomes ""."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LlambaError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LlambaError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise LlambaError(f"messages[{i}].role must be one of {', '.join(_ROLES)} (got {role!r})")
        m = dict(m)
        c = m.get("content")
        if c is None and role not in ("assistant", "tool", "function"):
            raise LlambaError(f"messages[{i}] ({role}) has no 'content'")
        if c is None:
            m["content"] = ""
        elif isinstance(c, list):
            texts = []
            for j, part in enumerate(c):
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise LlambaError(f"messages[{i}].content[{j}]: only text content is supported (got {kind!r})")
            m["content"] = "\n".join(texts)
        elif not isinstance(c, str):
            raise LlambaError(f"messages[{i}].content must be a string, a list of text parts, or null")
        m = _plain(m)
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:  # transformers' aliases: templates read reasoning_content or thinking
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# ---------------------------------------------------------------- templates

class ChatTemplate:
    """A compiled chat template plus the token texts it is rendered with."""

    def __init__(self, source: str, *, name: str = "custom", bos_token: str = "", eos_token: str = "",
                 stop: tuple[str, ...] = (), extra_vars: dict | None = None):
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.stop = tuple(stop)  # extra stop strings (built-in templates only)
        self.extra_vars = dict(extra_vars or {})
        try:
            self._tmpl = _env().from_string(source)
        except Exception as e:  # noqa: BLE001 - TemplateSyntaxError and friends
            line = getattr(e, "lineno", None)
            where = f" (line {line})" if line else ""
            raise LlambaError(f"chat template '{name}' does not compile{where}: {_one_line(e)}") from None

    def __repr__(self):
        return f"ChatTemplate(name={self.name!r}, {len(self.source)} chars)"

    # ---- construction
    @classmethod
    def load(cls, spec: str, *, metadata: dict | None = None, tokenizer=None) -> "ChatTemplate":
        """`spec`: a built-in name (chatml, gemma, llama3, ...), a named variant stored in the model
        (`tokenizer.chat_template.<name>`, e.g. tool_use), a file path (read as a Jinja template), or the
        template text itself (anything containing '{{' or '{%')."""
        if not isinstance(spec, str) or not spec:
            raise LlambaError("chat template: give a built-in name, a file path or a Jinja template string")
        key = _ALIASES.get(spec.lower(), spec.lower())
        tv = _token_vars(tokenizer)
        if key in BUILTIN_TEMPLATES:
            src, stop = BUILTIN_TEMPLATES[key]
            return cls(src, name=key, stop=stop, **tv)
        meta = metadata or {}
        named = meta.get(f"tokenizer.chat_template.{spec}")
        if isinstance(named, str):
            return cls(named, name=spec, **tv)
        if os.path.isfile(spec):
            try:
                with open(spec, encoding="utf-8") as f:
                    src = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise LlambaError(f"cannot read chat template file {spec}: {_one_line(e)}") from None
            if spec.endswith(".json"):  # a tokenizer_config.json: take its chat_template
                src = _from_tokenizer_config(src, spec)
            return cls(src, name=os.path.basename(spec), **tv)
        if "{{" in spec or "{%" in spec:
            return cls(spec, name="custom", **tv)
        raise LlambaError(f"unknown chat template '{spec}': not a built-in ({', '.join(builtin_names())}) and "
                          f"no such file")

    @classmethod
    def for_model(cls, metadata: dict, tokenizer=None, override: str | None = None) -> "ChatTemplate":
        """The template to chat with: `override` when given, else the model's `tokenizer.chat_template`."""
        if override:
            return cls.load(override, metadata=metadata, tokenizer=tokenizer)
        src = metadata.get("tokenizer.chat_template")
        if not isinstance(src, str) or not src.strip():
            raise LlambaError(f"this model has no chat template (tokenizer.chat_template); pass chat_template=NAME|"
                              f"FILE (--chat-template), built-in: {', '.join(builtin_names())}")
        return cls(src, name="model", **_token_vars(tokenizer))

    # ---- rendering
    def render(self, messages, *, add_generation_prompt: bool = True, tools=None, **kwargs) -> str:
        """The prompt text, as transformers' `apply_chat_template(..., tokenize=False)` would give it."""
        msgs = normalize_messages(messages)
        if tools is not None and not isinstance(tools, (list, tuple)):
            raise LlambaError("'tools' must be a list of tool (function) definitions")
        variables = dict(self.extra_vars)
        variables.update(bos_token=self.bos_token, eos_token=self.eos_token)
        variables.update(_plain(kwargs))
        variables.update(messages=msgs, add_generation_prompt=bool(add_generation_prompt))
        if tools is not None:
            variables["tools"] = _plain(list(tools))
        from jinja2.exceptions import SecurityError
        try:
            return self._tmpl.render(**variables)
        except _TemplateRaised as e:
            raise LlambaError(f"chat template: {_one_line(e)}") from None
        except SecurityError as e:
            raise LlambaError(f"chat template '{self.name}' was stopped by the sandbox: {_one_line(e)}") from None
        except RecursionError:
            raise LlambaError(f"chat template '{self.name}' recursed too deeply") from None
        except Exception as e:  # noqa: BLE001 - UndefinedError, TypeError, ... inside the template
            raise LlambaError(f"chat template '{self.name}' failed to render: {type(e).__name__}: "
                              f"{_one_line(e)}") from None


def _token_vars(tokenizer) -> dict:
    if tokenizer is None:
        return {}

    def text(i):
        return tokenizer.tokens[i] if i is not None and 0 <= i < tokenizer.n_vocab else ""

    return {"bos_token": text(tokenizer.bos_id), "eos_token": text(tokenizer.eos_id)}


def _from_tokenizer_config(src: str, path: str) -> str:
    try:
        t = json.loads(src).get("chat_template")
    except (ValueError, AttributeError):
        raise LlambaError(f"{path} is not a JSON tokenizer config") from None
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if not isinstance(t, str):
        raise LlambaError(f"{path} has no chat_template")
    return t


def encode_chat_prompt(tokenizer, text: str) -> list[int]:
    """Tokenize a rendered chat prompt like llama.cpp: special tokens parsed, BOS added per the model, and a BOS
    text the template already emitted stripped first so the prompt does not start with two BOS tokens."""
    bos = tokenizer.bos_id
    if tokenizer.add_bos and bos is not None:
        btxt = tokenizer.tokens[bos]
        if btxt and text.startswith(btxt):
            text = text[len(btxt):]
    return tokenizer.encode(text, add_bos=True, special=True)


# ---------------------------------------------------------------- a multi-turn conversation

class ChatSession:
    """A conversation on one `Llama`. Each turn renders the whole history; since the history so far is a prefix of
    the next prompt, the session's prefix reuse only prefills the new tokens. Nothing is printed here.

    `send(text)` is a generator of answer pieces; closing it early (Ctrl-C) keeps the partial answer in the
    history. After a turn, `last` holds {n_prompt_tokens, n_reused, n_new, n_gen, extends, finish}."""

    def __init__(self, llm, system: str | None = None, **gen_kwargs):
        self.llm = llm
        self.system = system
        self.gen_kwargs = gen_kwargs
        self.messages: list[dict] = []
        self.last: dict = {}
        self._prev_text: str | None = None  # last rendered prompt + its answer
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._prev_text = None
        self.last = {}

    def send(self, text: str):
        llm = self.llm
        msgs = self.messages + [{"role": "user", "content": text}]
        prompt = llm.apply_chat_template(msgs, add_generation_prompt=True)
        extends = self._prev_text is not None and prompt.startswith(self._prev_text)
        toks = encode_chat_prompt(llm.tokenizer, prompt)
        it = llm._chat_stream_pieces(toks, **self.gen_kwargs)  # validates before the first piece
        self.messages = msgs
        pieces: list[str] = []
        finish = None
        try:
            for piece, fin in it:
                if piece:
                    pieces.append(piece)
                    yield piece
                if fin:
                    finish = fin
        finally:
            it.close()
            answer = "".join(pieces)
            self.messages = msgs + [{"role": "assistant", "content": answer}]
            self._prev_text = prompt + answer
            st = llm.last_stats
            self.last = {"n_prompt_tokens": len(toks), "n_reused": st.n_reused if st else 0,
                         "n_new": st.n_prompt if st else len(toks), "n_gen": st.n_gen if st else 0,
                         "extends": extends, "finish": finish or "interrupted", "stats": st}
