"""Turn OpenAI-style messages into the token list the model reads.

The prompt is rendered once with the model's own chat template and tokenized
once (the part an earlier prompt began with is not tokenized again:
`prompt_tokens`); `prompt_tokens` in usage is the length of exactly this list.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Optional

from jinja2 import TemplateError

from .output import forced_prefix
from .prompt_tokens import encode_prompt

log = logging.getLogger("mlxd.prompt")

_THINKING_FIELD = re.compile(r"""message\.thinking\b|["']thinking["']\s+in\s+message""")

# How many of the last messages get a prompt-cache checkpoint where they end.
RECENT_MESSAGES = 3


@dataclass
class Prompt:
    tokens: list[int]
    # Token offset -> prompt-cache checkpoint kind, for the offsets where a
    # message ends (exclusive of 0 and len). Kinds are the prefix cache's
    # (`prefix_cache.RamEntry.kind`): "system" (end of the system prompt and tools,
    # evicted last) and "user" (ends of the recent messages, the last one included).
    checkpoints: dict[int, str]
    # True when the rendered prompt leaves the model inside a thinking block.
    starts_in_reasoning: bool = False
    # Text appended after the generation prompt (a forced tool-call prefix).
    suffix: str = ""


def _text_of(content: Any) -> Any:
    """Join an array of text parts into one string; leave other content alone."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") in ("text", "input_text"):
            texts.append(part.get("text", ""))
        elif isinstance(part, str):
            texts.append(part)
        else:
            raise ValueError(f"unsupported content part type: {part.get('type')!r}")
    return "".join(texts)


def _arguments_object(arguments: Any) -> Any:
    """Templates iterate tool-call arguments, so hand them a dict when the JSON parses."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return arguments


def reads_thinking(chat_template: Any) -> bool:
    """Whether a template reads an assistant turn's reasoning from `thinking` (gpt-oss)."""
    return isinstance(chat_template, str) and bool(_THINKING_FIELD.search(chat_template))


def normalize_messages(messages: list[dict], thinking_field: bool = False) -> list[dict]:
    """Bring OpenAI wire messages into the shape HF chat templates expect.

    Reasoning arrives as `reasoning_content` (or `reasoning`); templates that
    read `thinking` get it there too.
    """
    out = []
    for message in messages:
        m = {k: v for k, v in message.items() if v is not None}
        if "content" in m:
            m["content"] = _text_of(m["content"])
        elif m.get("role") in ("user", "system", "tool", "assistant"):
            m["content"] = ""
        reasoning = m.pop("reasoning", None)
        if reasoning is not None:
            m.setdefault("reasoning_content", reasoning)
        if thinking_field and m.get("role") == "assistant" and m.get("reasoning_content"):
            if m.get("content") and m.get("tool_calls"):
                # The template renders this content as the turn's analysis and
                # refuses a second one; transformers would alias the reasoning to it.
                del m["reasoning_content"]
                m.pop("thinking", None)
            else:
                m.setdefault("thinking", m["reasoning_content"])
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = dict(call.get("function") or {})
                function["arguments"] = _arguments_object(function.get("arguments"))
                calls.append({**call, "function": function})
            m["tool_calls"] = calls
        out.append(m)
    return out


def _render(tokenizer, messages, tools, add_generation_prompt, thinking: Optional[bool] = None) -> str:
    extra = {} if thinking is None else {"enable_thinking": thinking}
    return tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **extra,
    )


def _late_system(messages: list[dict]) -> list[int]:
    """Indexes of system messages after the first non-system one."""
    first = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    return [i for i in range(first, len(messages)) if messages[i].get("role") == "system"]


def late_system_as_user(messages: list[dict]) -> list[dict]:
    """Mid-conversation system messages as user turns marked `<system>...</system>`, kept
    in place (moving them to the top would change the cached prefix every turn), and merged
    with a neighbouring user turn for templates that insist on alternating roles."""
    late = set(_late_system(messages))
    out: list[dict] = []
    for i, m in enumerate(messages):
        if i in late:
            m = {"role": "user", "content": f"<system>\n{m.get('content', '')}\n</system>"}
        last = out[-1] if out else None
        if (
            last is not None and last["role"] == m["role"] == "user" and (i in late or i - 1 in late)
            and isinstance(last.get("content"), str) and isinstance(m.get("content"), str)
        ):
            out[-1] = {**last, "content": f"{last['content']}\n\n{m['content']}"}
        else:
            out.append(m)
    return out


def _render_chat(tokenizer, messages, tools, suffix, thinking) -> tuple[list[dict], str]:
    """The generation prompt and the messages it was rendered from.

    Templates that refuse a mid-conversation system message (Mistral's alternation
    check) or silently drop one (gpt-oss) get it as a marked user turn instead."""
    late = _late_system(messages)
    try:
        text = _render(tokenizer, messages, tools, True, thinking)
        if all(str(messages[i].get("content", "")).strip() in text for i in late):
            return messages, text + suffix
    except TemplateError as e:  # raise_exception() in the template, or a field it needs
        if not late:
            raise ValueError(f"the model's chat template cannot render these messages: {e}") from e
    messages = late_system_as_user(messages)
    try:
        return messages, _render(tokenizer, messages, tools, True, thinking) + suffix
    except TemplateError as e:
        raise ValueError(f"the model's chat template cannot render these messages: {e}") from e


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, at C speed
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@functools.lru_cache(maxsize=16)
def _encoded_prefix(tokenizer, text: str) -> list[int]:
    """A checkpoint's prefix tokenized once: an agent's every turn repeats the same
    system prompt and tools, whose tokenization would otherwise cost a warm turn
    as much as the whole prompt's."""
    return tokenizer.encode(text, add_special_tokens=False)


def message_checkpoints(
    tokenizer, messages, tools, tokens: list[int], recent: bool = True, thinking: Optional[bool] = None
) -> dict[int, str]:
    """Token offsets where the system prompt and (with `recent`) the most recent messages end.

    The end of the system prompt is shared by every conversation of an agent;
    the end of the last message is where the next turn of this conversation
    diverges when the assistant's answer is rendered differently (reasoning
    dropped, reformatted tool calls), so models whose cache cannot be trimmed
    still resume there. Found by rendering message prefixes and matching them
    to the full prompt, so it holds for any template; templates that refuse a
    prefix are skipped.
    """
    n_system = 0
    while n_system < len(messages) and messages[n_system]["role"] == "system":
        n_system += 1
    cuts = {n_system}
    if recent:
        cuts |= set(range(max(1, len(messages) - RECENT_MESSAGES + 1), len(messages) + 1))
    checkpoints = {}
    for k in sorted(c for c in cuts if c > 0):
        try:
            text = _render(tokenizer, messages[:k], tools, False, thinking)
        except Exception:  # templates may insist on a user turn etc.
            continue
        prefix = _encoded_prefix(tokenizer, text)
        n = _common_prefix(prefix, tokens)
        if 0 < n < len(tokens):
            checkpoints.setdefault(n, "system" if k == n_system else "user")
    return checkpoints


def build_prompt(
    tokenizer,
    messages: list[dict],
    tools: Optional[list[dict]] = None,
    suffix: str = "",
    recent_checkpoints: bool = True,
    thinking: Optional[bool] = None,
) -> Prompt:
    """Render and tokenize a chat; `suffix` is text the assistant turn is forced to start with.

    Each checkpoint costs a render and a tokenization of a prompt prefix;
    `recent_checkpoints=False` finds only the end of the system prompt. `thinking`
    is the template's `enable_thinking` switch (None: the template's default).
    """
    if not tokenizer.has_chat_template:
        raise ValueError("this model has no chat template")
    messages = normalize_messages(messages, reads_thinking(tokenizer.chat_template))
    messages, text = _render_chat(tokenizer, messages, tools, suffix, thinking)
    tokens = encode_prompt(tokenizer, text)
    starts_in_reasoning = False
    if tokenizer.has_thinking:
        starts_in_reasoning = text.rfind(tokenizer.think_start) > text.rfind(tokenizer.think_end)
    return Prompt(
        tokens=tokens,
        checkpoints=message_checkpoints(tokenizer, messages, tools, tokens, recent_checkpoints, thinking),
        starts_in_reasoning=starts_in_reasoning,
        suffix=suffix,
    )


def offered_tools(request) -> Optional[list[dict]]:
    """The tools a GenerationRequest shows the model: none when tool_choice is "none"."""
    return request.tools if request.tool_choice != "none" else None


def request_prompt(tokenizer, fmt, request, recent_checkpoints: bool = True) -> Prompt:
    """The prompt a GenerationRequest feeds the model (`fmt`: the model's OutputFormat).

    The one place a request becomes tokens, so that counting a request's tokens
    (Anthropic's count_tokens) gives exactly what generating it reads."""
    tools = offered_tools(request)
    return build_prompt(
        tokenizer,
        request.messages,
        tools,
        suffix=forced_prefix(fmt, request.tool_choice, tools),
        recent_checkpoints=recent_checkpoints,
        thinking=request.thinking,
    )
