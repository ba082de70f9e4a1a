"""Chat templates: render `tokenizer.chat_template` (HF Jinja) in a sandbox, then tokenize it (docs/tokenizer.md).

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

import collections.abc
import contextvars
import functools
import json
import operator
import os
import re
import time
from datetime import datetime

from llamba.errors import LlambaError, ParameterError, TemplateError

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
    # no heap addresses of template-side objects in a message ("<... at 0x7f...>")
    return _ADDR.sub("", " ".join(str(msg).split()))


_ADDR = re.compile(r" (?:object )?at 0x[0-9a-fA-F]{4,}(?=>)")


class _TemplateRaised(Exception):
    """`raise_exception(...)` from inside a template (a user-facing message such as 'roles must alternate')."""


class _Stopped(Exception):
    """A render ran past its budget (steps, time, output or value size); the message says which."""


_MAX_REPEAT = 1 << 20  # longest string/list `*` may build
_MAX_POW_BITS = 1 << 20  # largest integer `**` (or `*`) may build, in bits
# Per-render budget (issue 11). Steps are loop iterations, calls, filters, operators and printed pieces; real chat
# templates take a few per message. Values (strings, lists) and the printed output are capped in characters /
# elements, scaled up for big inputs so a long conversation always renders.
MAX_STEPS = 1_000_000
MAX_SECONDS = 2.0
MAX_VALUE = 1 << 22
MAX_OUTPUT = 1 << 24
_MAX_WIDTH = 1_000_000  # largest width / precision / fill count a format or padding call may ask for


class _Budget:
    __slots__ = ("steps", "deadline", "out", "max_steps", "max_value", "max_out")

    def __init__(self, input_chars: int = 0):
        self.max_steps = max(MAX_STEPS, 4 * input_chars)
        self.max_value = max(MAX_VALUE, 2 * input_chars)
        self.max_out = max(MAX_OUTPUT, 4 * input_chars)
        self.steps = self.max_steps
        self.out = 0
        self.deadline = time.monotonic() + MAX_SECONDS


_BUDGET: contextvars.ContextVar = contextvars.ContextVar("llamba_template_budget", default=None)


def _budget() -> _Budget:
    b = _BUDGET.get()
    if b is None:  # rendered outside ChatTemplate.render: a budget of its own for this context
        b = _Budget()
        _BUDGET.set(b)
    return b


def _tick(b: _Budget | None = None) -> _Budget:
    b = b or _budget()
    b.steps -= 1
    if b.steps < 0:
        raise _Stopped(f"it ran more than {b.max_steps} steps (loop iterations, calls, filters)")
    if time.monotonic() > b.deadline:
        raise _Stopped(f"it ran longer than {MAX_SECONDS:g} s")
    return b


def _too_big(n: int, what: str = "a value"):
    b = _budget()
    if n > b.max_value:
        raise _Stopped(f"{what} would be {n} long, over the limit of {b.max_value}")


def _str_size(x, limit: int) -> int:
    """About how many characters str(x) has (containers: their repr), stopping early once past `limit`, so that
    printing a list holding a million references to a long string is refused before it is built."""
    from jinja2.utils import Namespace
    if isinstance(x, (str, bytes)):
        return len(x)
    if not isinstance(x, (list, tuple, dict, set, frozenset, Namespace)):
        return len(str(x)) if isinstance(x, int) and x.bit_length() < 20000 else 24
    total, stack, seen_ns = 0, [x], set()
    while stack:
        v = stack.pop()
        if isinstance(v, Namespace):
            if id(v) in seen_ns:
                total += 16
                continue
            seen_ns.add(id(v))
            v = v._Namespace__attrs
            total += 13
        if isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, (str, bytes)):
            total += len(v) + 2
        else:
            total += 24
        if total > limit:
            break
    return total


def _check_str(x, what: str = "a value") -> None:
    """Refuse to stringify x when its text would pass the value limit."""
    if isinstance(x, str):
        n = len(x)
    else:
        n = _str_size(x, _budget().max_value)
    _too_big(n, what)


def _checked(x):
    """A computed value: strings and containers past the value limit stop the render."""
    if isinstance(x, (str, bytes, list, tuple, dict)):
        _too_big(len(x))
    return x


class _Callable:
    """A template-visible function whose str() is harmless ("<function name>", no address)."""
    __slots__ = ("_fn", "_name")

    def __init__(self, name: str, fn):
        self._name, self._fn = name, fn

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __repr__(self):
        return f"<function {self._name}>"

    __str__ = __repr__


class _Method:
    """A method or function read from an attribute (`'a'.upper`, `loop.cycle`): str() shows its name only; the
    sandbox's `call` unwraps it, so the calls are checked as before."""
    __slots__ = ("_fn",)

    def __init__(self, fn):
        self._fn = fn

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __repr__(self):
        name = getattr(self._fn, "__name__", None)
        return f"<method {name}>" if isinstance(name, str) else "<method>"

    __str__ = __repr__


class _Iter:
    """An iterator from a filter (map, select, reverse, ...) with a harmless str()."""
    __slots__ = ("_it",)

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return iter(self._it)

    def __next__(self):
        return next(self._it)

    def __repr__(self):
        return "<generator>"

    __str__ = __repr__


class _Budgeted:
    """A for loop's iterable: each item takes a step of the render budget (len() still works for loop.length)."""
    __slots__ = ("_it",)

    def __init__(self, it):
        self._it = it

    def __len__(self):
        return len(self._it)

    def __iter__(self):
        b = _budget()
        for x in self._it:
            _tick(b)
            yield x


_PCT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")
_BIG_DIGITS = re.compile(r"\d{7,}")


def _check_percent(fmt: str, args) -> None:
    """`fmt % args` (the `%` operator, the `format` filter): widths and precisions are bounded."""
    star = False
    for m in _PCT_SPEC.finditer(fmt):
        for g in m.groups():
            if g == "*":
                star = True
            elif g and int(g) > _MAX_WIDTH:
                raise _Stopped(f"a format width or precision of {g} is over the limit of {_MAX_WIDTH}")
    vals = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    for v in vals:
        if star and isinstance(v, int) and abs(v) > _MAX_WIDTH:
            raise _Stopped(f"a format width of {v} is over the limit of {_MAX_WIDTH}")
        if not isinstance(v, (int, float)):
            _check_str(v)


def _arg(args, kwargs, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _check_method_call(obj, args, kwargs):
    """Builtin str/bytes/int methods that can build a value much larger than their inputs."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if not isinstance(owner, (str, bytes, int)) or isinstance(owner, bool):
        return args
    if name in ("ljust", "rjust", "center", "zfill", "to_bytes"):
        n = _arg(args, kwargs, 0, "width" if name != "to_bytes" else "length", 0)
        if isinstance(n, int):
            _too_big(n)
    elif name == "expandtabs" and isinstance(owner, (str, bytes)):
        n = _arg(args, kwargs, 0, "tabsize", 8)
        if isinstance(n, int):
            _too_big(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * max(n, 0))
    elif name == "replace" and isinstance(owner, (str, bytes)) and len(args) >= 2:
        old, new = args[0], args[1]
        if isinstance(old, (str, bytes)) and isinstance(new, (str, bytes)):
            try:
                k = owner.count(old) if old else len(owner) + 1
            except TypeError:
                return args
            _too_big(len(owner) + k * len(new))
    elif name == "join" and isinstance(owner, (str, bytes)) and args:
        seq = list(args[0])
        _too_big(len(owner) * max(len(seq) - 1, 0) + sum(len(s) if isinstance(s, (str, bytes)) else 0
                                                        for s in seq))
        args = (seq,) + tuple(args[1:])
    elif name == "translate" and isinstance(owner, str) and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        _too_big(len(owner) * max(longest, 1))
    return args


def _guard_filter(name: str, f):
    """A builtin filter with the render budget: a step per call, argument checks for the filters whose output can
    outgrow their input, a size check on the result, and iterators wrapped so their str() is harmless."""
    from jinja2.utils import _PassArg
    skip = 1 if _PassArg.from_obj(f) is not None else 0

    def pre(args, kwargs):
        a = args[skip:]
        if not a:
            return args
        v = a[0]
        if name in _STRINGIFYING and not isinstance(v, str):
            _check_str(v)
        if name == "center":
            w = _arg(a, kwargs, 1, "width", 80)
            if isinstance(w, int):
                _too_big(w)
        elif name == "indent":
            w = _arg(a, kwargs, 1, "width", 4)
            unit = len(w) if isinstance(w, str) else w if isinstance(w, int) else 0
            _too_big(len(str(v)) + (str(v).count("\n") + 1) * max(unit, 0))
        elif name == "replace":
            old, new = _arg(a, kwargs, 1, "old", ""), _arg(a, kwargs, 2, "new", "")
            s = str(v)
            k = (s.count(str(old)) if str(old) else len(s) + 1)
            _too_big(len(s) + k * len(str(new)))
        elif name == "wordwrap":
            w = _arg(a, kwargs, 1, "width", 79)
            sep = _arg(a, kwargs, 4, "wrapstring", None) or "\n"
            s = str(v)
            _too_big(len(s) + (len(s) // max(w if isinstance(w, int) else 1, 1) + 1) * len(str(sep)))
        elif name == "join":
            seq = list(v)
            d = _arg(a, kwargs, 1, "d", "")
            _too_big(len(str(d)) * max(len(seq) - 1, 0))
            _too_big(sum(_str_size(x, _budget().max_value) for x in seq))
            args = args[:skip] + (seq,) + tuple(a[1:])
        elif name == "format":
            _check_percent(str(v), tuple(a[1:]) if not kwargs else kwargs)
        elif name in ("batch", "slice"):
            n = _arg(a, kwargs, 1, "linecount" if name == "batch" else "slices", 1)
            if isinstance(n, int):
                _too_big(n, f"'{name}' count")
        elif name == "sum":
            seq = list(v)
            start = _arg(a, kwargs, 2, "start", 0)
            if not all(isinstance(x, (int, float)) for x in seq):
                _too_big(sum(len(x) for x in seq if isinstance(x, (str, list, tuple)))
                         + (len(start) if isinstance(start, (str, list, tuple)) else 0))
            args = args[:skip] + (seq,) + tuple(a[1:])
        elif name == "tojson":
            ind = _arg(a, kwargs, 2, "indent", None)
            unit = len(ind) if isinstance(ind, str) else ind if isinstance(ind, int) else 0
            if unit > 64:
                raise _Stopped(f"tojson indent {unit} is over the limit of 64")
            _too_big(_str_size(v, _budget().max_value) * (1 + max(unit, 0)))
        return args

    @functools.wraps(f)
    def guarded(*args, **kwargs):
        _tick()
        args = pre(args, kwargs)
        r = f(*args, **kwargs)
        if isinstance(r, collections.abc.Iterator) and not isinstance(r, (str, bytes)):
            return _Iter(r)
        return _checked(r)

    return guarded


# filters that stringify their value (str() of a container is its repr: checked before it is built)
_STRINGIFYING = frozenset({
    "string", "upper", "lower", "capitalize", "title", "trim", "striptags", "wordcount", "truncate", "wordwrap",
    "center", "indent", "replace", "format", "urlize", "urlencode", "escape", "e", "forceescape", "safe", "pprint",
    "reverse", "list"})


def _make_env():
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.runtime import LoopContext, Undefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter, \
        safe_range
    from jinja2.utils import Cycler, Joiner, Namespace, generate_lorem_ipsum
    from jinja2.visitor import NodeTransformer
    from markupsafe import Markup

    class GenerationBlock(Extension):
        """`{% generation %}…{% endgeneration %}` (HF's assistant-mask marker): rendered as its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def _flt(node, name):
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    class Guard(NodeTransformer):
        """Budget hooks compiled into every template: each for-loop item, each printed piece and each `~`
        concatenation goes through a (context-taking, so never constant-folded) llamba_* filter."""

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = _flt(node.iter, "llamba_iter")
            return node

        def visit_Output(self, node):
            node = self.generic_visit(node)
            node.nodes = [_flt(n, "llamba_out") for n in node.nodes]
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return _flt(nodes.List(node.nodes, lineno=node.lineno), "llamba_concat")

    class _SpecCheck:
        def format_field(self, value, format_spec):
            _tick()
            if _BIG_DIGITS.search(format_spec):
                raise _Stopped(f"a format width or precision in {format_spec[:20]!r} is over the limit of "
                               f"{_MAX_WIDTH}")
            if not isinstance(value, (int, float)):
                _check_str(value)
            return super().format_field(value, format_spec)

    class Formatter(_SpecCheck, SandboxedFormatter):
        pass

    class EscapeFormatter(_SpecCheck, SandboxedEscapeFormatter):
        pass

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"**", "*", "+", "%"})

        def _parse(self, source, name, filename):
            tree = Guard().visit(super()._parse(source, name, filename))
            tree.set_environment(self)
            return tree

        def unsafe_undefined(self, obj, attribute):
            # the stock sandbox returns an Undefined that only fails when used; fail right here instead
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

        def getattr(self, obj, attribute):
            v = super().getattr(obj, attribute)
            if isinstance(v, Undefined) and isinstance(attribute, str) and attribute.startswith("_"):
                raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not "
                                    f"allowed")
            return _proxy(v)

        def getitem(self, obj, argument):
            return _proxy(super().getitem(obj, argument))

        def wrap_str_format(self, value):
            # jinja2's, with formatters that bound widths / precisions and the size of what they print
            import types
            if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or \
                    value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
                return None
            f_self = value.__self__
            is_map = value.__name__ == "format_map"
            fmt = EscapeFormatter(self, escape=f_self.escape) if isinstance(f_self, Markup) else Formatter(self)
            str_type = type(f_self)

            def wrapper(*args, **kwargs):
                if is_map:
                    if kwargs or len(args) != 1:
                        raise TypeError("format_map() takes exactly one positional argument")
                    kwargs, args = args[0], ()
                return _checked(str_type(fmt.vformat(f_self, args, kwargs)))

            return wrapper

        def call_binop(self, context, op, left, right):
            _tick()
            if op == "**":
                if isinstance(left, int) and isinstance(right, int) and right > 0 and \
                        max(left.bit_length(), 1) * right > _MAX_POW_BITS:
                    raise SecurityError("power too large")
                return operator.pow(left, right)
            if op == "+":
                if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                    _too_big(len(left) + len(right))
                return operator.add(left, right)
            if op == "%":
                if isinstance(left, str):
                    _check_percent(left, right)
                return _checked(operator.mod(left, right))
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                    raise SecurityError("sequence repetition too large")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > _MAX_POW_BITS:
                raise SecurityError("product too large")
            return operator.mul(left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
            _tick()
            if isinstance(__obj, _Method):
                __obj = __obj._fn
            if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive loop
                args = (_Budgeted(args[0]),) + args[1:]
            args = _check_method_call(__obj, args, kwargs)
            return _checked(super().call(__context, __obj, *args, **kwargs))

    def _proxy(v):
        if callable(v) and not isinstance(v, (Undefined, _Callable, _Method, type)):
            return _Method(v)
        return v

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationBlock])

    def raise_exception(message):
        raise _TemplateRaised(message)

    def strftime_now(fmt):
        if not isinstance(fmt, str) or len(fmt) > 1000:
            raise _TemplateRaised("strftime_now expects a format string (at most 1000 characters)")
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

        def __repr__(self):
            return "<function dict>"

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

    class TemplateCycler(Cycler):
        def __repr__(self):
            return f"<cycler of {len(self.items)}>"

    class TemplateJoiner(Joiner):
        def __repr__(self):
            return "<joiner>"

    def lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 - jinja2's parameter names
        if not all(isinstance(v, int) for v in (n, min, max)) or n > 100 or max > 1000 or min > max:
            raise _Stopped("lipsum is limited to n <= 100 paragraphs of at most 1000 words")
        return generate_lorem_ipsum(n, html, min, max)

    def iter_filter(context, it):
        return _Budgeted(it)

    def out_filter(context, v):
        b = _tick()
        if not isinstance(v, str):
            _check_str(v, "a printed value")
            v = str(v)
        b.out += len(v)
        if b.out > b.max_out:
            raise _Stopped(f"its output passed {b.max_out} characters")
        return v

    def concat_filter(context, parts):
        _tick()
        for p in parts:
            if not isinstance(p, str):
                _check_str(p)
        _too_big(sum(len(p) if isinstance(p, str) else 0 for p in parts))
        return "".join(map(str, parts))

    from jinja2.utils import pass_context
    env.filters["tojson"] = tojson
    env.filters = {k: _guard_filter(k, f) for k, f in env.filters.items()}
    env.filters["llamba_iter"] = pass_context(iter_filter)
    env.filters["llamba_out"] = pass_context(out_filter)
    env.filters["llamba_concat"] = pass_context(concat_filter)
    env.globals.update(
        raise_exception=_Callable("raise_exception", raise_exception),
        strftime_now=_Callable("strftime_now", strftime_now),
        dict=TemplateDict(),
        namespace=_Callable("namespace", TemplateNamespace),
        cycler=_Callable("cycler", TemplateCycler),
        joiner=_Callable("joiner", TemplateJoiner),
        lipsum=_Callable("lipsum", lipsum),
        range=_Callable("range", safe_range),
    )
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


_MAX_DEPTH = 100  # deepest nesting of message / tool / keyword values (JSON schemas of tools nest ~10)


def _plain(x, _depth: int = 0):
    """A copy made of plain JSON types only (str/int/float/bool/None, dicts, lists): templates then never see an
    object whose methods the sandbox does not know about. Anything else becomes its str(). Nesting deeper than
    _MAX_DEPTH levels (or a structure that contains itself) is a ParameterError, not a RecursionError."""
    if x is None or type(x) in (str, int, float, bool):
        return x
    if _depth >= _MAX_DEPTH:
        raise ParameterError(f"chat messages / template arguments are nested more than {_MAX_DEPTH} levels deep")
    if type(x).__module__ == "numpy" and hasattr(x, "item"):  # numpy scalars and arrays
        return _plain(x.item() if getattr(x, "ndim", 0) == 0 else x.tolist(), _depth + 1)
    if isinstance(x, str):
        return str.__str__(x)
    if isinstance(x, int):
        return int.__int__(x)
    if isinstance(x, float):
        return float.__float__(x)
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            k = _plain(k, _depth + 1)
            out[k if k is None or type(k) in (str, int, float, bool) else str(k)] = _plain(v, _depth + 1)
        return out
    if isinstance(x, (list, tuple)):
        return [_plain(v, _depth + 1) for v in x]
    try:
        return str(x)
    except Exception as e:  # noqa: BLE001 - an object whose __str__ fails
        raise ParameterError(f"a {type(x).__name__} value in the chat messages cannot be converted to text: "
                             f"{_one_line(e)[:200]}") from None


def _text_size(x) -> int:
    """Characters of text in a _plain() value (the render budget grows with its input)."""
    n, stack = 0, [x]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            n += len(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return n


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
            raise TemplateError(f"chat template '{name}' does not compile{where}: {_msg(e)}") from None

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
        token = _BUDGET.set(_Budget(_text_size(variables)))
        try:
            text = self._tmpl.render(**variables)
        except _TemplateRaised as e:
            raise TemplateError(f"chat template: {_msg(e)}") from None
        except _Stopped as e:
            raise TemplateError(f"chat template '{self.name}' was stopped: {_msg(e)}") from None
        except SecurityError as e:
            raise TemplateError(f"chat template '{self.name}' was stopped by the sandbox: {_msg(e)}") from None
        except RecursionError:
            raise TemplateError(f"chat template '{self.name}' recursed too deeply") from None
        except MemoryError:
            raise TemplateError(f"chat template '{self.name}' ran out of memory") from None
        except Exception as e:  # noqa: BLE001 - UndefinedError, TypeError, ... inside the template
            raise TemplateError(f"chat template '{self.name}' failed to render: {type(e).__name__}: "
                                f"{_msg(e)}") from None
        finally:
            _BUDGET.reset(token)
        # the template-visible objects print without addresses; this catches any other "<... at 0x...>"
        return _ADDR.sub("", text) if " at 0x" in text else text


def _msg(e, limit: int = 300) -> str:
    """An exception's text on one line, without heap addresses, at most `limit` characters."""
    s = _one_line(e)
    return s if len(s) <= limit else s[:limit] + "..."


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
        it = llm.chat_stream(toks, **self.gen_kwargs)  # validates before the first piece
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
