"""Responses request -> the engine's neutral request: input items to messages, tools to functions.

Codex sends the whole conversation as items every turn: developer and user messages,
the model's own reasoning, messages and function calls, and the calls' outputs. A turn
of the model is several items (reasoning, message, calls) that the chat template wants
as one assistant message, so consecutive assistant-side items are merged here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from mlxd.server.constrained import ResponseFormat
from mlxd.server.requests import GenerationRequest, ModelRef, SamplingParams

from ..structured import response_format
from .responses_protocol import ResponsesRequest

log = logging.getLogger("mlxd.api")

# A function of a `namespace` tool is offered to the model under Codex's canonical flat
# name (codex-rs ToolName::canonical_flat_name: the namespace without trailing `_`, `__`,
# the name without leading `_`; an MCP tool reads `mcp__server__tool`), and the model's
# call goes back split into `namespace` and `name`, which is how Codex routes it.
NAMESPACE_SEPARATOR = "__"
CALL_ID_PREFIX = "call_"  # Responses call ids read call_...; the engine's ids are bare
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
_ASSISTANT_SIDE = ("reasoning", "function_call")
_logged_once: set[str] = set()


class InputError(ValueError):
    """A request this door cannot read: answered 400 naming the parameter."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


@dataclass
class Translated:
    """What the door needs after translation: the engine request, the conversation as
    items (for `store`), and the joined names of namespaced functions."""

    generation: GenerationRequest
    items: list[dict]
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)


def template_call_id(call_id: str) -> str:
    """The engine's own call id (9 letters and digits, which Mistral's templates demand)
    for a `call_` id this door made; any other id as it came."""
    engine_id = call_id.removeprefix(CALL_ID_PREFIX)
    return engine_id if len(engine_id) == 9 and engine_id.isalnum() else call_id


def joined_name(namespace: str, name: str) -> str:
    return f"{namespace.rstrip('_')}{NAMESPACE_SEPARATOR}{name.lstrip('_')}"


def _once(key: str, message: str, *args) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        log.info(message, *args)


def wire_items(value: Any) -> list[dict]:
    """`input` as a list of plain item dicts (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}] if value else []
    return [item.model_dump(exclude_none=True) for item in value]


def _text(content: Any, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind not in TEXT_PARTS:
            raise InputError(f"content part type {kind!r} is not supported: mlxd reads text only", f"{param}[{i}]")
        texts.append(part.get("text") or "")
    return "".join(texts)


def _reasoning_text(item: dict, param: str) -> str:
    """Readable reasoning (its text, else its summary); encrypted_content is OpenAI's alone."""
    return _text(item.get("content"), f"{param}.content") or "\n".join(
        s.get("text") or "" for s in item.get("summary") or []
    )


def messages_of(instructions: Optional[str], items: list[dict], first_param: int = 0) -> list[dict]:
    """Items -> chat messages; leading system/developer text becomes one system message."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    turn: Optional[dict] = None  # the assistant message being assembled

    def assistant(fresh_if_spoken: bool) -> dict:
        """The open assistant turn; a new one when none is open, or when text or reasoning
        follows a turn that already has text or calls (the model spoke again)."""
        nonlocal turn
        spoken = turn is not None and bool(turn["content"] or turn.get("tool_calls"))
        if turn is None or (fresh_if_spoken and spoken):
            turn = {"role": "assistant", "content": ""}
            messages.append(turn)
        return turn

    for n, item in enumerate(items):
        param = f"input[{n - first_param}]" if n >= first_param else "previous_response_id"
        kind = item.get("type") or ("message" if item.get("role") else None)
        if kind == "message":
            role = item.get("role")
            text = _text(item.get("content"), f"{param}.content")
            if role == "assistant":
                assistant(True)["content"] = text
                continue
            turn = None
            role = "system" if role in ("system", "developer") else role
            if role == "system" and all(m["role"] == "system" for m in messages) and messages:
                messages[0]["content"] += "\n\n" + text
            elif role == "user" and messages and messages[-1]["role"] == "user":
                # Codex sends its environment context and the prompt as two user messages;
                # templates that demand alternating roles (Mistral's) refuse that.
                messages[-1]["content"] += "\n\n" + text
            elif role in ("system", "user"):
                messages.append({"role": role, "content": text})
            else:
                raise InputError(f"message role {role!r} is not supported", f"{param}.role")
        elif kind == "reasoning":
            text = _reasoning_text(item, param)
            if text:
                current = assistant(True)
                current["reasoning_content"] = current.get("reasoning_content", "") + text
        elif kind == "function_call":
            if not item.get("call_id") or not item.get("name"):
                raise InputError("a function_call needs call_id and name", param)
            name = item["name"]
            if item.get("namespace"):
                name = joined_name(item["namespace"], name)
            call = {"id": template_call_id(item["call_id"]), "type": "function",
                    "function": {"name": name, "arguments": item.get("arguments") or "{}"}}
            assistant(False).setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            if not item.get("call_id"):
                raise InputError("a function_call_output needs call_id", param)
            turn = None
            output = _text(item.get("output"), f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": template_call_id(item["call_id"]), "content": output})
        else:
            _once(f"item:{kind}", "input items of type %r are skipped: mlxd cannot replay them (logged once)", kind)
    return messages


def _function(tool: dict, name: str, param: str) -> dict:
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise InputError("a function tool needs a name", f"{param}.name")
    function = {"name": name}
    if tool.get("description"):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def offered_tools(tools: Optional[list[dict]]) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """Function tools and the functions of namespace tools; built-ins are left out (logged once)."""
    functions, namespaced = [], {}
    for i, tool in enumerate(tools or []):
        kind = tool.get("type")
        if kind == "function":
            functions.append(_function(tool, tool.get("name"), f"tools[{i}]"))
        elif kind == "namespace":
            for j, inner in enumerate(tool.get("tools") or []):
                if inner.get("type", "function") != "function":
                    continue
                param = f"tools[{i}].tools[{j}]"
                if not isinstance(tool.get("name"), str) or not isinstance(inner.get("name"), str):
                    raise InputError("a namespace and its functions need names", param)
                joined = joined_name(tool["name"], inner["name"])
                functions.append(_function(inner, joined, param))
                namespaced[joined] = (tool.get("name"), inner["name"])
        else:
            _once(f"tool:{kind}", "tools of type %r are not offered to the model: mlxd cannot run them (logged once)", kind)
    return functions, namespaced


def _tool_choice(choice: Any, functions: list[dict]) -> Any:
    if not functions or choice == "none":
        return "none"
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    if choice.get("type") == "allowed_tools":
        return choice.get("mode", "auto")
    name = choice.get("name")
    if choice.get("type") == "function" and choice.get("namespace"):
        name = joined_name(choice["namespace"], name or "")
    if choice.get("type") != "function" or name not in {f["function"]["name"] for f in functions}:
        raise InputError(f"tool_choice names a tool that is not among the offered functions: {choice}", "tool_choice")
    return {"type": "function", "function": {"name": name}}


def _response_format(body: ResponsesRequest) -> Optional[ResponseFormat]:
    """`text.format` as the engine's constraint, checked the way chat completions checks it."""
    fmt = body.text.format if body.text else None
    if fmt is None:
        return None
    if fmt.type == "json_schema" and fmt.schema_ is None:
        raise InputError("text.format of type json_schema needs a schema", "text.format.schema")
    return response_format(fmt.type, fmt.schema_, fmt.name or "response", param="text.format.schema")


def translate(body: ResponsesRequest, ref: ModelRef, history: list[dict], request_id: str) -> Translated:
    """The engine request for `body`, continuing `history` (the items of previous_response_id)."""
    items = history + wire_items(body.input)
    messages = messages_of(body.instructions, items, first_param=len(history))
    if not any(m["role"] in ("user", "tool") for m in messages):
        messages.append({"role": "user", "content": ""})  # probes send no input at all
    functions, namespaced = offered_tools(body.tools)
    tool_choice = _tool_choice(body.tool_choice, functions)
    generation = GenerationRequest(
        model=ref,
        messages=messages,
        tools=functions or None,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        max_tokens=body.max_output_tokens,
        sampling=SamplingParams(temperature=body.temperature, top_p=body.top_p),
        request_id=request_id,
        door="responses",
        response_format=_response_format(body),
    )
    return Translated(generation, items, namespaced)
