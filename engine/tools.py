"""Tool (function) calling for chat completions: the OpenAI `tools` / `tool_choice` / `parallel_tool_calls` surface
on top of a model's chat template.

Formats (detected from the chat template's source by `detect_format`):

  hermes   Qwen 2.5/3, Hermes, and any template that mentions `<tool_call>`:
               <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (one block per call)
  llama3   Llama 3.1+ JSON tool calling (a template with `<|python_tag|>`, or Llama 3 headers and "parameters"):
               {"name": "f", "parameters": {...}}    the whole answer; `<|python_tag|>` may precede it; several
               calls separated by ";"
  mistral  a template with `[TOOL_CALLS]`:  [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]
               (or, for templates that use `[ARGS]`, [TOOL_CALLS]f[ARGS]{...} per call)
  generic  a template with no tool syntax (e.g. SmolLM2's ChatML): the tools are written into the system prompt
               (GENERIC_SYSTEM below, one JSON definition per line inside <tools></tools>) and the model is asked
               for the hermes form, which is what is parsed. Assistant turns with tool_calls are rendered as that
               text, and `tool` messages as a user turn holding <tool_response>...</tool_response> blocks, so a
               template that knows nothing of tools still round-trips a tool conversation.

For the native formats the tools go to the template as its `tools` variable (as transformers'
apply_chat_template passes them), and assistant messages' `tool_calls[i].function.arguments` are given to the
template as a dict when the JSON string parses to one (HF templates iterate or `tojson` it).

tool_choice: "auto" (default when tools are given): the model's output is parsed, unconstrained; "none": the tools
are not rendered and nothing is parsed; "required": the output is constrained (llguidance Lark grammar with an
embedded JSON schema: anyOf over the functions, each {"name": const, "arguments": parameters}) to one call, or to
1-MAX_PARALLEL calls when parallel_tool_calls is true (default); {"type": "function", "function": {"name": N}}: as
required, for function N only.

Parsing gives OpenAI tool calls: {"id": "call_...", "type": "function", "function": {"name", "arguments"}} with
`arguments` the JSON text of the arguments object exactly as the model wrote it (so the streamed fragments,
`ToolStreamParser`, concatenate to the same string). Text before the first call is the message content (trailing
whitespace dropped; null when empty); text after the last call is dropped. Text that does not parse as a complete
call (malformed JSON, a call cut by max_tokens) is kept as content, and no tool call is reported.
"""
from __future__ import annotations

import json
import re
import secrets
import string

from llamba.errors import ParameterError

FORMATS = ("hermes", "llama3", "mistral", "generic")
MAX_PARALLEL = 8  # calls a constrained answer may hold when parallel_tool_calls is true

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_ALNUM = string.ascii_letters + string.digits

GENERIC_SYSTEM = (
    "You can call functions to help answer the user. The available functions are listed inside <tools></tools>, "
    "one JSON definition per line:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object holding its name and its arguments inside <tool_call></tool_call>"
    " tags, one block per call:\n<tool_call>\n{{\"name\": \"<function name>\", \"arguments\": {{<arguments as a JSON "
    "object>}}}}\n</tool_call>"
)


class ToolError(ParameterError):
    """Bad `tools`, `tool_choice`, `parallel_tool_calls` or tool-call messages (one line)."""


def call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


# ---------------------------------------------------------------- format detection

def detect_format(source: str | None) -> str:
    """The tool-call format a chat template's source speaks (see the module docstring)."""
    s = source or ""
    if "<tool_call>" in s:
        return "hermes"
    if "[TOOL_CALLS]" in s:
        return "mistral"
    if "<|python_tag|>" in s or ("<|start_header_id|>" in s and "parameters" in s and "tools" in s):
        return "llama3"
    return "generic"


# ---------------------------------------------------------------- request validation

def check_tools(tools) -> list[dict]:
    """Validated copies of OpenAI tool definitions: [{"type": "function", "function": {"name", "description"?,
    "parameters"}}]; a function without parameters gets {"type": "object", "properties": {}}."""
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ToolError(f"'tools' must be a list of {{\"type\": \"function\", \"function\": {{...}}}} objects, not "
                        f"{type(tools).__name__}")
    from llamba.chat import _plain
    tools = _plain(list(tools))  # plain JSON values; nesting past the limit is a ParameterError, not a RecursionError
    out, seen = [], set()
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise ToolError(f"tools[{i}] must be an object, not {type(t).__name__}")
        if t.get("type", "function") != "function":
            raise ToolError(f"tools[{i}].type must be 'function' (got {str(t.get('type'))[:40]!r})")
        f = t.get("function")
        if not isinstance(f, dict):
            raise ToolError(f"tools[{i}].function must be an object with a 'name'")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.', ':' or '-' "
                            f"(got {str(name)[:70]!r})")
        if name in seen:
            raise ToolError(f"tools[{i}]: function {name!r} is defined twice")
        seen.add(name)
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"tools[{i}].function.description must be a string")
        params = f.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object, not "
                            f"{type(params).__name__}")
        fn = {"name": name}
        if desc is not None:
            fn["description"] = desc
        fn["parameters"] = params
        for k in ("strict",):
            if k in f:
                fn[k] = f[k]
        out.append({"type": "function", "function": fn})
    return out


def check_tool_choice(tool_choice, tools: list[dict]) -> tuple[str, str | None]:
    """(mode, function name): mode is 'none', 'auto' or 'required' (a named function: 'required' + its name)."""
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise ToolError(f"tool_choice must be 'auto', 'none', 'required' or {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": ...}}}} (got {tool_choice[:40]!r})")
        if tool_choice == "required" and not tools:
            raise ToolError("tool_choice 'required' needs 'tools'")
        return (tool_choice if tools else "none"), None
    if isinstance(tool_choice, dict):
        f = tool_choice.get("function")
        name = f.get("name") if isinstance(f, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolError("tool_choice as an object must be {\"type\": \"function\", \"function\": {\"name\": "
                            "...}}")
        if name not in names:
            have = ", ".join(names) if names else "no tools were given"
            raise ToolError(f"tool_choice names function {name[:64]!r}, which is not in 'tools' ({have})")
        return "required", name
    raise ToolError(f"tool_choice must be a string or an object, not {type(tool_choice).__name__}")


def check_parallel(v) -> bool:
    if v is None:
        return True
    if not isinstance(v, bool):
        raise ToolError(f"parallel_tool_calls must be true or false (got {str(v)[:40]!r})")
    return v


# ---------------------------------------------------------------- messages for the template

def _args_obj(args):
    """A tool call's arguments for a template: a JSON string that parses to an object becomes the dict."""
    if isinstance(args, str):
        try:
            v = json.loads(args)
        except ValueError:
            return args
        return v if isinstance(v, dict) else args
    return args


def _args_text(args) -> str:
    if isinstance(args, str):
        return args
    return json.dumps(args, ensure_ascii=False)


def _check_calls(i, calls):
    if not isinstance(calls, (list, tuple)):
        raise ToolError(f"messages[{i}].tool_calls must be a list")
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ToolError(f"messages[{i}].tool_calls[{j}] must be {{\"id\", \"type\": \"function\", \"function\": "
                            f"{{\"name\", \"arguments\"}}}}")
        a = f.get("arguments")
        if a is not None and not isinstance(a, (str, dict)):
            raise ToolError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON string or an object")


def adapt_messages(messages, fmt: str, tools: list[dict] | None = None) -> list:
    """Messages as the template should see them (see the module docstring); `tools` (generic format only) are
    written into the system prompt. Messages that are not dicts are passed through for the chat module to refuse."""
    if not isinstance(messages, (list, tuple)):
        return messages
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
            continue
        calls = m.get("tool_calls")
        if calls is not None:
            _check_calls(i, calls)
        if fmt == "generic":
            if m.get("role") == "assistant" and calls:
                blocks = [format_call(c["function"]["name"], c["function"].get("arguments") or {}, "hermes")
                          for c in calls]
                text = m.get("content") if isinstance(m.get("content"), str) else ""
                m = {k: v for k, v in m.items() if k != "tool_calls"}
                m["content"] = (text.rstrip() + "\n" if text and text.strip() else "") + "\n".join(blocks)
            elif m.get("role") in ("tool", "function"):
                c = m.get("content")
                if isinstance(c, list):
                    c = "\n".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in c)
                block = f"<tool_response>\n{c if c is not None else ''}\n</tool_response>"
                prev = out[-1] if out else None
                if isinstance(prev, dict) and prev.get("_tool_turn"):
                    prev["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block, "_tool_turn": True})
                continue
        elif calls:
            m = dict(m)
            new = []
            for c in calls:
                c = dict(c)
                f = dict(c["function"])
                f["arguments"] = _args_obj(f.get("arguments") if f.get("arguments") is not None else {})
                c["function"] = f
                c.setdefault("type", "function")
                new.append(c)
            m["tool_calls"] = new
        out.append(m)
    for m in out:
        if isinstance(m, dict):
            m.pop("_tool_turn", None)
    if fmt == "generic" and tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        sys_text = GENERIC_SYSTEM.format(tools=listing)
        if out and isinstance(out[0], dict) and out[0].get("role") in ("system", "developer") and \
                isinstance(out[0].get("content"), str):
            out[0] = dict(out[0], content=out[0]["content"].rstrip() + "\n\n" + sys_text)
        else:
            out.insert(0, {"role": "system", "content": sys_text})
    return out


def format_call(name: str, arguments, fmt: str) -> str:
    """One call as the model writes it in `fmt` (used to render past calls for the generic format)."""
    a = _args_text(arguments)
    if fmt == "llama3":
        return '{"name": ' + json.dumps(name) + ', "parameters": ' + a + '}'
    if fmt == "mistral":
        return '[TOOL_CALLS][{"name": ' + json.dumps(name) + ', "arguments": ' + a + '}]'
    return '<tool_call>\n{"name": ' + json.dumps(name) + ', "arguments": ' + a + '}\n</tool_call>'


# ---------------------------------------------------------------- JSON scanning (complete or partial text)

_WS = " \t\r\n"


def _skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


def _scan_value(s: str, i: int) -> tuple[int, bool]:
    """From s[i] (the first character of a JSON value): (end, complete). Complete: s[i:end] is one whole value
    (checked by json.loads later); not complete: the value runs to the end of s (end = len(s))."""
    n = len(s)
    if i >= n:
        return n, False
    c = s[i]
    if c == '"':
        j = i + 1
        while j < n:
            if s[j] == "\\":
                j += 2
                continue
            if s[j] == '"':
                return j + 1, True
            j += 1
        return n, False
    if c in "{[":
        depth, j, in_str = 0, i, False
        while j < n:
            ch = s[j]
            if in_str:
                if ch == "\\":
                    j += 2
                    continue
                if ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1, True
            j += 1
        return n, False
    j = i  # a number, true, false, null: ends at a delimiter
    while j < n and s[j] not in _WS + ",}]":
        j += 1
    return j, j < n


class _Call:
    __slots__ = ("start", "name", "args", "args_done", "done", "end", "bad")

    def __init__(self, start):
        self.start = start  # where the call's text begins (content ends before the first call)
        self.name = None  # str once complete
        self.args = ""  # the arguments' text so far
        self.args_done = False
        self.done = False  # the call's text is complete
        self.end = start
        self.bad = False  # cannot be a call (malformed)


def _scan_object_call(s: str, i: int, call: _Call, arg_keys=("arguments", "parameters")) -> int:
    """Scan {"name": ..., "arguments": {...}} from s[i] into `call`; returns the position after it (or len(s))."""
    n = len(s)
    i = _skip_ws(s, i)
    if i >= n:
        return n
    if s[i] != "{":
        call.bad = True
        return i
    i += 1
    while True:
        i = _skip_ws(s, i)
        if i >= n:
            return n
        if s[i] == "}":
            call.done = True
            return i + 1
        if s[i] == ",":
            i += 1
            continue
        if s[i] != '"':
            call.bad = True
            return i
        ke, ok = _scan_value(s, i)
        if not ok:
            return n
        try:
            key = json.loads(s[i:ke])
        except ValueError:
            call.bad = True
            return ke
        i = _skip_ws(s, ke)
        if i >= n:
            return n
        if s[i] != ":":
            call.bad = True
            return i
        i = _skip_ws(s, i + 1)
        if i >= n:
            return n
        ve, ok = _scan_value(s, i)
        if key == "name":
            if ok:
                try:
                    v = json.loads(s[i:ve])
                except ValueError:
                    call.bad = True
                    return ve
                if not isinstance(v, str):
                    call.bad = True
                    return ve
                call.name = v
        elif key in arg_keys and not call.args_done:
            if s[i] != "{":
                call.bad = True
                return i
            call.args = s[i:ve]
            if ok:
                call.args_done = True
        if not ok:
            return n
        i = ve


def _prefix_len(s: str, marker: str) -> int:
    """Length of the longest suffix of s that is a proper prefix of marker (text held back as maybe a marker)."""
    for k in range(min(len(s), len(marker) - 1), 0, -1):
        if marker.startswith(s[-k:]):
            return k
    return 0


# ---------------------------------------------------------------- per-format scanners

class _Scan:
    """What a (possibly partial) answer holds: content_end (text before it is content for sure), calls, and
    whether the text could still become a call (hold)."""

    def __init__(self):
        self.content_end = 0
        self.calls: list[_Call] = []
        self.bad = False


def _scan_hermes(s: str) -> _Scan:
    sc = _Scan()
    open_t, close_t = "<tool_call>", "</tool_call>"
    i = s.find(open_t)
    if i < 0:
        sc.content_end = len(s) - _prefix_len(s, open_t)
        return sc
    sc.content_end = i
    while i >= 0:
        call = _Call(i)
        sc.calls.append(call)
        j = _scan_object_call(s, i + len(open_t), call)
        if call.bad:
            sc.bad = True
            return sc
        if not call.done:
            return sc
        j = _skip_ws(s, j)
        rest = s[j:j + len(close_t)]
        if not close_t.startswith(rest):
            call.bad = sc.bad = True
            return sc
        if len(rest) < len(close_t):
            call.done = False  # the closing tag is still coming
            return sc
        call.end = j + len(close_t)
        k = _skip_ws(s, call.end)
        if not s.startswith(open_t, k):
            return sc  # trailing text (or a partial next marker) is not content
        i = k
    return sc


def _scan_llama3(s: str) -> _Scan:
    sc = _Scan()
    tag = "<|python_tag|>"
    t = s.find(tag)
    if t >= 0:
        sc.content_end = t
        i = t + len(tag)
    else:
        i = _skip_ws(s, 0)
        if i >= len(s) or tag.startswith(s[i:]):
            sc.content_end = i if i < len(s) else 0
            return sc
        if s[i] != "{":  # plain text; a <|python_tag|> may still come
            sc.content_end = len(s) - _prefix_len(s, tag)
            return sc
        sc.content_end = 0
    while True:
        i = _skip_ws(s, i)
        call = _Call(i)
        sc.calls.append(call)
        j = _scan_object_call(s, i, call, ("parameters", "arguments"))
        if call.bad:
            sc.bad = True
            return sc
        if not call.done:
            return sc
        call.end = j
        k = _skip_ws(s, j)
        if k < len(s) and s[k] == ";":
            k = _skip_ws(s, k + 1)
            if k >= len(s):
                return sc
            i = k
            continue
        return sc


def _scan_mistral(s: str) -> _Scan:
    sc = _Scan()
    tag = "[TOOL_CALLS]"
    t = s.find(tag)
    if t < 0:
        sc.content_end = len(s) - _prefix_len(s, tag)
        return sc
    sc.content_end = t
    i = _skip_ws(s, t + len(tag))
    if i >= len(s):
        return sc
    if s[i] == "[":  # [{"name":..., "arguments":...}, ...]
        i += 1
        while True:
            i = _skip_ws(s, i)
            if i >= len(s):
                return sc
            call = _Call(i)
            sc.calls.append(call)
            j = _scan_object_call(s, i, call)
            if call.bad:
                sc.bad = True
                return sc
            if not call.done:
                return sc
            call.end = j
            k = _skip_ws(s, j)
            if k >= len(s):
                call.done = False  # the closing "]" is still coming
                return sc
            if s[k] == ",":
                i = k + 1
                continue
            if s[k] == "]":
                call.end = k + 1
                return sc
            call.bad = sc.bad = True
            return sc
    while True:  # name[ARGS]{...} ([TOOL_CALLS] may repeat before each call)
        call = _Call(i)
        sc.calls.append(call)
        a = s.find("[ARGS]", i)
        if a < 0:  # the name (or [ARGS]) is still coming
            return sc
        name = s[i:a].strip()
        if not _NAME_RE.match(name):
            call.bad = sc.bad = True
            return sc
        call.name = name
        v = _skip_ws(s, a + len("[ARGS]"))
        if v >= len(s):
            return sc
        if s[v] != "{":
            call.bad = sc.bad = True
            return sc
        ve, ok = _scan_value(s, v)
        call.args = s[v:ve]
        if not ok:
            return sc
        call.args_done = call.done = True
        call.end = ve
        k = _skip_ws(s, ve)
        if s.startswith(tag, k):
            k = _skip_ws(s, k + len(tag))
        if k >= len(s) or not re.match(r"[A-Za-z0-9_.:-]", s[k]):
            return sc
        i = k


_SCANNERS = {"hermes": _scan_hermes, "generic": _scan_hermes, "llama3": _scan_llama3, "mistral": _scan_mistral}


def _final_calls(sc: _Scan) -> list[tuple[str, str]] | None:
    """[(name, arguments text)] when the scan holds complete, valid calls; None otherwise."""
    if sc.bad or not sc.calls:
        return None
    out = []
    for c in sc.calls:
        if not c.done or c.name is None:
            return None
        args = c.args if c.args else "{}"
        try:
            if not isinstance(json.loads(args), dict):
                return None
        except ValueError:
            return None
        out.append((c.name, args))
    return out


def parse_tool_calls(text: str, fmt: str, names=None, max_calls: int | None = None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole answer. No complete, valid call (or a call to a function not in `names`,
    when given): (text, []). Content is the text before the first call without its trailing whitespace, or None.
    `max_calls`: calls past that many are dropped (parallel_tool_calls false: 1)."""
    if fmt not in _SCANNERS:
        raise ToolError(f"unknown tool-call format {fmt!r} (one of {', '.join(FORMATS)})")
    sc = _SCANNERS[fmt](text)
    calls = _final_calls(sc)
    if calls is None or (names is not None and any(n not in names for n, _ in calls)):
        return text, []
    content = text[:sc.content_end].rstrip() or None
    if max_calls is not None:
        calls = calls[:max_calls]
    return content, [{"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                     for n, a in calls]


class ToolStreamParser:
    """Incremental parse of a streamed answer. feed(piece) / finish() return OpenAI delta dicts: {"content": ...}
    for text (text that may be the start of a tool-call marker, and trailing whitespace, are held back), and
    {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]} when a call's name is known,
    then {"tool_calls": [{"index", "function": {"arguments": fragment}}]} as its arguments come. The deltas assemble
    to parse_tool_calls' result on the whole text (ids aside). `has_calls` after finish(): the answer held calls."""

    def __init__(self, fmt: str, names=None, max_calls: int | None = None):
        if fmt not in _SCANNERS:
            raise ToolError(f"unknown tool-call format {fmt!r} (one of {', '.join(FORMATS)})")
        self.fmt, self.names = fmt, (set(names) if names is not None else None)
        self.max_calls = max_calls
        self.buf = ""
        self.sent_content = 0  # characters of buf sent as content
        self.sent: list[list] = []  # per call: [id, arguments characters sent]
        self.has_calls = False
        self._scan = _SCANNERS[fmt]

    def _content_delta(self, upto: int) -> list[dict]:
        if upto > self.sent_content:
            d = {"content": self.buf[self.sent_content:upto]}
            self.sent_content = upto
            return [d]
        return []

    def feed(self, piece: str) -> list[dict]:
        if not piece:
            return []
        self.buf += piece
        sc = self._scan(self.buf)
        end = sc.content_end
        while end > self.sent_content and self.buf[end - 1] in _WS:
            end -= 1
        out = self._content_delta(end)
        if not sc.calls or sc.bad:
            return out
        for idx, c in enumerate(sc.calls):
            if c.name is None or (self.names is not None and c.name not in self.names) or \
                    (self.max_calls is not None and idx >= self.max_calls):
                break
            if idx >= len(self.sent):
                self.sent.append([call_id(), 0])
                out.append({"tool_calls": [{"index": idx, "id": self.sent[idx][0], "type": "function",
                                            "function": {"name": c.name, "arguments": ""}}]})
            n = self.sent[idx][1]
            if len(c.args) > n:
                out.append({"tool_calls": [{"index": idx, "function": {"arguments": c.args[n:]}}]})
                self.sent[idx][1] = len(c.args)
        return out

    def finish(self) -> list[dict]:
        content, calls = parse_tool_calls(self.buf, self.fmt, self.names, self.max_calls)
        out = []
        if not calls:
            if not self.sent:
                return self._content_delta(len(self.buf))
            return out  # a call already streamed turned out malformed (e.g. cut by max_tokens): nothing to add
        self.has_calls = True
        out += self._content_delta(len(content or ""))
        for idx, c in enumerate(calls):
            name, args = c["function"]["name"], c["function"]["arguments"]
            if idx >= len(self.sent):
                self.sent.append([c["id"], 0])
                out.append({"tool_calls": [{"index": idx, "id": c["id"], "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
            n = self.sent[idx][1]
            if len(args) > n:
                out.append({"tool_calls": [{"index": idx, "function": {"arguments": args[n:]}}]})
                self.sent[idx][1] = len(args)
        return out


def assemble(deltas) -> tuple[str | None, list[dict]]:
    """Content and tool calls from a sequence of delta dicts (as a client assembles a stream)."""
    text, calls = [], {}
    for d in deltas:
        if d.get("content"):
            text.append(d["content"])
        for tc in d.get("tool_calls") or ():
            c = calls.setdefault(tc["index"], {"id": None, "type": "function", "function": {"name": None,
                                                                                         "arguments": ""}})
            if tc.get("id"):
                c["id"] = tc["id"]
            f = tc.get("function") or {}
            if f.get("name"):
                c["function"]["name"] = f["name"]
            c["function"]["arguments"] += f.get("arguments") or ""
    return ("".join(text) or None), [calls[k] for k in sorted(calls)]


# ---------------------------------------------------------------- constraints for tool_choice required / named

def _lark_lit(tokenizer, text: str) -> str:
    """A Lark terminal for `text`: the special token itself (<[id]>) when `text` is one token the grammar cannot
    spell with ordinary text (control / user-defined <...> tokens), else the quoted string."""
    tid = tokenizer.token_id(text) if tokenizer is not None and hasattr(tokenizer, "token_id") else None
    if tid is not None:
        from llamba.tokenizer import ATTR_CONTROL, ATTR_USER_DEFINED
        a = int(tokenizer.attrs[tid])
        if a & ATTR_CONTROL or (a & ATTR_USER_DEFINED and text.startswith("<") and text.endswith(">")):
            return f"<[{tid}]>"
    return json.dumps(text)


def call_schema(tools: list[dict], name: str | None, args_key: str = "arguments") -> dict:
    """The JSON schema of one call: anyOf over the functions (or the named one) of {"name": const, args_key:
    parameters}; compact JSON (no free whitespace)."""
    alts = []
    for t in tools:
        f = t["function"]
        if name is not None and f["name"] != name:
            continue
        alts.append({"type": "object", "properties": {"name": {"const": f["name"]}, args_key: f["parameters"]},
                     "required": ["name", args_key], "additionalProperties": False})
    if not alts:
        raise ToolError(f"no function {name!r} in 'tools'")
    return {"x-guidance": {"whitespace_flexible": False},
            **({"anyOf": alts} if len(alts) > 1 else alts[0])}


def tool_grammar(fmt: str, tools: list[dict], name: str | None, parallel: bool, tokenizer=None) -> str:
    """A Lark grammar (llguidance) admitting exactly the tool-call syntax of `fmt` with valid arguments: one call,
    or 1-MAX_PARALLEL calls when `parallel` (and no function is named)."""
    many = parallel and name is None
    rep = f"{{0,{MAX_PARALLEL - 1}}}"
    if fmt == "llama3":
        body = json.dumps(call_schema(tools, name, "parameters"))
        start = 'call ("; " call)' + rep if many else "call"
        return f"start: {start}\ncall: %json {body}\n"
    body = json.dumps(call_schema(tools, name))
    if fmt == "mistral":
        tag = _lark_lit(tokenizer, "[TOOL_CALLS]")
        start = f'{tag} "[" call ("," call){rep} "]"' if many else f'{tag} "[" call "]"'
        return f"start: {start}\ncall: %json {body}\n"
    o, c = _lark_lit(tokenizer, "<tool_call>"), _lark_lit(tokenizer, "</tool_call>")
    start = 'call ("\\n" call)' + rep if many else "call"
    return f'start: {start}\ncall: {o} "\\n" body "\\n" {c}\nbody: %json {body}\n'


def marker_ids(fmt: str, tokenizer) -> set[int]:
    """Ids of the format's marker tokens that detokenize to nothing unless special tokens are printed (control
    tokens such as [TOOL_CALLS] or <|python_tag|>): the chat stream prints them so the parser sees them."""
    if tokenizer is None or not hasattr(tokenizer, "token_id"):
        return set()
    from llamba.tokenizer import ATTR_CONTROL, ATTR_UNKNOWN
    out = set()
    for text in {"hermes": ("<tool_call>", "</tool_call>"), "generic": ("<tool_call>", "</tool_call>"),
                 "llama3": ("<|python_tag|>",), "mistral": ("[TOOL_CALLS]", "[ARGS]")}[fmt]:
        tid = tokenizer.token_id(text)
        if tid is not None and int(tokenizer.attrs[tid]) & (ATTR_CONTROL | ATTR_UNKNOWN):
            out.add(int(tid))
    return out


class ToolPlan:
    """One chat request's tool handling: the format, the validated tools, tool_choice mode (+ named function),
    parallel_tool_calls."""

    def __init__(self, fmt: str, tools: list[dict], mode: str, name: str | None, parallel: bool):
        self.fmt, self.tools, self.mode, self.name, self.parallel = fmt, tools, mode, name, parallel

    @property
    def active(self) -> bool:
        """Tools are rendered and the answer is parsed."""
        return self.mode != "none" and bool(self.tools)

    @property
    def constrained(self) -> bool:
        return self.active and self.mode == "required"

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def messages(self, messages) -> list:
        return adapt_messages(messages, self.fmt, self.tools if self.active else None)

    def template_tools(self):
        """The template's `tools` variable: the tools for a native format when active, else None."""
        return self.tools if self.active and self.fmt != "generic" else None

    def grammar(self, tokenizer=None) -> str:
        return tool_grammar(self.fmt, self.tools, self.name, self.parallel, tokenizer)

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        return parse_tool_calls(text, self.fmt, self.names, None if self.parallel else 1)

    def stream_parser(self) -> ToolStreamParser:
        return ToolStreamParser(self.fmt, self.names, None if self.parallel else 1)


def plan_tools(template_source: str | None, tools=None, tool_choice=None, parallel_tool_calls=None) -> ToolPlan:
    """Validate the request's tool fields against each other and pick the template's format."""
    ts = check_tools(tools)
    mode, name = check_tool_choice(tool_choice, ts)
    par = check_parallel(parallel_tool_calls)
    return ToolPlan(detect_format(template_source), ts, mode, name, par)
