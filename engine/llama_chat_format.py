"""Chat formatters in the shape of llama-cpp-python's `llama_cpp.llama_chat_format` (the prompt-building half):
a formatter is a callable `formatter(messages=[...], **kwargs) -> ChatFormatterResponse` (prompt text, stop
strings, `added_special`: whether the prompt already holds the BOS text).

    from llamba.llama_chat_format import hf_tokenizer_config_to_chat_formatter
    fmt = hf_tokenizer_config_to_chat_formatter(json.load(open("tokenizer_config.json")))
    fmt(messages=[{"role": "user", "content": "Hi"}]).prompt

Jinja templates render in llamba's chat-template sandbox (llamba.chat.ChatTemplate: the same limits and
extensions as a model's own template). `Llama.create_chat_completion` does not use these formatters: it renders
the model's template (or the `chat_format` / `chat_template` given to Llama) itself.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Union

from llamba.errors import ParameterError

__all__ = ["ChatFormatterResponse", "ChatFormatter", "Jinja2ChatFormatter", "hf_tokenizer_config_to_chat_formatter",
           "format_mistral_instruct", "register_chat_format", "get_chat_format", "CHAT_FORMATS"]


@dataclasses.dataclass
class ChatFormatterResponse:
    """A formatted chat prompt: `prompt` text, `stop` string(s), optional `stopping_criteria`, and
    `added_special` (True when the prompt already starts with the BOS text, so none is to be added)."""
    prompt: str
    stop: Optional[Union[str, List[str]]] = None
    stopping_criteria: Optional[Any] = None
    added_special: bool = False


ChatFormatter = Callable[..., ChatFormatterResponse]

CHAT_FORMATS: Dict[str, ChatFormatter] = {}


def register_chat_format(name: str):
    """Decorator: register a formatter under `name` (get_chat_format(name) returns it)."""
    def deco(f: ChatFormatter) -> ChatFormatter:
        CHAT_FORMATS[name] = f
        return f
    return deco


def get_chat_format(name: str) -> ChatFormatter:
    try:
        return CHAT_FORMATS[name]
    except KeyError:
        raise ParameterError(f"unknown chat format {name!r} (known: {', '.join(sorted(CHAT_FORMATS))})") from None


class Jinja2ChatFormatter:
    """A formatter from a Jinja chat template and the BOS / EOS texts (llama-cpp-python's Jinja2ChatFormatter):
    the prompt is the template rendered with `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and,
    when given, `tools` / `tool_choice`; the stop string is the EOS text."""

    def __init__(self, template: str, eos_token: str, bos_token: str, add_generation_prompt: bool = True,
                 stop_token_ids: Optional[List[int]] = None):
        from llamba.chat import ChatTemplate
        self.template = template
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.add_generation_prompt = add_generation_prompt
        self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else None
        self._tmpl = ChatTemplate(template, bos_token=bos_token, eos_token=eos_token)

    def __call__(self, *, messages, functions=None, function_call=None, tools=None, tool_choice=None,
                 **kwargs) -> ChatFormatterResponse:
        if functions is not None or function_call is not None:
            kwargs.update(functions=functions, function_call=function_call)
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        prompt = self._tmpl.render(list(messages), add_generation_prompt=self.add_generation_prompt, tools=tools,
                                   **kwargs)
        return ChatFormatterResponse(prompt=prompt, stop=[self.eos_token], added_special=True)

    def to_chat_handler(self):
        raise ParameterError("chat handlers are not used by llamba: pass chat_template=... to Llama instead")


def hf_tokenizer_config_to_chat_formatter(tokenizer_config: Dict[str, Any],
                                          add_generation_prompt: bool = True) -> ChatFormatter:
    """A formatter from a Hugging Face tokenizer_config.json (its chat_template, bos_token and eos_token), as
    llama-cpp-python builds it: the generation prompt is an empty assistant message appended to the messages
    (the template is rendered without add_generation_prompt); stop strings: the EOS and BOS texts."""
    if not isinstance(tokenizer_config, dict):
        raise ParameterError("tokenizer_config must be a dict (a parsed tokenizer_config.json)")
    for key in ("chat_template", "bos_token", "eos_token"):
        if not isinstance(tokenizer_config.get(key), str):
            raise ParameterError(f"tokenizer_config needs a string {key!r}")
    from llamba.chat import ChatTemplate
    bos, eos = tokenizer_config["bos_token"], tokenizer_config["eos_token"]
    tmpl = ChatTemplate(tokenizer_config["chat_template"], name="tokenizer_config", bos_token=bos, eos_token=eos)

    def format_tokenizer_config(messages, **kwargs) -> ChatFormatterResponse:
        msgs = list(messages)
        if add_generation_prompt:
            msgs.append({"role": "assistant", "content": ""})
        prompt = tmpl.render(msgs, add_generation_prompt=False, **kwargs)
        return ChatFormatterResponse(prompt=prompt, stop=[eos, bos], added_special=True)

    return format_tokenizer_config


@register_chat_format("mistral-instruct")
def format_mistral_instruct(messages, **kwargs) -> ChatFormatterResponse:
    """Mistral Instruct: `[INST] user [/INST]assistant</s>...` ending with ` [/INST]` (no BOS text: added_special
    False)."""
    eos = "</s>"
    parts = []
    for m in messages:
        content = m.get("content")
        if m.get("role") == "user" and isinstance(content, str):
            parts.append("[INST] " + content)
        elif m.get("role") == "assistant" and content is not None:
            parts.append(" [/INST]" + content + eos)
    return ChatFormatterResponse(prompt="".join(parts) + " [/INST]", stop=eos)
