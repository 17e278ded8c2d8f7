"""How each model family writes tool calls, kept in one place.

A `ToolFormat` names the markers around a call and what the streaming parser
(`server/output.py`) needs: for JSON-argument formats, `headers` match a call's
text up to the start of its arguments object, so the call can be announced and
its arguments streamed while the model writes them (harmony: `channels`). Other
formats are parsed whole by `parse` when their end marker arrives.

Those whole-call parsers are mlx-lm's own (`mlx_lm.tool_parsers.*`); this module
adds what mlx-lm lacks (streaming JSON calls, Llama 3.x JSON calls, gpt-oss
harmony) and the knowledge needed to force a call.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import regex

ToolParser = Callable[[str, Optional[list]], "dict | list[dict]"]

# `{"name": "NAME", "arguments": ` (or "parameters", optionally after "type": "function"),
# ending where the arguments value begins.
OBJECT_HEADER = regex.compile(
    r'\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?'
    r'"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*,\s*'
    r'"(?:arguments|parameters)"\s*:'
)
# Mistral (v11+ templates): `NAME[ARGS]` then the arguments object.
NAME_ARGS_HEADER = regex.compile(r"(?P<name>[\w.-]+)\s*\[ARGS\]")


@dataclass(frozen=True)
class Channels:
    """Output made of headed messages (gpt-oss harmony): `<|channel|>HEADER<|message|>BODY<|end|>`."""

    opens: tuple[str, ...]  # markers that begin a message header
    body: str  # marker between a header and its body
    ends: tuple[str, ...]  # markers that end a message body
    route: Callable[[str], tuple[str, Optional[str]]]  # header -> (reasoning|content|tool, name)
    # The generation prompt ends inside a header ("<|start|>assistant"), so a
    # response may go on with it: " to=functions.NAME<|channel|>commentary json<|message|>".
    prompt_opens_header: bool = False


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: Optional[str]  # marker that opens a call region (None: no marker)
    end: Optional[str]  # marker that closes it (None: the region ends with its calls)
    # Parses a whole region body into a dict or list of {"name", "arguments"};
    # formats that stream their arguments (headers, channels) need none.
    parse: Optional[ToolParser] = None
    headers: tuple[regex.Pattern, ...] = ()  # JSON-argument formats: see module docstring
    implicit_start: bool = False  # a response that begins with "{" is a call (Llama 3.x)
    required_prefix: str = ""  # text that forces the model into some call
    named_prefix: str = ""  # text that forces a call to "{name}"
    channels: Optional[Channels] = None

    @property
    def streams_arguments(self) -> bool:
        return bool(self.headers) or self.channels is not None


def call_from_json(value: Any) -> dict:
    """`{"name", "arguments"}` from a decoded call object; ValueError if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise ValueError(f"not a tool call object: {value!r:.200}")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call arguments are not an object: {arguments!r:.200}")
    return {"name": value["name"], "arguments": arguments}


_HARMONY_CHANNEL = regex.compile(r"<\|channel\|>\s*(\w+)")
_HARMONY_RECIPIENT = regex.compile(r"to=functions\.([^\s<]+)")


def _harmony_route(header: str) -> tuple[str, Optional[str]]:
    recipient = _HARMONY_RECIPIENT.search(header)
    if recipient:
        return "tool", recipient.group(1)
    channel = _HARMONY_CHANNEL.search(header)
    return ("reasoning" if channel and channel.group(1) == "analysis" else "content"), None


def _mlx_lm(module: str) -> ToolParser:
    """mlx-lm's parse_tool_call of `module`, imported on first use (importing mlx_lm loads MLX)."""

    def parse(text: str, tools: Optional[list] = None):
        return importlib.import_module(f"mlx_lm.tool_parsers.{module}").parse_tool_call(text, tools)

    return parse


HARMONY = ToolFormat(
    name="harmony",
    start=None,
    end=None,
    required_prefix="<|channel|>commentary to=functions.",
    named_prefix="<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>",
    channels=Channels(
        opens=("<|start|>", "<|channel|>"),
        body="<|message|>",
        ends=("<|end|>", "<|return|>", "<|call|>"),
        route=_harmony_route,
        prompt_opens_header=True,
    ),
)

MISTRAL = ToolFormat(  # [TOOL_CALLS]NAME[ARGS]{...} (v11+) or [TOOL_CALLS] [{"name": ..., "arguments": ...}]
    name="mistral",
    start="[TOOL_CALLS]",
    end=None,
    headers=(OBJECT_HEADER, NAME_ARGS_HEADER),
    required_prefix="[TOOL_CALLS]",
    named_prefix="[TOOL_CALLS]{name}[ARGS]",
)

FORMATS: dict[str, ToolFormat] = {
    f.name: f
    for f in (
        ToolFormat(  # Qwen2.5, Qwen3, Hermes: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
            name="json_tools",
            start="<tool_call>",
            end="</tool_call>",
            headers=(OBJECT_HEADER,),
            required_prefix="<tool_call>\n",
            named_prefix='<tool_call>\n{"name": "{name}", "arguments": ',
        ),
        ToolFormat(  # Llama 3.1-3.3: {"name": ..., "parameters": {...}} as the whole response
            name="llama3_json",
            start="<|python_tag|>",
            end=None,
            headers=(OBJECT_HEADER,),
            implicit_start=True,
            required_prefix='{"name": "',
            named_prefix='{"name": "{name}", "parameters": ',
        ),
        MISTRAL,
        # Mistral 7B v0.3 and NeMo (tokenizers without [ARGS]): the same parser, but a
        # call is forced in their own syntax, [TOOL_CALLS][{"name": ..., "arguments": ...}].
        replace(
            MISTRAL,
            name="mistral_json",
            required_prefix='[TOOL_CALLS][{"name": "',
            named_prefix='[TOOL_CALLS][{"name": "{name}", "arguments": ',
        ),
        ToolFormat(  # Qwen3-Coder: <tool_call>\n<function=NAME>\n<parameter=K>\nV\n</parameter>\n</function>\n</tool_call>
            name="qwen3_coder",
            start="<tool_call>",
            end="</tool_call>",
            parse=_mlx_lm("qwen3_coder"),
            required_prefix="<tool_call>\n<function=",
            named_prefix="<tool_call>\n<function={name}>\n",
        ),
        ToolFormat(  # GLM-4.5 to 4.7: <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>
            name="glm47",
            start="<tool_call>",
            end="</tool_call>",
            parse=_mlx_lm("glm47"),
            required_prefix="<tool_call>",
            named_prefix="<tool_call>{name}",
        ),
        ToolFormat(  # LFM2: <|tool_call_start|>[NAME(k="v")]<|tool_call_end|>
            name="pythonic",
            start="<|tool_call_start|>",
            end="<|tool_call_end|>",
            parse=_mlx_lm("pythonic"),
            required_prefix="<|tool_call_start|>[",
            named_prefix="<|tool_call_start|>[{name}(",
        ),
        HARMONY,
    )
}


def lookup(name: Optional[str]) -> Optional[ToolFormat]:
    """The format called `name`: ours, or any other mlx-lm parser module (parsed whole)."""
    if not name:
        return None
    if name in FORMATS:
        return FORMATS[name]
    if not name.isidentifier():
        return None
    try:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    except ImportError:
        return None
    start = module.tool_call_start or None
    return ToolFormat(
        name=name,
        start=start,
        end=module.tool_call_end or None,
        parse=module.parse_tool_call,
        required_prefix=start or "",
        named_prefix=start or "",
    )


def resolve(name: Optional[str], chat_template: Any, vocab: dict) -> Optional[str]:
    """A model's tool format: `name` (configured, or inferred by mlx-lm) or else
    detected, told apart by vocabulary where mlx-lm's name covers two syntaxes."""
    name = name or detect(chat_template, vocab)
    if name == "mistral" and "[ARGS]" not in vocab:
        return "mistral_json"
    return name


def detect(chat_template: Any, vocab: dict) -> Optional[str]:
    """The formats mlx-lm does not infer, recognised from the chat template and vocabulary."""
    if "<|channel|>" in vocab and "<|message|>" in vocab:
        return "harmony"
    if isinstance(chat_template, str) and (
        "<|python_tag|>" in chat_template
        or '"parameters": dictionary of argument name' in chat_template
    ):
        return "llama3_json"
    return None
